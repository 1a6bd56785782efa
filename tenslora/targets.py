"""Find the attention projections to adapt in a Hugging Face model, generically.

An *attention site* is a module whose children hold the query, key and value projections, either as
three separate linear modules named by one of :data:`SEPARATE_QKV` (``query, key, value``;
``q_proj, k_proj, v_proj``; ``q, k, v``; ...) or as one fused linear module named in
:data:`FUSED_QKV` (``c_attn``, ``query_key_value``, ``Wqkv``, ``qkv_proj``...), inside a module whose
class name says attention, whose output columns are the three projections in a layout verified
against the model's own split code (:data:`FUSED_LAYOUTS`, per model type; others are refused). A
linear module is an ``nn.Linear`` (subclasses included), transformers' ``Conv1D`` (weight
``(in, out)``), or a wrapper holding one as ``.linear``.

Sites are grouped into *stacks*: sites with the same path pattern (indices blurred) and the same
widths, e.g. an encoder's self-attention, a decoder's self-attention, its cross-attention, or one
stage of a hierarchical vision model. Each stack has its own layers axis (its sites in path order)
and its own tensors. A model with one stack keeps the plain tensor names (``all``, ``layer_3``...);
with several, names are prefixed by the stack's name. A module shared by several layers (ALBERT)
is one site: its update is shared like its weights, as executed. Cross-attention is adapted (its own
stack) in encoder-decoder models, and skipped with a warning where no encoder feeds it. Attention
modules holding no recognised projections are named in a warning (or in the error if nothing is found).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

SEPARATE_QKV: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
    ("query_proj", "key_proj", "value_proj"),
    ("Wq", "Wk", "Wv"),
    ("q_head", "k_head", "v_head"),
    ("project_q", "project_k", "project_v"),
    ("projection_query", "projection_key", "projection_value"),
)
FUSED_QKV = ("c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv", "in_proj")
FUSED_NAMES = ("query", "key", "value")  # projection names of a fused module's three parts

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim", "d_head", "dim_head")
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads")
KV_HEADS_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


def _blocks(heads: int, kv_heads: int, head_dim: int) -> list[list[int]]:
    """``[Q | K | V]`` contiguous: Q ``heads * head_dim`` columns, then K and V ``kv_heads * head_dim``."""
    dq, dkv = heads * head_dim, kv_heads * head_dim
    return [list(range(dq)), list(range(dq, dq + dkv)), list(range(dq + dkv, dq + 2 * dkv))]


def _per_head(heads: int, kv_heads: int, head_dim: int) -> list[list[int]]:
    """Per head ``[q_h | k_h | v_h]``: column of projection ``p``, head ``h``, dim ``d`` is
    ``h * 3 * head_dim + p * head_dim + d`` (requires as many key/value heads as query heads)."""
    if kv_heads != heads:
        raise ValueError(f"per-head interleaved Q/K/V needs equal query and key/value heads, got {heads}/{kv_heads}")
    return [[h * 3 * head_dim + p * head_dim + d for h in range(heads) for d in range(head_dim)] for p in range(3)]


def _grouped(heads: int, kv_heads: int, head_dim: int) -> list[list[int]]:
    """Per key/value group ``g``: ``[q heads of g | k_g | v_g]`` (Falcon's new decoder architecture)."""
    per = heads // kv_heads
    width = (per + 2) * head_dim
    q = [(h // per) * width + (h % per) * head_dim + d for h in range(heads) for d in range(head_dim)]
    k = [g * width + per * head_dim + d for g in range(kv_heads) for d in range(head_dim)]
    v = [g * width + (per + 1) * head_dim + d for g in range(kv_heads) for d in range(head_dim)]
    return [q, k, v]


def _codegen(heads: int, kv_heads: int, head_dim: int, shards: int = 4) -> list[list[int]]:
    """CodeGen: 4 model-parallel shards ``[q_m | v_m | k_m]`` (note V before K), each ``d / 4`` wide;
    the query's flat column ``i`` (head-major) is in shard ``i // (d / 4)``."""
    d = heads * head_dim
    local = d // shards
    q = [m * 3 * local + r for m in range(shards) for r in range(local)]
    return [q, [c + 2 * local for c in q], [c + local for c in q]]


# model_type -> (fused leaf names it uses, layout chosen from the model config); each checked in
# transformers' split code: gpt2 `c_attn(..).split(split_size)`; gpt_bigcode multi_query `split((embed,
# kv, kv))` else `view(heads, 3 * head_dim).split`; gpt_neox `view(-1, 3 * head_dim).chunk(3)`;
# bloom/persimmon `view(heads, 3, head_dim)`; mpt `chunk(3)`; modernbert `view(3, -1, head_dim)`;
# phi3, phi4_multimodal `qkv[..., :query_pos]`, then key/value blocks; gpt_neox_japanese
# `view(heads, 3 * head_size)`; openai-gpt `split(split_size)`; hiera
# `reshape(..., 3, heads, head_dim)`; falcon `view(-1, heads // kv + 2, head_dim)` (new decoder
# architecture), `view(heads + 2, head_dim)` (multi-query), else `view(heads, 3, head_dim)`; deberta (v1)
# `view(heads, -1).chunk(3, dim=-1)` (its other branch reads `in_proj.weight` directly, only when
# `DebertaModel.z_steps > 1`, which transformers fixes at 0); codegen `view(..., -1, 3 * (d // 4))` then
# `split(d // 4)` into (query, value, key); dbrx `split([d, kv * head_dim, kv * head_dim])` (before its clamp).
LayoutFn = Callable[[int, int, int], list[list[int]]]
FUSED_LAYOUTS: dict[str, Callable[[object], LayoutFn]] = {
    "gpt2": lambda c: _blocks,
    "decision_transformer": lambda c: _blocks,
    "imagegpt": lambda c: _blocks,
    "gpt_bigcode": lambda c: _blocks if getattr(c, "multi_query", True) else _per_head,
    "gpt_neox": lambda c: _per_head,
    "bloom": lambda c: _per_head,
    "persimmon": lambda c: _per_head,
    "mpt": lambda c: _blocks,
    "modernbert": lambda c: _blocks,
    "phi3": lambda c: _blocks,
    "phi4_multimodal": lambda c: _blocks,
    "gpt_neox_japanese": lambda c: _per_head,
    "openai-gpt": lambda c: _blocks,
    "hiera": lambda c: _blocks,
    "falcon": lambda c: _grouped if c.new_decoder_architecture else _blocks if c.multi_query else _per_head,
    "deberta": lambda c: _per_head,
    "codegen": lambda c: _codegen,
    "dbrx": lambda c: _blocks,
}

# a fused candidate's parent must say attention (Mamba's ``in_proj`` is no Q/K/V)
_ATTENTION_CLASS = re.compile(r"Attention|Attn")
_CROSS = re.compile(r"cross|encoder_attn|EncDecAttention", re.IGNORECASE)
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


@dataclass(frozen=True)
class Target:
    """One adapted projection: module path, projection name and index, layer (the index in the path,
    or the site's position in its stack) and its position, widths, stack; ``columns``: for a fused
    module, the module's output columns that this projection is (head-major order)."""

    name: str
    proj: str
    proj_index: int
    layer: int
    layer_index: int
    in_features: int
    out_features: int
    stack: str = ""
    columns: tuple[int, ...] | None = None
    site: str = ""  # path of the attention module holding the projection
    transposed: bool = False  # the update enters the tensor transposed (the output projection O)

    @property
    def tensor_widths(self) -> tuple[int, int]:
        """``(d_in, d_out)`` of the projection's slice of its tensor: the module's widths, swapped when
        ``transposed`` (O's slice is ``(d_model, heads * head_dim)``, like Q's)."""
        return (self.out_features, self.in_features) if self.transposed else (self.in_features, self.out_features)


@dataclass(frozen=True)
class ModelShape:
    """The shapes that fix every adapter's tensor: ``d_in``, per-projection ``d_out``, ``head_dim``
    (shared by all projections; grouped-query attention gives key/value fewer heads than query).
    ``stacks``: with several stacks, each stack's shape by name (the fields above are the first's).
    ``fused``: groups of projection indices held by one fused module (``((0, 1, 2),)`` for GPT-2's
    ``c_attn``), which whole-module methods (PEFT LoRA) adapt as one."""

    projections: tuple[str, ...]
    layers: tuple[int, ...]
    d_in: int
    d_out: tuple[int, ...]
    head_dim: int
    stacks: tuple[tuple[str, "ModelShape"], ...] = field(default=())
    fused: tuple[tuple[int, ...], ...] = field(default=())

    def heads(self, proj_index: int) -> int:
        """Heads of projection ``proj_index`` (query heads, or key/value heads under GQA)."""
        return self.d_out[proj_index] // self.head_dim

    def by_stack(self) -> dict[str, "ModelShape"]:
        """``{stack name: shape}`` (``{"": self}`` for a single stack)."""
        return dict(self.stacks) if self.stacks else {"": self}


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear module (``nn.Linear``, transformers' ``Conv1D``, an ``nn.Conv1d`` with kernel 1
    and one group, or I-BERT's ``QuantLinear`` outside quantization mode, where quantized integer weights
    would not take a float update), else None. A grouped 1x1 convolution is not one: its block-diagonal
    weight cannot hold a dense update."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1 \
            and module.stride == (1,) and module.padding in ((0,), "valid") and module.dilation == (1,):
        return module.in_channels, module.out_channels  # a linear map over channels (SqueezeBERT)
    if type(module).__name__ == "QuantLinear" and getattr(module, "quant_mode", True) is False:
        return module.in_features, module.out_features  # I-BERT unquantized: a linear returning (y, None)
    return None


def _linear_child(parent: nn.Module, leaf: str) -> tuple[str, nn.Module] | None:
    """``(relative path, module)`` of the linear module at ``leaf`` (or its ``.linear``), else None."""
    child = getattr(parent, leaf, None)
    if not isinstance(child, nn.Module):
        return None
    if _widths(child):
        return leaf, child
    inner = getattr(child, "linear", None)
    if isinstance(inner, nn.Module) and _widths(inner):
        return f"{leaf}.linear", inner
    return None


def _attr(objects, names) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _safe_attr(config, names) -> int | None:
    try:
        return _attr([config], names)
    except Exception:  # noqa: BLE001 - per-layer attributes that refuse a global read (Gemma-4)
        return None


def _module_configs(model: nn.Module, site: nn.Module) -> list:
    """Configs that may describe ``site``: its own ``config``, then the model's sub-configs, then the model's."""
    out = [c for c in (getattr(site, "config", None),) if c is not None]
    config = getattr(model, "config", None)
    if config is not None:
        subs = [getattr(config, k) for k in ("text_config", "vision_config", "encoder", "decoder")
                if getattr(config, k, None) is not None]
        out += subs + [config]
    return out


def _head_dim(model: nn.Module, site: nn.Module, d_query: int) -> int:
    """Head width of the attention module ``site``: its own attribute (``head_dim``...), else its
    width over its heads (``num_heads``...), else the config it belongs to (sub-configs included:
    the first whose heads divide ``d_query``)."""
    head_dim = _attr([site], HEAD_DIM_ATTRS)
    if head_dim and d_query % head_dim == 0:
        return head_dim
    heads = _attr([site], HEADS_ATTRS)
    if heads and d_query % heads == 0:
        return d_query // heads
    for config in _module_configs(model, site):
        head_dim, heads = _safe_attr(config, ("head_dim",)), _safe_attr(config, HEADS_ATTRS)
        if head_dim and d_query % head_dim == 0 and (not heads or getattr(config, "hidden_size", 0) != d_query
                                                     or heads * head_dim == d_query):
            return head_dim
        if heads and d_query % heads == 0:
            return d_query // heads
    heads = _attr([site], HEADS_ATTRS) or next((h for c in _module_configs(model, site)
                                                if (h := _safe_attr(c, HEADS_ATTRS))), None)
    if heads:
        raise ValueError(f"{heads} heads do not divide the projection width {d_query}")
    raise ValueError(f"cannot tell the number of attention heads of {type(site).__name__} in "
                     f"{type(model).__name__} (no head_dim/num_heads on the module or its config)")


@dataclass
class _Site:
    path: str
    projections: tuple[str, ...]
    modules: tuple[str, ...]  # module path per projection (the fused module repeated)
    widths: tuple[tuple[int, int], ...]
    columns: tuple[tuple[int, ...] | None, ...]


def _fused_site(model: nn.Module, path: str, parent: nn.Module, leaf: str, found) -> _Site:
    rel, module = found
    d_in, d_out = _widths(module)
    config = getattr(parent, "config", None) or model.config  # the attention's own (sub-)config where it keeps one
    model_type = getattr(config, "model_type", None)
    choose = FUSED_LAYOUTS.get(model_type)
    if choose is None:
        raise ValueError(f"fused Q/K/V module {path + '.' + rel!r} of model type {model_type!r} has no verified "
                         f"column layout (verified: {', '.join(FUSED_LAYOUTS)}); use construction 'lora' or pass "
                         "target_modules")
    layout = choose(config)
    head_dim = _attr([parent], HEAD_DIM_ATTRS) or _head_dim(model, parent, _attr([parent], ("embed_dim", "hidden_size"))
                                                           or d_out // 3)
    heads = _attr([parent], HEADS_ATTRS) or _attr([config], ("num_attention_heads", "n_head"))
    heads = heads or (d_out // 3) // head_dim
    kv_heads = _attr([parent], KV_HEADS_ATTRS) or _attr([config], KV_HEADS_ATTRS) or heads
    if layout is _blocks and heads * head_dim + 2 * kv_heads * head_dim != d_out:
        kv_heads = (d_out - heads * head_dim) // (2 * head_dim)  # multi-query: one key/value head
    columns = layout(heads, kv_heads, head_dim)
    if sorted(c for cols in columns for c in cols) != list(range(d_out)):
        raise ValueError(f"fused Q/K/V module {path + '.' + rel!r}: {heads} query and {kv_heads} key/value heads of "
                         f"{head_dim} do not partition its {d_out} output columns")
    name = f"{path}.{rel}" if path else rel
    return _Site(path, FUSED_NAMES, (name,) * 3, tuple((d_in, len(c)) for c in columns),
                 tuple(tuple(c) for c in columns))


def _sites(model: nn.Module, names: Sequence[Sequence[str]],
           fused: bool) -> tuple[list[_Site], list[str], list[str]]:
    """Attention sites in module order, why each refused candidate was refused, and notes on what
    partly-adapted kinds (latent attention) leave out."""
    sites, refused, notes = [], [], []
    for path, parent in model.named_modules():
        for projections in names:
            found = [_linear_child(parent, leaf) for leaf in projections]
            if all(found):
                mods = tuple(f"{path}.{rel}" if path else rel for rel, _ in found)
                sites.append(_Site(path, tuple(projections), mods, tuple(_widths(m) for _, m in found),
                                   (None,) * len(projections)))
                break
        else:
            latent = (_latent_sites(path, parent) or _shared_kv_sites(path, parent)) if fused else None
            if latent is not None:
                sites.extend(latent[0])
                notes.append(latent[1])
                continue
            attention_like = _ATTENTION_CLASS.search(type(parent).__name__)
            for leaf in FUSED_QKV if fused and attention_like else ():
                found = _linear_child(parent, leaf)
                if found is None:
                    continue
                try:
                    sites.append(_fused_site(model, path, parent, leaf, found))
                except ValueError as err:
                    refused.append(str(err))
                break
    return sites, refused, notes


# latent attention (DeepSeek-V2/V3 MLA and its copies): the query from ``q_b_proj`` (or ``q_proj`` without a
# query latent); key and value both from ``kv_b_proj``, read per head as ``view(..., heads, nope + v_head_dim)``
# then ``split([nope, v_head_dim])``: head h's non-rotary key columns, then its value columns
LATENT_QUERY = ("q_b_proj", "q_proj")
LATENT_KV = "kv_b_proj"
LATENT_COMPRESSION = "kv_a_proj_with_mqa"


def _latent_kv(heads: int, nope: int, v_dim: int) -> list[list[int]]:
    """Per head ``[k_nope_h | v_h]``: the key (non-rotary part) and value columns of ``kv_b_proj``."""
    width = nope + v_dim
    return [[h * width + d for h in range(heads) for d in range(nope)],
            [h * width + nope + d for h in range(heads) for d in range(v_dim)]]


def _latent_sites(path: str, parent: nn.Module) -> tuple[list[_Site], str] | None:
    """``(sites, note)`` of a latent-attention module (children ``kv_a_proj_with_mqa`` and ``kv_b_proj``),
    else None: a ``("query",)`` site on the query's up-projection and a ``("key", "value")`` site on
    ``kv_b_proj``'s columns (their own stacks: the two read different latents); the note says what is
    not adapted (the down-projections to the latents, and the rotary key part shared by all heads)."""
    kv = _linear_child(parent, LATENT_KV)
    nope, v_dim = (_attr([parent], (k,)) for k in ("qk_nope_head_dim", "v_head_dim"))
    if kv is None or _linear_child(parent, LATENT_COMPRESSION) is None or not nope or not v_dim:
        return None
    rel, module = kv
    d_in, d_out = _widths(module)
    if d_out % (nope + v_dim):
        return None
    columns = _latent_kv(d_out // (nope + v_dim), nope, v_dim)
    name = f"{path}.{rel}" if path else rel
    sites = [_Site(path, ("key", "value"), (name, name), tuple((d_in, len(c)) for c in columns),
                   tuple(tuple(c) for c in columns))]
    query = next((found for leaf in LATENT_QUERY if (found := _linear_child(parent, leaf))), None)
    if query is not None:
        q_name = f"{path}.{query[0]}" if path else query[0]
        sites.insert(0, _Site(path, ("query",), (q_name,), (_widths(query[1]),), (None,)))
    adapted = (f"query = {query[0]}, " if query else "") + f"key, value = {LATENT_KV}'s per-head columns"
    missing = "" if query else f"the query ({type(parent).__name__} has no {' or '.join(LATENT_QUERY)}), "
    note = (f"latent attention ({type(parent).__name__}): adapted {adapted} (query and key/value are separate "
            f"stacks: they read different latents); not adapted: {missing}the down-projections to the latents "
            f"(q_a_proj, {LATENT_COMPRESSION}) and the rotary key part that {LATENT_COMPRESSION} shares across heads")
    return sites, note


def _shared_kv_sites(path: str, parent: nn.Module) -> tuple[list[_Site], str] | None:
    """``(sites, note)`` of shared-KV latent attention (DeepSeek-V4: ``q_b_proj`` for the query, one
    ``kv_proj`` head read as both key and value), else None: a ``("query",)`` site and a
    ``("key_value",)`` site (one update serves key and value, as the model reads one tensor as both)."""
    query, kv = _linear_child(parent, "q_b_proj"), _linear_child(parent, "kv_proj")
    head_dim = _attr([parent], ("head_dim",))
    if query is None or kv is None or _linear_child(parent, LATENT_KV) or _widths(kv[1])[1] != head_dim:
        return None
    name = (lambda rel: f"{path}.{rel}" if path else rel)
    sites = [_Site(path, ("query",), (name(query[0]),), (_widths(query[1]),), (None,)),
             _Site(path, ("key_value",), (name(kv[0]),), (_widths(kv[1]),), (None,))]
    note = (f"shared-KV latent attention ({type(parent).__name__}): adapted query = q_b_proj and key_value = kv_proj "
            "(one head read as both key and value, so one update serves both), as separate stacks; not adapted: "
            "q_a_proj (the query latent) and any compressor's own projections")
    return sites, note


def _uncovered_attention(model: nn.Module, site_paths: list[str]) -> list[str]:
    """A note naming the attention modules (by class name) that hold no adapted site and are inside none
    (other attention kinds, e.g. latent attention next to plain layers), so partial coverage is never silent."""
    def related(path: str) -> bool:
        return any(p == path or p.startswith(path + ".") or path.startswith(p + ".") or not p or not path
                   for p in site_paths)
    missed = [p for p, m in model.named_modules()
              if _ATTENTION_CLASS.search(type(m).__name__) and not related(p)]
    missed = [p for p in missed if not any(p.startswith(q + ".") for q in missed)]  # outermost only
    if not missed:
        return []
    kinds = sorted({type(model.get_submodule(p)).__name__ for p in missed})
    return [f"{len(missed)} attention modules ({', '.join(kinds)}; e.g. {missed[0]}) hold no recognised "
            "Q/K/V projections"]


def _pattern(path: str) -> str:
    return _INDEX.sub("N", path)


def _stack_name(pattern: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]+", "_", pattern.replace(".N", ""))).strip("_") or "root"


def find_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[Target]:
    """All projections to adapt, sorted by (stack, layer, projection); ValueError if none is found.

    ``target_modules``: leaf names of the projections, in ``qkv`` order (default: the synonym table)."""
    names = [tuple(target_modules)] if target_modules else SEPARATE_QKV
    sites, refused, notes = _sites(model, names, fused=not target_modules)
    if not target_modules and not refused:
        refused += _uncovered_attention(model, [s.path for s in sites])
    refused += notes
    if not sites:
        allowed = " | ".join(",".join(p) for p in SEPARATE_QKV) + " | fused " + ",".join(FUSED_QKV)
        tried = ",".join(target_modules) if target_modules else allowed
        why = f" ({'; '.join(dict.fromkeys(refused))})" if refused else ""
        short = ",".join(target_modules) if target_modules else "by the synonym table"
        raise ValueError(f"no attention projections named {short} found in {type(model).__name__}{why}; pass "
                         f"target_modules or use construction 'lora' (names tried: {tried})")
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        cross = [s.path for s in sites if _CROSS.search(s.path)]
        if cross and len(cross) < len(sites):
            sites = [s for s in sites if s.path not in cross]
            refused.append(f"{len(cross)} cross-attention modules ({cross[0]}, ...) are skipped: "
                           f"{type(model).__name__} has no encoder to feed them (config.is_encoder_decoder is False)")
    if refused:
        import warnings
        warnings.warn(f"some attention modules are not adapted: {'; '.join(dict.fromkeys(refused))}", stacklevel=2)
    stacks: dict[tuple, list[_Site]] = {}
    for site in sites:
        stacks.setdefault((_pattern(site.path), site.projections, site.widths), []).append(site)
    names_by_pattern: dict[str, int] = {}
    for key in stacks:
        names_by_pattern[key[0]] = names_by_pattern.get(key[0], 0) + 1
    targets, used_names = [], set()
    for key, members in stacks.items():
        pattern, projections, widths = key
        stack = "" if len(stacks) == 1 else _stack_name(pattern) + (
            "_" + "_".join(str(w) for w in (widths[0][0], *(o for _, o in widths)))
            if names_by_pattern[pattern] > 1 else "")
        if stack and stack in used_names:
            stack += f"_{len(used_names)}"
        used_names.add(stack)
        indices = [[int(i) for i in _INDEX.findall(s.path)] for s in members]
        own = [ix[-1] if len(ix) == 1 else None for ix in indices]
        use_own = None not in own and len(set(own)) == len(own)
        order = sorted(range(len(members)), key=lambda i: indices[i])
        for position, i in enumerate(order):
            site = members[i]
            layer = own[i] if use_own else position
            for p, proj in enumerate(projections):
                d_in, d_out = site.widths[p]
                targets.append(Target(site.modules[p], proj, p, layer, position, d_in, d_out, stack, site.columns[p],
                                      site.path))
    return targets


# The attention output projection O (``targets="qkvo"``): a child of the attention site named by
# :data:`OUTPUT_NAMES`, else, when the site's parent is itself an attention module (BERT, RoBERTa,
# DeBERTa, ELECTRA: ``attention.self`` next to ``attention.output.dense``), a child of one of the
# parent's :data:`OUTPUT_HOLDERS` or of the parent itself. O joins its site's tensor transposed, so it
# must read the query width and write the site's input width (docs/constructions.md, "qkvo").
OUTPUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "o", "out_lin", "Wo", "wo", "proj", "out", "output_proj",
                "o_lin", "out_dense")
OUTPUT_HOLDERS = ("output", "self_output", "attention_output")


def _output_projection(model: nn.Module, site: str, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of the output projection of the attention site at ``site``, else None."""
    def child(path: str, module: nn.Module):
        for leaf in names:
            found = _linear_child(module, leaf)
            if found:
                return (f"{path}.{found[0]}" if path else found[0]), found[1]
        return None

    found = child(site, model.get_submodule(site))
    if found or not site:
        return found
    parent_path = site.rpartition(".")[0]
    parent = model.get_submodule(parent_path)
    if not _ATTENTION_CLASS.search(type(parent).__name__):
        return None
    for holder in OUTPUT_HOLDERS:
        module = getattr(parent, holder, None)
        if isinstance(module, nn.Module) and not _widths(module):
            found = child(f"{parent_path}.{holder}" if parent_path else holder, module)
            if found:
                return found
    return child(parent_path, parent)


def with_output_projections(model: nn.Module, targets: Sequence[Target], leaf: str | None = None,
                            option: str = "qkvo") -> list[Target]:
    """``targets`` (Q/K/V) plus each site's output projection O right after its Q/K/V, as a transposed
    projection (``proj``: its leaf name; ``proj_index`` 3). ``leaf``: O's leaf name (default: the synonym
    table). ValueError, one line, where a site has no O or an O whose widths do not fit the tensor
    (``in == Q's width``, ``out ==`` the site's input width)."""
    names = (leaf,) if leaf else OUTPUT_NAMES
    out: list[Target] = []
    claimed: dict[str, str] = {}
    sites = list(dict.fromkeys(t.site for t in targets))
    for i, site in enumerate(sites):
        own = [t for t in targets if t.site == site]
        query = next(t for t in own if t.proj_index == 0)
        found = _output_projection(model, site, names)
        if found is None:
            raise ValueError(f"targets {option!r}: no output projection found for the attention module {site!r} "
                             f"(names tried: {', '.join(names)}); use targets 'qkv'")
        path, module = found
        o_in, o_out = _widths(module)
        if (o_in, o_out) != (query.out_features, query.in_features):
            raise ValueError(f"targets {option!r}: output projection {path!r} maps {o_in} -> {o_out}, but joins the tensor "
                             f"only if it maps the query width {query.out_features} -> the model width "
                             f"{query.in_features}; use targets 'qkv'")
        if path in claimed:
            raise ValueError(f"targets {option!r}: output projection {path!r} would serve both {claimed[path]!r} and "
                             f"{site!r}; use targets 'qkv'")
        claimed[path] = site
        out += own + [Target(path, path.rsplit(".", 1)[-1], len(own), query.layer, query.layer_index, o_in, o_out,
                             query.stack, None, site, transposed=True)]
    return out


def _qkvo_targets(model: nn.Module, target_modules: Sequence[str] | None, option: str = "qkvo") -> list[Target]:
    """``target_modules``: Q, K, V leaf names, optionally O's as a fourth."""
    names = tuple(target_modules or ())
    if names and len(names) not in (3, 4):
        raise ValueError(f"target_modules {names} for targets {option!r} must name Q, K, V and optionally O")
    return with_output_projections(model, find_targets(model, names[:3] or None), names[3] if len(names) == 4 else None,
                                   option)


# targets option (``TensLoRAConfig.targets``) -> (model, target_modules) -> the attention projections to adapt
# (``all-linear``: Q/K/V/O here, and the MLP's own tensors from tenslora/mlp.py)
TARGET_FINDERS: dict[str, Callable[[nn.Module, Sequence[str] | None], list[Target]]] = {
    "qkv": find_targets,
    "qkvo": _qkvo_targets,
    "all-linear": functools.partial(_qkvo_targets, option="all-linear"),
}


def select_targets(model: nn.Module, targets: str = "qkv", target_modules: Sequence[str] | None = None) -> list[Target]:
    """The attention projections that the ``targets`` option names (``qkv``, ``qkvo``, ``all-linear``) in ``model``."""
    if targets not in TARGET_FINDERS:
        raise ValueError(f"targets {targets!r} are not available yet; allowed: {', '.join(TARGET_FINDERS)}")
    return TARGET_FINDERS[targets](model, target_modules)


def describe_targets(targets: Sequence[Target]) -> str:
    """One line per stack: projections, layers, widths (what an adapter built on ``targets`` adapts)."""
    lines = []
    for stack in dict.fromkeys(t.stack for t in targets):
        ts = [t for t in targets if t.stack == stack]
        projections = list(dict.fromkeys(t.proj for t in ts))
        widths = {p: next((t.in_features, t.out_features) for t in ts if t.proj == p) for p in projections}
        fused = " (fused module, sliced)" if ts[0].columns is not None else ""
        lines.append(f"{stack or 'all'}: {len({t.layer_index for t in ts})} layers x {', '.join(projections)}{fused}; "
                     + ", ".join(f"{p} {i}->{o}" for p, (i, o) in widths.items()))
    return "\n".join(lines)


def _stack_shape(model: nn.Module, targets: Sequence[Target]) -> ModelShape:
    projections = tuple(dict.fromkeys(t.proj for t in sorted(targets, key=lambda t: t.proj_index)))
    layers = tuple(sorted({t.layer for t in targets}))
    grid = {(t.proj_index, t.layer_index) for t in targets}
    if len(grid) != len(projections) * len(layers) or len(targets) != len(grid):
        raise ValueError(f"the adapted projections {projections} are not present once in every layer {layers}")
    d_in = {t.tensor_widths[0] for t in targets}
    if len(d_in) != 1:
        raise ValueError(f"adapted projections have different input widths {sorted(d_in)}")
    d_out = []
    for p in projections:
        widths = {t.tensor_widths[1] for t in targets if t.proj == p}
        if len(widths) != 1:
            raise ValueError(f"projection {p!r} has different widths across layers: {sorted(widths)}")
        d_out.append(widths.pop())
    site = model.get_submodule(targets[0].site)
    return ModelShape(projections, layers, d_in.pop(), tuple(d_out), _head_dim(model, site, d_out[0]),
                      fused=_fused_groups(targets))


def _fused_groups(targets: Sequence[Target]) -> tuple[tuple[int, ...], ...]:
    """Projection indices sharing one fused module, from the first layer's targets."""
    first = [t for t in targets if t.layer_index == 0 and t.columns is not None]
    modules = dict.fromkeys(t.name for t in first)
    return tuple(tuple(sorted(t.proj_index for t in first if t.name == m)) for m in modules)


def model_shape(model: nn.Module, targets: Sequence[Target]) -> ModelShape:
    """Shapes of the target grid, per stack; checks that each stack is complete and consistent."""
    stacks = list(dict.fromkeys(t.stack for t in targets))
    shapes = [(s, _stack_shape(model, [t for t in targets if t.stack == s])) for s in stacks]
    if len(shapes) == 1:
        return shapes[0][1]
    first = shapes[0][1]
    return ModelShape(first.projections, first.layers, first.d_in, first.d_out, first.head_dim, tuple(shapes))


HEAD_NAMES = ("classifier", "score")


def find_head_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Paths of the task-head modules to keep trainable (outermost match per name)."""
    wanted = tuple(names) if names is not None else HEAD_NAMES
    found: list[str] = []
    for path, _ in model.named_modules():
        if path and path.rsplit(".", 1)[-1] in wanted and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    if names is not None:
        missing = [n for n in names if not any(p.rsplit(".", 1)[-1] == n for p in found)]
        if missing:
            raise ValueError(f"modules_to_save {missing} not found in {type(model).__name__}")
    return found


def _shape_record(shape: ModelShape) -> dict:
    return {"projections": list(shape.projections), "layers": list(shape.layers),
            "d_in": shape.d_in, "d_out": list(shape.d_out), "head_dim": shape.head_dim}


def fingerprint(model: nn.Module, shape: ModelShape) -> dict:
    """What an adapter file must match: architecture type and the adapted shapes (per stack)."""
    config = getattr(model, "config", None)
    record = {"model_type": getattr(config, "model_type", type(model).__name__), **_shape_record(shape)}
    if shape.stacks:
        record["stacks"] = {name: _shape_record(s) for name, s in shape.stacks}
    return record


def check_fingerprint(saved: dict, actual: dict) -> None:
    """ValueError naming every field where a saved adapter and the model disagree."""
    diffs = [f"{k}: adapter has {saved.get(k)!r}, model has {actual[k]!r}"
             for k in actual if saved.get(k) != actual[k]]
    if diffs:
        raise ValueError("adapter does not fit this model (" + "; ".join(diffs) + ")")
