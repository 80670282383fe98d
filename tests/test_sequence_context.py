"""READ's sequence context (ReadConfig.sequence_context="mean"): every token's correction sees the mean RNN
summary of its sequence's real tokens. Invariants: padding changes nothing, an untrained model is still exactly
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


def test_what_it_cannot_do_is_refused():
    with pytest.raises(ConfigError, match="needs an adapted encoder stack"):
        get_read_model(tiny_backbone("llama"), CONTEXT)
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
