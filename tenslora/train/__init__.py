"""Training and evaluation of adapted classifiers (``tenslora train | evaluate | predict``).

``TrainConfig`` holds every option; ``train(cfg, callbacks)`` runs and returns the summary.
Imported lazily so that ``import tenslora.train.config`` stays light.
"""
from __future__ import annotations

__all__ = ["TrainConfig", "evaluate_run", "predict", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from tenslora.train.config import TrainConfig
        return TrainConfig
    if name == "train":
        from tenslora.train.loop import train
        return train
    if name in ("evaluate_run", "predict"):
        from tenslora.train import evaluate
        return getattr(evaluate, name)
    raise AttributeError(f"module 'tenslora.train' has no attribute {name!r}")
