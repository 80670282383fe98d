"""The benchmark scripts keep running (figures come from running them, not from these tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_benchmark_runs_on_a_tiny_config(tmp_path, capsys):
    result = _load("memory").main(["--size", "tiny", "--batch-size", "4", "--source-length", "16", "--read-hidden-size", "8",
                                   "--json", str(tmp_path / "memory.json")])
    assert set(result["runs"]) == {"inference", "read", "full", "read-int8", "inference-int8"}  # int8 by default
    assert all(r["peak_bytes"] > 0 for r in result["runs"].values())
    assert result["runs"]["read"]["trainable_params"] < result["runs"]["full"]["trainable_params"]
    assert "READ/full =" in capsys.readouterr().out
    assert (tmp_path / "memory.json").is_file()


@pytest.mark.slow
@needs_real_glue
def test_cls_variation_diagnostic_runs(capsys):
    spreads = _load("cls_variation").main(["--data-dir", str(REAL_GLUE_DIR), "--samples", "16"])
    assert len(spreads) == 7 and spreads[0] == 0.0  # embeddings of [CLS] are the same for every sentence
    assert "relative spread" in capsys.readouterr().out


def test_step_time_benchmark_runs(tmp_path, capsys):
    results = _load("step_time").main(["--tiny", "--repeats", "1", "--variants", "recompute=true",
                                       "--json", str(tmp_path / "step_time.json")])
    assert set(results["cases"]) == {"t5-base", "minilm", "minilm-cls"}
    for record in results["cases"].values():
        assert set(record["ratios"]) == {"READ step, default config", "READ step, recompute=True"}
        assert all(seconds > 0 for seconds in record["seconds"].values())
    assert results["cases"]["minilm"]["config"]["token_mixer_layers"] == 2
    assert results["cases"]["minilm-cls"]["config"]["token_mixer_layers"] == 0
    assert results["cases"]["t5-base"]["config"]["stacks"] == ["encoder", "decoder"]
    out = capsys.readouterr().out
    assert "READ step, default config" in out and "ratio" in out and "process CPU seconds" in out
    assert json.loads((tmp_path / "step_time.json").read_text())["meter"] == results["meter"]


def test_inference_time_benchmark_runs(tmp_path, capsys):
    results = _load("inference_time").main(["--tiny", "--repeats", "1", "--json", str(tmp_path / "inference.json")])
    assert set(results["cases"]) == {"minilm", "minilm-cls", "t5-base"}
    for case, record in results["cases"].items():
        assert set(record["batches"]) == ({1, 8} if case == "t5-base" else {1, 32})
        for figures in record["batches"].values():
            assert figures["ratio"] > 0 and figures["seconds"]["backbone"] > 0 and figures["seconds"]["read"] > 0
    assert results["cases"]["minilm"]["config"]["token_mixer_layers"] == 2
    assert results["cases"]["minilm-cls"]["config"]["token_mixer_layers"] == 0
    assert results["cases"]["t5-base"]["config"]["stacks"] == ["encoder", "decoder"]
    assert "per new token" in capsys.readouterr().out
    assert json.loads((tmp_path / "inference.json").read_text())["meter"] == results["meter"]


@needs_real_glue
def test_label_word_scoring_benchmark_runs(tiny_models, capsys):
    results = _load("label_word_scoring").main(["--data-dir", str(REAL_GLUE_DIR), "--model", str(tiny_models["gpt2-lm"]),
                                                "--tasks", "sst2", "--rows", "8", "--batch-size", "4"])
    cached, whole = results
    assert (cached["scoring"], whole["scoring"]) == ("prompt cache", "whole sequences")
    assert cached["metrics"] == whole["metrics"]  # the same scores either way
    assert "prompt cache" in capsys.readouterr().out


@needs_real_glue
def test_read_recipe_runs_and_reports(tiny_models, tmp_path, capsys):
    recipe = _load("read_recipe")
    output = tmp_path / "recipe.jsonl"
    common = ["--output", str(output), "--tasks", "rte", "--seeds", "1"]
    recipe.main([*common, "--variants", "pooled,pooled-mlp", "--model", str(tiny_models["bert"]), "--data-dir",
                 str(REAL_GLUE_DIR), "--cache-dir", str(tmp_path / "cache"), "--train-samples", "30", "--epochs", "2",
                 "--max-length", "32"])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"], records
    for record in records:  # selection on the held-out rows, the dev score reported at that epoch
        assert record["epoch_dev_scores"][record["best_epoch"] - 1] == record["score"]
        assert record["selection_score"] == max(record["epoch_selection_scores"][: record["best_epoch"]])
        assert record["train_examples"] == 24 and record["read_corrected_positions"].startswith("first token")
    assert {r["feature_cache_reused"] for r in records} == {False, True}  # the second variant reuses the entries
    recipe.main([*common, "--report", "--plot", str(tmp_path / "bars.png")])
    table = capsys.readouterr().out
    assert "| pooled |" in table and "| pooled-mlp |" in table
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_learning_curve_plots_existing_records(tmp_path, capsys):
    read, full = tmp_path / "read.jsonl", tmp_path / "full.jsonl"
    read.write_text("".join(json.dumps({"status": "ok", "variant": "pooled", "task": "sst2", "seed": s,
                                        "train_examples": n, "score": 70 + n / 100 + s}) + "\n"
                            for n in (80, 400) for s in (1, 2)))
    full.write_text(json.dumps({"status": "ok", "kind": "run", "method": "full", "task": "sst2", "seed": 1,
                                "train_examples": 400, "score": 80.0}) + "\n")
    result = _load("learning_curve").main(["--task", "sst2", "--read", str(read), "--full", str(full),
                                           "--out", str(tmp_path / "curve.png")])
    assert result["read"] == [(80, 72.3, 0.7071067811865476, 2), (400, 75.5, 0.7071067811865476, 2)]
    assert result["full"] == [(400, 80.0, 0.0, 1)]
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert "| 80 | 72.3 ± 0.7 (n=2) | – |" in capsys.readouterr().out


def test_encoder_context_task_is_balanced_and_labelled_by_the_keyword(tmp_path):
    ablation = _load("encoder_context")
    train, dev = ablation.write_task(tmp_path, 200, 50, seed=0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 200 and len(dev.read_text().splitlines()) == 50
    for row in rows:  # the label says exactly whether the keyword is there
        assert (ablation.KEYWORD in row["sentence"].split()) == (row["label"] == "yes")
    assert 60 < sum(r["label"] == "yes" for r in rows) < 140
    again = tmp_path / "again"
    again.mkdir()
    assert ablation.write_task(again, 200, 50, seed=0)[0].read_text() == train.read_text()  # seeded


@pytest.mark.slow
def test_encoder_context_ablation_runs_both_variants(tmp_path, capsys):
    output = tmp_path / "runs.jsonl"
    records = _load("encoder_context").main(["--seeds", "1", "--epochs", "1", "--train-rows", "40", "--dev-rows", "16",
                                             "--hidden-size", "8", "--output", str(output)])
    assert {r["variant"]: r["encoder_context"] for r in records} == {"with encoder context": True,
                                                                     "without encoder context": False}
    by_variant = {r["variant"]: r for r in records}
    # the encoder-context attention is the only difference: more parameters with it
    assert by_variant["with encoder context"]["trainable_parameters"] > by_variant["without encoder context"]["trainable_parameters"]
    assert all(0 <= r["score"] <= 100 and r["dev_examples"]["validation"] == 16 for r in records)
    assert "| with encoder context |" in capsys.readouterr().out
    assert len(output.read_text().splitlines()) == 2


def test_memory_benchmark_takes_read_options_and_a_subset_of_modes(tmp_path, capsys):
    result = _load("memory").main(["--size", "tiny", "--batch-size", "4", "--source-length", "16", "--read-hidden-size",
                                   "8", "--quantized", "", "--modes", "inference,read", "--read-options",
                                   '{"recompute": true, "compute_dtype": "bfloat16"}'])
    assert set(result["runs"]) == {"inference", "read"}
    assert set(result["ratios"]) == {"read/inference"} and result["ratios"]["read/inference"] > 0
    assert result["read_options"] == {"recompute": True, "compute_dtype": "bfloat16"}
    assert "READ/full" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--modes"):
        _load("memory").main(["--size", "tiny", "--modes", "read"])
