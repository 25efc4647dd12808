"""Joint Tucker of a group of same-shaped convolutions (T-Net): one core shared by all.

The members' kernels are stacked into one tensor ``T[l, o, i, y, x]`` (layer, out, in, kh,
kw) and decomposed by a Tucker over the first three modes, the spatial ones kept whole::

    T ~ core x_layer U_layer x_out U_out x_in U_in,   core: (r_layer, r_out, r_in, kh, kw)

Member ``l``'s kernel is the slice ``W_l = U_out (sum_a U_layer[l, a] core[a]) U_in^T``:
what the members have in common is stored once. One :class:`JointTuckerCore` module holds the
four factors; each member becomes a :class:`JointTuckerConv` that mixes its own kxk core
from the shared one (``U_layer[l] @ core``, once per call) and runs the Tucker-2 chain 1x1
(in -> r_in), kxk (r_in -> r_out, the member's stride, padding and dilation), 1x1 (r_out ->
out, the member's bias). BatchNorm and everything else around a member stay its own. At
``rank = [n_layers, out, in]`` every member is exact.

The factors start from the HOSVD of the stacked tensor (eigenvectors of each unfolding's
Gram), refined by HOOI sweeps (``options["sweeps"]``, default 2; none for live previews).
Factors come from the weights alone: calibration data does not change them.

Cost: parameters ``r_l r_o r_i kh kw + L r_l + out r_o + in r_i`` (plus the members'
biases) for the whole group; FLOPs per member are Tucker-2's at ``(r_o, r_i)`` plus
``2 r_l r_o r_i kh kw`` for mixing its core, which is done once per forward call whatever
the batch (counted at a batch of one, as ``FlopCounterMode`` sees it).

References
----------
Kossaifi, Bulat, Tzimiropoulos, Pantic, "T-Net: Parametrizing Fully Convolutional Nets with
a Single High-Order Tensor", CVPR 2019. tensorly-torch ``FactorizedConv.from_conv_list``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import linalg
from ..errors import RankError
from .base import Factors, LayerGeometry, Option, RankAxis, Tradeoff, per_sample_flops, resolve_int_rank
from .group import GroupMethod, register_group_method

DEFAULT_SWEEPS = 2


class JointTuckerCore(nn.Module):
    """The factors a joint Tucker group shares: ``core`` (r_l, r_o, r_i, kh, kw), ``u_layer``
    (L, r_l), ``u_out`` (out, r_o) and ``u_in`` (r_i, in). One object, referenced by every member."""

    def __init__(self, n_layers: int, out_channels: int, in_channels: int, kernel_size: tuple[int, int],
                 rank: Sequence[int], *, device=None, dtype=None):
        super().__init__()
        rl, ro, ri = (int(r) for r in rank)
        kw = dict(device=device, dtype=dtype)
        self.rank = (rl, ro, ri)
        self.core = nn.Parameter(torch.zeros(rl, ro, ri, *kernel_size, **kw))
        self.u_layer = nn.Parameter(torch.zeros(n_layers, rl, **kw))
        self.u_out = nn.Parameter(torch.zeros(out_channels, ro, **kw))
        self.u_in = nn.Parameter(torch.zeros(ri, in_channels, **kw))

    def member_core(self, index: int) -> torch.Tensor:
        """Member ``index``'s kxk core ``sum_a U_layer[index, a] core[a]``: (r_o, r_i, kh, kw)."""
        rl = self.core.shape[0]
        return (self.u_layer[index:index + 1] @ self.core.reshape(rl, -1)).reshape(self.core.shape[1:])

    def kernel(self, index: int) -> torch.Tensor:
        """Member ``index``'s dense kernel (out, in, kh, kw)."""
        return torch.einsum("ob,bcyx,ci->oiyx", self.u_out, self.member_core(index), self.u_in)

    def reset_parameters(self) -> None:
        """Orthonormal random factors and a normal core, scaled so that each member's rebuilt
        kernel has Glorot variance ``2 / (fan_in + fan_out)`` on average."""
        rl, ro, ri = self.rank
        n, o, i = self.u_layer.shape[0], self.u_out.shape[0], self.u_in.shape[1]
        khw = self.core.shape[3] * self.core.shape[4]
        with torch.no_grad():
            for p, rows, cols, transpose in ((self.u_layer, n, rl, False), (self.u_out, o, ro, False),
                                             (self.u_in, i, ri, True)):
                q = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64))[0]
                p.copy_((q.t() if transpose else q).to(p.dtype))
            var = 2.0 / ((i + o) * khw)
            # ||W_l||^2 = ||U_layer[l] core||^2 (orthonormal channel factors); rows of U_layer hold r_l / n on average
            std = math.sqrt(var * o * i * khw * n / (rl * ro * ri * khw))
            self.core.normal_(0.0, std)

    def extra_repr(self) -> str:
        return f"n_layers={self.u_layer.shape[0]}, rank={list(self.rank)}, kernel={tuple(self.core.shape[3:])}"


class JointTuckerConv(nn.Module):
    """One member of a joint Tucker group: a Conv2d whose kernel is slice ``index`` of the shared
    :class:`JointTuckerCore`; stride, padding, dilation and bias are its own."""

    def __init__(self, core: JointTuckerCore, index: int, layer: nn.Conv2d, *, group: str = "",
                 rank: Sequence[int] = ()):
        super().__init__()
        self.shared = core
        self.index = int(index)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = tuple(layer.kernel_size)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.bias = None
        if layer.bias is not None:
            self.bias = nn.Parameter(layer.bias.detach().clone())
        self.method = "joint_tucker"
        self.rank = tuple(int(r) for r in rank) or core.rank
        self.group = group
        self.source = "Conv2d"
        self.options: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.shared
        ro, ri = c.u_out.shape[1], c.u_in.shape[0]
        y = F.conv2d(x, c.u_in.reshape(ri, self.in_channels, 1, 1))
        y = F.conv2d(y, c.member_core(self.index), None, self.stride, self.padding, self.dilation)
        return F.conv2d(y, c.u_out.reshape(self.out_channels, ro, 1, 1), self.bias)

    def reset_parameters(self) -> None:
        """The bias as ``nn.Conv2d`` draws it (the shared core draws its own, once)."""
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, index={self.index}, group={self.group!r}, bias={self.bias is not None}")


def _stack(layers: Sequence[nn.Module]) -> torch.Tensor:
    return torch.stack([m.weight.detach().to(torch.float64) for m in layers])


def _top(m: torch.Tensor, r: int) -> torch.Tensor:
    return linalg.gram_eig(m)[1][:, :r]


def hosvd(w: torch.Tensor, rank: Sequence[int], sweeps: int = 0):
    """Factors ``(U_layer, U_out, U_in)`` (columns orthonormal) and core of the stacked kernels
    ``w`` (L, O, I, kh, kw), float64: the HOSVD of the first three modes, then ``sweeps`` HOOI sweeps."""
    rl, ro, ri = rank
    n, o, i = w.shape[:3]
    ul = _top(w.reshape(n, -1), rl)
    uo = _top(w.transpose(0, 1).reshape(o, -1), ro)
    ui = _top(w.permute(2, 0, 1, 3, 4).reshape(i, -1), ri)
    for _ in range(sweeps):
        ul = _top(torch.einsum("zoiyx,ob,ic->zbcyx", w, uo, ui).reshape(n, -1), rl)
        uo = _top(torch.einsum("zoiyx,za,ic->oacyx", w, ul, ui).reshape(o, -1), ro)
        ui = _top(torch.einsum("zoiyx,za,ob->iabyx", w, ul, uo).reshape(i, -1), ri)
    core = torch.einsum("zoiyx,za,ob,ic->abcyx", w, ul, uo, ui)
    return ul, uo, ui, core


@register_group_method
class JointTucker(GroupMethod):
    name = "joint_tucker"
    kinds = ("conv2d",)
    description = "one Tucker over the stacked kernels of same-shaped convs; rank [r_layer, r_out, r_in]"
    option_specs = {"sweeps": Option("int", 0, 10_000, f"HOOI sweeps after the HOSVD (default {DEFAULT_SWEEPS})")}
    error_curve = True

    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        why = super().unsupported_reason(geom)
        if why:
            return why
        if geom.groups != 1:
            return f"joint_tucker takes ungrouped convs (groups=1); this one has groups={geom.groups}"
        if geom.padding_mode != "zeros":
            return f"joint_tucker pads with zeros; this conv has padding_mode={geom.padding_mode!r}"
        return None

    # ---- ranks -----------------------------------------------------------------------
    def max_rank(self, geoms, options=None) -> tuple[int, int, int]:
        g = geoms[0]
        n, o, i, k = len(geoms), g.out_features, g.in_features, g.khw
        return (min(n, o * i * k), min(o, n * i * k), min(i, n * o * k))

    def rank_axes(self, geoms, options=None) -> tuple[RankAxis, ...]:
        ml, mo, mi = self.max_rank(geoms)
        return (
            RankAxis("r_layer", "rank r_layer (layers)", 1, ml, max(1, ml // 2),
                     help="how many kernel mixtures the members' cores are made of"),
            RankAxis("r_out", "rank r_out (output channels)", 1, mo, max(1, mo // 4), unfolding="out"),
            RankAxis("r_in", "rank r_in (input channels)", 1, mi, max(1, mi // 4), unfolding="in"),
        )

    def resolve_rank(self, geoms, rank: Any, options=None) -> tuple[int, int, int]:
        mx = self.max_rank(geoms)
        names = ("r_layer", "r_out", "r_in")
        g = geoms[0]
        if isinstance(rank, float) and not isinstance(rank, bool):
            return tuple(resolve_int_rank(self.name, g, rank, m, w) for m, w in zip(mx, names))  # type: ignore
        if isinstance(rank, (list, tuple)) and len(rank) == 3:
            return tuple(resolve_int_rank(self.name, g, r, m, w) for r, m, w in zip(rank, mx, names))  # type: ignore
        raise RankError(f"{self.name}: rank must be [r_layer, r_out, r_in] or a fraction in (0, 1]; got {rank!r} "
                        f"(max {list(mx)})")

    # ---- cost ------------------------------------------------------------------------
    def count_params_group(self, geoms, rank, options=None) -> int:
        rl, ro, ri = rank
        g = geoms[0]
        shared = rl * ro * ri * g.khw + len(geoms) * rl + g.out_features * ro + g.in_features * ri
        return shared + sum(x.out_features for x in geoms if x.bias)

    def count_flops_group(self, geoms, rank, options=None) -> int | None:
        """Every member's three convs per sample, plus mixing its core from the shared one
        (``rl`` x ``ro*ri*k``) once per call, shared by the call's samples
        (:func:`~tensorscope.methods.base.per_sample_flops`; one rounding for the group)."""
        if any(g.in_size is None for g in geoms):
            return None
        rl, ro, ri = rank
        per_sample, per_call = 0, 0
        for g in geoms:
            p_in, p_out = g.in_size[0] * g.in_size[1], g.positions
            per_sample += 2 * (p_in * ri * g.in_features + p_out * ro * ri * g.khw + p_out * g.out_features * ro)
            per_call += 2 * rl * ro * ri * g.khw  # the member's core, mixed once per call
        return per_sample_flops(geoms[0], per_call, per_sample)

    def tradeoff_group(self, layers, geoms, name: str = "") -> Tradeoff:
        """Every rank triple's HOSVD error from one energy table (the refined factors
        ``compress`` builds do a little better). The error is relative to the whole group."""
        w = _stack(layers)
        ul, uo, ui, core = hosvd(w, self.max_rank(geoms))
        e = core.pow(2).sum(dim=(3, 4)).cumsum(0).cumsum(1).cumsum(2).numpy()
        total = float(w.pow(2).sum())
        ml, mo, mi = e.shape
        a, b, c = (x.reshape(-1) for x in np.meshgrid(np.arange(1, ml + 1), np.arange(1, mo + 1),
                                                       np.arange(1, mi + 1), indexing="ij"))
        errs = np.sqrt(np.clip(1.0 - e.reshape(-1) / total, 0, None)) if total > 0 else np.zeros(a.size)
        ranks = list(zip(a.tolist(), b.tolist(), c.tolist()))
        params = np.array([self.count_params_group(geoms, r) for r in ranks])
        flops = None
        if all(g.in_size is not None for g in geoms):
            flops = np.array([self.count_flops_group(geoms, r) for r in ranks])
        dense_p = sum(g.dense_params for g in geoms)
        dense_f = None if flops is None else sum(g.dense_flops for g in geoms)
        return Tradeoff(name, self.name, ranks, params, errs, flops, dense_p, dense_f).pareto()

    # ---- work ------------------------------------------------------------------------
    def factorize_group(self, layers, rank, options=None, *, refine=True) -> Factors:
        for m in layers:
            linalg.check_finite(m)
        w = _stack(layers)
        full = tuple(rank) == tuple(self.max_rank([LayerGeometry.of(m) for m in layers]))
        sweeps = int((options or {}).get("sweeps", DEFAULT_SWEEPS)) if refine and not full else 0
        ul, uo, ui, core = hosvd(w, rank, sweeps)
        return Factors(self.name, tuple(rank), {"u_layer": ul, "u_out": uo, "u_in": ui.t().contiguous(),
                                                "core": core})

    def empty_factors_group(self, geoms, rank, options=None) -> Factors:
        rl, ro, ri = rank
        g = geoms[0]
        return Factors(self.name, tuple(rank), {
            "u_layer": torch.zeros(len(geoms), rl), "u_out": torch.zeros(g.out_features, ro),
            "u_in": torch.zeros(ri, g.in_features), "core": torch.zeros(rl, ro, ri, *g.kernel_size)})

    def build_group(self, layers, factors: Factors, name: str = "") -> list[nn.Module]:
        t = factors.tensors
        first = layers[0]
        kw = dict(device=first.weight.device, dtype=first.weight.dtype)
        core = JointTuckerCore(len(layers), first.out_channels, first.in_channels, tuple(first.kernel_size),
                               factors.rank, **kw)
        with torch.no_grad():
            for key in ("core", "u_layer", "u_out", "u_in"):
                getattr(core, key).copy_(t[key])
        return [JointTuckerConv(core, k, m, group=name, rank=factors.rank) for k, m in enumerate(layers)]

    def reconstruct_group(self, layers, factors: Factors) -> list[torch.Tensor]:
        t = factors.tensors
        ws = torch.einsum("za,abcyx,ob,ci->zoiyx", t["u_layer"], t["core"], t["u_out"], t["u_in"])
        return [ws[k].to(m.weight.dtype) for k, m in enumerate(layers)]
