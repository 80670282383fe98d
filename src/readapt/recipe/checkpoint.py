"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a directory `checkpoint-<step>` holding

    trainable.safetensors   every tensor with requires_grad, by parameter name (any method)
    optimizer.safetensors   the optimizer's per-parameter state tensors (AdamW moments, step counts)
    rng.safetensors         torch's CPU (and CUDA) generator states
    state.json              the small state: step, epoch, batches done in that epoch, running loss, epoch records,
                            best record, timings, scheduler state, optimizer hyper-parameters, Python and NumPy
                            RNG states, and the size and SHA-256 of each file above

It is written into a hidden temporary directory, every file fsynced, then renamed into place, and state.json
is written last: a directory without a state.json that matches its files is torn and never used. Only
safetensors and JSON are read back, never pickle. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from readapt.io import atomic_save_safetensors, atomic_write_json, fsync_directory, load_safetensors

logger = logging.getLogger("readapt")

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
_NAME = re.compile(r"^checkpoint-(\d{8})$")
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # state.json
    tensors: dict[str, dict[str, torch.Tensor]]  # file stem -> tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- capture
def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state_dict split into tensors (safetensors) and everything else (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], small: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for source in (tensors, small["scalars"]):
        for key, value in source.items():
            index, _, name = key.partition("/")
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": small["param_groups"]})


def current_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's Python, NumPy, torch (and CUDA) generator states: (tensors, JSON-able rest)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                               "cached_gaussian": float(cached)}}


def restore_rng(checkpoint: Checkpoint, rank: int = 0) -> None:
    """Put this process's (`rank`'s) Python, NumPy and torch generators back where they were when the
    checkpoint was written."""
    prefix = f"{rank}/"
    tensors = {k.removeprefix(prefix): v for k, v in checkpoint.tensors["rng"].items() if k.startswith(prefix)}
    small = checkpoint.state["rng"][rank]
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    numpy_state = small["numpy"]
    np.random.set_state((numpy_state["kind"], tensors["numpy"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = small["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------------------- write
def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, progress: dict[str, Any],
                    keep: int, rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write checkpoint-<step> under `directory` atomically, then drop all but the newest `keep`.
    `progress` is the loop's own small state (JSON-serialisable); `rng_states` one `current_rng_state()` per
    process (default: this one's). Raises OSError (e.g. ENOSPC) with the previous checkpoints left intact."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step:08d}"
    temporary = directory / f".checkpoint-{step:08d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        optimizer_tensors, optimizer_small = _optimizer_state(optimizer)
        rng_states = rng_states or [current_rng_state()]
        rng_tensors = {f"{rank}/{key}": value for rank, (tensors, _) in enumerate(rng_states)
                       for key, value in tensors.items()}
        rng_small = [small for _, small in rng_states]
        parts = {"trainable": trainable_tensors(model), "optimizer": optimizer_tensors, "rng": rng_tensors}
        files = {}
        for stem, tensors in parts.items():
            path = temporary / f"{stem}.safetensors"
            atomic_save_safetensors(path, tensors)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        state = {"format": FORMAT_VERSION, "step": step, "progress": progress, "files": files,
                 "optimizer": optimizer_small, "scheduler": scheduler.state_dict(), "rng": rng_small}
        atomic_write_json(temporary / STATE_FILE, state)  # last: marks the checkpoint complete
        replaced = None
        if final.exists():  # the same step written again: set the old one aside until the new one is in place
            replaced = final.rename(directory / f".checkpoint-{step:08d}.old")
        temporary.rename(final)
        fsync_directory(directory)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------- read
def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, oldest first (validity not checked)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


class TornCheckpoint(Exception):
    """A checkpoint directory that is incomplete or damaged."""


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint (sizes and SHA-256 of every file); TornCheckpoint if anything is off."""
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TornCheckpoint(f"{state_path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or set(state.get("files", {})) != set(_FILES):
        raise TornCheckpoint(f"{state_path}: not a readapt checkpoint of format {FORMAT_VERSION}")
    tensors = {}
    for name, expected in state["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise TornCheckpoint(f"{file} is missing, truncated or changed")
        try:
            tensors[name.removesuffix(".safetensors")] = load_safetensors(file)
        except Exception as exc:  # noqa: BLE001 (any unreadable file makes the checkpoint unusable)
            raise TornCheckpoint(str(exc)) from None
    return Checkpoint(path, int(state["step"]), state, tensors)


def newest_valid_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; torn ones are reported in the log and skipped."""
    for _step, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except TornCheckpoint as exc:
            logger.warning("skipping damaged checkpoint %s: %s", path.name, exc)
    return None


def restore_training_state(checkpoint: Checkpoint, model, optimizer, scheduler) -> None:
    """Trainable weights, optimizer and scheduler back to the checkpoint (RNG: `restore_rng`, separately,
    once the data iterator of the resumed epoch exists)."""
    saved = checkpoint.tensors["trainable"]
    current = trainable_tensors(model)
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in current):
        raise TornCheckpoint(f"{checkpoint.path} holds other trainable tensors than this model")
    with torch.no_grad():
        for name, parameter in current.items():
            parameter.copy_(saved[name])
    _load_optimizer_state(optimizer, checkpoint.tensors["optimizer"], checkpoint.state["optimizer"])
    scheduler.load_state_dict(checkpoint.state["scheduler"])


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
