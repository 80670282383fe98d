"""dtype and device moves of a READ model: `model.to(torch.bfloat16)`, `.half()`, `.bfloat16()`, `.float()`,
`.to(device)`.

The frozen backbone takes the new dtype. What READ trains (the side networks and the task heads, of every loaded
adapter) stays float32, as when READ is attached to a low-precision backbone: AdamW on bfloat16 weights loses small
updates, and a float32 weight rounded to bfloat16 and back is not the weight it was. So a cast never reaches those
modules at all (they only move device), and the float32 hooks of a low-precision backbone (readapt.read.attach:
the head reads float32 inputs, a frozen LM head reads its own dtype and returns float32 logits) are set up anew for
the backbone's new dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from readapt.errors import ConfigError
from readapt.frozen import LOW_PRECISION

BACKBONE_DTYPES = (torch.float32, *LOW_PRECISION)


class PrecisionPolicy:
    """ReadModel's `_apply` (what every nn.Module dtype / device method goes through)."""

    def _apply(self, fn, recurse: bool = True):
        if not recurse:
            return nn.Module._apply(self, fn, recurse)
        reference = next(self.read.parameters())
        target = fn(torch.zeros((), dtype=torch.float32, device=reference.device))  # what a float32 weight becomes
        if target.dtype != torch.float32 and target.dtype not in BACKBONE_DTYPES:
            raise ConfigError(f"a READ model's backbone can be float32, bfloat16 or float16, not {target.dtype} "
                              "(the side networks and task heads stay float32)")
        trained = self._trained_modules()
        # Moving device only: a cast does not reach the float32 modules READ trains.
        keep = fn if target.dtype == torch.float32 else (lambda t: t.to(device=target.device))
        _apply_outside(self, fn, {id(module) for module in trained})
        for module in trained:
            module._apply(keep)
        for head in self._original_heads.values():  # the backbone's own heads follow the backbone
            head._apply(fn)
        self._settle_precision()
        return self

    def _trained_modules(self) -> list[nn.Module]:
        """The side networks and heads of every adapter: the active one's in the model, the others' beside it."""
        modules = [self.read, *(self.backbone.get_submodule(name) for name in self.head_module_names)]
        for name in self.named_adapters.names:
            adapter = self.named_adapters.get(name)
            modules += [adapter.read, *adapter.heads.values()]
        unique = {id(module): module for module in modules}
        return list(unique.values())

    def _keep_heads_in_float32(self) -> None:
        start = len(self._hooks)
        self._keep_head_in_float32()
        self._precision_hooks = self._hooks[start:]

    def _settle_precision(self) -> None:
        """After a move: the backbone's dtype, and the float32 hooks that a low-precision one needs."""
        dtype = self.backbone.get_input_embeddings().weight.dtype
        if dtype == self.backbone_dtype:
            return
        for handle in self._precision_hooks:
            handle.remove()
            self._hooks.remove(handle)
        self._precision_hooks = []
        self.backbone_dtype = dtype
        if dtype in LOW_PRECISION:
            self._keep_heads_in_float32()


def _apply_outside(root: nn.Module, fn, skip: set[int]) -> None:
    """nn.Module._apply(fn) over `root`'s tree except the modules in `skip` (by id) and everything under them."""
    for child in root.children():
        if id(child) in skip:
            continue
        if any(id(module) in skip for module in child.modules()):
            _apply_outside(child, fn, skip)
        else:
            child._apply(fn)
    nn.Module._apply(root, fn, recurse=False)  # root's own parameters and buffers
