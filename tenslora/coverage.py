"""Architecture coverage: every model type of the installed transformers, built tiny, adapted by each method.

For every model type in transformers' auto mappings for sequence classification, image classification
and causal LM (a type in several mappings is built once, from the first of these that has it), the
model is built tiny (:mod:`tenslora.tiny_models`; a type that cannot be is counted apart as *not built*,
with the reason). Each method then:

1. injects its adapter into a copy of the model (``tenslora.get_adapted_model``, Tucker rank 4; LoRA r=4),
2. adds noise to the adapter's own parameters only (not the task head),
3. runs the same input and requires the output to change (else: ``no-op``), and every adapted module
   to be called by the forward (else: ``unused``, or ``partly-used`` when some stacks ran and others did not).

:func:`run_coverage` writes a JSON file of per-type results and a markdown table (counts per group and
method, then the failure reasons with the types they hit). One process, one type at a time, with a time
cap per type (SIGALRM, so the main thread only).
"""
from __future__ import annotations

import contextlib
import copy
import re
import signal
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tenslora.constructions import CONSTRUCTIONS
from tenslora.tiny_models import build, has_attention, output

GROUPS = {
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "img-cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
}
DEFAULT_METHODS = ("att", "qkv_depth", "lora")
ALL_METHODS = (*CONSTRUCTIONS, "lora")
# why a type was not built: its error, by kind (the first matching pattern)
NOT_BUILT_KINDS = (
    ("optional library missing", re.compile(r"^ImportError")),
    ("too large even shrunk", re.compile(r"too large even shrunk")),
    ("needs another model's inputs", re.compile(r"shared_kv_states|hidden_size_per_layer_input must be 0")),
    ("per-layer config", re.compile(r"AmbiguousGlobalPerLayerAttributeError")),
    ("over the time cap", re.compile(r"over the \d+s cap")),
)


def not_built_kind(reason: str) -> str:
    """The kind of a build failure (missing library, too large, ...), else 'tiny config inconsistent'."""
    return next((kind for kind, pattern in NOT_BUILT_KINDS if pattern.search(reason)), "tiny config inconsistent")


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
    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
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


def model_types(only: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """``(group, model_type, class name)``, one per type, in group order; ValueError naming unknown types."""
    from transformers.models.auto import modeling_auto
    seen, out = set(), []
    for group, mapping in GROUPS.items():
        for model_type, class_name in getattr(modeling_auto, mapping).items():
            if isinstance(class_name, (list, tuple)):
                class_name = class_name[0]
            if model_type in seen:
                continue
            seen.add(model_type)
            if not only or model_type in only:
                out.append((group, model_type, class_name))
    unknown = [t for t in only or () if t not in seen]
    if unknown:
        raise ValueError(f"unknown model types {unknown}: allowed are the {len(seen)} types of transformers' "
                         "sequence-classification, image-classification and causal-LM auto mappings "
                         f"(e.g. {', '.join(sorted(seen)[:5])}, ...)")
    return out


def parse_methods(text: str) -> tuple[str, ...]:
    """``'all'`` or comma-separated method names; ValueError naming an unknown one and the allowed."""
    if text.strip() == "all":
        return ALL_METHODS
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"methods {text!r}: unknown {bad or 'none given'}; allowed: all or a comma-separated "
                         f"subset of {', '.join(ALL_METHODS)}")
    return methods


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
            reasons["not built"][f"{not_built_kind(entry['reason'])}: {reason_key(entry['reason'])}"].append(model_type)
            for group in (entry["group"], "all"):
                counts[group]["not built"][not_built_kind(entry["reason"])] += 1
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
    kinds = summary["counts"].get("all", {}).get("not built", {})
    if kinds:
        ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
        lines += ["", "Not built, by kind: " + "; ".join(f"{k} {n}" for k, n in ranked) + "."]
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




def run_coverage(out: str | Path, label: str, methods: Sequence[str] = DEFAULT_METHODS,
                 types: Sequence[str] | None = None, cap: int = 90, command: str = "",
                 progress: Callable[[str, dict], None] | None = None) -> dict:
    """Run the benchmark, write ``OUT-LABEL.json`` and ``OUT-LABEL.md`` (atomically), return the summary.

    Validates every input before building anything: methods (:data:`ALL_METHODS`), types (the auto
    mappings' types), a positive cap, and that ``OUT``'s folder is not a file."""
    import transformers

    from tenslora.io import write_json_atomic, write_text_atomic
    methods = parse_methods(",".join(methods))
    chosen = model_types(list(types) if types else None)
    if cap <= 0:
        raise ValueError(f"timeout {cap}: must be a positive number of seconds per model type")
    if not label or "/" in label:
        raise ValueError(f"label {label!r}: must be a non-empty name without '/'")
    stem = Path(f"{out}-{label}")
    if stem.parent.exists() and not stem.parent.is_dir():
        raise ValueError(f"out {str(out)!r}: {stem.parent} is a file, not a folder")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    results = run(chosen, methods, cap, progress or (lambda *_: None))
    summary = summarize(results, methods)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), {"transformers": transformers.__version__, "methods": list(methods),
                                                  "command": command, "summary": summary, "results": results})
    text = markdown(summary, methods, f"{label} (transformers {transformers.__version__})", command)
    write_text_atomic(stem.with_suffix(".md"), text)
    return {"summary": summary, "results": results, "markdown": text,
            "files": [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]}
