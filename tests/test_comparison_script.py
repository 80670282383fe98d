"""benchmarks/comparison.py end to end on a few real SST-2 rows: every phase's matrices run (fresh process per
cell), the sweep picks a rate by selection score, and the report holds one record per run in the documented
schema, the table and the plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REAL_GLUE_DIR, needs_real_glue

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "comparison.py"
FIELDS = {"task", "method", "seed", "train_rows", "score", "selection_score", "train_cpu_seconds", "peak_memory_mb",
          "trainable_parameters"}


def _script():
    spec = importlib.util.spec_from_file_location("comparison_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_rate_is_chosen_by_selection_score_not_dev():
    script = _script()
    sweep = [{"method": "read", "learning_rate": 1e-3, "selection_score": 80.0, "score": 10.0},
             {"method": "read", "learning_rate": 3e-3, "selection_score": 70.0, "score": 99.0}]
    assert script.choose_learning_rates(sweep) == {"read": 1e-3}


@pytest.mark.slow
@needs_real_glue
def test_smoke_run_writes_every_record_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("READAPT_GLUE_DIR", str(REAL_GLUE_DIR))
    monkeypatch.setenv("READAPT_CACHE_DIR", str(tmp_path / "cache"))
    script = _script()
    out = tmp_path / "report"
    assert script.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--no-progress"]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    sweep = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert len(sweep) == 3 and len(curve) == 2  # read at two rates and bitfit at one; the curve: read at 2 sizes
    assert {(r["phase"], r["method"]) for r in runs} == {(p, m) for p in ("small", "full") for m in ("read", "bitfit")}
    for record in runs + sweep + curve:
        assert set(record) >= FIELDS
        assert 0 <= record["score"] <= 100 and record["train_rows"] > 0 and record["trainable_parameters"] > 0
    chosen = {r["learning_rate"] for r in runs if r["method"] == "read"}
    best = max((r for r in sweep if r["method"] == "read"), key=lambda r: r["selection_score"])
    assert chosen == {best["learning_rate"]}
    assert {r["train_rows"] for r in curve} == {10, 20}
    table = (out / "table.md").read_text()
    assert "| read |" in table and "| bitfit |" in table
    for name in ("learning_curve.png", "pareto_cpu.png", "pareto_memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # A fresh checkout (no work folder) with the committed records.jsonl: nothing runs again, the report is the same.
    import shutil

    import readapt.comparison.runner as runner

    shutil.rmtree(tmp_path / "work")
    before = {name: (out / name).read_text() for name in ("runs.jsonl", "sweep.jsonl", "curve.jsonl", "table.md")}
    monkeypatch.setattr(runner, "_run_cell", lambda spec: pytest.fail(f"re-ran a recorded cell: {spec['run_dir']}"))
    assert script.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--no-progress"]) == 0
    assert {name: (out / name).read_text() for name in before} == before


def test_second_backbone_phase_plans_smollm2_with_a_classifier_head(tmp_path):
    script = _script()
    phases = script.plan(tmp_path, False, {"read": 1e-3, "lora": 5e-4, "full": 5e-5})
    second = phases["second"]
    assert {Path(c.output_dir).name for c in second} == {
        f"{t}-{v}" for t in ("sst2", "mrpc") for v in ("read", "read-nomixer", "lora", "full")}
    for config in second:
        config.validate()
        assert (config.model, config.decoder_head, config.max_train_samples) == ("smollm2", "classifier", 1250)
        assert config.seeds == ([1, 2, 3] if config.methods == ["read"] else [1])
    without = [c for c in second if c.output_dir.endswith("read-nomixer")]
    assert without and all(c.method_options == {"read": {"token_mixer_layers": 0}} for c in without)
    assert all(c.method_options == {} for c in second if c.output_dir.endswith("-read"))  # the default: a mixer
    assert script.plan(tmp_path, True, {"read": 1e-3})["second"] == []  # the CI smoke test stays on MiniLM


def test_second_backbone_table_sets_read_on_smollm2_against_full_on_the_default_backbone():
    script = _script()
    def rec(phase, task, method, score, memory, **extra):
        return {"phase": phase, "task": task, "method": method, "seed": 1, "score": score, "peak_memory_mb": memory,
                "train_cpu_seconds": 10.0, "trainable_parameters": 5, **extra}
    second = [rec("second", t, "read", 80.0, 1700, variant="read") for t in ("sst2", "mrpc")]
    runs = [rec("small", t, "full", 79.0, 1650) for t in ("sst2", "mrpc")]
    text = script.second_table(second, runs)
    assert "| read | 80.0 | 80.0 | 80.0 | 1 |" in text
    assert "| sst2 | read on SmolLM2-135M | 80.0 | 1700 | full fine-tuning of all-MiniLM-L6-v2 | 79.0 | 1650 |" in text
    assert script.second_table([], runs) == ""


def test_goals_say_on_which_tasks_they_were_computed_and_whether_each_is_met():
    script = _script()
    def rec(phase, task, method, score, cpu=10.0, rows=1000):
        return {"phase": phase, "task": task, "method": method, "seed": 1, "score": score, "train_rows": rows,
                "train_cpu_seconds": cpu}
    runs = [rec("small", t, "read", 70.0) for t in script.TASKS] + [rec("small", t, "full", 70.5) for t in script.TASKS]
    runs += [rec("small", "cola", "lora", 71.0)]  # one task only: the comparison says so
    runs += [rec("full", "cola", "read", 50.0, cpu=10.0), rec("full", "cola", "full", 53.0, cpu=100.0),
             rec("full", "sst2", "read", 80.0, cpu=30.0)]  # sst2 has no full fine-tuning yet: left out of the ratio
    curve = [rec("curve", "sst2", m, s, rows=n) for m, n, s in
             (("read", 400, 74.0), ("full", 400, 75.0), ("read", 8000, 84.0), ("full", 8000, 86.0))]
    text = script.goals(runs, curve)
    assert "1,000 rows: READ − full = **-0.50** on 5 of 5 tasks" in text and "goal within 1.0: met" in text
    assert "READ − lora = **-1.00** on 1 of 5 tasks (cola); goal at or above: missed" in text
    assert "full training sets: READ − full = **-3.00** on 1 of 5 tasks (cola); goal within 1.0: missed" in text
    assert "= **0.10** summed over cola; goal ≤ 0.15: met" in text
    assert "READ − full = -2.0 at 8,000 rows against -1.0 at 400; goal no worse: missed" in text
    table = script.curve_table(curve)
    assert "| read | 74.0 (1 seed) | 84.0 (1 seed) |" in table and "| READ − full | -1.0 | -2.0 |" in table
    assert script.goals([], []) == "" and script.curve_table([]) == ""
