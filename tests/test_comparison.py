"""`readapt bench` end to end on a tiny backbone and real GLUE rows: every cell in a fresh process, one
record per cell, reports written, and a re-run resumes (only unfinished cells run again)."""

from __future__ import annotations

import json

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue
from readapt.cli import main
from readapt.comparison.runner import BenchConfig, plan, read_results
from readapt.errors import ConfigError

pytestmark = needs_real_glue


def _bench(tiny_models, output, *extra):
    return main(["bench", "--tasks", "rte", "--methods", "read,bitfit", "--seeds", "1,2", "--baseline-seeds", "1",
                 "--model", str(tiny_models["bert"]), "--data-dir", str(REAL_GLUE_DIR), "--max-train-samples", "16",
                 "--max-eval-samples", "8", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
                 "--memory-batch-sizes", "2", "--jobs", "2", "--threads-per-job", "1", "--no-progress",
                 "--output-dir", str(output), *extra])


@pytest.mark.slow  # about a dozen fresh processes
def test_bench_runs_the_matrix_writes_reports_and_resumes(tiny_models, tmp_path):
    output = tmp_path / "bench"
    assert _bench(tiny_models, output) == 0
    records = read_results(output / "results.jsonl")
    runs = sorted((r["method"], r["seed"]) for r in records if r["kind"] == "run")
    assert runs == [("bitfit", 1), ("read", 1), ("read", 2)]  # baselines get the first seed only
    memory = [r for r in records if r["kind"] == "memory"]
    assert sorted(r["method"] for r in memory) == ["bitfit", "read"]
    for record in records:
        assert record["status"] == "ok", record
    for record in (r for r in records if r["kind"] == "run"):
        assert 0 <= record["score"] <= 100 and record["metrics"]["accuracy"] == record["score"]
        assert record["peak_memory_mb"] > 0 and record["train_seconds"] > 0 and record["trainable_params"] > 0
        assert record["energy_j"] > 0 and record["energy_meter"].startswith(("estimated:", "rapl", "nvml"))
        assert record["inference"]["latency_ms_batch1"] > 0 and record["inference"]["latency_ms_batch32"] > 0
        assert record["inference"]["peak_memory_mb"] > 0
        assert record["machine"]["cpu_count"] >= 1 and record["versions"]["torch"]
    for name in ("table.md", "results.csv", "score_vs_memory.png", "score_vs_energy.png", "score_vs_time.png",
                 "memory_vs_batch.png"):
        assert (output / name).stat().st_size > 0, name
    assert "| read" in (output / "table.md").read_text().lower()

    # Resume: drop one finished record (as if the run had died before it finished) and re-run the command.
    kept = [r for r in records if not (r["kind"] == "run" and r["method"] == "read" and r["seed"] == 2)]
    (output / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"torn": ')
    untouched = output / "runs" / "rte-bitfit-seed1" / "metrics.json"
    before = untouched.stat().st_mtime_ns
    assert _bench(tiny_models, output) == 0
    again = read_results(output / "results.jsonl")
    assert len(again) == len(records)
    assert untouched.stat().st_mtime_ns == before  # a finished cell is not redone
    assert any(r["method"] == "read" and r.get("seed") == 2 for r in again)


def test_plan_and_bad_bench_input(tmp_path, capsys):
    config = BenchConfig(output_dir=str(tmp_path), tasks=["rte", "mrpc"], methods=["read", "full", "lora"],
                         seeds=[1, 2, 3], baseline_seeds=1, memory_batch_sizes=[8, 16])
    specs = plan(config)
    assert sum(s["kind"] == "run" for s in specs) == 2 * (3 + 3 + 1)
    assert sum(s["kind"] == "memory" for s in specs) == 3 * 2
    assert main(["bench", "--tasks", "rte,nope", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["bench", "--methods", "read,lora2", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown method 'lora2'" in capsys.readouterr().err
    assert main(["bench", "--lr", "read", "--output-dir", str(tmp_path / "x")]) == 2
    assert "expected METHOD=VALUE" in capsys.readouterr().err


def test_decoder_head_reaches_every_cell_and_is_checked(tmp_path, capsys):
    config = BenchConfig(output_dir=str(tmp_path), tasks=["sst2"], methods=["read", "full"], decoder_head="classifier")
    config.validate()
    assert {s["decoder_head"] for s in plan(config)} == {"classifier"}
    with pytest.raises(ConfigError, match="unknown decoder head 'last'"):
        BenchConfig(output_dir=str(tmp_path), decoder_head="last").validate()
    assert main(["bench", "--decoder-head", "last", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--decoder-head: invalid choice: 'last'" in capsys.readouterr().err


@pytest.mark.slow  # two fresh processes
def test_a_decoder_only_cell_trains_the_classifier_head_it_is_given(tiny_models, tmp_path):
    # The feature cache refuses label-word decoder runs, so this cell succeeds only if the head reached it.
    output = tmp_path / "bench"
    assert main(["bench", "--tasks", "sst2", "--methods", "read", "--model", str(tiny_models["llama-lm"]),
                 "--decoder-head", "classifier", "--cache-features", "--data-dir", str(REAL_GLUE_DIR),
                 "--max-train-samples", "16", "--max-eval-samples", "8", "--epochs", "1", "--batch-size", "8",
                 "--max-length", "32", "--threads-per-job", "1", "--no-progress", "--output-dir", str(output)]) == 0
    (record,) = read_results(output / "results.jsonl")
    assert record["status"] == "ok", record
    metrics = json.loads((output / "runs" / "sst2-read-seed1" / "metrics.json").read_text())
    assert metrics["config"]["decoder_head"] == "classifier"
    assert record["inference"]["latency_ms_batch1"] > 0


@pytest.mark.parametrize("seeds", ["1,1", "a,b"])
def test_bad_seeds(seeds, tmp_path, capsys):
    assert main(["bench", "--seeds", seeds, "--output-dir", str(tmp_path / "x")]) == 2
    assert "seeds" in capsys.readouterr().err


def test_selection_epochs_and_cache_reach_the_cells(tmp_path, capsys):
    from readapt.comparison.runner import protocol_notes

    config = BenchConfig(output_dir=str(tmp_path), tasks=["rte"], methods=["read", "full"], seeds=[1],
                         selection_fraction=0.2, method_epochs={"read": 12}, cache_features=True)
    config.validate()
    specs = {s["method"]: s for s in plan(config)}
    assert (specs["read"]["epochs"], specs["full"]["epochs"]) == (12, 3)
    assert specs["read"]["selection_fraction"] == specs["full"]["selection_fraction"] == 0.2
    assert specs["read"]["cache_features"] and not specs["full"]["cache_features"]  # only READ can replay
    assert "picks the epoch that scores best on the selection split" in protocol_notes(config)[0]
    assert main(["bench", "--method-epochs", "read=x", "--output-dir", str(tmp_path / "x")]) == 2
    assert "expected METHOD=N" in capsys.readouterr().err
    assert main(["bench", "--methods", "full", "--method-epochs", "read=4", "--output-dir", str(tmp_path / "x")]) == 2
    assert "not in --methods" in capsys.readouterr().err
    assert main(["bench", "--selection-fraction", "1.5", "--output-dir", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err


@pytest.mark.slow  # one training run and one inference process
def test_a_cell_with_selection_reports_the_dev_score_at_the_selected_epoch(tiny_models, tmp_path):
    from readapt.comparison.worker import run_training

    record = run_training({"task": "rte", "method": "read", "seed": 1, "model": str(tiny_models["bert"]),
                           "data_dir": str(REAL_GLUE_DIR), "max_train_samples": 30, "max_eval_samples": 8,
                           "selection_fraction": 0.2, "cache_features": True, "cache_dir": str(tmp_path / "cache"),
                           "epochs": 3, "batch_size": 8, "max_length": 32, "threads": 1,
                           "run_dir": str(tmp_path / "cell"), "method_options": {"hidden_size": 8}})
    best = record["best_epoch"] - 1
    assert record["score"] == record["epoch_dev_scores"][best] == record["metrics"]["accuracy"]
    assert record["selection_score"] == max(record["epoch_selection_scores"])
    assert record["train_examples"] == 24  # 30 rows less the 6 held out to select
