"""``train(cfg, callbacks) -> summary``: fine-tune a classifier with an adapter, on HF Accelerate.

Read top to bottom: build everything, (maybe) resume, loop over optimizer steps (accumulate, clip,
step, log, evaluate, checkpoint), then evaluate the final and the best-validation weights on test
and write the outputs. ``summary.json`` is written last and atomically.

Callbacks may implement any of ``on_train_begin(adapted, accelerator, output_dir)``,
``after_backward(step, adapted)`` (gradients complete and unscaled, clipped, before the optimizer
step), ``on_step_end(step, adapted, logs)`` and ``on_train_end(adapted)``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import shutil
import time
from pathlib import Path

import torch

from tenslora.io import write_json_atomic
from tenslora.params import count_trainable
from tenslora.train import checkpoint as ckpt
from tenslora.train.accel import (build_accelerator, cpu_time_s, peak_memory_mb, rng_state, seeded_rng,
                                  set_rng_state, use_cpu)
from tenslora.train.config import TrainConfig
from tenslora.train.data import EpochSampler, make_collator, make_dataset, make_loader
from tenslora.train.evaluate import evaluate_loader
from tenslora.train.metrics import is_better, majority_baseline, metric_names
from tenslora.train.modeling import adapter_config, resolve_auto_ranks
from tenslora.train.setup import build_run, derived_seed

OUTPUTS = ("summary.json", "metrics.csv", "tb", "best_adapter", "final_adapter", ckpt.CHECKPOINT_DIR,
           "loss.png", "validation_metrics.png")


def param_groups(adapted, cfg: TrainConfig) -> list[dict]:
    from tenslora.plus.optim import build_param_groups
    return build_param_groups(adapted, lr=cfg.lr, weight_decay=cfg.weight_decay, core_lambda=cfg.core_lambda,
                              mode_lr=cfg.mode_lr_dict(), lora_plus_ratio=cfg.lora_plus_ratio, head_lr=cfg.head_lr)


def default_callbacks(cfg: TrainConfig) -> list:
    if cfg.monitor_every <= 0:
        return []
    from tenslora.plus.monitor import Monitor
    return [Monitor(every=cfg.monitor_every)]


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def write_metrics_csv(history: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(["step", "epoch"] + [k for row in history for k in row]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def _clean_outputs(out: Path) -> None:
    """A fresh run in a used directory: remove the previous run's outputs (never other files)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


RESUME_MAY_CHANGE = {"resume", "progress", "output_dir", "run_name", "checkpoint_every", "log_every", "num_workers",
                     "threads"}


def _saved_train_options(out: Path) -> dict:
    import json
    file = out / "config.json"
    return json.loads(file.read_text()).get("train", {}) if file.is_file() else {}


def _check_same_run(out: Path, cfg: TrainConfig) -> None:
    """Resuming with other options would not continue the same run: refuse, naming the options."""
    saved = _saved_train_options(out)
    now = cfg.to_dict()
    differ = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
    if differ:
        raise ValueError(f"cannot --resume {out} with different options: " +
                         ", ".join(f"{k} (was {saved[k]!r}, now {now[k]!r})" for k in differ))


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def train(cfg: TrainConfig, callbacks=()) -> dict:
    """One run; returns its summary (also written to ``summary.json``). Every random draw (head, adapter,
    data order, dropout) follows ``cfg.seed`` alone, and the caller's global RNG states are left as found."""
    from accelerate import PartialState
    process = PartialState(cpu=use_cpu(cfg)).process_index  # each process its own dropout stream
    with seeded_rng(derived_seed(cfg.seed, f"train/{process}")):
        return _train(cfg, callbacks)


def _train(cfg: TrainConfig, callbacks) -> dict:
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # asked for explicitly: e.g. 1 on an oversubscribed CPU
    accelerator = build_accelerator(cfg)
    is_main = accelerator.is_main_process
    out = cfg.resolved_output_dir()
    if str(cfg.ranks).strip().lower() == "auto":
        saved = _saved_train_options(out) if cfg.resume and ckpt.has_checkpoint(out) else {}
        cfg = dataclasses.replace(cfg, ranks=saved.get("ranks") or resolve_auto_ranks(cfg))  # no second probe
    adapter_config(cfg)  # a bad construction/factorization/ranks fails before any loading
    callbacks = list(callbacks) + default_callbacks(cfg)

    # an interrupted run resumes; a finished one is not run twice ---------------------------------
    resuming = cfg.resume and ckpt.has_checkpoint(out)
    if cfg.resume and (out / "summary.json").is_file():
        import json
        summary = json.loads((out / "summary.json").read_text())
        if summary.get("status") == "done":
            accelerator.print(f"{out} is already done; summary.json left as is")
            return summary
    if resuming:
        _check_same_run(out, cfg)
    if is_main and not resuming:
        _clean_outputs(out)
    accelerator.wait_for_everyone()

    # data, model, adapter (the main process first: it fills the hub caches) ----------------------
    with accelerator.main_process_first():
        run = build_run(cfg)
    data, adapted = run.data, run.adapted
    regression = run.problem_type == "regression"
    collate = make_collator(run.kind, run.preprocessor, run.forward_kwargs)
    sampler = EpochSampler(len(data.train), cfg.seed)
    train_loader = make_loader(make_dataset(data.train, run.kind, run.preprocessor, cfg.max_length, regression),
                               cfg.batch_size, collate, sampler=sampler, num_workers=cfg.num_workers)
    eval_loaders = {name: make_loader(make_dataset(data.split(name), run.kind, run.preprocessor, cfg.max_length,
                                                   regression), cfg.eval_batch_size, collate,
                                      num_workers=cfg.num_workers)
                    for name in ("validation", "test")}
    select = cfg.select_metric or data.task.main_metric
    allowed = metric_names(run.problem_type, run.num_labels)
    if select not in allowed:
        raise ValueError(f"--select-metric {select!r} is not a validation metric; allowed: {', '.join(allowed)}")
    trainable, total_params = count_trainable(adapted)
    adapter_params = adapted.adapter_parameters()

    # optimizer and schedule ----------------------------------------------------------------------
    from transformers import get_scheduler
    optimizer = torch.optim.AdamW(param_groups(adapted, cfg))
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        adapted, optimizer, train_loader, eval_loaders["validation"], eval_loaders["test"])
    batches_per_epoch = len(train_loader)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    eval_every = cfg.eval_every or max(1, math.ceil(total_steps / 5))
    checkpoint_every = cfg.checkpoint_every or eval_every
    params = [p for p in model.parameters() if p.requires_grad]
    unwrapped = accelerator.unwrap_model(model)

    if is_main:
        resolved = {"model_path": run.model_path, "kind": run.kind, "label_names": run.label_names,
                    "num_labels": run.num_labels, "problem_type": run.problem_type, "select_metric": select,
                    "main_metric": data.task.main_metric, "test_source": data.task.test_source,
                    "data_sizes": data.sizes(), "total_steps": total_steps, "eval_every": eval_every,
                    "checkpoint_every": checkpoint_every, "num_processes": accelerator.num_processes,
                    "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
                    "adapter": unwrapped.adapter_config.to_dict(), "task_notes": data.task.notes}
        write_json_atomic(out / "config.json", {"train": cfg.to_dict(), "resolved": resolved})

    # state: fresh, or restored from the last checkpoint -------------------------------------------
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    best = {"value": None, "step": None, "validation": None}
    best_weights, history, last_val = None, [], {}
    if resuming:
        state, rng_states, best_weights = ckpt.load_checkpoint(out, model=unwrapped, optimizer=optimizer,
                                                               scheduler=scheduler, scaler=accelerator.scaler)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, history, elapsed_before = state["best"], state["history"], state["elapsed_s"]
        set_rng_state(rng_states[accelerator.process_index % len(rng_states)])
        accelerator.print(f"resuming {out} at step {step}/{total_steps}")
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"), purge_step=step if resuming else None)
    _call(callbacks, "on_train_begin", unwrapped, accelerator, out)

    def next_batches():
        """Micro-batches from (epoch, batch_in_epoch) on; a new epoch reshuffles from the seed."""
        nonlocal epoch, batch_in_epoch
        while True:
            sampler.position(epoch, skip=batch_in_epoch * cfg.batch_size * accelerator.num_processes)
            for batch in train_loader:
                batch_in_epoch += 1
                yield batch
            epoch, batch_in_epoch = epoch + 1, 0

    def evaluate(name: str) -> dict:
        loader = val_loader if name == "validation" else test_loader
        return evaluate_loader(model, loader, accelerator, run.problem_type, run.num_labels)

    # the loop ------------------------------------------------------------------------------------
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not (is_main and cfg.progress), desc="train",
               dynamic_ncols=True)
    batches = next_batches()
    model.train()
    t_loop, steps_run = time.time(), 0
    while step < total_steps:
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = model(**batch).loss
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach() / cfg.grad_accum
        if cfg.max_grad_norm > 0:  # unscales fp16 gradients before clipping
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            accelerator.unscale_gradients()
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        _call(callbacks, "after_backward", step + 1, unwrapped)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_run += 1

        logs = {"step": step, "epoch": round(epoch + batch_in_epoch / max(batches_per_epoch, 1), 4)}
        if step % cfg.log_every == 0 or step == total_steps or step == 1:
            logs["train_loss"] = accelerator.reduce(loss_sum, "mean").item()
            logs["lr"] = scheduler.get_last_lr()[0]
            logs["grad_norm"] = float(grad_norm)
            bar.set_postfix(loss=f"{logs['train_loss']:.4f}", lr=f"{logs['lr']:.2e}")
        if step % eval_every == 0 or step == total_steps:
            val = last_val = evaluate("validation")
            logs.update(_prefixed("validation", val))
            if is_better(select, val[select], best["value"]):
                best = {"value": val[select], "step": step, "validation": val}
                best_weights = ckpt.trainable_state(unwrapped)
                if is_main:
                    unwrapped.save_adapter(out / "best_adapter")
            if is_main and cfg.progress:
                bar.write(f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if len(logs) > 2:
            history.append(logs)
            if writer is not None:
                for k, v in logs.items():
                    if k not in ("step", "epoch"):
                        writer.add_scalar(k.replace("_", "/", 1), v, step)
        _call(callbacks, "on_step_end", step, unwrapped, logs)
        bar.update(1)
        if step % checkpoint_every == 0 and step < total_steps:
            rngs = _gather(accelerator, rng_state())
            if is_main:
                state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best,
                         "history": history, "elapsed_s": elapsed_before + time.time() - t_start}
                ckpt.save_checkpoint(out, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                     scaler=accelerator.scaler, rng_states=rngs, best_weights=best_weights, state=state)
                write_metrics_csv(history, out / "metrics.csv")
            accelerator.wait_for_everyone()
    bar.close()
    train_time = time.time() - t_loop

    # final and best-validation weights on test ---------------------------------------------------
    final_test = evaluate("test")
    final = {"step": step, **_prefixed("validation", last_val), **_prefixed("test", final_test)}
    if is_main:
        unwrapped.save_adapter(out / "final_adapter")
    _call(callbacks, "on_train_end", unwrapped)  # sees the final weights
    if best["step"] == step or best_weights is None:
        best_test = final_test
    else:
        ckpt.load_trainable_state(unwrapped, best_weights)
        best_test = evaluate("test")
    best_report = {"step": best["step"], **_prefixed("validation", best["validation"] or {}),
                   **_prefixed("test", best_test)}

    summary = {
        "status": "done", "task": data.task.name, "model": cfg.model, "construction": cfg.construction,
        "factorization": cfg.factorization, "ranks": unwrapped.adapter_config.mode_ranks(),
        "trainable_parameters": trainable, "adapter_parameters": adapter_params, "total_parameters": total_params,
        "select_metric": select, "best": best_report, "final": final, "steps": step,
        "test_source": data.task.test_source, "data_sizes": data.sizes(),
        "wall_time_s": round(elapsed_before + time.time() - t_start, 2),
        "steps_per_second": round(steps_run / train_time, 4) if train_time > 0 else None,
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "cpu_time_s": round(cpu_time_s(), 1),  # this process, this session (not summed over resumes)
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
    }
    if run.problem_type == "classification":
        summary["majority_baseline"] = _prefixed("test", majority_baseline(data.train.labels, data.test.labels,
                                                                            run.num_labels))
    if is_main:
        write_metrics_csv(history, out / "metrics.csv")
        from tenslora.train.plots import plot_history
        plot_history(history, out)
        writer.close()
        write_json_atomic(out / "summary.json", summary)  # last: exit 0 + summary.json means done
        shutil.rmtree(out / ckpt.CHECKPOINT_DIR, ignore_errors=True)  # the run is complete
    accelerator.wait_for_everyone()
    return summary


def _gather(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object
    return gather_object([obj])
