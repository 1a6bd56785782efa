"""Collecting: finished runs of a repro directory (with roles and resolved configs) -> a results
directory (``benchmarks/results``), and loading either back for the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tenslora.repro.spec import INDEX_FILE, merge_index


def _runs_from_dir(root: Path) -> list[dict]:
    """Every done job of every task under a repro directory, with its roles and resolved config."""
    from tenslora.sweep.report import load_rows

    out = []
    for index_path in sorted(Path(root).glob(f"*/{INDEX_FILE}")):
        tdir = index_path.parent
        index = json.loads(index_path.read_text())
        rows, _ = load_rows(tdir / "sweep") if (tdir / "sweep").exists() else ([], {})
        for row in rows:
            config_path = tdir / "sweep" / "runs" / row["name"] / "config.json"
            try:
                run_config = json.loads(config_path.read_text())
            except (OSError, ValueError):
                run_config = None
            roles = index["jobs"].get(row["name"], [])
            rec = {"task": index["task"], "name": row["name"], "options": row["options"],
                   "summary": row["summary"], "config": run_config, "roles": roles}
            if any(r["experiment"] == "E" for r in roles):  # claim 6: the trained tensor's per-mode spectra
                rec["mode_metrics"] = _mode_metrics(tdir / "sweep" / "runs" / row["name"] / "best_adapter")
            out.append(rec)
    return out


def _mode_metrics(adapter_dir: Path) -> dict | None:
    """Per-mode effective ranks of the best-validation adapter (None when it is not there)."""
    from tenslora.repro.modes import saved_mode_metrics

    return saved_mode_metrics(adapter_dir) if adapter_dir.is_dir() else None


def _indexes_from_dir(root: Path) -> dict[str, dict]:
    """Each task's index, with its zero-shot evaluation (``zero_shot.json``) when there is one."""
    out = {}
    for p in sorted(Path(root).glob(f"*/{INDEX_FILE}")):
        index = json.loads(p.read_text())
        zero = p.parent / "zero_shot.json"
        if zero.exists():
            index["zero_shot"] = json.loads(zero.read_text())
        out[index["task"]] = index
    return out


def collect(root: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy each done run (options, roles, summary, resolved config) to ``dest/<task>/<run>.json`` and
    each task's index (expected jobs, allocation) to ``dest/<task>/_index.json``."""
    root, dest = Path(root), Path(dest)
    written = []
    for task, index in _indexes_from_dir(root).items():
        (dest / task).mkdir(parents=True, exist_ok=True)
        p = dest / task / "_index.json"
        old = json.loads(p.read_text()) if p.exists() else None  # results of other experiments stay listed
        merged = merge_index(old, index)
        if old and old.get("zero_shot") and not index.get("zero_shot"):
            merged["zero_shot"] = old["zero_shot"]
        tmp = p.with_name(p.name + ".tmp")  # atomic, in the committed files' format (key order kept)
        tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
        os.replace(tmp, p)
        written.append(p)
    for run_rec in _runs_from_dir(root):
        p = dest / run_rec["task"] / f"{run_rec['name']}.json"
        p.write_text(json.dumps(run_rec, indent=1, default=str) + "\n")
        written.append(p)
    return written


def load_results(source: str | os.PathLike, from_results: bool = False) -> tuple[dict[str, dict], list[dict]]:
    """``(indexes by task, runs)`` from a repro directory or from a collected results directory."""
    source = Path(source)
    if not from_results:
        return _indexes_from_dir(source), _runs_from_dir(source)
    indexes, runs = {}, []
    for tdir in sorted(p for p in source.iterdir() if p.is_dir()):
        ip = tdir / "_index.json"
        if not ip.exists():
            continue
        index = json.loads(ip.read_text())
        indexes[index["task"]] = index
        for f in sorted(tdir.glob("*.json")):
            if f.name != "_index.json":
                runs.append(json.loads(f.read_text()))
    return indexes, runs
