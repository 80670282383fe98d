"""READ recipe search and ablations: READ variants, each on the same GLUE tasks and seeds, with honest selection.

Protocol (defaults): the embedded all-MiniLM-L6-v2; per (variant, task, seed) one fresh process running
`readapt train --task TASK --max-train-samples 1000 --selection-fraction 0.2 --seed SEED --epochs 20
--batch-size 16 --max-length 128 --cache-features` plus the variant's options: a seeded random subset of 1,000
training rows, a seeded 20 % of it held out as the "selection" split, training on the other 80 %. The selection
split picks the epoch; the score reported is the GLUE dev set's main metric at that epoch (0-100; STS-B: mean of
Pearson and Spearman; CoLA: MCC); the dev set picks nothing. Variants are compared on their mean *selection*
score (what a user without the dev set could see); the dev score is what we report. The feature cache is
shared: a variant with the same data and backbone reuses the entries another one built.

Records (one JSON object per run, appended; a finished (variant, task, seed) is not run again):
`--output results.jsonl`. `--report` prints the markdown table of what the file holds, with full fine-tuning
from `readapt bench` results files (`--baseline`) if given.

Usage:
  python benchmarks/read_recipe.py --variants pooled,pooled-lr3e-3 --output runs/recipe.jsonl [--tasks rte,mrpc]
                                   [--seeds 1,2,3] [--train-samples 1000] [--epochs 20] [--jobs 1]
  python benchmarks/read_recipe.py --report --output runs/recipe.jsonl [--baseline runs/parity/results.jsonl]
                                   [--plot bars.png --plot-variants pooled,per-token]
  python benchmarks/read_recipe.py --list        # the variants and their options
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from readapt.comparison.runner import read_results  # JSONL records; a torn last line is ignored

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")

# name -> READ options (--method-option), learning rate, extra `readapt train` arguments, over BASE_OPTIONS: the
# READ this search was run on (GRU, r = 256, no token mixer; readapt's defaults since are r by width and a token
# mixer on encoders, docs/results/side-network-search/), so its committed records stay reproducible. Defaults
# otherwise (input projection, mean over layers, scaling 1, h0 zeros, no dropout, sequence context "auto" =
# "segments" on this encoder; lr 1e-3). "default": today's `readapt train` defaults, nothing pinned.
BASE_OPTIONS = {"hidden_size": 256, "token_mixer_layers": 0}
VARIANTS: dict[str, dict] = {
    "default": {"options": {}, "base": False},
    "per-token": {"options": {"sequence_context": "none"}},
    "mean": {"options": {"sequence_context": "mean"}},
    "pooled": {"options": {"sequence_context": "pooled"}},
    "segments": {"options": {"sequence_context": "segments"}},
    "segments-r32": {"options": {"sequence_context": "segments", "hidden_size": 32}},
    "segments-r64": {"options": {"sequence_context": "segments", "hidden_size": 64}},
    "segments-r128": {"options": {"sequence_context": "segments", "hidden_size": 128}},
    "segments-r512": {"options": {"sequence_context": "segments", "hidden_size": 512}},
    "segments-lstm": {"options": {"sequence_context": "segments", "rnn_type": "lstm"}},
    "segments-rnn": {"options": {"sequence_context": "segments", "rnn_type": "rnn"}},
    "segments-mlp": {"options": {"sequence_context": "segments", "rnn_type": "mlp"}},
    "segments-last": {"options": {"sequence_context": "segments", "aggregation": "last"}},
    "segments-dropout": {"options": {"sequence_context": "segments", "dropout": 0.1}},
    "segments-noproj": {"options": {"sequence_context": "segments", "input_projection": False}},
    "segments-h0": {"options": {"sequence_context": "segments", "h0": "embeddings"}},
    "segments-scaling4": {"options": {"sequence_context": "segments", "scaling": 4.0}},
    "segments-bf16": {"options": {"sequence_context": "segments"}, "args": ["--backbone-dtype", "bfloat16"]},
    "pooled-lr3e-4": {"options": {"sequence_context": "pooled"}, "lr": 3e-4},
    "pooled-lr3e-3": {"options": {"sequence_context": "pooled"}, "lr": 3e-3},
    "pooled-r32": {"options": {"sequence_context": "pooled", "hidden_size": 32}},
    "pooled-r64": {"options": {"sequence_context": "pooled", "hidden_size": 64}},
    "pooled-r128": {"options": {"sequence_context": "pooled", "hidden_size": 128}},
    "pooled-r512": {"options": {"sequence_context": "pooled", "hidden_size": 512}},
    "pooled-lstm": {"options": {"sequence_context": "pooled", "rnn_type": "lstm"}},
    "pooled-rnn": {"options": {"sequence_context": "pooled", "rnn_type": "rnn"}},
    "pooled-mlp": {"options": {"sequence_context": "pooled", "rnn_type": "mlp"}},
    "pooled-last": {"options": {"sequence_context": "pooled", "aggregation": "last"}},
    "pooled-h0": {"options": {"sequence_context": "pooled", "h0": "embeddings"}},
    "pooled-dropout": {"options": {"sequence_context": "pooled", "dropout": 0.1}},
    "pooled-scaling4": {"options": {"sequence_context": "pooled", "scaling": 4.0}},
    "pooled-noproj": {"options": {"sequence_context": "pooled", "input_projection": False}},
    "pooled-bf16": {"options": {"sequence_context": "pooled"}, "args": ["--backbone-dtype", "bfloat16"]},
}


def _default_glue() -> str:
    return os.environ.get("READAPT_GLUE_DIR") or os.environ.get("GLUE_DIR") or str(REPO_ROOT.parent / "shared" / "data" / "glue")


def _command(variant: str, task: str, seed: int, args, output: Path) -> list[str]:
    spec = VARIANTS[variant]
    command = [sys.executable, "-m", "readapt", "train", "--task", task, "--data-dir", args.data_dir,
               "--max-train-samples", str(args.train_samples), "--selection-fraction", str(args.selection_fraction),
               "--seed", str(seed), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--cache-features", "--cache-dir", args.cache_dir,
               "--output-dir", str(output), "--overwrite", "--no-progress", "--no-checkpoints"]
    if args.model:
        command += ["--model", args.model]
    options = {**(BASE_OPTIONS if spec.get("base", True) else {}), **spec.get("options", {})}
    for key, value in options.items():
        command += ["--method-option", f"{key}={json.dumps(value)}"]
    if "lr" in spec:
        command += ["--lr", str(spec["lr"])]
    return command + list(spec.get("args", ()))


def _run(variant: str, task: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="readapt-recipe-") as scratch:
        output = Path(scratch) / "run"
        command = _command(variant, task, seed, args, output)
        environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        finished = subprocess.run(command, env=environment, capture_output=True, text=True)
        if finished.returncode != 0:
            tail = finished.stderr.strip().splitlines()
            return {"variant": variant, "task": task, "seed": seed, "status": "failed",
                    "error": tail[-1] if tail else f"exit {finished.returncode}"}
        metrics = json.loads((output / "metrics.json").read_text())
    main = metrics["main_metric"]

    def dev(record):  # the reported dev split(s): everything but the selection split
        values = [v[main] for split, v in record["dev"].items() if split != "selection"]
        return 100.0 * sum(values) / len(values)

    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])
    return {
        "variant": variant, "task": task, "seed": seed, "status": "ok", "main_metric": main,
        "score": dev(best), "selection_score": 100.0 * best["dev"]["selection"][main], "best_epoch": best["epoch"],
        "epoch_dev_scores": [dev(e) for e in metrics["epochs"]],
        "epoch_selection_scores": [100.0 * e["dev"]["selection"][main] for e in metrics["epochs"]],
        "train_seconds": metrics["train_seconds"], "train_cpu_seconds": metrics["train_cpu_seconds"],
        "epoch_train_seconds": [e["epoch_train_seconds"] for e in metrics["epochs"]],
        "peak_memory_bytes": metrics["peak_memory_bytes"], "peak_memory_meter": metrics["peak_memory_meter"],
        "trainable_parameters": metrics["trainable_parameters"], "train_examples": metrics["train_examples"],
        "dev_examples": metrics["dev_examples"], "learning_rate": metrics["config"]["learning_rate"],
        "method_options": metrics["config"]["method_options"], "read_corrected_positions": metrics.get("read_corrected_positions"),
        "feature_cache_reused": (metrics.get("feature_cache") or {}).get("reused"),
        "protocol": metrics["protocol"], "epochs": args.epochs, "train_samples": args.train_samples, "threads": args.threads, "machine": metrics["machine"],
        "command": " ".join(command[1:]).replace(args.data_dir, "$GLUE"),
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(path: Path, baseline: list[Path], tasks: tuple[str, ...] = TASKS) -> str:
    """Markdown: per variant, dev score mean ± std over seeds per task, the dev average and the selection average
    (the average is over tasks of the per-task means; only variants with every task have one)."""
    rows: dict[str, dict[str, list[dict]]] = {}
    for record in read_results(path):
        if record.get("status") == "ok":
            rows.setdefault(record["variant"], {}).setdefault(record["task"], []).append(record)
    for file in baseline:
        for record in read_results(file):
            if record.get("status") == "ok" and record.get("kind") == "run":
                rows.setdefault(f"{record['method']} (bench)", {}).setdefault(record["task"], []).append(record)
    lines = ["| variant | " + " | ".join(tasks) + " | avg dev | avg selection | seeds | train CPU s (mean) |",
             "|---" * (len(tasks) + 5) + "|"]
    for name, by_task in rows.items():
        cells = [_mean_std([r["score"] for r in by_task.get(task, [])]) for task in tasks]
        complete = all(task in by_task for task in tasks)
        dev = statistics.mean(statistics.mean(r["score"] for r in by_task[t]) for t in tasks) if complete else None
        picks = [r.get("selection_score") for t in tasks for r in by_task.get(t, [])]
        selection = (statistics.mean(statistics.mean(r["selection_score"] for r in by_task[t]) for t in tasks)
                     if complete and all(p is not None for p in picks) else None)
        seeds = sorted({r["seed"] for runs in by_task.values() for r in runs})
        cpu = statistics.mean(r["train_cpu_seconds"] for runs in by_task.values() for r in runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if dev is None else f'{dev:.1f}'} | "
                     f"{'–' if selection is None else f'{selection:.1f}'} | {','.join(map(str, seeds))} | {cpu:.0f} |")
    return "\n".join(lines)


def plot(path: Path, baseline: list[Path], out: Path, variants: list[str] | None, tasks: tuple[str, ...] = TASKS) -> None:
    """Grouped bars: dev score (mean over seeds, std as error bar) per task, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores: dict[str, dict[str, list[float]]] = {}
    for record in read_results(path):
        if record.get("status") == "ok" and (variants is None or record["variant"] in variants):
            scores.setdefault(record["variant"], {}).setdefault(record["task"], []).append(record["score"])
    for file in baseline:
        for record in read_results(file):
            if record.get("status") == "ok" and record.get("kind") == "run":
                scores.setdefault(f"{record['method']} fine-tuning", {}).setdefault(record["task"], []).append(record["score"])
    names = list(scores)
    width = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.8))
    for k, name in enumerate(names):
        values = [scores[name].get(task, []) for task in tasks]
        axes.bar([i + k * width for i in range(len(tasks))], [statistics.mean(v) if v else 0 for v in values], width,
                 yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=2, label=name)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    axes.set_ylabel("GLUE dev score (selected on held-out train rows)")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    partial = out.with_name(out.name + ".partial.png")
    figure.savefig(partial, dpi=120)
    partial.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="pooled", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--output", required=True, help="results JSONL (appended; finished runs are skipped)")
    parser.add_argument("--model", help="backbone (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", default=_default_glue())
    parser.add_argument("--cache-dir", default=os.environ.get("READAPT_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "readapt-recipe-cache"))
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--selection-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--report", action="store_true", help="print the table of --output and stop")
    parser.add_argument("--baseline", nargs="+", default=[],
                        help="`readapt bench` results.jsonl file(s) to show next to the variants")
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument("--plot", help="with --report: also draw the per-task bars to this .png")
    parser.add_argument("--plot-variants", help="with --plot: only these variants (comma-separated)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name:<18} {json.dumps(spec)}")
        return
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.report:
        baseline = [Path(b) for b in args.baseline]
        print(report(output, baseline, tasks))
        if args.plot:
            chosen = [v.strip() for v in args.plot_variants.split(",")] if args.plot_variants else None
            plot(output, baseline, Path(args.plot), chosen, tasks)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    seeds = [int(s) for s in args.seeds.split(",")]
    # a run is done when the same variant, task and seed ran with the same training rows and epochs
    done = {(r["variant"], r["task"], r["seed"], r.get("train_samples"), r.get("epochs"))
            for r in read_results(output) if r.get("status") == "ok"}
    todo = [(v, t, s) for v in variants for t in tasks for s in seeds
            if (v, t, s, args.train_samples, args.epochs) not in done]
    output.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_run, v, t, s, args) for v, t, s in todo]
        for future in as_completed(futures):
            record = future.result()
            with open(output, "a", encoding="utf-8") as f:  # only this thread appends
                f.write(json.dumps(record, sort_keys=True) + "\n")
            shown = f"{record['score']:.1f} (selection {record['selection_score']:.1f})" if record["status"] == "ok" \
                else record["error"]
            print(f"{record['variant']} {record['task']} seed {record['seed']}: {shown}", flush=True)


if __name__ == "__main__":
    main()
