"""The invariants on the two real offline backbones (slow: they load real weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import backward_with_counter
from readapt import ReadConfig, ReadModel, get_read_model
from readapt.pretrained import embedded_backbone_dir, smollm2_gguf_file

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
