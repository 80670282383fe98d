"""Ablation: READ on an encoder-decoder (T5-style) with and without the Joiner's encoder context.

With `ReadConfig.encoder_context=True` (the default) the decoder's side network attends over the READ-corrected
encoder output; with False the encoder's correction reaches the decoder only through the frozen
cross-attention. No T5 weights exist offline, so this measures the *mechanics* on a seeded random T5 (weights
fixed for every run) and a synthetic task the decoder can only answer from the input: "does the sentence contain
the word `apple`?" (answered with the label words yes / no, T5's usual rank classification). A random backbone
computes nothing useful by itself, so the score shows how much of the input each path carries, not what READ
reaches on a pretrained T5.

Protocol: a random `T5Config` (d_model 64, 4 encoder + 4 decoder layers, 4 heads, the embedded BERT tokenizer's
vocabulary), seeded with --backbone-seed; synthetic rows of 8-16 words drawn from 400 whole-word tokens of that
vocabulary, half of them with `apple` inserted at a random place; --train-rows rows of which 20 % are held out
to pick the epoch, --dev-rows reported (accuracy at the picked epoch). Each (variant, seed) is a fresh
`readapt train` process with 1 thread.

Usage: python benchmarks/encoder_context.py [--seeds 1,2,3] [--epochs 10] [--hidden-size 64] [--train-rows 2000] [--dev-rows 500]
                                            [--output runs/encoder_context.jsonl] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from readapt.comparison.runner import read_results  # JSONL records; a torn last line is ignored

KEYWORD = "apple"
VARIANTS = {"with encoder context": True, "without encoder context": False}


def embedded_tokenizer():
    """The embedded backbone's (BERT) tokenizer: the random T5's vocabulary and the task's words."""
    from transformers import AutoTokenizer

    from readapt.pretrained import embedded_backbone_dir

    return AutoTokenizer.from_pretrained(embedded_backbone_dir())


def build_backbone(path: Path, seed: int, tokenizer) -> None:
    """A seeded random T5 saved as a local folder with `tokenizer`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_task(folder: Path, train_rows: int, dev_rows: int, seed: int, tokenizer=None) -> tuple[Path, Path]:
    """Keyword-presence rows as JSONL (`sentence`, `label` = yes / no), balanced, seeded; words from `tokenizer`'s
    vocabulary (default: the embedded one)."""
    vocabulary = (tokenizer or embedded_tokenizer()).get_vocab()
    words = sorted(w for w in vocabulary if w.isalpha() and w.isascii() and len(w) >= 4 and w != KEYWORD)
    rng = random.Random(seed)
    words = rng.sample(words, 400)

    def row() -> dict:
        sentence = [rng.choice(words) for _ in range(rng.randint(8, 16))]
        positive = rng.random() < 0.5
        if positive:
            sentence.insert(rng.randint(0, len(sentence)), KEYWORD)
        return {"sentence": " ".join(sentence), "label": "yes" if positive else "no"}

    paths = []
    for name, count in (("train", train_rows), ("dev", dev_rows)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row()) + "\n" for _ in range(count)))
        paths.append(path)
    return paths[0], paths[1]


def run(variant: str, seed: int, args, model: Path, train: Path, dev: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="readapt-encctx-") as scratch:
        output = Path(scratch) / "run"
        command = [sys.executable, "-m", "readapt", "train", "--model", str(model), "--train-file", str(train),
                   "--validation-file", str(dev), "--text-columns", "sentence", "--label-column", "label",
                   "--selection-fraction", "0.2", "--seed", str(seed), "--epochs", str(args.epochs),
                   "--batch-size", "16", "--max-length", "32", "--lr", str(args.lr), "--output-dir", str(output),
                   "--overwrite", "--no-progress", "--no-checkpoints",
                   "--method-option", f"encoder_context={json.dumps(VARIANTS[variant])}",
                   "--method-option", f"hidden_size={args.hidden_size}"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        finished = subprocess.run(command, env=environment, capture_output=True, text=True)
        if finished.returncode != 0:
            tail = finished.stderr.strip().splitlines()
            return {"variant": variant, "seed": seed, "status": "failed", "error": tail[-1] if tail else "no output"}
        metrics = json.loads((output / "metrics.json").read_text())
    main = metrics["main_metric"]
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])
    return {
        "variant": variant, "seed": seed, "status": "ok", "encoder_context": VARIANTS[variant], "main_metric": main,
        "score": 100.0 * best["dev"]["validation"][main], "best_epoch": best["epoch"],
        "epoch_dev_scores": [100.0 * e["dev"]["validation"][main] for e in metrics["epochs"]],
        "epoch_train_loss": [e["train_loss"] for e in metrics["epochs"]],
        "trainable_parameters": metrics["trainable_parameters"], "train_cpu_seconds": metrics["train_cpu_seconds"],
        "peak_memory_bytes": metrics["peak_memory_bytes"], "peak_memory_meter": metrics["peak_memory_meter"],
        "train_examples": metrics["train_examples"], "dev_examples": metrics["dev_examples"],
        "epochs": args.epochs, "learning_rate": args.lr, "hidden_size": args.hidden_size, "backbone_seed": args.backbone_seed,
        "protocol": metrics["protocol"], "machine": metrics["machine"], "versions": metrics["versions"],
        "command": " ".join(["readapt"] + command[3:]).replace(str(model.parent), "$WORK"),
    }


def report(records: list[dict]) -> str:
    lines = ["| variant | dev accuracy (mean ± std) | per seed | best epochs | trainable parameters | train CPU s |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rows = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["seed"])
        if not rows:
            continue
        scores = [r["score"] for r in rows]
        spread = f" ± {statistics.stdev(scores):.1f}" if len(scores) > 1 else ""
        lines.append(f"| {variant} | {statistics.mean(scores):.1f}{spread} | "
                     f"{', '.join(f'{s:.1f}' for s in scores)} | {', '.join(str(r['best_epoch']) for r in rows)} | "
                     f"{rows[0]['trainable_parameters']:,} | "
                     f"{statistics.mean(r['train_cpu_seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--dev-rows", type=int, default=500)
    parser.add_argument("--hidden-size", type=int, default=64, help="READ's r (the backbone is 64 wide)")
    parser.add_argument("--backbone-seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="results JSONL (appended; finished runs are skipped)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    output = Path(args.output)
    done = {(r["variant"], r["seed"]) for r in read_results(output) if r.get("status") == "ok"} if output.exists() else set()
    todo = [(v, s) for v in VARIANTS for s in seeds if (v, s) not in done]
    with tempfile.TemporaryDirectory(prefix="readapt-encctx-work-") as work:
        work = Path(work)
        tokenizer = embedded_tokenizer()
        build_backbone(work / "t5-random", args.backbone_seed, tokenizer)
        train, dev = write_task(work, args.train_rows, args.dev_rows, args.backbone_seed, tokenizer)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for record in pool.map(lambda job: run(*job, args, work / "t5-random", train, dev), todo):
                output.parent.mkdir(parents=True, exist_ok=True)
                with output.open("a") as handle:  # one whole line per record: a torn last line is ignored
                    handle.write(json.dumps(record) + "\n")
                print(record["variant"], record["seed"], record.get("score", record.get("error")), flush=True)
    records = [r for r in read_results(output) if r.get("status") == "ok"]
    print(report(records))
    return records


if __name__ == "__main__":
    main()
