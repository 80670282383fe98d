"""Quantized frozen backbones (`--backbone-dtype int8|int4`), loaded through transformers' own quantization
integrations: READ never back-propagates through the frozen backbone, so its weights can be stored in 8 or 4
bits at no cost to the gradients (QST, Quantized Side Tuning, makes the same use of it).

Which integration quantizes depends on the device the backbone runs on (first one installed):

    dtype   CPU                                              CUDA
    int8    torchao Int8WeightOnlyConfig, bitsandbytes       bitsandbytes LLM.int8(), torchao
    int4    bitsandbytes NF4 (its CPU backend, >= 0.46)      bitsandbytes NF4

torchao is not offered for int4 on the CPU: its 0.18 Int4WeightOnlyConfig needs the mslk kernels, and
IntxWeightOnlyConfig keeps 4-bit values unpacked in int8 bytes, which saves nothing over int8.

Only the frozen body is quantized. The task head (classifier / score / pooler: READ trains it) and the LM head
(with the weights tied to it) stay float, through the integration's modules_to_not_convert.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

from readapt.errors import ReadaptError
from readapt.settings import QUANTIZED_BACKBONE_DTYPES

logger = logging.getLogger("readapt")

# (device type, dtype) -> the integrations that can quantize it there, in order of preference
_BACKENDS = {
    ("cpu", "int8"): ("torchao", "bitsandbytes"),
    ("cpu", "int4"): ("bitsandbytes",),
    ("cuda", "int8"): ("bitsandbytes", "torchao"),
    ("cuda", "int4"): ("bitsandbytes",),
}
_BITSANDBYTES_CPU = (0, 46)  # the first bitsandbytes release with a CPU backend
INSTALL_HINT = "pip install 'readapt[quant]'"
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (its default)


@dataclass(frozen=True)
class Quantization:
    """How a backbone's weights are quantized: the integration, its scheme, the modules kept float."""

    dtype: str  # "int8" or "int4"
    backend: str  # "torchao" or "bitsandbytes"
    scheme: str  # what the weights become, in words
    kept_float: tuple[str, ...]  # modules_to_not_convert
    device_type: str  # where the backbone runs: "cpu" or "cuda"
    config: Any = field(repr=False, compare=False)  # the transformers QuantizationConfig

    def describe(self) -> str:
        return f"{self.dtype} weights by {self.backend} ({self.scheme})"

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "backend": self.backend, "backend_version": _version(self.backend),
                "scheme": self.scheme, "kept_float": list(self.kept_float), "device_type": self.device_type}

    def from_pretrained_kwargs(self, placed: bool) -> dict:
        """from_pretrained arguments. bitsandbytes quantizes on the device it loads to, and its weights cannot be
        moved afterwards: without a device map, the backbone loads straight onto the GPU."""
        import torch

        kwargs = {"quantization_config": self.config}
        if self.backend == "bitsandbytes" and self.device_type == "cuda" and not placed:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        return kwargs


def is_quantized_dtype(dtype: str | None) -> bool:
    return dtype in QUANTIZED_BACKBONE_DTYPES


def device_type_for(device_map, use_gpus: bool) -> str:
    """Where a backbone will run: the GPU its device map names, else the GPU if one is used, else the CPU."""
    import torch

    if device_map is not None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        on_gpu = any(isinstance(d, int) or str(d).startswith("cuda") for d in devices)
        return "cuda" if on_gpu else "cpu"
    return "cuda" if use_gpus and torch.cuda.is_available() else "cpu"


def plan_quantization(dtype: str, auto_class, config, device_type: str) -> Quantization:
    """The quantization of a backbone of `config`, loaded by `auto_class`, that runs on `device_type`."""
    if not is_quantized_dtype(dtype):
        raise ReadaptError(f"backbone dtype {dtype!r} is not quantized; quantized: {', '.join(QUANTIZED_BACKBONE_DTYPES)}")
    from readapt.offload import empty_model

    backend = choose_backend(dtype, device_type)
    skeleton = empty_model(auto_class, config)  # on the meta device: names and shapes only, no memory
    kept = kept_float_modules(skeleton)
    if backend == "bitsandbytes" and dtype == "int4" and device_type != "cuda":
        _check_cpu_blocks(skeleton, kept)
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return Quantization(dtype, backend, "Int8WeightOnlyConfig, a float scale per output row", kept, device_type,
                            TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=list(kept)))
    import torch
    from transformers import BitsAndBytesConfig

    if dtype == "int8":
        return Quantization(dtype, backend, "LLM.int8(), outlier features in float16", kept,
                            device_type, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(kept)))
    return Quantization(dtype, backend, "NF4 in blocks of 64, float32 compute", kept,
                        device_type, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32,
                                                        llm_int8_skip_modules=list(kept)))


def check_placement(quantization: Quantization, device_map) -> None:
    """A device map may spread a quantized backbone over GPUs only. transformers' torchao integration moves the
    weights it quantizes to a GPU, and bitsandbytes keeps offloaded modules in float32, so neither offloads
    quantized weights to CPU RAM or disk (torchao 0.18, bitsandbytes 0.50, transformers 5.24)."""
    offloaded = sorted({str(d) for d in (device_map or {}).values() if str(d) in ("cpu", "disk")})
    if offloaded:
        raise ReadaptError(f"--backbone-dtype {quantization.dtype} cannot be combined with a device map that puts "
                           f"weights on {' and '.join(offloaded)}: {quantization.backend} quantizes only weights on a "
                           "GPU; without --device-map the whole quantized backbone loads into CPU RAM")


def kept_float_modules(skeleton) -> tuple[str, ...]:
    """The modules of a model (skeleton) to leave unquantized: READ's task head (describe_backbone's
    head_modules) and what transformers keeps float by default when given no list (the LM head, weights tied
    to it, the last module)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    from readapt.backbone import describe_backbone

    names = set(describe_backbone(skeleton).head_modules) | set(get_keys_to_not_convert(skeleton))
    return tuple(sorted(n for n in names if not any(n.startswith(other + ".") for other in names)))


def _check_cpu_blocks(skeleton, kept: tuple[str, ...]) -> None:
    """bitsandbytes' CPU 4-bit kernels quantize each row in whole blocks of 64 inputs (no padding)."""
    from torch import nn

    for name, module in skeleton.named_modules():
        inside_kept = any(name == k or name.startswith(k + ".") for k in kept)
        if isinstance(module, nn.Linear) and not inside_kept and module.in_features % NF4_BLOCK:
            raise ReadaptError(f"--backbone-dtype int4 on cpu: bitsandbytes quantizes each row in blocks of "
                                   f"{NF4_BLOCK} inputs, and {name} has {module.in_features}; use int8")


def quantize_dequantized(model, quantization: Quantization, placed: bool):
    """A model read from a GGUF file (dequantized to float), loaded again with `quantization`: transformers cannot
    quantize while it reads a GGUF file, so its float state dict goes through from_pretrained once more."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the GGUF marker, which from_pretrained would take as pre-quantized
        del config.quantization_config
    return type(model).from_pretrained(None, config=config, state_dict=model.state_dict(),
                                       **quantization.from_pretrained_kwargs(placed))


def release_checkpoint(model) -> None:
    """Copy the weights that stay float (embeddings, norms, heads) out of the checkpoint file. from_pretrained
    memory-maps a safetensors file and leaves those weights as views into it; while one view lives the whole
    mapping does, with every page that quantizing read, i.e. the float copy of the weights it replaced
    (measured on a T5-base-size model: 899 MiB of file pages resident beside 284 MiB of quantized weights;
    after the copy 143 MiB)."""
    import gc

    import torch

    with torch.no_grad():
        for param in model.parameters():  # quantized weights are other types (tensor subclasses, bitsandbytes')
            if type(param) is torch.nn.Parameter and param.device.type == "cpu":
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if type(buffer) is torch.Tensor and buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()
    gc.collect()


def log_quantization(quantization: Quantization) -> None:
    logger.info("backbone: %s, %s %s on %s; kept float: %s", quantization.describe(), quantization.backend,
                _version(quantization.backend), quantization.device_type, ", ".join(quantization.kept_float))


def quantized_dtype(model) -> str | None:
    """'int8' / 'int4' for a backbone these integrations quantized; None otherwise (a GGUF file, dequantized on
    loading, is float)."""
    quantizer = getattr(model, "hf_quantizer", None)
    settings = getattr(quantizer, "quantization_config", None)
    if settings is None:
        return None
    if getattr(settings, "load_in_8bit", False):
        return "int8"
    if getattr(settings, "load_in_4bit", False):
        return "int4"
    kind = type(getattr(settings, "quant_type", None)).__name__
    return "int8" if kind.startswith("Int8") else "int4" if kind.startswith("Int4") else None


# ---------------------------------------------------------------------------------------------- backends
def choose_backend(dtype: str, device_type: str) -> str:
    """The first installed integration that quantizes `dtype` on `device_type` ("cpu" or "cuda")."""
    candidates = _BACKENDS[("cuda" if device_type == "cuda" else "cpu", dtype)]
    for name in candidates:
        if _usable(name, device_type):
            return name
    why = ""
    if device_type != "cuda" and dtype == "int4":
        why = (f" (bitsandbytes >= {'.'.join(map(str, _BITSANDBYTES_CPU))} runs 4-bit weights on the CPU; torchao has "
               "no packed CPU layout for them)")
    raise ReadaptError(f"--backbone-dtype {dtype} on {device_type} needs {' or '.join(candidates)}{why}: "
                       f"{INSTALL_HINT}")


def _usable(name: str, device_type: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    if name == "bitsandbytes" and device_type != "cuda":
        version = tuple(int(p) for p in _version(name).split(".")[:2] if p.isdigit())
        return version >= _BITSANDBYTES_CPU
    return True


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
