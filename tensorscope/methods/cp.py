"""CP (canonical polyadic) decomposition of a conv kernel: 1x1, depthwise kx1, depthwise 1xk, 1x1.

``W[o, i, y, x] ~ sum_r A_out[o, r] A_in[i, r] A_h[y, r] A_w[x, r]``. The layer becomes a 1x1
conv from in to R channels, a depthwise kh x 1 conv and a depthwise 1 x kw conv (which
carry the layer's stride, padding and dilation, one spatial axis each), and a 1x1 conv
from R to out with the bias. Factors come from CP-ALS (tensorly's ``parafac`` with the
pytorch backend, SVD initialisation, seeded), balanced so that no factor carries the scale.

"Full rank" for CP is the trivial upper bound on the rank of a 4-way tensor, the product of
its three smallest dimensions; at that rank the factors are written down exactly (no ALS).
CP-ALS can be unstable: it may converge slowly, to a poor local optimum, or produce
components of huge opposite norms that cancel (degeneracy); fine-tuning is usually needed.

References
----------
Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition", ICLR 2015 (arXiv 1412.6553, 2014).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import tensorly as tl
import torch
from torch import nn

from .. import linalg
from ..errors import DecompositionError
from ..layers import FactorizedLayer
from .base import Factors, LayerGeometry, Method, Option, RankAxis, check_finite, resolve_int_rank
from .registry import register_method

DEFAULT_ITERS = 100
PREVIEW_ITERS = 25


def exact_cp(w: torch.Tensor) -> list[torch.Tensor]:
    """An exact CP of a 4-way tensor with rank = product of its three smallest dimensions.

    Every mode but the largest is enumerated by unit vectors; the largest mode's factor holds
    the corresponding fibres of ``w``.
    """
    dims = list(w.shape)
    free = max(range(4), key=lambda k: dims[k])
    others = [k for k in range(4) if k != free]
    rank = math.prod(dims[k] for k in others)
    factors = [None] * 4
    # component r enumerates (j_a, j_b, j_c) over the three other modes in row-major order
    grids = torch.meshgrid(*[torch.arange(dims[k]) for k in others], indexing="ij")
    for k, idx in zip(others, grids):
        f = torch.zeros(dims[k], rank, dtype=w.dtype)
        f[idx.reshape(-1), torch.arange(rank)] = 1.0
        factors[k] = f
    perm = [free] + others
    factors[free] = w.permute(*perm).reshape(dims[free], rank)
    return factors


def balance(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each component's scale evenly over the four factors (better conditioned in fp32)."""
    norms = [f.norm(dim=0) for f in factors]
    scale = weights.abs() * torch.stack(norms).prod(dim=0)
    sign = torch.sign(weights)
    each = scale.clamp_min(0) ** 0.25
    out = []
    for k, (f, n) in enumerate(zip(factors, norms)):
        unit = torch.where(n > 0, f / n.clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(f))
        out.append(unit * each * (sign if k == 0 else 1.0))
    return out


@register_method
class CP(Method):
    name = "cp"
    speed_note = ("CP chains (depthwise kx1 and 1xk convs) ran 1.2-1.4x slower than the dense conv on CPU "
                  "at 4x fewer parameters (docs/benchmarks.md): fewer parameters, not a speed-up")
    kinds = ("conv2d",)
    description = "CP: 1x1, depthwise kx1, depthwise 1xk, 1x1; rank R"
    option_specs = {
        "iters": Option("int", 0, 10_000, f"CP-ALS iterations (default {DEFAULT_ITERS}; previews {PREVIEW_ITERS})"),
        "seed": Option("int", 0, 10_000, "seed of the ALS initialisation"),
    }
    slow = True
    uses_data = True

    def rank_axes(self, geom: LayerGeometry, options=None) -> tuple[RankAxis, ...]:
        mx = self.max_rank(geom)
        # the out unfolding's energy rank is a fair first guess for R; it does not cut that spectrum
        return (RankAxis("rank", "rank R", 1, mx, max(1, min(mx, geom.out_features // geom.groups // 4)),
                         unfolding="out", help="rank-one components: the width of the two depthwise convs"),)

    def work(self, geom: LayerGeometry, rank: int, options=None) -> float:
        """CP-ALS costs about rank x weight entries per iteration."""
        return float(rank) * (geom.dense_params - (geom.out_features if geom.bias else 0))

    def max_rank(self, geom: LayerGeometry, options=None) -> int:
        g = geom.groups
        dims = sorted([geom.out_features // g, geom.in_features // g, *geom.kernel_size])
        return dims[0] * dims[1] * dims[2]

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options=None) -> int:
        if isinstance(rank, (list, tuple)) and len(rank) == 1:
            rank = rank[0]
        return resolve_int_rank("cp", geom, rank, self.max_rank(geom))

    def count_params(self, geom: LayerGeometry, rank: int, options=None) -> int:
        g = geom.groups
        kh, kw = geom.kernel_size
        return rank * geom.in_features + g * rank * (kh + kw) + geom.out_features * rank + (
            geom.out_features if geom.bias else 0)

    def count_flops(self, geom: LayerGeometry, rank: int, options=None) -> int | None:
        if geom.in_size is None:
            return None
        g = geom.groups
        kh, kw = geom.kernel_size
        h_in, w_in = geom.in_size
        h_out, w_out = geom.out_size
        c = g * rank
        return 2 * (h_in * w_in * rank * geom.in_features + h_out * w_in * c * kh + h_out * w_out * c * kw
                    + h_out * w_out * geom.out_features * rank)

    def factorize(self, layer: nn.Module, rank: int, options=None, *, stats=None, refine=True) -> Factors:
        """CP-ALS of the kernel; with ``stats``, the data-aware variant (:meth:`_data_aware`)."""
        check_finite(layer)
        if stats is not None:
            return self._data_aware(layer, rank, options, stats, refine)
        return self._factorize(layer, rank, options, None, refine)

    def _data_aware(self, layer: nn.Module, rank: int, options, stats, refine: bool) -> Factors:
        """Least output error on the calibration data: CP of the kernel with its input mode
        whitened by the channel moment, and CP of the plain kernel, each with the last 1x1
        conv refit by least squares against the layer's outputs; the better one wins (the
        channel whitening ignores spatial correlations and can lose to the plain kernel)."""
        best, best_err = None, math.inf
        for whiten in (True, False):
            f = self._factorize(layer, rank, options, stats if whiten else None, refine)
            t = f.tensors
            g = t["a_in"].shape[0]
            inner = torch.einsum("gir,gyr,gxr->griyx", *(t[k].to(torch.float64) for k in ("a_in", "a_h", "a_w")))
            a_out, err = linalg.refit_output(layer, stats, inner.reshape(g, rank, -1))
            if err < best_err:
                best_err = err
                best = Factors("cp", rank, {**t, "a_out": a_out.to(t["a_out"].dtype)})
        return best

    def _factorize(self, layer: nn.Module, rank: int, options, stats, refine: bool) -> Factors:
        opts = dict(options or {})
        w = linalg.grouped_weight(layer)  # (g, o, i, kh, kw)
        whitener = None
        if stats is not None:  # data-aware: factorize W x_1 L^T, then map the input factor back
            whitener = stats.whitener("channel")  # (g, i, i) float64, C = L L^T
            w = torch.einsum("goikl,gij->gojkl", w.to(torch.float64), whitener).to(w.dtype)
        geom = LayerGeometry.of(layer)
        full = rank == self.max_rank(geom)
        iters = int(opts.get("iters", DEFAULT_ITERS if refine else PREVIEW_ITERS))
        per_group = []
        for wg in w:
            if full:
                fs = exact_cp(wg)
            elif float(wg.norm()) == 0.0:
                fs = [torch.zeros(d, rank, dtype=wg.dtype) for d in wg.shape]
            else:
                fs = self._als(wg, rank, iters, int(opts.get("seed", 0)))
            per_group.append(fs)
        stacked = [torch.stack([fs[k] for fs in per_group]) for k in range(4)]  # each (g, dim, R)
        if whitener is not None:  # a_in <- L^{-T} a_in, so that the first 1x1 conv sees raw inputs
            a_in = torch.linalg.solve_triangular(whitener.transpose(-1, -2), stacked[1].to(torch.float64), upper=True)
            stacked[1] = a_in.to(stacked[1].dtype)
        names = ("a_out", "a_in", "a_h", "a_w")
        return Factors("cp", rank, dict(zip(names, stacked)))

    @staticmethod
    def _als(wg: torch.Tensor, rank: int, iters: int, seed: int) -> list[torch.Tensor]:
        scale = wg.norm()
        with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
            # tensorly warns when the SVD initialisation asks for more vectors than a mode has
            warnings.filterwarnings("ignore", message="Trying to compute SVD")
            try:
                cp = tl.decomposition.parafac(
                    (wg / scale).to(torch.float64), rank, n_iter_max=iters, init="svd",
                    random_state=seed, tol=1e-10, normalize_factors=True,
                )
            except Exception as e:  # tensorly's errors on degenerate tensors are cryptic
                raise DecompositionError(
                    f"CP-ALS failed at rank {rank} on a kernel of shape {tuple(wg.shape)}: "
                    f"{type(e).__name__}: {e}. Try another rank or the tucker2/svd method."
                ) from e
        weights, factors = cp
        factors = balance(weights * scale.to(torch.float64), [f for f in factors])
        if not all(torch.isfinite(f).all() for f in factors):
            raise DecompositionError(
                f"CP-ALS diverged (non-finite factors) at rank {rank} on a kernel of shape "
                f"{tuple(wg.shape)}; try a lower rank or the tucker2/svd method"
            )
        return [f.to(wg.dtype) for f in factors]

    def empty_factors(self, geom: LayerGeometry, rank: int, options=None) -> Factors:
        g = geom.groups
        dims = (geom.out_features // g, geom.in_features // g, *geom.kernel_size)
        names = ("a_out", "a_in", "a_h", "a_w")
        return Factors("cp", rank, {n: torch.zeros(g, d, rank) for n, d in zip(names, dims)})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        t = factors.tensors
        w = torch.einsum("gor,gir,gyr,gxr->goiyx", t["a_out"], t["a_in"], t["a_h"], t["a_w"])
        return w.reshape(layer.weight.shape).to(layer.weight.dtype)

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        t = factors.tensors
        r = factors.rank
        g = layer.groups
        c = g * r
        kh, kw = layer.kernel_size
        pad = layer.padding
        pad_h, pad_w = (pad, pad) if isinstance(pad, str) else ((pad[0], 0), (0, pad[1]))
        kwd = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        bias = layer.bias is not None
        first = nn.Conv2d(layer.in_channels, c, 1, groups=g, bias=False, **kwd)
        vert = nn.Conv2d(c, c, (kh, 1), stride=(layer.stride[0], 1), padding=pad_h,
                         dilation=(layer.dilation[0], 1), groups=c, bias=False, padding_mode=layer.padding_mode, **kwd)
        horiz = nn.Conv2d(c, c, (1, kw), stride=(1, layer.stride[1]), padding=pad_w,
                          dilation=(1, layer.dilation[1]), groups=c, bias=False, padding_mode=layer.padding_mode, **kwd)
        last = nn.Conv2d(c, layer.out_channels, 1, groups=g, bias=bias, **kwd)
        first.weight.data.copy_(t["a_in"].transpose(1, 2).reshape(first.weight.shape))
        vert.weight.data.copy_(t["a_h"].transpose(1, 2).reshape(c, 1, kh, 1))
        horiz.weight.data.copy_(t["a_w"].transpose(1, 2).reshape(c, 1, 1, kw))
        last.weight.data.copy_(t["a_out"].reshape(last.weight.shape))
        if bias:
            last.bias.data.copy_(layer.bias.detach())
        return FactorizedLayer(first, vert, horiz, last, method="cp", rank=r, source="Conv2d")
