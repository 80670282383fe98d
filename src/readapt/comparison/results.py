"""A bench output's results.jsonl, read and summarised per method (what the tables and plots show)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
TASK_DISPLAY = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP",
    "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI",
}  # fmt: skip
METHOD_ORDER = ("full", "lora", "adapter", "bitfit", "prompt", "lst", "read")
METHOD_DISPLAY = {
    "full": "Full fine-tuning", "lora": "LoRA", "adapter": "Adapter", "bitfit": "BitFit",
    "prompt": "Prompt tuning", "lst": "LST", "read": "READ",
}  # fmt: skip
MISSING = "—"


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class BenchResults:
    """What results.jsonl holds, after dropping unreadable lines and superseded records."""

    runs: list[dict[str, Any]] = field(default_factory=list)  # the latest record per (task, method, seed)
    memory: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # lines skipped, records superseded: said under the table
    first_record: dict[str, Any] | None = None

    @property
    def ok_runs(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run.get("status") == "ok"]

    @property
    def failed_runs(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run.get("status") != "ok"]


def task_key(task: Any) -> str:
    """'SST-2', 'sst_2' and 'sst2' are one task."""
    return str(task).lower().replace("-", "").replace("_", "")


def read_results(results_file: Path) -> BenchResults:
    text = Path(results_file).read_text(encoding="utf-8", errors="replace")
    numbered_lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    results = BenchResults()
    latest_runs: dict[tuple[Any, ...], dict[str, Any]] = {}
    superseded = 0
    for position, (number, line) in enumerate(numbered_lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if position == len(numbered_lines) - 1:
                # The runner appends line by line: a run that is still writing, or was killed, leaves this.
                results.problems.append(f"the last line ({number}) of {results_file.name} is incomplete; skipped")
            else:
                results.problems.append(f"line {number} of {results_file.name} is not valid JSON; skipped")
            continue
        if not isinstance(record, dict):
            results.problems.append(f"line {number} of {results_file.name} is not a JSON object; skipped")
            continue
        if results.first_record is None:
            results.first_record = record
        if record.get("kind") == "run":
            record = dict(record, task=task_key(record.get("task")))
            key = (record["task"], record.get("method"), record.get("seed"))  # failed records lack a model
            superseded += key in latest_runs
            # A rerun of the same (task, method, seed), e.g. after a failure, replaces the earlier record.
            latest_runs.pop(key, None)
            latest_runs[key] = record
        elif record.get("kind") == "memory":
            results.memory.append(record)
    results.runs = list(latest_runs.values())
    if superseded:
        results.problems.append(
            f"{superseded} run record(s) replaced by a later record for the same (task, method, seed)"
        )
    return results


# ------------------------------------------------------------------------------------------- summaries


def ordered(names: Iterable[str], preferred: tuple[str, ...]) -> list[str]:
    """Known names in the preferred order, then the others alphabetically."""
    unique = set(names)
    return [name for name in preferred if name in unique] + sorted(unique - set(preferred))


def numbers(runs: Iterable[dict[str, Any]], *path: str) -> list[float]:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return values


def seed_order(seed: Any) -> tuple[int, float, str]:
    """Seeds in numeric order (2 before 10), anything else after them."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, float(seed), "")
    return (1, 0.0, str(seed))


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass
class MethodSummary:
    method: str
    task_scores: dict[str, list[float]]  # task -> score of each seed, in seed order
    task_seeds: dict[str, list[Any]]
    average: float | None  # mean over all tasks of the per-task means; None if a task is missing
    runs: int  # successful runs the cost means are over
    trainable_percent: float | None
    peak_memory_mb: float | None
    memory_added_mb: float | None  # peak minus what the process held when training began (libraries, weights)
    energy_j: float | None
    energy_estimated: bool  # some run's energy is an estimate, not a measurement
    train_seconds: float | None
    train_cpu_seconds: float | None  # CPU time of the training steps: robust to other load on the machine
    latency_ms_batch1: float | None
    latency_ms_batch32: float | None


def summarise(results: BenchResults) -> tuple[list[str], list[MethodSummary]]:
    """Tasks in table order, and one summary per method (methods with only failed runs included)."""
    ok_runs = results.ok_runs
    tasks = ordered((run["task"] for run in ok_runs), TASK_ORDER)
    methods = ordered((str(run.get("method")) for run in results.runs), METHOD_ORDER)
    summaries = []
    for method in methods:
        runs = [run for run in ok_runs if str(run.get("method")) == method]
        runs.sort(key=lambda run: seed_order(run.get("seed")))
        task_scores: dict[str, list[float]] = {}
        task_seeds: dict[str, list[Any]] = {}
        for task in tasks:
            task_runs = [run for run in runs if run["task"] == task and numbers([run], "score")]
            if task_runs:
                task_scores[task] = numbers(task_runs, "score")
                task_seeds[task] = [run.get("seed") for run in task_runs]
        has_every_task = bool(tasks) and all(task in task_scores for task in tasks)
        runs_with_energy = [run for run in runs if numbers([run], "energy_j")]
        summaries.append(
            MethodSummary(
                method=method,
                task_scores=task_scores,
                task_seeds=task_seeds,
                average=statistics.fmean(statistics.fmean(task_scores[t]) for t in tasks) if has_every_task else None,
                runs=len(runs),
                trainable_percent=mean(numbers(runs, "trainable_percent")),
                peak_memory_mb=mean(numbers(runs, "peak_memory_mb")),
                memory_added_mb=mean([run["peak_memory_mb"] - run["memory_at_start_mb"] for run in runs
                                       if numbers([run], "peak_memory_mb") and numbers([run], "memory_at_start_mb")]),
                energy_j=mean(numbers(runs, "energy_j")),
                energy_estimated=any(run.get("energy_measured") is not True for run in runs_with_energy),
                train_seconds=mean(numbers(runs, "train_seconds")),
                train_cpu_seconds=mean(numbers(runs, "train_cpu_seconds")),
                latency_ms_batch1=mean(numbers(runs, "inference", "latency_ms_batch1")),
                latency_ms_batch32=mean(numbers(runs, "inference", "latency_ms_batch32")),
            )
        )
    return tasks, summaries


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, cost, score) points no other point beats: lower-or-equal cost and
    higher-or-equal score, strictly better in one. Ordered by increasing cost."""
    front = []
    for name, cost, score in points:
        dominated = any(
            other_cost <= cost and other_score >= score and (other_cost < cost or other_score > score)
            for _, other_cost, other_score in points
        )
        if not dominated:
            front.append((cost, -score, name))
    return [name for _, _, name in sorted(front)]


# -------------------------------------------------------------------------------------------- table.md


def distinct(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(value) for value in values if value not in (None, "")))
