"""benchmarks/side_network_search.py: its candidate side networks keep READ's contract, and the script runs
(and resumes) on a few real GLUE rows. The figures come from running the script, not from these tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_GLUE_DIR, needs_real_glue

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


CANDIDATES = [{"mixer_layers": 0}, {"mixer_layers": 2}, {"mixer_layers": 1, "mixer_place": "every"},
              {"mixer_layers": 2, "recurrence": "layer-attention"}, {"mixer_layers": 1, "segments": False}]


def _inputs(layers: int = 3, batch: int = 2, tokens: int = 5, width: int = 16):
    torch.manual_seed(0)
    states = torch.randn(layers, batch, tokens, width)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 3:] = 0
    second = torch.zeros(batch, tokens, dtype=torch.bool)
    second[:, 2:] = True
    return states, mask, second & mask.bool()


@pytest.mark.parametrize("options", CANDIDATES)
def test_untrained_candidate_corrects_nothing(options):
    side = _load("side_network_candidates").TokenMixerSideNetwork(16, 8, heads=2, **options)
    states, mask, second = _inputs()
    assert torch.equal(side(states, mask, second), torch.zeros(2, 5, 16))


@pytest.mark.parametrize("options", CANDIDATES)
def test_padding_does_not_change_the_first_token_correction(options):
    side = _load("side_network_candidates").TokenMixerSideNetwork(16, 8, heads=2, dropout=0.0, **options).eval()
    torch.nn.init.normal_(side.up_projection.weight)
    states, mask, second = _inputs()
    padded = side(states.clone(), mask, second)[1, 0]
    alone = side(states[:, 1:, :3].clone(), mask[1:, :3], second[1:, :3])[0, 0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", CANDIDATES)
def test_candidate_size_does_not_grow_with_depth(options):
    network = _load("side_network_candidates").TokenMixerSideNetwork

    def size(layers):
        return sum(p.numel() for p in network(16, 8, heads=2, num_layers=layers, **options).parameters())

    assert size(2) == size(24)


def test_the_scalar_mix_ablation_is_the_one_that_grows_with_depth():
    network = _load("side_network_candidates").TokenMixerSideNetwork
    sizes = [sum(p.numel() for p in network(16, 8, heads=2, recurrence="scalar-mix", num_layers=n).parameters())
             for n in (2, 24)]
    assert sizes[1] - sizes[0] == 22


@pytest.mark.slow
@needs_real_glue
def test_smoke_run_on_real_glue_rows_records_and_resumes(tmp_path, capsys):
    search = _load("side_network_search")
    arguments = ["--smoke", "--data-dir", str(REAL_GLUE_DIR), "--output", str(tmp_path / "runs.jsonl"),
                 "--store", str(tmp_path / "states")]
    records = search.main(arguments)
    assert [r["variant"] for r in records] == ["read-r64", "mix1-r128"]
    for record in records:
        assert record["train_rows"] == 32 and record["epochs_run"] == 2 and 0 <= record["score"] <= 100
        assert record["train_cpu_seconds"] > 0 and record["trainable_parameters"] > record["side_network_parameters"]
    # a per-token candidate replays every token's states; READ's [CLS]-only path a fixed few vectors
    assert records[1]["cache_bytes_per_example"]["replayed"] == records[1]["cache_bytes_per_example"]["all_tokens"]
    assert records[0]["cache_bytes_per_example"]["replayed"] == 6 * 384 * 2 + 6 * 3 * 384 * 4
    assert search.main(arguments) == []  # resumed: nothing left to run, no state extracted twice
    assert "stored" not in capsys.readouterr().out.split("mix1-r128 sst2 40 seed 1")[-1]
    search.main(["--report", "--output", str(tmp_path / "runs.jsonl")])
    assert "| sst2 | 32 | mix1-r128 | 1 |" in capsys.readouterr().out
