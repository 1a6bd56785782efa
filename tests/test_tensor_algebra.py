import pytest
import torch

from tenslora.tensor import CP, TensorTrain, Tucker, fold, khatri_rao, mode_dot, stacked_mode_dot, unfold

MODES = ("input", "head_dim", "heads", "qkv", "layers")


def test_unfold_fold_roundtrip_and_layout():
    x = torch.arange(24.0).reshape(2, 3, 4)
    for mode in range(3):
        assert torch.equal(fold(unfold(x, mode), mode, x.shape), x)
    # mode-1 unfolding: row j holds x[:, j, :] in C order
    assert torch.equal(unfold(x, 1)[1], x[:, 1, :].reshape(-1))


def test_mode_dot_matches_einsum():
    x, m = torch.randn(3, 4, 5), torch.randn(6, 4)
    assert torch.allclose(mode_dot(x, m, 1), torch.einsum("ajc,bj->abc", x, m), atol=1e-6)


def test_khatri_rao_first_index_major():
    a, b = torch.randn(3, 2), torch.randn(4, 2)
    kr = khatri_rao([a, b])
    assert torch.allclose(kr[1 * 4 + 2], a[1] * b[2])


def randomize(tensor, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensor.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tensor


def test_tucker_full_is_explicit_sum():
    t = randomize(Tucker((3, 4, 2), (2, 3, 2), ("input", "output", "qkv")))
    ref = torch.einsum("abc,ia,jb,kc->ijk", t.core, t.factors["input"], t.factors["output"], t.factors["qkv"])
    assert torch.allclose(t.full(), ref, atol=1e-5)


def test_cp_full_is_sum_of_rank_one_terms():
    t = randomize(CP((3, 4, 2), 5, ("input", "output", "qkv")))
    u, v, w = (t.factors[m] for m in ("input", "output", "qkv"))
    ref = sum(torch.einsum("i,j,k->ijk", u[:, r], v[:, r], w[:, r]) for r in range(5))
    assert torch.allclose(t.full(), ref, atol=1e-5)


@pytest.mark.parametrize("cls,ranks", [(Tucker, (3, 2, 2, 2, 3)), (CP, 4)])
def test_thin_pair_equals_sliced_full_tensor(cls, ranks):
    t = randomize(cls((6, 4, 3, 2, 5), ranks, MODES))
    full = t.full()
    a, b = t.thin_pair(("heads", "head_dim"), ("qkv", "layers"))
    assert a.shape == (6, t.ranks[0]) and b.shape == (2, 5, t.ranks[0], 12)
    for p in range(2):
        for l in range(5):
            dense = full[:, :, :, p, l].permute(0, 2, 1).reshape(6, 12)  # column = head * head_dim + d
            assert torch.allclose(a @ b[p, l], dense, atol=1e-5)


def test_initial_update_is_zero():
    assert torch.count_nonzero(Tucker((5, 4, 3), (2, 2, 2), ("input", "output", "qkv")).full()) == 0
    cp = CP((5, 4, 3), 3, ("input", "output", "qkv"))
    assert torch.count_nonzero(cp.full()) == 0
    assert torch.count_nonzero(cp.factors["input"]) == 0 and torch.count_nonzero(cp.factors["output"]) > 0


@pytest.mark.parametrize("init", ["orthogonal", "kaiming_uniform", "normal"])
def test_inits_draw_from_the_given_generator_only(init):
    state = torch.random.get_rng_state()
    a = Tucker((8, 6), (3, 2), ("input", "output"), init=init, generator=torch.Generator().manual_seed(1))
    b = Tucker((8, 6), (3, 2), ("input", "output"), init=init, generator=torch.Generator().manual_seed(1))
    c = Tucker((8, 6), (3, 2), ("input", "output"), init=init, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.factors["input"], b.factors["input"])
    assert not torch.equal(a.factors["input"], c.factors["input"])


def test_orthogonal_factors_have_orthonormal_columns():
    t = Tucker((8, 6), (3, 2), ("input", "output"), generator=torch.Generator().manual_seed(0))
    u = t.factors["input"]
    assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-5)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="unknown init 'zeros'"):
        Tucker((4, 4), (2, 2), ("input", "output"), init="zeros")


def test_stacked_mode_dot_is_each_members_mode_dot():
    x, m = torch.randn(4, 3, 5, 2), torch.randn(4, 6, 5)
    out = stacked_mode_dot(x, m, 1)
    assert out.shape == (4, 3, 6, 2)
    for g in range(4):
        assert torch.allclose(out[g], mode_dot(x[g], m[g], 1), atol=1e-6)


def test_khatri_rao_batches_leading_dims():
    a, b = torch.randn(3, 4, 2), torch.randn(3, 5, 2)
    kr = khatri_rao([a, b])
    assert kr.shape == (3, 20, 2)
    for g in range(3):
        assert torch.equal(kr[g], khatri_rao([a[g], b[g]]))


@pytest.mark.parametrize("cls,ranks", [(Tucker, (3, 2, 2, 2, 3)), (CP, 4), (TensorTrain, (3, 2, 4, 2))])
@pytest.mark.parametrize("batch_modes", [("qkv", "layers"), ("layers",), ()])
def test_stacked_thin_pair_equals_each_tensors_own_and_its_gradients(cls, ranks, batch_modes):
    """Three tensors of one layout contracted as a stack: each member's (A, B) is its own thin pair, and
    the gradients reach each member's parameters as if computed alone."""
    modes = tuple(m for m in MODES if m in ("input", "head_dim", "heads", *batch_modes))
    shape = tuple({"input": 6, "head_dim": 4, "heads": 3, "qkv": 2, "layers": 5}[m] for m in modes)
    rank = ranks if cls is CP else ranks[:len(shape) - (cls is TensorTrain)]
    tensors = [randomize(cls(shape, rank, modes), seed) for seed in range(3)]
    a, b = cls.stacked_thin_pair(tensors, ("heads", "head_dim"), batch_modes)
    assert b.shape[0] == 3
    weights = torch.randn(b.shape, generator=torch.Generator().manual_seed(9))
    (b * weights).sum().backward()
    stacked_grads = [[p.grad.clone() for p in t.parameters() if p.grad is not None] for t in tensors]
    for g, t in enumerate(tensors):
        t.zero_grad()
        a_alone, b_alone = t.thin_pair(("heads", "head_dim"), batch_modes)
        assert a[g] is t.mode_parameters()["input"] or torch.equal(a[g], a_alone)
        assert torch.allclose(b[g], b_alone, atol=1e-5)
        (b_alone * weights[g]).sum().backward()
        alone = [p.grad for p in t.parameters() if p.grad is not None]
        assert len(alone) == len(stacked_grads[g]) > 0
        for x, y in zip(stacked_grads[g], alone):
            assert torch.allclose(x, y, atol=1e-4)
