"""The report: per-experiment tables (mean ± std over seeds), plots and verdicts -> ``docs/results.md``."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from tenslora.repro.collect import load_results
from tenslora.repro.plots import PLOTS
from tenslora.repro.spec import EXPERIMENTS, INDEX_FILE
from tenslora.repro.verdicts import CLAIM_EXPERIMENT, CLAIMS, INCONCLUSIVE, Stat, claim_verdicts, stat_of


def _role_key(role: dict) -> str | None:
    e = role["experiment"]
    if e == "A":
        return f"A:{role['label']}" if role["construction"] == "lora" else f"A:{role['construction']}/{role['factorization']}"
    if e == "B":
        if role["kind"] == "loraplus":
            return f"B:loraplus:{role['x']:g}"
        return f"B:{role['kind']}:{role['construction']}:{role['x']:g}"
    if e == "C":
        return f"C:{role['arm']}:{role['budget']}"
    return None


def task_tables(index: dict, runs: list[dict]) -> dict[str, Any]:
    """Per experiment: aggregated groups (via the sweep aggregation) with their roles."""
    from tenslora.sweep.report import aggregate

    metric = index["metric"]
    metrics = list(dict.fromkeys([metric, *index.get("metrics", [])]))
    out: dict[str, Any] = {"metric": metric, "metrics": metrics, "experiments": {}}
    by_name = {r["name"]: r for r in runs}
    for exp in EXPERIMENTS:
        names = [n for n, roles in index["jobs"].items() if any(r["experiment"] == exp for r in roles)]
        if not names:
            continue
        done = [by_name[n] for n in names if n in by_name]
        rows = [{"name": r["name"], "options": r["options"], "summary": r["summary"]} for r in done]
        results = aggregate(rows, metric) if rows else None
        entries = []
        if results is not None:
            for grp in results.groups:
                roles = [r for r in by_name[grp.jobs[0]]["roles"] if r["experiment"] == exp]
                for role in roles:
                    entries.append({"role": role, "key": _role_key(role), "group": grp})
        out["experiments"][exp] = {"expected": names, "done": [r["name"] for r in done], "entries": entries}
    return out


def _fmt_pm(s: Stat | None) -> str:
    if s is None:
        return "-"
    return f"{s.mean:.4f}" + (f" ± {s.std:.4f}" if s.std is not None else "")


def _table(entries: list[dict], metrics: Sequence[str], extra_cols: Sequence[tuple[str, Any]] = ()) -> str:
    cols = ["configuration", *(c for c, _ in extra_cols), "seeds", *metrics, "trainable params", "adapter params",
            "wall time (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for e in entries:
        g = e["group"]
        adapter = e.get("adapter")
        cells = [e["role"]["label"], *(str(fn(e)) for _, fn in extra_cols), str(g.n),
                 *(_fmt_pm(stat_of(g, m)) for m in metrics),
                 "-" if g.trainable_parameters is None else f"{g.trainable_parameters:,.0f}",
                 "-" if adapter is None else f"{adapter:,.0f}",
                 "-" if g.wall_time_s is None else f"{g.wall_time_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _adapter_params(runs_by_name: dict, group) -> float | None:
    vals = [runs_by_name[n]["summary"].get("adapter_parameters") for n in group.jobs
            if isinstance(runs_by_name[n]["summary"].get("adapter_parameters"), (int, float))]
    return statistics.fmean(vals) if vals else None


EXP_TITLES = {
    "A": "Experiment A — constructions at equal parameters",
    "B": "Experiment B — heterogeneous learning rate (core lambda) with uniform-lr controls; LoRA+",
    "C": "Experiment C — rank allocation: uniform vs allocator (auto) vs its reverse",
}


def write_report(source: str | os.PathLike, out_md: str | os.PathLike, plots_dir: str | os.PathLike, *,
                 from_results: bool = False, note: str = "") -> dict[str, Any]:
    """Write the markdown report and its PNG plots; returns ``{"markdown", "plots", "verdicts", "missing"}``."""
    indexes, runs = load_results(source, from_results=from_results)
    if not indexes:
        raise ValueError(f"no repro results under {source} (no {'_index.json' if from_results else INDEX_FILE})")
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(plots_dir, out_md.parent)
    plots: list[Path] = []
    verdicts: dict[str, dict[int, tuple[str, str]]] = {}
    missing_total: dict[str, list[str]] = {}
    sections: list[str] = []
    scales = sorted({i["scale"] for i in indexes.values()})
    for task, index in indexes.items():
        task_runs = [r for r in runs if r["task"] == task]
        tables = task_tables(index, task_runs)
        metric = tables["metric"]
        by_name = {r["name"]: r for r in task_runs}
        expected = set(index["jobs"])
        missing = sorted(expected - set(by_name))
        missing_total[task] = missing
        base = index.get("base", {})
        sec = [f"## {task} ({index['kind']}, model `{base.get('model')}`, scale `{index['scale']}`)\n",
               f"Main metric: `{metric}` (test split, at the best-validation checkpoint). "
               f"Jobs: {len(expected) - len(missing)} of {len(expected)} done"
               + (f" — **partial: {len(missing)} missing**" if missing else "") + ".\n"]
        stats: dict[str, Stat] = {}
        for exp in EXPERIMENTS:
            data = tables["experiments"].get(exp)
            if data is None:
                continue
            entries = data["entries"]
            for e in entries:
                e["adapter"] = _adapter_params(by_name, e["group"])
                s = stat_of(e["group"], metric)
                if s is not None and e["key"]:
                    stats[e["key"]] = s
            sec.append(f"### {EXP_TITLES[exp]}\n")
            n_missing = len(set(data["expected"]) - set(data["done"]))
            sec.append(f"{len(data['done'])} of {len(data['expected'])} jobs done"
                       + (f" (missing: {n_missing})" if n_missing else "") + ".\n")
            if exp == "A":
                extra = [("ranks", lambda e: e["group"].options.get("ranks", "-"))]
                order = sorted(entries, key=lambda e: (e["role"]["factorization"] != "lora", e["role"]["factorization"],
                                                       e["role"]["label"]))
            elif exp == "B":
                extra = [("core lambda / lr x / ratio", lambda e: f"{e['role']['x']:g}"),
                         ("lr", lambda e: e["group"].options.get("lr", base.get("lr")))]
                order = sorted(entries, key=lambda e: (e["role"]["series"], e["role"]["x"]))
            else:
                extra = [("ranks", lambda e: e["group"].options.get("ranks", "-"))]
                order = sorted(entries, key=lambda e: (e["role"]["budget"], e["role"]["arm"]))
            sec.append(_table(order, tables["metrics"], extra))
            if entries:
                safe_task = task.replace("/", "_")
                p = plots_dir / f"{exp}_{safe_task}.png"
                PLOTS[exp](task, metric, order, p)
                plots.append(p)
                sec.append(f"\n![{exp} {task}]({rel}/{p.name})\n")
            if exp == "C" and index.get("allocation"):
                lines = ["\nAllocator choice (one probe, seed 0; effective rank per mode):\n"]
                for b, rec in index["allocation"].items():
                    tgt = ", ".join(f"{m} {v:.2f}" for m, v in rec["targets_effective_rank"].items())
                    lines.append(f"- {b} ({rec['budget']:,} parameters): auto `{rec['ranks_string']}` "
                                 f"({rec['parameters']:,}), reverse `{rec['reverse_ranks_string']}` "
                                 f"({rec['reverse_parameters']:,}); effective ranks: {tgt}")
                sec.append("\n".join(lines) + "\n")
        v = claim_verdicts(stats)
        ran = set(tables["experiments"])
        for k, exp in CLAIM_EXPERIMENT.items():
            if exp not in ran:
                v[k] = (INCONCLUSIVE, f"{INCONCLUSIVE}: not measured — experiment {exp} was not run for this task.")
        verdicts[task] = v
        sec.append("### Verdicts on the earlier claims\n")
        sec.append(f"Metric `{metric}`; a difference smaller than the pooled std over seeds is inconclusive.\n")
        for k, (verdict, sentence) in v.items():
            sec.append(f"- **Claim {k}** ({CLAIMS[k]}) — {sentence}")
        sec.append("")
        sections.append("\n".join(sec))
    n_missing = sum(len(m) for m in missing_total.values())
    ran_exps = sorted({e for i in indexes.values() for e in i.get("experiments", [])})
    head = ["# Reproduction results (TensLoRA / TensLoRA+)\n",
            "Generated by `tenslora repro report` from real runs; do not edit by hand. How to run: "
            "[reproduce.md](reproduce.md).\n",
            f"Scale: {', '.join(scales)}. Tasks: {', '.join(indexes)}. Experiments: {', '.join(ran_exps)}"
            + (f" (not run: {', '.join(e for e in EXPERIMENTS if e not in ran_exps)})" if len(ran_exps) < 3 else "")
            + ". Every number is the mean ± sample std over "
            "seeds of the **test** metric at the **best-validation** checkpoint (the best step is chosen on "
            "validation only); parameters are trainable parameters (adapter + task head; the adapter alone in "
            "its own column); wall time is per run.\n"]
    if n_missing:
        head.append("**PARTIAL RESULTS.** Not every planned run finished: "
                    + "; ".join(f"{t}: {len(m)} of {len(indexes[t]['jobs'])} missing" for t, m in missing_total.items())
                    + ". The missing runs are listed at the end. Verdicts below use only the finished runs.\n")
    if note:
        head.append(note.strip() + "\n")
    md = "\n".join(head) + "\n" + "\n".join(sections)
    if n_missing:
        md += "\n## Missing runs\n\n"
        for t, m in missing_total.items():
            if m:
                md += f"- {t}: " + ", ".join(f"`{x}`" for x in m) + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    return {"markdown": out_md, "plots": plots, "verdicts": verdicts, "missing": missing_total}
