"""Report: aggregation over seeds (known numbers), markdown, CSV, PNG plots, the CLI."""
from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tenslora.sweep.report import aggregate, markdown_table, write_report
from tenslora.sweep.spec import Job
from tenslora.sweep.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def summary(f1: float, params: int, wall: float) -> dict:
    return {"trainable_parameters": params, "wall_time_s": wall,
            "best": {"test_accuracy": f1 + 0.1, "test_macro_f1": f1, "test_mcc": f1 - 0.1},
            "final": {"test_accuracy": f1, "test_macro_f1": f1 - 0.05, "test_mcc": f1 - 0.2}}


KNOWN = {  # (construction, core_lambda) -> per-seed test_macro_f1
    ("qkv", 0.1): [0.60, 0.64, 0.62],
    ("qkv", 10.0): [0.70, 0.74, 0.78],
    ("qkv_depth", 0.1): [0.50, 0.50, 0.56],
    ("qkv_depth", 10.0): [0.80],
}
PARAMS = {"qkv": 12_000, "qkv_depth": 3_000}


def make_sweep_dir(root: Path) -> Path:
    """A sweep directory whose jobs are done with known summaries (plus one failed job)."""
    with Store(root) as store:
        jobs, summaries = [], {}
        for (construction, lam), values in KNOWN.items():
            for seed, f1 in enumerate(values):
                options = {"epochs": 1, "construction": construction, "core_lambda": lam, "seed": seed}
                name = f"construction={construction},core_lambda={lam},seed={seed}"
                jobs.append(Job(name, options, options))
                summaries[name] = summary(f1, PARAMS[construction], 10.0 + seed)
        jobs.append(Job("broken", {"construction": "att", "seed": 0}, {}))
        store.add_jobs(jobs, {"retries": 0})
        for name, s in summaries.items():
            attempt = store.mark_running(name, host="h", device="cpu", backend="local", started_at=1.0)
            store.mark_done(name, attempt, ended_at=2.0, summary=s)
        attempt = store.mark_running("broken", host="h", device="cpu", backend="local", started_at=1.0)
        store.mark_failure("broken", attempt, ended_at=2.0, rc=1, error="exit code 1", retry_at=None)
    return root


def test_mean_and_std_over_seeds_are_correct(tmp_path):
    results = aggregate(make_sweep_dir(tmp_path / "sw"), "test_macro_f1")
    assert results.varying == ["construction", "core_lambda"]
    assert results.counts["done"] == 10 and results.counts["failed"] == 1
    by_key = {(g.options["construction"], g.options["core_lambda"]): g for g in results.groups}
    for key, values in KNOWN.items():
        g = by_key[key]
        assert g.n == len(values)
        assert g.mean("test_macro_f1") == pytest.approx(statistics.fmean(values))
        if len(values) > 1:
            assert g.std("test_macro_f1") == pytest.approx(statistics.stdev(values))
        else:
            assert g.std("test_macro_f1") is None
        assert g.mean("test_accuracy") == pytest.approx(statistics.fmean(values) + 0.1)
        assert g.trainable_parameters == PARAMS[key[0]]
        assert g.wall_time_s == pytest.approx(10.0 + (len(values) - 1) / 2)
    # (qkv, 0.1): mean 0.62, sample std 0.02 -- by hand
    assert by_key[("qkv", 0.1)].mean("test_macro_f1") == pytest.approx(0.62)
    assert by_key[("qkv", 0.1)].std("test_macro_f1") == pytest.approx(0.02)
    # best first
    assert [g.options["construction"] for g in results.groups][:2] == ["qkv_depth", "qkv"]
    final = aggregate(tmp_path / "sw", "test_macro_f1", which="final")
    assert final.groups[0].mean("test_macro_f1") == pytest.approx(0.75)


def test_markdown_csv_and_plots_are_written(tmp_path):
    paths = write_report(make_sweep_dir(tmp_path / "sw"), "test_macro_f1", by=["construction"])
    md = paths["markdown"].read_text()
    assert "10 done, 1 failed" in md
    assert "| construction | core_lambda | n | test_macro_f1 (best) |" in md
    assert "| qkv | 0.1 | 3 | 0.6200 ± 0.0200 |" in md
    assert "| qkv_depth | 10.0 | 1 | 0.8000 |" in md
    assert "12,000" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4
    row = next(r for r in rows if r["construction"] == "qkv" and r["core_lambda"] == "0.1")
    assert float(row["test_macro_f1_mean"]) == pytest.approx(0.62)
    assert float(row["test_macro_f1_std"]) == pytest.approx(0.02)
    assert row["seeds"] == "0 1 2" and float(row["trainable_parameters"]) == 12000
    names = sorted(p.name for p in paths["plots"])
    assert names == ["test_macro_f1_vs_construction.png", "test_macro_f1_vs_core_lambda.png",
                     "test_macro_f1_vs_trainable_parameters.png"]
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert markdown_table(paths["results"]).count("\n") == 6


def test_report_errors_name_the_bad_value(tmp_path):
    root = make_sweep_dir(tmp_path / "sw")
    with pytest.raises(ValueError, match="metric 'test_f2' is not in the results.*test_macro_f1"):
        aggregate(root, "test_f2")
    with pytest.raises(ValueError, match="--by 'nope' is not an option"):
        write_report(root, by=["nope"])
    with pytest.raises(FileNotFoundError, match="not a sweep directory"):
        aggregate(tmp_path / "empty")


def test_report_from_python_rows():
    rows = [{"name": f"r{s}", "options": {"rank": 4, "seed": s}, "summary": summary(0.5 + 0.1 * s, 10, 1.0)}
            for s in range(3)]
    results = aggregate(rows, "test_macro_f1")
    assert len(results.groups) == 1 and results.groups[0].mean("test_macro_f1") == pytest.approx(0.6)
    assert results.rows()[0]["test_macro_f1_std"] == pytest.approx(0.1)


def test_report_and_status_cli(tmp_path):
    root = make_sweep_dir(tmp_path / "sw")
    proc = subprocess.run([sys.executable, "-m", "tenslora", "sweep", "report", str(root), "--metric",
                           "test_accuracy", "--by", "construction"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "test_accuracy (best)" in proc.stdout and (root / "report" / "results.csv").exists()
    proc = subprocess.run([sys.executable, "-m", "tenslora", "sweep", "status", str(root)], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "10 done" in proc.stdout and "broken" in proc.stdout and "exit code 1" in proc.stdout
    from tenslora.sweep.status import render_status

    with pytest.raises(FileNotFoundError, match="not a sweep directory"):  # the CLI: one line, exit 2
        render_status(tmp_path / "nothing")
