"""Reshaped CP (RCP) of a conv kernel: a sum of R Kronecker products of small channel matrices,
each times a kh x kw filter (Su et al.).

The channels are split into sub-modes, ``out = prod(o_k)`` and ``in = prod(i_k)``
(``options["in_shape"]``/``["out_shape"]``, default two balanced factors each, as
:func:`~tensorscope.methods.tt.tt_shapes` picks them), and the kernel is read as a
``(d + 1)``-way tensor with modes ``(o_1 i_1, ..., o_d i_d, kh kw)``. Its CP is

``W[o, i, :, :] ~ sum_r (A_1[r] kron ... kron A_d[r])[o, i] * S[r]``

with ``A_k[r]`` an ``o_k x i_k`` matrix and ``S[r]`` a ``kh x kw`` filter. Parameters:
``R * (sum_k o_k i_k + kh kw)`` plus the bias, against ``R * (out + in + kh + kw)`` for plain
``cp``: at equal parameters RCP takes a far larger R.

The built layer (:class:`RCPConv2d`) never forms the weight: every input channel goes through
the R filters at once (one conv with R output channels on ``B * in`` single-channel images,
which carries the layer's stride, padding and dilation), then the channel sub-modes are
contracted one ``bmm`` at a time, R components in parallel; the last contraction sums over R
in the same matrix product.

Factors come from CP-ALS (tensorly's ``parafac``, SVD initialisation, seeded,
``options["iters"]``), with no factor carrying the scale; at the full rank, the product of
every mode size but the largest, the factors are written down exactly (no ALS).
Grouped convolutions are not supported.

References
----------
Su, Li, Bhattacharjee, Huang, "Tensorized spectrum preserving compression for neural
networks", arXiv:1805.10352, 2018.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DecompositionError
from ..layers import FactorizedLayer
from .base import Factors, LayerGeometry, Method, Option, RankAxis, check_finite, compute_dtype, resolve_int_rank
from .registry import register_method
from .tt import DataIgnoredWarning, _resolve_shapes

__all__ = ["RCP", "RCPConv2d", "exact_cp_nway", "reshaped_modes", "rcp_flops", "conv_geometry_args"]

DEFAULT_ITERS = 100
PREVIEW_ITERS = 25
#: the number of channel sub-modes the default shapes use
DEFAULT_ORDER = 2


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def reshaped_shapes(geom: LayerGeometry, options: Mapping[str, Any] | None, method: str):
    """``(in_shape, out_shape)``: the plan's, or two balanced factors each; PlanError when wrong."""
    opts = dict(options or {})
    if opts.get("in_shape") is None and opts.get("out_shape") is None:
        from .tt import tt_shapes

        ins, outs = tt_shapes(geom.in_features, geom.out_features, DEFAULT_ORDER)
        return tuple(ins), tuple(outs)
    # one given: the other is split into as many factors (as tt does)
    return _resolve_shapes(geom, opts, method)


def reshaped_modes(geom: LayerGeometry, in_shape, out_shape) -> list[int]:
    """Mode sizes of the reshaped kernel: ``o_k * i_k`` for each sub-mode, then ``kh * kw``."""
    return [int(o) * int(i) for o, i in zip(out_shape, in_shape)] + [geom.khw]


def exact_cp_nway(w: torch.Tensor) -> list[torch.Tensor]:
    """An exact CP of an N-way tensor with rank = product of every mode size but the largest.

    Every mode but the largest is enumerated by unit vectors; the largest mode's factor holds
    the corresponding fibres of ``w``.
    """
    dims = list(w.shape)
    n = len(dims)
    free = max(range(n), key=lambda k: dims[k])
    others = [k for k in range(n) if k != free]
    rank = _prod(dims[k] for k in others)
    factors: list[Any] = [None] * n
    grids = torch.meshgrid(*[torch.arange(dims[k]) for k in others], indexing="ij")
    for k, idx in zip(others, grids):
        f = torch.zeros(dims[k], rank, dtype=w.dtype)
        f[idx.reshape(-1), torch.arange(rank)] = 1.0
        factors[k] = f
    factors[free] = w.permute(free, *others).reshape(dims[free], rank)
    return factors


def balance_nway(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Spread each component's scale evenly over the factors (better conditioned in fp32)."""
    n = len(factors)
    norms = [f.norm(dim=0) for f in factors]
    scale = weights.abs() * torch.stack(norms).prod(dim=0)
    each = scale.clamp_min(0) ** (1.0 / n)
    out = []
    for k, (f, nm) in enumerate(zip(factors, norms)):
        unit = torch.where(nm > 0, f / nm.clamp_min(torch.finfo(f.dtype).tiny), torch.zeros_like(f))
        out.append(unit * each * (torch.sign(weights) if k == 0 else 1.0))
    return out


def conv_geometry_args(layer_like) -> dict[str, Any]:
    return dict(kernel_size=tuple(layer_like.kernel_size), stride=tuple(layer_like.stride),
                padding=layer_like.padding if isinstance(layer_like.padding, str) else tuple(layer_like.padding),
                dilation=tuple(layer_like.dilation), padding_mode=layer_like.padding_mode)


def _pad_amounts(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """What ``nn.Conv2d`` passes to ``F.pad`` for non-'zeros' padding modes (left, right, top, bottom)."""
    if isinstance(padding, str):
        rev = [0, 0, 0, 0]
        if padding == "same":
            for dil, k, i in zip(dilation, kernel_size, (1, 0)):
                total = dil * (k - 1)
                rev[2 * i] = total // 2
                rev[2 * i + 1] = total - total // 2
        return tuple(rev)  # type: ignore[return-value]
    return (padding[1], padding[1], padding[0], padding[0])


def rcp_flops(in_shape, out_shape, rank: int, kernel_size, out_size, batch: int = 1) -> int:
    """FLOPs of :class:`RCPConv2d` (FlopCounterMode's count: the spatial conv and the bmm/mm)."""
    kh, kw = kernel_size
    pos = batch * out_size[0] * out_size[1]
    total = 2 * _prod(in_shape) * batch * rank * kh * kw * out_size[0] * out_size[1]
    d = len(in_shape)
    for k in range(d):
        y = _prod(in_shape[k + 1:]) * pos * _prod(out_shape[:k])
        total += 2 * rank * out_shape[k] * in_shape[k] * y
    return int(total)


class RCPConv2d(nn.Module):
    """A conv whose kernel is ``sum_r (A_1[r] kron ... kron A_d[r]) * S[r]`` (reshaped CP).

    Parameters: ``spatial`` ``(R, 1, kh, kw)`` and ``factor{k}`` ``(R, o_k, i_k)`` for
    ``k = 1..d``, and ``bias``. Forward: one conv of every input channel with the R filters,
    then one ``bmm`` per channel sub-mode (the last an ``mm`` that also sums over R).
    Plain torch ops and Python-int shapes only (``torch.export`` and ``torch.jit.trace`` run it).
    """

    def __init__(self, in_shape, out_shape, rank: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        pair = lambda v: (int(v), int(v)) if isinstance(v, int) else tuple(int(t) for t in v)  # noqa: E731
        self.in_shape = tuple(int(x) for x in in_shape)
        self.out_shape = tuple(int(x) for x in out_shape)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        self.d = len(self.in_shape)
        self.rank = int(rank)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode = padding_mode
        self._pad = _pad_amounts(self.padding, self.kernel_size, self.dilation)
        self.in_channels = _prod(self.in_shape)
        self.out_channels = _prod(self.out_shape)
        kw = {"device": device, "dtype": dtype}
        self.spatial = nn.Parameter(torch.empty(self.rank, 1, *self.kernel_size, **kw))
        for k in range(self.d):
            self.register_parameter(f"factor{k + 1}", nn.Parameter(
                torch.empty(self.rank, self.out_shape[k], self.in_shape[k], **kw)))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{k + 1}") for k in range(self.d)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal factors whose kernel has Glorot variance ``2 / (fan_in + fan_out)``: an entry
        is a sum of R products of ``d + 1`` factor entries; bias as ``nn.Conv2d`` draws it."""
        khw = self.kernel_size[0] * self.kernel_size[1]
        fan_in, fan_out = self.in_channels * khw, self.out_channels * khw
        std = math.sqrt((2.0 / (fan_in + fan_out) / self.rank) ** (1.0 / (self.d + 1)))
        self.spatial.normal_(0.0, std)
        for f in self.factors():
            f.normal_(0.0, std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = x.reshape(b * c, 1, h, w)
        if self.padding_mode != "zeros":
            z = F.pad(z, self._pad, mode=self.padding_mode)
            z = F.conv2d(z, self.spatial, None, self.stride, 0, self.dilation)
        else:
            z = F.conv2d(z, self.spatial, None, self.stride, self.padding, self.dilation)
        ho, wo = z.shape[-2], z.shape[-1]
        r = self.rank
        # (B, C, R, P) -> (R, C, B, P): rows i_1, columns (i_2..i_d, B, P)
        t = z.reshape(b, c, r, ho * wo).permute(2, 1, 0, 3).reshape(r, self.in_shape[0], -1)
        fs = self.factors()
        for k in range(self.d - 1):
            t = torch.bmm(fs[k], t)  # (R, o_k, i_{k+1}.. B P o_1..o_{k-1})
            t = t.transpose(1, 2).reshape(r, self.in_shape[k + 1], -1)  # rotate o_k to the end
        last = fs[-1].permute(1, 0, 2).reshape(self.out_shape[-1], r * self.in_shape[-1])
        y = torch.mm(last, t.reshape(r * self.in_shape[-1], -1))  # (o_d, B P o_1..o_{d-1}), summed over R
        y = y.reshape(self.out_shape[-1], b, ho * wo, self.out_channels // self.out_shape[-1])
        y = y.permute(1, 3, 0, 2).reshape(b, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def kernel(self) -> torch.Tensor:
        """The dense kernel (for previews and checks; the forward never forms it)."""
        acc = self.spatial.reshape(self.rank, 1, 1, -1)  # (R, O, I, khw)
        for f in self.factors():
            r, mo, mi, s = acc.shape
            acc = torch.einsum("rabs,rmn->rambns", acc, f).reshape(r, mo * f.shape[1], mi * f.shape[2], s)
        return acc.sum(0).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (f"in_shape={list(self.in_shape)}, out_shape={list(self.out_shape)}, rank={self.rank}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}")


SHAPE_OPTIONS = {
    "in_shape": Option("shape", help="factors of the input channels, one per sub-mode (default: 2 balanced)"),
    "out_shape": Option("shape", help="factors of the output channels, one per sub-mode (default: 2 balanced)"),
}


@register_method
class RCP(Method):
    name = "rcp"
    kinds = ("conv2d",)
    description = "Reshaped CP: sum of R Kronecker products of channel sub-matrices, each times a kh x kw filter"
    speed_note = ("RCP runs a conv with R outputs per input channel, then R Kronecker products: R times the "
                  "input in memory; it buys parameters, not speed (docs/benchmarks.md)")
    option_specs = {
        **SHAPE_OPTIONS,
        "iters": Option("int", 0, 10_000, f"CP-ALS iterations (default {DEFAULT_ITERS}; previews {PREVIEW_ITERS})"),
        "seed": Option("int", 0, 10_000, "seed of the ALS initialisation"),
    }
    slow = True

    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        reason = super().unsupported_reason(geom)
        if reason:
            return reason
        if geom.groups != 1:
            return (f"method {self.name!r} does not support grouped convolutions (groups={geom.groups}): it splits "
                    "all input channels into sub-modes; use cp or tucker2, or leave this layer dense")
        return None

    def _shapes(self, geom, options):
        return reshaped_shapes(geom, options, self.name)

    def max_rank(self, geom: LayerGeometry, options=None) -> int:
        modes = reshaped_modes(geom, *self._shapes(geom, options))
        return _prod(modes) // max(modes)

    def rank_axes(self, geom: LayerGeometry, options=None) -> tuple[RankAxis, ...]:
        mx = self.max_rank(geom, options)
        return (RankAxis("rank", "rank R", 1, mx, max(1, min(mx, geom.out_features // 4)),
                         help="Kronecker-product components: each a filter and d small channel matrices"),)

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options=None) -> int:
        if isinstance(rank, (list, tuple)) and len(rank) == 1:
            rank = rank[0]
        return resolve_int_rank(self.name, geom, rank, self.max_rank(geom, options))

    def work(self, geom: LayerGeometry, rank: int, options=None) -> float:
        """CP-ALS costs about rank x weight entries per iteration."""
        return float(rank) * geom.out_features * geom.in_features * geom.khw

    def count_params(self, geom: LayerGeometry, rank: int, options=None) -> int:
        in_shape, out_shape = self._shapes(geom, options)
        return int(rank) * (sum(o * i for o, i in zip(out_shape, in_shape)) + geom.khw) + (
            geom.out_features if geom.bias else 0)

    def count_flops(self, geom: LayerGeometry, rank: int, options=None) -> int | None:
        if geom.in_size is None:
            return None
        in_shape, out_shape = self._shapes(geom, options)
        return rcp_flops(in_shape, out_shape, int(rank), geom.kernel_size, geom.out_size)

    def factorize(self, layer: nn.Module, rank: int, options=None, *, stats=None, refine=True) -> Factors:
        """CP-ALS of the reshaped kernel (exact factors at the full rank)."""
        check_finite(layer)
        if stats is not None:
            warnings.warn("rcp ignores the calibration data: its factors minimise the weight's error",
                          DataIgnoredWarning, stacklevel=3)
        geom = LayerGeometry.of(layer)
        reason = self.unsupported_reason(geom)
        if reason:
            raise DecompositionError(reason)
        in_shape, out_shape = self._shapes(geom, options)
        rank = self.resolve_rank(geom, rank, options)
        opts = dict(options or {})
        d = len(in_shape)
        w = layer.weight.detach().to(compute_dtype(layer.weight.dtype))
        t = w.reshape(*out_shape, *in_shape, geom.khw)
        perm = [i for k in range(d) for i in (k, d + k)] + [2 * d]
        t = t.permute(*perm).reshape(reshaped_modes(geom, in_shape, out_shape))
        if rank == self.max_rank(geom, options):
            fs = exact_cp_nway(t)
        elif float(t.norm()) == 0.0:
            fs = [torch.zeros(s, rank, dtype=t.dtype) for s in t.shape]
        else:
            iters = int(opts.get("iters", DEFAULT_ITERS if refine else PREVIEW_ITERS))
            fs = self._als(t, rank, iters, int(opts.get("seed", 0)))
        tensors = {"spatial": fs[-1].t().reshape(rank, 1, *geom.kernel_size)}
        for k in range(d):
            tensors[f"factor{k + 1}"] = fs[k].t().reshape(rank, out_shape[k], in_shape[k])
        tensors = {n: v.to(layer.weight.dtype).contiguous() for n, v in tensors.items()}
        return Factors(self.name, rank, tensors, meta={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    @staticmethod
    def _als(t: torch.Tensor, rank: int, iters: int, seed: int) -> list[torch.Tensor]:
        scale = t.norm()
        with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Trying to compute SVD")
            try:
                weights, factors = tl.decomposition.parafac(
                    (t / scale).to(torch.float64), rank, n_iter_max=iters, init="svd",
                    random_state=seed, tol=1e-10, normalize_factors=True,
                )
            except Exception as e:
                raise DecompositionError(
                    f"rcp: CP-ALS failed at rank {rank} on a reshaped kernel of shape {tuple(t.shape)}: "
                    f"{type(e).__name__}: {e}. Try another rank, other in_shape/out_shape, or the rtucker method."
                ) from e
        factors = balance_nway(weights * scale.to(torch.float64), list(factors))
        if not all(torch.isfinite(f).all() for f in factors):
            raise DecompositionError(f"rcp: CP-ALS diverged (non-finite factors) at rank {rank} on a reshaped kernel "
                                     f"of shape {tuple(t.shape)}; try a lower rank or the rtucker method")
        return [f.to(t.dtype) for f in factors]

    def _module(self, geom: LayerGeometry, in_shape, out_shape, rank, device=None, dtype=None) -> RCPConv2d:
        return RCPConv2d(in_shape, out_shape, rank, geom.kernel_size, stride=geom.stride, padding=geom.padding,
                         dilation=geom.dilation, bias=geom.bias, padding_mode=geom.padding_mode,
                         device=device, dtype=dtype)

    def empty_factors(self, geom: LayerGeometry, rank: int, options=None) -> Factors:
        in_shape, out_shape = self._shapes(geom, options)
        rank = self.resolve_rank(geom, rank, options)
        tensors = {"spatial": torch.zeros(rank, 1, *geom.kernel_size, dtype=geom.dtype)}
        for k in range(len(in_shape)):
            tensors[f"factor{k + 1}"] = torch.zeros(rank, out_shape[k], in_shape[k], dtype=geom.dtype)
        return Factors(self.name, rank, tensors, meta={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        geom = LayerGeometry.of(layer)
        opts = {"in_shape": factors.meta.get("in_shape"), "out_shape": factors.meta.get("out_shape")}
        in_shape, out_shape = self._shapes(geom, opts)
        rank = int(factors.rank)
        w = layer.weight
        mod = self._module(geom, in_shape, out_shape, rank, device="meta", dtype=w.dtype).to_empty(device=w.device)
        with torch.no_grad():
            for n, p in mod.named_parameters():
                if n == "bias":
                    p.copy_(layer.bias.detach())
                    continue
                t = factors.tensors.get(n)
                if t is None or tuple(t.shape) != tuple(p.shape):
                    raise DecompositionError(
                        f"rcp: factor {n} is {None if t is None else tuple(t.shape)} but rank {rank} with "
                        f"in_shape={list(in_shape)}, out_shape={list(out_shape)} needs {tuple(p.shape)}; "
                        "factorize the layer again")
                p.copy_(t)
        return FactorizedLayer(mod, method=self.name, rank=rank, source=type(layer).__name__,
                               options={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        t = factors.tensors
        d = len(factors.meta["in_shape"])
        w = layer.weight
        cd = compute_dtype(w.dtype)
        rank = int(factors.rank)
        acc = t["spatial"].to(device=w.device, dtype=cd).reshape(rank, 1, 1, -1)
        for k in range(d):
            f = t[f"factor{k + 1}"].to(device=w.device, dtype=cd)
            r, mo, mi, s = acc.shape
            acc = torch.einsum("rabs,rmn->rambns", acc, f).reshape(r, mo * f.shape[1], mi * f.shape[2], s)
        return acc.sum(0).reshape(w.shape).to(w.dtype)
