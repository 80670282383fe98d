"""READ's token mixer (ReadConfig.token_mixer_layers): the READ invariants with it on, on tiny random models, and
what it changes around the side network (no [CLS]-only shortcut, causal attention on decoder-only stacks, no mixer
on the decoder of an encoder-decoder model, the feature cache replays every token)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from conftest import backward_with_counter, make_batch, tiny_backbone, train_steps
from readapt import ReadConfig, get_read_model
from readapt.errors import ConfigError
from readapt.read.config import AUTO_TOKEN_MIXER_LAYERS
from readapt.read.side_network import ReadSideNetwork, TokenMixer

MIXER = ReadConfig(hidden_size=16, token_mixer_layers=2, token_mixer_heads=2)
KINDS = ["bert", "llama", "llama-cls", "t5"]  # encoder-only, decoder-only (LM and classifier), encoder-decoder


def _trained(kind: str, config: ReadConfig = MIXER, steps: int = 3):
    model = get_read_model(tiny_backbone(kind), config)
    train_steps(model, make_batch(kind), steps=steps)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_read_with_a_token_mixer_equals_backbone(kind):
    batch = make_batch(kind)
    backbone = tiny_backbone(kind)
    with torch.no_grad():
        reference = backbone(**batch)
    model = get_read_model(backbone, MIXER).eval()
    assert model.read[model.adapted_stacks[0].name].token_mixer is not None
    with torch.no_grad():
        output = model(**batch)
    assert torch.equal(output.logits, reference.logits) and torch.equal(output.loss, reference.loss)


@pytest.mark.parametrize("kind", KINDS)
def test_no_backbone_gradient_and_the_mixer_trains(kind):
    model = _trained(kind)
    model.zero_grad(set_to_none=True)
    counter = backward_with_counter(model, make_batch(kind))
    head = tuple(f"{name}." for name in model.head_module_names)
    for name, param in model.backbone.named_parameters():
        if not name.startswith(head):
            assert not param.requires_grad and param.grad is None, name
    assert counter.inside_stack == 0
    mixer = model.read[model.adapted_stacks[0].name].token_mixer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameters_with_a_mixer_do_not_grow_with_depth(kind):
    shallow = get_read_model(tiny_backbone(kind, num_layers=2), MIXER).get_nb_trainable_parameters()[0]
    deep = get_read_model(tiny_backbone(kind, num_layers=12), MIXER).get_nb_trainable_parameters()[0]
    plain = get_read_model(tiny_backbone(kind, num_layers=2),
                           dataclasses.replace(MIXER, token_mixer_layers=0)).get_nb_trainable_parameters()[0]
    assert shallow == deep > plain


def test_the_first_token_correction_reads_the_other_tokens_but_not_the_padding():
    model = _trained("bert").eval()
    batch = make_batch("bert")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[-1:, :5], attention_mask=mask[-1:, :5]).logits  # the padded row, unpadded
        changed = ids.clone()
        changed[0, 4] = (changed[0, 4] + 1) % 64
        other = model(input_ids=changed, attention_mask=mask).logits
        assert not model.head_reads_only(slice(0, 1), input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(alone[0], logits[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[0], logits[0])  # [CLS]'s correction depends on token 4
    with pytest.raises(ConfigError, match="token mixer"), model.correcting_positions(slice(0, 1)):
        pass


def test_the_recipe_corrects_every_token_when_the_mixer_is_on():
    from readapt.methods import get_method

    method = get_method("read")
    batch = make_batch("bert")
    probe = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert method.corrects_first_token_only(get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=16,
                                                           token_mixer_layers=0)), probe)
    assert not method.corrects_first_token_only(get_read_model(tiny_backbone("bert"), MIXER), probe)


@pytest.mark.parametrize("kind", ["llama", "llama-cls"])
def test_the_mixer_is_causal_on_a_decoder_only_stack(kind):
    model = _trained(kind).eval()
    ids = make_batch(kind)["input_ids"][:1]
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 64
    with torch.no_grad():
        states = [model.backbone.base_model(input_ids=i).last_hidden_state for i in (ids, changed)]
    torch.testing.assert_close(states[0][:, :4], states[1][:, :4], rtol=0, atol=0)  # earlier tokens: untouched
    assert not torch.allclose(states[0][:, 4:], states[1][:, 4:])


def test_left_padding_on_a_decoder_only_stack_stays_finite_and_exact():
    model = _trained("llama-cls").eval()
    ids = make_batch("llama-cls")["input_ids"][:1, :5]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # left padding: pad queries see no key
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model.backbone.base_model(input_ids=ids).last_hidden_state
        left = model.backbone.base_model(input_ids=padded, attention_mask=mask, position_ids=positions).last_hidden_state
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left[:, 3:], alone, rtol=1e-4, atol=1e-5)


def test_generation_with_a_mixer_recomputes_and_a_continued_kv_cache_is_refused():
    model = _trained("llama")
    ids = make_batch("llama")["input_ids"][:2]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(input_ids=ids, use_cache=True, **kwargs),
                       model.generate(input_ids=ids, use_cache=False, **kwargs))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ConfigError, match="token mixer"):
            model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)


def test_the_decoder_of_an_encoder_decoder_model_gets_no_mixer():
    model = get_read_model(tiny_backbone("t5"), MIXER)
    assert model.read["encoder"].token_mixer is not None and model.read["decoder"].token_mixer is None


def test_feature_cache_replay_equals_the_live_mixer():
    """The cache replays every token's states (the mixer needs them): the same loss and gradients as live."""
    from readapt.read.cache import CachedCall

    model = _trained("bert")
    batch = make_batch("bert")
    calls = []  # what a cache stores: the frozen stack's states of every token, as the cache writer gets them
    with torch.no_grad(), model.recording(lambda name, capture, final: calls.append(
            CachedCall(name, capture.states.clone(), final.clone(), None))):
        model(**batch)
    model.train()
    results = []
    for replay in (False, True):
        torch.manual_seed(0)  # the same dropout masks (mixer and head)
        with model.replaying(calls) if replay else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_token_mixer_config_is_validated_and_resolved_per_family():
    with pytest.raises(ConfigError, match="token_mixer_heads=3 does not divide hidden_size=16"):
        ReadConfig(hidden_size=16, token_mixer_layers=1, token_mixer_heads=3)
    for bad in ({"token_mixer_layers": -1}, {"token_mixer_layers": True}, {"token_mixer_dropout": 1.0},
                {"token_mixer_heads": 0}, {"token_mixer_ffn_multiple": 0}, {"token_mixer_attention_dropout": -0.1},
                {"token_mixer_attention_dropout": True}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ReadConfig(**bad)
    from readapt.read.config import AUTO_TOKEN_MIXER_LAYERS

    auto = ReadConfig()
    assert auto.token_mixer_layers is None
    assert auto.resolved_for("encoder-only", 102).token_mixer_layers == AUTO_TOKEN_MIXER_LAYERS
    assert auto.resolved_for("decoder-only").token_mixer_layers == 0
    assert auto.resolved_for("decoder-only", sequence_head=True).token_mixer_layers == AUTO_TOKEN_MIXER_LAYERS
    assert auto.resolved_for("encoder-decoder", sequence_head=True).token_mixer_layers == 0
    assert auto.resolved_for("encoder-decoder").token_mixer_layers == 0
    assert ReadConfig(token_mixer_layers=3).resolved_for("decoder-only").token_mixer_layers == 3
    assert ReadConfig(token_mixer_layers=1).mixes_tokens and ReadConfig(sequence_context="mean").mixes_tokens
    assert not ReadConfig(token_mixer_layers=0).mixes_tokens


def test_a_decoder_only_classifier_gets_a_causal_mixer_and_a_language_model_none():
    """auto: a sequence-classification head never continues a KV cache, so READ mixes tokens there (causally);
    a causal LM keeps its cached generation and label-word scoring without one."""
    classifier = get_read_model(tiny_backbone("llama-cls"), ReadConfig(hidden_size=16))
    side = classifier.read["decoder"]
    assert classifier.read_config.token_mixer_layers == AUTO_TOKEN_MIXER_LAYERS
    assert side.token_mixer is not None and side.causal
    lm = get_read_model(tiny_backbone("llama"), ReadConfig(hidden_size=16))
    assert lm.read_config.token_mixer_layers == 0 and lm.read["decoder"].token_mixer is None
    batch = make_batch("llama-cls")
    train_steps(classifier, batch, steps=3)
    assert side.up_projection.weight.abs().sum() > 0  # the correction is no longer zero
    ids = batch["input_ids"][:1]
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[:, 4:], mask[:, 4:] = 0, 0  # the same first 4 tokens, then right padding
    with torch.no_grad():  # the head reads token 4; the causal mixer lets nothing after it in
        prefix = classifier(input_ids=ids[:, :4], attention_mask=mask[:, :4]).logits
        longer = classifier(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(longer, prefix, rtol=1e-4, atol=1e-5)


def test_an_adapter_saved_before_the_mixer_existed_loads_without_one():
    saved = ReadConfig(hidden_size=16, token_mixer_layers=0).to_dict()
    del saved["token_mixer_layers"]
    assert ReadConfig.from_dict(saved).token_mixer_layers == 0
    options = {"hidden_size": 16}  # options a user gives: the field stays auto
    assert ReadConfig.from_dict(options).token_mixer_layers is None
    assert ReadConfig.from_dict(MIXER.to_dict()) == MIXER


def test_mixer_masks_padding_keys_and_never_leaves_a_query_without_one():
    torch.manual_seed(0)
    mixer = TokenMixer(8, ReadConfig(hidden_size=8, token_mixer_layers=1, token_mixer_heads=2,
                                     token_mixer_dropout=0.0), causal=True).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = mixer(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2:], mixer(x[:1, 2:], mask[:1, 2:])[0], rtol=1e-5, atol=1e-6)
    side = ReadSideNetwork(8, ReadConfig(hidden_size=8))  # unresolved auto: no mixer
    assert side.token_mixer is None


def test_training_with_a_mixer_from_the_feature_cache_matches_live(tiny_models, tmp_path, step_losses):
    """`readapt train` with a token mixer on BERT: every token corrected (no [CLS]-only path), and the losses from a
    float32 feature cache (every token's states replayed) equal the live ones."""
    import json

    from readapt.recipe import DataConfig, TrainingConfig, train

    for name, rows in (("train", 24), ("dev", 8)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(rows):
                f.write(json.dumps({"text": " ".join(["good", "bad", "plot", "movie"][: 1 + i % 4] * (1 + i % 3)),
                                    "label": ["neg", "pos"][i % 2]}) + "\n")
    losses = step_losses
    runs = []
    for cached in (False, True):
        losses.clear()
        metrics = train(TrainingConfig(
            data=DataConfig(train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "dev.jsonl"),
                            text_columns=["text"]),
            model=str(tiny_models["bert"]), epochs=2, batch_size=8, max_length=16, progress=False,
            output_dir=str(tmp_path / f"run-{cached}"), cache_dir=str(tmp_path / "cache"), cache_features=cached,
            cache_dtype="float32", method_options={"hidden_size": 16, "token_mixer_layers": 1, "token_mixer_heads": 2}))
        assert metrics["read_corrected_positions"] == "every token"
        runs.append(list(losses))
    assert len(runs[0]) == 6 and runs[1] == pytest.approx(runs[0], rel=1e-5)


@pytest.mark.parametrize("options", [{"sequence_context": "none"}, {"sequence_context": "pooled"},
                                     {"sequence_context": "mean"}, {"sequence_context": "segments"},
                                     {"sequence_context": "pooled", "h0": "embeddings", "rnn_type": "lstm"}])
def test_a_padded_batch_gets_the_corrections_of_its_rows_alone(options):
    """With a mixer the recurrence runs on the real tokens only (packed); every real token's correction is the one
    its row gets unpadded, whatever the sequence context."""
    from readapt.read.side_network import pool_states, second_text_mask

    config = ReadConfig(hidden_size=8, token_mixer_layers=1, token_mixer_heads=2, token_mixer_dropout=0.0,
                        separator_token_id=2, **options)
    torch.manual_seed(0)
    side = ReadSideNetwork(12, config).eval()
    torch.nn.init.normal_(side.up_projection.weight)
    states, embeddings = torch.randn(3, 2, 6, 12), torch.randn(2, 6, 12)
    ids = torch.tensor([[5, 6, 2, 7, 8, 9], [5, 2, 7, 0, 0, 0]])
    mask = (ids != 0).long()

    def delta(rows: slice, length: int) -> torch.Tensor:
        part, part_mask = states[:, rows, :length].clone(), mask[rows, :length]
        pooled = None
        if config.sequence_context == "segments":
            pooled = pool_states(part, part_mask, False, second_text_mask(ids[rows, :length], 2))
        return side(part, embeddings[rows, :length].clone(), token_mask=part_mask, pooled_states=pooled)

    with torch.no_grad():
        padded, alone = delta(slice(0, 2), 6), delta(slice(1, 2), 3)
    torch.testing.assert_close(padded[1, :3], alone[0], rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_its_own_setting_and_the_rest_keep_token_mixer_dropout():
    from readapt.read.side_network import TokenMixer

    shared = TokenMixer(8, ReadConfig(hidden_size=8, token_mixer_layers=2, token_mixer_heads=2,
                                      token_mixer_dropout=0.2), causal=False)
    assert [layer.self_attn.dropout for layer in shared.layers] == [0.2, 0.2]  # None: the same as the rest
    apart = TokenMixer(8, ReadConfig(hidden_size=8, token_mixer_layers=2, token_mixer_heads=2, token_mixer_dropout=0.2,
                                     token_mixer_attention_dropout=0.0), causal=False)
    for layer in apart.layers:
        assert layer.self_attn.dropout == 0.0
        assert layer.dropout.p == layer.dropout1.p == layer.dropout2.p == 0.2
    # attention without its dropout is deterministic in training; the residual dropout still draws masks
    x = torch.randn(2, 5, 8)
    apart.train()
    for layer in apart.layers:
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.0
    assert torch.equal(apart(x, None), apart(x, None))


@pytest.mark.parametrize("causal", [False, True])
def test_key_dropout_hides_keys_in_training_only_and_keeps_each_rows_first_real_token(causal):
    config = ReadConfig(hidden_size=8, token_mixer_layers=1, token_mixer_heads=2, token_mixer_dropout=0.0,
                        token_mixer_key_dropout=0.999)
    torch.manual_seed(0)
    mixer = TokenMixer(8, config, causal=causal)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1] if causal else [1, 1, 1, 1, 0, 0]])
    dropped = mixer._dropped_keys(2, 6, x.device, mask)
    assert not dropped[0, 0] and not dropped[1, 2 if causal else 0] and dropped.sum() >= 8
    # every other key hidden: a token's input reaches the other tokens' outputs only as their first real token
    # (or, causal, each query's own key); a later token's does not
    changed = x.clone()
    changed[:, 3] += torch.randn(8)
    torch.manual_seed(1)
    out = mixer(x, mask)
    torch.manual_seed(1)
    out_changed = mixer(changed, mask)
    others = [0, 1, 2, 5] if causal else [0, 1, 2]
    torch.testing.assert_close(out[0, others], out_changed[0, others], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0, 3], out_changed[0, 3])
    assert torch.isfinite(out).all()
    # evaluation hides nothing: the same as a mixer without key dropout
    plain = TokenMixer(8, dataclasses.replace(config, token_mixer_key_dropout=0.0), causal=causal)
    plain.load_state_dict(mixer.state_dict())
    mixer.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, mask)[0], plain(x, mask)[0])
    with pytest.raises(ConfigError, match="token_mixer_key_dropout"):
        ReadConfig(token_mixer_key_dropout=1.0)
