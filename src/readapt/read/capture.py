"""What READ keeps of one stack call: the per-layer states captured by hooks, or replayed from a cache."""

from __future__ import annotations

import torch

from readapt.read.cache import CachedCall

READ_ENCODER_STATES = "read_encoder_states"  # where the corrected encoder output rides along the encoder output


class LayerCapture:
    """One stack forward's layer outputs, copied into a single (N, B, T, d) buffer as they appear."""

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device | None = None):
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device  # None: the first layer output's device (a dispatched backbone: the side networks')
        self.states: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None  # replayed "pooled" context inputs (states of some positions only)
        self.seen = 0

    def add(self, index: int, hidden: torch.Tensor) -> None:
        if self.states is None:
            self.states = hidden.new_empty((self.num_layers, *hidden.shape), dtype=self.dtype, device=self.device)
        self.states[index].copy_(hidden)
        self.seen += 1


def earlier_tokens_cached(kwargs: dict, tokens: int) -> bool:
    """Whether a decoder stack's call continued a KV cache that holds tokens before this call's."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel() and int(position.reshape(-1)[0]) > 0:
        return True
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x renames it "cache"
    length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    return length > tokens  # the stack has already appended this call's tokens


def copy_call(call: CachedCall) -> CachedCall:
    """A cached stack call whose tensors the side network may normalise in place (the final output is only read)."""
    return CachedCall(call.stack, call.states.clone(), call.final,
                      None if call.embeddings is None else call.embeddings.clone(),
                      None if call.pooled is None else call.pooled.clone())
