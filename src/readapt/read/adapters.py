"""A READ model's named adapters (PEFT's load_adapter / set_adapter / delete_adapter): each adapter owns its
config, side networks and task head modules (heads of other shapes for other label sets). The model's module
tree always holds the active adapter only (`model.read`, the backbone's head submodules), so a single-adapter
model is exactly what it was; the others wait in the model's `NamedAdapters` until `set_adapter` swaps them in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from readapt.adapter_files import task_labels
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.frozen import clear_hooks, set_submodule
from readapt.read.config import ReadConfig

DEFAULT_ADAPTER = "default"


@dataclass
class NamedAdapter:
    """One named READ adapter: what goes into the model when it becomes active."""

    config: ReadConfig
    read: nn.ModuleDict  # side network per adapted stack
    heads: dict[str, nn.Module]  # task head modules by their name in the backbone
    labels: dict[str, Any]  # the backbone's label settings that go with these heads (see label_settings)


class NamedAdapters:
    """The adapters a model holds, in load order, and which one is active."""

    def __init__(self, name: str, adapter: NamedAdapter):
        check_adapter_name(name)
        self._adapters = {name: adapter}
        self.active = name

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def configs(self) -> dict[str, ReadConfig]:
        return {name: adapter.config for name, adapter in self._adapters.items()}

    def get(self, name: str) -> NamedAdapter:
        if name not in self._adapters:
            raise ConfigError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters)}")
        return self._adapters[name]

    def add(self, name: str, adapter: NamedAdapter) -> None:
        check_adapter_name(name)
        if name in self._adapters:
            raise ConfigError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        self._adapters[name] = adapter

    def remove(self, name: str) -> None:
        self.get(name)
        if len(self._adapters) == 1:
            raise ConfigError(f"{name!r} is the only adapter of this model; it cannot be deleted")
        del self._adapters[name]


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an adapter name must be a non-empty string, got {name!r}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of a module that nothing trains and no hook of the original reaches (the backbone's own head)."""
    copied = copy.deepcopy(module)
    clear_hooks(copied)
    return copied.requires_grad_(False)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A new adapter's head: a trainable copy of the backbone's own (PEFT's modules_to_save start the same way)."""
    return frozen_copy(module).requires_grad_(True)


def head_for(backbone: nn.Module, name: str, state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
    """A new instance of head module `name` for an adapter: a copy of the backbone's, with every Linear whose
    saved weight has another shape (another number of labels) replaced by a Linear of the saved shape."""
    current = backbone.get_submodule(name)
    head = copy.deepcopy(current)
    clear_hooks(head)
    prefix = f"head.{name}."
    saved = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    for key, value in saved.items():
        expected = head.state_dict().get(key)
        if expected is None or expected.shape == value.shape:
            continue  # a missing tensor is reported when the weights are copied
        owner_name = key.rpartition(".")[0]
        owner = head.get_submodule(owner_name) if owner_name else head
        weight = saved.get(f"{owner_name}.weight" if owner_name else "weight")
        if not isinstance(owner, nn.Linear) or weight is None or weight.dim() != 2:
            raise IncompatibleAdapterError(
                f"adapter {directory}: {prefix}{key} has shape {tuple(value.shape)} but this model's is "
                f"{tuple(expected.shape)}, and only a Linear layer can be resized")
        resized = nn.Linear(weight.shape[1], weight.shape[0], bias=owner.bias is not None,
                            device=owner.weight.device, dtype=owner.weight.dtype)
        if owner_name:
            set_submodule(head, owner_name, resized)
        else:
            head = resized
    return head


def label_settings(backbone: nn.Module) -> dict[str, Any]:
    """What a sequence-classification backbone's loss reads besides the head: its label count and problem
    type (config and model attribute), and the label names; saved and restored as adapters switch."""
    config = backbone.config
    return {"num_labels": backbone.__dict__.get("num_labels"), "id2label": getattr(config, "id2label", None),
            "label2id": getattr(config, "label2id", None), "problem_type": getattr(config, "problem_type", None)}


def apply_label_settings(backbone: nn.Module, settings: dict[str, Any]) -> None:
    if not settings:
        return
    config = backbone.config
    if settings["num_labels"] is not None:
        backbone.num_labels = settings["num_labels"]
    config.id2label, config.label2id = settings["id2label"], settings["label2id"]
    config.problem_type = settings["problem_type"]


def labels_for(backbone: nn.Module, hidden_size: int, heads: dict[str, nn.Module], directory: Path) -> dict[str, Any]:
    """The label settings of a loaded adapter: from its task file where it has one (`readapt train` writes
    it), else the output size of its head, with generic label names and the problem type left to infer."""
    settings = label_settings(backbone)
    if settings["num_labels"] is None:
        return settings  # not a sequence-classification model: nothing to switch
    names, regression = task_labels(directory)
    if regression is None:
        sizes = {m.out_features for head in heads.values() for m in head.modules() if isinstance(m, nn.Linear)}
        sizes.discard(hidden_size)  # a pooler's or dense layer's output
        if len(sizes) != 1 or sizes == {settings["num_labels"]}:
            return settings  # the backbone's own label count (or no way to tell): keep its settings
        num_labels, problem = sizes.pop(), None
    else:
        num_labels = 1 if regression else len(names)
        problem = "regression" if regression else "single_label_classification"
    id2label = {i: names[i] if names else f"LABEL_{i}" for i in range(num_labels)}
    return {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
            "problem_type": problem}
