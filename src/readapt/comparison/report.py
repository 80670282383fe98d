"""Tables and plots from a bench output folder's results.jsonl.

Writes, each atomically (temporary file in the same folder, then os.replace):

- results.csv: one row per successful training run, nested fields flattened (inference_latency_ms_batch1, ...)
- table.md: one row per method, one column per task, shaped like Table 1 of the READ paper, with the
  protocol, meters, machine, seeds and failed runs written under it
- score_vs_memory.png, score_vs_energy.png, score_vs_time.png: average score against each cost, one point
  per method, with the Pareto front (lower cost, higher score)
- memory_vs_batch.png: peak memory against batch size from the memory sweep (only if it has records)

Usage: python -m readapt.comparison.report OUTPUT_DIR [--results FILE] [--note LINE ...]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from readapt.comparison.results import (
    METHOD_DISPLAY,
    METHOD_ORDER,
    MISSING,
    TASK_DISPLAY,
    TASK_ORDER,
    BenchResults,
    MethodSummary,
    distinct,
    numbers,
    ordered,
    pareto_front,
    read_results,
    seed_order,
    summarise,
)

# results.csv: these columns first, in this order; metrics_* after score, inference_* after backbone_params.
_CSV_LEADING = ("task", "method", "seed", "model", "score")
_CSV_COSTS = (
    "peak_memory_mb", "memory_meter", "energy_j", "energy_meter", "energy_measured", "train_seconds",
    "wall_seconds", "trainable_params", "trainable_percent", "backbone_params",
)  # fmt: skip
_CSV_DROPPED = ("kind", "status", "error")  # the same for every row of a table of successful runs


def _score_cell(scores: list[float] | None) -> str:
    if not scores:
        return MISSING
    if len(scores) == 1:
        return f"{scores[0]:.1f}"
    return f"{statistics.fmean(scores):.1f} ± {statistics.stdev(scores):.1f}"


def _cost(value: float | None) -> str:
    """Three significant figures or so, whatever the scale."""
    if value is None:
        return MISSING
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _energy_unit(summaries: list[MethodSummary]) -> tuple[str, float]:
    largest = max((s.energy_j for s in summaries if s.energy_j is not None), default=0.0)
    return ("kJ", 1000.0) if largest >= 10_000 else ("J", 1.0)


def _seed_count(summary: MethodSummary) -> str:
    counts = sorted({len(seeds) for seeds in summary.task_seeds.values()})
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _describe(mapping: Any) -> str:
    if not isinstance(mapping, dict) or not mapping:
        return "not recorded"
    return ", ".join(f"{key}: {value}" for key, value in mapping.items())


def relative_to_full(summaries: list[MethodSummary], method: str = "read") -> list[str]:
    """Lines comparing `method` with full fine-tuning and each other method: average score difference and
    cost ratios (the comparison the READ paper makes)."""
    by_name = {s.method: s for s in summaries}
    ours = by_name.get(method)
    if ours is None or ours.average is None:
        return []
    lines = ["", f"{METHOD_DISPLAY.get(method, method)} relative to the other methods (average score difference in "
                 "points; cost ratios = ours / theirs, below 1 means ours costs less):"]
    for other in summaries:
        if other.method == method or other.average is None:
            continue
        ratios = []
        for label, attribute in (("peak memory", "peak_memory_mb"), ("memory added by training", "memory_added_mb"),
                                 ("train time", "train_seconds"),
                                 ("train CPU", "train_cpu_seconds"), ("energy", "energy_j")):
            mine, theirs = getattr(ours, attribute), getattr(other, attribute)
            if mine is not None and theirs:
                ratios.append(f"{label} {mine / theirs:.2f}")
        lines.append(f"- vs {METHOD_DISPLAY.get(other.method, other.method)}: {ours.average - other.average:+.1f} "
                     f"points; {', '.join(ratios)}")
    return lines


def render_table(results: BenchResults, notes: list[str] | None = None) -> str:
    tasks, summaries = summarise(results)
    energy_unit, energy_scale = _energy_unit(summaries)
    any_estimate = any(s.energy_estimated for s in summaries)
    header = (
        ["Method"]
        + [TASK_DISPLAY.get(task, task) for task in tasks]
        + ["Avg.", "Seeds", "Params (%)", "Peak memory (MiB)", "Added by training (MiB)"]
        + [f"Energy ({energy_unit}{', ≈ estimated' if any_estimate else ''})", "Train time (s)", "Train CPU (s)"]
        + ["Inference latency b1 / b32 (ms)"]
    )
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for s in summaries:
        energy = MISSING
        if s.energy_j is not None:
            energy = ("≈" if s.energy_estimated else "") + _cost(s.energy_j / energy_scale)
        latency = MISSING
        if s.latency_ms_batch1 is not None or s.latency_ms_batch32 is not None:
            latency = f"{_cost(s.latency_ms_batch1)} / {_cost(s.latency_ms_batch32)}"
        row = (
            [METHOD_DISPLAY.get(s.method, s.method)]
            + [_score_cell(s.task_scores.get(task)) for task in tasks]
            + [MISSING if s.average is None else f"{s.average:.1f}", _seed_count(s)]
            + [_cost(s.trainable_percent), _cost(s.peak_memory_mb), _cost(s.memory_added_mb), energy,
               _cost(s.train_seconds),
               _cost(s.train_cpu_seconds), latency]
        )
        lines.append("| " + " | ".join(row) + " |")

    ok_runs = results.ok_runs
    below = [
        "",
        "Task columns: the task's main GLUE dev score ×100 (the mean of the two metrics where GLUE reports two), "
        "as mean ± sample standard deviation (n−1) over seeds; ± only where a cell has at least 2 seeds. "
        "Seeds: the number of seeds in each task cell.",
        f"Avg.: the mean over the {len(tasks)} task(s) of the per-task means, only for methods with a result "
        f"on every task ({MISSING} otherwise).",
        "Params, peak memory, energy, train time and inference latency: means over all of the method's "
        "successful runs (every task and seed), not per task. Peak memory in MiB (2^20 bytes); Added by "
        "training: peak minus what the process held when training began (libraries, weights, data). Train time: "
        "wall-clock seconds of the training steps (no evaluation); Train CPU: the process's CPU seconds over "
        "the same steps, which other load on the machine does not inflate.",
    ]
    if any_estimate:
        below.append(
            "Energy marked ≈ is an estimate (CPU-seconds × an assumed power per busy core), not a "
            "measurement; see the energy meter below."
        )
    below += relative_to_full(summaries)
    below += ["", "How the numbers were made:" if notes else "Protocol: not given to the report."]
    below += [f"- {_one_line(note)}" for note in notes or []]
    below += ["", "Meters:"]
    for label, values in (
        ("training peak memory", distinct(run.get("memory_meter") for run in ok_runs)),
        ("energy", distinct(run.get("energy_meter") for run in ok_runs)),
        ("energy meter detail", distinct(run.get("energy_detail") for run in ok_runs)),
        ("inference peak memory", distinct((run.get("inference") or {}).get("memory_meter") for run in ok_runs)),
        ("memory sweep", distinct(record.get("memory_meter") for record in results.memory)),
    ):
        if values:
            below.append(f"- {label}: {'; '.join(values)}")
    first = results.first_record or {}
    below += ["", f"Machine: {_describe(first.get('machine'))}.", f"Versions: {_describe(first.get('versions'))}."]
    models = distinct(run.get("model") for run in results.runs)
    if len(models) > 1:
        below.append(f"Warning: these results mix {len(models)} models: {', '.join(models)}.")

    below += ["", "Seeds per method:"]
    for s in summaries:
        per_task = "; ".join(
            f"{TASK_DISPLAY.get(task, task)}: {', '.join(str(seed) for seed in seeds)}"
            for task, seeds in s.task_seeds.items()
        )
        below.append(f"- {METHOD_DISPLAY.get(s.method, s.method)}: {per_task or 'no successful run'}")

    failed = sorted(
        results.failed_runs, key=lambda run: (str(run.get("method")), run["task"], seed_order(run.get("seed")))
    )
    if failed:
        listed = "; ".join(
            f"{run.get('method')}/{TASK_DISPLAY.get(run['task'], run['task'])} seed {run.get('seed')}: "
            f"{_one_line(run.get('error') or 'no error message')}"
            for run in failed
        )
        below += ["", f"Failed runs ({len(failed)}): {listed}"]
    else:
        below += ["", "Failed runs: none."]
    if results.problems:
        below += ["", "Reading results: " + "; ".join(results.problems) + "."]
    return "\n".join(lines + below) + "\n"


# ----------------------------------------------------------------------------------------- results.csv


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "_"))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _csv_column_rank(column: str) -> tuple[int, int]:
    if column in _CSV_LEADING:
        return (0, _CSV_LEADING.index(column))
    if column.startswith("metrics_"):
        return (1, 0)
    if column in _CSV_COSTS:
        return (2, _CSV_COSTS.index(column))
    if column.startswith("inference_"):
        return (3, 0)
    return (4, 0)


def render_csv(results: BenchResults) -> str:
    method_rank = {method: rank for rank, method in enumerate(METHOD_ORDER)}
    task_rank = {task: rank for rank, task in enumerate(TASK_ORDER)}
    runs = sorted(
        results.ok_runs,
        key=lambda run: (
            method_rank.get(str(run.get("method")), len(METHOD_ORDER)), str(run.get("method")),
            task_rank.get(run["task"], len(TASK_ORDER)), run["task"], seed_order(run.get("seed")),
        ),
    )  # fmt: skip
    rows = [{k: v for k, v in _flatten(run).items() if k not in _CSV_DROPPED} for run in runs]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    columns.sort(key=_csv_column_rank)  # stable: within a group, the order columns first appear in
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns or list(_CSV_LEADING), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------------------------- plots


def _new_figure():
    # Figure objects render through Agg without pyplot: no display, no global figure registry to leak into,
    # and the interactive backend of a process that imports this module is left alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=120, layout="constrained")
    return figure, figure.add_subplot()


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _cost_plot(
    summaries: list[MethodSummary],
    cost_of: str,
    cost_label: str,
    scale: float,
    meters: list[str],
    title: str,
) -> bytes:
    complete = [s for s in summaries if s.average is not None and getattr(s, cost_of) is not None]
    points = [(METHOD_DISPLAY.get(s.method, s.method), getattr(s, cost_of) / scale, s.average) for s in complete]
    figure, axes = _new_figure()
    if points:
        front = pareto_front(points)
        axes.scatter([cost for _, cost, _ in points], [score for _, _, score in points], color="tab:blue", zorder=3)
        for name, cost, score in points:
            axes.annotate(name, (cost, score), textcoords="offset points", xytext=(6, 4), fontsize=9)
        front_points = sorted((cost, score) for name, cost, score in points if name in front)
        front_costs = [cost for cost, _ in front_points]
        front_scores = [score for _, score in front_points]
        # "post": each front score holds until a costlier method scores higher: the best score per budget.
        axes.step(front_costs, front_scores, where="post", color="tab:red", linestyle="--", zorder=2,
                  label="Pareto front (lower cost, higher score)")  # fmt: skip
        axes.scatter(front_costs, front_scores, s=160, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                     zorder=4)  # fmt: skip
        axes.margins(x=0.15, y=0.15)  # room for the labels of the points at the edges
        axes.legend(loc="best", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no method has a result on every task yet", ha="center", va="center",
                  transform=axes.transAxes)  # fmt: skip
    meter_text = "; ".join(meters) if meters else "meter not recorded"
    x_label = f"{cost_label}\nmeter: {meter_text}"
    left_out = [METHOD_DISPLAY.get(s.method, s.method) for s in summaries if s not in complete]
    if left_out:
        cost_name = cost_label.split(" (")[0].lower()
        x_label += f"\nnot shown (no result on some task, or no {cost_name}): {', '.join(left_out)}"
    axes.set_xlabel(x_label, fontsize=9)
    axes.set_ylabel("Average score over tasks (GLUE dev ×100)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    return _png_bytes(figure)


def _memory_sweep_plot(memory_records: list[dict[str, Any]]) -> bytes | None:
    ok = [r for r in memory_records if r.get("status", "ok") == "ok" and numbers([r], "peak_memory_mb")]
    if not ok:
        return None
    seq_lens = distinct(r.get("seq_len") for r in ok)
    figure, axes = _new_figure()
    for method in ordered((str(r.get("method")) for r in ok), METHOD_ORDER):
        for seq_len in seq_lens:
            by_batch: dict[float, list[float]] = {}
            for r in ok:
                if str(r.get("method")) == method and str(r.get("seq_len")) == seq_len:
                    by_batch.setdefault(float(r["batch_size"]), []).append(float(r["peak_memory_mb"]))
            if not by_batch:
                continue
            batches = sorted(by_batch)
            label = METHOD_DISPLAY.get(method, method) + (f" (seq {seq_len})" if len(seq_lens) > 1 else "")
            axes.plot(batches, [statistics.fmean(by_batch[b]) for b in batches], marker="o", label=label)
    meters = distinct(r.get("memory_meter") for r in ok)
    axes.set_xlabel("Batch size")
    axes.set_ylabel(f"Peak memory (MiB)\nmeter: {'; '.join(meters) or 'not recorded'}", fontsize=9)
    seq_text = f", sequence length {seq_lens[0]}" if len(seq_lens) == 1 else ""
    axes.set_title(f"Peak training memory vs batch size{seq_text}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _png_bytes(figure)


# -------------------------------------------------------------------------------------------- writing


def _replace_atomically(path: Path, data: bytes) -> None:
    """Readers of the folder see the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; reports are for everyone to read
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _stored_notes(path: Path) -> list[str] | None:
    try:
        notes = json.loads(path.read_text(encoding="utf-8")).get("notes")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in notes] if isinstance(notes, list) else None


def write_reports(
    output_dir: Path, results_file: Path | None = None, notes: list[str] | None = None
) -> dict[str, Path]:
    """Write results.csv, table.md and the plots into output_dir; returns {report name: path written}.

    notes: protocol lines to print under the table (model, epochs, batch size, hardware, ...).
    """
    output_dir = Path(output_dir)
    results_file = Path(results_file) if results_file is not None else output_dir / "results.jsonl"
    if notes is None:  # the protocol lines the bench runner stored beside its results
        notes = _stored_notes(output_dir / "bench_config.json")
    if not results_file.is_file():
        raise FileNotFoundError(f"no results file at {results_file}")
    results = read_results(results_file)
    tasks, summaries = summarise(results)
    ok_runs = results.ok_runs
    output_dir.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}

    def write(name: str, filename: str, data: bytes) -> None:
        path = output_dir / filename
        _replace_atomically(path, data)
        written[name] = path

    write("csv", "results.csv", render_csv(results).encode("utf-8"))
    write("table", "table.md", render_table(results, notes).encode("utf-8"))

    energy_unit, energy_scale = _energy_unit(summaries)
    energy_meters = distinct(run.get("energy_meter") for run in ok_runs)
    energy_estimated = any(s.energy_estimated for s in summaries)
    energy_title = "Average score vs energy" + (
        " (estimated from CPU time, not measured)" if energy_estimated else " (measured)"
    )
    write(
        "score_vs_memory",
        "score_vs_memory.png",
        _cost_plot(summaries, "peak_memory_mb", "Peak training memory (MiB), mean over runs", 1.0,
                   distinct(run.get("memory_meter") for run in ok_runs), "Average score vs peak training memory"),
    )  # fmt: skip
    write(
        "score_vs_energy",
        "score_vs_energy.png",
        _cost_plot(summaries, "energy_j", f"Training energy ({energy_unit}"
                   f"{', estimated' if energy_estimated else ''}), mean over runs", energy_scale, energy_meters,
                   energy_title),
    )  # fmt: skip
    write(
        "score_vs_time",
        "score_vs_time.png",
        _cost_plot(summaries, "train_seconds", "Training time (s), mean over runs", 1.0,
                   ["wall-clock training time (train_seconds)"], "Average score vs training time"),
    )  # fmt: skip
    sweep = _memory_sweep_plot(results.memory)
    if sweep is not None:
        write("memory_vs_batch", "memory_vs_batch.png", sweep)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m readapt.comparison.report", description="Regenerate the tables and plots of a bench output folder."
    )
    parser.add_argument("output_dir", type=Path, help="bench output folder (holds results.jsonl)")
    parser.add_argument("--results", type=Path, default=None, help="results file (default: OUTPUT_DIR/results.jsonl)")
    parser.add_argument("--note", action="append", default=[], help="a protocol line for under the table (repeatable)")
    args = parser.parse_args(argv)
    try:
        written = write_reports(args.output_dir, args.results, notes=args.note or None)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
