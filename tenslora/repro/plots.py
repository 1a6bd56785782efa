"""The report's PNG plots, one per experiment (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from tenslora.repro.verdicts import stat_of


def _figure(size: tuple[float, float]):
    """A new (figure, axes) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=size)


def _save(fig, ax, path: Path, *, ylabel: str, title: str, grid_axis: str = "both") -> Path:
    """Y label, title, grid, legend, tight layout; PNG at ``path``, figure closed."""
    import matplotlib.pyplot as plt
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_a(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    fig, ax = _figure((7.5, 4.8))
    series = {"lora": ("PEFT LoRA", "s"), "tucker": ("Tucker", "o"), "cp": ("CP", "^")}
    for fac, (label, marker) in series.items():
        pts = [(e["group"].trainable_parameters, stat_of(e["group"], metric), e["role"]) for e in entries
               if e["role"]["factorization"] == fac and stat_of(e["group"], metric) is not None
               and e["group"].trainable_parameters is not None]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0 for p in pts], fmt=marker,
                    capsize=3, label=label)
        for x, s, role in pts:
            ax.annotate(role["construction"] if fac != "lora" else role["label"], (x, s.mean), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head)")
    return _save(fig, ax, path, ylabel=f"{metric} (best-validation checkpoint; mean ± std over seeds)",
                 title=f"A: constructions at equal parameters — {task}")


def _plot_b(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    fig, ax = _figure((7.5, 4.8))
    series: dict[str, list] = {}
    for e in entries:
        s = stat_of(e["group"], metric)
        if s is None:
            continue
        series.setdefault(e["role"]["series"], []).append((e["role"]["x"], s))
    # lambda = 1 is also the control at multiplier 1: draw it on the control series as its start
    for name in list(series):
        if name.endswith("core lambda"):
            c = name[: -len(" core lambda")]
            ctrl = f"{c} control (lambda 1, lr x m)"
            base = [p for p in series[name] if p[0] == 1.0]
            if ctrl in series and base:
                series[ctrl] = series[ctrl] + base
    for name, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        style = "o--" if "control" in name else "s:" if "LoRA+" in name else "o-"
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std or 0 for p in pts], fmt=style,
                    capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("core lambda  |  controls: whole-adapter lr multiplier  |  LoRA+: B/A lr ratio")
    return _save(fig, ax, path, ylabel=f"{metric} (mean ± std over seeds)",
                 title=f"B: heterogeneous learning rate vs uniform-lr controls — {task}")


def _plot_c(task: str, metric: str, entries: list[dict], path: Path) -> Path:
    arms = ["uniform", "auto", "reverse"]
    budgets = sorted({e["role"]["budget"] for e in entries}, key=lambda b: int(b.split(":")[1]))
    fig, ax = _figure((7, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for j, b in enumerate(budgets):
            e = next((e for e in entries if e["role"]["arm"] == arm and e["role"]["budget"] == b), None)
            s = stat_of(e["group"], metric) if e else None
            if s is None:
                continue
            xs.append(j + (i - 1) * width)
            ys.append(s.mean)
            es.append(s.std or 0)
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=arm)
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels([f"budget {b}" for b in budgets])
    ys_all = [stat_of(e["group"], metric).mean for e in entries if stat_of(e["group"], metric) is not None]
    if ys_all:
        lo, hi = min(ys_all), max(ys_all)
        pad = max(0.02, (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    return _save(fig, ax, path, ylabel=f"{metric} (mean ± std over seeds)",
                 title=f"C: rank allocation (att_qkv_depth Tucker) — {task}", grid_axis="y")


def plot_grid(task: str, metric: str, values: dict[str, dict[float, float | None]], chosen: dict[str, float],
              path: Path) -> Path:
    """D's grid: the validation ``metric`` against the learning rate, one line per configuration
    (``values[label][lr]``; None or NaN left out), the chosen rate circled."""
    import math

    fig, ax = _figure((8, 5))
    for label, pts in values.items():
        xs = sorted(lr for lr, v in pts.items() if v is not None and not math.isnan(v))
        if not xs:
            continue
        style = "s-" if label.startswith("lora") else {"cp": "o--", "tt": "o:"}.get(label.rpartition("/")[2], "o-")
        line, = ax.plot(xs, [pts[x] for x in xs], style, markersize=4, linewidth=1, label=label)
        lr = chosen.get(label)
        if lr in pts and pts[lr] is not None and not math.isnan(pts[lr]):
            ax.plot([lr], [pts[lr]], "o", markersize=11, markerfacecolor="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (one seed per rate; circled: the chosen rate)")
    return _save(fig, ax, path, ylabel=f"{metric} (best-validation checkpoint)",
                 title=f"D: learning-rate grid, chosen on validation — {task}")


PLOTS = {"A": _plot_a, "B": _plot_b, "C": _plot_c}  # experiment -> plot(task, metric, entries, path)
