"""Adapters that leave tenslora: ``peft`` (a standard PEFT LoRA directory, exact) or ``merged`` (a plain
Hugging Face model directory with the updates added to the base weights). A registry maps each format
to the function that fills the output directory; everything is validated before anything is written.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tenslora.export.source import Source, check_output, load_base, resolve_source, saved_tensors
from tenslora.io import write_dir_atomic


@dataclass
class Loaded:
    """A source rebuilt on its base model: ``adapted`` is a tenslora model or a ``peft.PeftModel``."""

    source: Source
    method: str
    adapted: nn.Module
    kind: str


def load_peft(model: nn.Module, adapter_dir: Path, model_path: str) -> nn.Module:
    """``PeftModel.from_pretrained`` with shape/name mismatches turned into one-line ValueErrors."""
    from peft import PeftModel

    from tenslora.train.modeling import _first_line
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"LoRA adapter {adapter_dir} does not fit model {model_path}: {_first_line(exc)}") from None


def load_source(source: Source) -> Loaded:
    """Rebuild the adapter of ``source`` on a fresh base model (checks that the two fit)."""
    from tenslora.api import load_adapted_model
    tensors = saved_tensors(source.adapter_dir)
    if source.record is not None:
        method = source.record.get("method")
        head = [v for k, v in tensors.items() if k.startswith("head.")]
        if method == "lora":
            head = [v for k, v in tensors.items() if "lora_" not in k]
    else:
        method, head = "lora", [v for k, v in tensors.items() if "lora_" not in k]
    model, kind = load_base(source, head)
    if source.record is not None:
        adapted = load_adapted_model(model, source.adapter_dir)
    else:
        adapted = load_peft(model, source.adapter_dir, source.model_path)
    return Loaded(source, method, adapted.eval(), kind)


def _fill_peft(loaded: Loaded, directory: Path, head: bool) -> dict:
    from tenslora.export.to_peft import copy_peft_files, write_tenslora_as_peft
    if loaded.method == "lora":
        return {"lora_parameters": copy_peft_files(loaded.source.adapter_dir, directory, head)}
    return {"lora_parameters": write_tenslora_as_peft(loaded.adapted, directory, loaded.source.model_path, head)}


@torch.no_grad()
def _fill_merged(loaded: Loaded, directory: Path, head: bool) -> dict:
    from tenslora.train.modeling import load_preprocessor
    model = loaded.adapted.merge_and_unload()
    model.save_pretrained(str(directory))
    try:
        load_preprocessor(loaded.source.model_path, loaded.kind).save_pretrained(str(directory))
    except (FileNotFoundError, ValueError):
        pass  # the base directory has no tokenizer / image processor to copy
    return {}


# format -> fill(loaded, directory, head) -> extra report fields
FORMATS: dict[str, Callable[[Loaded, Path, bool], dict]] = {"peft": _fill_peft, "merged": _fill_merged}


def adapter_parameter_count(loaded: Loaded) -> int:
    if loaded.method == "lora" and not hasattr(loaded.adapted, "adapter_parameters"):
        return sum(p.numel() for n, p in loaded.adapted.named_parameters() if "lora_" in n)
    return loaded.adapted.adapter_parameters()


def export_adapter(src: str | Path, fmt: str, output: str | Path, model: str | None = None,
                   overwrite: bool = False, head: bool = True) -> dict:
    """Export the adapter of ``src`` to ``output`` in format ``fmt``; return what was written.

    ``head=False`` leaves the task head out of a ``peft`` export (serving stacks for generation take
    only ``lora_A``/``lora_B``). Raises ValueError/FileNotFoundError before writing anything.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    source = resolve_source(src, model)
    out = check_output(output, overwrite, Path(src))
    loaded = load_source(source)
    if fmt == "peft" and loaded.method == "none":
        raise ValueError(f"{source.adapter_dir} is a linear probe (construction none): it has no adapter to "
                         "export as LoRA; use --format merged")
    report = {"format": fmt, "output": str(out), "source": str(source.adapter_dir), "method": loaded.method,
              "model": source.model_path, "adapter_parameters": adapter_parameter_count(loaded)}

    def fill(tmp: Path) -> None:
        report.update(FORMATS[fmt](loaded, tmp, head))
    write_dir_atomic(out, fill)
    if source.record is not None and loaded.method == "tenslora":
        config = source.record["config"]
        report["construction"] = f"{config['construction']}/{config['factorization']}"
    return report
