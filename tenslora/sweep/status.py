"""``sweep status``: the jobs of a sweep directory with their state and times, failed jobs' log tails."""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from tenslora.sweep.lock import pid_alive
from tenslora.sweep.runner import read_json
from tenslora.sweep.store import Store

_STYLE = {"queued": "cyan", "running": "yellow", "done": "green", "failed": "bold red"}


def log_tail(path: str | os.PathLike, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if missing)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


def _clock(ts: float | None) -> str:
    return "-" if not ts else time.strftime("%m-%d %H:%M:%S", time.localtime(ts))


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def scheduler_holder(sweep_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The scheduler recorded in the lock file, with ``alive`` (None if unknown: another host)."""
    holder = read_json(Path(sweep_dir) / "scheduler.lock")
    if not isinstance(holder, dict) or not holder.get("pid"):
        return None
    import socket

    same_host = holder.get("host") == socket.gethostname()
    holder["alive"] = pid_alive(int(holder["pid"])) if same_host else None
    return holder


def render_status(sweep_dir: str | os.PathLike, console: Any = None, tail: int = 15) -> dict[str, int]:
    """Print the status table (and failed jobs' log tails); returns the count of jobs per state."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    console = console or Console(highlight=False)
    now = time.time()
    with Store(sweep_dir, create=False) as store:
        jobs = store.jobs()
        counts = store.counts()
        paths = store.paths
    holder = scheduler_holder(sweep_dir)
    if holder and holder["alive"] is not False:
        console.print(f"scheduler: pid {holder['pid']} on {holder.get('host')} since {_clock(holder.get('started'))}")
    else:
        console.print("scheduler: none running")
    table = Table(title=f"sweep {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for col in ("job", "state", "attempts", "device", "started", "ended", "time", "note"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        state = job["state"]
        started, ended = job["started_at"], job["ended_at"]
        note = ""
        if state == "running":
            took = now - started if started else None
            ended = None
        elif state == "queued":
            took = None
            if job["not_before"] and job["not_before"] > now:
                note = f"retry in {_dur(job['not_before'] - now)}: {job['error'] or ''}"
            elif job["error"]:
                note = job["error"]
            started = None if not job["attempts"] else started
        else:
            took = (ended - started) if (started and ended) else None
            if state == "failed":
                note = job["error"] or ""
            elif isinstance(job["summary"], dict) and isinstance(job["summary"].get("best"), dict):
                best = job["summary"]["best"]
                key = next((k for k in ("test_macro_f1", "test_accuracy") if k in best), None)
                note = f"{key} {best[key]:.4f}" if key and isinstance(best[key], (int, float)) else ""
        device = job["device"] or "-"
        if job["backend"] == "ray" and job["host"]:
            device = f"{device}@{job['host']}" if device != "-" else job["host"]
        table.add_row(escape(job["name"]), f"[{_STYLE[state]}]{state}[/]", str(job["attempts"]), escape(device),
                      _clock(started), _clock(ended), _dur(took), escape(note))
    console.print(table)
    for job in jobs:
        if job["state"] != "failed":
            continue
        text = log_tail(paths.log(job["name"]), tail) or "(no log)"
        console.print(Panel(escape(text.rstrip()), title=f"[bold red]{escape(job['name'])}[/]: "
                            f"{escape(job['error'] or '')}", subtitle=str(paths.log(job["name"])),
                            expand=False))
    return counts
