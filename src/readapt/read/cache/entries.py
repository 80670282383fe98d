"""What a feature cache entry holds and how it is read back: the streams, the planned entry, replayed batches."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from readapt.errors import ConfigError

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
STORAGE = {
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
    "float32": (np.float32, torch.float32),
}
# config fields that only concern the task head, or name the folder the model came from


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
    build_cpu_seconds: float = 0.0  # the same in process CPU time (all threads; not inflated by other load)

    @property
    def num_examples(self) -> int:
        return len(self.lengths[0])

    @property
    def estimated_bytes(self) -> int:
        itemsize = np.dtype(STORAGE[self.dtype][0]).itemsize
        data = sum(int(n.sum()) * s.slots * s.hidden_size * itemsize for s, n in zip(self.streams, self.lengths, strict=True))
        return data + 24 * self.num_examples * len(self.streams)  # index.json

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "bytes": self.entry.bytes if self.entry else None,
                "examples": self.num_examples, "reused": self.reused, "build_seconds": self.build_seconds,
                "build_cpu_seconds": self.build_cpu_seconds,
                "streams": [s.stack for s in self.streams]}


class StreamFile:
    """One stream file's values, read by position (os.preadv) instead of through a memory map: the pages an epoch
    reads stay in the kernel's page cache and never join the process's resident set, so the process's peak RSS
    is training's own memory, not the cache's size (a memory map counts every page it touched). The descriptor
    is opened per process (a forked DataLoader worker opens its own) and is not pickled."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._fd: int | None = None
        self._pid: int | None = None

    def read(self, start: int, count: int) -> np.ndarray:
        """`count` values from value `start` on."""
        out = np.empty(count, dtype=self.dtype)
        view, offset, done = memoryview(out).cast("B"), start * self.dtype.itemsize, 0
        while done < len(view):
            got = os.preadv(self._descriptor(), [view[done:]], offset + done)
            if got <= 0:
                raise RuntimeError(f"feature cache: {self.path} ends at byte {offset + done}, "
                                   f"{len(view) - done} bytes short; delete the entry to rebuild it")
            done += got
        return out

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "dtype": self.dtype, "_fd": None, "_pid": None}

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


class CacheEntry:
    """An entry on disk, opened for reading: per batch of example indices, zero-padded float32 states."""

    def __init__(self, path: Path, manifest: dict, index: dict, streams: list[StreamSpec], want_embeddings: bool):
        self.path = path
        self.manifest = manifest
        self.streams = streams
        self.want_embeddings = want_embeddings
        self.storage, self.meaning = STORAGE[manifest["dtype"]]
        self.lengths = [np.asarray(s["lengths"], dtype=np.int64) for s in index["streams"]]
        self.offsets = [np.asarray(s["offsets"], dtype=np.int64) for s in index["streams"]]
        self.files = [StreamFile(path / s["file"], self.storage) for s in manifest["streams"]]
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
        for spec, lengths, offsets, values in zip(self.streams, self.lengths, self.offsets, self.files, strict=True):
            slots, width = spec.slots, spec.hidden_size
            rows = lengths[list(indices)]
            padded = np.zeros((slots, len(indices), int(rows.max()), width), dtype=self.storage)
            for row, (index, length) in enumerate(zip(indices, rows, strict=True)):
                start = int(offsets[index]) * slots * width
                padded[:, row, :length] = values.read(start, slots * int(length) * width).reshape(slots, length, width)
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
        that an epoch reads a few rows per example instead of reading the stream file example by example. RAM cost:
        E x d x (2 slots + 4 N) bytes for a float16 cache with "pooled" (all-MiniLM-L6-v2: about 14 KB per
        example; "segments": 32 KB)."""
        key = (k, pooled, second_text_starts is not None)
        if key not in self._compact:
            spec, lengths, offsets, values = self.streams[k], self.lengths[k], self.offsets[k], self.files[k]
            slots, width, layers = spec.slots, spec.hidden_size, spec.num_layers
            if second_text_starts is not None and len(second_text_starts) != len(lengths):
                raise RuntimeError(f"{len(second_text_starts)} second-text positions for {len(lengths)} cached examples")
            first = np.empty((len(lengths), slots, width), dtype=self.storage)
            parts = 3 if second_text_starts is not None else 1
            means = np.zeros((len(lengths), layers, parts, width), dtype=np.float32) if pooled else None
            for index, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
                start = int(offset) * slots * width
                block = values.read(start, slots * int(length) * width).reshape(slots, int(length), width)
                first[index] = block[:, 0]
                if means is not None:
                    states = torch.from_numpy(block[:layers]).view(self.meaning).float()  # (N, L, d)
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
