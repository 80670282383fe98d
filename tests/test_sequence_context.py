"""READ's sequence context: every token's correction sees its sequence's real tokens (decoder-only stacks: those up
to and including it, a running mean). "mean": the mean of their RNN summaries; "pooled": the RNN's summary of the
per-layer mean of their raw states. Invariants, for both: padding changes nothing, an untrained model is still
exactly the backbone, no gradient reaches the backbone, chunked recomputation gives the same gradients, the
feature cache replays it exactly, and what it cannot do is refused. "pooled" also: computed by hand, and a head
that reads [CLS] gets the same logits when the side network runs on [CLS] and the pooled sequence only.
"segments" (encoder stacks: the means of a pair's two texts compared in the RNN's input): the encoder invariants,
by hand, [CLS] alone, where the second text starts, and how "auto" picks it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_backbone
from readapt import ReadConfig, ReadModel, get_read_model
from readapt.errors import ConfigError
from readapt.read.side_network import ReadSideNetwork, pool_states, second_text_mask, second_text_start

CONTEXTS = ("mean", "pooled")  # the contexts a decoder-only stack takes too
ENCODER_CONTEXTS = (*CONTEXTS, "segments")
CONTEXT = ReadConfig(hidden_size=16, sequence_context="mean")
SEPARATOR = 5  # the tiny models' random ids (3..19) hold it now and then: some rows are pairs


def _config(context: str, **overrides) -> ReadConfig:
    if context == "segments":
        overrides.setdefault("separator_token_id", SEPARATOR)
    overrides.setdefault("hidden_size", 16)
    return ReadConfig(sequence_context=context, **overrides)


def _randomise_up_projections(model) -> None:
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "up_projection" in name:
            torch.nn.init.normal_(parameter, std=0.5)


def _decoder_inputs(kind: str, batch: int) -> dict:
    return {"decoder_input_ids": torch.zeros(batch, 3, dtype=torch.long)} if kind == "t5" else {}


def test_side_network_mixes_tokens_only_with_context():
    torch.manual_seed(0)
    states = torch.randn(3, 2, 5, 8)  # N layers, B, T, d
    changed = states.clone()
    changed[:, 0, 4] += 1.0  # another token of sequence 0
    for context, mixes in (("none", False), ("mean", True), ("pooled", True)):
        network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context=context)).eval()
        torch.nn.init.normal_(network.up_projection.weight)
        first, second = network(states.clone()), network(changed.clone())
        assert torch.equal(first[1], second[1])  # the other sequence never
        assert (not torch.equal(first[0, 0], second[0, 0])) == mixes


@pytest.mark.parametrize("kind", ["bert", "t5"])
@pytest.mark.parametrize("context", ENCODER_CONTEXTS)
def test_padding_changes_nothing(kind, context):
    model = get_read_model(tiny_backbone(kind), _config(context))
    _randomise_up_projections(model)
    model.eval()
    torch.manual_seed(2)
    ids = torch.randint(3, 20, (2, 7))
    ids[1, 2] = SEPARATOR  # a pair of texts in the padded row
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    padded = model(input_ids=ids, attention_mask=mask, **_decoder_inputs(kind, 2)).logits[1]
    alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4], **_decoder_inputs(kind, 1)).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5), (padded - alone).abs().max()


@pytest.mark.parametrize("kind", ["bert", "t5"])
@pytest.mark.parametrize("context", ENCODER_CONTEXTS)
def test_untrained_is_the_backbone_and_training_leaves_it_alone(kind, context):
    backbone = tiny_backbone(kind)
    ids = torch.randint(3, 20, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        expected = backbone(input_ids=ids, attention_mask=mask, **_decoder_inputs(kind, 2)).logits
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = get_read_model(backbone, _config(context))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, **_decoder_inputs(kind, 2)).logits, expected)

    model.train()
    labels = torch.tensor([0, 1]) if kind == "bert" else torch.randint(3, 20, (2, 3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(p.grad is None for p in backbone.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head = tuple(model.head_module_names)
    for key, value in backbone.state_dict().items():
        if not key.startswith(head):
            assert torch.equal(value, frozen[key]), key


@pytest.mark.parametrize("context", ENCODER_CONTEXTS)
def test_chunked_recomputation_gives_the_same_gradients(context):
    torch.manual_seed(0)
    states = torch.randn(3, 4, 6, 8)
    mask = torch.ones(4, 6)
    mask[2, 3:] = 0
    second = torch.zeros(4, 6, dtype=torch.bool)
    second[:2, 4:] = True  # rows 0 and 1 are pairs
    pooled = pool_states(states, mask, False, second) if context == "segments" else None
    grads = []
    for recompute in (False, True):
        torch.manual_seed(5)
        network = ReadSideNetwork(8, _config(context, hidden_size=4, recompute=recompute,
                                             recompute_chunk_tokens=6))  # one sequence per chunk
        torch.nn.init.normal_(network.up_projection.weight)
        network.train()
        network(states.clone(), token_mask=mask, pooled_states=None if pooled is None else pooled.clone()
                ).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("context", ENCODER_CONTEXTS)
def test_feature_cache_replay_equals_live(context):
    model = get_read_model(tiny_backbone("bert"), _config(context))
    _randomise_up_projections(model)
    model.eval()
    ids = torch.randint(3, 20, (3, 6))
    ids[0, 3] = SEPARATOR
    mask = torch.ones_like(ids)
    mask[1, 2:] = 0
    live = model(input_ids=ids, attention_mask=mask).logits
    from readapt.read.cache import CachedCall

    calls = []
    with model.recording(lambda name, capture, final: calls.append(
            CachedCall(name, capture.states.clone(), final.clone(), None))):
        model(input_ids=ids, attention_mask=mask)
    with model.replaying(calls):
        replayed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(live, replayed)


@pytest.mark.parametrize("context", CONTEXTS)
def test_causal_context_never_looks_ahead(context):
    torch.manual_seed(0)
    states = torch.randn(3, 2, 5, 8)
    changed = states.clone()
    changed[:, 0, 3] += 1.0  # token 3 of sequence 0
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context=context), causal=True).eval()
    torch.nn.init.normal_(network.up_projection.weight)
    first, second = network(states.clone()), network(changed.clone())
    assert torch.equal(first[0, :3], second[0, :3]) and torch.equal(first[1], second[1])  # earlier tokens: unchanged
    assert not torch.equal(first[0, 4], second[0, 4])  # a later token sees it
    if context == "pooled":
        return  # computed by hand in test_pooled_context_by_hand
    # the running mean by hand: token t adds the mean of the summaries of tokens 0..t
    network.sequence_context = "none"
    own = network(states.clone())  # up_projection(summary) per token, no context
    bias = network.up_projection.bias
    running = (own - bias).cumsum(1) / torch.arange(1, 6).view(1, 5, 1)
    assert torch.allclose(first, own + running, atol=1e-5)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_only_context_padding_cache_and_generation(kind, context):
    from readapt.encoding import left_padded

    model = get_read_model(tiny_backbone(kind), _config(context))
    _randomise_up_projections(model)
    model.eval()
    batch = left_padded([[5, 6, 7, 8, 9], [9, 12]], pad_token_id=0)
    alone = left_padded([[9, 12]], pad_token_id=0)
    with torch.no_grad():  # left padding changes nothing: pads are outside every running mean
        padded = model(**batch).logits[1, -2:]
        single = model(**alone).logits[0]
    assert torch.allclose(padded, single, atol=1e-5), (padded - single).abs().max()
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    # generate recomputes the sequence at each step (a running mean needs every earlier token), asked or not
    generated = model.generate(**batch, use_cache=True, **settings)
    assert torch.equal(generated, model.generate(**batch, use_cache=False, **settings))
    with torch.no_grad():  # each generated token is what a full forward pass over the sequence predicts
        for step in range(5):
            prefix = generated[:, : batch["input_ids"].shape[1] + step]
            mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=prefix, attention_mask=mask, position_ids=positions).logits[:, -1]
            assert torch.equal(logits.argmax(-1), generated[:, prefix.shape[1]])
    with pytest.raises(ConfigError, match="use_cache=False"):  # a KV cache continued by hand is refused
        out = model(**alone, use_cache=True)
        model(input_ids=torch.tensor([[4]]), cache=out.past_key_values, use_cache=True)


def test_what_it_cannot_do_is_refused():
    with pytest.raises(ConfigError, match="needs an adapted encoder stack or a decoder-only model"):
        get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, sequence_context="mean", stacks=["decoder"]))
    with pytest.raises(ConfigError, match="sequence_context='max' is invalid"):
        ReadConfig(sequence_context="max")
    model = get_read_model(tiny_backbone("bert"), CONTEXT)
    with pytest.raises(ConfigError, match="'mean' sequence context"), model.correcting_positions(slice(0, 1)):
        pass


def test_command_line_flag_reaches_the_config():
    from readapt.cli import build_parser, train_config_from_args

    for context in ("mean", "segments"):
        args = build_parser().parse_args(["train", "--task", "sst2", "--read-sequence-context", context])
        assert train_config_from_args(args).method_options == {"sequence_context": context}
    assert build_parser().parse_args(["train", "--task", "sst2"]).read_sequence_context is None


@pytest.mark.parametrize("causal", [False, True])
def test_pooled_context_by_hand(causal):
    """δ_t = up(agg RNN(rms(proj φ_t)) + agg RNN(proj rms(mean of the real tokens' raw φ))) * scaling."""
    torch.manual_seed(0)
    states = torch.randn(3, 2, 5, 8) * 3
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context="pooled", scaling=0.5), causal=causal)
    network.eval()
    torch.nn.init.normal_(network.up_projection.weight)
    delta = network(states.clone(), token_mask=mask)

    def summary(x):  # (N, S, d) -> (S, r): the RNN over the layers, mean over them
        return network.rnn(network.input_projection(x))[0].mean(0)

    def rms(x):
        return x / x.pow(2).mean(-1, keepdim=True).add(network.eps).sqrt()

    for row in range(2):
        for token in range(5):
            if mask[row, token] == 0:
                continue
            seen = [t for t in range(5) if mask[row, t] == 1 and (not causal or t <= token)]
            pooled = states[:, row, seen].mean(1)
            own = summary(rms(states[:, row, token])[:, None])[0]
            context = summary(rms(pooled)[:, None])[0]
            expected = network.up_projection(own + context) * 0.5
            assert torch.allclose(delta[row, token], expected, atol=1e-5), (row, token)


@pytest.mark.parametrize("context", ["pooled", "segments"])
def test_context_corrects_cls_alone(context):
    """A BERT classifier reads [CLS]: with the pooled / segments context, correcting [CLS] alone (the means taken
    over every real token) gives the full correction's logits (shared passes: tests/test_multi_adapter.py)."""
    model = get_read_model(tiny_backbone("bert"), _config(context, token_mixer_layers=0))  # a mixer reads every token
    _randomise_up_projections(model)
    model.eval()
    torch.manual_seed(3)
    ids = torch.randint(3, 20, (3, 7))
    mask = torch.ones_like(ids)
    if context == "segments":
        ids[:, 3] = SEPARATOR
        ids[1, 1] = SEPARATOR  # an early separator: a short first text
        mask[2, 5:] = 0
    else:
        mask[2, 4:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        assert model.head_reads_only(slice(0, 1), input_ids=ids, attention_mask=mask)
        with model.correcting_positions(slice(0, 1)):
            cls_only = model(input_ids=ids, attention_mask=mask).logits
        if context == "segments":
            unsplit = ids.masked_fill(ids == SEPARATOR, 6)  # no separator: one text, another correction
            assert not torch.allclose(model(input_ids=unsplit, attention_mask=mask).logits, full)
    assert torch.allclose(full, cls_only, atol=1e-5), (full - cls_only).abs().max()


def test_auto_context_resolves_per_family(tmp_path):
    """The default ("auto") is "segments" on encoder-only models whose config names a separator token, "pooled" on
    the others and "none" elsewhere; saved adapters hold the result."""
    import json

    assert ReadConfig().sequence_context == "auto"
    get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=8)).save_pretrained(tmp_path / "pooled")
    assert json.loads((tmp_path / "pooled" / "adapter_config.json").read_text())["config"]["sequence_context"] == "pooled"
    backbone = tiny_backbone("bert")
    backbone.config.sep_token_id = SEPARATOR
    get_read_model(backbone, ReadConfig(hidden_size=8)).save_pretrained(tmp_path / "segments")
    saved = json.loads((tmp_path / "segments" / "adapter_config.json").read_text())["config"]
    assert (saved["sequence_context"], saved["separator_token_id"]) == ("segments", SEPARATOR)
    reloaded = ReadModel.from_pretrained(tiny_backbone("bert"), tmp_path / "segments")  # no sep id in this config
    assert reloaded.read_config.separator_token_id == SEPARATOR
    for kind, expected in (("bert", "pooled"), ("t5", "none"), ("llama", "none"), ("gpt2", "none")):
        model = get_read_model(tiny_backbone(kind), ReadConfig(hidden_size=8))
        assert model.read_config.sequence_context == expected, kind
        assert all(side.sequence_context == expected for name, side in model.read.items() if name != "decoder")
    assert ReadConfig(sequence_context="none").resolved_for("encoder-only").sequence_context == "none"


def test_second_text_starts_after_the_first_separator():
    ids = torch.tensor([[2, 7, 5, 8, 9, 5, 0], [2, 7, 8, 5, 0, 0, 0], [2, 7, 8, 9, 4, 4, 4]])
    mask = second_text_mask(ids, 5)
    assert mask.tolist()[0] == [False, False, False, True, True, True, True]
    assert not mask[1, :4].any() and mask[1, 4:].all()  # padding after a single text: the token mask drops it
    assert not mask[2].any()
    assert [second_text_start(row, 5) for row in ([2, 7, 5, 8, 9, 5], [2, 7, 8, 5], [2, 7, 8])] == [3, 4, 3]


def test_segments_context_by_hand():
    """Every token's RNN input at layer i: proj(rms φ_t) + W_c [rms m; rms a * rms b; |rms a - rms b|], m, a, b the
    real tokens' raw means over the whole input, its first text and its second one (zero without a second text)."""
    torch.manual_seed(0)
    states = torch.randn(3, 2, 6, 8) * 3
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    second = torch.zeros(2, 6, dtype=torch.bool)
    second[0, 3:] = True  # row 0: tokens 0-2 and 3-5; row 1: one text of 4 tokens
    network = ReadSideNetwork(8, _config("segments", hidden_size=4, scaling=0.5)).eval()
    torch.nn.init.normal_(network.up_projection.weight)
    delta = network(states.clone(), token_mask=mask, pooled_states=pool_states(states, mask, False, second))

    def rms(x):
        return x / x.pow(2).mean(-1, keepdim=True).add(network.eps).sqrt()

    for row, first_text, second_text in ((0, [0, 1, 2], [3, 4, 5]), (1, [0, 1, 2, 3], [])):
        whole = rms(states[:, row, first_text + second_text].mean(1))
        a = rms(states[:, row, first_text].mean(1))
        b = rms(states[:, row, second_text].mean(1)) if second_text else torch.zeros(3, 8)
        compared = network.segments_projection(torch.cat([whole, a * b, (a - b).abs()], -1))  # (N, r)
        for token in first_text + second_text:
            x = network.input_projection(rms(states[:, row, token])) + compared
            expected = network.up_projection(network.rnn(x[:, None])[0].mean(0)[0]) * 0.5
            assert torch.allclose(delta[row, token], expected, atol=1e-5), (row, token)
    swapped = states.clone()  # the second text's content matters to the first text's tokens
    swapped[:, 0, 4] += 1.0
    again = network(swapped.clone(), token_mask=mask, pooled_states=pool_states(swapped, mask, False, second))
    assert not torch.allclose(again[0, 0], delta[0, 0]) and torch.equal(again[1], delta[1])


def test_segments_context_needs_a_separator_and_token_ids():
    from readapt.read.config import ReadConfig as Config

    backbone = tiny_backbone("bert")
    assert get_read_model(backbone, ReadConfig(hidden_size=8)).read_config.sequence_context == "pooled"  # no sep id
    with pytest.raises(ConfigError, match="separator_token_id=tokenizer.sep_token_id"):
        get_read_model(tiny_backbone("bert"), ReadConfig(hidden_size=8, sequence_context="segments"))
    with pytest.raises(ConfigError, match="separator_token_id=-1 is invalid"):
        Config(separator_token_id=-1)
    backbone = tiny_backbone("bert")
    backbone.config.sep_token_id = SEPARATOR  # what readapt's loader copies from the tokenizer
    model = get_read_model(backbone, ReadConfig(hidden_size=8))
    assert (model.read_config.sequence_context, model.read_config.separator_token_id) == ("segments", SEPARATOR)
    with pytest.raises(ConfigError, match="call the model with input_ids"):
        model(inputs_embeds=torch.randn(1, 4, 32))
    for kind in ("llama", "gpt2"):
        with pytest.raises(ConfigError, match="decoder-only stack's tokens cannot see"):
            get_read_model(tiny_backbone(kind), _config("segments"))
    assert get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=8, separator_token_id=SEPARATOR)
                          ).read_config.sequence_context == "none"  # auto: encoder-only models only


def test_loader_gives_encoders_the_tokenizers_separator():
    from readapt.pretrained import load_backbone

    loaded = load_backbone(None, 2, False)  # the embedded all-MiniLM-L6-v2
    assert loaded.model.config.sep_token_id == loaded.tokenizer.sep_token_id is not None
    model = get_read_model(loaded.model, ReadConfig(hidden_size=8))
    assert model.read_config.sequence_context == "segments"
