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
    from tests.test_sweep_helpers import fake_command, intervals, max_concurrency, read_events, write_sweep
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import fake_command, intervals, max_concurrency, read_events, write_sweep

REPO = Path(__file__).resolve().parents[1]
N_JOBS, SLOTS, JOB_S = 14, 3, 0.6


def make_sweep(tmp_path: Path) -> tuple[Path, Path, Path]:
    events = tmp_path / "events.txt"
    sweep_file = write_sweep(tmp_path, {
        "name": "crash", "command": fake_command(tmp_path),
        "base": {"events": str(events), "sleep": JOB_S},
        "grid": {"acc": [round(0.05 * i, 2) for i in range(1, N_JOBS // 2 + 1)]}, "seeds": [0, 1],
        "retries": 0})
    return sweep_file, tmp_path / "sweep", events


def start_scheduler(sweep_file: Path, sweep_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tenslora", "sweep", "run", str(sweep_file), "--dir",
                                 str(sweep_dir), "--slots", str(SLOTS), "--cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(sweep_file.parent))


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ended(events: Path) -> int:
    return sum(1 for e in read_events(events) if e[0] == "end")


def running_pids(events: Path) -> dict[int, str]:
    """Job processes that started and have not ended (yet)."""
    alive: dict[int, str] = {}
    for kind, name, pid, _ in read_events(events):
        if kind in ("start", "resume"):
            alive[pid] = name
        else:
            alive.pop(pid, None)
    return alive


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


def fresh_job_running(events: Path, within: float = 0.3) -> bool:
    """A job process started less than ``within`` seconds ago is running (so it outlives a kill)."""
    starts = {pid: ts for kind, _, pid, ts in read_events(events) if kind in ("start", "resume")}
    now = time.time()
    return any(now - starts[pid] < within for pid in running_pids(events))


def run_in_process(sweep_file: Path, sweep_dir: Path) -> tuple[dict, str]:
    """Restart the scheduler in this process (no interpreter start-up: it finds the orphans still running)."""
    from rich.console import Console

    from tenslora.sweep.local import LocalScheduler
    from tenslora.sweep.spec import expand, load_sweep

    spec = load_sweep(sweep_file)
    console = Console(record=True, width=200)
    counts = LocalScheduler(sweep_dir, slots=SLOTS, cpu=True, console=console, poll_s=0.05).run(
        expand(spec), spec.settings(), meta={"settings": spec.settings()})
    return counts, console.export_text()


def test_sigkill_scheduler_midway_and_restart(tmp_path):
    """Kill -9 the scheduler twice; its jobs keep running, the next scheduler adopts them."""
    sweep_file, sweep_dir, events = make_sweep(tmp_path)
    log = tmp_path / "scheduler.log"
    kills = []
    for threshold in (3, 8):
        proc = start_scheduler(sweep_file, sweep_dir, log)
        wait_for(lambda: ended(events) >= threshold and fresh_job_running(events), what=f"{threshold} jobs done")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append({"completed_before_kill": ended(events), "running_at_kill": len(running_pids(events))})
    counts, text = run_in_process(sweep_file, sweep_dir)
    assert counts["done"] == N_JOBS, text
    stats = check_exactly_once(events, sweep_dir)
    # the scheduler died, not the jobs: nothing was started twice
    assert stats["starts"] == N_JOBS and stats["resumes"] == 0, stats
    assert "adopted" in text and "recovered the lock" in text
    assert "recovered the lock" in log.read_text()  # the second scheduler took over from the first
    with Store(sweep_dir) as store:
        assert all(j["attempts"] == 1 for j in store.jobs())
    print(f"\nSIGKILL scheduler only: kills={kills} stats={stats}")


def test_sigkill_scheduler_and_its_jobs_then_resume(tmp_path):
    """Kill -9 the scheduler and the running job wrappers (a lost machine): interrupted jobs rerun with --resume."""
    sweep_file, sweep_dir, events = make_sweep(tmp_path)
    log = tmp_path / "scheduler.log"
    proc = start_scheduler(sweep_file, sweep_dir, log)

    def checkpointed_running():
        run = running_pids(events)
        return ended(events) >= 3 and any((sweep_dir / "runs" / n / "checkpoint").exists() for n in run.values())

    wait_for(checkpointed_running, what="a running job with a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    victims = running_pids(events)
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

    wait_for(all_dead, timeout=10, what="killed jobs to die")
    now = time.time()
    with open(events, "a") as f:
        for pid, name in victims.items():
            f.write(f"killed {name} {pid} {now:.6f}\n")
    interrupted = set(victims.values())
    done_before = {name for kind, name, _, _ in read_events(events) if kind == "end"}
    counts, text = run_in_process(sweep_file, sweep_dir)
    assert counts["done"] == N_JOBS, text
    stats = check_exactly_once(events, sweep_dir)
    evs = read_events(events)
    for name in done_before:  # finished jobs were kept, not rerun
        assert sum(1 for kind, n, _, _ in evs if n == name and kind in ("start", "resume")) == 1
    resumed = {n for kind, n, _, _ in evs if kind == "resume"}
    assert interrupted and resumed and resumed <= interrupted  # continued from their checkpoints
    assert "requeued" in text and "adopted" not in text
    print(f"\nSIGKILL scheduler + {len(wrappers)} job wrappers: interrupted={len(interrupted)} "
          f"resumed={len(resumed)} stats={stats}")
