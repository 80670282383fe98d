"""Building, checking and opening feature cache entries on disk (atomic, locked, checksummed)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from readapt.errors import ConfigError
from readapt.io import fsync_directory
from readapt.read.cache.entries import (
    CHECK_BLOCK_BYTES,
    DISK_RESERVE_BYTES,
    FORMAT_VERSION,
    GB,
    INDEX,
    MANIFEST,
    STORAGE,
    CacheEntry,
    CachePlan,
    StreamSpec,
    default_cache_dir,
    stream_spec,
)
from readapt.read.cache.fingerprint import (
    backbone_fingerprint,
    sequences_fingerprint,
    sha256_hex,
    tokenizer_fingerprint,
)
from readapt.settings import CACHE_DTYPES
from readapt.version import __version__

logger = logging.getLogger("readapt")


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
        key = sha256_hex(json.dumps(fingerprint, sort_keys=True).encode())[:40]
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
        started, started_cpu = time.perf_counter(), time.process_time()
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
        plan.build_cpu_seconds = time.process_time() - started_cpu
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
        if manifest.get("index_sha256") != sha256_hex(index_bytes):
            return "index.json does not match the manifest"
        stored = manifest.get("streams", [])
        if len(stored) != len(plan.streams):
            return "another number of streams"
        index = json.loads(index_bytes)
        itemsize = np.dtype(STORAGE[manifest["dtype"]][0]).itemsize
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
        writer = None
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
            if writer is not None:
                writer.close()
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("feature cache %s: built %s (%.1f MB, %.1f s)", plan.label, plan.path,
                    plan.estimated_bytes / 1e6, time.perf_counter() - started)


class _EntryWriter:
    """Fills one entry's stream files from the stack calls of the build's forward passes."""

    def __init__(self, folder: Path, plan: CachePlan):
        self.folder = folder
        self.plan = plan
        self.storage, self.meaning = STORAGE[plan.dtype]
        self.offsets = [np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64) for n in plan.lengths]
        self.files = [f"stream-{k}.bin" for k in range(len(plan.streams))]
        self.itemsize = np.dtype(self.storage).itemsize
        # Written by position (os.pwrite), not through a writable memory map, whose dirty pages would count in the
        # building process's resident set up to the entry's whole size.
        self.descriptors = []
        for name, s, n in zip(self.files, plan.streams, plan.lengths, strict=True):
            fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.descriptors.append(fd)
            os.ftruncate(fd, int(n.sum()) * s.slots * s.hidden_size * self.itemsize)
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
            data = memoryview(np.ascontiguousarray(values[:, row, :length])).cast("B")
            offset, done = int(self.offsets[k][index]) * width * self.itemsize, 0
            while done < len(data):
                done += os.pwrite(self.descriptors[k], data[done:], offset + done)
            self.written[k][index] = True

    def close(self) -> None:
        for fd in self.descriptors:
            os.close(fd)
        self.descriptors = []

    def finish(self, build_seconds: float) -> None:
        for k, written in enumerate(self.written):
            if not written.all():
                raise RuntimeError(f"feature cache: {int((~written).sum())} examples of stream {k} were never written")
        streams = []
        for name, spec, fd, lengths in zip(self.files, self.plan.streams, self.descriptors, self.plan.lengths,
                                           strict=True):
            os.fsync(fd)
            path = self.folder / name
            size = path.stat().st_size
            streams.append({"file": name, "stack": spec.stack, "num_layers": spec.num_layers,
                            "hidden_size": spec.hidden_size, "final": spec.final, "embeddings": spec.embeddings,
                            "slots": spec.slots, "tokens": int(lengths.sum()), "bytes": size,
                            "checksums": _block_checksums(path, size)})
        self.close()
        index = {"streams": [{"lengths": n.tolist(), "offsets": o.tolist()}
                             for n, o in zip(self.plan.lengths, self.offsets, strict=True)]}
        index_bytes = json.dumps(index, separators=(",", ":")).encode()
        _write_synced(self.folder / INDEX, index_bytes)
        manifest = {
            "format": FORMAT_VERSION, "key": self.plan.key, "label": self.plan.label, "dtype": self.plan.dtype,
            "examples": self.plan.num_examples, "streams": streams, "index_sha256": sha256_hex(index_bytes),
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
            sums[str(start)] = sha256_hex(f.read(CHECK_BLOCK_BYTES))
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

