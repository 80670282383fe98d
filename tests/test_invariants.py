"""The READ invariants (docs/method.md), on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    FAMILIES,
    GENERATIVE,
    backward_with_counter,
    generation_kwargs,
    make_batch,
    tiny_backbone,
    train_steps,
)
from readapt import ReadConfig, get_read_model
from readapt.errors import ConfigError

SMALL = ReadConfig(hidden_size=16)


@pytest.mark.parametrize("recompute", [True, False])
def test_backbone_never_gets_gradients_nor_keeps_activations(family, recompute):
    model = get_read_model(tiny_backbone(family), ReadConfig(hidden_size=16, recompute=recompute))
    batch = make_batch(family)
    # Zero-initialised up-projections: gradients reach a whole side network after one step, and the encoder's
    # (which feeds the decoder side network, itself zero at first) after two.
    train_steps(model, batch, steps=3)
    model.zero_grad(set_to_none=True)
    counter = backward_with_counter(model, batch)

    head = {f"{name}." for name in model.head_module_names}
    for name, param in model.backbone.named_parameters():
        if any(name.startswith(prefix) for prefix in head):
            assert param.requires_grad
            continue
        assert not param.requires_grad, name
        assert param.grad is None, name
    assert counter.inside_stack == 0, "the frozen stacks recorded autograd state"
    assert counter.outside_stack > 0  # the side network / head did record: the counter works
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.read.parameters())


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_coupled_encoder_backpropagates_through_decoder_only(kind):
    model = get_read_model(tiny_backbone(kind), ReadConfig(hidden_size=16, couple_encoder=True))
    batch = make_batch(kind)
    train_steps(model, batch, steps=1)
    counter = backward_with_counter(model, batch)
    # Coupled mode is an ablation: the decoder now keeps activations, the encoder still does not.
    assert counter.inside_stack > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.read["encoder"].up_projection.weight.grad.abs().sum() > 0


def _all_outputs_equal(a, b) -> None:
    for key in ("loss", "logits"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", [*FAMILIES, "llama-cls"])
@pytest.mark.parametrize(
    "config",
    [SMALL, ReadConfig(hidden_size=8, rnn_type="lstm", h0="embeddings", aggregation="last", input_projection=False),
     ReadConfig(hidden_size=8, rnn_type="rnn", num_rnn_layers=2, dropout=0.1, scaling=2.0)],
    ids=["gru", "lstm-h0-last", "rnn-2layers"],
)
def test_untrained_read_equals_backbone(kind, config):
    batch = make_batch(kind)
    backbone = tiny_backbone(kind)
    with torch.no_grad():
        reference = backbone(**batch, output_hidden_states=True)
    model = get_read_model(backbone, config)
    model.eval()
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
    _all_outputs_equal(output, reference)
    # hidden states handed back to the user are untouched by READ's in-place normalisation
    key = "decoder_hidden_states" if kind in ("t5", "bart") else "hidden_states"
    for ours, theirs in zip(output[key], reference[key], strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", GENERATIVE)
def test_untrained_read_generates_the_backbone_tokens(kind):
    backbone = tiny_backbone(kind)
    input_ids = make_batch(kind)["input_ids"][:2]
    reference = backbone.generate(input_ids=input_ids, **generation_kwargs(kind))
    model = get_read_model(backbone, SMALL)
    assert torch.equal(model.generate(input_ids=input_ids, **generation_kwargs(kind)), reference)


def test_training_changes_outputs(family):
    """Guards the tests above against a correction that is silently never applied."""
    backbone = tiny_backbone(family)
    batch = make_batch(family)
    with torch.no_grad():
        before = backbone(**batch).logits.clone()
    model = get_read_model(backbone, SMALL)
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("kind", [*FAMILIES, "llama-cls"])
def test_trainable_parameters_do_not_grow_with_depth(kind):
    shallow = get_read_model(tiny_backbone(kind, num_layers=6), ReadConfig(hidden_size=16))
    deep = get_read_model(tiny_backbone(kind, num_layers=24), ReadConfig(hidden_size=16))
    assert shallow.get_nb_trainable_parameters()[0] == deep.get_nb_trainable_parameters()[0] > 0
    assert shallow.get_nb_trainable_parameters()[1] < deep.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("kind", GENERATIVE)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_kv_cache_equals_full_recompute(kind, num_beams):
    model = get_read_model(tiny_backbone(kind), SMALL)
    batch = make_batch(kind)
    train_steps(model, batch, steps=5)
    input_ids = batch["input_ids"][:2]
    kwargs = {**generation_kwargs(kind), "num_beams": num_beams}
    with_cache = model.generate(input_ids=input_ids, use_cache=True, **kwargs)
    without_cache = model.generate(input_ids=input_ids, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    # The corrections really act at every generated step: the scores differ from the bare backbone's.
    scored = {"output_scores": True, "return_dict_in_generate": True, **generation_kwargs(kind)}
    read_scores = model.generate(input_ids=input_ids, **scored).scores
    backbone_scores = model.unload().generate(input_ids=input_ids, **scored).scores
    assert all(not torch.allclose(ours, theirs) for ours, theirs in zip(read_scores, backbone_scores, strict=False))


def test_print_trainable_parameters_format(capsys):
    model = get_read_model(tiny_backbone("bert"), SMALL)
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    # BERT's classifier and the pooler that feeds it are the task head and are trained; the body is not
    assert model.head_module_names == ["classifier", "bert.pooler"]
    assert all(p.requires_grad for p in model.backbone.bert.pooler.parameters())
    assert not any(p.requires_grad for p in model.backbone.bert.encoder.parameters())


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_chunked_recompute_gives_the_same_gradients(kind):
    """Recomputing the side network chunk by chunk in backward is an exact memory trade, not an approximation."""
    batch = make_batch(kind)
    grads = []
    for config in (ReadConfig(hidden_size=16, recompute=False),
                   ReadConfig(hidden_size=16, recompute=True, recompute_chunk_tokens=1, dropout=0.0)):
        model = get_read_model(tiny_backbone(kind), config)
        train_steps(model, batch, steps=2)
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _other_architecture(name: str):
    import transformers as tf

    common = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}
    torch.manual_seed(0)
    if name == "roberta":
        return tf.RobertaForSequenceClassification(tf.RobertaConfig(**common, num_labels=2)), "encoder-only", ["classifier"]
    if name == "deberta-v2":
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**common, num_labels=2)), "encoder-only", \
            ["pooler", "classifier"]
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2)), "decoder-only", []
    if name == "mistral":
        return tf.MistralForSequenceClassification(tf.MistralConfig(**common, num_key_value_heads=2, num_labels=2)), \
            "decoder-only", ["score"]
    if name == "mt5":
        return tf.MT5ForConditionalGeneration(tf.MT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                           num_heads=4, decoder_start_token_id=0, pad_token_id=0)), \
            "encoder-decoder", []
    raise ValueError(name)


@pytest.mark.parametrize("name", ["roberta", "deberta-v2", "qwen2", "mistral", "mt5"])
def test_other_supported_architectures_are_detected_and_exact(name):
    backbone, family, heads = _other_architecture(name)
    backbone.eval()
    input_ids = torch.randint(3, 64, (2, 6))
    kwargs = {"decoder_input_ids": input_ids[:, :3]} if family == "encoder-decoder" else {}
    with torch.no_grad():
        reference = backbone(input_ids=input_ids, **kwargs).logits
    model = get_read_model(backbone, SMALL)
    assert model.info.family == family and model.head_module_names == heads
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, **kwargs).logits, reference)


def test_recomputation_only_where_it_bounds_memory():
    """Recomputation keeps one chunk's RNN activations alive at a time; a batch that fits in one chunk (e.g. [CLS]
    alone) keeps them at that bound anyway, so it runs the RNN once instead of twice."""
    from readapt.read.side_network import ReadSideNetwork

    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, recompute=True, recompute_chunk_tokens=16)).train()
    calls = []
    network.rnn.register_forward_hook(lambda *_: calls.append(1))
    for tokens, runs in ((4, 1), (5, 4)):  # 4 rows x 4 tokens = one chunk; 4 x 5 = 20 > 16: 2 chunks, twice each
        calls.clear()
        network(torch.randn(3, 4, tokens, 8)).sum().backward()
        assert len(calls) == runs, (tokens, calls)


def test_layerwise_mlp_ablation_by_hand():
    """rnn_type="mlp" (the non-recurrent ablation): δ = up(mean_i tanh(W_i proj(rms φ_i) + b_i)); its own weights
    per layer, nothing carried across layers; untrained, the model is still exactly the backbone."""
    from readapt.read.side_network import ReadSideNetwork

    torch.manual_seed(0)
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, rnn_type="mlp"), num_layers=3).eval()
    torch.nn.init.normal_(network.up_projection.weight)
    states = torch.randn(3, 2, 5, 8)
    delta = network(states.clone())
    normed = states / states.pow(2).mean(-1, keepdim=True).add(network.eps).sqrt()
    hidden = [torch.tanh(network.input_projection(normed[i]) @ network.rnn.weight[i] + network.rnn.bias[i]) for i in range(3)]
    torch.testing.assert_close(delta, network.up_projection(torch.stack(hidden).mean(0)), rtol=1e-5, atol=1e-6)
    gru = ReadSideNetwork(8, ReadConfig(hidden_size=4), num_layers=3)
    assert sum(p.numel() for p in network.rnn.parameters()) == 3 * (4 * 4 + 4) != sum(p.numel() for p in gru.rnn.parameters())

    backbone = tiny_backbone("bert")
    ids = torch.randint(3, 20, (2, 6))
    with torch.no_grad():
        expected = backbone(input_ids=ids).logits
        model = get_read_model(backbone, ReadConfig(hidden_size=8, rnn_type="mlp"))
        assert torch.equal(model(input_ids=ids).logits, expected)
    with pytest.raises(ConfigError, match="h0='zeros'"):
        ReadConfig(rnn_type="mlp", h0="embeddings")
    with pytest.raises(ConfigError, match="encoder_context=False"):
        get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=8, rnn_type="mlp"))
    get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=8, rnn_type="mlp", encoder_context=False))
