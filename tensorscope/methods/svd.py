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

from typing import Any, Mapping

import torch
from torch import nn

from .. import linalg
from ..layers import FactorizedLayer
from .base import Factors, LayerGeometry, Method, check_finite, register_method, resolve_int_rank


@register_method
class SVD(Method):
    name = "svd"
    kinds = ("linear", "conv2d")
    description = "truncated SVD: two layers, rank r"

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

    def factorize(self, layer: nn.Module, rank: int, options=None, *, stats=None, refine=True) -> Factors:
        check_finite(layer)
        if stats is not None:
            from ..calibration import whitened_svd

            u, s, vh = whitened_svd(layer, stats)
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
