"""Where torchao or bitsandbytes are installed (readapt's `quant` extra), importing transformers' model code
imports them, and they log warnings on import about features readapt does not use on that machine (CUDA-only
kernels that cannot load on a CPU, an optional `kernels` package), plus torch's deprecation notice about an Enum
that torchao registers. A user reads them as errors on every `readapt train`, and they break the CLI's one-line
error messages. Only those messages are dropped, by a filter on the logger that emits each; everything else those
libraries log still shows."""

from __future__ import annotations

import logging

# logger name -> the beginnings of the import-time messages it emits (torchao's: its CUDA kernel libraries, dropped
# only under a CPU build of torch, where they cannot load; on a CUDA build that failure matters and shows)
IMPORT_NOISE = {
    "torchao": ("Failed to load ",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "torch.utils._pytree": ("%s is an Enum subclass and is now natively supported by torch.compile",),
}


class _DropImportNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.prefixes)):
            return True
        if record.name == "torchao":
            import torch  # torchao is importing it: loaded already

            return torch.version.cuda is not None
        return False


def mute_import_noise() -> None:
    """Install the filters (once; getting a logger imports nothing)."""
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropImportNoise) for f in logger.filters):
            logger.addFilter(_DropImportNoise(prefixes))
