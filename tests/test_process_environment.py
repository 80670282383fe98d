"""What importing readapt does to the process: OpenMP's waiting threads sleep (unless the user chose), and the
import-time warnings of optional quantization libraries are dropped while anything else they log still shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from readapt.quiet_imports import IMPORT_NOISE, mute_import_noise


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    code = "import readapt, os; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(code).stdout.strip() == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE").stdout.strip() == "ACTIVE"


def test_import_noise_is_dropped_and_other_warnings_show(caplog):
    mute_import_noise()
    mute_import_noise()  # idempotent: one filter per logger
    assert all(len(logging.getLogger(name).filters) == 1 for name in IMPORT_NOISE)
    pytree = logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type.",
                       "Mode")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        pytree.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


@pytest.mark.slow
def test_building_models_prints_nothing_on_stderr():
    """The embedded backbone with READ and with LoRA (peft imports torchao / bitsandbytes where installed)."""
    code = ("import readapt\nfrom readapt.pretrained import load_backbone\nfrom readapt.methods import get_method\n"
            "get_method('read').prepare(load_backbone(None, num_labels=2).model, {})\n"
            "get_method('lora').prepare(load_backbone(None, num_labels=2).model, {})\n")
    result = _python(code, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines() if "torchao" in line or "kernels-community" in line
             or "Enum subclass" in line]
    assert noise == []
