"""A sweep is checked against ``tenslora train``'s options before any job starts; usage errors are not
retried; an edited sweep file may add jobs but not change a started one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tenslora.errors import UsageError
from tenslora.sweep.local import LocalScheduler
from tenslora.sweep.spec import expand, parse_sweep
from tenslora.sweep.store import Store
from tenslora.sweep.validate import is_train_command, validate_sweep

try:
    from tests.test_sweep_helpers import fake_command, read_events, write_sweep
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import fake_command, read_events, write_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch):
    monkeypatch.setattr("tenslora.sweep.local.query_gpus", lambda warn=None: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def check(doc: dict) -> None:
    spec = parse_sweep(doc, source="s.yaml")
    validate_sweep(spec, expand(spec), source="s.yaml")


@pytest.mark.parametrize("doc, message", [
    ({"grid": {"lerning_rate": [0.1]}}, "s.yaml: grid.lerning_rate: not an option of tenslora train"),
    ({"base": {"batch-sise": 8}, "grid": {"lr": [0.1]}}, "base.batch_sise: not an option"),
    ({"grid": {"construction": ["qkv", "qkvx"]}},
     "run 'construction=qkvx': unknown construction 'qkvx'; allowed: att, qkv"),
    ({"grid": {"factorization": ["ring"]}}, "unknown factorization 'ring'; allowed:"),
    ({"grid": {"batch_size": ["abc"]}}, "grid.batch_size: 'abc' must be an integer"),
    ({"grid": {"lr": ["fast"]}}, "grid.lr: 'fast' must be a number"),
    ({"grid": {"cpu": ["yes"]}}, "grid.cpu: 'yes' is a flag: use true or false"),
    ({"grid": {"batch_size": [8, 0]}}, "run 'batch_size=0': batch_size must be >= 1, got 0"),
    ({"grid": {"scheduler": ["cosine", "cosin"]}}, "scheduler 'cosin' is not allowed; allowed: cosine"),
    ({"grid": {"ranks": ["8_8"]}, "base": {"construction": "qkv_depth"}},
     "ranks (8, 8) have the wrong length for qkv_depth/tucker"),
    ({"grid": {"ranks": ["auto"]}}, "--ranks auto needs --budget"),
    ({"runs": [{"lr": 0.1}, {"task": "nosuchtask"}]}, "run 'task=nosuchtask': unknown task 'nosuchtask'"),
])
def test_bad_sweeps_are_refused_with_one_line(doc, message):
    with pytest.raises(UsageError) as info:
        check(doc)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_unknown_option_suggests_the_closest_and_lists_what_is_allowed():
    with pytest.raises(UsageError, match=r"did you mean 'max_steps'\?.* allowed: alpha, batch_size"):
        check({"grid": {"max_step": [5]}})


def test_good_sweep_passes_and_custom_commands_are_not_checked():
    check({"base": {"max_steps": 5, "cpu": True}, "grid": {"construction": ["qkv", "lora"], "ranks": [4]},
           "seeds": [0, 1]})
    check({"grid": {"ranks": ["auto"]}, "base": {"budget": "lora:8"}})
    assert is_train_command(["tenslora", "train"]) and is_train_command([sys.executable, "-m", "tenslora", "train"])
    assert not is_train_command([sys.executable, "fake.py"])
    check({"command": [sys.executable, "fake.py"], "grid": {"whatever": [1]}})


def test_cli_refuses_a_bad_grid_before_anything_runs(tmp_path):
    """Before: every job launched, was retried and failed; now: exit 2, one line, no sweep directory."""
    sweep_file = write_sweep(tmp_path, {"base": {"max_steps": 1},
                                        "grid": {"construction": ["qkv", "qkvx"]}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "tenslora", "sweep", "run", str(sweep_file), "--dir",
                           str(tmp_path / "sweep"), "--cpu"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "unknown construction 'qkvx'" in proc.stderr
    assert not (tmp_path / "sweep").exists()


def run_sweep(tmp_path, doc, sweep="sweep"):
    spec = parse_sweep({"command": fake_command(tmp_path), **doc})
    console = Console(record=True, width=250)
    sched = LocalScheduler(tmp_path / sweep, console=console, poll_s=0.05, kill_grace_s=1.0)
    counts = sched.run(expand(spec), spec.settings(), meta={"settings": spec.settings(), "spec_file": "s.yaml"},
                       one_sweep=True)
    return counts, console.export_text()


def test_usage_error_exit_2_is_not_retried(tmp_path):
    """A job exiting 2 (tenslora's exit code for a user mistake) fails at once, with its error line."""
    script = tmp_path / "usage.py"
    script.write_text("import sys\nprint('error: --foo 3 is not allowed; allowed: 1, 2', file=sys.stderr)\n"
                      "open(sys.argv[sys.argv.index('--events') + 1], 'a').write('start x 1 0.0\\n')\nsys.exit(2)\n")
    events = tmp_path / "events.txt"
    spec = parse_sweep({"command": [sys.executable, str(script)], "base": {"events": str(events)},
                        "grid": {"foo": [3]}, "retries": 3, "retry_backoff_s": 0.01})
    console = Console(record=True, width=250)
    counts = LocalScheduler(tmp_path / "sweep", console=console, poll_s=0.05).run(expand(spec), spec.settings())
    text = console.export_text()
    assert counts["failed"] == 1 and len(read_events(events)) == 1, text  # one attempt only
    assert "usage error, not retried: error: --foo 3 is not allowed" in text
    with Store(tmp_path / "sweep") as store:
        job = store.jobs()[0]
    assert job["attempts"] == 1 and job["error"].startswith("usage error, not retried")


def test_edited_sweep_may_add_jobs_and_change_timeouts(tmp_path):
    events = tmp_path / "events.txt"
    doc = {"base": {"events": str(events), "sleep": 0.0}, "grid": {"acc": [0.1]}, "seeds": [0]}
    assert run_sweep(tmp_path, doc)[0]["done"] == 1
    doc["seeds"] = [0, 1]
    doc["timeout_s"] = 120
    counts, text = run_sweep(tmp_path, doc)
    assert counts["done"] == 2 and "1 new job(s)" in text
    assert "settings changed since the last run (apply to jobs not done): timeout_s None -> 120" in text


def test_edited_option_of_a_started_job_is_refused_naming_it(tmp_path):
    """Before: the new base options silently replaced those of unfinished jobs (finished ones kept the old)."""
    events = tmp_path / "events.txt"
    doc = {"base": {"events": str(events), "sleep": 0.0, "params": 10}, "grid": {"acc": [0.1, 0.2]}}
    assert run_sweep(tmp_path, doc)[0]["done"] == 2
    doc["base"]["params"] = 20
    with pytest.raises(UsageError) as info:
        run_sweep(tmp_path, doc)
    assert "s.yaml changed params 10 -> 20 for job 'acc=0.1' (done)" in str(info.value)
    assert "new --dir" in str(info.value)
    with Store(tmp_path / "sweep") as store:  # nothing changed in the directory
        assert all(j["options"]["params"] == 10 for j in store.jobs())


def test_dropping_an_unfinished_started_job_is_refused(tmp_path):
    doc = {"base": {"events": str(tmp_path / "e.txt"), "sleep": 0.0},
           "runs": [{"acc": 0.5}, {"acc": 0.6, "fail_times": 9}], "retries": 0}
    counts, _ = run_sweep(tmp_path, doc)
    assert counts["failed"] == 1
    doc["runs"] = [{"acc": 0.5}]
    with pytest.raises(UsageError, match=r"no longer lists job 'acc=0.6,fail_times=9' \(failed\)"):
        run_sweep(tmp_path, doc)


def test_without_one_sweep_jobs_are_only_added(tmp_path):
    """`tenslora repro` adds each experiment's jobs to a shared per-task sweep: nothing is refused there."""
    doc = {"command": fake_command(tmp_path), "base": {"events": str(tmp_path / "e.txt"), "sleep": 0.0},
           "runs": [{"acc": 0.5}, {"acc": 0.6, "fail_times": 9}], "retries": 0}
    spec = parse_sweep(doc)
    LocalScheduler(tmp_path / "sweep", console=Console(record=True), poll_s=0.05).run(expand(spec), spec.settings())
    spec = parse_sweep({**doc, "runs": [{"acc": 0.7}]})
    counts = LocalScheduler(tmp_path / "sweep", console=Console(record=True), poll_s=0.05).run(
        expand(spec), spec.settings())
    assert counts["done"] == 2 and counts["failed"] == 1
