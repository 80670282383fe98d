"""`readapt train` / `readapt eval` on a few dozen real GLUE rows with tiny random backbones, and every
bad-input case: one line on stderr, exit status 2, no traceback, no output directory left behind."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main

FEW = ["--max-train-samples", "24", "--max-eval-samples", "16", "--batch-size", "8", "--epochs", "2",
       "--max-length", "48", "--no-progress"]


def _train(tmp_path, *extra) -> tuple[int, Path]:
    out = tmp_path / "run"
    return main(["train", "--output-dir", str(out), *FEW, *extra]), out


@needs_real_glue
@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "rte", "wnli"])
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_train_then_eval_on_real_rows(task, kind, tiny_models, tmp_path, capsys):
    code, out = _train(tmp_path, "--task", task, "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models[kind]))
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.json", "train.log"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                    "task.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["train_examples"] == 24 and metrics["dev_examples"] == {"validation": 16}
    main_metric = metrics["main_metric"]
    assert main_metric in metrics["best_dev"]["validation"]
    assert metrics["peak_memory_bytes"] > 0 and metrics["peak_memory_meter"]
    assert {"torch", "transformers", "readapt"} <= set(metrics["versions"])
    summary = capsys.readouterr().out
    assert "best epoch" in summary and "peak memory" in summary and "trainable parameters" in summary

    # eval reproduces the best epoch's dev metrics from the saved adapter
    scores = tmp_path / "eval.json"
    assert main(["eval", "--task", task, "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models[kind]),
                 "--adapter", str(out / "adapter"), "--max-eval-samples", "16", "--max-length", "48",
                 "--no-progress", "--output", str(scores)]) == 0
    evaluated = json.loads(scores.read_text())["validation"]
    for key, value in metrics["best_dev"]["validation"].items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key


@needs_real_glue
def test_decoder_only_backbone_and_full_method(tiny_models, tmp_path, capsys):
    code, out = _train(tmp_path, "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["llama"]))
    assert code == 0, capsys.readouterr().err
    full = tmp_path / "full"
    assert main(["train", "--task", "mrpc", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--method", "full", "--output-dir", str(full), *FEW]) == 0
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["trainable_parameters"] == metrics["backbone_parameters"]
    assert set(metrics["best_dev"]["validation"]) == {"accuracy", "f1", "combined"}
    assert main(["eval", "--task", "mrpc", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--adapter", str(full / "adapter"), "--max-eval-samples", "16", "--max-length", "48",
                 "--no-progress"]) == 0


def test_custom_task_files(tiny_models, tmp_path, capsys):
    rows = [{"text": f"sample number {i} is {'good' if i % 2 else 'bad'}", "score": float(i % 5) / 2} for i in range(30)]
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = _train(tmp_path, "--train-file", str(tmp_path / "train.jsonl"), "--validation-file",
                       str(tmp_path / "dev.jsonl"), "--text-columns", "text", "--label-column", "score",
                       "--task-type", "regression", "--model", str(tiny_models["bert"]))
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["main_metric"] == "combined"


# ------------------------------------------------------------------------------------------- bad input
def _bad_glue_dir(tmp_path: Path, task_dir: str, train: str, dev: str | None = None) -> Path:
    root = tmp_path / "glue"
    (root / task_dir).mkdir(parents=True)
    (root / task_dir / "train.tsv").write_text(train)
    if dev is not None:
        with gzip.open(root / task_dir / "dev.tsv.gz", "wt") as f:
            f.write(dev)
    return root


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
RTE_ROW = "0\tA man sleeps.\tSomeone sleeps.\tentailment\n"


def _bad_cases(tmp_path: Path, tiny_models) -> dict[str, tuple[list[str], str]]:
    ok_dev = RTE_HEADER + RTE_ROW
    return {
        "unknown task": (["--task", "rtee"], "unknown GLUE task 'rtee'; expected one of cola, sst2"),
        "missing data dir": (["--task", "rte", "--data-dir", str(tmp_path / "nowhere")], "nowhere"),
        "missing file": (["--task", "rte", "--data-dir", str(_bad_glue_dir(tmp_path / "a", "RTE", RTE_HEADER + RTE_ROW))],
                         "dev.tsv"),
        "malformed row": (["--task", "rte", "--data-dir", str(_bad_glue_dir(
            tmp_path / "b", "RTE", RTE_HEADER + RTE_ROW + "1\tonly two columns\n", ok_dev))], "line 3"),
        "label outside set": (["--task", "rte", "--data-dir", str(_bad_glue_dir(
            tmp_path / "c", "RTE", RTE_HEADER + RTE_ROW + "1\tx\ty\tcontradiction\n", ok_dev))], "contradiction"),
        "empty split": (["--task", "rte", "--data-dir", str(_bad_glue_dir(tmp_path / "d", "RTE", RTE_HEADER, ok_dev))],
                        "train.tsv: no data rows"),
        "regression target not a number": (["--task", "stsb", "--data-dir", str(_bad_glue_dir(
            tmp_path / "e", "STS-B",
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tg\tf\t2012\t1\ts\ts\tA\tB\tfive\n", ""))], "five"),
        "unknown model": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tmp_path / "no-such-model")],
                          "no-such-model"),
        "negative lr": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--lr", "-1"], "--lr=-1.0 is out of range"),
        "hidden size 0": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--read-hidden-size", "0"],
                          "ReadConfig.hidden_size=0"),
        "unknown method": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--method", "magic"], "unknown method 'magic'"),
        "custom task without columns": (["--train-file", str(tmp_path / "t.csv"), "--validation-file",
                                         str(tmp_path / "v.csv")], "--text-columns"),
    }


@pytest.mark.parametrize("case", [
    "unknown task", "missing data dir", "missing file", "malformed row", "label outside set", "empty split",
    "regression target not a number", "unknown model", "negative lr", "hidden size 0", "unknown method",
    "custom task without columns",
])
@needs_real_glue
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, tiny_models):
    arguments, expected = _bad_cases(tmp_path, tiny_models)[case]
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--model", str(tiny_models["bert"]), *FEW, *arguments]
                if "--model" not in arguments else ["train", "--output-dir", str(out), *FEW, *arguments])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("readapt: error: "), err
    assert expected in lines[0]
    assert not out.exists() and not (tmp_path / ".run.partial").exists()


@needs_real_glue
def test_output_directory_holding_another_run_is_refused(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code = main(["train", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(out), *FEW])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


@needs_real_glue
def test_eval_with_adapter_from_another_backbone(tiny_models, tmp_path, capsys):
    code, out = _train(tmp_path, "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]))
    assert code == 0
    capsys.readouterr()
    assert main(["eval", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["llama"]),
                 "--adapter", str(out / "adapter"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on BertForSequenceClassification" in err and "LlamaForSequenceClassification" in err


def test_real_process_exit_status_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "readapt", "train", "--task", "nope", "--output-dir",
                           str(tmp_path / "x")], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "unknown GLUE task 'nope'" in done.stderr
    debug = subprocess.run([sys.executable, "-m", "readapt", "train", "--task", "nope", "--debug"],
                           capture_output=True, text=True, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


@needs_real_glue
def test_two_runs_into_one_output_directory_are_refused(tiny_models, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    with open(tmp_path / ".run.lock", "w") as lock:  # what a running `readapt train` holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["train", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                     "--output-dir", str(out), *FEW])
    assert code == 2 and "another readapt run is writing to" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / ".run.lock").exists()
