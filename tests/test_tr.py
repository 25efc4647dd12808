"""Tensor-ring method (TR-SVD) and its layers: exact at full rank, the ring really closes,
ranks and their errors, costs equal the built module's."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tensorscope.errors import PlanError, RankError
from tensorscope.layers import FactorizedLayer
from tensorscope.methods import LayerGeometry, get_method
from tensorscope.methods.tr import TR, tr_bond_max, tr_svd
from tensorscope.methods.tt import tt_shapes
from tensorscope.tr_layers import TRConv2d, TRLinear, ring_sweep_flops, ring_sweep_work
from tensorscope.tt_layers import ring_matrix

TR_METHOD = get_method("tr")
TOL64 = dict(rtol=1e-9, atol=1e-10)
PROPS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")


def flops_of(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_and_described():
    assert isinstance(TR_METHOD, TR) and TR_METHOD.name == "tr"
    assert {"in_shape", "out_shape", "mode", "batch", "shuffle"} <= set(TR_METHOD.option_specs)


# ---- the ring ----------------------------------------------------------------------------------


def test_ring_matrix_is_the_trace_of_the_core_products():
    torch.manual_seed(0)
    layer = TRLinear([3, 4, 2], [2, 5, 3], [2, 4, 3, 2], dtype=torch.float64)
    g = layer.cores()
    w = torch.zeros(30, 24, dtype=torch.float64)
    for ms in itertools.product(range(2), range(5), range(3)):
        for ns in itertools.product(range(3), range(4), range(2)):
            prod = g[0][:, ms[0], ns[0], :] @ g[1][:, ms[1], ns[1], :] @ g[2][:, ms[2], ns[2], :]
            w[(ms[0] * 5 + ms[1]) * 3 + ms[2], (ns[0] * 4 + ns[1]) * 2 + ns[2]] = torch.trace(prod)
    torch.testing.assert_close(layer.dense_weight(), w, **TOL64)
    torch.testing.assert_close(ring_matrix(g), w, **TOL64)


def test_ring_kernel_closes_between_the_last_channel_core_and_the_spatial_core():
    torch.manual_seed(1)
    conv = TRConv2d([2, 3], [4, 2], [3, 2, 4, 3], (3, 2), dtype=torch.float64)
    g = conv.cores()
    k = torch.zeros(8, 6, 3, 2, dtype=torch.float64)
    for o1, o2, i1, i2, y, x in itertools.product(range(4), range(2), range(2), range(3), range(3), range(2)):
        prod = g[0][:, y * 2 + x, :] @ g[1][:, o1, i1, :] @ g[2][:, o2, i2, :]
        k[o1 * 2 + o2, i1 * 3 + i2, y, x] = torch.trace(prod)
    torch.testing.assert_close(conv.dense_weight(), k, **TOL64)


@pytest.mark.parametrize("ins, outs, ranks", [([3], [4], [1, 1]), ([3, 4], [2, 5], [3, 4, 3]),
                                              ([3, 4, 2], [2, 5, 3], [2, 4, 3, 2]),
                                              ([2, 3, 2, 2], [2, 2, 3, 2], [3, 2, 4, 5, 3])])
def test_linear_sweep_equals_rebuild_and_flops_match(ins, outs, ranks):
    torch.manual_seed(2)
    sweep = TRLinear(ins, outs, ranks, mode="sweep", dtype=torch.float64)
    rebuild = TRLinear(ins, outs, ranks, mode="rebuild", dtype=torch.float64)
    rebuild.load_state_dict(sweep.state_dict())
    x = torch.randn(5, 2, sweep.in_features, dtype=torch.float64)
    torch.testing.assert_close(sweep(x), rebuild(x), **TOL64)
    torch.testing.assert_close(sweep(x), x @ sweep.dense_weight().T + sweep.bias, **TOL64)
    assert flops_of(sweep, x) == ring_sweep_flops(ins, outs, ranks, 10, 1) == ring_sweep_work(ins, outs, ranks, 10).flops


@pytest.mark.parametrize("ins, outs, ranks", [([3], [4], [2, 3, 2]), ([2, 3], [4, 2], [3, 2, 4, 3]),
                                              ([2, 3, 2], [2, 2, 3], [2, 3, 4, 2, 2])])
def test_conv_sweep_equals_rebuild(ins, outs, ranks):
    torch.manual_seed(3)
    kw = dict(kernel_size=3, padding=1, stride=(1, 2), dtype=torch.float64)
    sweep = TRConv2d(ins, outs, ranks, mode="sweep", **kw)
    rebuild = TRConv2d(ins, outs, ranks, mode="rebuild", **kw)
    rebuild.load_state_dict(sweep.state_dict())
    x = torch.randn(2, sweep.in_channels, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(sweep(x), rebuild(x), **TOL64)
    ref = nn.functional.conv2d(x, sweep.dense_weight(), sweep.bias, stride=(1, 2), padding=1)
    torch.testing.assert_close(sweep(x), ref, **TOL64)


def test_layers_refuse_bad_ranks():
    with pytest.raises(ValueError, match="ring bond"):
        TRLinear([2, 2], [2, 2], [2, 3, 1])
    with pytest.raises(ValueError, match="one-core"):
        TRLinear([4], [4], [2, 2])
    with pytest.raises(ValueError, match="ring bond"):
        TRConv2d([2], [2], [2, 3, 1], 3)


# ---- TR-SVD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("modes", [(4, 6), (3, 4, 5), (9, 4, 4, 2), (2, 3, 2, 3, 2)])
def test_tr_svd_exact_at_the_bond_maximum(modes):
    torch.manual_seed(4)
    t = torch.randn(*modes, dtype=torch.float64)
    bmax = tr_bond_max(modes)
    assert bmax[0] == bmax[-1] and len(bmax) == len(modes) + 1
    cores = tr_svd(t, bmax)
    assert [tuple(c.shape) for c in cores] == [(bmax[k], s, bmax[k + 1]) for k, s in enumerate(modes)]
    flat = ring_matrix([c.unsqueeze(2) for c in cores]).reshape(modes)
    torch.testing.assert_close(flat, t, **TOL64)


def test_bond_maximum_rule():
    assert tr_bond_max([16, 16]) == (4, 4, 4)  # R_1 = 16: ring 4, r_1 4
    assert tr_bond_max([7, 30]) == (2, 4, 2)  # R_1 = 7: ring floor(sqrt 7) = 2, r_1 = ceil(7 / 2)
    assert tr_bond_max([9, 4, 4]) == (3, 3, 4 * 3, 3)  # bond 2: min(3 * 4, 4 * 3)
    assert tr_bond_max([5]) == (1, 1)


def test_error_shrinks_toward_exact():
    torch.manual_seed(5)
    layer = nn.Linear(64, 64).double()
    opts = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}
    geom = LayerGeometry.of(layer)
    w = layer.weight.detach()

    def err(rank):
        f = TR_METHOD.factorize(layer, rank, opts)
        return float((TR_METHOD.reconstruct(layer, f) - w).norm() / w.norm())

    mx = TR_METHOD.max_rank(geom, opts)
    assert mx == (4, 4, 64, 4)  # bond 2: min(r_1 * 16, 16 * r_0)
    errs = [err(TR_METHOD.resolve_rank(geom, f, opts)) for f in (0.25, 0.5, 0.75, 1.0)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12 and errs[0] > 0.1


def test_ring_bond_one_is_tt_svd():
    torch.manual_seed(6)
    layer = nn.Linear(36, 30).double()
    opts = {"in_shape": [6, 6], "out_shape": [5, 6]}
    tt = get_method("tt")
    for r in (1, 3, 6):
        w_tr = TR_METHOD.reconstruct(layer, TR_METHOD.factorize(layer, (1, r, 1), opts))
        w_tt = tt.reconstruct(layer, tt.factorize(layer, (1, r, 1), opts))
        torch.testing.assert_close(w_tr, w_tt, **TOL64)


# ---- ranks -------------------------------------------------------------------------------------


def test_rank_forms():
    geom = LayerGeometry.of(nn.Linear(64, 64))
    opts = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}
    assert TR_METHOD.resolve_rank(geom, 3, opts) == (3, 3, 3, 3)
    assert TR_METHOD.resolve_rank(geom, 8, opts) == (4, 4, 8, 4)
    assert TR_METHOD.resolve_rank(geom, 1.0, opts) == (4, 4, 64, 4)
    assert TR_METHOD.resolve_rank(geom, 0.5, opts) == (2, 2, 32, 2)
    assert TR_METHOD.resolve_rank(geom, [2, 3, 5, 2], opts) == (2, 3, 5, 2)
    axes = TR_METHOD.rank_axes(geom, opts)
    assert [a.name for a in axes] == ["ring", "bond1", "bond2"]
    assert TR_METHOD.rank_from_axes(geom, [2, 3, 5], opts) == (2, 3, 5, 2)
    assert TR_METHOD.axis_values((2, 3, 5, 2)) == (2, 3, 5)
    assert TR_METHOD.rank_text((2, 3, 5, 2)) == "2-3-5-2"


@pytest.mark.parametrize("rank", [[2, 3, 5, 3], [1, 3, 5, 2], [5, 3, 5, 5], [2, 0, 5, 2], [2, 3, 65, 2], [2, 3, 2],
                                  [2.0, 3, 5, 2], 0, 65, float("nan"), "3", True])
def test_bad_ranks_name_the_value_and_the_fix(rank):
    geom = LayerGeometry.of(nn.Linear(64, 64))
    opts = {"in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}
    with pytest.raises(RankError) as e:
        TR_METHOD.resolve_rank(geom, rank, opts)
    msg = str(e.value)
    assert msg.startswith("tr") and (repr(rank) in msg or str(rank) in msg)
    if isinstance(rank, list) and len(rank) == 4 and rank[0] != rank[-1]:
        assert "differ" in msg and "equal ends" in msg and f"[{rank[0]}, " in msg


def test_a_plan_with_differing_ends_fails_before_any_work_and_names_the_layer():
    import tensorscope as ts

    model = nn.Sequential(nn.Linear(64, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {"0": {"method": "tr", "rank": [2, 3, 5, 3], "in_shape": [4, 4, 4], "out_shape": [4, 4, 4]}}
    for build in (ts.compress, ts.tensorize):
        with pytest.raises(RankError, match=r"layer '0'.*ends 2 and 3"):
            build(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_shapes_name_tr():
    with pytest.raises(PlanError, match="^tr: in_shape multiplies"):
        TR_METHOD.max_rank(LayerGeometry.of(nn.Linear(60, 64)), {"in_shape": [4, 4, 4]})


# ---- exact at full rank, counts (property tests) -----------------------------------------------


@st.composite
def cases(draw):
    conv = draw(st.booleans())
    cin, cout = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    d = draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    mode = draw(st.sampled_from([None, "sweep", "rebuild"]))
    frac = draw(st.sampled_from([None, 0.3, 0.7]))
    return conv, cin, cout, d, k, mode, frac


@given(cases())
@PROPS
def test_exact_at_max_rank_and_counts_at_any_rank(case):
    conv, cin, cout, d, k, mode, frac = case
    torch.manual_seed(cin * 31 + cout)
    layer = (nn.Conv2d(cin, cout, k, padding=1) if conv else nn.Linear(cin, cout)).double()
    ins, outs = tt_shapes(cin, cout, d)
    opts = {"in_shape": ins, "out_shape": outs, **({"mode": mode} if mode else {})}
    geom = LayerGeometry.of(layer, in_size=(6, 5) if conv else None)
    rank = TR_METHOD.max_rank(geom, opts) if frac is None else TR_METHOD.resolve_rank(geom, frac, opts)
    built = TR_METHOD.build(layer, TR_METHOD.factorize(layer, rank, opts))
    assert isinstance(built, FactorizedLayer) and built.method == "tr" and built.rank == rank
    assert built[0].mode == TR_METHOD.resolve_mode(geom, rank, opts)
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64) if conv else torch.randn(2, cin, dtype=torch.float64)
    if frac is None:
        torch.testing.assert_close(built(x), layer(x), **TOL64)
    assert TR_METHOD.count_params(geom, rank, opts) == n_params(built)
    assert TR_METHOD.count_flops(geom, rank, opts) == flops_of(built, x[:1])


def test_export_with_a_dynamic_batch():
    torch.manual_seed(7)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    built = TR_METHOD.decompose(conv, 0.5, {"mode": "sweep"}).eval()
    ep = torch.export.export(built, (torch.randn(3, 8, 6, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for n in (2, 5):
        x = torch.randn(n, 8, 6, 6)
        torch.testing.assert_close(ep.module()(x), built(x))
    assert math.isfinite(float(built(x).detach().sum()))
