"""Ladder Side-Tuning (readapt.methods.lst) on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import backward_with_counter, generation_kwargs, make_batch, tiny_backbone, train_steps
from readapt import ConfigError
from readapt.methods import count_trainable, get_method
from readapt.methods.lst import LST_ENCODER_STATES, additive_mask

KINDS = ["t5", "bart", "bert", "gpt2", "llama-cls"]
LST = get_method("lst")


def _prepare(kind, **options):
    return LST.prepare(tiny_backbone(kind), options)


def _is_head(model, name: str) -> bool:
    return any(name.startswith(f"{head}.") for head in model.head_module_names)


# ------------------------------------------------------------------ (1) it learns
@pytest.mark.parametrize("kind", KINDS)
def test_loss_goes_down_on_a_fixed_batch(kind):
    model = _prepare(kind)
    losses = train_steps(model, make_batch(kind), steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------ (2) the backbone is frozen and forward-only
@pytest.mark.parametrize("kind", KINDS)
def test_backbone_gets_no_gradient_and_keeps_no_activations(kind):
    model = _prepare(kind)
    batch = make_batch(kind)
    # The up-projection starts at zero: after two steps gradients reach every side tensor (encoder side included).
    train_steps(model, batch, steps=2, lr=1e-2)
    model.zero_grad(set_to_none=True)
    counter = backward_with_counter(model, batch)
    for name, param in model.backbone.named_parameters():
        if _is_head(model, name):
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name
    assert counter.inside_stack == 0, f"{counter.inside_stack} tensors saved for backward inside the frozen stacks"
    assert counter.outside_stack > 0  # the side network did record: the counter works
    for name, param in model.side.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_frozen_stacks_stay_in_eval_mode_while_training():
    model = _prepare("t5").train()
    assert model.side.training
    assert all(not m.training for stack in model.info.stacks for m in stack.module.modules())


# ------------------------------------------------------------------ (3) untrained = the backbone
@pytest.mark.parametrize("kind", [*KINDS, "llama"])
def test_untrained_lst_equals_the_backbone(kind):
    batch = make_batch(kind)
    with torch.no_grad():
        reference = tiny_backbone(kind)(**batch)
        output = _prepare(kind).eval()(**batch)
    assert torch.equal(output.logits, reference.logits)
    assert torch.equal(output.loss, reference.loss)


# ------------------------------------------------------------------ (4) save / load
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_outputs(kind, tmp_path):
    model = _prepare(kind)
    batch = make_batch(kind)
    train_steps(model, batch, steps=3, lr=1e-2)
    with torch.no_grad():
        expected = model(**batch).logits
    LST.save(model, tmp_path)
    loaded = LST.load(tiny_backbone(kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert not torch.equal(expected, tiny_backbone(kind)(**batch).logits)  # training did change the model


# ------------------------------------------------------------------ (5) trainable parameters, by hand
def _lst_bert_count(d, layers, ffn, labels, r):
    """LST on BERT, from the design: per layer a ladder down-projection d->w (+bias), a gate scalar and a side
    block (q, k, v, o: w->w with biases; FFN w->ffn/r->w with biases; two LayerNorms of 2w); plus the first
    down-projection (of the embeddings) and the up-projection w->d. Post-norm: no final side norm. The head
    (BERT pooler d*d+d, classifier d*labels+labels) is trained as well."""
    w, f = d // r, ffn // r
    block = 4 * (w * w + w) + (w * f + f) + (f * w + w) + 2 * (2 * w)
    side = (layers + 1) * (d * w + w) + layers + layers * block + (w * d + d)
    return side + (d * d + d) + (d * labels + labels)


@pytest.mark.parametrize("r", [8, 4])
def test_trainable_parameters_of_tiny_bert_match_the_formula(r):
    # conftest's tiny BERT: d=32, 2 layers, FFN 64, 4 heads, 3 labels
    assert count_trainable(_prepare("bert", reduction_factor=r)) == _lst_bert_count(32, 2, 64, 3, r)


def test_trainable_parameters_of_minilm_sized_bert():
    # all-MiniLM-L6-v2's shape (6 layers, d=384, 12 heads, FFN 1536) with 2 labels; the vocabulary is not trained
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    model = LST.prepare(BertForSequenceClassification(config).eval(), {})
    assert count_trainable(model) == _lst_bert_count(384, 6, 1536, 2, 8) == 466_424


# ------------------------------------------------------------------ (6) initialisation by structured pruning
def _rows(offsets, heads, head_dim):
    return (torch.arange(heads)[:, None] * head_dim + offsets[None, :]).reshape(-1)


def _top(importance, k):
    return torch.topk(importance, k).indices.sort().values


def test_side_blocks_are_the_backbone_layers_pruned_by_magnitude():
    backbone = tiny_backbone("bert")  # d=32, 4 heads of 8, FFN 64; r=8: width 4, head size 1, FFN 8
    model = LST.prepare(backbone, {})
    network = model.side["encoder"]
    layers = backbone.bert.encoder.layer
    hidden = network.hidden_index

    # hidden dims: L1 of their columns in q, k, v, FFN-in and their rows in attention-out, FFN-out, over all layers
    importance = sum(
        sum(m.weight.abs().sum(0) for m in (lay.attention.self.query, lay.attention.self.key,
                                            lay.attention.self.value, lay.intermediate.dense))
        + sum(m.weight.abs().sum(1) for m in (lay.attention.output.dense, lay.output.dense))
        for lay in layers
    )
    assert torch.equal(hidden, _top(importance, 4))

    for layer, block in zip(layers, network.blocks, strict=True):
        kept = block.kept
        attention, ffn_in, ffn_out = layer.attention.self, layer.intermediate.dense, layer.output.dense
        q_rows = lambda w: w.weight.abs().sum(1).view(4, 8).sum(0)  # noqa: E731
        assert torch.equal(kept["attn.qk"], _top(q_rows(attention.query) + q_rows(attention.key), 1))
        vo = q_rows(attention.value) + layer.attention.output.dense.weight.abs().sum(0).view(4, 8).sum(0)
        assert torch.equal(kept["attn.vo"], _top(vo, 1))
        assert torch.equal(kept["ffn"], _top(ffn_in.weight.abs().sum(1) + ffn_out.weight.abs().sum(0), 8))

        qk, vo, ffn = _rows(kept["attn.qk"], 4, 8), _rows(kept["attn.vo"], 4, 8), kept["ffn"]
        expected = {
            "attn.q.weight": attention.query.weight[qk][:, hidden], "attn.q.bias": attention.query.bias[qk],
            "attn.k.weight": attention.key.weight[qk][:, hidden], "attn.k.bias": attention.key.bias[qk],
            "attn.v.weight": attention.value.weight[vo][:, hidden], "attn.v.bias": attention.value.bias[vo],
            "attn.o.weight": layer.attention.output.dense.weight[hidden][:, vo],
            "attn.o.bias": layer.attention.output.dense.bias[hidden],
            "attn_norm.weight": layer.attention.output.LayerNorm.weight[hidden],
            "attn_norm.bias": layer.attention.output.LayerNorm.bias[hidden],
            "up.weight": ffn_in.weight[ffn][:, hidden], "up.bias": ffn_in.bias[ffn],
            "down.weight": ffn_out.weight[hidden][:, ffn], "down.bias": ffn_out.bias[hidden],
            "ffn_norm.weight": layer.output.LayerNorm.weight[hidden], "ffn_norm.bias": layer.output.LayerNorm.bias[hidden],
        }
        parameters = dict(block.named_parameters())
        assert sorted(parameters) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(parameters[name], tensor), name
    # the ladder rungs start as the selection of the kept hidden dims
    for down in network.downsample:
        assert torch.equal(down.weight, torch.eye(32)[hidden]) and not down.bias.any()


def test_decoder_cross_attention_reads_the_encoder_side_dims():
    backbone = tiny_backbone("t5")  # d=32, 4 heads of d_kv 8; r=8: head size 1
    model = LST.prepare(backbone, {})
    encoder_hidden, decoder = model.side["encoder"].hidden_index, model.side["decoder"]
    for layer, block in zip(backbone.decoder.block, decoder.blocks, strict=True):
        cross = layer.layer[1].EncDecAttention
        assert torch.equal(block.kept["memory"], encoder_hidden)
        qk, vo = _rows(block.kept["cross.qk"], 4, 8), _rows(block.kept["cross.vo"], 4, 8)
        assert torch.equal(block.cross.q.weight, cross.q.weight[qk][:, decoder.hidden_index])
        assert torch.equal(block.cross.k.weight, cross.k.weight[qk][:, encoder_hidden])
        assert torch.equal(block.cross.v.weight, cross.v.weight[vo][:, encoder_hidden])
        assert torch.equal(block.cross.o.weight, cross.o.weight[decoder.hidden_index][:, vo])


def test_rotary_heads_keep_whole_pairs_and_the_backbone_frequencies():
    backbone = tiny_backbone("llama-cls")  # head size 8, 2 kv heads; r=2: side head size 4 = two rotary pairs
    model = LST.prepare(backbone, {"reduction_factor": 2})
    inv_freq = backbone.model.rotary_emb.inv_freq
    for layer, block in zip(backbone.model.layers, model.side["decoder"].blocks, strict=True):
        offsets = block.kept["attn.qk"]
        assert torch.equal(offsets[2:], offsets[:2] + 4)
        assert torch.equal(block.attn.rotary_freq, inv_freq[offsets[:2]].float())
        assert torch.equal(block.attn.k.weight, layer.self_attn.k_proj.weight[_rows(offsets, 2, 8)][:, block.kept["hidden"]])


@pytest.mark.parametrize("kind", [*KINDS, "llama"])
def test_unpruned_side_block_computes_exactly_its_backbone_layer(kind):
    """With reduction_factor=1 nothing is cut and every index set is in order, so side block i, given the input
    of backbone layer i, must return that layer's output: the side block mirrors each family's computation."""
    backbone = tiny_backbone(kind)
    batch = make_batch(kind)
    model = LST.prepare(backbone, {"reduction_factor": 1}).eval()
    seen, hooks = {}, []
    for stack in model.info.stacks:
        for i, layer in enumerate(stack.layers):
            def hook(module, args, kwargs, output, key=(stack.name, i)):
                seen[key] = (args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output)
            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**batch)
    padding = batch["attention_mask"].bool()
    seq2seq = kind in ("t5", "bart")
    for stack in model.info.stacks:
        network = model.side[stack.name]
        assert torch.equal(network.hidden_index, torch.arange(stack.hidden_size))
        x = seen[stack.name, 0][0]
        length = x.shape[1]
        keep = torch.ones(x.shape[0], 1, length, length, dtype=torch.bool)
        if not (seq2seq and stack.name == "decoder"):
            keep &= padding[:, None, None, :]
        if stack.name == "decoder":
            keep &= torch.ones(length, length, dtype=torch.bool).tril()
        extra = {}
        if kind == "t5":
            extra["position_bias"] = stack.layers[0].layer[0].SelfAttention.compute_bias(length, length)
        if kind.startswith("llama"):
            extra["position_ids"] = torch.arange(length)[None]
        if seq2seq and stack.name == "decoder":
            with torch.no_grad():
                extra["memory"] = backbone.get_encoder()(**{k: batch[k] for k in ("input_ids", "attention_mask")})[0]
            extra["memory_mask"] = additive_mask(padding[:, None, None, :], torch.float32)
        for i, block in enumerate(network.blocks):
            layer_input, layer_output = seen[stack.name, i]
            with torch.no_grad():
                ours = block(layer_input, additive_mask(keep, torch.float32), **extra)
            torch.testing.assert_close(ours, layer_output, rtol=1e-5, atol=1e-5, msg=f"{stack.name} layer {i}")
    for handle in hooks:
        handle.remove()


# ------------------------------------------------------------------ (7) options
@pytest.mark.parametrize(("options", "message"), [
    ({"reduction_factor": 0}, r"lst option reduction_factor=0 is out of range; it must be an integer >= 1"),
    ({"reduction_factor": -2}, r"reduction_factor=-2 is out of range"),
    ({"reduction_factor": 2.5}, r"reduction_factor=2.5 is out of range"),
    ({"reduction_factor": 3}, r"reduction_factor=3 must divide the hidden size 32 and the attention head size 8 "
                              r"of BertForSequenceClassification; valid values: 1, 2, 4, 8"),
    ({"reduction_factor": 16}, r"reduction_factor=16 must divide the hidden size 32 and the attention head size 8"),
    ({"gate_temperature": 0.0}, r"gate_temperature=0.0 must be > 0"),
    ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"reduction": 8}, r"unknown lst option\(s\) \['reduction'\]"),
])
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        _prepare("bert", **options)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ text-to-text scoring and generation
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_outputs_carry_the_encoder_side_states(kind):
    """readapt's rank classification runs the encoder once, then the model on its outputs per candidate."""
    model = _prepare(kind)
    batch = make_batch(kind)
    train_steps(model, batch, steps=3, lr=1e-2)
    with torch.no_grad():
        direct = model(**batch).logits
        encoder_outputs = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert LST_ENCODER_STATES in encoder_outputs
        via_encoder = model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"],
                            labels=batch["labels"], use_cache=False).logits
    assert torch.equal(direct, via_encoder)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_generation_runs_without_kv_cache(kind):
    backbone = tiny_backbone(kind)
    input_ids = make_batch(kind)["input_ids"][:2]
    reference = backbone.generate(input_ids=input_ids, **generation_kwargs(kind))
    model = LST.prepare(backbone, {})
    assert torch.equal(model.generate(input_ids=input_ids, **generation_kwargs(kind)), reference)
    assert model.generate(input_ids=input_ids, **{**generation_kwargs(kind), "num_beams": 3}).shape[0] == 2
    with pytest.raises(ConfigError, match="keeps no KV cache"):
        model.generate(input_ids=input_ids, use_cache=True, **generation_kwargs(kind))
