"""Houlsby adapters (Houlsby et al. 2019), our own small module: peft has none, and the `adapters` library
(1.3.0, the newest on PyPI when checked on 2026-11-27) requires transformers ~=4.57.6; readapt runs on 5.x.

A bottleneck `x + up(act(down(x)))` is inserted on the output of the attention block and of the
feed-forward block of every transformer layer, before the residual connection and layer norm, exactly
where Houlsby et al. put it. Inserted through forward hooks on the blocks' output projections, so the
backbone's own module tree and weight names stay as they are. `up` starts at zero: the untrained model
computes what the backbone computes. Trained: the adapters and the task head.

Where to insert is found by the projection's name inside a layer, for the families readapt supports:
attention outputs (BERT `attention.output.dense`, T5 `SelfAttention.o` / `EncDecAttention.o`, BART and
Llama `*_attn.out_proj` / `o_proj`, GPT-2 `attn.c_proj` / `crossattention.c_proj`) and feed-forward
outputs (BERT `output.dense`, T5 `DenseReluDense.wo`, BART `fc2`, Llama `mlp.down_proj`, GPT-2 `mlp.c_proj`).
"""

from __future__ import annotations

import torch
from torch import nn

from readapt.errors import UnsupportedModelError
from readapt.methods.base import PartialMethod, require_positive_int

ATTENTION_OUTPUTS = ("attention.output.dense", "SelfAttention.o", "EncDecAttention.o", "self_attn.o_proj",
                     "self_attn.out_proj", "encoder_attn.out_proj", "attn.c_proj", "crossattention.c_proj",
                     "attention.o_proj", "self_attention.dense")
FEED_FORWARD_OUTPUTS = ("output.dense", "DenseReluDense.wo", "fc2", "mlp.down_proj", "mlp.c_proj", "mlp.fc2",
                        "mlp.dense_4h_to_h")


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden.to(self.down.weight.dtype)))).to(hidden.dtype)


def adapter_sites(layer: nn.Module) -> list[str]:
    """Names (inside one transformer layer) of the projections whose outputs get an adapter."""
    names = [name for name, _ in layer.named_modules() if name]
    attention = [n for n in names if n.endswith(ATTENTION_OUTPUTS)]
    feed_forward = [n for n in names if n.endswith(FEED_FORWARD_OUTPUTS) and n not in attention
                    and not any(n.startswith(a + ".") for a in attention)]
    return attention + feed_forward


class HoulsbyAdapters(PartialMethod):
    name = "adapter"
    default_lr = 1e-3
    defaults = {"bottleneck": 64}

    def options(self, options):
        options = super().options(options)
        require_positive_int(self.name, options, "bottleneck")
        return options

    def build(self, backbone, options, info):
        # The adapters live in one ModuleDict attached to the backbone ("readapt_adapters.<stack>.<layer>.<site>"),
        # so they save/load by name and move with .to(); hooks call them.
        adapters = nn.ModuleDict()
        for stack in info.stacks:
            for index, layer in enumerate(stack.layers):
                sites = adapter_sites(layer)
                if not any(s.endswith(ATTENTION_OUTPUTS) for s in sites) or len(sites) < 2:
                    raise UnsupportedModelError(
                        f"adapter: cannot find the attention and feed-forward output projections in "
                        f"{type(layer).__name__} (found {sites or 'none'})"
                    )
                for site in sites:
                    projection = layer.get_submodule(site)
                    weight = next(projection.parameters())
                    adapter = Bottleneck(stack.hidden_size, options["bottleneck"]).to(weight.device)
                    adapters[f"{stack.name}-{index}-{site.replace('.', '-')}"] = adapter
                    projection.register_forward_hook(_add_adapter(adapter))
        backbone.add_module("readapt_adapters", adapters)
        return backbone


def _add_adapter(adapter: Bottleneck):
    def hook(module, args, output):
        return adapter(output)
    return hook
