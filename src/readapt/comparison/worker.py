"""One benchmark measurement in a fresh process: `python -m readapt.comparison.worker SPEC.json RESULT.json`.

SPEC.json says what to do: "run" trains one (task, method, seed) cell (readapt.recipe.train) under the
energy meter, then, in another fresh process, "inference" measures latency and peak memory of the trained
adapter; "memory" measures the peak memory of training steps at one batch size. The result goes to
RESULT.json atomically; the parent (runner.py) collects it. Everything in-process so a failure is one line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

INFERENCE_BATCH_SIZES = (1, 32)
INFERENCE_REPEATS = {1: 32, 32: 4}  # batches timed per batch size (after one warm-up batch)


def _configure_threads(spec: dict) -> None:
    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _decoder_head(spec: dict) -> dict[str, str]:
    """The cell's decoder head as a keyword, when the bench names one (else training's and loading's default)."""
    return {"decoder_head": spec["decoder_head"]} if spec.get("decoder_head") else {}


def run_training(spec: dict) -> dict[str, Any]:
    """Train one cell and measure its energy; then measure inference in a fresh process."""
    import torch

    from readapt.energy import EnergyMeter
    from readapt.recipe import SELECTION_SPLIT, DataConfig, TrainingConfig, train

    config = TrainingConfig(
        data=DataConfig(task=spec["task"], data_dir=spec.get("data_dir"), max_train_samples=spec.get("max_train_samples"),
                        max_eval_samples=spec.get("max_eval_samples"), selection_fraction=spec.get("selection_fraction")),
        cache_features=spec.get("cache_features", False), cache_dir=spec.get("cache_dir"),
        model=spec.get("model"), method=spec["method"], method_options=spec.get("method_options", {}),
        output_dir=spec["run_dir"], overwrite=True, epochs=spec["epochs"], batch_size=spec["batch_size"],
        lr=spec.get("lr"), max_length=spec["max_length"], seed=spec["seed"], cpu=spec.get("cpu", False),
        progress=False,
        # A cell is re-run whole if it fails; writing checkpoints would only add time and (full fine-tuning:
        # a transient copy of weights + optimizer state) memory to what the cell measures.
        checkpoints=False,
        **_decoder_head(spec),
    )
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    energy = EnergyMeter(device)
    energy.start()
    metrics = train(config)
    reading = energy.stop()
    inference = _measure_in_fresh_process({**spec, "action": "inference"}, Path(spec["run_dir"]) / "inference.json")
    # Reported: the dev split(s) at the best epoch; the selection split (if any) only picked that epoch.
    reported = {split: values for split, values in metrics["best_dev"].items() if split != SELECTION_SPLIT}
    scores = {k: 100.0 * v for split in reported.values() for k, v in split.items()}
    main = metrics["main_metric"]
    selection = metrics["best_dev"].get(SELECTION_SPLIT)
    return {
        "kind": "run", "task": spec["task"], "method": spec["method"], "seed": spec["seed"], "model": metrics["model"],
        "score": 100.0 * sum(v[main] for v in reported.values()) / len(reported), "main_metric": main, "metrics": scores,
        "selection_score": None if selection is None else 100.0 * selection[main],
        # per epoch: the dev score (reported) and, with a selection split, the score that picked the best epoch
        "epoch_dev_scores": [100.0 * sum(v[main] for k, v in e["dev"].items() if k != SELECTION_SPLIT)
                             / len(reported) for e in metrics["epochs"]],
        "epoch_selection_scores": [100.0 * e["dev"][SELECTION_SPLIT][main] for e in metrics["epochs"]]
        if selection is not None else None,
        "best_epoch": metrics["best_epoch"], "epochs": spec["epochs"],
        "peak_memory_mb": metrics["peak_memory_bytes"] / 2**20, "memory_meter": metrics["peak_memory_meter"],
        # what the process held when training began (libraries, weights, data): peak minus this is what
        # training itself added, the part a method can change
        "memory_at_start_mb": metrics["memory_at_training_start_bytes"] / 2**20,
        "energy_j": reading.joules, "energy_meter": reading.meter, "energy_measured": reading.measured,
        "energy_detail": reading.detail,
        "train_seconds": metrics["train_seconds"], "train_cpu_seconds": metrics["train_cpu_seconds"],
        # the feature cache's build (every split's entry), part of train_cpu_seconds (epoch 1 builds it)
        "cache_build_cpu_seconds": (metrics["feature_cache"] or {}).get("build_cpu_seconds"),
        "wall_seconds": metrics["wall_seconds"],
        "trainable_params": metrics["trainable_parameters"], "trainable_percent": metrics["trainable_percent"],
        "backbone_params": metrics["backbone_parameters"],
        "train_examples": metrics["train_examples"], "dev_examples": metrics["dev_examples"],
        "learning_rate": metrics["config"]["learning_rate"], "batch_size": spec["batch_size"],
        "max_length": spec["max_length"], "method_options": spec.get("method_options", {}),
        "inference": inference, "device": metrics["device"], "threads": torch.get_num_threads(),
        "machine": metrics["machine"], "versions": metrics["versions"],
    }


def measure_inference(spec: dict) -> dict[str, Any]:
    """Latency (median seconds per batch, in ms) at batch 1 and 32 on the task's dev rows, and the peak
    memory of inference with the trained adapter loaded (meter reset after loading)."""
    import torch
    from accelerate import Accelerator

    from readapt.adapter_files import ADAPTER_DIR
    from readapt.encoding import Collator, candidates_for, encode
    from readapt.measure import PeakMemoryMeter
    from readapt.methods import method_of
    from readapt.pretrained import load_backbone
    from readapt.recipe import DataConfig, load_task_data, make_loader, predict

    task, _, dev = load_task_data(DataConfig(task=spec["task"], data_dir=spec.get("data_dir")), seed=0)
    rows = next(iter(dev.values()))
    loaded = load_backbone(spec.get("model"), task.num_labels, task.is_regression, **_decoder_head(spec))
    adapter = Path(spec["run_dir"]) / ADAPTER_DIR
    model = method_of(adapter).load(loaded.model, adapter)
    accelerator = Accelerator(cpu=spec.get("cpu", False))
    model = accelerator.prepare(model)
    causal = loaded.causal_lm
    candidates = candidates_for(task, loaded.tokenizer, causal=causal) if loaded.text_to_text else None
    collator = Collator(loaded.tokenizer.pad_token_id, loaded.text_to_text, task.is_regression, causal=causal,
                        with_answers=False)
    meter = PeakMemoryMeter(accelerator.device)
    meter.start()
    out: dict[str, Any] = {}
    for batch_size in INFERENCE_BATCH_SIZES:
        needed = batch_size * (INFERENCE_REPEATS[batch_size] + 1)
        subset = (rows * (needed // len(rows) + 1))[:needed]
        features = encode(task, subset, loaded.tokenizer, spec["max_length"], loaded.text_to_text, causal)
        loader = accelerator.prepare(make_loader(features, batch_size, collator))
        times = []
        for index, batch in enumerate(loader):
            single = _single_batchmake_loader(batch)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            predict(model, single, task, candidates, causal=causal)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            if index > 0:  # the first batch warms up kernels and allocators
                times.append(time.perf_counter() - started)
        out[f"latency_ms_batch{batch_size}"] = 1000.0 * statistics.median(times)
    out["peak_memory_mb"] = meter.peak_bytes() / 2**20
    out["memory_meter"] = meter.name + "; adapter loaded before the reset"
    out["protocol"] = (f"median wall time per batch of dev rows (max length {spec['max_length']}), "
                       f"{INFERENCE_REPEATS} timed batches after one warm-up, prediction as in evaluation")
    return out


def _single_batchmake_loader(batch):
    return [batch]


def measure_training_memory(spec: dict) -> dict[str, Any]:
    """Peak memory of a few training steps at one batch size on random token ids of a fixed length."""
    import torch

    from readapt.answers import causal_lm_loss
    from readapt.encoding import IGNORE_INDEX
    from readapt.measure import PeakMemoryMeter
    from readapt.methods import get_method
    from readapt.pretrained import load_backbone

    loaded = load_backbone(spec.get("model"), 2, False)
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    model = get_method(spec["method"]).prepare(loaded.model, spec.get("method_options", {})).to(device)
    torch.manual_seed(0)
    size, length = spec["batch_size"], spec["max_length"]
    batch = {"input_ids": torch.randint(5, loaded.tokenizer.vocab_size, (size, length), device=device),
             "attention_mask": torch.ones(size, length, dtype=torch.long, device=device)}
    if loaded.causal_lm:  # a prompt and a 4-token answer at its end, as label words are trained
        batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        batch["labels"][:, -4:] = batch["input_ids"][:, -4:]
    elif loaded.text_to_text:
        batch["labels"] = torch.randint(5, loaded.tokenizer.vocab_size, (size, 4), device=device)
    else:
        batch["labels"] = torch.randint(0, 2, (size,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    meter = PeakMemoryMeter(device)
    meter.start()
    for _ in range(2):  # the second step includes the optimizer state
        (causal_lm_loss(model, batch) if loaded.causal_lm else model(**batch).loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"kind": "memory", "method": spec["method"], "batch_size": size, "seq_len": length,
            "peak_memory_mb": meter.peak_bytes() / 2**20, "memory_meter": meter.name, "model": spec.get("model"),
            "device": str(device)}


ACTIONS = {"run": run_training, "inference": measure_inference, "memory": measure_training_memory}


def _measure_in_fresh_process(spec: dict, result_path: Path) -> dict[str, Any]:
    spec_path = result_path.with_suffix(".spec.json")
    _write_json(spec_path, spec)
    completed = subprocess.run([sys.executable, "-m", "readapt.comparison.worker", str(spec_path), str(result_path)],
                               capture_output=True, text=True, env=os.environ.copy())
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    if completed.returncode != 0 or result is None or result.get("status") != "ok":
        error = (result or {}).get("error") or (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{spec['action']} measurement failed: {error}")
    return {k: v for k, v in result.items() if k != "status"}


def _write_json(path: Path, payload: dict) -> None:
    from readapt.io import atomic_write_json

    atomic_write_json(path, payload)


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _configure_threads(spec)
    try:
        result = {"status": "ok", **ACTIONS[spec["action"]](spec)}
        code = 0
    except Exception as exc:  # reported as one line in the results; the traceback goes to stderr
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = {"status": "failed", "error": f"{type(exc).__name__}: {first}"}
        code = 1
    _write_json(Path(result_path), result)
    return code


if __name__ == "__main__":
    sys.exit(main())
