"""`readapt eval --adapter DIR` reads the task, its columns and max length from the adapter's task.json: a GLUE
adapter needs no --task, a custom one only the rows to score; what the flags name overrides task.json."""

from __future__ import annotations

import json

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main

FEW = ["--max-train-samples", "24", "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "1",
       "--max-length", "48", "--no-progress"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@needs_real_glue
def test_glue_adapter_is_evaluated_from_its_task_file(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLUE_DIR", str(REAL_GLUE_DIR))
    out = tmp_path / "run"
    assert main(["train", "--task", "mrpc", "--model", str(tiny_models["bert"]), "--output-dir", str(out), *FEW]) == 0
    best = json.loads((out / "metrics.json").read_text())["best_dev"]["validation"]
    scores = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(out / "adapter"), "--model", str(tiny_models["bert"]),
                 "--max-eval-samples", "16", "--no-progress", "--output", str(scores)]) == 0
    evaluated = json.loads(scores.read_text())["validation"]
    assert evaluated == pytest.approx(best, abs=1e-6)  # same task, same rows, same max length (48, from task.json)


def test_custom_adapter_needs_only_the_rows_to_score(tiny_models, tmp_path, capsys):
    train, dev = tmp_path / "train.csv", tmp_path / "dev.csv"
    rows = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("awful plot", "neg")] * 4
    train.write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows))
    dev.write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows[:6]))
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(train), "--validation-file", str(dev), "--text-columns", "review",
                 "--label-column", "sentiment", "--model", str(tiny_models["bert"]), "--output-dir", str(out),
                 "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    best = json.loads((out / "metrics.json").read_text())["best_dev"]["validation"]

    def accuracy(path) -> float:
        scores = tmp_path / "eval.json"
        assert main(["eval", "--adapter", str(out / "adapter"), "--model", str(tiny_models["bert"]),
                     "--validation-file", str(path), "--no-progress", "--output", str(scores)]) == 0
        return json.loads(scores.read_text())["validation"]["accuracy"]

    assert accuracy(dev) == pytest.approx(best["accuracy"], abs=1e-6)
    # Files with one label each: their own label set ("pos" alone is label 0 of that file) is mapped onto the
    # adapter's (neg, pos), so the two parts' hits add up to the whole file's.
    parts = {}
    for label in ("pos", "neg"):
        part = [(t, y) for t, y in rows[:6] if y == label]
        parts[label] = (tmp_path / f"{label}.csv", len(part))
        parts[label][0].write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in part))
    hits = sum(accuracy(path) * count for path, count in parts.values())
    assert hits == pytest.approx(accuracy(dev) * 6, abs=1e-6)

    assert main(["eval", "--adapter", str(out / "adapter"), "--model", str(tiny_models["bert"])]) == 2
    assert "trained on a custom task (review -> labels): give the rows to score with --validation-file" in \
        _one_line_error(capsys)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("review,sentiment\nfine,meh\n")
    assert main(["eval", "--adapter", str(out / "adapter"), "--model", str(tiny_models["bert"]), "--validation-file",
                 str(unknown)]) == 2
    assert "label(s) meh are not among the adapter's labels (neg, pos)" in _one_line_error(capsys)
