"""Resumable checkpoints, written atomically (temp dir + rename) by the main process only.

``checkpoint/`` holds the trainable weights, the optimizer, scheduler and loss-scaler states, the
RNG states of every process, the best-so-far weights, and ``state.json`` (step, epoch, position in
the epoch, best metric and step, history, elapsed time, and ``train``: the run's options, so that
a resume with other options is refused from the checkpoint alone).

A damaged file fails with a ValueError naming it (never a torch or pickle traceback).
"""
from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from tenslora.io import read_json, write_dir_atomic

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
DAMAGED_HINT = "start the run again with --overwrite instead of --resume"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, p in params.items():
        p.copy_(state[name].to(p.device, p.dtype))


def save_checkpoint(run_dir: Path, *, model, optimizer, scheduler, scaler, rng_states: list, best_weights,
                    state: dict) -> Path:
    """``state`` must carry ``train`` (the run's options, ``TrainConfig.to_dict()``)."""
    def fill(tmp: Path) -> None:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        if best_weights is not None:
            torch.save(best_weights, tmp / "best.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=float))
    return write_dir_atomic(Path(run_dir) / CHECKPOINT_DIR, fill)


def has_checkpoint(run_dir: Path) -> bool:
    """A ``checkpoint/`` folder (only ever renamed into place whole; a damaged one still counts)."""
    return (Path(run_dir) / CHECKPOINT_DIR).is_dir()


def read_state(run_dir: Path) -> dict:
    """``state.json`` of the run's checkpoint; a malformed one is a ValueError naming the file."""
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    try:
        state = read_json(path, f"{path} does not exist; {DAMAGED_HINT}")
    except ValueError as exc:
        raise ValueError(f"{exc}; {DAMAGED_HINT}") from None
    missing = [k for k in ("step", "epoch", "batch_in_epoch", "best", "history", "elapsed_s")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is incomplete (no {', '.join(missing)}); {DAMAGED_HINT}")
    return state


def _restore(path: Path, apply: Callable | None = None, *, weights_only: bool = True):
    """``torch.load(path)`` (then ``apply`` it); a missing, truncated or mismatched file -> ValueError."""
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing; {DAMAGED_HINT}")
    try:
        obj = torch.load(path, weights_only=weights_only)
        if apply is not None:
            apply(obj)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot restore {path} ({first}); {DAMAGED_HINT}") from None
    return obj


def load_checkpoint(run_dir: Path, *, model, optimizer, scheduler, scaler) -> tuple[dict, list, dict | None]:
    """Restore weights/optimizer/scheduler/scaler in place; return (state, rng_states, best_weights)."""
    path = Path(run_dir) / CHECKPOINT_DIR
    state = read_state(run_dir)
    _restore(path / "trainable.pt", lambda s: load_trainable_state(model, s))
    _restore(path / "optimizer.pt", optimizer.load_state_dict)
    _restore(path / "scheduler.pt", scheduler.load_state_dict)
    if scaler is not None and (path / "scaler.pt").is_file():
        _restore(path / "scaler.pt", scaler.load_state_dict)
    rng_states = _restore(path / "rng.pt", weights_only=False)  # python/numpy states are plain objects
    best = _restore(path / "best.pt") if (path / "best.pt").is_file() else None
    return state, rng_states, best
