"""Spectra: values against direct float64 computations, metrics, the operator spectrum,
the factor cache (counted calls, never timing), NaN/Inf refusal, and error-vs-cost curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tensorscope as ts
from tensorscope import linalg
from tensorscope._cache import factor_cache
from tensorscope.errors import NonFiniteWeightError, PlanError
from tensorscope.methods import get_method
from tensorscope.preview import preview_weights
from tensorscope.methods.tucker2 import tucker2_retained
from tensorscope.spectra import Spectrum, layer_spectrum, tradeoff

import nets


_one_thread = pytest.fixture(scope="module", autouse=True)(nets.one_thread)


@pytest.fixture(scope="module")
def model():
    return nets.residual_cnn()


def grouped64(layer: nn.Module) -> torch.Tensor:
    """(g, O/g, I/g*kh*kw) in float64, computed here without the library."""
    w = layer.weight.detach().to(torch.float64)
    if w.dim() == 2:
        w = w[:, :, None, None]
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    return w.reshape(g, w.shape[0] // g, -1)


def grouped_in64(layer: nn.Module) -> torch.Tensor:
    """The mode-1 (input channel) unfolding per group: (g, I/g, O/g*kh*kw), float64."""
    w = layer.weight.detach().to(torch.float64)
    if w.dim() == 2:
        w = w[:, :, None, None]
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    w = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # (g, o, i, kh, kw)
    return w.transpose(1, 2).reshape(g, w.shape[2], -1)


class CallCounter:
    """Wraps every dense factorization entry point torch offers, counting calls."""

    NAMES = ("svd", "svdvals", "eigh", "eigvalsh", "eig", "eigvals")

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {n: 0 for n in self.NAMES}
        self.nonfinite = 0  # calls whose input held NaN/Inf
        for n in self.NAMES:
            orig = getattr(torch.linalg, n)

            def wrapper(*a, __orig=orig, __n=n, **k):
                self.calls[__n] += 1
                if a and isinstance(a[0], torch.Tensor) and not bool(torch.isfinite(a[0]).all()):
                    self.nonfinite += 1
                return __orig(*a, **k)

            monkeypatch.setattr(torch.linalg, n, wrapper)
        orig_svd = torch.svd

        def old_svd(*a, **k):
            self.calls["svd"] += 1
            return orig_svd(*a, **k)

        monkeypatch.setattr(torch, "svd", old_svd)
        orig_np = np.linalg.svd

        def np_svd(*a, **k):
            self.calls["svd"] += 1
            return orig_np(*a, **k)

        monkeypatch.setattr(np.linalg, "svd", np_svd)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        for n in self.calls:
            self.calls[n] = 0
        self.nonfinite = 0


@pytest.fixture
def counter(monkeypatch):
    return CallCounter(monkeypatch)


# ---- the "out" spectrum and its metrics ---------------------------------------------------

LAYERS = ["stem", "block1.conv1", "block1.shortcut.0", "grouped", "depthwise", "dilated", "fc1", "head"]


@pytest.mark.parametrize("name", LAYERS)
def test_values_are_svdvals_of_the_matricized_weight(model, name):
    layer = model.get_submodule(name)
    s = ts.spectrum(model, name)
    direct = torch.linalg.svdvals(grouped64(layer)).numpy()  # (g, k), descending per group
    assert s.grouped.shape == direct.shape
    assert s.shape == tuple(grouped64(layer).shape[1:])
    np.testing.assert_allclose(s.grouped, direct, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(s.values) <= 0), "values must be descending"
    np.testing.assert_allclose(s.values, np.sort(direct.reshape(-1))[::-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LAYERS)
def test_relative_error_is_the_direct_truncation_error(model, name):
    """||W - W_r||_F / ||W||_F with W_r the per-group rank-r truncation, in float64."""
    layer = model.get_submodule(name)
    s = ts.spectrum(model, name)
    m = grouped64(layer)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    k = sv.shape[1]
    for r in sorted({0, 1, k // 2, max(k - 1, 0), k}):
        w_r = (u[:, :, :r] * sv[:, None, :r]) @ vh[:, :r, :]
        direct = float(torch.linalg.norm(m - w_r) / torch.linalg.norm(m))
        assert s.relative_error(r) == pytest.approx(direct, rel=1e-4, abs=2e-6), (name, r)
        assert s.retained_energy(r) == pytest.approx(1 - direct**2, abs=1e-6)
    assert s.relative_error(0) == pytest.approx(1.0)
    assert s.relative_error(k) == 0.0
    for bad in (-1, k + 1, 1.5, True, "2"):
        with pytest.raises(PlanError):
            s.relative_error(bad)


@pytest.mark.parametrize("name", LAYERS)
def test_energy_curve_is_monotone_and_ends_at_one(model, name):
    s = ts.spectrum(model, name)
    e = s.energy
    assert e.shape == (s.max_rank,)
    assert np.all(np.diff(e) >= -1e-15)
    assert e[-1] == pytest.approx(1.0, abs=1e-12)
    for r in range(1, s.max_rank + 1):
        assert e[r - 1] == pytest.approx(s.retained_energy(r), abs=1e-9)


def _check_minimal(s: Spectrum, keep: float) -> None:
    r = s.rank_for_energy(keep)
    e = s.energy
    assert 1 <= r <= s.max_rank
    assert e[r - 1] >= keep - 1e-12, f"rank {r} keeps {e[r - 1]!r} < {keep!r}"
    if r > 1:
        assert e[r - 2] < keep, f"rank {r - 1} already keeps {e[r - 2]!r} >= {keep!r}: not minimal"
    assert ts.energy_rank(s, keep) == r


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("keep", [1e-9, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0])
def test_rank_for_energy_is_minimal(model, name, keep):
    _check_minimal(ts.spectrum(model, name), keep)


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=1, max_size=40),
    groups=st.integers(1, 3),
    keep=st.floats(1e-6, 1.0),
)
def test_rank_for_energy_is_minimal_property(vals, groups, keep):
    row = np.sort(np.array(vals))[::-1]
    grouped = np.stack([row * (1 + 0.1 * g) for g in range(groups)])
    s = Spectrum("x", "out", grouped, (len(vals), len(vals)))
    _check_minimal(s, keep)
    # the energy at a rank is the direct fraction of squared values kept (all groups)
    r = s.rank_for_energy(keep)
    direct = (grouped[:, :r] ** 2).sum() / (grouped**2).sum()
    assert s.retained_energy(r) == pytest.approx(direct, abs=1e-12)


def test_rank_for_energy_rejects_bad_fractions(model):
    s = ts.spectrum(model, "fc1")
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError):
            s.rank_for_energy(bad)


@pytest.mark.parametrize("name", LAYERS)
def test_metrics_match_direct_formulas(model, name):
    layer = model.get_submodule(name)
    s = ts.spectrum(model, name)
    m = grouped64(layer)
    sv = torch.linalg.svdvals(m).reshape(-1).numpy()
    spectral = max(float(torch.linalg.matrix_norm(m[g], ord=2)) for g in range(m.shape[0]))
    fro2 = float((m**2).sum())
    p = sv[sv > 0] / sv.sum()
    assert s.spectral_norm == pytest.approx(spectral, rel=1e-5)
    assert s.stable_rank == pytest.approx(fro2 / spectral**2, rel=1e-4)
    assert s.total_energy == pytest.approx(fro2, rel=1e-5)
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    assert 1.0 <= s.stable_rank <= s.groups * s.max_rank + 1e-9
    assert 1.0 <= s.effective_rank <= s.groups * s.max_rank + 1e-9
    metrics = s.metrics()
    assert set(metrics) >= {"spectral_norm", "stable_rank", "effective_rank", "alpha", "max_rank"}


def test_effective_and_stable_rank_of_known_spectra():
    flat = Spectrum("x", "out", np.ones((1, 8)), (8, 8))
    assert flat.effective_rank == pytest.approx(8.0)
    assert flat.stable_rank == pytest.approx(8.0)
    one = Spectrum("x", "out", np.array([[3.0, 0, 0, 0]]), (4, 4))
    assert one.effective_rank == pytest.approx(1.0)
    assert one.stable_rank == pytest.approx(1.0)
    assert one.spectral_norm == 3.0
    zero = Spectrum("x", "out", np.zeros((1, 4)), (4, 4))
    assert zero.relative_error(0) == 0.0 and zero.stable_rank == 0.0 and zero.effective_rank == 0.0


def test_alpha_is_finite_for_a_big_random_matrix():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256)
    s = layer_spectrum(lin, "lin")
    assert math.isfinite(s.alpha) and s.alpha > 1.0


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_alpha_recovers_a_synthetic_power_law(alpha):
    """Eigenvalues of W^T W drawn from a Pareto density ~ x^-alpha: the fit finds alpha (loosely)."""
    rng = np.random.default_rng(int(alpha * 10))
    eigs = (1.0 - rng.random(3000)) ** (-1.0 / (alpha - 1.0))  # x_min = 1
    sv = np.sort(np.sqrt(eigs))[::-1]
    s = Spectrum("synthetic", "out", sv[None, :], (3000, 3000))
    assert s.alpha == pytest.approx(alpha, abs=0.3)


def test_alpha_is_nan_with_too_few_values():
    s = Spectrum("x", "out", np.arange(10, 0, -1, dtype=float)[None, :], (10, 10))
    assert math.isnan(s.alpha)


# ---- the "in" (mode-1) unfolding ----------------------------------------------------------

@pytest.mark.parametrize("name", ["stem", "block1.conv1", "block1.shortcut.0", "grouped", "depthwise", "dilated"])
def test_in_unfolding_equals_svdvals_of_permuted_matrix(model, name):
    layer = model.get_submodule(name)
    s = ts.spectrum(model, name, unfolding="in")
    m = grouped_in64(layer)
    direct = torch.linalg.svdvals(m).numpy()
    assert s.unfolding == "in"
    assert s.shape == tuple(m.shape[1:])
    k = direct.shape[1]
    np.testing.assert_allclose(s.grouped[:, :k], direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fc1", "head", "block1.shortcut.0"])
def test_in_unfolding_has_exactly_the_singular_values_of_the_matrix(model, name):
    """A tall unfolding (rows > cols) has min(rows, cols) singular values, not rows of them.

    For a Linear layer the "in" unfolding is W^T: same singular values, same metrics as "out".
    """
    layer = model.get_submodule(name)
    s_in = ts.spectrum(model, name, unfolding="in")
    m = grouped_in64(layer)
    k = min(m.shape[1:])
    assert s_in.max_rank == k, f"{name}: {s_in.max_rank} values for a {tuple(m.shape[1:])} matrix"
    np.testing.assert_allclose(s_in.grouped, torch.linalg.svdvals(m).numpy(), rtol=1e-5, atol=1e-6)
    if isinstance(layer, nn.Linear):
        s_out = ts.spectrum(model, name)
        np.testing.assert_allclose(s_in.values, s_out.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_equal(np.isnan(s_in.alpha), np.isnan(s_out.alpha))
        if not math.isnan(s_out.alpha):
            assert s_in.alpha == pytest.approx(s_out.alpha, rel=1e-3)


def test_unknown_unfolding_and_layer_are_refused(model):
    with pytest.raises(ValueError):
        ts.spectrum(model, "fc1", unfolding="sideways")
    with pytest.raises(PlanError, match="fc1"):
        ts.spectrum(model, "fc_1")
    with pytest.raises(PlanError):
        ts.spectrum(model, "bn0")


# ---- grouped convolutions -----------------------------------------------------------------

def test_grouped_conv_spectra_are_per_group(model):
    layer = model.get_submodule("grouped")  # 32 -> 32, groups=4: four 8 x 72 matrices
    s = ts.spectrum(model, "grouped")
    assert s.groups == 4 and s.max_rank == 8 and s.shape == (8, 72)
    w = layer.weight.detach().double()
    for g in range(4):
        block = w[8 * g: 8 * (g + 1)].reshape(8, -1)
        np.testing.assert_allclose(s.grouped[g], torch.linalg.svdvals(block).numpy(), rtol=1e-5, atol=1e-6)
    # a rank means that rank in every group
    m = grouped64(layer)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    w3 = (u[:, :, :3] * sv[:, None, :3]) @ vh[:, :3, :]
    assert s.relative_error(3) == pytest.approx(float(torch.linalg.norm(m - w3) / torch.linalg.norm(m)), rel=1e-4)
    d = ts.spectrum(model, "depthwise")
    assert d.groups == 32 and d.max_rank == 1
    assert d.relative_error(1) == 0.0


def test_spectra_lists_every_decomposable_layer(model):
    sp = ts.spectra(model)
    assert list(sp) == [l.name for l in ts.inspect(model)]
    for name, s in sp.items():
        np.testing.assert_array_equal(s.grouped, ts.spectrum(model, name).grouped)
    sub = ts.spectra(model, layers=["fc1", "grouped"], unfolding="in")
    assert list(sub) == ["fc1", "grouped"] and all(s.unfolding == "in" for s in sub.values())


# ---- the convolution as an operator -------------------------------------------------------

def dense_operator_svdvals(conv: nn.Conv2d, n: int) -> np.ndarray:
    """Singular values of the stride-1 conv on n x n periodic inputs, by building its matrix."""
    w = conv.weight.detach().double()
    kh, kw = w.shape[-2:]
    dh, dw = conv.dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    N = conv.in_channels * n * n
    basis = torch.eye(N, dtype=torch.float64).reshape(N, conv.in_channels, n, n)
    x = F.pad(basis, (0, ew - 1, 0, eh - 1), mode="circular")
    y = F.conv2d(x, w, None, stride=1, dilation=conv.dilation, groups=conv.groups)
    assert y.shape[-2:] == (n, n)
    A = y.reshape(N, -1).T  # (out*n*n, in*n*n): column j is the image of basis vector j
    return np.sort(torch.linalg.svdvals(A).numpy())[::-1]


OPERATOR_CASES = [
    (dict(in_channels=3, out_channels=4, kernel_size=3), 5),
    (dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2), 6),
    (dict(in_channels=4, out_channels=4, kernel_size=3, groups=2), 5),
    (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), dilation=(1, 2)), 6),
    (dict(in_channels=3, out_channels=5, kernel_size=1), 4),
    (dict(in_channels=5, out_channels=2, kernel_size=3, padding=1, bias=False), 3),  # kernel = input
]


@pytest.mark.parametrize("kwargs,n", OPERATOR_CASES)
def test_operator_spectrum_matches_dense_matrix(kwargs, n):
    torch.manual_seed(sum(map(hash, map(str, kwargs.values()))) % 1000)
    conv = nn.Conv2d(**kwargs)
    got = ts.operator_spectrum(conv, n)
    want = dense_operator_svdvals(conv, n)
    assert got.shape == want.shape
    assert np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def test_operator_spectrum_of_model_layers(model):
    for name, n in [("dilated", 6), ("grouped", 4), ("block1.shortcut.0", 3)]:
        conv = model.get_submodule(name)
        got = ts.operator_spectrum(conv, n)
        np.testing.assert_allclose(got, dense_operator_svdvals(conv, n), rtol=1e-6, atol=1e-9)


def test_operator_spectrum_refuses_bad_input(model):
    with pytest.raises(PlanError):
        ts.operator_spectrum(model.get_submodule("fc1"), 8)
    with pytest.raises(PlanError):  # dilated kernel spans 5 > n = 4
        ts.operator_spectrum(model.get_submodule("dilated"), 4)


# ---- cache: counted calls, never timing ---------------------------------------------------

def test_second_spectra_call_does_no_factorization(model, counter):
    factor_cache.clear()
    first = ts.spectra(model)
    assert counter.total > 0, "the counter must see the first computation"
    misses = factor_cache.misses
    counter.reset()
    second = ts.spectra(model)
    assert counter.total == 0, f"second call factorized again: {counter.calls}"
    assert factor_cache.misses == misses
    assert factor_cache.hits >= len(second)
    for n in first:
        np.testing.assert_array_equal(first[n].grouped, second[n].grouped)
    # same for the input unfolding, and for single-layer queries
    ts.spectra(model, unfolding="in")
    counter.reset()
    ts.spectra(model, unfolding="in")
    ts.spectrum(model, "dilated")
    ts.spectrum(model, "dilated", unfolding="in")
    assert counter.total == 0, counter.calls


def test_same_weights_in_another_model_hit_the_cache(model, counter):
    import copy

    ts.spectra(model)
    twin = copy.deepcopy(model)
    counter.reset()
    ts.spectra(twin)
    assert counter.total == 0
    # an edited weight is a different weight: recomputed, not served stale
    with torch.no_grad():
        twin.fc1.weight.mul_(2.0)
    s = ts.spectrum(twin, "fc1")
    assert counter.total >= 1  # (spectra need values only: svdvals)
    np.testing.assert_allclose(s.values, 2 * ts.spectrum(model, "fc1").values, rtol=1e-5)


def test_rank_changes_never_recompute(model, counter):
    factor_cache.clear()
    ts.spectra(model)
    for name in ("block1.conv2", "grouped", "dilated", "block2.shortcut.0"):
        tradeoff(model.get_submodule(name), "tucker2", name)
    # spectra keep singular values only (memory); the first factorization computes the vectors
    for name in ("block1.conv2", "grouped", "fc1", "dilated"):
        preview_weights(model, ts.Plan({name: {"method": "svd", "rank": 1}}))
    counter.reset()
    for name in ("block1.conv2", "grouped", "fc1", "dilated"):
        layer = model.get_submodule(name)
        t = tradeoff(layer, "svd", name)
        s = ts.spectrum(model, name)
        for r in range(1, s.max_rank + 1, max(1, s.max_rank // 4)):
            s.relative_error(r)
            preview_weights(model, ts.Plan({name: {"method": "svd", "rank": r}}))
        assert t is not None
    for name, ranks in [("block1.conv2", [(4, 4), (8, 16), (32, 3)]), ("grouped", [(2, 2), (8, 5)]),
                        ("block2.shortcut.0", [(10, 10), (48, 1)])]:
        tradeoff(model.get_submodule(name), "tucker2", name)
        for rk in ranks:
            preview_weights(model, ts.Plan({name: {"method": "tucker2", "rank": list(rk)}}))
    assert counter.total == 0, f"a rank change recomputed a factorization: {counter.calls}"


def test_operator_spectrum_is_cached(model, counter):
    conv = model.get_submodule("block1.conv1")
    a = ts.operator_spectrum(conv, 8)
    counter.reset()
    b = ts.operator_spectrum(conv, 8)
    assert counter.total == 0
    np.testing.assert_array_equal(a, b)


# ---- NaN / Inf ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["block1.conv1", "fc1"])
def test_non_finite_weights_are_refused_before_any_factorization(bad, name, counter):
    m = nets.residual_cnn(seed=3)
    with torch.no_grad():
        m.get_submodule(name).weight.view(-1)[5] = bad
    layer = m.get_submodule(name)
    counter.reset()
    calls = [lambda: ts.spectrum(m, name), lambda: ts.spectrum(m, name, unfolding="in"), lambda: ts.spectra(m),
             lambda: tradeoff(layer, "svd", name), lambda: layer_spectrum(layer, name)]
    if name == "block1.conv1":
        calls += [lambda: ts.operator_spectrum(layer, 8), lambda: tradeoff(layer, "tucker2", name),
                  lambda: tucker2_retained(layer), lambda: linalg.mode_eig(layer, 1)]
    for call in calls:
        with pytest.raises(NonFiniteWeightError):
            call()
    with pytest.raises(NonFiniteWeightError, match=name):
        ts.spectrum(m, name)
    assert counter.nonfinite == 0, f"a factorization received the non-finite weight ({counter.calls})"


# ---- error against cost over all ranks ----------------------------------------------------

@pytest.mark.parametrize("name", ["block1.conv1", "grouped", "dilated", "fc1", "head"])
def test_svd_tradeoff_equals_spectrum_errors(model, name):
    layer = model.get_submodule(name)
    t = tradeoff(layer, "svd", name)
    s = ts.spectrum(model, name)
    m = get_method("svd")
    geom = ts.LayerGeometry.of(layer)
    assert t.ranks == list(range(1, s.max_rank + 1))
    np.testing.assert_allclose(t.errors, [s.relative_error(r) for r in t.ranks], rtol=1e-9, atol=1e-12)
    assert list(t.params) == [m.count_params(geom, r) for r in t.ranks]
    assert t.dense_params == geom.dense_params
    assert t.errors[-1] == pytest.approx(0.0, abs=1e-12)


def _hosvd_error(layer: nn.Module, rank) -> float:
    m = get_method("tucker2")
    f = m.factorize(layer, tuple(rank), refine=False)
    w_hat = m.reconstruct(layer, f).double()
    w = layer.weight.detach().double()
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w))


@pytest.mark.parametrize("name", ["block1.conv1", "grouped", "dilated", "block2.shortcut.0", "stem"])
def test_tucker2_tradeoff_equals_direct_hosvd_error(model, name):
    layer = model.get_submodule(name)
    t = tradeoff(layer, "tucker2", name)
    geom = ts.LayerGeometry.of(layer)
    m = get_method("tucker2")
    idx = np.unique(np.linspace(0, len(t.ranks) - 1, 12).astype(int))
    for i in idx:
        rank = t.ranks[i]
        assert t.params[i] == m.count_params(geom, tuple(rank))
        direct = _hosvd_error(layer, rank)
        assert t.errors[i] == pytest.approx(direct, abs=1e-4), (name, rank)
    # every rank pair, not only the Pareto ones: the retained-energy table
    e = tucker2_retained(layer)
    total = float((layer.weight.detach().double() ** 2).sum())
    mo, mi = m.max_rank(geom)
    assert e.shape == (mo, mi)
    for a, b in [(1, 1), (mo, 1), (1, mi), (max(1, mo // 2), max(1, mi // 3)), (mo, mi)]:
        err = math.sqrt(max(0.0, 1 - e[a - 1, b - 1] / total))
        assert err == pytest.approx(_hosvd_error(layer, (a, b)), abs=1e-4), (name, a, b)


@pytest.mark.parametrize("name", ["block1.conv1", "grouped", "dilated", "block2.shortcut.0", "stem"])
def test_tucker2_tradeoff_is_pareto(model, name):
    t = tradeoff(model.get_submodule(name), "tucker2", name)
    assert len(t.ranks) >= 2
    assert np.all(np.diff(t.params) > 0), "params must increase"
    assert np.all(np.diff(t.errors) < 0), "errors must decrease"
    assert t.errors[-1] == pytest.approx(0.0, abs=1e-3)
    assert t.flops is None  # no input size known without an example input


def test_tradeoff_flops_follow_the_method_counts(model):
    x = nets.residual_input(1)
    infos = ts.inspect(model, x).by_name()
    for name in ("block1.conv1", "grouped"):
        geom = infos[name].geometry
        for method in ("svd", "tucker2"):
            t = tradeoff(model.get_submodule(name), method, name, geom)
            m = get_method(method)
            assert list(t.flops) == [m.count_flops(geom, r if isinstance(r, int) else tuple(r)) for r in t.ranks]


def test_tradeoff_is_none_where_each_rank_needs_its_own_factorization(model):
    assert tradeoff(model.get_submodule("block1.conv1"), "cp", "block1.conv1") is None
    assert tradeoff(model.get_submodule("fc1"), "tucker2", "fc1") is None  # not for Linear


def test_concurrent_requests_compute_each_factorization_once(monkeypatch):
    """Two threads asking for the same spectrum (the explorer's view and the planner, say)
    must share one SVD, not both compute it: "one SVD per layer per unfolding"."""
    import threading

    layer = nn.Linear(24, 16)
    factor_cache.clear()
    entered = threading.Event()
    calls = []
    orig = torch.linalg.svdvals  # a spectrum needs the values only

    def slow_svd(*a, **k):
        calls.append(1)
        entered.set()
        threading.Event().wait(0.3)  # the first computation is still running when the second asks
        return orig(*a, **k)

    monkeypatch.setattr(torch.linalg, "svdvals", slow_svd)
    results = []
    first = threading.Thread(target=lambda: results.append(layer_spectrum(layer, "a")))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=lambda: results.append(layer_spectrum(layer, "a")))
    second.start()
    first.join(10)
    second.join(10)
    assert len(results) == 2
    np.testing.assert_array_equal(results[0].grouped, results[1].grouped)
    assert len(calls) == 1, f"the same SVD was computed {len(calls)} times concurrently"


def test_caches_tell_kernels_with_the_same_bytes_apart():
    """Two kernels holding the same numbers in different shapes (a 2-in 1x1 and a 1-in 2x1
    conv) must not share memoised factors or spectra (found by hypothesis: a cached Tucker-2
    of the one was built into the other)."""
    a = nn.Conv2d(2, 5, (1, 1), bias=False).double()
    b = nn.Conv2d(1, 5, (2, 1), bias=False).double()
    b.weight.data.copy_(a.weight.data.reshape(b.weight.shape))
    m = get_method("tucker2")
    for layer in (a, b, a):
        rank = m.max_rank(ts.LayerGeometry.of(layer))
        built = m.decompose(layer, rank)
        x = torch.randn(2, layer.in_channels, 6, 6, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(built(x), layer(x), rtol=1e-9, atol=1e-9)
    assert tucker2_retained(a).shape != tucker2_retained(b).shape
