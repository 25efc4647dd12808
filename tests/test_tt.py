"""Tensor-Train method (TT-matrix for Linear, TT-conv for Conv2d) and its modules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tensorscope.errors import DecompositionError, NonFiniteWeightError, PlanError, RankError
from tensorscope.layers import FactorizedLayer
from tensorscope.methods import LayerGeometry, get_method
from tensorscope.methods.tt import TT, default_tt_order, tt_shapes, tt_svd
from tensorscope.tt_layers import TTConv2d, TTLinear, tt_sweep_flops

TT_METHOD = TT()

# full-rank TT of a small layer is larger than the layer: decompose() warns, as it should
pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")

# tolerances per dtype: float64 sums of a few hundred products; float32 the same at 1e-7 eps
TOL64 = dict(rtol=1e-9, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=1e-5)

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flops_of(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ---- tt_shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_in, n_out, d, expect",
    [
        (1024, 1024, None, ([8, 8, 4, 4], [4, 4, 8, 8])),
        (61, 64, 3, ([61, 1, 1], [4, 4, 4])),
        (10, 10, None, ([10], [10])),
        (64, 64, None, ([4, 4, 4], [4, 4, 4])),
        (12, 18, 2, ([4, 3], [3, 6])),
    ],
)
def test_tt_shapes_examples(n_in, n_out, d, expect):
    assert tt_shapes(n_in, n_out, d) == expect


@given(st.integers(1, 5000), st.integers(1, 5000), st.one_of(st.none(), st.integers(1, 5)))
@settings(max_examples=60, deadline=None)
def test_tt_shapes_products_and_balance(n_in, n_out, d):
    ins, outs = tt_shapes(n_in, n_out, d)
    want = default_tt_order(n_in, n_out) if d is None else d
    assert len(ins) == len(outs) == want
    assert math.prod(ins) == n_in and math.prod(outs) == n_out
    assert all(f >= 1 for f in ins + outs)
    # balanced: no other split into as many factors has log-factors closer to equal
    if want <= 3:
        for n, got in ((n_in, ins), (n_out, outs)):
            assert spread(got) <= min(spread(c) for c in splits(n, want)) + 1e-9


def spread(factors):
    return sum(math.log(f) ** 2 for f in factors)


def splits(n, d):
    if d == 1:
        yield (n,)
        return
    for f in range(1, n + 1):
        if n % f == 0:
            for rest in splits(n // f, d - 1):
                yield (f, *rest)


def test_default_order_rule():
    assert default_tt_order(10, 10) == 1
    assert default_tt_order(16, 16) == 2
    assert default_tt_order(64, 64) == 3
    assert default_tt_order(256, 256) == 4
    assert default_tt_order(25088, 4096) == 4


# ---- exact at full rank, counts match the built module (property tests) ------------------


@st.composite
def linear_cases(draw):
    n_in = draw(st.integers(2, 64))
    n_out = draw(st.integers(2, 64))
    d = draw(st.one_of(st.none(), st.integers(1, 4)))
    tokens = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    return n_in, n_out, d, tokens, bias


@given(linear_cases())
@PROPS
def test_linear_exact_at_max_rank_and_counts(case):
    n_in, n_out, d, tokens, bias = case
    seeded(n_in * 100 + n_out)
    layer = nn.Linear(n_in, n_out, bias=bias).double()
    ins, outs = tt_shapes(n_in, n_out, d)
    opts = {"in_shape": ins, "out_shape": outs}
    geom = LayerGeometry.of(layer, tokens=tokens)
    rank = TT_METHOD.max_rank(geom, opts)
    assert len(rank) == len(ins) + 1 and rank[0] == rank[-1] == 1
    factors = TT_METHOD.factorize(layer, rank, opts)
    built = TT_METHOD.build(layer, factors)
    assert isinstance(built, FactorizedLayer) and built.method == "tt" and built.rank == rank
    x = torch.randn(5, n_in, dtype=torch.float64)
    torch.testing.assert_close(built(x), layer(x), **TOL64)
    torch.testing.assert_close(TT_METHOD.reconstruct(layer, factors), layer.weight, **TOL64)
    assert TT_METHOD.count_params(geom, rank, opts) == n_params(built)
    probe = torch.randn(1, tokens, n_in, dtype=torch.float64) if tokens > 1 else torch.randn(1, n_in).double()
    assert TT_METHOD.count_flops(geom, rank, opts) == flops_of(built, probe)


@st.composite
def conv_cases(draw):
    cin = draw(st.integers(1, 16))
    cout = draw(st.integers(1, 16))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if stride == (1, 1):
        padding = draw(st.one_of(st.sampled_from(["same", "valid"]), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    else:
        padding = draw(st.one_of(st.just("valid"), st.tuples(st.integers(0, 2), st.integers(0, 2))))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    hw = (draw(st.integers(5, 9)), draw(st.integers(5, 9)))
    d = draw(st.one_of(st.none(), st.integers(1, 3)))
    return dict(in_channels=cin, out_channels=cout, kernel_size=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, padding_mode=padding_mode, bias=bias), hw, d


@given(conv_cases())
@PROPS
def test_conv_exact_at_max_rank_and_counts(case):
    kw, hw, d = case
    seeded(kw["in_channels"] * 100 + kw["out_channels"])
    layer = nn.Conv2d(**kw).double()
    ins, outs = tt_shapes(kw["in_channels"], kw["out_channels"], d)
    opts = {"in_shape": ins, "out_shape": outs}
    geom = LayerGeometry.of(layer, in_size=hw)
    rank = TT_METHOD.max_rank(geom, opts)
    assert len(rank) == len(ins) + 2 and rank[0] == rank[-1] == 1
    factors = TT_METHOD.factorize(layer, rank, opts)
    built = TT_METHOD.build(layer, factors)
    x = torch.randn(2, kw["in_channels"], *hw, dtype=torch.float64)
    torch.testing.assert_close(built(x), layer(x), **TOL64)
    torch.testing.assert_close(TT_METHOD.reconstruct(layer, factors), layer.weight, **TOL64)
    assert TT_METHOD.count_params(geom, rank, opts) == n_params(built)
    assert TT_METHOD.count_flops(geom, rank, opts) == flops_of(built, x[:1])
    assert TT_METHOD.count_flops(LayerGeometry.of(layer), rank, opts) is None


@st.composite
def any_rank_cases(draw):
    conv = draw(st.booleans())
    cin, cout = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    d = draw(st.integers(1, 4))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    return conv, cin, cout, d, k, draw(st.randoms(use_true_random=False))


@given(any_rank_cases())
@PROPS
def test_counts_match_at_any_rank(case):
    """Every valid list of bond ranks (also ones past what the unfoldings need) builds and counts right."""
    conv, cin, cout, d, k, rnd = case
    layer = nn.Conv2d(cin, cout, k, padding=1) if conv else nn.Linear(cin, cout)
    ins, outs = tt_shapes(cin, cout, d)
    opts = {"in_shape": ins, "out_shape": outs}
    geom = LayerGeometry.of(layer, in_size=(6, 5) if conv else None)
    bmax = TT_METHOD.max_rank(geom, opts)
    rank = (1, *(rnd.randint(1, m) for m in bmax[1:-1]), 1)
    assert TT_METHOD.resolve_rank(geom, list(rank), opts) == rank
    built = TT_METHOD.build(layer, TT_METHOD.factorize(layer, rank, opts))
    assert TT_METHOD.count_params(geom, rank, opts) == n_params(built)
    x = torch.randn(1, cin, 6, 5) if conv else torch.randn(1, cin)
    assert TT_METHOD.count_flops(geom, rank, opts) == flops_of(built, x)
    assert built(x).shape == layer(x).shape


def test_float32_linear_and_conv():
    seeded(0)
    lin = nn.Linear(48, 40)
    built = TT_METHOD.decompose(lin, 1.0)
    assert built[0].core0.dtype == torch.float32
    x = torch.randn(7, 48)
    torch.testing.assert_close(built(x), lin(x), **TOL32)
    conv = nn.Conv2d(12, 16, 3, stride=2, padding=1)
    built = TT_METHOD.decompose(conv, 1.0)
    x = torch.randn(3, 12, 9, 9)
    torch.testing.assert_close(built(x), conv(x), **TOL32)


def test_bfloat16_layer_keeps_dtype():
    seeded(0)
    lin = nn.Linear(32, 24).to(torch.bfloat16)
    built = TT_METHOD.decompose(lin, 1.0)
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(built(x).float(), lin(x).float(), rtol=5e-2, atol=5e-2)


# ---- contraction order -------------------------------------------------------------------


@pytest.mark.parametrize("in_shape, out_shape, expect", [([2, 16], [16, 2], "rtl"), ([16, 2], [2, 16], "ltr")])
def test_sweep_direction_is_the_cheaper_and_both_agree(in_shape, out_shape, expect):
    seeded(1)
    layer = nn.Linear(32, 32).double()
    opts = {"in_shape": in_shape, "out_shape": out_shape}
    geom = LayerGeometry.of(layer)
    rank = TT_METHOD.resolve_rank(geom, 3, opts)
    built = TT_METHOD.build(layer, TT_METHOD.factorize(layer, rank, opts))
    assert built[0].direction == expect
    x = torch.randn(5, 32, dtype=torch.float64)
    outs = {}
    for direction in ("ltr", "rtl"):
        mod = TTLinear(in_shape, out_shape, rank, direction=direction, mode="sweep", dtype=torch.float64)
        mod.load_state_dict(built[0].state_dict())
        outs[direction] = mod(x)
        assert flops_of(mod, x) == tt_sweep_flops(in_shape, out_shape, rank, 5, direction)
    torch.testing.assert_close(outs["ltr"], outs["rtl"], **TOL64)
    torch.testing.assert_close(outs[expect], built(x), **TOL64)
    assert TT_METHOD.count_flops(geom, rank, {**opts, "mode": "sweep"}) == min(
        tt_sweep_flops(in_shape, out_shape, rank, 1, "ltr"), tt_sweep_flops(in_shape, out_shape, rank, 1, "rtl")
    )


# ---- truncation --------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [([6, 6], [5, 6]), ([3, 3, 4], [2, 3, 5])])
def test_error_non_increasing_with_rank(shapes):
    seeded(2)
    layer = nn.Linear(36, 30).double()
    opts = {"in_shape": shapes[0], "out_shape": shapes[1]}
    geom = LayerGeometry.of(layer)
    top = max(TT_METHOD.max_rank(geom, opts))
    errs = []
    for r in range(1, top + 1):
        rank = TT_METHOD.resolve_rank(geom, r, opts)
        w = TT_METHOD.reconstruct(layer, TT_METHOD.factorize(layer, rank, opts))
        errs.append(float(torch.linalg.norm(w - layer.weight.detach()) / torch.linalg.norm(layer.weight.detach())))
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-12


def test_two_core_tt_is_the_optimal_kronecker_truncation():
    """With d = 2 TT-SVD is one truncated SVD: its error is the tail of the singular values."""
    seeded(3)
    layer = nn.Linear(12, 20).double()
    opts = {"in_shape": [3, 4], "out_shape": [4, 5]}
    t = layer.weight.detach().reshape(4, 5, 3, 4).permute(0, 2, 1, 3).reshape(12, 20)
    s = torch.linalg.svdvals(t)
    for r in (1, 4, 9):
        w = TT_METHOD.reconstruct(layer, TT_METHOD.factorize(layer, (1, r, 1), opts))
        torch.testing.assert_close(torch.linalg.norm(w - layer.weight), torch.linalg.norm(s[r:]), **TOL64)


def test_tt_svd_pads_ranks_past_the_unfolding():
    seeded(4)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    cores = tt_svd(t, [1, 5, 7, 1])  # bond 1 can hold only 2, bond 2 only 4
    assert [tuple(c.shape) for c in cores] == [(1, 2, 5), (5, 3, 7), (7, 4, 1)]
    full = torch.einsum("aib,bjc,ckd->ijk", *cores)
    torch.testing.assert_close(full, t, **TOL64)


# ---- ranks -------------------------------------------------------------------------------


def test_resolve_rank_forms():
    geom = LayerGeometry.of(nn.Linear(64, 64))
    opts = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}
    assert TT_METHOD.max_rank(geom, opts) == (1, 16, 16, 1)
    assert TT_METHOD.resolve_rank(geom, 8, opts) == (1, 8, 8, 1)
    assert TT_METHOD.resolve_rank(geom, 16, opts) == (1, 16, 16, 1)
    assert TT_METHOD.resolve_rank(geom, 1.0, opts) == (1, 16, 16, 1)
    assert TT_METHOD.resolve_rank(geom, 0.5, opts) == (1, 8, 8, 1)
    assert TT_METHOD.resolve_rank(geom, 0.01, opts) == (1, 1, 1, 1)
    assert TT_METHOD.resolve_rank(geom, [1, 3, 5, 1], opts) == (1, 3, 5, 1)
    # int rank is clamped per bond
    g2 = LayerGeometry.of(nn.Linear(256, 256))
    o2 = {"in_shape": [4, 4, 4, 4], "out_shape": [4, 4, 4, 4]}
    assert TT_METHOD.max_rank(g2, o2) == (1, 16, 256, 16, 1)
    assert TT_METHOD.resolve_rank(g2, 32, o2) == (1, 16, 32, 16, 1)
    # conv: the spatial bond comes first
    gc = LayerGeometry.of(nn.Conv2d(16, 16, 3))
    assert TT_METHOD.max_rank(gc, {"in_shape": [4, 4], "out_shape": [4, 4]}) == (1, 9, 16, 1)


@pytest.mark.parametrize(
    "rank",
    [0, -1, 17, 1.5, float("nan"), -0.5, 0.0, True, "8", None, [1, 8, 1], [1, 8, 8, 8, 1], [2, 8, 8, 1], [1, 8, 8, 2],
     [1, 0, 8, 1], [1, 17, 8, 1], [1, 8.0, 8, 1]],
)
def test_bad_ranks_raise_rank_error(rank):
    geom = LayerGeometry.of(nn.Linear(64, 64))
    opts = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}
    with pytest.raises(RankError) as e:
        TT_METHOD.resolve_rank(geom, rank, opts)
    msg = str(e.value)
    assert msg.startswith("tt") and "16" in msg  # names the method and the valid range
    assert repr(rank) in msg or str(rank) in msg  # and the value given


# ---- shapes ------------------------------------------------------------------------------


def test_explicit_shapes_honoured():
    seeded(5)
    layer = nn.Linear(60, 64).double()
    opts = {"in_shape": [3, 4, 5], "out_shape": [2, 8, 4]}
    built = TT_METHOD.decompose(layer, 1.0, opts)
    assert built[0].in_shape == (3, 4, 5) and built[0].out_shape == (2, 8, 4)
    assert built.options == {"in_shape": [3, 4, 5], "out_shape": [2, 8, 4]}
    assert tuple(built[0].core1.shape) == (6, 8, 4, 20)  # bonds min(6, 640), min(192, 20)
    x = torch.randn(3, 60, dtype=torch.float64)
    torch.testing.assert_close(built(x), layer(x), **TOL64)
    # only one side given: the other is split into as many factors
    geom = LayerGeometry.of(layer)
    assert len(TT_METHOD.max_rank(geom, {"in_shape": [60, 1]})) == 3


@pytest.mark.parametrize(
    "opts",
    [
        {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]},  # product 64 != 60
        {"in_shape": [3, 4, 5], "out_shape": [8, 8]},  # unequal lengths
        {"in_shape": [3, 4, 5], "out_shape": [-2, -8, 4]},  # non-positive
        {"in_shape": [0, 4, 5], "out_shape": [2, 8, 4]},
        {"in_shape": [3.0, 4, 5], "out_shape": [2, 8, 4]},
        {"in_shape": [], "out_shape": []},
        {"in_shape": 60, "out_shape": 64},
    ],
)
def test_bad_shapes_raise_plan_error(opts):
    layer = nn.Linear(60, 64)
    with pytest.raises(PlanError) as e:
        TT_METHOD.max_rank(LayerGeometry.of(layer), opts)
    msg = str(e.value)
    assert "in_features=60" in msg and "out_features=64" in msg and "in_shape=" in msg and "leave both out" in msg
    assert not isinstance(e.value, RankError)


# ---- unsupported layers and bad weights --------------------------------------------------


def test_grouped_conv_has_a_reason():
    layer = nn.Conv2d(8, 8, 3, groups=2)
    reason = TT_METHOD.unsupported_reason(LayerGeometry.of(layer))
    assert reason and "groups=2" in reason
    with pytest.raises(DecompositionError):
        TT_METHOD.decompose(layer, 2)
    assert TT_METHOD.unsupported_reason(LayerGeometry.of(nn.Conv2d(8, 8, 3))) is None


def test_nan_weight_raises():
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight[3, 4] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        TT_METHOD.factorize(layer, (1, 4, 1), {"in_shape": [4, 4], "out_shape": [4, 4]})


def test_registered():
    assert isinstance(get_method("tt"), TT)


# ---- module behaviour: input shapes, skeletons, exports ----------------------------------


def test_linear_extra_leading_dims_and_unbatched():
    seeded(6)
    layer = nn.Linear(24, 18)
    built = TT_METHOD.decompose(layer, 1.0)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(built(x), layer(x), **TOL32)
    torch.testing.assert_close(built(x[0, 0]), layer(x[0, 0]), **TOL32)
    torch.testing.assert_close(built(x[:0]), layer(x[:0]))


def test_conv_unbatched_input():
    seeded(7)
    layer = nn.Conv2d(6, 4, 3, padding=1)
    built = TT_METHOD.decompose(layer, 1.0)
    x = torch.randn(6, 7, 7)
    torch.testing.assert_close(built(x), layer(x), **TOL32)


@pytest.mark.parametrize("conv", [False, True])
def test_skeleton_loads_a_state_dict(conv):
    seeded(8)
    layer = nn.Conv2d(8, 12, 3, padding=1, bias=False) if conv else nn.Linear(40, 30)
    opts = {"in_shape": [2, 4], "out_shape": [3, 4]} if conv else None
    built = TT_METHOD.decompose(layer, 3, opts)
    skel = TT_METHOD.skeleton(layer, 3, opts)
    assert all(float(p.abs().sum()) == 0 for n, p in skel.named_parameters() if "core" in n)
    skel.load_state_dict(built.state_dict())
    x = torch.randn(2, 8, 6, 6) if conv else torch.randn(2, 40)
    torch.testing.assert_close(skel(x), built(x))
    assert "ranks=" in repr(skel)


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*is deprecated:DeprecationWarning")
@pytest.mark.parametrize("conv", [False, True])
def test_export_and_trace_with_dynamic_batch(conv):
    seeded(9)
    if conv:
        layer = nn.Conv2d(8, 12, 3, padding="same", padding_mode="reflect")
        shape = (8, 7, 6)
    else:
        layer = nn.Linear(48, 40)
        shape = (48,)
    built = TT_METHOD.decompose(layer, 0.5).eval()
    ep = torch.export.export(built, (torch.randn(3, *shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    traced = torch.jit.trace(built, torch.randn(3, *shape))
    for n in (2, 5):
        x = torch.randn(n, *shape)
        torch.testing.assert_close(ep.module()(x), built(x))
        torch.testing.assert_close(traced(x), built(x))


class _Biggest(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.biggest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.biggest = max(self.biggest, t.numel())
        return out


def test_large_linear_never_forms_the_weight():
    seeded(10)
    n = 4096
    ins, outs = tt_shapes(n, n)
    rank = (1, 8, 8, 8, 1)
    mod = TTLinear(ins, outs, rank, bias=True)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
    assert max(p.numel() for p in mod.parameters()) <= n  # the bias is the largest: no dense weight held
    assert not list(mod.buffers())
    x = torch.randn(4, n)
    with _Biggest() as watch:
        y = mod(x)
    assert watch.biggest < n * n // 64  # no intermediate anywhere near the weight's size
    # the reference forms W independently of the module
    cores = [getattr(mod, f"core{k}").detach() for k in range(4)]
    w = torch.einsum("aeib,bfjc,cgkd,dhle->efghijkl", *cores).reshape(n, n)
    torch.testing.assert_close(y, x @ w.T + mod.bias.detach(), rtol=1e-4, atol=1e-4)
    geom = LayerGeometry(kind="linear", in_features=n, out_features=n)
    assert TT_METHOD.count_params(geom, rank) == n_params(mod)
    assert TT_METHOD.count_flops(geom, rank) == flops_of(mod, x[:1])
    assert TT_METHOD.count_flops(geom, rank) < geom.dense_flops // 3


def test_tt_conv_module_rejects_bad_arguments():
    with pytest.raises(ValueError):
        TTConv2d([2, 2], [2, 2], [1, 4, 1], 3)  # needs d + 2 ranks
    with pytest.raises(ValueError):
        TTConv2d([4], [4], [1, 4, 4, 1], 3, stride=2, padding="same")
    with pytest.raises(ValueError):
        TTLinear([2, 2], [4], [1, 2, 1])
