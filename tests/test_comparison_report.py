"""readapt.comparison.report: tables, CSV and plots from a synthetic results.jsonl."""

from __future__ import annotations

import csv
import json

import pytest

from readapt.comparison.report import main, pareto_front, write_reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(task, method, seed, score, memory, energy=500.0, seconds=100.0, percent=1.0, **extra):
    record = {
        "kind": "run", "status": "ok", "task": task, "method": method, "seed": seed, "model": "tiny-bert",
        "score": score, "metrics": {"accuracy": score}, "peak_memory_mb": memory,
        "memory_meter": "peak RSS (VmHWM)", "energy_j": energy,
        "energy_meter": "estimated: CPU-seconds x 10.0 W per busy core (no RAPL or NVML counter readable)",
        "energy_measured": False, "train_seconds": seconds, "wall_seconds": seconds + 10,
        "trainable_params": 1000, "trainable_percent": percent, "backbone_params": 100000,
        "inference": {"latency_ms_batch1": 8.0, "latency_ms_batch32": 90.0, "peak_memory_mb": 400.0,
                      "memory_meter": "inference VmHWM"},
        "machine": {"platform": "Linux-test", "cpu_count": 2}, "versions": {"python": "3.11", "torch": "2.x"},
        "error": None,
    }  # fmt: skip
    record.update(extra)
    return record


def _results() -> list[dict]:
    records = []
    # full: rte 60, 64 -> 62.0 ± 2.8; mrpc 80, 82 -> 81.0 ± 1.4; Avg (62 + 81) / 2 = 71.5
    for seed, rte, mrpc in ((1, 60.0, 80.0), (2, 64.0, 82.0)):
        records.append(_run("rte", "full", seed, rte, memory=2000.0 + 200 * (seed - 1), energy=2000.0, seconds=300.0,
                            percent=100.0))  # fmt: skip
        records.append(_run("mrpc", "full", seed, mrpc, memory=2000.0 + 200 * (seed - 1), energy=2000.0, seconds=300.0,
                            percent=100.0))  # fmt: skip
    # read: rte 61, 63, 65 -> 63.0 ± 2.0; mrpc 84, 85, 86 -> 85.0 ± 1.0; Avg 74.0
    for seed, rte, mrpc in ((1, 61.0, 84.0), (2, 63.0, 85.0), (3, 65.0, 86.0)):
        records.append(_run("rte", "read", seed, rte, memory=900.0, energy=400.0, seconds=120.0, percent=0.5))
        records.append(_run("mrpc", "read", seed, mrpc, memory=900.0, energy=400.0, seconds=120.0, percent=0.5))
    # lora: one seed of rte only -> no ±, and no Avg.
    records.append(_run("rte", "lora", 1, 58.5, memory=1200.0, energy=800.0, seconds=150.0, percent=0.8))
    records.append({
        "kind": "run", "status": "failed", "task": "rte", "method": "read", "seed": 4,
        "error": "RuntimeError: CUDA out of memory",
    })  # fmt: skip
    for method, per_batch in (("read", 30.0), ("full", 100.0)):
        for batch in (8, 16, 32):
            records.append({"kind": "memory", "method": method, "batch_size": batch, "seq_len": 128, "status": "ok",
                            "peak_memory_mb": 500.0 + per_batch * batch, "memory_meter": "VmHWM"})  # fmt: skip
    return records


@pytest.fixture
def bench_dir(tmp_path):
    lines = [json.dumps(record) for record in _results()]
    lines.insert(3, "")  # blank lines are ignored
    text = "\n".join(lines) + '\n{"kind": "run", "status": "ok", "task": "rt'  # torn by an interrupted append
    (tmp_path / "results.jsonl").write_text(text)
    return tmp_path


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_every_report_is_written(bench_dir):
    written = write_reports(bench_dir, notes=["Protocol: 3 epochs, batch 16."])
    expected = {
        "csv": "results.csv", "table": "table.md", "score_vs_memory": "score_vs_memory.png",
        "score_vs_energy": "score_vs_energy.png", "score_vs_time": "score_vs_time.png",
        "memory_vs_batch": "memory_vs_batch.png",
    }  # fmt: skip
    assert {name: path.name for name, path in written.items()} == expected
    for path in written.values():
        assert path.parent == bench_dir and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_MAGIC)
    assert not list(bench_dir.glob(".*.tmp"))  # no temporary files left behind


def test_table_means_stds_and_average(bench_dir):
    table = write_reports(bench_dir)["table"].read_text()
    rows = _table_rows(table)
    header = rows["Method"]
    assert header[:6] == ["Method", "MRPC", "RTE", "Avg.", "Seeds", "Params (%)"]
    assert list(rows)[1:] == ["Full fine-tuning", "LoRA", "READ"]  # the paper's method order

    full = dict(zip(header, rows["Full fine-tuning"], strict=True))
    assert (full["RTE"], full["MRPC"], full["Avg."], full["Seeds"]) == ("62.0 ± 2.8", "81.0 ± 1.4", "71.5", "2")
    assert full["Params (%)"] == "100"
    assert full["Peak memory (MiB)"] == "2100"  # (2000 + 2200 + 2000 + 2200) / 4
    read = dict(zip(header, rows["READ"], strict=True))
    assert (read["RTE"], read["MRPC"], read["Avg."], read["Seeds"]) == ("63.0 ± 2.0", "85.0 ± 1.0", "74.0", "3")
    assert read["Peak memory (MiB)"] == "900"
    assert read["Train time (s)"] == "120"
    assert read["Inference latency b1 / b32 (ms)"] == "8.00 / 90.0"
    lora = dict(zip(header, rows["LoRA"], strict=True))
    assert (lora["RTE"], lora["MRPC"], lora["Avg."]) == ("58.5", "—", "—")  # one seed: no ±; missing task: no Avg.

    energy_column = next(name for name in header if name.startswith("Energy"))
    assert "estimated" in energy_column
    assert read[energy_column] == "≈400"
    assert "not a measurement" in table


def test_table_notes_meters_machine_seeds_and_failures(bench_dir):
    table = write_reports(bench_dir, notes=["Protocol: 3 epochs, batch 16."])["table"].read_text()
    assert "- Protocol: 3 epochs, batch 16." in table
    assert "estimated: CPU-seconds x 10.0 W per busy core" in table
    assert "peak RSS (VmHWM)" in table and "inference VmHWM" in table
    assert "Machine: platform: Linux-test, cpu_count: 2." in table
    assert "Versions: python: 3.11, torch: 2.x." in table
    assert "- READ: MRPC: 1, 2, 3; RTE: 1, 2, 3" in table
    assert "Failed runs (1): read/RTE seed 4: RuntimeError: CUDA out of memory" in table
    assert "last line" in table and "incomplete" in table  # the torn line is skipped, and said so


def test_csv_has_one_flat_row_per_successful_run(bench_dir):
    with write_reports(bench_dir)["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 + 6 + 1
    assert list(rows[0])[:5] == ["task", "method", "seed", "model", "score"]
    assert {"metrics_accuracy", "inference_latency_ms_batch1", "inference_latency_ms_batch32",
            "inference_peak_memory_mb", "machine_platform", "versions_torch"} <= set(rows[0])  # fmt: skip
    assert "kind" not in rows[0] and "error" not in rows[0]
    assert [row["method"] for row in rows][:4] == ["full"] * 4
    assert {row["task"] for row in rows} == {"rte", "mrpc"}


def test_rerun_replaces_failed_record(tmp_path):
    records = [
        {"kind": "run", "status": "failed", "task": "rte", "method": "read", "seed": 1, "error": "killed"},
        _run("rte", "read", 1, 70.0, memory=900.0),
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = write_reports(tmp_path)
    table = written["table"].read_text()
    assert "Failed runs: none." in table
    assert "memory_vs_batch" not in written  # no sweep records: no sweep plot
    assert _table_rows(table)["READ"][1:3] == ["70.0", "70.0"]


def test_pareto_front():
    points = [
        ("a", 1.0, 50.0),
        ("b", 2.0, 60.0),
        ("c", 3.0, 55.0),  # costs more than b and scores less
        ("d", 2.0, 60.0),  # ties with b: neither beats the other
        ("e", 0.5, 40.0),
        ("f", 4.0, 70.0),
        ("g", 4.0, 65.0),  # same cost as f, lower score
    ]
    assert pareto_front(points) == ["e", "a", "b", "d", "f"]
    assert pareto_front([]) == []
    assert pareto_front([("only", 3.0, 1.0)]) == ["only"]


def test_cli_regenerates_reports(bench_dir, capsys):
    assert main([str(bench_dir), "--note", "Protocol: from the CLI."]) == 0
    assert "table.md" in capsys.readouterr().out
    assert "- Protocol: from the CLI." in (bench_dir / "table.md").read_text()
    assert main([str(bench_dir / "missing")]) == 1
