"""READ with transformers' Trainer. The script is the one the transformers docs write for text classification
(docs/source/en/tasks/sequence_classification.md: tokenizer, DataCollatorWithPadding, compute_metrics,
AutoModelForSequenceClassification, TrainingArguments, Trainer) with the model line wrapped in get_read_model and a
learning rate READ trains at; a torch Dataset stands in for `datasets` (not a readapt dependency). It runs on the
embedded all-MiniLM-L6-v2 and a few hundred real SST-2 rows: it trains, evaluates with metrics, saves an adapter and
nothing of the frozen backbone, reloads it to identical logits, and resumes from a checkpoint to the same weights.

The fast tests use a tiny random BERT: gradient accumulation, and the checkpoint layout with two adapters."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import accuracy_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from conftest import REAL_GLUE_DIR, VOCAB, needs_real_glue, tiny_backbone
from readapt import AutoReadModel, ReadConfig, ReadModel, get_read_model
from readapt.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from readapt.pretrained import embedded_backbone_dir

TRAIN_ROWS, EVAL_ROWS = 160, 64


class Rows(torch.utils.data.Dataset):
    """Tokenized rows that keep their text column, as `dataset.map(preprocess_function)` leaves them."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def sst2(tokenizer, split: str, rows: int) -> Rows:
    with gzip.open(REAL_GLUE_DIR / "SST-2" / f"{split}.tsv.gz", "rt", encoding="utf-8") as stream:
        records = list(csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    return Rows([{"sentence": r["sentence"], "label": int(r["label"]), **tokenizer(r["sentence"], truncation=True)}
                 for r in records])


def compute_metrics(eval_pred):
    predictions, labels = eval_pred
    return {"accuracy": accuracy_score(labels, np.argmax(predictions, axis=1))}


def docs_script(output_dir, tokenizer, train, evaluation, **arguments) -> Trainer:
    torch.manual_seed(0)  # the new classifier's initial weights
    id2label = {0: "NEGATIVE", 1: "POSITIVE"}
    label2id = {"NEGATIVE": 0, "POSITIVE": 1}
    model = get_read_model(AutoModelForSequenceClassification.from_pretrained(  # the one line that is READ's
        embedded_backbone_dir(), num_labels=2, id2label=id2label, label2id=label2id))
    training_args = TrainingArguments(**{
        "output_dir": str(output_dir),
        "learning_rate": 1e-3,  # READ's (readapt's default); the docs' 2e-5 is for full fine-tuning
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": 2,
        "weight_decay": 0.01,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "load_best_model_at_end": True,
        "push_to_hub": False,
        **arguments,  # a test's changes
    })
    return Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                   processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer=tokenizer),
                   compute_metrics=compute_metrics)


@pytest.fixture(scope="module")
def minilm_data():
    tokenizer = AutoTokenizer.from_pretrained(embedded_backbone_dir())
    return tokenizer, sst2(tokenizer, "train", TRAIN_ROWS), sst2(tokenizer, "dev", EVAL_ROWS)


@pytest.mark.slow
@needs_real_glue
def test_docs_trainer_script_trains_evaluates_saves_and_reloads(minilm_data, tmp_path):
    tokenizer, train, evaluation = minilm_data
    trainer = docs_script(tmp_path / "run", tokenizer, train, evaluation)
    assert trainer.label_names == ["labels"]
    untrained = trainer.evaluate()
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    assert "eval_accuracy" in untrained and len(evaluations) == 2  # after each epoch: compute_metrics ran
    assert min(log["eval_loss"] for log in evaluations) < untrained["eval_loss"]

    trainer.save_model(tmp_path / "adapter")
    saved = tmp_path / "adapter"
    assert (saved / CONFIG_NAME).is_file() and not (saved / "model.safetensors").exists()
    assert (saved / WEIGHTS_NAME).stat().st_size < 10 * 1000 * 1000
    with safe_open(saved / WEIGHTS_NAME, "pt") as weights:
        names = list(weights.keys())
    assert names and all(name.startswith(("read.", "head.")) for name in names)  # nothing of the frozen backbone
    checkpoints = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints and all((tmp_path / "run" / c / WEIGHTS_NAME).is_file() for c in checkpoints)

    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in evaluation[i].items() if k != "sentence"}
                                                for i in range(16)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        reloaded = AutoReadModel.from_pretrained(saved)(**inputs).logits
        by_hand = ReadModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
            embedded_backbone_dir(), num_labels=2), saved)(**inputs).logits
    assert torch.equal(reloaded, expected) and torch.equal(by_hand, expected)


@pytest.mark.slow
@needs_real_glue
def test_resume_from_checkpoint_gives_the_same_final_weights(minilm_data, tmp_path):
    tokenizer, train, evaluation = minilm_data
    steps = dict(num_train_epochs=1, eval_strategy="no", save_strategy="steps", save_steps=5,
                 load_best_model_at_end=False)
    straight = docs_script(tmp_path / "straight", tokenizer, train, evaluation, **steps)
    straight.train()
    resumed = docs_script(tmp_path / "resumed", tokenizer, train, evaluation, **steps)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-5"))
    assert resumed.state.global_step == straight.state.global_step == TRAIN_ROWS // 16
    final, again = straight.model.adapter_state_dict(), resumed.model.adapter_state_dict()
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


# ------------------------------------------------------------------------------------------ fast, tiny BERT
def _tiny_rows(rows: int = 16, length: int = 6) -> Rows:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    return Rows([{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
                  "labels": torch.tensor(i % 3), "text": f"row {i}"} for i in range(rows)])


def _tiny_trainer(output_dir, batch: int, accumulation: int, model=None, **arguments) -> Trainer:
    if model is None:
        model = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16))
        for module in model.modules():  # no dropout anywhere: the two runs must compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0
    args = TrainingArguments(**{"output_dir": str(output_dir), "per_device_train_batch_size": batch,
                                "gradient_accumulation_steps": accumulation, "max_steps": 1, "learning_rate": 0.5,
                                "optim": "sgd", "lr_scheduler_type": "constant", "save_strategy": "no",
                                "report_to": "none", "dataloader_drop_last": True, **arguments})
    return Trainer(model=model, args=args, train_dataset=_tiny_rows(),
                   data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "text"})


def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(tmp_path):
    """SGD (its step is the gradient itself, unlike Adam's): 2 accumulated batches of 4 make the step 8 rows make."""
    one = _tiny_trainer(tmp_path / "one", batch=8, accumulation=1)
    two = _tiny_trainer(tmp_path / "two", batch=4, accumulation=2)
    one.train()
    two.train()
    big, accumulated = one.model.adapter_state_dict(), two.model.adapter_state_dict()
    assert any(not torch.equal(big[k], get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16))
                               .adapter_state_dict()[k]) for k in big)  # the step moved the weights
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_checkpoint_of_two_adapters_resumes_both(tmp_path):
    """Trainer saves every adapter (PEFT's layout: "default" in the checkpoint, the other one in its sub-folder)
    and resumes each into its own name."""
    backbone = tiny_backbone("bert")
    model = get_read_model(backbone, ReadConfig(hidden_size=16))
    model.add_adapter("other", ReadConfig(hidden_size=8))
    model.set_adapter("other")
    trainer = _tiny_trainer(tmp_path / "run", batch=8, accumulation=1, model=model, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / WEIGHTS_NAME).is_file() and (checkpoint / "other" / WEIGHTS_NAME).is_file()
    trained = {name: model.adapter_state_dict(name) for name in model.adapters}

    fresh = get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16))
    fresh.add_adapter("other", ReadConfig(hidden_size=8))
    fresh.set_adapter("other")
    resumed = _tiny_trainer(tmp_path / "again", batch=8, accumulation=1, model=fresh)
    resumed._load_from_checkpoint(str(checkpoint))  # what train(resume_from_checkpoint=...) does first
    for name, tensors in trained.items():
        loaded = fresh.adapter_state_dict(name)
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items()), name
    assert fresh.active_adapter == "other"
