"""The invariants on the two real offline backbones (slow: they load real weights)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import REAL_GLUE_DIR, backward_with_counter, needs_real_glue
from readapt import ReadConfig, ReadModel, get_read_model
from readapt.pretrained import embedded_backbone_dir, smollm2_gguf_file
from readapt.recipe import DataConfig, TrainingConfig, train

pytestmark = pytest.mark.slow

SENTENCES = ["the film is a charming , funny delight .", "a dull , lifeless mess that never finds its footing ."]


@pytest.fixture(scope="module")
def minilm():
    path = embedded_backbone_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, tokenizer


@pytest.fixture(scope="module")
def smollm2():
    gguf = smollm2_gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    return model, tokenizer


def _minilm_classifier(path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def test_minilm_invariants_and_round_trip(minilm, tmp_path):
    path, tokenizer = minilm
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0]))
    backbone = _minilm_classifier(path)
    with torch.no_grad():
        reference = backbone(**batch).logits
    model = get_read_model(backbone, ReadConfig(hidden_size=64))
    assert [s.num_layers for s in model.info.stacks] == [6] and model.info.family == "encoder-only"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    optimizer.zero_grad()
    assert backward_with_counter(model, batch).inside_stack == 0  # the frozen body kept nothing for backward
    for name, param in model.backbone.named_parameters():
        head = name.startswith(("classifier.", "bert.pooler."))
        assert param.requires_grad == head and (head or param.grad is None), name

    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = ReadModel.from_pretrained(_minilm_classifier(path), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)


def test_smollm2_invariants_generation_and_kv_cache(smollm2):
    backbone, tokenizer = smollm2
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    generation = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad():
        reference_logits = backbone(**prompt).logits
    reference_tokens = backbone.generate(**prompt, **generation)

    model = get_read_model(backbone, ReadConfig(hidden_size=64))
    assert model.info.family == "decoder-only" and model.info.stacks[0].num_layers == 30
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, reference_logits)
    assert torch.equal(model.generate(**prompt, **generation), reference_tokens)

    # a few steps on one sentence, then generation with the KV cache must equal full recomputation
    text = tokenizer(["The capital of France is Paris, a city of light."], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**text, labels=text["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert backward_with_counter(model, dict(text, labels=text["input_ids"])).inside_stack == 0
    model.eval()
    assert all(p.grad is None for p in model.backbone.parameters())
    with torch.no_grad():
        assert not torch.equal(model(**prompt).logits, reference_logits)
    with_cache = model.generate(**prompt, use_cache=True, **generation)
    without_cache = model.generate(**prompt, use_cache=False, **generation)
    assert torch.equal(with_cache, without_cache)
    model.unload()


@needs_real_glue
def test_smollm2_label_words_beat_the_untrained_model(tmp_path):
    """A short real READ run on SST-2 through SmolLM2's own LM head (label words " negative" / " positive"):
    the dev accuracy beats the backbone's zero-shot accuracy on the same rows (READ's untrained correction is
    exactly zero, so --eval-before-training scores the untrained model). Measured on this 2-core CPU: 47.7 before,
    57.0 / 58.6 / 57.8 after epochs 1-3 (256 rows, lr 1e-3, running-mean sequence context; per-token READ
    learns the answer format but barely separates the classes in this budget: the last token's own states carry
    little of the sentence's sentiment on a 135M model)."""
    config = TrainingConfig(
        data=DataConfig(task="sst2", data_dir=str(REAL_GLUE_DIR), max_train_samples=256, max_eval_samples=128),
        model="smollm2", epochs=2, batch_size=8, eval_batch_size=32, max_length=96, lr=1e-3, progress=False,
        output_dir=str(tmp_path / "run"), checkpoints=False, eval_before_training=True,
        method_options={"hidden_size": 64, "sequence_context": "mean"})
    metrics = train(config)
    before = metrics["initial_dev"]["validation"]["accuracy"]
    after = metrics["best_dev"]["validation"]["accuracy"]
    assert after >= before + 0.05, (before, after)
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())["causal_lm"]
