"""Exact mode-n spectra of factorized tensors without reconstructing them (pure torch).

For a tensor ``T`` and a mode ``n``, the mode-``n`` unfolding ``T_(n)`` is ``(d_n, prod other dims)``.
Every factorization here is reduced to a pair ``(U, M)`` with ``T_(n) T_(n)^T = U M M^T U^T``:

- Tucker ``T = G x_1 U_1 ... x_N U_N``: with ``U_k = Q_k R_k`` (reduced QR),
  ``T_(n) = U_n (G x_{k!=n} R_k)_(n) (kron Q_k)^T``; the Kronecker product of the ``Q_k`` has
  orthonormal columns, so ``U = U_n`` and ``M = (G x_{k!=n} R_k)_(n)`` (``r_n x prod r_k``, core-sized).
- CP ``T_(n) = U_n KR(U_k, k!=n)^T``: the Gram of a Khatri-Rao product is the Hadamard product of
  the Grams, ``H = *_{k!=n} U_k^T U_k`` (``R x R``), so ``U = U_n`` and ``M = H^(1/2)``.
- TT ``T[i_1..i_N] = G_1[:, i_1, :] ... G_N[:, i_N, :]``: with ``L`` the left partial product (rows
  ``i_1..i_{n-1}``, ``r_{n-1}`` columns) and ``R`` the right one (``r_n`` rows), ``T_(n) T_(n)^T =
  X (P kron Q) X^T`` where ``X (d_n, r_{n-1} r_n)`` is core ``n`` with its mode first, ``P = L^T L`` and
  ``Q = R R^T`` (both bond-sized, by the recursions ``P_k = sum_i G_k[:, i, :]^T P_{k-1} G_k[:, i, :]``
  and its mirror). So ``U = X`` and ``M = P^(1/2) kron Q^(1/2)``.
- A matrix ``B A`` (LoRA, ``A: (r, d_in)``, ``B: (d_out, r)``) as a 2-mode tensor: see :func:`lora_pairs`.

Aggregating tensors (stacking them along a new mode) concatenates their unfoldings, so the
mode-``n`` Grams add up: with ``[U^1 .. U^T] = Q R``, the singular values are those of
``R blockdiag(M^1 .. M^T)`` — small (``sum r x sum cols``). Computations run in float64.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence

import torch

from tenslora.tensor.algebra import mode_dot, unfold
from tenslora.tensor.factorized import CP, TensorTrain, Tucker

DTYPE = torch.float64
Pair = tuple[torch.Tensor, torch.Tensor]


@contextlib.contextmanager
def single_thread():
    """Run the enclosed tiny float64 ops on one intra-op thread (restored after).

    These matrices are core-sized: waking a thread pool costs far more than the work, and on a
    busy machine a 2-thread pool made the monitor 20-100x slower than one thread."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)
    return wrapper


def _r_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``R`` of the reduced QR of ``matrix (d, r)``: ``(min(d, r), r)``."""
    return torch.linalg.qr(matrix, mode="r")[1]


def _psd_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clamped)."""
    values, vectors = torch.linalg.eigh(gram)
    return vectors * values.clamp_min(0).sqrt()  # (V diag(sqrt l)); M M^T = H


def tucker_pair(core: torch.Tensor, factors: Sequence[torch.Tensor], n: int,
                r_factors: Sequence[torch.Tensor] | None = None) -> Pair:
    """``(U_n (d_n, r_n), M (r_n, prod_{k!=n} min(d_k, r_k)))`` for mode ``n`` of a Tucker tensor
    (``r_factors``: the factors' QR ``R``s when already computed)."""
    small = core.detach().to(DTYPE)
    for k, factor in enumerate(factors):
        if k != n:
            r = r_factors[k] if r_factors is not None else _r_factor(factor.detach().to(DTYPE))
            small = mode_dot(small, r, k)
    return factors[n].detach().to(DTYPE), unfold(small, n)


def cp_pair(factors: Sequence[torch.Tensor], n: int) -> Pair:
    """``(U_n (d_n, R), H^(1/2) (R, R))`` for mode ``n`` of a CP tensor (``H`` = Hadamard of Grams)."""
    rank = factors[n].shape[1]
    gram = torch.ones(rank, rank, dtype=DTYPE, device=factors[n].device)
    for k, factor in enumerate(factors):
        if k != n:
            f = factor.detach().to(DTYPE)
            gram = gram * (f.T @ f)
    return factors[n].detach().to(DTYPE), _psd_sqrt(gram)


def _tucker_pairs(tensor: Tucker, names: list[str], modes: list[str]) -> dict[str, Pair]:
    """The factors' QRs are computed once for all modes."""
    factors = [tensor.factors[m].detach().to("cpu", DTYPE) for m in names]  # small: CPU float64
    rs = [_r_factor(f) for f in factors]
    core = tensor.core.detach().to("cpu", DTYPE)
    return {m: tucker_pair(core, factors, names.index(m), rs) for m in modes}


def _cp_pairs(tensor: CP, names: list[str], modes: list[str]) -> dict[str, Pair]:
    """The factors' Grams are computed once for all modes."""
    factors = [tensor.factors[m].detach().to("cpu", DTYPE) for m in names]
    grams = [f.T @ f for f in factors]
    out = {}
    for m in modes:
        n = names.index(m)
        h = torch.ones_like(grams[n])
        for k, g in enumerate(grams):
            if k != n:
                h = h * g
        out[m] = (factors[n], _psd_sqrt(h))
    return out


def tt_pairs(cores: Sequence[torch.Tensor], modes: Sequence[int]) -> dict[int, Pair]:
    """``{n: (X (d_n, r_{n-1} r_n), P^(1/2) kron Q^(1/2))}`` for modes ``n`` of a TT with ``cores[k]:
    (r_{k-1}, d_k, r_k)`` (float64); the left and right Grams of every bond are computed once."""
    cores = [c.detach().to("cpu", DTYPE) for c in cores]
    left = [torch.ones(1, 1, dtype=DTYPE)]  # left[k]: Gram of the product of cores before k
    for core in cores[:-1]:
        left.append(torch.einsum("aib,ac,cid->bd", core, left[-1], core))
    right = [torch.ones(1, 1, dtype=DTYPE)]  # built backwards: right[k] = Gram after core k
    for core in reversed(cores[1:]):
        right.append(torch.einsum("aib,bd,cid->ac", core, right[-1], core))
    right.reverse()
    out = {}
    for n in modes:
        core = cores[n]
        x = core.permute(1, 0, 2).reshape(core.shape[1], -1)
        out[n] = (x, torch.kron(_psd_sqrt((left[n] + left[n].T) / 2), _psd_sqrt((right[n] + right[n].T) / 2)))
    return out


def _tt_pairs(tensor: TensorTrain, names: list[str], modes: list[str]) -> dict[str, Pair]:
    pairs = tt_pairs([tensor.cores[m] for m in names], [names.index(m) for m in modes])
    return {m: pairs[names.index(m)] for m in modes}


PAIRS = {Tucker: _tucker_pairs, CP: _cp_pairs, TensorTrain: _tt_pairs}  # exact (U, M) per mode, by type


def tensor_pairs(tensor, modes: Sequence[str] | None = None) -> dict[str, Pair]:
    """``{mode: (U, M)}`` of a ``Tucker``, ``CP`` or ``TensorTrain`` module, never reconstructed."""
    names = list(tensor.mode_names)
    modes = names if modes is None else list(modes)
    for mode in modes:
        if mode not in names:
            raise ValueError(f"mode {mode!r} not in the tensor's modes {', '.join(names)}")
    build = PAIRS.get(type(tensor))
    if build is None:
        raise ValueError(f"no exact spectra for a {type(tensor).__name__}; "
                         f"supported: {', '.join(t.__name__ for t in PAIRS)}")
    return build(tensor, names, modes)


def tensor_pair(tensor, mode: str) -> Pair:
    """The ``(U, M)`` pair of one mode of a ``Tucker``/``CP``/``TensorTrain`` module."""
    return tensor_pairs(tensor, [mode])[mode]


def singular_values_of_pairs(pairs: Sequence[Pair]) -> torch.Tensor:
    """Singular values (descending, float64) of ``[U^1 M^1 X^1, U^2 M^2 X^2, ...]`` for orthonormal ``X``.

    Every ``U^t`` has the same number of rows ``d``; length ``min(d, sum r_t, sum cols_t)``."""
    if not pairs:
        raise ValueError("no tensors to take a spectrum of")
    rows = {u.shape[0] for u, _ in pairs}
    if len(rows) != 1:
        raise ValueError(f"cannot stack unfoldings with different mode sizes {sorted(rows)}")
    r = _r_factor(torch.cat([u for u, _ in pairs], dim=1))  # (min(d, sum r), sum r)
    if sum(m.shape[1] for _, m in pairs) <= 2 * r.shape[0]:
        return torch.linalg.svdvals(r @ torch.block_diag(*[m for _, m in pairs]))
    # wide: through the (sum r x sum r) Gram; float64 keeps s_i to ~1e-8 * s_1
    gram = r @ torch.block_diag(*[m @ m.T for _, m in pairs]) @ r.T
    return gram_singular_values((gram + gram.T) / 2)


def mode_singular_values(tensors, mode: str) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding of one tensor, or of several stacked."""
    tensors = [tensors] if hasattr(tensors, "mode_names") else list(tensors)
    return singular_values_of_pairs([tensor_pairs(t, [mode])[mode] for t in tensors])


def lora_pairs(a: torch.Tensor, b: torch.Tensor) -> dict[str, Pair]:
    """``{"input": pair, "output": pair}`` for ``dW = B A`` (``A: (r, d_in)``, ``B: (d_out, r)``).

    The update as a ``(d_in, d_out)`` tensor (TensLoRA's orientation): input unfolding
    ``dW^T = A^T R_B^T Q_B^T`` (``B = Q_B R_B``), output unfolding ``dW = B R_A'^T Q_A'^T`` (``A^T = Q_A' R_A'``)."""
    a, b = a.detach().to("cpu", DTYPE), b.detach().to("cpu", DTYPE)
    return {"input": (a.T, _r_factor(b).T), "output": (b, _r_factor(a.T).T)}


def stacked_gram(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Gram ``<dW_i, dW_j>`` (Frobenius) of matrices ``dW_i = B_i A_i`` given as ``(A_i, B_i)``: ``(n, n)``.

    ``<B_i A_i, B_j A_j> = tr((B_i^T B_j)(A_j A_i^T))``: only ``r x r`` products."""
    a = [x.detach().to("cpu", DTYPE) for x, _ in pairs]
    b = [y.detach().to("cpu", DTYPE) for _, y in pairs]
    n = len(pairs)
    gram = torch.empty(n, n, dtype=DTYPE)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = ((b[i].T @ b[j]) * (a[i] @ a[j].T)).sum()
    return gram


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a matrix from its Gram ``X X^T``."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def spectrum_metrics(s: torch.Tensor) -> dict[str, float]:
    """From singular values ``s``: ``p_i = s_i^2 / sum s^2``; ``entropy = -sum p ln p``,
    ``top1_energy = p_1``, ``effective_rank = exp(entropy)``, ``max_rank = len(s)``,
    ``norm = sqrt(sum s^2)``. An all-zero spectrum gives NaN for the first three."""
    s = s.detach().to(DTYPE)
    energy = (s * s).sum()
    out = {"max_rank": float(s.numel()), "norm": float(energy.sqrt())}
    if not energy > 0:
        return {"entropy": math.nan, "top1_energy": math.nan, "effective_rank": math.nan, **out}
    p = (s * s) / energy
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"entropy": entropy, "top1_energy": float(p.max()), "effective_rank": math.exp(entropy), **out}


def grad_norm(params: Sequence[torch.Tensor]) -> float:
    """``sqrt(sum ||grad||^2)`` over ``params`` (missing gradients count as zero)."""
    squares = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32 if p.grad.device.type == "mps"
                                        else DTYPE) ** 2 for p in params if p.grad is not None]
    if not squares:
        return 0.0
    try:
        total = torch.stack(squares).sum()  # one device sync
    except RuntimeError:  # parameters on several devices
        total = sum(q.to("cpu", DTYPE) for q in squares)
    return float(total.sqrt())


def tensors_spectra(tensors: Mapping[str, object], modes: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{mode: singular values}`` of the tensors in ``tensors`` stacked (modes missing from some
    tensor or of differing sizes across tensors are left out)."""
    items = list(tensors.values())
    modes = modes or [m for m in items[0].mode_names if all(m in t.mode_names for t in items)]
    pairs = [tensor_pairs(t, modes) for t in items]
    out = {}
    for mode in modes:
        sizes = {t.shape[t.mode_names.index(mode)] for t in items}
        if len(sizes) == 1:
            out[mode] = singular_values_of_pairs([p[mode] for p in pairs])
    return out
