"""Many READ adapters, one backbone pass: prediction time with 1, 4 and 8 adapters, shared pass vs one after another.

Protocol (defaults):
  - backbone: the embedded all-MiniLM-L6-v2 (6 layers, d = 384), float32, CPU unless --device cuda;
  - adapters: READ as measured in docs/many-adapters.md and docs/serving.md (MEASURED_CONFIG: GRU, r = 256, no
    token mixer, input projection, mean over layers; today's default adds a token mixer, which rules out the
    [CLS]-only head mode), NOT trained:
    every side-network and head weight drawn from N(0, 0.02) with its own seed (the zero-initialised
    up-projection included, so the correction is not zero); timing does not depend on the weights. Each is
    saved with an SST-2 task file (column `sentence`, max length 128) and loaded by readapt.inference.Predictor,
    exactly as `readapt predict` loads them;
  - inputs: the first --samples SST-2 dev sentences (default 512 of 872), --batch-size 32, padded per batch to
    its longest sentence (as `readapt predict`), tokenisation included in the times;
  - per number of adapters K (1, 4, 8) and per head mode:
      shared      Predictor.predict(shared=True): one backbone pass per batch, every adapter replays it;
      sequential  Predictor.predict(shared=False): each adapter its own full backbone pass per batch (what K
                  separate `readapt predict` runs cost, without K model loads);
    head mode "cls": the side networks run on the [CLS] position only (the default of `readapt predict` for
    heads that read only [CLS]); "all": every token is corrected, as in training;
  - each measurement: one warm-up batch, then the best of --repeats passes over the inputs; wall seconds and
    CPU seconds (this process, all threads) per 1,000 inputs. On a shared machine CPU seconds are the steadier
    figure; the load average before and after is printed too.
Goal (issue 6): with 8 adapters the shared pass costs <= 1.5x one adapter.

Usage: python benchmarks/predict.py [--samples 512] [--batch-size 32] [--adapters 1,4,8] [--heads cls,all]
                                    [--threads 1] [--repeats 1] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_glue() -> str:
    return os.environ.get("READAPT_GLUE_DIR") or os.environ.get("GLUE_DIR") or str(REPO_ROOT.parent / "shared" / "data" / "glue")


# The READ config the committed figures were measured with (the defaults of 2026-12-01).
MEASURED_CONFIG = {"hidden_size": 256, "token_mixer_layers": 0}


def make_adapters(folder: Path, count: int, max_length: int) -> list[Path]:
    """`count` randomised READ adapters (MEASURED_CONFIG) for SST-2 on the default backbone, with task files."""
    import torch

    from readapt import ReadConfig, get_read_model
    from readapt.io import atomic_write_json
    from readapt.pretrained import load_backbone
    from readapt.task_spec import TASK_FILE, TaskSpec
    from readapt.tasks import get_task

    task = get_task("sst2")
    model = get_read_model(load_backbone(None, task.num_labels).model, ReadConfig(**MEASURED_CONFIG))
    directories = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        directory = folder / f"sst2-{index}"
        model.save_pretrained(directory)
        atomic_write_json(directory / TASK_FILE, TaskSpec(task, max_length, False).to_dict())
        directories.append(directory)
    return directories


def measure(predictor, rows, batch_size: int, shared: bool, repeats: int) -> dict:
    predictor.predict(rows[:batch_size], batch_size=batch_size, shared=shared)  # warm-up
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        predictions = predictor.predict(rows, batch_size=batch_size, shared=shared)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best["wall"]:
            best = {"wall": wall, "cpu": cpu, "predictions": predictions}
    scale = 1000 / len(rows)
    return {"wall_per_1000": best["wall"] * scale, "cpu_per_1000": best["cpu"] * scale, "predictions": best["predictions"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=_default_glue(), help="GLUE folder (SST-2/dev.tsv[.gz])")
    parser.add_argument("--samples", type=int, default=512, help="first N SST-2 dev sentences (872 in all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--adapters", default="1,4,8", help="numbers of adapters")
    parser.add_argument("--heads", default="cls,all", help="head modes: cls ([CLS] only), all (every token)")
    parser.add_argument("--modes", default="shared,sequential")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    from transformers.utils import logging as transformers_logging

    from readapt.inference import Predictor
    from readapt.tasks import load_glue_split

    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()  # the new classifier's load report, once per load
    transformers_logging.disable_progress_bar()
    counts = [int(c) for c in args.adapters.split(",")]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sentences = [e.texts[0] for e in load_glue_split("sst2", args.data_dir, "validation", max_samples=args.samples)]
    rows = [{"sentence": s} for s in sentences]
    load_before = os.getloadavg()
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}; load average before {load_before[0]:.2f}")
    print(f"# {len(rows)} SST-2 dev sentences, batch {args.batch_size}, max length {args.max_length}, "
          f"adapters: READ {MEASURED_CONFIG}, randomised, untrained; best of {args.repeats}")

    results: dict = {"config": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "machine": platform.machine(), "cores": os.cpu_count(), "rows": len(rows)},
                     "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        directories = make_adapters(Path(folder), max(counts), args.max_length)
        for head in heads:
            for count in counts:
                predictor = Predictor(directories[:count], cpu=args.device == "cpu", head_only=head == "cls")
                if head == "cls" and predictor.positions is None:
                    raise SystemExit("the head does not read [CLS] only; head mode cls is not available")
                outputs = {}
                for mode in modes:
                    if mode == "sequential" and count == 1 and "shared" in modes:
                        continue  # one adapter: the same work
                    figures = measure(predictor, rows, args.batch_size, mode == "shared", args.repeats)
                    outputs[mode] = figures.pop("predictions")
                    run = {"head": head, "adapters": count, "mode": mode, **figures}
                    results["runs"].append(run)
                    print(f"head {head:3s}  adapters {count}  {mode:10s}  {figures['wall_per_1000']:7.2f} s wall  "
                          f"{figures['cpu_per_1000']:7.2f} s CPU  per 1,000 inputs", flush=True)
                if len(outputs) == 2:
                    same = outputs["shared"] == outputs["sequential"]
                    print(f"#   shared and sequential predictions identical: {same}")
                    if not same:
                        raise SystemExit("shared-pass predictions differ from sequential ones")

    def figure(head, count, mode, key):
        for run in results["runs"]:
            if (run["head"], run["adapters"], run["mode"]) == (head, count, mode):
                return run[key]
        return None

    print("# ratios (CPU seconds; wall in brackets)")
    for head in heads:
        one = figure(head, 1, "shared", "cpu_per_1000")
        one_wall = figure(head, 1, "shared", "wall_per_1000")
        for count in counts[1:]:
            shared = figure(head, count, "shared", "cpu_per_1000")
            sequential = figure(head, count, "sequential", "cpu_per_1000")
            line = f"head {head}: {count} adapters shared / 1 adapter = "
            if shared and one:
                line += f"{shared / one:.2f} ({figure(head, count, 'shared', 'wall_per_1000') / one_wall:.2f})"
            if shared and sequential:
                line += f"; sequential / shared = {sequential / shared:.2f}"
            print(line)
    load_after = os.getloadavg()
    print(f"# load average after {load_after[0]:.2f}")
    results["load_average"] = {"before": load_before[0], "after": load_after[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
