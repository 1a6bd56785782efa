"""tenslora repro: rank matching, verdict logic, generated files, and a miniature A+B+C run end to end."""
import copy
import json
import math
from pathlib import Path

import pytest

from tenslora.repro.collect import collect
from tenslora.repro.match import imbalance, lora_count, match_ranks
from tenslora.repro.plan import generate, job_roles, plan_task, sweep_dict
from tenslora.repro.report import EXP_TITLES, README_END, README_START, readme_summary, update_readme, write_report
from tenslora.repro.run import run
from tenslora.repro.spec import (INDEX_FILE, REPO_ROOT, load_config, make_shape, model_shape_for, scale_tasks)
from tenslora.repro.spec import STATIC_EXPERIMENTS as EXPERIMENTS  # A, B, C (D and E: test_repro_lrgrid.py)
from tenslora.repro.verdicts import (CLAIMS, HELD, INCONCLUSIVE, NOT_HELD, Stat, claim_verdicts, combine_all, compare,
                                     pooled_std)


# -- rank matching -----------------------------------------------------------------------------------
def test_match_ranks_counts_are_exact_and_close():
    from tenslora.config import TensLoRAConfig
    from tenslora.constructions import CONSTRUCTIONS
    from tenslora.params import predict_adapter_parameters

    shape = make_shape(384, 12, 6)  # MiniLM
    target = lora_count(shape, 2)
    assert target == 2 * (384 + 384) * 3 * 6 == 27648
    for c in CONSTRUCTIONS:
        for f in ("tucker", "cp"):
            m = match_ranks(c, f, shape, target)
            ranks = m.ranks if f == "tucker" else m.ranks[0]
            assert predict_adapter_parameters(TensLoRAConfig(construction=c, factorization=f, ranks=ranks),
                                              shape) == m.parameters
            if f == "cp":  # the closest CP rank: its neighbours are not closer
                per = m.parameters // m.ranks[0]
                assert abs(m.parameters - target) <= min(abs(per * (m.ranks[0] + d) - target) for d in (-1, 1))
            else:
                assert abs(m.ratio - 1) <= 0.02


def test_match_ranks_tensor_train_is_the_closest_uniform_bond_rank():
    """TT: one bond rank, capped per bond; the real adapted model has the predicted count, and the
    neighbouring uniform ranks are not closer to the target."""
    from tenslora.config import TensLoRAConfig
    from tenslora.constructions import CONSTRUCTIONS
    from tenslora.layout import capped_config
    from tenslora.params import predict_adapter_parameters

    shape = make_shape(384, 12, 6)
    target = lora_count(shape, 2)
    for c in CONSTRUCTIONS:
        m = match_ranks(c, "tt", shape, target)
        assert predict_adapter_parameters(TensLoRAConfig(construction=c, factorization="tt", ranks=m.ranks),
                                          shape) == m.parameters
        r = max(m.ranks)
        for other in (r - 1, r + 1):
            if other >= 1:
                cfg = capped_config(TensLoRAConfig(construction=c, factorization="tt", ranks=other), shape)
                assert abs(m.parameters - target) <= abs(predict_adapter_parameters(cfg, shape) - target)
        under = match_ranks(c, "tt", shape, target, at_most=True)
        assert under.parameters <= target


def test_match_ranks_prefers_balanced_and_known_values():
    shape = make_shape(768, 12, 12)  # RoBERTa-base / ViT-base
    m = match_ranks("qkv_depth", "tucker", shape, lora_count(shape, 2))
    assert m.ranks == (38, 38, 3, 12)  # input = output, the small modes at full size
    m = match_ranks("att_qkv_depth", "tucker", shape, lora_count(shape, 2))
    assert m.ranks == (15, 15, 12, 3, 12) and abs(m.ratio - 1) < 0.02
    m = match_ranks("att_qkv_depth", "tucker", shape, lora_count(shape, 1), at_most=True)
    assert m.parameters <= lora_count(shape, 1)
    # the imbalance measure: 0 on the capped-uniform family, larger when one mode dominates
    assert imbalance((8, 8, 8, 3, 8), (768, 64, 12, 3, 12)) == 0
    assert imbalance((2, 32, 12), (384, 32, 12)) > imbalance((3, 6, 6), (384, 32, 12))
    assert math.isclose(imbalance((3, 6, 6), (384, 32, 12)), math.log(2) / 2)


# -- verdicts ----------------------------------------------------------------------------------------
def test_compare_uses_pooled_std():
    assert pooled_std(Stat(0.5, 0.03, 3), Stat(0.4, 0.04, 3)) == pytest.approx(math.sqrt(0.00125))
    assert compare(Stat(0.60, 0.01, 3), Stat(0.50, 0.01, 3))[0] == HELD
    assert compare(Stat(0.50, 0.01, 3), Stat(0.60, 0.01, 3))[0] == NOT_HELD
    assert compare(Stat(0.51, 0.05, 3), Stat(0.50, 0.05, 3))[0] == INCONCLUSIVE
    assert compare(Stat(0.9, None, 1), Stat(0.1, None, 1))[0] == INCONCLUSIVE  # one seed: no std
    assert compare(None, Stat(0.1, 0.01, 3))[0] == INCONCLUSIVE
    assert combine_all([HELD, HELD]) == HELD
    assert combine_all([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine_all([HELD, NOT_HELD, INCONCLUSIVE]) == NOT_HELD


def _s(mean, std=0.01):
    return Stat(mean, std, 3)


def test_claim_verdicts_on_known_numbers():
    stats = {
        "A:lora r=2": _s(0.70), "A:lora r=8": _s(0.72),
        "A:qkv_depth/tucker": _s(0.75), "A:att_qkv_depth/tucker": _s(0.74), "A:att/tucker": _s(0.60),
        "A:qkv/tucker": _s(0.71), "A:qkv_depth/cp": _s(0.70), "A:att/cp": _s(0.71),
        # lambda 16 beats lambda 1 but the x16 control gets as much: not a core-specific effect
        "B:lambda:qkv_depth:1": _s(0.70), "B:lambda:qkv_depth:16": _s(0.76),
        "B:control:qkv_depth:4": _s(0.73), "B:control:qkv_depth:16": _s(0.765),
        "B:loraplus:1": _s(0.70), "B:loraplus:4": _s(0.705, 0.02), "B:loraplus:16": _s(0.69, 0.02),
        "C:auto:lora:1": _s(0.70), "C:uniform:lora:1": _s(0.65), "C:reverse:lora:1": _s(0.60),
        "C:auto:lora:2": _s(0.72), "C:uniform:lora:2": _s(0.70), "C:reverse:lora:2": _s(0.69),
    }
    v = claim_verdicts(stats)
    assert v[1][0] == HELD and "qkv_depth/tucker 0.7500" in v[1][1]
    # att is lowest among Tucker, but with CP att beats qkv_depth by 0.01 = pooled std -> did not hold
    assert v[2][0] == NOT_HELD
    stats2 = {k: s for k, s in stats.items() if not k.endswith("/cp")}
    assert claim_verdicts(stats2)[2][0] == HELD
    assert v[3][0] == INCONCLUSIVE and "best control (lr x16)" in v[3][1]
    stats3 = {**stats, "B:lambda:qkv_depth:16": _s(0.80)}
    assert claim_verdicts(stats3)[3][0] == HELD
    stats4 = {**stats, "B:lambda:qkv_depth:16": _s(0.65)}
    assert claim_verdicts(stats4)[3][0] == NOT_HELD
    assert v[4][0] == INCONCLUSIVE and "ratio 4" in v[4][1]
    assert v[5][0] == HELD
    assert claim_verdicts({**stats, "C:uniform:lora:2": _s(0.725)})[5][0] == INCONCLUSIVE
    assert claim_verdicts({**stats, "C:uniform:lora:2": _s(0.75)})[5][0] == NOT_HELD
    empty = claim_verdicts({})
    assert set(empty) == {1, 2, 3, 4, 5, 6} and all(x[0] == INCONCLUSIVE for x in empty.values())


# -- the repro file and the generated sweeps -----------------------------------------------------------
def test_repro_file_plans_every_experiment_with_controls():
    cfg = load_config()
    task = scale_tasks(cfg, "cpu", ["text"])[0]
    shape = model_shape_for(task["base"]["model"])
    plan = plan_task(cfg, task, EXPERIMENTS, shape, allocation={
        "lora:1": {"ranks_string": "8_8_8_3_2", "reverse_ranks_string": "2_8_8_3_8"},
        "lora:2": {"ranks_string": "16_8_8_3_6", "reverse_ranks_string": "6_8_8_3_16"}})
    roles = [r for rs in plan.roles.values() for r in rs]
    a = [r for r in roles if r["experiment"] == "A"]
    assert len(a) == 2 + 7 * 2
    b = [r for r in roles if r["experiment"] == "B"]
    assert sorted(r["x"] for r in b if r["kind"] == "control") == [4, 4, 16, 16]
    assert sorted(r["x"] for r in b if r["kind"] == "lambda") == [1, 1, 4, 4, 8, 8, 16, 16]
    assert sorted(r["x"] for r in b if r["kind"] == "loraplus") == [1, 4, 16]
    c = [r for r in roles if r["experiment"] == "C"]
    assert sorted((r["arm"], r["budget"]) for r in c) == sorted(
        (arm, b) for arm in ("uniform", "auto", "reverse") for b in ("lora:1", "lora:2"))
    # B's lambda = 1 is A's matched Tucker run; the controls raise the whole lr
    lam1 = [k for k, rs in plan.roles.items() if any(r.get("kind") == "lambda" and r["x"] == 1 for r in rs)]
    assert all(any(r["experiment"] == "A" for r in plan.roles[k]) for k in lam1)
    ctrl = [plan.entries[k] for k, rs in plan.roles.items() if any(r.get("kind") == "control" for r in rs)]
    assert sorted({e["lr"] for e in ctrl}) == [0.004, 0.016] and all("core_lambda" not in e for e in ctrl)
    spec = sweep_dict(cfg, "cpu", task, plan)
    assert [r["seed"] for r in spec["runs"][:len(plan.entries)]] == [0] * len(plan.entries)  # seed-major
    assert spec["cpus_per_job"] == 1
    # the paper scale names the paper's models and tasks
    paper = {t["name"]: t["base"]["model"] for t in scale_tasks(cfg, "paper")}
    assert paper == {"cola": "roberta-base", "mrpc": "roberta-base",
                     "eurosat": "google/vit-base-patch16-224-in21k", "dtd": "google/vit-base-patch16-224-in21k"}


@pytest.mark.slow
def test_committed_cpu_sweeps_are_generated(tmp_path):
    cfg = load_config()
    written = generate(cfg, tmp_path, ["cpu"])
    for p in written:
        if p.suffix == ".yaml":
            committed = REPO_ROOT / "benchmarks" / "repro" / "sweeps" / p.name
            assert committed.read_text() == p.read_text(), f"{committed} is stale: python benchmarks/repro/generate.py"
            from tenslora.sweep.spec import expand, load_sweep
            assert len(expand(load_sweep(committed))) == 3 * len({json.dumps({k: v for k, v in r.items() if k != 'seed'},
                                                                              sort_keys=True)
                                                                   for r in load_sweep(committed).runs})


# -- the miniature reproduction, end to end ------------------------------------------------------------
tu = pytest.importorskip("test_train_utils")
text_model = tu.text_model  # the session fixture


def _tiny_config(model, data):
    cfg = copy.deepcopy(load_config())
    ex = cfg["experiments"]
    ex["A"].update(lora_ranks=[2], constructions=["att", "qkv_depth", "att_qkv_depth"], factorizations=["tucker"])
    ex["B"].update(constructions=["att_qkv_depth"], core_lambda=[1, 16], control_lr_multipliers=[16],
                   lora_plus_ratio=[1, 4])
    ex["C"].update(budgets=[1])
    base = {"model": str(model), "task": str(data), "max_steps": 3, "batch_size": 8, "eval_batch_size": 32,
            "eval_every": 3, "lr": 0.01, "alpha": 8.0}
    cfg["scales"] = {"tiny": {"slots": 2, "seeds": [0, 1], "probe": {"steps": 2, "rank": 4},
                              "sweep": {"timeout_s": 300, "retries": 0, "cpus_per_job": 1},
                              "tasks": {"text": [{"name": "tiny-text", "metric": "test_macro_f1",
                                                  "metrics": ["test_macro_f1", "test_accuracy"], "base": base}]}}}
    return cfg


@pytest.mark.slow
def test_repro_miniature_end_to_end(tmp_path, text_model):  # noqa: F811
    data = tu.write_csv(tmp_path / "d.csv", tu.sentences(80))
    cfg = _tiny_config(text_model, data)
    root = tmp_path / "repro"
    counts = run(cfg, "tiny", list(EXPERIMENTS), ["text"], root)
    assert counts["tiny-text"].get("done", 0) > 0 and not counts["tiny-text"].get("failed"), counts
    index = json.loads((root / "tiny-text" / INDEX_FILE).read_text())
    assert set(index["allocation"]) == {"lora:1"}
    arms = {r["arm"] for rs in index["jobs"].values() for r in rs if r["experiment"] == "C"}
    assert arms == {"uniform", "auto", "reverse"}

    out = tmp_path / "docs" / "results.md"
    res = write_report(root, out, tmp_path / "docs" / "results")
    md = out.read_text()
    for exp in EXPERIMENTS:
        assert f"### {EXP_TITLES[exp]}" in md
    assert len(res["plots"]) == 3 and all(p.stat().st_size > 1000 for p in res["plots"])
    for k in CLAIMS:
        assert sum(line.startswith(f"- **Claim {k}**") for line in md.splitlines()) == 1
        assert res["verdicts"]["tiny-text"][k][0] in (HELD, NOT_HELD, INCONCLUSIVE)
    assert "PARTIAL" not in md and "± " in md  # two seeds: every row has a std

    # collect -> report from the results only (no run directory needed)
    results = tmp_path / "results"
    written = collect(root, results)
    files = [p for p in written if p.name != "_index.json"]
    assert len(files) == len(index["jobs"])
    rec = json.loads(files[0].read_text())
    assert rec["summary"]["status"] == "done" and rec["config"]["resolved"] and rec["roles"]
    out2 = tmp_path / "docs2" / "results.md"
    write_report(results, out2, tmp_path / "docs2" / "results", from_results=True)
    assert out2.read_text() == md

    # a missing run makes the report say it is partial and name the run
    files[0].unlink()
    write_report(results, out2, tmp_path / "docs2" / "results", from_results=True)
    partial = out2.read_text()
    assert "PARTIAL RESULTS" in partial and files[0].stem in partial


def test_report_from_synthetic_results(tmp_path):
    """write_report on collected-format files with known numbers: tables, plots, verdicts, partial marker."""
    import random

    cfg = copy.deepcopy(load_config())
    cfg["experiments"]["A"].update(constructions=["att", "qkv_depth", "att_qkv_depth"], factorizations=["tucker"])
    task = {"name": "syn", "kind": "text", "metric": "test_macro_f1", "metrics": ["test_macro_f1"],
            "base": {"model": "x", "task": "y", "lr": 0.001}}
    cfg["scales"] = {"s": {"seeds": [0, 1, 2], "tasks": {"text": [task]}}}
    shape = make_shape(32, 4, 2)
    alloc = {f"lora:{k}": {"ranks_string": f"{k}_2_2_2_2", "reverse_ranks_string": f"2_2_2_2_{k + 1}",
                           "parameters": 1, "reverse_parameters": 1, "budget": 2,
                           "targets_effective_rank": {"input": 1.0}} for k in (1, 2)}
    plan = plan_task(cfg, task, EXPERIMENTS, shape, alloc)
    spec = sweep_dict(cfg, "s", task, plan)
    roles = job_roles(plan, spec)
    index = {"scale": "s", "task": "syn", "kind": "text", "metric": "test_macro_f1", "metrics": ["test_macro_f1"],
             "base": spec["base"], "experiments": list(EXPERIMENTS), "allocation": alloc, "jobs": roles}
    d = tmp_path / "results" / "syn"
    d.mkdir(parents=True)
    (d / "_index.json").write_text(json.dumps(index))
    rng = random.Random(0)
    from tenslora.sweep.spec import expand, parse_sweep
    for job in expand(parse_sweep(spec)):
        o, varied = job.options, job.varied
        mean = 0.6
        if o["construction"] in ("qkv_depth", "att_qkv_depth") and "core_lambda" not in varied and "lr" not in varied:
            mean = 0.7  # claim 1 holds
        if o["construction"] == "att":
            mean = 0.5  # claim 2 holds
        summary = {"status": "done", "trainable_parameters": 1000, "adapter_parameters": 900, "wall_time_s": 10.0,
                   "best": {"test_macro_f1": mean + rng.uniform(-0.005, 0.005)}}
        (d / f"{job.name}.json").write_text(json.dumps({"task": "syn", "name": job.name, "options": o,
                                                        "summary": summary, "config": {}, "roles": roles[job.name]}))
    out = tmp_path / "docs" / "results.md"
    res = write_report(tmp_path / "results", out, tmp_path / "docs" / "results", from_results=True)
    md = out.read_text()
    v = res["verdicts"]["syn"]
    assert v[1][0] == HELD and v[2][0] == HELD, (v[1], v[2])
    assert v[3][0] == NOT_HELD  # lambda 16 (0.6) is below lambda 1 (0.7, A's matched run)
    assert v[4][0] == INCONCLUSIVE
    assert "PARTIAL" not in md and len(res["plots"]) == 3
    assert "| qkv_depth/tucker |" in md and "control lr x16" in md and "reverse @ lora:1" in md
    next(p for p in d.glob("*.json") if p.name != "_index.json").unlink()
    res = write_report(tmp_path / "results", out, tmp_path / "docs" / "results", from_results=True)
    assert "PARTIAL RESULTS" in out.read_text()
    # the README block: generated from the same verdicts, between its markers; NOTE.md goes under the header
    (tmp_path / "results" / "NOTE.md").write_text("**Scope.** measured on a test machine.")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_START}\nold text\n{README_END}\nafter\n")
    res = write_report(tmp_path / "results", out, tmp_path / "docs" / "results", from_results=True)
    assert "**Scope.** measured on a test machine." in out.read_text()
    update_readme(readme, readme_summary(res, "docs/results.md"))
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n") and "old text" not in text
    row = next(line for line in text.splitlines() if line.startswith("| 1. "))
    assert row.endswith(f"| {HELD} |") and "**partial**" in text  # one run was removed above
    row6 = next(line for line in text.splitlines() if line.startswith("| 6. "))
    assert "not measured" in res["verdicts"]["syn"][6][1] and row6.endswith("| not measured |")  # E: no runs
    update_readme(readme, readme_summary(res, "docs/results.md"))
    assert readme.read_text() == text  # regenerating is stable
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="BARE.md has no results block"):
        update_readme(bare, "x")
    assert bare.read_text() == "no markers\n"


def test_report_cli_checks_the_readme_before_writing(tmp_path):
    """`repro report --readme` on a README without the markers: exit 2, one line, no report written."""
    import subprocess
    import sys

    bare = tmp_path / "README.md"
    bare.write_text("no markers\n")
    out = tmp_path / "results.md"
    done = subprocess.run([sys.executable, "-m", "tenslora", "repro", "report", "--from-results",
                           "benchmarks/results", "--out", str(out), "--readme", str(bare)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "has no results block" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and bare.read_text() == "no markers\n"


def test_readme_cell_says_not_measured_when_nothing_was_compared():
    from tenslora.repro.report import _cell
    assert _cell((INCONCLUSIVE, "a/tucker has no finished runs; b/tucker has no finished runs")) == "not measured"
    assert _cell((INCONCLUSIVE, "no att runs or no other constructions")) == "not measured"
    assert _cell((INCONCLUSIVE, "a 0.5 vs b 0.5: difference +0.0, pooled std 0.1 -> inconclusive; c has no finished "
                                "runs")) == INCONCLUSIVE
    assert _cell((HELD, "x 0.7 vs y 0.5: difference +0.2, pooled std 0.01 -> held")) == HELD and _cell(None) == "-"
