"""Statistics over seeds and one verdict per claim (held / did not hold / inconclusive, by the pooled std)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None
    n: int

    def fmt(self, digits: int = 4) -> str:
        s = f"{self.mean:.{digits}f}"
        return s + (f" ± {self.std:.{digits}f}" if self.std is not None else "") + f" (n={self.n})"


HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


def pooled_std(a: Stat, b: Stat) -> float | None:
    if a.std is None or b.std is None or a.n < 2 or b.n < 2:
        return None
    return math.sqrt(((a.n - 1) * a.std ** 2 + (b.n - 1) * b.std ** 2) / (a.n + b.n - 2))


def compare(a: Stat | None, b: Stat | None) -> tuple[str, float | None, float | None]:
    """Is ``a`` above ``b``? ``held`` if ``a - b >= pooled std``, ``did not hold`` if ``b - a >= pooled
    std``, else (or with fewer than two seeds on a side) ``inconclusive``. Returns (verdict, diff, pooled)."""
    if a is None or b is None:
        return INCONCLUSIVE, None, None
    diff = a.mean - b.mean
    pooled = pooled_std(a, b)
    if pooled is None:
        return INCONCLUSIVE, diff, None
    if pooled == 0:
        verdict = HELD if diff > 0 else NOT_HELD if diff < 0 else INCONCLUSIVE
        return verdict, diff, pooled
    if diff >= pooled:
        return HELD, diff, pooled
    if -diff >= pooled:
        return NOT_HELD, diff, pooled
    return INCONCLUSIVE, diff, pooled


def combine_all(verdicts: Sequence[str]) -> str:
    """A conjunction: held if every part held, did not hold if any part did not hold, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if any(v == NOT_HELD for v in verdicts):
        return NOT_HELD
    if all(v == HELD for v in verdicts):
        return HELD
    return INCONCLUSIVE


def _cmp_text(name_a: str, a: Stat | None, name_b: str, b: Stat | None) -> str:
    verdict, diff, pooled = compare(a, b)
    if a is None or b is None:
        missing = name_a if a is None else name_b
        return f"{missing} has no finished runs"
    p = "n/a (fewer than 2 seeds)" if pooled is None else f"{pooled:.4f}"
    return f"{name_a} {a.fmt()} vs {name_b} {b.fmt()}: difference {diff:+.4f}, pooled std {p} -> {verdict}"


CLAIM_EXPERIMENT = {1: "A", 2: "A", 3: "B", 4: "B", 5: "C", 6: "E"}
CLAIMS = {
    1: "qkv_depth and att_qkv_depth (Tucker) beat PEFT LoRA at equal parameters (LoRA r=2)",
    2: "the heads mode (att) is the least useful construction",
    3: "a larger core lambda improves the metric (lambda 16 > lambda 1) and beats the uniform-lr controls",
    4: "a LoRA+ ratio > 1 helps LoRA",
    5: "rank allocation by metrics beats uniform ranks and its reverse at equal budget",
    6: "the layers mode has a low effective rank: its rank can drop from 4 to 2 without accuracy loss",
}
TUNED_CLAIMS = (1, 2)  # re-judged at each method's own learning rate (experiment D)


def no_loss(a: Stat | None, b: Stat | None) -> tuple[str, float | None, float | None]:
    """Does ``a`` lose nothing against ``b``? ``did not hold`` if ``b - a >= pooled std``, ``held`` if not (with
    at least two seeds a side), else ``inconclusive``. A non-inferiority reading of :func:`compare`: a small
    difference counts for the claim, so a large pooled std makes ``held`` weak (the std is printed)."""
    verdict, diff, pooled = compare(b, a)
    if verdict == HELD:
        return NOT_HELD, None if diff is None else -diff, pooled
    if pooled is None:
        return INCONCLUSIVE, None if diff is None else -diff, pooled
    return HELD, -diff, pooled


def claim6_verdict(stats: Mapping[str, Stat], effective: Mapping[int, Stat] | None = None) -> tuple[str, str]:
    """Claim 6 from ``E:layers=<r>`` statistics: the smallest layers rank (2) against the largest (4), with the
    layers mode's measured effective rank ``exp(SVD entropy)`` per arm in the sentence when ``effective`` has it."""
    ranks = sorted(int(k.split("=", 1)[1]) for k in stats if k.startswith("E:layers="))
    if len(ranks) < 2:
        return INCONCLUSIVE, f"{INCONCLUSIVE}: fewer than two layers ranks have finished runs."
    lo, hi = ranks[0], ranks[-1]
    low, high = stats[f"E:layers={lo}"], stats[f"E:layers={hi}"]
    verdict, diff, pooled = no_loss(low, high)
    p = "n/a (fewer than 2 seeds)" if pooled is None else f"{pooled:.4f}"
    text = (f"layers rank {lo} {low.fmt()} vs layers rank {hi} {high.fmt()}: difference {diff:+.4f}, pooled std {p} "
            f"-> {verdict} (held: rank {lo} is not below rank {hi} by a pooled std or more)")
    eff = [f"rank {r}: {effective[r].fmt(2)}" for r in (hi, lo) if effective and effective.get(r) is not None]
    if eff:
        text += "; measured effective rank of the layers mode (exp of its SVD entropy, best-validation adapter) " \
                + ", ".join(eff)
    return verdict, f"{verdict}: {text}."


def claim_verdicts(stats: Mapping[str, Stat], claims_config: Mapping[str, Any] | None = None, *,
                   baseline: str = "lora r=2") -> dict[int, tuple[str, str]]:
    """``{claim: (verdict, sentence)}`` from per-configuration statistics of one task and metric.

    ``stats`` keys: ``A:lora r=2``, ``A:<construction>/<tucker|cp>``, ``B:lambda:<c>:<lambda>``,
    ``B:control:<c>:<mult>``, ``B:loraplus:<ratio>``, ``C:<arm>:lora:<k>``, ``E:layers=<r>``. Missing
    keys make the affected comparisons inconclusive. ``baseline``: claim 1's LoRA (``A:<baseline>``).
    """
    g = stats.get
    out: dict[int, tuple[str, str]] = {}
    # 1
    parts, texts = [], []
    lora_base = g(f"A:{baseline}")
    for c in ("qkv_depth", "att_qkv_depth"):
        v, _, _ = compare(g(f"A:{c}/tucker"), lora_base)
        parts.append(v)
        texts.append(_cmp_text(f"{c}/tucker", g(f"A:{c}/tucker"), baseline.replace("lora", "LoRA"), lora_base))
    v = combine_all(parts)
    out[1] = (v, f"{v}: " + "; ".join(texts) + ".")
    # 2
    parts, texts = [], []
    for f in ("tucker", "cp"):
        att = g(f"A:att/{f}")
        others = sorted(k for k in stats if k.startswith("A:") and k.endswith(f"/{f}") and k != f"A:att/{f}")
        if att is None or not others:
            continue
        for k in others:
            v, _, _ = compare(stats[k], att)
            parts.append(v)
        worst_other = min(others, key=lambda k: stats[k].mean)
        texts.append(f"{f}: att {att.fmt()}, lowest other {worst_other[2:]} {stats[worst_other].fmt()}; "
                     f"att below every other by at least the pooled std in "
                     f"{sum(1 for k in others if compare(stats[k], att)[0] == HELD)}/{len(others)}, "
                     f"above by at least the pooled std in "
                     f"{sum(1 for k in others if compare(stats[k], att)[0] == NOT_HELD)}/{len(others)}")
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[2] = (v, f"{v}: " + ("; ".join(texts) if texts else "no att runs or no other constructions") + ".")
    # 3
    parts, texts = [], []
    constructions = sorted({k.split(":")[2] for k in stats if k.startswith("B:lambda:")})
    for c in constructions:
        lam16, lam1 = g(f"B:lambda:{c}:16"), g(f"B:lambda:{c}:1")
        controls = {k: s for k, s in stats.items() if k.startswith(f"B:control:{c}:")}
        best_ctrl_key = max(controls, key=lambda k: controls[k].mean) if controls else None
        best_ctrl = controls.get(best_ctrl_key) if best_ctrl_key else None
        v1, _, _ = compare(lam16, lam1)
        v2, _, _ = compare(lam16, best_ctrl)
        parts += [v1, v2]
        ctrl_name = f"best control (lr x{best_ctrl_key.rsplit(':', 1)[1]})" if best_ctrl_key else "control"
        texts.append(f"{c}: " + _cmp_text("lambda 16", lam16, "lambda 1", lam1) + "; "
                     + _cmp_text("lambda 16", lam16, ctrl_name, best_ctrl))
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[3] = (v, f"{v}: " + ("; ".join(texts) if texts else "no lambda runs") + ".")
    # 4
    ratios = {float(k.split(":")[2]): s for k, s in stats.items() if k.startswith("B:loraplus:")}
    base = ratios.get(1.0)
    above = {r: s for r, s in ratios.items() if r > 1}
    if base is not None and above:
        best_r = max(above, key=lambda r: above[r].mean)
        v, _, _ = compare(above[best_r], base)
        text = _cmp_text(f"ratio {best_r:g} (best of {', '.join(f'{r:g}' for r in sorted(above))})",
                         above[best_r], "ratio 1", base)
    else:
        v, text = INCONCLUSIVE, "no LoRA+ runs"
    out[4] = (v, f"{v}: {text}.")
    # 5
    parts, texts = [], []
    budgets = sorted({k.split(":", 2)[2] for k in stats if k.startswith("C:auto:")})
    for b in budgets:
        auto, uni, rev = g(f"C:auto:{b}"), g(f"C:uniform:{b}"), g(f"C:reverse:{b}")
        parts += [compare(auto, uni)[0], compare(auto, rev)[0]]
        texts.append(f"{b}: " + _cmp_text("auto", auto, "uniform", uni) + "; " + _cmp_text("auto", auto, "reverse", rev))
    v = combine_all(parts) if parts else INCONCLUSIVE
    out[5] = (v, f"{v}: " + ("; ".join(texts) if texts else "no allocation runs") + ".")
    out[6] = claim6_verdict(stats)
    return out


def stat_of(group, metric: str) -> Stat | None:
    """The mean ± std (and count) of ``metric`` over a sweep-aggregation group's seeds, or None."""
    m = group.mean(metric)
    return None if m is None else Stat(m, group.std(metric), len(group.values.get(metric) or []))
