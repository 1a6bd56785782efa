"""choose_ranks: budget and bounds respected, direction of moves, determinism, the reverse control."""
import json
import math

import pytest

from tenslora.io import write_json_atomic
from tenslora.plus import allocate as A
from tenslora.targets import ModelShape

SHAPE = ModelShape(projections=("query", "key", "value"), layers=tuple(range(6)), d_in=384, d_out=(384,) * 3,
                   head_dim=32)


def metrics(**eff):
    return {m: {"effective_rank": e, "entropy": math.log(e), "top1_energy": 1 / e} for m, e in eff.items()}


BASE = dict(input=2.0, head_dim=5.0, heads=5.0, qkv=1.5, layers=4.0)


def choose(eff, budget="lora:2", construction="att_qkv_depth", floor=2, reverse=False):
    sizes = A.mode_sizes(construction, SHAPE)
    fn = A.tucker_budget_fn(construction, SHAPE)
    n = A.parse_budget(budget, SHAPE)
    return A.choose_ranks(metrics(**eff), sizes, fn, n, floor, reverse=reverse), fn, n, sizes


@pytest.mark.parametrize("budget", ["lora:1", "lora:2", "lora:8", 20000, 5000])
@pytest.mark.parametrize("floor", [1, 2])
def test_budget_and_bounds(budget, floor):
    ranks, fn, n, sizes = choose(BASE, budget, floor=floor)
    assert fn(ranks) <= n
    assert list(ranks) == list(sizes)
    for m, r in ranks.items():
        assert min(floor, sizes[m]) <= r <= sizes[m]
        assert r <= math.prod(v for k, v in ranks.items() if k != m)
    # nearly all of the budget is used: no single rank increase still fits (within the useful caps)
    for m in ranks:
        if ranks[m] < min(sizes[m], math.prod(v for k, v in ranks.items() if k != m)):
            assert fn({**ranks, m: ranks[m] + 1}) > n


def test_more_information_more_rank():
    ranks, *_ = choose(BASE, budget=6000)
    poorer, *_ = choose({**BASE, "layers": 1.2}, budget=6000)
    richer, *_ = choose({**BASE, "input": 5.0}, budget=6000)
    assert poorer["layers"] < ranks["layers"] and poorer["input"] >= ranks["input"]
    assert richer["input"] > ranks["input"] and richer["head_dim"] < ranks["head_dim"]
    assert ranks["heads"] >= ranks["qkv"] and ranks["head_dim"] >= ranks["input"]


def test_deterministic_and_qkv_depth():
    eff = dict(input=3.0, output=3.5, qkv=2.0, layers=4.0)
    a = choose(eff, construction="qkv_depth")[0]
    assert all(choose(eff, construction="qkv_depth")[0] == a for _ in range(3))
    assert a["qkv"] <= 3 and a["layers"] <= 6


def test_reverse_moves_ranks_to_least_informative():
    eff = dict(input=1.5, head_dim=6.0, heads=6.0, qkv=1.2, layers=5.0)
    forward, fn, n, _ = choose(eff)
    backward, *_ = choose(eff, reverse=True)
    assert fn(backward) <= n
    assert backward["input"] > forward["input"]
    assert backward["heads"] < forward["heads"]
    targets = A.reversed_targets(A.mode_targets(metrics(**eff), list(eff)))
    assert targets["input"] == 6.0 and targets["qkv"] == 6.0 and targets["heads"] == 1.5


def test_errors():
    with pytest.raises(ValueError, match="budget 100 is below the"):
        choose(BASE, budget=100)
    with pytest.raises(ValueError, match="lora:k needs a positive integer"):
        A.parse_budget("lora:x", SHAPE)
    with pytest.raises(ValueError, match="must be a positive parameter count or lora:k"):
        A.parse_budget("-3", SHAPE)
    with pytest.raises(ValueError, match="no usable effective rank"):
        choose({**BASE, "qkv": float("nan")})
    with pytest.raises(ValueError, match="no metrics for mode 'layers'"):
        sizes = A.mode_sizes("att_qkv_depth", SHAPE)
        A.choose_ranks(metrics(input=2, head_dim=2, heads=2, qkv=2), sizes, A.tucker_budget_fn("att_qkv_depth", SHAPE),
                       10**6)
    with pytest.raises(ValueError, match="floor must be a positive integer"):
        choose(BASE, floor=0)


def test_allocate_from_metrics_record_and_json(tmp_path):
    record = A.allocate_from_metrics(metrics(**BASE), "att_qkv_depth", SHAPE, "lora:2")
    assert record["budget"] == A.parse_budget("lora:2", SHAPE) == 2 * 2 * 768 * 3 * 6 // 2
    assert record["predicted_parameters"] <= record["budget"]
    assert record["ranks_string"] == "_".join(str(record["ranks"][m]) for m in record["mode_sizes"])
    write_json_atomic(tmp_path / "a.json", record)
    assert json.loads((tmp_path / "a.json").read_text())["ranks"] == record["ranks"]
    assert "ranks" in A.format_record(record)
