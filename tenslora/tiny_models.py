"""Tiny random models of any transformers model type, built from its default config shrunk.

:func:`build` takes a model type and a model class name (from transformers' auto mappings), shrinks
the type's default config (every sub-config too) with :data:`SHRINK_INT` and the consistency repairs
of :data:`REPAIRS` (lists per layer cut to the kept layers, Mamba heads that must tile the inner width,
``None`` defaults some configs leave to their checkpoints, ...) and :data:`TYPE_REPAIRS` (one model
type's own constraints), builds the model, and runs one input through it. A type whose tiny build
fails, or holds no attention in its first layers, is retried at full depth, then with only its depth
shrunk; one that still fails raises the tiny build's error.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable

import torch

WIDTH = 32
MAX_PARAMETERS = 60e6

# attribute name -> tiny value (an int attribute larger than it is lowered to it, in every sub-config)
SHRINK_INT = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "hidden_dim",
                     "embedding_size", "word_embed_proj_dim", "projection_dim", "emb_dim", "pooler_hidden_size",
                     "cross_attention_hidden_size", "d_latents"), WIDTH),
    "entity_vocab_size": 64, "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 8,
    "encoder_hash_byte_group_vocab": 512,
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "linear_num_heads", "num_self_attention_heads",
                     "num_cross_attention_heads", "mamba_n_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "num_encoder_layers", "num_self_attends_per_block"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
                     "d_inner", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size",
                     "expert_ffn_hidden_size"), 64),
    "head_dim": 8, "d_kv": 8, "attention_head_size": 8, "v_head_dim": 8, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "qk_head_dim": 16, "q_lora_rank": 16, "kv_lora_rank": 16, "rotary_dim": 8,
    "linear_head_dim": 8, "num_latents": 8, "mamba_dt_rank": 8, "num_kv_shared_layers": 0,
    "mm_tokens_per_image": 4, "pixel_shuffle_factor": 2, "max_source_positions": 64,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_experts_per_token"), 2),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group", "n_groups", "mamba_n_groups", "mamba_ngroups",
                     "zero_expert_num"), 1),
}
DEPTH_KEYS = {k for k, v in SHRINK_INT.items()
              if v == 2 and "layers" in k or k in ("n_layer", "num_self_attends_per_block")}
SHRINK_DEPTH = {k: SHRINK_INT[k] for k in DEPTH_KEYS}
# for hybrids whose 2 first layers hold no attention
SHRINK_WIDTH = {k: v for k, v in SHRINK_INT.items() if k not in DEPTH_KEYS}
# per-layer kind lists (the first one a config has decides which layers are kept)
LAYER_KIND_LISTS = ("layer_types", "layers_block_type", "block_types")


def configs(config) -> list:
    """``config`` and every sub-config inside it, recursively."""
    from transformers import PretrainedConfig
    seen, stack = [], [config]
    while stack:
        c = stack.pop()
        if any(c is s for s in seen):
            continue
        seen.append(c)
        stack.extend(v for v in vars(c).values() if isinstance(v, PretrainedConfig))
    return seen


def _special_ids(config) -> list[int]:
    ids = []
    for c in configs(config):
        for k, v in vars(c).items():
            if k.endswith(("token_id", "token_index")) and isinstance(v, int):
                ids.append(v)
            elif k.endswith("token_id") and isinstance(v, list):
                ids.extend(i for i in v if isinstance(i, int))
    return ids


def _int(attrs: dict, key: str) -> int | None:
    v = attrs.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _fill_none(c, attrs: dict, table: dict) -> None:
    """``None`` defaults a checkpoint would fill: head width, key/value heads, vocabulary, expert counts."""
    heads, hidden = _int(attrs, "num_attention_heads"), _int(attrs, "hidden_size")
    if "head_dim" in attrs and attrs["head_dim"] is None and heads and hidden:
        c.head_dim = hidden // heads
    if "num_key_value_heads" in attrs and attrs["num_key_value_heads"] is None and heads:
        c.num_key_value_heads = heads
    if "vocab_size" in attrs and attrs["vocab_size"] is None:
        c.vocab_size = 512
    for key, value in (("n_routed_experts", 4), ("num_experts_per_tok", 2), ("n_shared_experts", 1)):
        if key in attrs and attrs[key] is None:
            setattr(c, key, value)


def _key_value_heads(c, attrs: dict, table: dict) -> None:
    """Grouped-query attention kept grouped (judged on the config before shrinking, ``attrs['_original']``):
    1 key/value head stays 1, fewer than the queries become 2."""
    original = attrs["_original"]
    heads, kv = _int(original, "num_attention_heads"), _int(original, "num_key_value_heads")
    if heads and kv and "num_attention_heads" in table:
        c.num_key_value_heads = 1 if kv == 1 else (2 if kv < heads else c.num_attention_heads)


def _layer_lists(c, attrs: dict, table: dict) -> None:
    """Keep the first layer of each kind (at least 2 layers), and cut every per-layer list to those layers."""
    depth = table.get("num_hidden_layers")
    kinds = next((attrs[k] for k in LAYER_KIND_LISTS if isinstance(attrs.get(k), (list, tuple))), None)
    if depth is None or not _int(attrs, "num_hidden_layers") or not kinds or len(kinds) <= depth:
        return
    keep = set(kinds.index(k) for k in kinds)
    keep = sorted(keep | set([i for i in range(len(kinds)) if i not in keep][: max(0, depth - len(keep))]))
    for key, value in attrs.items():
        if isinstance(value, (list, tuple)) and len(value) == len(kinds) and key != "depths":
            setattr(c, key, type(value)(value[i] for i in keep))
    c.num_hidden_layers = len(keep)


def _mamba_heads(c, attrs: dict, table: dict) -> None:
    """Mamba-2 heads tile the inner width ``expand * hidden``: head width recomputed from the head count."""
    hidden = _int(attrs, "hidden_size")
    for heads, width, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"),
                                 ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
                                 ("num_heads", "head_dim", "expand")):
        n, e = _int(attrs, heads), _int(attrs, expand)
        if n and _int(attrs, "mamba_d_ssm") and _int(attrs, width):  # Falcon-H1: inner width named
            c.mamba_d_ssm = n * attrs[width]
        elif hidden and n and e and width in attrs and (heads != "num_heads" or "n_groups" in attrs):
            setattr(c, width, e * hidden // n)
    if hidden and _int(attrs, "attention_hidden_size"):  # Zamba: attention reads [hidden | embeddings]
        c.attention_hidden_size = 2 * hidden
        if _int(attrs, "attention_head_dim") and _int(attrs, "num_attention_heads"):
            c.attention_head_dim = 2 * hidden // attrs["num_attention_heads"]


def _rope_per_kind(c, attrs: dict, table: dict) -> None:
    """An empty ``rope_parameters`` of a config with layer kinds gets default parameters per kind."""
    kinds = attrs.get("layer_types")
    if attrs.get("rope_parameters") == {} and isinstance(kinds, (list, tuple)):
        c.rope_parameters = {k: {"rope_type": "default", "rope_theta": 10000.0} for k in dict.fromkeys(kinds)}


REPAIRS: tuple[Callable, ...] = (_fill_none, _key_value_heads, _layer_lists, _mamba_heads, _rope_per_kind)


def _set(**values) -> Callable:
    """A repair setting ``values`` on every (sub-)config that has the attribute."""
    def repair(config) -> None:
        for c in configs(config):
            for k, v in values.items():
                if k in vars(c):
                    setattr(c, k, v)
    return repair


def _dbrx(config) -> None:
    config.attn_config.rope_theta = config.rope_parameters.get("rope_theta", 10000.0)
    config.attn_config.clip_qkv = config.attn_config.clip_qkv or 8.0  # None fails torch.clamp


def _lfm2_moe(config) -> None:
    config.layer_types = ["conv", "full_attention"]
    config.num_hidden_layers = 2
    config.num_dense_layers = min(config.num_dense_layers, 1)


def _zamba2(config) -> None:
    kinds = config.layers_block_type[: config.num_hidden_layers]
    kinds = kinds if "hybrid" in kinds else ["mamba", "hybrid"]
    config.layers_block_type = kinds
    config.num_hidden_layers = len(kinds)
    config.hybrid_layer_ids = [i for i, k in enumerate(kinds) if k == "hybrid"]


def _blt(config) -> None:
    """BLT: the global transformer reads ``cross_attn_k`` local (encoder) states per patch, concatenated."""
    width = config.encoder_config.hidden_size * config.cross_attn_k
    config.global_config.hidden_size = width
    config.global_config.head_dim = width // config.global_config.num_attention_heads
    for c in (config.encoder_config, config.decoder_config):
        c.hidden_size_global = width


# model type -> its own constraints, applied after SHRINK_INT and REPAIRS
TYPE_REPAIRS: dict[str, Callable] = {
    "dbrx": _dbrx,
    "blt": _blt,
    "lfm2_moe": _lfm2_moe,
    "zamba2": _zamba2,
    "mistral4": _set(head_dim=16),  # rotary part of head_dim * partial_rotary_factor = qk_rope_head_dim
    "gemma4_assistant": _set(hidden_size_per_layer_input=0),
    "qwen4_exp_text": _set(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                           indexer_compress_ratio=2),
    "qwen4_exp": _set(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                      indexer_compress_ratio=2),
}


def _drop_unused_layer_overrides(c, depth: int | None) -> None:
    """A heterogeneous config (per-layer overrides, Dots3) whose overrides all fall on layers the tiny
    model drops becomes homogeneous (its global attributes readable again)."""
    spec = vars(c).get("_heterogeneity_spec")
    overrides = getattr(spec, "per_layer_overrides", None)
    if depth is not None and isinstance(overrides, dict) and all(i >= depth for i in overrides):
        del c._heterogeneity_spec


def shrink(config, table: dict[str, int], model_type: str = "") -> object:
    """Lower every int attribute named in ``table`` (in every sub-config), then the repairs."""
    for c in configs(config):
        _drop_unused_layer_overrides(c, table.get("num_hidden_layers"))
        original = dict(vars(c))
        for k, v in table.items():
            if _int(original, k) is not None and original[k] > v:
                setattr(c, k, v)
        if "use_cache" in original:
            c.use_cache = False  # one forward, no generation: hybrids' caches need not be built
        for repair in REPAIRS:
            repair(c, {**vars(c), "_original": original}, table)
        attrs = dict(vars(c))
        if _int(attrs, "vocab_size") and WIDTH in table.values():  # width-shrinking tables
            # at most 512, but past every special token (a default config may name one past its vocabulary)
            c.vocab_size = max([min(attrs["vocab_size"], 512), *[i + 1 for i in _special_ids(config)]])
        if isinstance(attrs.get("depths"), (list, tuple)):
            c.depths = [1] * len(attrs["depths"])
    if model_type in TYPE_REPAIRS:
        TYPE_REPAIRS[model_type](config)
    return config


def _config_for(cls, config):
    """The (sub-)config ``cls`` takes: a text model of a multimodal type takes its text config."""
    wanted = getattr(cls, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    return next((c for c in configs(config) if isinstance(c, wanted)), config)


def build(model_type: str, class_name: str):
    """``(model, how, inputs)`` built tiny (``how``: 'tiny', 'tiny, full depth' or 'depth-only')."""
    import transformers
    from transformers import AutoConfig
    cls = getattr(transformers, class_name)
    errors, without_attention = [], None
    for how, table in (("tiny", SHRINK_INT), ("tiny, full depth", SHRINK_WIDTH), ("depth-only", SHRINK_DEPTH)):
        try:
            config = _config_for(cls, shrink(AutoConfig.for_model(model_type), table, model_type))
            config.num_labels = 3
            if getattr(config, "pad_token_id", None) is None:
                with contextlib.suppress(Exception):
                    config.pad_token_id = 0
            if getattr(config, "decoder_start_token_id", 0) is None or not hasattr(config, "decoder_start_token_id"):
                config.decoder_start_token_id = config.pad_token_id
            with torch.device("meta"):
                n = sum(p.numel() for p in cls(config).parameters())
            if n > MAX_PARAMETERS:
                raise RuntimeError(f"too large even shrunk: {n / 1e6:.0f}M parameters")
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = cls(config).eval()
            if hasattr(model, "set_default_language"):  # X-MOD: one language adapter per forward
                model.set_default_language(config.languages[0])
            inputs = make_inputs(model)
            with torch.no_grad():
                output(model, inputs)
            if has_attention(model):
                return model, how, inputs
            without_attention = without_attention or (model, how, inputs)
        except Exception as err:  # noqa: BLE001 - every failure is a counted reason
            errors.append(err)
    if without_attention is not None:
        return without_attention
    raise errors[0]


_ATTENTION_CLASS = re.compile(r"Attention|Attn|MLA")


def has_attention(model) -> bool:
    """Whether any module's class name says attention (``MLA``: multi-head latent attention; a convnet,
    an SSM or FNet says nothing)."""
    return any(_ATTENTION_CLASS.search(type(m).__name__) for m in model.modules())


def make_inputs(model) -> dict:
    """One input for ``model``'s main input: 8 token ids (the last one EOS) or one image."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values" and "spatial_shapes" not in inspect.signature(model.forward).parameters:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        if isinstance(size, dict):
            size = size.get("height", 224)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, size, size, generator=g)}
    if name == "pixel_values" or "spatial_shapes" in inspect.signature(model.forward).parameters:
        return _patch_inputs(model, g)
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 100)
    ids = torch.randint(3, max(4, min(vocab, 500)), (1, 8), generator=g)
    eos = getattr(text, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and eos < vocab:
        ids[:, -1] = eos
    codebooks = getattr(text, "num_codebooks", None)  # MusicGen: one row of ids per codebook
    if isinstance(codebooks, int) and codebooks > 1:
        ids = ids.repeat(codebooks, 1)
    inputs = {name: ids}
    if name == "input_ids":
        inputs["attention_mask"] = torch.ones_like(ids)
        return _with_media(model, inputs, g) or inputs
    return inputs


_FEATURES = re.compile(r"features:? (\d+)")


def _image(model, g: torch.Generator) -> tuple[dict, tuple[str, ...]] | None:
    """One random image for a model taking ``pixel_values`` with a vision sub-config, and its token names."""
    holder = next((c for c in configs(model.config) if getattr(c, "vision_config", None) is not None), None)
    if holder is None or "pixel_values" not in inspect.signature(model.forward).parameters:
        return None
    vision = holder.vision_config
    size = getattr(vision, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pixels = torch.randn(1, getattr(vision, "num_channels", 3), size, size, generator=g)
    return {"pixel_values": pixels}, ("image_token_id", "image_token_index")


def _audio(model, g: torch.Generator) -> tuple[dict, tuple[str, ...]] | None:
    """One random log-mel clip (Whisper-style: ``2 * max_source_positions`` frames) for a model taking
    ``input_features`` with an audio sub-config, and its token names."""
    audio = getattr(model.config, "audio_config", None)
    params = inspect.signature(model.forward).parameters
    if audio is None or "input_features" not in params or not isinstance(getattr(audio, "num_mel_bins", None), int):
        return None
    frames = 2 * getattr(audio, "max_source_positions", 1500)
    media = {"input_features": torch.randn(1, audio.num_mel_bins, frames, generator=g)}
    if "input_features_mask" in params:
        media["input_features_mask"] = torch.ones(1, frames, dtype=torch.long)
    return media, ("audio_token_id", "audio_token_index")


MEDIA: tuple[Callable, ...] = (_image, _audio)


def _with_media(model, inputs: dict, g: torch.Generator) -> dict | None:
    """Text inputs plus one image or audio clip for a model that takes both (so its vision or audio tower
    runs too): the placeholder tokens inserted in the ids, as many as the model's error message says it
    has features (an image given as ``(batch, images, C, H, W)`` where the model says so); None where
    that does not give a forward that runs."""
    for make in MEDIA:
        made = make(model, g)
        if made is None:
            continue
        media, token_names = made
        token = next((v for c in configs(model.config) for k in token_names
                      if isinstance(v := getattr(c, k, None), int)), None)
        ids, count = inputs["input_ids"], 1
        for _ in range(3):
            if token is None:  # the model places the media itself (GIT)
                trial = {**inputs, **media}
            else:
                with_media = torch.cat([ids[:, :1], torch.full((1, count), token), ids[:, 1:]], 1)
                trial = {"input_ids": with_media, "attention_mask": torch.ones_like(with_media), **media}
            try:
                with torch.no_grad():
                    output(model, trial)
                return trial
            except Exception as err:  # noqa: BLE001 - a model that cannot take this media keeps text only
                found = _FEATURES.search(str(err))
                pixels = media.get("pixel_values")
                if "expected 5, got 4" in str(err) and pixels is not None and pixels.dim() == 4:
                    media = {**media, "pixel_values": pixels.unsqueeze(1)}  # (batch, images, C, H, W)
                elif token is None or found is None:
                    break
                else:
                    count = int(found.group(1))
    return None


def _patch_inputs(model, g: torch.Generator) -> dict:
    """Pre-patched images (Siglip2's NaFlex): a 4 x 4 grid of flattened patches with its mask and shape."""
    vision = getattr(model.config, "vision_config", None) or model.config
    p, channels = vision.patch_size, getattr(vision, "num_channels", 3)
    return {"pixel_values": torch.randn(1, 16, channels * p * p, generator=g),
            "pixel_attention_mask": torch.ones(1, 16, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4]])}


def output(model, inputs) -> torch.Tensor:
    """The model's logits (or first output) as float."""
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()
