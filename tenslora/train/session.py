"""Everything ``train`` builds before its first step, in the order that loses nothing.

1. decide what to do with the run directory (:mod:`tenslora.train.rundir`: refuse, resume, leave a
   finished run as is, or start fresh) -- nothing is read but the directory;
2. load and check every input (task, data, labels, model, adapter, metric, optimizer);
3. only then touch the directory: remove a replaced run's outputs, or restore the checkpoint; write
   ``config.json``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tenslora.io import write_json_atomic
from tenslora.params import count_trainable
from tenslora.train import checkpoint as ckpt
from tenslora.train import rundir
from tenslora.train.accel import build_accelerator, set_rng_state
from tenslora.train.config import TrainConfig
from tenslora.train.data import EpochSampler, make_collator, make_dataset, make_loader
from tenslora.train.metrics import metric_names
from tenslora.train.modeling import adapter_config, resolve_auto_ranks
from tenslora.train.setup import Run, build_run


def param_groups(adapted, cfg: TrainConfig) -> list[dict]:
    from tenslora.plus.optim import build_param_groups
    return build_param_groups(adapted, lr=cfg.lr, weight_decay=cfg.weight_decay, core_lambda=cfg.core_lambda,
                              mode_lr=cfg.mode_lr_dict(), lora_plus_ratio=cfg.lora_plus_ratio, head_lr=cfg.head_lr)


def default_callbacks(cfg: TrainConfig) -> list:
    if cfg.monitor_every <= 0:
        return []
    from tenslora.plus.monitor import Monitor
    return [Monitor(every=cfg.monitor_every)]


def call(callbacks, hook: str, *args) -> None:
    """Call ``hook`` on every callback that has it."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


@dataclass
class Progress:
    """Where the run stands; saved in ``checkpoint/state.json`` and restored on ``--resume``."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    best: dict = field(default_factory=lambda: {"value": None, "step": None, "validation": None})
    history: list = field(default_factory=list)
    elapsed_s: float = 0.0  # wall time of the sessions before this one

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})

    def to_state(self, elapsed_s: float) -> dict:
        return {**dataclasses.asdict(self), "elapsed_s": elapsed_s}


@dataclass
class Session:
    """A run ready for its next step: ``model`` is the prepared (maybe wrapped) ``unwrapped`` model."""

    cfg: TrainConfig
    accelerator: object
    out: Path
    run: Run
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    params: list  # the trainable parameters of ``model`` (what clipping sees)
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    eval_loaders: dict
    sampler: EpochSampler
    select: str
    total_steps: int
    eval_every: int
    checkpoint_every: int
    callbacks: list
    progress: Progress
    resumed: bool
    best_weights: dict | None = None
    parameter_counts: dict = field(default_factory=dict)
    writer: object = None  # TensorBoard, main process only
    last_validation: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def set_up(cfg: TrainConfig, callbacks) -> Session | dict:
    """A :class:`Session`, or the summary of a finished run that ``--resume`` leaves as is."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # asked for explicitly: e.g. 1 on an oversubscribed CPU
    accelerator = build_accelerator(cfg)
    plan = rundir.plan(cfg)
    if plan.action == "done":
        accelerator.print(f"{plan.out} is already done; summary.json left as is")
        return plan.summary
    cfg = dataclasses.replace(resolve_ranks(cfg, plan), output_dir=str(plan.out))
    adapter_config(cfg)  # a bad construction/factorization/ranks fails before any loading
    with accelerator.main_process_first():  # the main process fills the hub caches
        run = build_run(cfg)
    s = _prepare(cfg, accelerator, plan.out, run, list(callbacks) + default_callbacks(cfg))
    if plan.action == "resume":
        _restore(s)
    elif s.is_main:
        rundir.remove_outputs(plan)
    accelerator.wait_for_everyone()
    if s.is_main:
        write_json_atomic(s.out / rundir.CONFIG, {"train": cfg.to_dict(), "resolved": _resolved(s)})
        from torch.utils.tensorboard import SummaryWriter
        s.writer = SummaryWriter(str(s.out / "tb"), purge_step=s.progress.step if s.resumed else None)
    call(s.callbacks, "on_train_begin", s.unwrapped, accelerator, s.out)
    return s


def resolve_ranks(cfg: TrainConfig, plan: rundir.Plan) -> TrainConfig:
    """``--ranks auto``: the ranks the checkpoint was trained with, else a TensLoRA+ probe (run inside
    this run's directory, so it replaces its own earlier probe)."""
    if str(cfg.ranks).strip().lower() != "auto":
        return cfg
    ranks = plan.saved.get("ranks") or \
        resolve_auto_ranks(dataclasses.replace(cfg, output_dir=str(plan.out), resume=False))
    return dataclasses.replace(cfg, ranks=ranks)


def enable_gradient_checkpointing(adapted) -> None:
    """``--gradient-checkpointing``: transformers' own, with its default settings (the adapters' slices are
    computed once per forward, outside the checkpointed blocks, so recomputation sees the same tensors)."""
    base = adapted.base_model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(base).__name__} does not support gradient "
                         "checkpointing in transformers; drop the option")
    base.gradient_checkpointing_enable()


def _prepare(cfg: TrainConfig, accelerator, out: Path, run: Run, callbacks: list) -> Session:
    """Loaders, metric, optimizer and schedule around a built run; everything checked, nothing written."""
    data = run.data
    regression = run.problem_type == "regression"
    select = cfg.select_metric or data.main_metric
    allowed = metric_names(run.problem_type, run.num_labels)
    if select not in allowed:
        raise ValueError(f"--select-metric {select!r} is not a validation metric; allowed: {', '.join(allowed)}")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(run.adapted)
    collate = make_collator(run.kind, run.preprocessor, run.forward_kwargs)
    sampler = EpochSampler(len(data.train), cfg.seed)
    train_loader = make_loader(make_dataset(data.train, run.kind, run.preprocessor, cfg.max_length, regression),
                               cfg.batch_size, collate, sampler=sampler, num_workers=cfg.num_workers)
    eval_loaders = {name: make_loader(make_dataset(data.split(name), run.kind, run.preprocessor, cfg.max_length,
                                                   regression), cfg.eval_batch_size, collate,
                                      num_workers=cfg.num_workers)
                    for name in ("validation", "test")}
    trainable, total = count_trainable(run.adapted)
    counts = {"trainable_parameters": trainable, "adapter_parameters": run.adapted.adapter_parameters(),
              "total_parameters": total}

    from transformers import get_scheduler
    optimizer = torch.optim.AdamW(param_groups(run.adapted, cfg))
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        run.adapted, optimizer, train_loader, eval_loaders["validation"], eval_loaders["test"])
    steps_per_epoch = max(1, len(train_loader) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    eval_every = cfg.eval_every or max(1, math.ceil(total_steps / 5))
    return Session(cfg=cfg, accelerator=accelerator, out=out, run=run, model=model,
                   unwrapped=accelerator.unwrap_model(model), params=[p for p in model.parameters() if p.requires_grad],
                   optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
                   eval_loaders={"validation": val_loader, "test": test_loader}, sampler=sampler, select=select,
                   total_steps=total_steps, eval_every=eval_every, checkpoint_every=cfg.checkpoint_every or eval_every,
                   callbacks=callbacks, progress=Progress(), resumed=False, parameter_counts=counts)


def _restore(s: Session) -> None:
    """Weights, optimizer, schedule, loss scale, RNG and progress from the checkpoint."""
    state, rng_states, s.best_weights = ckpt.load_checkpoint(s.out, model=s.unwrapped, optimizer=s.optimizer,
                                                             scheduler=s.scheduler, scaler=s.accelerator.scaler)
    s.progress, s.resumed = Progress.from_state(state), True
    set_rng_state(rng_states[s.accelerator.process_index % len(rng_states)])
    s.accelerator.print(f"resuming {s.out} at step {s.progress.step}/{s.total_steps}")


def _resolved(s: Session) -> dict:
    """What the options resolved to (``config.json``'s ``resolved``)."""
    run, data, acc = s.run, s.run.data, s.accelerator
    return {"model_path": run.model_path, "kind": run.kind, "label_names": run.label_names,
            "num_labels": run.num_labels, "problem_type": run.problem_type, "select_metric": s.select,
            "main_metric": data.main_metric, "test_source": data.task.test_source,
            "data_sizes": data.sizes(), "total_steps": s.total_steps, "eval_every": s.eval_every,
            "checkpoint_every": s.checkpoint_every, "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "device": str(acc.device),
            "adapter": s.unwrapped.adapter_config.to_dict(), "task_notes": data.task.notes}
