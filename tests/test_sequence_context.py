"""READ's sequence context (ReadConfig.sequence_context="mean"): every token's correction sees the mean RNN
summary of its sequence's real tokens (decoder-only stacks: of those up to and including it, a running mean). Invariants: padding changes nothing, an untrained model is still exactly
the backbone, no gradient reaches the backbone, chunked recomputation gives the same gradients, the feature
cache replays it exactly, and what it cannot do is refused."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_backbone
from readapt import ReadConfig, get_read_model
from readapt.errors import ConfigError
from readapt.side_network import ReadSideNetwork

CONTEXT = ReadConfig(hidden_size=16, sequence_context="mean")


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
    for context, mixes in (("none", False), ("mean", True)):
        network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context=context)).eval()
        torch.nn.init.normal_(network.up_projection.weight)
        first, second = network(states.clone()), network(changed.clone())
        assert torch.equal(first[1], second[1])  # the other sequence never
        assert (not torch.equal(first[0, 0], second[0, 0])) == mixes


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_padding_changes_nothing(kind):
    model = get_read_model(tiny_backbone(kind), CONTEXT)
    _randomise_up_projections(model)
    model.eval()
    torch.manual_seed(2)
    ids = torch.randint(3, 20, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    padded = model(input_ids=ids, attention_mask=mask, **_decoder_inputs(kind, 2)).logits[1]
    alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4], **_decoder_inputs(kind, 1)).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5), (padded - alone).abs().max()


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_untrained_is_the_backbone_and_training_leaves_it_alone(kind):
    backbone = tiny_backbone(kind)
    ids = torch.randint(3, 20, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        expected = backbone(input_ids=ids, attention_mask=mask, **_decoder_inputs(kind, 2)).logits
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = get_read_model(backbone, CONTEXT)
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


def test_chunked_recomputation_gives_the_same_gradients():
    torch.manual_seed(0)
    states = torch.randn(3, 4, 6, 8)
    mask = torch.ones(4, 6)
    mask[2, 3:] = 0
    grads = []
    for recompute in (False, True):
        torch.manual_seed(5)
        network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context="mean", recompute=recompute,
                                                recompute_chunk_tokens=6))  # one sequence per chunk
        torch.nn.init.normal_(network.up_projection.weight)
        network.train()
        network(states.clone(), token_mask=mask).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in network.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_feature_cache_replay_equals_live():
    model = get_read_model(tiny_backbone("bert"), CONTEXT)
    _randomise_up_projections(model)
    model.eval()
    ids = torch.randint(3, 20, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 2:] = 0
    live = model(input_ids=ids, attention_mask=mask).logits
    from readapt.cache import CachedCall

    calls = []
    with model.recording(lambda name, capture, final: calls.append(
            CachedCall(name, capture.states.clone(), final.clone(), None))):
        model(input_ids=ids, attention_mask=mask)
    with model.replaying(calls):
        replayed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(live, replayed)


def test_causal_context_never_looks_ahead():
    torch.manual_seed(0)
    states = torch.randn(3, 2, 5, 8)
    changed = states.clone()
    changed[:, 0, 3] += 1.0  # token 3 of sequence 0
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context="mean"), causal=True).eval()
    torch.nn.init.normal_(network.up_projection.weight)
    first, second = network(states.clone()), network(changed.clone())
    assert torch.equal(first[0, :3], second[0, :3]) and torch.equal(first[1], second[1])  # earlier tokens: unchanged
    assert not torch.equal(first[0, 4], second[0, 4])  # a later token sees it
    # the running mean by hand: token t adds the mean of the summaries of tokens 0..t
    network.sequence_context = "none"
    own = network(states.clone())  # up_projection(summary) per token, no context
    bias = network.up_projection.bias
    running = (own - bias).cumsum(1) / torch.arange(1, 6).view(1, 5, 1)
    assert torch.allclose(first, own + running, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_only_context_padding_cache_and_generation(kind):
    from readapt.data import left_padded

    model = get_read_model(tiny_backbone(kind), CONTEXT)
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
    with pytest.raises(ConfigError, match="use sequence context"), model.correcting_positions(slice(0, 1)):
        pass


def test_command_line_flag_reaches_the_config():
    from readapt.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--task", "sst2", "--read-sequence-context", "mean"])
    assert _train_config(args).method_options == {"sequence_context": "mean"}
    assert build_parser().parse_args(["train", "--task", "sst2"]).read_sequence_context is None
