"""``tenslora bench``: benchmarks that print ratios against a baseline measured in the same run."""
from __future__ import annotations

import json
import sys

import typer

app = typer.Typer(no_args_is_help=True, help="Benchmarks (timings are ratios to a same-run baseline).")


@app.command("step-time")
def step_time(
    layers: int = typer.Option(12, help="Transformer layers."),
    hidden: int = typer.Option(768, help="Hidden size."),
    heads: int = typer.Option(12, help="Attention heads."),
    kv_heads: int = typer.Option(0, help="Key/value heads: > 0 benchmarks a LLaMA decoder with grouped-query "
                                         "attention (e.g. --layers 30 --hidden 576 --heads 9 --kv-heads 3: SmolLM2-135M)."),
    batch: int = typer.Option(8, help="Sequences per batch."),
    seq: int = typer.Option(128, help="Tokens per sequence."),
    steps: int = typer.Option(10, help="Timed rounds; each configuration takes one step per round (median reported)."),
    warmup: int = typer.Option(1, help="Untimed rounds first."),
    rank: int = typer.Option(8, help="LoRA rank and typical TensLoRA rank."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
    targets: str = typer.Option("qkv", help="Adapted layers for every method, LoRA included: qkv, qkvo (plus "
                                            "the attention output projection) or all-linear (plus the MLP)."),
    clock: str = typer.Option("wall", help="wall (elapsed) or process (CPU time of the timing process; cpu only, "
                                           "steadier on a loaded machine)."),
    methods: str = typer.Option("", help="Comma-separated subset, e.g. 'lora,qkv_depth:tucker' (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
) -> None:
    """Median training-step time (forward, backward, AdamW) and peak memory vs PEFT LoRA r=RANK."""
    from rich.console import Console
    from rich.table import Table

    from tenslora.bench import StepBench, default_methods, run_all
    from tenslora.constructions import TARGETS
    if targets not in TARGETS:
        raise ValueError(f"unknown --targets {targets!r}; allowed: {', '.join(TARGETS)}")
    if clock not in ("wall", "process") or (clock == "process" and device != "cpu"):
        raise ValueError(f"--clock {clock!r} on {device}; allowed: wall, or process on cpu")
    bench = StepBench(layers, hidden, heads, batch, seq, steps, warmup, threads, device, rank, kv_heads, targets,
                      clock)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or default_methods()
    if "lora" not in chosen:
        chosen = ["lora", *chosen]
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations raised via PEFT
    console = Console(stderr=True)
    rows = run_all(bench, chosen, progress=lambda line: console.print(f"  {line}"))
    if as_json:
        print(json.dumps({"bench": bench.__dict__, "rows": rows}, indent=2))
        return
    kind = f"LLaMA, {heads} query / {kv_heads} kv heads" if kv_heads else f"RoBERTa, {heads} heads"
    table = Table(title=f"train step, {layers} layers x {hidden} hidden ({kind}), {targets}, batch {batch}x{seq}, "
                        f"{device}")
    for col in ("method", "median s/step", "x LoRA time", "peak MB", "x LoRA memory", "adapter params"):
        table.add_column(col, justify="right" if col != "method" else "left", no_wrap=True)
    for r in rows:
        table.add_row(r["method"], f"{r['median_s']:.3f}", f"{r['time_ratio']:.3f}", f"{r['peak_mb']:.0f}",
                      f"{r['memory_ratio']:.3f}", f"{r['adapter_parameters']:,}")
    Console(width=140).print(table)


@app.command("coverage")
def coverage(
    methods: str = typer.Option("att,qkv_depth,lora", help="Comma-separated constructions and 'lora', or 'all'."),
    types: str = typer.Option("", help="Comma-separated model types (default: every type of transformers' "
                                       "sequence-classification, image-classification and causal-LM mappings)."),
    out: str = typer.Option("benchmarks/results/coverage/coverage",
                            help="Output stem: writes OUT-LABEL.json/.md."),
    label: str = typer.Option("run", help="Name of this run (e.g. before, after)."),
    timeout: int = typer.Option(90, help="Seconds per model type (its build and every method)."),
) -> None:
    """Architecture coverage: build each model type tiny, adapt it with each method, check the output changes."""
    from rich.console import Console

    from tenslora.coverage import run_coverage
    console = Console(stderr=True)

    def progress(model_type: str, entry: dict) -> None:
        status = entry.get("reason", "")[:80] if entry["built"] is None else \
            " ".join(f"{m}={r['status']}" for m, r in entry["methods"].items())
        console.print(f"  {model_type:28s} {entry['seconds']:6.1f}s {status}", markup=False, highlight=False)

    command = "tenslora bench coverage " + " ".join(sys.argv[3:])
    result = run_coverage(out, label, methods.split(","), [t for t in types.split(",") if t.strip()] or None,
                          timeout, command, progress)
    print(result["markdown"])
    console.print(f"wrote {', '.join(result['files'])}", markup=False, highlight=False)
