"""Architecture coverage: every model type of the installed transformers, built tiny, adapted by each method.

For every model type in transformers' auto mappings for sequence classification, image classification
and causal LM (a type in several mappings is built once, from the first of these that has it), the
benchmark builds the model from its default config shrunk to a tiny size (hidden 32, 2 layers, 4 heads,
...; a type whose tiny build fails is retried with only its depth shrunk, and one that still fails is
counted apart as *not built*, with the reason). Each method then:

1. injects its adapter into a copy of the model (``tenslora.get_adapted_model``),
2. adds noise to the adapter's own parameters only (not the task head),
3. runs the same input and requires the output to change (else: ``no-op``), and every adapted module
   to be called by the forward (else: ``unused``: an adapter attached where the forward never goes).

Writes a JSON file of per-type results and a markdown table (counts per group and method, then the
failure reasons with the types they hit). Runs in one process, one type at a time, with a time cap
per type (SIGALRM).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/coverage.py --out benchmarks/results/coverage \
        --label after
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import re
import signal
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

GROUPS = {
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "img-cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}
DEFAULT_METHODS = ("att", "qkv_depth", "lora")
ALL_METHODS = ("att", "qkv", "depth", "att_qkv", "att_depth", "qkv_depth", "att_qkv_depth", "lora")

# attribute name -> tiny value (applied to a config and all its sub-configs where the attribute is an int)
WIDTH = 32
SHRINK_INT = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "hidden_dim",
                     "embedding_size", "word_embed_proj_dim", "projection_dim", "emb_dim"), WIDTH),
    "entity_vocab_size": 64,
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads"), 4),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "num_encoder_layers"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
                     "d_inner", "moe_intermediate_size", "shared_expert_intermediate_size"), 64),
    "head_dim": 8, "d_kv": 8, "attention_head_size": 8, "v_head_dim": 8, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "qk_head_dim": 16, "q_lora_rank": 16, "kv_lora_rank": 16,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k"), 2),
    **dict.fromkeys(("n_group", "topk_group"), 1),
}
DEPTH_KEYS = {k for k, v in SHRINK_INT.items() if v == 2 and "layers" in k or k == "n_layer"}
SHRINK_DEPTH = {k: SHRINK_INT[k] for k in DEPTH_KEYS}
# for hybrids whose 2 first layers hold no attention
SHRINK_WIDTH = {k: v for k, v in SHRINK_INT.items() if k not in DEPTH_KEYS}


def _configs(config):
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
    for c in _configs(config):
        for k, v in vars(c).items():
            if k.endswith("token_id") and isinstance(v, int):
                ids.append(v)
            elif k.endswith("token_id") and isinstance(v, list):
                ids.extend(i for i in v if isinstance(i, int))
    return ids


def shrink(config, table: dict[str, int]):
    """Set every int attribute named in ``table`` (in every sub-config); keeps GQA's ratio, lists of depths."""
    for c in _configs(config):
        attrs = vars(c)
        heads = attrs.get("num_attention_heads")
        kv = attrs.get("num_key_value_heads")
        for k, v in table.items():
            if isinstance(attrs.get(k), int) and not isinstance(attrs.get(k), bool) and attrs[k] > v:
                setattr(c, k, v)
        if "use_cache" in attrs:
            c.use_cache = False  # one forward, no generation: hybrids' caches need not be built
        if "num_experts_per_tok" in attrs and attrs["num_experts_per_tok"] is None:
            c.num_experts_per_tok = 2
        if isinstance(kv, int) and isinstance(heads, int) and "num_attention_heads" in table:
            setattr(c, "num_key_value_heads", 1 if kv == 1 else (2 if kv < heads else c.num_attention_heads))
        if isinstance(attrs.get("vocab_size"), int) and WIDTH in table.values():  # width-shrinking tables
            c.vocab_size = min(attrs["vocab_size"], max([512, *[i + 1 for i in _special_ids(config)]]))
        if isinstance(attrs.get("depths"), (list, tuple)):
            c.depths = [1] * len(attrs["depths"])
        kinds = attrs.get("layer_types")
        if isinstance(kinds, list) and len(kinds) > 2 and "num_hidden_layers" in attrs:
            # one layer of each kind (at least 2), so hybrids keep an attention layer
            keep = list(dict.fromkeys(kinds))
            keep = keep + keep[:1] if len(keep) == 1 else keep
            c.layer_types = keep
            c.num_hidden_layers = len(keep)
    return config


def build(model_type: str, class_name: str):
    """``(model, how)`` built tiny (``how``: 'tiny' or 'depth-only'), else raises the last error."""
    import transformers
    from transformers import AutoConfig
    cls = getattr(transformers, class_name)
    errors, without_attention = [], None
    for how, table in (("tiny", SHRINK_INT), ("tiny, full depth", SHRINK_WIDTH), ("depth-only", SHRINK_DEPTH)):
        try:
            config = shrink(AutoConfig.for_model(model_type), table)
            config.num_labels = 3
            if getattr(config, "pad_token_id", None) is None:
                with contextlib.suppress(Exception):
                    config.pad_token_id = 0
            if getattr(config, "decoder_start_token_id", 0) is None or not hasattr(config, "decoder_start_token_id"):
                config.decoder_start_token_id = config.pad_token_id
            with torch.device("meta"):
                n = sum(p.numel() for p in cls(config).parameters())
            if n > 60e6:
                raise RuntimeError(f"too large even shrunk: {n / 1e6:.0f}M parameters")
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = cls(config).eval()
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


_ATTENTION_CLASS = re.compile(r"Attention|Attn")


def has_attention(model) -> bool:
    """Whether any module's class name says attention (a convnet, an SSM or FNet says nothing)."""
    return any(_ATTENTION_CLASS.search(type(m).__name__) for m in model.modules())


def make_inputs(model) -> dict:
    config = model.config
    g = torch.Generator().manual_seed(0)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        if isinstance(size, dict):
            size = size.get("height", 224)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, size, size, generator=g)}
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", 100)
    ids = torch.randint(3, max(4, min(vocab, 500)), (1, 8), generator=g)
    eos = getattr(text, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and eos < vocab:
        ids[:, -1] = eos
    inputs = {name: ids}
    if name == "input_ids":
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _adapter_params(adapted):
    if hasattr(adapted, "adapters"):
        return list(adapted.adapters.parameters())
    return [p for n, p in adapted.named_parameters() if "lora_" in n]


def _adapted_modules(adapted):
    if hasattr(adapted, "layers") and isinstance(adapted.layers, dict):
        return list({id(m): m for m in adapted.layers.values()}.values())
    return [m for m in adapted.base_model.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {}))]


def try_method(base, inputs, reference, method: str) -> dict:
    """``{'status': ok|error|no-op|unused, 'reason': ..., 'adapted': ...}``."""
    from tenslora import TensLoRAConfig, get_adapted_model
    model = copy.deepcopy(base)
    try:
        config = TensLoRAConfig(construction=method, factorization="tucker", ranks=4)
        adapted = get_adapted_model(model, config)
    except Exception as err:  # noqa: BLE001
        return {"status": "error", "reason": f"{type(err).__name__}: {err}"}
    shape = getattr(adapted, "shape", None)
    adapted_desc = {"projections": list(shape.projections), "layers": len(shape.layers)} if shape else {}
    modules = _adapted_modules(adapted)
    called = set()
    hooks = [m.register_forward_hook(lambda mod, *_: called.add(id(mod))) for m in modules]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in _adapter_params(adapted):
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        try:
            new = output(adapted, inputs)
        except Exception as err:  # noqa: BLE001
            return {"status": "error", "reason": f"forward: {type(err).__name__}: {err}", "adapted": adapted_desc}
    for h in hooks:
        h.remove()
    unused = len(modules) - len(called)
    if unused:
        status = "unused" if unused == len(modules) else "partly-used"
        idle = sorted({getattr(adapted, "report", "")} - {""})
        return {"status": status, "reason": f"{unused} of {len(modules)} adapted modules never called by the forward",
                "adapted": adapted_desc, "report": idle}
    # relative only: some tiny random models output ~1e-40 logits, where any absolute tolerance hides a change
    if new.shape != reference.shape or torch.allclose(new, reference, rtol=1e-5, atol=0.0):
        return {"status": "no-op", "reason": "output unchanged after perturbing the adapter", "adapted": adapted_desc}
    return {"status": "ok", "adapted": adapted_desc}


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: int):
    def on_alarm(*_):
        raise _Timeout(f"over the {seconds}s cap")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def model_types(only: list[str] | None) -> list[tuple[str, str, str]]:
    """``(group, model_type, class name)``, one per type, in group order."""
    from transformers.models.auto import modeling_auto
    seen, out = set(), []
    for group, mapping in GROUPS.items():
        for model_type, class_name in getattr(modeling_auto, mapping).items():
            if isinstance(class_name, (list, tuple)):
                class_name = class_name[0]
            if model_type in seen or (only and model_type not in only):
                continue
            seen.add(model_type)
            out.append((group, model_type, class_name))
    return out


def reason_key(reason: str) -> str:
    """A failure reason with the type-specific parts (numbers, model class names) blurred, for grouping."""
    first = reason.splitlines()[0] if reason else ""
    first = re.sub(r"\b[A-Z][A-Za-z0-9]*(For[A-Za-z]+|Model|Config)\b", "<Model>", first)
    first = re.sub(r"\d+", "N", first)
    return first[:150]


def run(types, methods, cap: int, progress) -> dict:
    results = {}
    for group, model_type, class_name in types:
        entry = {"group": group, "class": class_name}
        start = time.perf_counter()
        try:
            with time_cap(cap), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base, how, inputs = build(model_type, class_name)
                entry["built"] = how
                entry["attention"] = has_attention(base)
                with torch.no_grad():
                    reference = output(base, inputs)
                entry["methods"] = {}
                for method in methods:
                    entry["methods"][method] = try_method(base, inputs, reference, method)
        except (Exception, _Timeout) as err:  # noqa: BLE001
            if "built" not in entry:
                entry["built"] = None
                entry["reason"] = f"{type(err).__name__}: {err}"
            else:
                for method in methods:
                    entry["methods"].setdefault(method, {"status": "error", "reason": f"timeout: {err}"})
        entry["seconds"] = round(time.perf_counter() - start, 2)
        results[model_type] = entry
        progress(model_type, entry)
    return results


def summarize(results: dict, methods) -> dict:
    counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    reasons: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for model_type, entry in results.items():
        for group in (entry["group"], "all"):
            counts[group]["types"]["n"] += 1
            if entry["built"] is None:
                counts[group]["types"]["not built"] += 1
                continue
            counts[group]["types"]["built"] += 1
            counts[group]["types"]["attention"] += bool(entry.get("attention", True))
            for method in methods:
                status = entry["methods"][method]["status"]
                counts[group][method][status] += 1
                counts[group][method]["ok with attention"] += status == "ok" and bool(entry.get("attention", True))
        if entry["built"] is None:
            reasons["not built"][reason_key(entry["reason"])].append(model_type)
            continue
        for method in methods:
            r = entry["methods"][method]
            if r["status"] != "ok":
                tag = "" if entry.get("attention", True) else "[no attention module] "
                reasons[method][f"{tag}{r['status']}: {reason_key(r['reason'])}"].append(model_type)
    return {"counts": {g: {k: dict(v) for k, v in c.items()} for g, c in counts.items()},
            "reasons": {m: dict(sorted(r.items(), key=lambda kv: -len(kv[1]))) for m, r in reasons.items()}}


def markdown(summary: dict, methods, label: str, command: str) -> str:
    lines = [f"### Coverage: {label}", "", f"Command: `{command}`", "",
             "| group | types | built | not built | built, with attention | "
             + " | ".join(f"`{m}` ok" for m in methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    for group in (*GROUPS, "all"):
        c = summary["counts"].get(group)
        if not c:
            continue
        t = c["types"]
        cells = [f"{c.get(m, {}).get('ok', 0)} ({c.get(m, {}).get('ok with attention', 0)})" for m in methods]
        counts_row = [t["n"], t.get("built", 0), t.get("not built", 0), t.get("attention", 0)]
        lines.append(f"| {group} | " + " | ".join(str(c) for c in counts_row) + " | " + " | ".join(cells) + " |")
    lines += ["", "`ok (n)`: output changed and every adapted module ran; n of them have an attention module by class "
              "name. Other statuses: `error` (refused or failed), `no-op` (output unchanged), `unused` (no adapted "
              "module ran), `partly-used` (some adapted stacks did not run on this input, e.g. a vision tower on a "
              "text-only input; the adapter listed its stacks in a warning).", "",
              "Failure reasons (count: reason: types):", ""]
    for method, reasons in summary["reasons"].items():
        lines.append(f"- **{method}**")
        for reason, types in reasons.items():
            shown = ", ".join(types[:12]) + (f", ... (+{len(types) - 12})" if len(types) > 12 else "")
            lines.append(f"  - {len(types)}: `{reason}`: {shown}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/coverage", help="Output stem: writes STEM-LABEL.json/.md")
    parser.add_argument("--label", default="run", help="Name of this run (e.g. before, after).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"Comma-separated, or 'all' ({','.join(ALL_METHODS)}).")
    parser.add_argument("--types", default="", help="Comma-separated model types (default: every type).")
    parser.add_argument("--cap", type=int, default=90, help="Seconds per model type (build and all methods).")
    args = parser.parse_args(argv)
    methods = ALL_METHODS if args.methods == "all" else tuple(m for m in args.methods.split(",") if m)
    torch.set_num_threads(1)
    import transformers
    transformers.logging.set_verbosity_error()
    types = model_types([t for t in args.types.split(",") if t] or None)

    def progress(model_type, entry):
        status = entry.get("reason", "")[:80] if entry["built"] is None else \
            " ".join(f"{m}={r['status']}" for m, r in entry["methods"].items())
        print(f"{model_type:28s} {entry['seconds']:6.1f}s {status}", file=sys.stderr, flush=True)

    results = run(types, methods, args.cap, progress)
    summary = summarize(results, methods)
    command = "OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/coverage.py " + " ".join(argv or sys.argv[1:])
    stem = Path(f"{args.out}-{args.label}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    from tenslora.io import write_json_atomic
    write_json_atomic(stem.with_suffix(".json"), {"transformers": transformers.__version__, "methods": list(methods),
                                                  "command": command, "summary": summary, "results": results})
    text = markdown(summary, methods, f"{args.label} (transformers {transformers.__version__})", command)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
