"""What both schedulers share: the lock, reconciling state after a crash, settling attempts, the loop."""
from __future__ import annotations

import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tenslora.sweep.changes import check_edit, settings_changes
from tenslora.sweep.lock import SweepLock, pid_alive
from tenslora.sweep.runner import ATTEMPT_NAME, EXIT_NAME, job_alive, read_json
from tenslora.sweep.spec import Job
from tenslora.sweep.store import Store, SweepPaths

MAX_BACKOFF_S = 3600.0
USAGE_EXIT = 2  # tenslora's exit code for bad user input (and click's, and argparse's)
BACKSTOP_S = 60.0  # the wrapper enforces timeouts; the scheduler steps in this much later


def default_sweep_dir(name: str) -> Path:
    """``sweeps/<name>`` (sanitized) under the current directory."""
    return Path("sweeps") / (re.sub(r"[^A-Za-z0-9._=,+-]", "-", name).strip(".") or "sweep")


def last_error_line(log: Path) -> str | None:
    """The last ``error: ...`` line of a job log (how the CLI reports a user mistake), if any."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.strip() for ln in reversed(lines) if ln.startswith(("error:", "Error:"))), None)


def package_root() -> str:
    """The directory that holds the ``tenslora`` package (added to jobs' PYTHONPATH)."""
    return str(Path(__file__).resolve().parents[2])


@dataclass
class Handle:
    """A running attempt the scheduler watches."""

    name: str
    attempt: int
    started: float
    timeout_s: float | None
    device: str | None = None
    pid: int | None = None
    adopted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class BaseScheduler:
    """Runs every queued job of a sweep directory until none is left (subclasses launch and reap)."""

    backend = "base"

    def __init__(self, sweep_dir: str | os.PathLike, *, console: Any = None, poll_s: float = 0.2,
                 kill_grace_s: float = 10.0):
        from rich.console import Console

        self.paths = SweepPaths(Path(sweep_dir).absolute())
        self.console = console or Console(highlight=False)
        self.poll_s = poll_s
        self.kill_grace_s = kill_grace_s
        self.host = socket.gethostname()
        self.running: dict[str, Handle] = {}
        self.store: Store | None = None
        self._stop_signals = 0
        self._warned: set[str] = set()

    # -- messages ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", soft_wrap=True)

    def warn(self, msg: str, key: str | None = None) -> None:
        """Print a warning, once per ``key`` (default: the message)."""
        key = key or msg
        if key not in self._warned:
            self._warned.add(key)
            self.console.print(f"[yellow]warning:[/yellow] {msg}", soft_wrap=True)

    # -- hooks for backends -----------------------------------------------------------------
    def setup(self) -> None:
        """Discover resources (GPUs, a Ray cluster)."""

    def teardown(self) -> None:
        """Release resources."""

    def capacity(self) -> int:
        """How many jobs may run at once."""
        raise NotImplementedError

    def launch(self, job: dict[str, Any]) -> bool:
        """Start a queued job; False if it cannot be placed now (stop launching this round)."""
        raise NotImplementedError

    def reap_own(self) -> None:
        """Settle the finished attempts this scheduler started."""
        raise NotImplementedError

    def kill(self, handle: Handle, sig: int) -> None:
        """Signal a running attempt (its wrapper process)."""
        pid = handle.pid
        if pid is None:
            info = read_json(self.paths.control(handle.name) / ATTEMPT_NAME)
            if isinstance(info, dict) and info.get("attempt") == handle.attempt and info.get("host") == self.host:
                pid = info.get("wrapper_pid")
        if pid and pid_alive(pid):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    # -- settling ---------------------------------------------------------------------------
    def finish(self, name: str, attempt: int, record: dict[str, Any] | None) -> str:
        """Record the outcome of an attempt: done, retry (with backoff), failed or interrupted."""
        store = self.store
        job = store.job(name)
        now = time.time()
        handle = self.running.pop(name, None)
        if job["state"] != "running" or job["attempts"] != attempt:
            return "stale"
        if record is None or record.get("busy"):
            reason = (record or {}).get("error") or "interrupted: its wrapper is gone without an exit record"
            store.requeue(name, attempt, reason=reason, not_before=now + (5.0 if record else 0.0))
            self.say(f"[yellow]requeued[/yellow] {name} ({reason})")
            return "interrupted"
        host = record.get("host")
        if record.get("signal") is not None and not record.get("timed_out"):
            store.requeue(name, attempt, reason=record.get("error") or "stopped")
            self.say(f"[yellow]stopped[/yellow] {name}; it will resume on the next run")
            return "interrupted"
        started = record.get("started") or (handle.started if handle else job["started_at"]) or now
        took = (record.get("ended") or now) - started
        if record.get("rc") == 0:
            summary = read_json(self.paths.run_dir(name) / "summary.json")
            if isinstance(summary, dict):
                store.mark_done(name, attempt, ended_at=record.get("ended") or now, summary=summary, host=host)
                self.say(f"[green]done[/green] {name} in {took:.1f}s")
                return "done"
            error = "exited 0 but wrote no valid summary.json"
        else:
            error = record.get("error") or f"exit code {record.get('rc')}"
        settings = job["settings"] or {}
        failures = job["failures"] + 1
        retries = int(settings.get("retries", 2))
        usage = record.get("rc") == USAGE_EXIT
        if usage:  # a user mistake fails the same way every time: not retried
            error = f"usage error, not retried: {last_error_line(self.paths.log(name)) or error}"
        if failures <= retries and not usage:
            delay = min(MAX_BACKOFF_S, float(settings.get("retry_backoff_s", 5.0)) * 2 ** (failures - 1))
            store.mark_failure(name, attempt, ended_at=now, rc=record.get("rc"), error=error,
                               retry_at=now + delay, host=host)
            self.say(f"[red]{error}[/red]: {name} (attempt {attempt}); retry {failures}/{retries} in {delay:g}s")
            return "retry"
        store.mark_failure(name, attempt, ended_at=now, rc=record.get("rc"), error=error, retry_at=None,
                           host=host)
        self.say(f"[bold red]failed[/bold red] {name} after {failures} failure(s): {error} "
                 f"(log: {self.paths.log(name)})")
        return "failed"

    def exit_record(self, name: str, attempt: int) -> dict[str, Any] | None:
        rec = read_json(self.paths.control(name) / EXIT_NAME)
        return rec if isinstance(rec, dict) and rec.get("attempt") == attempt else None

    def reconcile(self) -> None:
        """Jobs marked running by a dead scheduler: adopt the live ones, settle or requeue the rest."""
        for job in self.store.jobs(["running"]):
            name, attempt = job["name"], job["attempts"]
            if job_alive(self.paths.control(name)):
                info = read_json(self.paths.control(name) / ATTEMPT_NAME) or {}
                pid = info.get("wrapper_pid") if info.get("attempt") == attempt else job["pid"]
                self.running[name] = Handle(name, attempt, job["started_at"] or time.time(),
                                            (job["settings"] or {}).get("timeout_s"), device=job["device"],
                                            pid=pid, adopted=True)
                self.say(f"adopted {name} (attempt {attempt}, still running from a previous scheduler)")
            else:
                self.finish(name, attempt, self.exit_record(name, attempt))

    def reap_adopted(self) -> None:
        for h in [h for h in self.running.values() if h.adopted]:
            if not job_alive(self.paths.control(h.name)):
                self.finish(h.name, h.attempt, self.exit_record(h.name, h.attempt))

    def enforce_backstop(self) -> None:
        """Kill attempts that outlived their timeout by far (a stuck wrapper)."""
        now = time.time()
        for h in list(self.running.values()):
            if h.timeout_s and now - h.started > h.timeout_s + self.kill_grace_s + BACKSTOP_S:
                if not h.extra.get("backstop"):
                    self.warn(f"{h.name} outlived its timeout; killing it", key=f"backstop:{h.name}")
                    h.extra["backstop"] = now
                    self.kill(h, signal.SIGTERM)
                elif now - h.extra["backstop"] > self.kill_grace_s:
                    self.kill(h, signal.SIGKILL)

    # -- main loop --------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signals += 1
        if self._stop_signals == 1:
            self.console.print("[yellow]stopping: interrupting running jobs (they resume on the next run); "
                               "press Ctrl-C again to leave them running[/yellow]", soft_wrap=True)
            for h in self.running.values():
                self.kill(h, signal.SIGTERM)
        else:
            raise KeyboardInterrupt

    def run(self, jobs: Iterable[Job] | None = None, settings: dict[str, Any] | None = None, *,
            retry_failed: bool = False, meta: dict[str, Any] | None = None,
            one_sweep: bool = False) -> dict[str, int]:
        """Add ``jobs`` (if given), then run everything queued; returns the final state counts.

        ``one_sweep``: ``jobs`` are the whole sweep of this directory (``tenslora sweep run``): an edit
        that changes or drops a started job is refused, never-started jobs no longer listed are dropped
        (see :mod:`tenslora.sweep.changes`). Without it, jobs are only added or refreshed."""
        with SweepLock(self.paths.root) as lock, Store(self.paths.root) as store:
            self.store = store
            if lock.recovered:
                self.say(f"recovered the lock of a scheduler that is gone (pid {lock.recovered.get('pid')} "
                         f"on {lock.recovered.get('host')})")
            if jobs is not None:
                jobs, settings, dropped, changed = list(jobs), settings or {}, [], []
                if one_sweep:
                    dropped = check_edit(store.jobs(), jobs, settings, root=str(self.paths.root),
                                         source=(meta or {}).get("spec_file") or "the sweep file")
                    changed = settings_changes(store.get_meta("settings"), settings)
                    store.drop_jobs(dropped)
                added, updated = store.add_jobs(jobs, settings, retry_failed=retry_failed)
                if dropped:
                    self.say(f"dropped {len(dropped)} never-started job(s) no longer in the sweep file: "
                             + ", ".join(dropped))
                if changed:
                    self.say("settings changed since the last run (apply to jobs not done): " + "; ".join(changed))
                if meta:
                    for key, value in meta.items():
                        store.set_meta(key, value)
                c = store.counts()
                self.say(f"sweep {self.paths.root}: {added} new job(s), {updated} updated; "
                         f"{c['done']} done, {c['queued'] + c['running']} to run, {c['failed']} failed")
            old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for s in old:
                    signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                old = {}
            try:
                self.setup()
                self.reconcile()
                self._loop()
            except KeyboardInterrupt:
                self.console.print("[yellow]left running jobs alone; the next run adopts them[/yellow]",
                                   soft_wrap=True)
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
                self.teardown()
            counts = store.counts()
            self.store = None
        return counts

    def _loop(self) -> None:
        store = self.store
        while True:
            self.reap_own()
            self.reap_adopted()
            self.enforce_backstop()
            if self._stop_signals:
                if not self.running:
                    return
                time.sleep(self.poll_s)
                continue
            now = time.time()
            free = self.capacity() - len(self.running)
            if free > 0:  # a few spare candidates: a job can be skipped (its old attempt still runs)
                for job in store.ready(now, free + 8):
                    if len(self.running) >= self.capacity():
                        break
                    if job["name"] in self.running or not self.launch(job):
                        break
            if not self.running:
                wake = store.next_wakeup()
                if wake is None:
                    return
                if wake > now:
                    time.sleep(min(max(wake - now, 0.01), 1.0))
                    continue
            time.sleep(self.poll_s)
