"""Crash safety with real processes: SIGKILL the scheduler (and its jobs) mid-sweep, restart, count runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tenslora.sweep.runner import read_json
from tenslora.sweep.store import Store

try:
    from tests.test_sweep_helpers import (ended, fake_command, intervals, max_concurrency, read_events, release,
                                          running_jobs, wait_for, write_sweep)
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import (ended, fake_command, intervals, max_concurrency, read_events, release,
                                    running_jobs, wait_for, write_sweep)

REPO = Path(__file__).resolve().parents[1]
N_JOBS, SLOTS = 14, 3


def make_sweep(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """Jobs that finish only when the test releases them (``gate``), never on their own."""
    events, gate = tmp_path / "events.txt", tmp_path / "gate"
    gate.mkdir()
    sweep_file = write_sweep(tmp_path, {
        "name": "crash", "command": fake_command(tmp_path),
        "base": {"events": str(events), "gate": str(gate)},
        "grid": {"acc": [round(0.05 * i, 2) for i in range(1, N_JOBS // 2 + 1)]}, "seeds": [0, 1],
        "retries": 0})
    return sweep_file, tmp_path / "sweep", events, gate


def start_scheduler(sweep_file: Path, sweep_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tenslora", "sweep", "run", str(sweep_file), "--dir",
                                 str(sweep_dir), "--slots", str(SLOTS), "--cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(sweep_file.parent))


def release_until(events: Path, gate: Path, target: int) -> None:
    """Release running jobs one at a time (oldest first) until ``target`` have ended, then wait until
    every slot holds a started job that is blocked (so it outlives a kill of the scheduler)."""
    while ended(events) < target:
        wait_for(lambda: len(running_jobs(events)) == SLOTS, f"{SLOTS} jobs running")
        done = ended(events)
        release(gate, next(iter(running_jobs(events).values())))
        wait_for(lambda: ended(events) > done, "the released job to end")
    wait_for(lambda: len(running_jobs(events)) == SLOTS, f"{SLOTS} blocked jobs running")


def check_exactly_once(events: Path, sweep_dir: Path) -> dict[str, int]:
    evs = read_events(events)
    ends: dict[str, int] = {}
    for kind, name, _, _ in evs:
        if kind == "end":
            ends[name] = ends.get(name, 0) + 1
    with Store(sweep_dir) as store:
        jobs = store.jobs()
    names = {j["name"] for j in jobs}
    spans = intervals(evs)
    overlaps = sum(1 for s in spans.values() for a, b in zip(sorted(s), sorted(s)[1:]) if b[0] < a[1])
    stats = {"jobs": len(jobs), "done": sum(j["state"] == "done" for j in jobs),
             "completed_runs": sum(ends.values()), "duplicates": sum(n - 1 for n in ends.values() if n > 1),
             "lost": len(names - set(ends)), "overlapping_runs_of_one_job": overlaps,
             "max_concurrency": max_concurrency(evs),
             "starts": sum(1 for e in evs if e[0] == "start"), "resumes": sum(1 for e in evs if e[0] == "resume")}
    assert stats["jobs"] == N_JOBS and stats["done"] == N_JOBS, stats
    assert stats["duplicates"] == 0 and stats["lost"] == 0 and stats["completed_runs"] == N_JOBS, stats
    assert stats["overlapping_runs_of_one_job"] == 0, stats
    assert stats["max_concurrency"] <= SLOTS, stats
    return stats


def run_in_process(sweep_file: Path, sweep_dir: Path, gate: Path) -> tuple[dict, str]:
    """Restart the scheduler in this process; every job is released once it has reconciled (adopted
    the orphans still running, or requeued the dead ones)."""
    from rich.console import Console

    from tenslora.sweep.local import LocalScheduler
    from tenslora.sweep.spec import expand, load_sweep

    class ReleasingScheduler(LocalScheduler):
        def reconcile(self) -> None:
            super().reconcile()
            release(gate)

    spec = load_sweep(sweep_file)
    console = Console(record=True, width=200)
    counts = ReleasingScheduler(sweep_dir, slots=SLOTS, cpu=True, console=console, poll_s=0.05).run(
        expand(spec), spec.settings(), meta={"settings": spec.settings()})
    return counts, console.export_text()


def test_sigkill_scheduler_midway_and_restart(tmp_path):
    """Kill -9 the scheduler twice; its jobs keep running, the next scheduler adopts them."""
    sweep_file, sweep_dir, events, gate = make_sweep(tmp_path)
    log = tmp_path / "scheduler.log"
    kills = []
    for threshold in (3, 8):
        proc = start_scheduler(sweep_file, sweep_dir, log)
        if kills:  # the orphans of the killed scheduler are adopted before any of them is released
            wait_for(lambda: log.read_text().count("adopted ") >= SLOTS, "the second scheduler to adopt")
        release_until(events, gate, threshold)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append({"completed_before_kill": ended(events), "running_at_kill": len(running_jobs(events))})
    assert [k["running_at_kill"] for k in kills] == [SLOTS, SLOTS]
    counts, text = run_in_process(sweep_file, sweep_dir, gate)
    assert counts["done"] == N_JOBS, text
    stats = check_exactly_once(events, sweep_dir)
    # the scheduler died, not the jobs: nothing was started twice
    assert stats["starts"] == N_JOBS and stats["resumes"] == 0, stats
    assert text.count("adopted ") == SLOTS and "recovered the lock" in text
    assert "recovered the lock" in log.read_text()  # the second scheduler took over from the first
    with Store(sweep_dir) as store:
        assert all(j["attempts"] == 1 for j in store.jobs())
    print(f"\nSIGKILL scheduler only: kills={kills} stats={stats}")


def test_sigkill_scheduler_and_its_jobs_then_resume(tmp_path):
    """Kill -9 the scheduler and the running job wrappers (a lost machine): interrupted jobs rerun with --resume."""
    sweep_file, sweep_dir, events, gate = make_sweep(tmp_path)
    log = tmp_path / "scheduler.log"
    proc = start_scheduler(sweep_file, sweep_dir, log)
    release_until(events, gate, 3)
    wait_for(lambda: all((sweep_dir / "runs" / n / "checkpoint").exists() for n in running_jobs(events).values()),
             "the running jobs to write their checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    victims = running_jobs(events)
    with Store(sweep_dir) as store:
        running = [j["name"] for j in store.jobs(["running"])]
    wrappers = [read_json(sweep_dir / "control" / n / "attempt.json") for n in running]
    for info in wrappers:
        if info:
            os.kill(info["wrapper_pid"], signal.SIGKILL)
    # the job processes die with their wrapper (PR_SET_PDEATHSIG), before anything restarts them

    def all_dead():
        for pid in victims:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        return False
            except (ProcessLookupError, FileNotFoundError):
                pass
        return True

    wait_for(all_dead, "killed jobs to die")
    now = time.time()
    with open(events, "a") as f:
        for pid, name in victims.items():
            f.write(f"killed {name} {pid} {now:.6f}\n")
    interrupted = set(victims.values())
    assert len(interrupted) == SLOTS
    done_before = {name for kind, name, _, _ in read_events(events) if kind == "end"}
    counts, text = run_in_process(sweep_file, sweep_dir, gate)
    assert counts["done"] == N_JOBS, text
    stats = check_exactly_once(events, sweep_dir)
    evs = read_events(events)
    for name in done_before:  # finished jobs were kept, not rerun
        assert sum(1 for kind, n, _, _ in evs if n == name and kind in ("start", "resume")) == 1
    resumed = {n for kind, n, _, _ in evs if kind == "resume"}
    assert resumed == interrupted  # each continued from its checkpoint
    assert text.count("requeued") == SLOTS and "adopted" not in text
    print(f"\nSIGKILL scheduler + {len(wrappers)} job wrappers: interrupted={len(interrupted)} "
          f"resumed={len(resumed)} stats={stats}")
