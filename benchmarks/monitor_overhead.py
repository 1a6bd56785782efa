"""Step-time overhead of the TensLoRA+ Monitor on a RoBERTa-base-shaped model (random weights, offline).

Same process, interleaved: plain training steps and monitored steps (the monitor logging at that
step), each timed; the monitor's hooks are also timed on their own. The overhead at ``--every N``
is ``(step + hook_cost_logging / N + hook_cost_idle * (N-1) / N) / step``.

    python benchmarks/monitor_overhead.py [--construction att_qkv_depth] [--every 50] [--pairs 4]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--construction", default="att_qkv_depth")
    ap.add_argument("--factorization", default="tucker")
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=4, help="plain/monitored step pairs timed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-tensor", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.plus.monitor import Monitor
    from tenslora.plus.optim import build_param_groups

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(num_labels=2))  # base shape: 768, 12 x 12 heads
    adapted = get_adapted_model(model, TensLoRAConfig(construction=args.construction,
                                                      factorization=args.factorization, ranks=args.ranks))
    opt = torch.optim.AdamW(build_param_groups(adapted, lr=1e-4))
    params = [p for p in adapted.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50000, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, 2, (args.batch,), generator=gen)
    tmp = tempfile.TemporaryDirectory()
    monitor = Monitor(every=1, per_tensor=args.per_tensor, plots=True)
    monitor.on_train_begin(adapted, None, tmp.name)
    hook_times: list[float] = []

    def step(n: int, monitored: bool) -> float:
        t0 = time.perf_counter()
        adapted(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if monitored:
            h0 = time.perf_counter()
            monitor.after_backward(n, adapted)
            h1 = time.perf_counter() - h0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitored:
            h0 = time.perf_counter()
            monitor.on_step_end(n, adapted, {})
            hook_times.append(h1 + time.perf_counter() - h0)
        return time.perf_counter() - t0

    step(0, False)  # warm-up
    plain, monitored = [], []
    for i in range(args.pairs):
        plain.append(step(2 * i + 1, False))
        monitored.append(step(2 * i + 2, True))
    idle = Monitor(every=10**9)
    idle.on_train_begin(adapted, None, tmp.name + "/idle")
    t0 = time.perf_counter()
    for n in range(1, 1001):
        idle.after_backward(n, adapted)
        idle.on_step_end(n, adapted, {})
    idle_cost = (time.perf_counter() - t0) / 1000
    t0 = time.perf_counter()
    monitor.on_train_end(adapted)
    end_cost = time.perf_counter() - t0

    t_step, t_mon, t_hook = statistics.median(plain), statistics.median(monitored), statistics.median(hook_times)
    n = args.every
    ratio = (t_step + t_hook / n + idle_cost * (n - 1) / n) / t_step
    print(f"model: RoBERTa-base shape, {args.construction}/{args.factorization} ranks {args.ranks}, "
          f"batch {args.batch} x {args.seq} tokens, {args.threads} threads, {args.pairs} step pairs")
    print(f"plain step (median):                 {t_step:8.3f} s   all: {', '.join(f'{t:.2f}' for t in plain)}")
    print(f"monitored step, logging (median):    {t_mon:8.3f} s   all: {', '.join(f'{t:.2f}' for t in monitored)}")
    print(f"monitor hooks at a logging step:     {t_hook * 1e3:8.1f} ms (median of {len(hook_times)})")
    print(f"monitor hooks at a non-logging step: {idle_cost * 1e6:8.2f} us")
    print(f"end of run (final spectra + 3 PNGs): {end_cost:8.2f} s (once)")
    print(f"ratio, logging every step (measured medians): {t_mon / t_step:.4f}")
    print(f"ratio, logging every step (hook time):        {(t_step + t_hook) / t_step:.4f}")
    print(f"ratio at --every {n}: {ratio:.5f}  (overhead {100 * (ratio - 1):.3f}%)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
