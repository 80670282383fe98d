"""READ's inference against the frozen backbone's own: the latency goal of issue 22 (the paper: comparable to the
backbone's).

Cases (--cases, comma-separated):
  minilm      the embedded all-MiniLM-L6-v2 with a 2-label head at the default ReadConfig (a 2-layer token mixer,
              so every token is corrected), batch 1 and 32 x 128 tokens
  minilm-cls  the same with token_mixer_layers=0 and the side network on [CLS] alone (correcting_positions, what
              `readapt predict` does when the head reads [CLS] only)
  t5-base     a random T5-base-size config (benchmarks/step_time.py's), greedy generation from 128 source tokens
              at batch 1 and 8; the figure is per new token with the KV cache: (time of 33 new tokens - time of
              1) / 32, so the encoder pass and the first step fall out

Protocol: random token ids (seed 1, benchmarks/step_time.py's batches, no padding), READ untrained but with a
non-zero correction (every side-network weight drawn from N(0, 0.02) with seed 2: timing does not depend on the
values, only on the correction not being skipped). One process, torch.set_num_threads(1), torch.no_grad(),
eval mode. After one untimed warm-up of each, --repeats rounds each time the backbone alone and then READ
(interleaved, so a neighbour's load hits both alike); the ratio is the median over the rounds of READ's time over
the backbone's timed just before it (its range beside it). Meter: process CPU seconds (time.process_time).

Usage: python benchmarks/inference_time.py [--cases minilm,minilm-cls,t5-base] [--repeats 7] [--tiny]
                                           [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import _batch, _commit, _cpu_seconds, _minilm, _t5  # noqa: E402  (the same backbones and batches)

CASES = ("minilm", "minilm-cls", "t5-base")
METER = "process CPU seconds (time.process_time), 1 torch thread"
NEW_TOKENS = 32


def _read_model(backbone, options: dict):
    from readapt import ReadConfig, get_read_model

    model = get_read_model(backbone, ReadConfig(**options)).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # the side networks (and the head, timed alike on both sides)
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def _timers(case: str, tiny: bool, batch_size: int) -> tuple[callable, callable, object]:
    """(backbone work, READ work, the READ model) for one batch size."""
    if case == "t5-base":
        backbone, read = _t5(tiny), _read_model(_t5(tiny), {})
        batch = _batch(case, backbone.config.vocab_size, batch_size, 16 if tiny else 128)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

        def generation(model):
            def tokens(n: int):
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
            # per new token: the difference cancels the encoder pass and the first decoder step
            return lambda: tokens(NEW_TOKENS + 1), lambda: tokens(1)
        return generation(backbone), generation(read), read
    backbone = _minilm()
    read = _read_model(_minilm(), {"token_mixer_layers": 0} if case == "minilm-cls" else {})
    batch = _batch(case, backbone.config.vocab_size, batch_size, 16 if tiny else 128)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run_read():
        positions = read.correcting_positions(slice(0, 1)) if case == "minilm-cls" else contextlib.nullcontext()
        with positions:
            read(**inputs)
    return (lambda: backbone(**inputs), None), (run_read, None), read


def _seconds(work) -> float:
    long, short = work
    return _cpu_seconds(long) if short is None else (_cpu_seconds(long) - _cpu_seconds(short)) / NEW_TOKENS


def measure_case(case: str, repeats: int, tiny: bool = False) -> dict:
    """Per batch size: the backbone's and READ's median seconds (per new token for t5-base) and their ratio."""
    record = {"case": case, "repeats": repeats, "batches": {}}
    for batch_size in (1, 8) if case == "t5-base" else (1, 32):
        backbone, read, model = _timers(case, tiny, batch_size)
        times: dict[str, list[float]] = {"backbone": [], "read": []}
        ratios = []
        with torch.no_grad():
            _seconds(backbone), _seconds(read)  # warm-up
            for _ in range(repeats):
                times["backbone"].append(_seconds(backbone))
                times["read"].append(_seconds(read))
                ratios.append(times["read"][-1] / times["backbone"][-1])
        config = model.read_config
        record["config"] = {"hidden_size": config.hidden_size, "token_mixer_layers": config.token_mixer_layers,
                            "stacks": [s.name for s in model.adapted_stacks]}
        record["batches"][batch_size] = {
            "seconds": {k: statistics.median(v) for k, v in times.items()}, "all_seconds": times,
            "ratio": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)]}
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tiny", action="store_true", help="a tiny T5 and 16-token inputs (the smoke test)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    results = {"meter": METER, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "commit": _commit(), "date": datetime.date.today().isoformat(), "cases": {}}
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        results["cases"][case] = record = measure_case(case, args.repeats, args.tiny)
        unit = "s per new token (KV cache)" if case == "t5-base" else "s per batch"
        print(f"# {case}: medians of {args.repeats} rounds, {METER}; READ {record['config']}")
        for batch_size, figures in record["batches"].items():
            low, high = figures["ratio_spread"]
            print(f"  batch {batch_size:>2}: backbone {figures['seconds']['backbone']:.4f}, READ "
                  f"{figures['seconds']['read']:.4f} {unit}   READ / backbone {figures['ratio']:.2f} "
                  f"(rounds {low:.2f}-{high:.2f})")
    print(f"# {results['machine']}, torch {results['torch']}, readapt {results['commit']}, {results['date']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
