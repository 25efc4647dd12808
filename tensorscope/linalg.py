"""Cached matricizations and factorizations of layer weights, and the numerics methods share.

Everything expensive about a layer (its SVD, the eigendecompositions of its unfoldings'
Gram matrices, its whitened SVD) is computed once per distinct weight and kept in
:data:`factor_cache` (or in the statistics' own memo); any rank is then a truncation.
Weights are viewed per group: ``(g, O/g, I/g*kh*kw)``.

This module sits below ``methods/``: it imports nothing from it, so every method, the
spectra and the planner can share one copy of each numerical building block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ._cache import factor_cache, finite_memo, fingerprint
from .errors import NonFiniteWeightError

#: the two unfoldings a spectrum can be taken of: output channels x the rest, input channels x the rest
UNFOLDINGS = ("out", "in")


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def check_finite(layer: nn.Module, name: str = "") -> None:
    """Refuse NaN/Inf weights before any factorization (LAPACK can hang on them).

    Memoised per parameter while it is unchanged: the explorer asks on every slider move.
    """
    for pname, p in layer.named_parameters(recurse=False):
        if not finite_memo.get(p, _all_finite):
            bad = int((~torch.isfinite(p)).sum())
            where = f"layer {name!r} " if name else ""
            raise NonFiniteWeightError(
                f"{where}{pname} holds {bad} NaN/Inf value(s) of {p.numel()}; "
                "factorizing it would fail or produce garbage. Fix the checkpoint (or the "
                "training run that produced it) before compressing."
            )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorize in float64 for float64 weights, float32 otherwise (half types lack LAPACK)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def thin_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(mat, full_matrices=False)`` (batched), through a QR first when the
    matrices are far from square.

    LAPACK's SVD of a long thin matrix is several times slower than a QR of it followed by
    the SVD of the small triangular factor (measured 3.7-4.4x on 512 x 4608 and 1536 x 13824,
    and 3-4x on the 64 x 262144 first TT unfolding of a 4096 x 4096 weight, MKL on 2 cores);
    the result is the same up to float error.
    """
    m, n = mat.shape[-2:]
    if m >= 2 * n:
        q, r = torch.linalg.qr(mat)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    if n >= 2 * m:
        q, r = torch.linalg.qr(mat.transpose(-1, -2))  # mat = r^T q^T = vh^T s (q u)^T
        u, s, vh = torch.linalg.svd(r)
        return vh.transpose(-1, -2), s, (q @ u).transpose(-1, -2)
    return torch.linalg.svd(mat, full_matrices=False)


def svd(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the per-group matrix ``(O/g) x (I/g*kh*kw)``: U (g,o,k), S (g,k), Vh (g,k,n)."""

    def compute():
        check_finite(layer)
        w = grouped_weight(layer)
        return thin_svd(w.reshape(w.shape[0], w.shape[1], -1))

    return factor_cache.get(_key(layer, "svd"), compute)


def singular_values(layer: nn.Module) -> torch.Tensor:
    """The singular values of :func:`svd`'s matrix (g, k), without keeping its vectors.

    Spectra need only the values: computing (and caching) U and Vh for every layer would
    hold another copy of the model in memory. Read from the full SVD when it is cached.
    """
    full = factor_cache.peek(_key(layer, "svd"))
    if full is not None:
        return full[1]

    def compute():
        check_finite(layer)
        w = grouped_weight(layer)
        return torch.linalg.svdvals(w.reshape(w.shape[0], w.shape[1], -1))

    return factor_cache.get(_key(layer, "sv"), compute)


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
        # the Gram eigendecomposition in float64 even where ``svd``'s U would do: it is ~10x
        # cheaper than a full SVD with vectors, and orthonormal to float64 precision, which
        # the energies of near-full-rank truncations need (float32 vectors err by ~1e-4)
        w = grouped_weight(layer)  # (g, o, i, kh, kw)
        if mode == 1:
            w = w.transpose(1, 2)
        m = w.reshape(w.shape[0], w.shape[1], -1)
        return gram_eig(m)

    return factor_cache.get(_key(layer, f"eig{mode}"), compute)


def hosvd_core(layer: nn.Module) -> torch.Tensor:
    """The full Tucker-2 core ``U_out^T W U_in`` per group ``(g, o, i, kh, kw)``, float64.

    Every HOSVD truncation at ranks ``(a, b)`` has the core ``core[:, :a, :b]``: the live
    preview slices it instead of contracting the weight again, and the energy table of all
    rank pairs is its 2-D cumulative sum.
    """

    def compute():
        w = grouped_weight(layer).to(torch.float64)
        u_out = mode_eig(layer, 0)[1]
        u_in = mode_eig(layer, 1)[1]
        return torch.einsum("goikl,goa,gib->gabkl", w, u_out, u_in)

    return factor_cache.get(_key(layer, "hosvd-core"), compute)


# ---- spectra of the two unfoldings, plain or whitened by input statistics -----------------


def grouped_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as ``(g, O/g, I/g*kh*kw)`` in float64."""
    w = grouped_weight(layer).to(torch.float64)
    return w.reshape(w.shape[0], w.shape[1], -1)


def ridge_refit(w: torch.Tensor, hat: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """The weight that maps inputs of second moment ``hat`` (``E[x^ x^T]``, per group) to the
    outputs ``w`` gives the inputs of cross moment ``cross`` (``E[x x^T]``):
    ``A = W (X + l I)(C^ + l I)^{-1}``, ``l = ridge * tr(C^)/n`` per group (sequential
    correction: :mod:`tensorscope.correction`). ``w`` is ``(g, o, n)``."""
    lam = ridge * torch.diagonal(hat, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # (g,)
    reg = hat.clone()
    reg.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    rhs = cross.clone()
    rhs.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    return torch.linalg.solve(reg, (w @ rhs).transpose(-1, -2)).transpose(-1, -2)  # A reg = W rhs (reg symmetric)


def whitened_svd(layer: nn.Module, stats: Any):
    """SVD of ``W L`` per group (``L L^T`` the ridged input moment of ``stats``), returned as
    ``(U, S, V^T L^{-1})`` so that truncations map back to the layer's own inputs.

    Memoised in the statistics object, keyed by the weight's content.
    """
    key = ("svd", fingerprint(layer.weight), stats.ridge)
    if key not in stats._memo:
        L = stats.whitener("patch")
        m = grouped_matrix(layer) @ L
        u, s, vh = gram_svd(m)
        # vh @ L^{-1}: solve L^T X^T = vh^T
        back = torch.linalg.solve_triangular(L.transpose(-1, -2), vh.transpose(-1, -2), upper=True).transpose(-1, -2)
        stats._memo[key] = (u, s, back)
    return stats._memo[key]


def gram_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``m`` (batched, float64) from the eigendecomposition of its
    smaller Gram matrix: 2-4x faster than LAPACK's SVD on the planner's wide matrices.

    The leading vectors (what truncations keep) are as accurate as the SVD's; those of
    singular values near ``sqrt(eps) * S[0]`` are not, but ``U diag(S) Vh`` still equals
    ``m`` to float precision (the other side is ``U^T m / S``), so every truncation's error
    computed from these factors is the error of the factors built.
    """
    m = m.to(torch.float64)
    o, n = m.shape[-2:]
    if o <= n:
        vals, u = gram_eig(m)
        s = vals.sqrt()
        vh = (u.transpose(-1, -2) @ m) / torch.where(s > 0, s, torch.ones_like(s))[..., None]
        return u, s, vh
    vals, v = gram_eig(m.transpose(-1, -2))
    s = vals.sqrt()
    u = (m @ v) / torch.where(s > 0, s, torch.ones_like(s))[..., None, :]
    return u, s, v.transpose(-1, -2)


def weighted_svd(layer: nn.Module, stats: Any, fisher: float | None = None):
    """:func:`whitened_svd`, and with ``fisher`` also weighted on the output side: the SVD of
    ``R^T W L`` with ``R R^T`` the layer's output-gradient moment shrunk by ``fisher``
    (``stats.output_whitener``), returned as ``(R^{-T} U, S, V^T L^{-1})``.

    Truncating it minimises ``tr(G (W - W_r) C (W - W_r)^T)``, the Kronecker-factored
    (K-FAC) estimate of what the network's output loss gains from the layer's error, where
    the whitened SVD minimises the layer's own output error (``G = I``). ``fisher = 1``
    weighs every output alike (up to scale): the whitened SVD.
    """
    if fisher is None or getattr(stats, "grad", None) is None:
        return whitened_svd(layer, stats)
    key = ("svd2", fingerprint(layer.weight), stats.ridge, float(fisher))
    if key not in stats._memo:
        L = stats.whitener("patch")
        R = stats.output_whitener(float(fisher))
        m = R.transpose(-1, -2) @ grouped_matrix(layer) @ L
        u, s, vh = gram_svd(m)
        front = torch.linalg.solve_triangular(R.transpose(-1, -2), u, upper=True)  # R^{-T} U
        back = torch.linalg.solve_triangular(L.transpose(-1, -2), vh.transpose(-1, -2), upper=True).transpose(-1, -2)
        stats._memo[key] = (front, s, back)
    return stats._memo[key]


def truncation_losses(front: torch.Tensor, s: torch.Tensor, back: torch.Tensor, c: torch.Tensor,
                      g: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """``tr(G (W - W_r) C (W - W_r)^T)`` summed over groups for every rank ``r = 1..k``, and the
    same for ``W`` itself (``r = 0``), from a complete factorization ``W = front diag(s) back``.

    ``front`` ``(g, o, k)``, ``s`` ``(g, k)``, ``back`` ``(g, k, n)`` with ``k = min(o, n)``
    (what :func:`weighted_svd` returns, fitted on any statistics); ``c`` ``(g, n, n)`` and
    ``g`` ``(g, o, o)`` the moments of the data to score on (``g=None``: the identity).
    With ``P_ij = (a_i^T G a_j)(b_i^T C b_j)`` for the columns ``a_i`` of ``front`` and the
    rows ``b_i`` of ``diag(s) back``, the loss at rank ``r`` is the sum of ``P`` outside its
    leading ``r x r`` block: one ``k x k`` matrix prices every rank, without forming ``W_r``.
    """
    bs = s[..., None] * back  # (g, k, n)
    cb = c @ bs.transpose(-1, -2)  # (g, n, k)
    ga = front if g is None else g @ front  # (g, o, k)
    pm = (front.transpose(-1, -2) @ ga) * (bs @ cb)  # (g, k, k)
    pm = pm.sum(0)  # the groups' losses add up
    total = float(pm.sum())
    rows = pm.sum(-1)
    inner = torch.diagonal(pm) + 2 * torch.tril(pm, -1).sum(-1)
    err = total - 2 * torch.cumsum(rows, 0) + torch.cumsum(inner, 0)
    return np.clip(err.numpy(), 0.0, None), max(total, 0.0)


def unfolding_values(layer: nn.Module, unfolding: str = "out", stats: Any = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Singular values ``(g, k)`` of one unfolding per group, and that unfolding's ``(rows, cols)``.

    ``out`` is ``O/g x I/g*kh*kw`` (what ``svd`` truncates), ``in`` is ``I/g x O/g*kh*kw``
    (Tucker-2's input mode). With ``stats``, the values a data-aware truncation cuts: of
    ``W L`` (out), or of the kernel with its input mode whitened by the channel moment (in).
    """
    if unfolding not in UNFOLDINGS:
        raise ValueError(f"unfolding must be one of {UNFOLDINGS}; got {unfolding!r}")
    w = grouped_weight(layer)
    g, o, i = w.shape[:3]
    khw = w.shape[3] * w.shape[4]
    if stats is not None:
        if unfolding == "out":
            _, s, _ = whitened_svd(layer, stats)
            return s.numpy(), (o, i * khw)
        L = stats.whitener("channel")
        m = torch.einsum("goikl,gij->gjokl", w.to(torch.float64), L).reshape(g, i, -1)
        vals, _ = gram_eig(m)
        return vals[:, : min(m.shape[1], m.shape[2])].sqrt().numpy(), (m.shape[1], m.shape[2])
    if unfolding == "out":
        return singular_values(layer).double().numpy(), (o, i * khw)
    vals, _ = mode_eig(layer, 1)
    # the Gram of a tall unfolding (i > o*kh*kw) has i eigenvalues, only o*kh*kw of them nonzero
    return vals[:, : min(i, o * khw)].sqrt().numpy(), (i, o * khw)


def refit_output(layer: nn.Module, stats: Any, inner: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The output factor ``A`` minimising the calibration output error of ``W ~ A @ inner``.

    ``inner`` is ``(g, r, n)``: what the stages before a factorized layer's last 1x1 conv
    compute, as a matrix on input patches (Tucker-2: core times input projection; CP: the
    rank-one spatial-and-input filters). Minimising ``||(W - A inner) L||_F`` with ``L L^T``
    the (ridged) patch moment is linear least squares in ``A``: the "data reconstruction"
    refinement of the last factor (Su et al.). Returns ``A`` ``(g, o, r)`` and the relative
    output error reached. Exact at full rank whenever ``W`` lies in the row space of ``inner``.
    """
    w = grouped_matrix(layer)  # (g, o, n) float64
    L = stats.whitener("patch")  # (g, n, n)
    wl = w @ L
    bl = inner.to(torch.float64) @ L  # (g, r, n)
    a = torch.linalg.lstsq(bl.transpose(1, 2), wl.transpose(1, 2)).solution.transpose(1, 2)  # (g, o, r)
    den = float(wl.norm())
    err = float((wl - a @ bl).norm()) / den if den > 0 else 0.0
    return a, err
