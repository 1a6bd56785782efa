"""``tenslora allocate``: TensLoRA+ per-mode Tucker ranks from a short probe run, under a budget."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def allocate(
    budget: Annotated[str, typer.Option(help="adapter parameter budget: a count, or lora:k (PEFT LoRA rank k "
                                             "on the same projections)")],
    model: Annotated[str, typer.Option(help="Hugging Face model id, local directory or short name")] = "minilm",
    task: Annotated[str, typer.Option(help="task name or data file (as for tenslora train)")] = "tweets",
    construction: Annotated[str, typer.Option(help="Tucker construction (att, qkv, depth, att_qkv, att_depth, "
                                                   "qkv_depth, att_qkv_depth)")] = "att_qkv_depth",
    floor: Annotated[int, typer.Option(help="smallest rank of any mode (capped by the mode size)")] = 2,
    probe_steps: Annotated[int, typer.Option(help="optimizer steps of the probe run")] = 100,
    probe_rank: Annotated[int, typer.Option(help="rank of every mode during the probe (capped by its size)")] = 8,
    reverse: Annotated[bool, typer.Option("--reverse", help="print the reverse control's ranks last (ranks moved to "
                                                            "the least informative modes); both are saved")] = False,
    lr: Annotated[float, typer.Option(help="probe learning rate")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="probe batch size")] = 32,
    train_samples: Annotated[Optional[int], typer.Option(help="probe training examples (subsampled)")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="probe evaluation examples")] = 500,
    max_length: Annotated[int, typer.Option(help="maximum tokens per example")] = 128,
    alpha: Annotated[float, typer.Option(help="update scaling numerator of the probe adapter")] = 8.0,
    seed: Annotated[int, typer.Option(help="probe training seed")] = 0,
    output_dir: Annotated[Optional[str], typer.Option(help="where allocation.json and the probe run go "
                                                           "(default: runs/allocate-<construction>)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="probe progress bar")] = True,
) -> None:
    """Probe-train with generous ranks, measure per-mode spectra, choose per-mode ranks under the budget."""
    from tenslora.plus.allocate import ALLOCATION_FILE, format_record
    from tenslora.train.config import TrainConfig
    from tenslora.train.probe import allocate as run_allocate

    cfg = TrainConfig(model=model, task=task, construction=construction, factorization="tucker",
                      ranks=str(probe_rank), lr=lr, batch_size=batch_size, train_samples=train_samples,
                      eval_samples=eval_samples, max_length=max_length, alpha=alpha, seed=seed,
                      max_steps=probe_steps, progress=progress,
                      output_dir=output_dir or f"runs/allocate-{construction}")
    record = run_allocate(cfg, budget, floor=floor, probe_steps=probe_steps, probe_rank=probe_rank,
                          output_dir=cfg.resolved_output_dir())
    typer.echo(format_record(record))
    typer.echo(f"saved {cfg.resolved_output_dir() / ALLOCATION_FILE}")
    chosen = record["reverse_allocation"] if reverse else record
    typer.echo(f"ranks: {chosen['ranks_string']}")
