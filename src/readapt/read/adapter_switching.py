"""ReadModel's named adapters under PEFT's names: which one runs (active_adapter, set_adapter,
using_adapter), loading, reloading and deleting one, and the checks that several share one attachment.
A mixin of ReadModel (readapt.read.model), kept apart so that the model file holds READ itself."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from readapt.adapter_files import (
    WEIGHTS_NAME,
    check_backbone_compatible,
    copy_into,
    read_adapter_metadata,
)
from readapt.errors import ConfigError, IncompatibleAdapterError
from readapt.frozen import LOW_PRECISION, set_submodule
from readapt.io import load_safetensors
from readapt.read.adapters import (
    NamedAdapter,
    apply_label_settings,
    check_adapter_name,
    head_for,
    label_settings,
    labels_for,
)
from readapt.read.config import ReadConfig


class AdapterSwitching:
    """Named-adapter methods of ReadModel; they use its backbone, info, named_adapters and side-network
    builders."""

    @property
    def active_adapter(self) -> str:
        """The name of the adapter whose side networks and head run now."""
        return self.named_adapters.active

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return self.named_adapters.names

    def list_adapters(self) -> list[str]:
        return self.adapters

    @property
    def adapter_configs(self) -> dict[str, ReadConfig]:
        """Each adapter's READ config (PEFT's `peft_config`)."""
        return self.named_adapters.configs()

    def load_adapter(self, adapter_directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a READ adapter saved with `save_pretrained` (or `readapt train`) next to the ones already loaded.
        It must come from a backbone like this one (same signature) and attach READ the same way (same stacks,
        same coupling, same head module names); its head may have another shape (another label set): it gets
        its own head modules. The active adapter does not change (use `set_adapter`)."""
        check_adapter_name(adapter_name)
        adapter_directory = Path(adapter_directory)
        metadata = read_adapter_metadata(adapter_directory, method="read")
        check_backbone_compatible(metadata["backbone"], self.info.signature(), adapter_directory)
        try:
            config = ReadConfig.from_dict(metadata["config"])
        except ConfigError as exc:
            raise IncompatibleAdapterError(f"adapter {adapter_directory}: {exc}") from None
        if adapter_name in self.named_adapters:  # PEFT's semantics: new weights for it (Trainer resumes this way)
            self._reload_adapter(adapter_name, config, adapter_directory, is_trainable)
            return
        self._check_same_attachment(config, metadata, adapter_directory)
        state = self._readable_state(load_safetensors(adapter_directory / WEIGHTS_NAME), config)
        read = self._side_networks(config)
        heads = {name: self._new_head(name, state, adapter_directory) for name in self.head_module_names}
        copy_into(self._adapter_tensors(read, heads), state, str(adapter_directory))
        if config.h0 == "embeddings":
            self._install_embedding_hooks()
        for module in (read, *heads.values()):
            module.requires_grad_(is_trainable)
        labels = labels_for(self.backbone, self.info.stacks[-1].hidden_size, heads, adapter_directory)
        self.named_adapters.add(adapter_name, NamedAdapter(config, read, heads, labels))

    def _reload_adapter(self, adapter_name: str, config: ReadConfig, directory: Path, is_trainable: bool) -> None:
        adapter = self.named_adapters.get(adapter_name)
        if config != adapter.config:
            changed = sorted(k for k, v in config.to_dict().items() if adapter.config.to_dict().get(k) != v)
            raise ConfigError(f"an adapter named {adapter_name!r} is already loaded with another READ config "
                              f"({', '.join(changed)} differ from {directory}'s); delete it first or pick another name")
        try:
            copy_into(self._adapter_tensors(adapter.read, adapter.heads),
                      self._readable_state(load_safetensors(directory / WEIGHTS_NAME), config), str(directory))
        except IncompatibleAdapterError as exc:
            raise IncompatibleAdapterError(f"an adapter named {adapter_name!r} is already loaded: {exc}") from None
        for module in (adapter.read, *adapter.heads.values()):
            module.requires_grad_(is_trainable)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the adapter that runs: its side networks and head modules go into the model.
        Which weights train is chosen when an adapter is loaded or added (`is_trainable`); `inference_mode=True`
        also freezes the activated one (PEFT's flag; unlike PEFT, False leaves its weights as they are)."""
        adapter = self.named_adapters.get(adapter_name)
        if self._adapters_disabled:
            raise ConfigError("set_adapter inside disable_adapter(): switch adapters before or after the block")
        if inference_mode:
            for module in (adapter.read, *adapter.heads.values()):
                module.requires_grad_(False)
        if adapter_name == self.named_adapters.active:
            return
        self.named_adapters.get(self.named_adapters.active).labels = label_settings(self.backbone)
        self.read = adapter.read.to(next(self.read.parameters()).device)  # where the side networks live
        self.read_config = adapter.config
        for name, head in adapter.heads.items():
            current = next(self.backbone.get_submodule(name).parameters(), None)
            set_submodule(self.backbone, name, head if current is None else head.to(current.device))
        apply_label_settings(self.backbone, adapter.labels)
        self.named_adapters.active = adapter_name
        for module in (adapter.read, *adapter.heads.values()):  # the mode train() gives them (the body's is unchanged)
            module.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget an adapter. Deleting the active one activates the first of the others; the last one stays."""
        self.named_adapters.get(adapter_name)
        if len(self.named_adapters) > 1 and adapter_name == self.named_adapters.active:
            self.set_adapter(next(name for name in self.named_adapters.names if name != adapter_name))
        self.named_adapters.remove(adapter_name)

    @contextlib.contextmanager
    def using_adapter(self, adapter_name: str):
        """Within this block `adapter_name` is active; the previously active adapter comes back afterwards."""
        previous = self.named_adapters.active
        self.set_adapter(adapter_name)
        try:
            yield self
        finally:
            if previous in self.named_adapters:
                self.set_adapter(previous)

    def _check_same_attachment(self, config: ReadConfig, metadata: dict, directory: Path) -> None:
        """Adapters share this model's hooks: the same stacks, coupling and head module names."""
        try:
            stacks = [s.name for s in self._select_stacks(self.info, config)]
        except ConfigError as exc:
            raise IncompatibleAdapterError(f"adapter {directory}: {exc}") from None
        ours = [s.name for s in self.adapted_stacks]
        if stacks != ours:
            raise IncompatibleAdapterError(f"adapter {directory} adapts the {' + '.join(stacks)} stack(s); the adapters "
                                           f"of this model adapt {' + '.join(ours)}")
        if config.couple_encoder != self.read_config.couple_encoder:
            raise IncompatibleAdapterError(f"adapter {directory} has couple_encoder={config.couple_encoder}, the adapters "
                                           f"of this model couple_encoder={self.read_config.couple_encoder}")
        heads = list(metadata.get("head_modules") or [])
        if heads != self.head_module_names:
            raise IncompatibleAdapterError(f"adapter {directory} trains the head module(s) {heads}; the adapters of "
                                           f"this model train {self.head_module_names}")

    def _new_head(self, name: str, state: dict[str, torch.Tensor], directory: Path) -> nn.Module:
        """A loaded adapter's own instance of head module `name` (resized to its label count where needed)."""
        head = head_for(self.backbone, name, state, directory)
        return self._float32_head(head) if self.backbone_dtype in LOW_PRECISION else head
