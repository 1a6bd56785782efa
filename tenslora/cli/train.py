"""``tenslora train | evaluate | predict``.

``train``'s options are generated from :class:`tenslora.train.config.TrainConfig` (one option per
field, help from the field), so the CLI only parses into the dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from tenslora.train.config import TrainConfig

SUMMARY_KEYS = ("accuracy", "macro_f1", "mcc", "f1", "pearson", "spearman", "perplexity")


def _option_type(tp):
    """``X | None`` -> ``Optional[X]`` (what Typer understands)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return Optional[args[0]]
    return tp


def _train_signature(only: tuple[str, ...] | None = None) -> inspect.Signature:
    """One option per :class:`TrainConfig` field (``only``: these fields)."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if hints[f.name] is bool else [flag]
        option = typer.Option(*decls, help=f.metadata.get("help", ""), show_default=True)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=Annotated[_option_type(hints[f.name]), option]))
    return inspect.Signature(params)


def _fmt(metrics: dict, prefix: str) -> str:
    return ", ".join(f"{k.removeprefix(prefix)} {metrics[k]:.4f}" for k in metrics
                     if k.startswith(prefix) and k.removeprefix(prefix) in SUMMARY_KEYS)


def train_command(**kwargs) -> None:
    """Fine-tune a text or image classifier with a TensLoRA (or PEFT LoRA) adapter."""
    from accelerate import PartialState

    from tenslora.train.accel import use_cpu
    from tenslora.train.loop import train
    cfg = TrainConfig(**kwargs)
    rank = PartialState(cpu=use_cpu(cfg)).process_index
    summary = train(cfg)  # seeds its own draws from cfg.seed
    if rank != 0:
        return
    out = cfg.resolved_output_dir()
    best, final = summary["best"], summary["final"]
    typer.echo(f"run: {out}  ({summary['wall_time_s']:.0f} s, {summary['steps']} steps, "
               f"{summary['adapter_parameters']:,} adapter / {summary['trainable_parameters']:,} trainable parameters)")
    typer.echo(f"best (step {best['step']}, by validation {summary['select_metric']}): test {_fmt(best, 'test_')}")
    typer.echo(f"final (step {final['step']}): test {_fmt(final, 'test_')}")
    if "majority_baseline" in summary:
        typer.echo(f"majority-class baseline: test {_fmt(summary['majority_baseline'], 'test_')}")


train_command.__signature__ = _train_signature()
train_command.__annotations__ = {p.name: p.annotation for p in train_command.__signature__.parameters.values()}


ZERO_SHOT_OPTIONS = ("model", "task", "train_file", "validation_file", "test_file", "max_length", "eval_batch_size",
                     "data_seed", "train_samples", "eval_samples", "validation_size", "test_size", "precision", "cpu",
                     "threads", "num_workers", "seed")


def zero_shot_command(**kwargs) -> None:
    """Evaluate a causal LM without any adapter (zero-shot) on a split chosen like tenslora train's."""
    from tenslora.train.zero_shot import evaluate_base
    split, as_json = kwargs.pop("split"), kwargs.pop("as_json")
    metrics = evaluate_base(TrainConfig(**kwargs), split)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            typer.echo(f"{k}\t{v:.4f}")


def _zero_shot_signature() -> inspect.Signature:
    sig = _train_signature(ZERO_SHOT_OPTIONS)
    kw = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter("split", kw, default="test",
                               annotation=Annotated[str, typer.Option(help="test, validation or train")]),
             inspect.Parameter("as_json", kw, default=False,
                               annotation=Annotated[bool, typer.Option("--json", help="print JSON")])]
    return sig.replace(parameters=[*sig.parameters.values(), *extra])


zero_shot_command.__signature__ = _zero_shot_signature()
zero_shot_command.__annotations__ = {p.name: p.annotation for p in zero_shot_command.__signature__.parameters.values()}


def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by tenslora train")],
    split: Annotated[str, typer.Option(help="test, validation or train")] = "test",
    adapter: Annotated[str, typer.Option(help="best (validation-selected) or final")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Re-evaluate a saved adapter on a split of the run's data."""
    from tenslora.train.evaluate import evaluate_run
    metrics = evaluate_run(run_dir, split=split, adapter=adapter)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
    else:
        for k, v in metrics.items():
            typer.echo(f"{k}\t{v:.4f}")


def predict_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by tenslora train")],
    inputs: Annotated[Optional[list[str]], typer.Argument(help="texts (or image files with --images)")] = None,
    images: Annotated[bool, typer.Option("--images", help="the inputs are image files")] = False,
    file: Annotated[Optional[Path], typer.Option(help="read inputs from this file, one per line")] = None,
    adapter: Annotated[str, typer.Option(help="best or final")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="causal LM: tokens to generate per prompt "
                                                         "(default: the longest label + 2, or 64)")] = None,
) -> None:
    """Label texts or images with a saved adapter (label names and probabilities); a causal-LM run
    generates a response to each prompt (greedy)."""
    from tenslora.train.evaluate import predict
    items = list(inputs or [])
    if file is not None:
        if not file.is_file():
            raise FileNotFoundError(f"input file {file} does not exist")
        items += [line for line in file.read_text(errors="replace").splitlines() if line.strip()]
    results = predict(run_dir, texts=None if images else items, images=items if images else None, adapter=adapter,
                      max_new_tokens=max_new_tokens)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for r in results:
        if "generation" in r:
            typer.echo(f"{r['generation']}\t{r['input']}")
        elif "label" in r:
            typer.echo(f"{r['label']}\t{r['probability']:.3f}\t{r['input']}")
        else:
            typer.echo(f"{r['prediction']:.4f}\t{r['input']}")


def register(app: typer.Typer) -> None:
    app.command("train", help=train_command.__doc__)(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("predict")(predict_command)
    app.command("zero-shot", help=zero_shot_command.__doc__)(zero_shot_command)
