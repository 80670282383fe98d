"""Peak memory of (a) backbone inference, (b) one READ training step, (c) one full fine-tuning step, and (d)
READ's step and inference on the backbone quantized to int8/int4 (`--quantized`, readapt.quantization).

Each measurement runs in a fresh process. Protocol (T5-base-size random config by default: d_model 768,
12+12 layers, vocab 32128; batch 16, source length 128, target length 8; seed 0). The random model is saved
once to a temporary folder and every process loads it with readapt.pretrained.load_backbone (the quantized
ones through transformers' quantization integration). `--size smollm2`: SmolLM2-135M-Instruct (the installed
GGUF file, dequantized on loading) with a sequence-classification head (2 classes) reading the last token,
batch 16 x 128 tokens:

- The model and batch are built and one untimed forward warms the weights up; then the peak meter is
  reset and the measured work runs:
  (a) one forward under torch.inference_mode(); (b) and (c) two training steps (forward, backward, AdamW
  step), so the peak includes the optimizer state.
- Meter on CPU: the kernel's peak resident set size (VmHWM from /proc/self/status), reset with
  /proc/self/clear_refs just before the measured work, so model construction does not count. glibc runs
  with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the kernel at once and RSS follows
  live memory. The figure includes the weights (they are resident in all three cases).
  "above baseline" subtracts the RSS measured right before the measured work; "above process" subtracts the
  RSS of the process before the model was loaded (Python, torch, transformers and the quantization library
  imported): what the model, its activations and the optimizer take.
- Meter on GPU: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats.

Usage: python benchmarks/memory.py [--size t5-base|tiny|smollm2] [--batch-size 16] [--device cpu|cuda]
       [--read-hidden-size 256] [--read-options JSON] [--modes inference,read,full] [--quantized int8[,int4]]
       [--json FILE]

`--read-options`: more ReadConfig fields as JSON, e.g. '{"recompute": true, "compute_dtype": "bfloat16"}' (the
side network recomputed in chunks, the layer states captured and the side network computed in bfloat16).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

MODES = ("inference", "read", "full")
QUANTIZED_MODES = ("read", "inference")  # measured on a quantized backbone: "read-int8", "inference-int8", ...


def _status_kib(field: str) -> int:
    from readapt.measure import status_kib

    value = status_kib(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def _build(size: str):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    ids = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}  # as in t5-base
    if size == "t5-base":
        config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, **ids)
    else:
        config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **ids)
    return T5ForConditionalGeneration(config)


def _load(size: str, folder: str | None, dtype: str):
    from readapt.pretrained import load_backbone

    if size == "smollm2":
        return load_backbone("smollm2", 2, dtype=dtype, decoder_head="classifier").model
    return load_backbone(folder, 2, dtype=dtype).model


def child(mode: str, size: str, batch_size: int, source_length: int, target_length: int, device: str,
          read_hidden_size: int, folder: str | None, read_options: dict | None = None) -> dict:
    import torch

    from readapt import ReadConfig, get_read_model

    mode, _, dtype = mode.partition("-")
    dtype = dtype or "float32"
    if dtype != "float32":  # the quantization library is imported before the process baseline is read
        from readapt.quantization import choose_backend

        importlib.import_module(choose_backend(dtype, device))
    # Code that torch loads lazily on the first backward and optimizer step belongs to the process, not the model
    warm = torch.nn.Parameter(torch.zeros(1, device=device))
    (warm * 2).sum().backward()
    torch.optim.AdamW([warm]).step()
    process = _status_kib("VmRSS") * 1024 if device == "cpu" else 0
    model = _load(size, folder, dtype)
    if getattr(model, "hf_device_map", None) is None:  # bitsandbytes on CUDA: loaded onto the GPU already
        model = model.to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, vocab, (batch_size, source_length), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, source_length, dtype=torch.long).to(device),
        "labels": (torch.randint(0, 2, (batch_size,), generator=g) if size == "smollm2" else
                   torch.randint(2, vocab, (batch_size, target_length), generator=g)).to(device),
        # Scoring and training need no KV cache; T5 would otherwise keep the decoder's cross-attention
        # keys/values for all layers (151 MiB here) alive with the output, in every mode alike.
        "use_cache": False,
    }
    trainable = 0
    if mode == "read":
        model = get_read_model(model, ReadConfig(hidden_size=read_hidden_size, **(read_options or {})))
    if mode in ("read", "full"):
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
    else:
        model.eval()

    # Warm-up forward: one-time allocations (thread pools, lazily touched pages) happen outside the measurement.
    with torch.no_grad():
        model(**batch)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        baseline = _status_kib("VmRSS") * 1024

    start = time.perf_counter()
    if mode == "inference":
        with torch.inference_mode():
            model(**batch)
    else:
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        meter = "torch.cuda.max_memory_allocated"
    else:
        peak = _status_kib("VmHWM") * 1024
        meter = "peak RSS (VmHWM, reset via clear_refs; glibc MALLOC_MMAP_THRESHOLD_=65536)"
    return {
        "mode": mode, "backbone_dtype": dtype, "peak_bytes": peak, "baseline_bytes": baseline,
        "process_bytes": process, "seconds": time.perf_counter() - start, "trainable_params": trainable,
        "meter": meter,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("t5-base", "tiny", "smollm2"), default="t5-base")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--source-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--read-hidden-size", type=int, default=256)
    parser.add_argument("--read-options", default="{}", help="more ReadConfig fields, as JSON")
    parser.add_argument("--modes", default=",".join(MODES), help="float32 runs (inference always)")
    parser.add_argument("--quantized", default="int8",
                        help="comma-separated quantized backbone dtypes to measure READ and inference on ('' for none)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.size, args.batch_size, args.source_length, args.target_length, args.device, args.read_hidden_size)
    if args.child:
        print(json.dumps(child(args.child, *shape, args.folder, json.loads(args.read_options))))
        return {}

    quantized = [d for d in args.quantized.split(",") if d]
    base = [m for m in args.modes.split(",") if m]
    if "inference" not in base or any(m not in MODES for m in base):
        raise SystemExit(f"--modes: a comma-separated subset of {', '.join(MODES)} that includes inference")
    modes = [*base, *(f"{mode}-{dtype}" for dtype in quantized for mode in QUANTIZED_MODES)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.size != "smollm2":
            _build(args.size).save_pretrained(folder)
        for mode in modes:
            command = [sys.executable, __file__, "--child", mode, "--size", args.size, "--batch-size",
                       str(args.batch_size), "--source-length", str(args.source_length), "--target-length",
                       str(args.target_length), "--device", args.device, "--read-hidden-size",
                       str(args.read_hidden_size), "--read-options", args.read_options, "--folder", folder]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{done.stderr[-2000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    mib = 1024 * 1024
    print(f"# memory benchmark: {args.size} config, batch {args.batch_size}, source {args.source_length}, "
          f"target {args.target_length}, device {args.device}, READ hidden size {args.read_hidden_size}, seed 0")
    print(f"# machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; meter: {results['read']['meter']}")
    print(f"{'run':<16} {'peak MiB':>10} {'above baseline MiB':>20} {'above process MiB':>19} {'seconds':>9} "
          f"{'trainable':>12}")
    for mode, r in results.items():
        print(f"{mode:<16} {r['peak_bytes'] / mib:>10.1f} {(r['peak_bytes'] - r['baseline_bytes']) / mib:>20.1f} "
              f"{(r['peak_bytes'] - r['process_bytes']) / mib:>19.1f} {r['seconds']:>9.2f} {r['trainable_params']:>12,d}")
    summary = {}
    if "read" in results and "full" in results:
        summary["read/full"] = results["read"]["peak_bytes"] / results["full"]["peak_bytes"]
        print(f"READ/full = {summary['read/full']:.3f} (target <= 0.25)")
    if "read" in results:
        summary["read/inference"] = results["read"]["peak_bytes"] / results["inference"]["peak_bytes"]
        print(f"READ/inference = {summary['read/inference']:.3f} (target <= 1.05)")
    inference = results["inference"]
    for dtype in quantized:
        read = results[f"read-{dtype}"]
        summary[f"read-{dtype}/inference"] = read["peak_bytes"] / inference["peak_bytes"]
        if args.device == "cpu":
            summary[f"read-{dtype}/inference above process"] = (
                (read["peak_bytes"] - read["process_bytes"]) / (inference["peak_bytes"] - inference["process_bytes"]))
        print(f"READ on the {dtype} backbone / float32 inference = {summary[f'read-{dtype}/inference']:.3f}"
              + (f", above process {summary[f'read-{dtype}/inference above process']:.3f}" if args.device == "cpu"
                 else "") + " (target <= 0.55)")
    output = {"runs": results, "ratios": summary, "shape": dict(zip(
        ("size", "batch_size", "source_length", "target_length", "device", "read_hidden_size"), shape, strict=True)),
        "read_options": json.loads(args.read_options), "quantized": quantized}
    if args.json:
        from readapt.io import atomic_write_json

        atomic_write_json(args.json, output)
    return output


if __name__ == "__main__":
    main()
