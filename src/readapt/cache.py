"""Feature cache: READ's frozen-backbone hidden states, computed once per example and replayed afterwards.

Why it is valid. In READ's default (decoupled) mode every adapted stack runs frozen, without dropout, on inputs
that no trainable weight touches: the token ids, and for a T5 decoder the fixed target (or candidate answer)
tokens cross-attending to the *uncorrected* encoder output. A stack's layer outputs are then a function of the
example alone. The first pass stores them; later passes replay them through `ReadModel.replaying`: the stack's
layers do not run, the side network gets the stored states, and everything after the stack (pooler,
classifier, LM head, loss) is the backbone's own code, as in a live pass.

Padding. Only real tokens are stored; padded positions replay as zeros instead of what the live backbone
computes there. Nothing on real tokens changes: the side network works per token (an RNN across layers), the
decoder's encoder context masks padded encoder positions, and the heads read real positions only (BERT's
[CLS], the last real token of decoder-only classification, LM logits where the labels are not -100).

Exactness. A float32 cache replays exactly the values its build pass computed. The live backbone itself is not
bit-reproducible across batch compositions (a token's state moves in the last bits with the padding and the
neighbours of its batch: up to 3e-6 absolute on all-MiniLM-L6-v2 on CPU), so over shuffled epochs the losses
match a live run to float32 rounding; on the same batches they match bit for bit. float16 / bfloat16 caches
round every stored value (relative error up to 2^-11 / 2^-8).

One entry = one split (the training set, or one dev split). Per stack call of one forward pass (classification:
the single stack; text-to-text training: the encoder over the input, the decoder over the target; text-to-text
scoring: the encoder, then the decoder once per candidate answer) and per example, an array (slots, length, d):
the N layer outputs, the stack's final output when it differs from the last layer's (T5 and Llama end with a
final norm; BERT's encoder does not), and the embedding output when READ's h0 needs it.

Layout: <cache dir>/<key>/
    manifest.json    format, key and the fingerprint it hashes, dtype, per stream: stack, slots, width, tokens,
                     file size and sha256 of three 1 MiB blocks; build time
    index.json       per stream: token offset and length of every example
    stream-<k>.bin   raw values (float16, bfloat16 as uint16 bits since numpy has no bfloat16, or float32),
                     read through numpy.memmap
Built in <key>.partial/ (fsynced, manifest last) and renamed into place, under a lock file: a killed writer
leaves only a .partial, which is never read and is deleted by the next build. An entry whose files disagree
with its manifest (a truncated file, a changed block) is rebuilt.

Key: sha256 over the backbone's weights and buffers (the task head excluded: it is trained, and its
initialisation depends on the seed) and config, the tokenizer, the token ids of every example in order (inputs,
targets, candidates), max length, text-to-text mode, autocast mode, cache dtype, the stacks and their shapes,
the torch and transformers versions and the format version. Which slots are stored is not part of it: an entry
that holds the embedding output also serves a run that does not need it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from readapt.config import CACHE_DTYPES
from readapt.errors import ConfigError
from readapt.io import fsync_directory

logger = logging.getLogger("readapt")

FORMAT_VERSION = 1
CACHE_DIR_ENV = "READAPT_CACHE_DIR"
CACHED_FEATURES = "read_cached_features"  # batch key of the cached states (popped before the model call)
CACHE_INDEX = "cache_index"  # key of an encoded example's position in its split
DISK_RESERVE_BYTES = 1 << 30  # what a cache build always leaves free on its disk
CHECK_BLOCK_BYTES = 1 << 20
GB = 10**9
MANIFEST, INDEX = "manifest.json", "index.json"

# numpy dtype the values are stored as, and the torch dtype those bits mean
_STORAGE = {
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float32": (np.float32, torch.float32),
}
# config fields that only concern the task head, or name the folder the model came from
_HEAD_ONLY_CONFIG = {"_name_or_path", "architectures", "id2label", "label2id", "problem_type",
                     "transformers_version", "finetuning_task", "classifier_dropout"}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "readapt" / "features")


# ---------------------------------------------------------------------------------------------- what is stored
@dataclass(frozen=True)
class StreamSpec:
    """One stack call of a forward pass, as an entry stores it: per example an array (slots, length, d)."""

    stack: str
    num_layers: int
    hidden_size: int
    final: bool  # the stack's output is stored apart from its last layer's (a final norm sits between)
    embeddings: bool  # the embedding output is stored (READ h0 = "embeddings")

    @property
    def slots(self) -> int:
        return self.num_layers + int(self.final) + int(self.embeddings)

    def identity(self) -> dict[str, Any]:
        """The part of the spec that enters the key (stored embeddings are optional extras)."""
        return {"stack": self.stack, "num_layers": self.num_layers, "hidden_size": self.hidden_size, "final": self.final}


@dataclass
class CachedCall:
    """One stack call's states for a batch, zero-padded: what `ReadModel.replaying` feeds the side network."""

    stack: str
    states: torch.Tensor  # (N, B, T, d)
    final: torch.Tensor  # (B, T, d): the stack's output
    embeddings: torch.Tensor | None  # (B, T, d)
    # READ's "pooled" context, (N, B, 1, d), or "segments" (N, B, 3, d: all tokens, first text, second text), when
    # `states` hold some positions only (ReadModel.correcting_positions)
    pooled: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> CachedCall:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return CachedCall(self.stack, move(self.states), move(self.final), move(self.embeddings), move(self.pooled))


class CachedBatch:
    """The cached calls of one batch, in call order. Has `.to(device)`, so Accelerate's data loader moves it
    to the device together with the rest of the batch."""

    def __init__(self, calls: Sequence[CachedCall]):
        self.calls = tuple(calls)

    def __iter__(self):
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def to(self, device, non_blocking: bool = False) -> CachedBatch:
        return CachedBatch([call.to(device, non_blocking) for call in self.calls])


def stream_spec(model, stack_name: str) -> StreamSpec:
    """How a ReadModel's stack is stored. The final output gets its own slot unless the stack holds no weights
    besides its layers and the input embedding (then its output is the last layer's; checked while building)."""
    stack = next((s for s in model.adapted_stacks if s.name == stack_name), None)
    if stack is None:
        raise ConfigError(f"the feature cache has no {stack_name!r} stack to store; READ adapts "
                          f"{', '.join(s.name for s in model.adapted_stacks)}")
    inside = {id(p) for p in stack.layers.parameters()}
    inside |= {id(p) for p in model.backbone.get_input_embeddings().parameters()}
    final = any(id(p) not in inside for p in stack.module.parameters())
    return StreamSpec(stack.name, stack.num_layers, stack.hidden_size, final, model.read_config.h0 == "embeddings")


# ---------------------------------------------------------------------------------------------- fingerprints
def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def backbone_fingerprint(backbone: torch.nn.Module, head_modules: Sequence[str] = ()) -> str:
    """sha256 of what the frozen stacks compute with: every weight and buffer outside the task head (names,
    dtypes, shapes, bytes), the model class, its config (head-only fields left out) and attention kernel."""
    def in_head(name: str) -> bool:
        return any(name == head or name.startswith(head + ".") for head in head_modules)

    digest = hashlib.sha256()
    for name, tensor in itertools.chain(backbone.named_parameters(), backbone.named_buffers()):
        if in_head(name):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        if tensor.device.type == "meta":  # offloaded by a device map (readapt.offload): read it where it waits
            from transformers.integrations.accelerate import load_offloaded_parameter

            tensor = load_offloaded_parameter(backbone, name)
        digest.update(_tensor_bytes(tensor))
    config = {k: v for k, v in backbone.config.to_dict().items() if k not in _HEAD_ONLY_CONFIG}
    description = {"class": type(backbone).__name__, "config": config,
                   "attention": getattr(backbone.config, "_attn_implementation", None)}
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer: its full definition (the fast backend's JSON, else its saved files) and the
    settings that shape encoded inputs (special tokens, padding and truncation sides)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    digest.update(path.name.encode() + b"\0" + path.read_bytes())
    settings = {
        "special": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "special_ids": list(tokenizer.all_special_ids),
        "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
        "vocabulary": len(tokenizer),
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def sequences_fingerprint(sequences: Sequence[tuple[str, Sequence[Sequence[int]]]]) -> str:
    """sha256 of the token ids of every example, per stack call, in order."""
    digest = hashlib.sha256()
    for stack, rows in sequences:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        digest.update(f"{stack}:{len(rows)}\n".encode())
        digest.update(lengths.tobytes())
        digest.update(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())).tobytes())
    return digest.hexdigest()


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- plans and entries
@dataclass
class CachePlan:
    """One split's entry: its key, what it stores and, once opened or built, the entry itself."""

    label: str  # e.g. "train", "dev validation"
    key: str
    path: Path
    streams: list[StreamSpec]
    lengths: list[np.ndarray]  # per stream: real tokens of every example
    fingerprint: dict[str, Any]
    dtype: str
    reusable: bool = False  # a valid entry was found when planning
    entry: CacheEntry | None = None
    reused: bool = False
    build_seconds: float = 0.0  # time to build the entry, or to check and open it when reused

    @property
    def num_examples(self) -> int:
        return len(self.lengths[0])

    @property
    def estimated_bytes(self) -> int:
        itemsize = np.dtype(_STORAGE[self.dtype][0]).itemsize
        data = sum(int(n.sum()) * s.slots * s.hidden_size * itemsize for s, n in zip(self.streams, self.lengths, strict=True))
        return data + 24 * self.num_examples * len(self.streams)  # index.json

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "bytes": self.entry.bytes if self.entry else None,
                "examples": self.num_examples, "reused": self.reused, "build_seconds": self.build_seconds,
                "streams": [s.stack for s in self.streams]}


class CacheEntry:
    """An entry on disk, opened for reading: per batch of example indices, zero-padded float32 states."""

    def __init__(self, path: Path, manifest: dict, index: dict, streams: list[StreamSpec], want_embeddings: bool):
        self.path = path
        self.manifest = manifest
        self.streams = streams
        self.want_embeddings = want_embeddings
        self.storage, self.meaning = _STORAGE[manifest["dtype"]]
        self.lengths = [np.asarray(s["lengths"], dtype=np.int64) for s in index["streams"]]
        self.offsets = [np.asarray(s["offsets"], dtype=np.int64) for s in index["streams"]]
        self.maps = [np.memmap(path / s["file"], dtype=self.storage, mode="r") for s in manifest["streams"]]
        self.bytes = sum(s["bytes"] for s in manifest["streams"]) + (path / INDEX).stat().st_size
        self._compact: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}  # _first_token_arrays

    def batch(self, indices: Sequence[int], first_token: bool = False, pooled: bool = False,
              second_text_starts: np.ndarray | None = None) -> CachedBatch:
        """`first_token`: the states of position 0 only (a head that reads [CLS]; the model corrects that
        position alone, ReadModel.correcting_positions), the final output zero elsewhere; `pooled`: with each
        layer's mean over the example's tokens (READ's "pooled" context), computed in float32, and with
        `second_text_starts` (every example's first position of its second text, its length if it has none;
        the "segments" context) the means over all tokens, the first text's and the second text's."""
        if first_token:
            return self._first_token_batch(indices, pooled, second_text_starts)
        calls = []
        for spec, lengths, offsets, values in zip(self.streams, self.lengths, self.offsets, self.maps, strict=True):
            slots, width = spec.slots, spec.hidden_size
            rows = lengths[list(indices)]
            padded = np.zeros((slots, len(indices), int(rows.max()), width), dtype=self.storage)
            for row, (index, length) in enumerate(zip(indices, rows, strict=True)):
                start = int(offsets[index]) * slots * width
                padded[:, row, :length] = values[start: start + slots * int(length) * width].reshape(slots, length, width)
            stored = torch.from_numpy(padded).view(self.meaning).float()
            layers = spec.num_layers
            final = stored[layers] if spec.final else stored[layers - 1].clone()  # the side network normalises states in place
            embeddings = stored[layers + int(spec.final)] if spec.embeddings and self.want_embeddings else None
            calls.append(CachedCall(spec.stack, stored[:layers], final, embeddings))
        return CachedBatch(calls)


    def _first_token_batch(self, indices: Sequence[int], pooled: bool, second_text_starts) -> CachedBatch:
        calls = []
        for k, spec in enumerate(self.streams):
            first, means = self._first_token_arrays(k, pooled, second_text_starts)
            rows = np.asarray(indices, dtype=np.int64)
            stored = torch.from_numpy(first[rows]).view(self.meaning).float().transpose(0, 1).unsqueeze(2)  # (slots, B, 1, d)
            layers = spec.num_layers
            final = torch.zeros(len(rows), int(self.lengths[k][rows].max()), spec.hidden_size)  # the head reads position 0 only
            final[:, :1] = stored[layers] if spec.final else stored[layers - 1]
            embeddings = stored[layers + int(spec.final)] if spec.embeddings and self.want_embeddings else None
            pooled_states = None if means is None else torch.from_numpy(means[rows]).transpose(0, 1)  # (N, B, 1|3, d)
            calls.append(CachedCall(spec.stack, stored[:layers], final, embeddings, pooled_states))
        return CachedBatch(calls)

    def _first_token_arrays(self, k: int, pooled: bool, second_text_starts=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Stream k's position-0 states of every example (E, slots, d) in the storage dtype and, with `pooled`,
        every layer's mean over the example's tokens (E, N, 1, d) in float32 (with `second_text_starts`: also
        the first and second texts' means, (E, N, 3, d), zero for no second text): gathered once per process, so
        that an epoch reads a few rows per example instead of walking the memory map example by example. RAM cost:
        E x d x (2 slots + 4 N) bytes for a float16 cache with "pooled" (all-MiniLM-L6-v2: about 14 KB per
        example; "segments": 32 KB)."""
        key = (k, pooled, second_text_starts is not None)
        if key not in self._compact:
            spec, lengths, offsets, values = self.streams[k], self.lengths[k], self.offsets[k], self.maps[k]
            slots, width, layers = spec.slots, spec.hidden_size, spec.num_layers
            if second_text_starts is not None and len(second_text_starts) != len(lengths):
                raise RuntimeError(f"{len(second_text_starts)} second-text positions for {len(lengths)} cached examples")
            first = np.empty((len(lengths), slots, width), dtype=self.storage)
            parts = 3 if second_text_starts is not None else 1
            means = np.zeros((len(lengths), layers, parts, width), dtype=np.float32) if pooled else None
            for index, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
                start = int(offset) * slots * width
                block = values[start: start + slots * int(length) * width].reshape(slots, int(length), width)
                first[index] = block[:, 0]
                if means is not None:
                    states = torch.from_numpy(np.array(block[:layers])).view(self.meaning).float()  # (N, L, d)
                    means[index, :, 0] = states.mean(1).numpy()
                    if parts == 3:
                        split = min(int(second_text_starts[index]), int(length))
                        means[index, :, 1] = states[:, :split].mean(1).numpy()
                        if split < length:
                            means[index, :, 2] = states[:, split:].mean(1).numpy()
            self._compact[key] = (first, means)
        return self._compact[key]


def indexed(features: list[dict]) -> list[dict]:
    """Encoded examples that remember their position in the split (the cache's index)."""
    return [{**f, CACHE_INDEX: i} for i, f in enumerate(features)]


class CachedCollator:
    """The usual collator (same padding), plus the cached states of the batch's examples under CACHED_FEATURES."""

    def __init__(self, collator: Callable[[list[dict]], dict], plan: CachePlan):
        self.collator = collator
        self.plan = plan
        # Set when the model corrects [CLS] alone (its head reads nothing else): replay that position only, and
        # with READ's "pooled" context every layer's mean over the tokens ("segments": and per text, split where
        # `second_text_starts` says, one position per example).
        self.first_token = False
        self.pooled = False
        self.second_text_starts: np.ndarray | None = None

    def __call__(self, features: list[dict]) -> dict:
        if self.plan.entry is None:
            raise RuntimeError(f"the {self.plan.label} feature cache is used before it was built")
        batch = self.collator(features)
        batch[CACHED_FEATURES] = self.plan.entry.batch([f[CACHE_INDEX] for f in features], self.first_token, self.pooled,
                                                       self.second_text_starts)
        return batch


# ---------------------------------------------------------------------------------------------- the cache
class FeatureCache:
    """The entries of one ReadModel (backbone, tokenizer, preprocessing) in a cache folder.

    Use: `plan()` every split, `check_budget()` over the plans (before anything is written), then
    `open_or_build()` each plan."""

    def __init__(self, model, tokenizer, *, max_length: int, text_to_text: bool, directory: str | Path | None = None,
                 dtype: str = "float16", max_gb: float | None = None, autocast: str = "no"):
        import transformers

        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"--cache-dtype={dtype!r}; allowed: {', '.join(CACHE_DTYPES)}")
        if max_gb is not None and not max_gb > 0:
            raise ConfigError(f"--cache-max-gb={max_gb} is out of range; it must be > 0")
        if model.read_config.couple_encoder:
            raise ConfigError("--cache-features needs decoupled READ: with --couple-encoder the backbone decoder "
                              "consumes the trained encoder correction, so its states change during training")
        self.model = model
        self.directory = Path(directory) if directory else default_cache_dir()
        self.dtype = dtype
        self.max_gb = max_gb
        started = time.perf_counter()
        self.settings = {
            "format": FORMAT_VERSION,
            "backbone": backbone_fingerprint(model.backbone, model.head_module_names),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length, "text_to_text": text_to_text, "autocast": autocast, "dtype": dtype,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        self.fingerprint_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ planning
    def plan(self, label: str, sequences: Sequence[tuple[str, Sequence[Sequence[int]]]]) -> CachePlan:
        """The entry for one split. `sequences`: per stack call of one forward pass, in call order, the stack's
        name and every example's token ids (their lengths are the real tokens stored)."""
        streams = [stream_spec(self.model, stack) for stack, _ in sequences]
        lengths = [np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows)) for _, rows in sequences]
        if len({len(n) for n in lengths}) != 1 or not len(lengths[0]) or min(int(n.min()) for n in lengths) < 1:
            raise ConfigError(f"{label}: every stack call needs a non-empty token sequence for every example")
        fingerprint = {**self.settings, "data": sequences_fingerprint(sequences),
                       "streams": [s.identity() for s in streams]}
        key = _sha256_hex(json.dumps(fingerprint, sort_keys=True).encode())[:40]
        plan = CachePlan(label, key, self.directory / key, streams, lengths, fingerprint, self.dtype)
        plan.reusable = self._problem(plan) is None
        return plan

    def check_budget(self, plans: Sequence[CachePlan]) -> None:
        """Refuse (one-line ConfigError, nothing written) when the entries to build exceed --cache-max-gb or
        the disk's free space less a 1 GiB reserve."""
        to_build = [p for p in plans if not p.reusable]
        needed = sum(p.estimated_bytes for p in to_build)
        if not needed:
            return
        parts = ", ".join(f"{p.label} {p.estimated_bytes / GB:.3f}" for p in to_build)
        advice = ("a smaller --cache-dtype, fewer examples (--max-train-samples, --max-eval-samples), a lower "
                  "--max-length, or run without --cache-features")
        if self.max_gb is not None and needed > self.max_gb * GB:
            raise ConfigError(f"the feature cache needs {needed / GB:.3f} GB ({parts}), more than --cache-max-gb "
                              f"{self.max_gb:g}; raise it, or use {advice}")
        folder = self.directory
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if needed > free - DISK_RESERVE_BYTES:
            raise ConfigError(f"the feature cache needs {needed / GB:.3f} GB ({parts}) but {folder} has "
                              f"{free / GB:.3f} GB free (1 GiB stays free); use another --cache-dir, or {advice}")

    # ------------------------------------------------------------------ opening and building
    def open_or_build(self, plan: CachePlan, run_forward: Callable[[dict], Any], features: list[dict],
                      collate: Callable[[list[dict]], dict], batch_size: int, device, *,
                      sort_by_length: bool = True, progress: bool = False) -> CacheEntry:
        """Open the plan's entry if a valid one exists, else build it: `run_forward(batch)` must make exactly
        the stack calls of the plan (same order) on a batch collated from `features` by `collate`. Builds go in
        batches of `batch_size` examples, longest first (less padding) unless `sort_by_length` is False."""
        started = time.perf_counter()
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / f"{plan.key}.lock"):
            problem = self._problem(plan)
            if problem is None:
                plan.entry, plan.reused = self._open(plan), True
                logger.info("feature cache %s: reusing %s", plan.label, plan.path)
            else:
                if plan.path.exists():
                    logger.warning("feature cache %s: rebuilding %s (%s)", plan.label, plan.path, problem)
                self._build(plan, run_forward, features, collate, batch_size, device, sort_by_length, progress)
                plan.entry, plan.reused = self._open(plan), False
        plan.build_seconds = time.perf_counter() - started
        return plan.entry

    def _open(self, plan: CachePlan) -> CacheEntry:
        manifest = json.loads((plan.path / MANIFEST).read_text(encoding="utf-8"))
        index = json.loads((plan.path / INDEX).read_text(encoding="utf-8"))
        streams = [StreamSpec(**{k: s[k] for k in ("stack", "num_layers", "hidden_size", "final", "embeddings")})
                   for s in manifest["streams"]]
        return CacheEntry(plan.path, manifest, index, streams, want_embeddings=any(s.embeddings for s in plan.streams))

    def _problem(self, plan: CachePlan) -> str | None:
        """Why the plan's entry on disk cannot be used (None: it can)."""
        try:
            manifest = json.loads((plan.path / MANIFEST).read_text(encoding="utf-8"))
            index_bytes = (plan.path / INDEX).read_bytes()
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError) as exc:
            return f"unreadable manifest or index: {exc}"
        if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != plan.key:
            return "written by another format or for another key"
        if manifest.get("index_sha256") != _sha256_hex(index_bytes):
            return "index.json does not match the manifest"
        stored = manifest.get("streams", [])
        if len(stored) != len(plan.streams):
            return "another number of streams"
        index = json.loads(index_bytes)
        itemsize = np.dtype(_STORAGE[manifest["dtype"]][0]).itemsize
        for k, (spec, saved, lengths) in enumerate(zip(plan.streams, stored, plan.lengths, strict=True)):
            if {key: saved.get(key) for key in spec.identity()} != spec.identity():
                return f"stream {k} stores another stack layout"
            if spec.embeddings and not saved.get("embeddings"):
                return f"stream {k} lacks the embedding output that READ h0='embeddings' needs"
            if not np.array_equal(np.asarray(index["streams"][k]["lengths"]), lengths):
                return f"stream {k} has other example lengths"
            path = plan.path / saved["file"]
            expected = int(lengths.sum()) * saved["slots"] * saved["hidden_size"] * itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != expected or saved["bytes"] != expected:
                return f"{path.name} holds {size} bytes, the manifest says {saved['bytes']} (truncated or damaged)"
            if _block_checksums(path, size) != saved["checksums"]:
                return f"{path.name} does not match its checksums (damaged)"
        return None

    def _build(self, plan, run_forward, features, collate, batch_size, device, sort_by_length, progress) -> None:
        partial = plan.path.with_name(plan.path.name + ".partial")
        for leftover in (partial, plan.path):  # a killed writer's .partial; an invalid or smaller entry
            if leftover.exists():
                shutil.rmtree(leftover)
        partial.mkdir()
        started = time.perf_counter()
        try:
            writer = _EntryWriter(partial, plan)
            order = list(range(plan.num_examples))
            if sort_by_length:
                order.sort(key=lambda i: -int(plan.lengths[0][i]))
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    for start in tqdm(range(0, len(order), batch_size), desc=f"caching {plan.label}",
                                      disable=not progress, leave=False):
                        chunk = order[start: start + batch_size]
                        batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk]).items()}
                        recorder = writer.recorder(chunk)
                        with self.model.recording(recorder):
                            run_forward(batch)
                        recorder.check_complete()
            finally:
                self.model.train(was_training)
            writer.finish(time.perf_counter() - started)
            fsync_directory(partial)
            partial.rename(plan.path)
            fsync_directory(self.directory)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("feature cache %s: built %s (%.1f MB, %.1f s)", plan.label, plan.path,
                    plan.estimated_bytes / 1e6, time.perf_counter() - started)


class _EntryWriter:
    """Fills one entry's stream files from the stack calls of the build's forward passes."""

    def __init__(self, folder: Path, plan: CachePlan):
        self.folder = folder
        self.plan = plan
        self.storage, self.meaning = _STORAGE[plan.dtype]
        self.offsets = [np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) for n in plan.lengths]
        self.files = [f"stream-{k}.bin" for k in range(len(plan.streams))]
        self.maps = [
            np.memmap(folder / name, dtype=self.storage, mode="w+", shape=(int(n.sum()) * s.slots * s.hidden_size,))
            for name, s, n in zip(self.files, plan.streams, plan.lengths, strict=True)
        ]
        self.written = [np.zeros(plan.num_examples, dtype=bool) for _ in plan.streams]

    def recorder(self, indices: list[int]) -> _BatchRecorder:
        return _BatchRecorder(self, indices)

    def write(self, k: int, indices: list[int], capture, final: torch.Tensor) -> None:
        spec = self.plan.streams[k]
        states = capture.states
        if states is None or states.shape[1] != len(indices):
            raise RuntimeError(f"feature cache: the {spec.stack} stack ran on {None if states is None else states.shape[1]} "
                               f"examples, the batch has {len(indices)}")
        lengths = self.plan.lengths[k][indices]
        if states.shape[2] < lengths.max():
            raise RuntimeError(f"feature cache: the {spec.stack} stack ran on {states.shape[2]} tokens, but an example "
                               f"of this batch has {lengths.max()}; the cache plan does not match the forward pass")
        slots = torch.empty((spec.slots, *states.shape[1:]), dtype=self.meaning, device=states.device)
        slots[: spec.num_layers].copy_(states)
        if spec.final:
            slots[spec.num_layers].copy_(final)
        elif not torch.equal(final.to(states.dtype), states[-1]):
            raise RuntimeError(f"feature cache: the {spec.stack} stack's output differs from its last layer's, but "
                               "the stack holds no weights besides its layers; this model needs the final slot")
        if spec.embeddings:
            if capture.embeddings is None:
                raise RuntimeError("feature cache: READ h0='embeddings' but no embedding output was captured")
            slots[spec.num_layers + int(spec.final)].copy_(capture.embeddings)
        if self.meaning == torch.float16 and not torch.isfinite(slots).all():
            raise ConfigError(f"the {spec.stack} stack's hidden states overflow float16 (|x| > 65504); "
                              "use --cache-dtype bfloat16 or float32")
        values = slots.cpu().view(torch.uint16 if self.meaning == torch.bfloat16 else self.meaning).numpy()
        width = spec.slots * spec.hidden_size
        for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            start = int(self.offsets[k][index]) * width
            self.maps[k][start: start + int(length) * width] = values[:, row, :length].reshape(-1)
            self.written[k][index] = True

    def finish(self, build_seconds: float) -> None:
        for k, written in enumerate(self.written):
            if not written.all():
                raise RuntimeError(f"feature cache: {int((~written).sum())} examples of stream {k} were never written")
        streams = []
        for name, spec, values, lengths in zip(self.files, self.plan.streams, self.maps, self.plan.lengths, strict=True):
            values.flush()
            path = self.folder / name
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            size = path.stat().st_size
            streams.append({"file": name, "stack": spec.stack, "num_layers": spec.num_layers,
                            "hidden_size": spec.hidden_size, "final": spec.final, "embeddings": spec.embeddings,
                            "slots": spec.slots, "tokens": int(lengths.sum()), "bytes": size,
                            "checksums": _block_checksums(path, size)})
        self.maps = []  # closes the memory maps
        index = {"streams": [{"lengths": n.tolist(), "offsets": o.tolist()}
                             for n, o in zip(self.plan.lengths, self.offsets, strict=True)]}
        index_bytes = json.dumps(index, separators=(",", ":")).encode()
        _write_synced(self.folder / INDEX, index_bytes)
        from readapt import __version__

        manifest = {
            "format": FORMAT_VERSION, "key": self.plan.key, "label": self.plan.label, "dtype": self.plan.dtype,
            "examples": self.plan.num_examples, "streams": streams, "index_sha256": _sha256_hex(index_bytes),
            "fingerprint": self.plan.fingerprint, "build_seconds": build_seconds, "readapt_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_synced(self.folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


@dataclass
class _BatchRecorder:
    """Receives one build batch's stack calls (ReadModel.recording) and writes them to their streams in order."""

    writer: _EntryWriter
    indices: list[int]
    calls: int = field(default=0)

    def __call__(self, stack_name: str, capture, final: torch.Tensor) -> None:
        streams = self.writer.plan.streams
        if self.calls >= len(streams) or streams[self.calls].stack != stack_name:
            expected = " then ".join(s.stack for s in streams)
            raise RuntimeError(f"feature cache: the forward pass ran the {stack_name} stack as call {self.calls + 1}; "
                               f"the cache plan expects {expected}")
        self.writer.write(self.calls, self.indices, capture, final)
        self.calls += 1

    def check_complete(self) -> None:
        if self.calls != len(self.writer.plan.streams):
            raise RuntimeError(f"feature cache: the forward pass made {self.calls} stack calls, the plan has "
                               f"{len(self.writer.plan.streams)}")


# ---------------------------------------------------------------------------------------------- file helpers
def _block_checksums(path: Path, size: int) -> dict[str, str]:
    """sha256 of the first, middle and last 1 MiB: catches a damaged file without reading all of it."""
    starts = sorted({0, max(0, size // 2 - CHECK_BLOCK_BYTES // 2), max(0, size - CHECK_BLOCK_BYTES)})
    sums = {}
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            sums[str(start)] = _sha256_hex(f.read(CHECK_BLOCK_BYTES))
    return sums


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file: a second run building the same entry waits, then finds it built."""
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("feature cache: waiting for another run that is building %s", path.with_suffix(""))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
