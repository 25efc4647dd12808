"""Tensor-ring decomposition of Linear and Conv2d layers (TR-SVD; Zhao et al. 2016).

The weight is reshaped exactly as for :mod:`tensorscope.methods.tt` (modes ``m_k n_k``, a
Conv2d's ``kh*kw`` spatial mode first) and split into a ring of cores: a tensor train
whose end bonds are one bond ``r_0 = r_d`` that may exceed 1. The built modules
(:mod:`tensorscope.tr_layers`) sweep the input through the ring or rebuild the weight per
call, like the TT layers (``mode``, ``batch`` and ``shuffle`` options as for ``tt``).

Rank. The canonical rank is the tuple of the ``d + 1`` bonds (``d + 2`` for a Conv2d)
whose first and last entries are the same ring bond: ``(r_0, r_1, ..., r_{d-1}, r_0)``. A
plan may give an int ``r`` (every bond, the ring included, ``min(r, its maximum)``), a
fraction ``f`` in (0, 1] (every bond ``max(1, round(f * its maximum))``) or the full list.

TR-SVD (Zhao et al. 2016, Algorithm 1). The first unfolding ``T_(1)`` (``s_1 x s_2...s_d``)
is truncated to ``r_0 * r_1`` singular triplets; ``U`` reshaped ``(s_1, r_0, r_1)`` becomes
the first core ``(r_0, s_1, r_1)``, and ``S V^T`` reshaped ``(r_0, r_1, s_2...s_d)`` is
turned into ``(r_1, s_2, ..., s_d, r_0)`` and split by sequential SVDs as in TT-SVD, the
ring bond ``r_0`` riding along on the right to the last core ``(r_{d-1}, s_d, r_0)``.

Maximum rank (exact). With ``R_1 = min(s_1, s_2...s_d)`` the rank of the first unfolding,
the ring bond is ``r_0 = floor(sqrt(R_1))`` and ``r_1 = ceil(R_1 / r_0)`` (so ``r_0 r_1 >=
R_1``; the paper's balanced split, the ring bond the smaller), and the inner bonds are
``r_k = min(r_1 * s_2...s_k, s_{k+1}...s_d * r_0)``, the ranks of the later unfoldings.
Every bond of a plan lies in ``[1, its maximum]``; the two ends must be equal.

References
----------
Zhao, Zhou, Xie, Zhang, Cichocki, "Tensor Ring Decomposition", arXiv:1606.05535, 2016.
Wang, Sun, Eriksson, Wang, Aggarwal, "Wide Compression: Tensor Ring Nets", CVPR 2018.
Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015 (the reshaping of the weight).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import DecompositionError, PlanError, RankError
from ..layers import FactorizedLayer
from ..tr_layers import TRConv2d, TRLinear, tr_conv_flops, tr_conv_mode, tr_linear_flops, tr_linear_mode
from .base import Factors, LayerGeometry, Method, Option, RankAxis, check_finite, compute_dtype, resolve_int_rank
from .registry import register_method
from .tt import (
    LAYER_OPTIONS,
    DataIgnoredWarning,
    _is_int,
    _mode_sizes,
    _resolve_shapes,
    _thin_svd,
    calls_batch,
    check_layer_options,
    given_layer_options,
    layer_options,
    shuffle_refusal,
)

__all__ = ["TR", "tr_svd", "tr_bond_max"]


def tr_bond_max(modes: Sequence[int]) -> tuple[int, ...]:
    """The bonds at which TR-SVD of a tensor with these modes is exact (see the module docstring)."""
    d = len(modes)
    if d == 1:
        return (1, 1)
    first = min(modes[0], math.prod(modes[1:]))
    ring = max(1, math.isqrt(first))
    r1 = -(-first // ring)
    inner = [min(r1 * math.prod(modes[1:k]), math.prod(modes[k:]) * ring) for k in range(2, d)]
    return (ring, r1, *inner, ring)


def _truncate(mat: torch.Tensor, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mat ~= left @ right`` with ``want`` columns: a truncated SVD, zero-padded past the rank."""
    u, s, vh = _thin_svd(mat)
    r = min(want, s.shape[0])
    left, right = u[:, :r], s[:r, None] * vh[:r]
    if r < want:
        left = torch.cat([left, left.new_zeros(left.shape[0], want - r)], dim=1)
        right = torch.cat([right, right.new_zeros(want - r, right.shape[1])], dim=0)
    return left, right


def tr_svd(tensor: torch.Tensor, rank: Sequence[int]) -> list[torch.Tensor]:
    """TR-SVD (Zhao et al. 2016): ring cores ``(r_{k-1}, s_k, r_k)`` of a tensor with modes ``s_k``.

    Parameters
    ----------
    tensor : torch.Tensor
        A d-way tensor (computed in its own dtype; pass float32 or float64).
    rank : sequence of d + 1 ints, ``rank[0] == rank[-1]`` (the ring bond)
        A bond larger than its unfolding allows is padded with zeros, so the cores always
        have the requested shapes.

    Returns
    -------
    list of d tensors whose ring product (:func:`tensorscope.tt_layers.chain_weight`)
    approximates ``tensor``; exact when the bonds reach :func:`tr_bond_max`.
    """
    modes = list(tensor.shape)
    d = len(modes)
    rank = [int(r) for r in rank]
    if len(rank) != d + 1 or rank[0] != rank[-1] or (d == 1 and rank[0] != 1):
        raise ValueError(f"tr_svd: need {d + 1} ranks with equal ends (1 for one core) for a {d}-way tensor; "
                         f"got {rank}")
    if d == 1:
        return [tensor.reshape(1, modes[0], 1)]
    ring = rank[0]
    left, rest = _truncate(tensor.reshape(modes[0], -1), ring * rank[1])
    cores = [left.reshape(modes[0], ring, rank[1]).permute(1, 0, 2)]
    rest = rest.reshape(ring, rank[1], -1).permute(1, 2, 0)  # (r_1, s_2...s_d, r_0)
    for k in range(1, d - 1):
        left, rest = _truncate(rest.reshape(rank[k] * modes[k], -1), rank[k + 1])
        cores.append(left.reshape(rank[k], modes[k], rank[k + 1]))
    cores.append(rest.reshape(rank[d - 1], modes[d - 1], ring))
    return [c.contiguous() for c in cores]


@register_method
class TR(Method):
    """Tensor ring: TR-SVD of the TT-reshaped weight (Zhao et al. 2016), ring layers (Wang et al. 2018).

    Canonical rank: the ``d + 1`` bonds (``d + 2`` for a Conv2d) with equal ends, the ring
    bond. ``options`` as for ``tt``: ``in_shape``, ``out_shape``, ``mode``, ``batch``,
    ``shuffle``.
    """

    name = "tr"
    kinds = ("linear", "conv2d")
    description = "Tensor ring: a tensor train whose end bonds are one ring bond; rank is the list of bonds"
    speed_note = ("TR layers run like TT layers: a sweep at small batches, one dense layer on the rebuilt weight "
                  "at large ones (mode 'auto'); the ring bond multiplies the sweep's middle steps")
    option_specs = {
        "in_shape": Option("shape", help="factors of the input size (channels for a conv), one per core"),
        "out_shape": Option("shape", help="factors of the output size, one per core"),
        **LAYER_OPTIONS,
    }
    slow = True

    def check_options(self, options, where: str = "") -> dict[str, Any]:
        out = super().check_options(options, where)
        check_layer_options(self.name, out, where)
        return out

    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        reason = super().unsupported_reason(geom)
        if reason:
            return reason
        if geom.kind == "conv2d" and geom.groups != 1:
            return (f"method 'tr' does not support grouped convolutions (groups={geom.groups}): the ring covers one "
                    "kernel over all input channels; use another method or leave this layer dense")
        return None

    def factorize_refusal(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> str | None:
        """A ``shuffle`` entry: factorizing a shuffled trained kernel loses more (tensorize and train it)."""
        return shuffle_refusal(self.name, options)

    # ---- ranks ---------------------------------------------------------------------------
    def _shapes_modes(self, geom: LayerGeometry, options) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
        in_shape, out_shape = _resolve_shapes(geom, options, self.name)
        return in_shape, out_shape, _mode_sizes(geom, in_shape, out_shape)

    def max_rank(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        return tr_bond_max(self._shapes_modes(geom, options)[2])

    def rank_axes(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> tuple[RankAxis, ...]:
        """The ring bond, then one axis per inner bond; defaults of at most 16 (half the maximum)."""
        mx = self.max_rank(geom, options)
        first = 1 if geom.kind == "conv2d" else 0

        def default(b: int) -> int:
            return max(1, min(int(b) // 2, 16))

        axes = [RankAxis("ring", "TR ring bond", 1, int(mx[0]), default(mx[0]),
                         help="the bond that closes the ring (r_0 = r_d); 1 makes a tensor train")]
        for k, b in enumerate(mx[1:-1], 1):
            what = "spatial core to channel cores" if first and k == 1 else f"cores {k - first} and {k - first + 1}"
            axes.append(RankAxis(f"bond{k}", f"TR bond {k}", 1, int(b), default(b), help=f"the bond between {what}"))
        return tuple(axes)

    def rank_from_axes(self, geom: LayerGeometry, values, options=None) -> tuple[int, ...]:
        values = [int(v) for v in values]
        return self.resolve_rank(geom, (values[0], *values[1:], values[0]), options)

    def axis_values(self, rank) -> tuple[int, ...]:
        return (int(rank[0]), *(int(r) for r in rank[1:-1]))

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        """Canonical bonds from an int, a fraction in (0, 1] or the full list (equal ends)."""
        in_shape, out_shape, modes = self._shapes_modes(geom, options)
        bmax = tr_bond_max(modes)
        where = f"in_shape={list(in_shape)}, out_shape={list(out_shape)}" + (
            f", kernel {geom.kernel_size[0]}x{geom.kernel_size[1]}" if geom.kind == "conv2d" else "")
        if isinstance(rank, (list, tuple)):
            ranks = list(rank)
            form = (f"a list of {len(bmax)} ints whose first and last entries are the same ring bond, each bond "
                    f"within the maximum {list(bmax)} for this layer ({where})")
            if len(ranks) != len(bmax):
                raise RankError(f"tr: rank {ranks!r} has {len(ranks)} entries; expected {form}")
            if not all(_is_int(r) for r in ranks):
                raise RankError(f"tr: rank {ranks!r} must hold integers only; expected {form}")
            if ranks[0] != ranks[-1]:
                fix = [ranks[0], *ranks[1:-1], ranks[0]]
                raise RankError(f"tr: rank {ranks!r} has ends {ranks[0]} and {ranks[-1]}, which differ: both are the "
                                f"ring bond r_0 = r_d; give equal ends, e.g. {fix}; expected {form}")
            for k, (r, mx) in enumerate(zip(ranks[:-1], bmax[:-1])):
                if not 1 <= r <= mx:
                    what = "the ring bond" if k == 0 else f"bond {k}"
                    raise RankError(f"tr: {what} of rank {ranks!r} is {r}, outside [1, {mx}]; expected {form}")
            return tuple(int(r) for r in ranks)
        if _is_int(rank):
            rank = int(rank)
        if isinstance(rank, float) and math.isfinite(rank) and 0.0 < rank <= 1.0:
            bonds = [resolve_int_rank(self.name, geom, rank, mx, what=f"bond {k}") for k, mx in enumerate(bmax[:-1])]
            return (*bonds, bonds[0])
        try:
            r = resolve_int_rank(self.name, geom, rank, max(bmax))
        except RankError as e:
            raise RankError(f"{e}; or give the full list of bonds, at most {list(bmax)} ({where})") from None
        bonds = [min(r, mx) for mx in bmax[:-1]]
        return (*bonds, bonds[0])

    # ---- cost ----------------------------------------------------------------------------
    def count_params(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> int:
        modes = self._shapes_modes(geom, options)[2]
        ranks = self.resolve_rank(geom, rank, options)
        n = sum(ranks[k] * modes[k] * ranks[k + 1] for k in range(len(modes)))
        return n + (geom.out_features if geom.bias else 0)

    def resolve_mode(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> str:
        """``"sweep"`` or ``"rebuild"``: what the built layer will run (the cost model's pick for "auto")."""
        in_shape, out_shape, _ = self._shapes_modes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        lo = layer_options(options)
        if lo["shuffle"] is not None:
            return "rebuild"
        if lo["mode"] is not None:
            return lo["mode"]
        if geom.kind == "linear":
            return tr_linear_mode(in_shape, out_shape, ranks, lo["batch"])
        return tr_conv_mode(in_shape, out_shape, ranks, geom.kernel_size)

    def count_flops(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> int | None:
        """FLOPs of one sample, following :meth:`resolve_mode` (the ring sweep of
        :mod:`tensorscope.tr_layers`, or forming the weight once per call, shared by its
        :func:`~tensorscope.methods.tt.calls_batch` samples, plus the dense layer); None for a
        Conv2d whose input size is unknown."""
        in_shape, out_shape, _ = self._shapes_modes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        mode, batch = self.resolve_mode(geom, ranks, options), calls_batch(geom, options)
        if geom.kind == "linear":
            return tr_linear_flops(in_shape, out_shape, ranks, geom.tokens, mode, batch)
        out = geom.out_size
        if out is None:
            return None
        return tr_conv_flops(in_shape, out_shape, ranks, geom.kernel_size, out, mode, batch)

    # ---- factorize and build -------------------------------------------------------------
    def factorize(self, layer: nn.Module, rank: Any, options: Mapping[str, Any] | None = None, *,
                  stats: Any = None, refine: bool = True) -> Factors:
        """TR-SVD of the reshaped weight (data-free; :func:`tr_svd`).

        The weight is permuted to the modes ``(m_1 n_1, ..., m_d n_d)`` (a Conv2d's ``kh*kw``
        first) and split in ``compute_dtype(weight.dtype)``; the cores are cast back.
        ``stats`` and ``refine`` are ignored. A ``shuffle`` entry is refused (PlanError).
        """
        refusal = shuffle_refusal(self.name, options)
        if refusal:
            raise PlanError(refusal)
        check_finite(layer)
        if stats is not None:
            warnings.warn("tr ignores the calibration data: its factors minimise the weight's error, not the "
                          "output's; svd, tucker2 and cp use the data", DataIgnoredWarning, stacklevel=3)
        geom = LayerGeometry.of(layer)
        self._check(geom)
        in_shape, out_shape, modes = self._shapes_modes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        d = len(in_shape)
        w = layer.weight.detach().to(compute_dtype(layer.weight.dtype))
        if geom.kind == "linear":
            t = w.reshape(*out_shape, *in_shape).permute(*[i for k in range(d) for i in (k, d + k)])
        else:
            t = w.reshape(*out_shape, *in_shape, geom.khw).permute(2 * d, *[i for k in range(d) for i in (k, d + k)])
        cores = tr_svd(t.reshape(modes), ranks)
        first = 1 if geom.kind == "conv2d" else 0
        shaped = cores[:first] + [
            c.reshape(c.shape[0], out_shape[k], in_shape[k], c.shape[2]) for k, c in enumerate(cores[first:])
        ]
        tensors = {f"core{k}": c.to(layer.weight.dtype).contiguous() for k, c in enumerate(shaped)}
        return Factors(method=self.name, rank=ranks, tensors=tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape), **given_layer_options(options)})

    def _check(self, geom: LayerGeometry) -> None:
        reason = self.unsupported_reason(geom)
        if reason:
            raise DecompositionError(reason)

    def _module(self, geom: LayerGeometry, in_shape, out_shape, ranks, device=None, dtype=None,
                options: Mapping[str, Any] | None = None) -> nn.Module:
        lo = layer_options(options)
        kw = {"mode": lo["mode"], "batch": lo["batch"], "shuffle": lo["shuffle"], "device": device, "dtype": dtype}
        if geom.kind == "linear":
            return TRLinear(in_shape, out_shape, ranks, bias=geom.bias, **kw)
        return TRConv2d(in_shape, out_shape, ranks, geom.kernel_size, stride=geom.stride, padding=geom.padding,
                        dilation=geom.dilation, bias=geom.bias, padding_mode=geom.padding_mode, **kw)

    def _filled(self, layer: nn.Module, factors: Factors, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        geom = LayerGeometry.of(layer)
        self._check(geom)
        opts = {"in_shape": factors.meta.get("in_shape"), "out_shape": factors.meta.get("out_shape")}
        in_shape, out_shape, _ = self._shapes_modes(geom, opts)
        ranks = self.resolve_rank(geom, factors.rank, opts)
        given = given_layer_options(factors.meta)
        mod = self._module(geom, in_shape, out_shape, ranks, device=layer.weight.device, dtype=dtype, options=given)
        names = [n for n, _ in mod.named_parameters() if n.startswith("core")]
        if sorted(factors.tensors) != sorted(names):
            raise DecompositionError(f"tr: factors hold tensors {sorted(factors.tensors)} but a layer with in_shape="
                                     f"{list(in_shape)}, out_shape={list(out_shape)} needs {names}; factorize again")
        with torch.no_grad():
            for n in names:
                p, t = getattr(mod, n), factors.tensors[n]
                if tuple(t.shape) != tuple(p.shape):
                    raise DecompositionError(f"tr: factor {n} has shape {tuple(t.shape)} but rank {ranks} needs "
                                             f"{tuple(p.shape)}; factorize the layer again")
                p.copy_(t)
            if mod.bias is not None:
                mod.bias.copy_(layer.bias.detach())
        opts_out = {"in_shape": list(in_shape), "out_shape": list(out_shape), **given}
        return mod, {"ranks": ranks, "options": opts_out}

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        mod, info = self._filled(layer, factors, layer.weight.dtype)
        return FactorizedLayer(mod, method=self.name, rank=info["ranks"], source=type(layer).__name__,
                               options=info["options"])

    def empty_factors(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> Factors:
        in_shape, out_shape, _ = self._shapes_modes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        mod = self._module(geom, in_shape, out_shape, ranks, device="meta", dtype=geom.dtype)  # shapes only
        tensors = {n: torch.zeros(p.shape, dtype=geom.dtype) for n, p in mod.named_parameters() if n.startswith("core")}
        return Factors(method=self.name, rank=ranks, tensors=tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape), **given_layer_options(options)})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        """The dense weight of the ring (formed in the compute dtype; for previews)."""
        mod, _ = self._filled(layer, factors, compute_dtype(layer.weight.dtype))
        with torch.no_grad():
            return mod.dense_weight().to(layer.weight.dtype)
