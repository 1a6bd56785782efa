"""``tenslora export`` (adapter -> PEFT LoRA or merged model) and ``tenslora compress`` (PEFT LoRA -> tensor)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export_command(
    src: Annotated[Path, typer.Argument(help="a saved adapter directory or a run directory (its best_adapter)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="directory to write")],
    format: Annotated[str, typer.Option("--format", help="peft (a standard PEFT LoRA) or merged (a plain HF model)")]
    = "peft",
    model: Annotated[Optional[str], typer.Option(help="base model directory (default: from the run)")] = None,
    head: Annotated[bool, typer.Option("--head/--no-head", help="peft: include the task head (modules_to_save)")] \
        = True,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Export an adapter exactly: to a PEFT LoRA directory (vLLM, TGI, llama.cpp) or a merged HF model."""
    from tenslora.export import export_adapter
    report = export_adapter(src, format, output, model=model, overwrite=overwrite, head=head)
    what = report.get("construction", report["method"])
    typer.echo(f"wrote {report['output']} ({report['format']}) from {report['source']} [{what}] on {report['model']}")
    if "lora_parameters" in report:
        typer.echo(f"parameters: LoRA {report['lora_parameters']:,} (exported) vs adapter "
                   f"{report['adapter_parameters']:,} (tensor)")


def compress_command(
    src: Annotated[Path, typer.Argument(help="a PEFT LoRA directory (or a run directory of a lora run)")],
    construction: Annotated[str, typer.Option(help="att, qkv, depth, att_qkv, att_depth, qkv_depth, att_qkv_depth")],
    output: Annotated[Path, typer.Option("--output", "-o", help="tenslora adapter directory to write")],
    ranks: Annotated[str, typer.Option(help="one rank, or one per mode like 8_8_4_4")] = "8",
    factorization: Annotated[str, typer.Option(help="tucker (HOSVD + HOOI) or cp (ALS)")] = "tucker",
    model: Annotated[Optional[str], typer.Option(help="base model directory (default: from the run)")] = None,
    iterations: Annotated[int, typer.Option(help="HOOI / ALS iterations at most")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the CP initialisation where SVD cannot fill it")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Fit a trained PEFT LoRA's updates with a tensor adapter; report the error and the parameter ratio."""
    from tenslora.export.compress import compress_lora
    r = compress_lora(src, construction, factorization, ranks, output, model=model, iterations=iterations,
                      seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {r['output']} ({construction}/{factorization}, ranks {r['ranks']})")
    typer.echo(f"relative error ||T - T_hat|| / ||T|| = {r['relative_error']:.4g}")
    typer.echo(f"parameters: LoRA {r['lora_parameters']:,} -> tensor {r['adapter_parameters']:,} "
               f"({r['parameter_ratio']:.1f}x fewer)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("compress")(compress_command)
