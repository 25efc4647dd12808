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

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import linalg
from ..layers import CHAIN, FactorizedLayer
from .base import (
    Factors,
    LayerGeometry,
    Method,
    Option,
    RankAxis,
    Tradeoff,
    check_finite,
    per_sample_flops,
    resolve_int_rank,
)
from .registry import register_method


def _options(options) -> tuple[float, float | None]:
    o = dict(options or {})
    return float(o.get("shrinkage", 0.0)), (None if o.get("fisher") is None else float(o["fisher"]))


def _factors_for(layer: nn.Module, stats, options):
    """``(front, s, back)`` with ``W = front diag(s) back``, fitted on ``stats`` with ``options``."""
    shrink, fisher = _options(options)
    st = stats.shrunk(shrink) if shrink else stats
    return linalg.weighted_svd(layer, st, fisher)


def heldout_svd_losses(layer: nn.Module, fit, check, options=None, output: bool = False) -> tuple[np.ndarray, float]:
    """Squared error at every rank on ``check``'s data of the factors fitted on ``fit``'s.

    ``output=False``: the layer's output error ``||(W - W_r) L||_F^2`` (``L L^T`` the mean
    input moment of ``check``). ``output=True``: ``1/2 rows/samples tr(G (W - W_r) C (W -
    W_r)^T)`` with ``G`` the mean output-gradient moment of ``check``, the K-FAC estimate of
    the network's output loss per sample. Returns the curve and the same for ``W_r = 0``.

    The in-sample error of a whitened truncation (the tail of the whitened spectrum) is
    optimistic when the calibration set is small next to the layer's width: it fits those
    inputs and generalises worse. Scoring ranks on data the factors were not fitted to is
    what lets a budget planner see which layers really suffer.
    """
    front, s, back = _factors_for(layer, fit, options)
    c = check.ridged_moment("patch")
    g = None
    scale = 1.0
    if output:
        g = check.grad_moment()
        if g is None:
            raise ValueError("output losses need statistics gathered with gradients=True")
        scale = 0.5 * check.count / max(check.samples, 1)
    err, total = linalg.truncation_losses(front, s, back, c, g)
    return err * scale, total * scale


def heldout_svd_errors(layer: nn.Module, fit, check) -> np.ndarray:
    """Relative output error on ``check``'s data of the whitened SVD fitted on ``fit``'s, at every rank."""
    err, total = heldout_svd_losses(layer, fit, check)
    return np.sqrt(err / total) if total > 0 else np.zeros_like(err)


def _tail_errors(grouped: np.ndarray) -> np.ndarray:
    """Relative error of the truncation at ranks 1..k of a ``(g, k)`` spectrum (Eckart-Young)."""
    sq = (grouped.astype(np.float64) ** 2).sum(axis=0)
    total = float(sq.sum())
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1][1:], [0.0]])
    return np.sqrt(np.clip(tail / total, 0, None)) if total > 0 else np.zeros_like(tail)


class SVDLayer(FactorizedLayer):
    """The two-layer SVD chain; besides ``"chain"`` it runs as ``"dense"``: the product of its
    two factors formed on each call and applied as one layer (cheaper where the chain's rank-r
    intermediate costs more memory traffic than it saves arithmetic: large feature maps, thin
    ranks). Same parameters, same function."""

    executions = (CHAIN, "dense")

    def available_executions(self) -> tuple[str, ...]:
        _, (a, _b) = self.leading(2)
        return self.executions if getattr(a, "groups", 1) == 1 else (CHAIN,)

    def run(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode != "dense":
            return super().run(x, mode)
        lead, (a, b) = self.leading(2)
        for m in lead:
            x = m(x)
        if isinstance(a, nn.Linear):
            return nn.functional.linear(x, b.weight @ a.weight, b.bias)
        w = torch.einsum("or,rikl->oikl", b.weight[:, :, 0, 0], a.weight)
        return a._conv_forward(x, w, b.bias)


@register_method
class SVD(Method):
    name = "svd"
    kinds = ("linear", "conv2d")
    description = "truncated SVD: two layers, rank r"
    error_curve = True
    cheap_error_is_exact = True
    uses_data = True
    option_specs = {
        "shrinkage": Option("float", 0.0, 1.0, "with data: shrink the input moment toward a multiple of the identity "
                            "(0: whitened SVD, 1: plain SVD)"),
        "fisher": Option("float", 0.0, 1.0, "with data gathered with gradients: weigh outputs by the output-gradient "
                         "moment shrunk by this much (K-FAC; 1: every output alike)"),
        "execute": Option("choice", help="how the chain runs: 'chain' (two layers) or 'dense' (their product "
                          "formed on each call; same parameters); tensorscope.tune_execution measures and sets it",
                          choices=SVDLayer.executions),
    }

    def data_variants(self, geom: LayerGeometry, output: bool = False) -> list[dict]:
        """Whitened, shrunk and plain factors (and with gradients, output-weighted ones)."""
        if not output:  # plain factors cost nothing more (their whitener is a multiple of I)
            return [{"shrinkage": 0.0}, {"shrinkage": 1.0}]
        return [{"shrinkage": 0.0, "fisher": 0.1}, {"shrinkage": 1.0, "fisher": 0.1}]

    def needs_gradients(self, options=None) -> bool:
        return (options or {}).get("fisher") is not None

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
        """The two layers of the chain; with ``execute: "dense"`` (ungrouped layers only, as
        :class:`SVDLayer` runs it) forming their ``(out, r) x (r, in*kh*kw)`` product once per
        call, shared by the call's samples (:func:`~tensorscope.methods.base.per_sample_flops`),
        plus the dense layer."""
        pos = geom.positions
        if pos is None:
            return None
        if (options or {}).get("execute") == "dense" and geom.groups == 1:
            form = 2 * geom.out_features * rank * geom.in_features * geom.khw
            return per_sample_flops(geom, form, geom.dense_flops)
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
        shrink, fisher = _options(options)
        if stats is not None and (shrink or fisher is not None):
            # shrunk or output-weighted factors: their output error on the data, measured
            err, total = heldout_svd_losses(layer, stats, stats, options)
            return float(np.sqrt(err[int(rank) - 1] / total)) if total > 0 else 0.0
        grouped, _ = linalg.unfolding_values(layer, "out", stats)
        return float(_tail_errors(grouped)[int(rank) - 1])

    def heldout_errors(self, layer: nn.Module, fit, check) -> np.ndarray:
        return heldout_svd_errors(layer, fit, check)

    def heldout_losses(self, layer: nn.Module, fit, check, options=None, *, output: bool = False):
        return heldout_svd_losses(layer, fit, check, options, output)

    def correct(self, layer: nn.Module, chain: nn.Module, fit, cross, *, options=None, ridge: float = 0.1):
        """Reduced-rank ridge regression onto the compressed network's inputs (see
        :mod:`tensorscope.correction`): ``A = W (X + l I)(C^ + l I)^{-1}``, then this method's
        factors of ``A`` in the metric of ``C^ + l I`` (``fit`` shrunk by ``l / (1 + l)``, the
        same up to scale, on top of the plan entry's own shrinkage) and the layer's output
        weighting, at the chain's rank."""
        import copy

        rows = fit.count
        if rows <= 0 or not math.isfinite(ridge):
            return None
        a = linalg.ridge_refit(linalg.grouped_matrix(layer), fit.patch / rows, cross / rows, ridge)
        fake = copy.deepcopy(layer)
        fake.weight.data = a.reshape(layer.weight.shape).to(layer.weight.dtype)
        opts = dict(options or {})
        # the ridge above is a shrinkage of l / (1 + l), on top of the one the plan chose
        # (plain factors chosen on held-out data stay plain): 1 - (1 - a_plan)(1 - a_ridge)
        planned = float(opts.get("shrinkage", 0.0))
        opts["shrinkage"] = 1.0 - (1.0 - planned) / (1.0 + ridge)
        factors = self.factorize(fake, int(chain.rank), opts, stats=fit)
        return self.build(layer, factors)

    def factorize(self, layer: nn.Module, rank: int, options=None, *, stats=None, refine=True) -> Factors:
        check_finite(layer)
        if stats is not None:
            u, s, vh = _factors_for(layer, stats, options)
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
        return SVDLayer(a, b, method="svd", rank=r, source=type(layer).__name__)
