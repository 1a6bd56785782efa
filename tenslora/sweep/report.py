"""Aggregate a sweep's results over seeds: a markdown table, a CSV and matplotlib plots."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tenslora.sweep.spec import format_value

SEED_KEYS = ("seed",)


@dataclass
class Group:
    """The runs of one configuration (all options but the seed)."""

    options: dict[str, Any]
    jobs: list[str] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per run
    params: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.jobs)

    def mean(self, metric: str) -> float | None:
        vals = self.values.get(metric) or []
        return statistics.fmean(vals) if vals else None

    def std(self, metric: str) -> float | None:
        """Sample standard deviation over seeds (n - 1); None with fewer than two runs."""
        vals = self.values.get(metric) or []
        return statistics.stdev(vals) if len(vals) >= 2 else None

    @property
    def trainable_parameters(self) -> float | None:
        return statistics.fmean(self.params) if self.params else None

    @property
    def wall_time_s(self) -> float | None:
        return statistics.fmean(self.wall) if self.wall else None


@dataclass
class SweepResults:
    """Aggregated results: groups sorted by the primary metric (best first)."""

    metric: str
    which: str
    groups: list[Group]
    varying: list[str]
    metrics: list[str]
    options: list[str]
    counts: dict[str, int]

    def label(self, group: Group, keys: Sequence[str] | None = None) -> str:
        keys = self.varying if keys is None else keys
        return ",".join(f"{k}={_fmt_opt(group.options.get(k))}" for k in keys) or "all"

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per group (what the CSV holds)."""
        out = []
        for g in self.groups:
            row: dict[str, Any] = {k: _fmt_opt(g.options.get(k)) for k in self.varying}
            row["n"] = g.n
            row["seeds"] = " ".join(str(s) for s in g.seeds)
            for m in self.metrics:
                row[f"{m}_mean"] = g.mean(m)
                row[f"{m}_std"] = g.std(m)
            row["trainable_parameters"] = g.trainable_parameters
            row["wall_time_s"] = g.wall_time_s
            out.append(row)
        return out


def _fmt_opt(value: Any) -> str:
    return "-" if value is None else format_value(value)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load_rows(sweep_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The done jobs (options + summary) of a sweep directory and the count of jobs per state."""
    from tenslora.sweep.store import Store

    with Store(sweep_dir, create=False) as store:
        jobs = store.jobs()
        counts = store.counts()
    rows = []
    for job in jobs:
        if job["state"] != "done":
            continue
        summary = job["summary"]
        if not isinstance(summary, dict):
            try:
                summary = json.loads((Path(sweep_dir) / "runs" / job["name"] / "summary.json").read_text())
            except (OSError, ValueError):
                continue
        rows.append({"name": job["name"], "options": job["options"], "summary": summary})
    return rows, counts


def aggregate(source: str | os.PathLike | Iterable[dict[str, Any]], metric: str = "test_macro_f1", *,
              which: str = "best", counts: dict[str, int] | None = None) -> SweepResults:
    """Mean and std over seeds of every metric, trainable parameters and wall time, per configuration.

    ``source`` is a sweep directory or rows ``{"name", "options", "summary"}``; ``which`` picks the
    summary's ``best`` (test metrics at the best validation checkpoint) or ``final`` metrics.
    """
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    if isinstance(source, (str, os.PathLike)):
        rows, counts = load_rows(source)
    else:
        rows = list(source)
    groups: dict[str, Group] = {}
    metric_names: list[str] = []
    option_names: list[str] = []
    for row in rows:
        options = dict(row["options"])
        for k in options:
            if k not in option_names:
                option_names.append(k)
        seed = next((options.pop(k) for k in SEED_KEYS if k in options), None)
        key = json.dumps(options, sort_keys=True, default=str)
        g = groups.setdefault(key, Group(options=options))
        g.jobs.append(row["name"])
        g.seeds.append(seed)
        summary = row["summary"] or {}
        for m, v in (summary.get(which) or {}).items():
            v = _num(v)
            if v is None:
                continue
            if m not in metric_names:
                metric_names.append(m)
            g.values.setdefault(m, []).append(v)
        if _num(summary.get("trainable_parameters")) is not None:
            g.params.append(float(summary["trainable_parameters"]))
        if _num(summary.get("wall_time_s")) is not None:
            g.wall.append(float(summary["wall_time_s"]))
    if rows and metric not in metric_names:
        raise ValueError(f"metric {metric!r} is not in the results ({which}); available: "
                         f"{', '.join(metric_names) or 'none'}")
    if metric in metric_names:
        metric_names.remove(metric)
        metric_names.insert(0, metric)
    keys = [k for k in option_names if k not in SEED_KEYS]
    varying = [k for k in keys
               if len({json.dumps(g.options.get(k), default=str) for g in groups.values()}) > 1]
    ordered = sorted(groups.values(), key=lambda g: (g.mean(metric) is None, -(g.mean(metric) or 0.0)))
    return SweepResults(metric=metric, which=which, groups=ordered, varying=varying, metrics=metric_names,
                        options=keys, counts=counts or {"done": len(rows)})


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown_table(results: SweepResults) -> str:
    """The aggregated results as a markdown table (best configuration first)."""
    cols = [*results.varying, "n", *(f"{m} ({results.which})" for m in results.metrics),
            "trainable params", "wall time (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for g in results.groups:
        cells = [_fmt_opt(g.options.get(k)) for k in results.varying]
        cells.append(str(g.n))
        cells += [_pm(g.mean(m), g.std(m)) for m in results.metrics]
        cells += [_int(g.trainable_parameters), "-" if g.wall_time_s is None else f"{g.wall_time_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: SweepResults, path: str | os.PathLike) -> Path:
    rows = results.rows()
    path = Path(path)
    fields = [*results.varying, "n", "seeds", *(f"{m}_{s}" for m in results.metrics for s in ("mean", "std")),
              "trainable_parameters", "wall_time_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _plot(results: SweepResults, x_key: str | None, path: Path) -> Path:
    """Metric (mean ± std) against an option, or against trainable parameters when ``x_key`` is None."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = results.metric
    others = [k for k in results.varying if k != x_key]
    if x_key is None:  # one colour per construction if it varies, else one series
        others = [k for k in others if k == "construction"]
    series: dict[str, list[tuple[Any, float, float, Group]]] = {}
    for g in results.groups:
        y = g.mean(metric)
        x = g.trainable_parameters if x_key is None else g.options.get(x_key)
        if y is None or x is None:
            continue
        series.setdefault(results.label(g, others), []).append((x, y, g.std(metric) or 0.0, g))
    xs_all = [x for pts in series.values() for x, *_ in pts]
    numeric = all(_num(x) is not None for x in xs_all)
    categories = [] if numeric else sorted({_fmt_opt(x) for x in xs_all})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        pts.sort(key=lambda p: p[0] if numeric else categories.index(_fmt_opt(p[0])))
        xs = [p[0] if numeric else categories.index(_fmt_opt(p[0])) for p in pts]
        ys, es = [p[1] for p in pts], [p[2] for p in pts]
        style = "o" if x_key is None else "o-"
        ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label if len(series) > 1 else None)
        if x_key is None and len(results.groups) <= 20:
            for (x, y, _, g), xp in zip(pts, xs):
                ax.annotate(results.label(g, [k for k in results.varying if k != "construction"]) or "",
                            (xp, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if numeric and xs_all:
        positive = [float(x) for x in xs_all if float(x) > 0]
        if len(positive) == len(xs_all) and max(positive) / min(positive) >= 20:
            ax.set_xscale("log")
    if categories:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("trainable parameters" if x_key is None else x_key)
    ax.set_ylabel(f"{metric} ({results.which}, mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(sweep_dir: str | os.PathLike, metric: str = "test_macro_f1", by: Sequence[str] = (), *,
                 which: str = "best", out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``results.csv`` and PNG plots (default into ``SWEEP_DIR/report``).

    Returns ``{"results": SweepResults, "markdown": path, "csv": path, "plots": [paths]}``.
    """
    results = aggregate(sweep_dir, metric, which=which)
    unknown = [b for b in by if b not in results.options]
    if unknown:
        raise ValueError(f"--by {unknown[0]!r} is not an option of this sweep; options: "
                         f"{', '.join(results.options) or 'none (no finished jobs)'}")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    c = results.counts
    what = ("best: test metrics at the best-validation checkpoint" if which == "best"
            else "final: test metrics at the last step")
    header = (f"# Sweep report: {Path(sweep_dir).resolve().name}\n\n"
              f"Jobs: {c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('running', 0)} running, "
              f"{c.get('queued', 0)} queued. Metrics: {what}; mean ± sample std over seeds; "
              f"sorted by `{metric}`.\n\n")
    plots: list[Path] = []
    if results.groups:
        plots.append(_plot(results, None, out / f"{_safe(metric)}_vs_trainable_parameters.png"))
        xs = (["core_lambda"] if "core_lambda" in results.varying else []) + [b for b in by if b != "core_lambda"]
        for key in xs:
            plots.append(_plot(results, key, out / f"{_safe(metric)}_vs_{_safe(key)}.png"))
    md = header + markdown_table(results)
    if plots:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    md_path = out / "report.md"
    md_path.write_text(md)
    csv_path = write_csv(results, out / "results.csv")
    return {"results": results, "markdown": md_path, "csv": csv_path, "plots": plots}
