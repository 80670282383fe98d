"""benchmarks/gpu.sh runs end to end in its --tiny mode on a CPU (the real figures come from running it on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from readapt.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_mode_runs_every_method_on_cpu(tmp_path):
    output = tmp_path / "r.json"
    # No GPU for this run, and the interpreter running the tests (gpu.sh would otherwise take `python` on PATH).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--tiny", "--output", str(output)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results written to {output}" in done.stdout
    assert "| read |" in done.stdout  # the Markdown table is printed

    results = json.loads(output.read_text())
    assert results["complete"] and results["device"]["type"] == "cpu"
    assert results["versions"]["torch"] and results["settings"]["batch_size"] == 2
    records = {record["method"]: record for record in results["records"]}
    assert len(results["records"]) == len(records) == len(METHODS) + 1
    assert set(records) == {*METHODS, "inference"}

    for name, record in records.items():
        assert record["status"] == "ok", (name, record.get("error"), record.get("traceback"))
        assert record["model"] == "tiny"
        assert record["peak_memory_bytes"] > 0, name
        assert record["step_seconds_mean"] > 0, name
        assert record["steps_timed"] == 3, name
        assert record["energy_joules"] >= 0 and record["energy_meter"], name
        if name == "inference":
            assert record.get("trainable_params") is None
        else:
            assert record["trainable_params"] > 0, name
            assert 0 < record["trainable_percent"] <= 100 + 1e-9, name

    assert records["read"]["trainable_params"] * 10 < records["full"]["trainable_params"]
    ratios = results["read_vs_full"]["tiny"]
    assert set(ratios) == {"peak_memory", "energy_per_step", "step_time", "read_step_over_forward"}
    assert ratios["read_step_over_forward"] == pytest.approx(
        records["read"]["step_seconds_mean"] / records["inference"]["step_seconds_mean"])
    markdown = output.with_suffix(".md").read_text()
    assert "READ relative to full fine-tuning" in markdown and "| inference (no grad) | ok |" in markdown
