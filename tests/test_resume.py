"""Checkpoint and resume: a run killed with SIGKILL mid-epoch, or stopped with SIGINT, and then re-run ends
exactly where an uninterrupted run ends (CPU, same thread count: bit-identical weights and dev metrics);
torn checkpoints are skipped; a run of other settings is never resumed by mistake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main
from readapt.io import load_safetensors
from readapt.recipe.checkpoint import (
    TornCheckpoint,
    list_checkpoints,
    load_checkpoint,
    newest_valid_checkpoint,
    save_checkpoint,
)

# 96 RTE rows, batch 8: 12 steps per epoch, 3 epochs; a checkpoint every 5 steps (never on an epoch end).
RUN = ["--task", "rte", "--max-train-samples", "96", "--max-eval-samples", "32", "--batch-size", "8",
       "--epochs", "3", "--max-length", "48", "--no-progress", "--checkpoint-every", "5", "--seed", "3"]


def _command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "readapt", "train", "--data-dir", str(REAL_GLUE_DIR), "--model", str(model),
            "--output-dir", str(out), *RUN, *extra]


def _environment(delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", READAPT_DEBUG_STEP_DELAY=str(delay))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


def _wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, at_least_step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [step for step, _ in list_checkpoints(checkpoints)]
        if steps and steps[-1] >= at_least_step:
            return steps[-1]
        if process.poll() is not None:
            raise AssertionError(f"the run ended before step {at_least_step}: {process.stderr.read()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("no checkpoint appeared in time")


def _adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(out / "adapter" / "adapter_model.safetensors")


def _same_result(a: Path, b: Path) -> None:
    first, second = _adapter_weights(a), _adapter_weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    metrics_a, metrics_b = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert metrics_a["best_epoch"] == metrics_b["best_epoch"]
    assert [e["dev"] for e in metrics_a["epochs"]] == [e["dev"] for e in metrics_b["epochs"]]
    assert [e["train_loss"] for e in metrics_a["epochs"]] == [e["train_loss"] for e in metrics_b["epochs"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(_command(tiny_models["bert"], out), env=_environment(), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return out


@needs_real_glue
@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [7, 12])  # mid-epoch 1 (after the step-5 checkpoint); just after epoch 1
def test_sigkill_mid_run_then_resume_equals_uninterrupted(kill_after_step, uninterrupted, tiny_models, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(tiny_models["bert"], out), env=_environment(delay=0.15),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    _wait_for_checkpoint(process, checkpoints, at_least_step=5 if kill_after_step == 7 else 12)
    time.sleep(0.15 * 2)  # a step or two past it: the kill lands between checkpoints
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists() and list_checkpoints(checkpoints)

    resumed = subprocess.run(_command(tiny_models["bert"], out), env=_environment(), capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] >= 5
    assert not (tmp_path / ".run.partial").exists() and not (out / "checkpoints").exists()
    _same_result(out, uninterrupted)


@needs_real_glue
@pytest.mark.slow
def test_sigint_stops_gracefully_with_a_checkpoint_then_resumes(uninterrupted, tiny_models, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(tiny_models["bert"], out), env=_environment(delay=0.15),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    _wait_for_checkpoint(process, checkpoints, at_least_step=5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("readapt: stopped by SIGINT at step ") and "re-run the same command" in last
    stopped_at = int(last.split("at step ")[1].split()[0])
    assert list_checkpoints(checkpoints)[-1][0] == stopped_at  # the checkpoint of the very step it stopped at
    assert not out.exists()

    resumed = subprocess.run(_command(tiny_models["bert"], out), env=_environment(), capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed_at_steps"] == [stopped_at]
    _same_result(out, uninterrupted)


# ------------------------------------------------------------------------------------------- in-process
FEW = ["--task", "rte", "--max-train-samples", "24", "--max-eval-samples", "8", "--batch-size", "8", "--epochs", "2",
       "--max-length", "32", "--no-progress", "--checkpoint-every", "1"]


def _train(tiny_models, out: Path, *extra: str) -> int:
    return main(["train", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(out), *FEW, *extra])


def _stop_at_step(monkeypatch, step: int) -> None:
    """Make optimizer step `step` raise, as a crash would (after the checkpoints before it were written)."""
    from readapt.recipe import steps as training

    original = training.save_checkpoint

    def crash(directory, at, *args, **kwargs):
        path = original(directory, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt  # not a ReadaptError: leaves the run as a crash would
        return path

    monkeypatch.setattr(training, "save_checkpoint", crash)


def _crash_at_step(monkeypatch, tiny_models, out, step: int) -> None:
    """A run that crashes at optimizer step `step` (exit 130, checkpoints before it kept), then normal code again."""
    _stop_at_step(monkeypatch, step)
    assert _train(tiny_models, out) == 130
    monkeypatch.undo()


@needs_real_glue
def test_crash_keeps_checkpoints_and_rerun_resumes(tiny_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _crash_at_step(monkeypatch, tiny_models, out, 4)
    staging = tmp_path / ".run.partial"
    assert [step for step, _ in list_checkpoints(staging / "checkpoints")] == [3, 4]  # keep 2
    assert not out.exists()
    assert _train(tiny_models, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_at_steps"] == [4] and len(metrics["epochs"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.json", "train.log"]
    assert "resuming from checkpoint-00000004" in (out / "train.log").read_text()

    # the same command once more: the run is finished, nothing is trained again
    capsys.readouterr()
    before = (out / "metrics.json").read_text()
    assert _train(tiny_models, out) == 0
    assert (out / "metrics.json").read_text() == before


@needs_real_glue
def test_torn_newest_checkpoint_falls_back_to_the_previous(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _crash_at_step(monkeypatch, tiny_models, out, 4)
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    newest = checkpoints / "checkpoint-00000004" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    with pytest.raises(TornCheckpoint, match="truncated"):
        load_checkpoint(newest.parent)
    assert newest_valid_checkpoint(checkpoints).step == 3
    assert _train(tiny_models, out) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_at_steps"] == [3]


@needs_real_glue
def test_checkpoints_of_another_run_are_not_resumed_or_discarded(tiny_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _crash_at_step(monkeypatch, tiny_models, out, 2)
    capsys.readouterr()
    assert _train(tiny_models, out, "--lr", "5e-4") == 2  # other settings: refused, checkpoints kept
    err = capsys.readouterr().err.strip()
    assert "checkpoints of another unfinished run" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert list_checkpoints(tmp_path / ".run.partial" / "checkpoints")
    assert _train(tiny_models, out, "--lr", "5e-4", "--overwrite") == 0  # discards them, starts over
    assert json.loads((out / "metrics.json").read_text())["resumed_at_steps"] == []


@needs_real_glue
def test_resume_flags(tiny_models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _train(tiny_models, out, "--resume") == 2
    assert "--resume: no valid checkpoint of this run" in capsys.readouterr().err
    assert not out.exists()
    _crash_at_step(monkeypatch, tiny_models, out, 2)
    assert _train(tiny_models, out, "--no-resume") == 0  # starts over
    assert json.loads((out / "metrics.json").read_text())["resumed_at_steps"] == []


@needs_real_glue
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_models, tmp_path, monkeypatch, capsys):
    from readapt.read import model as read_model

    original = read_model.ReadModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(read_model.ReadModel, "forward", forward)
    out = tmp_path / "run"
    assert _train(tiny_models, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the loss became nan at step 3 (epoch 1)" in err and "last good checkpoint (step 2) is kept" in err
    assert newest_valid_checkpoint(tmp_path / ".run.partial" / "checkpoints").step == 2
    assert not out.exists()


@needs_real_glue
def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tiny_models, tmp_path, monkeypatch, capsys):
    import errno

    from readapt import io

    original = io.save_file
    calls = {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 8:  # within the third checkpoint (3 files each, counting from the first)
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_file)
    out = tmp_path / "run"
    assert _train(tiny_models, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "could not write a checkpoint at step 3: the disk is full" in err
    assert "the last good checkpoint (step 2) is intact" in err
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-00000001", "checkpoint-00000002"] or \
        sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-00000001", "checkpoint-00000002"]
    assert newest_valid_checkpoint(checkpoints).step == 2  # nothing torn left behind, no temporary files
    monkeypatch.undo()
    assert _train(tiny_models, out) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_at_steps"] == [2]


def test_checkpoint_round_trip_restores_optimizer_scheduler_and_rng(tmp_path):
    import random

    import numpy as np

    from readapt.recipe.checkpoint import restore_rng, restore_training_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"note": "x"}, keep=2)
    expected = (torch.rand(3), np.random.rand(), random.random())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    for _ in range(2):  # move everything on
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    checkpoint = load_checkpoint(path)
    assert checkpoint.state["progress"] == {"note": "x"}
    restore_training_state(checkpoint, model, optimizer, scheduler)
    restore_rng(checkpoint)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1] and random.random() == expected[2]

    # keep: only the newest two survive; only safetensors + JSON are in a checkpoint
    for step in (4, 5):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoint-00000005").iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]


def test_a_checkpoint_without_its_state_file_is_torn(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, keep=3)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {}, keep=3)
    (path / "state.json").unlink()
    assert newest_valid_checkpoint(tmp_path).step == 1
    (tmp_path / "checkpoint-00000001" / "rng.safetensors").write_bytes(b"\x80\x04pickle")
    assert newest_valid_checkpoint(tmp_path) is None


@needs_real_glue
def test_time_based_checkpoints(tiny_models, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _stop_at_step(monkeypatch, 2)
    arguments = [a for a in FEW if a not in ("--checkpoint-every", "1")]
    code = main(["train", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]), "--output-dir",
                 str(out), *arguments, "--checkpoint-minutes", "1e-9", "--keep-checkpoints", "5"])
    assert code == 130
    assert [step for step, _ in list_checkpoints(tmp_path / ".run.partial" / "checkpoints")] == [1, 2]
