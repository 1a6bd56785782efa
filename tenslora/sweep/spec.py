"""Sweep files: validation, expansion into jobs, stable run names and the job command line."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenslora.errors import UsageError

TOP_KEYS = {
    "name": "a short name for the sweep (used for the default sweep directory)",
    "command": "the command prefix, a list of strings (default [tenslora, train])",
    "base": "options common to every run",
    "grid": "option -> list of values (cartesian product)",
    "runs": "an explicit list of option mappings",
    "seeds": "a list of integer seeds, each run is repeated once per seed",
    "timeout_s": "per-job timeout in seconds",
    "retries": "how many times a failed job is retried",
    "retry_backoff_s": "first retry delay in seconds (doubles each retry)",
    "memory_gb": "per-job GPU memory need in GiB (enables packing several jobs per GPU)",
    "cpus_per_job": "CPU threads per job",
    "gpus_per_job": "GPUs per job on Ray (default: 1 if the cluster has GPUs, else 0)",
    "host_memory_gb": "per-job host memory request on Ray, in GiB",
    "env": "extra environment variables for every job",
}
_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED = {"output_dir", "resume"}
_NAME_MAX = 80
_SAFE_RE = re.compile(r"[^A-Za-z0-9._=,+-]")

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its stable ``name``, all its ``options`` and those that identify it."""

    name: str
    options: dict[str, Any]
    varied: dict[str, Any]


@dataclass
class SweepSpec:
    """A validated sweep file."""

    name: str
    command: list[str] = field(default_factory=lambda: ["tenslora", "train"])
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] | None = None
    timeout_s: float | None = None
    retries: int = 2
    retry_backoff_s: float = 5.0
    memory_gb: float | None = None
    cpus_per_job: int | None = None
    gpus_per_job: float | None = None
    host_memory_gb: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """Per-job execution settings stored with each job."""
        return {"command": list(self.command), "timeout_s": self.timeout_s, "retries": self.retries,
                "retry_backoff_s": self.retry_backoff_s, "memory_gb": self.memory_gb,
                "cpus_per_job": self.cpus_per_job, "gpus_per_job": self.gpus_per_job,
                "host_memory_gb": self.host_memory_gb, "env": dict(self.env)}


def _where(source: str, key: str) -> str:
    return f"{source}: {key}"


def _check_value(value: Any, where: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(f"{where}: {value!r} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (list, tuple, dict)) or item is None:
                raise UsageError(f"{where}: list items must be numbers, strings or booleans, got {item!r}")
            _check_value(item, where)
        return list(value)
    raise UsageError(f"{where}: {value!r} ({type(value).__name__}) is not allowed; "
                     "use a number, a string, a boolean or a list of those")


def _check_options(mapping: Any, where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise UsageError(f"{where} must be a mapping of option -> value, got {type(mapping).__name__}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not _OPTION_RE.match(key):
            raise UsageError(f"{where}: option name {key!r} is not allowed (letters, digits, _ and -)")
        norm = key.replace("-", "_")
        if norm in _RESERVED:
            raise UsageError(f"{where}: option {key!r} is set by the sweep itself; remove it")
        out[norm] = _check_value(value, f"{where}.{key}")
    return out


def _number(value: Any, where: str, *, integer: bool = False, minimum: float = 0.0,
            allow_none: bool = True) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{where} must be {kind} >= {minimum:g}, got {value!r}")
    return value


def parse_sweep(data: Any, source: str = "sweep file", default_name: str = "sweep") -> SweepSpec:
    """Validate a parsed sweep mapping; raise ``UsageError`` (a ValueError) naming what is wrong."""
    if not isinstance(data, dict):
        raise UsageError(f"{source} must be a YAML mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise UsageError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(TOP_KEYS)}")
    spec = SweepSpec(name=default_name)
    if "name" in data:
        if not isinstance(data["name"], str) or not data["name"].strip():
            raise UsageError(f"{_where(source, 'name')} must be a non-empty string, got {data['name']!r}")
        spec.name = data["name"].strip()
    if "command" in data:
        cmd = data["command"]
        if isinstance(cmd, str):
            cmd = cmd.split()
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd):
            raise UsageError(f"{_where(source, 'command')} must be a non-empty list of strings, got {cmd!r}")
        spec.command = list(cmd)
    spec.base = _check_options(data.get("base"), _where(source, "base"))
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise UsageError(f"{_where(source, 'grid')} must be a non-empty mapping of option -> list "
                             f"of values, got {grid!r}")
        checked: dict[str, list[Any]] = {}
        for key, values in grid.items():
            where = f"{_where(source, 'grid')}.{key}"
            norm = next(iter(_check_options({key: 0}, _where(source, "grid"))))
            if not isinstance(values, list):
                raise UsageError(f"{where} must be a list of values, got {values!r}")
            if not values:
                raise UsageError(f"{where} is an empty list; give at least one value")
            checked[norm] = [_check_value(v, where) for v in values]
        spec.grid = checked
    runs = data.get("runs")
    if runs is not None:
        if not isinstance(runs, list) or not runs:
            raise UsageError(f"{_where(source, 'runs')} must be a non-empty list of option mappings, got {runs!r}")
        spec.runs = [_check_options(r, f"{_where(source, 'runs')}[{i}]") or {} for i, r in enumerate(runs)]
    if "seeds" in data:
        seeds = data["seeds"]
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise UsageError(f"{_where(source, 'seeds')} must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise UsageError(f"{_where(source, 'seeds')} has duplicates: {seeds!r}")
        if "seed" in spec.grid:
            raise UsageError(f"{source}: give seeds either as 'seeds' or as 'seed' in the grid, not both")
        if any("seed" in r for r in spec.runs):
            raise UsageError(f"{source}: a run sets 'seed' while 'seeds' is given; use one or the other")
        spec.seeds = list(seeds)
    if not spec.grid and not spec.runs:
        raise UsageError(f"{source}: nothing to run; give a non-empty 'grid' and/or 'runs'")
    spec.timeout_s = _number(data.get("timeout_s"), _where(source, "timeout_s"), minimum=0.001)
    spec.retries = _number(data.get("retries", 2), _where(source, "retries"), integer=True, allow_none=False)
    spec.retry_backoff_s = _number(data.get("retry_backoff_s", 5.0), _where(source, "retry_backoff_s"),
                                   allow_none=False)
    spec.memory_gb = _number(data.get("memory_gb"), _where(source, "memory_gb"), minimum=0.001)
    spec.cpus_per_job = _number(data.get("cpus_per_job"), _where(source, "cpus_per_job"), integer=True,
                                minimum=1)
    spec.gpus_per_job = _number(data.get("gpus_per_job"), _where(source, "gpus_per_job"))
    spec.host_memory_gb = _number(data.get("host_memory_gb"), _where(source, "host_memory_gb"), minimum=0.001)
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                            and not isinstance(v, bool) for k, v in env.items()):
        raise UsageError(f"{_where(source, 'env')} must map variable names to strings, got {env!r}")
    spec.env = {k: str(v) for k, v in env.items()}
    return spec


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML ({exc})") from None
    return parse_sweep(data, source=str(p), default_name=p.stem)


def format_value(value: Any) -> str:
    """How an option value is written on the command line and in names (lists joined with ``_``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "_".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _canonical(mapping: dict[str, Any]) -> str:
    return json.dumps(mapping, sort_keys=True, separators=(",", ":"), default=str)


def run_name(varied: dict[str, Any], max_len: int = _NAME_MAX) -> str:
    """Stable, readable, order-independent name: ``k=v,k=v`` sanitized, plus a short hash when needed."""
    if not varied:
        return "run"
    raw = ",".join(f"{k}={format_value(varied[k])}" for k in sorted(varied))
    safe = _SAFE_RE.sub("-", raw)
    if safe == raw and len(safe) <= max_len:
        return safe
    digest = hashlib.sha1(_canonical(varied).encode()).hexdigest()[:8]
    return f"{safe[:max_len - 9].rstrip(',-')}-{digest}"


def expand(spec: SweepSpec) -> list[Job]:
    """All jobs of a sweep, in file order, duplicates (same options) removed."""
    entries: list[dict[str, Any]] = []
    if spec.grid:
        keys = list(spec.grid)
        for combo in itertools.product(*(spec.grid[k] for k in keys)):
            entries.append(dict(zip(keys, combo)))
    entries.extend(dict(r) for r in spec.runs)
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for entry in entries:
        for seed in (spec.seeds if spec.seeds is not None else [None]):
            varied = dict(entry)
            if seed is not None:
                varied["seed"] = seed
            options = {**spec.base, **varied}
            name = run_name(varied)
            key = _canonical(options)
            if name in seen:
                if seen[name] != key:
                    raise UsageError(f"two runs are both named {name!r} but differ in their base options")
                continue
            seen[name] = key
            jobs.append(Job(name=name, options=options, varied=varied))
    return jobs


def option_args(options: dict[str, Any]) -> list[str]:
    """``{foo_bar: 1, flag: true, ranks: [8, 8, 4]}`` -> ``--foo-bar 1 --flag --ranks 8_8_4``."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args.extend([flag, format_value(value)])
    return args


def resolve_command(command: list[str]) -> list[str]:
    """The command prefix, with ``tenslora`` replaced by ``python -m tenslora`` when not on PATH."""
    if command and command[0] == "tenslora" and shutil.which("tenslora") is None:
        return [sys.executable, "-m", "tenslora", *command[1:]]
    return list(command)


def job_argv(command: list[str], options: dict[str, Any], run_dir: str | os.PathLike) -> list[str]:
    """The full job command: ``PREFIX --output-dir RUN_DIR --resume --opt v ...``."""
    return [*resolve_command(command), "--output-dir", str(run_dir), "--resume", *option_args(options)]
