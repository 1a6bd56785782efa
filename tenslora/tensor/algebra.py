"""Mode-n tensor algebra (tensorly's vocabulary, in torch).

Unfolding convention: ``unfold(T, n)`` has shape ``(T.shape[n], prod(other dims))`` with the
remaining modes in their original order (C order), and ``fold`` is its inverse.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(d_mode, prod(d_other))``."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape``."""
    moved = [shape[mode]] + [d for i, d in enumerate(shape) if i != mode]
    return torch.movedim(matrix.reshape(moved), 0, mode)


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n product ``tensor x_mode matrix``: ``matrix (J, d_mode)`` replaces ``d_mode`` by ``J``."""
    out = torch.tensordot(matrix, tensor, dims=([1], [mode]))  # (J, other modes...)
    return torch.movedim(out, 0, mode)


def stacked_mode_dot(tensor: torch.Tensor, matrices: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n product of every member of a stack, in one batched matmul: ``tensor (G, ...)``,
    ``matrices (G, J, d_mode)``; ``mode`` counts within a member (dim ``mode + 1`` of ``tensor``)."""
    moved = torch.movedim(tensor, mode + 1, -1)  # (G, ..., d_mode)
    out = torch.bmm(moved.reshape(moved.shape[0], -1, moved.shape[-1]), matrices.transpose(1, 2))
    return torch.movedim(out.reshape(*moved.shape[:-1], matrices.shape[1]), -1, mode + 1)


def multi_mode_dot(tensor: torch.Tensor, matrices: Sequence[torch.Tensor | None],
                   modes: Sequence[int] | None = None) -> torch.Tensor:
    """Successive mode products; ``None`` entries leave their mode untouched."""
    modes = range(len(matrices)) if modes is None else modes
    for matrix, mode in zip(matrices, modes):
        if matrix is not None:
            tensor = mode_dot(tensor, matrix, mode)
    return tensor


def khatri_rao(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product of ``(..., d_i, R)`` matrices: ``(..., prod d_i, R)``, first index
    major; leading dims (a stack) are batched."""
    out = matrices[0]
    for matrix in matrices[1:]:
        out = (out[..., :, None, :] * matrix[..., None, :, :]).reshape(*out.shape[:-2], -1, out.shape[-1])
    return out
