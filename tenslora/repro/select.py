"""Experiment D's learning-rate selection: per configuration, the grid rate with the best VALIDATION metric.

The value of a grid run is its summary's ``best[validation_<m>]``: the validation metric at the run's
best-validation checkpoint, where ``test_<m>`` is the task's main metric. Test metrics are never read
here. Ties go to the smaller rate; a non-finite value (a diverged run) ranks below every finite one. A
configuration is selected only once every rate of its grid has a done run, so the choice cannot change
when a failed grid run is retried later. The selection is stored in ``selected_lr.json`` (atomically);
recomputing it on a restart must give the same rates, or :func:`store_selection` refuses.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence


def validation_metric(test_metric: str) -> str:
    """``test_macro_f1`` -> ``validation_macro_f1`` (the selection's counterpart of the reported metric)."""
    if not test_metric.startswith("test_"):
        raise ValueError(f"the main metric must be a test metric (test_...), got {test_metric!r}")
    return "validation_" + test_metric[len("test_"):]


def lr_key(lr: float) -> str:
    """How a rate is written in the selection file and tables: ``0.003``."""
    return f"{float(lr):g}"


def grid_value(summary: Mapping[str, Any], metric: str) -> float | None:
    """The validation ``metric`` at a run's best-validation checkpoint (None if absent; NaN if not finite)."""
    value = (summary.get("best") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else math.nan


def choose(values: Mapping[float, float]) -> float:
    """The rate with the largest value; ties -> the smaller rate; NaN ranks last."""
    if not values:
        raise ValueError("no grid values to choose a learning rate from")
    return min(values, key=lambda lr: (-values[lr] if not math.isnan(values[lr]) else math.inf, lr))


def select_rates(grid: Mapping[str, Mapping[float, Mapping[str, Any] | None]], lrs: Sequence[float],
                 metric: str) -> dict[str, dict[str, Any]]:
    """``{label: {"lr", "grid": {lr_key: value}}}`` for every configuration whose grid is complete.

    ``grid[label][lr]`` is the summary of the done grid run (or None / missing when not done)."""
    out = {}
    for label, runs in grid.items():
        values = {}
        for lr in lrs:
            summary = runs.get(float(lr))
            value = None if summary is None else grid_value(summary, metric)
            if value is None:
                break
            values[float(lr)] = value
        else:
            out[label] = {"lr": choose(values), "grid": {lr_key(lr): v for lr, v in values.items()}}
    return out


def store_selection(path: str | Path, metric: str, selected: Mapping[str, Mapping[str, Any]]) -> dict:
    """Merge ``selected`` into the selection file (atomic write) and return its content. A configuration
    already in the file must get the same rate again: phase-2 runs may already use it."""
    from tenslora.io import write_json_atomic

    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {"metric": metric, "configurations": {}}
    if old.get("metric") != metric:
        raise ValueError(f"{path} selects on {old.get('metric')!r}, this run on {metric!r}; use another --dir")
    configs = dict(old["configurations"])
    for label, rec in selected.items():
        prev = configs.get(label)
        if prev is not None and float(prev["lr"]) != float(rec["lr"]):
            raise ValueError(f"{path}: {label} was tuned to lr {prev['lr']:g}, but its grid results now give "
                             f"{rec['lr']:g}; the grid runs changed since the selection. Restore them or use "
                             "another --dir")
        configs[label] = {"lr": float(rec["lr"]), "grid": dict(rec["grid"])}
    content = {"metric": metric, "configurations": configs}
    if content != old:
        write_json_atomic(path, content)
    return content
