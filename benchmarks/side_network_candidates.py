"""Candidate READ side networks for benchmarks/side_network_search.py, on cached frozen layer states.

Every candidate keeps READ's contract: it reads the frozen per-layer states φ_1..φ_N only (no gradient into the
backbone), returns a correction δφ (B, T, d) that the caller adds to the final hidden state before the task head,
starts from a zero up-projection (untrained == backbone), and has a parameter count that does not depend on N
(except the "scalar-mix" ablation, which has one logit per layer and says so).

    φ_i --RMS norm--> in-projection d -> r (+ READ's "segments" comparison of the texts' means, per layer)
        --> across layers: "gru" (READ's recurrence, one sequence per token, mean over layer steps)
                           "layer-attention" (a softmax over the layers per token, scored from content)
                           "scalar-mix" (a learned softmax over the layer index: N parameters)
        --> token mixer: pre-norm transformer encoder layers over the tokens in width r (padding masked),
            "after" the recurrence, or "every" layer step inside it (shared weights, so depth-independent)
        --> LayerNorm (with a mixer) --> up-projection r -> d, zero-initialised = δφ
"""

from __future__ import annotations

import torch
from torch import nn

from readapt.read.side_network import pool_states, rms_normalize_

RECURRENCES = ("gru", "layer-attention", "scalar-mix")
MIXER_PLACES = ("after", "every")


def mixer_layer(width: int, heads: int, ffn_multiple: int, dropout: float) -> nn.TransformerEncoderLayer:
    """One pre-norm transformer encoder layer over the tokens (attention + GELU feed-forward), torch's own."""
    return nn.TransformerEncoderLayer(width, heads, ffn_multiple * width, dropout, activation="gelu",
                                      batch_first=True, norm_first=True)


class TokenMixerSideNetwork(nn.Module):
    def __init__(self, model_dim: int, hidden_size: int, *, recurrence: str = "gru", segments: bool = True,
                 mixer_layers: int = 2, mixer_place: str = "after", heads: int = 4, ffn_multiple: int = 2,
                 dropout: float = 0.1, num_layers: int | None = None, eps: float = 1e-6):
        super().__init__()
        if recurrence not in RECURRENCES or mixer_place not in MIXER_PLACES:
            raise ValueError(f"recurrence {recurrence!r} / mixer place {mixer_place!r}: allowed {RECURRENCES} / {MIXER_PLACES}")
        if mixer_place == "every" and (recurrence != "gru" or mixer_layers < 1):
            raise ValueError("mixing at every layer step needs the GRU recurrence and at least one mixer layer")
        r = hidden_size
        self.eps, self.recurrence, self.mixer_place = eps, recurrence, mixer_place
        self.input_projection = nn.Linear(model_dim, r)
        self.segments_projection = nn.Linear(3 * model_dim, r, bias=False) if segments else None
        if recurrence == "gru":
            self.rnn = nn.GRU(r, r) if mixer_place == "after" else nn.GRUCell(r, r)
        elif recurrence == "layer-attention":
            self.layer_score = nn.Linear(r, 1)  # one score per (token, layer) from the layer's content
        else:
            if num_layers is None:
                raise ValueError("scalar-mix needs the backbone's layer count")
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))  # depth-dependent: an ablation only
        self.mixer = nn.ModuleList(mixer_layer(r, heads, ffn_multiple, dropout) for _ in range(mixer_layers))
        self.norm = nn.LayerNorm(r) if mixer_layers else nn.Identity()
        self.up_projection = nn.Linear(r, model_dim)
        nn.init.zeros_(self.up_projection.weight)
        nn.init.zeros_(self.up_projection.bias)

    def _mix(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        for layer in self.mixer:
            x = layer(x, src_key_padding_mask=padding)
        return x

    def forward(self, layer_states: torch.Tensor, token_mask: torch.Tensor, second_text: torch.Tensor) -> torch.Tensor:
        """δφ (B, T, d) from `layer_states` (N, B, T, d) float32, `token_mask` (B, T) 1 = real token, `second_text`
        (B, T) bool (readapt's second_text_mask). Per-token work runs on the real tokens only (R of them)."""
        _, batch, tokens, _ = layer_states.shape
        real = token_mask.to(torch.bool)
        rows = real.nonzero()[:, 0]  # each real token's batch row

        def padded(values: torch.Tensor) -> torch.Tensor:  # (R, r) -> (B, T, r), zeros at padding
            out = values.new_zeros(batch, tokens, values.shape[-1])
            out[real] = values
            return out

        x = self.input_projection(rms_normalize_(layer_states[:, real], self.eps))  # (N, R, r)
        if self.segments_projection is not None:  # READ's "segments": how the two texts' means compare, per layer
            means = pool_states(layer_states, token_mask, False, second_text)
            whole, first, second = rms_normalize_(means, self.eps).unbind(dim=2)  # (N, B, d) each
            x = x + self.segments_projection(torch.cat([whole, first * second, (first - second).abs()], -1))[:, rows]
        padding = ~real
        if self.recurrence == "gru" and self.mixer_place == "every":
            state = x.new_zeros(x.shape[1:])
            outputs = []
            for step in range(x.shape[0]):  # the recurrence, with the tokens mixed after every layer step
                state = self._mix(padded(self.rnn(x[step], state)), padding)[real]
                outputs.append(state)
            summary = padded(torch.stack(outputs).mean(0))
        else:
            if self.recurrence == "gru":
                summary = self.rnn(x)[0].mean(0)
            elif self.recurrence == "layer-attention":
                summary = (self.layer_score(x).softmax(dim=0) * x).sum(0)  # a softmax over the layers, per token
            else:
                summary = (self.layer_logits.softmax(0).view(-1, 1, 1) * x).sum(0)
            summary = self._mix(padded(summary), padding)
        return self.up_projection(self.norm(summary))
