"""Every fine-tuning method behind the one interface: prepare, save, load back to identical outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, tiny_backbone, train_steps
from readapt import ConfigError, IncompatibleAdapterError
from readapt.methods import METHODS, get_method, method_of


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("kind", ["t5", "bert", "llama-cls"])
def test_save_load_round_trip(method_name, kind, tmp_path):
    method = get_method(method_name)
    options = {"hidden_size": 8} if method_name == "read" else {}
    model = method.prepare(tiny_backbone(kind), options)
    batch = make_batch(kind)
    train_steps(model, batch, steps=2, lr=1e-3)
    with torch.no_grad():
        expected = model(**batch).logits
    method.save(model, tmp_path)
    assert method_of(tmp_path) is method
    # READ's adapter goes back onto the same pretrained backbone; full fine-tuning's overwrites any weights.
    loaded = method.load(tiny_backbone(kind, seed=123 if method_name == "full" else 0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_full_fine_tuning_trains_everything_and_keeps_tied_weights_tied(tmp_path):
    model = get_method("full").prepare(tiny_backbone("t5"), {})
    assert all(p.requires_grad for p in model.parameters())
    get_method("full").save(model, tmp_path)
    loaded = get_method("full").load(tiny_backbone("t5", seed=5), tmp_path)
    assert loaded.lm_head.weight is loaded.shared.weight or not loaded.config.tie_word_embeddings


def test_unknown_method_and_wrong_method_directory(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'lora2'; available: read, full"):
        get_method("lora2")
    get_method("full").save(tiny_backbone("bert"), tmp_path)
    with pytest.raises(IncompatibleAdapterError, match="made by method 'full', not 'read'"):
        get_method("read").load(tiny_backbone("bert"), tmp_path)
