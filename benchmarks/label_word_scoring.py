"""Label-word scoring on a decoder-only LM: prompts run once and candidates continue their KV cache, against
scoring every candidate as a whole sequence (prompt + answer). Prints wall and CPU seconds and the metrics of
both (they must agree). Default: SmolLM2-135M (offline GGUF), READ r=64 with random up-projections (so the
correction is not zero), SST-2 (2 candidates) and STS-B (26 candidates) dev rows.

    python benchmarks/label_word_scoring.py --data-dir ../shared/data/glue [--model smollm2] [--rows 64,32]
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

import readapt.answers as answers
from readapt import ReadConfig, get_read_model
from readapt.pretrained import load_backbone
from readapt.recipe import DataConfig, DevEvaluator, load_task_data


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE folder")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="sst2,stsb")
    parser.add_argument("--rows", default="64,32", help="dev rows per task (comma-separated, in --tasks order)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    results = []
    for task_name, rows in zip(args.tasks.split(","), map(int, args.rows.split(",")), strict=True):
        data = DataConfig(task=task_name, data_dir=args.data_dir, max_eval_samples=rows)
        data.validate()
        task, _, dev = load_task_data(data, seed=0)
        loaded = load_backbone(args.model, task.num_labels, task.is_regression)
        torch.manual_seed(0)
        model = get_read_model(loaded.model, ReadConfig(hidden_size=64))
        for parameter in model.read.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        evaluate = DevEvaluator.build(task, dev, loaded, 96, args.batch_size, Accelerator(cpu=True))
        uses_cache = answers._can_continue_a_kv_cache
        for label, predicate in (("prompt cache", uses_cache), ("whole sequences", lambda model: False)):
            answers._can_continue_a_kv_cache = predicate
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                metrics = evaluate(model, progress=False)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                answers._can_continue_a_kv_cache = uses_cache
            results.append({"task": task_name, "rows": rows, "scoring": label, "wall_s": wall, "cpu_s": cpu,
                            "metrics": metrics})
            print(f"{task_name} {rows} dev rows, {label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {metrics}", flush=True)
    return results


if __name__ == "__main__":
    main()
