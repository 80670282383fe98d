"""READ's training step against the frozen backbone's own no-grad forward: the ratio issue 22 sets goals for.

Cases (--cases, comma-separated):
  t5-base     a random T5-base-size config (d_model 768, 12 + 12 layers, d_ff 3072, vocab 32128; seed 0), batch 8,
              128 source / 8 target tokens, every token corrected (the encoder side network runs over every source
              token, the decoder one over every target token)
  minilm      the embedded all-MiniLM-L6-v2 with a 2-label head, batch 32 x 128, every token corrected (the default
              config has a token mixer, so the side network runs on every token)
  minilm-cls  the same with token_mixer_layers=0 and the side network on [CLS] alone (correcting_positions, what
              `readapt train` does when the head reads [CLS] only)

Protocol: random token ids (seed 1; the MiniLM rows are [CLS] ... [SEP], no padding), `use_cache=False`. The READ
step is forward + backward + AdamW (foreach) + zero_grad on a READ model at the default ReadConfig (or the
case's), the forward is the same backbone, loaded a second time without READ, under torch.no_grad(). One process,
torch.set_num_threads(1); after one untimed warm-up of each, --repeats rounds each time one forward and then one
step (interleaved, so a neighbour's load hits both alike); the seconds are medians over the rounds, and the ratio
is the median over the rounds of each step's time over the forward timed just before it (its range over the
rounds beside it: on a shared machine single rounds vary by about 5 %). Meter: process CPU seconds
(time.process_time: every thread of this process, with 1 torch thread essentially the one computing; unlike wall
time, not inflated by other processes on the cores, though a busy machine still slows it through shared caches).
With --variants the same case is also timed at other ReadConfig settings (e.g. recompute=true, the fixed chunked
recompute before ReadConfig.recompute became auto), each paired with its own forward timings.

Usage: python benchmarks/step_time.py [--cases t5-base,minilm,minilm-cls] [--repeats 5] [--variants recompute=true]
                                      [--tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

CASES = ("t5-base", "minilm", "minilm-cls")
METER = "process CPU seconds (time.process_time), 1 torch thread"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _t5(tiny: bool):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    ids = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    if tiny:
        config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **ids)
    else:
        config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, **ids)
    return T5ForConditionalGeneration(config).eval()


def _minilm():
    from transformers import AutoModelForSequenceClassification

    from readapt.pretrained import embedded_backbone_dir

    torch.manual_seed(0)  # the new head's initial weights
    return AutoModelForSequenceClassification.from_pretrained(embedded_backbone_dir(), num_labels=2).eval()


def _batch(case: str, vocab: int, batch_size: int, length: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if case == "t5-base":
        return {"input_ids": torch.randint(2, vocab, (batch_size, length), generator=g),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
                "labels": torch.randint(2, vocab, (batch_size, 8), generator=g), "use_cache": False}
    input_ids = torch.randint(1000, min(vocab, 20000), (batch_size, length), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": input_ids, "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


def _cpu_seconds(work) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _option(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    parsed = {"true": True, "false": False}.get(value.lower(), None if value == "None" else value)
    for number in (int, float):
        if isinstance(parsed, str):
            with contextlib.suppress(ValueError):
                parsed = number(parsed)
    return name, parsed


def measure_case(case: str, repeats: int, variants: list[dict], tiny: bool = False) -> dict:
    """{"forward": seconds, "<config label>": seconds, ...} and the ratios, for one case."""
    from readapt import ReadConfig, get_read_model

    load = (lambda: _t5(tiny)) if case == "t5-base" else _minilm
    batch_size, length = (2, 16) if tiny else (8, 128) if case == "t5-base" else (32, 128)
    forward_model = load()
    batch = _batch(case, forward_model.config.vocab_size, batch_size, length)

    def forward():
        with torch.no_grad():
            forward_model(**batch)

    steps = {}
    base = {"token_mixer_layers": 0} if case == "minilm-cls" else {}
    for options in [{}, *variants]:
        model = get_read_model(load(), ReadConfig(**base, **options)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
        def step(model=model, optimizer=optimizer):
            positions = model.correcting_positions(slice(0, 1)) if case == "minilm-cls" else contextlib.nullcontext()
            with positions:
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        label = "READ step, " + (", ".join(f"{k}={v}" for k, v in options.items()) or "default config")
        steps[label] = (model, step)

    times: dict[str, list[float]] = {"forward": [], **{label: [] for label in steps}}
    pair_ratios: dict[str, list[float]] = {label: [] for label in steps}
    forward()  # warm-up
    for _, step in steps.values():
        step()
    for _ in range(repeats):
        for label, (_, step) in steps.items():
            times["forward"].append(_cpu_seconds(forward))
            times[label].append(_cpu_seconds(step))
            pair_ratios[label].append(times[label][-1] / times["forward"][-1])
    medians = {label: statistics.median(values) for label, values in times.items()}
    first = next(iter(steps.values()))[0]
    resolved = first.read_config
    return {
        "case": case, "batch": [batch_size, length], "repeats": repeats,
        "config": {"hidden_size": resolved.hidden_size, "token_mixer_layers": resolved.token_mixer_layers,
                   "sequence_context": resolved.sequence_context, "stacks": [s.name for s in first.adapted_stacks]},
        "recompute": first.recompute_summary(),
        "seconds": medians, "min_seconds": {label: min(values) for label, values in times.items()},
        "all_seconds": times,
        # each round's step over the forward timed just before it, the median over the rounds
        "ratios": {label: statistics.median(values) for label, values in pair_ratios.items()},
        "ratio_spread": {label: [min(values), max(values)] for label, values in pair_ratios.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", action="append", default=[],
                        help="another ReadConfig to time, as comma-separated name=value (repeatable), e.g. "
                             "recompute=true")
    parser.add_argument("--tiny", action="store_true", help="a tiny T5 and batches of 2 x 16 (the smoke test)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the new classifier's load report, once per load
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    variants = [dict(_option(item) for item in text.split(",")) for text in args.variants]
    results = {"meter": METER, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "commit": _commit(), "date": datetime.date.today().isoformat(), "cases": {}}
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        results["cases"][case] = record = measure_case(case, args.repeats, variants, args.tiny)
        print(f"# {case}: batch {record['batch'][0]} x {record['batch'][1]}, medians of {args.repeats} rounds, "
              f"{METER}; READ {record['config']}")
        print(f"  {'backbone no-grad forward':<48} {record['seconds']['forward']:7.3f} s")
        for label, ratio in record["ratios"].items():
            low, high = record["ratio_spread"][label]
            print(f"  {label:<48} {record['seconds'][label]:7.3f} s   ratio {ratio:5.2f} (rounds {low:.2f}-{high:.2f})")
        for stack, summary in record["recompute"].items():
            print(f"  recompute ({stack}, default config): {summary['first']['decision']}")
    print(f"# {results['machine']}, torch {results['torch']}, readapt {results['commit']}, {results['date']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
