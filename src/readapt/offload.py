"""Frozen backbones bigger than one device: Accelerate's big-model placement (split across GPUs, offloaded to
CPU RAM or disk) applied to READ's backbone.

READ runs the backbone forward only and never back-propagates through it, so the backbone can be placed like
an inference-only model: transformers' `from_pretrained(device_map=..., offload_folder=...)` loads it and
Accelerate's dispatch hooks (AlignDevicesHook) move each block's inputs, and offloaded weights, to the block's
execution device as it runs. What READ trains stays on one device and is never offloaded:

- the task head (classifier / score / pooler) is pinned to the device that computes the final hidden state
  (`plan_device_map` splits a device-map entry that covers it), so its weights are real, trainable tensors;
- the side networks go to that same device (`side_network_device`, used by readapt.read.model.ReadModel).

Device names follow Accelerate: GPU indexes (0, 1, ...), "cpu", "mps", and "disk" in a device map.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from readapt.errors import ConfigError

DEVICE_MAP_CHOICES = ("auto", "cpu")
OFFLOADED = ("cpu", "disk")


# ---------------------------------------------------------------------------------------------- parsing
def _device_key(text: str) -> int | str:
    key = str(text).strip().lower()
    if key.startswith("cuda:"):
        key = key[5:]
    if key.isdigit():
        return int(key)
    if key in ("cpu", "mps", "disk"):
        return key
    raise ConfigError(f"--max-memory device {text!r}: expected a GPU index (0, 1, ... or cuda:N), cpu, mps or disk")


def normalize_max_memory(max_memory: dict | str | None) -> dict[int | str, int] | None:
    """{device: bytes} from "DEVICE=SIZE[,DEVICE=SIZE...]" or a dict (sizes as bytes or "10GiB", "500MB")."""
    from accelerate.utils import convert_file_size_to_int

    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        items = {}
        for item in max_memory.split(","):
            if not item.strip():
                continue
            device, sep, size = item.partition("=")
            if not sep or not device.strip() or not size.strip():
                raise ConfigError(f"--max-memory {item!r}: expected DEVICE=SIZE, e.g. cpu=8GiB or 0=20GiB")
            items[device] = size.strip()
        max_memory = items
    if not isinstance(max_memory, dict) or not max_memory:
        raise ConfigError("--max-memory: expected DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=20GiB,cpu=64GiB")
    out: dict[int | str, int] = {}
    for device, size in max_memory.items():
        key = _device_key(device)
        text = size.strip() if isinstance(size, str) else size
        try:
            value = int(text) if isinstance(text, str) and text.isdigit() else convert_file_size_to_int(text)
        except (ValueError, TypeError):
            value = -1
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"--max-memory {device}={size!r}: expected a size such as 8GiB, 500MB or a byte count")
        out[key] = value
    return out


def parse_device_map(device_map: str | dict | None) -> str | dict | None:
    """"auto", "cpu", or an explicit {module name: device} map (a dict, or its JSON text)."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    text = str(device_map).strip()
    if text in DEVICE_MAP_CHOICES:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"--device-map {device_map!r}: expected auto, cpu, or a JSON object such as "
                          '\'{"": 0}\' or \'{"encoder": 0, "decoder": 1, "lm_head": 1, "shared": 0}\'')
    for name, device in value.items():
        if not (isinstance(device, int) and device >= 0) and not (isinstance(device, str) and device):
            raise ConfigError(f"--device-map entry {name!r}: {device!r} is not a device (GPU index, cpu or disk)")
    return value


# ---------------------------------------------------------------------------------------------- planning
def _covering_key(device_map: dict, name: str) -> str | None:
    """The device-map key that places module/tensor `name`: itself, or its nearest listed ancestor."""
    best = None
    for key in device_map:
        covers = key == name or key == "" or name.startswith(key + ".")
        if covers and (best is None or len(key) > len(best)):
            best = key
    return best


def _main_device(device_map: dict) -> int | str:
    """Where Accelerate's dispatch runs modules placed on "cpu"/"disk" (dispatch_model's main device)."""
    devices = [d for d in device_map.values() if d not in OFFLOADED]
    if not devices:
        return "cpu"
    gpus = sorted(d for d in devices if isinstance(d, int))
    return gpus[0] if gpus else devices[0]


def execution_device_in_map(device_map: dict, name: str) -> int | str:
    key = _covering_key(device_map, name)
    device = device_map[key] if key is not None else _main_device(device_map)
    return _main_device(device_map) if device in OFFLOADED else device


def pin_module(device_map: dict, model: nn.Module, name: str, device: int | str) -> None:
    """Place module `name` on `device` (in place), splitting the entry that covers it into its children."""
    while name not in device_map:
        key = _covering_key(device_map, name)
        if key is None:
            raise ConfigError(f"the device map places no entry for {name!r}")
        _split_entry(device_map, model, key)
    device_map[name] = device


def _split_entry(device_map: dict, model: nn.Module, key: str) -> None:
    """Replace entry `key` by one entry per child module (and direct tensor) of that module, same device."""
    parent_device = device_map.pop(key)
    parent = model.get_submodule(key) if key else model
    prefix = f"{key}." if key else ""
    for child, _ in parent.named_children():
        device_map[prefix + child] = parent_device
    for tensor, _ in [*parent.named_parameters(recurse=False), *parent.named_buffers(recurse=False)]:
        device_map[prefix + tensor] = parent_device


def final_module_name(model: nn.Module, stack_module: nn.Module) -> str:
    """The name of the last module with weights of a stack: what computes its final hidden state (final norm,
    or the last layer's last sublayer)."""
    names = {id(m): n for n, m in model.named_modules()}
    last = None
    for module in stack_module.modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = module
    return names[id(last if last is not None else stack_module)]


def plan_device_map(empty_model: nn.Module, device_map: str | dict, max_memory: dict | None,
                    dtype: torch.dtype | None, use_gpus: bool = True) -> dict:
    """A {module name: device} map for `empty_model` (built on the meta device): Accelerate's
    infer_auto_device_map for "auto" (GPUs first, then CPU RAM, then disk) and "cpu" (CPU RAM, then disk),
    or the given map; then the task head is pinned to the device that computes the final hidden state."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    from readapt.backbone import describe_backbone

    if isinstance(device_map, dict):
        planned = dict(device_map)
    else:
        available = get_max_memory()  # free memory of every GPU, and available CPU RAM
        if device_map == "cpu" or not use_gpus:
            available = {k: v for k, v in available.items() if not isinstance(k, int) and k != "mps"}
        budget = {**available, **(max_memory or {})}
        if device_map == "cpu" or not use_gpus:
            budget = {k: v for k, v in budget.items() if not isinstance(k, int) and k != "mps"}
        no_split = list(getattr(empty_model, "_no_split_modules", None) or [])
        if sum(isinstance(k, int) for k in budget) > 1:  # spread over the GPUs, as transformers' "auto" does
            budget = get_balanced_memory(empty_model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
        planned = infer_auto_device_map(empty_model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    info = describe_backbone(empty_model)
    final = final_module_name(empty_model, info.stacks[-1].module)
    device = execution_device_in_map(planned, final)
    for head in info.head_modules:
        pin_module(planned, empty_model, head, device)
    if list(planned) == [""] and planned[""] == "disk":
        # All on disk (a model with no task head, e.g. T5): one entry per top-level module, so that Accelerate
        # (accelerator.prepare) sees a multi-entry map and leaves the dispatched model where it is.
        _split_entry(planned, empty_model, "")
    return planned


def empty_model(auto_class, config) -> nn.Module:
    """The model skeleton on the meta device (no memory), to plan a device map for."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = auto_class.from_config(config)
    model.tie_weights()  # transformers ties at load time; the planner must see tied weights to keep them together
    return model


# ---------------------------------------------------------------------------------------------- dispatched models
def is_dispatched(model: nn.Module) -> bool:
    """Loaded with a device map that spreads it over several devices or offloads it (Accelerate hooks)."""
    return isinstance(getattr(model, "hf_device_map", None), dict) and any(
        hasattr(module, "_hf_hook") for module in model.modules())


def offloaded_parameters(model: nn.Module) -> list[str]:
    """Parameters kept off the device (meta placeholders, loaded by Accelerate's hooks as their module runs)."""
    return [name for name, p in model.named_parameters() if p.device.type == "meta"]


def _hook_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for item in hooks:
        device = getattr(item, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


def module_execution_device(model: nn.Module, module: nn.Module) -> torch.device | None:
    """Where `module` of a dispatched `model` runs: its own or its nearest ancestor's Accelerate hook, else the
    device of its weights (None where it has only meta weights and no hook)."""
    names = {id(m): n for n, m in model.named_modules()}
    name = names[id(module)]
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        device = _hook_device(model.get_submodule(".".join(parts[:depth])))
        if device is not None:
            return device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def side_network_device(backbone: nn.Module, final_stack_module: nn.Module) -> torch.device:
    """Where READ's side networks (and the task head) live: the backbone's device, or for a dispatched
    backbone the execution device of the module that computes the last stack's final hidden state."""
    if not is_dispatched(backbone):
        return next(backbone.parameters()).device
    final = backbone.get_submodule(final_module_name(backbone, final_stack_module))
    device = module_execution_device(backbone, final)
    return device if device is not None else torch.device("cpu")


def describe_device_map(device_map: dict | None) -> dict[str, Any] | None:
    """How many device-map entries each device got (for logs and metrics)."""
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts
