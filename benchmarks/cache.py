"""Feature-cache benchmark: READ epochs with and without the cache, against full fine-tuning; READ with a
bfloat16 backbone against float32.

Protocol (defaults): the embedded all-MiniLM-L6-v2 on SST-2, a seeded random training subset of 2,000 sentences
(`readapt train --max-train-samples`, seed 42), dev = the first 200 dev sentences (scored after every epoch,
as `readapt train` does; not part of the epoch times), batch 32, max length 128. Every run is a fresh process
(`python -m readapt train`) so that peak memory and warm-up do not leak from one run into the next:

  1. READ --cache-features (float16 cache, in a fresh cache directory), 10 epochs: epoch 1 includes building
     the train and dev entries; then the mean of epochs 2..10, which only run the side network and head.
  2. READ without cache, 10 epochs.
  3. Full fine-tuning, 3 epochs (every epoch does the same work, so fewer epochs give the same mean).
  4. READ with a bfloat16 backbone, no cache, 3 epochs: epoch time and peak memory against run 2's float32.

Epoch time = `epoch_train_seconds` in metrics.json (wall clock of the epoch's training steps, plus the cache
build in run 1's epoch 1). "Mean epoch" = mean of epochs 2..E when E >= 2 (epoch 1 carries warm-up and, in
run 1, the build). Peak memory = metrics.json's peak_memory_bytes: peak RSS of the process during training on
CPU (weights included), torch.cuda.max_memory_allocated on GPU. Cache size = bytes of its files on disk.
Goals (issue 5): a cached epoch <= 0.03 of a full fine-tuning epoch and <= 0.10 of an uncached READ epoch.
Wall-clock figures depend on the machine and on whatever else runs on it: say which, and whether it was idle.
The ratios are also given in CPU seconds of each training process (`epoch_train_cpu_seconds`, all threads):
with --threads 1 on an otherwise idle core they equal the wall ones; on a busy machine they are the fair ones.

Usage: python benchmarks/cache.py [--train-samples 2000] [--epochs 10] [--full-epochs 3] [--bf16-epochs 3]
                                  [--eval-samples 200] [--threads N] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_glue() -> str:
    return os.environ.get("READAPT_GLUE_DIR") or os.environ.get("GLUE_DIR") or str(REPO_ROOT.parent / "shared" / "data" / "glue")


def _run(label: str, arguments: list[str], folder: Path, threads: int | None) -> dict:
    output = folder / label.replace(" ", "_")
    command = [sys.executable, "-m", "readapt", "train", *arguments, "--output-dir", str(output), "--no-progress"]
    environment = dict(os.environ)
    if threads:
        environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"# running {label}: {' '.join(arguments)}", file=sys.stderr, flush=True)
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{label} failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
    metrics = json.loads((output / "metrics.json").read_text())
    seconds = [e["epoch_train_seconds"] for e in metrics["epochs"]]
    cpu = [e["epoch_train_cpu_seconds"] for e in metrics["epochs"]]
    later, later_cpu = seconds[1:] or seconds, cpu[1:] or cpu
    return {
        "epochs": len(seconds), "epoch_seconds": seconds, "epoch_1_seconds": seconds[0],
        "mean_epoch_seconds": sum(later) / len(later), "mean_over": f"epochs 2..{len(seconds)}" if seconds[1:] else "epoch 1",
        "epoch_cpu_seconds": cpu, "mean_epoch_cpu_seconds": sum(later_cpu) / len(later_cpu),
        "peak_memory_bytes": metrics["peak_memory_bytes"], "peak_memory_meter": metrics["peak_memory_meter"],
        "best_score": metrics["best_score"], "main_metric": metrics["main_metric"],
        "feature_cache": metrics.get("feature_cache"), "device": metrics["device"],
        "read_corrected_positions": metrics.get("read_corrected_positions"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="backbone (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", default=_default_glue(), help="GLUE folder (default: $READAPT_GLUE_DIR, "
                                                                    "$GLUE_DIR, else ../shared/data/glue)")
    parser.add_argument("--train-samples", type=int, default=2000, help="SST-2 training subset (seeded sample)")
    parser.add_argument("--eval-samples", type=int, default=200, help="first N SST-2 dev sentences")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the READ runs (cached and uncached)")
    parser.add_argument("--full-epochs", type=int, default=3, help="epochs of full fine-tuning")
    parser.add_argument("--bf16-epochs", type=int, default=3, help="epochs of READ with a bfloat16 backbone (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cache-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--read-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a READ option for every READ run, e.g. hidden_size=64 or recompute=false (repeatable)")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of every run (default: torch's own choice)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    common = ["--task", "sst2", "--data-dir", args.data_dir, "--max-train-samples", str(args.train_samples),
              "--max-eval-samples", str(args.eval_samples), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length)]
    if args.model:
        common += ["--model", args.model]
    if args.cpu:
        common.append("--cpu")
    read_options = [item for option in args.read_option for item in ("--method-option", option)]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="readapt-cache-bench-") as scratch:
        folder = Path(scratch)
        epochs = ["--epochs", str(args.epochs)]
        runs["read_cached"] = _run("READ cached", [*common, *read_options, *epochs, "--cache-features", "--cache-dir",
                                                   str(folder / "cache"), "--cache-dtype", args.cache_dtype],
                                   folder, args.threads)
        runs["read"] = _run("READ", [*common, *read_options, *epochs], folder, args.threads)
        runs["full"] = _run("full", [*common, "--method", "full", "--epochs", str(args.full_epochs)], folder, args.threads)
        if args.bf16_epochs:
            runs["read_bf16"] = _run("READ bf16", [*common, *read_options, "--epochs", str(args.bf16_epochs),
                                                   "--backbone-dtype", "bfloat16"], folder, args.threads)

    cached, read, full = runs["read_cached"], runs["read"], runs["full"]
    cache = cached["feature_cache"]
    result = {
        "protocol": {"model": args.model or "all-MiniLM-L6-v2", "task": "sst2", "train_samples": args.train_samples,
                     "eval_samples": args.eval_samples, "batch_size": args.batch_size, "max_length": args.max_length,
                     "cache_dtype": args.cache_dtype, "read_options": args.read_option, "threads": args.threads},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": cached["device"]},
        "runs": runs,
        "cache_bytes": cache["bytes"],
        "cache_build_seconds": cache["build_seconds"],
        "cached_over_full": cached["mean_epoch_seconds"] / full["mean_epoch_seconds"],
        "cached_over_uncached_read": cached["mean_epoch_seconds"] / read["mean_epoch_seconds"],
        # the same ratios in CPU seconds of the training process: not inflated by other work on the machine
        "cached_over_full_cpu": cached["mean_epoch_cpu_seconds"] / full["mean_epoch_cpu_seconds"],
        "cached_over_uncached_read_cpu": cached["mean_epoch_cpu_seconds"] / read["mean_epoch_cpu_seconds"],
    }
    mib = 2**20
    print(f"# feature cache: {result['protocol']['model']}, SST-2 {args.train_samples} train / {args.eval_samples} dev "
          f"sentences, batch {args.batch_size}, max length {args.max_length}; {platform.machine()} "
          f"{os.cpu_count()} cores, threads {args.threads or 'default'}, device {cached['device']}; "
          f"READ options {args.read_option or 'default'}")
    print(f"{'run':<34} {'epochs':>6} {'epoch 1 s':>10} {'mean epoch s':>13} {'(over)':<14} {'CPU s':>7} {'peak MiB':>9} {'dev':>6}")
    names = {"read_cached": f"READ + cache ({args.cache_dtype})", "read": "READ, no cache",
             "full": "full fine-tuning", "read_bf16": "READ, bfloat16 backbone, no cache"}
    for key, run in runs.items():
        print(f"{names[key]:<34} {run['epochs']:>6} {run['epoch_1_seconds']:>10.2f} {run['mean_epoch_seconds']:>13.3f} "
              f"{run['mean_over']:<14} {run['mean_epoch_cpu_seconds']:>7.3f} {run['peak_memory_bytes'] / mib:>9.0f} "
              f"{run['best_score']:>6.3f}")
    print(f"READ corrected: {cached['read_corrected_positions']}")
    entries = ", ".join(f"{label} {entry['bytes'] / 1e6:.1f} MB" for label, entry in cache["entries"].items())
    print(f"cache on disk: {cache['bytes'] / 1e6:.1f} MB ({entries}); built in {cache['build_seconds']:.2f} s within epoch 1")
    print(f"cached epoch / full fine-tuning epoch = {result['cached_over_full']:.3f} wall, "
          f"{result['cached_over_full_cpu']:.3f} CPU (goal <= 0.03)")
    print(f"cached epoch / uncached READ epoch    = {result['cached_over_uncached_read']:.3f} wall, "
          f"{result['cached_over_uncached_read_cpu']:.3f} CPU (goal <= 0.10)")
    if "read_bf16" in runs:
        bf16 = runs["read_bf16"]
        result["bf16_over_fp32_epoch"] = bf16["mean_epoch_seconds"] / read["mean_epoch_seconds"]
        result["bf16_over_fp32_peak_memory"] = bf16["peak_memory_bytes"] / read["peak_memory_bytes"]
        print(f"bfloat16 / float32 backbone (READ, no cache): epoch time x{result['bf16_over_fp32_epoch']:.2f}, "
              f"peak memory x{result['bf16_over_fp32_peak_memory']:.2f} ({bf16['peak_memory_meter']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
