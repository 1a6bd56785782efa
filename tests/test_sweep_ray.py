"""The Ray backend against a real two-node Ray cluster started on loopback inside the test.

Teardown stops only the processes this module started (found by a marker in their environment),
not every Ray process on the machine as ``ray stop --force`` would.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from tenslora.sweep.store import Store  # noqa: E402

try:
    from tests.test_sweep_helpers import fake_command, read_events, write_sweep
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import fake_command, read_events, write_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MARKER = "TENSLORA_SWEEP_RAY_TEST"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(token: str) -> set[int]:
    """Processes whose environment carries our marker (what `ray start` spawned for this module) and
    their descendants (Ray's agents rewrite their environment block when they set their title)."""
    needle = f"{MARKER}={token}".encode()
    marked, parent = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    marked.add(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    grew = True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in marked} - marked
        marked |= children
        grew = bool(children)
    return marked


def _stop(token: str) -> None:
    """SIGTERM, then SIGKILL, every process this module's Ray cluster consists of (by pid)."""
    victims = _marked_pids(token)
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.5)):
        victims |= _marked_pids(token)
        for pid in victims:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(pause)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and one worker node (1 CPU each) on 127.0.0.1; yields the address."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    temp_dir = tempfile.mkdtemp(prefix="tlray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    token = os.path.basename(temp_dir)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, MARKER: token, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=80000000",
              "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--include-dashboard=false",
                        f"--ray-client-server-port={_free_port()}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(ray_bin), "start", f"--address={address}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        yield address
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        _stop(token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 60.0) -> None:
    import ray

    ray.init(address=address, log_to_driver=False)
    deadline = time.time() + timeout
    while sum(1 for node in ray.nodes() if node.get("Alive")) < n:
        assert time.time() < deadline, "the Ray worker node did not join"
        time.sleep(0.5)


def test_ray_backend_runs_jobs_on_both_nodes_with_retries(ray_cluster, tmp_path):
    from rich.console import Console

    from tenslora.sweep.ray_backend import RayScheduler
    from tenslora.sweep.report import aggregate
    from tenslora.sweep.spec import expand, parse_sweep

    t0 = time.time()
    _wait_for_nodes(ray_cluster, 2)
    events = tmp_path / "events.txt"
    spec = parse_sweep({"command": fake_command(tmp_path), "base": {"events": str(events), "sleep": 1.5},
                        "grid": {"acc": [0.5, 0.6]}, "runs": [{"acc": 0.7, "fail_times": 1}], "seeds": [0],
                        "retries": 1, "retry_backoff_s": 0.1})
    console = Console(record=True, width=200)
    sched = RayScheduler(tmp_path / "sweep", address=ray_cluster, console=console, poll_s=0.1)
    counts = sched.run(expand(spec), spec.settings(), meta={"settings": spec.settings()})
    text = console.export_text()
    assert counts == {"queued": 0, "running": 0, "done": 3, "failed": 0}, text
    assert "2 node(s)" in text and "at most 2 job(s) at once" in text
    with Store(tmp_path / "sweep") as store:
        jobs = store.jobs()
        retried = store.attempts("acc=0.7,fail_times=1,seed=0")
    assert [a["outcome"] for a in retried] == ["retry", "done"]
    nodes = {j["device"] for j in jobs}
    assert len(nodes) == 2 and all(n.startswith("node:") for n in nodes), nodes  # both nodes ran jobs
    ends = [e for e in read_events(events) if e[0] == "end"]
    assert sorted(e[1] for e in ends) == sorted(j["name"] for j in jobs)
    assert "exit code 3" in (tmp_path / "sweep" / "logs" / "acc=0.7,fail_times=1,seed=0.log").read_text()
    results = aggregate(tmp_path / "sweep", "test_accuracy")
    assert len(results.groups) == 3
    print(f"\nray in-process driver: {time.time() - t0:.1f}s")


def test_ray_backend_from_the_cli_adds_new_jobs(ray_cluster, tmp_path):
    events = tmp_path / "events.txt"
    doc = {"command": fake_command(tmp_path), "base": {"events": str(events), "sleep": 0.3},
           "grid": {"acc": [0.1, 0.2]}, "seeds": [0], "cpus_per_job": 1}
    sweep_file = write_sweep(tmp_path, doc)
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "tenslora", "sweep", "run", str(sweep_file), "--dir", str(sweep_dir),
           "--backend", "ray", "--ray-address", ray_cluster]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc["seeds"] = [0, 1]
    write_sweep(tmp_path, doc)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 new job(s)" in proc.stdout
    starts = [e[1] for e in read_events(events) if e[0] == "start"]
    assert len(starts) == 4 and len(set(starts)) == 4  # the first two were not run again
    with Store(sweep_dir) as store:
        assert all(j["state"] == "done" and j["backend"] == "ray" for j in store.jobs())
    print(f"\nray via CLI (two runs): {time.time() - t0:.1f}s")
