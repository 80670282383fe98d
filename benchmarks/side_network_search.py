"""Side-network search for READ on frozen, cached per-layer states of the default backbone (issue 19).

The frozen all-MiniLM-L6-v2 (readapt's own loader and tokenisation) runs once per distinct input: every token's
per-layer hidden states are stored as float16 under --store (safetensors shards, keyed by the token ids), then
candidate side networks (side_network_candidates.py, and today's READ itself: readapt's ReadSideNetwork with the
"segments" context on [CLS], as its [CLS]-only cache path runs it) train on them at 1 torch thread.

Contract kept by every candidate: the correction is computed from the frozen states only, added to the final
hidden state (the last layer's output: BERT has no final norm), and read by the backbone's own head (its pretrained
pooler on [CLS], dropout, a new classifier; pooler and classifier train, as in ReadModel); zero-initialised
up-projection; no parameter count that grows with depth (except the marked "scalar-mix" ablation).

Protocol (readapt's): a seeded random subset of --train-samples training rows (readapt.recipe.load_task_data), a
seeded 20 % of it held out as the "selection" split, training on the other 80 %; after every epoch both are scored,
the epoch with the best selection score is picked and the GLUE dev score at that epoch reported (0-100, the task's
main metric). AdamW (weight decay 0.01), linear warm-up 6 % and decay, batch 16, gradient clipping 1.0, the epoch
order of readapt's EpochShuffle. CPU seconds: process time of the training steps (evaluation and the one-off state
extraction excluded; the extraction is reported per example). Peak memory: the process's peak RSS during the run
(VmHWM, reset at its start) and the RSS at its start (the stored states of the run's rows are loaded by then).

Records: one JSON line per (variant, task, train samples, seed, epochs) in --output; finished ones are skipped.

Usage:
  python benchmarks/side_network_search.py --variants read-r256,mix2-r128 --tasks sst2 --train-samples 4000 \
      --seeds 1 --output docs/results/side-network-search/runs.jsonl
  python benchmarks/side_network_search.py --report --output docs/results/side-network-search/runs.jsonl
  python benchmarks/side_network_search.py --smoke --output /tmp/smoke.jsonl      # a few rows, seconds
  python benchmarks/side_network_search.py --list
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # side_network_candidates, beside this script
from readapt import ReadConfig  # noqa: E402
from readapt.encoding import encode  # noqa: E402
from readapt.io import atomic_save_safetensors  # noqa: E402
from readapt.measure import PeakMemoryMeter, machine, versions  # noqa: E402
from readapt.pretrained import load_backbone  # noqa: E402
from readapt.read.side_network import ReadSideNetwork, pool_states, second_text_mask  # noqa: E402
from readapt.recipe import SELECTION_SPLIT, DataConfig, EpochShuffle, load_task_data, set_seed  # noqa: E402
from readapt.tasks import compute_metrics  # noqa: E402
from side_network_candidates import TokenMixerSideNetwork  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")


def _mixer(r: int, layers: int, **extra) -> dict:
    return {"kind": "mixer", "hidden_size": r, "mixer_layers": layers, **extra}


# name -> candidate. "read-*": readapt's own ReadSideNetwork (segments context, [CLS] only), the calibrated baseline.
VARIANTS: dict[str, dict] = {
    "read-r256": {"kind": "read", "hidden_size": 256},
    "read-r64": {"kind": "read", "hidden_size": 64},
    "gru-r256": _mixer(256, 0),  # this script's re-implementation of READ (per token, no mixing): == read-r256?
    "mix1-r128": _mixer(128, 1),
    "mix2-r64": _mixer(64, 2),
    "mix2-r128": _mixer(128, 2),
    "mix2-r256": _mixer(256, 2),
    "mix2-r128-noseg": _mixer(128, 2, segments=False),
    "mix2-r128-nodrop": _mixer(128, 2, dropout=0.0),
    "mix2-r128-lr5e-4": _mixer(128, 2, lr=5e-4),
    "mix2-r128-lr3e-4": _mixer(128, 2, lr=3e-4),
    "mix2-r128-layerattn": _mixer(128, 2, recurrence="layer-attention"),
    "mix2-r128-scalarmix": _mixer(128, 2, recurrence="scalar-mix"),  # N parameters: depth-dependent ablation
    "every1-r128": _mixer(128, 1, mixer_place="every"),
    "mix4-r128": _mixer(128, 4),
    "mix1-r64": _mixer(64, 1),
    "mix2-r64-lr5e-4": _mixer(64, 2, lr=5e-4),
    "mix2-r64-nodrop": _mixer(64, 2, dropout=0.0),
    "mix2-r64-layerattn": _mixer(64, 2, recurrence="layer-attention"),
    "every1-r64": _mixer(64, 1, mixer_place="every"),
}


# ---------------------------------------------------------------------------------------------- frozen states
def _key(input_ids: list[int]) -> str:
    return hashlib.sha1(torch.tensor(input_ids, dtype=torch.int32).numpy().tobytes()).hexdigest()


class StateStore:
    """Every token's per-layer states (N, d) of each distinct input, float16, in safetensors shards under `folder`:
    shard "states" (tokens, N, d), metadata "keys" (sha1 of the token ids) and "offsets"; appended, never changed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, tuple[Path, int, int]] = {}  # key -> (shard, first token, length)
        self._open: dict[Path, object] = {}
        from safetensors import safe_open

        self._safe_open = safe_open
        for shard in sorted(folder.glob("shard-*.safetensors")):
            with safe_open(shard, "pt") as f:
                meta = f.metadata()
            offsets = json.loads(meta["offsets"])
            for key, start, end in zip(json.loads(meta["keys"]), offsets, offsets[1:], strict=False):
                self.where[key] = (shard, start, end - start)

    def missing(self, features: list[dict]) -> list[dict]:
        seen, todo = set(self.where), []
        for f in features:
            key = _key(f["input_ids"])
            if key not in seen:
                seen.add(key)
                todo.append(f)
        return todo

    def extract(self, backbone, features: list[dict], pad_token_id: int, batch_size: int = 64) -> dict:
        """Run the frozen backbone (no autograd) on the inputs not stored yet; one new shard. CPU seconds spent."""
        todo = sorted(self.missing(features), key=lambda f: len(f["input_ids"]))
        if not todo:
            return {"examples": 0, "cpu_seconds": 0.0}
        start = time.process_time()
        blocks, keys, offsets = [], [], [0]
        with torch.inference_mode():
            for first in range(0, len(todo), batch_size):
                rows = todo[first: first + batch_size]
                width = max(len(f["input_ids"]) for f in rows)
                ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, f in enumerate(rows):
                    ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                    mask[i, : len(f["input_ids"])] = 1
                hidden = backbone.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                layers = torch.stack(hidden[1:], dim=2)  # (B, T, N, d): the layers' outputs, embeddings dropped
                for i, f in enumerate(rows):
                    blocks.append(layers[i, : len(f["input_ids"])].to(torch.float16))
                    keys.append(_key(f["input_ids"]))
                    offsets.append(offsets[-1] + len(f["input_ids"]))
        seconds = time.process_time() - start
        shard = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.safetensors"  # unique: runs may share a store
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(shard, {"states": torch.cat(blocks)},
                                {"keys": json.dumps(keys), "offsets": json.dumps(offsets)})
        for key, begin, end in zip(keys, offsets, offsets[1:], strict=False):
            self.where[key] = (shard, begin, end - begin)
        return {"examples": len(todo), "cpu_seconds": seconds}

    def get(self, input_ids: list[int]) -> torch.Tensor:
        shard, start, length = self.where[_key(input_ids)]
        if shard not in self._open:
            self._open[shard] = self._safe_open(shard, "pt").__enter__()
        return self._open[shard].get_slice("states")[start: start + length]  # (L, N, d) float16


# ---------------------------------------------------------------------------------------------- one run
class Head(nn.Module):
    """The backbone's sequence-classification head: its pretrained pooler on position 0, dropout, a new
    classifier (initialised as BERT initialises it); READ trains both."""

    def __init__(self, backbone, num_labels: int):
        super().__init__()
        config = backbone.config
        self.pooler = copy.deepcopy(backbone.base_model.pooler).requires_grad_(True)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, final: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(final)))


class Candidate(nn.Module):
    """Side network + head: logits from the frozen states of a batch."""

    def __init__(self, spec: dict, backbone, num_labels: int, separator: int):
        super().__init__()
        d, layers = backbone.config.hidden_size, backbone.config.num_hidden_layers
        self.kind = spec["kind"]
        if self.kind == "read":
            config = ReadConfig(hidden_size=spec["hidden_size"], sequence_context="segments", separator_token_id=separator)
            self.side = ReadSideNetwork(d, config, num_layers=layers)
        else:
            options = {k: v for k, v in spec.items() if k not in ("kind", "hidden_size", "lr", "epochs")}
            self.side = TokenMixerSideNetwork(d, spec["hidden_size"], num_layers=layers, **options)
        self.head = Head(backbone, num_labels)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        final = states[-1, :, :1].clone()  # the head reads position 0 of the final hidden state
        if self.kind == "read":  # as READ's [CLS]-only path runs it: [CLS]'s states and the texts' means
            means = pool_states(states, mask, False, second)
            delta = self.side(states[:, :, :1].clone(), token_mask=mask, pooled_states=means)
        else:
            delta = self.side(states, mask, second)[:, :1]
        return self.head(final + delta)


def _batch(rows: list[dict], separator: int):
    width = max(len(r["input_ids"]) for r in rows)
    n_layers, d = rows[0]["states"].shape[1:]
    states = torch.zeros(n_layers, len(rows), width, d)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        length = len(r["input_ids"])
        states[:, i, :length] = r["states"].float().transpose(0, 1)
        mask[i, :length] = 1
        ids[i, :length] = torch.tensor(r["input_ids"])
    return states, mask, second_text_mask(ids, separator) & mask.bool()


@torch.no_grad()
def _scores(model, task, rows, separator, batch_size: int = 64) -> dict[str, float]:
    model.eval()
    predictions = []
    for first in range(0, len(rows), batch_size):
        logits = model(*_batch(rows[first: first + batch_size], separator))
        predictions.extend((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).tolist())
    return compute_metrics(task, predictions, [r["value"] for r in rows])


def _features(task, examples, store, tokenizer, max_length):
    rows = encode(task, examples, tokenizer, max_length, text_to_text=False)
    for r in rows:
        r["states"] = store.get(r["input_ids"])
    return rows


def cache_bytes(rows: list[dict], kind: str) -> dict[str, float]:
    """Per example, float16 storage: every token's N layer states (what a per-token side network replays; also
    what readapt's cache keeps on disk for any READ), and READ's [CLS]-only replay (position 0's N states plus
    three float32 means per layer)."""
    n_layers, d = rows[0]["states"].shape[1:]
    all_tokens = statistics.mean(len(r["input_ids"]) * n_layers * d * 2 for r in rows)
    first_token = n_layers * d * 2 + n_layers * 3 * d * 4
    return {"all_tokens": all_tokens, "replayed": first_token if kind == "read" else all_tokens}


def run_one(name: str, task_name: str, samples: int, seed: int, args, loaded, store: StateStore) -> dict:
    spec = VARIANTS[name]
    data = DataConfig(task=task_name, data_dir=args.data_dir, max_train_samples=samples,
                      max_eval_samples=args.max_eval_samples, selection_fraction=args.selection_fraction)
    task, train_examples, dev_examples = load_task_data(data, seed)
    separator = loaded.tokenizer.sep_token_id
    meter = PeakMemoryMeter(torch.device("cpu"))
    train = _features(task, train_examples, store, loaded.tokenizer, args.max_length)
    dev = {split: _features(task, rows, store, loaded.tokenizer, args.max_length) for split, rows in dev_examples.items()}
    set_seed(seed)
    model = Candidate(spec, loaded.model, task.num_labels, separator)
    epochs, lr = spec.get("epochs", args.epochs), spec.get("lr", args.lr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(train) / args.batch_size)
    warmup = int(0.06 * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    loss_fn = nn.MSELoss() if task.is_regression else nn.CrossEntropyLoss()
    order = EpochShuffle(len(train), seed)
    meter.start()
    cpu, history, best = 0.0, [], None
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.process_time()
        order.shuffle_for(epoch)
        indices = list(order)
        for first in range(0, len(indices), args.batch_size):
            rows = [train[i] for i in indices[first: first + args.batch_size]]
            logits = model(*_batch(rows, separator))
            labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if task.is_regression else torch.long)
            loss = loss_fn(logits.squeeze(-1), labels) if task.is_regression else loss_fn(logits, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        cpu += time.process_time() - started
        results = {split: _scores(model, task, rows, separator) for split, rows in dev.items()}
        selection = 100.0 * results[SELECTION_SPLIT][task.main_metric]
        reported = [100.0 * v[task.main_metric] for s, v in results.items() if s != SELECTION_SPLIT]
        history.append({"epoch": epoch, "selection": selection, "dev": sum(reported) / len(reported)})
        if best is None or selection > best["selection"]:
            best = history[-1]
        if args.patience and epoch - best["epoch"] >= args.patience:
            break
    side = sum(p.numel() for p in model.side.parameters())
    return {
        "variant": name, "spec": spec, "task": task_name, "seed": seed, "status": "ok", "main_metric": task.main_metric,
        "train_samples": samples, "train_rows": len(train), "epochs": epochs, "epochs_run": len(history),
        "patience": args.patience, "learning_rate": lr,
        "score": best["dev"], "selection_score": best["selection"], "best_epoch": best["epoch"],
        "epoch_dev_scores": [h["dev"] for h in history], "epoch_selection_scores": [h["selection"] for h in history],
        "train_cpu_seconds": cpu, "peak_memory_mb": meter.peak_bytes() / 2**20,
        "memory_at_start_mb": meter.baseline_bytes / 2**20, "peak_memory_meter": meter.name,
        "trainable_parameters": sum(p.numel() for p in model.parameters()), "side_network_parameters": side,
        "cache_bytes_per_example": cache_bytes(train, spec["kind"]),
        "protocol": f"seeded {samples}-row subset of GLUE train, seeded {args.selection_fraction:g} held out as the "
                    "selection split that picks the epoch; GLUE dev reported at that epoch",
        "threads": torch.get_num_threads(), "machine": machine(), "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
    }


def activation_memory(name: str, task_name: str, samples: int, seed: int, args, loaded, store: StateStore,
                      batches: int = 20) -> dict:
    """What one training step holds for backward: the bytes of the tensors autograd saves (max over the first
    `batches` batches of epoch 1), and the parameters' training state (weights, gradients, AdamW's two moments:
    16 bytes per parameter). A per-variant meter that the process's RSS (dominated by the loaded states) is not."""
    spec = VARIANTS[name]
    data = DataConfig(task=task_name, data_dir=args.data_dir, max_train_samples=samples,
                      selection_fraction=args.selection_fraction)
    task, train_examples, _ = load_task_data(data, seed)
    train = _features(task, train_examples, store, loaded.tokenizer, args.max_length)
    set_seed(seed)
    model = Candidate(spec, loaded.model, task.num_labels, loaded.tokenizer.sep_token_id).train()
    order = EpochShuffle(len(train), seed)
    indices = list(order)
    peak = 0
    for first in range(0, min(len(indices), batches * args.batch_size), args.batch_size):
        saved = [0]

        def pack(tensor, saved=saved):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(*_batch([train[i] for i in indices[first: first + args.batch_size]],
                                   loaded.tokenizer.sep_token_id))
        logits.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
        peak = max(peak, saved[0])
    parameters = sum(p.numel() for p in model.parameters())
    return {"variant": name, "task": task_name, "train_samples": samples, "seed": seed, "batch_size": args.batch_size,
            "saved_activation_mb": peak / 2**20, "parameter_state_mb": 16 * parameters / 2**20,
            "meter": f"bytes of the tensors autograd saves for backward, max over the first {batches} batches of "
                     "epoch 1 (recompute off, as in this script); parameter state = 16 B per parameter"}


# ---------------------------------------------------------------------------------------------- records
def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from an interrupted run
            continue
    return records


def _done_key(r: dict) -> tuple:
    return r["variant"], r["task"], r["train_samples"], r["seed"], r["epochs"], r.get("patience")


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def full_reference(paths: list[Path]) -> dict[tuple[str, int], list[float]]:
    """Full fine-tuning dev scores by (task, trained rows), from `readapt bench` records (same protocol)."""
    scores: dict[tuple[str, int], list[float]] = {}
    for path in paths:
        for r in read_records(path):
            if r.get("status") == "ok" and r.get("method") == "full":
                scores.setdefault((r["task"], r["train_examples"]), []).append(r["score"])
    return scores


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(path: Path, full_paths: list[Path]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in read_records(path):
        if r.get("status") == "ok":
            groups.setdefault((r["task"], r["train_rows"], r["variant"]), []).append(r)
    full = full_reference(full_paths)
    activations = {(r["variant"], r["task"], r["train_samples"]): r["saved_activation_mb"]
                   for r in read_records(path.with_name("memory.jsonl"))}
    lines = ["| task | rows | variant | seeds | dev score | selection | READ − full | train CPU s | params | "
             "saved activations MiB/batch | cache B/example (replayed) |", "|---" * 11 + "|"]
    for (task, rows, variant), runs in sorted(groups.items()):
        dev = [r["score"] for r in runs]
        reference = full.get((task, rows))
        gap = f"{statistics.mean(dev) - statistics.mean(reference):+.1f} (full {_mean_std(reference)}, n={len(reference)})" \
            if reference else "– (no full run)"
        cache = runs[0]["cache_bytes_per_example"]
        lines.append(
            f"| {task} | {rows} | {variant} | {','.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))} | "
            f"{_mean_std(dev)} | {_mean_std([r['selection_score'] for r in runs])} | {gap} | "
            f"{statistics.mean(r['train_cpu_seconds'] for r in runs):.0f} | {runs[0]['trainable_parameters']:,} | "
            f"{_number(activations.get((variant, task, runs[0]['train_samples'])), '.1f')} | "
            f"{cache['replayed']:,.0f} |")
    return "\n".join(lines)


def plot_curve(path: Path, full_paths: list[Path], variants: list[str], out: Path, task: str = "sst2") -> None:
    """Dev score (mean ± std over seeds) against training rows: the variants and full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[float]]] = {}
    for r in read_records(path):
        if r.get("status") == "ok" and r["task"] == task and r["variant"] in variants:
            series.setdefault(r["variant"], {}).setdefault(r["train_rows"], []).append(r["score"])
    for (name, rows), scores in full_reference(full_paths).items():
        if name == task:
            series.setdefault("full fine-tuning", {})[rows] = scores
    figure, axes = plt.subplots(figsize=(5.5, 3.6))
    for label, points in series.items():
        rows = sorted(points)
        axes.errorbar(rows, [statistics.mean(points[n]) for n in rows], capsize=2, marker="o", label=label,
                      yerr=[statistics.stdev(points[n]) if len(points[n]) > 1 else 0 for n in rows])
    axes.set_xscale("log")
    axes.set_xlabel(f"{task} training rows (20 % more held out for selection)")
    axes.set_ylabel("GLUE dev accuracy at the selected epoch")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    partial = out.with_name(out.name + ".partial.png")
    figure.savefig(partial, dpi=120)
    partial.replace(out)


# ---------------------------------------------------------------------------------------------- main
def _default_glue() -> str:
    return os.environ.get("READAPT_GLUE_DIR") or str(REPO_ROOT.parent / "shared" / "data" / "glue")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="read-r256", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--train-samples", default="1000", help="comma-separated sizes of the training subset "
                        "(before the selection split)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--output", default=str(REPO_ROOT / "docs/results/side-network-search/runs.jsonl"))
    parser.add_argument("--store", default=str(REPO_ROOT / "runs/side-network-search/states"))
    parser.add_argument("--data-dir", default=_default_glue())
    parser.add_argument("--selection-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better "
                        "selection score (0: run every epoch)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a few rows, 2 epochs, two variants: seconds")
    parser.add_argument("--report", action="store_true", help="print the table of --output and stop")
    parser.add_argument("--full", nargs="*", default=[str(REPO_ROOT / "docs/results/read-recipe-cpu/full_runs.jsonl"),
                                                      str(REPO_ROOT / "docs/results/read-recipe-cpu/curve_full.jsonl"),
                                                      str(REPO_ROOT / "docs/results/side-network-search/full_runs_8000.jsonl")],
                        help="`readapt bench` full fine-tuning records for the READ − full column")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--plot", help="with --report: draw the SST-2 learning curve of --variants and full "
                        "fine-tuning to this .png")
    parser.add_argument("--memory", help="instead of training: measure each (variant, task, size) step's saved "
                        "activations on the first seed and append them to this JSONL")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name:<22} {json.dumps(spec)}")
        return []
    output = Path(args.output)
    if args.report:
        print(report(output, [Path(p) for p in args.full]))
        if args.plot:
            plot_curve(output, [Path(p) for p in args.full], [v.strip() for v in args.variants.split(",")], Path(args.plot))
        return []
    if args.smoke:
        args.variants, args.train_samples, args.seeds = "read-r64,mix1-r128", "40", "1"
        args.epochs, args.max_eval_samples = 2, 24
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    sizes = [int(s) for s in args.train_samples.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    loaded = load_backbone(None, 2)
    done = {_done_key(r) for r in read_records(output) if r.get("status") == "ok"}
    records = []
    for task_name in tasks:
        store = StateStore(Path(args.store) / task_name)
        for samples in sizes:
            for seed in seeds:  # the states of this subset (and the dev set) first: each input once
                data = DataConfig(task=task_name, data_dir=args.data_dir, max_train_samples=samples,
                                  max_eval_samples=args.max_eval_samples, selection_fraction=args.selection_fraction)
                task, train_examples, dev_examples = load_task_data(data, seed)
                examples = train_examples + [e for rows in dev_examples.values() for e in rows]
                built = store.extract(loaded.model, encode(task, examples, loaded.tokenizer, args.max_length, False),
                                      loaded.tokenizer.pad_token_id)
                if built["examples"]:
                    log = Path(args.store) / task_name / "extraction.jsonl"
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(json.dumps({**built, "threads": args.threads, "machine": machine()}) + "\n")
                    print(f"{task_name}: stored {built['examples']} inputs in {built['cpu_seconds']:.0f} CPU s", flush=True)
                if args.memory:
                    if seed == seeds[0]:
                        with open(args.memory, "a", encoding="utf-8") as f:
                            for name in variants:
                                f.write(json.dumps(activation_memory(name, task_name, samples, seed, args, loaded,
                                                                     store), sort_keys=True) + "\n")
                    continue
                for name in variants:
                    spec = VARIANTS[name]
                    key = (name, task_name, samples, seed, spec.get("epochs", args.epochs), args.patience)
                    if key in done:
                        continue
                    record = run_one(name, task_name, samples, seed, args, loaded, store)
                    output.parent.mkdir(parents=True, exist_ok=True)
                    with open(output, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record, sort_keys=True) + "\n")
                    records.append(record)
                    print(f"{name} {task_name} {samples} seed {seed}: dev {record['score']:.1f} (selection "
                          f"{record['selection_score']:.1f}, epoch {record['best_epoch']}), "
                          f"{record['train_cpu_seconds']:.0f} CPU s", flush=True)
    return records


if __name__ == "__main__":
    main()
