"""Data-parallel training through Accelerate: `readapt train --num-processes 2` on the CPU (gloo) matches one
process with the same global batch and seed, and evaluation scores every dev example exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main
from readapt.io import load_safetensors
from readapt.pretrained import embedded_backbone_dir

# 64 STS-B rows, batch 8 (4 per process); 27 dev rows: the last eval batch (3 rows) cannot be split evenly,
# so Accelerate repeats an example to even it out and gather_for_metrics must drop it again. Regression on
# purpose: a repeated or dropped example would move Pearson/Spearman.
RUN = ["train", "--task", "stsb", "--max-train-samples", "64", "--max-eval-samples", "27", "--batch-size", "8",
       "--eval-batch-size", "8", "--epochs", "2", "--max-length", "48", "--no-progress", "--seed", "5",
       "--read-token-mixer-dropout", "0"]  # each process would draw its own dropout masks (see the fixture)


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory) -> Path:
    """Dropout off: with it, each process would draw its own masks, and the comparison would measure that."""
    path = tmp_path_factory.mktemp("bert-no-dropout")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_backbone_dir()).save_pretrained(path)
    return path


def _run(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "readapt", *RUN, "--data-dir", str(REAL_GLUE_DIR), "--model",
                           str(model), "--output-dir", str(out), *extra], env=env, capture_output=True, text=True,
                          check=False)


@needs_real_glue
@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["live", "feature-cache"])
def test_two_processes_match_one(cache, bert_without_dropout, tmp_path):
    # With the feature cache the main process builds it, the other opens it (tmp cache dir per run)
    one, two = tmp_path / "one", tmp_path / "two"
    flags = lambda name: ["--cache-features", "--cache-dir", str(tmp_path / f"cache-{name}")] if cache else []  # noqa: E731
    single = _run(bert_without_dropout, one, *flags("one"))
    assert single.returncode == 0, single.stderr
    double = _run(bert_without_dropout, two, "--num-processes", "2", *flags("two"))
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("readapt train: stsb with read") == 1  # the main process reports, once

    log = (two / "train.log").read_text()
    assert "2 processes (DistributedType.MULTI_CPU)" in log and log.count("done: best epoch") == 1
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "metrics.json", "train.log"]

    first, second = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert first["dev_examples"] == second["dev_examples"] == {"validation": 27}
    if cache:
        assert second["feature_cache"]["bytes"] > 0 and not second["feature_cache"]["reused"]
    # Tolerance: the two runs add the same numbers in another order (a mean over 8 rows vs the mean of two
    # 4-row means, all-reduced), so weights and losses agree to float32 rounding, not bit for bit (measured:
    # weights within 3e-8, dev metrics within 3e-5).
    for a, b in zip(first["epochs"], second["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for metric, value in a["dev"]["validation"].items():
            assert b["dev"]["validation"][metric] == pytest.approx(value, abs=1e-4), metric
    weights_one = load_safetensors(one / "adapter" / "adapter_model.safetensors")
    weights_two = load_safetensors(two / "adapter" / "adapter_model.safetensors")
    for key, value in weights_one.items():
        assert torch.allclose(value, weights_two[key], atol=1e-6, rtol=1e-5), key


@needs_real_glue
def test_batch_sizes_must_split_evenly_over_the_processes(tmp_path, capsys, monkeypatch, tiny_models):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as if launched as one of three processes
    monkeypatch.setenv("RANK", "0")
    code = main([*RUN, "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "must be multiples of the number of processes (3)" in err
    assert not (tmp_path / "run").exists()
