"""Singular-value spectra of layers, their metrics, and error-versus-cost curves.

Every spectrum comes from factorizations cached per distinct weight
(:mod:`tensorscope.linalg`): the SVD of the ``out x in*kh*kw`` matricization (what ``svd``
truncates) and the eigendecomposition of the input-mode unfolding's Gram matrix (what
Tucker-2 truncates on its input side). A later query, or a rank change, never recomputes
them. Grouped convs have one spectrum per group; a rank means that rank in every group.

References
----------
Roy and Vetterli, "The effective rank", EUSIPCO 2007. Rudelson and Vershynin, "Sampling
from large matrices" (stable rank), JACM 2007. Martin and Mahoney, "Implicit
self-regularization in deep neural networks", JMLR 2021 (alpha of the ESD). Sedghi, Gupta
and Long, "The singular values of convolutional layers", ICLR 2019.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from . import linalg
from ._cache import factor_cache, fingerprint
from .calibration import collect_stats
from .errors import PlanError
from .inventory import ModelIndex, inspect
from .views import layer_modules
from .linalg import UNFOLDINGS, check_finite
from .methods import LayerGeometry, Tradeoff, get_method
from .progress import Progress
from .sources import ON_DISK, open_source

__all__ = ["Spectrum", "Tradeoff", "UNFOLDINGS", "layer_spectrum", "operator_spectrum", "powerlaw_alpha",
           "spectra", "spectrum", "tradeoff"]


@dataclass
class Spectrum:
    """Singular values of one unfolding of one layer (per group), and what follows from them.

    ``values`` are all singular values, descending; ``grouped`` is ``(groups, k)``, each row
    descending. Truncation at rank ``r`` keeps the top ``r`` of every group.
    """

    layer: str
    unfolding: str
    grouped: np.ndarray
    shape: tuple[int, int]  # (rows, cols) of one group's matrix
    whitened: bool = False

    @property
    def values(self) -> np.ndarray:
        # contiguous: a reversed view has a negative stride, which torch.as_tensor refuses
        return np.ascontiguousarray(np.sort(self.grouped.reshape(-1))[::-1])

    @property
    def groups(self) -> int:
        return self.grouped.shape[0]

    @property
    def max_rank(self) -> int:
        return self.grouped.shape[1]

    @property
    def total_energy(self) -> float:
        return float((self.grouped.astype(np.float64) ** 2).sum())

    @property
    def energy(self) -> np.ndarray:
        """Cumulative retained energy at ranks 1..max_rank (fraction of the squared values)."""
        sq = (self.grouped.astype(np.float64) ** 2).sum(axis=0)
        total = sq.sum()
        return np.cumsum(sq) / total if total > 0 else np.ones_like(sq)

    def tail_energy(self, rank: int) -> float:
        """Sum of the squared singular values a truncation at ``rank`` discards."""
        rank = self._check(rank)
        return float((self.grouped[:, rank:].astype(np.float64) ** 2).sum())

    def retained_energy(self, rank: int) -> float:
        total = self.total_energy
        return 1.0 if total == 0 else 1.0 - self.tail_energy(rank) / total

    def relative_error(self, rank: int) -> float:
        """Relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young tail)."""
        total = self.total_energy
        return 0.0 if total == 0 else math.sqrt(self.tail_energy(rank) / total)

    def rank_for_energy(self, keep: float) -> int:
        """The smallest rank keeping at least ``keep`` of the energy (``keep`` in (0, 1])."""
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"energy fraction must be in (0, 1]; got {keep!r}")
        e = self.energy
        # a tiny tolerance so that keep=1.0 is met despite rounding in the cumulative sum
        return int(min(np.searchsorted(e, keep - 1e-12) + 1, self.max_rank))

    @property
    def spectral_norm(self) -> float:
        return float(self.grouped.max()) if self.grouped.size else 0.0

    @property
    def stable_rank(self) -> float:
        """||W||_F^2 / ||W||_2^2: a smooth, noise-robust lower bound on the rank."""
        s = self.spectral_norm
        return 0.0 if s == 0 else self.total_energy / s**2

    @property
    def effective_rank(self) -> float:
        """exp of the entropy of the normalised singular values (Roy and Vetterli 2007)."""
        s = self.values.astype(np.float64)
        total = s.sum()
        if total <= 0:
            return 0.0
        p = s[s > 0] / total
        return float(np.exp(-(p * np.log(p)).sum()))

    @property
    def alpha(self) -> float:
        """Power-law exponent of the empirical spectral density of W^T W (NaN if too few values)."""
        return powerlaw_alpha(self.values.astype(np.float64) ** 2)

    def metrics(self) -> dict[str, float]:
        return {
            "max_rank": self.max_rank,
            "spectral_norm": self.spectral_norm,
            "stable_rank": self.stable_rank,
            "effective_rank": self.effective_rank,
            "alpha": self.alpha,
        }

    def _check(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not (0 <= rank <= self.max_rank):
            raise PlanError(f"rank must be an integer in [0, {self.max_rank}] for layer {self.layer!r}; got {rank!r}")
        return int(rank)


def powerlaw_alpha(eigs: np.ndarray, min_tail: int = 10, candidates: int = 256) -> float:
    """Maximum-likelihood power-law exponent with x_min chosen by the KS distance (Clauset et al. 2009)."""
    x = np.sort(eigs[eigs > 0])
    n = len(x)
    if n < min_tail + 1:
        return float("nan")
    js = np.unique(np.linspace(0, n - min_tail, min(candidates, n - min_tail + 1)).astype(int))
    best = (np.inf, float("nan"))
    logx = np.log(x)
    csum = np.cumsum(logx[::-1])[::-1]  # csum[j] = sum(log x[j:])
    for j in js:
        m = n - j
        denom = csum[j] - m * logx[j]
        if denom <= 0:
            continue
        a = 1.0 + m / denom
        tail = x[j:]
        fit = 1.0 - (tail / x[j]) ** (1.0 - a)
        emp = np.arange(m) / m
        d = np.abs(emp - fit).max()
        if d < best[0]:
            best = (d, a)
    return float(best[1])


# ---- computing spectra --------------------------------------------------------------------


def _layer(model: nn.Module, name: str) -> nn.Module:
    index = ModelIndex(model)
    if name not in index.modules or not name:
        close = difflib.get_close_matches(name, [n for n in index.modules if n], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise PlanError(f"the model has no layer {name!r}{hint}")
    reason = index.reason(name)
    if reason:
        raise PlanError(f"layer {name!r} has no spectrum: {reason}")
    return index.modules[name]


def layer_spectrum(layer: nn.Module, name: str = "", unfolding: str = "out", stats: Any = None) -> Spectrum:
    """The spectrum of one layer module (``stats``: whitened by its input statistics)."""
    check_finite(layer, name)
    values, shape = linalg.unfolding_values(layer, unfolding, stats)
    return Spectrum(name, unfolding, values, shape, whitened=stats is not None)


def spectrum(model: nn.Module, layer: str, *, unfolding: str = "out", data: Any = None) -> Spectrum:
    """Singular values of one layer's ``out`` (out x in*kh*kw) or ``in`` (in x out*kh*kw) unfolding.

    With ``data``, the spectrum of the weight whitened by the layer's input statistics: the
    values a data-aware truncation actually cuts.
    """
    module = _layer(model, layer)
    stats = None
    if data is not None:
        stats = collect_stats(model, data, [layer])[layer]
    return layer_spectrum(module, layer, unfolding, stats)


def spectra(
    model: nn.Module,
    *,
    unfolding: str = "out",
    layers: Iterable[str] | None = None,
    data: Any = None,
    progress: Any = False,
) -> dict[str, Spectrum]:
    """Spectra of all decomposable layers (or of ``layers``), computed once and cached.

    ``model`` may be a path to weights on disk (a ``.safetensors`` file or a folder of shards,
    :mod:`tensorscope.sources`): each layer is then read, measured and dropped in turn.
    """
    source = None
    if isinstance(model, ON_DISK):
        if data is not None:
            raise PlanError("whitened spectra run data through the model: load it in memory for data= "
                            "(tensorscope.load_model), or leave data out for the spectra of the weights")
        source = open_source(model)
        model = source.skeleton()
    names = list(layers) if layers is not None else [l.name for l in inspect(model)]
    modules = {n: _layer(model, n) for n in names} if layers is not None else layer_modules(model)
    if source is not None:
        modules = source.loader()
    stats = None
    if data is not None:
        stats = collect_stats(model, data, names, progress=progress)
    out = {}
    with Progress(progress, total=len(names), desc="spectra") as bar:
        for n in names:
            bar.set_message(n)
            out[n] = layer_spectrum(modules[n], n, unfolding, stats[n] if stats else None)
            bar.update(1)
    return out


# ---- the convolution as an operator ------------------------------------------------------


def operator_spectrum(layer: nn.Conv2d, n: int = 32) -> np.ndarray:
    """All singular values of the conv as a linear map on n x n inputs, periodic boundary.

    Following Sedghi, Gupta and Long (2019): the 2-D DFT of the (dilated) kernel padded to
    n x n gives, at each of the n^2 frequencies, an out x in matrix; the operator's singular
    values are theirs. Stride is ignored (this is the stride-1 operator). Descending.
    """
    if not isinstance(layer, nn.Conv2d):
        raise PlanError(f"operator spectra are for Conv2d layers; got {type(layer).__name__}")
    check_finite(layer)
    w = linalg.grouped_weight(layer).to(torch.float64)  # (g, o, i, kh, kw)
    dh, dw = layer.dilation
    kh, kw = w.shape[-2:]
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if eh > n or ew > n:
        raise PlanError(f"input size n={n} is smaller than the (dilated) kernel {eh}x{ew}")
    dil = torch.zeros(*w.shape[:3], eh, ew, dtype=w.dtype)
    dil[..., ::dh, ::dw] = w
    key = (fingerprint(layer.weight), layer.groups, f"operator{n}-{dh}-{dw}")

    def compute():
        f = torch.fft.fft2(dil, s=(n, n))  # (g, o, i, n, n)
        mats = f.permute(0, 3, 4, 1, 2)  # (g, n, n, o, i)
        return torch.linalg.svdvals(mats).reshape(-1)

    vals = factor_cache.get(key, compute)
    return np.sort(vals.numpy())[::-1]


# ---- error against cost, over all ranks ---------------------------------------------------


def tradeoff(layer: nn.Module, method: str, name: str = "", geom: LayerGeometry | None = None,
             stats: Any = None) -> Tradeoff | None:
    """The error-versus-parameters curve of ``method`` on ``layer`` over all its ranks.

    A by-product of cached factors for methods with a cheap error curve (``svd``; ``tucker2``
    over all rank pairs); ``None`` for methods whose error needs a new factorization per rank.
    """
    geom = geom or LayerGeometry.of(layer)
    m = get_method(method)
    if m.unsupported_reason(geom):
        return None
    return m.tradeoff(layer, geom, stats, name)
