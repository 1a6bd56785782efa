"""SQLite job state of a sweep directory (WAL, one writer: the scheduler) and the directory layout."""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from tenslora.sweep.spec import Job

DB_NAME = "sweep.db"
STATES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    options TEXT NOT NULL,
    varied TEXT NOT NULL,
    settings TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    pid INTEGER,
    host TEXT,
    device TEXT,
    backend TEXT,
    added_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    last_rc INTEGER,
    error TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    job TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL,
    ended_at REAL,
    rc INTEGER,
    outcome TEXT,
    host TEXT,
    device TEXT,
    PRIMARY KEY (job, attempt)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class SweepPaths:
    """Where things live inside a sweep directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def lock(self) -> Path:
        return self.root / "scheduler.lock"

    def run_dir(self, name: str) -> Path:
        """The job's ``--output-dir`` (checkpoint, summary.json)."""
        return self.root / "runs" / name

    def log(self, name: str) -> Path:
        """The job's log (stdout+stderr of every attempt, appended)."""
        return self.root / "logs" / f"{name}.log"

    def control(self, name: str) -> Path:
        """The job's control files (job.lock, attempt.json, exit.json)."""
        return self.root / "control" / name


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


class Store:
    """The job table of one sweep directory."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.paths = SweepPaths(root)
        if not create and not self.paths.db.is_file():
            raise FileNotFoundError(f"{str(self.paths.root)!r} is not a sweep directory (no {DB_NAME})")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.paths.db, timeout=30.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout = 30000")
        if create:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta -------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- jobs -------------------------------------------------------------------------------
    def add_jobs(self, jobs: Iterable[Job], settings: dict[str, Any], *,
                 retry_failed: bool = False) -> tuple[int, int]:
        """Insert new jobs; refresh options/settings of jobs not done yet. Returns (added, updated)."""
        added = updated = 0
        now = time.time()
        with self.transaction() as c:
            seq = c.execute("SELECT COALESCE(MAX(seq), -1) FROM jobs").fetchone()[0]
            for job in jobs:
                row = c.execute("SELECT state, options, settings FROM jobs WHERE name = ?",
                                (job.name,)).fetchone()
                opts, sett = json.dumps(job.options), json.dumps(settings)
                if row is None:
                    seq += 1
                    c.execute("INSERT INTO jobs(name, seq, options, varied, settings, added_at) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                              (job.name, seq, opts, json.dumps(job.varied), sett, now))
                    added += 1
                    continue
                if row["state"] == "failed" and retry_failed:
                    c.execute("UPDATE jobs SET state = 'queued', failures = 0, not_before = 0, error = NULL "
                              "WHERE name = ?", (job.name,))
                    updated += 1
                if row["state"] != "done" and (row["options"] != opts or row["settings"] != sett):
                    c.execute("UPDATE jobs SET options = ?, settings = ? WHERE name = ?",
                              (opts, sett, job.name))
                    updated += 1
        return added, updated

    def drop_jobs(self, names: Iterable[str]) -> None:
        """Forget jobs that never started (nothing of theirs exists but their row)."""
        with self.transaction() as c:
            for name in names:
                c.execute("DELETE FROM jobs WHERE name = ? AND state = 'queued' AND attempts = 0", (name,))

    def job(self, name: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyError(name)
        return self._row(row)

    def jobs(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """All jobs (optionally only in ``states``), in the order they were added."""
        if states is None:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        else:
            states = list(states)
            marks = ",".join("?" * len(states))
            rows = self.conn.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq",
                                     states).fetchall()
        return [self._row(r) for r in rows]

    def attempts(self, name: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM attempts WHERE job = ? ORDER BY attempt", (name,)).fetchall()
        return [dict(r) for r in rows]

    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for key in ("options", "varied", "settings", "summary"):
            d[key] = _loads(d[key])
        return d

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in self.conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = n
        return out

    def ready(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Queued jobs whose backoff has passed, oldest first."""
        rows = self.conn.execute("SELECT * FROM jobs WHERE state = 'queued' AND not_before <= ? "
                                 "ORDER BY seq LIMIT ?", (now, limit)).fetchall()
        return [self._row(r) for r in rows]

    def next_wakeup(self) -> float | None:
        row = self.conn.execute("SELECT MIN(not_before) FROM jobs WHERE state = 'queued'").fetchone()
        return row[0]

    def mark_running(self, name: str, *, host: str, device: str | None, backend: str,
                     started_at: float) -> int:
        """Start a new attempt; returns its number."""
        with self.transaction() as c:
            attempt = c.execute("SELECT attempts FROM jobs WHERE name = ?", (name,)).fetchone()[0] + 1
            c.execute("UPDATE jobs SET state = 'running', attempts = ?, pid = NULL, host = ?, device = ?, "
                      "backend = ?, started_at = ?, ended_at = NULL WHERE name = ?",
                      (attempt, host, device, backend, started_at, name))
            c.execute("INSERT OR REPLACE INTO attempts(job, attempt, started_at, host, device) "
                      "VALUES (?, ?, ?, ?, ?)", (name, attempt, started_at, host, device))
        return attempt

    def set_pid(self, name: str, pid: int | None, host: str | None = None) -> None:
        with self.transaction() as c:
            if host is None:
                c.execute("UPDATE jobs SET pid = ? WHERE name = ?", (pid, name))
            else:
                c.execute("UPDATE jobs SET pid = ?, host = ? WHERE name = ?", (pid, host, name))

    def _end_attempt(self, c: sqlite3.Connection, name: str, attempt: int, ended_at: float,
                     rc: int | None, outcome: str, host: str | None = None) -> None:
        c.execute("UPDATE attempts SET ended_at = ?, rc = ?, outcome = ?, host = COALESCE(?, host) "
                  "WHERE job = ? AND attempt = ?", (ended_at, rc, outcome, host, name, attempt))

    def mark_done(self, name: str, attempt: int, *, ended_at: float, summary: Any,
                  host: str | None = None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state = 'done', pid = NULL, ended_at = ?, last_rc = 0, error = NULL, "
                      "summary = ?, host = COALESCE(?, host) WHERE name = ?",
                      (ended_at, json.dumps(summary), host, name))
            self._end_attempt(c, name, attempt, ended_at, 0, "done", host)

    def mark_failure(self, name: str, attempt: int, *, ended_at: float, rc: int | None, error: str,
                     retry_at: float | None, host: str | None = None) -> None:
        """A charged failure: requeue at ``retry_at`` or, when None, mark the job failed."""
        state = "failed" if retry_at is None else "queued"
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state = ?, failures = failures + 1, not_before = ?, pid = NULL, "
                      "ended_at = ?, last_rc = ?, error = ?, host = COALESCE(?, host) WHERE name = ?",
                      (state, retry_at or 0, ended_at, rc, error, host, name))
            self._end_attempt(c, name, attempt, ended_at, rc, "failed" if retry_at is None else "retry", host)

    def requeue(self, name: str, attempt: int, *, reason: str, not_before: float = 0.0) -> None:
        """Put an interrupted job back in the queue without charging a failure."""
        now = time.time()
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state = 'queued', pid = NULL, not_before = ?, error = ? "
                      "WHERE name = ?", (not_before, reason, name))
            self._end_attempt(c, name, attempt, now, None, "interrupted")

    def fail_now(self, name: str, error: str) -> None:
        """Mark a queued job failed without running it (it can never be placed)."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET state = 'failed', error = ?, ended_at = ? WHERE name = ?",
                      (error, time.time(), name))

    def set_where(self, name: str, host: str | None, device: str | None) -> None:
        """Record where an attempt ran (Ray: the node), once known."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET host = COALESCE(?, host), device = COALESCE(?, device) WHERE name = ?",
                      (host, device, name))
            c.execute("UPDATE attempts SET host = COALESCE(?, host), device = COALESCE(?, device) "
                      "WHERE job = ? AND attempt = (SELECT attempts FROM jobs WHERE name = ?)",
                      (host, device, name, name))
