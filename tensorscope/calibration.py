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
the amount of data), so one batch or ten give the same result. One pass gathers everything
the planner and ``compress`` use:

- the input moment of every layer; layers that read the same tensor (the query, key and
  value projections of an attention block) share one;
- the same moment for two halves of the data (alternate batches, or the two halves of the
  rows of a single batch): the full statistics are their sum, so the held-out scores of
  the planner need no second pass (:attr:`Calibration.halves`);
- with ``gradients=True``, the second moment ``G`` of the gradient of the network's output
  loss with respect to each layer's *output* (a Gauss-Newton / Fisher factor, as K-FAC
  keeps it): ``tr(G dW C dW^T)`` then estimates what the network loses when the layer's
  weight changes by ``dW`` (:mod:`tensorscope.allocation`).

Few samples against wide layers make ``C`` a poor estimate of the inputs to come: its
small eigenvalues are noise. :meth:`LayerStats.shrunk` returns the statistics shrunk toward
a multiple of the identity, ``(1 - a) C + a tr(C)/n I`` (Ledoit and Wolf, 2004): ``a = 0`` is
plain whitening and ``a = 1`` plain SVD; :func:`ledoit_wolf` gives their analytic choice,
and the planner chooses ``a`` per layer by held-out damage.

References
----------
Ledoit and Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
J. Multivariate Anal. 2004. Martens and Grosse, "Optimizing neural networks with
Kronecker-factored approximate curvature", ICML 2015.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._cache import fingerprint
from .data import describe_batch, iter_batches, output_tensor, split_batch
from .errors import DataError
from .forward_check import behaviour
from .progress import Progress
from .views import Conv1dView, check_conv1d_input, hooked, layer_modules, view_input

__all__ = ["DEFAULT_RIDGE", "DEFAULT_PROBES", "Calibration", "LayerStats", "collect_stats", "ledoit_wolf"]

DEFAULT_RIDGE = 1e-3
#: output-gradient probes per sample (``collect_stats(gradients=True)``)
DEFAULT_PROBES = 8
_CHUNK_ELEMS = 1 << 24  # unfold at most this many patch entries at once
_ROWS = 1 << 15  # rows multiplied at once
_EXACT_ROWS = 1 << 16  # rows of one call up to which products are float64 (see _gram)
#: output-gradient rows per layer, probe and pass whose outer products are summed (a conv's
#: output positions beyond this are subsampled evenly; the moment only weighs the outputs)
_GRAD_ROWS = 1 << 13


@dataclass
class LayerStats:
    """Second moments of one layer's inputs (and optionally of its output gradients), per group.

    ``patch`` is ``(g, n, n)`` with ``n = I/g * kh * kw`` (Linear: ``in``): what ``svd``
    whitens with. ``channel`` is ``(g, I/g, I/g)``: the input-channel moment Tucker-2 and CP
    whiten with. ``count`` is the number of rows (tokens or output positions) summed and
    ``samples`` the number of samples they came from. ``grad`` is ``(g, O/g, O/g)``: the
    summed outer products of the output loss's gradient with respect to the layer's output
    (per probe, averaged over probes), over ``grad_count`` rows; ``None`` without gradients.
    ``shrinkage`` is the weight ``a`` of the identity target in :meth:`moment`.
    """

    kind: str
    patch: torch.Tensor
    count: int = 0
    kernel: tuple[int, int] = (1, 1)
    ridge: float = DEFAULT_RIDGE
    _memo: dict = field(default_factory=dict, repr=False)
    samples: int = 0
    grad: torch.Tensor | None = None
    grad_count: int = 0
    shrinkage: float = 0.0
    fourth: float = 0.0  # sum over rows of ||x||^4 (for the Ledoit-Wolf shrinkage)
    _base: Any = field(default=None, repr=False, compare=False)  # the unshrunk statistics (shared output side)

    @property
    def channel(self) -> torch.Tensor:
        g, n, _ = self.patch.shape
        khw = self.kernel[0] * self.kernel[1]
        c = n // khw
        p = self.patch.reshape(g, c, khw, c, khw)
        return torch.diagonal(p, dim1=2, dim2=4).sum(-1)  # sum over kernel offsets

    def moment(self, which: str = "patch") -> torch.Tensor:
        """The mean second moment (shrunk toward ``tr/n I`` by :attr:`shrinkage`)."""
        m = (self.patch if which == "patch" else self.channel) / max(self.count, 1)
        return _shrink(m, self.shrinkage)

    def ridged_moment(self, which: str = "patch") -> torch.Tensor:
        """``L L^T`` of :meth:`whitener`: the moment plus its ridge (the metric of held-out scores)."""
        key = ("C", which, self.ridge)
        if key not in self._memo:
            m = self.moment(which)
            scale = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1).clamp_min(0)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            m.diagonal(dim1=-2, dim2=-1).add_((self.ridge * scale)[..., None])
            self._memo[key] = m
        return self._memo[key]

    def grad_moment(self, shrinkage: float = 0.0) -> torch.Tensor | None:
        """The mean output-gradient moment ``G / grad_count``, shrunk toward ``tr/n I``."""
        if self.grad is None:
            return None
        key = ("G", float(shrinkage))
        memo = (self._base or self)._memo  # shrinking the input side leaves it as it is
        if key not in memo:
            memo[key] = _shrink(self.grad / max(self.grad_count, 1), shrinkage)
        return memo[key]

    def shrunk(self, shrinkage: float) -> "LayerStats":
        """These statistics with the input moment shrunk by ``shrinkage`` in [0, 1] (memoised).

        ``shrunk(0)`` whitens exactly as the statistics themselves; ``shrunk(1)`` whitens by a
        multiple of the identity, which is plain (data-free) SVD.
        """
        a = float(shrinkage)
        if not 0.0 <= a <= 1.0 or not math.isfinite(a):
            raise ValueError(f"shrinkage must be a number in [0, 1]; got {shrinkage!r}")
        if a == self.shrinkage:
            return self
        key = ("shrunk", a)
        if key not in self._memo:
            self._memo[key] = replace(self, shrinkage=a, _memo={}, _base=self._base or self)
        return self._memo[key]

    @property
    def token(self) -> str:
        """A content hash of the statistics: keys memoised results computed from them."""
        if "token" not in self._memo:
            g = "" if self.grad is None else fingerprint(self.grad)
            self._memo["token"] = f"{fingerprint(self.patch)}|{self.count}|{self.ridge}|{self.shrinkage}|{g}"
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

    def output_whitener(self, shrinkage: float) -> torch.Tensor | None:
        """Lower-triangular ``R`` with ``R R^T`` the (shrunk, ridged) output-gradient moment."""
        if self.grad is None:
            return None
        key = ("R", float(shrinkage), self.ridge)
        memo = (self._base or self)._memo  # shrinking the input side leaves it as it is
        if key not in memo:
            memo[key] = _cholesky(self.grad_moment(shrinkage), self.ridge)
        return memo[key]

    def ledoit_wolf(self) -> float:
        """The Ledoit-Wolf shrinkage of the input moment toward ``tr/n I`` (0 when unknown)."""
        return ledoit_wolf(self)

    @property
    def nbytes(self) -> int:
        return self.patch.numel() * self.patch.element_size() + (
            0 if self.grad is None else self.grad.numel() * self.grad.element_size())


def _shrink(m: torch.Tensor, a: float) -> torch.Tensor:
    if not a:
        return m
    n = m.shape[-1]
    mu = torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)
    if a == 1.0:
        return torch.diag_embed(mu[..., None].expand(*mu.shape, n).clone())
    return (1.0 - a) * m + a * mu[..., None, None] * torch.eye(n, dtype=m.dtype)


def ledoit_wolf(stats: LayerStats) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity toward ``mu I`` for the second moment.

    ``a = min(1, b2 / d2)`` with ``d2 = ||S - mu I||^2`` and ``b2`` the estimated variance of
    ``S`` itself, ``(sum_t ||x_t||^4 / N - ||S||^2) / N``, from the rows' fourth moments
    gathered with the statistics (groups pooled). 0 when they were not gathered.
    """
    n_rows = stats.count
    if n_rows < 2 or stats.fourth <= 0:
        return 0.0
    s = stats.patch / n_rows  # (g, n, n)
    n = s.shape[-1]
    mu = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)
    fro = float((s ** 2).sum())
    d2 = fro - float((mu ** 2).sum()) * n
    b2 = max(0.0, (stats.fourth / n_rows - fro) / n_rows)
    if d2 <= 0:
        return 1.0
    return float(min(1.0, b2 / d2))


def _cholesky(c: torch.Tensor, ridge: float) -> torch.Tensor:
    d = torch.diagonal(c, dim1=-2, dim2=-1)
    scale = d.mean(-1).clamp_min(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero inputs: identity
    if bool((c == torch.diag_embed(d)).all()):  # diagonal (a moment shrunk all the way): no factorization
        return torch.diag_embed((d + ridge * scale[..., None]).clamp_min(0).sqrt())
    a = c.clone()
    a.diagonal(dim1=-2, dim2=-1).add_((ridge * scale)[..., None])
    L, info = torch.linalg.cholesky_ex(a)
    jitter = max(ridge, 1e-12)
    while int(info.max()) != 0 and jitter < 1e-2:  # singular (e.g. no ridge): the least ridge that works
        jitter *= 100
        a = c.clone()
        a.diagonal(dim1=-2, dim2=-1).add_((jitter * scale)[..., None])
        L, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) != 0:  # numerically indefinite: fall back to a symmetric square root
        vals, vecs = torch.linalg.eigh(a)
        L = vecs * vals.clamp_min(ridge * float(scale.min()))[..., None, :].sqrt()
    return L


class Calibration(dict):
    """Layer name -> :class:`LayerStats`, as :func:`collect_stats` gathers them in one pass.

    A plain dict to everything that reads statistics (``compress(stats=...)``, the
    explorer), with what the planner needs besides: :attr:`halves` (the statistics of two
    halves of the data, for held-out scores), :attr:`gradients` (whether output-gradient
    moments were gathered) and :attr:`samples`. Pass the same object to
    :func:`tensorscope.plan_for_budget` (``stats=``) for every budget and to
    :func:`tensorscope.compress`: nothing is gathered twice.
    """

    def __init__(self, layers: dict[str, LayerStats] | None = None, *, part0: dict[str, tuple] | None = None,
                 samples: int = 0, gradients: bool = False, probes: int = 0, loss: str = ""):
        super().__init__(layers or {})
        self._part0 = part0 or {}
        self.samples = samples
        self.gradients = gradients
        self.probes = probes
        self.loss = loss

    @property
    def has_halves(self) -> bool:
        return bool(self._part0) and all(n in self._part0 for n in self)

    def half(self, name: str) -> tuple[LayerStats, LayerStats] | None:
        """The statistics of one layer on each half of the data (None when it was not split).

        The second half is the full sum minus the first: computed when asked, not stored.
        """
        full = self.get(name)
        p = self._part0.get(name)
        if full is None or p is None:
            return None
        key = ("halves",)
        if key not in full._memo:
            patch0, count0, samples0, grad0, gcount0, fourth0 = p
            a = replace(full, patch=patch0, count=count0, samples=samples0, grad=grad0, grad_count=gcount0,
                        fourth=fourth0, shrinkage=0.0, _memo={})
            b = replace(full, patch=full.patch - patch0, count=full.count - count0, samples=full.samples - samples0,
                        grad=None if full.grad is None else full.grad - grad0, grad_count=full.grad_count - gcount0,
                        fourth=full.fourth - fourth0, shrinkage=0.0, _memo={})
            if a.count == 0 or b.count == 0:
                return None
            full._memo[key] = (a, b)
        return full._memo[key]

    def release(self, name: str) -> None:
        """Forget what was computed from one layer's halves (the planner is done with them)."""
        full = self.get(name)
        if full is not None:
            full._memo.pop(("halves",), None)

    @property
    def halves(self) -> tuple[dict[str, LayerStats], dict[str, LayerStats]] | None:
        """``(first, second)``: every layer's statistics on each half of the data, or None."""
        if not self.has_halves:
            return None
        pairs = {n: self.half(n) for n in self}
        if any(v is None for v in pairs.values()):
            return None
        return {n: v[0] for n, v in pairs.items()}, {n: v[1] for n, v in pairs.items()}

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics (shared moments counted once)."""
        seen, total = set(), 0
        for s in self.values():
            if id(s.patch) not in seen:
                seen.add(id(s.patch))
                total += s.patch.numel() * 8
            if s.grad is not None:
                total += s.grad.numel() * 8
        for p in self._part0.values():
            if id(p[0]) not in seen:
                seen.add(id(p[0]))
                total += p[0].numel() * 8
            if p[3] is not None:
                total += p[3].numel() * 8
        return total


def _patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches as rows ``(B*L, I*kh*kw)``, padded exactly as the layer pads."""
    if x.dim() < 3 or x.shape[-3] != layer.in_channels:  # the layer's own error, said before unfold's
        raise RuntimeError(f"a Conv2d with {layer.in_channels} input channels got an input of shape "
                           f"{tuple(x.shape)} (wanted (N, {layer.in_channels}, H, W))")
    pad = layer._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    if tuple(layer.kernel_size) == (1, 1):  # a pointwise conv: the pixels themselves, no unfold
        s = layer.stride
        if tuple(s) != (1, 1):
            x = x[:, :, ::s[0], ::s[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (B, n, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _gram(rows: torch.Tensor, g: int, n: int, exact: bool | None = None) -> torch.Tensor:
    """``sum_t x_t x_t^T`` per group, summed in float64.

    Up to ``_EXACT_ROWS`` rows the products are float64 (batching never shows); beyond (a
    conv's many output positions), or with ``exact=False``, float32 products of ``_ROWS``
    rows at a time are added up in float64, 3-4x faster, within about 1e-6 of the float64 sum.
    """
    r = rows.reshape(rows.shape[0], g, n).transpose(0, 1)  # (g, N, n)
    out = torch.zeros(g, n, n, dtype=torch.float64)
    if exact is None:
        exact = rows.shape[0] <= _EXACT_ROWS or rows.dtype == torch.float64
    for i in range(0, r.shape[1], _ROWS):
        blk = r[:, i:i + _ROWS]
        if exact:
            blk = blk.to(torch.float64)
            out += blk.transpose(1, 2) @ blk
        else:
            blk = blk.float()
            out += (blk.transpose(1, 2) @ blk).double()
    return out


class _Sums:
    """Running sums of one moment: the whole data and its first half."""

    def __init__(self, g: int, n: int):
        self.g, self.n = g, n
        self.sum = torch.zeros(g, n, n, dtype=torch.float64)
        self.part0 = None
        self.count = self.count0 = 0
        self.samples = self.samples0 = 0
        self.fourth = self.fourth0 = 0.0

    def add(self, rows: torch.Tensor, part: int, samples: int, fourth: bool = False) -> None:
        if rows.shape[0] == 0:
            return
        gram = _gram(rows, self.g, self.n)
        self.sum += gram
        self.count += rows.shape[0]
        self.samples += samples
        f = float(rows.to(torch.float64).pow(2).sum(-1).pow(2).sum()) if fourth else 0.0
        self.fourth += f
        if part == 0:
            if self.part0 is None:
                self.part0 = torch.zeros_like(self.sum)
            self.part0 += gram
            self.count0 += rows.shape[0]
            self.samples0 += samples
            self.fourth0 += f


class _Accumulator:
    """The input (and output-gradient) moments of one layer."""

    def __init__(self, layer: nn.Module, ridge: float):
        self.layer = layer
        self.groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        n_in = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        n_out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        khw = layer.kernel_size[0] * layer.kernel_size[1] if isinstance(layer, nn.Conv2d) else 1
        self.n = n_in // self.groups * khw
        self.o = n_out // self.groups
        self.inputs = _Sums(self.groups, self.n)
        self.grads: _Sums | None = None
        self.ridge = ridge
        self.kernel = tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) else (1, 1)
        # a conv port that pads inside its forward: the statistics are of the padded input
        self.pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Iterable[torch.Tensor]:
        """The layer's input rows (a conv's patches); ``mask`` ``(N, T)`` drops the positions a
        tokenizer's ``attention_mask`` hides (padding) from a Linear's ``(N, T, d)`` input."""
        x = x.detach()
        if isinstance(self.layer, Conv1dView):  # the nn.Conv1d's own (N, C, L): the view's (N, C, 1, L)
            check_conv1d_input(self.layer, x)
            x = view_input(self.layer, x)
        if isinstance(self.layer, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if self.pad is not None:
                x = self.pad(x)
            per = max(1, _CHUNK_ELEMS // max(1, x[0:1].numel() * self.kernel[0] * self.kernel[1]))
            for chunk in x.split(per):
                yield _patches(self.layer, chunk)
        else:
            yield _token_rows(x, mask)

    def add(self, x: torch.Tensor, part: int, samples: int, fourth: bool, mask: torch.Tensor | None = None) -> None:
        for rows in self.rows(x, mask):
            self.inputs.add(rows, part, 0, fourth)
        self.inputs.samples += samples
        if part == 0:
            self.inputs.samples0 += samples

    def add_grad(self, g: torch.Tensor, part: int, count: bool, mask: torch.Tensor | None = None) -> None:
        """``g``: the gradient with respect to the layer's output for one probe, ``(B, ..., O)`` or
        ``(B, O, H, W)``; ``count``: the first probe of a round counts the rows."""
        if self.grads is None:
            self.grads = _Sums(self.groups, self.o)
        g = view_input(self.layer, g.detach())  # an nn.Conv1d's (N, O, L): (N, O, 1, L)
        if isinstance(self.layer, nn.Conv2d):
            g = g.unsqueeze(0) if g.dim() == 3 else g
            rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        else:
            rows = _token_rows(g, mask)
        s = self.grads
        n_rows = rows.shape[0]
        # random probes make the moment an estimate: float32 products (float64 sums) lose nothing
        # that matters, except for float64 models (exact probes in the tests stay exact)
        exact = rows.dtype == torch.float64
        if n_rows > _GRAD_ROWS:  # many output positions: an evenly spread subset, scaled to the sum
            idx = torch.linspace(0, n_rows - 1, _GRAD_ROWS).round().long()
            gram = _gram(rows[idx], self.groups, self.o, exact=exact) * (n_rows / _GRAD_ROWS)
        else:
            gram = _gram(rows, self.groups, self.o, exact=exact)
        s.sum += gram
        if count:
            s.count += rows.shape[0]
        if part == 0:
            if s.part0 is None:
                s.part0 = torch.zeros_like(s.sum)
            s.part0 += gram
            if count:
                s.count0 += rows.shape[0]

    def result(self) -> LayerStats:
        return self._result(False)[0]

    def _result(self, halves: bool) -> tuple[LayerStats, tuple | None]:
        kind = "conv2d" if isinstance(self.layer, nn.Conv2d) else "linear"
        i, gr = self.inputs, self.grads
        st = LayerStats(kind, i.sum, i.count, self.kernel, self.ridge, samples=i.samples,
                        grad=None if gr is None else gr.sum, grad_count=0 if gr is None else gr.count,
                        fourth=i.fourth)
        part0 = None
        if halves and i.part0 is not None and 0 < i.count0 < i.count:
            part0 = (i.part0, i.count0, i.samples0, None if gr is None else gr.part0,
                     0 if gr is None else gr.count0, i.fourth0)
        return st, part0


def _signature(layer: nn.Module) -> tuple:
    """What the statistics of a layer's input depend on besides the input itself."""
    if isinstance(layer, nn.Conv2d):
        b = behaviour(layer)
        return ("conv", layer.in_channels, layer.groups, tuple(layer.kernel_size), tuple(layer.stride),
                tuple(layer.dilation), str(layer.padding), layer.padding_mode, id(b.padding_module(layer)) if b else 0)
    return ("linear", layer.in_features)


class _Unshare(Exception):
    """Layers that read one tensor on the first batch read different ones later."""


def _rows_of(batch, lo: int, hi: int):
    """Samples ``lo:hi`` of a batch (a tensor, or keyword tensors with the batch first), or None."""
    b = split_batch(batch)
    n = b.size
    cut = lambda v: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
    args = tuple(cut(a) for a in b.args)
    kwargs = {k: cut(v) for k, v in b.kwargs.items()}
    return args, kwargs


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(..., d)`` as rows ``(R, d)``, without the positions ``mask`` ``(N, T)`` hides
    when ``x`` is ``(N, T, d)``: padding tokens are no input the layer will ever matter for
    (attention and pooling ignore them), so they stay out of its statistics."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _token_mask(kwargs: dict) -> torch.Tensor | None:
    """A tokenizer batch's ``attention_mask`` as booleans ``(N, T)``, or None."""
    m = kwargs.get("attention_mask") if isinstance(kwargs, dict) else None
    if isinstance(m, torch.Tensor) and m.dim() == 2 and not m.is_floating_point():
        return m != 0
    return None


def _mask(kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
    """The ``attention_mask`` of a tokenizer batch, shaped to weigh ``out``'s positions."""
    m = kwargs.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2 and out.dim() >= 3 and tuple(m.shape) == tuple(out.shape[:2]):
        return m.to(out.dtype).reshape(*m.shape, *([1] * (out.dim() - 2)))
    return None


def _probes(out: torch.Tensor, kwargs: dict, probes: int, gen: torch.Generator) -> tuple[str, list[torch.Tensor]]:
    """Cotangents ``v`` with ``sum_v v v^T`` the curvature of the output loss at the original.

    Class scores ``(N, C)``: the Fisher of the softmax, ``diag(p) - p p^T``, from its
    ``probes`` largest terms ``sqrt(p_k) (e_k - p)`` (exact once they hold all the mass).
    Anything else: the squared error ``1/2 ||f - f0||^2`` (Gauss-Newton ``J^T J``), from
    unit vectors when a sample has at most ``probes`` outputs (exact), else Gaussian probes
    scaled by ``1/sqrt(probes)``; positions an ``attention_mask`` hides count nothing.
    """
    out = out.detach()
    if out.dim() == 2 and out.shape[1] > 1:
        p = torch.softmax(out.double(), -1)
        k = min(probes, out.shape[1])
        top = p.topk(k, dim=-1).indices  # (N, k)
        vs = []
        for j in range(k):
            idx = top[:, j]
            pk = p.gather(1, idx[:, None])
            v = -p.clone()
            v.scatter_add_(1, idx[:, None], torch.ones_like(pk))
            vs.append((v * pk.sqrt()).to(out.dtype))
        return "kl", vs
    mask = _mask(kwargs, out)
    per = out[0].numel() if out.dim() else 1
    vs = []
    if per <= probes:
        flat = out.reshape(out.shape[0], -1) if out.dim() else out.reshape(1, 1)
        for j in range(per):
            v = torch.zeros_like(flat)
            v[:, j] = 1.0
            vs.append(v.reshape(out.shape))
    else:
        for _ in range(probes):
            vs.append(torch.randn(out.shape, generator=gen, dtype=out.dtype) / math.sqrt(probes))
    if mask is not None:
        vs = [v * mask for v in vs]
    return "mse", vs


def collect_stats(
    model: nn.Module,
    data: Any,
    layers: Iterable[str] | None = None,
    *,
    max_batches: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    halves: bool = True,
    gradients: bool = False,
    probes: int = DEFAULT_PROBES,
    grad_batch: int | None = None,
    fourth: bool = False,
    seed: int = 0,
    progress: Any = False,
    gradient_data: Any = None,
) -> Calibration:
    """One pass over ``data`` recording the input second moments of the named layers.

    Few calibration samples make poor moments of wide layers' inputs; more of them, made from
    the same samples, come from :func:`tensorscope.augment_calibration` (pass its batches as
    ``data``).

    Parameters
    ----------
    layers : names, optional
        Default: every layer ``inspect`` lists as decomposable.
    halves : bool
        Also keep the moments of two halves of the data (alternate batches; the two halves of
        the rows of a single batch) for held-out scores: :attr:`Calibration.halves`.
    gradients : bool
        Also record the second moment of the output loss's gradient at each layer's output
        (backward passes: ``probes`` per sample; see :func:`_probes` for the loss). Needed by
        ``plan_for_budget(..., allocation="output")`` and by factors with a ``fisher`` option.
    grad_batch : int, optional
        Samples per backward pass (default: the whole batch); lower it to bound memory.
    fourth : bool
        Record ``sum ||x||^4`` for the Ledoit-Wolf shrinkage (:func:`ledoit_wolf`).
    gradient_data : iterable of batches, optional
        With ``gradients=True``: take the output-gradient moments from these batches and the
        input moments from ``data`` (a forward pass only). For augmented calibration data
        (``data=augment_calibration(originals)``, ``gradient_data=originals``): the backward
        passes, one per probe, then run over the original samples only. Their halves must be
        the same samples as ``data``'s (as ``augment_calibration`` keeps them).

    Raises :class:`DataError` naming the batch when the model cannot run it, and when a
    layer was never reached. The model is left as it was (mode, ``requires_grad``).
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise DataError(f"probes must be a positive integer; got {probes!r}")
    modules = layer_modules(model)  # a Conv1D as its Linear view; hooks go on the layer itself (hooked)
    if layers is None:
        from .inventory import inspect

        names = [i.name for i in inspect(model)]
    else:
        names = list(layers)
    unknown = [n for n in names if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d))]
    if unknown:
        raise DataError(f"collect_stats: {unknown[:5]} are not Linear, Conv1d or Conv2d layers of the model")
    batches = list(iter_batches(data, max_batches=max_batches))
    if not batches:
        raise DataError("calibration data yielded no batches; pass at least one batch of inputs")
    if gradient_data is not None:
        if not gradients:
            raise DataError("gradient_data= gives the output-gradient moments: pass gradients=True with it")
        kw = dict(max_batches=max_batches, ridge=ridge, halves=halves, probes=probes, fourth=fourth, seed=seed,
                  progress=progress)
        inputs = collect_stats(model, batches, names, gradients=False, **kw)
        grads = collect_stats(model, gradient_data, names, gradients=True, grad_batch=grad_batch, **kw)
        return _with_gradients(inputs, grads)
    try:
        return _collect(model, modules, names, batches, ridge, halves, gradients, probes, grad_batch, fourth, seed,
                        progress, share=True)
    except _Unshare:
        return _collect(model, modules, names, batches, ridge, halves, gradients, probes, grad_batch, fourth, seed,
                        progress, share=False)


def _collect(model, modules, names, batches, ridge, halves, gradients, probes, grad_batch, fourth, seed, progress,
             share: bool) -> Calibration:
    accs = {n: _Accumulator(modules[n], ridge) for n in names}
    owner = {n: n for n in names}  # layers reading one tensor share the first one's input moments
    state = {"part": 0, "samples": 0, "first": True, "seen": {}, "outs": {}}
    split_rows = len(batches) == 1 and halves

    def pre_hook(mod, args, n):
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        sig = _signature(modules[n])  # a Conv1D's view, not the layer
        seen = state["seen"]
        key = (id(x), sig)
        if share and key in seen and seen[key][0] is x:
            if state["first"]:
                owner[n] = seen[key][1]
                return
            if owner[n] == seen[key][1]:
                return
            raise _Unshare
        if share and not state["first"] and owner[n] != n:
            raise _Unshare
        seen[key] = (x, n)
        acc = accs[n]
        mask = state.get("mask")
        if state["split"] and x.dim() >= 1 and x.shape[0] == state["samples"] and state["samples"] >= 2:
            h = state["samples"] // 2
            acc.add(x[:h], 0, h, fourth, None if mask is None else mask[:h])
            acc.add(x[h:], 1, state["samples"] - h, fourth, None if mask is None else mask[h:])
        else:
            acc.add(x, state["part"], state["samples"], fourth, mask)

    def fwd_hook(mod, args, out, n):
        if state.get("record_outputs") and isinstance(out, torch.Tensor) and out.requires_grad:
            state["outs"].setdefault(n, []).append(out)

    hooks = []
    for n in names:
        hooks.append(hooked(modules[n]).register_forward_pre_hook(lambda mod, args, n=n: pre_hook(mod, args, n)))
        if gradients:
            hooks.append(hooked(modules[n]).register_forward_hook(
                lambda mod, args, out, n=n: fwd_hook(mod, args, out, n)))
    was_training = model.training
    flags = ({n: [(p, p.requires_grad) for p in hooked(modules[n]).parameters(recurse=False)] for n in names}
             if gradients else {})
    gen = torch.Generator().manual_seed(seed)
    loss_kind = ""
    total_samples = 0
    try:
        model.eval()
        if gradients:
            for n in names:
                for p, _ in flags[n]:
                    p.requires_grad_(True)
        with Progress(progress, total=len(batches), desc="calibration statistics") as bar:
            for i, batch in enumerate(batches):
                b = split_batch(batch)
                size = b.size
                total_samples += size
                state["samples"] = size
                state["part"] = i % 2 if halves else 0
                state["seen"] = {}
                state["split"] = split_rows and not gradients
                state["mask"] = _token_mask(b.kwargs)
                try:
                    if not gradients:
                        with torch.no_grad():
                            model(*b.args, **b.kwargs)
                    else:
                        loss_kind = _gradient_pass(model, batch, b, size, accs, state, grad_batch, probes, gen,
                                                   split_rows) or loss_kind
                except (_Unshare, DataError):
                    raise
                except Exception as e:  # noqa: BLE001 - the model's own error, named with the batch
                    raise DataError(
                        f"calibration batch {i} ({describe_batch(b)}) failed in the model's forward: "
                        f"{type(e).__name__}: {str(e)[:300]}") from e
                state["first"] = False
                bar.update(1)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
        for n, fl in flags.items():
            for p, f in fl:
                p.requires_grad_(f)
        state["outs"] = {}
    missing = [n for n in names if accs[owner[n]].inputs.count == 0]
    if missing:
        raise DataError(f"the calibration data never reached layer(s) {missing[:5]}: their inputs are unknown")
    out: dict[str, LayerStats] = {}
    part0: dict[str, tuple] = {}
    made: dict[str, tuple] = {}
    for n in names:
        o = owner[n]
        if o not in made:
            made[o] = accs[o]._result(halves)
        st, p0 = made[o]
        if o != n:  # same input moments, this layer's own gradients
            gr = accs[n].grads
            st = replace(st, grad=None if gr is None else gr.sum, grad_count=0 if gr is None else gr.count, _memo={})
            if p0 is not None:
                p0 = (p0[0], p0[1], p0[2], None if gr is None else gr.part0, 0 if gr is None else gr.count0, p0[5])
        elif accs[n].grads is not None and st.grad is None:
            st = replace(st, grad=accs[n].grads.sum, grad_count=accs[n].grads.count, _memo={})
        out[n] = st
        if p0 is not None:
            part0[n] = p0
    bad = [n for n in names if not bool(torch.isfinite(out[n].patch).all())
           or (out[n].grad is not None and not bool(torch.isfinite(out[n].grad).all()))]
    if bad:  # a NaN in the data or in the network: factors fitted to it would be NaN
        raise DataError(f"the calibration data gives non-finite (NaN or inf) inputs or gradients at layer(s) "
                        f"{bad[:5]}: check the batches (and the model's weights) for NaN/inf values")
    if gradients:
        dead = [n for n in names if out[n].grad is None or out[n].grad_count == 0]
        if dead:
            raise DataError(f"no gradient of the model's output reached layer(s) {dead[:5]}: their output "
                            "sensitivity is unknown (is the output detached from them?)")
    if halves and not part0 and total_samples >= 2:
        warnings.warn("the calibration data could not be split in two halves (one batch whose layer inputs do "
                      "not have the samples first): held-out scores fall back to in-sample ones", stacklevel=3)
    return Calibration(out, part0=part0 if halves else None, samples=total_samples, gradients=gradients,
                       probes=probes if gradients else 0, loss=loss_kind)


def _with_gradients(inputs: Calibration, grads: Calibration) -> Calibration:
    """``inputs``' input moments with ``grads``' output-gradient moments, halves paired."""
    if inputs.has_halves != grads.has_halves:
        raise DataError("data and gradient_data must both split in two halves (two or more batches, or one batch "
                        "of two or more samples), so that held-out scores pair the same samples; "
                        f"data {'does' if inputs.has_halves else 'does not'}, gradient_data "
                        f"{'does' if grads.has_halves else 'does not'}")
    out, part0 = {}, {}
    for n, st in inputs.items():
        g = grads[n]
        out[n] = replace(st, grad=g.grad, grad_count=g.grad_count, _memo={})
        if inputs.has_halves:
            p, q = inputs._part0[n], grads._part0[n]
            part0[n] = (p[0], p[1], p[2], q[3], q[4], p[5])
    return Calibration(out, part0=part0 or None, samples=inputs.samples, gradients=True, probes=grads.probes,
                       loss=grads.loss)


def _gradient_pass(model, batch, b, size, accs, state, grad_batch, probes, gen, split_rows) -> str:
    """Forward (gathering input moments) and ``probes`` backward passes over one batch, in chunks
    of ``grad_batch`` samples (a single batch split in halves is never chunked across them)."""
    chunk = size if not grad_batch else max(1, int(grad_batch))
    h = size // 2 if split_rows and size >= 2 else None
    bounds = []
    for lo in range(0, size, chunk):
        hi = min(size, lo + chunk)
        if h is not None and lo < h < hi:
            bounds += [(lo, h), (h, hi)]
        else:
            bounds.append((lo, hi))
    kind = ""
    batch_part = state["part"]
    for lo, hi in bounds:
        args, kwargs = (b.args, b.kwargs) if (lo, hi) == (0, size) else _rows_of(batch, lo, hi)
        state["part"] = (0 if lo < h else 1) if h is not None else batch_part
        state["samples"] = hi - lo
        state["seen"] = {}
        state["outs"] = {}
        state["mask"] = _token_mask(kwargs)
        state["record_outputs"] = True
        try:
            with torch.enable_grad():
                out = output_tensor(model(*args, **kwargs))
                state["record_outputs"] = False
                kind, vs = _probes(out, kwargs, probes, gen)
                names = [n for n, lst in state["outs"].items() for _ in lst]
                tensors = [t for lst in state["outs"].values() for t in lst]
                if not tensors or not out.requires_grad:
                    raise DataError("the model's output does not depend on the planned layers' outputs through "
                                    "autograd: their output sensitivity cannot be measured")
                for j, v in enumerate(vs):
                    gs = torch.autograd.grad(out, tensors, grad_outputs=v, retain_graph=j < len(vs) - 1,
                                             allow_unused=True)
                    counted = set()
                    for n, g in zip(names, gs):
                        if g is not None:
                            accs[n].add_grad(g, state["part"], count=j == 0, mask=state["mask"])
                            counted.add(n)
        finally:
            state["record_outputs"] = False
            state["outs"] = {}
            state["part"] = batch_part
    return kind
