"""Exact mode spectra (no reconstruction) against brute-force SVDs of the reconstructed tensors."""
import math

import pytest
import torch

from tenslora.plus import spectra
from tenslora.tensor.algebra import unfold
from tenslora.tensor.factorized import CP, Tucker

SHAPE, NAMES = (12, 4, 3, 3, 5), ("input", "head_dim", "heads", "qkv", "layers")


def tucker(seed, ranks=(4, 3, 2, 3, 4), shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    t = Tucker(shape, ranks, NAMES[:len(shape)], init="normal", generator=g).double()
    with torch.no_grad():
        t.core.copy_(torch.randn(t.core.shape, generator=g, dtype=torch.float64))
        t.factors["input"].mul_(3.0)  # not orthonormal: the core alone would be wrong
    return t


def cp(seed, rank=4, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    t = CP(shape, rank, NAMES[:len(shape)], init="normal", generator=g).double()
    with torch.no_grad():
        t.factors["input"].copy_(torch.randn(t.factors["input"].shape, generator=g, dtype=torch.float64))
    return t


def brute(tensors, mode):
    n = tensors[0].mode_names.index(mode)
    return torch.linalg.svdvals(torch.cat([unfold(t.full().detach(), n) for t in tensors], dim=1))


def check(fast, slow):
    k = min(len(fast), len(slow))
    atol = 1e-4 * float(slow.max())
    torch.testing.assert_close(fast[:k], slow[:k], rtol=1e-4, atol=atol)
    assert all(float(x[k:].abs().sum()) <= atol * len(x) for x in (fast, slow))


@pytest.mark.parametrize("make", [tucker, cp])
@pytest.mark.parametrize("mode", NAMES)
def test_single_tensor(make, mode):
    t = make(0)
    check(spectra.mode_singular_values(t, mode), brute([t], mode))


@pytest.mark.parametrize("make", [tucker, cp])
@pytest.mark.parametrize("mode", NAMES)
def test_aggregated_tensors(make, mode):
    ts = [make(s) for s in range(3)]
    check(spectra.mode_singular_values(ts, mode), brute(ts, mode))


def test_rank_above_mode_size_and_metrics_match_brute_force():
    t = tucker(1, ranks=(4, 3, 3, 3, 6))  # layers rank 6 > size 5, qkv rank = size
    for mode in NAMES:
        fast, slow = spectra.mode_singular_values(t, mode), brute([t], mode)
        check(fast, slow)
        mf, ms = spectra.spectrum_metrics(fast), spectra.spectrum_metrics(slow)
        for key in ("entropy", "top1_energy", "effective_rank"):
            assert mf[key] == pytest.approx(ms[key], rel=1e-4)


def test_spectrum_metrics_values():
    m = spectra.spectrum_metrics(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    p = torch.tensor([4.0, 1.0, 1.0]) / 6
    ent = float(-(p * p.log()).sum())
    assert m["entropy"] == pytest.approx(ent) and m["top1_energy"] == pytest.approx(4 / 6)
    assert m["effective_rank"] == pytest.approx(math.exp(ent)) and m["max_rank"] == 4
    flat = spectra.spectrum_metrics(torch.ones(8))
    assert flat["entropy"] == pytest.approx(math.log(8)) and flat["effective_rank"] == pytest.approx(8)
    zero = spectra.spectrum_metrics(torch.zeros(3))
    assert math.isnan(zero["entropy"]) and zero["norm"] == 0


def test_zero_core_gives_zero_spectrum():
    t = Tucker((6, 4, 3), (2, 2, 2), ("input", "output", "qkv"))
    s = spectra.mode_singular_values(t, "input")
    assert float(s.abs().max()) == 0


def test_lora_pairs_and_stacked_gram():
    g = torch.Generator().manual_seed(0)
    mats = {(l, p): (torch.randn(3, 10, generator=g, dtype=torch.float64),
                     torch.randn(8, 3, generator=g, dtype=torch.float64)) for l in range(4) for p in range(3)}
    full = torch.zeros(10, 8, 3, 4, dtype=torch.float64)  # (d_in, d_out, qkv, layers)
    for (l, p), (a, b) in mats.items():
        full[:, :, p, l] = (b @ a).T
    pairs = [spectra.lora_pairs(a, b) for a, b in mats.values()]
    check(spectra.singular_values_of_pairs([p["input"] for p in pairs]), torch.linalg.svdvals(unfold(full, 0)))
    check(spectra.singular_values_of_pairs([p["output"] for p in pairs]), torch.linalg.svdvals(unfold(full, 1)))
    gram = spectra.stacked_gram(list(mats.values()))
    flat = torch.stack([(b @ a).reshape(-1) for a, b in mats.values()])
    torch.testing.assert_close(gram, flat @ flat.T)
    one = spectra.singular_values_of_pairs([pairs[0]["input"]])
    a, b = mats[(0, 0)]
    check(one, torch.linalg.svdvals(b @ a))


def test_grad_norm_and_errors():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0])
    assert spectra.grad_norm([p, q]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="mode 'nope' not in"):
        spectra.mode_singular_values(tucker(0), "nope")
    with pytest.raises(ValueError, match="different mode sizes"):
        spectra.mode_singular_values([tucker(0), tucker(1, shape=(11, 4, 3, 3, 5))], "input")
