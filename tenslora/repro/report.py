"""The report: per-experiment tables (mean ± std over seeds), plots and verdicts -> ``docs/results.md``."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from tenslora.repro.collect import load_results
from tenslora.repro.plots import PLOTS, plot_grid
from tenslora.repro.spec import EXPERIMENTS, INDEX_FILE
from tenslora.repro.verdicts import (CLAIM_EXPERIMENT, CLAIMS, INCONCLUSIVE, TUNED_CLAIMS, Stat, claim6_verdict,
                                     claim_verdicts, stat_of)


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
    if e == "D":
        return f"D:{role['label']}" if role.get("phase") == "tuned" else None
    if e == "E":
        return f"E:layers={role['layers_rank']}"
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
    "D": "Experiment D — each method at its own learning rate: a grid chosen on validation, then seeds on test",
    "E": "Experiment E — claim 6: layers-mode rank 4 vs 2 (other ranks fixed, at the tuned rate)",
}


def _fmt_stat(s: Stat | None, digits: int = 4) -> str:
    return "-" if s is None else f"{s.mean:.{digits}f}" + (f" ± {s.std:.{digits}f}" if s.std is not None else "")


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _sizes(runs: list[dict]) -> str:
    """``validation 500, test 2,000`` from the runs' summaries (several values joined by /)."""
    out = []
    for split in ("validation", "test"):
        vals = sorted({r["summary"].get("data_sizes", {}).get(split) for r in runs} - {None})
        if vals:
            out.append(f"{split} {'/'.join(f'{v:,}' for v in vals)}")
    return ", ".join(out) or "unknown"


def grid_from_runs(index: dict, by_name: dict[str, dict]) -> dict[str, dict[float, dict]]:
    """``{label: {lr: summary}}`` of D's done grid runs."""
    grid: dict[str, dict[float, dict]] = {label: {} for label in (index.get("tuning") or {}).get("grid", [])}
    for name, roles in index["jobs"].items():
        for role in roles:
            if role["experiment"] == "D" and role.get("phase") == "grid" and name in by_name:
                grid.setdefault(role["label"], {})[float(role["lr"])] = by_name[name]["summary"]
    return grid


def edge_choices(selection: dict, lrs: Sequence[float]) -> list[str]:
    """Configurations whose chosen rate is the smallest or the largest of the grid ``lrs``."""
    return [label for label, rec in selection.items() if float(rec["lr"]) in (min(lrs), max(lrs))]


def section_d(task: str, index: dict, data: dict, by_name: dict, metrics: Sequence[str], plots_dir: Path,
              rel: str) -> tuple[list[str], list[Path]]:
    """D's markdown: the grid (validation metric per rate, the chosen rate, a plot) and the tuned runs."""
    from tenslora.repro.select import grid_value, lr_key, select_rates

    tune = index["tuning"]
    lrs, vmetric = [float(x) for x in tune["lrs"]], tune["metric"]
    grid = grid_from_runs(index, by_name)
    recomputed = select_rates(grid, lrs, vmetric)
    stored = tune.get("selection") or {}
    grid_names = [n for n, rs in index["jobs"].items() if any(r["experiment"] == "D" and r.get("phase") == "grid"
                                                                for r in rs)]
    tuned_names = [n for n, rs in index["jobs"].items() if any(r["experiment"] == "D" and r.get("phase") == "tuned"
                                                                 for r in rs)]
    fixed = tune.get("fixed") or {}
    unplanned = [label for label in tune["tuned"] if label not in stored and label not in fixed]
    phase2 = (f"Phase 2 ({len(tune['seeds'])} seeds at the chosen rate): {sum(n in by_name for n in tuned_names)} "
              f"of {len(tuned_names)} planned runs done")
    reported = f"reported runs {_sizes([by_name[n] for n in tuned_names if n in by_name])}.\n"
    if grid:
        lines = [f"Phase 1 (grid, seed {tune['grid_seed']}, one run per rate): "
                 f"{sum(n in by_name for n in grid_names)} of {len(grid_names)} runs done. " + phase2
                 + (f"; **{len(unplanned)} configuration(s) not selected yet** (grid incomplete): "
                    + ", ".join(unplanned) if unplanned else "") + ".\n",
                 f"The rate is chosen on **validation only**: `{vmetric}` at each grid run's best-validation "
                 "checkpoint (ties to the smaller rate); the test split is never read to choose. Evaluation sets: "
                 f"grid runs {_sizes([by_name[n] for n in grid_names if n in by_name])}; " + reported]
    else:
        lines = [f"No grid: every rate is given. {phase2}.\n", "Evaluation sets: " + reported]
    cols = ["configuration", *(lr_key(lr) for lr in lrs), "chosen lr"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for label, runs in grid.items():
        chosen = (stored.get(label) or {}).get("lr")
        cells = [label]
        for lr in lrs:
            v = grid_value(runs[lr], vmetric) if lr in runs else None
            text = "-" if v is None else f"{v:.4f}"
            cells.append(f"**{text}**" if chosen is not None and float(chosen) == lr else text)
        cells.append("-" if chosen is None else lr_key(chosen))
        rows.append("| " + " | ".join(cells) + " |")
    if grid:
        lines.append(f"Grid: `{vmetric}` per learning rate (bold: the chosen rate).\n")
        lines.append("\n".join(rows) + "\n")
    if fixed:
        lines.append("**Rates given, not tuned on this task** (no grid runs; the configuration file says where each "
                     "rate comes from): " + ", ".join(f"{label} ({lr_key(lr)})" for label, lr in fixed.items()) + ".\n")
    edge = edge_choices(stored, lrs)
    if edge:
        lines.append("**Chosen at the edge of the grid** (a better rate may lie beyond it, so these methods may "
                     "still be under-tuned): " + ", ".join(f"{label} ({lr_key(float(stored[label]['lr']))})"
                                                          for label in edge) + ".\n")
    bad = [label for label in stored if label in recomputed and float(recomputed[label]["lr"]) != float(stored[label]["lr"])]
    if bad:
        lines.append("**SELECTION MISMATCH**: the grid results now give another rate than the one the reported runs "
                     "used for " + ", ".join(bad) + ".\n")
    plots = []
    if any(grid.values()):
        p = plots_dir / f"D_grid_{task.replace('/', '_')}.png"
        plot_grid(task, vmetric, {label: {lr: grid_value(s, vmetric) for lr, s in runs.items()}
                                  for label, runs in grid.items()},
                  {label: float(rec["lr"]) for label, rec in stored.items()}, p)
        plots.append(p)
        lines.append(f"\n![D grid {task}]({rel}/{p.name})\n")
    tuned = [e for e in data["entries"] if e["role"].get("phase") == "tuned"]
    order = sorted(tuned, key=lambda e: (e["role"]["factorization"] != "lora", e["role"]["factorization"],
                                         e["role"]["label"]))
    lines.append(f"Phase 2: {len(tune['seeds'])} seeds at each configuration's chosen rate, test metrics at the "
                 "best-validation checkpoint.\n")
    lines.append(_table(order, metrics, [("lr (chosen)", lambda e: lr_key(e["role"]["lr"])
                                          + (" (given)" if e["role"]["label"] in fixed else "")),
                                         ("ranks", lambda e: e["group"].options.get("ranks", "-"))]))
    zero = index.get("zero_shot")
    if zero:
        m = zero.get("metrics", {})
        lines.append("\nZero-shot (the base model without an adapter, same test split): "
                     + ", ".join(f"`{k}` {v:.4f}" for k, v in m.items() if k in metrics) + ".\n")
    return lines, plots


def targets_comparison(task: str, other: str, tuned_rows: dict[str, dict[str, dict]], metric: str) -> str:
    """A table of each method of ``task`` (labels ``<method>@<targets>``) next to the same method on Q/K/V,
    D's phase-2 rows of ``other`` (the task it adds arms to: same base, options and seeds)."""
    mine, theirs = tuned_rows.get(task, {}), tuned_rows.get(other, {})
    methods = list(dict.fromkeys(label.partition("@")[0] for label in mine))
    lines = [f"### Targets compared: each method on Q/K/V (`{other}`'s D runs) and on the targets of this task\n",
             f"`{metric}`, mean ± std over seeds at each configuration's own tuned rate (or its given rate, marked); "
             "ranks matched to PEFT LoRA "
             "at the budget rank on the same modules.\n",
             "| method | targets | lr (chosen) | ranks | adapter params | " + metric + " |", "|---|---|---|---|---|---|"]
    for method in methods:
        arms = [("qkv", theirs.get(method))] + [(label.partition("@")[2], row) for label, row in mine.items()
                                                  if label.partition("@")[0] == method]
        for targets, row in arms:
            if row is None:
                lines.append(f"| {method} | {targets} | - | - | - | not measured |")
                continue
            adapter = "-" if row["adapter"] is None else f"{row['adapter']:,.0f}"
            lr = f"{row['lr']:g}" + (" (given)" if row.get("given") else "")
            lines.append(f"| {method} | {targets} | {lr} | {row['ranks']} | {adapter} | "
                         f"{_fmt_stat(row['stat'])} |")
    return "\n".join(lines) + "\n"


def layers_effective_ranks(entries: list[dict], by_name: dict) -> dict[int, Stat]:
    """``{layers rank: Stat}`` of the layers mode's effective rank over each E arm's seeds."""
    out = {}
    for e in entries:
        vals = [((by_name[n].get("mode_metrics") or {}).get("layers") or {}).get("effective_rank")
                for n in e["group"].jobs]
        s = _stat([v for v in vals if isinstance(v, (int, float))])
        if s is not None:
            out[int(e["role"]["layers_rank"])] = s
    return out


def section_e(index: dict, data: dict, by_name: dict, metrics: Sequence[str]) -> tuple[list[str], dict[int, Stat]]:
    layers = (index.get("tuning") or {}).get("layers") or {}
    entries = sorted(data["entries"], key=lambda e: -e["role"]["layers_rank"])
    eff = layers_effective_ranks(entries, by_name)

    def modes(e: dict) -> str:
        recs = [by_name[n].get("mode_metrics") or {} for n in e["group"].jobs]
        names = list(dict.fromkeys(m for r in recs for m in r))
        return ", ".join(f"{m} {_fmt_stat(_stat([r[m]['effective_rank'] for r in recs if m in r]), 2)}"
                         for m in names) or "-"

    lines = [f"`{layers.get('construction', 'att_qkv_depth')}` Tucker, ranks as D's matched configuration with the "
             f"layers rank replaced, at the rate D chose for `{layers.get('lr_from', '?')}`. Effective rank = "
             "exp(SVD entropy) of each mode-n unfolding of the trained tensor (best-validation adapter), mean ± std "
             "over seeds.\n",
             _table(entries, metrics, [("ranks", lambda e: e["group"].options.get("ranks", "-")),
                                       ("lr", lambda e: e["role"]["lr"]),
                                       ("layers effective rank", lambda e: _fmt_stat(eff.get(int(e["role"]["layers_rank"])), 2)),
                                       ("effective rank per mode", modes)])]
    return lines, eff


def _not_run_sections(config: dict | None, indexes: dict[str, dict]) -> list[str]:
    """A short section for every task of the reported scales that has no results (e.g. the LLM task)."""
    from tenslora.repro.spec import scale_tasks, task_experiments

    if not config:
        return []
    out = []
    for scale in sorted({i["scale"] for i in indexes.values()}):
        if scale not in config.get("scales", {}):
            continue
        for task in scale_tasks(config, scale):
            if task["name"] in indexes:
                continue
            exps = task_experiments(task, EXPERIMENTS)
            out.append(f"## {task['name']} ({task['kind']}, model `{task['base'].get('model')}`, scale `{scale}`) — "
                       f"**not run**\n\nNo results: planned in `benchmarks/repro/repro.yaml` (experiments "
                       f"{', '.join(exps)}" + (", plus a zero-shot evaluation" if task.get("zero_shot") else "")
                       + f"), run with `tenslora repro run --scale {scale} --experiments {','.join(exps)} "
                       f"--tasks {task['kind']}`. Its claims are not measured.\n")
    return out


def write_report(source: str | os.PathLike, out_md: str | os.PathLike, plots_dir: str | os.PathLike, *,
                 from_results: bool = False, note: str = "", config: dict | None = None) -> dict[str, Any]:
    """Write the markdown report and its PNG plots; returns ``{"markdown", "plots", "verdicts", "missing"}``.

    ``config``: the repro file (tasks of the reported scale without results are listed as not run). With
    ``from_results``, the results directory's ``NOTE.md`` (conditions of the runs), if present, goes under
    the header before ``note``."""
    indexes, runs = load_results(source, from_results=from_results)
    note_file = Path(source) / NOTE_FILE
    if from_results and note_file.is_file():
        note = note_file.read_text().strip() + ("\n\n" + note.strip() if note.strip() else "")
    if not indexes:
        raise ValueError(f"no repro results under {source} (no {'_index.json' if from_results else INDEX_FILE})")
    out_md, plots_dir = Path(out_md), Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(plots_dir, out_md.parent)
    plots: list[Path] = []
    verdicts: dict[str, dict[Any, tuple[str, str]]] = {}
    missing_total: dict[str, list[str]] = {}
    unplanned_total: dict[str, int] = {}
    sections: list[str] = []
    scales = sorted({i["scale"] for i in indexes.values()})
    tuned_rows: dict[str, dict[str, dict]] = {}  # task -> D label -> its phase-2 row (for compare_with)
    section_of: dict[str, int] = {}
    for task, index in indexes.items():
        task_runs = [r for r in runs if r["task"] == task]
        tables = task_tables(index, task_runs)
        metric = tables["metric"]
        by_name = {r["name"]: r for r in task_runs}
        expected = set(index["jobs"])
        missing = sorted(expected - set(by_name))
        missing_total[task] = missing
        tune = index.get("tuning")
        unplanned = 0
        if tune:  # phase-2 runs that cannot be named before their configuration is selected
            rated = set(tune.get("selection") or {}) | set(tune.get("fixed") or {})  # selected or given
            layers = tune.get("layers")
            unplanned = len(tune["seeds"]) * (sum(label not in rated for label in tune["tuned"])
                                              + (len(layers["arms"]) if layers and layers["lr_from"] not in rated
                                                 else 0))
        unplanned_total[task] = unplanned
        base = index.get("base", {})
        sec = [f"## {task} ({index['kind']}, model `{base.get('model')}`, scale `{index['scale']}`)\n",
               f"Main metric: `{metric}` (test split, at the best-validation checkpoint). "
               f"Jobs: {len(expected) - len(missing)} of {len(expected)} done"
               + (f" — **partial: {len(missing)} missing**" if missing else "")
               + (f"; {unplanned} phase-2 run(s) of D/E not planned yet (their grid is incomplete)" if unplanned else "")
               + ".\n"]
        stats: dict[str, Stat] = {}
        effective: dict[int, Stat] = {}
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
            if exp == "D" and tune:
                tuned_rows[task] = {e["role"]["label"]: {"stat": stat_of(e["group"], metric), "lr": e["role"]["lr"],
                                                         "given": e["role"]["label"] in (tune.get("fixed") or {}),
                                                         "adapter": e["adapter"],
                                                         "ranks": e["group"].options.get("ranks", "-")}
                                    for e in entries if e["role"].get("phase") == "tuned"}
                lines, ps = section_d(task, index, data, by_name, tables["metrics"], plots_dir, rel)
                sec.extend(lines)
                plots.extend(ps)
                continue
            if exp == "E":
                lines, effective = section_e(index, data, by_name, tables["metrics"])
                sec.extend(lines)
                continue
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
        if not index.get("verdicts", True):  # a task that only adds arms to another task's comparison
            section_of[task] = len(sections)
            sections.append("\n".join(sec))
            continue
        v: dict[Any, tuple[str, str]] = dict(claim_verdicts(stats))
        v[6] = claim6_verdict(stats, effective)
        ran = set(tables["experiments"])
        for k, exp in CLAIM_EXPERIMENT.items():
            if exp not in ran:
                v[k] = (INCONCLUSIVE, f"{INCONCLUSIVE}: not measured — experiment {exp} was not run for this task.")
        if "D" in ran and tune:
            tuned = claim_verdicts({"A:" + k[2:]: s for k, s in stats.items() if k.startswith("D:")},
                                   baseline=tune["baseline"])
            for k in TUNED_CLAIMS:
                v[f"{k} (tuned)"] = tuned[k]
        verdicts[task] = v
        sec.append("### Verdicts on the earlier claims\n")
        sec.append(f"Metric `{metric}`; a difference smaller than the pooled std over seeds is inconclusive."
                   + (" Claims 1 and 2 are judged twice: at A's one recipe and at each method's own tuned rate "
                      "(D's runs)." if "D" in ran and tune else "") + "\n")
        for k, (verdict, sentence) in v.items():
            num = int(str(k).split()[0])
            at = " at tuned rates" if isinstance(k, str) else ""
            desc = CLAIMS[num].replace("(LoRA r=2)", f"({tune['baseline'].replace('lora', 'LoRA')})") if at else CLAIMS[num]
            sec.append(f"- **Claim {num}{at}** ({desc}) — {sentence}")
        sec.append("")
        sections.append("\n".join(sec))
    for task, i in section_of.items():
        other = indexes[task].get("compare_with")
        if other:
            sections[i] += "\n" + targets_comparison(task, other, tuned_rows, indexes[task]["metric"])
    not_run = _not_run_sections(config, indexes)
    n_missing = sum(len(m) for m in missing_total.values()) + sum(unplanned_total.values())
    ran_exps = sorted({e for i in indexes.values() for e in i.get("experiments", [])})
    head = ["# Reproduction results (TensLoRA / TensLoRA+)\n",
            "Generated by `tenslora repro report` from real runs; do not edit by hand. How to run: "
            "[reproduce.md](reproduce.md).\n",
            f"Scale: {', '.join(scales)}. Tasks: {', '.join(indexes)}"
            + (f" (not run: {', '.join(s.split(' ', 2)[1] for s in not_run)})" if not_run else "")
            + f". Experiments: {', '.join(ran_exps)}"
            + (f" (not run: {', '.join(e for e in EXPERIMENTS if e not in ran_exps)})"
               if len(ran_exps) < len(EXPERIMENTS) else "")
            + ". Every number is the mean ± sample std over "
            "seeds of the **test** metric at the **best-validation** checkpoint (the best step is chosen on "
            "validation only); parameters are trainable parameters (adapter + task head; the adapter alone in "
            "its own column); wall time is per run.\n"]
    if n_missing:
        head.append("**PARTIAL RESULTS.** Not every planned run finished: "
                    + "; ".join(f"{t}: {len(m) + unplanned_total[t]} of {len(indexes[t]['jobs']) + unplanned_total[t]} "
                                "missing" for t, m in missing_total.items() if m or unplanned_total[t])
                    + ". The missing runs are listed at the end. Verdicts below use only the finished runs.\n")
    if note:
        head.append(note.strip() + "\n")
    md = "\n".join(head) + "\n" + "\n".join(sections) + ("\n" + "\n".join(not_run) if not_run else "")
    if n_missing:
        md += "\n## Missing runs\n\n"
        for t, m in missing_total.items():
            if m:
                md += f"- {t}: " + ", ".join(f"`{x}`" for x in m) + "\n"
            if unplanned_total[t]:
                md += f"- {t}: {unplanned_total[t]} phase-2 run(s) not planned yet (D's grid incomplete)\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    return {"markdown": out_md, "plots": plots, "verdicts": verdicts, "missing": missing_total, "runs": len(runs),
            "scales": scales, "partial": bool(n_missing)}


NOTE_FILE = "NOTE.md"
README_START = "<!-- repro-summary: generated by `tenslora repro report --readme`; do not edit by hand -->"
README_END = "<!-- /repro-summary -->"


def _claim_order(key) -> tuple[int, int]:
    return int(str(key).split()[0]), isinstance(key, str)


def _cell(verdict: tuple[str, str] | None) -> str:
    """A verdict, or ``not measured`` where its sentence compared nothing (no runs for either side)."""
    if verdict is None:
        return "-"
    sentence = verdict[1]
    unmeasured = "not measured" in sentence or "no att runs" in sentence or (
        "no finished runs" in sentence and "->" not in sentence)
    return "not measured" if unmeasured else verdict[0]


def readme_summary(result: dict, results_link: str) -> str:
    """The README's results block: one row per claim (and per claim re-judged at tuned rates), one column
    per task, from ``write_report``'s result."""
    verdicts = result["verdicts"]
    tasks = list(verdicts)
    keys = sorted({k for v in verdicts.values() for k in v}, key=_claim_order)
    lines = [README_START,
             f"Verdicts at the {', '.join(result['scales'])} scale ({result['runs']} runs; each: mean over seeds of "
             f"the test metric at the best-validation checkpoint, a difference under the pooled std is "
             f"inconclusive; tables, plots and numbers in [{results_link}]({results_link})"
             + ("; **partial**: some planned runs have not finished" if result["partial"] else "") + "):", "",
             "| claim | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for k in keys:
        num = _claim_order(k)[0]
        label = f"{num}. {CLAIMS[num]}" + (" — at each method's tuned rate" if isinstance(k, str) else "")
        lines.append(f"| {label} | " + " | ".join(_cell(verdicts[t].get(k)) for t in tasks) + " |")
    return "\n".join(lines + [README_END])


def readme_block(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(text, start, end)`` of the summary block of ``path``; an error naming the file if it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--readme {path} not found")
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no results block to replace; add the two lines {README_START!r} and "
                         f"{README_END!r} where the summary goes")
    return text, start, end + len(README_END)


def update_readme(path: str | os.PathLike, summary: str) -> None:
    """Replace the block between the summary markers of ``path`` (atomic)."""
    from tenslora.io import write_text_atomic
    text, start, end = readme_block(path)
    write_text_atomic(path, text[:start] + summary + text[end:])
