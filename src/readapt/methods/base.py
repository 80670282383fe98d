"""The one interface every fine-tuning method implements, so that one training loop serves them all.

A method turns a loaded backbone into the model to train (`prepare`: it sets `requires_grad` on exactly the
weights it trains), writes what it trained (`save`) and puts it back onto a fresh backbone (`load`). Every
saved directory holds `adapter_config.json` (which method, its options, the backbone signature) and
`adapter_model.safetensors`; nothing else is ever read back (no pickle).

Most methods train a small set of weights added to or chosen inside the backbone; `PartialMethod` gives
them save/load for free: the trained tensors are stored under their names in the prepared model, and
loading prepares a fresh backbone with the same options, then fills those tensors in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME, check_backbone_compatible, read_adapter_metadata
from readapt.backbone import BackboneInfo, describe_backbone
from readapt.errors import ConfigError, IncompatibleAdapterError, UnsupportedModelError
from readapt.io import atomic_save_safetensors, atomic_write_json, load_safetensors

ALL_FAMILIES = ("encoder-decoder", "encoder-only", "decoder-only")


class Method:
    name: str
    default_lr: float
    families: tuple[str, ...] = ALL_FAMILIES  # backbone families the method supports
    backpropagates_through_backbone: bool = True  # False for READ and LST (side networks)
    # The frozen backbone may be loaded in low precision (--backbone-dtype) or split / offloaded (--device-map):
    # it only ever runs forward, and what the method trains copes with its dtype and placement.
    supports_backbone_placement: bool = False
    # The side network can correct chosen token positions only (`model.correcting_positions`), e.g. [CLS] alone.
    corrects_positions: bool = False

    def default_epochs(self, train_rows: int) -> int:
        """The epoch budget `readapt train` uses when --epochs is not given."""
        return 3

    def default_options(self, train_rows: int) -> dict[str, Any]:
        """Options `readapt train` adds for a training set of `train_rows` rows (the user's own take precedence;
        the run records them as its settings)."""
        return {}

    def feature_cache_problem(self, options: dict[str, Any]) -> str | None:
        """Why the backbone's hidden states cannot be computed once and replayed with these options (the end of
        "--cache-features needs ..."); None when they can (readapt.read.cache)."""
        return (f"--method read: with {self.name} the backbone's hidden states change during training (its weights "
                "are trained, or trained modules sit inside it), so they cannot be computed once")

    def corrects_first_token_only(self, model: nn.Module, probe: dict[str, torch.Tensor]) -> bool:
        """Whether the model may correct position 0 alone on inputs like `probe` (its head reads nothing else)."""
        return False

    def prepare(self, backbone: nn.Module, options: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def validate_options(self, options: dict[str, Any]) -> None:
        """Raise ConfigError for unknown or out-of-range options, before any data or model is loaded."""
        check_options(self.name, options, {})

    def save(self, model: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def load(self, backbone: nn.Module, directory: Path) -> nn.Module:
        raise NotImplementedError

    def check_supported(self, backbone: nn.Module) -> None:
        family = describe_backbone(backbone).family
        if family not in self.families:
            raise UnsupportedModelError(
                f"method {self.name!r} does not support {family} backbones ({type(backbone).__name__}); "
                f"it supports: {', '.join(self.families)}"
            )


@dataclass(frozen=True)
class TrainableCount:
    """Trainable parameters, counted the same way for every method: every tensor with requires_grad in
    the prepared model (head included), as a share of the backbone's own parameters before preparation."""

    trainable: int
    backbone: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.backbone if self.backbone else 0.0


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique_parameters(model))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique_parameters(model) if p.requires_grad)


def _unique_parameters(model: nn.Module):
    seen = set()
    for p in model.parameters():  # parameters() already skips shared (tied) ones; ids guard the rest
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def check_options(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Options merged over the defaults; an unknown option or one of the wrong type is a ConfigError."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown {method} option(s) {unknown}; allowed: {sorted(defaults)}")
    merged = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        if isinstance(default, bool) != isinstance(value, bool) or (
            isinstance(default, (int, float)) and not isinstance(value, (int, float))
        ):
            raise ConfigError(f"{method} option {key}={value!r} must be like {default!r}")
        merged[key] = type(default)(value) if isinstance(default, float) else value
    return merged


def require_positive_int(method: str, options: dict[str, Any], *names: str) -> None:
    for name in names:
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{method} option {name}={value!r} is out of range; it must be an integer >= 1")


class PartialMethod(Method):
    """A method that trains some tensors of the prepared model; saves exactly those, by name.

    Subclasses give `defaults` (their options) and `build(backbone, options, info)`, which receives a fully
    frozen backbone with its task head unfrozen and returns the model to train."""

    defaults: dict[str, Any] = {}

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validated options with defaults filled in (stored in adapter_config.json)."""
        return check_options(self.name, options, self.defaults)

    def validate_options(self, options):
        self.options(options)

    def build(self, backbone: nn.Module, options: dict[str, Any], info: BackboneInfo) -> nn.Module:
        raise NotImplementedError

    def prepare(self, backbone, options):
        options = self.options(options)
        self.check_supported(backbone)
        info = describe_backbone(backbone)  # before the method changes the backbone's modules
        backbone.requires_grad_(False)
        for name in info.head_modules:
            backbone.get_submodule(name).requires_grad_(True)
        model = self.build(backbone, options, info)
        # What save() records, kept on the model itself (through __dict__: not a submodule or parameter).
        model.__dict__["readapt_metadata"] = {
            "method": self.name, "options": options, "backbone": info.signature(), "head_modules": info.head_modules,
            "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", ""),
        }
        return model

    def save(self, model, directory):
        directory = Path(directory)
        metadata = model.__dict__.get("readapt_metadata")
        if metadata is None or metadata["method"] != self.name:
            raise ConfigError(f"this model was not prepared by method {self.name!r}")
        state = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        atomic_save_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": "pt", "method": self.name})
        atomic_write_json(directory / CONFIG_NAME, metadata)

    def load(self, backbone, directory):
        directory = Path(directory)
        metadata = read_adapter_metadata(directory, method=self.name)
        check_backbone_compatible(metadata["backbone"], describe_backbone(backbone).signature(), directory)
        model = self.prepare(backbone, metadata.get("options", {}))
        state = load_safetensors(directory / WEIGHTS_NAME)
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
        if missing or unexpected:
            raise IncompatibleAdapterError(
                f"adapter {directory} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                if parameters[name].shape != tensor.shape:
                    raise IncompatibleAdapterError(
                        f"adapter {directory}: {name} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(parameters[name].shape)}"
                    )
                parameters[name].copy_(tensor)
        return model.eval().requires_grad_(False)
