"""PNG curves of a run's history (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], out_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    train = [r for r in history if "train_loss" in r]
    val = [r for r in history if any(k.startswith("validation_") for k in r)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["validation_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")
    if val:
        names = [k for k in val[-1] if k.startswith("validation_") and k != "validation_loss"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot([r["step"] for r in val], [r.get(name) for r in val], "o-", label=name.removeprefix("validation_"))
        ax.set_xlabel("step"), ax.set_ylabel("validation metric"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "validation_metrics.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "validation_metrics.png")
    return written
