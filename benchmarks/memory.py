"""Peak resident memory (RSS) of ``tenslora train``, per stage and end to end.

    python benchmarks/memory.py stages [-- TRAIN OPTIONS]      # one in-process run, RSS at each stage
    python benchmarks/memory.py compare --baseline DIR [--repeats N] [-- TRAIN OPTIONS]
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory.py steps --label 64k   # CPU cost of a setting

``stages`` runs ``tenslora train`` in this process and prints, at each stage boundary, the current
RSS and the process's peak so far (``ru_maxrss``): the stage where the peak jumps is where the
memory goes. It also prints glibc's own account (``mallinfo2``): heap bytes in use, heap bytes free
but still held (fragmentation: what a smaller ``MALLOC_MMAP_THRESHOLD_`` gives back), and bytes in
``mmap`` blocks. ``TL_BENCH_TRIM=step`` calls ``malloc_trim(0)`` after every optimizer step, and
``TL_BENCH_TRIM=rss200`` whenever the RSS grew 200 MB since the last trim (an alternative measured in
docs/benchmarks.md, not used by ``tenslora``). ``compare`` runs ``python -m tenslora train`` as a fresh subprocess with this checkout
and with ``DIR`` (another checkout, e.g. the main branch) on ``PYTHONPATH``, alternating, and prints
each run's peak RSS (``ru_maxrss`` of the child), wall time and CPU time (user + system: the fairer
cost on a shared machine). Default train options: the default
run for ``--max-steps 5`` (tweets, offline MiniLM) with a fresh output directory per run.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ["--max-steps", "5", "--no-progress"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def malloc_mb() -> tuple[float, float, float]:
    """glibc ``mallinfo2`` summed over all arenas: (heap bytes in use, heap bytes free but held, bytes in
    ``mmap`` blocks), in MB; NaNs where it is not available."""
    import ctypes
    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
              "keepcost")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in fields]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return (float("nan"),) * 3
    fn.restype = MallInfo2
    info = fn()
    return info.uordblks / 2**20, info.fordblks / 2**20, info.hblkhd / 2**20


class Stages:
    """Prints one line per stage: RSS now, peak so far, how much the peak grew, seconds since start, and
    glibc's view (heap in use, heap free but held, mmap blocks): a large "heap free" is memory glibc keeps."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.last_peak = 0.0
        print(f"{'stage':44s} {'rss MB':>8s} {'peak MB':>8s} {'+peak':>7s} {'t s':>7s} {'heap use':>8s} "
              f"{'heap free':>9s} {'mmap':>6s}")

    def mark(self, name: str) -> None:
        peak = peak_mb()
        used, free, mapped = malloc_mb()
        print(f"{name:44s} {rss_mb():8.0f} {peak:8.0f} {peak - self.last_peak:7.0f} "
              f"{time.perf_counter() - self.t0:7.1f} {used:8.0f} {free:9.0f} {mapped:6.0f}", flush=True)
        self.last_peak = peak


def _wrap(module, name: str, stages: Stages, label: str) -> None:
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        stages.mark(label)
        return out

    setattr(module, name, wrapped)


def _trim() -> None:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class StageCallback:
    """``train`` callbacks marking the loop's stages (first step, each evaluation, the end)."""

    def __init__(self, stages: Stages):
        self.stages, self.seen, self.trimmed_at = stages, set(), 0.0

    def on_train_begin(self, *args):
        self.stages.mark("loaders, optimizer, writer (train begins)")

    def after_backward(self, step, *args):
        if os.environ.get("TL_BENCH_TRIM") == "backward":
            _trim()
        if step == 1:
            self.stages.mark("step 1 forward + backward")

    def on_step_end(self, step, adapted, logs):
        mode = os.environ.get("TL_BENCH_TRIM", "")
        if mode in ("step", "backward"):
            _trim()
        elif mode.startswith("rss") and rss_mb() > self.trimmed_at + float(mode[3:]):
            _trim()
            self.trimmed_at = rss_mb()
        if step == 1 or step % 10 == 0:
            self.stages.mark(f"step {step} done")

    def on_train_end(self, *args):
        self.stages.mark("final test evaluation")


def stages(train_args: list[str]) -> None:
    st = Stages()
    st.mark("interpreter")
    import tenslora.cli  # noqa: F401  (what the `tenslora` command imports first)
    st.mark("import tenslora.cli")
    from tenslora.train.memory import release_freed_memory
    release_freed_memory()  # as the `tenslora` command's main() does
    from tenslora.train import loop, setup
    st.mark("import tenslora.train.loop")
    _wrap(setup, "load_task", st, "load task (read + parse the data)")
    _wrap(setup, "prepare", st, "prepare splits")
    _wrap(setup, "build_model", st, "load model + preprocessor")
    _wrap(setup, "get_adapted_model", st, "inject the adapter")
    evaluate = loop._evaluate

    def marked_evaluate(s, split):  # the training steps' peak, then the evaluation's
        st.mark(f"step {s.progress.step}, before {split} evaluation")
        out = evaluate(s, split)
        st.mark(f"step {s.progress.step}, {split} evaluation done")
        return out

    loop._evaluate = marked_evaluate
    import typer

    from tenslora.cli.train import train_command
    from tenslora.train.config import TrainConfig

    app = typer.Typer()  # parse the options exactly as `tenslora train` does
    app.command()(train_command)
    ctx = typer.main.get_command(app).make_context("train", list(train_args))
    cfg = TrainConfig(**ctx.params)
    summary = loop.train(cfg, callbacks=[StageCallback(st)])
    st.mark("outputs written (summary.json)")
    print(f"steps {summary['steps']}, wall {summary['wall_time_s']} s, peak {peak_mb():.0f} MB")


def steps(label: str, n_threads: int = 1) -> None:
    """10 training steps of the default model and adapter (batch 32, lengths 30-66 tokens): CPU seconds
    and peak RSS, to compare malloc settings (``MALLOC_MMAP_THRESHOLD_=...``) run side by side."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(n_threads)
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from tenslora.api import get_adapted_model
    from tenslora.config import TensLoRAConfig
    from tenslora.hub.registry import resolve_model_name

    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_name("minilm"), num_labels=3)
    model = get_adapted_model(model, TensLoRAConfig(construction="qkv_depth", ranks=(8, 8, 3, 6)))
    ids = torch.randint(1000, 2000, (32, 70), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    for length in (30, 45, 60, 38, 52, 41, 66, 35, 48, 57):
        out = model(input_ids=ids[:, :length], attention_mask=torch.ones(32, length, dtype=torch.long),
                    labels=torch.zeros(32, dtype=torch.long))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if os.environ.get("TL_BENCH_TRIM"):
            _trim()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{label}: CPU {usage.ru_utime + usage.ru_stime - cpu0:.1f} s, wall {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak_mb():.0f} MB")


def compare(baseline: str, repeats: int, train_args: list[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tl-mem-") as tmp:
        for i in range(repeats):
            for label, path in (("baseline", baseline), ("this checkout", str(REPO))):
                out = os.path.join(tmp, f"{label.replace(' ', '_')}-{i}")
                env = {**os.environ, "PYTHONPATH": path}
                t0 = time.perf_counter()
                proc = subprocess.Popen([sys.executable, "-m", "tenslora", "train", *train_args,
                                         "--output-dir", out], env=env, cwd=path,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _, _, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                err = proc.stderr.read().decode(errors="replace")
                proc.stderr.close()
                peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
                rows.append((label, i, peak, wall, cpu))
                print(f"{label:14s} run {i}: peak RSS {peak:7.0f} MB, wall {wall:6.1f} s, CPU {cpu:6.1f} s",
                      flush=True)
                if "Traceback" in err or "error:" in err:
                    print(err[-2000:], file=sys.stderr)
    for label in ("baseline", "this checkout"):
        mine = [r for r in rows if r[0] == label]
        n = len(mine)
        print(f"{label:14s} max peak RSS {max(r[2] for r in mine):7.0f} MB, mean wall "
              f"{sum(r[3] for r in mine) / n:6.1f} s, mean CPU {sum(r[4] for r in mine) / n:6.1f} s over {n} run(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("stages", "compare", "steps"))
    parser.add_argument("--label", default="steps", help="steps: the name printed with the result")
    parser.add_argument("--baseline", help="compare: a checkout whose tenslora is the baseline")
    parser.add_argument("--repeats", type=int, default=1)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    train_args = argv[cut + 1:] or list(DEFAULT_TRAIN)
    if args.mode == "steps":
        steps(args.label)
    elif args.mode == "stages":
        if "--output-dir" not in train_args:
            train_args += ["--output-dir", tempfile.mkdtemp(prefix="tl-mem-")]
        stages(train_args)
    else:
        if not args.baseline:
            parser.error("compare needs --baseline DIR")
        compare(args.baseline, args.repeats, train_args)


if __name__ == "__main__":
    main()
