"""Activation statistics and data-aware (whitened) factorizations.

What matters is the error of a layer's *output* on real inputs, ``E||(W - W_r) x||^2 =
||(W - W_r) L||_F^2`` where ``C = E[x x^T] = L L^T`` is the second moment of the layer's
inputs (for a conv, of its input patches). Factorizing ``M = W L`` and mapping back with
``L^{-1}`` minimises that error: for ``svd`` the truncated SVD of ``M`` is optimal for it
(Eckart-Young in the whitened space), and the discarded output energy is exactly the tail
of ``M``'s spectrum. Tucker-2 and CP whiten their input-channel mode the same way with the
channel second moment. A small ridge keeps ``C`` invertible, so every method stays exact at
full rank.

Statistics are sums, streamed over batches in memory bounded by the layer widths (never by
the amount of data), so one batch or ten give the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._cache import fingerprint
from .data import iter_batches, split_batch
from .errors import DataError
from .progress import Progress

DEFAULT_RIDGE = 1e-3
_CHUNK_ELEMS = 1 << 24  # unfold at most this many patch entries at once


@dataclass
class LayerStats:
    """Second moments of one layer's inputs, per group.

    ``patch`` is ``(g, n, n)`` with ``n = I/g * kh * kw`` (Linear: ``in``): what ``svd``
    whitens with. ``channel`` is ``(g, I/g, I/g)``: the input-channel moment Tucker-2 and CP
    whiten with. ``count`` is the number of rows (tokens or output positions) summed.
    """

    kind: str
    patch: torch.Tensor
    count: int = 0
    kernel: tuple[int, int] = (1, 1)
    ridge: float = DEFAULT_RIDGE
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def channel(self) -> torch.Tensor:
        g, n, _ = self.patch.shape
        khw = self.kernel[0] * self.kernel[1]
        c = n // khw
        p = self.patch.reshape(g, c, khw, c, khw)
        return torch.diagonal(p, dim1=2, dim2=4).sum(-1)  # sum over kernel offsets

    def moment(self, which: str = "patch") -> torch.Tensor:
        m = self.patch if which == "patch" else self.channel
        return m / max(self.count, 1)

    @property
    def token(self) -> str:
        """A content hash of the statistics: keys memoised results computed from them."""
        if "token" not in self._memo:
            from ._cache import fingerprint

            self._memo["token"] = f"{fingerprint(self.patch)}|{self.count}|{self.ridge}"
        return self._memo["token"]

    def output_error(self, weight: torch.Tensor, approx: torch.Tensor) -> float:
        """Relative error of the layer's output on the data, ``approx`` standing in for ``weight``.

        ``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - approx`` per group and ``C`` the
        input patch moment: the error of ``x -> W x`` over the calibration inputs, without
        running them again. For a truncated whitened SVD it equals the tail of the whitened
        spectrum.
        """
        g = self.patch.shape[0]
        w = weight.detach().to(torch.float64).reshape(g, weight.shape[0] // g, -1)
        d = w - approx.detach().to(torch.float64).reshape(w.shape)
        c = self.moment("patch")
        num = float(torch.einsum("gon,gnm,gom->", d, c, d))
        den = float(torch.einsum("gon,gnm,gom->", w, c, w))
        return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0

    def whitener(self, which: str = "patch") -> torch.Tensor:
        """Lower-triangular ``L`` with ``L L^T = C + ridge * mean(diag C) * I`` (float64)."""
        key = ("L", which, self.ridge)
        if key not in self._memo:
            self._memo[key] = _cholesky(self.moment(which), self.ridge)
        return self._memo[key]


def _cholesky(c: torch.Tensor, ridge: float) -> torch.Tensor:
    n = c.shape[-1]
    eye = torch.eye(n, dtype=c.dtype)
    scale = torch.diagonal(c, dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero inputs: identity
    a = c + (ridge * scale)[..., None, None] * eye
    L, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) != 0:  # numerically indefinite: fall back to a symmetric square root
        vals, vecs = torch.linalg.eigh(a)
        L = vecs * vals.clamp_min(ridge * float(scale.min()))[..., None, :].sqrt()
    return L


def _patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches as rows ``(B*L, I*kh*kw)``, padded exactly as the layer pads."""
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (B, n, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Accumulator:
    def __init__(self, layer: nn.Module, ridge: float):
        self.layer = layer
        self.groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        n_in = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        khw = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
        self.n = n_in // self.groups * khw
        self.sum = torch.zeros(self.groups, self.n, self.n, dtype=torch.float64)
        self.count = 0
        self.ridge = ridge
        self.kernel = tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) else (1, 1)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if isinstance(self.layer, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            per = max(1, _CHUNK_ELEMS // max(1, x[0:1].numel() * self.kernel[0] * self.kernel[1]))
            for chunk in x.split(per):
                self._add_rows(_patches(self.layer, chunk.to(torch.float64)))
        else:
            self._add_rows(x.reshape(-1, x.shape[-1]).to(torch.float64))

    def _add_rows(self, rows: torch.Tensor) -> None:
        g = self.groups
        r = rows.reshape(rows.shape[0], g, self.n).transpose(0, 1)  # (g, N, n)
        self.sum += r.transpose(1, 2) @ r
        self.count += rows.shape[0]

    def result(self) -> LayerStats:
        kind = "conv2d" if isinstance(self.layer, nn.Conv2d) else "linear"
        return LayerStats(kind, self.sum, self.count, self.kernel, self.ridge)


def collect_stats(
    model: nn.Module,
    data: Any,
    layers: Iterable[str],
    *,
    max_batches: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    progress: Any = False,
) -> dict[str, LayerStats]:
    """One pass over ``data`` recording the input second moments of the named layers."""
    names = list(layers)
    modules = dict(model.named_modules())
    accs = {n: _Accumulator(modules[n], ridge) for n in names}
    hooks = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: accs[n].add(args[0])) for n in names]
    was_training = model.training
    seen = 0
    try:
        model.eval()
        batches = iter_batches(data, max_batches=max_batches)
        total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") and not isinstance(data, (torch.Tensor, dict)) else 1)
        with torch.no_grad(), Progress(progress, total=total, desc="calibration statistics") as bar:
            for batch in batches:
                b = split_batch(batch)
                model(*b.args, **b.kwargs)
                seen += 1
                bar.update(1)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if seen == 0:
        raise DataError("calibration data yielded no batches; pass at least one batch of inputs")
    missing = [n for n in names if accs[n].count == 0]
    if missing:
        raise DataError(f"the calibration data never reached layer(s) {missing[:5]}: their inputs are unknown")
    return {n: a.result() for n, a in accs.items()}


# ---- whitened factorizations --------------------------------------------------------------


def _grouped_matrix(layer: nn.Module) -> torch.Tensor:
    from .linalg import grouped_weight

    w = grouped_weight(layer).to(torch.float64)
    return w.reshape(w.shape[0], w.shape[1], -1)


def whitened_svd(layer: nn.Module, stats: LayerStats):
    """SVD of ``W L`` per group, returned as ``(U, S, V^T L^{-1})`` so that truncations map back."""
    key = ("svd", fingerprint(layer.weight), stats.ridge)
    if key not in stats._memo:
        L = stats.whitener("patch")
        m = _grouped_matrix(layer) @ L
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        # vh @ L^{-1}: solve L^T X^T = vh^T
        back = torch.linalg.solve_triangular(L.transpose(-1, -2), vh.transpose(-1, -2), upper=True).transpose(-1, -2)
        stats._memo[key] = (u, s, back)
    return stats._memo[key]


def whitened_values(layer: nn.Module, stats: LayerStats, unfolding: str = "out") -> tuple[np.ndarray, tuple[int, int]]:
    """Singular values a data-aware truncation cuts: of ``W L`` (out) or of the input-whitened mode (in)."""
    from .linalg import gram_eig, grouped_weight

    if unfolding == "out":
        _, s, _ = whitened_svd(layer, stats)
        m = _grouped_matrix(layer)
        return s.numpy(), (m.shape[1], m.shape[2])
    w = grouped_weight(layer).to(torch.float64)  # (g, o, i, kh, kw)
    L = stats.whitener("channel")
    m = torch.einsum("goikl,gij->gjokl", w, L).reshape(w.shape[0], w.shape[2], -1)
    vals, _ = gram_eig(m)
    return vals[:, : min(m.shape[1], m.shape[2])].sqrt().numpy(), (m.shape[1], m.shape[2])


def whitened_tucker2(layer: nn.Conv2d, rank, stats: LayerStats, sweeps: int = 2):
    """Tucker-2 of ``W`` with its input mode whitened by the channel second moment.

    With ``M = W x_1 L^T`` factorized as ``U_out, core, Q``, the first 1x1 conv is
    ``Q^T L^{-1}``: exact at full rank, and the input projection keeps what the data uses.
    """
    from .linalg import gram_eig, grouped_weight
    from .methods.base import Factors
    from .methods.tucker2 import hooi_sweeps

    r_out, r_in = rank
    w = grouped_weight(layer).to(torch.float64)
    L = stats.whitener("channel")
    m = torch.einsum("goikl,gij->gojkl", w, L)
    g, o, i = m.shape[:3]
    u_out = gram_eig(m.reshape(g, o, -1))[1][..., :r_out]
    q = gram_eig(m.transpose(1, 2).reshape(g, i, -1))[1][..., :r_in]
    u_out, q = hooi_sweeps(m, u_out, q, sweeps)
    core = torch.einsum("goikl,goa,gib->gabkl", m, u_out, q)
    u_in = torch.linalg.solve_triangular(L.transpose(-1, -2), q, upper=True)  # L^{-T} Q
    return Factors("tucker2", (r_out, r_in), {"u_out": u_out, "core": core, "u_in": u_in})


# ---- least-squares refit of the output factor (data reconstruction, Su et al.) --------------


def refit_output(layer: nn.Module, stats: LayerStats, inner: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The output factor ``A`` minimising the calibration output error of ``W ~ A @ inner``.

    ``inner`` is ``(g, r, n)``: what the stages before a factorized layer's last 1x1 conv
    compute, as a matrix on input patches (Tucker-2: core times input projection; CP: the
    rank-one spatial-and-input filters). Minimising ``||(W - A inner) L||_F`` with ``L L^T``
    the (ridged) patch moment is linear least squares in ``A``: the "data reconstruction"
    refinement of the last factor. Returns ``A`` ``(g, o, r)`` and the relative output
    error reached. Exact at full rank whenever ``W`` lies in the row space of ``inner``.
    """
    w = _grouped_matrix(layer)  # (g, o, n) float64
    L = stats.whitener("patch")  # (g, n, n)
    wl = w @ L
    bl = inner.to(torch.float64) @ L  # (g, r, n)
    a = torch.linalg.lstsq(bl.transpose(1, 2), wl.transpose(1, 2)).solution.transpose(1, 2)  # (g, o, r)
    den = float(wl.norm())
    err = float((wl - a @ bl).norm()) / den if den > 0 else 0.0
    return a, err


def heldout_svd_errors(layer: nn.Module, fit: LayerStats, check: LayerStats) -> np.ndarray:
    """Relative output error on ``check``'s data of the whitened SVD fitted on ``fit``'s, at every rank.

    The in-sample error of a whitened truncation (the tail of the whitened spectrum) is
    optimistic when the calibration set is small next to the layer's width: it fits those
    inputs and generalises worse. Scoring ranks on data the factors were not fitted to is
    what lets a budget planner see which layers really suffer. With ``W_r = U_r S_r B_r`` the
    factors from ``fit`` and ``L`` the whitener of ``check``, the orthonormal ``U`` makes the
    squared error a cumulative sum over ranks, so all ranks cost one pass.
    """
    u, s, back = whitened_svd(layer, fit)  # (g, o, k), (g, k), (g, k, n)
    L = check.whitener("patch")
    wl = _grouped_matrix(layer) @ L  # (g, o, n)
    z = back @ L  # (g, k, n)
    total = float((wl ** 2).sum())
    if total <= 0:
        return np.zeros(s.shape[1])
    cross = (torch.einsum("gok,gon,gkn->gk", u, wl, z) * s).sum(0)
    sq = ((s ** 2) * (z ** 2).sum(-1)).sum(0)
    err2 = total - 2 * torch.cumsum(cross, 0) + torch.cumsum(sq, 0)
    return np.sqrt(np.clip(err2.numpy() / total, 0.0, None))
