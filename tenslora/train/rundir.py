"""The run directory before a run starts: what it holds, and what ``tenslora train`` may do with it.

=====================================  ===========  ===================  ======================
the directory holds                    (no flag)    ``--resume``         ``--overwrite``
=====================================  ===========  ===================  ======================
nothing, or outputs of a run that      fresh run    fresh run            fresh run
died before its first checkpoint
an interrupted run (``checkpoint/``)   refused      continue it          replace it
a finished run (``summary.json``)      refused      left as is           replace it
=====================================  ===========  ===================  ======================

Nothing here writes. :func:`plan` runs before any input is loaded; a run's old outputs are only
moved aside and removed by :func:`remove_outputs`, once the new run has loaded its data and model.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tenslora.errors import UsageError
from tenslora.io import read_json
from tenslora.train import checkpoint as ckpt

SUMMARY = "summary.json"
CONFIG = "config.json"
OUTPUTS = (SUMMARY, "metrics.csv", "tb", "best_adapter", "final_adapter", ckpt.CHECKPOINT_DIR, "loss.png",
           "validation_metrics.png")
# options a resumed run may change: they do not change what the run computes
RESUME_MAY_CHANGE = {"resume", "overwrite", "progress", "output_dir", "run_name", "checkpoint_every", "log_every",
                     "num_workers", "threads"}


@dataclass
class Plan:
    """``action``: ``fresh`` | ``resume`` | ``done``. ``summary``: the finished run's (``done``);
    ``saved``: the options the checkpoint was written with (``resume``); ``replace``: old outputs to
    remove (``fresh``)."""

    out: Path
    action: str
    summary: dict | None = None
    saved: dict = field(default_factory=dict)
    replace: list[str] = field(default_factory=list)


def plan(cfg) -> Plan:
    """Decide what to do with ``cfg``'s run directory (see the table); refuse with a UsageError naming
    the flag to add. Validates that the directory can be written before anything is loaded."""
    out = cfg.resolved_output_dir()
    _check_directory(out)
    present = [name for name in OUTPUTS if (out / name).exists()]
    finished = SUMMARY in present
    interrupted = not finished and ckpt.has_checkpoint(out)
    if finished and cfg.resume:
        summary = read_json(out / SUMMARY, f"{out / SUMMARY} does not exist")
        return Plan(out, "done", summary=summary)
    if finished and not cfg.overwrite:
        raise UsageError(f"{out} holds a finished run ({SUMMARY}); add --overwrite to replace it, --resume to leave "
                         "it as is, or choose another --output-dir")
    if interrupted and cfg.resume:
        _check_writable(out, present)
        saved = saved_options(out)
        _check_same_run(out, saved, cfg)
        return Plan(out, "resume", saved=saved)
    if interrupted and not cfg.overwrite:
        raise UsageError(f"{out} holds an interrupted run ({ckpt.CHECKPOINT_DIR}/); add --resume to continue it or "
                         "--overwrite to start over")
    _check_writable(out, present)
    return Plan(out, "fresh", replace=present)


ASIDE = ".replaced."


def remove_outputs(run: Plan) -> None:
    """Move the old run's outputs aside, then delete them (never other files in the directory; an
    aside folder left by a removal that was killed midway goes too)."""
    if not run.replace:
        return
    aside = run.out / f"{ASIDE}{os.getpid()}"
    aside.mkdir(exist_ok=True)
    for name in run.replace:
        os.replace(run.out / name, aside / name)
    for old in run.out.glob(f"{ASIDE}*"):
        shutil.rmtree(old)


def saved_options(out: Path) -> dict:
    """The train options of the run's checkpoint (``state.json``'s ``train``; for a checkpoint written
    before it held them, ``config.json``'s)."""
    saved = ckpt.read_state(out).get("train")
    if saved is None and (out / CONFIG).is_file():
        saved = read_json(out / CONFIG, "").get("train")
    if saved is None:
        raise UsageError(f"{out / ckpt.CHECKPOINT_DIR / ckpt.STATE_FILE} does not record the run's options; "
                         "start the run again with --overwrite")
    return saved


def _check_same_run(out: Path, saved: dict, cfg) -> None:
    """Resuming with other options would not continue the same run: refuse, naming the options."""
    now = cfg.to_dict()
    if str(now.get("ranks")).strip().lower() == "auto":
        now["ranks"] = saved.get("ranks")  # resolved when the run began
    differ = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
    if differ:
        raise UsageError(f"cannot --resume {out} with different options: " +
                         ", ".join(f"{k} (was {saved[k]!r}, now {now[k]!r})" for k in differ))


def _check_directory(out: Path) -> None:
    """``out`` must be a directory or creatable as one (no file in the way)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "--output-dir" if p == out else f"--output-dir {out}: its parent"
                raise UsageError(f"{what} {p} is a file, not a directory; choose another --output-dir")
            return


def _check_writable(out: Path, present: list[str]) -> None:
    """The directory that will hold the run (``out``, or its nearest existing parent) and every directory
    of the outputs to be replaced must be writable: this fails here, before any work, not midway."""
    dirs = [next(p for p in (out, *out.parents) if p.exists())]
    for name in present:
        if (out / name).is_dir():
            dirs += [out / name, *(Path(root) / d for root, ds, _ in os.walk(out / name) for d in ds)]
    for d in dirs:
        if not os.access(d, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {d}: permission denied; make it writable or choose another "
                             "--output-dir")
