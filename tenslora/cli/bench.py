"""``tenslora bench``: benchmarks that print ratios against a baseline measured in the same run."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (timings are ratios to a same-run baseline).")
