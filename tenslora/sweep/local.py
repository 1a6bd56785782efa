"""The local backend: N slots on this machine, jobs packed onto GPUs by free memory, or CPU slots."""
from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tenslora.sweep.core import BaseScheduler, Handle, package_root
from tenslora.sweep.gpus import Gpu, choose_gpu, cpu_count, query_gpus, round_robin, thread_env, visible_devices_env
from tenslora.sweep.runner import acquire_job_lock, wrapper_command
from tenslora.sweep.spec import job_argv

_REFRESH_S = 1.0
SETTLE_S = 60.0  # a job's GPU memory is assumed not to show in NVML's free memory before this


class LocalScheduler(BaseScheduler):
    """Runs jobs as wrapper processes on this machine.

    Modes: ``gpu`` (NVML works: one GPU per job, or several when jobs declare ``memory_gb``),
    ``round-robin`` (NVML fails but CUDA_VISIBLE_DEVICES lists devices) and ``cpu`` (threads split
    over the slots: cores // slots each, at least 1).
    """

    backend = "local"

    def __init__(self, sweep_dir: str | os.PathLike, *, slots: int | None = None, cpu: bool = False,
                 **kwargs: Any):
        super().__init__(sweep_dir, **kwargs)
        if slots is not None and slots < 1:
            raise ValueError(f"--slots must be at least 1, got {slots}")
        self.requested_slots = slots
        self.force_cpu = cpu
        self.mode = "cpu"
        self.slots = 1
        self.gpus: list[Gpu] = []
        self.devices: list[str] = []
        self.cores = cpu_count()
        self._refreshed = 0.0

    # -- resources --------------------------------------------------------------------------
    def _spec_settings(self) -> dict[str, Any]:
        settings = self.store.get_meta("settings")
        if settings:
            return settings
        jobs = self.store.jobs(["queued", "running"])
        return jobs[0]["settings"] if jobs else {}

    def setup(self) -> None:
        settings = self._spec_settings()
        need = settings.get("memory_gb")
        gpus = None if self.force_cpu else query_gpus(warn=self.warn)
        visible = visible_devices_env()
        if gpus:
            self.mode, self.gpus = "gpu", gpus
            if self.requested_slots:
                self.slots = self.requested_slots
            elif need:
                self.slots = sum(max(1, int((g.total_gb or 0) // need)) for g in gpus)
            else:
                self.slots = len(gpus)
            self._refreshed = time.monotonic()
            where = ", ".join(f"{g.ident} ({g.free_gb:.1f}/{g.total_gb:.1f} GiB free)" for g in gpus)
            self.say(f"local backend: {self.slots} slot(s) on GPU(s) {where}")
        elif gpus is None and visible and not self.force_cpu:
            self.mode, self.devices = "round-robin", visible
            self.slots = self.requested_slots or len(visible)
            self.warn(f"placing jobs round-robin over CUDA_VISIBLE_DEVICES={','.join(visible)} "
                      "without memory information")
            self.say(f"local backend: {self.slots} slot(s), round-robin over devices {', '.join(visible)}")
        else:
            if gpus is None and not self.force_cpu:
                self.warn("no GPU information: running jobs on CPU slots")
            self.mode = "cpu"
            per_job = settings.get("cpus_per_job")
            self.slots = self.requested_slots or (max(1, self.cores // per_job) if per_job else 1)
            self.say(f"local backend: {self.slots} CPU slot(s), {self._threads(settings)} thread(s) each "
                     f"({self.cores} core(s))")

    def _threads(self, settings: dict[str, Any]) -> int:
        return int(settings.get("cpus_per_job") or max(1, self.cores // max(1, self.slots)))

    def capacity(self) -> int:
        return self.slots

    def _refresh_gpus(self) -> None:
        if time.monotonic() - self._refreshed < _REFRESH_S:
            return
        self._refreshed = time.monotonic()
        fresh = query_gpus(warn=lambda m: self.warn(m + "; keeping the last known free memory", key="nvml-refresh"))
        if fresh:
            by_id = {g.ident: g for g in fresh}
            self.gpus = [by_id.get(g.ident, g) for g in self.gpus]

    def _place(self, job: dict[str, Any]) -> tuple[bool, str | None]:
        """(placed?, device): device is a GPU ident, a device entry, or "cpu"."""
        settings = job["settings"] or {}
        if self.mode == "cpu":
            return True, "cpu"
        if self.mode == "round-robin":
            counts = [sum(1 for h in self.running.values() if h.device == d) for d in self.devices]
            i = round_robin(len(self.devices), counts, per_device=math.ceil(self.slots / len(self.devices)))
            return (i is not None), (None if i is None else self.devices[i])
        self._refresh_gpus()
        need = settings.get("memory_gb")
        assigned = [[h.extra.get("need") for h in self.running.values() if h.device == g.ident] for g in self.gpus]
        now = time.time()
        pending = [sum(h.extra.get("need") or 0.0 for h in self.running.values()
                       if h.device == g.ident and now - h.started < SETTLE_S) for g in self.gpus]
        i = choose_gpu([g.free_gb for g in self.gpus], need, assigned, [g.total_gb for g in self.gpus],
                       pending_gb=pending)
        if i is not None:
            return True, self.gpus[i].ident
        largest = max((g.total_gb or 0.0) for g in self.gpus)
        if need is not None and need > largest:
            self.store.fail_now(job["name"], f"needs {need:g} GiB of GPU memory but the largest GPU has "
                                             f"{largest:.1f} GiB")
            self.say(f"[bold red]failed[/bold red] {job['name']}: needs {need:g} GiB, largest GPU {largest:.1f} GiB")
            return True, None
        if not self.running:
            self.warn(f"waiting: no GPU has room for {job['name']} "
                      f"({'a whole GPU' if need is None else f'{need:g} GiB'})", key=f"wait:{job['name']}")
        return False, None

    # -- jobs -------------------------------------------------------------------------------
    def job_env(self, settings: dict[str, Any], device: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), env.get("PYTHONPATH")) if p)
        env.update(thread_env(self._threads(settings)))
        env.update(settings.get("env") or {})
        if self.mode == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        return env

    def launch(self, job: dict[str, Any]) -> bool:
        ok, device = self._place(job)
        if not ok:
            return False
        if device is None:  # failed for good in _place
            return True
        name, settings = job["name"], job["settings"] or {}
        control, log = self.paths.control(name), self.paths.log(name)
        fd = acquire_job_lock(control, 0.0)
        if fd is None:
            self.warn(f"{name} is queued but an attempt of it still runs; waiting for it", key=f"busy:{name}")
            return True
        try:
            (control / "exit.json").unlink(missing_ok=True)
            run_dir = self.paths.run_dir(name)
            run_dir.mkdir(parents=True, exist_ok=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            started = time.time()
            attempt = self.store.mark_running(name, host=self.host, device=device, backend=self.backend,
                                              started_at=started)
            argv = job_argv(settings.get("command") or ["tenslora", "train"], job["options"], run_dir)
            cmd = [*wrapper_command(), "--control", str(control), "--log", str(log),
                   "--attempt", str(attempt), "--lock-fd", str(fd)]
            if settings.get("timeout_s"):
                cmd += ["--timeout", str(settings["timeout_s"])]
            with open(log, "ab") as wrapper_out:
                try:
                    proc = subprocess.Popen([*cmd, "--", *argv], env=self.job_env(settings, device),
                                            pass_fds=(fd,), start_new_session=True, stdin=subprocess.DEVNULL,
                                            stdout=wrapper_out, stderr=wrapper_out)
                except OSError as exc:
                    self.running[name] = Handle(name, attempt, started, None)
                    self.finish(name, attempt, {"attempt": attempt, "rc": 127, "error": f"could not start: {exc}"})
                    return True
        finally:
            os.close(fd)
        self.store.set_pid(name, proc.pid)
        self.running[name] = Handle(name, attempt, started, settings.get("timeout_s"), device=device,
                                    pid=proc.pid, extra={"proc": proc, "need": settings.get("memory_gb")})
        where = "" if device in (None, "cpu") else f" on device {device}"
        self.say(f"start {name} (attempt {attempt}{where})")
        return True

    def reconcile(self) -> None:
        super().reconcile()
        for h in self.running.values():  # adopted jobs keep their GPU share
            if h.adopted:
                h.extra["need"] = (self.store.job(h.name)["settings"] or {}).get("memory_gb")

    def reap_own(self) -> None:
        for h in [h for h in self.running.values() if not h.adopted]:
            proc: subprocess.Popen = h.extra["proc"]
            if proc.poll() is not None:
                self.finish(h.name, h.attempt, self.exit_record(h.name, h.attempt))


def run_local(sweep_dir: str | Path, **kwargs: Any) -> LocalScheduler:
    """A local scheduler for ``sweep_dir`` (call ``.run()``)."""
    return LocalScheduler(sweep_dir, **kwargs)
