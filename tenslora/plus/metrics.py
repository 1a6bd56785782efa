"""Model-level TensLoRA+ metrics: per-mode spectra and gradient norms of a whole adapter.

Keys: ``metrics[tensor][mode][metric]``. ``tensor`` is ``"adapter"`` for every tensor of the
construction aggregated (stacked along a new mode, so the mode-n Grams add up), ``"mlp"`` for the MLP
tensors aggregated likewise (targets ``all-linear``; modes ``input``, ``output``, ``qkv``, ``layers``), or a tensor name
(``per_tensor=True``; for LoRA one ``layer_<l>.<proj>`` per projection, mode ``matrix``).
Modes are the construction's (``input``, ``output`` / ``head_dim``, ``heads``, ``qkv``, ``layers``),
plus ``core`` (gradient norm only). For the PEFT LoRA baseline the updates ``dW = B A`` are seen as
the ``qkv_depth`` tensor ``(d_in, d_out, 3, L)``: modes ``input``, ``output``, ``qkv``, ``layers``;
its ``input`` gradient norm is lora_A's, ``output`` lora_B's.
Metrics: ``entropy``, ``top1_energy``, ``effective_rank``, ``max_rank``, ``norm`` (see
:func:`tenslora.plus.spectra.spectrum_metrics`; the adapter's ``alpha/r`` scaling is not applied, the
normalised metrics do not depend on it) and ``grad_norm`` (of the factor of that mode, all tensors;
for a tensor train, of that mode's core, and there is no ``core`` entry). TT spectra are exact too,
from the bond Grams of the train (:func:`tenslora.plus.spectra.tt_pairs`).
"""
from __future__ import annotations

import torch

from tenslora.plus import spectra

AGGREGATE = "adapter"
MLP_AGGREGATE = "mlp"  # targets all-linear: the MLP tensors aggregated on their own (AGGREGATE: the attention's)
SPECTRUM_METRICS = ("entropy", "top1_energy", "effective_rank")


def is_lora(adapted) -> bool:
    return adapted.adapter_config.method == "lora"


def adapter_tensors(adapted) -> dict:
    """``{tensor name: Tucker/CP/TensorTrain module}`` of a TensLoRA model."""
    return {name: adapter.tensor for name, adapter in adapted.adapters.items()}


def aggregates(adapted) -> dict[str, dict]:
    """``{AGGREGATE: the attention tensors, MLP_AGGREGATE: the MLP's}`` (the latter with targets all-linear only):
    the two have different output modes and member counts, so each is stacked with its own kind."""
    mlp = getattr(adapted, "mlp", None)
    prefixes = tuple(f"{stack}__" for stack in mlp.shape.by_stack()) if mlp is not None else ()
    out: dict[str, dict] = {}
    for name, tensor in adapter_tensors(adapted).items():
        out.setdefault(MLP_AGGREGATE if name.startswith(prefixes) else AGGREGATE, {})[name] = tensor
    return out


def lora_factors(adapted, oriented: bool = True) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """``{(layer, proj): (A (r, d_in), B (d_out, r))}`` of a LoRA model, in (layer, projection) order, in
    the tensor's orientation: a transposed target (the output projection O) gives ``(lora_B.T, lora_A.T)``.
    ``oriented=False``: the (input-mode, output-mode) parameters themselves (for O ``(lora_B, lora_A)``)."""
    out = {}
    for t in adapted.targets:
        layer = adapted.lora_layer(t.layer, t.proj)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if t.transposed:
            a, b = (b.T, a.T) if oriented else (b, a)
        out[(t.layer, t.proj)] = (a, b)
    return out


def _lora_spectra(adapted, per_tensor: bool) -> dict[str, dict[str, torch.Tensor]]:
    factors = lora_factors(adapted)
    pairs = {key: spectra.lora_pairs(a, b) for key, (a, b) in factors.items()}
    agg = {"input": spectra.singular_values_of_pairs([p["input"] for p in pairs.values()])}
    if len({b.shape[0] for _, b in factors.values()}) == 1:
        agg["output"] = spectra.singular_values_of_pairs([p["output"] for p in pairs.values()])
        keys = list(factors)
        layers = sorted({k[0] for k in keys})
        projs = list(dict.fromkeys(k[1] for k in keys))
        gram = spectra.stacked_gram([factors[k] for k in keys])  # <dW_i, dW_j>
        index = {k: i for i, k in enumerate(keys)}
        for mode, outer, inner in (("qkv", projs, layers), ("layers", layers, projs)):
            g = torch.zeros(len(outer), len(outer), dtype=spectra.DTYPE)
            for i, x in enumerate(outer):
                for j, y in enumerate(outer):
                    for z in inner:
                        ki = (z, x) if mode == "qkv" else (x, z)
                        kj = (z, y) if mode == "qkv" else (y, z)
                        if ki in index and kj in index:
                            g[i, j] += gram[index[ki], index[kj]]
            agg[mode] = spectra.gram_singular_values(g)
    out = {AGGREGATE: agg}
    if per_tensor:
        for (layer, proj), p in pairs.items():
            out[f"layer_{layer}.{proj}"] = {"matrix": spectra.singular_values_of_pairs([p["input"]])}
    return out


@spectra.single_threaded
def mode_spectra(adapted, per_tensor: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{tensor: {mode: singular values (descending, float64)}}`` without reconstructing any tensor."""
    if is_lora(adapted):
        return _lora_spectra(adapted, per_tensor)
    tensors = adapter_tensors(adapted)
    out = {key: spectra.tensors_spectra(group) for key, group in aggregates(adapted).items()}
    if per_tensor and len(tensors) > 1:
        for name, tensor in tensors.items():
            out[name] = spectra.tensors_spectra({name: tensor})
    return out


@spectra.single_threaded
def gradient_norms(adapted, per_tensor: bool = False) -> dict[str, dict[str, float]]:
    """``{tensor: {mode or "core": grad norm}}``; read after ``backward`` (and after AMP unscaling)."""
    if is_lora(adapted):
        factors = lora_factors(adapted, oriented=False)
        out = {AGGREGATE: {"input": spectra.grad_norm([a for a, _ in factors.values()]),
                           "output": spectra.grad_norm([b for _, b in factors.values()])}}
        if per_tensor:
            for (layer, proj), (a, b) in factors.items():
                out[f"layer_{layer}.{proj}"] = {"matrix": spectra.grad_norm([a, b])}
        return out
    tensors = adapter_tensors(adapted)

    def norms(group: list) -> dict[str, float]:
        modes = dict.fromkeys(m for t in group for m in t.mode_names)
        params = [t.mode_parameters() for t in group]
        res = {m: spectra.grad_norm([p[m] for p in params if m in p]) for m in modes}
        cores = [t.core for t in group if getattr(t, "core", None) is not None]
        if cores:
            res["core"] = spectra.grad_norm(cores)
        return res

    out = {key: norms(list(group.values())) for key, group in aggregates(adapted).items()}
    if per_tensor and len(tensors) > 1:
        out.update({name: norms([t]) for name, t in tensors.items()})
    return out


@spectra.single_threaded
def adapter_metrics(adapted, per_tensor: bool = False, grads: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """``{tensor: {mode: {metric: value}}}``: spectrum metrics per mode, and ``grad_norm`` if ``grads``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for tensor, modes in mode_spectra(adapted, per_tensor).items():
        out[tensor] = {mode: spectra.spectrum_metrics(s) for mode, s in modes.items()}
    if grads:
        for tensor, modes in gradient_norms(adapted, per_tensor).items():
            for mode, value in modes.items():
                out.setdefault(tensor, {}).setdefault(mode, {})["grad_norm"] = value
    return out


@spectra.single_threaded
def group_grad_norms(groups: list[dict]) -> dict[str, float]:
    """``{group name: grad norm}`` for optimizer groups as built by ``build_param_groups``."""
    return {g.get("name", str(i)): spectra.grad_norm(g["params"]) for i, g in enumerate(groups)}


def rows(metrics: dict, step: int | None = None) -> list[tuple]:
    """Long format: ``(step, tensor, mode, metric, value)`` (``step`` left out when None)."""
    out = []
    for tensor, modes in metrics.items():
        for mode, values in modes.items():
            for metric, value in values.items():
                row = (tensor, mode, metric, value)
                out.append(row if step is None else (step, *row))
    return out
