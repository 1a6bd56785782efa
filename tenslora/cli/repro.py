"""``tenslora repro``: re-measure the TensLoRA / TensLoRA+ claims with seeds and controls, and report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True,
                  help="Reproduction of the TensLoRA / TensLoRA+ claims: experiments A (constructions at equal "
                       "parameters), B (core lambda with uniform-lr controls, LoRA+), C (rank allocation), "
                       "D (A at each method's own learning rate) and E (layers rank 4 vs 2), "
                       "3 seeds, one report with a verdict per claim.")

_CONFIG_HELP = "Repro file (default benchmarks/repro/repro.yaml)."


@app.command("run")
def run(
    scale: str = typer.Option("cpu", "--scale", help="cpu (offline MiniLM/DINOv2-small, ~3 h on 2 cores) or "
                                                     "paper (RoBERTa-base, ViT-base; GPUs)."),
    experiments: str = typer.Option("A,B,C", "--experiments", help="Comma-separated subset of A,B,C,D,E (D: each "
                                    "method's learning rate tuned on validation, then seeds; E: layers rank 4 vs 2)."),
    tasks: str = typer.Option("text,vision", "--tasks", help="Comma-separated subset of text,vision,llm."),
    root: Path = typer.Option(Path("runs/repro"), "--dir", help="Repro directory (one sweep per task inside)."),
    slots: Optional[int] = typer.Option(None, "--slots", min=1, help="Jobs at once (default: the scale's)."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the sweep files and print the job counts; "
                                                          "run nothing (no probe)."),
) -> None:
    """Run the selected experiments (resumable: rerun the same command to continue)."""
    from rich.console import Console

    from tenslora.repro.run import run as run_repro
    from tenslora.repro.spec import EXPERIMENTS, TASK_KINDS, load_config, parse_list

    cfg = load_config(config)
    exps = parse_list(experiments, EXPERIMENTS, "experiment")
    kinds = parse_list(tasks, TASK_KINDS, "task kind")
    console = Console(highlight=False)
    counts = run_repro(cfg, scale, exps, kinds, root, slots=slots, console=console, dry_run=dry_run)
    failed = False
    for task, c in counts.items():
        console.print(f"{task}: " + ", ".join(f"{n} {s}" for s, n in c.items()), soft_wrap=True)
        failed |= bool(c.get("failed"))
    if dry_run:
        console.print(f"sweep files: {root}/<task>/sweep.yaml")
        return
    console.print(f"report: tenslora repro report {root}")
    if failed:
        raise typer.Exit(1)


@app.command("report")
def report(
    source: Optional[Path] = typer.Argument(None, help="Repro directory (from tenslora repro run)."),
    from_results: Optional[Path] = typer.Option(None, "--from-results",
                                                help="Read collected results (benchmarks/results) instead."),
    out: Path = typer.Option(Path("docs/results.md"), "--out", help="Markdown report."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="PNG directory (default: <out dir>/results)."),
    note: str = typer.Option("", "--note", help="A paragraph added under the report's header."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP + " Its tasks without results are "
                                                                 "listed as not run."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Also replace the verdict summary block of this "
                                                                 "README (between its repro-summary markers)."),
) -> None:
    """Tables (mean ± std over seeds), plots and one verdict per claim, from the sweep aggregation."""
    from tenslora.repro.report import readme_block, readme_summary, update_readme, write_report
    from tenslora.repro.spec import load_config

    if (source is None) == (from_results is None):
        raise ValueError("give a repro directory or --from-results DIR (one of them)")
    if readme is not None:
        readme_block(readme)  # checked before anything is written
    plots_dir = plots if plots is not None else out.parent / "results"
    res = write_report(from_results or source, out, plots_dir, from_results=from_results is not None,
                       note=note, config=load_config(config))
    for task, verdicts in res["verdicts"].items():
        for k, (verdict, _) in verdicts.items():
            typer.echo(f"{task}: claim {k}: {verdict}")
    if readme is not None:
        update_readme(readme, readme_summary(res, os.path.relpath(res["markdown"], readme.parent)))
        typer.echo(f"updated the results summary in {readme}")
    missing = sum(len(m) for m in res["missing"].values())
    typer.echo(f"wrote {res['markdown']} and {len(res['plots'])} plot(s) in {plots_dir}"
               + (f"; PARTIAL: {missing} planned run(s) missing" if missing else ""))


@app.command("collect")
def collect(
    source: Path = typer.Argument(..., help="Repro directory."),
    dest: Path = typer.Option(Path("benchmarks/results"), "--to", help="Results directory."),
) -> None:
    """Copy every finished run (options, roles, summary, resolved config) to DEST/<task>/<run>.json."""
    from tenslora.repro.collect import collect as collect_runs

    written = collect_runs(source, dest)
    runs = [p for p in written if p.name != "_index.json"]
    typer.echo(f"collected {len(runs)} run(s) into {dest}")


@app.command("ranks")
def ranks(
    model: str = typer.Option("minilm", "--model", help="Model short name, hub id or local directory."),
    budget: int = typer.Option(2, "--budget", help="Match the parameter count of PEFT LoRA of this rank."),
    at_most: bool = typer.Option(False, "--at-most", help="Only counts <= the budget."),
) -> None:
    """Ranks of every construction x {Tucker, CP} matched to LoRA r=BUDGET's parameter count."""
    from tenslora.constructions import CONSTRUCTIONS
    from tenslora.repro.match import format_matches, lora_count, matched_table
    from tenslora.repro.spec import model_shape_for

    shape = model_shape_for(model)
    matches = matched_table(shape, budget, list(CONSTRUCTIONS), ["tucker", "cp"], at_most=at_most)
    typer.echo(format_matches(matches, f"{model}: LoRA r={budget} has "
                                       f"{lora_count(shape, budget):,} parameters\n"))
