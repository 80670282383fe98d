"""Learning curve: GLUE dev score against the number of training rows, READ against full fine-tuning.

Reads records that already exist (this script trains nothing): READ runs from `benchmarks/read_recipe.py`
JSONL files (one variant) and full fine-tuning from `readapt bench` results.jsonl files, run with the same
protocol at several `--train-samples` / `--max-train-samples` sizes (selection split held out of those rows;
the dev score at the epoch the selection split picked). Plots mean ± std over the seeds present per size, with
the x axis = rows trained on (after the selection hold-out), log scale; writes the figure and prints a table.

Usage: python benchmarks/learning_curve.py --task sst2 --read runs/curve-read.jsonl --read-variant pooled
                                           --full runs/curve-full-*/results.jsonl --out docs/results/x/curve.png
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from readapt.comparison.runner import read_results  # JSONL records; a torn last line is ignored


def _records(paths: list[str]) -> list[dict]:
    return [r for path in paths for r in read_results(Path(path)) if r.get("status") == "ok"]


def curve(records: list[dict]) -> list[tuple[int, float, float, int]]:
    """(training rows, mean dev score, std, seeds) per size."""
    by_size: dict[int, list[float]] = {}
    for record in records:
        by_size.setdefault(int(record["train_examples"]), []).append(float(record["score"]))
    return [(size, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for size, v in sorted(by_size.items())]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--read", nargs="+", required=True, help="read_recipe.py JSONL file(s)")
    parser.add_argument("--read-variant", default="pooled")
    parser.add_argument("--full", nargs="+", required=True, help="readapt bench results.jsonl file(s)")
    parser.add_argument("--out", required=True, help="figure (.png)")
    args = parser.parse_args(argv)
    read = curve([r for r in _records(args.read) if r["task"] == args.task and r["variant"] == args.read_variant])
    full = curve([r for r in _records(args.full) if r.get("task") == args.task and r.get("method") == "full"])
    if not read or not full:
        raise SystemExit(f"no records for {args.task}: READ sizes {len(read)}, full sizes {len(full)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for label, points in ((f"READ ({args.read_variant})", read), ("full fine-tuning", full)):
        sizes = [p[0] for p in points]
        means = [p[1] for p in points]
        stds = [p[2] for p in points]
        axes.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=label)
    axes.set_xscale("log")
    axes.set_xlabel("training rows (after the selection hold-out)")
    axes.set_ylabel(f"{args.task} dev score")
    axes.set_title(f"{args.task}: dev score vs training rows")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.png")
    figure.savefig(partial, dpi=120)
    partial.replace(out)  # atomic: an interrupted run leaves the old figure
    print(f"| rows | READ ({args.read_variant}) | full fine-tuning |")
    print("|---|---|---|")
    sizes = sorted({p[0] for p in read} | {p[0] for p in full})
    by = {"read": {p[0]: p for p in read}, "full": {p[0]: p for p in full}}
    for size in sizes:
        cells = [f"{by[k][size][1]:.1f} ± {by[k][size][2]:.1f} (n={by[k][size][3]})" if size in by[k] else "–"
                 for k in ("read", "full")]
        print(f"| {size} | {cells[0]} | {cells[1]} |")
    return {"read": read, "full": full}


if __name__ == "__main__":
    main()
