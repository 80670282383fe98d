"""ReadConfig.recompute=None (auto): the side network keeps its activations when the free memory holds them and
recomputes them in chunks when it does not (readapt.read.recompute), with the same gradients either way."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_batch, tiny_backbone, train_steps
from readapt import ReadConfig, get_read_model
from readapt.errors import ConfigError
from readapt.read import recompute
from readapt.read.side_network import ReadSideNetwork

AMPLE, TIGHT = 1 << 40, 1  # bytes free


def _free(monkeypatch, free_bytes):
    monkeypatch.setattr(recompute, "free_memory_bytes", lambda device: free_bytes)


def _rnn_calls(model) -> list:
    calls = []
    for network in model.read.values():
        network.rnn.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _gradients_and_calls(kind: str, config: ReadConfig, batch: dict) -> tuple[dict, int, dict]:
    model = get_read_model(tiny_backbone(kind), config)
    train_steps(model, batch, steps=2)  # a correction that is no longer zero, gradients everywhere
    model.zero_grad(set_to_none=True)
    calls = _rnn_calls(model)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, len(calls), model.recompute_summary()


# dropout off (the token mixer's too): a chunk draws its own dropout masks, so only then are the runs comparable
@pytest.mark.parametrize("kind", ["bert", "t5", "llama-cls"])
def test_auto_keeps_activations_when_memory_is_ample_and_chunks_when_tight_with_the_same_gradients(kind, monkeypatch):
    config = ReadConfig(hidden_size=16, token_mixer_dropout=0.0)
    assert config.recompute is None and config.recompute_chunk_tokens is None  # the default is auto
    batch = make_batch(kind, batch=4, length=7)
    _free(monkeypatch, AMPLE)
    ample, ample_calls, ample_summary = _gradients_and_calls(kind, config, batch)
    _free(monkeypatch, TIGHT)
    tight, tight_calls, tight_summary = _gradients_and_calls(kind, config, batch)

    stacks = 2 if kind == "t5" else 1
    assert ample_calls == stacks  # one fused RNN call per stack, nothing run twice
    assert tight_calls == stacks * 4 * 2  # one row per chunk (the budget is one token), each run again in backward
    for summary in ample_summary.values():
        assert summary["recompute"] == "auto" and summary["first"]["decision"] == "keep activations"
        assert summary["first"]["free_bytes"] == AMPLE and summary["first"]["activation_bytes_per_token"] > 0
    for summary in tight_summary.values():
        assert summary["first"]["decision"].startswith("recompute in chunks of 1 tokens")
    assert ample.keys() == tight.keys()
    for name, grad in ample.items():
        torch.testing.assert_close(tight[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_chunk_is_as_large_as_the_budget_allows_and_equal_sized(monkeypatch):
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, sequence_context="none")).train()
    per_token = network.activation_bytes_per_token(3, 5)
    # room for 12 tokens' activations: 20 tokens (4 rows x 5) -> 2 chunks of 10 tokens (2 rows each)
    _free(monkeypatch, int(12 * per_token / recompute.MEMORY_SHARE) + 1)
    calls = []
    network.rnn.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    network(torch.randn(3, 4, 5, 8)).sum().backward()
    assert calls == [10, 10, 10, 10]  # two chunks, each recomputed in backward
    assert network.recompute_policy.first["decision"] == "recompute in chunks of 10 tokens"


def test_explicit_settings_are_kept_whatever_the_memory(monkeypatch):
    states = torch.randn(3, 4, 5, 8)
    for free_bytes in (AMPLE, TIGHT):
        _free(monkeypatch, free_bytes)
        for config, runs in ((ReadConfig(hidden_size=4, recompute=False), [20]),
                             (ReadConfig(hidden_size=4, recompute=True, recompute_chunk_tokens=10), [10] * 4),
                             (ReadConfig(hidden_size=4, recompute=True), [20])):  # 256 by default: one chunk
            network = ReadSideNetwork(8, config).train()
            calls = []
            network.rnn.register_forward_hook(lambda module, args, output, calls=calls: calls.append(args[0].shape[1]))
            network(states.clone()).sum().backward()
            assert calls == runs, (config.recompute, config.recompute_chunk_tokens, free_bytes)
    # auto with an explicit chunk size: that chunk when recomputing, none when the activations fit
    _free(monkeypatch, TIGHT)
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4, recompute_chunk_tokens=10)).train()
    assert network.recompute_policy.plan(20, 100, torch.device("cpu")).chunk_tokens == 10


def test_a_device_without_a_probe_recomputes_in_the_old_chunks(monkeypatch):
    _free(monkeypatch, None)
    policy = recompute.RecomputePolicy(None, None)
    assert policy.plan(100, 4, torch.device("cpu")).recompute is False
    plan = policy.plan(1000, 4, torch.device("cpu"))
    assert plan.recompute and plan.chunk_tokens == recompute.DEFAULT_CHUNK_TOKENS


def test_no_probe_and_no_decision_outside_training(monkeypatch):
    monkeypatch.setattr(recompute, "free_memory_bytes", lambda device: pytest.fail("probed at inference"))
    network = ReadSideNetwork(8, ReadConfig(hidden_size=4)).train()
    with torch.no_grad():
        network(torch.randn(3, 4, 5, 8))
    network.eval()
    network(torch.randn(3, 4, 5, 8))
    assert network.recompute_policy.first is None


def test_data_parallel_processes_on_one_machine_split_its_ram(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 8 * 2**30})())
    monkeypatch.setattr(recompute, "_cgroup_room", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert recompute.free_memory_bytes(torch.device("cpu")) == 8 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert recompute.free_memory_bytes(torch.device("cpu")) == 2 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert recompute.free_memory_bytes(torch.device("cpu")) == 8 * 2**30


def test_the_free_memory_probe_on_this_cpu():
    free = recompute.free_memory_bytes(torch.device("cpu"))
    assert isinstance(free, int) and free > 0
    assert recompute.free_memory_bytes(torch.device("meta")) is None


def test_the_choice_is_logged_once_and_a_change_again(monkeypatch, caplog):
    _free(monkeypatch, AMPLE)
    model = get_read_model(tiny_backbone("llama-cls"), ReadConfig(hidden_size=16))
    with caplog.at_level(logging.INFO, logger="readapt"):
        train_steps(model, make_batch("llama-cls"), steps=3)
    messages = [r.getMessage() for r in caplog.records if "recompute=" in r.getMessage()]
    assert len(messages) == 1 and "decoder side network, recompute=auto: keep activations" in messages[0]
    assert model.recompute_summary()["decoder"]["training_calls"] == {"keep activations": 3}
    caplog.clear()
    model.read["decoder"].recompute_policy.free_bytes = 1  # the memory got tight
    with caplog.at_level(logging.INFO, logger="readapt"):
        train_steps(model, make_batch("llama-cls"), steps=2)
    messages = [r.getMessage() for r in caplog.records if "recompute=" in r.getMessage()]
    assert len(messages) == 1 and "now recompute in chunks" in messages[0]


def _saved_bytes(network: ReadSideNetwork, states: torch.Tensor, **inputs) -> int:
    """Bytes of the tensors autograd keeps for backward, each storage once, the inputs and weights left out."""
    skip = {p.untyped_storage().data_ptr() for p in network.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (states, *inputs.values()) if isinstance(t, torch.Tensor)}
    seen = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in skip:
            seen[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(states, **inputs)
    return sum(seen.values())


@pytest.mark.parametrize("options", [
    {}, {"rnn_type": "lstm"}, {"rnn_type": "rnn"}, {"rnn_type": "mlp"}, {"num_rnn_layers": 2}, {"dropout": 0.1},
    {"input_projection": False}, {"token_mixer_layers": 2}, {"token_mixer_layers": 1, "sequence_context": "pooled"},
    {"sequence_context": "mean"}, {"h0": "embeddings"},
])
def test_the_activation_estimate_covers_what_autograd_keeps(options):
    """The policy's bytes per token (from the shapes) are at least what autograd saves, and at most 3 times it."""
    layers, batch, tokens, width = 6, 4, 24, 96
    config = ReadConfig(**{"hidden_size": 32, "recompute": False, "sequence_context": "none", **options})
    network = ReadSideNetwork(width, config, num_layers=layers).train()
    inputs = {"token_mask": torch.ones(batch, tokens)}
    if config.h0 == "embeddings":
        inputs["embeddings"] = torch.randn(batch, tokens, width)
    saved = _saved_bytes(network, torch.randn(layers, batch, tokens, width), **inputs)
    sequences = batch * tokens + (batch if config.sequence_context == "pooled" else 0)
    estimate = network.activation_bytes_per_token(layers, tokens) * sequences
    assert saved <= estimate <= 3 * saved, (saved, estimate)


def test_config_values_and_saved_adapters():
    assert ReadConfig(recompute="auto").recompute is None
    for bad in ("yes", 1, 0.5):
        with pytest.raises(ConfigError, match="recompute"):
            ReadConfig(recompute=bad)
    with pytest.raises(ConfigError, match="recompute_chunk_tokens"):
        ReadConfig(recompute_chunk_tokens=0)
    # an adapter saved before "auto" existed holds the fixed policy: it loads, and keeps it
    saved = {**ReadConfig(hidden_size=16).to_dict(), "recompute": True, "recompute_chunk_tokens": 256}
    loaded = ReadConfig.from_dict(saved)
    assert loaded.recompute is True and loaded.recompute_chunk_tokens == 256
    assert ReadConfig.from_dict(json.loads(ReadConfig().to_json_string())).recompute is None


def test_metrics_json_records_the_choice(tiny_models, tmp_path):
    from readapt import train
    from readapt.recipe.config import DataConfig, TrainingConfig

    rows = [{"text": f"word{i % 5} text {i}", "label": ["neg", "pos"][i % 2]} for i in range(16)]
    for name in ("train", "dev"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainingConfig(data=DataConfig(train_file=str(tmp_path / "train.jsonl"),
                                            validation_file=str(tmp_path / "dev.jsonl"), text_columns=["text"]),
                            model=str(tiny_models["bert"]), epochs=1, batch_size=8, eval_batch_size=16, max_length=16,
                            progress=False, output_dir=str(tmp_path / "run"), overwrite=True,
                            cache_dir=str(tmp_path / "cache"), method_options={"hidden_size": 16})
    train(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["read_recompute"]["encoder"]
    assert record["recompute"] == "auto" and record["first"]["decision"] == "keep activations"
    assert record["training_calls"] == {"keep activations": 2}


def test_the_command_line_flags():
    from readapt.cli.commands import train_config_from_args
    from readapt.cli.parser import build_parser

    def options(*flags):
        args = build_parser().parse_args(["train", "--task", "sst2", *flags])
        return train_config_from_args(args).method_options

    assert "recompute" not in options() and "recompute_chunk_tokens" not in options()  # auto
    assert options("--read-recompute")["recompute"] is True
    assert options("--no-read-recompute")["recompute"] is False
    assert options("--read-recompute", "--read-recompute-chunk-tokens", "64")["recompute_chunk_tokens"] == 64
