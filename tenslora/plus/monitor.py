"""``Monitor``: a training callback logging TensLoRA+ metrics every N optimizer steps.

Every ``every`` steps it records, for the whole adapter (and per tensor with ``per_tensor=True``):
per-mode SVD entropy, top-1 energy, effective rank and norm of the mode-n unfoldings of the full
factorized tensors (exact, never reconstructed: :mod:`tenslora.plus.spectra`), per-mode (and core)
gradient norms, and the gradient norm of each optimizer group (``core``, ``factor:<mode>``,
``lora_A``, ``lora_B``, ``head``...). Outputs, under ``output_dir``:

- ``spectra.csv`` — long format ``step,tensor,mode,metric,value`` (per-group gradient norms use
  ``tensor=group``, ``mode=<group name>``, ``metric=grad_norm``); rewritten by a fresh run, appended
  to when resuming (a ``checkpoint`` directory exists), the last row of a step winning when read;
- TensorBoard scalars ``tensloraplus/<tensor>/<mode>/<metric>`` and ``tensloraplus/group/<name>/grad_norm``,
  on the trainer's SummaryWriter when one is found, else on one of its own in ``output_dir/tensorboard``;
- at the end: ``spectra_final.json`` (every mode's singular values) and PNG plots
  ``monitor_entropy.png`` (entropy and top-1 energy per mode over steps), ``monitor_spectra.png``
  (normalised singular values per mode at the end, log scale), ``monitor_grad_norms.png``.

Gradient norms are read in ``after_backward``, which the trainer calls after gradient clipping and
AMP unscaling and before ``optimizer.step()``: they are the true (unscaled, clipped) gradients.
Spectra are computed in ``on_step_end``, after the update. Only the main process writes.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from tenslora.plus import metrics as M

CSV_FILE = "spectra.csv"
FINAL_FILE = "spectra_final.json"
TB_DIR = "tensorboard"
PLOTS = ("monitor_entropy.png", "monitor_spectra.png", "monitor_grad_norms.png")
TB_METRICS = ("entropy", "top1_energy", "effective_rank", "norm", "grad_norm")


def _unwrap(adapted, accelerator=None):
    if accelerator is not None and hasattr(accelerator, "unwrap_model"):
        adapted = accelerator.unwrap_model(adapted)
    while not hasattr(adapted, "adapter_config") and hasattr(adapted, "module"):
        adapted = adapted.module
    return adapted


def _find_writer(accelerator):
    """The run's ``SummaryWriter``: ``accelerator.tensorboard_writer`` or its TensorBoard tracker."""
    if accelerator is None:
        return None
    writer = getattr(accelerator, "tensorboard_writer", None)
    if writer is not None:
        return writer
    for tracker in getattr(accelerator, "trackers", None) or []:
        if getattr(tracker, "name", "") == "tensorboard":
            return getattr(tracker, "writer", None) or getattr(tracker, "tracker", None)
    return None


class Monitor:
    """Training callback (``on_train_begin``, ``after_backward``, ``on_step_end``, ``on_train_end``).

    every: log every N optimizer steps (steps with ``step % every == 0``, and the last step at the end).
    per_tensor: also log each tensor of a multi-tensor construction (each projection for LoRA).
    writer: a ``SummaryWriter`` to log to (default: the trainer's, else one of its own).
    resume: append to an existing ``spectra.csv`` (default: when ``output_dir`` holds a checkpoint).
    """

    def __init__(self, every: int = 50, per_tensor: bool = False, plots: bool = True, writer=None,
                 output_dir: str | os.PathLike | None = None, resume: bool | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"monitor every must be a positive integer, got {every!r}")
        self.every, self.per_tensor, self.plots = every, per_tensor, plots
        self.resume = resume
        self.writer, self.output_dir = writer, Path(output_dir) if output_dir is not None else None
        self._own_writer = False
        self._groups: list[dict] | None = None
        self._grads: dict[int, list[tuple]] = {}
        self._last_logged: int | None = None
        self._last_step: int | None = None
        self._active = True
        self._csv = None

    # callback hooks ---------------------------------------------------------------------------
    def on_train_begin(self, adapted, accelerator=None, output_dir=None) -> None:
        self._active = accelerator is None or getattr(accelerator, "is_main_process", True)
        if not self._active:
            return
        if output_dir is not None:
            self.output_dir = Path(output_dir)
        if self.output_dir is None:
            raise ValueError("Monitor needs an output_dir (from the trainer or the constructor)")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        adapted = _unwrap(adapted, accelerator)
        from tenslora.plus.optim import build_param_groups
        self._groups = build_param_groups(adapted, lr=1.0)  # the roles only; lrs are irrelevant here
        if self.writer is None:
            self.writer = _find_writer(accelerator)
        path = self.output_dir / CSV_FILE
        resume = self.resume
        if resume is None:  # the trainer removes a finished run's checkpoint before a fresh start
            resume = any((self.output_dir / name).exists() for name in ("checkpoint", "checkpoints"))
        new = not resume or not path.exists() or path.stat().st_size == 0
        if not resume:  # a fresh run: drop this monitor's outputs of an earlier run (never other files)
            import shutil
            for name in (FINAL_FILE, *PLOTS):
                (self.output_dir / name).unlink(missing_ok=True)
            if self.writer is None and (self.output_dir / TB_DIR).is_dir():
                shutil.rmtree(self.output_dir / TB_DIR)
        self._csv = path.open("w" if new else "a", newline="")
        self._csv_writer = csv.writer(self._csv)
        if new:
            self._csv_writer.writerow(("step", "tensor", "mode", "metric", "value"))
            self._csv.flush()

    def _due(self, step: int) -> bool:
        return self._active and step % self.every == 0

    def after_backward(self, step: int, adapted) -> None:
        if not self._due(step):
            return
        adapted = _unwrap(adapted)
        rows = [(t, m, "grad_norm", v) for t, modes in M.gradient_norms(adapted, self.per_tensor).items()
                for m, v in modes.items()]
        rows += [("group", name, "grad_norm", v) for name, v in M.group_grad_norms(self._groups).items()]
        self._grads[step] = rows

    def on_step_end(self, step: int, adapted, logs: dict | None = None) -> None:
        self._last_step = step
        if self._due(step):
            self._log(step, _unwrap(adapted))

    def on_train_end(self, adapted) -> None:
        if not self._active or self._csv is None:
            return
        adapted = _unwrap(adapted)
        if self._last_step is not None and self._last_logged != self._last_step:
            self._log(self._last_step, adapted)
        spectra = M.mode_spectra(adapted, self.per_tensor)
        final = {"step": self._last_step,
                 "spectra": {t: {m: [float(x) for x in s] for m, s in modes.items()} for t, modes in spectra.items()}}
        tmp = self.output_dir / (FINAL_FILE + ".tmp")
        tmp.write_text(json.dumps(final, indent=1))
        os.replace(tmp, self.output_dir / FINAL_FILE)
        self._csv.close()
        self._csv = None
        if self._own_writer:
            self.writer.close()
        elif self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()
        if self.plots:
            plot_monitor(self.output_dir)

    # logging ----------------------------------------------------------------------------------
    def _log(self, step: int, adapted) -> None:
        rows = [(t, m, k, v) for t, m, k, v in M.rows(M.adapter_metrics(adapted, self.per_tensor, grads=False))]
        rows += self._grads.pop(step, [])
        self._grads.clear()
        for row in rows:
            self._csv_writer.writerow((step, *row))
        self._csv.flush()
        writer = self._tb()
        for tensor, mode, metric, value in rows:
            if metric in TB_METRICS and not (isinstance(value, float) and math.isnan(value)):
                tag = (f"tensloraplus/group/{mode}/{metric}" if tensor == "group"
                       else f"tensloraplus/{tensor}/{mode}/{metric}")
                writer.add_scalar(tag, value, step)
        self._last_logged = step

    def _tb(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output_dir / TB_DIR))
            self._own_writer = True
        return self.writer


def read_csv(path: str | os.PathLike) -> dict[tuple[str, str, str], list[tuple[int, float]]]:
    """``{(tensor, mode, metric): [(step, value), ...]}`` sorted by step, the last row of a step winning."""
    series: dict[tuple[str, str, str], dict[int, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            series.setdefault((row["tensor"], row["mode"], row["metric"]), {})[int(row["step"])] = float(row["value"])
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_monitor(output_dir: str | os.PathLike, tensor: str = M.AGGREGATE) -> list[Path]:
    """Write the three PNGs from ``spectra.csv`` and ``spectra_final.json`` in ``output_dir``; returns them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(output_dir)
    series = read_csv(out_dir / CSV_FILE)
    modes = list(dict.fromkeys(m for t, m, k in series if t == tensor and k == "entropy"))
    written = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        steps, values = zip(*series[(tensor, mode, "entropy")])
        line, = ax1.plot(steps, values, marker=".", label=mode)
        max_rank = series.get((tensor, mode, "max_rank"))
        if max_rank:
            ax1.axhline(math.log(max(max_rank[-1][1], 1)), color=line.get_color(), ls=":", lw=0.8)
        steps, values = zip(*series[(tensor, mode, "top1_energy")])
        ax2.plot(steps, values, marker=".", label=mode)
    ax1.set(title="SVD entropy per mode (dotted: ln max rank)", xlabel="step", ylabel="entropy (nats)")
    ax2.set(title="top-1 energy per mode", xlabel="step", ylabel="p_1", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "monitor_entropy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    final_path = out_dir / FINAL_FILE
    if final_path.exists():
        final = json.loads(final_path.read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, s in final["spectra"].get(tensor, {}).items():
            top = max(s) if s else 0
            if top > 0:
                values = [x / top for x in s if x / top > 1e-12]
                ax.semilogy(range(1, len(values) + 1), values, marker="o", ms=3, label=mode)
        ax.set(title=f"spectrum per mode at step {final['step']}", xlabel="index i", ylabel="s_i / s_1")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "monitor_spectra.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    groups = [(m, v) for (t, m, k), v in series.items() if t == "group" and k == "grad_norm"]
    if groups:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for name, points in groups:
            steps, values = zip(*points)
            if any(v > 0 for v in values):
                ax.semilogy(steps, [max(v, 1e-30) for v in values], marker=".", label=name)
        ax.set(title="gradient norm per optimizer group (unscaled, after clipping)", xlabel="step",
               ylabel="||grad||")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        written.append(out_dir / "monitor_grad_norms.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
