"""readapt: fine-tune frozen transformers with READ (REcurrent ADaptation)."""

from readapt.errors import (
    ConfigError,
    DataError,
    IncompatibleAdapterError,
    ReadaptError,
    UnsupportedModelError,
)
from readapt.read.config import ReadConfig
from readapt.read.model import ReadModel, get_read_model
from readapt.version import __version__

__all__ = [
    "ConfigError",
    "DataError",
    "IncompatibleAdapterError",
    "ReadConfig",
    "ReadModel",
    "ReadaptError",
    "UnsupportedModelError",
    "__version__",
    "get_read_model",
]
