"""The per-job wrapper process: holds the job lock, runs one attempt, enforces the timeout, records the exit.

``python tenslora/sweep/runner.py --control DIR --log FILE --attempt N [--timeout S] -- CMD ...``

The wrapper lives in its own session, so it outlives a killed scheduler (which adopts it on
restart); the job process gets its own process group (killed as a whole on timeout) and dies
with the wrapper (Linux ``PR_SET_PDEATHSIG``). While the wrapper lives it holds an exclusive
``flock`` on ``DIR/job.lock``: that lock, not a pid, is what says "this job is running", so two
attempts of one job never overlap. The outcome goes to ``DIR/exit.json`` (atomically).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_BUSY = 75  # the job lock is held by another live attempt
LOCK_NAME = "job.lock"
EXIT_NAME = "exit.json"
ATTEMPT_NAME = "attempt.json"


def wrapper_command() -> list[str]:
    """How to start this wrapper: as a script (stdlib only), so it does not import tenslora and torch."""
    return [sys.executable, os.path.abspath(__file__)]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Parsed JSON, or None if the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def acquire_job_lock(control: Path, wait_s: float = 0.0) -> int | None:
    """An fd holding the exclusive job lock, or None if another live attempt keeps it for ``wait_s``."""
    control.mkdir(parents=True, exist_ok=True)
    fd = os.open(control / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(0.1)


def job_alive(control: Path) -> bool:
    """Whether some attempt of this job is running now (someone holds its job lock)."""
    if not (control / LOCK_NAME).exists():
        return False
    fd = acquire_job_lock(control, 0.0)
    if fd is None:
        return True
    os.close(fd)
    return False


def _die_with_parent() -> None:
    """Child pre-exec hook: get SIGKILL when the parent dies (Linux only; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_attempt(argv: list[str], *, control: Path, log: Path, attempt: int, timeout_s: float | None,
                kill_grace_s: float = 10.0) -> dict[str, Any]:
    """Run one attempt of a job (the caller holds the job lock); returns and writes its exit record."""
    control.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    started = time.time()
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with open(log, "ab", buffering=0) as out:
        out.write(f"=== attempt {attempt} on {host} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{subprocess.list2cmdline(argv)}\n".encode())
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except OSError as exc:
            out.write(f"=== could not start the job: {exc}\n".encode())
            record = {"attempt": attempt, "rc": 127, "timed_out": False, "signal": None,
                      "error": f"could not start: {exc}", "started": started, "ended": time.time(),
                      "host": host, "pid": None}
            write_json_atomic(control / EXIT_NAME, record)
            return record
        write_json_atomic(control / ATTEMPT_NAME, {"attempt": attempt, "wrapper_pid": os.getpid(),
                                                    "pid": proc.pid, "host": host, "started": started})
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        timed_out = False
        kill_at = None
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if kill_at is None and (stop["signal"] is not None or (deadline is not None and now >= deadline)):
                timed_out = stop["signal"] is None
                _killpg(proc.pid, signal.SIGTERM)
                kill_at = now + kill_grace_s
            elif kill_at is not None and now >= kill_at:
                _killpg(proc.pid, signal.SIGKILL)
        _killpg(proc.pid, signal.SIGKILL)  # leftovers of the job's process group
        rc = proc.returncode
        ended = time.time()
        if timed_out:
            error = f"timed out after {timeout_s:g}s"
        elif stop["signal"] is not None:
            error = f"stopped by signal {signal.Signals(stop['signal']).name}"
        elif rc < 0:
            error = f"killed by signal {signal.Signals(-rc).name}"
        elif rc:
            error = f"exit code {rc}"
        else:
            error = None
        record = {"attempt": attempt, "rc": rc, "timed_out": timed_out, "signal": stop["signal"],
                  "error": error, "started": started, "ended": ended, "host": host, "pid": proc.pid}
        write_json_atomic(control / EXIT_NAME, record)
        out.write(f"=== attempt {attempt} ended after {ended - started:.1f}s: {error or 'exit code 0'}\n".encode())
    return record


def execute_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt in a wrapper subprocess and return its exit record (the body of a Ray task)."""
    control = Path(payload["control"])
    cmd = [*wrapper_command(), "--control", str(control), "--log", payload["log"],
           "--attempt", str(payload["attempt"]), "--lock-wait", str(payload.get("lock_wait_s", 30.0))]
    if payload.get("timeout_s"):
        cmd += ["--timeout", str(payload["timeout_s"])]
    env = {**os.environ, **payload.get("env", {})}
    if payload.get("pythonpath"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (payload["pythonpath"], env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([*cmd, "--", *payload["argv"]], env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)
    rc = proc.wait()
    record = read_json(control / EXIT_NAME) if rc != EXIT_BUSY else None
    if not isinstance(record, dict) or record.get("attempt") != payload["attempt"]:
        record = {"attempt": payload["attempt"], "rc": None, "busy": rc == EXIT_BUSY,
                  "error": "another attempt of this job is still running" if rc == EXIT_BUSY
                  else f"the job wrapper exited with {rc} without an exit record",
                  "started": None, "ended": time.time(), "host": socket.gethostname()}
    try:
        import ray

        record["node"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - also usable outside Ray
        record["node"] = None
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner.py", description=__doc__)
    parser.add_argument("--control", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--attempt", required=True, type=int)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--lock-fd", type=int, default=None, help="an inherited fd that holds the job lock")
    parser.add_argument("--lock-wait", type=float, default=30.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no job command given after --")
    if args.lock_fd is not None:
        fd = args.lock_fd
    else:
        fd = acquire_job_lock(args.control, args.lock_wait)
        if fd is None:
            print(f"job in {args.control} is already running elsewhere", file=sys.stderr)
            return EXIT_BUSY
    try:
        record = run_attempt(command, control=args.control, log=args.log, attempt=args.attempt,
                             timeout_s=args.timeout)
    finally:
        os.close(fd)
    rc = record["rc"]
    return 0 if rc == 0 else (128 + -rc if rc < 0 else min(rc, 255) or 1)


if __name__ == "__main__":
    sys.exit(main())
