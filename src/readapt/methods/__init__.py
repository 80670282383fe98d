"""Fine-tuning methods behind one small interface (readapt.methods.base.Method), one module per method,
so that one training loop (readapt.recipe) and one benchmark harness (readapt.comparison) serve them all."""

from __future__ import annotations

from pathlib import Path

from readapt.adapter_files import read_adapter_metadata
from readapt.errors import ConfigError
from readapt.methods.adapter import HoulsbyAdapters
from readapt.methods.base import Method, PartialMethod, TrainableCount, count_parameters, count_trainable
from readapt.methods.bitfit import BitFit
from readapt.methods.full import FullFineTuning
from readapt.methods.lora import LoRA
from readapt.methods.lst import LadderSideTuning
from readapt.methods.prompt import PromptTuning
from readapt.methods.read import ReadMethod

METHODS: dict[str, Method] = {
    m.name: m for m in (ReadMethod(), FullFineTuning(), LoRA(), HoulsbyAdapters(), BitFit(), PromptTuning(),
                        LadderSideTuning())
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def method_of(directory: Path) -> Method:
    """The method that wrote an adapter directory."""
    return get_method(read_adapter_metadata(Path(directory))["method"])


__all__ = ["METHODS", "Method", "PartialMethod", "TrainableCount", "count_parameters", "count_trainable",
           "get_method", "method_of"]
