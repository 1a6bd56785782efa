"""Resumable checkpoints, written atomically (temp dir + rename) by the main process only.

``checkpoint/`` holds the trainable weights, the optimizer, scheduler and loss-scaler states, the
RNG states of every process, the best-so-far weights, and ``state.json`` (step, epoch, position in
the epoch, best metric and step, history, elapsed time).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tenslora.io import write_dir_atomic

CHECKPOINT_DIR = "checkpoint"


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
    def fill(tmp: Path) -> None:
        torch.save(trainable_state(model), tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        if best_weights is not None:
            torch.save(best_weights, tmp / "best.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    return write_dir_atomic(Path(run_dir) / CHECKPOINT_DIR, fill)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(run_dir: Path, *, model, optimizer, scheduler, scaler) -> tuple[dict, list, dict | None]:
    """Restore weights/optimizer/scheduler/scaler in place; return (state, rng_states, best_weights)."""
    path = Path(run_dir) / CHECKPOINT_DIR
    state = json.loads((path / "state.json").read_text())
    load_trainable_state(model, torch.load(path / "trainable.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_states = torch.load(path / "rng.pt", weights_only=False)  # python/numpy states are plain objects
    best = torch.load(path / "best.pt", weights_only=True) if (path / "best.pt").is_file() else None
    return state, rng_states, best
