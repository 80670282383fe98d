"""Peak memory and step time of READ training with the frozen backbone fully loaded vs offloaded to disk.

READ runs the backbone forward only, so the backbone can be placed like an inference-only model
(readapt.offload: Accelerate's big-model loading). This measures what that buys on a CPU machine: the
backbone's weights wait on disk (read straight from the checkpoint's safetensors file, module by module, as
each module runs) and only a CPU-RAM budget of them stays resident.

Protocol (defaults: T5-large-size random config: d_model 1024, 24+24 layers, d_ff 4096, 16 heads, vocab
32128, ~738M parameters, float32; batch 4, source 128 tokens, target 8 tokens; READ hidden size 256; seed 0):

- The random model is built once (in its own process) and saved with save_pretrained (safetensors) under
  --model-dir; later runs reuse it.
- Each measurement runs in a fresh process: load the backbone with readapt.pretrained.load_backbone (no
  device map: fully loaded; or --device-map cpu with --max-memory cpu=BUDGET and an offload folder), attach
  READ, build AdamW, run one untimed no-grad forward (warm-up), reset the peak meter, then run --steps
  training steps (forward, backward, AdamW step), each timed.
- Meter: peak resident set size of the process during the training steps (VmHWM from /proc/self/status,
  reset through /proc/self/clear_refs right before the first step; it counts anonymous and file-backed
  mapped pages); glibc runs with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the kernel at once.
  Also reported: RSS right before the steps, and the process's lifetime peak RSS (ru_maxrss, includes
  loading).
- The checkpoint file sits in the OS page cache (it was just written or read): disk-offloaded weights are
  read from memory-speed page cache, not from the device. Page cache is not process memory and is not
  counted by the meter; a machine that must evict it pays disk reads of the offloaded bytes every step.
- Losses of all runs are printed: offloading must not change them.

Usage: python benchmarks/offload.py [--size t5-large|t5-base|tiny] [--dtype float32|bfloat16]
       [--budgets 1GiB,0] [--batch-size 4] [--source-length 128] [--target-length 8] [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "t5-large": {"d_model": 1024, "d_kv": 64, "d_ff": 4096, "num_layers": 24, "num_heads": 16, "vocab_size": 32128},
    "t5-base": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "vocab_size": 32128},
    "tiny": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 4, "num_heads": 4, "vocab_size": 512},
}


def _status_kib(field: str) -> int:
    from readapt.measure import status_kib

    value = status_kib(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def build(size: str, dtype: str, directory: Path) -> dict:
    """A random T5 of the given size, saved as a Hugging Face folder (with a BERT tokenizer for load_backbone)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from readapt.pretrained import embedded_backbone_dir

    torch.manual_seed(0)
    config = T5Config(**SIZES[size], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config).to(getattr(torch, dtype))
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(embedded_backbone_dir()).save_pretrained(directory)
    return {"parameters": parameters}


def child(mode: str, budget: str | None, model_dir: str, dtype: str, batch_size: int, source_length: int,
          target_length: int, steps: int, read_hidden_size: int, offload_dir: str) -> dict:
    import torch

    from readapt import ReadConfig, get_read_model
    from readapt.offload import describe_device_map, offloaded_parameters
    from readapt.pretrained import load_backbone

    started = time.perf_counter()
    placement = {} if mode == "loaded" else {"device_map": "cpu", "max_memory": {"cpu": budget},
                                             "offload_folder": offload_dir}
    backbone = load_backbone(model_dir, 2, dtype=dtype, **placement).model
    load_seconds = time.perf_counter() - started
    total_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    offloaded = set(offloaded_parameters(backbone))
    offloaded_bytes = sum(p.numel() * p.element_size() for n, p in backbone.named_parameters() if n in offloaded)

    torch.manual_seed(0)
    model = get_read_model(backbone, ReadConfig(hidden_size=read_hidden_size))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = backbone.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, vocab, (batch_size, source_length), generator=g),
        "attention_mask": torch.ones(batch_size, source_length, dtype=torch.long),
        "labels": torch.randint(2, vocab, (batch_size, target_length), generator=g),
        "use_cache": False,
    }
    model.train()
    with torch.no_grad():  # warm-up: one-time allocations happen outside the measurement
        model(**batch)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS") * 1024

    losses, seconds = [], []
    for _ in range(steps):
        step_started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - step_started)
        losses.append(loss.item())
    return {
        "mode": mode, "budget": budget, "peak_bytes": _status_kib("VmHWM") * 1024, "baseline_bytes": baseline,
        "lifetime_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": seconds, "losses": losses, "load_seconds": load_seconds,
        "backbone_bytes": total_bytes, "offloaded_bytes": offloaded_bytes,
        "device_map": describe_device_map(getattr(backbone, "hf_device_map", None)),
        "trainable_params": sum(p.numel() for p in params), "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="t5-large")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--budgets", default="1GiB,0",
                        help="CPU-RAM budgets (--max-memory cpu=...) of the offloaded runs, comma-separated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--source-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--read-hidden-size", type=int, default=256)
    parser.add_argument("--model-dir", help="where the random model is saved / reused "
                                            "(default: <tmp>/readapt-offload-bench/<size>-<dtype>)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir or Path(tempfile.gettempdir()) / "readapt-offload-bench" / f"{args.size}-{args.dtype}")
    if args.child == "build":
        print(json.dumps(build(args.size, args.dtype, model_dir)))
        return {}
    if args.child:
        print(json.dumps(child(args.child, args.budget, str(model_dir), args.dtype, args.batch_size,
                               args.source_length, args.target_length, args.steps, args.read_hidden_size,
                               args.offload_dir)))
        return {}

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")

    def run(*extra: str) -> dict:
        command = [sys.executable, __file__, "--size", args.size, "--dtype", args.dtype, "--model-dir", str(model_dir),
                   "--batch-size", str(args.batch_size), "--source-length", str(args.source_length),
                   "--target-length", str(args.target_length), "--steps", str(args.steps),
                   "--read-hidden-size", str(args.read_hidden_size), *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        built = run("--child", "build")
        print(f"# built and saved the random {args.size} model ({built['parameters']:,d} parameters, {args.dtype}) "
              f"to {model_dir} in {time.perf_counter() - started:.0f} s")
    results = [run("--child", "loaded")]
    with tempfile.TemporaryDirectory(prefix="readapt-offload-") as offload_dir:
        for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
            results.append(run("--child", "offloaded", "--budget", budget, "--offload-dir", offload_dir))

    mib = 2**20
    load = os.getloadavg()
    print(f"# READ training step, backbone fully loaded vs offloaded to disk: random {args.size} config, {args.dtype}, "
          f"batch {args.batch_size}, source {args.source_length} tokens, target {args.target_length} tokens, "
          f"READ hidden size {args.read_hidden_size}, {args.steps} timed steps after one warm-up forward, seed 0")
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, {results[0]['torch_threads']} torch threads, "
          f"load average at the end {load[0]:.2f}; meter: peak RSS during the steps (VmHWM after clear_refs)")
    print(f"# backbone weights: {results[0]['backbone_bytes'] / mib:,.0f} MiB; trainable (READ side networks): "
          f"{results[0]['trainable_params']:,d} parameters")
    print(f"{'run':<22} {'on disk MiB':>11} {'peak RSS MiB':>13} {'RSS before MiB':>15} {'lifetime peak MiB':>18} "
          f"{'load s':>7} {'s/step':>7}  losses")
    for r in results:
        name = "fully loaded" if r["mode"] == "loaded" else f"offloaded, cpu={r['budget']}"
        step = sum(r["step_seconds"]) / len(r["step_seconds"])
        print(f"{name:<22} {r['offloaded_bytes'] / mib:>11,.0f} {r['peak_bytes'] / mib:>13,.0f} "
              f"{r['baseline_bytes'] / mib:>15,.0f} {r['lifetime_peak_bytes'] / mib:>18,.0f} {r['load_seconds']:>7.1f} "
              f"{step:>7.2f}  {', '.join(f'{x:.6f}' for x in r['losses'])}")
    same = all(r["losses"] == results[0]["losses"] for r in results)
    print(f"# losses identical across runs: {same}; device maps: "
          + "; ".join(f"{r['budget'] or 'loaded'}: {r['device_map']}" for r in results))
    output = {"args": vars(args), "results": results, "loadavg": load}
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=2))
    return output


if __name__ == "__main__":
    main()
