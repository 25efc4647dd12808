"""Activation statistics: the second moments of each layer's inputs on calibration data.

What matters is the error of a layer's *output* on real inputs, ``E||(W - W_r) x||^2 =
||(W - W_r) L||_F^2`` where ``C = E[x x^T] = L L^T`` is the second moment of the layer's
inputs (for a conv, of its input patches). Factorizing ``M = W L`` and mapping back with
``L^{-1}`` minimises that error: for ``svd`` the truncated SVD of ``M`` is optimal for it
(Eckart-Young in the whitened space), and the discarded output energy is exactly the tail
of ``M``'s spectrum. Tucker-2 and CP whiten their input-channel mode the same way with the
channel second moment. A small ridge keeps ``C`` invertible, so every method stays exact at
full rank. This module only gathers the statistics; each method's data-aware factorization
lives with the method (``methods/``), and the shared numerics in ``linalg``.

Statistics are sums, streamed over batches in memory bounded by the layer widths (never by
the amount of data), so one batch or ten give the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._cache import fingerprint
from .data import iter_batches, split_batch
from .errors import DataError
from .forward_check import behaviour
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
        # a conv port that pads inside its forward: the statistics are of the padded input
        self.pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if isinstance(self.layer, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if self.pad is not None:
                x = self.pad(x)
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
