"""GPU placement (pure function), NVML faked at its boundary, the CPU / round-robin fallbacks."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from tenslora.sweep import gpus
from tenslora.sweep.gpus import GiB, choose_gpu, query_gpus, round_robin
from tenslora.sweep.local import LocalScheduler
from tenslora.sweep.spec import expand, parse_sweep

try:
    from tests.test_sweep_helpers import fake_command, max_concurrency, read_events
except ImportError:  # tests/ is not a package
    from test_sweep_helpers import fake_command, max_concurrency, read_events


# -- the pure placement function ------------------------------------------------------------
def test_whole_gpu_jobs_take_empty_gpus_only():
    assert choose_gpu([10, 20], None, [[], []]) == 1  # most free memory
    assert choose_gpu([10, 20], None, [[], [None]]) == 0
    assert choose_gpu([10, 20], None, [[None], [None]]) is None
    assert choose_gpu([10, 20], None, [[2.0], []]) == 1  # a GPU with any job is not empty
    assert choose_gpu([0.5, 20], None, [[], [None]]) is None  # almost full (someone else's job)


def test_declared_needs_pack_several_jobs_per_gpu():
    total = [16, 16]
    assigned: list[list[float]] = [[], []]
    placed = []
    for _ in range(6):
        i = choose_gpu([16, 16], 5.0, assigned, total)
        if i is None:
            break
        assigned[i].append(5.0)
        placed.append(i)
    assert placed == [0, 1, 0, 1, 0, 1]  # spread, then packed: 3 x 5 GiB fit in 16 GiB
    assert choose_gpu([16, 16], 5.0, assigned, total) is None
    assert choose_gpu([16, 16], 1.0, assigned, total) == 0  # 1 GiB left on each


def test_free_memory_and_reservations_both_limit():
    # NVML says 3 GiB free on GPU 0 (another user's process): a 4 GiB job goes to GPU 1
    assert choose_gpu([3, 12], 4.0, [[], []], [16, 16]) == 1
    # GPU 1 has 12 GiB free but 10 GiB are promised to a job that has not allocated yet
    assert choose_gpu([3, 12], 4.0, [[], [10.0]], [16, 16], pending_gb=[0, 10]) is None
    # ... once it has allocated them, free memory shows it: 6 GiB left of the 16
    assert choose_gpu([3, 6], 4.0, [[], [10.0]], [16, 16]) == 1
    assert choose_gpu([3, 12], 7.0, [[], [10.0]], [16, 16]) is None  # 16 - 10 < 7
    assert choose_gpu([3, 12], 4.0, [[None], []], [16, 16]) == 1  # an exclusive job owns GPU 0
    assert choose_gpu([], 1.0, []) is None


def test_least_loaded_then_most_room_then_lowest_index():
    assert choose_gpu([8, 8, 8], 1.0, [[1.0], [], []], [8, 8, 8]) == 1
    assert choose_gpu([8, 9, 8], 1.0, [[1.0], [1.0], [1.0]], [8, 9, 8]) == 1


def test_round_robin():
    assert round_robin(2, [0, 0]) == 0
    assert round_robin(2, [1, 0]) == 1
    assert round_robin(3, [1, 1, 1]) == 0
    assert round_robin(2, [1, 1], per_device=1) is None
    assert round_robin(0, []) is None


# -- NVML at its boundary ----------------------------------------------------------------------
def fake_nvml(monkeypatch, totals_gb, free_gb):
    pynvml = pytest.importorskip("pynvml")
    monkeypatch.setattr(pynvml, "nvmlInit", lambda *a, **k: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda *a, **k: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(totals_gb))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda i: f"GPU-{i:04d}-fake")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda i: SimpleNamespace(total=totals_gb[i] * GiB, free=free_gb[i] * GiB,
                                                  used=(totals_gb[i] - free_gb[i]) * GiB))


def broken_nvml(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def boom(*_a, **_k):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", boom)


def test_query_gpus_reads_memory_and_honours_visible_devices(monkeypatch):
    fake_nvml(monkeypatch, [16, 24, 80], [15, 20, 1])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = query_gpus()
    assert [g.ident for g in found] == ["0", "1", "2"] and found[1].free_gb == pytest.approx(20)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0001")
    assert [(g.ident, g.total_gb) for g in query_gpus()] == [("2", 80), ("GPU-0001", 24)]


def test_failing_nvml_warns_and_returns_none(monkeypatch):
    broken_nvml(monkeypatch)
    warnings: list[str] = []
    assert query_gpus(warn=warnings.append) is None
    assert len(warnings) == 1 and "NVML is not usable" in warnings[0]


def _scheduler_run(tmp_path, doc, monkeypatch=None, **kwargs):
    spec = parse_sweep({"command": fake_command(tmp_path), **doc})
    console = Console(record=True, width=200)
    sched = LocalScheduler(tmp_path / "sweep", console=console, poll_s=0.05, **kwargs)
    counts = sched.run(expand(spec), spec.settings(), meta={"settings": spec.settings()})
    return sched, counts, console.export_text()


def _envs(tmp_path):
    out = {}
    for env_file in (tmp_path / "sweep" / "runs").glob("*/env.json"):
        out[env_file.parent.name] = json.loads(env_file.read_text())
    return out


def test_no_nvml_falls_back_to_cpu_slots_with_split_threads(tmp_path, monkeypatch):
    broken_nvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus, "cpu_count", lambda: 8)
    monkeypatch.setattr("tenslora.sweep.local.cpu_count", lambda: 8)
    events = tmp_path / "events.txt"
    sched, counts, text = _scheduler_run(tmp_path, {"base": {"events": str(events), "sleep": 0.05},
                                                    "grid": {"acc": [0.1, 0.2, 0.3, 0.4]}}, slots=3)
    assert counts["done"] == 4 and sched.mode == "cpu"
    assert text.count("NVML is not usable") == 1 and "CPU slots" in text
    envs = _envs(tmp_path)
    assert len(envs) == 4
    for env in envs.values():
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["TORCH_NUM_THREADS"] == "2"  # 8 // 3
        assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_no_nvml_with_visible_devices_goes_round_robin(tmp_path, monkeypatch):
    broken_nvml(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    events = tmp_path / "events.txt"
    sched, counts, text = _scheduler_run(tmp_path, {"base": {"events": str(events), "sleep": 0.3},
                                                    "grid": {"acc": [0.1, 0.2, 0.3, 0.4]}})
    assert counts["done"] == 4 and sched.mode == "round-robin" and sched.slots == 2
    assert "round-robin" in text
    devices = sorted(env["CUDA_VISIBLE_DEVICES"] for env in _envs(tmp_path).values())
    assert devices == ["3", "3", "5", "5"]
    assert max_concurrency(read_events(events)) <= 2


def test_fake_gpus_pack_jobs_by_declared_memory(tmp_path, monkeypatch):
    fake_nvml(monkeypatch, [16, 16], [16, 16])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    events = tmp_path / "events.txt"
    sched, counts, text = _scheduler_run(tmp_path, {"base": {"events": str(events), "sleep": 0.6},
                                                    "grid": {"acc": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
                                                    "memory_gb": 7})
    assert counts["done"] == 6 and sched.mode == "gpu" and sched.slots == 4  # 2 x floor(16 / 7)
    envs = _envs(tmp_path)
    assert sorted({e["CUDA_VISIBLE_DEVICES"] for e in envs.values()}) == ["0", "1"]
    evs = read_events(events)
    for dev in ("0", "1"):  # at most floor(16 / 7) = 2 jobs at once on each GPU
        on_dev = [e for e in evs if envs[e[1]]["CUDA_VISIBLE_DEVICES"] == dev]
        assert 1 <= max_concurrency(on_dev) <= 2
    assert max_concurrency(read_events(events)) <= 4


def test_job_too_big_for_any_gpu_fails_instead_of_waiting(tmp_path, monkeypatch):
    fake_nvml(monkeypatch, [8], [8])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sched, counts, text = _scheduler_run(tmp_path, {"base": {"events": str(tmp_path / "e.txt")},
                                                    "grid": {"acc": [0.1]}, "memory_gb": 40})
    assert counts == {"queued": 0, "running": 0, "done": 0, "failed": 1}
    assert "needs 40 GiB" in text
