"""Every fine-tuning method behind the one interface: trains on each family it supports (refuses the
others clearly), counts its trainable parameters as computed by hand, saves and loads back exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import backward_with_counter, make_batch, tiny_backbone, train_steps
from readapt import ConfigError, IncompatibleAdapterError, UnsupportedModelError
from readapt.methods import METHODS, count_trainable, get_method, method_of

KINDS = ["t5", "bart", "bert", "gpt2", "llama", "llama-cls"]
SMALL_OPTIONS = {"read": {"hidden_size": 8}, "adapter": {"bottleneck": 4}, "prompt": {"num_virtual_tokens": 3}}
# method -> families it refuses, and the message that says why
REFUSED = {("prompt", "llama-cls"): "decoder-only sequence classification"}
# methods whose untrained model is not the backbone (prompts change the input; full is the backbone)
CHANGES_OUTPUT_AT_INIT = {"prompt"}


def _prepare(method_name, kind, seed=0):
    return get_method(method_name).prepare(tiny_backbone(kind, seed=seed), dict(SMALL_OPTIONS.get(method_name, {})))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_trains_on_every_family_it_supports(method_name, kind):
    if (method_name, kind) in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[method_name, kind]):
            _prepare(method_name, kind)
        return
    batch = make_batch(kind)
    with torch.no_grad():
        reference = tiny_backbone(kind)(**batch).logits
    model = _prepare(method_name, kind)
    with torch.no_grad():
        untrained = model(**batch).logits
    if method_name not in CHANGES_OUTPUT_AT_INIT:
        assert torch.equal(untrained, reference)  # every method starts from the backbone's function
    losses = train_steps(model, batch, steps=8, lr=1e-2 if method_name != "full" else 1e-3)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method_name", [m for m in sorted(METHODS) if not METHODS[m].backpropagates_through_backbone])
@pytest.mark.parametrize("kind", ["t5", "bert", "llama"])
def test_side_network_methods_send_no_gradient_into_the_backbone(method_name, kind):
    model = _prepare(method_name, kind)
    backbone = getattr(model, "backbone", model)
    frozen = [p for name, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen
    batch = make_batch(kind)
    model.train()
    counter = backward_with_counter(model, batch)
    assert all(p.grad is None for p in frozen)
    assert counter.inside_stack == 0, f"{counter.inside_stack} tensors saved for backward inside the frozen stacks"
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ trainable parameters, by hand
# Tiny BERT from conftest: width d=32, 2 layers, FFN 64, 3 labels. The head (pooler d*d+d, classifier
# 3d+3) is trained by every method and counted in every method's figure.
D, LAYERS, FFN, LABELS = 32, 2, 64, 3
HEAD = (D * D + D) + (LABELS * D + LABELS)


def test_trainable_parameters_match_hand_computed_values():
    r = 8  # READ: input projection d->r, GRU (3 gates: 3r(r) + 3r(r) + 2*3r biases), up-projection r->d
    read = (D * r + r) + (3 * r * r + 3 * r * r + 2 * 3 * r) + (r * D + D)
    # the token mixer (auto: 2 layers on an encoder): attention in (3r x r) and out (r x r) projections, a
    # feed-forward r -> 2r -> r, two LayerNorms (weight and bias), all with biases; then one more LayerNorm
    mixer_layer = (3 * r * r + 3 * r) + (r * r + r) + (r * 2 * r + 2 * r) + (2 * r * r + r) + 2 * 2 * r
    assert count_trainable(_prepare("read", "bert")) == read + 2 * mixer_layer + 2 * r + HEAD
    no_mixer = get_method("read").prepare(tiny_backbone("bert"), {**SMALL_OPTIONS["read"], "token_mixer_layers": 0})
    assert count_trainable(no_mixer) == read + HEAD

    rank = 8  # LoRA on query and value of each layer: A (rank x d) + B (d x rank)
    assert count_trainable(get_method("lora").prepare(tiny_backbone("bert"), {})) == LAYERS * 2 * 2 * rank * D + HEAD

    b = 4  # adapter after attention and FFN of each layer: down d->b (+bias), up b->d (+bias)
    assert count_trainable(_prepare("adapter", "bert")) == LAYERS * 2 * ((D * b + b) + (b * D + D)) + HEAD

    # BitFit: every bias of the body. Per layer: q, k, v, attention output (d each), attention LayerNorm (d),
    # intermediate (FFN), output (d), output LayerNorm (d); plus the embedding LayerNorm (d).
    bitfit = LAYERS * (4 * D + D + FFN + D + D) + D
    assert count_trainable(_prepare("bitfit", "bert")) == bitfit + HEAD


def test_bitfit_adds_zero_biases_where_the_model_has_none():
    model = _prepare("bitfit", "t5")
    t5 = tiny_backbone("t5")
    # per T5 block: q, k, v, o of each attention (+ cross attention in the decoder), wi and wo of the FFN
    d, ff, inner = 32, 64, 4 * 8  # d_model, d_ff, heads * d_kv
    encoder_block = 3 * inner + d + ff + d
    decoder_block = 2 * (3 * inner + d) + ff + d
    assert count_trainable(model) == 2 * encoder_block + 2 * decoder_block
    batch = make_batch("t5")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, t5(**batch).logits)


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("kind", ["t5", "bert", "llama-cls"])
def test_save_load_round_trip(method_name, kind, tmp_path):
    if (method_name, kind) in REFUSED:
        pytest.skip("refused combination")
    method = get_method(method_name)
    model = _prepare(method_name, kind)
    batch = make_batch(kind)
    train_steps(model, batch, steps=2, lr=1e-3)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    method.save(model, tmp_path)
    assert method_of(tmp_path) is method
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    # Adapters go back onto the same pretrained backbone; full fine-tuning's weights overwrite any weights.
    loaded = method.load(tiny_backbone(kind, seed=123 if method_name == "full" else 0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize("method_name", ["lora", "adapter", "bitfit", "prompt"])
def test_adapter_from_another_backbone_is_refused(method_name, tmp_path):
    get_method(method_name).save(_prepare(method_name, "bert"), tmp_path)
    with pytest.raises(IncompatibleAdapterError, match="was trained on BertForSequenceClassification"):
        get_method(method_name).load(tiny_backbone("bert", width=48), tmp_path)


def test_full_fine_tuning_trains_everything_and_keeps_tied_weights_tied(tmp_path):
    model = get_method("full").prepare(tiny_backbone("t5"), {})
    assert all(p.requires_grad for p in model.parameters())
    get_method("full").save(model, tmp_path)
    loaded = get_method("full").load(tiny_backbone("t5", seed=5), tmp_path)
    assert loaded.lm_head.weight is loaded.shared.weight or not loaded.config.tie_word_embeddings


@pytest.mark.parametrize(("method_name", "options", "message"), [
    ("lora", {"r": 0}, "lora option r=0 is out of range"),
    ("lora", {"rank": 4}, r"unknown lora option\(s\) \['rank'\]"),
    ("lora", {"target_modules": "no_such_module"}, "lora cannot attach"),
    ("adapter", {"bottleneck": -1}, "adapter option bottleneck=-1 is out of range"),
    ("prompt", {"num_virtual_tokens": "many"}, "must be like 20"),
    ("full", {"r": 8}, r"unknown full option\(s\)"),
])
def test_bad_method_options_are_refused(method_name, options, message):
    with pytest.raises(ConfigError, match=message):
        get_method(method_name).prepare(tiny_backbone("bert"), options)


def test_unknown_method_and_wrong_method_directory(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'lora2'; available: read, full, lora"):
        get_method("lora2")
    get_method("full").save(tiny_backbone("bert"), tmp_path)
    with pytest.raises(IncompatibleAdapterError, match="made by method 'full', not 'read'"):
        get_method("read").load(tiny_backbone("bert"), tmp_path)
