"""Training-step benchmark: every construction against PEFT LoRA, measured in the same run.

Each configuration runs in its own subprocess (so peak memory is its own); PEFT LoRA r=8 is
measured first and last and the ratios use the mean of the two, whose spread shows the noise.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from tenslora.constructions import CONSTRUCTIONS


@dataclass
class StepBench:
    """Model shape and workload: RoBERTa-base by default (12 layers, hidden 768, 12 heads)."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    batch: int = 8
    seq: int = 128
    steps: int = 10
    warmup: int = 2
    threads: int = 0
    device: str = "cpu"
    rank: int = 8


def typical_ranks(construction: str, factorization: str, bench: StepBench) -> int | tuple[int, ...]:
    """Rank ``bench.rank`` on every mode, capped by the small modes (heads, qkv, layers)."""
    if factorization == "cp":
        return bench.rank
    sizes = {"input": bench.hidden, "output": bench.hidden, "head_dim": bench.hidden // bench.heads,
             "heads": bench.heads, "qkv": 3, "layers": bench.layers}
    return tuple(min(bench.rank, sizes[m]) for m in CONSTRUCTIONS[construction].mode_names)


def default_methods() -> list[str]:
    return ["base", "lora"] + [f"{c}:{f}" for c in CONSTRUCTIONS for f in ("tucker", "cp")] + ["lora"]


def _build(method: str, bench: StepBench):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    config = RobertaConfig(hidden_size=bench.hidden, num_hidden_layers=bench.layers, num_attention_heads=bench.heads,
                           intermediate_size=4 * bench.hidden, num_labels=2)
    model = RobertaForSequenceClassification(config).to(bench.device)
    if method == "base":  # no adapter: frozen body, gradients still flow through every activation
        for p in model.parameters():
            p.requires_grad_(False)
        model.classifier.requires_grad_(True)
        model.roberta.embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model, 0
    construction, _, factorization = method.partition(":")
    factorization = factorization or "tucker"
    ranks = bench.rank if construction == "lora" else typical_ranks(construction, factorization, bench)
    adapted = get_adapted_model(model, TensLoRAConfig(construction, factorization, ranks=ranks))
    return adapted, adapted.adapter_parameters()


def run_one(method: str, bench: StepBench) -> dict:
    """Time ``bench.steps`` training steps of one configuration in this process."""
    if bench.threads:
        torch.set_num_threads(bench.threads)
    generator = torch.Generator().manual_seed(0)
    model, adapter_params = _build(method, bench)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, 1000, (bench.batch, bench.seq), generator=generator).to(bench.device)
    labels = torch.randint(0, 2, (bench.batch,), generator=generator).to(bench.device)
    cuda = bench.device.startswith("cuda")
    times = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step in range(bench.warmup + bench.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= bench.warmup:
            times.append(time.perf_counter() - start)
    peak_mb = (torch.cuda.max_memory_allocated() if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"method": method, "median_s": statistics.median(times), "peak_mb": peak_mb,
            "step_mb": None if cuda else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
            "adapter_parameters": adapter_params}


def run_all(bench: StepBench, methods: list[str], progress=None) -> list[dict]:
    """Each method in a fresh subprocess; ratios against the mean of the LoRA measurements."""
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "tenslora.bench", method, json.dumps(asdict(bench))]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            raise RuntimeError(f"benchmark of {method} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if progress:
            progress(rows[-1])
    lora = [r for r in rows if r["method"] == "lora"]
    if lora:
        time_ref = statistics.mean(r["median_s"] for r in lora)
        mem_ref = statistics.mean(r["peak_mb"] for r in lora)
        for r in rows:
            r["time_ratio"] = r["median_s"] / time_ref
            r["memory_ratio"] = r["peak_mb"] / mem_ref
    return rows


if __name__ == "__main__":  # worker entry: python -m tenslora.bench METHOD BENCH_JSON
    print(json.dumps(run_one(sys.argv[1], StepBench(**json.loads(sys.argv[2])))))
