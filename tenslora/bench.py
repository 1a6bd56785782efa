"""Training-step benchmark: every construction against PEFT LoRA, measured in the same run.

Time: all configurations live in one process and take their steps in interleaved rounds, so
machine noise hits every configuration alike; the median over rounds is reported. Memory: each
configuration runs a few steps in a subprocess of its own, whose peak (RSS on CPU,
``max_memory_allocated`` on CUDA) is reported.
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
from tenslora.layout import capped_ranks, mode_sizes
from tenslora.targets import ModelShape


@dataclass
class StepBench:
    """Model shape and workload: RoBERTa-base by default (12 layers, hidden 768, 12 heads);
    ``kv_heads > 0``: a LLaMA decoder with grouped-query attention (``kv_heads`` key/value heads);
    ``targets``: what every method adapts, LoRA included (``qkv``, ``qkvo``, or ``all-linear``: LoRA takes
    PEFT's all-linear); ``clock``: ``wall`` (elapsed time) or ``process`` (this process's CPU time, CPU only:
    less sensitive to other jobs on a loaded machine)."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    batch: int = 8
    seq: int = 128
    steps: int = 10
    warmup: int = 1
    threads: int = 0
    device: str = "cpu"
    rank: int = 8
    kv_heads: int = 0
    targets: str = "qkv"
    clock: str = "wall"

    def shape(self) -> ModelShape:
        """The adapted shape; the output projection, when adapted, is as wide as the query (transposed)."""
        head_dim = self.hidden // self.heads
        kv = (self.kv_heads or self.heads) * head_dim
        extra = () if self.targets == "qkv" else (("output", self.heads * head_dim),)  # qkvo, all-linear: O
        return ModelShape(("query", "key", "value", *(p for p, _ in extra)), tuple(range(self.layers)), self.hidden,
                          (self.hidden, kv, kv, *(d for _, d in extra)), head_dim)


FACTORIZATIONS = ("tucker", "cp", "tt")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def typical_ranks(construction: str, factorization: str, bench: StepBench) -> int | tuple[int, ...]:
    """Tucker: rank ``bench.rank`` on every mode, capped by the small modes (heads, qkv, layers);
    CP: ``bench.rank``; TT: ``bench.rank`` on every bond, capped by what each bond can use."""
    from tenslora.tensor.factorized import TensorTrain
    sizes = mode_sizes(CONSTRUCTIONS[construction], bench.shape())
    return {"cp": lambda: bench.rank,
            "tt": lambda: tuple(min(bench.rank, c) for c in TensorTrain.rank_caps(sizes).values()),
            "tucker": lambda: tuple(capped_ranks(bench.rank, sizes).values())}[factorization]()


def default_methods() -> list[str]:
    return ["base", "lora"] + [f"{c}:{f}" for c in CONSTRUCTIONS for f in FACTORIZATIONS]


def _model(bench: StepBench):
    """RoBERTa (``kv_heads == 0``) or a LLaMA with grouped-query attention, random weights."""
    import transformers as tf
    common = dict(hidden_size=bench.hidden, num_hidden_layers=bench.layers, num_attention_heads=bench.heads,
                  num_labels=2)
    if bench.kv_heads:
        config = tf.LlamaConfig(num_key_value_heads=bench.kv_heads, intermediate_size=8 * bench.hidden // 3,
                                pad_token_id=0, **common)
        return tf.LlamaForSequenceClassification(config)
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(intermediate_size=4 * bench.hidden, **common))


def _build(method: str, bench: StepBench):
    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.targets import find_head_modules
    model = _model(bench).to(bench.device)
    if method == "base":  # no adapter: frozen body, gradients still flow through every activation
        for p in model.parameters():
            p.requires_grad_(False)
        for path in find_head_modules(model):
            model.get_submodule(path).requires_grad_(True)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model, 0
    construction, _, factorization = method.partition(":")
    factorization = factorization or "tucker"
    ranks = bench.rank if construction == "lora" else typical_ranks(construction, factorization, bench)
    adapted = get_adapted_model(model, TensLoRAConfig(construction, factorization, ranks=ranks,
                                                      targets=bench.targets))
    return adapted, adapted.adapter_parameters()


def _batch(bench: StepBench):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (bench.batch, bench.seq), generator=generator).to(bench.device)
    labels = torch.randint(0, 2, (bench.batch,), generator=generator).to(bench.device)
    return ids, labels


class _Trainee:
    """One configuration: model, AdamW and one timed training step."""

    def __init__(self, method: str, bench: StepBench):
        self.model, self.adapter_parameters = _build(method, bench)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.cuda = bench.device.startswith("cuda")
        self.clock = CLOCKS[bench.clock]

    def step(self, ids, labels) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = self.clock()
        self.model(input_ids=ids, labels=labels).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock() - start


def peak_memory(method: str, bench: StepBench) -> dict:
    """Peak memory (MB) of a few training steps of one configuration; run in a fresh process."""
    if bench.threads:
        torch.set_num_threads(bench.threads)
    trainee = _Trainee(method, bench)
    ids, labels = _batch(bench)
    for _ in range(2):
        trainee.step(ids, labels)
    peak = (torch.cuda.max_memory_allocated() if trainee.cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mb": peak / 2**20, "adapter_parameters": trainee.adapter_parameters}


def interleaved_times(methods: list[str], bench: StepBench, progress=None) -> dict[str, list[float]]:
    """Step times of every configuration, one step each per round, ``bench.steps`` rounds."""
    if bench.threads:
        torch.set_num_threads(bench.threads)
    trainees = {m: _Trainee(m, bench) for m in methods}
    ids, labels = _batch(bench)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(bench.warmup + bench.steps):
        for method, trainee in trainees.items():
            elapsed = trainee.step(ids, labels)
            if round_ >= bench.warmup:
                times[method].append(elapsed)
        if progress:
            progress(f"timing round {round_ + 1}/{bench.warmup + bench.steps} done")
    return times


def run_all(bench: StepBench, methods: list[str], progress=None) -> list[dict]:
    """Rows with median step time, peak memory and both ratios to PEFT LoRA."""
    methods = list(dict.fromkeys(methods))
    for method in methods:
        construction, _, factorization = method.partition(":")
        if method != "base" and (construction not in (*CONSTRUCTIONS, "lora")
                                 or factorization not in ("", *FACTORIZATIONS)):
            raise ValueError(f"unknown benchmark method {method!r}; allowed: base, lora, "
                             "CONSTRUCTION:tucker, CONSTRUCTION:cp or CONSTRUCTION:tt")
    rows = []
    for method in methods:
        cmd = [sys.executable, "-m", "tenslora.bench", method, json.dumps(asdict(bench))]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            raise RuntimeError(f"benchmark of {method} failed:\n{done.stderr[-2000:]}")
        rows.append({"method": method, **json.loads(done.stdout.strip().splitlines()[-1])})
        if progress:
            progress(f"{method}: peak {rows[-1]['peak_mb']:.0f} MB")
    times = interleaved_times(methods, bench, progress)
    for row in rows:
        row["median_s"] = statistics.median(times[row["method"]])
    if "lora" in methods:
        lora = next(r for r in rows if r["method"] == "lora")
        for row in rows:
            row["time_ratio"] = row["median_s"] / lora["median_s"]
            row["memory_ratio"] = row["peak_mb"] / lora["peak_mb"]
    return rows


if __name__ == "__main__":  # worker entry: python -m tenslora.bench METHOD BENCH_JSON
    print(json.dumps(peak_memory(sys.argv[1], StepBench(**json.loads(sys.argv[2])))))
