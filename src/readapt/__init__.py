"""readapt: fine-tune frozen transformers with READ (REcurrent ADaptation)."""

import os
import sys

if "torch" not in sys.modules:  # read once, when torch's OpenMP runtime starts
    # OpenMP threads that wait for work spin by default. On a machine where other processes compete for the cores
    # the spinning threads take the time slices the working ones need: with 2 threads on a loaded 2-core CPU a READ
    # epoch replayed from the feature cache cost 94 CPU s spinning and 5.3 CPU s sleeping (126 s vs 6 s wall;
    # docs/memory-and-speed.md). Waiting threads sleep unless the user chose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
