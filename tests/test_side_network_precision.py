"""ReadConfig.compute_dtype: a side network that computes in bfloat16 / float16 with float32 master weights.

The weights are cast once per forward (one concatenation, one cast, views that the call swaps in), gradients reach
the float32 weights through that cast, δφ comes back in float32, and "auto" keeps float32 on the CPU (so nothing
changes there) and follows a low-precision backbone on a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from readapt import ReadConfig, get_read_model
from readapt.errors import ConfigError
from readapt.pretrained import load_backbone
from readapt.read.side_network import ReadSideNetwork

LOW = [torch.bfloat16, torch.float16]


def _network(compute_dtype: str, **options) -> ReadSideNetwork:
    torch.manual_seed(0)
    config = ReadConfig(hidden_size=32, token_mixer_layers=2, token_mixer_heads=4, sequence_context="mean",
                        compute_dtype=compute_dtype, dropout=0.0, token_mixer_dropout=0.0, **options)
    network = ReadSideNetwork(64, config).train()
    torch.nn.init.normal_(network.up_projection.weight, std=0.1)  # a trained-looking correction, not zero
    return network


def _run(network: ReadSideNetwork) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    states = torch.randn(4, 3, 7, 64, generator=g)
    mask = torch.ones(3, 7)
    mask[0, 5:] = 0
    delta = network(states, token_mask=mask)
    delta.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters()}
    network.zero_grad(set_to_none=True)
    return delta.detach(), grads


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_compute_matches_float32_within_rounding_and_trains_float32_weights(dtype):
    reference, reference_grads = _run(_network("float32"))
    network = _network(str(dtype).removeprefix("torch."))
    seen = []
    network.rnn.register_forward_pre_hook(lambda module, args: seen.append((module.weight_ih_l0.dtype, args[0].dtype)))
    delta, grads = _run(network)
    assert seen == [(dtype, dtype)]  # the GRU ran on cast weights and states
    assert delta.dtype == torch.float32  # added to φ_N in float32
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in network.parameters())
    assert network.rnn.weight_ih_l0 is network.rnn._flat_weights[0]  # the GRU's own weights are back
    scale = reference.abs().max()
    assert (delta - reference).abs().max() / scale < 0.03
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert (grad - reference_grads[name]).norm() / reference_grads[name].norm() < 0.05, name


def test_the_weights_are_cast_once_per_forward_even_when_recomputed_in_chunks(monkeypatch):
    whole, whole_grads = _run(_network("bfloat16", recompute=False))
    network = _network("bfloat16", recompute=True, recompute_chunk_tokens=7)  # one row of 7 tokens per chunk
    casts = []
    real_cat = torch.cat

    def counting_cat(tensors, *args, **kwargs):
        out = real_cat(tensors, *args, **kwargs)
        if out.numel() == sum(p.numel() for p in network.parameters()):
            casts.append(out)
        return out

    monkeypatch.setattr(torch, "cat", counting_cat)
    chunked, chunked_grads = _run(network)
    monkeypatch.undo()
    assert len(casts) == 1  # 3 chunks, each recomputed in backward: still one cast of the weights
    # the same sums in other batch shapes: bfloat16 rounding apart, the same correction and gradients
    assert (chunked - whole).abs().max() / whole.abs().max() < 0.03
    for name, grad in chunked_grads.items():
        assert (grad - whole_grads[name]).norm() / whole_grads[name].norm() < 0.05, name


def test_auto_is_float32_on_the_cpu_and_the_backbones_low_precision_on_a_gpu():
    network = _network("auto")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert network.compute_dtype_for(torch.bfloat16, cpu) == torch.float32
    assert network.compute_dtype_for(torch.bfloat16, cuda) == torch.bfloat16
    assert network.compute_dtype_for(torch.float16, cuda) == torch.float16
    assert network.compute_dtype_for(torch.float32, cuda) == torch.float32
    assert _network("float16").compute_dtype_for(torch.float32, cpu) == torch.float16
    with pytest.raises(ConfigError, match="compute_dtype='int8' is invalid"):
        ReadConfig(compute_dtype="int8")


def test_a_bfloat16_backbone_feeds_a_bfloat16_side_network_its_own_states(tiny_models, tmp_path):
    loaded = load_backbone(str(tiny_models["bert"]), 2, dtype="bfloat16")
    model = get_read_model(loaded.model, ReadConfig(hidden_size=16, compute_dtype="bfloat16"))
    captured = []
    model.read["encoder"].register_forward_pre_hook(lambda module, args, kwargs: captured.append(args[0].dtype),
                                                    with_kwargs=True)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert captured == [torch.bfloat16]  # captured in the compute dtype: no float32 copy of the states
    assert out.logits.dtype == torch.float32
    trained = [p for p in model.read.parameters() if p.grad is not None]
    assert trained and all(p.dtype == p.grad.dtype == torch.float32 for p in trained)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["compute_dtype"] == "bfloat16"


def test_adapters_saved_before_compute_dtype_load_as_float32():
    old = ReadConfig(hidden_size=16).to_dict()
    del old["compute_dtype"]
    assert ReadConfig.from_dict(old).compute_dtype == "float32"  # what they were trained with
    assert ReadConfig.from_dict({**old, "compute_dtype": "auto"}).compute_dtype == "auto"
    assert ReadConfig.from_dict({"hidden_size": 16}).compute_dtype == "auto"  # a user's options: the default
