"""Check a whole sweep against ``tenslora train``'s options before any job starts.

Every option name must be a :class:`~tenslora.train.config.TrainConfig` field, every value must
convert as the command line would convert it, and every job's options must pass TrainConfig's own
checks, the adapter's (construction, factorization, ranks, init, dropout) and the task lookup. The
first problem raises ``UsageError``: one line naming where it is and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Any

from tenslora.errors import UsageError
from tenslora.sweep.spec import Job, SweepSpec, format_value

_SET_BY_SWEEP = {"output_dir", "resume"}


def is_train_command(command: list[str]) -> bool:
    """``tenslora train`` or ``python -m tenslora train`` (a custom command is not checked)."""
    return len(command) >= 2 and command[-1] == "train" and Path(command[-2]).name == "tenslora"


def _field_types() -> dict[str, type]:
    """Option name -> its scalar type (``X | None`` -> ``X``)."""
    from tenslora.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = args[0] if args else hints[f.name]
    return out


def _convert(value: Any, tp: type) -> Any:
    """The value ``tenslora train`` receives for ``--opt value`` (what ``option_args`` writes)."""
    if value is None:
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError("is a flag: use true or false")
        return value
    text = format_value(value)
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("must be a number") from None
    return text


def _places(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(where, {option: [values]}) for every part of the file that sets options."""
    places = [("base", {k: [v] for k, v in spec.base.items()}), ("grid", dict(spec.grid))]
    places += [(f"runs[{i}]", {k: [v] for k, v in r.items()}) for i, r in enumerate(spec.runs)]
    return places


def check_options(spec: SweepSpec, source: str) -> None:
    """Each option name is a ``tenslora train`` option and each value has its type."""
    types = _field_types()
    allowed = sorted(set(types) - _SET_BY_SWEEP)
    for where, options in _places(spec):
        for key, values in options.items():
            if key not in types:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UsageError(f"{source}: {where}.{key}: not an option of tenslora train; {hint}"
                                 f"allowed: {', '.join(allowed)}")
            for value in values:
                try:
                    _convert(value, types[key])
                except ValueError as exc:
                    raise UsageError(f"{source}: {where}.{key}: {value!r} {exc} "
                                     f"(tenslora train --{key.replace('_', '-')})") from None


def check_job(options: dict[str, Any]) -> None:
    """Raise ValueError if ``tenslora train`` with these options would stop at its option checks."""
    from tenslora.train.config import TrainConfig
    from tenslora.train.modeling import adapter_config
    from tenslora.train.tasks import resolve_loader

    types = _field_types()
    values = {k: _convert(v, types[k]) for k, v in options.items() if v is not None}
    cfg = TrainConfig(**values, output_dir="run", resume=True)
    if str(cfg.ranks).strip().lower() == "auto":
        if cfg.budget is None:
            raise ValueError("--ranks auto needs --budget N (adapter parameters, or lora:k)")
    else:
        adapter_config(cfg)
    resolve_loader(cfg)


def validate_sweep(spec: SweepSpec, jobs: list[Job], source: str = "sweep file") -> None:
    """Validate every job of a ``tenslora train`` sweep up front (other commands are not checked)."""
    if not is_train_command(spec.command):
        return
    check_options(spec, source)
    seen: set[str] = set()
    for job in jobs:
        key = json.dumps({k: v for k, v in job.options.items() if k != "seed"}, sort_keys=True, default=str)
        if key in seen:  # jobs differing only by seed pass or fail together
            continue
        seen.add(key)
        try:
            check_job(job.options)
        except ValueError as exc:
            raise UsageError(f"{source}: run {job.name!r}: {exc}") from None
