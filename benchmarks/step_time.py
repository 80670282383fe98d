"""Time of one READ training step (forward + backward) against one no-grad forward of the backbone.

Protocol: the embedded all-MiniLM-L6-v2 with a 2-label classification head, random token ids, batch 32 x 128
tokens (no padding), seed 0; each figure is the mean of 3 timed repetitions after one warm-up, wall clock
(time.perf_counter), in this process, on whatever machine runs it (say which, and whether it was idle).

Usage: python benchmarks/step_time.py [--batch-size 32] [--length 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def _mean_seconds(step, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import AutoModelForSequenceClassification

    from readapt import ReadConfig, get_read_model
    from readapt.pretrained import embedded_backbone_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.length)),
        "attention_mask": torch.ones(args.batch_size, args.length, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch_size,)),
    }

    def load():
        return AutoModelForSequenceClassification.from_pretrained(embedded_backbone_dir(), num_labels=2)

    backbone = load().eval()
    with torch.no_grad():
        results = {"backbone no-grad forward": _mean_seconds(lambda: backbone(**batch), args.repeats)}
    for label, config in [("READ step, default config", ReadConfig()),
                          ("READ step, recompute=False", ReadConfig(recompute=False)),
                          ("READ step, hidden_size=128", ReadConfig(hidden_size=128))]:
        model = get_read_model(load(), config).train()
        results[label] = _mean_seconds(lambda m=model: m(**batch).loss.backward(), args.repeats)

    print(f"# all-MiniLM-L6-v2, batch {args.batch_size} x {args.length} tokens, mean of {args.repeats}, "
          f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    for label, seconds in results.items():
        print(f"{label:<30} {seconds:8.3f} s")
    return results


if __name__ == "__main__":
    main()
