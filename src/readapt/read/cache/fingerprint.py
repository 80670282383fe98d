"""What a feature cache entry is keyed on: hashes of the frozen backbone, the tokenizer and the token ids."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

logger = logging.getLogger("readapt")

_HEAD_ONLY_CONFIG = {"_name_or_path", "architectures", "id2label", "label2id", "problem_type",
                     "transformers_version", "finetuning_task", "classifier_dropout"}




def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    """A weight's bytes. A quantized one (readapt.quantization) is hashed by what it computes with: torchao's
    tensor subclass by its inner tensors (int8 data, scales) and settings; bitsandbytes' packed bytes with the
    scales it keeps beside them (a 4-bit weight's quant_state, an 8-bit weight's SCB)."""
    if is_traceable_wrapper_subclass(tensor):
        names, settings = tensor.__tensor_flatten__()
        digest.update(f"{type(tensor).__name__}|{settings}\n".encode())
        for name in names:
            _hash_tensor(digest, getattr(tensor, name))
        return
    digest.update(_tensor_bytes(tensor))
    state = getattr(tensor, "quant_state", None)
    parts = dict(state.as_dict(packed=True)) if state is not None else {}
    if isinstance(getattr(tensor, "SCB", None), torch.Tensor):
        parts["SCB"] = tensor.SCB
    for key in sorted(parts):
        value = parts[key]
        digest.update(f"|{key}|".encode())
        digest.update(_tensor_bytes(value) if isinstance(value, torch.Tensor) else repr(value).encode())


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
        _hash_tensor(digest, tensor)
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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- plans and entries
