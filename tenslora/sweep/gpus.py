"""GPU discovery through NVML (never fatal) and the placement of jobs onto GPUs (a pure function)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

GiB = 1024 ** 3


@dataclass(frozen=True)
class Gpu:
    """One visible GPU: ``ident`` is what goes into the job's CUDA_VISIBLE_DEVICES."""

    ident: str
    total_gb: float | None = None
    free_gb: float | None = None


def choose_gpu(free_gb: Sequence[float | None], need_gb: float | None,
               assigned: Sequence[Sequence[float | None]], total_gb: Sequence[float | None] | None = None,
               *, pending_gb: Sequence[float] | None = None, min_free_gb: float = 1.0) -> int | None:
    """Pick the GPU (an index into ``free_gb``) for a job, or None if none can take it now.

    ``free_gb[i]``: free memory now (None: unknown); ``assigned[i]``: the declared needs of the jobs
    already placed on GPU i (None: a job that declared nothing and so owns the GPU); ``need_gb``:
    the new job's need (None: it wants a whole GPU); ``pending_gb[i]``: the needs of jobs placed
    on GPU i so recently that ``free`` does not show their memory yet. A job that declared a need
    fits where ``need <= min(free - pending, total - sum(declared needs))``. Among the GPUs that
    fit, the least loaded (fewest jobs) wins, then the one with the most room, then the lowest index.
    """
    best: tuple | None = None
    for i, free in enumerate(free_gb):
        jobs = list(assigned[i]) if i < len(assigned) else []
        if any(n is None for n in jobs):
            continue  # owned by a job that did not declare its need
        if need_gb is None:
            if jobs or (free is not None and free < min_free_gb):
                continue
            room = free if free is not None else 0.0
        else:
            total = total_gb[i] if total_gb is not None and i < len(total_gb) else None
            pending = pending_gb[i] if pending_gb is not None and i < len(pending_gb) else 0.0
            limits = [x for x in (None if free is None else free - pending,
                                  None if total is None else total - sum(jobs)) if x is not None]
            if not limits:
                if jobs:
                    continue  # nothing known: one job per GPU
                room = 0.0
            else:
                room = min(limits)
                if need_gb > room:
                    continue
        key = (len(jobs), -room, i)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def round_robin(n_devices: int, assigned: Sequence[int], per_device: int | None = None) -> int | None:
    """The device with the fewest jobs (lowest index on ties); None when all hold ``per_device``."""
    if n_devices <= 0:
        return None
    counts = [assigned[i] if i < len(assigned) else 0 for i in range(n_devices)]
    i = min(range(n_devices), key=lambda k: (counts[k], k))
    if per_device is not None and counts[i] >= per_device:
        return None
    return i


def visible_devices_env() -> list[str] | None:
    """Entries of CUDA_VISIBLE_DEVICES, or None when it is unset (an empty list: GPUs hidden)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if any(v.startswith("-") for v in items):
        items = items[:[v.startswith("-") for v in items].index(True)]
    return items


def query_gpus(warn: Callable[[str], None] | None = None) -> list[Gpu] | None:
    """The visible GPUs with their memory, read through NVML; None (after one warning) if NVML fails.

    Honours CUDA_VISIBLE_DEVICES (indices or UUIDs): only those GPUs are returned, and their
    ``ident`` is the entry as written there.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            gpus: list[Gpu] = []
            uuids: dict[str, int] = {}
            infos = []
            for i in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    uuid = pynvml.nvmlDeviceGetUUID(handle)
                    uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                    uuids[uuid] = i
                except Exception:  # noqa: BLE001 - UUIDs only matter when CUDA_VISIBLE_DEVICES uses them
                    pass
                infos.append((mem.total / GiB, mem.free / GiB))
        finally:
            try:
                pynvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
    except Exception as exc:  # noqa: BLE001 - a missing or broken NVML must never stop a sweep
        if warn is not None:
            warn(f"NVML is not usable ({type(exc).__name__}: {exc}); not placing jobs by GPU memory")
        return None
    visible = visible_devices_env()
    if visible is None:
        return [Gpu(str(i), t, f) for i, (t, f) in enumerate(infos)]
    for entry in visible:
        idx = int(entry) if entry.isdigit() else next((i for u, i in uuids.items() if u.startswith(entry)), None)
        if idx is None or idx >= len(infos):
            if warn is not None:
                warn(f"CUDA_VISIBLE_DEVICES entry {entry!r} does not match a GPU NVML sees; skipping it")
            continue
        gpus.append(Gpu(entry, *infos[idx]))
    return gpus


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "TORCH_NUM_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap a job's CPU threads."""
    return {k: str(max(1, int(threads))) for k in THREAD_VARS}
