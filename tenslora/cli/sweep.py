"""``tenslora sweep``: run a grid of ``tenslora train`` jobs (resumable, GPU-packing, Ray), status, report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(no_args_is_help=True,
                  help="Sweeps: run a YAML grid of training jobs (resumable; local GPUs/CPUs or Ray), "
                       "show their status, aggregate their results.")

BACKENDS = ("local", "ray")


@app.command("run")
def run(
    file: Path = typer.Argument(..., help="Sweep YAML file (grid/runs, base, seeds, command, timeout_s, ...)."),
    sweep_dir: Optional[Path] = typer.Option(None, "--dir", help="Sweep directory (default sweeps/NAME)."),
    slots: Optional[int] = typer.Option(None, "--slots", min=1, help="Jobs at once (default: from the hardware)."),
    backend: str = typer.Option("local", "--backend", help="local or ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="Address of a running Ray cluster (default: start one)."),
    cpu: bool = typer.Option(False, "--cpu", help="Local backend: ignore GPUs, run on CPU slots."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Queue failed jobs again."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their commands; run nothing."),
) -> None:
    """Expand FILE into jobs, add them to the sweep directory and run everything not done yet."""
    from rich.console import Console

    from tenslora.sweep.core import default_sweep_dir
    from tenslora.sweep.spec import expand, job_argv, load_sweep
    from tenslora.sweep.validate import validate_sweep

    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if ray_address and backend != "ray":
        raise ValueError("--ray-address needs --backend ray")
    spec = load_sweep(file)
    jobs = expand(spec)
    validate_sweep(spec, jobs, source=str(file))
    root = sweep_dir if sweep_dir is not None else default_sweep_dir(spec.name)
    console = Console(highlight=False)
    if dry_run:
        import subprocess

        for job in jobs:
            argv = job_argv(spec.command, job.options, root / "runs" / job.name)
            console.print(f"[bold]{job.name}[/bold]\n  {subprocess.list2cmdline(argv)}", soft_wrap=True)
        console.print(f"{len(jobs)} job(s); sweep directory {root}")
        return
    meta = {"settings": spec.settings(), "spec_file": str(Path(file).resolve()), "name": spec.name}
    if backend == "ray":
        from tenslora.sweep.ray_backend import RayScheduler

        scheduler = RayScheduler(root, address=ray_address, slots=slots, console=console)
    else:
        from tenslora.sweep.local import LocalScheduler

        scheduler = LocalScheduler(root, slots=slots, cpu=cpu, console=console)
    counts = scheduler.run(jobs, spec.settings(), retry_failed=retry_failed, meta=meta, one_sweep=True)
    console.print(f"sweep {root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), soft_wrap=True)
    if counts.get("failed"):
        console.print(f"[red]{counts['failed']} job(s) failed[/red]; see: tenslora sweep status {root}")
        raise typer.Exit(1)
    if counts.get("queued") or counts.get("running"):
        raise typer.Exit(130)


@app.command("status")
def status(
    sweep_dir: Path = typer.Argument(..., help="Sweep directory."),
    tail: int = typer.Option(15, "--tail", min=0, help="Log lines shown for each failed job."),
) -> None:
    """Queued, running, done and failed jobs with their times; the log tail of failed jobs."""
    from tenslora.sweep.status import render_status

    render_status(sweep_dir, tail=tail)


@app.command("report")
def report(
    sweep_dir: Path = typer.Argument(..., help="Sweep directory."),
    metric: str = typer.Option("test_macro_f1", "--metric", help="Primary metric (sorts the table, y of plots)."),
    by: Optional[List[str]] = typer.Option(None, "--by", help="Also plot the metric against this option "
                                                              "(repeatable)."),
    final: bool = typer.Option(False, "--final", help="Use final-step metrics instead of the best checkpoint's."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default SWEEP_DIR/report)."),
) -> None:
    """Mean ± std over seeds per configuration: markdown table, CSV and PNG plots."""
    from tenslora.sweep.report import write_report

    paths = write_report(sweep_dir, metric, by or [], which="final" if final else "best", out_dir=out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"wrote {paths['markdown']}, {paths['csv']}" + "".join(f", {p}" for p in paths["plots"]))
