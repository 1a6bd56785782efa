"""``train(cfg, callbacks) -> summary``: fine-tune a classifier with an adapter, on HF Accelerate.

Read top to bottom: :func:`tenslora.train.session.set_up` builds (or restores) everything, then the
loop runs optimizer steps (accumulate, clip, step, log, evaluate and select, checkpoint), then the
final and the best-validation weights are evaluated on test and the outputs written.
``summary.json`` is written last and atomically.

Callbacks may implement any of ``on_train_begin(adapted, accelerator, output_dir)``,
``after_backward(step, adapted)`` (gradients complete and unscaled, clipped, before the optimizer
step), ``on_step_end(step, adapted, logs)`` and ``on_train_end(adapted)``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import shutil
import time
from pathlib import Path

import torch

from tenslora.io import write_json_atomic
from tenslora.train import checkpoint as ckpt
from tenslora.train.accel import cpu_time_s, peak_memory_mb, rng_state, seeded_rng, use_cpu
from tenslora.train.config import TrainConfig
from tenslora.train.evaluate import evaluate_loader
from tenslora.train.memory import active_allocator
from tenslora.train.metrics import is_better, majority_baseline
from tenslora.train.rundir import SUMMARY
from tenslora.train.session import Session, call, set_up
from tenslora.train.setup import derived_seed


def train(cfg: TrainConfig, callbacks=()) -> dict:
    """One run; returns its summary (also written to ``summary.json``). Every random draw (head, adapter,
    data order, dropout) follows ``cfg.seed`` alone, and the caller's global RNG states are left as found."""
    from accelerate import PartialState
    process = PartialState(cpu=use_cpu(cfg)).process_index  # each process its own dropout stream
    with seeded_rng(derived_seed(cfg.seed, f"train/{process}")):
        return _train(cfg, callbacks)


def _train(cfg: TrainConfig, callbacks) -> dict:
    t_start = time.time()
    s = set_up(cfg, callbacks)
    if not isinstance(s, Session):
        return s  # a finished run, left as is
    from tqdm.auto import tqdm
    p = s.progress
    bar = tqdm(total=s.total_steps, initial=p.step, disable=not (s.is_main and s.cfg.progress), desc="train",
               dynamic_ncols=True)
    batches = _batches(s)
    s.model.train()
    t_loop, steps_run = time.time(), 0
    while p.step < s.total_steps:
        loss, grad_norm = _optimizer_step(s, batches)
        steps_run += 1
        logs = _logs(s, loss, grad_norm, bar)
        if p.step % s.eval_every == 0 or p.step == s.total_steps:
            logs.update(_evaluate_and_select(s, bar))
        _record(s, logs)
        call(s.callbacks, "on_step_end", p.step, s.unwrapped, logs)
        bar.update(1)
        if p.step % s.checkpoint_every == 0 and p.step < s.total_steps:
            _checkpoint(s, t_start)
    bar.close()
    return _finish(s, t_start, train_time=time.time() - t_loop, steps_run=steps_run)


def _batches(s: Session):
    """Micro-batches from ``(epoch, batch_in_epoch)`` on; a new epoch reshuffles from the seed."""
    p, per_batch = s.progress, s.cfg.batch_size * s.accelerator.num_processes
    while True:
        s.sampler.position(p.epoch, skip=p.batch_in_epoch * per_batch)
        for batch in s.train_loader:
            p.batch_in_epoch += 1
            yield batch
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0


def _optimizer_step(s: Session, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate ``grad_accum`` micro-batches, clip, step: ``(mean loss, gradient norm)`` (0-d tensors)."""
    cfg, acc, params = s.cfg, s.accelerator, s.params
    loss_sum = torch.zeros((), device=acc.device)
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        sync = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(s.model):
            loss = s.model(**batch).loss
            acc.backward(loss / cfg.grad_accum)
        loss_sum += loss.detach() / cfg.grad_accum
    if cfg.max_grad_norm > 0:  # unscales fp16 gradients before clipping
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        acc.unscale_gradients()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    call(s.callbacks, "after_backward", s.progress.step + 1, s.unwrapped)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.progress.step += 1
    return loss_sum, grad_norm


def _logs(s: Session, loss: torch.Tensor, grad_norm: torch.Tensor, bar) -> dict:
    """The step's log row: step and epoch, plus loss, lr and gradient norm every ``log_every`` steps."""
    p = s.progress
    logs = {"step": p.step, "epoch": round(p.epoch + p.batch_in_epoch / max(len(s.train_loader), 1), 4)}
    if p.step % s.cfg.log_every == 0 or p.step == s.total_steps or p.step == 1:
        logs["train_loss"] = s.accelerator.reduce(loss, "mean").item()
        logs["lr"] = s.scheduler.get_last_lr()[0]
        logs["grad_norm"] = float(grad_norm)
        bar.set_postfix(loss=f"{logs['train_loss']:.4f}", lr=f"{logs['lr']:.2e}")
    return logs


def _evaluate(s: Session, split: str) -> dict:
    return evaluate_loader(s.model, s.eval_loaders[split], s.accelerator, s.run.problem_type, s.run.num_labels)


def _evaluate_and_select(s: Session, bar) -> dict:
    """Validation metrics (prefixed); a new best by ``select`` keeps its weights and saves ``best_adapter``."""
    p = s.progress
    val = s.last_validation = _evaluate(s, "validation")
    if is_better(s.select, val[s.select], p.best["value"]):
        p.best = {"value": val[s.select], "step": p.step, "validation": val}
        s.best_weights = ckpt.trainable_state(s.unwrapped)
        if s.is_main:
            s.unwrapped.save_adapter(s.out / "best_adapter")
    if s.is_main and s.cfg.progress:
        bar.write(f"step {p.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    return _prefixed("validation", val)


def _record(s: Session, logs: dict) -> None:
    """Rows with more than step and epoch go to the history and TensorBoard."""
    if len(logs) <= 2:
        return
    s.progress.history.append(logs)
    if s.writer is not None:
        for k, v in logs.items():
            if k not in ("step", "epoch"):
                s.writer.add_scalar(k.replace("_", "/", 1), v, s.progress.step)


def _checkpoint(s: Session, t_start: float) -> None:
    """A resumable checkpoint (and ``metrics.csv`` so far); every process's RNG state is saved."""
    rngs = _gather(s.accelerator, rng_state())
    if s.is_main:
        state = {**s.progress.to_state(s.progress.elapsed_s + time.time() - t_start), "train": s.cfg.to_dict()}
        ckpt.save_checkpoint(s.out, model=s.unwrapped, optimizer=s.optimizer, scheduler=s.scheduler,
                             scaler=s.accelerator.scaler, rng_states=rngs, best_weights=s.best_weights, state=state)
        write_metrics_csv(s.progress.history, s.out / "metrics.csv")
    s.accelerator.wait_for_everyone()


def _finish(s: Session, t_start: float, train_time: float, steps_run: int) -> dict:
    """Final and best-validation weights on test; adapters, metrics, plots, then ``summary.json`` last."""
    p, run, data, acc = s.progress, s.run, s.run.data, s.accelerator
    final_test = _evaluate(s, "test")
    final = {"step": p.step, **_prefixed("validation", s.last_validation), **_prefixed("test", final_test)}
    if s.is_main:
        s.unwrapped.save_adapter(s.out / "final_adapter")
    call(s.callbacks, "on_train_end", s.unwrapped)  # sees the final weights
    if p.best["step"] == p.step or s.best_weights is None:
        best_test = final_test
    else:
        ckpt.load_trainable_state(s.unwrapped, s.best_weights)
        best_test = _evaluate(s, "test")
    best = {"step": p.best["step"], **_prefixed("validation", p.best["validation"] or {}),
            **_prefixed("test", best_test)}
    cfg = s.cfg
    summary = {
        "status": "done", "task": data.task.name, "model": cfg.model, "construction": cfg.construction,
        "factorization": cfg.factorization, "ranks": s.unwrapped.adapter_config.mode_ranks(),
        **s.parameter_counts, "select_metric": s.select, "best": best, "final": final, "steps": p.step,
        "test_source": data.task.test_source, "data_sizes": data.sizes(),
        "wall_time_s": round(p.elapsed_s + time.time() - t_start, 2),
        "steps_per_second": round(steps_run / train_time, 4) if train_time > 0 else None,
        "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
        "cpu_time_s": round(cpu_time_s(), 1),  # this process, this session (not summed over resumes)
        "allocator": active_allocator(),  # the malloc behind peak_memory_mb (TENSLORA_ALLOCATOR)
        "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
    }
    if run.problem_type == "classification":
        summary["majority_baseline"] = _prefixed("test", majority_baseline(data.train.labels, data.test.labels,
                                                                            run.num_labels))
    if s.is_main:
        write_metrics_csv(p.history, s.out / "metrics.csv")
        from tenslora.train.plots import plot_history
        plot_history(p.history, s.out)
        s.writer.close()
        write_json_atomic(s.out / SUMMARY, summary)  # last: exit 0 + summary.json means done
        shutil.rmtree(s.out / ckpt.CHECKPOINT_DIR, ignore_errors=True)  # the run is complete
    acc.wait_for_everyone()
    return summary


def write_metrics_csv(history: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(["step", "epoch"] + [k for row in history for k in row]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def _gather(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object
    return gather_object([obj])
