"""The ``tenslora`` command line (Typer). Each sub-command lives in its own module."""
from __future__ import annotations

import os
import sys

import typer

from tenslora.cli import bench
from tenslora.cli import export as export_cli
from tenslora.cli import models
from tenslora.cli import repro
from tenslora.cli import sweep
from tenslora.cli import train as train_cli
from tenslora.cli import allocate as allocate_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Tensor-factorized LoRA (TensLoRA / TensLoRA+) for transformers.")
app.add_typer(bench.app, name="bench")
app.add_typer(models.app, name="models")
app.add_typer(sweep.app, name="sweep")
app.add_typer(repro.app, name="repro")
train_cli.register(app)
export_cli.register(app)
app.command("allocate")(allocate_cli.allocate)


def main() -> None:
    """The command line in this process: user mistakes become one line on stderr and exit code 2."""
    try:
        app()
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("TENSLORA_DEBUG"):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """The ``tenslora`` program (console script, ``python -m tenslora``): process-wide malloc settings,
    set here by the program, never by the library, then :func:`main`. With ``TENSLORA_ALLOCATOR=tcmalloc`` a
    model command first relaunches itself on tcmalloc (same pid; ``tenslora.train.memory.tcmalloc_relaunch``)."""
    from tenslora.train.memory import release_freed_memory, tcmalloc_relaunch
    try:
        relaunch = tcmalloc_relaunch(sys.argv, dict(os.environ))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if relaunch is not None and sys.executable:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(relaunch[0][0], relaunch[0], relaunch[1])
    release_freed_memory()
    main()


def _message(exc: Exception) -> str:
    """One line; an OS error names its file and what to do."""
    if isinstance(exc, PermissionError):
        return f"cannot write {exc.filename or 'a file'}: permission denied; make it writable or choose another path"
    return str(exc)
