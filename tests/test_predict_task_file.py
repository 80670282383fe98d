"""`readapt predict` takes each adapter's task, input columns, label set, prompt and max length from its task.json
(as `readapt eval --adapter` does); `--task`, `--text-columns` and `--max-length` only override them, for every
adapter. An adapter without task.json (saved by save_pretrained or transformers' Trainer) is predicted with
`--task` (a GLUE task) or `--text-columns` (the labels its adapter_config.json records). Bad input: one line, exit 2.

Everything runs on the tiny random BERT / T5 with the real BERT tokenizer (conftest's tiny_models)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from conftest import train_steps
from readapt import ReadConfig, ReadModel, get_read_model
from readapt.adapter_files import TASK_FILE
from readapt.cli import main
from readapt.inference import Predictor
from readapt.task_overrides import TaskOverrides

SMALL = ReadConfig(hidden_size=16, token_mixer_layers=0)
TEXTS = ["good film", "bad film", "great plot", "awful plot", "a fine cast", "dull, \"very\" dull"]


def _write_csv(path: Path, column: str, texts=TEXTS, other: str | None = None) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([column] + ([other] if other else []))
        writer.writerows([text] + (["x"] if other else []) for text in texts)
    return path


def _predictions(path: Path, column: str) -> list:
    return [json.loads(line)[column] for line in path.read_text().splitlines()]


def _ok(arguments: list[str], capsys) -> None:
    assert main(arguments) == 0
    capsys.readouterr()  # the summary line on stderr


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("readapt: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """'review': a custom task (review -> neg/pos) trained by `readapt train` (task.json written; its
    predictions are named after its run folder, 'sentiment'); 'bare': an SST-2
    style classifier saved by save_pretrained only (no task.json; its config names the labels NEG/POS); 't5': a
    tiny T5 adapter saved the same way (answers in words, no head)."""
    from readapt.pretrained import load_backbone

    root = tmp_path_factory.mktemp("predict-task")
    rows = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("awful plot", "neg")] * 4
    (root / "train.csv").write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows))
    assert main(["train", "--train-file", str(root / "train.csv"), "--validation-file", str(root / "train.csv"),
                 "--text-columns", "review", "--label-column", "sentiment", "--model", str(tiny_models["bert"]),
                 "--output-dir", str(root / "sentiment"), "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--read-hidden-size", "16", "--read-token-mixer-layers", "0", "--no-progress"]) == 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask,
             "labels": torch.arange(len(TEXTS)) % 2}
    backbone = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2,
                                                                  id2label={0: "NEG", 1: "POS"},
                                                                  label2id={"NEG": 0, "POS": 1})
    model = get_read_model(backbone, SMALL)
    train_steps(model, batch, steps=3)
    model.save_pretrained(root / "bare")

    t5 = get_read_model(load_backbone(str(tiny_models["t5"]), 2, decoder_head="label-words").model, SMALL)
    t5.save_pretrained(root / "t5")
    return {"review": root / "sentiment" / "adapter", "bare": root / "bare", "t5": root / "t5"}


def test_the_task_file_gives_the_task_and_the_flags_override_it(adapters, tiny_models, tmp_path, capsys):
    base = ["predict", "--model", str(tiny_models["bert"]), "--adapter", str(adapters["review"]), "--no-progress"]
    assert (adapters["review"] / TASK_FILE).is_file()
    by_file = tmp_path / "by-file.jsonl"
    _ok([*base, "--input", str(_write_csv(tmp_path / "reviews.csv", "review")), "--output", str(by_file)], capsys)
    predicted = _predictions(by_file, "sentiment")
    assert len(predicted) == len(TEXTS) and set(predicted) <= {"neg", "pos"}  # task.json's label set

    # The same texts in a column named otherwise: --text-columns reads it for the task's `review` field
    renamed = tmp_path / "renamed.jsonl"
    _ok([*base, "--input", str(_write_csv(tmp_path / "texts.csv", "text", other="id")), "--text-columns", "text",
         "--output", str(renamed)], capsys)
    assert _predictions(renamed, "sentiment") == predicted
    assert "text" in json.loads(renamed.read_text().splitlines()[0])  # the input columns are kept

    # Without the override that file lacks the task's column: one line naming it and the adapter
    assert main([*base, "--input", str(tmp_path / "texts.csv")]) == 2
    assert "no column 'review', needed by adapter 'sentiment'" in _one_line_error(capsys)

    # --max-length overrides task.json's 32; --task predicts as a GLUE task (its column and label names)
    predictor = Predictor([adapters["review"]], model=str(tiny_models["bert"]), overrides=TaskOverrides(max_length=4))
    assert predictor.entries[0].spec.max_length == 4
    assert Predictor([adapters["review"]], model=str(tiny_models["bert"])).entries[0].spec.max_length == 32
    as_sst2 = tmp_path / "as-sst2.jsonl"
    _ok([*base, "--input", str(_write_csv(tmp_path / "sentences.csv", "sentence")), "--task", "sst2", "--output",
         str(as_sst2)], capsys)
    assert set(_predictions(as_sst2, "sentiment")) <= {"negative", "positive"}


def test_an_adapter_without_task_file_is_predicted_with_task_or_text_columns(adapters, tiny_models, tmp_path,
                                                                              capsys):
    sentences = _write_csv(tmp_path / "in.csv", "sentence")
    base = ["predict", "--model", str(tiny_models["bert"]), "--adapter", str(adapters["bare"]), "--input",
            str(sentences), "--no-progress"]
    assert not (adapters["bare"] / TASK_FILE).exists()
    assert main(base) == 2
    err = _one_line_error(capsys)
    assert "task.json is missing" in err and "--task" in err and "--text-columns" in err

    glue, custom = tmp_path / "glue.jsonl", tmp_path / "custom.jsonl"
    _ok([*base, "--task", "sst2", "--output", str(glue)], capsys)
    _ok([*base, "--text-columns", "sentence", "--output", str(custom)], capsys)
    as_glue, as_custom = _predictions(glue, "bare"), _predictions(custom, "bare")
    assert set(as_glue) <= {"negative", "positive"} and set(as_custom) <= {"NEG", "POS"}  # the recorded label names
    assert [{"negative": "NEG", "positive": "POS"}[p] for p in as_glue] == as_custom  # the same model, same inputs
    # what the adapter itself predicts on those rows, loaded by hand
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    model = ReadModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"],
                                                                                         num_labels=2), adapters["bare"])
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits
    assert as_custom == [("NEG", "POS")[i] for i in logits.argmax(-1).tolist()]


def test_an_adapter_saved_by_trainer_is_predicted_with_text_columns(tiny_models, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    rows = [{**tokenizer(text), "labels": i % 2} for i, text in enumerate(TEXTS)]
    torch.manual_seed(0)
    model = get_read_model(AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2), SMALL)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2,
                                                          per_device_train_batch_size=3, report_to="none",
                                                          save_strategy="no"),
                      train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    out = tmp_path / "out.jsonl"
    _ok(["predict", "--model", str(tiny_models["bert"]), "--adapter", str(tmp_path / "adapter"), "--name",
         "sentiment", "--input", str(_write_csv(tmp_path / "in.csv", "sentence")), "--text-columns", "sentence",
         "--output", str(out), "--no-progress"], capsys)
    assert set(_predictions(out, "sentiment")) <= {"LABEL_0", "LABEL_1"}  # transformers' default label names


def test_bad_task_flags_are_one_line(adapters, tiny_models, tmp_path, capsys):
    sentences = _write_csv(tmp_path / "in.csv", "sentence")
    base = ["predict", "--model", str(tiny_models["bert"]), "--input", str(sentences), "--no-progress"]
    cases = {
        "a GLUE task with another label count": ([adapters["bare"]], ["--task", "stsb"],
                                                 "head has 2 labels, GLUE task stsb needs a regression output"),
        "an unknown GLUE task": ([adapters["review"]], ["--task", "sst3"], "unknown GLUE task 'sst3'"),
        "more columns than the task reads": ([adapters["review"]], ["--text-columns", "sentence,other"],
                                             "--text-columns names 2 column(s) (sentence, other), but adapter"),
        "no column at all": ([adapters["bare"]], ["--text-columns", ","], "--text-columns names no column"),
        "three columns without task.json": ([adapters["bare"]], ["--text-columns", "a,b,c"], "a task reads one or two"),
        "an LM adapter without task.json": ([adapters["t5"]], ["--text-columns", "sentence"],
                                            "answers with a language model's words: its prompt and answer words are "
                                            "recorded in task.json only; name its GLUE task with --task"),
    }
    for case, (directories, flags, message) in cases.items():
        arguments = [*base, *(item for d in directories for item in ("--adapter", str(d))), *flags]
        assert main(arguments) == 2, case
        assert message in _one_line_error(capsys), case
    assert main([*base, "--adapter", str(adapters["review"]), "--max-length", "0"]) == 2
    assert "--max-length" in capsys.readouterr().err


def test_a_text_to_text_adapter_without_task_file_takes_the_glue_prompt(adapters, tiny_models, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    _ok(["predict", "--model", str(tiny_models["t5"]), "--adapter", str(adapters["t5"]), "--task", "sst2", "--input",
         str(_write_csv(tmp_path / "in.csv", "sentence")), "--output", str(out), "--no-progress"], capsys)
    predictor = Predictor([adapters["t5"]], model=str(tiny_models["t5"]), overrides=TaskOverrides(task="sst2"))
    assert predictor.text_to_text and predictor.entries[0].spec.task.prompt_prefix == "sst2"
    assert set(_predictions(out, "t5")) <= {"negative", "positive"}  # ranked over the task's answer words


def test_the_backbone_comes_from_the_adapter_when_no_model_is_named(adapters, tiny_models, tmp_path, capsys):
    """The adapter records its backbone (adapter_config.json): without --model, predict loads that one, as
    AutoReadModel does, and predicts what it predicts with --model naming it."""
    reviews = _write_csv(tmp_path / "reviews.csv", "review")
    named, recorded = tmp_path / "named.jsonl", tmp_path / "recorded.jsonl"
    base = ["predict", "--adapter", str(adapters["review"]), "--input", str(reviews), "--no-progress"]
    _ok([*base, "--model", str(tiny_models["bert"]), "--output", str(named)], capsys)
    _ok([*base, "--output", str(recorded)], capsys)
    assert recorded.read_text() == named.read_text()
    assert Predictor([adapters["review"]]).source == str(Path(tiny_models["bert"]).resolve())
