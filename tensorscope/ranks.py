"""Choosing a rank per layer: by retained energy, by VBMF, and MUSCO's weakened VBMF.

References
----------
Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 2013 (EVBMF). Kim et al., ICLR 2016 (VBMF
ranks for Tucker-2). Gusak et al., "Automated multi-stage compression of neural networks"
(MUSCO), ICCVW 2019 (weakened ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from .spectra import Spectrum


def energy_rank(spec: Spectrum, keep: float) -> int:
    """The smallest rank keeping at least ``keep`` of the squared singular values."""
    return spec.rank_for_energy(keep)


@dataclass
class VBMFResult:
    rank: int
    sigma2: float  # estimated noise variance
    threshold: float  # singular values above it are kept


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def evbmf(values: np.ndarray, shape: tuple[int, int], sigma2: float | None = None) -> VBMFResult:
    """Analytic empirical VBMF: the rank and noise variance of an L x M matrix from its singular values.

    ``values`` are all singular values (descending), ``shape`` the matrix shape. With
    ``sigma2`` given, only the threshold is applied (the VBMF with known noise).
    """
    L, M = sorted(int(x) for x in shape)
    s = np.sort(np.asarray(values, dtype=np.float64))[::-1][:L]
    if s.size < L:
        s = np.concatenate([s, np.zeros(L - s.size)])
    H = L
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    if not np.any(s > 0):
        return VBMFResult(0, 0.0, 0.0)
    if sigma2 is None:
        eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
        upper = float((s**2).sum()) / (L * M)
        lower = max(s[eH_ub + 1] ** 2 / (M * xubar), float(np.mean(s[eH_ub + 1:] ** 2)) / M) if eH_ub + 1 < L else 0.0
        lower = max(lower, upper * 1e-12)

        def objective(sig2: float) -> float:
            x = s**2 / (M * sig2)
            z1 = x[x > xubar]
            z2 = x[x <= xubar]
            tau_z1 = _tau(z1, alpha)
            with np.errstate(divide="ignore"):
                term1 = np.sum(z2 - np.log(np.where(z2 > 0, z2, 1e-300)))
            term2 = np.sum(z1 - tau_z1)
            term3 = np.sum(np.log((tau_z1 + 1) / z1))
            term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
            return float(term1 + term2 + term3 + term4 + (L - H) * np.log(sig2))

        if upper <= lower:
            sigma2 = upper
        else:
            sigma2 = float(minimize_scalar(objective, bounds=(lower, upper), method="bounded").x)
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return VBMFResult(int(np.sum(s > threshold)), float(sigma2), threshold)


def vbmf_rank(spec: Spectrum, min_rank: int = 1) -> int:
    """VBMF rank of a layer's unfolding (the most demanding group), at least ``min_rank``."""
    ranks = [evbmf(row, spec.shape).rank for row in spec.grouped]
    return int(min(max(max(ranks), min_rank), spec.max_rank))


def weakened_rank(full: int, vbmf: int, weakening: float = 0.8, min_rank: int = 8) -> int:
    """MUSCO's weakened rank: ``max(full - w * (full - vbmf), min_rank)``, never above ``full``.

    ``weakening=1`` is pure VBMF, ``0`` no compression; repeated stages shrink gradually.
    """
    if not 0.0 <= weakening <= 1.0:
        raise ValueError(f"weakening must be in [0, 1]; got {weakening!r}")
    r = int(round(full - weakening * (full - vbmf)))
    return int(min(full, max(r, min(min_rank, full))))
