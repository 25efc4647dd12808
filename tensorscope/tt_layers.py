"""Tensor-Train layers: ``TTLinear`` (TT-matrix) and ``TTConv2d`` (TT-conv).

Both store their cores as plain ``nn.Parameter`` attributes ``core0``, ``core1``, ... and
keep every shape as a Python int tuple set in ``__init__``, so ``torch.jit.trace`` and
``torch.export.export`` (with a dynamic batch dimension) see only reshapes, permutes,
``mm`` and ``conv2d``: an export runs with torch alone.

TT-matrix (Novikov et al. 2015). ``in_features = prod(in_shape)`` (the ``n_k``),
``out_features = prod(out_shape)`` (the ``m_k``), ``k = 1..d``; core ``k`` has shape
``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1`` and

    W[(m_1..m_d), (n_1..n_d)] = G_1[:, m_1, n_1, :] @ ... @ G_d[:, m_d, n_d, :]

with row-major multi-indices (``m_1``/``n_1`` most significant).

Contraction order. The forward never forms ``W``: it sweeps the cores with one ``mm`` per
core. With ``B`` rows of input (all leading dimensions flattened), ``M_<k = m_1...m_{k-1}``,
``N_>k = n_{k+1}...n_d`` and so on:

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

TT-conv (Garipov et al. 2016). ``in_channels = prod(in_shape)``, ``out_channels =
prod(out_shape)``. ``core0`` is the spatial core, shape ``(1, kh*kw, r_1)``; cores
``1..d`` are channel cores ``(r_k, m_k, n_k, r_{k+1})``, ranks ``(1, r_1, ..., r_d, 1)``.
Forward: ``x`` (B, C, H, W) -> (B*C, 1, H, W) -> ``conv2d`` with the spatial core as an
``r_1``-output filter (the original stride, padding, dilation and padding mode) ->
(B*C, r_1, H', W') -> the left-to-right sweep over the channel cores with the B*H'*W'
positions as rows -> (B, O, H', W') + bias. FLOPs per sample:

    2*C*r_1*kh*kw*H'*W' + 2*H'*W' * sum_k M_<k * N_>k * r_k * m_k * n_k * r_{k+1}
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TTLinear",
    "TTConv2d",
    "tt_sweep_flops",
    "tt_sweep_direction",
    "tt_conv_flops",
]


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(xs))


def _ints(name: str, v: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(x) for x in v)
    if any(x < 1 for x in out):
        raise ValueError(f"{name} must hold positive integers; got {list(v)}")
    return out


def tt_sweep_flops(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], rows: int = 1, direction: str = "ltr"
) -> int:
    """FLOPs of one TT-matrix sweep over ``rows`` input rows (2 per multiply-add, ``mm`` only).

    ``ranks`` has length ``d + 1``; its ends need not be 1 (TT-conv's channel sweep starts
    from the spatial bond).
    """
    d = len(in_shape)
    total = 0
    for k in range(d):  # core k (0-based) has shape (ranks[k], m_k, n_k, ranks[k+1])
        core = ranks[k] * out_shape[k] * in_shape[k] * ranks[k + 1]
        if direction == "ltr":
            other = _prod(out_shape[:k]) * _prod(in_shape[k + 1 :])
        elif direction == "rtl":
            other = _prod(in_shape[:k]) * _prod(out_shape[k + 1 :])
        else:
            raise ValueError(f"direction must be 'ltr' or 'rtl'; got {direction!r}")
        total += 2 * rows * other * core
    return total


def tt_sweep_direction(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> str:
    """The cheaper sweep for a TT-matrix: ``"rtl"`` when strictly fewer FLOPs, else ``"ltr"``."""
    ltr = tt_sweep_flops(in_shape, out_shape, ranks, 1, "ltr")
    rtl = tt_sweep_flops(in_shape, out_shape, ranks, 1, "rtl")
    return "rtl" if rtl < ltr else "ltr"


def tt_conv_flops(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    kernel_size: Sequence[int],
    out_hw: Sequence[int],
) -> int:
    """FLOPs of one sample through a :class:`TTConv2d` with output spatial size ``out_hw``."""
    positions = int(out_hw[0]) * int(out_hw[1])
    khw = int(kernel_size[0]) * int(kernel_size[1])
    conv = 2 * _prod(in_shape) * ranks[1] * khw * positions
    return conv + tt_sweep_flops(in_shape, out_shape, ranks[1:], positions, "ltr")


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


def _check_ranks(ranks: tuple[int, ...], n: int, what: str) -> None:
    if len(ranks) != n or ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"{what} needs {n} ranks with 1 at both ends; got {list(ranks)}")


class TTLinear(nn.Module):
    """A linear layer whose weight is a TT-matrix (Novikov et al. 2015); never forms the weight.

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints
        ``in_features = prod(in_shape)``, ``out_features = prod(out_shape)``.
    ranks : sequence of d + 1 ints, ``ranks[0] == ranks[-1] == 1``
    bias : whether to hold a bias of ``out_features``.
    direction : ``"ltr"``, ``"rtl"`` or None (the cheaper, :func:`tt_sweep_direction`).

    Cores ``core0..core{d-1}`` have shapes ``(r_{k-1}, m_k, n_k, r_k)``; they are created as
    zeros (a skeleton to load a state dict into).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        *,
        direction: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_shape = _ints("in_shape", in_shape)
        self.out_shape = _ints("out_shape", out_shape)
        self.ranks = _ints("ranks", ranks)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        d = len(self.in_shape)
        _check_ranks(self.ranks, d + 1, "TTLinear")
        self.in_features = _prod(self.in_shape)
        self.out_features = _prod(self.out_shape)
        if direction is None:
            direction = tt_sweep_direction(self.in_shape, self.out_shape, self.ranks)
        if direction not in ("ltr", "rtl"):
            raise ValueError(f"direction must be 'ltr', 'rtl' or None; got {direction!r}")
        self.direction = direction
        self.d = d
        kw = {"device": device, "dtype": dtype}
        for k in range(d):
            shape = (self.ranks[k], self.out_shape[k], self.in_shape[k], self.ranks[k + 1])
            self.register_parameter(f"core{k}", nn.Parameter(torch.zeros(shape, **kw)))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(self.d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if self.direction == "ltr":
            y = _ltr_sweep(_ltr_first(x2d, self.in_shape), self.cores(), self.in_shape, self.out_shape, self.ranks)
        else:
            y = _rtl_sweep(x2d, self.cores(), self.in_shape, self.out_shape, self.ranks)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}, "
            f"direction={self.direction!r}"
        )


def _ltr_first(x2d: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Rows of the first left-to-right step of a (Bt, N) input: (Bt*N_>1, n_1)."""
    n1 = in_shape[0]
    rest = _prod(in_shape[1:])
    return x2d.reshape(-1, n1, rest).permute(0, 2, 1).reshape(-1, n1)


class TTConv2d(nn.Module):
    """A Conv2d whose kernel is a TT-conv (Garipov et al. 2016): spatial core, then channel cores.

    Parameters
    ----------
    in_shape, out_shape : sequences of d positive ints (products: in/out channels).
    ranks : d + 2 ints ``(1, r_1, ..., r_d, 1)``; ``r_1`` is the spatial bond.
    kernel_size, stride, padding, dilation, padding_mode, bias : as in ``nn.Conv2d``
        (``groups`` must be 1).

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
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_shape = _ints("in_shape", in_shape)
        self.out_shape = _ints("out_shape", out_shape)
        self.ranks = _ints("ranks", ranks)
        if len(self.in_shape) != len(self.out_shape) or not self.in_shape:
            raise ValueError(f"in_shape {list(in_shape)} and out_shape {list(out_shape)} need the same length >= 1")
        d = len(self.in_shape)
        _check_ranks(self.ranks, d + 2, "TTConv2d")
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
        self.d = d
        kw = {"device": device, "dtype": dtype}
        khw = self.kernel_size[0] * self.kernel_size[1]
        self.core0 = nn.Parameter(torch.zeros((1, khw, self.ranks[1]), **kw))
        for k in range(d):
            shape = (self.ranks[k + 1], self.out_shape[k], self.in_shape[k], self.ranks[k + 2])
            self.register_parameter(f"core{k + 1}", nn.Parameter(torch.zeros(shape, **kw)))
        self.bias = nn.Parameter(torch.zeros(self.out_channels, **kw)) if bias else None

    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(self.d + 1)]

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        r1 = self.ranks[1]
        w = self.core0.reshape(self.kernel_size[0] * self.kernel_size[1], r1).t()
        w = w.reshape(r1, 1, self.kernel_size[0], self.kernel_size[1])
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, None, self.stride, 0, self.dilation)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        b = x.shape[0]
        h, w = x.shape[-2], x.shape[-1]
        z = self._spatial(x.reshape(-1, 1, h, w))  # (B*C, r1, H', W')
        ho, wo = z.shape[-2], z.shape[-1]
        r1, n1 = self.ranks[1], self.in_shape[0]
        n_after = _prod(self.in_shape[1:])
        # (B, n1, N_>1, r1, P) -> (B, P, N_>1, r1, n1): rows of the first channel step
        rows = z.reshape(b, n1, n_after, r1, ho * wo).permute(0, 4, 2, 3, 1).reshape(-1, r1 * n1)
        y = _ltr_sweep(rows, self.cores()[1:], self.in_shape, self.out_shape, self.ranks[1:])
        y = y.reshape(b, ho * wo, self.out_channels).permute(0, 2, 1).reshape(b, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        if unbatched:
            y = y.squeeze(0)
        return y

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding!r}, dilation={self.dilation}"
        )
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return (
            s + f", in_shape={self.in_shape}, out_shape={self.out_shape}, ranks={self.ranks}, "
            f"bias={self.bias is not None}"
        )
