"""Decoder-only LMs: completion-only loss, label-word rank classification, generation (KV cache, left padding),
generation tasks from JSONL, every method through the one training loop, eval and predict on the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import REAL_GLUE_DIR, needs_real_glue, tiny_backbone, train_steps
from readapt import ConfigError, ReadConfig, get_read_model
from readapt.answers import candidate_scores, causal_lm_loss, generate_texts
from readapt.cli import METHOD_NAMES, main
from readapt.encoding import IGNORE_INDEX, Candidates, Collator, encode, left_padded
from readapt.pretrained import load_backbone
from readapt.recipe import DataConfig, TrainingConfig, evaluate_adapter, train
from readapt.settings import GenerationSettings
from readapt.tasks import Example, compute_metrics, load_custom_task
from readapt.tasks.metrics import exact_match, normalize_answer, token_f1

SMALL = ReadConfig(hidden_size=16)


# ---------------------------------------------------------------------------------------------- batches and loss
def test_prompt_answer_batch_is_left_padded_with_labels_on_the_answer_only():
    features = [{"input_ids": [5, 6, 7], "labels": [8, 9, 1]}, {"input_ids": [5], "labels": [10, 1]}]
    batch = Collator(pad_token_id=0, text_to_text=True, is_regression=False, causal=True)(features)
    # row 0: prompt 5 6 7, answer 8 9 <eos>; row 1: prompt 5, answer 10 <eos>, two pads in front
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1], [0, 0, 0, 5, 10, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, 8, 9, 1], [x, x, x, x, 10, 1]]
    prompts = Collator(0, True, False, causal=True, with_answers=False)(features)
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [0, 0, 5]] and "labels" not in prompts


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_completion_loss_equals_the_lm_loss_on_answer_tokens(kind):
    model = tiny_backbone(kind)
    features = [{"input_ids": [5, 6, 7, 11], "labels": [8, 9, 1]}, {"input_ids": [5, 12], "labels": [10, 1]}]
    batch = Collator(0, True, False, causal=True)(features)
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)
        reference = model(**batch).loss  # transformers' own shifted loss over every position not ignored
        # by hand: log-probabilities of the 5 answer tokens, each predicted from the position before it
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.log_softmax(-1)
    by_hand = []
    for row, answer in enumerate(f["labels"] for f in features):
        end = batch["input_ids"].shape[1]
        for offset, token in enumerate(answer):
            position = end - len(answer) + offset
            by_hand.append(-logits[row, position - 1, token])
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(ours, torch.stack(by_hand).mean(), atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_changes_nothing(kind):
    """A left-padded row scores and generates exactly as the same prompt alone (position ids count real tokens)."""
    model = get_read_model(tiny_backbone(kind), SMALL)
    train_steps(model, {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8]]), "labels": torch.tensor([[3, 4, 5, 6, 7, 8]])})
    prompts = [[5, 6, 7, 8, 9, 10, 11], [9, 12]]
    batch = left_padded(prompts, pad_token_id=0)
    alone = left_padded(prompts[1:], pad_token_id=0)
    candidates = Candidates((0, 1), ((13, 1), (20, 21, 1)))
    with torch.no_grad():
        together = candidate_scores(model, batch, candidates, causal=True)
        single = candidate_scores(model, alone, candidates, causal=True)
    assert torch.allclose(together[1], single[0], atol=1e-5)
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    padded = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
    own = model.generate(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"], **settings)
    assert padded[1, -5:].tolist() == own[0, -5:].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["read", "full", "lora", "bitfit", "adapter", "prompt", "lst"])
def test_scoring_from_the_prompt_cache_equals_whole_sequences(kind, method, monkeypatch):
    """Candidates continue the prompts' KV cache (one prompt pass, one pass for every candidate) where the model
    computes a cached continuation exactly as the whole sequence; elsewhere each candidate reruns the prompt."""
    import readapt.answers as answers
    from readapt.methods import get_method

    torch.manual_seed(3)
    model = get_method(method).prepare(tiny_backbone(kind), {"hidden_size": 8} if method == "read" else {})
    for parameter in (p for p in model.parameters() if p.requires_grad):  # a trained-looking model
        torch.nn.init.normal_(parameter, std=0.1)
    model.eval()
    batch = left_padded([[5, 6, 7, 8, 9, 10, 11], [9, 12]], pad_token_id=0)
    candidates = Candidates((0, 1, 2), ((13, 1), (20, 21, 1), (30,)))
    assert answers._can_continue_a_kv_cache(model) == (method not in ("prompt", "lst"))
    with torch.no_grad():
        scores = candidate_scores(model, batch, candidates, causal=True)
        monkeypatch.setattr(answers, "_can_continue_a_kv_cache", lambda model: False)
        whole = candidate_scores(model, batch, candidates, causal=True)
    assert torch.allclose(scores, whole, atol=1e-5), (scores - whole).abs().max()


def test_running_mean_context_scores_whole_sequences():
    import readapt.answers as answers

    model = get_read_model(tiny_backbone("llama"), ReadConfig(hidden_size=8, sequence_context="mean"))
    assert not answers._can_continue_a_kv_cache(model)  # a cached continuation would be refused


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generation_with_kv_cache_equals_without(kind):
    """READ corrects each new token from its own layer states, which the KV cache leaves unchanged."""
    model = get_read_model(tiny_backbone(kind), SMALL)
    losses = train_steps(model, {"input_ids": torch.tensor([[3, 9, 4, 9, 5, 9]]),
                                 "labels": torch.tensor([[3, 9, 4, 9, 5, 9]])}, steps=8)
    assert losses[-1] < losses[0]
    batch = left_padded([[3, 9, 4], [5, 9, 6, 9, 7]], pad_token_id=0)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with_cache = model.generate(**batch, use_cache=True, **settings)
    without = model.generate(**batch, use_cache=False, **settings)
    assert torch.equal(with_cache, without)
    with torch.no_grad():  # and the trained correction really acts on the LM's output
        assert not torch.allclose(model(**batch).logits, tiny_backbone(kind)(**batch).logits)


# ---------------------------------------------------------------------------------------------- metrics and tasks
def test_exact_match_and_token_f1():
    assert normalize_answer("The  Eiffel tower!") == "eiffel tower"
    assert exact_match(["the Eiffel Tower.", "Paris"], ["Eiffel tower", "London"]) == 0.5
    assert token_f1(["red green"], ["green blue"]) == pytest.approx(0.5)
    assert token_f1([""], [""]) == 1.0 and token_f1(["a"], ["b c"]) == 0.0


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _copy_rows(count: int, seed: int) -> list[dict]:
    """A tiny synthetic copy task: repeat three words after the arrow."""
    import random

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        picked = " ".join(rng.choice(words) for _ in range(3))
        rows.append({"prompt": f"copy : {picked} =>", "completion": f" {picked}"})
    return rows


def test_generation_task_from_jsonl(tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", _copy_rows(4, 0))
    data = load_custom_task(train_file, train_file, ["prompt"], "completion", task_type="generation")
    task = data.task
    assert task.is_generation and task.main_metric == "combined" and task.dev_splits == ("validation",)
    example = data.splits["train"][0]
    assert example.label.startswith(" ") and example.texts[0].startswith("copy :")
    results = compute_metrics(task, ["red blue", "x"], ["red blue", "y"])
    assert results == {"exact_match": 0.5, "token_f1": 0.5, "combined": 0.5}


def test_generation_task_refuses_non_text_completion(tmp_path):
    from readapt.errors import DataError

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": 3}])
    with pytest.raises(DataError, match="a completion must be text"):
        load_custom_task(bad, bad, ["prompt"], "completion", task_type="generation")


def test_encode_a_generation_task_for_a_causal_lm(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-lm"])
    from readapt.tasks import Task

    task = Task(name="copy", text_fields=("prompt",), is_generation=True, metric_names=("exact_match", "token_f1"))
    [feature] = encode(task, [Example(("copy : red =>",), " red", 0)], tokenizer, 64, True, causal=True)
    assert feature["input_ids"] == tokenizer("copy : red =>").input_ids
    assert feature["labels"] == tokenizer(" red", add_special_tokens=False).input_ids + [tokenizer.sep_token_id]


# ---------------------------------------------------------------------------------------------- the training loop
def _generation_config(tmp_path, model: Path, **overrides) -> TrainingConfig:
    train_file = _write_jsonl(tmp_path / "train.jsonl", _copy_rows(48, 1))
    dev_file = _write_jsonl(tmp_path / "dev.jsonl", _copy_rows(16, 2))
    settings = dict(data=DataConfig(train_file=str(train_file), validation_file=str(dev_file), task_type="generation"),
                    model=str(model), epochs=4, batch_size=8, eval_batch_size=16, max_length=32, progress=False,
                    output_dir=str(tmp_path / "run"), overwrite=True, lr=3e-2, method_options={"hidden_size": 32},
                    generation=GenerationSettings(max_new_tokens=6), checkpoints=False)
    settings.update(overrides)
    return TrainingConfig(**settings)


@pytest.mark.parametrize("kind", ["llama-lm", "gpt2-lm"])
def test_read_learns_a_tiny_copy_task(tiny_models, tmp_path, kind):
    metrics = train(_generation_config(tmp_path, tiny_models[kind]))
    losses = [e["train_loss"] for e in metrics["epochs"]]
    # 24 steps: the completion loss goes down measurably (a random 2-layer backbone cannot really copy: per-token
    # corrections learn which words answers use and their order, 10.2 -> 7.8 nats for Llama, 10.0 -> 6.3 for GPT-2)
    assert losses[-1] < 0.85 * losses[0], losses
    dev = metrics["best_dev"]["validation"]
    assert set(dev) == {"exact_match", "token_f1", "combined"} and all(0 <= v <= 1 for v in dev.values())
    spec = json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())
    assert spec["causal_lm"] and spec["generation"]["max_new_tokens"] == 6
    # `readapt eval` regenerates the same completions from the saved adapter
    again = evaluate_adapter(_generation_config(tmp_path, tiny_models[kind]).data, str(tiny_models[kind]),
                             tmp_path / "run" / "adapter", max_length=32, progress=False)
    assert again["validation"] == pytest.approx(dev)


def test_an_encoder_decoder_takes_generation_tasks_too(tiny_models, tmp_path):
    metrics = train(_generation_config(tmp_path, tiny_models["t5"], epochs=1))
    assert set(metrics["best_dev"]["validation"]) == {"exact_match", "token_f1", "combined"}
    spec = json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())
    assert spec["text_to_text"] and not spec["causal_lm"] and spec["task"]["is_generation"]


def test_generated_text_is_what_generate_writes(tiny_models, tmp_path):
    loaded = load_backbone(str(tiny_models["llama-lm"]), 1, generation=True)
    assert loaded.causal_lm and loaded.text_to_text
    model = get_read_model(loaded.model, SMALL)
    tokenizer = loaded.tokenizer
    batch = left_padded([tokenizer("copy : red =>").input_ids, tokenizer("copy : cat dog sun =>").input_ids], 0)
    texts = generate_texts(model, batch, tokenizer, GenerationSettings(max_new_tokens=4), causal=True)
    raw = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, batch["input_ids"].shape[1]:]
    assert texts == [t.strip() for t in tokenizer.batch_decode(raw, skip_special_tokens=True)]


def test_generation_stops_at_the_trained_end_token_and_the_models_own(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama-lm"])  # its end-of-answer token: [SEP] = 102
    seen = {}

    class Recorder(torch.nn.Module):
        generation_config = type("GenerationConfig", (), {"eos_token_id": [1, 7]})()

        def generate(self, input_ids, **kwargs):
            seen.update(kwargs)
            return torch.cat([input_ids, torch.tensor([[1037, 102]])], dim=1)

    batch = left_padded([[101, 2000]], pad_token_id=0)
    assert generate_texts(Recorder(), batch, tokenizer, GenerationSettings(), causal=True) == ["a"]
    assert seen["eos_token_id"] == [1, 7, 102] and seen["max_new_tokens"] == 32 and seen["do_sample"] is False


@needs_real_glue
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_a_causal_lm_with_label_words(tiny_models, tmp_path, method):
    config = TrainingConfig(data=DataConfig(task="rte", data_dir=str(REAL_GLUE_DIR), max_train_samples=24,
                                            max_eval_samples=16), model=str(tiny_models["llama-lm"]),
                            method=method, epochs=1, batch_size=8, eval_batch_size=8, max_length=48, progress=False,
                            output_dir=str(tmp_path / method), checkpoints=False)
    metrics = train(config)
    assert metrics["epochs"][0]["train_loss"] > 0 and set(metrics["best_dev"]["validation"]) == {"accuracy"}
    assert json.loads((tmp_path / method / "adapter" / "task.json").read_text())["causal_lm"]


@needs_real_glue
def test_label_words_and_classifier_heads_eval_and_predict(tiny_models, tmp_path, capsys):
    import csv

    common = ["--task", "sst2", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["gpt2-lm"]),
              "--max-train-samples", "32", "--max-eval-samples", "24", "--epochs", "1", "--batch-size", "8",
              "--max-length", "40", "--no-progress", "--no-checkpoints", "--read-hidden-size", "16"]
    for head in ("label-words", "classifier"):
        out = tmp_path / head
        assert main(["train", *common, "--decoder-head", head, "--output-dir", str(out), "--eval-before-training"]) == 0
        assert "before training: validation accuracy" in capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0 <= metrics["initial_dev"]["validation"]["accuracy"] <= 1
        spec = json.loads((out / "adapter" / "task.json").read_text())
        assert spec["causal_lm"] == (head == "label-words") and spec["text_to_text"] == (head == "label-words")
        scores = tmp_path / f"{head}.json"
        assert main(["eval", "--task", "sst2", "--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["gpt2-lm"]),
                     "--adapter", str(out / "adapter"), "--max-eval-samples", "24", "--max-length", "40",
                     "--no-progress", "--output", str(scores)]) == 0
        assert json.loads(scores.read_text())["validation"]["accuracy"] == pytest.approx(
            metrics["best_dev"]["validation"]["accuracy"])

    # predict: label-word adapters share one backbone pass, with the same answers as each alone
    rows = [{"sentence": "a charming , funny film ."}, {"sentence": "dull and lifeless ."}, {"sentence": "ok"}]
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence"])
        writer.writeheader()
        writer.writerows(rows)
    from readapt.inference import Predictor

    second = tmp_path / "second"
    assert main(["train", *common, "--seed", "7", "--output-dir", str(second)]) == 0
    predictor = Predictor([tmp_path / "label-words" / "adapter", second / "adapter"], model=str(tiny_models["gpt2-lm"]),
                          names=["a", "b"], cpu=True)
    shared = predictor.predict(rows, batch_size=2)
    assert shared == predictor.predict(rows, batch_size=2, shared=False)
    assert set(shared["a"]) <= {"negative", "positive"} and len(shared["b"]) == 3


def test_cache_features_refused_for_generation_and_label_words(tiny_models, tmp_path):
    cached = {"cache_features": True, "cache_dir": str(tmp_path / "cache")}
    config = _generation_config(tmp_path, tiny_models["llama-lm"], **cached)
    with pytest.raises(ConfigError, match="does not support generation tasks"):
        train(config)
    config.data = DataConfig(train_file=config.data.train_file, validation_file=config.data.train_file,
                             text_columns=["prompt"], label_column="completion", task_type="classification")
    with pytest.raises(ConfigError, match="decoder-only LMs answering in words"):
        train(config)


def test_generation_on_an_encoder_is_refused(tiny_models, tmp_path):
    from readapt.errors import ReadaptError

    with pytest.raises(ReadaptError, match="a generation task needs a decoder"):
        train(_generation_config(tmp_path, tiny_models["bert"]))


def test_cli_generation_flags(tiny_models, tmp_path, capsys):
    train_file = _write_jsonl(tmp_path / "t.jsonl", _copy_rows(8, 3))
    base = ["train", "--train-file", str(train_file), "--validation-file", str(train_file), "--task-type", "generation",
            "--model", str(tiny_models["llama-lm"]), "--epochs", "1", "--no-progress", "--output-dir",
            str(tmp_path / "run")]
    assert main([*base, "--temperature", "0"]) == 2
    assert "--temperature=0.0 is out of range" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "3", "--do-sample", "--top-p", "0.9", "--no-checkpoints"]) == 0
    spec = json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())
    assert spec["generation"] == {"max_new_tokens": 3, "do_sample": True, "temperature": 1.0, "top_p": 0.9,
                                  "top_k": 50, "num_beams": 1}
    # readapt predict writes each generation adapter's completions (generated with the settings it was trained with)
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--model", str(tiny_models["llama-lm"]), "--adapter", str(tmp_path / "run" / "adapter"),
                 "--name", "copy", "--input", str(train_file), "--output", str(out), "--no-progress", "--cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and all(isinstance(r["copy"], str) and r["prompt"].startswith("copy") for r in rows)
