"""An edited sweep file against the jobs already in its sweep directory.

The rule: a sweep directory holds one sweep's results, so a job that has started (or finished)
keeps its options. Running an edited file may add jobs (new grid values, seeds, runs) and change
execution settings (timeout_s, retries, retry_backoff_s, memory_gb, cpus_per_job, gpus_per_job,
host_memory_gb). Changing an option, the command or env of a started job, or dropping a started
job that is not done, is refused before anything runs, naming the setting. Jobs that never
started simply follow the file (updated, or dropped when gone).
"""
from __future__ import annotations

import json
from typing import Any

from tenslora.errors import UsageError
from tenslora.sweep.spec import Job

RESULT_SETTINGS = ("command", "env")  # settings that change what a job computes


def _norm(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def first_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``"lr 0.001 -> 0.002"`` for the first key whose value differs (sorted), else None."""
    old, new = _norm(old), _norm(new)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
    return None


def started(row: dict[str, Any]) -> bool:
    return not (row["state"] == "queued" and row["attempts"] == 0)


def check_edit(rows: list[dict[str, Any]], jobs: list[Job], settings: dict[str, Any], *,
               source: str, root: str) -> list[str]:
    """Raise ``UsageError`` if the file changes a started job; return the never-started jobs to drop."""
    by_name = {r["name"]: r for r in rows}
    new_result = {k: settings.get(k) for k in RESULT_SETTINGS}
    advice = "results would mix settings; undo the edit, or give the changed sweep a new --dir"
    for job in jobs:
        row = by_name.get(job.name)
        if row is None or not started(row):
            continue
        old_settings = row["settings"] or {}
        change = (first_change(row["options"], job.options)
                  or first_change({k: old_settings.get(k) for k in RESULT_SETTINGS}, new_result))
        if change:
            raise UsageError(f"{source} changed {change} for job {job.name!r} ({row['state']}) already in "
                             f"{root}; {advice}")
    names = {j.name for j in jobs}
    for row in rows:
        if row["name"] not in names and started(row) and row["state"] != "done":
            raise UsageError(f"{source} no longer lists job {row['name']!r} ({row['state']}) of {root}; "
                             f"restore it, or give the changed sweep a new --dir")
    return [r["name"] for r in rows if r["name"] not in names and not started(r)]


def settings_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The execution settings that differ from the last run's (``["timeout_s 60 -> 120"]``)."""
    if not old:
        return []
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in RESULT_SETTINGS and _norm(old.get(key)) != _norm(new.get(key)):
            out.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return out
