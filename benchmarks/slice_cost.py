"""Cost of one pass's slices (forward and backward): every tensor of one layout contracted as one stack
(what a training step does) against each tensor contracted alone (the baseline), in the same process.

The model is SmolLM2-135M's shape with random weights (30 layers, hidden 576, 9 query and 3 key/value
heads), all linear layers adapted: `att` makes 210 small tensors. Rounds alternate the two ways; the
median CPU time of each and their ratio are printed.

    python benchmarks/slice_cost.py [--methods att:tucker,att:cp,att:tt,att_qkv_depth:tucker] [--rounds 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tenslora import adapter as adapter_module
from tenslora.bench import StepBench, _build


def pass_cost(adapters, compute) -> float:
    """CPU seconds to open a pass on every adapter with ``compute`` and back-propagate through its slices."""
    original = adapter_module.compute_slices
    adapter_module.compute_slices = compute
    try:
        start = time.process_time()
        adapter_module.begin_passes(adapters)
        weights = [s.sum() for a in adapters for s in (a._grad.a, *a._grad.slices)]
        torch.stack(weights).sum().backward()
        elapsed = time.process_time() - start
    finally:
        adapter_module.compute_slices = original
        for a in adapters:
            a.end_pass()
            a.tensor.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="att:tucker,att:cp,att:tt,att_qkv_depth:tucker")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = StepBench(layers=30, hidden=576, heads=9, kv_heads=3, batch=2, seq=64, targets="all-linear")
    stacked = adapter_module.compute_slices

    def alone(adapters):
        return [s for a in adapters for s in stacked([a])]

    print("| method | tensors | layouts | stacked ms | alone ms | stacked / alone |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        model, _ = _build(method, bench)
        adapters = list(model.adapters.values())
        times = {"stacked": [], "alone": []}
        for round_ in range(args.rounds + 2):  # two warm-up rounds
            for name, compute in (("stacked", stacked), ("alone", alone))[::1 if round_ % 2 else -1]:
                elapsed = pass_cost(adapters, compute)
                if round_ >= 2:
                    times[name].append(elapsed)
        s, a = statistics.median(times["stacked"]), statistics.median(times["alone"])
        layouts = len({ad.stack_key for ad in adapters})
        print(f"| {method} | {len(adapters)} | {layouts} | {1e3 * s:.1f} | {1e3 * a:.1f} | {s / a:.3f} |")


if __name__ == "__main__":
    main()
