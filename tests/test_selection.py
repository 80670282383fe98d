"""--selection-fraction: the best epoch is chosen on rows held out of train, the dev split is only reported."""

from __future__ import annotations

import json

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main
from readapt.errors import ConfigError
from readapt.recipe import SELECTION_SPLIT, DataConfig, TrainingConfig, load_task_data, train


@needs_real_glue
def test_selection_rows_come_out_of_train_seeded_and_disjoint():
    data = DataConfig(task="rte", data_dir=str(REAL_GLUE_DIR), max_train_samples=100, selection_fraction=0.2)
    data.validate()
    task, train_rows, dev = load_task_data(data, seed=3)
    assert list(dev) == [SELECTION_SPLIT, "validation"] and len(dev[SELECTION_SPLIT]) == 20 and len(train_rows) == 80
    assert not {e.idx for e in train_rows} & {e.idx for e in dev[SELECTION_SPLIT]}
    again = load_task_data(data, seed=3)
    assert [e.idx for e in again[2][SELECTION_SPLIT]] == [e.idx for e in dev[SELECTION_SPLIT]]
    other = load_task_data(data, seed=4)[2][SELECTION_SPLIT]
    assert [e.idx for e in other] != [e.idx for e in dev[SELECTION_SPLIT]]
    with pytest.raises(ConfigError, match="selection-fraction"):
        DataConfig(task="rte", selection_fraction=1.0).validate()


@needs_real_glue
def test_best_epoch_is_chosen_on_the_selection_split(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--max-train-samples", "60", "--max-eval-samples", "24", "--epochs", "3", "--batch-size", "8",
                 "--max-length", "48", "--selection-fraction", "0.25", "--no-progress", "--no-checkpoints",
                 "--output-dir", str(out)]) == 0
    assert "selection accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 45 and metrics["dev_examples"] == {"selection": 15, "validation": 24}
    scores = [e["dev"]["selection"]["accuracy"] for e in metrics["epochs"]]
    assert metrics["best_epoch"] == 1 + scores.index(max(scores))  # the first best on selection, whatever dev says
    assert metrics["best_score"] == max(scores) and "only reported" in metrics["protocol"]


def test_selection_needs_rows_on_both_sides(tmp_path):
    rows = tmp_path / "t.csv"
    rows.write_text("text,label\na,x\nb,y\n")
    config = TrainingConfig(data=DataConfig(train_file=str(rows), validation_file=str(rows), text_columns=["text"],
                                            selection_fraction=0.1), output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="leaves 0 for selection"):
        train(config)
