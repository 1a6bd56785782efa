"""Planning: the configurations of each task (with their roles in experiments A, B, C) -> ``tenslora
sweep`` mappings and YAML; and the committed generated files (sweeps and the matched-ranks table)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from tenslora.repro.match import format_matches, lora_count, match_ranks, matched_table
from tenslora.repro.spec import (STATIC_EXPERIMENTS, TargetShapes, experiment_config, model_shape_for, scale_tasks,
                                 target_shapes, task_experiments)


def _key(entry: Mapping[str, Any]) -> str:
    return json.dumps(dict(entry), sort_keys=True, default=str)


class Plan:
    """The configurations of one task: option entries (without seed) and their roles."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, list[dict[str, Any]]] = {}

    def add(self, entry: dict[str, Any], role: dict[str, Any]) -> None:
        key = _key(entry)
        self.entries.setdefault(key, dict(entry))
        roles = self.roles.setdefault(key, [])
        if role not in roles:
            roles.append(role)


def tuning(config: dict, task: dict, experiments: Sequence[str], shape) -> dict[str, Any] | None:
    """Experiments D and E of one task, before any run: the learning-rate grid, the configurations
    (``{label: option entry}``) whose rate is tuned, and E's arms. None when neither D nor E is selected.

    D tunes every configuration it lists; E takes the rate tuned for its ``lr_from`` configuration
    (``<construction>/tucker`` by default), which is added to the grid when D does not list it.
    ``tuned_options`` go into every D/E run, ``test_options`` into the reported (phase-2) runs only.
    ``fixed_lrs`` (``{label: rate}``): configurations whose rate is given (tuned elsewhere, e.g. on the same
    method's Q/K/V arm); they have no grid runs and go straight to phase 2 at that rate."""
    exps = task_experiments(task, experiments)
    if "D" not in exps and "E" not in exps:
        return None
    d = experiment_config(config, task, "D")
    budget = int(d.get("budget", 2))
    target = lora_count(shape, budget)
    shapes: dict[str, TargetShapes] = {}

    def entry_of(label: str) -> dict[str, Any]:
        """``lora r=K`` or ``<construction>/<tucker|cp|tt>``, optionally ``@<targets>`` (``qkvo``,
        ``all-linear``: ranks matched to LoRA r=budget on the same modules)."""
        method, _, targets = label.partition("@")
        extra: dict[str, Any] = {"targets": targets} if targets else {}
        if method.startswith("lora r="):
            return {"construction": "lora", "ranks": method[len("lora r="):], **extra}
        c, _, f = method.partition("/")
        if f not in ("tucker", "cp", "tt"):
            raise ValueError(f"configuration {label!r} is not 'lora r=K' or '<construction>/<tucker|cp|tt>', "
                             "optionally followed by '@<targets>'")
        if not targets:
            return {"construction": c, "factorization": f, "ranks": match_ranks(c, f, shape, target).ranks_string}
        if targets not in shapes:
            shapes[targets] = target_shapes(task["base"]["model"], task["kind"], targets)
        on = shapes[targets]
        m = match_ranks(c, f, on.shape, on.lora_per_rank * budget, targets=targets, mlp=on.mlp)
        return {"construction": c, "factorization": f, "ranks": m.ranks_string, **extra}

    labels = [f"lora r={r}" for r in d.get("lora_ranks", [])] + list(d.get("configurations", [])) if "D" in exps else []
    fixed = {str(label): float(lr) for label, lr in (d.get("fixed_lrs") or {}).items()}
    unknown = [label for label in fixed if label not in labels]
    if unknown:
        raise ValueError(f"D's fixed_lrs names {', '.join(map(repr, unknown))}, not among the task's D configurations "
                         f"({', '.join(labels) or 'none'})")
    out: dict[str, Any] = {"lrs": [float(x) for x in d["lrs"]], "grid_seed": int(d.get("grid_seed", 0)),
                           "fixed": fixed, "budget": budget, "baseline": f"lora r={budget}", "tuned": list(labels),
                           "tuned_options": dict(task.get("tuned_options") or {}),
                           "test_options": dict(task.get("test_options") or {}), "layers": None}
    if "E" in exps:
        e = experiment_config(config, task, "E")
        c, f = e.get("construction", "att_qkv_depth"), "tucker"
        lr_from = e.get("lr_from", f"{c}/{f}")
        if lr_from not in labels:
            labels.append(lr_from)
        from tenslora.constructions import get_construction

        modes = list(get_construction(c).mode_names)
        if "layers" not in modes:
            raise ValueError(f"experiment E needs a construction with a layers mode, got {c!r}")
        ranks = list(match_ranks(c, f, shape, target).ranks)
        arms = {}
        for r in e.get("layers_ranks", [4, 2]):
            ranks[modes.index("layers")] = int(r)
            arms[int(r)] = {"construction": c, "factorization": f, "ranks": "_".join(str(x) for x in ranks)}
        out["layers"] = {"construction": c, "lr_from": lr_from, "arms": arms}
    out["configs"] = {label: entry_of(label) for label in labels}
    return out


def plan_task(config: dict, task: dict, experiments: Sequence[str], shape,
              allocation: Mapping[str, Any] | None = None, selection: Mapping[str, Any] | None = None) -> Plan:
    """All configurations of the selected experiments for one task (C needs ``allocation``).

    D and E: the grid runs (phase 1; their entries carry their seed), and, for each configuration in
    ``selection`` (``{label: {"lr": ...}}``, from :mod:`tenslora.repro.select`), its runs at the chosen
    rate (phase 2)."""
    exps = config["experiments"]
    experiments = task_experiments(task, experiments)
    base_lr = float(task["base"].get("lr", 1e-3))
    plan = Plan()
    tune = tuning(config, task, experiments, shape)
    if tune is not None:
        opts, test_opts = tune["tuned_options"], tune["test_options"]
        for label, entry in tune["configs"].items():
            if label in tune["fixed"]:
                continue
            for lr in tune["lrs"]:
                plan.add({**entry, **opts, "lr": lr, "seed": tune["grid_seed"]},
                         {"experiment": "D", "phase": "grid", "label": label, "lr": lr})
        chosen = {label: float(rec["lr"]) for label, rec in (selection or {}).items()}
        chosen.update(tune["fixed"])
        for label in tune["tuned"]:
            if label in chosen:
                plan.add({**tune["configs"][label], **opts, **test_opts, "lr": chosen[label]},
                         {"experiment": "D", "phase": "tuned", "label": label, "lr": chosen[label],
                          "factorization": tune["configs"][label].get("factorization", "lora")})
        layers = tune["layers"]
        if layers is not None and layers["lr_from"] in chosen:
            lr = chosen[layers["lr_from"]]
            for r, entry in layers["arms"].items():
                plan.add({**entry, **opts, **test_opts, "lr": lr},
                         {"experiment": "E", "layers_rank": r, "label": f"layers rank {r}", "lr": lr,
                          "lr_from": layers["lr_from"]})
    if "A" in experiments:
        a = exps["A"]
        target = lora_count(shape, int(a["budget"]))
        for r in a["lora_ranks"]:
            plan.add({"construction": "lora", "ranks": str(r)},
                     {"experiment": "A", "label": f"lora r={r}", "construction": "lora", "factorization": "lora"})
        for c in a["constructions"]:
            for f in a["factorizations"]:
                m = match_ranks(c, f, shape, target)
                plan.add({"construction": c, "factorization": f, "ranks": m.ranks_string},
                         {"experiment": "A", "label": f"{c}/{f}", "construction": c, "factorization": f})
    if "B" in experiments:
        b = exps["B"]
        target = lora_count(shape, int(b["budget"]))
        for c in b["constructions"]:
            m = match_ranks(c, "tucker", shape, target)
            common = {"construction": c, "factorization": "tucker", "ranks": m.ranks_string}
            for lam in b["core_lambda"]:
                entry = dict(common) if float(lam) == 1 else {**common, "core_lambda": float(lam)}
                plan.add(entry, {"experiment": "B", "series": f"{c} core lambda", "construction": c,
                                 "kind": "lambda", "x": float(lam), "label": f"{c} lambda={lam:g}"})
            for mult in b["control_lr_multipliers"]:
                lr = float(f"{base_lr * float(mult):.6g}")
                plan.add({**common, "lr": lr},
                         {"experiment": "B", "series": f"{c} control (lambda 1, lr x m)", "construction": c,
                          "kind": "control", "x": float(mult), "label": f"{c} control lr x{mult:g}"})
        r = int(b["lora_rank"])
        for ratio in b["lora_plus_ratio"]:
            entry = {"construction": "lora", "ranks": str(r)}
            if float(ratio) != 1:
                entry["lora_plus_ratio"] = float(ratio)
            plan.add(entry, {"experiment": "B", "series": f"lora r={r} LoRA+ ratio", "construction": "lora",
                             "kind": "loraplus", "x": float(ratio), "label": f"lora r={r} ratio={ratio:g}"})
    if "C" in experiments:
        c_cfg = exps["C"]
        c = c_cfg["construction"]
        for k in c_cfg["budgets"]:
            target = lora_count(shape, int(k))
            uniform = match_ranks(c, "tucker", shape, target, at_most=True)
            arms = {"uniform": uniform.ranks_string}
            if allocation is not None:
                rec = allocation.get(f"lora:{k}")
                if rec is None:
                    raise ValueError(f"the allocation has no budget lora:{k}")
                arms["auto"] = rec["ranks_string"]
                arms["reverse"] = rec["reverse_ranks_string"]
            for arm, ranks in arms.items():
                plan.add({"construction": c, "factorization": "tucker", "ranks": ranks},
                         {"experiment": "C", "arm": arm, "budget": f"lora:{k}", "budget_parameters": target,
                          "label": f"{arm} @ lora:{k}"})
    return plan


def task_seeds(config: dict, scale: str, task: dict) -> list[int]:
    sc = config["scales"][scale]
    return list(task.get("seeds") or sc.get("seeds") or config.get("seeds") or [0])


def sweep_dict(config: dict, scale: str, task: dict, plan: Plan) -> dict:
    """A ``tenslora sweep`` mapping: explicit runs, seed-major (a partial run has every configuration
    with seed 0 before any with seed 1)."""
    sc = config["scales"][scale]
    seeds = task_seeds(config, scale, task)
    fixed = [dict(e) for e in plan.entries.values() if "seed" in e]  # D's grid: one seed, first
    runs = fixed + [{**entry, "seed": s} for s in seeds for entry in plan.entries.values() if "seed" not in entry]
    out = {"name": f"repro-{scale}-{task['name']}", "command": ["tenslora", "train"],
           "base": {**dict(task["base"]), "progress": False}, "runs": runs}
    for key, value in (sc.get("sweep") or {}).items():
        out[key] = value
    return out


def job_roles(plan: Plan, spec_dict: dict) -> dict[str, list[dict]]:
    """``{job name: roles}`` for the sweep built from ``plan``."""
    from tenslora.sweep.spec import expand, parse_sweep

    spec = parse_sweep(spec_dict, source="repro sweep")
    out = {}
    for job in expand(spec):
        key = _key(job.varied)
        if key not in plan.roles:
            key = _key({k: v for k, v in job.varied.items() if k != "seed"})
        out[job.name] = plan.roles[key]
    return out


def dump_sweep_yaml(spec_dict: dict, header: str = "") -> str:
    import yaml

    body = yaml.safe_dump(spec_dict, sort_keys=False, default_flow_style=None, width=120)
    return (header + "\n" if header else "") + body


GENERATED_HEADER = ("# GENERATED by `python benchmarks/repro/generate.py` from benchmarks/repro/repro.yaml; do not edit.\n"
                    "# Experiments A and B and C's uniform arm. C's `auto` and `reverse` arms are added by\n"
                    "# `tenslora repro run` after its allocation probe (their ranks depend on the probe).\n"
                    "# Runnable on its own: tenslora sweep run {path}")


def generate(config: dict, out_dir: str | os.PathLike, scales: Sequence[str] | None = None) -> list[Path]:
    """Write every scale x task sweep file (no probe) and the matched-ranks table; returns the paths."""
    out = Path(out_dir)
    (out / "sweeps").mkdir(parents=True, exist_ok=True)
    written = []
    tables = []
    exps = config["experiments"]
    for scale in scales or list(config["scales"]):
        for task in scale_tasks(config, scale):
            shape = model_shape_for(task["base"]["model"])
            plan = plan_task(config, task, STATIC_EXPERIMENTS, shape, allocation=None)
            if not plan.entries:  # a task of D/E only (their runs depend on a selection)
                continue
            spec = sweep_dict(config, scale, task, plan)
            path = out / "sweeps" / f"{scale}-{task['name']}.yaml"
            rel = f"benchmarks/repro/sweeps/{path.name}"
            path.write_text(dump_sweep_yaml(spec, GENERATED_HEADER.format(path=rel)))
            written.append(path)
            model = task["base"]["model"]
            if any(t[0] == model for t in tables):
                continue
            a = exps["A"]
            matches = matched_table(shape, int(a["budget"]), a["constructions"], a["factorizations"])
            c_cfg = exps["C"]
            uniform = [match_ranks(c_cfg["construction"], "tucker", shape, lora_count(shape, int(k)), at_most=True)
                       for k in c_cfg["budgets"]]
            tables.append((model, shape, matches, uniform))
    lines = ["# Ranks matched to PEFT LoRA's parameter count (generated by benchmarks/repro/generate.py)\n",
             "Tucker: among rank vectors within 2% of the target (or the closest achievable), the most "
             "balanced (closest to min(R, mode size) for a common R); CP: the closest rank. Counts from "
             "`tenslora.params.predict_adapter_parameters` (adapter only, task head excluded).\n"]
    for model, shape, matches, uniform in tables:
        lines.append(f"## {model} (d={shape.d_in}, heads={shape.d_out[0] // shape.head_dim}, "
                     f"layers={len(shape.layers)})\n")
        lines.append(f"LoRA r=1: {lora_count(shape, 1):,}; r=2: {lora_count(shape, 2):,}; "
                     f"r=8: {lora_count(shape, 8):,} parameters.\n")
        lines.append(format_matches(matches, "Experiment A (and B): matched to LoRA r=2\n") + "\n")
        lines.append(format_matches(uniform, "Experiment C, uniform arm (at most the budget)\n") + "\n")
    md = out / "matched_ranks.md"
    md.write_text("\n".join(lines))
    written.append(md)
    return written
