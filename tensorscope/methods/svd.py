"""Truncated SVD of a Linear weight, or of a conv weight matricized as out x (in*kh*kw).

Linear -> Linear(in->r, no bias), Linear(r->out, bias). Conv2d -> Conv(in->r, kh x kw, with
the layer's stride/padding/dilation) then Conv 1x1 (r->out, bias) (Zhang et al. 2015).
Grouped convs are decomposed per group (rank r per group) with grouped convs.

By Eckart-Young the truncation is the best rank-r approximation in Frobenius norm, and its
relative error is exactly the tail of the singular values. With activation statistics the
SVD is of the whitened weight, which is optimal for the layer's output error instead.

References
----------
Eckart and Young, 1936. Denton et al., "Exploiting linear structure within convolutional
networks for efficient evaluation", NeurIPS 2014. Zhang et al., "Accelerating very deep
convolutional networks for classification and detection", TPAMI 2015.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .. import linalg
from ..layers import FactorizedLayer
from .base import Factors, LayerGeometry, Method, RankAxis, Tradeoff, check_finite, resolve_int_rank
from .registry import register_method


def heldout_svd_errors(layer: nn.Module, fit, check) -> np.ndarray:
    """Relative output error on ``check``'s data of the whitened SVD fitted on ``fit``'s, at every rank.

    The in-sample error of a whitened truncation (the tail of the whitened spectrum) is
    optimistic when the calibration set is small next to the layer's width: it fits those
    inputs and generalises worse. Scoring ranks on data the factors were not fitted to is
    what lets a budget planner see which layers really suffer. With ``W_r = U_r S_r B_r`` the
    factors from ``fit`` and ``L`` the whitener of ``check``, the orthonormal ``U`` makes the
    squared error a cumulative sum over ranks, so all ranks cost one pass.
    """
    u, s, back = linalg.whitened_svd(layer, fit)  # (g, o, k), (g, k), (g, k, n)
    L = check.whitener("patch")
    wl = linalg.grouped_matrix(layer) @ L  # (g, o, n)
    z = back @ L  # (g, k, n)
    total = float((wl ** 2).sum())
    if total <= 0:
        return np.zeros(s.shape[1])
    cross = (torch.einsum("gok,gon,gkn->gk", u, wl, z) * s).sum(0)
    sq = ((s ** 2) * (z ** 2).sum(-1)).sum(0)
    err2 = total - 2 * torch.cumsum(cross, 0) + torch.cumsum(sq, 0)
    return np.sqrt(np.clip(err2.numpy() / total, 0.0, None))


def _tail_errors(grouped: np.ndarray) -> np.ndarray:
    """Relative error of the truncation at ranks 1..k of a ``(g, k)`` spectrum (Eckart-Young)."""
    sq = (grouped.astype(np.float64) ** 2).sum(axis=0)
    total = float(sq.sum())
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1][1:], [0.0]])
    return np.sqrt(np.clip(tail / total, 0, None)) if total > 0 else np.zeros_like(tail)


@register_method
class SVD(Method):
    name = "svd"
    kinds = ("linear", "conv2d")
    description = "truncated SVD: two layers, rank r"
    error_curve = True
    cheap_error_is_exact = True
    uses_data = True

    def rank_axes(self, geom: LayerGeometry, options=None) -> tuple[RankAxis, ...]:
        mx = self.max_rank(geom)
        return (RankAxis("rank", "rank", 1, mx, max(1, mx // 4), unfolding="out", truncates=True,
                         help="singular values kept (per group): the width of the layer between the two factors"),)

    def max_rank(self, geom: LayerGeometry, options=None) -> int:
        g = geom.groups
        return min(geom.out_features // g, geom.in_features // g * geom.khw)

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options=None) -> int:
        if isinstance(rank, (list, tuple)) and len(rank) == 1:
            rank = rank[0]
        return resolve_int_rank("svd", geom, rank, self.max_rank(geom))

    def count_params(self, geom: LayerGeometry, rank: int, options=None) -> int:
        return rank * (geom.in_features * geom.khw + geom.out_features) + (geom.out_features if geom.bias else 0)

    def count_flops(self, geom: LayerGeometry, rank: int, options=None) -> int | None:
        pos = geom.positions
        if pos is None:
            return None
        return 2 * pos * rank * (geom.in_features * geom.khw + geom.out_features)

    def tradeoff(self, layer: nn.Module, geom: LayerGeometry | None = None, stats=None, name: str = "") -> Tradeoff:
        """Every rank's error from one spectrum: the Eckart-Young tail (with data, of ``W L``)."""
        geom = geom or LayerGeometry.of(layer)
        grouped, _ = linalg.unfolding_values(layer, "out", stats)
        errs = _tail_errors(grouped)
        ranks = list(range(1, grouped.shape[1] + 1))
        params = np.array([self.count_params(geom, r) for r in ranks])
        flops = None if geom.dense_flops is None else np.array([self.count_flops(geom, r) for r in ranks])
        return Tradeoff(name, self.name, ranks, params, errs, flops, geom.dense_params, geom.dense_flops)

    def cheap_error(self, layer: nn.Module, rank: int, stats=None, options=None) -> float:
        grouped, _ = linalg.unfolding_values(layer, "out", stats)
        return float(_tail_errors(grouped)[int(rank) - 1])

    def heldout_errors(self, layer: nn.Module, fit, check) -> np.ndarray:
        return heldout_svd_errors(layer, fit, check)

    def factorize(self, layer: nn.Module, rank: int, options=None, *, stats=None, refine=True) -> Factors:
        check_finite(layer)
        if stats is not None:
            u, s, vh = linalg.whitened_svd(layer, stats)
        else:
            u, s, vh = linalg.svd(layer)
        r = rank
        root = s[:, :r].sqrt()
        first = root[:, :, None] * vh[:, :r, :]  # (g, r, n)
        second = u[:, :, :r] * root[:, None, :]  # (g, o, r)
        return Factors("svd", r, {"first": first, "second": second})

    def empty_factors(self, geom: LayerGeometry, rank: int, options=None) -> Factors:
        g = geom.groups
        first = torch.zeros(g, rank, geom.in_features // g * geom.khw)
        second = torch.zeros(g, geom.out_features // g, rank)
        return Factors("svd", rank, {"first": first, "second": second})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        w = factors.tensors["second"] @ factors.tensors["first"]  # (g, o, n)
        return w.reshape(layer.weight.shape).to(layer.weight.dtype)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        first, second = factors.tensors["first"], factors.tensors["second"]
        r = factors.rank
        w = layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            a = nn.Linear(layer.in_features, r, bias=False, **kw)
            b = nn.Linear(r, layer.out_features, bias=bias, **kw)
            a.weight.data.copy_(first[0])
            b.weight.data.copy_(second[0])
        else:
            g = layer.groups
            a = nn.Conv2d(
                layer.in_channels, g * r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=g, bias=False, padding_mode=layer.padding_mode, **kw,
            )
            b = nn.Conv2d(g * r, layer.out_channels, 1, groups=g, bias=bias, **kw)
            a.weight.data.copy_(first.reshape(a.weight.shape))
            b.weight.data.copy_(second.reshape(b.weight.shape))
        if bias:
            b.bias.data.copy_(layer.bias.detach())
        return FactorizedLayer(a, b, method="svd", rank=r, source=type(layer).__name__)
