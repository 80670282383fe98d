"""readapt: fine-tune frozen transformers with READ (REcurrent ADaptation)."""

from readapt.errors import (
    ConfigError,
    DataError,
    IncompatibleAdapterError,
    ReadaptError,
    UnsupportedModelError,
)
from readapt.quiet_imports import mute_import_noise
from readapt.read.config import ReadConfig
from readapt.version import __version__

mute_import_noise()  # before anything imports transformers' model code (and with it torchao / bitsandbytes)

# The model classes import transformers and peft (seconds): loaded when first used, so that `readapt --help` and
# what needs only the configs and errors start fast.
_LAZY = {"AutoReadModel": "readapt.read.auto", "ReadModel": "readapt.read.model", "get_read_model": "readapt.read.model",
         "load_backbone": "readapt.pretrained", "train": "readapt.recipe", "TrainingConfig": "readapt.recipe",
         "DataConfig": "readapt.recipe", "evaluate_adapter": "readapt.recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'readapt' has no attribute {name!r}")

__all__ = [
    "AutoReadModel",
    "ConfigError",
    "DataConfig",
    "DataError",
    "IncompatibleAdapterError",
    "ReadConfig",
    "ReadModel",
    "ReadaptError",
    "TrainingConfig",
    "UnsupportedModelError",
    "__version__",
    "evaluate_adapter",
    "get_read_model",
    "load_backbone",
    "train",
]
