"""Tensor-ring layers: ``TRLinear`` and ``TRConv2d`` (Zhao et al. 2016; Wang et al. 2018).

A tensor ring is a tensor train whose two end bonds are one bond ``r_0 = r_d`` that may
exceed 1: the cores form a ring and an entry of the weight is a trace,

    W[(m_1..m_d), (n_1..n_d)] = trace(G_1[:, m_1, n_1, :] @ ... @ G_d[:, m_d, n_d, :])

with cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` (``TRLinear``) and, for
``TRConv2d``, a spatial core ``(r_0, kh*kw, r_1)`` first, then channel cores, the ring
closing between the last channel core and the spatial core. Ranks are the ``d + 1`` bonds
(``d + 2`` for a conv) with equal ends; ``r_0 = 1`` is a tensor train.

Everything but the sweep is shared with the TT layers (:mod:`tensorscope.tt_layers`): the
``"sweep"``/``"rebuild"``/automatic modes, ``batch``, ``shuffle``, the Glorot
initialisation (the ``r_0`` paths around the ring count in ``P``) and
:func:`~tensorscope.tt_layers.ring_matrix` / :func:`~tensorscope.tt_layers.ring_kernel`,
which close the ring in their last ``mm``.

Ring sweep. Left to right, carrying the ring index ``a`` (``r_0`` values) like a batch
index: the first core contracts ``n_1`` and opens ``(a, m_1, r_1)``; each middle core
contracts ``(r_{k-1}, n_k)`` for every ``a``; the last core contracts ``(a, n_d, r_{d-1})``
at once, which closes the ring. FLOPs per row (2 per multiply-add, :func:`ring_sweep_flops`)

    2 * sum_k M_<k * N_>k * m_k * n_k * r_{k-1} * r_k * (r_0 for the middle cores, else 1)

The conv version runs the spatial core as one ``conv2d`` with ``r_0*r_1`` filters per input
channel, then carries ``a`` through every channel core but the last, with the ``B*H'*W'``
output positions as rows.

References
----------
Zhao, Zhou, Xie, Zhang, Cichocki, "Tensor Ring Decomposition", arXiv:1606.05535, 2016.
Wang, Sun, Eriksson, Wang, Aggarwal, "Wide Compression: Tensor Ring Nets", CVPR 2018.
Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015 (the TT-matrix layout).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .tt_layers import (
    TensorizedConv2d,
    TensorizedLinear,
    Work,
    _copy,
    _ltr_sweep,
    _mm,
    choose_mode,
    conv_dense_work_per_position,
    conv_form_flops,
    linear_form_flops,
    linear_rebuild_work,
    per_sample,
)

__all__ = ["TRLinear", "TRConv2d", "ring_sweep_flops", "tr_linear_flops", "tr_linear_mode", "tr_conv_flops",
           "tr_conv_mode"]


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(xs))


# ---- costs ---------------------------------------------------------------------------------


def ring_sweep_work(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1,
                    carried_from: int = 1) -> Work:
    """The :class:`~tensorscope.tt_layers.Work` of a ring sweep over ``rows`` rows.

    Core ``k`` costs ``2*rows*M_<k*N_>k*m_k*n_k*r_k*r_{k+1}`` FLOPs, times the ring bond
    ``ranks[-1]`` while the ring index is carried (``carried_from <= k < d - 1``: from core 1
    for a Linear, whose first core opens the ring; from core 0 for a conv's channel cores,
    whose spatial core opened it), plus the copy of its input and its core's reshape.
    """
    d = len(in_shape)
    ring = ranks[-1]
    w = Work()
    for k in range(d):
        m_before, n_after = _prod(out_shape[:k]), _prod(in_shape[k + 1 :])
        if k == 0 and carried_from == 1:  # a Linear's first core opens the ring: (n_1) -> (a, m_1, r_1)
            rows_k, inner, cols = rows * n_after, in_shape[0], (ring * ranks[1] if d > 1 else 1) * out_shape[0]
        elif k == d - 1:  # the last core closes it: (a, n_d, r_{d-1}) -> (m_d)
            rows_k, inner, cols = rows * m_before, ring * in_shape[k] * ranks[k], out_shape[k]
        else:  # a middle core, for every value of the ring index
            rows_k, inner, cols = rows * ring * m_before * n_after, ranks[k] * in_shape[k], out_shape[k] * ranks[k + 1]
        w = w + _copy(rows_k * inner) + _copy(ranks[k] * out_shape[k] * in_shape[k] * ranks[k + 1])
        w = w + _mm(rows_k, inner, cols)
    return w


def ring_sweep_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1,
                     carried_from: int = 1) -> int:
    """FLOPs of a ring sweep: ``2 * rows * sum_k M_<k * N_>k * m_k * n_k * r_k * r_{k+1}``, the
    middle cores' terms times the ring bond (see :func:`ring_sweep_work`)."""
    d = len(in_shape)
    ring = ranks[-1]
    total = 0
    for k in range(d):
        other = _prod(out_shape[:k]) * _prod(in_shape[k + 1 :])
        carried = ring if carried_from <= k < d - 1 else 1
        total += 2 * rows * other * out_shape[k] * in_shape[k] * ranks[k] * ranks[k + 1] * carried
    return total


def tr_linear_mode(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], batch: int = 1) -> str:
    """The mode :class:`TRLinear` picks by itself for ``batch`` rows per call."""
    sweep = ring_sweep_work(in_shape, out_shape, ranks, batch, 1) + _copy(batch * _prod(out_shape))
    return choose_mode(sweep, linear_rebuild_work(in_shape, out_shape, ranks, batch))


def tr_linear_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1,
                    mode: str = "sweep", batch: int = 1) -> int:
    """FLOPs of one sample of ``rows`` rows through a :class:`TRLinear` in ``mode`` (called with
    ``batch`` samples at once)."""
    if mode == "sweep":
        return ring_sweep_flops(in_shape, out_shape, ranks, rows, 1)
    form = linear_form_flops(in_shape, out_shape, ranks)
    return per_sample(form, 2 * rows * _prod(in_shape) * _prod(out_shape), batch)


def tr_conv_mode(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], kernel_size) -> str:
    """The mode :class:`TRConv2d` picks by itself: the work per output position of the sweep
    against the dense conv (forming the kernel is shared by all positions)."""
    khw = int(kernel_size[0]) * int(kernel_size[1])
    c, opened = _prod(in_shape), ranks[0] * ranks[1]
    sweep = Work(2 * c * opened * khw, c + 3 * c * opened, 0) + ring_sweep_work(in_shape, out_shape, ranks[1:], 1, 0)
    return choose_mode(Work(sweep.flops, sweep.elements, 0), conv_dense_work_per_position(c, _prod(out_shape), khw))


def tr_conv_flops(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], kernel_size,
                  out_hw: Sequence[int], mode: str = "sweep", batch: int = 1) -> int:
    """FLOPs of one sample through a :class:`TRConv2d` with output spatial size ``out_hw``."""
    positions = int(out_hw[0]) * int(out_hw[1])
    khw = int(kernel_size[0]) * int(kernel_size[1])
    if mode == "sweep":
        spatial = 2 * _prod(in_shape) * ranks[0] * ranks[1] * khw
        return positions * (spatial + ring_sweep_flops(in_shape, out_shape, ranks[1:], 1, 0))
    form = conv_form_flops(in_shape, out_shape, ranks, khw)
    return per_sample(form, 2 * _prod(out_shape) * _prod(in_shape) * khw * positions, batch)


# ---- the ring sweep ------------------------------------------------------------------------


def _ring_rest(z: torch.Tensor, cores: list[torch.Tensor], in_shape, out_shape, ranks) -> torch.Tensor:
    """Cores ``1 .. d-1`` of a ring sweep (``d >= 2``), after core 0.

    ``z`` is laid out ``(Bt, a, N_>0, m_0, ranks[1])`` (``a`` the ring index, ``ranks[-1]``
    values); the middle cores are tensor-train steps with ``Bt*a`` rows, and the last core
    contracts ``(a, n, r)`` at once. Returns ``(Bt, M)``.
    """
    d = len(in_shape)
    ring = ranks[-1]
    m_before = 1
    for k in range(1, d - 1):
        rk, mk, nk, rk1 = ranks[k], out_shape[k], in_shape[k], ranks[k + 1]
        n_after = _prod(in_shape[k + 1 :])
        # (Bt*a, M_<k-1, n_k, N_>k, m_{k-1}, r_k) -> (Bt*a, M_<k-1, m_{k-1}, N_>k, r_k, n_k)
        z = z.reshape(-1, m_before, nk, n_after, out_shape[k - 1], rk).permute(0, 1, 4, 3, 5, 2)
        m_before *= out_shape[k - 1]
        z = torch.mm(z.reshape(-1, rk * nk), cores[k].permute(0, 2, 1, 3).reshape(rk * nk, mk * rk1))
    k = d - 1
    rk, mk, nk = ranks[k], out_shape[k], in_shape[k]
    # (Bt, a, M_<k-1, n_k, m_{k-1}, r_k) -> (Bt, M_<k-1, m_{k-1}, a, n_k, r_k): close the ring
    z = z.reshape(-1, ring, m_before, nk, out_shape[k - 1], rk).permute(0, 2, 4, 1, 3, 5)
    mat = cores[k].permute(3, 2, 0, 1).reshape(ring * nk * rk, mk)
    return torch.mm(z.reshape(-1, ring * nk * rk), mat).reshape(-1, _prod(out_shape))


def _check_ring(ranks: tuple[int, ...], n: int, what: str) -> None:
    if len(ranks) != n or ranks[0] != ranks[-1]:
        raise ValueError(f"{what} needs {n} ranks whose first and last (the ring bond) are equal; got {list(ranks)}")


class TRLinear(TensorizedLinear):
    """A linear layer whose weight is a tensor ring (Zhao et al. 2016; Wang et al. 2018).

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints (products: in/out features).
    ranks : d + 1 ints with ``ranks[0] == ranks[-1]`` (the ring bond; 1 makes a tensor
        train). A single core (``d = 1``) needs ``(1, 1)``.
    bias, mode, batch, shuffle, device, dtype : as in :class:`~tensorscope.tt_layers.TTLinear`
        (the automatic mode: :func:`tr_linear_mode`).

    Cores ``core0..core{d-1}`` have shapes ``(r_{k-1}, m_k, n_k, r_k)``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], bias: bool = True, *,
                 mode: str | None = None, batch: int = 1, shuffle: int | None = None, device=None, dtype=None):
        super().__init__()
        self._init_linear(in_shape, out_shape, ranks, bias, mode, batch, shuffle, device, dtype)

    def _check_ranks(self) -> None:
        _check_ring(self.ranks, self.d + 1, "TRLinear")
        if self.d == 1 and self.ranks[0] != 1:
            raise ValueError(f"a one-core TRLinear is the dense matrix: its ranks are (1, 1); got {list(self.ranks)}")

    def _auto_mode(self) -> str:
        return tr_linear_mode(self.in_shape, self.out_shape, self.ranks, self.batch)

    def _sweep(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.d == 1:
            return _ltr_sweep(x2d, self.cores(), self.in_shape, self.out_shape, self.ranks)
        ring, n1, m1, r1 = self.ranks[0], self.in_shape[0], self.out_shape[0], self.ranks[1]
        n_after = _prod(self.in_shape[1:])
        rows = x2d.reshape(-1, n1, n_after).permute(0, 2, 1).reshape(-1, n1)
        z = torch.mm(rows, self.core0.permute(2, 0, 1, 3).reshape(n1, ring * m1 * r1))  # (Bt, N_>1, a, m1*r1)
        z = z.reshape(-1, n_after, ring, m1 * r1).permute(0, 2, 1, 3)
        return _ring_rest(z, self.cores(), self.in_shape, self.out_shape, self.ranks)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}" + self._repr_tail()
        )


class TRConv2d(TensorizedConv2d):
    """A Conv2d whose kernel is a tensor ring: a spatial core, channel cores, and the ring bond
    between the last channel core and the spatial core.

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints (products: in/out channels).
    ranks : d + 2 ints ``(r_0, r_1, ..., r_d, r_0)``; ``r_1`` joins the spatial core to the
        first channel core, ``r_0`` closes the ring.
    kernel_size, stride, padding, dilation, padding_mode, bias : as in ``nn.Conv2d``
        (``groups`` must be 1).
    mode, batch, shuffle : as in :class:`~tensorscope.tt_layers.TTConv2d`
        (the automatic mode: :func:`tr_conv_mode`).

    ``core0`` has shape ``(r_0, kh*kw, r_1)``; ``core{k}`` (k = 1..d) ``(r_k, m_k, n_k, r_{k+1})``.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], kernel_size,
                 stride=1, padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros", *,
                 mode: str | None = None, batch: int = 1, shuffle: int | None = None, device=None, dtype=None):
        super().__init__()
        self._init_conv(in_shape, out_shape, ranks, kernel_size, stride, padding, dilation, bias, padding_mode,
                        mode, batch, shuffle, device, dtype)

    def _check_ranks(self) -> None:
        _check_ring(self.ranks, self.d + 2, "TRConv2d")

    def _auto_mode(self) -> str:
        return tr_conv_mode(self.in_shape, self.out_shape, self.ranks, self.kernel_size)

    def _sweep(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        ring, r1 = self.ranks[0], self.ranks[1]
        kh, kw = self.kernel_size
        filters = self.core0.permute(0, 2, 1).reshape(ring * r1, 1, kh, kw)  # filter a*r1 + b
        z = self._conv(x.reshape(-1, 1, h, w), filters)  # (B*C, a*r1, H', W')
        ho, wo = z.shape[-2], z.shape[-1]
        p = ho * wo
        n1 = self.in_shape[0]
        n_after = _prod(self.in_shape[1:])
        channel = self.cores()[1:]
        if self.d == 1:  # spatial core and one channel core: close the ring at once
            rows = z.reshape(b, n1, ring, r1, p).permute(0, 4, 2, 1, 3).reshape(-1, ring * n1 * r1)
            y = torch.mm(rows, channel[0].permute(3, 2, 0, 1).reshape(ring * n1 * r1, self.out_shape[0]))
        else:
            m1, r2 = self.out_shape[0], self.ranks[2]
            # (B, n1, N_>1, a, r1, P) -> (B, P, a, N_>1, r1, n1): the first channel core's rows
            rows = z.reshape(b, n1, n_after, ring, r1, p).permute(0, 5, 3, 2, 4, 1).reshape(-1, r1 * n1)
            z = torch.mm(rows, channel[0].permute(0, 2, 1, 3).reshape(r1 * n1, m1 * r2))  # (B*P, a, N_>1, m1, r2)
            y = _ring_rest(z, channel, self.in_shape, self.out_shape, self.ranks[1:])
        return y.reshape(b, p, self.out_channels).permute(0, 2, 1).reshape(b, self.out_channels, ho, wo)
