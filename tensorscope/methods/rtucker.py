"""Reshaped Tucker (RTK) of a conv kernel: Tucker over the channel sub-modes (Su et al.).

The channels are split into sub-modes, ``out = prod(o_k)`` and ``in = prod(i_k)``
(``options["in_shape"]``/``["out_shape"]``, default two balanced factors each, as
:func:`~tensorscope.methods.tt.tt_shapes` picks them), and the kernel is read as the
``(2d + 2)``-way tensor ``(o_1..o_d, i_1..i_d, kh, kw)``. Its Tucker decomposition keeps the
spatial modes whole and puts one factor on every channel sub-mode:

``W ~ C x_{o_1} U_1 ... x_{o_d} U_d x_{i_1} V_1 ... x_{i_d} V_d``

so the layer becomes (1) a Kronecker-factored 1x1 conv ``V_1^T kron ... kron V_d^T`` from
``in`` to ``prod(s_k)`` channels, (2) the ``kh x kw`` core conv from ``prod(s_k)`` to
``prod(r_k)`` channels with the layer's stride, padding and dilation, (3) a
Kronecker-factored 1x1 conv ``U_1 kron ... kron U_d`` to ``out`` channels with the bias.
With one sub-mode (``in_shape=[in]``, ``out_shape=[out]``) this is ``tucker2``.
The Kronecker-factored 1x1 convs (:class:`KroneckerConv1x1`) apply one small matrix per
sub-mode, one matrix product each, and never form the Kronecker product.

Rank: ``[r_1..r_d, s_1..s_d]``, output sub-modes first then input ones (the order of the
weight's dimensions, as ``tucker2``'s ``[r_out, r_in]``); an int ``r`` caps every entry at
``r``, a fraction scales each sub-mode's size. Factors: HOSVD (leading left singular vectors
of each sub-mode's unfolding) then HOOI sweeps (``options["sweeps"]``, default 1); at the
full rank the factors are orthogonal and square, and the layer is exact.
Grouped convolutions are not supported.

References
----------
Su, Li, Bhattacharjee, Huang, "Tensorized spectrum preserving compression for neural
networks", arXiv:1805.10352, 2018. De Lathauwer et al., SIAM J. Matrix Anal. Appl. 2000 (HOOI).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import linalg
from ..errors import DecompositionError, RankError
from ..layers import FactorizedLayer
from .base import Factors, LayerGeometry, Method, Option, RankAxis, check_finite, compute_dtype, resolve_int_rank
from .rcp import SHAPE_OPTIONS, _prod, reshaped_shapes
from .registry import register_method
from .tt import DataIgnoredWarning

__all__ = ["KroneckerConv1x1", "RTucker", "kron_flops"]

DEFAULT_SWEEPS = 1


def kron_flops(in_shape: Sequence[int], out_shape: Sequence[int], positions: int) -> int:
    """FLOPs of :class:`KroneckerConv1x1` on ``positions`` pixels (one ``mm`` per sub-mode)."""
    total = 0
    for k in range(len(in_shape)):
        total += 2 * out_shape[k] * in_shape[k] * _prod(in_shape[k + 1:]) * positions * _prod(out_shape[:k])
    return int(total)


class KroneckerConv1x1(nn.Module):
    """A 1x1 conv whose ``(prod out_k) x (prod in_k)`` weight is ``F_1 kron ... kron F_d``.

    Parameters ``factor{k}`` of shape ``(out_k, in_k)`` and an optional ``bias``. The forward
    multiplies one sub-mode at a time (``mm``) and rotates the result to the end, so the
    channels come out in the order ``(o_1, ..., o_d)``; plain torch ops only.
    """

    def __init__(self, in_shape, out_shape, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_shape = tuple(int(x) for x in in_shape)
        self.out_shape = tuple(int(x) for x in out_shape)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        self.d = len(self.in_shape)
        self.in_channels = _prod(self.in_shape)
        self.out_channels = _prod(self.out_shape)
        kw = {"device": device, "dtype": dtype}
        for k in range(self.d):
            self.register_parameter(f"factor{k + 1}", nn.Parameter(torch.empty(self.out_shape[k], self.in_shape[k], **kw)))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{k + 1}") for k in range(self.d)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal factors with variance ``1 / in_k``: the Kronecker product then has variance
        ``1 / in_channels`` per entry (activations keep their scale); bias as ``nn.Conv2d``'s."""
        for f in self.factors():
            f.normal_(0.0, 1.0 / math.sqrt(f.shape[1]))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels)
            self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.transpose(0, 1).reshape(self.in_shape[0], -1)  # (i_1, i_2..i_d B H W)
        fs = self.factors()
        for k in range(self.d):
            t = torch.mm(fs[k], t)  # (o_k, i_{k+1}..i_d B H W o_1..o_{k-1})
            nxt = self.in_shape[k + 1] if k + 1 < self.d else b * h * w
            t = t.t().reshape(nxt, -1)  # rotate o_k to the end
        y = t.reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def matrix(self) -> torch.Tensor:
        """The dense ``out x in`` matrix (for checks; the forward never forms it)."""
        m = self.factors()[0]
        for f in self.factors()[1:]:
            m = kron(m, f)
        return m

    def extra_repr(self) -> str:
        return f"in_shape={list(self.in_shape)}, out_shape={list(self.out_shape)}, bias={self.bias is not None}"


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Kronecker product of two matrices (``torch.kron`` fails on some strided inputs)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _mode_product(t: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``t x_mode m`` with ``m`` of shape ``(new, t.shape[mode])``."""
    return torch.tensordot(m, t.movedim(mode, 0), dims=([1], [0])).movedim(0, mode)


def _leading(t: torch.Tensor, mode: int, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of the mode-``mode`` unfolding (zero-padded)."""
    u = linalg.gram_eig(_unfold(t, mode)[None])[1][0]
    return u[:, :r]


@register_method
class RTucker(Method):
    name = "rtucker"
    kinds = ("conv2d",)
    description = ("Reshaped Tucker: Kronecker-factored 1x1, kxk core, Kronecker-factored 1x1; "
                   "rank [r_1..r_d, s_1..s_d] per channel sub-mode")
    option_specs = {
        **SHAPE_OPTIONS,
        "sweeps": Option("int", 0, 10_000, f"HOOI sweeps after the HOSVD (default {DEFAULT_SWEEPS})"),
    }

    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        reason = super().unsupported_reason(geom)
        if reason:
            return reason
        if geom.groups != 1:
            return (f"method {self.name!r} does not support grouped convolutions (groups={geom.groups}): it splits "
                    "all input channels into sub-modes; use tucker2, or leave this layer dense")
        return None

    def _shapes(self, geom, options):
        return reshaped_shapes(geom, options, self.name)

    def max_rank(self, geom: LayerGeometry, options=None) -> tuple[int, ...]:
        in_shape, out_shape = self._shapes(geom, options)
        return tuple(int(x) for x in (*out_shape, *in_shape))

    def rank_axes(self, geom: LayerGeometry, options=None) -> tuple[RankAxis, ...]:
        in_shape, out_shape = self._shapes(geom, options)
        axes = [RankAxis(f"r_out{k + 1}", f"rank of output sub-mode {k + 1}", 1, int(o), max(1, int(o) // 2),
                         help=f"columns of U_{k + 1} (output sub-mode of size {o})") for k, o in enumerate(out_shape)]
        axes += [RankAxis(f"r_in{k + 1}", f"rank of input sub-mode {k + 1}", 1, int(i), max(1, int(i) // 2),
                          help=f"columns of V_{k + 1} (input sub-mode of size {i})") for k, i in enumerate(in_shape)]
        return tuple(axes)

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options=None) -> tuple[int, ...]:
        mx = self.max_rank(geom, options)
        if isinstance(rank, (list, tuple)):
            if len(rank) != len(mx):
                raise RankError(f"rtucker: rank {list(rank)!r} has {len(rank)} entries; expected {len(mx)} "
                                f"([r_1..r_d, s_1..s_d], output sub-modes first), each within {list(mx)}")
            return tuple(resolve_int_rank(self.name, geom, r, m, f"entry {k + 1} of the rank")
                         for k, (r, m) in enumerate(zip(rank, mx)))
        if isinstance(rank, float):
            return tuple(resolve_int_rank(self.name, geom, rank, m) for m in mx)
        r = resolve_int_rank(self.name, geom, rank, max(mx))
        return tuple(min(r, m) for m in mx)

    def _split(self, geom, rank, options):
        in_shape, out_shape = self._shapes(geom, options)
        d = len(in_shape)
        rank = tuple(int(r) for r in rank)
        return in_shape, out_shape, rank[:d], rank[d:]

    def count_params(self, geom: LayerGeometry, rank, options=None) -> int:
        in_shape, out_shape, r_out, r_in = self._split(geom, rank, options)
        return (sum(o * r for o, r in zip(out_shape, r_out)) + sum(i * s for i, s in zip(in_shape, r_in))
                + _prod(r_out) * _prod(r_in) * geom.khw + (geom.out_features if geom.bias else 0))

    def count_flops(self, geom: LayerGeometry, rank, options=None) -> int | None:
        if geom.in_size is None:
            return None
        in_shape, out_shape, r_out, r_in = self._split(geom, rank, options)
        p_in = geom.in_size[0] * geom.in_size[1]
        p_out = geom.positions
        return (kron_flops(in_shape, r_in, p_in) + 2 * p_out * _prod(r_out) * _prod(r_in) * geom.khw
                + kron_flops(r_out, out_shape, p_out))

    def factorize(self, layer: nn.Module, rank, options=None, *, stats=None, refine=True) -> Factors:
        """HOSVD of the reshaped kernel over its channel sub-modes, then HOOI sweeps."""
        check_finite(layer)
        if stats is not None:
            warnings.warn("rtucker ignores the calibration data: its factors minimise the weight's error",
                          DataIgnoredWarning, stacklevel=3)
        geom = LayerGeometry.of(layer)
        reason = self.unsupported_reason(geom)
        if reason:
            raise DecompositionError(reason)
        rank = self.resolve_rank(geom, rank, options)
        in_shape, out_shape, r_out, r_in = self._split(geom, rank, options)
        d = len(in_shape)
        w = layer.weight.detach().to(torch.float64)
        t = w.reshape(*out_shape, *in_shape, *geom.kernel_size)
        sizes = (*out_shape, *in_shape)
        full = tuple(rank) == tuple(sizes)
        us = [_leading(t, m, rank[m]) for m in range(2 * d)]
        sweeps = int((options or {}).get("sweeps", DEFAULT_SWEEPS)) if refine and not full else 0
        for _ in range(sweeps):
            for m in range(2 * d):
                y = t
                for n in range(2 * d):
                    if n != m:
                        y = _mode_product(y, us[n].t(), n)
                us[m] = _leading(y, m, rank[m])
        core = t
        for m in range(2 * d):
            core = _mode_product(core, us[m].t(), m)
        dt = layer.weight.dtype
        tensors = {"core": core.reshape(_prod(r_out), _prod(r_in), *geom.kernel_size).to(dt).contiguous()}
        for k in range(d):
            tensors[f"u{k + 1}"] = us[k].to(dt).contiguous()  # (o_k, r_k)
            tensors[f"v{k + 1}"] = us[d + k].to(dt).contiguous()  # (i_k, s_k)
        return Factors(self.name, tuple(rank), tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    def empty_factors(self, geom: LayerGeometry, rank, options=None) -> Factors:
        rank = self.resolve_rank(geom, rank, options)
        in_shape, out_shape, r_out, r_in = self._split(geom, rank, options)
        tensors = {"core": torch.zeros(_prod(r_out), _prod(r_in), *geom.kernel_size, dtype=geom.dtype)}
        for k in range(len(in_shape)):
            tensors[f"u{k + 1}"] = torch.zeros(out_shape[k], r_out[k], dtype=geom.dtype)
            tensors[f"v{k + 1}"] = torch.zeros(in_shape[k], r_in[k], dtype=geom.dtype)
        return Factors(self.name, tuple(rank), tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        geom = LayerGeometry.of(layer)
        opts = {"in_shape": factors.meta.get("in_shape"), "out_shape": factors.meta.get("out_shape")}
        rank = self.resolve_rank(geom, factors.rank, opts)
        in_shape, out_shape, r_out, r_in = self._split(geom, rank, opts)
        d = len(in_shape)
        t = factors.tensors
        kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        first = KroneckerConv1x1(in_shape, r_in, bias=False, **kw)
        core = nn.Conv2d(_prod(r_in), _prod(r_out), layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kw)
        last = KroneckerConv1x1(r_out, out_shape, bias=layer.bias is not None, **kw)
        with torch.no_grad():
            try:
                for k in range(d):
                    first.factors()[k].copy_(t[f"v{k + 1}"].t())
                    last.factors()[k].copy_(t[f"u{k + 1}"])
                core.weight.copy_(t["core"])
            except (KeyError, RuntimeError) as e:
                raise DecompositionError(
                    f"rtucker: factors {sorted((n, tuple(v.shape)) for n, v in t.items())} do not fit rank "
                    f"{list(rank)} with in_shape={list(in_shape)}, out_shape={list(out_shape)} ({e}); "
                    "factorize the layer again") from None
            if last.bias is not None:
                last.bias.copy_(layer.bias.detach())
        return FactorizedLayer(first, core, last, method=self.name, rank=tuple(rank), source=type(layer).__name__,
                               options={"in_shape": list(in_shape), "out_shape": list(out_shape)})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        t = factors.tensors
        d = len(factors.meta["in_shape"])
        w = layer.weight
        cd = compute_dtype(w.dtype)
        u = t["u1"].to(device=w.device, dtype=cd)
        v = t["v1"].to(device=w.device, dtype=cd)
        for k in range(1, d):
            u = kron(u, t[f"u{k + 1}"].to(device=w.device, dtype=cd))
            v = kron(v, t[f"v{k + 1}"].to(device=w.device, dtype=cd))
        out = torch.einsum("oa,abyx,ib->oiyx", u, t["core"].to(device=w.device, dtype=cd), v)
        return out.reshape(w.shape).to(w.dtype)
