"""The local backend with real processes: slots, retries, timeouts, the lock, re-runs, status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from tenslora.sweep.local import LocalScheduler
from tenslora.sweep.lock import SweepLock, SweepLockedError
from tenslora.sweep.spec import expand, parse_sweep
from tenslora.sweep.status import render_status
from tenslora.sweep.store import Store

try:
    from tests.test_sweep_helpers import (ended, fake_command, intervals, max_concurrency, read_events, release,
                                          running_jobs, wait_for, write_sweep)
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import (ended, fake_command, intervals, max_concurrency, read_events, release,
                                    running_jobs, wait_for, write_sweep)


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch):
    """CPU slots whatever the machine has (NVML is not even imported)."""
    monkeypatch.setattr("tenslora.sweep.local.query_gpus", lambda warn=None: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def run_sweep(tmp_path, doc, *, slots=None, sweep="sweep"):
    spec = parse_sweep({"command": fake_command(tmp_path), **doc})
    console = Console(record=True, width=200)
    sched = LocalScheduler(tmp_path / sweep, slots=slots, console=console, poll_s=0.05, kill_grace_s=1.0)
    counts = sched.run(expand(spec), spec.settings(), meta={"settings": spec.settings()})
    return counts, console.export_text()


def test_concurrency_never_exceeds_slots(tmp_path):
    """Jobs finish only when released, and one is released only while all 3 slots are busy (or no job
    is left to start): the slots are seen full, and never above, whatever the machine's load."""
    events, gate = tmp_path / "events.txt", tmp_path / "gate"
    gate.mkdir()
    failure = []

    def releaser():
        try:
            for done in range(12):
                wait_for(lambda: len(running_jobs(events)) == 3
                         or (sum(e[0] == "start" for e in read_events(events)) == 12 and running_jobs(events)),
                         "all slots busy, or every job started")
                release(gate, next(iter(running_jobs(events).values())))
                wait_for(lambda: ended(events) > done, "the released job to end")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)
            release(gate)

    thread = threading.Thread(target=releaser, daemon=True)
    thread.start()
    counts, _ = run_sweep(tmp_path, {"base": {"events": str(events), "gate": str(gate)},
                                     "grid": {"acc": [round(0.1 * i, 1) for i in range(1, 7)]}, "seeds": [0, 1]},
                          slots=3)
    thread.join()
    assert not failure, failure
    assert counts["done"] == 12
    evs = read_events(events)
    assert sum(1 for e in evs if e[0] == "end") == 12
    assert max_concurrency(evs) == 3  # full, never above
    assert all(len(spans) == 1 for spans in intervals(evs).values())
    with Store(tmp_path / "sweep") as store:
        jobs = store.jobs()
    assert all(j["state"] == "done" and j["attempts"] == 1 for j in jobs)
    assert all(j["summary"]["trainable_parameters"] == 1000 for j in jobs)


def test_retries_with_exponential_backoff_then_done(tmp_path):
    events = tmp_path / "events.txt"
    counts, text = run_sweep(tmp_path, {"base": {"events": str(events), "sleep": 0.05, "fail_times": 2},
                                        "grid": {"acc": [0.5]}, "retries": 2, "retry_backoff_s": 0.3})
    assert counts["done"] == 1
    evs = read_events(events)
    starts = [t for kind, _, _, t in evs if kind in ("start", "resume")]
    fails = [t for kind, _, _, t in evs if kind == "fail"]
    assert len(starts) == 3 and len(fails) == 2
    assert starts[1] - fails[0] >= 0.3 - 0.05  # first retry after 0.3 s
    assert starts[2] - fails[1] >= 0.6 - 0.05  # then after 0.6 s
    assert "retry 1/2 in 0.3s" in text and "retry 2/2 in 0.6s" in text
    with Store(tmp_path / "sweep") as store:
        job = store.jobs()[0]
        assert job["attempts"] == 3 and job["failures"] == 2
        assert [a["outcome"] for a in store.attempts(job["name"])] == ["retry", "retry", "done"]


def test_job_failing_too_often_is_failed_with_its_log_tail_in_status(tmp_path):
    events = tmp_path / "events.txt"
    counts, text = run_sweep(tmp_path, {"base": {"events": str(events), "sleep": 0.05},
                                        "runs": [{"acc": 0.5}, {"acc": 0.6, "fail_times": 9}],
                                        "retries": 1, "retry_backoff_s": 0.05})
    assert counts == {"queued": 0, "running": 0, "done": 1, "failed": 1}
    console = Console(record=True, width=250)
    render_status(tmp_path / "sweep", console=console)
    out = console.export_text()
    assert "acc=0.6,fail_times=9" in out and "failed" in out and "exit code 3" in out
    assert "fake failure 2 of 9" in out  # the tail of the job's log
    assert "done" in out and "test_macro_f1 0.4000" in out


def test_exit_zero_without_summary_is_a_failure(tmp_path):
    counts, text = run_sweep(tmp_path, {"base": {"events": str(tmp_path / "e.txt"), "no_summary": True},
                                        "grid": {"acc": [0.5]}, "retries": 0})
    assert counts["failed"] == 1 and "no valid summary.json" in text


def test_timeout_kills_the_job_process_group(tmp_path):
    events = tmp_path / "events.txt"
    counts, text = run_sweep(tmp_path, {"base": {"events": str(events), "hang": True},
                                        "grid": {"acc": [0.5]}, "timeout_s": 1.0, "retries": 0})
    assert counts["failed"] == 1 and "timed out after 1s" in text
    (pid,) = [p for kind, _, p, _ in read_events(events) if kind == "start"]
    with pytest.raises(ProcessLookupError):  # the wrapper reaped it before writing its exit record
        os.kill(pid, 0)
    with Store(tmp_path / "sweep") as store:
        assert store.jobs()[0]["error"] == "timed out after 1s"


def test_second_scheduler_is_refused_while_the_first_holds_the_lock(tmp_path):
    (tmp_path / "sweep").mkdir()
    with SweepLock(tmp_path / "sweep"):
        with pytest.raises(SweepLockedError, match=f"already being run by pid {os.getpid()}"):
            run_sweep(tmp_path, {"base": {"events": str(tmp_path / "e.txt")}, "grid": {"acc": [0.5]}})
        # and on the command line: one line, exit 2
        sweep_file = write_sweep(tmp_path, {"command": fake_command(tmp_path), "grid": {"acc": [0.5]},
                                            "base": {"events": str(tmp_path / "e.txt")}})
        proc = subprocess.run([sys.executable, "-m", "tenslora", "sweep", "run", str(sweep_file), "--dir",
                               str(tmp_path / "sweep")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: sweep directory") and "already being run" in proc.stderr
    assert not (tmp_path / "e.txt").exists()  # nothing ran


def test_stale_lock_of_a_dead_scheduler_is_recovered(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "scheduler.lock").write_text(json.dumps(
        {"pid": dead.pid, "host": os.uname().nodename, "started": time.time() - 60}))
    counts, text = run_sweep(tmp_path, {"base": {"events": str(tmp_path / "e.txt"), "sleep": 0.05},
                                        "grid": {"acc": [0.5]}})
    assert counts["done"] == 1
    assert f"recovered the lock of a scheduler that is gone (pid {dead.pid}" in text


def test_rerun_adds_new_jobs_and_keeps_finished_ones(tmp_path):
    events = tmp_path / "events.txt"
    doc = {"base": {"events": str(events), "sleep": 0.05}, "grid": {"acc": [0.1, 0.2]}, "seeds": [0]}
    assert run_sweep(tmp_path, doc, slots=2)[0]["done"] == 2
    doc["grid"]["acc"].append(0.3)
    doc["seeds"] = [0, 1]
    counts, text = run_sweep(tmp_path, doc, slots=2)
    assert counts["done"] == 6 and "4 new job(s)" in text
    starts = [name for kind, name, _, _ in read_events(events) if kind == "start"]
    assert len(starts) == 6 and len(set(starts)) == 6  # the first two did not run again
    # nothing left: a third run starts nothing
    counts, text = run_sweep(tmp_path, doc, slots=2)
    assert counts["done"] == 6 and "0 new job(s)" in text and " start " not in text
    assert len(read_events(events)) == 12


def test_cpu_threads_are_split_over_slots(tmp_path, monkeypatch):
    monkeypatch.setattr("tenslora.sweep.local.cpu_count", lambda: 6)
    run_sweep(tmp_path, {"base": {"events": str(tmp_path / "e.txt"), "sleep": 0.05}, "grid": {"acc": [0.5]}},
              slots=4)
    env = json.loads(next((tmp_path / "sweep" / "runs").glob("*/env.json")).read_text())
    assert env["OMP_NUM_THREADS"] == env["TORCH_NUM_THREADS"] == "1"  # 6 // 4
    run_sweep(tmp_path, {"base": {"events": str(tmp_path / "e.txt"), "sleep": 0.05}, "grid": {"acc": [0.5]},
                         "cpus_per_job": 3}, sweep="sweep2")
    env = json.loads(next((tmp_path / "sweep2" / "runs").glob("*/env.json")).read_text())
    assert env["MKL_NUM_THREADS"] == "3"
