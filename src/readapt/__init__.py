"""readapt: fine-tune frozen transformers with READ (REcurrent ADaptation)."""

__version__ = "0.1.0"

from readapt.config import ReadConfig  # noqa: E402
from readapt.errors import (  # noqa: E402
    ConfigError,
    DataError,
    IncompatibleAdapterError,
    ReadaptError,
    UnsupportedModelError,
)
from readapt.model import ReadModel, get_read_model  # noqa: E402

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
