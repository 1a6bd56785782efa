"""Size experiments D and E at cpu scale before running them (docs/reproduce.md, "Sizing D and E").

    python benchmarks/repro/size_tuned.py          # from the repository root

Per-job seconds come from the committed summaries of the earlier cpu runs (benchmarks/results/<task>/*.json):
``wall_time_s`` of the runs made on the idle machine (under 100 s; the text B/C runs ran under load), split
into evaluation (10.5 ms per example, from the runs that evaluate the test split twice against those that do
it once) and the rest. A D/E job is then re-costed with its own validation and test sizes, plus the start of
the process outside the training loop (7.5 s: the CPU time of a whole 1-step ``tenslora train`` process,
measured 7.3 s for MiniLM and 7.6 s for DINOv2-small). Job counts come from the repro file's plan.

The LLM task (SmolLM2-135M, tweets-instruct) has no earlier runs; its costs are the CPU times of two
measured jobs that differ only in their step count (``LLM_*`` below; docs/reproduce.md gives the commands).
Tensor-train configurations and the ``tweets-targets`` task (qkvo and all-linear arms) are issue 16's
comparison and are totalled apart from issue 14's budget; the targets arms are costed as tweets jobs (they
take longer: more adapted layers), so their figure is a lower bound.
"""
from __future__ import annotations

import glob
import json
import statistics as st
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

STARTUP_S = 7.5
VALIDATIONS = 3  # eval_every 50 over 150 steps
# SmolLM2 jobs, 1 thread, batch 8, max length 128: 4 steps took 181.5 s CPU and 12 steps 236.2 s (each with
# 100 validation + 100 test examples), so 6.8 s per step; the rest, less a 10 s start, is 0.72 s per example.
LLM_STEP_S, LLM_EXAMPLE_S, LLM_START_S = (236.2 - 181.5) / 8, (181.5 - 4 * (236.2 - 181.5) / 8 - 10) / 200, 10.0


def measured(task: str) -> tuple[float, float, float, int]:
    """``(seconds without evaluation, seconds per evaluated example, P(test evaluated twice), runs)``."""
    rows = [json.loads(Path(f).read_text())["summary"] for f in glob.glob(str(ROOT / f"benchmarks/results/{task}/*.json"))
            if not f.endswith("_index.json")]
    idle = [s for s in rows if s["wall_time_s"] < 100]
    tail = lambda s: s["wall_time_s"] - s["steps"] / s["steps_per_second"]  # noqa: E731  after the loop: test
    once = [tail(s) for s in idle if s["best"]["step"] == s["final"]["step"]]
    twice = [tail(s) for s in idle if s["best"]["step"] != s["final"]["step"]]
    per_example = (st.mean(twice) - st.mean(once)) / 500
    p_twice = len(twice) / len(idle)
    wall = st.mean(s["wall_time_s"] for s in idle)
    core = wall - VALIDATIONS * 500 * per_example - (1 + p_twice) * 500 * per_example
    return core, per_example, p_twice, len(idle)


def job_s(m, validation: int, test: int, p_twice: float | None = None) -> float:
    core, per_example, p, _ = m
    p = p if p_twice is None else p_twice
    return core + VALIDATIONS * validation * per_example + (1 + p) * test * per_example + STARTUP_S


def llm_job_s(base: dict, validation: int, test: int) -> float:
    steps = int(base["max_steps"])
    validations = steps // int(base["eval_every"])
    return LLM_START_S + steps * LLM_STEP_S + (validations * validation + test) * LLM_EXAMPLE_S


def main() -> None:
    from tenslora.repro.plan import task_seeds, tuning
    from tenslora.repro.spec import load_config, model_shape_for, scale_tasks

    cfg = load_config()
    slots = cfg["scales"]["cpu"]["slots"]
    totals = {"as planned": 0.0, "test twice always": 0.0, "Fashion-MNIST full 10,000 test": 0.0}
    tt_total = targets_total = 0.0
    for task in scale_tasks(cfg, "cpu", ["text", "vision", "llm"]):
        tune = tuning(cfg, task, ["D", "E"], model_shape_for(task["base"]["model"]))
        seeds = len(task_seeds(cfg, "cpu", task))
        arms = len(tune["layers"]["arms"]) if tune["layers"] else 0
        tt = sum(label.endswith("/tt") for label in tune["configs"])
        grid = (len(tune["configs"]) - tt) * len(tune["lrs"])
        phase2 = (len(tune["tuned"]) - tt + arms) * seeds
        val = int(tune["tuned_options"].get("validation_size") or task["base"]["eval_samples"])
        test_grid = int(task["base"]["eval_samples"])
        data = task["base"]["task"]  # the dataset: its earlier runs give the per-job costs
        test = tune["test_options"].get("eval_samples") or {"tweets": 2000, "fashion-mnist": 10000}[data]
        if task["name"] == "tweets-instruct":
            g, p = llm_job_s(task["base"], val, test_grid), llm_job_s(task["base"], val, test)
            zero = LLM_START_S + test * LLM_EXAMPLE_S if task.get("zero_shot") else 0.0
            print(f"{task['name']}: measured {LLM_STEP_S:.1f} s per step, {LLM_EXAMPLE_S:.2f} s per evaluated example")
            print(f"  grid {grid} jobs x {g:.0f} s + phase 2 {phase2} jobs x {p:.0f} s + zero-shot {zero:.0f} s "
                  f"= {grid * g + phase2 * p + zero:,.0f} slot-s")
            for name in totals:
                totals[name] += grid * g + phase2 * p + zero
            continue
        m = measured(data)
        g, p = job_s(m, val, test_grid), job_s(m, val, test)
        if task.get("verdicts", True) is False:  # issue 16's targets arms, apart
            targets_total += grid * g + phase2 * p
            print(f"{task['name']} (issue 16, apart; costed as {data} jobs): grid {grid} jobs x {g:.0f} s + phase 2 "
                  f"{phase2} jobs x {p:.0f} s = {grid * g + phase2 * p:,.0f} slot-s")
            continue
        print(f"{task['name']}: measured on {m[3]} idle runs: {m[0]:.1f} s without evaluation, "
              f"{m[1] * 1000:.2f} ms per evaluated example, P(test twice) {m[2]:.2f}")
        print(f"  grid {grid} jobs x {g:.0f} s + phase 2 {phase2} jobs x {p:.0f} s (validation {val}, test {test}) "
              f"= {grid * g + phase2 * p:,.0f} slot-s")
        if tt:
            tt_s = tt * len(tune["lrs"]) * g + tt * seeds * p
            tt_total += tt_s
            print(f"  plus tensor-train (issue 16): {tt} configurations, {tt * len(tune['lrs'])} + {tt * seeds} jobs "
                  f"= {tt_s:,.0f} slot-s")
        totals["as planned"] += grid * g + phase2 * p
        totals["test twice always"] += grid * job_s(m, val, test_grid, 1.0) + phase2 * job_s(m, val, test, 1.0)
        full = 10000 if data == "fashion-mnist" else test
        totals["Fashion-MNIST full 10,000 test"] += grid * g + phase2 * job_s(m, val, full)
    for name, t in totals.items():
        print(f"{name}: {t:,.0f} slot-s / {slots} slots = {t / slots:,.0f} s = {t / slots / 3600:.2f} h")
    print(f"tensor-train configurations (issue 16, apart): {tt_total:,.0f} slot-s / {slots} slots = "
          f"{tt_total / slots / 3600:.2f} h")
    print(f"targets arms (issue 16, apart): {targets_total:,.0f} slot-s / {slots} slots = "
          f"{targets_total / slots / 3600:.2f} h")


if __name__ == "__main__":
    main()
