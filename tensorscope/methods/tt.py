"""Tensor-Train decomposition of Linear (TT-matrix) and Conv2d (TT-conv) layers.

A Linear layer's weight ``W`` (out x in) is read as a d-way tensor whose mode ``k`` pairs
an output factor ``m_k`` with an input factor ``n_k`` (``out = prod(m_k)``,
``in = prod(n_k)``), and is split by TT-SVD into cores ``(r_{k-1}, m_k, n_k, r_k)``
(Novikov et al. 2015). A Conv2d kernel gets one more mode in front, the ``kh*kw`` spatial
positions, whose core becomes an ``r_1``-output single-input convolution (Garipov et al.
2016). The built modules (:mod:`tensorscope.tt_layers`) contract the cores one ``mm`` at a
time and never form the dense weight.

Reshaped TT (Su et al. 2018) is this method on a Conv2d: channel cores pairing the output
and input sub-modes ``(o_k, i_k)`` plus one spatial core. Su et al. put the spatial core last;
here it comes first, so each input channel is convolved once and the channel cores follow
(at equal bond ranks the two orders are different families; both are exact at full rank).
The other reshaped methods are ``rcp`` and ``rtucker``.

Rank. The canonical rank is the tuple of bond ranks including the boundary 1s: ``d + 1``
ints for Linear, ``d + 2`` for Conv2d (``(1, r_spatial, r_2, ..., r_d, 1)``). A plan may
give an int ``r`` (every inner bond ``min(r, its maximum)``), a fraction ``f`` in (0, 1]
(every inner bond ``max(1, round(f * its maximum))``) or the full list.

Shapes. ``options["in_shape"]`` / ``options["out_shape"]`` choose the factorization of the
input / output size (channels for Conv2d); without them :func:`tt_shapes` picks one.

Mode. ``options["mode"]`` is ``"sweep"`` (contract the input with the cores, never form the
weight), ``"rebuild"`` (form the weight per call, then one dense ``linear``/``conv2d``) or
``"auto"`` (the default: a cost model picks when the layer is built, for
``options["batch"]`` samples per call, default 1; see :mod:`tensorscope.tt_layers`).
``count_flops`` follows the mode. A rebuilding layer forms its weight once per call, shared
by the call's samples: FLOPs per sample are stated at the batch of the example input the
geometry was measured on (``geom.batch``, what ``ts.count_flops`` of the built layer
reports), or at ``options["batch"]`` for a geometry without one.

Shuffle (RsTD). ``options["shuffle"] = seed`` permutes the flattened weight by a fixed
permutation of that seed (:mod:`tensorscope.permutation`) before tensorizing; the layer
always rebuilds. It is for training from scratch (``ts.tensorize(model, plan,
init="random")``): ``factorize`` refuses it, because a TT-SVD of a shuffled trained weight
loses more than of the weight itself (:meth:`TT.factorize_refusal`).

References
----------
Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011 (TT-SVD).
Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
Garipov, Podoprikhin, Novikov, Vetrov, "Ultimate tensorization: compressing convolutional
and FC layers alike", NeurIPS 2016 workshop, arXiv:1611.03214.
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .. import linalg
from ..errors import DecompositionError, PlanError, RankError
from ..layers import FactorizedLayer
from ..permutation import MAX_SEED, seeded_permutation
from ..tt_layers import TTConv2d, TTLinear, tt_conv_flops, tt_conv_mode, tt_linear_flops, tt_linear_mode
from .base import (
    Factors,
    LayerGeometry,
    Method,
    Option,
    RankAxis,
    check_finite,
    compute_dtype,
    resolve_int_rank,
)
from .registry import register_method


class DataIgnoredWarning(UserWarning):
    """Calibration data was given to a method that cannot use it."""

__all__ = ["TT", "tt_shapes", "tt_svd", "default_tt_order", "LAYER_OPTIONS", "calls_batch", "layer_options"]

#: the plan options every tensorized method (tt, tr) takes besides its shapes
LAYER_OPTIONS = {
    "mode": Option("choice", choices=("auto", "sweep", "rebuild"),
                   help="'sweep' never forms the weight, 'rebuild' forms it per call then runs one dense "
                        "layer, 'auto' (default) lets a cost model pick at build"),
    "batch": Option("int", 1, 1 << 20, help="samples per call the 'auto' mode assumes (default 1); count_flops "
                                            "too, for a geometry measured without an example input"),
    "shuffle": Option("int", 0, MAX_SEED, help="seed of a fixed permutation of the flattened weight (RsTD): "
                                               "the layer always rebuilds; for tensorize + training only"),
}


def layer_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``mode`` (None for automatic), ``batch`` and ``shuffle`` of a plan entry, defaults filled in."""
    options = options or {}
    mode = options.get("mode")
    return {"mode": None if mode in (None, "auto") else mode, "batch": int(options.get("batch", 1)),
            "shuffle": options.get("shuffle")}


def calls_batch(geom: LayerGeometry, options: Mapping[str, Any] | None) -> int:
    """Samples per call a rebuilding layer's FLOPs per sample are stated at: the example
    input's (``geom.batch``, so the prediction equals ``ts.count_flops`` of the built layer on
    it), else ``options["batch"]`` (default 1). The mode is chosen from ``options["batch"]``
    only: the built layer knows nothing else."""
    return geom.batch if geom.batch is not None else layer_options(options)["batch"]


def check_layer_options(method: str, options: Mapping[str, Any], where: str = "") -> None:
    """Refuse ``shuffle`` with ``mode: "sweep"`` (a shuffled layer always rebuilds)."""
    if options.get("shuffle") is not None and options.get("mode") == "sweep":
        raise PlanError(
            f"{where}{method}: shuffle={options['shuffle']} cannot run in mode 'sweep': a shuffled layer forms its "
            "weight in every call; set \"mode\": \"rebuild\" (or leave mode out) or drop \"shuffle\""
        )


def shuffle_refusal(method: str, options: Mapping[str, Any] | None) -> str | None:
    """Why a shuffled entry cannot be factorized from a trained weight (None when not shuffled)."""
    seed = (options or {}).get("shuffle")
    if seed is None:
        return None
    return (
        f"{method}: shuffle={seed} is for layers trained from scratch: a TT-SVD of a shuffled trained weight loses "
        "more than of the weight itself (relative error 0.63 against 0.48 at rank 32), so compress does not "
        "factorize it. Build the structure with ts.tensorize(model, plan, init='random') and train it, or drop "
        "\"shuffle\" from this entry to compress the trained weight"
    )


def given_layer_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``mode``/``batch``/``shuffle`` keys a plan entry gave (for factors' meta and the built layer)."""
    return {k: options[k] for k in LAYER_OPTIONS if options and options.get(k) is not None}


def permute_weight(w: torch.Tensor, seed: int | None) -> torch.Tensor:
    """``w`` with its flattened entries read in the order of ``seed``'s permutation (``w`` if None)."""
    if seed is None:
        return w
    perm = torch.from_numpy(seeded_permutation(seed, w.numel())).to(w.device)
    return w.reshape(-1)[perm].reshape(w.shape)

#: the largest number of cores :func:`tt_shapes` picks by itself
MAX_AUTO_ORDER = 4
#: average size ``m_k * n_k`` of a mode below which :func:`tt_shapes` uses fewer cores
MIN_AUTO_MODE = 16


# ---- shapes ------------------------------------------------------------------------------


def default_tt_order(in_features: int, out_features: int) -> int:
    """The number of cores :func:`tt_shapes` uses when ``d`` is not given.

    The largest ``d`` in ``[1, 4]`` for which every mode can hold on average at least 16
    entries (``in * out >= 16**d``): 1 below 256 weights (a 1-core TT is the dense matrix),
    2 up to 4095, 3 up to 65535, 4 from 65536 (e.g. 256 x 256) on.
    """
    size = int(in_features) * int(out_features)
    d = 1
    while d < MAX_AUTO_ORDER and MIN_AUTO_MODE ** (d + 1) <= size:
        d += 1
    return d


def _divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


@lru_cache(maxsize=4096)
def _balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """``d`` factors (ascending, 1s allowed) of ``n`` whose logarithms are closest to equal.

    Exact search over the non-decreasing factorizations, minimising the sum of squared
    log-factors (the product is fixed, so this is their variance); ties go to the
    lexicographically smallest tuple.
    """
    if d == 1:
        return (n,)
    divs = _divisors(n)
    best: list[Any] = [None, None]

    def rec(rem: int, k: int, lo: int, acc: tuple[int, ...], cost: float) -> None:
        if k == 1:
            if rem >= lo:
                cand = acc + (rem,)
                c = round(cost + math.log(rem) ** 2, 9)
                if best[0] is None or (c, cand) < (best[0], best[1]):
                    best[0], best[1] = c, cand
            return
        for f in divs:
            if f < lo:
                continue
            if f**k > rem:
                break
            if rem % f == 0:
                rec(rem // f, k - 1, f, acc + (f,), cost + math.log(f) ** 2)

    rec(n, d, 1, (), 0.0)
    return best[1]


def tt_shapes(in_features: int, out_features: int, d: int | None = None) -> tuple[list[int], list[int]]:
    """Split ``in_features`` and ``out_features`` into ``d`` factors each, as balanced as possible.

    Parameters
    ----------
    in_features, out_features : int
        Sizes to split (channels for a Conv2d).
    d : int, optional
        Number of cores; default :func:`default_tt_order` (1 for tiny layers, up to 4 for
        layers of 65536 weights or more).

    Returns
    -------
    (in_shape, out_shape) : two lists of ``d`` positive ints with products ``in_features``
        and ``out_features``. A size with fewer than ``d`` prime factors (e.g. a prime) gets
        factors of 1. ``in_shape`` is in descending order and ``out_shape`` ascending: the
        mode sizes ``m_k * n_k`` are as even as the factors allow, and the left-to-right
        sweep of :class:`~tensorscope.tt_layers.TTLinear` consumes the large input factors
        first while producing the small output factors first, which keeps its intermediates
        small (1024 x 1024 at rank 8: 0.66 MFLOPs against 1.77 with both shapes ascending).

    Examples
    --------
    >>> tt_shapes(1024, 1024)
    ([8, 8, 4, 4], [4, 4, 8, 8])
    >>> tt_shapes(61, 64, 3)
    ([61, 1, 1], [4, 4, 4])
    """
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise PlanError(f"tt_shapes: {name} must be a positive integer; got {v!r}")
    if d is None:
        d = default_tt_order(in_features, out_features)
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise PlanError(f"tt_shapes: the number of cores d must be a positive integer; got {d!r}")
    ins = _balanced_factors(int(in_features), int(d))
    outs = _balanced_factors(int(out_features), int(d))
    return list(ins[::-1]), list(outs)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _shape_option(options: Mapping[str, Any] | None, key: str) -> Any:
    if options is None:
        return None
    return options.get(key)


def _resolve_shapes(geom: LayerGeometry, options: Mapping[str, Any] | None,
                    method: str = "tt") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (in_shape, out_shape) of a layer: from ``options`` when given, else :func:`tt_shapes`.

    When only one of the two is given, the other is split into as many factors.
    """
    what_in, what_out = ("in_channels", "out_channels") if geom.kind == "conv2d" else ("in_features", "out_features")
    given = {"in_shape": _shape_option(options, "in_shape"), "out_shape": _shape_option(options, "out_shape")}
    sizes = {"in_shape": (what_in, geom.in_features), "out_shape": (what_out, geom.out_features)}
    shown = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in given.items()}
    auto = tt_shapes(geom.in_features, geom.out_features)

    def bad(msg: str) -> PlanError:
        return PlanError(
            f"{method}: {msg} (layer has {what_in}={geom.in_features}, {what_out}={geom.out_features}; given "
            f"in_shape={shown['in_shape']!r}, out_shape={shown['out_shape']!r}). Give two lists of positive "
            f"ints of equal length whose products are {geom.in_features} and {geom.out_features}, e.g. "
            f"in_shape={auto[0]}, out_shape={auto[1]}, or leave both out to factorize automatically"
        )

    for key, v in given.items():
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or not v:
            raise bad(f"{key} must be a non-empty list of ints")
        if not all(_is_int(x) for x in v):
            raise bad(f"{key} must hold integers only")
        if any(x < 1 for x in v):
            raise bad(f"{key} holds a non-positive entry")
        name, size = sizes[key]
        if math.prod(int(x) for x in v) != size:
            raise bad(f"{key} multiplies to {math.prod(int(x) for x in v)}, not {name}={size}")
    gi, go = given["in_shape"], given["out_shape"]
    if gi is None and go is None:
        return tuple(auto[0]), tuple(auto[1])
    if gi is not None and go is not None:
        if len(gi) != len(go):
            raise bad(f"in_shape has {len(gi)} factors but out_shape has {len(go)}")
        return tuple(int(x) for x in gi), tuple(int(x) for x in go)
    if gi is not None:
        return tuple(int(x) for x in gi), tuple(tt_shapes(geom.in_features, geom.out_features, len(gi))[1])
    return tuple(tt_shapes(geom.in_features, geom.out_features, len(go))[0]), tuple(int(x) for x in go)


def _mode_sizes(geom: LayerGeometry, in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Sizes of the modes of the reshaped weight, in TT order (spatial mode first for conv)."""
    modes = [m * n for m, n in zip(out_shape, in_shape)]
    return [geom.khw] + modes if geom.kind == "conv2d" else modes


def _bond_max(modes: Sequence[int]) -> tuple[int, ...]:
    """Ranks at which TT-SVD is exact: bond k is min(prod of modes left of it, prod right of it)."""
    inner = [min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :])) for k in range(len(modes) - 1)]
    return (1, *inner, 1)


# ---- TT-SVD ------------------------------------------------------------------------------


def _thin_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linalg.thin_svd(mat)


def tt_svd(tensor: torch.Tensor, rank: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011): cores ``(r_{k-1}, s_k, r_k)`` of a tensor with modes ``s_k``.

    Parameters
    ----------
    tensor : torch.Tensor
        A d-way tensor (computed in its own dtype; pass float32 or float64).
    rank : sequence of d + 1 ints, 1 at both ends
        Bond ranks. A bond larger than the unfolding allows is padded with zero columns, so
        the cores always have the requested shapes.

    Returns
    -------
    list of d tensors; their chain product is the best rank-truncated sequential
    approximation (exact when every bond is at least the unfolding's rank).
    """
    modes = list(tensor.shape)
    d = len(modes)
    if len(rank) != d + 1 or rank[0] != 1 or rank[-1] != 1:
        raise ValueError(f"tt_svd: need {d + 1} ranks with 1 at both ends for a {d}-way tensor; got {list(rank)}")
    cores = []
    rest = tensor.reshape(1, -1)
    for k in range(d - 1):
        mat = rest.reshape(rank[k] * modes[k], -1)
        u, s, vh = _thin_svd(mat)
        r = min(rank[k + 1], s.shape[0])
        u, s, vh = u[:, :r], s[:r], vh[:r]
        core = u
        rest = s[:, None] * vh
        if r < rank[k + 1]:  # the unfolding has lower rank than asked: pad with zeros
            pad = rank[k + 1] - r
            core = torch.cat([core, core.new_zeros(core.shape[0], pad)], dim=1)
            rest = torch.cat([rest, rest.new_zeros(pad, rest.shape[1])], dim=0)
        cores.append(core.reshape(rank[k], modes[k], rank[k + 1]))
    cores.append(rest.reshape(rank[d - 1], modes[d - 1], 1))
    return cores


# ---- the method --------------------------------------------------------------------------


@register_method
class TT(Method):
    speed_note = ("TT layers sweep the input through the cores or rebuild the weight per call, whichever a cost "
                  "model expects faster for the plan's batch: on CPU a TT Linear ran faster than dense at batch 1, "
                  "and 0.7-13x the dense time at batch 128 (a sweep alone: up to 211x; docs/benchmarks.md); TT "
                  "buys parameters, not speed")
    """Tensor-Train: TT-matrix for Linear (Novikov et al. 2015), TT-conv for Conv2d (Garipov et al. 2016).

    Canonical rank: the tuple of bond ranks with 1 at both ends (``d + 1`` ints for Linear,
    ``d + 2`` for Conv2d, whose first inner bond joins the spatial core). ``options`` may
    carry ``in_shape`` and ``out_shape`` (see :func:`tt_shapes` for the default).
    """

    name = "tt"
    kinds = ("linear", "conv2d")
    description = "Tensor-Train: cores (r, m_k, n_k, r') contracted one GEMM at a time; rank is the list of bonds"
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

    def factorize_refusal(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> str | None:
        """A ``shuffle`` entry: TT-SVD of a shuffled trained kernel loses more (tensorize and train it)."""
        return shuffle_refusal(self.name, options)

    def resolve_mode(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> str:
        """``"sweep"`` or ``"rebuild"``: what the built layer will run (the cost model's pick for "auto")."""
        in_shape, out_shape = _resolve_shapes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        lo = layer_options(options)
        if lo["shuffle"] is not None:
            return "rebuild"
        if lo["mode"] is not None:
            return lo["mode"]
        if geom.kind == "linear":
            return tt_linear_mode(in_shape, out_shape, ranks, lo["batch"])
        return tt_conv_mode(in_shape, out_shape, ranks, geom.kernel_size)

    def rank_axes(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> tuple[RankAxis, ...]:
        """One axis per inner bond (the 1s at both ends are fixed); default bonds of at most 16
        (TT pays off at small bonds; FLOPs grow with their product)."""
        inner = self.max_rank(geom, options)[1:-1]
        first = 1 if geom.kind == "conv2d" else 0
        axes = []
        for k, b in enumerate(inner, 1):
            what = "spatial core to channel cores" if first and k == 1 else f"cores {k - first} and {k - first + 1}"
            axes.append(RankAxis(f"bond{k}", f"TT bond {k}", 1, int(b), max(1, min(int(b) // 2, 16)),
                                 help=f"the bond between {what}"))
        return tuple(axes)

    def rank_from_axes(self, geom: LayerGeometry, values, options=None) -> tuple[int, ...]:
        return self.resolve_rank(geom, (1, *(int(v) for v in values), 1), options)

    def axis_values(self, rank) -> tuple[int, ...]:
        return tuple(int(r) for r in rank[1:-1])

    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        reason = super().unsupported_reason(geom)
        if reason:
            return reason
        if geom.kind == "conv2d" and geom.groups != 1:
            return (
                f"method 'tt' does not support grouped convolutions (groups={geom.groups}): TT-conv "
                "factors one kernel over all input channels; use another method or leave this layer dense"
            )
        return None

    # ---- ranks ---------------------------------------------------------------------------
    def max_rank(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        in_shape, out_shape = _resolve_shapes(geom, options)
        return _bond_max(_mode_sizes(geom, in_shape, out_shape))

    def resolve_rank(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        """Canonical bond ranks from an int, a fraction in (0, 1] or the full list.

        * int ``r`` in ``[1, max inner bond]``: every inner bond becomes ``min(r, its max)``;
        * float ``f`` in (0, 1]: every inner bond becomes ``max(1, round(f * its max))``;
        * list/tuple of the full length, 1 at both ends, inner bond ``k`` in ``[1, max_k]``.
        """
        in_shape, out_shape = _resolve_shapes(geom, options)
        bmax = _bond_max(_mode_sizes(geom, in_shape, out_shape))
        inner = bmax[1:-1]
        top = max(inner, default=1)
        where = f"in_shape={list(in_shape)}, out_shape={list(out_shape)}" + (
            f", kernel {geom.kernel_size[0]}x{geom.kernel_size[1]}" if geom.kind == "conv2d" else ""
        )
        if isinstance(rank, (list, tuple)):
            ranks = list(rank)
            form = (
                f"a list of {len(bmax)} ints with 1 at both ends and inner bonds within the maximum "
                f"{list(bmax)} for this layer ({where})"
            )
            if len(ranks) != len(bmax):
                raise RankError(f"tt: rank {ranks!r} has {len(ranks)} entries; expected {form}")
            if not all(_is_int(r) for r in ranks):
                raise RankError(f"tt: rank {ranks!r} must hold integers only; expected {form}")
            if ranks[0] != 1 or ranks[-1] != 1:
                raise RankError(f"tt: rank {ranks!r} must start and end with 1; expected {form}")
            for k, (r, mx) in enumerate(zip(ranks[1:-1], inner), start=1):
                if not 1 <= r <= mx:
                    raise RankError(f"tt: bond {k} of rank {ranks!r} is {r}, outside [1, {mx}]; expected {form}")
            return tuple(int(r) for r in ranks)
        if _is_int(rank):
            rank = int(rank)
        if isinstance(rank, float) and math.isfinite(rank) and 0.0 < rank <= 1.0:
            bonds = (resolve_int_rank(self.name, geom, rank, mx, what=f"bond {k}") for k, mx in enumerate(inner, 1))
            return (1, *bonds, 1)
        try:
            r = resolve_int_rank(self.name, geom, rank, top)
        except RankError as e:
            raise RankError(f"{e}; or give the full list of bond ranks, at most {list(bmax)} ({where})") from None
        return (1, *(min(r, mx) for mx in inner), 1)

    # ---- cost ----------------------------------------------------------------------------
    def count_params(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> int:
        in_shape, out_shape = _resolve_shapes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        modes = _mode_sizes(geom, in_shape, out_shape)
        n = sum(ranks[k] * modes[k] * ranks[k + 1] for k in range(len(modes)))
        return n + (geom.out_features if geom.bias else 0)

    def count_flops(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> int | None:
        """FLOPs of one sample (``mm``/``conv`` only, 2 per multiply-add; bias not counted).

        Follows :meth:`resolve_mode`. Sweep, Linear: the cheaper of the two sweeps of
        :mod:`tensorscope.tt_layers`, times ``geom.tokens``; Conv2d: the spatial convolution
        plus the channel sweep over the output positions. Rebuild: forming the weight once
        per call, shared by its :func:`calls_batch` samples, plus the dense layer's FLOPs.
        None for a Conv2d whose input size is unknown.
        """
        in_shape, out_shape = _resolve_shapes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        mode, batch = self.resolve_mode(geom, ranks, options), calls_batch(geom, options)
        if geom.kind == "linear":
            return tt_linear_flops(in_shape, out_shape, ranks, geom.tokens, mode, batch)
        out = geom.out_size
        if out is None:
            return None
        return tt_conv_flops(in_shape, out_shape, ranks, geom.kernel_size, out, mode, batch)

    # ---- factorize and build -------------------------------------------------------------
    def _check(self, geom: LayerGeometry) -> None:
        reason = self.unsupported_reason(geom)
        if reason:
            raise DecompositionError(reason)

    def factorize(
        self,
        layer: nn.Module,
        rank: Any,
        options: Mapping[str, Any] | None = None,
        *,
        stats: Any = None,
        refine: bool = True,
    ) -> Factors:
        """TT-SVD of the reshaped weight (data-free).

        The weight ``(m_1..m_d, n_1..n_d)`` is permuted to modes ``(m_1 n_1, ..., m_d n_d)``
        (a Conv2d's ``kh*kw`` spatial mode first) and split by :func:`tt_svd` in
        ``compute_dtype(weight.dtype)``; the cores are cast back to the weight's dtype.
        ``stats`` and ``refine`` are accepted and ignored: TT-SVD is already the cheapest
        factorization, and data-aware TT is not implemented yet. A ``shuffle`` entry is
        refused with a :class:`PlanError` (:meth:`factorize_refusal`).
        """
        refusal = shuffle_refusal(self.name, options)
        if refusal:
            raise PlanError(refusal)
        check_finite(layer)
        if stats is not None:
            warnings.warn("tt ignores the calibration data: its factors minimise the weight's error, not the "
                          "output's (data-aware TT is not implemented); svd, tucker2 and cp use the data",
                          DataIgnoredWarning, stacklevel=3)
        geom = LayerGeometry.of(layer)
        self._check(geom)
        in_shape, out_shape = _resolve_shapes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        d = len(in_shape)
        w = layer.weight.detach().to(compute_dtype(layer.weight.dtype))
        if geom.kind == "linear":
            t = w.reshape(*out_shape, *in_shape)
            perm = [i for k in range(d) for i in (k, d + k)]
            t = t.permute(*perm).reshape(_mode_sizes(geom, in_shape, out_shape))
            cores = tt_svd(t, ranks)
            cores = [c.reshape(ranks[k], out_shape[k], in_shape[k], ranks[k + 1]) for k, c in enumerate(cores)]
        else:
            t = w.reshape(*out_shape, *in_shape, geom.khw)
            perm = [2 * d] + [i for k in range(d) for i in (k, d + k)]
            t = t.permute(*perm).reshape(_mode_sizes(geom, in_shape, out_shape))
            cores = tt_svd(t, ranks)
            cores = [cores[0]] + [
                c.reshape(ranks[k + 1], out_shape[k], in_shape[k], ranks[k + 2]) for k, c in enumerate(cores[1:])
            ]
        tensors = {f"core{k}": c.to(layer.weight.dtype).contiguous() for k, c in enumerate(cores)}
        return Factors(method=self.name, rank=ranks, tensors=tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape), **given_layer_options(options)})

    def _module(self, geom: LayerGeometry, in_shape, out_shape, ranks, device=None, dtype=None,
                options: Mapping[str, Any] | None = None) -> nn.Module:
        lo = layer_options(options)
        kw = {"mode": lo["mode"], "batch": lo["batch"], "shuffle": lo["shuffle"], "device": device, "dtype": dtype}
        if geom.kind == "linear":
            return TTLinear(in_shape, out_shape, ranks, bias=geom.bias, **kw)
        return TTConv2d(
            in_shape, out_shape, ranks, geom.kernel_size, stride=geom.stride, padding=geom.padding,
            dilation=geom.dilation, bias=geom.bias, padding_mode=geom.padding_mode, **kw,
        )

    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        geom = LayerGeometry.of(layer)
        self._check(geom)
        opts = {"in_shape": factors.meta.get("in_shape"), "out_shape": factors.meta.get("out_shape")}
        in_shape, out_shape = _resolve_shapes(geom, opts)
        ranks = self.resolve_rank(geom, factors.rank, opts)
        given = given_layer_options(factors.meta)
        w = layer.weight
        mod = self._module(geom, in_shape, out_shape, ranks, device=w.device, dtype=w.dtype, options=given)
        names = [n for n, _ in mod.named_parameters() if n.startswith("core")]
        if sorted(factors.tensors) != sorted(names):
            raise DecompositionError(
                f"tt: factors hold tensors {sorted(factors.tensors)} but a layer with in_shape={list(in_shape)}, "
                f"out_shape={list(out_shape)} needs {names}; factorize the layer again"
            )
        with torch.no_grad():
            for n in names:
                p, t = getattr(mod, n), factors.tensors[n]
                if tuple(t.shape) != tuple(p.shape):
                    raise DecompositionError(
                        f"tt: factor {n} has shape {tuple(t.shape)} but rank {ranks} with in_shape={list(in_shape)}, "
                        f"out_shape={list(out_shape)} needs {tuple(p.shape)}; factorize the layer again"
                    )
                p.copy_(t)
            if mod.bias is not None:
                mod.bias.copy_(layer.bias.detach())
        return FactorizedLayer(
            mod, method=self.name, rank=ranks, source=type(layer).__name__,
            options={"in_shape": list(in_shape), "out_shape": list(out_shape), **given},
        )

    def empty_factors(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> Factors:
        in_shape, out_shape = _resolve_shapes(geom, options)
        ranks = self.resolve_rank(geom, rank, options)
        mod = self._module(geom, in_shape, out_shape, ranks, device="meta", dtype=geom.dtype)  # shapes only
        tensors = {n: torch.zeros(p.shape, dtype=geom.dtype) for n, p in mod.named_parameters() if n.startswith("core")}
        return Factors(method=self.name, rank=ranks, tensors=tensors,
                       meta={"in_shape": list(in_shape), "out_shape": list(out_shape), **given_layer_options(options)})

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        """The dense weight of the TT (forms it: for previews, not for the forward)."""
        geom = LayerGeometry.of(layer)
        in_shape = [int(x) for x in factors.meta["in_shape"]]
        out_shape = [int(x) for x in factors.meta["out_shape"]]
        w = layer.weight
        cd = compute_dtype(w.dtype)
        d = len(in_shape)
        conv = geom.kind == "conv2d"
        channel = [factors.tensors[f"core{k + int(conv)}"].to(device=w.device, dtype=cd) for k in range(d)]
        if conv:
            s = factors.tensors["core0"].to(device=w.device, dtype=cd)
            acc = s.reshape(geom.khw, 1, 1, -1)  # (khw, M, N, r)
        else:
            acc = torch.ones(1, 1, 1, 1, dtype=cd, device=w.device)
        for g in channel:
            lead, mm, nn_, _ = acc.shape
            acc = torch.einsum("pabr,rmns->pambns", acc, g)
            acc = acc.reshape(lead, mm * g.shape[1], nn_ * g.shape[2], g.shape[3])
        acc = acc[..., 0]  # (khw or 1, O, I)
        if conv:
            out = acc.permute(1, 2, 0).reshape(w.shape)
        else:
            out = acc.reshape(w.shape)
        return permute_weight(out, factors.meta.get("shuffle")).to(w.dtype)
