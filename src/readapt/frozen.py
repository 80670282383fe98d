"""What every method that keeps its backbone frozen shares: the wrapper that forwards to the backbone, and the
hooks that let a low-precision backbone feed float32 modules (READ's side networks and heads, LST's ladder)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from readapt.errors import ConfigError


def first_tensor(output) -> torch.Tensor:
    """A layer's or stack's hidden state: a bare tensor, or the first item of a tuple / ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output[0]


LOW_PRECISION = (torch.float16, torch.bfloat16)


def cast_floating_inputs(dtype: torch.dtype):
    """A forward pre-hook that hands a module its floating-point inputs in `dtype`."""

    def hook(module, args, kwargs):
        def cast(value):
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def float_output(module, args, output):
    return output.float() if isinstance(output, torch.Tensor) and output.dtype in LOW_PRECISION else output


def clear_hooks(module: nn.Module) -> None:
    """A deep-copied module carries its original's hooks, which the original's handles would not remove."""
    for sub in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                     "_backward_pre_hooks"):
            hooks = getattr(sub, name, None)
            if hooks is not None:
                hooks.clear()


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)



class NotForwardedError(ConfigError, AttributeError):
    """A name the wrapper does not hand to its backbone. An AttributeError too, so that hasattr() says False."""


@functools.cache
def _peft_integration_names() -> frozenset[str]:
    """The public names of transformers' PEFT integration (PeftAdapterMixin) that every backbone carries."""
    from transformers.integrations.peft import PeftAdapterMixin

    return frozenset(name for name in dir(PeftAdapterMixin) if not name.startswith("_"))


class FrozenBackboneWrapper(nn.Module):
    """What READ and LST share as wrappers of a frozen backbone: unknown attributes go to the backbone (config,
    get_encoder, generation helpers), and `unload()` removes the hooks and stack-forward wrappers that the
    subclass registered in `_hooks` / `_wrapped`, returning the untouched backbone.

    Except transformers' PEFT integration (add_adapter, load_adapter, disable_adapters, ...): on the backbone it
    would put PEFT's adapters inside the frozen model, or report on adapters it does not have. A wrapper that
    defines such a name itself (ReadModel) answers it; any other one is a NotForwardedError."""

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)  # not a further base's __getattr__ (PeftModel's forwards too)
        except AttributeError:
            if name == "backbone":
                raise
            if name in _peft_integration_names():
                raise NotForwardedError(
                    f"{type(self).__name__}.{name} is part of transformers' PEFT integration, which would act on the "
                    f"frozen backbone inside; {type(self).__name__} keeps its adapters beside it "
                    "(docs/huggingface.md lists what it offers)") from None
            return getattr(self.backbone, name)

    def unload(self) -> nn.Module:
        """Remove every hook and return the bare backbone (its weights were never changed)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self._wrapped:
            previous = getattr(module.__dict__.get("forward"), "__wrapped__", None)
            del module.forward
            if previous is not None and getattr(previous, "__self__", None) is not module:
                module.forward = previous  # an instance-level forward we wrapped (an Accelerate dispatch hook)
        self._wrapped.clear()
        return self.backbone
