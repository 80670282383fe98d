"""The adapter folder that every method writes and reads: file names, the metadata check, the backbone check.

    adapter_config.json        {"method": ..., "backbone": signature, "config": ..., ...}
    adapter_model.safetensors  the trained tensors (never a pickle)
    task.json                  optional: what the adapter predicts (written by `readapt train`, readapt.task_spec)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from readapt.errors import IncompatibleAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TASK_FILE = "task.json"
ADAPTER_DIR = "adapter"  # what `readapt train` calls the adapter inside its output directory
# Weight files that are Python pickles (torch.save): refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def read_adapter_metadata(adapter_directory: Path, method: str | None = None) -> dict:
    """The JSON half of a saved adapter, checked for shape; `method` (if given) must be the one that wrote it."""
    adapter_directory = Path(adapter_directory)
    config_path = adapter_directory / CONFIG_NAME
    if not adapter_directory.is_dir():
        raise IncompatibleAdapterError(f"adapter directory {adapter_directory} does not exist")
    for path in (config_path, adapter_directory / WEIGHTS_NAME):
        if not path.is_file():
            pickles = sorted(p.name for p in adapter_directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and path.name == WEIGHTS_NAME:
                raise IncompatibleAdapterError(
                    f"{path} is missing and {adapter_directory} holds pickle weights ({', '.join(pickles)}), which "
                    "readapt never loads (unpickling can run arbitrary code); save the weights as safetensors")
            raise IncompatibleAdapterError(f"{path} is missing; is {adapter_directory} a readapt adapter?")
    try:
        metadata = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleAdapterError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("backbone"), dict) or "method" not in metadata:
        raise IncompatibleAdapterError(f"{config_path} is not a readapt adapter config")
    if method is not None and metadata["method"] != method:
        raise IncompatibleAdapterError(f"adapter {adapter_directory} was made by method {metadata['method']!r}, not {method!r}")
    if metadata["method"] == "read" and not isinstance(metadata.get("config"), dict):
        raise IncompatibleAdapterError(f"{config_path} has no READ config")
    return metadata


def recorded_backbone_dtype(adapter_directory: Path) -> str | None:
    """The dtype the adapter's backbone was trained in ("float32", "bfloat16", "int8", ...), where it records one:
    scoring or serving it on the backbone in another dtype (an int8-trained head on float32 features) would not
    be the model that was trained."""
    dtype = read_adapter_metadata(adapter_directory).get("backbone_dtype")
    return dtype if isinstance(dtype, str) else None


def _describe(signature: dict) -> str:
    stacks = " + ".join(f"{s['num_layers']} {name} layers of width {s['hidden_size']}" for name, s in signature["stacks"].items())
    return f"{signature['architecture']} ({signature['model_type']}, {stacks})"


def check_backbone_compatible(saved: dict, actual: dict, adapter_directory: Path) -> None:
    if saved != actual:
        raise IncompatibleAdapterError(
            f"adapter {adapter_directory} was trained on {_describe(saved)} but the backbone is {_describe(actual)}"
        )


def copy_into(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into live ones, after checking that names and shapes match exactly."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise IncompatibleAdapterError(
            f"{source} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise IncompatibleAdapterError(
                f"{source}: {key} has shape {tuple(value.shape)} but this model needs {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def task_labels(directory: str | Path) -> tuple[list[str] | None, bool | None]:
    """(label names, is_regression) from an adapter's task.json; (None, None) where it has none or it is unreadable
    (readapt.task_spec reads the whole file and reports its problems)."""
    try:
        task = json.loads((Path(directory) / TASK_FILE).read_text(encoding="utf-8"))["task"]
        names, regression = task["label_names"], task["is_regression"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None, None
    if not isinstance(regression, bool) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None, None
    return list(names), regression
