"""READ (REcurrent ADaptation), laid out like a PEFT tuner:

    config.py        ReadConfig: every knob of the side network
    side_network.py  ReadSideNetwork: the RNN across a stack's layers that computes δφ
    model.py         ReadModel: attaches side networks to a frozen backbone; φ_N + δφ (`_apply_correction`)
    attach.py        the hooks and stack wrappers that capture the frozen layer states
    capture.py       what one stack call leaves for the side network
    adapters.py      named adapters (load / set / delete) and their task heads
    shared_pass.py   several adapters, one frozen pass; correcting one position only
    cache/           the feature cache: frozen states stored once, replayed every epoch
    peft_surface.py  PEFT's names (disable_adapter, add_adapter, save_pretrained's layout, ...) for READ
    precision.py     dtype / device moves: the backbone takes a cast, what READ trains stays float32
    sources.py       what an adapter records about its backbone's origin; a hand-loaded backbone's separator
    auto.py          AutoReadModel: a READ model from its adapter folder alone
"""

from readapt.read.config import ReadConfig

# transformers and peft load with the model classes, when first used (see readapt/__init__.py)
_LAZY = {"AutoReadModel": "readapt.read.auto", "ReadModel": "readapt.read.model", "get_read_model": "readapt.read.model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'readapt.read' has no attribute {name!r}")

__all__ = ["AutoReadModel", "ReadConfig", "ReadModel", "get_read_model"]
