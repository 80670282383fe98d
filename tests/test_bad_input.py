"""Bad input (issue 7's list, beyond tests/test_cli.py's cases): each gives one clear line on stderr, a non-zero
exit, no traceback, and leaves an existing output directory exactly as it was (even with --overwrite, which
replaces it only when a run succeeds). And: only safetensors and JSON are ever loaded — pickle is refused."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main

FEW = ["--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "8", "--epochs", "1",
       "--max-length", "32", "--no-progress"]


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _existing_output(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.json").write_text('{"earlier": "run"}\n')
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"earlier weights")
    return out


def _assert_one_line_error(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    else:
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _custom(tmp_path: Path, train: bytes | str, dev: bytes | str = "text,label\nfine,1\nbad,0\n", name="t.csv",
            columns="text") -> list[str]:
    train_file = _write(tmp_path / "data" / name, train)
    dev_file = _write(tmp_path / "data" / ("v" + name), dev)
    return ["--train-file", str(train_file), "--validation-file", str(dev_file), "--text-columns", columns]


SST_HEADER = "sentence\tlabel\n"


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    glue = tmp_path / "glue"
    _write(glue / "SST-2" / "train.tsv", "sentence,label\na fine film,1\n")  # commas in a TSV
    _write(glue / "SST-2" / "dev.tsv", SST_HEADER + "good\t1\n")
    _write(glue / "CoLA" / "train.tsv", "gj04\t1\t\tA sentence.\n")
    _write(glue / "CoLA" / "dev.tsv", "")  # empty dev split
    return {
        "wrong delimiter (custom CSV with ';')": (_custom(tmp_path / "a", "text;label\nhello;1\n"),
                                                 "the header looks delimited by ';'"),
        "wrong delimiter (GLUE TSV with commas)": (["--task", "sst2", "--data-dir", str(glue)],
                                                   "the header looks delimited by commas"),
        "missing text column": (_custom(tmp_path / "b", "text,label\nhello,1\n", columns="sentence"),
                                "no column 'sentence'"),
        "missing label column": (_custom(tmp_path / "c", "text,y\nhello,1\n"), "no column 'label'"),
        "non-UTF-8 text": (_custom(tmp_path / "d", "text,label\ncaf\xe9,1\n".encode("latin-1")),
                           "is not valid UTF-8"),
        "data path is a directory": (["--train-file", str(tmp_path), "--validation-file", str(tmp_path),
                                      "--text-columns", "text"], "is a directory, not a file"),
        "data file is a directory": (["--train-file", str(tmp_path / "dir.csv"), "--validation-file",
                                      str(_write(tmp_path / "v.csv", "text,label\nx,1\n")), "--text-columns", "text"],
                                     "is a directory"),
        "empty dev split": (["--task", "cola", "--data-dir", str(glue)], "no data rows"),
        "regression target not a number (custom)": (_custom(tmp_path / "f", "text,score\nhello,high\n",
                                                            "text,score\nok,1.5\n", columns="text") +
                                                    ["--label-column", "score", "--task-type", "regression"], "high"),
        "unknown model name": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", "no-org/no-such-model"],
                               "cannot load model 'no-org/no-such-model'"),
        "unknown RNN type (option)": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--method-option",
                                       'rnn_type="transformer"'], "ReadConfig.rnn_type='transformer' is invalid"),
        "unknown RNN type (flag)": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--rnn-type", "transformer"],
                                    "argument --rnn-type: invalid choice: 'transformer'"),
        "not a number": (["--task", "rte", "--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
        "zero epochs": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--epochs", "0"], "--epochs=0 is out of range"),
        "infinite lr": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--lr", "inf"], "--lr=inf is out of range"),
        "unknown READ option": (["--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--method-option", "hiden_size=8"],
                                "unknown ReadConfig field(s): hiden_size"),
    }


CASES = ["wrong delimiter (custom CSV with ';')", "wrong delimiter (GLUE TSV with commas)", "missing text column",
         "missing label column", "non-UTF-8 text", "data path is a directory", "data file is a directory",
         "empty dev split", "regression target not a number (custom)", "unknown model name",
         "unknown RNN type (option)", "unknown RNN type (flag)", "not a number", "zero epochs", "infinite lr",
         "unknown READ option"]


@needs_real_glue
@pytest.mark.parametrize("case", CASES)
def test_bad_input_leaves_the_output_directory_as_it_was(case, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "dir.csv").mkdir()
    arguments, expected = _cases(tmp_path)[case]
    out = _existing_output(tmp_path)
    before = _snapshot(out)
    model = [] if "--model" in arguments else ["--model", str(tiny_models["bert"])]
    code = main(["train", "--output-dir", str(out), "--overwrite", *model, *FEW, *arguments])
    _assert_one_line_error(capsys, code, expected)
    assert _snapshot(out) == before
    assert not (tmp_path / ".run.partial").exists()


# ------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def trained_adapter(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "run"
    assert main(["train", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(out), *FEW]) == 0
    return out / "adapter"


def _eval(tiny_models, adapter: Path) -> int:
    return main(["eval", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--adapter", str(adapter), "--max-eval-samples", "8", "--max-length", "32", "--no-progress"])


def _copy(adapter: Path, to: Path) -> Path:
    to.mkdir()
    for file in adapter.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


@needs_real_glue
def test_corrupted_adapter_weights_file(trained_adapter, tiny_models, tmp_path, capsys):
    broken = _copy(trained_adapter, tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_one_line_error(capsys, _eval(tiny_models, broken), "cannot read weights file")


@needs_real_glue
def test_adapter_config_that_is_not_json(trained_adapter, tiny_models, tmp_path, capsys):
    broken = _copy(trained_adapter, tmp_path / "broken")
    (broken / "adapter_config.json").write_bytes(b"\x00\x01 not json")
    _assert_one_line_error(capsys, _eval(tiny_models, broken), "is not valid JSON")


@needs_real_glue
def test_pickle_weights_are_refused_never_loaded(trained_adapter, tiny_models, tmp_path, capsys, monkeypatch):
    # An adapter whose weights are a pickle (torch.save) instead of safetensors: refused by name, never opened.
    pickled = _copy(trained_adapter, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"read.x": torch.zeros(1)}, pickled / "adapter_model.bin")
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or {})
    monkeypatch.setattr(pickle, "load", lambda *a, **k: opened.append(a) or {})
    line = _assert_one_line_error(capsys, _eval(tiny_models, pickled), "holds pickle weights (adapter_model.bin)")
    assert "never loads" in line and not opened

    # A pickle that carries the safetensors name is not parsed as anything but safetensors.
    disguised = _copy(trained_adapter, tmp_path / "disguised")
    (disguised / "adapter_model.safetensors").write_bytes(pickle.dumps({"read.x": [0.0]}))
    _assert_one_line_error(capsys, _eval(tiny_models, disguised), "cannot read weights file")
    assert not opened


@needs_real_glue
def test_train_resume_and_eval_never_unpickle(tiny_models, tmp_path, monkeypatch, capsys):
    """Guard for the whole path: training with checkpoints, a resume, and eval run with torch.load and every
    pickle entry point replaced by a failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle / torch.load used")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    from readapt.recipe import steps as training

    original, calls = training.save_checkpoint, {"n": 0}

    def crash_once(*args, **kwargs):
        path = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(training, "save_checkpoint", crash_once)
    out = tmp_path / "run"
    arguments = ["train", "--task", "rte", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(out), *FEW, "--checkpoint-every", "1"]
    assert main(arguments) == 130
    assert main(arguments) == 0, capsys.readouterr().err
    assert _eval(tiny_models, out / "adapter") == 0


def test_bad_arguments_are_one_line_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "readapt", "train", "--rnn-type", "transformer"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "usage:" not in done.stderr
    assert "readapt train: error: argument --rnn-type: invalid choice" in done.stderr


@needs_real_glue
def test_unreadable_data_file(tiny_models, tmp_path, capsys, monkeypatch):
    """Permission denied (simulated: the tests run as root, which reads anything)."""
    import builtins

    from readapt.tasks import files

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("train.tsv"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", guarded_open, raising=False)
    glue = tmp_path / "glue"
    _write(glue / "SST-2" / "train.tsv", SST_HEADER + "fine\t1\n")
    _write(glue / "SST-2" / "dev.tsv", SST_HEADER + "good\t1\n")
    out = _existing_output(tmp_path)
    before = _snapshot(out)
    code = main(["train", "--task", "sst2", "--data-dir", str(glue), "--model", str(tiny_models["bert"]),
                 "--output-dir", str(out), "--overwrite", *FEW])
    _assert_one_line_error(capsys, code, "train.tsv: cannot read the file (Permission denied)")
    assert _snapshot(out) == before
