"""Every method: exact at full rank, predicted cost equals the built module's, optimal svd error.

One test body, many cases (random shapes, strides, paddings, dilations, groups, biases), in
the style of torch's OpInfo tests.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import tensorscope as ts
from tensorscope.methods import LayerGeometry, get_method

# float64 layers: full-rank reconstructions agree to ~1e-12; float32 to ~1e-5
TOL64 = dict(rtol=1e-9, atol=1e-9)
TOL32 = dict(rtol=1e-4, atol=1e-4)
# every registered method (plugins included): a new method is tested here with no edit
METHODS = ts.available_methods()
settings.register_profile("ci", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@st.composite
def conv_layers(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 5))
    cout = groups * draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    use_same = draw(st.booleans()) and stride == (1, 1)
    padding = "same" if use_same else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    layer = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=bias, padding_mode=mode).double()
    h, w = draw(st.integers(7, 10)), draw(st.integers(7, 10))
    return layer, (h, w)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def _built_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fast_options(m) -> dict | None:
    """Fewer iterations for iterative methods (their costs do not depend on convergence)."""
    return {"iters": 5} if "iters" in m.option_specs else None


@pytest.mark.parametrize("method", METHODS)
@given(case=conv_layers())
def test_conv_full_rank_exact_and_costs(method, case):
    layer, (h, w) = case
    m = get_method(method)
    geom = LayerGeometry.of(layer, in_size=(h, w))
    if m.unsupported_reason(geom):
        # a method may refuse grouped convs, never a plain one
        assert layer.groups > 1, m.unsupported_reason(geom)
        return
    rank = m.max_rank(geom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = m.decompose(layer, rank)
    x = torch.randn(2, layer.in_channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        assert_close(built(x), layer(x), **TOL64)
    assert m.count_params(geom, rank) == _built_params(built)
    assert m.count_flops(geom, rank) == _flops(built, x[:1])
    assert isinstance(built, ts.FactorizedLayer) and built.method == method


@pytest.mark.parametrize("method", METHODS)
@given(case=conv_layers(), frac=st.floats(0.05, 0.95))
def test_conv_truncated_costs_match_built(method, case, frac):
    layer, (h, w) = case
    m = get_method(method)
    geom = LayerGeometry.of(layer, in_size=(h, w))
    if m.unsupported_reason(geom):
        return
    rank = m.resolve_rank(geom, frac)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = m.decompose(layer, rank, _fast_options(m))
    x = torch.randn(1, layer.in_channels, h, w, dtype=torch.float64)
    assert m.count_params(geom, rank) == _built_params(built)
    assert m.count_flops(geom, rank) == _flops(built, x)
    assert built(x).shape == layer(x).shape


@given(out_f=st.integers(1, 40), in_f=st.integers(1, 40), bias=st.booleans(), tokens=st.integers(1, 3),
       seed=st.integers(0, 1000))
@pytest.mark.parametrize("method", METHODS)
def test_linear_full_rank_exact_and_costs(method, out_f, in_f, bias, tokens, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias).double()
    m = get_method(method)
    geom = LayerGeometry.of(layer, tokens=tokens)
    if m.unsupported_reason(geom):  # a conv-only method
        return
    rank = m.max_rank(geom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = m.decompose(layer, rank)
    x = torch.randn(2, tokens, in_f, dtype=torch.float64)
    assert_close(built(x), layer(x), **TOL64)
    assert m.count_params(geom, rank) == _built_params(built)
    assert m.count_flops(geom, rank) == _flops(built, x[:1])


@given(out_f=st.integers(2, 30), in_f=st.integers(2, 30), seed=st.integers(0, 1000), data=st.data())
def test_svd_error_is_eckart_young_tail(out_f, in_f, seed, data):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f).double()
    r = data.draw(st.integers(1, min(in_f, out_f)))
    m = get_method("svd")
    f = m.factorize(layer, r)
    w_hat = m.reconstruct(layer, f)
    s = torch.linalg.svdvals(layer.weight.detach())
    tail = s[r:].pow(2).sum().sqrt()
    assert_close((layer.weight.detach() - w_hat).norm(), tail, rtol=1e-8, atol=1e-10)
    # and the spectrum object reports the same relative error
    rel = ts.spectra(nn.Sequential(layer))["0"].relative_error(r)
    assert rel == pytest.approx(float(tail / s.pow(2).sum().sqrt()), rel=1e-6, abs=1e-9)


def test_svd_conv_error_is_optimal_for_the_matricization():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3).double()
    m = get_method("svd")
    mat = layer.weight.detach().reshape(12, -1)
    s = torch.linalg.svdvals(mat)
    for r in (1, 4, 8):
        w_hat = m.reconstruct(layer, m.factorize(layer, r))
        assert_close((layer.weight.detach() - w_hat).norm(), s[r:].pow(2).sum().sqrt(), rtol=1e-8, atol=1e-10)


def test_tucker2_sweeps_improve_on_hosvd_and_stay_close_to_hooi():
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    torch.manual_seed(0)
    layer = nn.Conv2d(16, 24, 3, bias=False).double()
    m = get_method("tucker2")
    w = layer.weight.detach()
    rank = (6, 5)

    def err(refine):
        return float((w - m.reconstruct(layer, m.factorize(layer, rank, refine=refine))).norm() / w.norm())

    plain, swept = err(False), err(True)
    with tl.backend_context("pytorch", local_threadsafe=True):
        (core, factors), _ = partial_tucker(w, rank=list(rank), modes=[0, 1], n_iter_max=100, init="svd", tol=1e-12)
        hooi = float((w - torch.einsum("abkl,oa,ib->oikl", core, factors[0], factors[1])).norm() / w.norm())
    assert swept <= plain + 1e-12
    assert swept <= hooi * 1.01


def test_cp_balances_and_truncates():
    torch.manual_seed(0)
    # a kernel of exact CP rank 3: ALS must find it
    a, b, c, d = torch.randn(6, 3), torch.randn(5, 3), torch.randn(3, 3), torch.randn(3, 3)
    w = torch.einsum("or,ir,yr,xr->oiyx", a, b, c, d).double()
    layer = nn.Conv2d(5, 6, 3, bias=False).double()
    layer.weight.data = w
    m = get_method("cp")
    f = m.factorize(layer, 3, {"iters": 500})
    rel = float((w - m.reconstruct(layer, f)).norm() / w.norm())
    assert rel < 1e-4
    norms = torch.stack([f.tensors[k].norm(dim=1) for k in ("a_out", "a_in", "a_h", "a_w")])  # (4, g, R)
    assert float(norms.max() / norms.min()) < 1e3  # no factor carries the whole scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_is_kept(method, dtype):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    m = get_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = m.decompose(layer, m.max_rank(LayerGeometry.of(layer)))
    assert all(p.dtype == dtype for p in built.parameters())
    if dtype == torch.float32:
        x = torch.randn(2, 4, 8, 8)
        assert_close(built(x), layer(x), **TOL32)


BAD_RANKS = [
    ("svd", 0), ("svd", -1), ("svd", 10_000), ("svd", 1.5), ("svd", float("nan")), ("svd", "8"), ("svd", True),
    ("tucker2", [0, 2]), ("tucker2", [2, 99]), ("tucker2", [1, 2, 3]), ("cp", 0), ("cp", 10**9),
    ("tt", [2, 2, 2]), ("tt", [1, 0, 1]), ("tr", [2, 3, 3, 1]), ("tr", [1, 0, 1]), ("tr", 10**6),
    ("rcp", 0), ("rcp", 10**9), ("rtucker", [1, 1, 1]), ("rtucker", [9, 1, 1, 1]), ("rtucker", 0),
]
# ranks no method takes: wrong types, non-finite, below one
BAD_ANY = [-1, 1.5, float("nan"), "8", True, None, {"rank": 2}]


@pytest.mark.parametrize("method,bad", BAD_RANKS)
def test_bad_ranks_raise_rank_error_naming_the_range(method, bad):
    layer = nn.Conv2d(4, 6, 3)
    m = get_method(method)
    with pytest.raises(ts.PlanError) as e:
        m.resolve_rank(LayerGeometry.of(layer), bad)
    assert method in str(e.value)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", BAD_ANY, ids=repr)
def test_every_method_refuses_malformed_ranks(method, bad):
    m = get_method(method)
    with pytest.raises(ts.PlanError) as e:
        m.resolve_rank(LayerGeometry.of(nn.Conv2d(4, 6, 3)), bad)
    assert method in str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_refuses_axis_values_out_of_range(method):
    """Each rank axis one past its bounds, the others at their defaults: a PlanError."""
    m = get_method(method)
    geom = LayerGeometry.of(nn.Conv2d(4, 6, 3))
    axes = m.rank_axes(geom)
    for i, axis in enumerate(axes):
        for v in (axis.low - 1, axis.high + 1):
            values = [a.default for a in axes]
            values[i] = v
            with pytest.raises(ts.PlanError):
                m.resolve_rank(geom, m.rank_from_axes(geom, values))


def test_every_builtin_method_has_bad_rank_cases():
    """A new built-in method gets its own malformed ranks above (plugins are tested generically)."""
    builtin = {n for n in METHODS if get_method(n).__module__.startswith("tensorscope.")}
    assert builtin <= {m for m, _ in BAD_RANKS}


def test_fraction_one_is_exact_rank():
    layer = nn.Conv2d(4, 6, 3)
    geom = LayerGeometry.of(layer)
    for name in METHODS:
        m = get_method(name)
        assert m.resolve_rank(geom, 1.0) == m.max_rank(geom)


def test_break_even_warns():
    layer = nn.Linear(10, 10)
    with pytest.warns(ts.BreakEvenWarning, match="compression ratio"):
        get_method("svd").decompose(layer, 10)


def test_nan_weights_refused_before_factorizing():
    layer = nn.Conv2d(3, 4, 3)
    layer.weight.data[0, 0, 0, 0] = float("nan")
    for name in METHODS:
        with pytest.raises(ts.NonFiniteWeightError, match="NaN/Inf"):
            get_method(name).decompose(layer, 2)


def test_cp_all_zero_kernel_is_handled():
    layer = nn.Conv2d(3, 4, 3)
    layer.weight.data.zero_()
    built = get_method("cp").decompose(layer, 2)
    x = torch.randn(1, 3, 6, 6)
    assert_close(built(x), layer(x))


def test_registry_lists_methods():
    assert set(ts.available_methods()) >= {"svd", "tucker2", "cp", "tt", "tr", "rcp", "rtucker"}
    with pytest.raises(ts.PlanError, match="available methods"):
        get_method("nope")


# ---- reshaped methods (Su et al.): rcp, rtucker ------------------------------------------


@pytest.mark.parametrize("method", ["rcp", "rtucker"])
@pytest.mark.parametrize("opts", [{"in_shape": [2, 2, 2], "out_shape": [3, 2, 2]}, {"in_shape": [8], "out_shape": [12]},
                                  {"in_shape": [4, 2]}, {"out_shape": [2, 6]}])
def test_reshaped_sub_modes_exact_and_costs(method, opts):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 12, 3, stride=(2, 1), padding=1).double()
    m = get_method(method)
    geom = LayerGeometry.of(layer, in_size=(9, 8))
    rank = m.max_rank(geom, opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        built = m.decompose(layer, rank, opts)
    x = torch.randn(3, 8, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(built(x), layer(x), **TOL64)
    assert m.count_params(geom, rank, opts) == _built_params(built)
    assert m.count_flops(geom, rank, opts) == _flops(built, x[:1])
    assert_close(m.reconstruct(layer, m.factorize(layer, rank, opts)), layer.weight.detach(), **TOL64)
    assert len(built.options["in_shape"]) == len(built.options["out_shape"])


def test_reshaped_defaults_are_two_balanced_factors_and_rtucker_one_mode_is_tucker2():
    layer = nn.Conv2d(6, 16, 5)
    geom = LayerGeometry.of(layer)
    assert get_method("rtucker").max_rank(geom) == (4, 4, 3, 2)  # out_shape [4, 4], in_shape [3, 2]
    assert get_method("rcp").max_rank(geom) == 12 * 8  # modes 12, 8, 25: all but the largest
    one = {"in_shape": [6], "out_shape": [16]}
    rt, t2 = get_method("rtucker"), get_method("tucker2")
    assert rt.count_params(geom, (8, 4), one) == t2.count_params(geom, (8, 4))
    torch.manual_seed(0)
    layer = layer.double()
    w = layer.weight.detach()
    a = rt.reconstruct(layer, rt.factorize(layer, (8, 4), one))
    b = t2.reconstruct(layer, t2.factorize(layer, (8, 4)))
    assert float((w - a).norm()) == pytest.approx(float((w - b).norm()), rel=1e-6)


@pytest.mark.parametrize("method", ["rcp", "rtucker"])
@pytest.mark.parametrize("bad", [{"in_shape": [3, 3], "out_shape": [4, 4]}, {"out_shape": [5, 3]},
                                 {"in_shape": [2, 3], "out_shape": [16]}])
def test_reshaped_bad_sub_modes_name_layer_value_and_fix(method, bad):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 16, 5))
    with pytest.raises(ts.PlanError) as e:
        ts.compress(model, {"2": {"method": method, "rank": 2, **bad}})
    msg = str(e.value)
    assert "layer '2'" in msg and method in msg
    assert str(list(bad.get("in_shape", bad.get("out_shape")))) in msg  # the value
    assert "products are 6 and 16" in msg  # the fix


def test_rcp_recovers_a_kernel_of_low_reshaped_cp_rank():
    torch.manual_seed(0)
    r, (o1, o2), (i1, i2) = 3, (2, 3), (2, 2)
    a1, a2, s = torch.randn(r, o1, i1), torch.randn(r, o2, i2), torch.randn(r, 3, 3)
    w = torch.einsum("rab,rcd,ryx->acbdyx", a1, a2, s).reshape(6, 4, 3, 3).double()
    layer = nn.Conv2d(4, 6, 3, bias=False).double()
    layer.weight.data = w
    m = get_method("rcp")
    opts = {"in_shape": [2, 2], "out_shape": [2, 3], "iters": 500}
    rel = float((w - m.reconstruct(layer, m.factorize(layer, 3, opts))).norm() / w.norm())
    assert rel < 1e-4


@pytest.mark.parametrize("method", ["rcp", "rtucker"])
def test_reshaped_layers_train_from_random_init(method):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    net = ts.tensorize(model, {"0": {"method": method, "rank": 2}}, init="random")
    x = torch.randn(2, 4, 6, 6)
    y = net(x)
    assert y.shape == (2, 8, 6, 6) and 0 < float(y.detach().std()) < 10
    y.pow(2).mean().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_rtucker_reconstruct_with_unit_ranks_float32():
    """Factors with a column of one (strides torch.kron rejects) reconstruct like the built layer."""
    torch.manual_seed(0)
    layer = nn.Conv2d(20, 50, 5)
    m = get_method("rtucker")
    f = m.factorize(layer, (5, 1, 1, 4))
    built = m.build(layer, f)
    from tensorscope.densify import probe_dense
    assert_close(m.reconstruct(layer, f), probe_dense(built, layer)[0].to(torch.float32), **TOL32)
