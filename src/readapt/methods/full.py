"""Full fine-tuning: every backbone weight trained; the saved 'adapter' is the whole model's weights."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME, check_backbone_compatible, read_adapter_metadata
from readapt.backbone import describe_backbone
from readapt.errors import IncompatibleAdapterError
from readapt.io import atomic_save_safetensors, atomic_write_json, load_safetensors
from readapt.methods.base import Method, check_options


class FullFineTuning(Method):
    """Every backbone weight trained; the 'adapter' is the whole model's weights."""

    name = "full"
    default_lr = 5e-5

    def prepare(self, backbone, options):
        check_options(self.name, options, {})
        return backbone.requires_grad_(True)

    def save(self, model, directory):
        state = model.state_dict()
        # Tied weights (e.g. T5's shared embedding and LM head) are one tensor: safetensors refuses
        # aliases, so keep each storage once and re-tie on load (load_state_dict with strict=False).
        seen, unique = set(), {}
        for key, tensor in state.items():
            pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if pointer not in seen:
                seen.add(pointer)
                unique[key] = tensor
        atomic_save_safetensors(Path(directory) / WEIGHTS_NAME, unique, metadata={"format": "pt"})
        atomic_write_json(Path(directory) / CONFIG_NAME, {
            "method": self.name, "backbone": describe_backbone(model).signature(),
            "base_model_name_or_path": getattr(model.config, "_name_or_path", ""),
        })

    def load(self, backbone, directory):
        directory = Path(directory)
        metadata = read_adapter_metadata(directory, method=self.name)
        check_backbone_compatible(metadata["backbone"], describe_backbone(backbone).signature(), directory)
        state = load_safetensors(directory / WEIGHTS_NAME)
        result = backbone.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise IncompatibleAdapterError(f"{directory}: unexpected weights {result.unexpected_keys[:5]}")
        missing = [k for k in result.missing_keys if not _is_tied(backbone, k, state)]
        if missing:
            raise IncompatibleAdapterError(f"{directory}: missing weights {missing[:5]}")
        return backbone.eval().requires_grad_(False)


def _is_tied(model: nn.Module, key: str, saved: dict) -> bool:
    """A missing key is fine when its tensor is shared with one that was saved (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    if target is None:
        return False
    return any(params.get(other) is target for other in saved)
