"""Side work READ no longer does: an encoder side network whose correction nothing reads, pooling through weighted
copies of the layer states."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_batch, tiny_backbone, train_steps
from readapt import ReadConfig, get_read_model
from readapt.adapter_files import CONFIG_NAME
from readapt.errors import ConfigError
from readapt.read.model import ReadModel
from readapt.read.side_network import pool_states, second_text_mask


def test_a_decoupled_encoder_without_encoder_context_is_not_adapted(tmp_path):
    """T5, decoupled, encoder_context=False: the backbone decoder reads the frozen encoder output and the decoder
    side network no corrected one, so an encoder side network would compute what nothing reads."""
    model = get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, encoder_context=False))
    assert [s.name for s in model.adapted_stacks] == ["decoder"] and list(model.read) == ["decoder"]
    batch = make_batch("t5")
    losses = train_steps(model, batch, steps=4)
    assert losses[-1] < losses[0]
    # asked for explicitly, the encoder is still adapted (and coupled or with encoder context, by default)
    for config in (ReadConfig(hidden_size=16, encoder_context=False, stacks=["encoder", "decoder"]),
                   ReadConfig(hidden_size=16), ReadConfig(hidden_size=16, encoder_context=False, couple_encoder=True)):
        assert list(get_read_model(tiny_backbone("t5"), config).read) == ["encoder", "decoder"], config
    with pytest.raises(ConfigError, match="not adapted"):
        get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, encoder_context=False, sequence_context="pooled"))


def test_an_adapter_saved_with_the_unread_encoder_side_network_loads_and_computes_the_same(tmp_path):
    batch = make_batch("t5")
    old = get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, encoder_context=False,
                                                         stacks=["encoder", "decoder"]))
    train_steps(old, batch, steps=3)
    assert old.read["encoder"].up_projection.weight.abs().sum() == 0  # it never got a gradient
    old.save_pretrained(tmp_path / "adapter")
    metadata = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    metadata["config"]["stacks"] = None  # as saved before: the default, which then adapted the encoder too
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(metadata))
    with torch.no_grad():
        expected = old(**batch).logits
        loaded = ReadModel.from_pretrained(tiny_backbone("t5"), tmp_path / "adapter")
        assert list(loaded.read) == ["decoder"]
        assert torch.equal(loaded(**batch).logits, expected)
        fresh = get_read_model(tiny_backbone("t5"), ReadConfig(hidden_size=16, encoder_context=False))
        fresh.load_adapter(tmp_path / "adapter", "old")
        fresh.set_adapter("old")
        assert torch.equal(fresh(**batch).logits, expected)


def _pool_by_weighted_copies(states, token_mask, causal, second_text=None):
    """pool_states as it was: a weighted copy of the states per mask, then a sum (the reference)."""
    if second_text is not None:
        real = token_mask.to(torch.bool)
        masks = (real, real & ~second_text, real & second_text)
        return torch.cat([_pool_by_weighted_copies(states, m, False) for m in masks], dim=2)
    weights = token_mask.to(states.dtype)[None, :, :, None]
    weighted = states * weights
    if causal:
        return weighted.cumsum(2) / weights.cumsum(2).clamp(min=1)
    return weighted.sum(2, keepdim=True) / weights.sum(2, keepdim=True).clamp(min=1)


def test_pooling_by_a_masked_matmul_equals_the_weighted_copies():
    torch.manual_seed(0)
    states = torch.randn(3, 4, 9, 16)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    ids = torch.randint(3, 50, (4, 9))
    ids[:, 4] = 2  # the separator; row 0 has a second one, which starts nothing new
    ids[0, 7] = 2
    ids[2, 4] = 7  # row 2: a single text
    second = second_text_mask(ids, 2)
    for token_mask in (mask, None):
        reference_mask = torch.ones(4, 9) if token_mask is None else token_mask
        for causal in (False, True):
            torch.testing.assert_close(pool_states(states, token_mask, causal),
                                       _pool_by_weighted_copies(states, reference_mask, causal), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pool_states(states, token_mask, False, second),
                                   _pool_by_weighted_copies(states, reference_mask, False, second), rtol=1e-6, atol=1e-6)
    assert pool_states(states, mask, False, second).shape == (3, 4, 3, 16)


def test_the_token_mixer_builds_no_mask_when_nothing_is_blocked():
    """No padding and not causal: the layers run without the (B * heads, T, T) mask, computing what an all-allowed
    mask computes."""
    from readapt.read.side_network import TokenMixer

    torch.manual_seed(0)
    mixer = TokenMixer(16, ReadConfig(hidden_size=16, token_mixer_layers=2), causal=False).eval()
    x = torch.randn(3, 7, 16)
    blocked = torch.zeros(3 * mixer.heads, 7, 7, dtype=torch.bool)
    masked = x
    for layer in mixer.layers:
        masked = layer(masked, src_mask=blocked)
    for token_mask in (None, torch.ones(3, 7, dtype=torch.long)):
        torch.testing.assert_close(mixer(x, token_mask), mixer.norm(masked), rtol=1e-5, atol=1e-6)
    padded = torch.ones(3, 7, dtype=torch.long)
    padded[0, 5:] = 0
    out = mixer(x, padded)  # padding: the mask path, padding keys blocked
    assert torch.isfinite(out).all()
    changed = x.clone()
    changed[0, 5:] += 1  # what padding holds never reaches a real token
    torch.testing.assert_close(mixer(changed, padded)[0, :5], out[0, :5], rtol=1e-5, atol=1e-6)
