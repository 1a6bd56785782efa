"""Greedy ``generate()`` tokens/s of SmolLM2-135M with adapters: unmerged tensor adapters vs unmerged PEFT LoRA,
and merged adapters vs the base model (offline: ``tenslora models import smollm2`` first).

Same process, interleaved rounds (every method once per round, order rotated), adapter weights random
(a zero update would test nothing); the ratio of each method's median time to LoRA's (unmerged) or to the
base model's (merged) is printed, measured in the same run. Also counts how often each tensor's slices
are built during one ``generate()`` call (once per generated token at most: the cache serves every layer).

    python benchmarks/generate_speed.py [--tokens 32] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

METHODS = ("lora", "qkv_depth", "att_qkv_depth")


def build(method: str, path: str, merged: bool):
    from transformers import AutoModelForCausalLM

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if method == "base":
        return model
    adapted = get_adapted_model(model, TensLoRAConfig(method, ranks=8, seed=0)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return adapted.merge_and_unload().eval() if merged else adapted


def time_generate(model, ids, tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False)
    assert out.shape[1] == ids.shape[1] + tokens
    return time.perf_counter() - start


def slice_builds(model, ids, tokens: int) -> str:
    """``"builds/tensors"``: how often the adapter tensors' slices were computed during one ``generate()``."""
    from tenslora.adapter import TensorAdapter
    count = 0
    adapters = [m for m in model.modules() if isinstance(m, TensorAdapter)]
    originals = {a: a._compute for a in adapters}

    def counting(adapter):
        def compute():
            nonlocal count
            count += 1
            return originals[adapter]()
        return compute
    for a in adapters:
        a._compute = counting(a)
    try:
        time_generate(model, ids, tokens)
    finally:
        for a in adapters:
            del a._compute
    return f"{count}/{len(adapters)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tenslora.hub.registry import resolve_model_name
    path = resolve_model_name("smollm2")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The sentiment of the tweet 'what a lovely day' is", return_tensors="pt").input_ids

    methods = args.methods.split(",")
    models = {"base": build("base", path, False)}
    for m in methods:
        models[f"{m} unmerged"] = build(m, path, False)
        models[f"{m} merged"] = build(m, path, True)
    names = list(models)
    times = {n: [] for n in names}
    time_generate(models["base"], ids, 4)  # warm-up
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(time_generate(models[n], ids, args.tokens))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n{args.tokens} new tokens, prompt {ids.shape[1]} tokens, {args.threads} threads, {args.rounds} rounds")
    print("| model | tokens/s | x LoRA unmerged time | x base time | slice builds / tensors, one generate |")
    print("|---|---|---|---|---|")
    lora = median.get("lora unmerged")
    for n in names:
        builds = slice_builds(models[n], ids, args.tokens) if n.endswith("unmerged") and not n.startswith("lora") \
            else "-"
        vs_lora = f"{median[n] / lora:.3f}" if lora and n.endswith("unmerged") else "-"
        print(f"| {n} | {args.tokens / median[n]:.2f} | {vs_lora} | {median[n] / median['base']:.3f} | {builds} |")


if __name__ == "__main__":
    main()
