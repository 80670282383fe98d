"""`readapt serve` under load: one server with K adapters (one backbone pass per batch) against one server process
per adapter, on the same cores. Localhost only; bounded in rows and seconds per measurement.

Protocol (defaults):
  - backbone: the embedded all-MiniLM-L6-v2, float32, CPU; every thread of every server process pinned to
    --server-cores (default core 0; pinned once it has loaded) with --threads torch threads (default 1), the load
    generator pinned to --client-cores (default 1);
  - adapters: READ with the default config (GRU, r = 256), NOT trained: every side-network and head weight drawn
    from N(0, 0.02) with its own seed (benchmarks/predict.py's make_adapters; the compute is that of a trained
    one), each saved with an SST-2 task file (column `sentence`, max length 128), so all K share one input
    recipe; the server runs the side networks on [CLS] only, as `readapt predict` does;
  - load: closed loop, C concurrent clients (C in --concurrency, default 1, 4, 16), each sending one SST-2 dev
    sentence per request (--rows-per-request) and the next as soon as the answer is in; keep-alive HTTP/1.1
    connections (http.client); each measurement runs --seconds (default 8) or --max-rows rows (default 1000),
    whichever ends first, after an unmeasured warm-up of one row per client;
  - "K adapters": one server holding K adapters; a row is done when its answer (all K predictions) is in;
  - "8 single servers": one server process per adapter (as many as the largest K), all on the same cores; a row
    is done when all of them have answered it (each of the C clients sends its row to every server at once);
  - figures per measurement: rows per second (wall), p50 / p99 latency per row, the servers' CPU seconds (all
    server processes, user + system, from psutil) per 1,000 rows, and the mean rows per model call (from each
    server's /health counters); the servers' own defaults for batching (--batch-window-ms 5, --max-batch-rows 64);
  - before measuring, the K-adapter server and the single servers answer the same 16 rows: their predictions
    must be identical (checked, printed).
Goals (issue 21): with 8 adapters, throughput >= 5x that of the 8 single-adapter servers; p99 latency at
concurrency 16 <= 2x the single-adapter server's (K = 1).

Usage: python benchmarks/serve.py [--adapters 1,4,8] [--concurrency 1,4,16] [--seconds 8] [--max-rows 1000]
                                  [--server-cores 0] [--client-cores 1] [--threads 1] [--json serve.json]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # localhost only


def _default_glue() -> str:
    return os.environ.get("READAPT_GLUE_DIR") or os.environ.get("GLUE_DIR") or str(REPO_ROOT.parent / "shared" / "data" / "glue")


def _cores(text: str) -> set[int]:
    return {int(c) for c in text.split(",") if c.strip()}


def _make_adapters(folder: Path, count: int, max_length: int) -> list[Path]:
    spec = importlib.util.spec_from_file_location("bench_predict", Path(__file__).resolve().parent / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_adapters(folder, count, max_length)


# ---------------------------------------------------------------------------------------------- servers
class Server:
    """One `python -m readapt.serving` process on a free localhost port. It loads on every core (faster), then
    each of its threads is pinned to `cores` before anything is measured."""

    def __init__(self, adapters: list[Path], cores: set[int], threads: int, log_dir: Path, label: str):
        import psutil

        self.log = log_dir / f"{label}.log"
        command = [sys.executable, "-m", "readapt.serving", *(x for a in adapters for x in ("--adapter", str(a))),
                   "--port", "0", "--threads", str(threads), "--log-level", "warning", "--cpu"]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                            preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count())))
        self.ps = psutil.Process(self.process.pid)
        self.cores = cores
        self.address: tuple[str, int] | None = None

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "listening on http://" in text:
                port = int(text.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
                self.address = (HOST, port)
                for thread in self.ps.threads():  # the event loop's and the model's (threads made later inherit)
                    os.sched_setaffinity(thread.id, self.cores)
                return
            if self.process.poll() is not None:
                raise SystemExit(f"server exited with {self.process.returncode}:\n{text}")
            time.sleep(0.1)
        raise SystemExit(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def served(self) -> dict:
        connection = http.client.HTTPConnection(*self.address, timeout=60)
        try:
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())["served"]
        finally:
            connection.close()

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: graceful shutdown
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------------------------------------- load
class Connections:
    """A keep-alive connection per (thread, server)."""

    def __init__(self):
        self.local = threading.local()

    def post(self, address: tuple[str, int], body: bytes) -> dict:
        connections = self.local.__dict__.setdefault("connections", {})
        for attempt in (1, 2):
            connection = connections.get(address) or http.client.HTTPConnection(*address, timeout=120)
            connections[address] = connection
            try:
                connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException):
                connection.close()
                connections.pop(address, None)
                if attempt == 2:
                    raise
                continue
            if response.status != 200:
                raise SystemExit(f"server {address} answered {response.status}: {data[:300]!r}")
            return json.loads(data)
        raise AssertionError("unreachable")


def measure(servers: list[Server], bodies: list[bytes], concurrency: int, seconds: float, max_rows: int,
            rows_per_request: int) -> dict:
    """Closed-loop load: `concurrency` clients, each sends its next row to every server and waits for all."""
    connections = Connections()
    # one pool per server (C threads, each with one connection to it): C connections per server
    pools = [ThreadPoolExecutor(concurrency) for _ in servers] if len(servers) > 1 else []

    def send(body: bytes) -> None:
        if not pools:
            connections.post(servers[0].address, body)
        else:
            futures = [pool.submit(connections.post, s.address, body) for pool, s in zip(pools, servers, strict=True)]
            for future in futures:
                future.result()

    def run(rows: int, deadline: float, latencies: list) -> None:
        counter = iter(range(rows))
        lock = threading.Lock()

        def client() -> None:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                send(bodies[index % len(bodies)])
                latencies.append(time.perf_counter() - started)

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(concurrency, time.monotonic() + seconds, [])  # warm-up: connections open, first batches run
    latencies: list[float] = []
    served = [s.served() for s in servers]
    cpu = sum(s.cpu_seconds() for s in servers)
    wall = time.perf_counter()
    run(max_rows // rows_per_request, time.monotonic() + seconds, latencies)
    wall = time.perf_counter() - wall
    cpu = sum(s.cpu_seconds() for s in servers) - cpu
    batches = sum(s.served()["batches"] - before["batches"] for s, before in zip(servers, served, strict=True))
    for pool in pools:
        pool.shutdown()
    rows = len(latencies) * rows_per_request
    ordered = sorted(latencies)
    return {"requests": len(latencies), "rows": rows, "wall_s": wall, "rows_per_s": rows / wall,
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[min(len(ordered) - 1,
                                                                                     int(0.99 * len(ordered)))],
            "mean_ms": 1000 * statistics.fmean(ordered), "server_cpu_s": cpu, "cpu_s_per_1000_rows": 1000 * cpu / rows,
            "rows_per_batch": rows * len(servers) / batches}  # model calls' mean size (per server)


def predictions(server: Server, rows: list[dict]) -> dict[str, list]:
    answer = Connections().post(server.address, json.dumps({"inputs": rows}).encode())["predictions"]
    return {name: [row[name] for row in answer] for name in answer[0]}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=_default_glue(), help="GLUE folder (SST-2/dev.tsv[.gz])")
    parser.add_argument("--samples", type=int, default=512, help="SST-2 dev sentences to cycle through")
    parser.add_argument("--adapters", default="1,4,8", help="adapters per server (the largest K is also the number "
                                                            "of single-adapter servers)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement, at most")
    parser.add_argument("--max-rows", type=int, default=1000, help="per measurement, at most")
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--server-cores", default="0", help="CPU cores every server process is pinned to")
    parser.add_argument("--client-cores", default="1", help="CPU cores the load generator is pinned to")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-adapter servers")
    parser.add_argument("--json", default="serve-benchmark.json", help="where the figures go (default %(default)s)")
    args = parser.parse_args(argv)

    from transformers.utils import logging as transformers_logging

    from readapt.io import atomic_write_json
    from readapt.tasks import load_glue_split

    transformers_logging.set_verbosity_error()  # the new classifier's load report when the adapters are made
    transformers_logging.disable_progress_bar()

    counts = [int(c) for c in args.adapters.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    server_cores, client_cores = _cores(args.server_cores), _cores(args.client_cores)
    os.sched_setaffinity(0, client_cores)
    sentences = [e.texts[0] for e in load_glue_split("sst2", args.data_dir, "validation", max_samples=args.samples)]
    rows = [{"sentence": s} for s in sentences]
    chunks = [rows[i: i + args.rows_per_request] for i in range(0, len(rows) - args.rows_per_request + 1,
                                                                  args.rows_per_request)]
    bodies = [json.dumps({"inputs": chunk}).encode() for chunk in chunks]
    load_before = os.getloadavg()
    import torch

    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; torch {torch.__version__}; "
          f"servers on cores {sorted(server_cores)} with {args.threads} thread(s) each, client on cores "
          f"{sorted(client_cores)}; load average before {load_before[0]:.2f}", flush=True)
    print(f"# {len(rows)} SST-2 dev sentences, {args.rows_per_request} per request; adapters: READ default config "
          f"(GRU r=256), random weights, untrained; each measurement <= {args.seconds} s and <= {args.max_rows} rows",
          flush=True)
    results: dict = {"config": {**vars(args), "torch": torch.__version__, "machine": platform.machine(),
                                "cores": os.cpu_count(), "rows": len(rows)}, "runs": [], "checks": {}}

    def report(label: str, count: int, concurrency: int, figures: dict) -> None:
        results["runs"].append({"setup": label, "adapters": count, "concurrency": concurrency, **figures})
        print(f"{label:18s} C={concurrency:<3d} {figures['rows']:5d} rows in {figures['wall_s']:5.1f} s  "
              f"{figures['rows_per_s']:7.1f} rows/s  p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms  "
              f"server CPU {figures['cpu_s_per_1000_rows']:6.1f} s / 1,000 rows  {figures['rows_per_batch']:4.1f} rows "
              "per model call", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        adapters = _make_adapters(folder, max(counts), args.max_length)
        check_rows = rows[:16]
        shared_answers = None
        for count in counts:
            server = Server(adapters[:count], server_cores, args.threads, folder, f"shared-{count}")
            try:
                server.wait_ready()
                if count == max(counts):
                    shared_answers = predictions(server, check_rows)
                for concurrency in levels:
                    report(f"{count} adapter(s)", count, concurrency,
                           measure([server], bodies, concurrency, args.seconds, args.max_rows, args.rows_per_request))
            finally:
                server.stop()
        if not args.no_baseline:
            singles = []
            try:
                for i, adapter in enumerate(adapters):
                    singles.append(Server([adapter], server_cores, args.threads, folder, f"single-{i}"))
                for server in singles:
                    server.wait_ready()
                single_answers: dict[str, list] = {}
                for server in singles:
                    single_answers.update(predictions(server, check_rows))
                same = single_answers == shared_answers
                results["checks"]["shared_equals_single_servers"] = same
                print(f"# {max(counts)}-adapter server and {len(singles)} single servers on the same 16 rows: "
                      f"predictions identical: {same}", flush=True)
                if not same:
                    raise SystemExit("the shared server's predictions differ from the single servers'")
                for concurrency in levels:
                    report(f"{len(singles)} single servers", len(singles), concurrency,
                           measure(singles, bodies, concurrency, args.seconds, args.max_rows, args.rows_per_request))
            finally:
                for server in singles:
                    server.stop()

    def figure(setup_prefix: str, count: int, concurrency: int) -> dict | None:
        for run in results["runs"]:
            if run["setup"].endswith(setup_prefix) and run["adapters"] == count and run["concurrency"] == concurrency:
                return run
        return None

    top = max(counts)
    goal = top == 8  # the goals are stated for 8 adapters
    goals: dict = {}

    def verdict(met: bool) -> str:
        return ("met" if met else "NOT met") if goal else "(the goal is for 8 adapters)"

    if not args.no_baseline:
        print(f"# throughput, {top} adapters in one server / {top} single servers (rows/s; CPU s per row in brackets):")
        ratios = {}
        for concurrency in levels:
            shared, single = figure("adapter(s)", top, concurrency), figure("single servers", top, concurrency)
            ratios[str(concurrency)] = {"rows_per_s": shared["rows_per_s"] / single["rows_per_s"],
                                        "cpu": single["cpu_s_per_1000_rows"] / shared["cpu_s_per_1000_rows"]}
            print(f"#   C={concurrency}: {ratios[str(concurrency)]['rows_per_s']:.2f}x "
                  f"({ratios[str(concurrency)]['cpu']:.2f}x)")
        best_shared = max(figure("adapter(s)", top, c)["rows_per_s"] for c in levels)
        best_single = max(figure("single servers", top, c)["rows_per_s"] for c in levels)
        goals["throughput_ratio_by_concurrency"] = ratios
        goals["throughput_ratio_at_peak"] = best_shared / best_single
        goals["throughput_goal_met"] = best_shared / best_single >= 5
        print(f"# throughput >= 5x: peak {best_shared:.1f} vs {best_single:.1f} rows/s = "
              f"{best_shared / best_single:.2f}x -> {verdict(goals['throughput_goal_met'])}")
    high = max(levels)
    one, many = figure("adapter(s)", 1, high), figure("adapter(s)", top, high)
    if one and many and top != 1:
        goals["p99_ratio"] = many["p99_ms"] / one["p99_ms"]
        goals["p99_goal_met"] = goals["p99_ratio"] <= 2
        print(f"# p99 at C={high}, {top} adapters <= 2x 1 adapter: {many['p99_ms']:.1f} vs {one['p99_ms']:.1f} ms "
              f"= {goals['p99_ratio']:.2f}x -> {verdict(goals['p99_goal_met'])}")
    load_after = os.getloadavg()
    print(f"# load average after {load_after[0]:.2f}")
    results["goals"] = goals
    results["load_average"] = {"before": load_before[0], "after": load_after[0]}
    atomic_write_json(args.json, results)
    print(f"# wrote {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
