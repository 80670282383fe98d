"""READ (REcurrent ADaptation), laid out like a PEFT tuner:

    config.py        ReadConfig: every knob of the side network
    side_network.py  ReadSideNetwork: the RNN across a stack's layers that computes δφ
    model.py         ReadModel: attaches side networks to a frozen backbone; φ_N + δφ (`_apply_correction`)
    attach.py        the hooks and stack wrappers that capture the frozen layer states
    capture.py       what one stack call leaves for the side network
    adapters.py      named adapters (load / set / delete) and their task heads
    shared_pass.py   several adapters, one frozen pass; correcting one position only
    cache/           the feature cache: frozen states stored once, replayed every epoch
"""

from readapt.read.config import ReadConfig
from readapt.read.model import ReadModel, get_read_model

__all__ = ["ReadConfig", "ReadModel", "get_read_model"]
