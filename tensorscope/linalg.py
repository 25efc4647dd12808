"""Cached matricizations and factorizations of layer weights.

Everything expensive about a layer (its SVD, the eigendecompositions of its unfoldings'
Gram matrices) is computed once per distinct weight and kept in :data:`factor_cache`;
any rank is then a truncation. Weights are viewed per group: ``(g, O/g, I/g*kh*kw)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._cache import factor_cache, fingerprint
from .methods.base import check_finite, compute_dtype


def groups_of(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1) if isinstance(layer, nn.Conv2d) else 1


def grouped_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as ``(g, O/g, I/g, kh, kw)`` in the compute dtype (Linear: kh = kw = 1)."""
    w = layer.weight.detach()
    w = w.to(compute_dtype(w.dtype))
    if w.dim() == 2:
        w = w[:, :, None, None]
    g = groups_of(layer)
    o = w.shape[0]
    return w.reshape(g, o // g, *w.shape[1:])


def _key(layer: nn.Module, what: str):
    return (fingerprint(layer.weight), groups_of(layer), what)


def svd(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the per-group matrix ``(O/g) x (I/g*kh*kw)``: U (g,o,k), S (g,k), Vh (g,k,n)."""

    def compute():
        check_finite(layer)
        w = grouped_weight(layer)
        m = w.reshape(w.shape[0], w.shape[1], -1)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u, s, vh

    return factor_cache.get(_key(layer, "svd"), compute)


def gram_eig(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of ``m @ m^T`` (batched), largest first, in float64.

    The eigenvalues are the squared singular values of ``m`` and the eigenvectors its left
    singular vectors; for a wide ``m`` this is much cheaper than its SVD.
    """
    m64 = m.to(torch.float64)
    vals, vecs = torch.linalg.eigh(m64 @ m64.transpose(-1, -2))
    vals = vals.flip(-1).clamp_min(0.0)
    vecs = vecs.flip(-1)
    return vals, vecs


def mode_eig(layer: nn.Module, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular structure of the output (mode 0) or input (mode 1) unfolding, per group.

    Returns eigenvalues ``(g, n)`` (squared singular values, descending) and eigenvectors
    ``(g, n, n)`` in float64. This is the HOSVD that Tucker-2 truncates.
    """
    if mode not in (0, 1):
        raise ValueError("mode must be 0 (output channels) or 1 (input channels)")

    def compute():
        check_finite(layer)
        w = grouped_weight(layer)  # (g, o, i, kh, kw)
        if mode == 0 and w.shape[1] <= w.shape[2] * w.shape[3] * w.shape[4]:
            # the output unfolding is the matrix ``svd`` factorizes: reuse its (cached) SVD,
            # whose U is square here, instead of a second decomposition
            u, s, _ = svd(layer)
            # U comes in the weight's precision: re-orthonormalise it in float64 (QR, signs
            # kept), or energies of near-full-rank truncations carry float32 error (~1e-4)
            q, r = torch.linalg.qr(u.to(torch.float64))
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).where(
                torch.diagonal(r, dim1=-2, dim2=-1) != 0, torch.ones((), dtype=torch.float64))[..., None, :]
            return s.to(torch.float64).pow(2), q
        if mode == 1:
            w = w.transpose(1, 2)
        m = w.reshape(w.shape[0], w.shape[1], -1)
        return gram_eig(m)

    return factor_cache.get(_key(layer, f"eig{mode}"), compute)
