"""PEFT's names on a READ model, with PEFT's meaning where READ can honour it, and one clear error where it cannot.

A ReadModel is a `peft.PeftModel` to the code that checks (transformers' Trainer saves, resumes and inspects PEFT
models by that class; `as_peft_model`), so what PeftModel offers is here, for READ:

    get_base_model() / base_model.model   the wrapped transformers model (base_model is READ's own tuner layer, as
                                          PEFT's LoraModel is: the ReadModel)
    peft_config, active_adapters, active_peft_config, modules_to_save (the trained heads)
    disable_adapter() (context), disable_adapters() / enable_adapters()   the backbone's own output, heads included
    add_adapter(name, ReadConfig)         a new trainable adapter next to the loaded ones
    save_pretrained(dir, selected_adapters=..., safe_serialization=True)  PEFT's layout: "default" in dir, each
                                          other adapter in dir/<name>
    num_parameters(only_trainable=...), set_requires_grad, get_adapter_state_dict

What READ cannot honour raises ConfigError saying why (merging: READ is not a weight delta; prompts; tuner layers).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from readapt.adapter_files import CONFIG_NAME
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.frozen import LOW_PRECISION, set_submodule
from readapt.read.adapters import (
    DEFAULT_ADAPTER,
    NamedAdapter,
    apply_label_settings,
    label_settings,
    trainable_copy,
)
from readapt.read.config import ReadConfig
from readapt.read.sources import separator_token_id

NOT_A_WEIGHT_DELTA = ("READ is not a weight delta: a side network computes its correction at run time from every "
                      "layer's hidden states, so there is nothing to fold into the backbone's weights; unload() returns "
                      "the untouched backbone, and the adapter needs the ReadModel")


@functools.cache
def as_peft_model(cls: type) -> type:
    """`cls` with peft.PeftModel as a last base, what ReadModel.__new__ builds instances of. Made when the first READ
    model is, so that importing readapt does not import peft: that costs 3 to 5 CPU seconds, and where torchao or
    bitsandbytes are installed it logs lines on stderr, which would break the CLI's one-line errors. PeftModel's own
    __init__ never runs (ReadModel calls nn.Module's), and every public name of it is READ's (PeftSurface)."""
    from peft import PeftModel

    if issubclass(cls, PeftModel):
        return cls
    return type(cls.__name__, (cls, PeftModel), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                 "__doc__": cls.__doc__})


def _cannot(name: str, why: str):
    def method(self, *args, **kwargs):
        raise ConfigError(f"{type(self).__name__}.{name}() is not available: {why}")

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Not available for READ: {why}."
    return method


class PeftSurface:
    """ReadModel's PEFT names (a mixin over ReadModel's adapters; readapt.read.model)."""

    # ------------------------------------------------------------------ what the model is made of
    @property
    def base_model(self):
        """READ's tuner layer, the ReadModel itself (PEFT's LoraModel plays this part); `.model` is the backbone."""
        return self

    @property
    def model(self) -> nn.Module:
        """The wrapped transformers model (PEFT's `base_model.model`)."""
        return self.backbone

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model, whose forward signature and labels Trainer reads."""
        return self.backbone

    @property
    def peft_config(self) -> dict[str, ReadConfig]:
        return self.adapter_configs

    @property
    def active_peft_config(self) -> ReadConfig:
        return self.read_config

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        return not self._adapters_disabled

    @property
    def modules_to_save(self) -> set[str] | None:
        """The backbone modules each adapter has its own trained copy of (its task heads)."""
        return set(self.head_module_names) or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype:
        return self.backbone_dtype

    # ------------------------------------------------------------------ adapters on / off
    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this block the model computes what the backbone computes by itself: no correction, and the
        backbone's own head modules (kept when READ was attached) instead of the adapter's. Afterwards every
        adapter is as it was."""
        if self._adapters_disabled:
            yield
            return
        self.disable_adapters()
        try:
            yield
        finally:
            self.enable_adapters()

    def disable_adapters(self) -> None:
        """Run the backbone alone until enable_adapters() (transformers' name; disable_adapter() is the block)."""
        if self._adapters_disabled:
            return
        self._enabled_labels = label_settings(self.backbone)
        for name, head in self._original_heads.items():
            set_submodule(self.backbone, name, head)
            head.train(self.training)
        apply_label_settings(self.backbone, self._original_labels)
        self._adapters_disabled = True

    def enable_adapters(self) -> None:
        if not self._adapters_disabled:
            return
        for name, head in self.named_adapters.get(self.active_adapter).heads.items():
            set_submodule(self.backbone, name, head)
            head.train(self.training)
        apply_label_settings(self.backbone, self._enabled_labels)
        self._adapters_disabled = False

    enable_adapter_layers = enable_adapters  # PEFT tuners' names
    disable_adapter_layers = disable_adapters

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str | ReadConfig, peft_config: ReadConfig | str | None = None) -> None:
        """A new trainable READ adapter next to the loaded ones: fresh side networks (zero output, so it starts as
        the backbone) and a trainable copy of the backbone's own head modules. The active adapter does not change
        (set_adapter), as in PEFT. PEFT's argument order (name, config); transformers' (config, name) works too."""
        if isinstance(adapter_name, ReadConfig):  # transformers' add_adapter(adapter_config, adapter_name=None)
            adapter_name, peft_config = peft_config or DEFAULT_ADAPTER, adapter_name
        if not isinstance(peft_config, ReadConfig):
            raise ConfigError(f"a READ model's adapters are configured by ReadConfig, got {type(peft_config).__name__}: "
                              "PEFT's own adapters (LoRA, prompts, ...) change what the backbone computes, READ leaves it "
                              "untouched; apply peft.get_peft_model to a backbone of its own")
        if adapter_name in self.named_adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} is already loaded; delete it first or pick another name")
        config = peft_config.resolved_for(self.info.family, separator_token_id(self.backbone, self.info.family,
                                                                              peft_config),
                                          width=self.info.stacks[-1].hidden_size,
                                          sequence_head=self.info.sequence_head)
        heads = self._select_heads(self.backbone, self.info, config)
        self._check_same_attachment(config, {"head_modules": heads}, repr(adapter_name))
        read = self._side_networks(config).to(next(self.read.parameters()).device)
        new_heads = {name: trainable_copy(head) for name, head in self._original_heads.items()}
        if self.backbone_dtype in LOW_PRECISION:
            new_heads = {name: self._float32_head(head) for name, head in new_heads.items()}
        if config.h0 == "embeddings":
            self._install_embedding_hooks()
        self.named_adapters.add(adapter_name, NamedAdapter(config, read, new_heads, dict(self._original_labels)))

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Train (or freeze) the side networks and heads of the named adapter(s)."""
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            adapter = self.named_adapters.get(name)
            for module in (adapter.read, *adapter.heads.values()):
                module.requires_grad_(requires_grad)

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's trained tensors, as adapter_model.safetensors holds them (transformers' name)."""
        return self.adapter_state_dict(adapter_name)

    # ------------------------------------------------------------------ counting
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model, the frozen backbone and the active adapter (transformers' meaning)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in embeddings)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, is_main_process: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None, max_shard_size: int | str | None = None,
                        ) -> None:
        """Save adapters in PEFT's layout: the one named "default" in `save_directory`, each other one in
        `save_directory/<name>`; every loaded adapter unless `selected_adapters` names some. Each folder holds
        adapter_config.json and adapter_model.safetensors, written atomically, and nothing of the frozen backbone.
        `state_dict`: a whole-model state dict (Trainer passes one under DeepSpeed / FSDP) that holds the active
        adapter's tensors. `max_shard_size` (push_to_hub passes it) has nothing to split: an adapter is one file."""
        if not safe_serialization:
            raise ConfigError("readapt saves adapters as safetensors only: safe_serialization=False would write a "
                              "pickle, which loading could run as code")
        if isinstance(selected_adapters, str):
            selected_adapters = [selected_adapters]
        names = self.named_adapters.names if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ConfigError(f"selected_adapters is empty; loaded adapters: {', '.join(self.named_adapters.names)}")
        for name in names:
            self.named_adapters.get(name)  # an unknown name is an error before anything is written
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ConfigError(f"{save_directory} is a file; save_pretrained writes a directory")
        if not is_main_process:
            return
        for name in names:
            tensors = self._tensors_in(state_dict) if state_dict is not None and name == self.active_adapter else None
            self._write_adapter(save_directory if name == DEFAULT_ADAPTER else save_directory / name, name, tensors)

    def _tensors_in(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The active adapter's tensors, by their adapter-file names, out of a whole-model state dict."""
        def model_key(key: str) -> str:  # "head.<module>.<tensor>" lives at "backbone.<module>.<tensor>"
            return key if key.startswith("read.") else "backbone." + key.removeprefix("head.")

        state_dict = {_uncompiled_key(key): value for key, value in state_dict.items()}
        keys = {key: model_key(key) for key in self.adapter_state_dict()}
        missing = sorted(k for k in keys.values() if k not in state_dict)
        if missing:
            raise ConfigError(f"the state_dict given to save_pretrained lacks this adapter's {', '.join(missing[:3])}")
        return {key: state_dict[source] for key, source in keys.items()}

    # ------------------------------------------------------------------ what READ cannot honour
    merge_and_unload = _cannot("merge_and_unload", NOT_A_WEIGHT_DELTA)
    merge_adapter = _cannot("merge_adapter", NOT_A_WEIGHT_DELTA)
    unmerge_adapter = _cannot("unmerge_adapter", NOT_A_WEIGHT_DELTA)
    add_weighted_adapter = _cannot("add_weighted_adapter", "READ adapters are separate side networks whose weights "
                                   "cannot be mixed; run_adapters() runs several of them on one backbone pass")
    get_layer_status = _cannot("get_layer_status", "READ puts no adapter layers inside the backbone (its side "
                               "networks sit beside it, in model.read); see print_trainable_parameters() and peft_config")
    get_model_status = _cannot("get_model_status", "READ puts no adapter layers inside the backbone (its side "
                               "networks sit beside it, in model.read); see print_trainable_parameters() and peft_config")
    get_prompt = _cannot("get_prompt", "READ is not a prompt-learning method; it adds no virtual tokens")
    get_prompt_embedding_to_save = _cannot("get_prompt_embedding_to_save",
                                           "READ is not a prompt-learning method; it adds no virtual tokens")
    prepare_model_for_gradient_checkpointing = _cannot(
        "prepare_model_for_gradient_checkpointing", "READ never back-propagates through the frozen backbone, so "
        "there is nothing to checkpoint there; ReadConfig.recompute bounds the side network's activation memory")
    create_or_update_model_card = _cannot("create_or_update_model_card", "readapt writes no PEFT model card; the "
                                          "adapter folder's adapter_config.json records the method, config and backbone")

    def supports_lora_conversion(self, adapter_name: str = DEFAULT_ADAPTER) -> bool:
        """False: a READ adapter is no weight delta, so no LoRA can stand for it."""
        return False


COMPILED_PREFIX = "_orig_mod."  # where torch.compile's OptimizedModule keeps the module it compiled


def _uncompiled_key(key: str) -> str:
    """A state-dict key of `torch.compile(model)` (or of a model with compiled sub-modules) as the model names it."""
    return key.replace(COMPILED_PREFIX, "") if COMPILED_PREFIX in key else key


def refuse_compiled_backbone(backbone: nn.Module) -> None:
    """READ hooks the backbone's own layers and trains its head modules by name; through a torch.compile wrapper it
    would find no head to train and record no backbone source, so READ is attached first and the ReadModel compiled."""
    if isinstance(backbone.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module):
        raise ConfigError(f"the backbone is a torch.compile wrapper ({type(backbone).__name__}): READ hooks the "
                          "backbone's own layers and trains its head by name, which the wrapper hides; attach READ to "
                          "the uncompiled backbone and compile the READ model instead (torch.compile(model), "
                          "model.compile(), or TrainingArguments(torch_compile=True))")


def adapter_folder_problem(directory: Path) -> str | None:
    """Why `directory` cannot be loaded as one adapter when it holds only the sub-folders that save_pretrained
    writes for adapters not named "default"; None otherwise (the usual checks then report any other problem)."""
    if not directory.is_dir() or (directory / CONFIG_NAME).is_file():
        return None
    inside = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    if not inside:
        return None
    return (f"{directory} holds no adapter of its own, only {', '.join(inside)} in sub-folders (save_pretrained puts "
            f"adapters not named 'default' there); load one from {directory / inside[0]}")


def check_adapter_folder(directory: Path) -> None:
    problem = adapter_folder_problem(directory)
    if problem is not None:
        raise IncompatibleAdapterError(problem)
