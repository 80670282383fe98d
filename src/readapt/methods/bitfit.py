"""BitFit (Ben Zaken et al. 2022): only the bias terms of the backbone are trained, plus the task head.

Models without biases (T5, Llama and most recent decoders have bias-free linear layers and RMS norms):
every bias-free nn.Linear inside the transformer stacks gets a new bias initialised to zero, which is
trained. The untrained model computes exactly what the backbone computes, and the trainable count stays
the size BitFit has on a model with biases. This is the treatment the LST paper applied to T5; a model
with neither biases nor linear layers in its stacks is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from readapt.errors import UnsupportedModelError
from readapt.methods.base import PartialMethod


class BitFit(PartialMethod):
    name = "bitfit"
    default_lr = 1e-3
    defaults = {"add_missing_biases": True}

    def build(self, backbone, options, info):
        added = 0
        for stack in info.stacks:
            for module in stack.layers.modules():
                if isinstance(module, nn.Linear) and module.bias is None and options["add_missing_biases"]:
                    weight = module.weight
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device))
                    added += 1
        trained = 0
        for name, parameter in backbone.named_parameters():
            if name.rpartition(".")[2] == "bias":
                parameter.requires_grad_(True)
                trained += 1
        if trained == 0:
            raise UnsupportedModelError(f"bitfit: {type(backbone).__name__} has no bias terms to train")
        return backbone
