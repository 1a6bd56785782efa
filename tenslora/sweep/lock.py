"""One scheduler per sweep directory: an ``flock`` on ``scheduler.lock`` plus the holder's pid and host."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from tenslora.errors import UsageError


class SweepLockedError(UsageError):
    """Another live scheduler runs this sweep directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class SweepLock:
    """Context manager holding the scheduler lock of a sweep directory.

    The kernel drops an ``flock`` when its holder dies, so a lock left by a killed scheduler is
    simply taken over (``recovered`` then describes the dead holder). On filesystems without
    ``flock`` the recorded pid decides (same host only).
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "scheduler.lock"
        self.fd: int | None = None
        self.recovered: dict[str, Any] | None = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        who = "another scheduler"
        if holder:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            who = f"pid {holder.get('pid')} on {holder.get('host')} (since {since})"
        raise SweepLockedError(f"sweep directory {str(self.path.parent)!r} is already being run by {who}; "
                               "stop that scheduler first (its lock file: scheduler.lock)")

    def acquire(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        holder = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                self._refuse(self._holder())
            # No flock on this filesystem: fall back to the recorded pid.
            holder = self._holder()
            if (holder and holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
                    and pid_alive(int(holder.get("pid", 0)))):
                os.close(fd)
                self._refuse(holder)
        holder = holder or self._holder()
        if holder and holder.get("pid"):
            self.recovered = holder  # the previous holder died without releasing the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                  "argv": sys.argv}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
