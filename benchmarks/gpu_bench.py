"""Short GPU benchmark: every fine-tuning method on T5-base- and T5-large-size random configs.

For each (model, method) cell, in a fresh process: build the model on the device (random weights, nothing is
downloaded), prepare it with the method's default options, run warm-up steps, then time N training steps
(forward, backward, AdamW step) on one fixed random batch. An inference-only forward (no grad) of the bare
backbone is measured the same way as a reference row.

Per cell: peak memory (torch.cuda.max_memory_allocated, reset once the model is on the device; on CPU the
peak RSS from readapt.measure.PeakMemoryMeter), energy over the timed steps (readapt.energy.EnergyMeter:
NVML on a GPU, else RAPL or an estimate), mean step time (the device is synchronised before and after the
timed steps; warm-up steps excluded), trainable parameters (count_trainable) and their share of the
backbone, final loss. An out-of-memory cell is recorded with status "oom" and the run goes on.

--time-budget caps the whole run: each cell's timed loop stops early (status stays "ok", stopped_by_time_cap
is true) when it would overrun its share of the remaining time, so the run ends in time on a slower card.

Output: a JSON results file written atomically (and rewritten after every cell, so an interrupted run keeps
what it measured) and a Markdown table next to it (same name, .md), also printed.

Usage: python benchmarks/gpu_bench.py [--models t5-base,t5-large] [--steps N] [--warmup-steps N]
       [--dtype fp32|tf32|bf16] [--output docs/results/gpu/gpu_results.json] [--tiny]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

INFERENCE = "inference"  # the reference row: bare backbone, forward only, no grad
BF16_NATIVE_METHODS = (INFERENCE, "read", "lst")  # --dtype bf16-native: their frozen backbone is stored in bf16
SEED = 0
DEFAULT_OUTPUT = "docs/results/gpu/gpu_results.json"

# Timed steps per model. Measured on an H100 80GB HBM3 in fp32 (torch 2.11): one step of every cell of a model
# together (7 methods + inference) takes 0.87 s for t5-base and 2.0 s for t5-large, and each cell's start-up and
# warm-up about 3-5 s; so 150 and 45 steps make the whole run about 5 minutes, leaving benchmarks/gpu.sh time for
# its second pass (bf16-native on t5-base) within 10 minutes. --time-budget guards the total.
DEFAULT_STEPS = {"t5-base": 150, "t5-large": 45, "tiny": 3}
DEFAULT_SHAPE = {"batch_size": 32, "source_length": 128, "target_length": 8, "warmup_steps": 10}
DEFAULT_TIME_BUDGET_SECONDS = 400.0
# Start-up of one cell (fork, CUDA context, building the model, warm-up) before its first timed step is known.
ASSUMED_CELL_SETUP_SECONDS = 15.0
MIN_TIMED_SECONDS = 2.0  # a cell always gets at least this long, even when the budget is spent
# A cell may take this many times its even share of the time left: inference rows and side networks are cheap
# and leave time over for full fine-tuning of the large model, which an even split would cut short.
SHARE_STRETCH = 1.5

# --tiny: a T5 small enough to run every cell on two CPU cores in seconds (used by the tests). Method options
# shrink with it: READ's default hidden size (256) would have more weights than the whole tiny backbone.
TINY_SHAPE = {"batch_size": 2, "source_length": 16, "target_length": 8, "warmup_steps": 1}
TINY_METHOD_OPTIONS = {"read": {"hidden_size": 8}, "adapter": {"bottleneck": 4}, "prompt": {"num_virtual_tokens": 3}}

# Modules every cell imports, loaded once by the fork server so that each fresh cell process starts in a
# second instead of re-importing torch, transformers and peft (10 s and more on a small machine).
PRELOADED_MODULES = ["torch", "transformers", "transformers.models.t5.modeling_t5", "peft", "readapt.methods",
                     "readapt.energy", "readapt.measure"]


# ---------------------------------------------------------------------------------------------- models, data
def t5_config(model_name: str):
    from transformers import T5Config

    token_ids = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}  # as in the t5 checkpoints
    # num_decoder_layers is set equal to num_layers: transformers sizes T5's cache from num_layers.
    shapes = {
        "t5-base": {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
        "t5-large": {"vocab_size": 32128, "d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16},
        "tiny": {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    }
    shape = shapes[model_name]
    return T5Config(**shape, num_decoder_layers=shape["num_layers"], **token_ids)


def random_batch(vocab_size: int, batch_size: int, source_length: int, target_length: int, device) -> dict:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)  # on the CPU: the same ids on every device
    input_ids = torch.randint(2, vocab_size, (batch_size, source_length), generator=generator)
    labels = torch.randint(2, vocab_size, (batch_size, target_length), generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}


# ------------------------------------------------------------------------------- in the cell's own process
def describe_environment(device_name: str) -> dict:
    """What the results ran on; measured in a child so that the parent never opens a CUDA context."""
    import torch

    from readapt.measure import machine, versions
    from readapt.methods import METHODS

    device: dict[str, Any] = {"type": device_name, "cuda_runtime": torch.version.cuda,
                              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device_name == "cuda":
        device["name"] = torch.cuda.get_device_name(0)
        device["memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        device.update(_nvml_versions())
    else:
        device["name"] = "cpu"
    return {"device": device, "versions": {**versions(), "peft": _package_version("peft")}, "machine": machine(),
            "methods": {name: method.default_lr for name, method in METHODS.items()}}


def _package_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvml_versions() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # e.g. 13000 for CUDA 13.0
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML here: the versions are simply unknown
        return {"driver_version": None, "cuda_driver_version": None, "nvml_error": str(exc)}
    driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    return {"driver_version": driver, "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}"}


def measure_cell(spec: dict) -> dict:
    """Build, prepare and run one (model, method) cell; every failure becomes the record's status."""
    import torch

    from readapt.energy import EnergyMeter
    from readapt.measure import PeakMemoryMeter
    from readapt.methods import TrainableCount, count_parameters, count_trainable, get_method

    device = torch.device(spec["device"])
    is_inference = spec["method"] == INFERENCE
    record: dict[str, Any] = {"model": spec["model"], "method": spec["method"], "status": "ok", "error": None,
                              "kind": "inference" if is_inference else "training"}
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    memory = PeakMemoryMeter(device)
    if spec.get("cpu_threads"):
        torch.set_num_threads(spec["cpu_threads"])
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high" if spec["dtype"] == "tf32" else "highest")
    try:
        from transformers import T5ForConditionalGeneration

        # Weights are created on the device: initialising T5-large on the CPU would take longer than its steps.
        with device:
            backbone = T5ForConditionalGeneration(t5_config(spec["model"]))
            record["backbone_params"] = count_parameters(backbone)  # before a method adds any
            # bf16-native: a frozen backbone (inference, READ, LST) is stored in bfloat16, and READ's side network
            # computes in it (ReadConfig.compute_dtype="auto" on a GPU; float32 master weights); the methods that
            # train or back-propagate through the backbone keep float32 weights under bf16 autocast.
            native = spec["dtype"] == "bf16-native" and spec["method"] in BF16_NATIVE_METHODS
            if native:
                backbone.to(torch.bfloat16)
            if is_inference:
                model = backbone.eval().requires_grad_(False)
            else:
                method = get_method(spec["method"])
                model = method.prepare(backbone, spec["method_options"]).to(device).train()
                trainable = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(trainable, lr=method.default_lr)
                count = TrainableCount(count_trainable(model), record["backbone_params"])
                record.update(trainable_params=count.trainable, trainable_percent=count.percent,
                              learning_rate=method.default_lr, method_options=spec["method_options"])
        record["precision"] = ("bf16 weights" if native else "bf16 autocast"
                               if spec["dtype"] in ("bf16", "bf16-native") else spec["dtype"])
        batch = random_batch(backbone.config.vocab_size, spec["batch_size"], spec["source_length"],
                             spec["target_length"], device)
        batch["use_cache"] = False  # training and scoring never reuse T5's KV cache; building one only costs memory
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=spec["dtype"] == "bf16" or (spec["dtype"] == "bf16-native" and not native))

        def training_step():
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        @torch.inference_mode()
        def inference_step():
            with autocast:
                return model(**batch).loss

        step = inference_step if is_inference else training_step
        memory.start()  # model and batch are on the device: the peak from here on is the work's
        record["memory_baseline_bytes"] = memory.baseline_bytes
        for _ in range(spec["warmup_steps"]):
            step()
        _synchronize(device)

        energy = EnergyMeter(device)
        energy.start()
        started = time.perf_counter()
        steps_done, stopped_by_time_cap = 0, False
        for _ in range(spec["steps"]):
            loss = step()
            steps_done += 1
            # Checked without synchronising (that would stall the queue); the GPU lags by a step at most.
            if spec["time_cap_seconds"] and time.perf_counter() - started > spec["time_cap_seconds"]:
                stopped_by_time_cap = steps_done < spec["steps"]
                break
        _synchronize(device)
        timed_seconds = time.perf_counter() - started
        reading = energy.stop()
        record.update(
            peak_memory_bytes=memory.peak_bytes(), memory_meter=memory.name,
            steps_timed=steps_done, stopped_by_time_cap=stopped_by_time_cap, timed_seconds=timed_seconds,
            step_seconds_mean=timed_seconds / steps_done if steps_done else None,
            samples_per_second=spec["batch_size"] * steps_done / timed_seconds if timed_seconds > 0 else None,
            energy_joules=reading.joules, energy_joules_per_step=reading.joules / steps_done if steps_done else None,
            energy_meter=reading.meter, energy_measured=reading.measured, energy_detail=reading.detail,
            final_loss=float(loss) if steps_done else None,
        )
    except out_of_memory as exc:
        record.update(status="oom", error=(str(exc).splitlines() or ["out of memory"])[0][:300],
                      peak_memory_bytes=_peak_so_far(device, memory), memory_meter=memory.name)
    except Exception as exc:
        record.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8)[-4000:])
    return record


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_so_far(device, memory) -> int | None:
    """How far an out-of-memory cell got, where that can be read."""
    import torch

    try:
        if device.type == "cuda":  # since the process started, should it have failed before the meter's start
            return int(torch.cuda.max_memory_allocated(device))
        return memory.peak_bytes() if memory.name else None
    except Exception:
        return None


def cell_process(task: str, spec: dict, result_path: str) -> None:
    """Entry point of a cell's process: runs the task and leaves its JSON result at result_path."""
    try:
        result = describe_environment(spec["device"]) if task == "describe" else measure_cell(spec)
    except BaseException as exc:  # even an import failure must come back as a result, not a silent exit
        result = {"model": spec.get("model"), "method": spec.get("method"), "status": "error",
                  "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)[-4000:]}
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- the parent
class CellRunner:
    """Runs each cell in a fresh process forked from a server that has already imported the heavy modules.

    The fork server is a new interpreter (not a fork of this one), and the parent never touches CUDA, so every
    cell opens its own CUDA context and torch.cuda.max_memory_allocated starts clean."""

    def __init__(self, timeout_seconds: float):
        self.timeout_seconds = timeout_seconds
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOADED_MODULES)  # modules that fail to import are skipped

    def run(self, task: str, spec: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="gpu_bench_") as scratch:
            result_path = os.path.join(scratch, "result.json")
            process = self.context.Process(target=cell_process, args=(task, spec, result_path), daemon=True)
            process.start()
            process.join(self.timeout_seconds)
            if process.is_alive():
                process.kill()
                process.join()
                return {"status": "timeout", "error": f"no result within {self.timeout_seconds:.0f} s; killed"}
            if os.path.exists(result_path):
                return json.loads(Path(result_path).read_text())
            # No result: the process died outright (a signal, or the kernel's out-of-memory killer).
            return {"status": "error", "error": f"cell process exited with code {process.exitcode} and no result"}


def timed_seconds_cap(budget: float, elapsed: float, cells_left: int, setup_seconds: float) -> float | None:
    """This cell's share of the time left, minus what its start-up is expected to take (None: no cap)."""
    if budget <= 0:
        return None
    return max(MIN_TIMED_SECONDS, SHARE_STRETCH * (budget - elapsed) / cells_left - setup_seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="t5-base,t5-large", help="comma-separated: t5-base, t5-large, tiny")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--steps", type=int, help=f"timed steps per cell (default per model: {DEFAULT_STEPS})")
    for name, default in DEFAULT_SHAPE.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"default {default} ({TINY_SHAPE[name]} with --tiny)")
    parser.add_argument("--dtype", choices=("fp32", "tf32", "bf16", "bf16-native"), default="fp32",
                        help="fp32: float32 weights and matmuls; tf32: float32 weights, TF32 matmuls; "
                             "bf16: float32 weights under bfloat16 autocast; bf16-native: a frozen backbone "
                             "(inference, read, lst) stored in bfloat16 and READ's side network computing in it "
                             "(float32 master weights), the other methods under bfloat16 autocast")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--method-options", default="{}", help='JSON: {"method": {option: value}}; default options')
    parser.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_SECONDS,
                        help="seconds for the whole run; cells' timed loops stop early to keep to it (0: no cap)")
    parser.add_argument("--cell-timeout", type=float, default=300.0,
                        help="seconds after which a cell's process is killed and recorded as 'timeout'")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="results JSON; the Markdown table goes next to it")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny T5, 3 steps, batch 2, length 16: runs anywhere in seconds (for tests)")
    args = parser.parse_args(argv)
    for name, default in (TINY_SHAPE if args.tiny else DEFAULT_SHAPE).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.method_options = json.loads(args.method_options)
    if args.tiny:
        args.models = "tiny"
        args.method_options = {**TINY_METHOD_OPTIONS, **args.method_options}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run_started = time.perf_counter()
    # Set before the fork server starts, so that every cell inherits them: no download can ever be tried, and
    # glibc hands freed memory back at once so that the CPU peak-RSS meter follows live memory.
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                      MALLOC_MMAP_THRESHOLD_="65536")
    device = args.device if args.device != "auto" else ("cuda" if _cuda_present() else "cpu")
    runner = CellRunner(args.cell_timeout)

    environment = runner.run("describe", {"device": device})
    if "methods" not in environment:
        raise SystemExit(f"cannot describe the environment: {environment.get('error')}\n"
                         f"{environment.get('traceback', '')}")
    methods = list(environment.pop("methods"))
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    method_options = args.method_options
    steps = {model: args.steps or DEFAULT_STEPS[model] for model in models}
    settings = {
        "models": models, "methods": methods, "batch_size": args.batch_size, "source_length": args.source_length,
        "target_length": args.target_length, "steps": steps, "warmup_steps": args.warmup_steps, "dtype": args.dtype,
        "seed": SEED, "method_options": method_options, "optimizer": "AdamW, each method's default learning rate",
        "time_budget_seconds": args.time_budget, "tiny": args.tiny,
    }
    output = Path(args.output)
    results = {"benchmark": "benchmarks/gpu_bench.py", "complete": False,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **environment, "settings": settings, "records": []}

    cells = [(model, method) for model in models for method in [INFERENCE, *methods]]
    setup_seconds = ASSUMED_CELL_SETUP_SECONDS
    for index, (model, method) in enumerate(cells):
        elapsed = time.perf_counter() - run_started
        cap = timed_seconds_cap(args.time_budget, elapsed, len(cells) - index, setup_seconds)
        spec = {"model": model, "method": method, "device": device, "dtype": args.dtype,
                "batch_size": args.batch_size, "source_length": args.source_length,
                "target_length": args.target_length, "steps": steps[model], "warmup_steps": args.warmup_steps,
                "method_options": method_options.get(method, {}), "time_cap_seconds": cap,
                # The tiny model gains nothing from several threads, which only wait on each other on a busy machine.
                "cpu_threads": 1 if model == "tiny" else None}
        cell_started = time.perf_counter()
        record = {"model": model, "method": method, **runner.run("cell", spec)}
        record["cell_wall_seconds"] = time.perf_counter() - cell_started
        if record.get("timed_seconds") is not None:  # learn how long start-up really takes on this machine
            setup_seconds = max(ASSUMED_CELL_SETUP_SECONDS / 3, record["cell_wall_seconds"] - record["timed_seconds"])
        results["records"].append(record)
        print(f"[{index + 1}/{len(cells)}] {model} {method}: {_one_line(record)}", flush=True)
        _write(output, results)  # after every cell: an interrupted run keeps what it measured

    results["read_vs_full"] = {model: read_vs_full(results["records"], model) for model in models}
    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - run_started
    _write(output, results)
    print(markdown_report(results))
    print(f"results written to {output} and {output.with_suffix('.md')}")
    return results


def _cuda_present() -> bool:
    """Whether a GPU is there, asked through NVML so that this process opens no CUDA context."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def _write(output: Path, results: dict) -> None:
    from readapt.io import atomic_write_json, atomic_write_text

    atomic_write_json(output, results)
    atomic_write_text(output.with_suffix(".md"), markdown_report(results) + "\n")


# ------------------------------------------------------------------------------------------------ reporting
MIB = 1024 * 1024


def read_vs_full(records: list[dict], model: str) -> dict:
    """READ's memory, energy per step and step time as fractions of full fine-tuning's (None where either failed)."""
    cells = {r["method"]: r for r in records if r["model"] == model and r.get("status") == "ok"}
    read, full = cells.get("read"), cells.get("full")

    def ratio(key: str) -> float | None:
        if read is None or full is None or not read.get(key) or not full.get(key):
            return None
        return read[key] / full[key]

    forward = cells.get(INFERENCE)
    over_forward = (read["step_seconds_mean"] / forward["step_seconds_mean"]
                    if read and forward and read.get("step_seconds_mean") and forward.get("step_seconds_mean") else None)
    return {"peak_memory": ratio("peak_memory_bytes"), "energy_per_step": ratio("energy_joules_per_step"),
            "step_time": ratio("step_seconds_mean"), "read_step_over_forward": over_forward}


def markdown_report(results: dict) -> str:
    settings, device, versions = results["settings"], results["device"], results["versions"]
    records = results["records"]
    lines = ["# READ vs baselines: memory, energy and time per training step", ""]
    driver = f", driver {device['driver_version']}" if device.get("driver_version") else ""
    lines.append(f"Device: {device['name']}{driver}, CUDA {device.get('cuda_runtime')}; "
                 f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                 f"peft {versions.get('peft', '?')}.")
    steps = ", ".join(f"{model} {n}" for model, n in settings["steps"].items())
    lines.append(f"Random T5 configs, {settings['dtype']}, batch {settings['batch_size']}, source length "
                 f"{settings['source_length']}, target length {settings['target_length']}; timed steps: {steps} "
                 f"(after {settings['warmup_steps']} warm-up); AdamW at each method's default learning rate; "
                 f"each cell in a fresh process.")
    meters = sorted({(r["energy_meter"], r["energy_measured"]) for r in records if r.get("energy_meter")})
    for meter, measured in meters:
        lines.append(f"Energy meter: {meter}{'' if measured else ' (an estimate, not a measurement)'}.")
    memory_meters = sorted({r["memory_meter"] for r in records if r.get("memory_meter")})
    lines.extend(f"Memory meter: {meter}." for meter in memory_meters)
    if not results.get("complete"):
        lines.append("**Incomplete run**: the cells below are those measured so far.")

    for model in settings["models"]:
        rows = [r for r in records if r["model"] == model]
        backbone = next((r["backbone_params"] for r in rows if r.get("backbone_params")), None)
        lines += ["", f"## {model}" + (f" ({backbone:,d} parameters)" if backbone else ""), "",
                  "| method | status | trainable | % of backbone | peak memory (MiB) | step (ms) | energy/step (J) "
                  "| final loss | timed steps |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            name = "inference (no grad)" if r["method"] == INFERENCE else r["method"]
            steps_note = f"{r['steps_timed']}{' (time cap)' if r.get('stopped_by_time_cap') else ''}" \
                if r.get("steps_timed") is not None else "–"
            lines.append(
                f"| {name} | {r['status']} | {_fmt(r.get('trainable_params'), ',d')} "
                f"| {_fmt(r.get('trainable_percent'), '.3f')} "
                f"| {_fmt(r['peak_memory_bytes'] / MIB if r.get('peak_memory_bytes') else None, ',.0f')} "
                f"| {_fmt(r['step_seconds_mean'] * 1000 if r.get('step_seconds_mean') else None, '.1f')} "
                f"| {_fmt(r.get('energy_joules_per_step'), '.2f')} | {_fmt(r.get('final_loss'), '.3f')} "
                f"| {steps_note} |")
        failures = [r for r in rows if r.get("status") not in ("ok", None)]
        lines.extend(f"- {r['method']}: {r['status']}: {r.get('error')}" for r in failures)

    ratios = results.get("read_vs_full") or {m: read_vs_full(records, m) for m in settings["models"]}
    lines += ["", "## READ relative to full fine-tuning (READ / full; below 1 means READ uses less)", "",
              "| model | peak memory | energy per step | step time | READ step / no-grad forward |",
              "|---|---:|---:|---:|---:|"]
    for model, ratio in ratios.items():
        lines.append(f"| {model} | {_fmt(ratio['peak_memory'], '.3f')} | {_fmt(ratio['energy_per_step'], '.3f')} "
                     f"| {_fmt(ratio['step_time'], '.3f')} | {_fmt(ratio.get('read_step_over_forward'), '.3f')} |")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _one_line(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error')}"
    return (f"peak {record['peak_memory_bytes'] / MIB:,.0f} MiB, {record['step_seconds_mean'] * 1000:.1f} ms/step, "
            f"{_fmt(record.get('energy_joules_per_step'), '.2f')} J/step, "
            f"loss {_fmt(record.get('final_loss'), '.3f')}, {record['steps_timed']} steps, "
            f"cell {record['cell_wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
