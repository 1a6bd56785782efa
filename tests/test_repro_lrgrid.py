"""tenslora repro, experiments D and E (issue 14): the learning-rate grid chosen on validation only, the
two-phase run (resumable, selection stored atomically and recomputed identically), claim 6 with the
layers mode's effective rank, and the LLM task slot."""
import copy
import json
import math
import sys
import textwrap

import pytest

from tenslora.repro.plan import job_roles, plan_task, sweep_dict, tuning
from tenslora.repro.report import edge_choices, write_report
from tenslora.repro.run import run
from tenslora.repro.select import choose, select_rates, store_selection, validation_metric
from tenslora.repro.spec import INDEX_FILE, SELECTION_FILE, load_config, model_shape_for, scale_tasks
from tenslora.repro.verdicts import HELD, INCONCLUSIVE, NOT_HELD, Stat, claim6_verdict, no_loss

LRS = [3e-4, 1e-3, 1e-2]


def _summary(val, test):
    return {"status": "done", "best": {"validation_macro_f1": val, "test_macro_f1": test}}


# -- selection on validation only ------------------------------------------------------------------
def test_selection_is_the_validation_argmax_never_the_test_argmax():
    # test peaks at 1e-2, validation at 1e-3: the choice must follow validation
    grid = {"lora r=2": {3e-4: _summary(0.50, 0.40), 1e-3: _summary(0.60, 0.45), 1e-2: _summary(0.55, 0.90)},
            "qkv_depth/tucker": {3e-4: _summary(0.30, 0.99), 1e-3: _summary(0.35, 0.10), 1e-2: _summary(0.70, 0.20)}}
    sel = select_rates(grid, LRS, "validation_macro_f1")
    assert sel["lora r=2"]["lr"] == 1e-3 and sel["qkv_depth/tucker"]["lr"] == 1e-2
    for label, runs in grid.items():
        test_argmax = max(runs, key=lambda lr: runs[lr]["best"]["test_macro_f1"])
        assert sel[label]["lr"] != test_argmax
    assert sel["lora r=2"]["grid"] == {"0.0003": 0.50, "0.001": 0.60, "0.01": 0.55}
    # a test metric alone (no validation value) never selects anything
    only_test = {"x": {lr: {"best": {"test_macro_f1": 0.9}} for lr in LRS}}
    assert select_rates(only_test, LRS, "validation_macro_f1") == {}


def test_selection_ties_nan_and_incomplete_grids():
    assert choose({1e-3: 0.5, 3e-4: 0.5, 1e-2: 0.4}) == 3e-4  # tie: the smaller rate
    assert choose({1e-3: math.nan, 1e-2: 0.1}) == 1e-2  # a diverged run ranks last
    sel = select_rates({"a": {3e-4: _summary(0.5, 0.5), 1e-3: _summary(float("nan"), 0.9),
                              1e-2: _summary(0.4, 0.1)},
                        "b": {3e-4: _summary(0.5, 0.5), 1e-3: _summary(0.6, 0.9)}},  # 1e-2 not done yet
                       LRS, "validation_macro_f1")
    assert sel["a"]["lr"] == 3e-4 and math.isnan(sel["a"]["grid"]["0.001"])
    assert "b" not in sel  # selected only once its whole grid is done
    assert validation_metric("test_accuracy") == "validation_accuracy"
    with pytest.raises(ValueError, match="test metric"):
        validation_metric("accuracy")


def test_selection_file_is_atomic_merged_and_refuses_a_changed_choice(tmp_path):
    path = tmp_path / SELECTION_FILE
    first = {"lora r=2": {"lr": 1e-3, "grid": {"0.001": 0.6}}}
    store_selection(path, "validation_macro_f1", first)
    before = path.read_bytes()
    assert json.loads(before)["configurations"]["lora r=2"]["lr"] == 1e-3
    store_selection(path, "validation_macro_f1", first)  # recomputed identically: unchanged file
    assert path.read_bytes() == before
    content = store_selection(path, "validation_macro_f1", {"att/cp": {"lr": 1e-2, "grid": {"0.01": 0.5}}})
    assert set(content["configurations"]) == {"lora r=2", "att/cp"}
    with pytest.raises(ValueError, match="was tuned to lr 0.001"):
        store_selection(path, "validation_macro_f1", {"lora r=2": {"lr": 1e-2, "grid": {"0.01": 0.7}}})
    with pytest.raises(ValueError, match="selects on"):
        store_selection(path, "validation_accuracy", {})
    assert set(json.loads(path.read_text())["configurations"]) == {"lora r=2", "att/cp"}  # refusals wrote nothing
    assert [p.name for p in tmp_path.iterdir()] == [SELECTION_FILE]  # no temporary file left


# -- the repro file's D and E ----------------------------------------------------------------------
def test_repro_file_plans_the_grid_then_the_tuned_runs():
    cfg = load_config()
    task = scale_tasks(cfg, "cpu", ["text"])[0]
    shape = model_shape_for(task["base"]["model"])
    tune = tuning(cfg, task, ["D", "E"], shape)
    assert tune["lrs"] == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and tune["baseline"] == "lora r=2"
    # the issue's minimum, A's two best others on tweets, and issue 16's tensor-train pair
    assert tune["tuned"] == ["lora r=2", "lora r=8", "qkv_depth/tucker", "att_qkv_depth/tucker", "qkv_depth/cp",
                             "att_qkv_depth/cp", "depth/tucker", "att_depth/tucker", "qkv_depth/tt", "att_qkv_depth/tt"]
    assert tune["configs"]["qkv_depth/tt"] == {"construction": "qkv_depth", "factorization": "tt", "ranks": "8_8_6"}
    assert tune["configs"]["att_qkv_depth/tucker"]["ranks"] == "10_11_12_3_6"
    # E: A's matched ranks with the layers rank (last mode of att_qkv_depth) replaced
    assert {r: e["ranks"] for r, e in tune["layers"]["arms"].items()} == {4: "10_11_12_3_4", 2: "10_11_12_3_2"}
    plan = plan_task(cfg, task, ["D", "E"], shape)
    spec = sweep_dict(cfg, "cpu", task, plan)
    n = len(tune["tuned"])
    assert len(spec["runs"]) == n * 5 and all(r["seed"] == 100 and r["validation_size"] == 500 for r in spec["runs"])
    selection = {label: {"lr": 3e-3} for label in tune["tuned"]}
    plan2 = plan_task(cfg, task, ["D", "E"], shape, selection=selection)
    spec2 = sweep_dict(cfg, "cpu", task, plan2)
    tuned = spec2["runs"][n * 5:]
    assert len(tuned) == (n + 2) * 3 and {r["seed"] for r in tuned} == {0, 1, 2}
    assert all(r["lr"] == 3e-3 and r["eval_samples"] is None for r in tuned)  # the full test split
    roles = job_roles(plan2, spec2)
    phases = [r.get("phase") or r["experiment"] for rs in roles.values() for r in rs]
    assert phases.count("grid") == n * 5 and phases.count("tuned") == n * 3 and phases.count("E") == 6
    vision = scale_tasks(cfg, "cpu", ["vision"])[0]
    assert vision["test_options"] == {"eval_samples": 2000} and vision["tuned_options"] == {"validation_size": 500}
    # the LLM slot: D only (LoRA r=8 vs the two constructions at r=8's count), zero-shot, GQA shape
    llm = scale_tasks(cfg, "cpu", ["llm"])[0]
    assert llm["name"] == "tweets-instruct" and llm["zero_shot"] and llm["experiments"] == ["D"]
    lt = tuning(cfg, llm, ["D", "E"], model_shape_for(llm["base"]["model"]))
    assert lt["tuned"] == ["lora r=8", "qkv_depth/tucker", "att_qkv_depth/tucker", "qkv_depth/cp", "qkv_depth/tt"]
    assert lt["baseline"] == "lora r=8" and lt["lrs"] == [1e-3, 3e-3, 1e-2] and lt["layers"] is None
    # issue 16's CP and TT arms at given rates (no grid): Tucker's 3e-3 for TT, 3x it for CP
    assert lt["fixed"] == {"qkv_depth/cp": 1e-2, "qkv_depth/tt": 3e-3}
    plan = plan_task(cfg, llm, ["D"], model_shape_for(llm["base"]["model"]))
    grid_labels = {role["label"] for roles in plan.roles.values() for role in roles if role.get("phase") == "grid"}
    assert grid_labels == {"lora r=8", "qkv_depth/tucker", "att_qkv_depth/tucker"}


def test_claim6_is_a_no_loss_claim():
    s = lambda m, sd=0.01: Stat(m, sd, 3)  # noqa: E731
    assert no_loss(s(0.70), s(0.705))[0] == HELD  # within a pooled std
    assert no_loss(s(0.72), s(0.70))[0] == HELD
    assert no_loss(s(0.68), s(0.70))[0] == NOT_HELD
    assert no_loss(Stat(0.7, None, 1), s(0.7))[0] == INCONCLUSIVE
    v, text = claim6_verdict({"E:layers=4": s(0.70), "E:layers=2": s(0.65)}, {4: Stat(1.8, 0.1, 3), 2: Stat(1.5, 0.1, 3)})
    assert v == NOT_HELD and "layers rank 2" in text and "rank 4: 1.80 ± 0.10" in text
    assert claim6_verdict({"E:layers=4": s(0.7)})[0] == INCONCLUSIVE


# -- the two phases end to end, with a fake trainer whose test optimum is not the validation one ------
FAKE = textwrap.dedent('''
    import argparse, json, math, os, sys
    p = argparse.ArgumentParser()
    for k in ("--output-dir", "--construction", "--ranks", "--factorization"):
        p.add_argument(k)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--validation-size", type=int, default=None)
    a, _ = p.parse_known_args()
    os.makedirs(a.output_dir, exist_ok=True)
    json.dump(sys.argv[1:], open(os.path.join(a.output_dir, "argv.json"), "w"))
    x = math.log10(a.lr)
    bonus = 0.0 if a.construction == "lora" else 0.1   # the tensors beat LoRA
    val = 0.5 + bonus - 0.05 * (x + 3) ** 2            # validation peaks at lr 1e-3
    test = 0.5 + bonus - 0.05 * (x + 2) ** 2 + 0.002 * a.seed   # test peaks at lr 1e-2
    s = {"status": "done", "trainable_parameters": 100, "adapter_parameters": 90, "wall_time_s": 1.0,
         "data_sizes": {"validation": a.validation_size, "test": a.eval_samples or 2000},
         "best": {"validation_macro_f1": val, "test_macro_f1": test}}
    tmp = os.path.join(a.output_dir, "summary.tmp")
    json.dump(s, open(tmp, "w"))
    os.replace(tmp, os.path.join(a.output_dir, "summary.json"))
''')


def _fake_config(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE)
    cfg = copy.deepcopy(load_config())
    cfg["experiments"]["D"].update(lrs=LRS, lora_ranks=[2], configurations=["qkv_depth/tucker", "att_qkv_depth/tucker"])
    base = {"model": "minilm", "task": "tweets", "max_steps": 3, "eval_samples": 500, "lr": 0.001}
    cfg["scales"] = {"fake": {"slots": 2, "seeds": [0, 1, 2],
                              "sweep": {"command": [sys.executable, str(fake)], "timeout_s": 120, "retries": 0},
                              "tasks": {"text": [{"name": "fake-text", "metric": "test_macro_f1",
                                                  "metrics": ["test_macro_f1"], "base": base,
                                                  "tuned_options": {"validation_size": 500},
                                                  "test_options": {"eval_samples": None}}]}}}
    return cfg


def test_two_phase_run_selects_on_validation_and_resumes(tmp_path):
    cfg = _fake_config(tmp_path)
    root = tmp_path / "repro"
    dry = run(cfg, "fake", ["D", "E"], ["text"], root, dry_run=True)
    assert dry["fake-text"] == {"jobs": 3 * 3, "phase-2 jobs after the selection": (3 + 2) * 3}
    counts = run(cfg, "fake", ["D", "E"], ["text"], root)
    assert counts["fake-text"]["done"] == 9 + 15 and not counts["fake-text"]["failed"], counts
    tdir = root / "fake-text"
    sel = json.loads((tdir / SELECTION_FILE).read_text())
    assert sel["metric"] == "validation_macro_f1"
    assert {label: rec["lr"] for label, rec in sel["configurations"].items()} == {
        "lora r=2": 1e-3, "qkv_depth/tucker": 1e-3, "att_qkv_depth/tucker": 1e-3}  # validation, not test (1e-2)
    index = json.loads((tdir / INDEX_FILE).read_text())
    tuned = [n for n, rs in index["jobs"].items() if any(r.get("phase") == "tuned" or r["experiment"] == "E"
                                                         for r in rs)]
    assert len(tuned) == 15
    for name in tuned:  # phase 2 at the chosen rate, on the full test split (no --eval-samples)
        argv = json.loads((tdir / "sweep" / "runs" / name / "argv.json").read_text())
        assert argv[argv.index("--lr") + 1] == "0.001" and "--eval-samples" not in argv
        assert argv[argv.index("--validation-size") + 1] == "500"
    e_ranks = sorted(r["ranks"] if "ranks" in r else "" for n in tuned for r in index["jobs"][n]
                     if r["experiment"] == "E")
    assert len(e_ranks) == 6

    # a restart recomputes the same selection from phase 1 and runs nothing new
    before = (tdir / SELECTION_FILE).read_bytes()
    (tdir / SELECTION_FILE).unlink()
    again = run(cfg, "fake", ["D", "E"], ["text"], root)
    assert again["fake-text"]["done"] == 24 and (tdir / SELECTION_FILE).read_bytes() == before

    out = tmp_path / "docs" / "results.md"
    res = write_report(root, out, tmp_path / "docs" / "results")
    md = out.read_text()
    assert "Experiment D" in md and "| lora r=2 | 0.4863 | **0.5000** | 0.4500 | 0.001 |" in md
    assert "Chosen at the edge" not in md  # every rate chosen inside the grid
    assert edge_choices({"a": {"lr": 3e-2}, "b": {"lr": 1e-3}, "c": {"lr": 3e-4}}, [3e-4, 1e-3, 3e-2]) == ["a", "c"]
    assert any(p.name == "D_grid_fake-text.png" and p.stat().st_size > 1000 for p in res["plots"])
    v = res["verdicts"]["fake-text"]
    assert v["1 (tuned)"][0] == HELD and "LoRA r=2" in v["1 (tuned)"][1]
    assert v[1][0] == INCONCLUSIVE and "experiment A was not run" in v[1][1]
    assert v[6][0] == HELD  # the fake gives both layers ranks the same numbers
    assert "PARTIAL" not in md and "validation 500, test 2,000" in md

    # collect merges into results that already hold other experiments (A's index stays, with its jobs)
    from tenslora.repro.collect import collect

    results = tmp_path / "results"
    (results / "fake-text").mkdir(parents=True)
    old = {**index, "experiments": ["A"], "jobs": {"construction=lora,ranks=2,seed=0": [
        {"experiment": "A", "label": "lora r=2", "construction": "lora", "factorization": "lora"}]}, "tuning": None}
    (results / "fake-text" / "_index.json").write_text(json.dumps(old))
    collect(root, results)
    merged = json.loads((results / "fake-text" / "_index.json").read_text())
    assert merged["experiments"] == ["A", "D", "E"] and len(merged["jobs"]) == 25
    assert merged["tuning"]["selection"]["lora r=2"]["lr"] == 1e-3
    res = write_report(results, out, tmp_path / "docs" / "results", from_results=True)
    md2 = out.read_text()
    assert "PARTIAL RESULTS" in md2 and "construction=lora,ranks=2,seed=0" in md2  # A's run is not there
    assert res["verdicts"]["fake-text"]["1 (tuned)"][0] == HELD


# -- the real trainer, tiny: grid, selection, seeds, effective rank of the layers mode ---------------
tu = pytest.importorskip("test_train_utils")
text_model = tu.text_model  # the session fixture


@pytest.mark.slow
def test_tiny_real_two_phase_run(tmp_path, text_model):  # noqa: F811
    from tenslora.repro.collect import collect, load_results

    data = tu.write_csv(tmp_path / "d.csv", tu.sentences(80))
    cfg = copy.deepcopy(load_config())
    cfg["experiments"]["D"].update(lrs=[1e-3, 1e-1], lora_ranks=[2], configurations=["att_qkv_depth/tucker"])
    cfg["experiments"]["E"].update(layers_ranks=[2, 1])  # the tiny model has 2 layers
    base = {"model": str(text_model), "task": str(data), "max_steps": 3, "batch_size": 8, "eval_batch_size": 32,
            "eval_every": 3, "alpha": 8.0}
    cfg["scales"] = {"tiny": {"slots": 2, "seeds": [0, 1],
                              "sweep": {"timeout_s": 300, "retries": 0, "cpus_per_job": 1},
                              "tasks": {"text": [{"name": "tiny-text", "metric": "test_macro_f1",
                                                  "metrics": ["test_macro_f1", "test_accuracy"], "base": base}]}}}
    root = tmp_path / "repro"
    counts = run(cfg, "tiny", ["D", "E"], ["text"], root)
    indexes, runs = load_results(root)
    index = indexes["tiny-text"]
    # 4 grid runs, then 2 configurations x 2 seeds and 2 layers arms x 2 seeds; the tiny model's matched
    # att_qkv_depth ranks may already have layers rank 2, and then that arm is D's run (shared, run once)
    assert counts["tiny-text"]["done"] == len(index["jobs"]) >= 10 and not counts["tiny-text"]["failed"], counts
    by_name = {r["name"]: r for r in runs}
    sel = json.loads((root / "tiny-text" / SELECTION_FILE).read_text())["configurations"]
    for label in ("lora r=2", "att_qkv_depth/tucker"):
        vals = {float(r["lr"]): by_name[n]["summary"]["best"]["validation_macro_f1"]
                for n, rs in index["jobs"].items() for r in rs if r.get("phase") == "grid" and r["label"] == label}
        assert sel[label]["lr"] == choose(vals)  # the validation argmax
    e_runs = [r for r in runs if any(x["experiment"] == "E" for x in r["roles"])]
    assert len(e_runs) == 4
    for r in e_runs:  # effective rank of the layers mode, within [1, its rank]
        layers_rank = next(x["layers_rank"] for x in r["roles"] if x["experiment"] == "E")
        eff = r["mode_metrics"]["layers"]["effective_rank"]
        assert 1 - 1e-9 <= eff <= layers_rank + 1e-9
    results = tmp_path / "results"
    collect(root, results)
    out = tmp_path / "docs" / "results.md"
    res = write_report(results, out, tmp_path / "docs" / "results", from_results=True)
    md = out.read_text()
    assert "Experiment E" in md and "layers effective rank" in md and res["verdicts"]["tiny-text"][6][0] in (
        HELD, NOT_HELD, INCONCLUSIVE)
    assert "PARTIAL" not in md


# -- claim 6's effective rank from a saved adapter, against the full tensors -----------------------
@pytest.mark.parametrize("construction,factorization,ranks", [("att_qkv_depth", "tucker", (4, 3, 2, 2, 2)),
                                                               ("qkv_depth", "cp", 5), ("depth", "tucker", (3, 4, 2)),
                                                               ("att_qkv_depth", "tt", (4, 3, 2, 2))])
def test_saved_mode_metrics_match_the_full_tensor_unfoldings(tmp_path, bert, construction, factorization, ranks):
    import torch

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.plus.spectra import spectrum_metrics
    from tenslora.repro.modes import saved_mode_metrics
    from tenslora.tensor.algebra import unfold

    adapted = get_adapted_model(bert, TensLoRAConfig(construction=construction, factorization=factorization,
                                                     ranks=ranks))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking tensor: no zero core or zero factor
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    adapted.save_adapter(tmp_path / "best_adapter")
    got = saved_mode_metrics(tmp_path / "best_adapter")
    tensors = [a.tensor for a in adapted.adapters.values()]
    modes = tensors[0].mode_names
    assert set(got) == set(modes)
    for i, mode in enumerate(modes):
        # the slow reference: every tensor rebuilt in full, unfolded along the mode, stacked side by side
        full = torch.cat([unfold(t.full().detach().double(), i) for t in tensors], dim=1)
        ref = spectrum_metrics(torch.linalg.svdvals(full))
        assert got[mode]["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-6)
        assert got[mode]["entropy"] == pytest.approx(ref["entropy"], rel=1e-6, abs=1e-9)
        assert 1 - 1e-9 <= got[mode]["effective_rank"] <= full.shape[0] + 1e-9
    with pytest.raises(ValueError, match="is a PEFT LoRA adapter"):
        lora = get_adapted_model(__import__("conftest").tiny_bert(), TensLoRAConfig(construction="lora", ranks=2))
        lora.save_adapter(tmp_path / "lora")
        saved_mode_metrics(tmp_path / "lora")


def test_cli_dry_run_counts_both_phases_and_refuses_a_bad_experiment(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tenslora", "repro", "run", "--scale", "cpu", "--tasks", "text", "--dir",
           str(tmp_path / "r"), "--dry-run"]
    done = subprocess.run([*cmd, "--experiments", "D,E"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "tweets: 50 jobs, 36 phase-2 jobs after the selection" in done.stdout  # 10 configurations x 5 rates; (10 + 2 E arms) x 3 seeds
    assert not (tmp_path / "r" / "tweets" / SELECTION_FILE).exists()  # nothing ran, nothing selected
    bad = subprocess.run([*cmd, "--experiments", "D,F"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "error: experiment 'F' is not allowed; allowed: A, B, C, D, E"
