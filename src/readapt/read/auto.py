"""AutoReadModel: a READ model from its adapter folder alone (PEFT's AutoPeftModel...from_pretrained).

The adapter records its backbone (adapter_config.json: `base_model_name_or_path`, the backbone signature, its dtype
and label settings); readapt.pretrained.load_backbone builds it again (the embedded all-MiniLM-L6-v2, the GGUF
SmolLM2, a local folder or .gguf file, a Hub id) with the head the adapter was trained with, and the adapter is
loaded onto it. A backbone that is missing, or that is not the one the adapter was trained on, is one line.
"""

from __future__ import annotations

from pathlib import Path

from readapt.adapter_files import WEIGHTS_NAME, check_backbone_compatible, read_adapter_metadata, task_labels
from readapt.backbone import DECODER_ONLY, describe_backbone
from readapt.errors import IncompatibleAdapterError
from readapt.io import load_safetensors
from readapt.read.adapters import DEFAULT_ADAPTER, apply_label_settings
from readapt.read.model import ReadModel
from readapt.read.peft_surface import check_adapter_folder
from readapt.read.sources import portable_source


class AutoReadModel:
    """`AutoReadModel.from_pretrained(adapter_dir)`: the recorded backbone with the adapter on it."""

    @classmethod
    def from_pretrained(cls, adapter_directory: str, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                        *, backbone: str | None = None, dtype: str | None = None, **load_options) -> ReadModel:
        """`backbone`: another name or path for the recorded backbone (a moved folder); it must be the same model.
        `dtype`: the backbone weights' dtype, by default the one the adapter was trained with. `load_options` go to
        readapt.pretrained.load_backbone (device_map, max_memory, offload_folder)."""
        from readapt.pretrained import load_backbone

        directory = Path(adapter_directory)
        check_adapter_folder(directory)
        metadata = read_adapter_metadata(directory, method="read")
        source = backbone or portable_source(metadata.get("base_model_name_or_path") or "")
        if not source:
            raise IncompatibleAdapterError(f"adapter {directory} does not record its backbone; build the backbone and "
                                           "use ReadModel.from_pretrained(backbone, adapter_dir), or pass backbone=...")
        if backbone is None:
            _check_gguf_folder(Path(source), directory)
        signature = metadata["backbone"]
        num_labels, is_regression, labels = adapter_labels(directory, metadata)
        decoder_head = "classifier" if (signature.get("family") == DECODER_ONLY and
                                        signature.get("architecture", "").endswith("ForSequenceClassification")) \
            else "label-words"
        loaded = load_backbone(source, num_labels, is_regression, dtype or metadata.get("backbone_dtype"),
                               decoder_head=decoder_head, **load_options)
        check_backbone_compatible(signature, describe_backbone(loaded.model).signature(), directory)
        if labels:  # the label names and problem type it was trained with
            apply_label_settings(loaded.model, {"num_labels": num_labels, "id2label": labels.get("id2label"),
                                                "label2id": labels.get("label2id"),
                                                "problem_type": labels.get("problem_type")})
        return ReadModel.from_pretrained(loaded.model, directory, adapter_name=adapter_name, is_trainable=is_trainable)


def _check_gguf_folder(source: Path, directory: Path) -> None:
    """transformers records a GGUF backbone's folder, not its file (from_pretrained(folder, gguf_file=...)); where the
    recorded folder holds one .gguf file that is the backbone (readapt.read.sources.portable_source), where it holds
    several the adapter does not say which."""
    if not source.is_dir() or (source / "config.json").is_file():
        return
    ggufs = sorted(p.name for p in source.glob("*.gguf"))
    if len(ggufs) > 1:
        raise IncompatibleAdapterError(
            f"adapter {directory} records the backbone folder {source}, which holds {len(ggufs)} GGUF files "
            f"({', '.join(ggufs)}), and not which one it was trained on (transformers records a GGUF model's folder "
            f"only): name it with backbone='{source / ggufs[0]}' (or another of them)")


def adapter_labels(directory: Path, metadata: dict) -> tuple[int, bool, dict]:
    """(number of labels, regression?, the recorded label settings) of a classification adapter: from its metadata
    (save_pretrained records them), else its task.json (`readapt train` writes one), else its head's output size."""
    labels = dict(metadata.get("labels") or {})
    if isinstance(labels.get("id2label"), dict):  # JSON keys are strings
        labels["id2label"] = {int(k): v for k, v in labels["id2label"].items()}
    if isinstance(labels.get("num_labels"), int):  # one output and no problem type: regression, as transformers has it
        problem = labels.get("problem_type")
        return labels["num_labels"], problem == "regression" or (problem is None and labels["num_labels"] == 1), labels
    names, regression = task_labels(directory)
    if regression is not None:
        return (1 if regression else len(names)), regression, {}
    if not metadata.get("head_modules"):
        return 2, False, {}  # no trained head: a language model's label count is not used
    sizes = {value.shape[0] for key, value in load_safetensors(directory / WEIGHTS_NAME).items()
             if key.startswith("head.") and key.endswith(".weight") and value.dim() == 2
             and value.shape[0] != value.shape[1]}  # the classifier's rows; a pooler or dense layer is square
    if len(sizes) != 1:
        raise IncompatibleAdapterError(f"adapter {directory} records no label count and its head does not tell it; "
                                       "build the backbone and use ReadModel.from_pretrained(backbone, adapter_dir)")
    return sizes.pop(), False, {}
