"""Plan and run the benchmark matrix: every (task, method, seed) cell in a fresh process, resumable.

Results go to `<output>/results.jsonl`, one JSON object per finished cell, appended by this (single)
parent process; a cell whose record says "ok" is never run again, so re-running the same command resumes
a partly finished matrix. Failed cells are recorded with their one-line error and retried on the next
run. Each cell's adapter, metrics.json and train.log stay under `<output>/runs/<task>-<method>-seed<seed>/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from readapt.errors import ConfigError
from readapt.io import atomic_write_text
from readapt.methods import METHODS
from readapt.settings import DECODER_HEADS
from readapt.tasks import GLUE_TASKS

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "bench_config.json"
SIDE_NETWORK_METHODS = ("read", "full")  # the methods that get every seed by default (the paper's focus)


@dataclass
class BenchConfig:
    output_dir: str
    tasks: list[str] = field(default_factory=lambda: ["rte", "mrpc", "stsb", "cola", "sst2"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [1])
    baseline_seeds: int | None = None  # how many of `seeds` methods other than read/full use (None: all)
    model: str | None = None
    # a decoder-only backbone on a classification/regression task: "label-words" or "classifier" (None: train's)
    decoder_head: str | None = None
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    epochs: int = 3
    method_epochs: dict[str, int] = field(default_factory=dict)  # method -> epochs (else `epochs`)
    # Hold this fraction of the training subset out as a "selection" split that picks the best epoch; the GLUE dev
    # set is then only reported (honest selection). None: the best epoch on the dev set (the READ paper's protocol).
    selection_fraction: float | None = None
    cache_features: bool = False  # READ cells replay the backbone's states from the feature cache (readapt.read.cache)
    cache_dir: str | None = None
    batch_size: int = 32
    max_length: int = 128
    learning_rates: dict[str, float] = field(default_factory=dict)  # method -> lr (else the method's default)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory_batch_sizes: list[int] = field(default_factory=list)  # memory-vs-batch sweep (fresh process each)
    jobs: int = 1  # cells run at once
    threads_per_job: int | None = None  # torch threads per cell (default: cores / jobs)
    cpu: bool = False

    def validate(self) -> None:
        for task in self.tasks:
            if task not in GLUE_TASKS:
                raise ConfigError(f"unknown task {task!r}; GLUE tasks: {', '.join(GLUE_TASKS)}")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        for method, options in self.method_options.items():
            METHODS[method].validate_options(options)
        if self.decoder_head is not None and self.decoder_head not in DECODER_HEADS:
            raise ConfigError(f"unknown decoder head {self.decoder_head!r}; choose one of {', '.join(DECODER_HEADS)}")
        if not self.tasks or not self.methods or not self.seeds:
            raise ConfigError("bench needs at least one task, one method and one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds has duplicates: {self.seeds}")
        for name in ("epochs", "batch_size", "jobs", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for method, epochs in self.method_epochs.items():
            if method not in self.methods:
                raise ConfigError(f"--method-epochs names method {method!r}, which is not in --methods")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ConfigError(f"--method-epochs {method}={epochs!r}: epochs must be an integer >= 1")
        if self.selection_fraction is not None and not 0 < self.selection_fraction < 1:
            raise ConfigError(f"--selection-fraction={self.selection_fraction} is out of range; it must be in (0, 1)")
        if self.baseline_seeds is not None and self.baseline_seeds < 1:
            raise ConfigError("--baseline-seeds must be >= 1")
        if any(b < 1 for b in self.memory_batch_sizes):
            raise ConfigError("--memory-batch-sizes must be positive")

    def seeds_for(self, method: str) -> list[int]:
        if method in SIDE_NETWORK_METHODS or self.baseline_seeds is None:
            return list(self.seeds)
        return list(self.seeds[: self.baseline_seeds])

    def epochs_for(self, method: str) -> int:
        return self.method_epochs.get(method, self.epochs)

    def threads(self) -> int:
        return self.threads_per_job or max(1, (os.cpu_count() or 1) // self.jobs)


def cell_key(record: dict) -> tuple:
    if record.get("kind") == "memory":
        return ("memory", record["method"], record["batch_size"])
    return ("run", record["task"], record["method"], record["seed"])


def plan(config: BenchConfig) -> list[dict[str, Any]]:
    """Every measurement of the matrix, as worker specs (training runs first, then the memory sweep)."""
    output = Path(config.output_dir)
    common = {"model": config.model, "decoder_head": config.decoder_head, "data_dir": config.data_dir,
              "max_length": config.max_length, "cpu": config.cpu, "threads": config.threads()}
    specs = []
    for task in config.tasks:
        for method in config.methods:
            for seed in config.seeds_for(method):
                specs.append({
                    **common, "action": "run", "kind": "run", "task": task, "method": method, "seed": seed,
                    "run_dir": str(output / "runs" / f"{task}-{method}-seed{seed}"),
                    "max_train_samples": config.max_train_samples, "max_eval_samples": config.max_eval_samples,
                    "selection_fraction": config.selection_fraction,
                    "cache_features": config.cache_features and method == "read", "cache_dir": config.cache_dir,
                    "epochs": config.epochs_for(method), "batch_size": config.batch_size,
                    "lr": config.learning_rates.get(method), "method_options": config.method_options.get(method, {}),
                })
    for method in config.methods:
        for batch_size in config.memory_batch_sizes:
            specs.append({**common, "action": "memory", "kind": "memory", "method": method, "batch_size": batch_size,
                          "run_dir": str(output / "memory" / f"{method}-batch{batch_size}"),
                          "method_options": config.method_options.get(method, {})})
    return specs


def read_results(path: Path) -> list[dict]:
    """Records of a results file; a torn last line (a run killed while appending) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _run_cell(spec: dict) -> dict:
    run_dir = Path(spec["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir.parent / f".{run_dir.name}.spec.json"
    result_path = run_dir.parent / f".{run_dir.name}.result.json"
    result_path.unlink(missing_ok=True)
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    completed = subprocess.run([sys.executable, "-m", "readapt.comparison.worker", str(spec_path), str(result_path)],
                               capture_output=True, text=True, env=env)
    (run_dir.parent / f"{run_dir.name}.stderr.log").write_text(completed.stderr)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        tail = completed.stderr.strip().splitlines()
        result = {"status": "failed", "error": f"worker exited with {completed.returncode}: {tail[-1] if tail else ''}"}
    finally:
        spec_path.unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)
    identity = {k: spec[k] for k in ("kind", "task", "method", "seed", "batch_size") if k in spec}
    if spec["kind"] == "memory":
        identity.pop("task", None)
    return {**identity, **result, "kind": spec["kind"]}


def run_bench(config: BenchConfig, progress: bool = True) -> list[dict]:
    """Run every cell not yet finished; returns all records (old and new). Writes the reports at the end."""
    config.validate()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / RESULTS_FILE
    previous = read_results(results_path)
    done = {cell_key(r) for r in previous if r.get("status") == "ok"}
    kept = [r for r in previous if r.get("status") == "ok"]  # failed cells are retried, their records dropped
    atomic_write_text(results_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    atomic_write_text(output / PLAN_FILE, json.dumps({**asdict(config), "notes": protocol_notes(config)}, indent=2))
    todo = [spec for spec in plan(config) if cell_key(spec) not in done]

    records = list(kept)
    bar = tqdm(total=len(todo) + len(done), initial=len(done), desc="bench", unit="cell", disable=not progress)
    with ThreadPoolExecutor(max_workers=config.jobs) as pool:
        futures = [pool.submit(_run_cell, spec) for spec in todo]
        for future in as_completed(futures):
            record = future.result()
            _append(results_path, record)  # only this (main) thread appends, as each cell finishes
            records.append(record)
            label = f"{record.get('task', 'memory')}/{record['method']}/{record.get('seed', record.get('batch_size'))}"
            bar.set_postfix_str(f"{label}: {record.get('score', record.get('peak_memory_mb', 0)):.1f}"
                                if record.get("status") == "ok" else f"{label}: failed")
            bar.update(1)
    bar.close()
    return records


def protocol_notes(config: BenchConfig) -> list[str]:
    """The lines that say how the numbers under the table were made."""
    subset = f"a seeded random subset of {config.max_train_samples} training rows" if config.max_train_samples else \
        "the full training split"
    epochs = f"{config.epochs} epochs" + "".join(f", {m} {n}" for m, n in config.method_epochs.items())
    if config.selection_fraction is None:
        selection = ("evaluates on the GLUE dev set after every epoch and reports the best epoch (dev-set selection, "
                     "as in the READ paper)")
    else:
        selection = (f"holds a seeded {config.selection_fraction:g} of that subset out as a selection split, trains "
                     "on the rest, picks the epoch that scores best on the selection split and reports the GLUE dev "
                     "set's score at that epoch (the dev set picks nothing)")
    cache = " READ cells replay the backbone's states from the feature cache (--cache-features)." \
        if config.cache_features and "read" in config.methods else ""
    return [
        f"Protocol: each cell trains on {subset} for {epochs} (batch {config.batch_size}, max length "
        f"{config.max_length}, linear warm-up/decay, AdamW), {selection}; score = the task's main GLUE metric on "
        f"0-100, the mean of the two where GLUE has two.{cache}",
        f"Seeds: {', '.join(map(str, config.seeds))} for {', '.join(m for m in config.methods if m in SIDE_NETWORK_METHODS)}; "
        f"{', '.join(map(str, config.seeds_for('lora')))} for the other methods.",
        "Learning rates: " + ", ".join(f"{m} {config.learning_rates.get(m, METHODS[m].default_lr):g}" for m in config.methods)
        + " (method defaults unless set with --lr METHOD=VALUE).",
        f"Each cell ran in a fresh process with {config.threads()} torch thread(s), {config.jobs} cell(s) at a time.",
        "Peak memory: per cell, in its own process, over the training steps (meter named below); train time: "
        "training steps only, without evaluation.",
    ]
