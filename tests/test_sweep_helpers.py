"""Shared helpers for the sweep tests: a tiny fake trainer honouring the job contract."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import yaml

FAKE_TRAINER = textwrap.dedent('''
    """Fake `tenslora train`: --output-dir, --resume, a checkpoint marker, summary.json, events."""
    import argparse, json, os, sys, time

    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--events", required=True)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--no-summary", action="store_true")
    p.add_argument("--hang", action="store_true")
    p.add_argument("--acc", type=float, default=0.5)
    p.add_argument("--params", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate", default=None, help="wait for GATE/<name> or GATE/ALL to exist instead of sleeping")
    args, _ = p.parse_known_args()
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(out.rstrip("/"))

    def event(kind):
        line = f"{kind} {name} {os.getpid()} {time.time():.6f}\\n"
        fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)

    ckpt = os.path.join(out, "checkpoint")
    resumed = args.resume and os.path.exists(ckpt)
    event("resume" if resumed else "start")
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS",
                                                   "CUDA_VISIBLE_DEVICES")}, f)
    count_file = os.path.join(out, "failures")
    failed = int(open(count_file).read()) if os.path.exists(count_file) else 0
    if failed < args.fail_times:
        open(count_file, "w").write(str(failed + 1))
        print(f"fake failure {failed + 1} of {args.fail_times}", flush=True)
        event("fail")
        sys.exit(3)
    if args.hang:
        print("hanging", flush=True)
        time.sleep(3600)
    if args.gate:  # the test decides when this job may finish
        if not resumed:
            open(ckpt, "w").write("half")
        mine, everyone = os.path.join(args.gate, name), os.path.join(args.gate, "ALL")
        while not (os.path.exists(mine) or os.path.exists(everyone)):
            time.sleep(0.02)
    else:
        half = args.sleep / 2
        if not resumed:
            time.sleep(half)
            open(ckpt, "w").write("half")
        time.sleep(half)
    print(f"trained {name}", flush=True)
    if not args.no_summary:
        acc = args.acc + 0.01 * args.seed
        summary = {"trainable_parameters": args.params, "wall_time_s": args.sleep,
                   "best": {"test_accuracy": acc, "test_macro_f1": acc - 0.1, "test_mcc": acc - 0.2},
                   "final": {"test_accuracy": acc - 0.05, "test_macro_f1": acc - 0.15, "test_mcc": acc - 0.25}}
        tmp = os.path.join(out, "summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, os.path.join(out, "summary.json"))
    event("end")
''')


def write_trainer(tmp: Path) -> Path:
    path = tmp / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


def write_sweep(tmp: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fake_command(tmp: Path) -> list[str]:
    return [sys.executable, str(write_trainer(tmp))]


def read_events(path: Path) -> list[tuple[str, str, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, name, pid, ts = line.split()
        out.append((kind, name, int(pid), float(ts)))
    return out


def intervals(events) -> dict[str, list[tuple[float, float]]]:
    """Per job: (start, end) of each process that ran it (end = inf if it never finished).

    ``killed`` events (appended by a test that killed a job process) end a span too.
    """
    open_: dict[int, tuple[str, float]] = {}
    out: dict[str, list[tuple[float, float]]] = {}
    for kind, name, pid, ts in events:
        if kind in ("start", "resume"):
            open_[pid] = (name, ts)
        elif kind in ("end", "fail", "killed") and pid in open_:
            n, t0 = open_.pop(pid)
            out.setdefault(n, []).append((t0, ts))
    for pid, (n, t0) in open_.items():
        out.setdefault(n, []).append((t0, float("inf")))
    return out


def max_concurrency(events) -> int:
    """The most job processes alive at once (from start/resume and end/fail events)."""
    level = best = 0
    points = []
    for spans in intervals(events).values():
        for t0, t1 in spans:
            points += [(t0, 1), (t1, -1)]
    for _, d in sorted(points, key=lambda p: (p[0], p[1])):
        level += d
        best = max(best, level)
    return best


def wait_for(predicate, what: str, limit_s: float = 600.0) -> None:
    """Poll until ``predicate()`` holds (an event, not a duration); ``limit_s`` only stops a hung test."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def running_jobs(events: Path) -> dict[int, str]:
    """Job processes that started (or resumed) and have not ended, in start order: pid -> name."""
    alive: dict[int, str] = {}
    for kind, name, pid, _ in read_events(events):
        if kind in ("start", "resume"):
            alive[pid] = name
        else:
            alive.pop(pid, None)
    return alive


def ended(events: Path) -> int:
    return sum(1 for e in read_events(events) if e[0] == "end")


def release(gate: Path, name: str = "ALL") -> None:
    """Let job ``name`` (or every job, present and future) finish."""
    (gate / name).touch()
