"""Rank selection: energy (minimal rank), EVBMF (hand-computed threshold, recovery of a
synthetic low-rank-plus-noise matrix, agreement with an independent transcription of the
published algorithm) and MUSCO's weakened ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

import tensorscope as ts
from tensorscope.ranks import evbmf
from tensorscope.spectra import Spectrum, layer_spectrum

import nets

_one_thread = pytest.fixture(scope="module", autouse=True)(nets.one_thread)


# ---- an independent EVBMF (Nakajima et al. 2013, as transcribed in Kim et al.'s VBMF.py) --

def _ref_tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _ref_objective(sigma2, L, M, s, xubar):
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _ref_tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return term1 + term2 + term3 + term4 + (L - H) * np.log(sigma2)


def reference_evbmf(Y: np.ndarray):
    """Rank and sigma2 of EVBMF for a fully observed L x M matrix (L <= M), H = L."""
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    alpha = L / M
    tauubar = 2.5129 * np.sqrt(alpha)
    s = np.linalg.svd(Y, compute_uv=False)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(np.min([np.ceil(L / (1 + alpha)) - 1, L])) - 1
    upper = np.sum(s**2) / (L * M)
    lower = np.max([s[eH_ub + 1] ** 2 / (M * xubar), np.mean(s[eH_ub + 1:] ** 2) / M])
    sigma2 = minimize_scalar(_ref_objective, args=(L, M, s, xubar), bounds=[lower, upper], method="bounded").x
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold)), float(sigma2)


def low_rank_plus_noise(L, M, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, M, generator=g, dtype=torch.float64)
    signal = a @ b / math.sqrt(rank)  # singular values ~ sqrt(L*M/rank)-ish, far above the noise edge
    return signal + noise * torch.randn(L, M, generator=g, dtype=torch.float64)


# ---- EVBMF --------------------------------------------------------------------------------

def test_evbmf_known_noise_hand_computed():
    """L=4, M=16, sigma2=1: alpha=1/4, tau=2.5129*sqrt(1/4)=1.25645,
    threshold = sqrt(16 * (1 + 1.25645) * (1 + 0.25 / 1.25645)) = sqrt(43.28677) = 6.57927."""
    values = np.array([10.0, 7.0, 6.5, 1.0])
    res = evbmf(values, (4, 16), sigma2=1.0)
    assert res.threshold == pytest.approx(6.57927, abs=1e-5)
    assert res.rank == 2  # 10 and 7 are above 6.579; 6.5 is below
    assert res.sigma2 == 1.0
    # the shape may be given either way round (L = min, M = max)
    assert evbmf(values, (16, 4), sigma2=1.0) == res
    # scale invariance: values * c with sigma2 * c^2 keep the same rank
    res_c = evbmf(values * 3.0, (4, 16), sigma2=9.0)
    assert res_c.rank == 2 and res_c.threshold == pytest.approx(3 * 6.57927, abs=1e-4)
    # unsorted values are sorted first
    assert evbmf(values[::-1].copy(), (4, 16), sigma2=1.0).rank == 2
    # a second hand case: L=M=9 (alpha=1), sigma2=0.25: tau=2.5129, (1+tau)(1+1/tau)=4.91085,
    # threshold = sqrt(9 * 0.25 * 4.91085) = 3.32406
    res9 = evbmf(np.array([5.0, 3.4, 3.3, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]), (9, 9), sigma2=0.25)
    assert res9.threshold == pytest.approx(3.32406, abs=1e-5)
    assert res9.rank == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evbmf_recovers_rank_and_noise_of_low_rank_plus_noise(seed):
    Y = low_rank_plus_noise(64, 576, 10, 0.1, seed)
    s = torch.linalg.svdvals(Y).numpy()
    res = evbmf(s, (64, 576))
    assert res.rank == 10
    assert res.sigma2 == pytest.approx(0.01, rel=0.2)
    assert res.threshold == pytest.approx(math.sqrt(576 * res.sigma2 * (1 + 0.83763) * (1 + (64 / 576) / 0.83763)),
                                          rel=1e-4)
    # through a layer: a Linear(576 -> 64) and a Conv2d(64 -> 64, 3x3) whose out unfolding is Y
    lin = nn.Linear(576, 64)
    conv = nn.Conv2d(64, 64, 3)
    with torch.no_grad():
        lin.weight.copy_(Y.float())
        conv.weight.copy_(Y.float().reshape(64, 64, 3, 3))
    for layer in (lin, conv):
        assert ts.vbmf_rank(layer_spectrum(layer, "x")) == 10


@pytest.mark.parametrize("shape,rank,noise,seed", [
    ((64, 576), 10, 0.1, 3), ((40, 40), 5, 0.3, 4), ((100, 30), 8, 0.05, 5), ((32, 288), 3, 1.0, 6),
])
def test_evbmf_agrees_with_an_independent_implementation(shape, rank, noise, seed):
    Y = low_rank_plus_noise(*shape, rank, noise, seed).numpy()
    want_rank, want_sigma2 = reference_evbmf(Y)
    got = evbmf(np.linalg.svd(Y, compute_uv=False), shape)
    assert got.rank == want_rank
    assert got.sigma2 == pytest.approx(want_sigma2, rel=1e-3)


def test_evbmf_on_pure_noise_and_zero():
    g = torch.Generator().manual_seed(7)
    Y = 0.1 * torch.randn(64, 576, generator=g, dtype=torch.float64)
    res = evbmf(torch.linalg.svdvals(Y).numpy(), (64, 576))
    assert res.rank == 0
    assert res.sigma2 == pytest.approx(0.01, rel=0.2)
    zero = evbmf(np.zeros(8), (8, 20))
    assert zero.rank == 0 and zero.sigma2 == 0.0
    s = Spectrum("z", "out", np.zeros((1, 8)), (8, 20))
    assert ts.vbmf_rank(s) == 1  # at least min_rank
    assert ts.vbmf_rank(s, min_rank=3) == 3


def test_vbmf_rank_of_grouped_layer_is_the_most_demanding_group():
    # two groups: one of rank 2, one of rank 5 (plus small noise); the layer needs rank 5
    g = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(32, 48, 3, groups=2)  # per group: 24 x 144
    blocks = []
    for r in (2, 5):
        a = torch.randn(24, r, generator=g, dtype=torch.float64)
        b = torch.randn(r, 144, generator=g, dtype=torch.float64)
        blocks.append(a @ b + 0.01 * torch.randn(24, 144, generator=g, dtype=torch.float64))
    with torch.no_grad():
        conv.weight.copy_(torch.cat(blocks).float().reshape(48, 16, 3, 3))
    s = layer_spectrum(conv, "conv")
    assert s.groups == 2
    assert [evbmf(row, s.shape).rank for row in s.grouped] == [2, 5]
    assert ts.vbmf_rank(s) == 5
    assert ts.vbmf_rank(s, min_rank=30) == s.max_rank  # capped at the maximal rank


# ---- energy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.3, 0.8, 0.95, 0.999])
def test_energy_rank_is_minimal_on_model_layers(keep):
    model = nets.residual_cnn()
    for name in ("block2.conv2", "grouped", "fc1"):
        s = ts.spectrum(model, name)
        r = ts.energy_rank(s, keep)
        sq = (s.grouped.astype(np.float64) ** 2).sum(axis=0)
        frac = np.cumsum(sq) / sq.sum()
        assert frac[r - 1] >= keep - 1e-12
        assert r == 1 or frac[r - 2] < keep
        # computed from scratch: the first rank whose kept fraction reaches keep
        assert r == int(np.argmax(frac >= keep - 1e-12)) + 1


def test_energy_rank_of_a_hand_spectrum():
    # squared values 16, 9, 4, 1 (total 30): cumulative 16/30=.533, 25/30=.833, 29/30=.967, 1
    s = Spectrum("h", "out", np.array([[4.0, 3.0, 2.0, 1.0]]), (4, 4))
    assert ts.energy_rank(s, 0.5) == 1
    assert ts.energy_rank(s, 16 / 30) == 1
    assert ts.energy_rank(s, 0.54) == 2
    assert ts.energy_rank(s, 25 / 30) == 2
    assert ts.energy_rank(s, 0.9) == 3
    assert ts.energy_rank(s, 0.97) == 4
    assert ts.energy_rank(s, 1.0) == 4


# ---- MUSCO's weakened rank ------------------------------------------------------------------

@pytest.mark.parametrize("full,vbmf,w,expected", [
    (256, 60, 0.8, 99),    # 256 - 0.8 * 196 = 99.2
    (256, 60, 0.0, 256),   # no compression
    (256, 60, 1.0, 60),    # pure VBMF
    (256, 60, 0.5, 158),   # 256 - 98
    (512, 100, 0.6, 265),  # 512 - 247.2 = 264.8
    (64, 10, 0.9, 15),     # 64 - 48.6 = 15.4
    (256, 3, 1.0, 8),      # below min_rank: 8
    (5, 2, 1.0, 5),        # full rank below min_rank: stays full, never above it
    (10, 20, 0.5, 10),     # a VBMF rank above full is capped at full
])
def test_weakened_rank_examples(full, vbmf, w, expected):
    got = ts.weakened_rank(full, vbmf, w)
    assert got == expected
    assert got <= full


def test_weakened_rank_min_rank_and_errors():
    assert ts.weakened_rank(256, 3, 1.0, min_rank=1) == 3
    assert ts.weakened_rank(256, 3, 1.0, min_rank=20) == 20
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            ts.weakened_rank(256, 60, bad)
    # repeated stages shrink gradually towards the VBMF rank
    r, ranks = 256, []
    for _ in range(5):
        r = ts.weakened_rank(r, 60, 0.5)
        ranks.append(r)
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] >= 60
