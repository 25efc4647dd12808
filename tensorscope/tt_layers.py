"""Tensor-Train layers: ``TTLinear`` (TT-matrix) and ``TTConv2d`` (TT-conv), and what the
tensor-ring layers (:mod:`tensorscope.tr_layers`) share with them.

Both store their cores as plain ``nn.Parameter`` attributes ``core0``, ``core1``, ... and
keep every shape as a Python int tuple set in ``__init__``, so ``torch.jit.trace`` and
``torch.export.export`` (with a dynamic batch dimension) see only reshapes, permutes,
indexing, ``mm``, ``linear`` and ``conv2d``: an export runs with torch alone.

TT-matrix (Novikov et al. 2015). ``in_features = prod(in_shape)`` (the ``n_k``),
``out_features = prod(out_shape)`` (the ``m_k``), ``k = 1..d``; core ``k`` has shape
``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1`` and

    W[(m_1..m_d), (n_1..n_d)] = G_1[:, m_1, n_1, :] @ ... @ G_d[:, m_d, n_d, :]

with row-major multi-indices (``m_1``/``n_1`` most significant).

Two modes. ``"sweep"`` never forms ``W``: it passes the input through the cores one ``mm``
per core. ``"rebuild"`` forms ``W`` from the cores on every call (differentiably; nothing
is cached, so a weight never goes stale after an optimizer step) and runs one
``F.linear``/``F.conv2d``. ``mode=None`` lets a cost model pick when the module is
built (:func:`choose_mode`); the choice depends on shapes, ranks and the expected batch
only, so a plan rebuilds the same module on load.

Sweep order. With ``B`` rows of input (all leading dimensions flattened), ``M_<k =
m_1...m_{k-1}``, ``N_>k = n_{k+1}...n_d`` and so on:

* left-to-right ("ltr"): core ``k = 1..d`` contracts ``(r_{k-1}, n_k)``; the ``mm`` is
  ``(B*M_<k*N_>k, r_{k-1}*n_k) @ (r_{k-1}*n_k, m_k*r_k)``;
* right-to-left ("rtl"): core ``k = d..1`` contracts ``(n_k, r_k)``; the ``mm`` is
  ``(B*N_<k*M_>k, n_k*r_k) @ (n_k*r_k, r_{k-1}*m_k)``.

Either way the FLOPs (2 per multiply-add, as ``FlopCounterMode`` counts) are

    ltr: 2*B * sum_k M_<k * N_>k * r_{k-1} * m_k * n_k * r_k
    rtl: 2*B * sum_k N_<k * M_>k * r_{k-1} * m_k * n_k * r_k

``TTLinear`` takes the cheaper of the two (ties go to ltr); the choice depends on shapes and
ranks only (:func:`tt_sweep_direction`), so it is fixed when the module is built. Between two
``mm`` calls there is one permute-copy of the intermediate; the bias is added at the end.

Rebuild. :func:`ring_matrix` forms ``W`` core by core, keeping it laid out as a matrix
(rows ``m_1..m_k``, then columns ``n_1..n_k``, then the open bond): each core joins with one
``mm`` per output factor ``m_k`` written into its block, so the full weight is never permuted.
Its FLOPs (:func:`linear_form_flops`) are

    2 * sum_{k=2..d-1} r_0 * S_<k * r_{k-1} * s_k * r_k  +  2 * S_<d * r_{d-1} * r_0 * s_d

(``s_k = m_k*n_k`` the mode sizes, ``S_<k`` their product before ``k``, ``r_0 = 1`` for TT),
and a call with ``B`` rows adds the dense ``2*B*in*out``.

TT-conv (Garipov et al. 2016). ``in_channels = prod(in_shape)``, ``out_channels =
prod(out_shape)``. ``core0`` is the spatial core, shape ``(1, kh*kw, r_1)``; cores
``1..d`` are channel cores ``(r_k, m_k, n_k, r_{k+1})``, ranks ``(1, r_1, ..., r_d, 1)``.
Sweep: ``x`` (B, C, H, W) -> (B*C, 1, H, W) -> ``conv2d`` with the spatial core as an
``r_1``-output filter (the original stride, padding, dilation and padding mode) ->
(B*C, r_1, H', W') -> the left-to-right sweep over the channel cores with the B*H'*W'
positions as rows -> (B, O, H', W') + bias. FLOPs per sample:

    2*C*r_1*kh*kw*H'*W' + 2*H'*W' * sum_k M_<k * N_>k * r_k * m_k * n_k * r_{k+1}

Rebuild (:func:`ring_kernel`) forms the channel chain ``(r_1, O, C)`` and multiplies it by the
spatial core into the ``(O, C, kh, kw)`` kernel, then runs one ``conv2d``:
:func:`conv_form_flops` per call plus ``2*O*C*kh*kw*H'*W'`` per sample.

The cost model (:func:`choose_mode`). Each mode's :class:`Work` (FLOPs, elements its kernels
read and write, kernel calls) is weighed into one cost; FLOPs alone mispredict on a CPU
(forming ``W`` is bound by memory, a sweep by many thin ``mm`` calls and copies). A Linear
compares the two for ``batch`` rows per call. A Conv2d compares them per output position:
forming the kernel is paid once per call and shared by ``B*H'*W'`` positions (thousands),
so it is left out; the input size is not known when the module is built. The methods'
``count_flops`` of a rebuilding layer states FLOPs per sample at the example input's batch
(``LayerGeometry.batch``; ``batch`` without an example): forming ``W`` once per call, divided
among the call's samples and rounded down, as ``ts.count_flops`` divides a batch's total.

Initialisation (:meth:`reset_parameters`). The cores are drawn i.i.d. normal with mean 0
and variance ``v``. An entry of the rebuilt weight is a sum over every combination of the
bond indices (``P = r_0 * r_1 * ... * r_{n-1}`` terms for ``n`` cores, ring bond included)
of a product of ``n`` core entries; the terms are uncorrelated, so its variance is ``P *
v**n``. Setting that to Glorot's ``2 / (fan_in + fan_out)`` (Glorot and Bengio 2010; for a
conv ``fan_in = C*kh*kw``, ``fan_out = O*kh*kw``, as torch counts them) gives

    v = (2 / (fan_in + fan_out) / P) ** (1 / n)

(:func:`glorot_core_std` returns ``sqrt(v)``). The bias is uniform in ``+-1/sqrt(fan_in)``,
as ``nn.Linear``/``nn.Conv2d`` draw theirs. New modules are initialised this way, so an
unfactorized layer trains (its cores get non-zero gradients).

Shuffling (RsTD). ``shuffle=seed`` fixes a permutation ``perm`` of the flattened weight
(:func:`tensorscope.permutation.seeded_permutation`): the layer computes with
``W.flatten() = T.flatten()[perm]``, ``T`` the weight the cores represent. Such a layer
always rebuilds. ``perm`` is a non-persistent buffer: a plan stores the seed, a
``torch.export``/TorchScript file carries the indices, and
:meth:`tensorscope_checksum` is what a tensorscope checkpoint records to refuse a
permutation generated differently.

References
----------
Novikov, Podoprikhin, Osokin, Vetrov, "Tensorizing Neural Networks", NeurIPS 2015.
Garipov, Podoprikhin, Novikov, Vetrov, "Ultimate tensorization: compressing convolutional
and FC layers alike", NeurIPS 2016 workshop, arXiv:1611.03214.
Glorot, Bengio, "Understanding the difficulty of training deep feedforward neural
networks", AISTATS 2010.
RsTD: random shuffling of the weight's entries before tensorizing (tensorscope issue 17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .permutation import permutation_checksum, seeded_permutation

__all__ = [
    "CALL_COST",
    "ELEMENT_COST",
    "MODES",
    "TTConv2d",
    "TTLinear",
    "TensorizedConv2d",
    "TensorizedLinear",
    "Work",
    "choose_mode",
    "conv_form_flops",
    "glorot_core_std",
    "linear_form_flops",
    "ring_kernel",
    "ring_matrix",
    "tt_conv_flops",
    "tt_conv_mode",
    "tt_linear_flops",
    "tt_linear_mode",
    "tt_sweep_direction",
    "tt_sweep_flops",
]

#: the modes a tensorized layer runs in ("auto"/None picks one of them when it is built)
MODES = ("sweep", "rebuild")


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(xs))


def _ints(name: str, v: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(x) for x in v)
    if any(x < 1 for x in out):
        raise ValueError(f"{name} must hold positive integers; got {list(v)}")
    return out


# ---- the cost model ------------------------------------------------------------------------

#: cost of reading or writing one tensor element, in FLOPs (1 thread; measured, see :func:`choose_mode`)
ELEMENT_COST = 150.0
#: cost of one kernel call (an ``mm``, a copy), in FLOPs: the fixed overhead of tiny layers
CALL_COST = 1.0e5


@dataclass(frozen=True)
class Work:
    """What a forward call does: FLOPs (2 per multiply-add), tensor elements read and written
    by its kernels, and kernel calls. :attr:`cost` weighs them into one number of FLOPs."""

    flops: int = 0
    elements: int = 0
    calls: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.elements + other.elements, self.calls + other.calls)

    def __mul__(self, times: int) -> "Work":
        return Work(self.flops * times, self.elements * times, self.calls * times)

    @property
    def cost(self) -> float:
        return self.flops + ELEMENT_COST * self.elements + CALL_COST * self.calls


def _mm(rows: int, inner: int, cols: int) -> Work:
    return Work(2 * rows * inner * cols, rows * inner + inner * cols + rows * cols, 1)


def _copy(n: int) -> Work:
    return Work(0, 2 * n, 1)


def choose_mode(sweep: Work, rebuild: Work) -> str:
    """``"rebuild"`` when its :attr:`Work.cost` is below the sweep's, else ``"sweep"``.

    The cost is FLOPs plus :data:`ELEMENT_COST` per element a kernel reads or writes plus
    :data:`CALL_COST` per kernel call. FLOPs alone mispredict both modes on a CPU: forming
    the weight is bound by memory (writing and reading ``out*in`` elements costs more than its
    ``mm``), and a sweep runs many thin ``mm`` calls with a copy between each. The two
    constants were chosen on a grid to make the most picks within 10% of the faster mode,
    over 230 measured forwards (two sessions) of ``TTLinear`` 256..4096 wide, bond ranks
    2..32, batches 1..512, one thread, on the shared 2-core x86 machine of
    docs/benchmarks.md: 222 of 230 picks were within 10% (FLOPs alone: 194); the
    misses are close calls and small layers where both modes are far slower than dense.
    ``bench/tensorized_layers.py`` measures it again.
    """
    return "rebuild" if rebuild.cost < sweep.cost else "sweep"


def per_sample(form: int, dense_per_sample: int, batch: int) -> int:
    """FLOPs per sample of a rebuilding layer called with ``batch`` samples: ``(form + batch *
    dense) // batch`` (forming ``W`` once per call, shared; rounded down like ``ts.count_flops``)."""
    batch = max(1, int(batch))
    return (int(form) + batch * int(dense_per_sample)) // batch


def glorot_core_std(fan_in: int, fan_out: int, ranks: Sequence[int]) -> float:
    """Standard deviation of i.i.d. normal cores whose rebuilt weight has Glorot variance.

    ``ranks`` are the bonds of ``n = len(ranks) - 1`` cores, ``ranks[0] == ranks[-1]``. With
    ``P = prod(ranks[:-1])`` index paths, ``Var(W_ij) = P * v**n``; solving ``P * v**n = 2 /
    (fan_in + fan_out)`` gives ``v``, and this returns ``sqrt(v)``.
    """
    n = len(ranks) - 1
    paths = _prod(ranks[:-1])
    target = 2.0 / (fan_in + fan_out)
    return math.exp((math.log(target) - math.log(paths)) / (2 * n))


# ---- sweeps: FLOPs and work ------------------------------------------------------------------


def tt_sweep_flops(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1, direction: str = "ltr"
) -> int:
    """FLOPs of one TT-matrix sweep over ``rows`` input rows (2 per multiply-add, ``mm`` only).

    ``ranks`` has length ``d + 1``; its ends need not be 1 (TT-conv's channel sweep starts
    from the spatial bond).
    """
    return tt_sweep_work(in_shape, out_shape, ranks, rows, direction).flops


def tt_sweep_work(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1, direction: str = "ltr"
) -> Work:
    """The :class:`Work` of a TT-matrix sweep over ``rows`` rows, kernel by kernel (the copy of
    the input or intermediate before each ``mm``, each core's reshape, the ``mm``)."""
    d = len(in_shape)
    w = Work()
    for k in range(d):  # core k (0-based) has shape (ranks[k], m_k, n_k, ranks[k+1])
        core = ranks[k] * out_shape[k] * in_shape[k] * ranks[k + 1]
        if direction == "ltr":
            r = rows * _prod(out_shape[:k]) * _prod(in_shape[k + 1 :])
            inner, cols = ranks[k] * in_shape[k], out_shape[k] * ranks[k + 1]
        elif direction == "rtl":
            r = rows * _prod(in_shape[:k]) * _prod(out_shape[k + 1 :])
            inner, cols = in_shape[k] * ranks[k + 1], ranks[k] * out_shape[k]
        else:
            raise ValueError(f"direction must be 'ltr' or 'rtl'; got {direction!r}")
        w = w + _copy(r * inner) + _copy(core) + _mm(r, inner, cols)
    return w


def tt_sweep_direction(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> str:
    """The cheaper sweep for a TT-matrix: ``"rtl"`` when strictly fewer FLOPs, else ``"ltr"``."""
    ltr = tt_sweep_flops(in_shape, out_shape, ranks, 1, "ltr")
    rtl = tt_sweep_flops(in_shape, out_shape, ranks, 1, "rtl")
    return "rtl" if rtl < ltr else "ltr"


# ---- rebuild: forming the weight ---------------------------------------------------------------


#: a step's result up to this many elements is formed by one ``mm`` and one permute; larger
#: ones by one ``mm`` per output factor written into its block (fewer passes over memory)
BLOCKWISE_FROM = 1 << 16


def _step(acc: torch.Tensor, core: torch.Tensor, a: int, p: int, q: int, r: int, m: int, n: int,
          s: int) -> torch.Tensor:
    """``(a, P, Q, r) x (r, m, n, s) -> (a, P*m, Q*n, s)``: one core joins the matrix being formed.

    The result is laid out as a matrix (rows ``P, m`` before columns ``Q, n``). Small results
    come from one ``mm`` and one permute; from :data:`BLOCKWISE_FROM` elements on, one ``mm``
    per output factor ``i`` is written into the ``[P, i, Q, n]`` block, so the whole is never
    permuted (each block's copy stays small enough for the cache). The sizes are Python ints
    (a trace sees constants).
    """
    left = acc.reshape(a * p * q, r)
    if a * p * q * m * n * s < BLOCKWISE_FROM or m == 1:
        out = torch.mm(left, core.reshape(r, m * n * s)).reshape(a, p, q, m, n * s).permute(0, 1, 3, 2, 4)
        return out.reshape(a, p * m, q * n, s)
    out = acc.new_empty(a, p, m, q, n * s)
    for i in range(m):
        out[:, :, i] = torch.mm(left, core[:, i].reshape(r, n * s)).reshape(a, p, q, n * s)
    return out.reshape(a, p * m, q * n, s)


def _step_work(a: int, p: int, q: int, r: int, m: int, n: int, s: int) -> Work:
    size = a * p * q * m * n * s
    if size < BLOCKWISE_FROM or m == 1:
        return _mm(a * p * q, r, m * n * s) + _copy(size)
    return (_copy(r * n * s) + _mm(a * p * q, r, n * s) + _copy(a * p * q * n * s)) * m


def _matrix_of(cores: Sequence[torch.Tensor], ranks: Sequence[int], out_shape: Sequence[int],
               in_shape: Sequence[int]) -> torch.Tensor:
    """``(a, M, N, b)``: the chain of 4-way cores ``(r_k, m_k, n_k, r_{k+1})`` with its end bonds open."""
    acc, p, q = cores[0], out_shape[0], in_shape[0]
    for k in range(1, len(cores)):
        acc = _step(acc, cores[k], ranks[0], p, q, ranks[k], out_shape[k], in_shape[k], ranks[k + 1])
        p, q = p * out_shape[k], q * in_shape[k]
    return acc


def _matrix_work(ranks: Sequence[int], out_shape: Sequence[int], in_shape: Sequence[int]) -> Work:
    w, p, q = Work(), out_shape[0], in_shape[0]
    for k in range(1, len(in_shape)):
        w = w + _step_work(ranks[0], p, q, ranks[k], out_shape[k], in_shape[k], ranks[k + 1])
        p, q = p * out_shape[k], q * in_shape[k]
    return w


def _shapes_of(cores: Sequence[torch.Tensor]) -> tuple[list[int], list[int], list[int]]:
    """Bond ranks, output and input factors of 4-way cores ``(r, m, n, r')``."""
    ranks = [int(c.shape[0]) for c in cores] + [int(cores[-1].shape[3])]
    return ranks, [int(c.shape[1]) for c in cores], [int(c.shape[2]) for c in cores]


def ring_matrix(cores: Sequence[torch.Tensor], ranks: Sequence[int] | None = None,
                out_shape: Sequence[int] | None = None, in_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The ``(M, N)`` matrix of a chain or ring of cores ``(r_{k-1}, m_k, n_k, r_k)``, ``r_0 == r_d``.

    Entry ``((m_1..m_d), (n_1..n_d))`` is ``trace(G_1[:, m_1, n_1, :] @ ... @ G_d[:, m_d,
    n_d, :])`` (the single entry for a tensor train). Formed core by core (:func:`_step`),
    the last ``mm``s also closing the ring over ``(r_{d-1}, r_0)``; differentiable, FLOPs
    :func:`linear_form_flops`. ``ranks``, ``out_shape`` and ``in_shape`` (Python ints) are
    read from the cores when not given.
    """
    if ranks is None or out_shape is None or in_shape is None:
        ranks, out_shape, in_shape = _shapes_of(cores)
    d = len(cores)
    a = ranks[0]
    if d == 1:
        if a != 1 or ranks[1] != 1:
            raise ValueError("a one-core ring is the trace of one core: give it ranks (1, 1)")
        return cores[0].reshape(out_shape[0], in_shape[0])
    acc = _matrix_of(cores[:-1], ranks[:-1], out_shape[:-1], in_shape[:-1])  # (a, P, Q, b)
    p, q = _prod(out_shape[:-1]), _prod(in_shape[:-1])
    m, n, b = out_shape[-1], in_shape[-1], ranks[d - 1]
    last = cores[-1]
    left = acc.permute(1, 2, 3, 0).reshape(p * q, b * a)  # a view for a tensor train (a == 1)
    if p * q * m * n < BLOCKWISE_FROM or m == 1:
        right = last.permute(0, 3, 1, 2).reshape(b * a, m * n)
        return torch.mm(left, right).reshape(p, q, m, n).permute(0, 2, 1, 3).reshape(p * m, q * n)
    right = last.permute(1, 0, 3, 2).reshape(m, b * a, n)
    out = acc.new_empty(p, m, q, n)
    for i in range(m):
        out[:, i] = torch.mm(left, right[i]).reshape(p, q, n)
    return out.reshape(p * m, q * n)


def linear_form_work(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> Work:
    """The :class:`Work` of :func:`ring_matrix` for these shapes and ranks."""
    d = len(in_shape)
    if d == 1:
        return Work()
    a = ranks[0]
    w = _matrix_work(ranks[:-1], out_shape[:-1], in_shape[:-1])
    p, q = _prod(out_shape[:-1]), _prod(in_shape[:-1])
    m, n, b = out_shape[-1], in_shape[-1], ranks[d - 1]
    if a > 1:
        w = w + _copy(p * q * b * a)
    if p * q * m * n < BLOCKWISE_FROM or m == 1:
        return w + _copy(b * m * n * a) + _mm(p * q, b * a, m * n) + _copy(p * q * m * n)
    return w + _copy(b * m * n * a) + (_mm(p * q, b * a, n) + _copy(p * q * n)) * m


def linear_form_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """FLOPs of forming a TT/TR Linear's weight: ``2 * sum_{k=2..d-1} r_0 * S_<k * r_{k-1} *
    s_k * r_k + 2 * S_<d * r_{d-1} * r_0 * s_d`` (``s_k = m_k n_k``, ``S_<k`` their product
    before ``k``)."""
    return linear_form_work(in_shape, out_shape, ranks).flops


def ring_kernel(spatial: torch.Tensor, channel: Sequence[torch.Tensor], ranks: Sequence[int] | None = None,
                out_shape: Sequence[int] | None = None, in_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The ``(O*C, kh*kw)`` kernel of a TT/TR conv: spatial core ``(r_0, kh*kw, r_1)``, then
    channel cores ``(r_k, m_k, n_k, r_{k+1})`` with ``r_{d+1} == r_0``.

    The channel chain is formed first with ``r_1`` open on the left and ``r_0`` on the right
    (``(r_1, O, C, r_0)``), then one ``mm`` with the spatial core closes the ring; for a
    tensor train (``r_0 = 1``) that ``mm`` reads the chain transposed, without a copy.
    ``ranks`` are the conv's ``d + 2`` bonds (read from the cores when not given).
    """
    if ranks is None or out_shape is None or in_shape is None:
        channel_ranks, out_shape, in_shape = _shapes_of(channel)
        ranks = [int(spatial.shape[0]), *channel_ranks]
    b, a = ranks[0], ranks[1]
    acc = _matrix_of(channel, ranks[1:], out_shape, in_shape)  # (a, O, C, b), a = r_1, b = r_0
    oc = _prod(out_shape) * _prod(in_shape)
    if b == 1:
        return torch.mm(acc.reshape(a, oc).t(), spatial.reshape(-1, a).t())
    left = acc.permute(1, 2, 0, 3).reshape(oc, a * b)
    return torch.mm(left, spatial.permute(2, 0, 1).reshape(a * b, -1))


def conv_form_work(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], khw: int) -> Work:
    """The :class:`Work` of :func:`ring_kernel`; ``ranks`` are the conv's ``d + 2`` bonds."""
    b, a = ranks[0], ranks[1]
    w = _matrix_work(ranks[1:], out_shape, in_shape)  # the channel chain, r_1 open on the left
    oc = _prod(out_shape) * _prod(in_shape)
    if b > 1:
        w = w + _copy(a * oc * b) + _copy(a * b * khw)
    return w + _mm(oc, a * b, khw)


def conv_form_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], khw: int) -> int:
    """FLOPs of :func:`ring_kernel` (forming a TT/TR conv's kernel)."""
    return conv_form_work(in_shape, out_shape, ranks, khw).flops


def linear_rebuild_work(in_shape, out_shape, ranks, rows: int) -> Work:
    """Forming the weight, then ``F.linear`` of ``rows`` rows (bias added in the same kernel)."""
    return linear_form_work(in_shape, out_shape, ranks) + _mm(rows, _prod(in_shape), _prod(out_shape))


# ---- the tensor-train modes --------------------------------------------------------------------


def tt_linear_mode(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], batch: int = 1) -> str:
    """The mode :class:`TTLinear` picks by itself for ``batch`` rows per call (:func:`choose_mode`)."""
    direction = tt_sweep_direction(in_shape, out_shape, ranks)
    sweep = tt_sweep_work(in_shape, out_shape, ranks, batch, direction) + _copy(batch * _prod(out_shape))
    return choose_mode(sweep, linear_rebuild_work(in_shape, out_shape, ranks, batch))


def tt_linear_flops(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1,
    mode: str = "sweep", batch: int = 1,
) -> int:
    """FLOPs of one sample of ``rows`` rows (tokens) through a :class:`TTLinear` in ``mode``,
    called with ``batch`` samples at once (which matters to ``"rebuild"`` only)."""
    if mode == "sweep":
        return tt_sweep_flops(in_shape, out_shape, ranks, rows, tt_sweep_direction(in_shape, out_shape, ranks))
    form = linear_form_flops(in_shape, out_shape, ranks)
    return per_sample(form, 2 * rows * _prod(in_shape) * _prod(out_shape), batch)


def conv_dense_work_per_position(in_channels: int, out_channels: int, khw: int) -> Work:
    """One output position of a dense ``conv2d``: its FLOPs, reading the input and writing the output."""
    return Work(2 * out_channels * in_channels * khw, in_channels + out_channels, 0)


def tt_conv_mode(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], kernel_size) -> str:
    """The mode :class:`TTConv2d` picks by itself: the work per output position of the sweep
    against the dense conv (forming the kernel is shared by the ``B*H'*W'`` positions)."""
    khw = int(kernel_size[0]) * int(kernel_size[1])
    c, r1 = _prod(in_shape), ranks[1]
    sweep = Work(2 * c * r1 * khw, c + 3 * c * r1, 0) + tt_sweep_work(in_shape, out_shape, ranks[1:], 1, "ltr")
    sweep = Work(sweep.flops, sweep.elements, 0)  # per position: calls are shared by all positions
    return choose_mode(sweep, conv_dense_work_per_position(c, _prod(out_shape), khw))


def tt_conv_flops(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    kernel_size: Sequence[int],
    out_hw: Sequence[int],
    mode: str = "sweep",
    batch: int = 1,
) -> int:
    """FLOPs of one sample through a :class:`TTConv2d` with output spatial size ``out_hw``
    (in ``"rebuild"`` mode: called with ``batch`` samples at once)."""
    positions = int(out_hw[0]) * int(out_hw[1])
    khw = int(kernel_size[0]) * int(kernel_size[1])
    if mode == "sweep":
        conv = 2 * _prod(in_shape) * ranks[1] * khw * positions
        return conv + tt_sweep_flops(in_shape, out_shape, ranks[1:], positions, "ltr")
    form = conv_form_flops(in_shape, out_shape, ranks, khw)
    return per_sample(form, 2 * _prod(out_shape) * _prod(in_shape) * khw * positions, batch)


# ---- sweeps --------------------------------------------------------------------------------


def _ltr_sweep(rows: torch.Tensor, cores: list[torch.Tensor], in_shape, out_shape, ranks) -> torch.Tensor:
    """Left-to-right sweep; ``rows`` is the (-1, ranks[0]*n_1) matrix of the first step.

    After step k (0-based) the product is a contiguous (Bt, M_<k, N_>k, m_k, r_{k+1}).
    Returns the final product as a 2-D (Bt, M) tensor.
    """
    d = len(in_shape)
    z = rows
    m_before = 1
    for k in range(d):
        rk, mk, nk, rk1 = ranks[k], out_shape[k], in_shape[k], ranks[k + 1]
        if k > 0:
            n_after = _prod(in_shape[k + 1 :])
            # (Bt, M_<k-1, n_k, N_>k, m_{k-1}, r_k) -> (Bt, M_<k-1, m_{k-1}, N_>k, r_k, n_k)
            z = z.reshape(-1, m_before, nk, n_after, out_shape[k - 1], rk).permute(0, 1, 4, 3, 5, 2)
            m_before *= out_shape[k - 1]
            z = z.reshape(-1, rk * nk)
        mat = cores[k].permute(0, 2, 1, 3).reshape(rk * nk, mk * rk1)
        z = torch.mm(z, mat)
    return z.reshape(-1, _prod(out_shape))


def _rtl_sweep(x2d: torch.Tensor, cores: list[torch.Tensor], in_shape, out_shape, ranks) -> torch.Tensor:
    """Right-to-left sweep of a (Bt, N) input; after core k: (Bt, N_<k, M_>k, r_k, m_k)."""
    d = len(in_shape)
    z = x2d
    m_after = 1
    for k in range(d - 1, -1, -1):
        rk, mk, nk, rk1 = ranks[k], out_shape[k], in_shape[k], ranks[k + 1]
        n_before = _prod(in_shape[:k])
        if k == d - 1:
            z = z.reshape(-1, nk)
        else:
            # (Bt, N_<k, n_k, M_>k+1, r_{k+1}, m_{k+1}) -> (Bt, N_<k, m_{k+1}, M_>k+1, n_k, r_{k+1})
            z = z.reshape(-1, n_before, nk, m_after, rk1, out_shape[k + 1]).permute(0, 1, 5, 3, 2, 4)
            m_after *= out_shape[k + 1]
            z = z.reshape(-1, nk * rk1)
        mat = cores[k].permute(2, 3, 0, 1).reshape(nk * rk1, rk * mk)
        z = torch.mm(z, mat)
    # (Bt, M_>1, m_1) -> (Bt, m_1, M_>1)
    z = z.reshape(-1, m_after, out_shape[0]).permute(0, 2, 1)
    return z.reshape(-1, _prod(out_shape))




def _ltr_first(x2d: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Rows of the first left-to-right step of a (Bt, N) input: (Bt*N_>1, n_1)."""
    n1 = in_shape[0]
    rest = _prod(in_shape[1:])
    return x2d.reshape(-1, n1, rest).permute(0, 2, 1).reshape(-1, n1)


def _check_seed(shuffle) -> int | None:
    if shuffle is None:
        return None
    if isinstance(shuffle, bool) or not isinstance(shuffle, int) or not 0 <= shuffle < 2**64:
        raise ValueError(f"shuffle must be None or an integer seed in [0, 2**64); got {shuffle!r}")
    return int(shuffle)


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer (samples per call); got {batch!r}")
    return int(batch)


# ---- what TT and TR layers share -----------------------------------------------------------


class _Tensorized(nn.Module):
    """Mode, shuffle, rebuilt weight, initialisation and checksum of a tensorized layer.

    A subclass sets ``ranks`` (the bonds of its cores in chain order, ends equal),
    ``_weight_shape``, ``_fan_in``/``_fan_out``, ``bias`` and ``cores()``, and implements
    ``_formed()`` (the weight, contiguous, any shape of the right size), ``_sweep(x)`` and
    ``_auto_mode()``.
    """

    ranks: tuple[int, ...]
    bias: nn.Parameter | None
    perm: torch.Tensor | None

    def _setup(self, mode: str | None, batch: int, shuffle: int | None, device) -> None:
        """Check and keep mode, batch and shuffle; register the permutation buffer."""
        self.batch = _check_batch(batch)
        self.shuffle = _check_seed(shuffle)
        if mode == "auto":
            mode = None
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be 'sweep', 'rebuild', 'auto' or None; got {mode!r}")
        if self.shuffle is not None:
            if mode == "sweep":
                raise ValueError(
                    f"shuffle={self.shuffle}: a shuffled layer forms its weight in every call, so it cannot "
                    "sweep; give mode='rebuild' or leave mode out"
                )
            mode = "rebuild"
        self.mode = mode if mode is not None else self._auto_mode()
        n = _prod(self._weight_shape)
        if self.shuffle is None:
            self.register_buffer("perm", None, persistent=False)
        elif torch.device(device if device is not None else "cpu").type == "meta":
            self.register_buffer("perm", torch.empty(n, dtype=torch.long, device="meta"), persistent=False)
        else:
            perm = torch.from_numpy(seeded_permutation(self.shuffle, n))
            self.register_buffer("perm", perm.to(device) if device is not None else perm, persistent=False)

    def cores(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _formed(self) -> torch.Tensor:
        raise NotImplementedError

    def _auto_mode(self) -> str:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weight the cores represent, in the layer's layout (shuffle applied).

        Formed on every call from the current cores (differentiable, never cached), by
        :func:`ring_matrix` (Linear) or :func:`ring_kernel` (Conv2d).
        """
        w = self._formed()
        if self.perm is not None:
            w = w.reshape(-1)[self.perm]
        return w.reshape(self._weight_shape)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal cores whose rebuilt weight has Glorot variance ``2 / (fan_in + fan_out)``
        (:func:`glorot_core_std`); bias uniform in ``+-1/sqrt(fan_in)`` as in ``nn.Linear``."""
        std = glorot_core_std(self._fan_in, self._fan_out, self.ranks)
        for core in self.cores():
            core.normal_(0.0, std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self._fan_in)
            self.bias.uniform_(-bound, bound)

    def tensorscope_checksum(self) -> str | None:
        """What a tensorscope checkpoint records about this layer beyond its state dict: the
        checksum of its shuffle permutation (None when not shuffled)."""
        if self.perm is None:
            return None
        return f"shuffle {self.shuffle}: {permutation_checksum(self.perm)}"

    def _repr_tail(self) -> str:
        s = f", mode={self.mode!r}"
        if self.batch != 1:
            s += f", batch={self.batch}"
        if self.shuffle is not None:
            s += f", shuffle={self.shuffle}"
        return s


class TensorizedLinear(_Tensorized):
    """A Linear whose weight is a chain or ring of cores ``(r_k, m_k, n_k, r_{k+1})``: what
    :class:`TTLinear` and :class:`~tensorscope.tr_layers.TRLinear` share (see the module
    docstring for ``mode``, ``batch`` and ``shuffle``)."""

    def _init_linear(self, in_shape, out_shape, ranks, bias, mode, batch, shuffle, device, dtype) -> None:
        self.in_shape = _ints("in_shape", in_shape)
        self.out_shape = _ints("out_shape", out_shape)
        self.ranks = _ints("ranks", ranks)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        self.d = len(self.in_shape)
        self._check_ranks()
        self.in_features = _prod(self.in_shape)
        self.out_features = _prod(self.out_shape)
        self._weight_shape = (self.out_features, self.in_features)
        self._fan_in, self._fan_out = self.in_features, self.out_features
        kw = {"device": device, "dtype": dtype}
        for k in range(self.d):
            shape = (self.ranks[k], self.out_shape[k], self.in_shape[k], self.ranks[k + 1])
            self.register_parameter(f"core{k}", nn.Parameter(torch.empty(shape, **kw)))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self._setup(mode, batch, shuffle, device)
        self.reset_parameters()

    def _check_ranks(self) -> None:
        raise NotImplementedError

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(self.d)]

    def _formed(self) -> torch.Tensor:
        return ring_matrix(self.cores(), self.ranks, self.out_shape, self.in_shape)

    def _sweep(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "rebuild":
            return F.linear(x, self.dense_weight(), self.bias)
        lead = x.shape[:-1]
        y = self._sweep(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class TensorizedConv2d(_Tensorized):
    """A Conv2d whose kernel is a chain or ring of a spatial core ``(r_0, kh*kw, r_1)`` and
    channel cores ``(r_k, m_k, n_k, r_{k+1})``: what :class:`TTConv2d` and
    :class:`~tensorscope.tr_layers.TRConv2d` share."""

    def _init_conv(self, in_shape, out_shape, ranks, kernel_size, stride, padding, dilation, bias, padding_mode,
                   mode, batch, shuffle, device, dtype) -> None:
        self.in_shape = _ints("in_shape", in_shape)
        self.out_shape = _ints("out_shape", out_shape)
        self.ranks = _ints("ranks", ranks)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        self.d = len(self.in_shape)
        self._check_ranks()
        pair = lambda v: (int(v), int(v)) if isinstance(v, int) else tuple(int(t) for t in v)  # noqa: E731
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints; got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d)")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = pair(padding)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular'; got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        # what nn.Conv2d passes to F.pad for non-'zeros' padding modes (left, right, top, bottom)
        if isinstance(self.padding, str):
            rev = [0, 0, 0, 0]
            if self.padding == "same":
                for dil, k, i in zip(self.dilation, self.kernel_size, (1, 0)):
                    total = dil * (k - 1)
                    rev[2 * i] = total // 2
                    rev[2 * i + 1] = total - total // 2
            self._reversed_padding_repeated_twice = tuple(rev)
        else:
            p = self.padding
            self._reversed_padding_repeated_twice = (p[1], p[1], p[0], p[0])
        self.in_channels = _prod(self.in_shape)
        self.out_channels = _prod(self.out_shape)
        khw = self.kernel_size[0] * self.kernel_size[1]
        self._weight_shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self._fan_in, self._fan_out = self.in_channels * khw, self.out_channels * khw
        kw = {"device": device, "dtype": dtype}
        self.core0 = nn.Parameter(torch.empty((self.ranks[0], khw, self.ranks[1]), **kw))
        for k in range(self.d):
            shape = (self.ranks[k + 1], self.out_shape[k], self.in_shape[k], self.ranks[k + 2])
            self.register_parameter(f"core{k + 1}", nn.Parameter(torch.empty(shape, **kw)))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        self._setup(mode, batch, shuffle, device)
        self.reset_parameters()

    def _check_ranks(self) -> None:
        raise NotImplementedError

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(self.d + 1)]

    def _formed(self) -> torch.Tensor:
        cores = self.cores()
        return ring_kernel(cores[0], cores[1:], self.ranks, self.out_shape, self.in_shape)

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``conv2d`` with this layer's stride, padding, dilation and padding mode."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, None, self.stride, 0, self.dilation)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def _sweep(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        y = self._conv(x, self.dense_weight()) if self.mode == "rebuild" else self._sweep(x)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, dilation={self.dilation}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return (
            s + f", in_shape={self.in_shape}, out_shape={self.out_shape}, ranks={self.ranks}, "
            f"bias={self.bias is not None}" + self._repr_tail()
        )


# ---- tensor trains -------------------------------------------------------------------------


class TTLinear(TensorizedLinear):
    """A linear layer whose weight is a TT-matrix (Novikov et al. 2015).

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints
        ``in_features = prod(in_shape)``, ``out_features = prod(out_shape)``.
    ranks : sequence of d + 1 ints, ``ranks[0] == ranks[-1] == 1``
    bias : whether to hold a bias of ``out_features``.
    direction : ``"ltr"``, ``"rtl"`` or None (the cheaper, :func:`tt_sweep_direction`).
    mode : ``"sweep"`` (never form the weight), ``"rebuild"`` (form it per call, then
        ``F.linear``) or None/``"auto"`` (:func:`tt_linear_mode` at ``batch`` rows).
    batch : rows per call the automatic mode assumes (default 1).
    shuffle : None, or the seed of a fixed permutation of the flattened weight (RsTD);
        forces ``"rebuild"``.

    Cores ``core0..core{d-1}`` have shapes ``(r_{k-1}, m_k, n_k, r_k)``, initialised by
    :meth:`reset_parameters` (Glorot variance of the rebuilt weight).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        *,
        direction: str | None = None,
        mode: str | None = None,
        batch: int = 1,
        shuffle: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._direction_arg = direction
        self._init_linear(in_shape, out_shape, ranks, bias, mode, batch, shuffle, device, dtype)

    def _check_ranks(self) -> None:
        if len(self.ranks) != self.d + 1 or self.ranks[0] != 1 or self.ranks[-1] != 1:
            raise ValueError(f"TTLinear needs {self.d + 1} ranks with 1 at both ends; got {list(self.ranks)}")
        direction = self._direction_arg
        if direction is None:
            direction = tt_sweep_direction(self.in_shape, self.out_shape, self.ranks)
        if direction not in ("ltr", "rtl"):
            raise ValueError(f"direction must be 'ltr', 'rtl' or None; got {direction!r}")
        self.direction = direction

    def _auto_mode(self) -> str:
        return tt_linear_mode(self.in_shape, self.out_shape, self.ranks, self.batch)

    def _sweep(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.direction == "ltr":
            return _ltr_sweep(_ltr_first(x2d, self.in_shape), self.cores(), self.in_shape, self.out_shape, self.ranks)
        return _rtl_sweep(x2d, self.cores(), self.in_shape, self.out_shape, self.ranks)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}, "
            f"direction={self.direction!r}" + self._repr_tail()
        )


class TTConv2d(TensorizedConv2d):
    """A Conv2d whose kernel is a TT-conv (Garipov et al. 2016): spatial core, then channel cores.

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints (products: in/out channels).
    ranks : d + 2 ints ``(1, r_1, ..., r_d, 1)``; ``r_1`` is the spatial bond.
    kernel_size, stride, padding, dilation, padding_mode, bias : as in ``nn.Conv2d``
        (``groups`` must be 1).
    mode, batch, shuffle : as in :class:`TTLinear`; the automatic mode compares FLOPs per
        output position (:func:`tt_conv_mode`).

    ``core0`` has shape ``(1, kh*kw, r_1)``; ``core{k}`` (k = 1..d) ``(r_k, m_k, n_k, r_{k+1})``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        ranks: Sequence[int],
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        mode: str | None = None,
        batch: int = 1,
        shuffle: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._init_conv(in_shape, out_shape, ranks, kernel_size, stride, padding, dilation, bias, padding_mode,
                        mode, batch, shuffle, device, dtype)

    def _check_ranks(self) -> None:
        if len(self.ranks) != self.d + 2 or self.ranks[0] != 1 or self.ranks[-1] != 1:
            raise ValueError(f"TTConv2d needs {self.d + 2} ranks with 1 at both ends; got {list(self.ranks)}")

    def _auto_mode(self) -> str:
        return tt_conv_mode(self.in_shape, self.out_shape, self.ranks, self.kernel_size)

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        r1 = self.ranks[1]
        w = self.core0.reshape(self.kernel_size[0] * self.kernel_size[1], r1).t()
        return self._conv(x, w.reshape(r1, 1, self.kernel_size[0], self.kernel_size[1]))

    def _sweep(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h, w = x.shape[-2], x.shape[-1]
        z = self._spatial(x.reshape(-1, 1, h, w))  # (B*C, r1, H', W')
        ho, wo = z.shape[-2], z.shape[-1]
        r1, n1 = self.ranks[1], self.in_shape[0]
        n_after = _prod(self.in_shape[1:])
        # (B, n1, N_>1, r1, P) -> (B, P, N_>1, r1, n1): rows of the first channel step
        rows = z.reshape(b, n1, n_after, r1, ho * wo).permute(0, 4, 2, 3, 1).reshape(-1, r1 * n1)
        y = _ltr_sweep(rows, self.cores()[1:], self.in_shape, self.out_shape, self.ranks[1:])
        return y.reshape(b, ho * wo, self.out_channels).permute(0, 2, 1).reshape(b, self.out_channels, ho, wo)
