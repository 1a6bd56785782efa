"""Reproduce the TensLoRA / TensLoRA+ claims: seeds, controls, one report (issue 7).

``benchmarks/repro/repro.yaml`` describes the three experiments and the scales (``cpu``: MiniLM on
tweets and DINOv2-small on Fashion-MNIST, sized for about 3 hours on 2 cores; ``paper``: RoBERTa-base
on CoLA/MRPC and ViT-base on EuroSAT/DTD with the paper's settings). This module turns it into one
sweep per task (``tenslora.sweep`` format: every job is a ``tenslora train`` run), runs the sweeps
through the local scheduler (resumable), and writes ``docs/results.md`` from the sweep aggregation
(:func:`tenslora.sweep.report.aggregate`) with a verdict per claim.

* A — constructions at equal parameters: PEFT LoRA r=2 and r=8; every construction x {Tucker, CP}
  with ranks matched to LoRA r=2 (:func:`match_ranks`).
* B — heterogeneous learning rate: core lambda in {1, 4, 8, 16} and the uniform-lr controls (lambda 1,
  whole-adapter lr x m); LoRA+ ratios for PEFT LoRA.
* C — rank allocation: uniform vs the allocator's choice vs its reverse, at two budgets. The allocation
  needs a probe run (:func:`tenslora.train.probe.allocate`, the rule behind ``--ranks auto``); it runs
  once per task (seed 0) before the sweep and its ranks are written into the sweep as explicit ranks.

Jobs that several experiments share (A's matched Tucker run is B's lambda = 1 and, when the ranks agree,
C's uniform arm) run once: one sweep per task, duplicates removed. Each job's roles (which experiment,
which arm) are stored in ``<dir>/<task>/repro_index.json`` and copied by ``collect``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "benchmarks" / "repro" / "repro.yaml"
RANKS_FILE = "matched_ranks.json"
INDEX_FILE = "repro_index.json"
ALLOCATION_DIR = "allocation"
EXPERIMENTS = ("A", "B", "C")
TASK_KINDS = ("text", "vision")
MATCH_TOL = 0.02

# Shapes of the models the repro files name (Q, K, V of equal width), so that ranks can be matched
# without the hub; other models are read from their config (local directory or cache).
KNOWN_SHAPES = {  # hidden, heads, layers
    "minilm": (384, 12, 6),
    "dinov2-small": (384, 6, 12),
    "roberta-base": (768, 12, 12),
    "google/vit-base-patch16-224-in21k": (768, 12, 12),
}


# ---------------------------------------------------------------------------------------------------
# shapes and rank matching
def make_shape(hidden: int, heads: int, layers: int):
    from tenslora.targets import ModelShape

    return ModelShape(projections=("query", "key", "value"), layers=tuple(range(layers)), d_in=hidden,
                      d_out=(hidden,) * 3, head_dim=hidden // heads)


def model_shape_for(model: str):
    """The adapted-projection shape of ``model`` (a short name, hub id or local directory)."""
    if model in KNOWN_SHAPES:
        return make_shape(*KNOWN_SHAPES[model])
    from tenslora.train.probe import shape_from_config
    from tenslora.train.modeling import load_model_config, resolve_model_name

    shape = shape_from_config(load_model_config(resolve_model_name(model)))
    if shape is None:
        raise ValueError(f"cannot tell the Q/K/V shape of {model!r}; add it to tenslora.repro.KNOWN_SHAPES")
    return shape


def imbalance(ranks: Sequence[int], sizes: Sequence[int]) -> float:
    """Distance of ``ranks`` from the capped-uniform family ``min(R, d_m)``: ``min_R max_m |ln r_m - ln min(R, d_m)|``.

    0 for ``(8, 8, 8, 3, 8)`` on sizes ``(768, 64, 12, 3, 12)``; large when one mode gets most of the rank.
    The optimum over R is at one of the ranks or at the geometric mean of two of them.
    """
    lr = [math.log(r) for r in ranks]
    ld = [math.log(d) for d in sizes]
    cands = set(lr)
    cands.update((a + b) / 2 for a, b in itertools.combinations(sorted(set(lr)), 2))
    best = math.inf
    for big in cands:
        dev = max(abs(r - (big if big < d else d)) for r, d in zip(lr, ld))
        if dev < best:
            best = dev
    return best


@dataclass(frozen=True)
class Match:
    construction: str
    factorization: str
    ranks: tuple[int, ...]
    parameters: int
    target: int

    @property
    def ranks_string(self) -> str:
        return "_".join(str(r) for r in self.ranks)

    @property
    def ratio(self) -> float:
        return self.parameters / self.target


def _tucker_counts(layout: dict[str, dict[str, int]], grids: list) -> Any:
    """Vectorised Tucker parameter counts for rank grids (one numpy array per mode, broadcastable)."""
    import numpy as np

    total = 0
    for sizes in layout.values():
        ds = list(sizes.values())
        total = total + sum(g * d for g, d in zip(grids, ds)) + np.prod(np.broadcast_arrays(*grids), axis=0)
    return total


def match_ranks(construction: str, factorization: str, shape, target: int, *, tol: float = MATCH_TOL,
                at_most: bool = False) -> Match:
    """Ranks whose adapter has about ``target`` parameters, preferring balanced ranks.

    CP: the rank with the closest count. Tucker: every rank vector (each rank between 1 and its mode
    size, and no rank above the product of the others, which would add parameters and no capacity) is
    scored; among those within ``max(tol, best gap)`` of the target (relative), the most balanced one
    (smallest :func:`imbalance`) wins, ties by the smaller gap, then by the smaller count. ``at_most``:
    only counts <= target. The count is checked with :func:`tenslora.params.predict_adapter_parameters`.
    """
    import numpy as np

    from tenslora.config import TensLoRAConfig
    from tenslora.constructions import get_construction
    from tenslora.layout import tensor_layout
    from tenslora.params import predict_adapter_parameters

    layout = tensor_layout(get_construction(construction), shape)
    modes = list(next(iter(layout.values())))
    sizes = [min(s[m] for s in layout.values()) for m in modes]
    n_tensors = len(layout)

    def count(ranks) -> int:
        cfg = TensLoRAConfig(construction=construction, factorization=factorization,
                             ranks=tuple(int(r) for r in ranks) if factorization == "tucker" else int(ranks[0]))
        return predict_adapter_parameters(cfg, shape)

    if factorization == "cp":
        per_rank = count([1])
        best = None
        for r in range(1, max(2, int(target * (1 + tol) / per_rank) + 2)):
            n = per_rank * r
            if at_most and n > target:
                break
            key = abs(n - target)
            if best is None or key < best[0]:
                best = (key, r, n)
        if best is None:
            raise ValueError(f"no CP rank of {construction} fits {target:,} parameters")
        r, n = best[1], best[2]
        assert count([r]) == n
        return Match(construction, "cp", (r,), n, target)
    if factorization != "tucker":
        raise ValueError(f"factorization must be tucker or cp, got {factorization!r}")
    limit = target * (1 + max(tol, 0.5))
    axes = []
    for i, d in enumerate(sizes):
        # r_i * d_i * n_tensors alone must fit (with the other ranks at 1)
        others = sum(sizes) - d
        cap = int((limit - n_tensors * others) // max(1, n_tensors * (d + 1))) + 1
        axes.append(np.arange(1, max(1, min(d, cap)) + 1, dtype=np.int64))
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    counts = np.asarray(_tucker_counts(layout, grids), dtype=np.float64)
    full = np.broadcast_arrays(*grids)
    prod_all = np.prod(full, axis=0)
    useful = np.ones(counts.shape, dtype=bool)
    for g in full:  # r_m <= product of the other ranks
        useful &= g * g <= prod_all
    gap = np.abs(counts - target) / target
    ok = useful & ((counts <= target) if at_most else True)
    if not ok.any():
        raise ValueError(f"no Tucker ranks of {construction} fit {target:,} parameters")
    best_gap = float(gap[ok].min())
    accept = ok & (gap <= max(tol, best_gap) + 1e-12)
    idx = np.argwhere(accept)
    scored = []
    for ix in idx:
        ranks = tuple(int(axes[i][j]) for i, j in enumerate(ix))
        n = int(counts[tuple(ix)])
        scored.append((round(imbalance(ranks, sizes), 9), abs(n - target), n, ranks))
    scored.sort()
    _, _, n, ranks = scored[0]
    checked = count(ranks)
    assert checked == n, (construction, ranks, checked, n)
    return Match(construction, "tucker", ranks, n, target)


def lora_count(shape, rank: int) -> int:
    from tenslora.params import lora_parameters

    return lora_parameters(shape, rank)


def matched_table(shape, budget_rank: int, constructions: Sequence[str], factorizations: Sequence[str],
                  at_most: bool = False) -> list[Match]:
    target = lora_count(shape, budget_rank)
    return [match_ranks(c, f, shape, target, at_most=at_most) for c in constructions for f in factorizations]


def format_matches(matches: Sequence[Match], title: str = "") -> str:
    lines = [title] if title else []
    lines.append("| construction | factorization | ranks | parameters | vs target |")
    lines.append("|---|---|---|---:|---:|")
    for m in matches:
        lines.append(f"| {m.construction} | {m.factorization} | {m.ranks_string} | {m.parameters:,} | "
                     f"{m.ratio:.3f} ({m.target:,}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the repro file -> sweeps
def load_config(path: str | os.PathLike | None = None) -> dict:
    import yaml

    p = Path(path) if path is not None else DEFAULT_CONFIG
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or "scales" not in data or "experiments" not in data:
        raise ValueError(f"{p}: a repro file needs 'scales' and 'experiments'")
    return data


def scale_tasks(config: dict, scale: str, kinds: Iterable[str] = TASK_KINDS) -> list[dict]:
    scales = config["scales"]
    if scale not in scales:
        raise ValueError(f"unknown scale {scale!r}; the repro file has {', '.join(scales)}")
    out = []
    kinds = list(kinds)
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; allowed: {', '.join(TASK_KINDS)}")
        for task in scales[scale]["tasks"].get(kind) or []:
            out.append({**task, "kind": kind})
    return out


def parse_list(text: str | Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(allowed)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what} {bad[0] if bad else text!r} is not allowed; allowed: {', '.join(allowed)}")
    return items


def _fmt_ranks(ranks: Sequence[int] | int) -> str:
    return "_".join(str(r) for r in ranks) if isinstance(ranks, (list, tuple)) else str(ranks)


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


def plan_task(config: dict, task: dict, experiments: Sequence[str], shape,
              allocation: Mapping[str, Any] | None = None) -> Plan:
    """All configurations of the selected experiments for one task (C needs ``allocation``)."""
    exps = config["experiments"]
    base_lr = float(task["base"].get("lr", 1e-3))
    plan = Plan()
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


def sweep_dict(config: dict, scale: str, task: dict, plan: Plan) -> dict:
    """A ``tenslora sweep`` mapping: explicit runs, seed-major (a partial run has every configuration
    with seed 0 before any with seed 1)."""
    sc = config["scales"][scale]
    seeds = list(task.get("seeds") or sc.get("seeds") or config.get("seeds") or [0])
    runs = [{**entry, "seed": s} for s in seeds for entry in plan.entries.values()]
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
        entry = {k: v for k, v in job.varied.items() if k != "seed"}
        out[job.name] = plan.roles[_key(entry)]
    return out


def dump_sweep_yaml(spec_dict: dict, header: str = "") -> str:
    import yaml

    body = yaml.safe_dump(spec_dict, sort_keys=False, default_flow_style=None, width=120)
    return (header + "\n" if header else "") + body


# ---------------------------------------------------------------------------------------------------
# allocation (experiment C's probe)
def run_allocation(config: dict, scale: str, task: dict, out_dir: Path, shape) -> dict:
    """Probe once (seed 0) and choose ranks for every budget of C, forward and reverse; cached in
    ``out_dir/allocation.json`` (a finished probe is never rerun)."""
    from tenslora.plus.allocate import allocate_from_metrics
    from tenslora.train.probe import allocate

    path = out_dir / "allocation.json"
    c_cfg = config["experiments"]["C"]
    budgets = [f"lora:{k}" for k in c_cfg["budgets"]]
    if path.exists():
        record = json.loads(path.read_text())
    else:
        from tenslora.train.config import TrainConfig

        probe = config["scales"][scale].get("probe") or {}
        base = {k: v for k, v in task["base"].items()}
        base.update({"construction": c_cfg["construction"], "factorization": "tucker", "seed": 0,
                     "progress": False})
        cfg = TrainConfig(**base)
        record = allocate(cfg, budgets[0], floor=int(c_cfg.get("floor", 2)),
                          probe_steps=int(probe.get("steps", 100)), probe_rank=int(probe.get("rank", 8)),
                          output_dir=out_dir)
    out = {}
    for b in budgets:
        fwd = allocate_from_metrics(record["metrics"], c_cfg["construction"], shape, b,
                                    floor=int(c_cfg.get("floor", 2)))
        rev = allocate_from_metrics(record["metrics"], c_cfg["construction"], shape, b,
                                    floor=int(c_cfg.get("floor", 2)), reverse=True)
        out[b] = {"ranks": fwd["ranks"], "ranks_string": fwd["ranks_string"],
                  "parameters": fwd["predicted_parameters"], "reverse_ranks": rev["ranks"],
                  "reverse_ranks_string": rev["ranks_string"], "reverse_parameters": rev["predicted_parameters"],
                  "budget": fwd["budget"], "targets_effective_rank": fwd["targets_effective_rank"]}
    return out


# ---------------------------------------------------------------------------------------------------
# the driver
def task_dir(root: Path, task: dict) -> Path:
    return Path(root) / task["name"]


def prepare(config: dict, scale: str, experiments: Sequence[str], kinds: Sequence[str], root: Path,
            run_probe: bool = True) -> list[dict]:
    """Build (and write) each task's sweep file and job index under ``root/<task>/``."""
    prepared = []
    for task in scale_tasks(config, scale, kinds):
        tdir = task_dir(root, task)
        tdir.mkdir(parents=True, exist_ok=True)
        shape = model_shape_for(task["base"]["model"])
        allocation = None
        if "C" in experiments and run_probe:
            allocation = run_allocation(config, scale, task, tdir / ALLOCATION_DIR, shape)
        plan = plan_task(config, task, experiments, shape, allocation)
        spec = sweep_dict(config, scale, task, plan)
        sweep_file = tdir / "sweep.yaml"
        sweep_file.write_text(dump_sweep_yaml(spec, f"# generated by tenslora repro run --scale {scale}"))
        roles = job_roles(plan, spec)
        index = {"scale": scale, "task": task["name"], "kind": task["kind"], "metric": task["metric"],
                 "metrics": task.get("metrics") or [task["metric"]], "base": spec["base"],
                 "experiments": list(experiments), "allocation": allocation, "jobs": roles,
                 "claims_config": config["experiments"]}
        _merge_index(tdir / INDEX_FILE, index)
        prepared.append({"task": task, "dir": tdir, "sweep_file": sweep_file, "spec": spec, "index": index})
    return prepared


def _merge_index(path: Path, index: dict) -> None:
    """A later ``run`` with other experiments adds its jobs to the index (roles are merged)."""
    if path.exists():
        old = json.loads(path.read_text())
        jobs = old.get("jobs", {})
        for name, roles in index["jobs"].items():
            merged = jobs.setdefault(name, [])
            for r in roles:
                if r not in merged:
                    merged.append(r)
        index = {**index, "jobs": jobs,
                 "experiments": sorted(set(old.get("experiments", [])) | set(index["experiments"])),
                 "allocation": index["allocation"] or old.get("allocation")}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, default=str))
    os.replace(tmp, path)


def run(config: dict, scale: str, experiments: Sequence[str], kinds: Sequence[str], root: Path, *,
        slots: int | None = None, console: Any = None, dry_run: bool = False) -> dict[str, dict[str, int]]:
    """Prepare and run every task's sweep (each resumable: done jobs are skipped)."""
    from tenslora.sweep.local import LocalScheduler
    from tenslora.sweep.spec import expand, parse_sweep

    prepared = prepare(config, scale, experiments, kinds, Path(root), run_probe=not dry_run)
    out = {}
    for item in prepared:
        spec = parse_sweep(item["spec"], source=str(item["sweep_file"]))
        jobs = expand(spec)
        if dry_run:
            out[item["task"]["name"]] = {"jobs": len(jobs)}
            continue
        sweep_root = item["dir"] / "sweep"
        meta = {"settings": spec.settings(), "spec_file": str(item["sweep_file"].resolve()), "name": spec.name}
        cpu = scale != "paper"
        n_slots = slots or config["scales"][scale].get("slots")
        scheduler = LocalScheduler(sweep_root, slots=n_slots, cpu=cpu, console=console)
        out[item["task"]["name"]] = scheduler.run(jobs, spec.settings(), meta=meta)
    return out


# ---------------------------------------------------------------------------------------------------
# collecting and loading results
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
            out.append({"task": index["task"], "name": row["name"], "options": row["options"],
                        "summary": row["summary"], "config": run_config,
                        "roles": index["jobs"].get(row["name"], [])})
    return out


def _indexes_from_dir(root: Path) -> dict[str, dict]:
    indexes = [json.loads(p.read_text()) for p in sorted(Path(root).glob(f"*/{INDEX_FILE}"))]
    return {index["task"]: index for index in indexes}


def collect(root: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy each done run (options, roles, summary, resolved config) to ``dest/<task>/<run>.json`` and
    each task's index (expected jobs, allocation) to ``dest/<task>/_index.json``."""
    root, dest = Path(root), Path(dest)
    written = []
    for task, index in _indexes_from_dir(root).items():
        (dest / task).mkdir(parents=True, exist_ok=True)
        p = dest / task / "_index.json"
        p.write_text(json.dumps(index, indent=1, default=str) + "\n")
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


# ---------------------------------------------------------------------------------------------------
# statistics and verdicts
@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None
    n: int

    def fmt(self, digits: int = 4) -> str:
        s = f"{self.mean:.{digits}f}"
        return s + (f" ± {self.std:.{digits}f}" if self.std is not None else "") + f" (n={self.n})"


HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


def pooled_std(a: Stat, b: Stat) -> float | None:
    if a.std is None or b.std is None or a.n < 2 or b.n < 2:
        return None
    return math.sqrt(((a.n - 1) * a.std ** 2 + (b.n - 1) * b.std ** 2) / (a.n + b.n - 2))


def compare(a: Stat | None, b: Stat | None) -> tuple[str, float | None, float | None]:
    """Is ``a`` above ``b``? ``held`` if ``a - b >= pooled std``, ``did not hold`` if ``b - a >= pooled
    std``, else (or with fewer than two seeds on a side) ``inconclusive``. Returns (verdict, diff, pooled)."""
    if a is None or b is None:
        return INCONCLUSIVE, None, None
    diff = a.mean - b.mean
    pooled = pooled_std(a, b)
    if pooled is None:
        return INCONCLUSIVE, diff, None
    if pooled == 0:
        verdict = HELD if diff > 0 else NOT_HELD if diff < 0 else INCONCLUSIVE
        return verdict, diff, pooled
    if diff >= pooled:
        return HELD, diff, pooled
    if -diff >= pooled:
        return NOT_HELD, diff, pooled
    return INCONCLUSIVE, diff, pooled


def combine_all(verdicts: Sequence[str]) -> str:
    """A conjunction: held if every part held, did not hold if any part did not hold, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if any(v == NOT_HELD for v in verdicts):
        return NOT_HELD
    if all(v == HELD for v in verdicts):
        return HELD
    return INCONCLUSIVE


def _cmp_text(name_a: str, a: Stat | None, name_b: str, b: Stat | None) -> str:
    verdict, diff, pooled = compare(a, b)
    if a is None or b is None:
        missing = name_a if a is None else name_b
        return f"{missing} has no finished runs"
    p = "n/a (fewer than 2 seeds)" if pooled is None else f"{pooled:.4f}"
    return f"{name_a} {a.fmt()} vs {name_b} {b.fmt()}: difference {diff:+.4f}, pooled std {p} -> {verdict}"


CLAIM_EXPERIMENT = {1: "A", 2: "A", 3: "B", 4: "B", 5: "C"}
CLAIMS = {
    1: "qkv_depth and att_qkv_depth (Tucker) beat PEFT LoRA at equal parameters (LoRA r=2)",
    2: "the heads mode (att) is the least useful construction",
    3: "a larger core lambda improves the metric (lambda 16 > lambda 1) and beats the uniform-lr controls",
    4: "a LoRA+ ratio > 1 helps LoRA",
    5: "rank allocation by metrics beats uniform ranks and its reverse at equal budget",
}


def claim_verdicts(stats: Mapping[str, Stat], claims_config: Mapping[str, Any] | None = None) -> dict[int, tuple[str, str]]:
    """``{claim: (verdict, sentence)}`` from per-configuration statistics of one task and metric.

    ``stats`` keys: ``A:lora r=2``, ``A:<construction>/<tucker|cp>``, ``B:lambda:<c>:<lambda>``,
    ``B:control:<c>:<mult>``, ``B:loraplus:<ratio>``, ``C:<arm>:lora:<k>``. Missing keys make the
    affected comparisons inconclusive.
    """
    g = stats.get
    out: dict[int, tuple[str, str]] = {}
    # 1
    parts, texts = [], []
    for c in ("qkv_depth", "att_qkv_depth"):
        v, _, _ = compare(g(f"A:{c}/tucker"), g("A:lora r=2"))
        parts.append(v)
        texts.append(_cmp_text(f"{c}/tucker", g(f"A:{c}/tucker"), "LoRA r=2", g("A:lora r=2")))
    v = combine_all(parts)
    out[1] = (v, f"{v}: " + "; ".join(texts) + ".")
    # 2
    parts, texts = [], []
    for f in ("tucker", "cp"):
        att = g(f"A:att/{f}")
        others = sorted(k for k in stats if k.startswith("A:") and k.endswith(f"/{f}") and k != f"A:att/{f}")
        if att is None or not others:
            continue
        for k in others:
            v, _, _ = compare(stats[k], att)
            parts.append(v)
        worst_other = min(others, key=lambda k: stats[k].mean)
        texts.append(f"{f}: att {att.fmt()}, lowest other {worst_other[2:]} {stats[worst_other].fmt()}; "
                     f"att below every other by at least the pooled std in "
                     f"{sum(1 for k in others if compare(stats[k], att)[0] == HELD)}/{len(others)}, "
                     f"above by at least the pooled std in "
                     f"{sum(1 for k in others if compare(stats[k], att)[0] == NOT_HELD)}/{len(others)}")
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[2] = (v, f"{v}: " + ("; ".join(texts) if texts else "no att runs or no other constructions") + ".")
    # 3
    parts, texts = [], []
    constructions = sorted({k.split(":")[2] for k in stats if k.startswith("B:lambda:")})
    for c in constructions:
        lam16, lam1 = g(f"B:lambda:{c}:16"), g(f"B:lambda:{c}:1")
        controls = {k: s for k, s in stats.items() if k.startswith(f"B:control:{c}:")}
        best_ctrl_key = max(controls, key=lambda k: controls[k].mean) if controls else None
        best_ctrl = controls.get(best_ctrl_key) if best_ctrl_key else None
        v1, _, _ = compare(lam16, lam1)
        v2, _, _ = compare(lam16, best_ctrl)
        parts += [v1, v2]
        ctrl_name = f"best control (lr x{best_ctrl_key.rsplit(':', 1)[1]})" if best_ctrl_key else "control"
        texts.append(f"{c}: " + _cmp_text("lambda 16", lam16, "lambda 1", lam1) + "; "
                     + _cmp_text("lambda 16", lam16, ctrl_name, best_ctrl))
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[3] = (v, f"{v}: " + ("; ".join(texts) if texts else "no lambda runs") + ".")
    # 4
    ratios = {float(k.split(":")[2]): s for k, s in stats.items() if k.startswith("B:loraplus:")}
    base = ratios.get(1.0)
    above = {r: s for r, s in ratios.items() if r > 1}
    if base is not None and above:
        best_r = max(above, key=lambda r: above[r].mean)
        v, _, _ = compare(above[best_r], base)
        text = _cmp_text(f"ratio {best_r:g} (best of {', '.join(f'{r:g}' for r in sorted(above))})",
                         above[best_r], "ratio 1", base)
    else:
        v, text = INCONCLUSIVE, "no LoRA+ runs"
    out[4] = (v, f"{v}: {text}.")
    # 5
    parts, texts = [], []
    budgets = sorted({k.split(":", 2)[2] for k in stats if k.startswith("C:auto:")})
    for b in budgets:
        auto, uni, rev = g(f"C:auto:{b}"), g(f"C:uniform:{b}"), g(f"C:reverse:{b}")
        parts += [compare(auto, uni)[0], compare(auto, rev)[0]]
        texts.append(f"{b}: " + _cmp_text("auto", auto, "uniform", uni) + "; " + _cmp_text("auto", auto, "reverse", rev))
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[5] = (v, f"{v}: " + ("; ".join(texts) if texts else "no allocation runs") + ".")
    return out


# ---------------------------------------------------------------------------------------------------
# the report
def _stat(group, metric: str) -> Stat | None:
    m = group.mean(metric)
    return None if m is None else Stat(m, group.std(metric), len(group.values.get(metric) or []))


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
                 *(_fmt_pm(_stat(g, m)) for m in metrics),
                 "-" if g.trainable_parameters is None else f"{g.trainable_parameters:,.0f}",
                 "-" if adapter is None else f"{adapter:,.0f}",
                 "-" if g.wall_time_s is None else f"{g.wall_time_s:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _adapter_params(runs_by_name: dict, group) -> float | None:
    vals = [runs_by_name[n]["summary"].get("adapter_parameters") for n in group.jobs
            if isinstance(runs_by_name[n]["summary"].get("adapter_parameters"), (int, float))]
    return statistics.fmean(vals) if vals else None


def _figure(size: tuple[float, float]):
    """A new (figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=size)


def _save(fig, ax, path: Path, *, ylabel: str, title: str, grid_axis: str = "both") -> Path:
    """Y label, title, grid, legend, tight layout; PNG at ``path``, figure closed."""
    import matplotlib.pyplot as plt
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_a(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    fig, ax = _figure((7.5, 4.8))
    series = {"lora": ("PEFT LoRA", "s"), "tucker": ("Tucker", "o"), "cp": ("CP", "^")}
    for fac, (label, marker) in series.items():
        pts = [(e["group"].trainable_parameters, _stat(e["group"], metric), e["role"]) for e in entries
               if e["role"]["factorization"] == fac and _stat(e["group"], metric) is not None
               and e["group"].trainable_parameters is not None]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0 for p in pts], fmt=marker,
                    capsize=3, label=label)
        for x, s, role in pts:
            ax.annotate(role["construction"] if fac != "lora" else role["label"], (x, s.mean), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head)")
    return _save(fig, ax, path, ylabel=f"{metric} (best-validation checkpoint; mean ± std over seeds)",
                 title=f"A: constructions at equal parameters — {task}")


def _plot_b(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    fig, ax = _figure((7.5, 4.8))
    series: dict[str, list] = {}
    for e in entries:
        s = _stat(e["group"], metric)
        if s is None:
            continue
        series.setdefault(e["role"]["series"], []).append((e["role"]["x"], s))
    # lambda = 1 is also the control at multiplier 1: draw it on the control series as its start
    for name in list(series):
        if name.endswith("core lambda"):
            c = name[: -len(" core lambda")]
            ctrl = f"{c} control (lambda 1, lr x m)"
            base = [p for p in series[name] if p[0] == 1.0]
            if ctrl in series and base:
                series[ctrl] = series[ctrl] + base
    for name, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        style = "o--" if "control" in name else "s:" if "LoRA+" in name else "o-"
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0 for p in pts], fmt=style,
                    capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("core lambda  |  controls: whole-adapter lr multiplier  |  LoRA+: B/A lr ratio")
    return _save(fig, ax, path, ylabel=f"{metric} (mean ± std over seeds)",
                 title=f"B: heterogeneous learning rate vs uniform-lr controls — {task}")


def _plot_c(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    arms = ["uniform", "auto", "reverse"]
    budgets = sorted({e["role"]["budget"] for e in entries}, key=lambda b: int(b.split(":")[1]))
    fig, ax = _figure((7, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for j, b in enumerate(budgets):
            e = next((e for e in entries if e["role"]["arm"] == arm and e["role"]["budget"] == b), None)
            s = _stat(e["group"], metric) if e else None
            if s is None:
                continue
            xs.append(j + (i - 1) * width)
            ys.append(s.mean)
            es.append(s.std or 0)
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=arm)
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels([f"budget {b}" for b in budgets])
    ys_all = [_stat(e["group"], metric).mean for e in entries if _stat(e["group"], metric) is not None]
    if ys_all:
        lo, hi = min(ys_all), max(ys_all)
        pad = max(0.02, (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    return _save(fig, ax, path, ylabel=f"{metric} (mean ± std over seeds)",
                 title=f"C: rank allocation (att_qkv_depth Tucker) — {task}", grid_axis="y")


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
                s = _stat(e["group"], metric)
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
                {"A": _plot_a, "B": _plot_b, "C": _plot_c}[exp](task, metric, order, p)
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


# ---------------------------------------------------------------------------------------------------
# the committed, generated files: benchmarks/repro/sweeps/<scale>-<task>.yaml and matched_ranks.md
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
            plan = plan_task(config, task, EXPERIMENTS, shape, allocation=None)
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
