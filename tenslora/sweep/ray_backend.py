"""The Ray backend: each job is a Ray task (with its CPU/GPU/memory request) that runs the job wrapper.

Only this driver writes the SQLite store; tasks write logs, run dirs and exit records into the
sweep directory, which must be on a filesystem shared by all nodes (with working ``flock``).
"""
from __future__ import annotations

import os
import time
from typing import Any

from tenslora.sweep.core import BaseScheduler, Handle, package_root
from tenslora.sweep.gpus import GiB, thread_env
from tenslora.sweep.runner import execute_job, job_alive
from tenslora.sweep.spec import job_argv


class RayScheduler(BaseScheduler):
    """Submits queued jobs as Ray tasks, at most ``slots`` (default: what the cluster can hold) at once."""

    backend = "ray"

    def __init__(self, sweep_dir: str | os.PathLike, *, address: str | None = None, slots: int | None = None,
                 **kwargs: Any):
        super().__init__(sweep_dir, **kwargs)
        if slots is not None and slots < 1:
            raise ValueError(f"--slots must be at least 1, got {slots}")
        self.address = address
        self.requested_slots = slots
        self.cluster: dict[str, float] = {}
        self._remote = None
        self._initialized_here = False

    def setup(self) -> None:
        import ray

        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            p for p in (package_root(), os.environ.get("PYTHONPATH")) if p)}}
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
            self._initialized_here = True
        self.cluster = dict(ray.cluster_resources())
        self._remote = ray.remote(execute_job)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.say(f"ray backend: {len(nodes)} node(s), {self.cluster.get('CPU', 0):g} CPU(s), "
                 f"{self.cluster.get('GPU', 0):g} GPU(s); at most {self.capacity()} job(s) at once")

    def teardown(self) -> None:
        if self._initialized_here:
            import ray

            ray.shutdown()

    def resources(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The Ray resource request of a job."""
        gpus = settings.get("gpus_per_job")
        if gpus is None:
            gpus = 1 if self.cluster.get("GPU", 0) > 0 else 0
        req: dict[str, Any] = {"num_cpus": settings.get("cpus_per_job") or 1, "num_gpus": gpus}
        if settings.get("host_memory_gb"):
            req["memory"] = int(settings["host_memory_gb"] * GiB)
        return req

    def capacity(self) -> int:
        if self.requested_slots:
            return self.requested_slots
        settings = self.store.get_meta("settings") or {}
        req = self.resources(settings)
        caps = [self.cluster.get("CPU", 1) / max(req["num_cpus"], 1e-9)]
        if req["num_gpus"]:
            caps.append(self.cluster.get("GPU", 0) / req["num_gpus"])
        return max(1, int(min(caps)))

    def launch(self, job: dict[str, Any]) -> bool:
        name, settings = job["name"], job["settings"] or {}
        control = self.paths.control(name)
        if job_alive(control):
            self.warn(f"{name} is queued but an attempt of it still runs; waiting for it", key=f"busy:{name}")
            return True
        (control / "exit.json").unlink(missing_ok=True)
        run_dir = self.paths.run_dir(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        req = self.resources(settings)
        started = time.time()
        attempt = self.store.mark_running(name, host=None, device=None, backend=self.backend, started_at=started)
        env = {**thread_env(int(max(1, req["num_cpus"]))), **(settings.get("env") or {})}
        payload = {"control": str(control), "log": str(self.paths.log(name)), "attempt": attempt,
                   "timeout_s": settings.get("timeout_s"), "env": env, "pythonpath": package_root(),
                   "argv": job_argv(settings.get("command") or ["tenslora", "train"], job["options"], run_dir)}
        ref = self._remote.options(max_retries=0, name=f"sweep:{name}", **req).remote(payload)
        self.running[name] = Handle(name, attempt, started, settings.get("timeout_s"), extra={"ref": ref})
        self.say(f"submit {name} (attempt {attempt}, {req})")
        return True

    def reap_own(self) -> None:
        import ray

        own = {h.extra["ref"]: h for h in self.running.values() if not h.adopted}
        if not own:
            return
        ready, _ = ray.wait(list(own), num_returns=len(own), timeout=0)
        for ref in ready:
            h = own[ref]
            try:
                record = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task error, a dead worker or node, a cancel
                if self._stop_signals:
                    record = None  # we cancelled it: requeue
                else:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    record = {"attempt": h.attempt, "rc": None,
                              "error": f"Ray task failed: {type(exc).__name__}: {first}"[:500]}
            if record is not None:
                node = record.get("node")
                self.store.set_where(h.name, record.get("host"), f"node:{node[:8]}" if node else None)
            self.finish(h.name, h.attempt, record)

    def kill(self, handle: Handle, sig: int) -> None:
        ref = handle.extra.get("ref")
        if ref is None:
            return super().kill(handle, sig)
        import ray

        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished
            pass
