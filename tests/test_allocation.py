"""Allocation by what the network loses, shrunk statistics, one statistics pass, correction.

Tiny networks only (the real ones are in bench/real_networks.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tensorscope as ts
from tensorscope import calibration
from tensorscope.allocation import estimated_damage, measured_damage
from tensorscope.calibration import collect_stats, ledoit_wolf
from tensorscope.correction import correct
from tensorscope.linalg import whitened_svd
from tensorscope.methods import get_method


def _tokens(n: int, t: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64) @ mix


def test_output_estimate_equals_a_direct_computation_on_a_linear_network():
    """On a linear network with exact probes, the K-FAC estimate of the output loss of one
    truncated layer equals the loss measured end to end (no higher-order terms)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 5)).double()
    x = _tokens(40, 3, 8)
    data = [x[:20], x[20:]]
    # 3 tokens x 5 outputs = 15 outputs per sample: 15 unit probes give the exact Gauss-Newton
    stats = collect_stats(net, data, ["0", "1"], gradients=True, probes=15, ridge=0.0)
    assert stats.loss == "mse" and stats.halves is not None
    for layer, rank, options in (("0", 3, {"shrinkage": 0.0, "fisher": 0.1}), ("1", 2, {"shrinkage": 0.3}),
                                 ("0", 4, {})):
        plan = ts.Plan({layer: {"method": "svd", "rank": rank, **options}})
        est = estimated_damage(net, plan, stats)[layer]
        small = ts.compress(net, plan, stats=stats)
        got = measured_damage(net, small, data)
        assert est == pytest.approx(got, rel=1e-6), (layer, rank, options)
        # held out: factors from one half, scored on the other half's moments and data
        a, b = stats.halves
        est_ab = estimated_damage(net, plan, a, b)[layer]
        got_ab = measured_damage(net, ts.compress(net, plan, stats=a), [x[20:]])
        assert est_ab == pytest.approx(got_ab, rel=1e-6)
    # the planner's own check finds measured / estimated = 1 on every layer
    from tensorscope.allocation import measured_scales, split_halves
    from tensorscope.budget import _Option

    opts = {n: _Option(0.0, 0.0, "svd", 2, 0, None, {"shrinkage": 0.0, "fisher": 0.1}) for n in ("0", "1")}
    scales = measured_scales(net, dict(net.named_modules()), stats, split_halves(data), opts)
    assert scales == {"0": pytest.approx(1.0, rel=1e-6), "1": pytest.approx(1.0, rel=1e-6)}


def test_output_estimate_follows_measured_damage_on_a_classifier():
    """Class scores: the Fisher of the softmax (exact with one probe per class). Truncating
    the last layer, the second-order estimate of the KL divergence is close to the measured one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    with torch.no_grad():
        net[2].weight.mul_(0.3)
    x = torch.randn(200, 10, dtype=torch.float64)
    stats = collect_stats(net, [x], ["0", "2"], gradients=True, probes=6)
    assert stats.loss == "kl"
    for rank in (5, 4):
        plan = ts.Plan({"2": {"method": "svd", "rank": rank}})
        est = estimated_damage(net, plan, stats)["2"]
        got = measured_damage(net, ts.compress(net, plan, stats=stats), [x])
        assert got > 0 and est == pytest.approx(got, rel=0.15), rank


def test_output_allocation_spends_the_budget_where_the_output_loses_least():
    """Two identical layers, one of whose outputs the network scales down 100x: the
    output allocation keeps that one smaller, the layer allocation cannot tell them apart."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x):
            return torch.stack([self.a(x), 0.01 * self.b(x)], 1)  # (N, 2, 16): not class scores

    net = Two().double()
    x = _tokens(64, 1, 16)[:, 0]
    stats = collect_stats(net, [x[:32], x[32:]], ["a", "b"], gradients=True)
    plan = ts.plan_for_budget(net, 0.6, stats=stats, allocation="output")
    ranks = {n: plan.layers[n].rank if n in plan.layers else 16 for n in ("a", "b")}
    assert ranks["b"] < ranks["a"]
    layer_plan = ts.plan_for_budget(net, 0.6, stats=stats)
    lr = {n: layer_plan.layers[n].rank if n in layer_plan.layers else 16 for n in ("a", "b")}
    assert abs(lr["a"] - lr["b"]) <= 1


def test_shrinkage_zero_is_plain_whitening_and_one_is_plain_svd():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12).double()
    net = nn.Sequential(layer)
    x = _tokens(30, 1, 20)[:, 0]
    stats = collect_stats(net, [x], ["0"])["0"]
    same = stats.shrunk(0.0)
    assert_close(same.whitener("patch"), stats.whitener("patch"))
    assert_close(same.moment(), stats.moment())
    m = get_method("svd")
    for r in (3, 7):
        plain_white = m.reconstruct(layer, m.factorize(layer, r, stats=stats))
        zero = m.reconstruct(layer, m.factorize(layer, r, {"shrinkage": 0.0}, stats=stats))
        assert_close(zero, plain_white, rtol=1e-9, atol=1e-9)
        one = m.reconstruct(layer, m.factorize(layer, r, {"shrinkage": 1.0}, stats=stats))
        data_free = m.reconstruct(layer, m.factorize(layer, r))
        assert_close(one, data_free, rtol=1e-9, atol=1e-9)
    # in between: the moment is the convex mix with tr(C)/n I
    half = stats.shrunk(0.5).moment()
    c = stats.moment()
    mu = torch.diagonal(c, dim1=-2, dim2=-1).mean()
    assert_close(half, 0.5 * c + 0.5 * mu * torch.eye(20, dtype=c.dtype))
    with pytest.raises(ValueError):
        stats.shrunk(1.5)


def test_ledoit_wolf_shrinks_more_with_fewer_samples():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 4)).double()
    few = collect_stats(net, [torch.randn(30, 40, dtype=torch.float64)], ["0"], fourth=True)["0"]
    many = collect_stats(net, [torch.randn(4000, 40, dtype=torch.float64)], ["0"], fourth=True)["0"]
    assert 0.0 <= ledoit_wolf(many) < ledoit_wolf(few) <= 1.0
    assert ledoit_wolf(few) > 0.3


def test_one_pass_statistics_are_the_sum_of_their_halves_and_are_reused(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 96), nn.ReLU(), nn.Linear(96, 64))
    batches = [torch.randn(10, 24) for _ in range(4)]
    stats = collect_stats(net, batches, ["0", "2"])
    a, b = stats.halves
    for n in ("0", "2"):
        assert_close(a[n].patch + b[n].patch, stats[n].patch)
        separate = collect_stats(net, batches[0::2], [n], halves=False)[n]
        assert_close(a[n].patch, separate.patch, rtol=1e-10, atol=1e-10)
    calls = []
    real = calibration.collect_stats
    monkeypatch.setattr("tensorscope.budget.collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_data = ts.plan_for_budget(net, 0.5, data=batches)
    assert len(calls) == 1
    for keep in (0.5, 0.3):  # any number of budgets from the same statistics
        plan = ts.plan_for_budget(net, keep, stats=stats)
        kept = ts.plan_cost(net, plan)["params_after"] / ts.count_params(net)
        assert abs(kept / keep - 1) <= 0.02
    assert ts.plan_for_budget(net, 0.5, stats=stats).to_dict() == with_data.to_dict()
    assert len(calls) == 1


def test_layers_reading_one_tensor_share_their_input_moments():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x).repeat(1, 1, 2)

    net = QKV()
    x = [torch.randn(5, 3, 8) for _ in range(2)]
    stats = collect_stats(net, x, ["q", "k", "v"], gradients=True, probes=2)
    assert stats["q"].patch is stats["k"].patch is stats["v"].patch
    assert stats["q"].grad is not stats["k"].grad
    alone = collect_stats(net, x, ["v"])
    assert_close(alone["v"].patch, stats["v"].patch)


def test_output_plans_compress_with_their_factors_and_hit_the_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(96, 16)
    data = [x[:48], x[48:]]
    stats = collect_stats(net, data, ["0", "2", "4"], gradients=True)
    plan = ts.plan_for_budget(net, 0.5, stats=stats, allocation="output")
    kept = ts.plan_cost(net, plan)["params_after"] / ts.count_params(net)
    assert abs(kept / 0.5 - 1) <= 0.02
    assert all("fisher" in lp.options for lp in plan.layers.values())
    a = ts.compress(net, plan, stats=stats)
    b = ts.compress(net, plan, data=data)  # gathers the gradients it needs itself
    with torch.no_grad():
        assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ts.PlanError, match="gradients=True"):
        ts.compress(net, plan, stats=collect_stats(net, data, ["0", "2", "4"]))
    measured = ts.plan_for_budget(net, 0.5, stats=stats, data=data, allocation="output")  # estimates checked
    kept = ts.plan_cost(net, measured)["params_after"] / ts.count_params(net)
    assert abs(kept / 0.5 - 1) <= 0.02
    with pytest.raises(ts.BudgetError, match="allocation"):
        ts.plan_for_budget(net, 0.5, stats=stats, data=data, measure=True)
    with pytest.raises(ts.BudgetError, match="data="):
        ts.plan_for_budget(net, 0.5, allocation="output")
    with pytest.raises(ts.BudgetError, match="gradient"):
        ts.plan_for_budget(net, 0.5, stats=collect_stats(net, data, ["0", "2", "4"]), allocation="output")
    with pytest.raises(ts.BudgetError, match="no statistics"):
        ts.plan_for_budget(net, 0.5, stats=collect_stats(net, data, ["0"]))


def test_tucker2_has_a_data_aware_curve():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    data = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    for allocation in ("layer", "output"):
        plan = ts.plan_for_budget(net, 0.5, data=data, methods=("tucker2",), allocation=allocation)
        assert plan.layers and all(lp.method == "tucker2" for lp in plan.layers.values())
        kept = ts.plan_cost(net, plan)["params_after"] / ts.count_params(net)
        assert abs(kept / 0.5 - 1) <= 0.02


def test_sequential_correction_fits_the_compressed_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)).double()
    x = _tokens(200, 1, 16)[:, 0]
    plan = ts.Plan({n: {"method": "svd", "rank": 6} for n in ("0", "2", "4")})
    small = ts.compress(net, plan, data=[x])
    fixed = correct(small, net, [x], ridge=1e-3)
    again = ts.compress(net, plan, data=[x], correct=True)
    assert ts.plan_of(fixed).to_dict() == plan.to_dict()
    with torch.no_grad():
        before, after = (small(x) - net(x)).norm(), (fixed(x) - net(x)).norm()
        assert after < 0.9 * before
        assert ts.count_params(fixed) == ts.count_params(small)
        assert_close(again(x), correct(small, net, [x])(x))
    with pytest.raises(TypeError, match="data="):
        ts.compress(net, plan, correct=True)
    with pytest.raises(ValueError, match='"dense"'):
        ts.compress(net, plan, data=[x], correct="yes")
    # "dense": the layers left dense after the first compressed one are refitted too
    part = ts.Plan({"0": {"method": "svd", "rank": 6}})
    dense = ts.compress(net, part, data=[x], correct="dense")
    assert not torch.equal(dense[2].weight, net[2].weight)
    with torch.no_grad():
        assert_close(dense(x), correct(ts.compress(net, part, data=[x]), net, [x], dense=True)(x))


def test_tied_weights_are_left_dense_or_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    net[3].weight = net[2].weight  # tied
    with pytest.warns(UserWarning, match="leaves 2 layer.* dense: 2: its weight is tied"):
        plan = ts.plan_for_budget(net, 0.8, data=[torch.randn(16, 8)], allocation="output")
    assert "2" not in plan.layers and "3" not in plan.layers
    with pytest.raises(ts.PlanError, match="tied"):
        ts.compress(net, {"2": {"method": "svd", "rank": 2}})


def test_bad_calibration_batches_name_the_batch_and_leave_the_model_alone():
    net = nn.Sequential(nn.Linear(6, 4))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ts.DataError, match="batch 1"):
        collect_stats(net, [torch.randn(3, 6), torch.randn(3, 5)], ["0"])
    with pytest.raises(ts.DataError, match="batch 0"):
        collect_stats(net, [torch.randn(3, 6, dtype=torch.float64)], ["0"], gradients=True)
    assert net.training and all(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ts.DataError, match="probes"):
        collect_stats(net, [torch.randn(3, 6)], ["0"], probes=0)


def test_few_rows_warn_when_whitened_factors_were_not_chosen_held_out():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 8))
    x = torch.randn(10, 32)
    with pytest.warns(UserWarning, match="fewer input rows"):
        ts.compress(net, {"0": {"method": "svd", "rank": 4}}, data=[x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.compress(net, {"0": {"method": "svd", "rank": 4, "shrinkage": 1.0}}, data=[x])


def test_finetune_keeps_dropout_off_and_can_train_only_the_factors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.9), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    small = ts.compress(net, {"0": {"method": "svd", "rank": 2}})
    seen = []
    h = small[2].register_forward_hook(lambda m, a, o: seen.append(m.training))
    tuned = ts.finetune(small, [x[:32], x[32:]], teacher=net, steps=10, eval_every=5, lr=1e-3,
                        trainable="factors")
    h.remove()
    assert seen and not any(seen)
    assert torch.equal(tuned[3].weight, small[3].weight)  # not a factorized layer: untouched
    assert not torch.equal(tuned[0][0].weight, small[0][0].weight)
    assert all(p.requires_grad for p in small.parameters())


def test_cli_compress_with_output_allocation_and_correction(capsys, tmp_path):
    from tensorscope.cli import main

    ex = ts.examples.load_example("lenet5")
    x = ex.train.tensors[0][:128]
    torch.save({"x": x}, tmp_path / "calib.pt")
    rc = main(["compress", "lenet5", "--keep", "0.2", "--data", str(tmp_path / "calib.pt"), "--batch-size", "64",
               "--allocation", "output", "--correct", "--plan-out", str(tmp_path / "p.json"),
               "-o", str(tmp_path / "s.pt"), "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    plan = ts.Plan.load(tmp_path / "p.json")
    assert any("fisher" in lp.options for lp in plan.layers.values())
    assert ts.count_params(ts.load(tmp_path / "s.pt")) < 0.21 * ts.count_params(ex.model)
    rc = main(["compress", "lenet5", "--keep", "0.2", "--allocation", "output", "-o", str(tmp_path / "t.pt"), "-q"])
    assert rc != 0 and not (tmp_path / "t.pt").exists()
    rc = main(["compress", "lenet5", "--keep", "0.3", "--data", str(tmp_path / "calib.pt"), "--batch-size", "64",
               "--correct", "dense", "-o", str(tmp_path / "d.pt"), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert ts.count_params(ts.load(tmp_path / "d.pt")) < 0.31 * ts.count_params(ex.model)


def test_kfac_trace_formula_equals_an_explicit_computation():
    """``truncation_losses`` prices every rank from one k x k matrix; against forming each
    ``W_r`` and computing ``tr(G (W - W_r) C (W - W_r)^T)`` directly, per group summed."""
    from tensorscope.linalg import truncation_losses

    g = torch.Generator().manual_seed(0)
    groups, o, n = 2, 7, 5
    k = min(o, n)
    front = torch.randn(groups, o, k, generator=g, dtype=torch.float64)
    s = torch.rand(groups, k, generator=g, dtype=torch.float64).sort(-1, descending=True).values + 0.1
    back = torch.randn(groups, k, n, generator=g, dtype=torch.float64)
    a = torch.randn(groups, n, n, generator=g, dtype=torch.float64)
    c = a @ a.transpose(-1, -2) / n
    b = torch.randn(groups, o, o, generator=g, dtype=torch.float64)
    gm = b @ b.transpose(-1, -2) / o
    w = front @ (s[..., None] * back)
    for grad in (gm, None):
        err, total = truncation_losses(front, s, back, c, grad)
        gg = torch.eye(o, dtype=torch.float64).expand(groups, o, o) if grad is None else grad
        explicit = lambda d: float(torch.einsum("gab,gbn,gnm,gam->", gg, d, c, d))  # noqa: E731
        assert total == pytest.approx(explicit(w), rel=1e-10)
        for r in range(1, k + 1):
            w_r = front[..., :r] @ (s[..., :r, None] * back[:, :r])
            assert err[r - 1] == pytest.approx(explicit(w - w_r), rel=1e-8, abs=1e-10 * total), (r, grad is None)
    # the layer-level score is the same formula with the moments of the data it is checked on
    from tensorscope.methods.svd import heldout_svd_losses

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    x = _tokens(30, 2, 6)
    st = collect_stats(net, [x[:15], x[15:]], ["0"], gradients=True, probes=8)
    fit, check = st.halves
    losses, zero = heldout_svd_losses(net[0], fit["0"], check["0"], {"fisher": 0.1}, output=True)
    from tensorscope.methods.svd import _factors_for

    fr, sv, bk = _factors_for(net[0], fit["0"], {"fisher": 0.1})
    w = net[0].weight.detach().double()
    cm, gmom = check["0"].ridged_moment("patch")[0], check["0"].grad_moment()[0]
    scale = 0.5 * check["0"].count / check["0"].samples
    for r in (1, 3, 6):
        d = w - (fr[0, :, :r] * sv[0, :r]) @ bk[0, :r]
        assert losses[r - 1] == pytest.approx(scale * float(torch.trace(gmom @ d @ cm @ d.T)), rel=1e-8)
    assert zero == pytest.approx(scale * float(torch.trace(gmom @ w @ cm @ w.T)), rel=1e-10)


def test_second_order_estimate_matches_measured_loss_for_small_perturbations():
    """One sample, one row, every class probed: the estimate is the exact second-order
    (Fisher) term of the KL divergence, so measured / estimated -> 1 as the perturbation
    (the truncated singular value) shrinks, and the gap grows with it (third-order terms)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    u, _, vh = torch.linalg.svd(net[0].weight.detach(), full_matrices=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    gaps = {}
    for eps in (1e-1, 1e-3):
        sv = torch.linspace(3.0, 1.0, 8, dtype=torch.float64)
        sv[-1] = eps  # the one singular value a rank-7 truncation drops: ||dW|| = eps
        with torch.no_grad():
            net[0].weight.copy_((u * sv) @ vh)
        plan = ts.Plan({"0": {"method": "svd", "rank": 7, "shrinkage": 1.0}})  # plain factors: dW fixed
        ratios = []
        for i in range(3):
            one = [x[i:i + 1]]
            st = collect_stats(net, one, ["0"], gradients=True, probes=6, halves=False)
            est = estimated_damage(net, plan, st)["0"]
            got = measured_damage(net, ts.compress(net, plan, stats=st), one)
            ratios.append(got / est)
        gaps[eps] = max(abs(r - 1) for r in ratios)
    assert gaps[1e-3] < 1e-2
    assert gaps[1e-3] < gaps[1e-1]


def _isotropic_layer_stats(rows_per_half: int, width: int = 48, seed: int = 0, aniso: bool = False):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(width, width)).double()
    with torch.no_grad():  # a weight with a slowly decaying spectrum: every direction matters
        q1, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
        net[0].weight.copy_((q1 * torch.linspace(2.0, 0.5, width, dtype=torch.float64)) @ q2.T)
    scale = torch.logspace(0, -2, width, dtype=torch.float64) if aniso else torch.ones(width, dtype=torch.float64)
    mix, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))

    def draw(n):
        return (torch.randn(n, width, generator=g, dtype=torch.float64) * scale) @ mix.T

    return net, [draw(rows_per_half), draw(rows_per_half)], draw(2000)


def test_heldout_choice_picks_plain_factors_when_whitened_ones_overfit():
    """Few rows of isotropic inputs (24 rows, 48 inputs): whitening by their moment fits
    noise. Scored on the other half, plain factors win and the plan asks for them
    (``shrinkage`` 1), and on fresh data they are indeed better. With many rows of strongly
    anisotropic inputs the same rule keeps the whitened factors."""
    net, calib, fresh = _isotropic_layer_stats(12)
    stats = collect_stats(net, calib, ["0"])
    plan = ts.plan_for_budget(net, 0.5, stats=stats, variants=[{"shrinkage": 0.0}, {"shrinkage": 1.0}],
                              heldout=True)
    lp = plan.layers["0"]
    assert lp.options.get("shrinkage") == 1.0
    m = get_method("svd")
    w = net[0].weight.detach()
    out_err = lambda opts: float(((w - m.reconstruct(net[0], m.factorize(net[0], lp.rank, opts, stats=stats["0"])))  # noqa: E731
                                  @ fresh.T).norm())
    assert out_err({"shrinkage": 1.0}) < out_err({"shrinkage": 0.0})
    net2, calib2, _ = _isotropic_layer_stats(1000, aniso=True)
    stats2 = collect_stats(net2, calib2, ["0"])
    plan2 = ts.plan_for_budget(net2, 0.5, stats=stats2, variants=[{"shrinkage": 0.0}, {"shrinkage": 1.0}],
                               heldout=True)
    assert plan2.layers["0"].options.get("shrinkage") == 0.0


def test_correction_reduces_the_measured_damage_of_a_planned_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6)).double()
    x = _tokens(300, 1, 12)[:, 0]
    calib, held = [x[:100], x[100:200]], [x[200:]]
    stats = collect_stats(net, calib, ["0", "2", "4"], gradients=True)
    plan = ts.plan_for_budget(net, 0.4, stats=stats, allocation="output")
    small = ts.compress(net, plan, stats=stats)
    fixed = ts.correct(small, net, calib, stats=stats)
    before, after = measured_damage(net, small, held), measured_damage(net, fixed, held)
    assert after < 0.9 * before, (before, after)
    assert ts.count_params(fixed) == ts.count_params(small)


def test_distillation_stops_early_on_held_out_data():
    """Training on 4 samples of one distribution, checked on another: the training loss
    falls while the held-out one does not, so training stops after ``patience`` checks (far
    before ``steps``) and returns the best held-out state, never a worse one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
    small = ts.compress(net, {"0": {"method": "svd", "rank": 2}, "3": {"method": "svd", "rank": 2}})
    train = [torch.randn(4, 8)]
    val = [3.0 * torch.randn(64, 8) + 2.0]
    calls = []
    h = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with pytest.warns(UserWarning, match="did not improve"):
        tuned = ts.finetune(small, train, teacher=net, val_data=val, steps=5000, lr=1e-2, eval_every=5, patience=3)
    h.remove()
    steps = sum(1 for c in calls if c == 4)
    assert steps <= 5 * 4 + 5, steps  # patience 3: the fourth check without improvement stops
    with torch.no_grad():
        loss = lambda m: float(((m(val[0]) - net(val[0])) ** 2).mean())  # noqa: E731
        assert loss(tuned) <= loss(small) + 1e-7
    assert not net.training  # the teacher left as it was


def test_tied_embedding_and_output_layer_are_refused_and_the_model_untouched():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight  # as language models tie them

        def forward(self, ids):
            return self.head(torch.tanh(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    net = Tied()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.randint(0, 20, (6, 5))
    with pytest.warns(UserWarning, match="tied"):
        plan = ts.plan_for_budget(net, 0.9, data=[ids[:3], ids[3:]], allocation="output")
    assert "head" not in plan.layers
    with pytest.raises(ts.PlanError, match="tied"):
        ts.compress(net, {"head": {"method": "svd", "rank": 2}}, data=[ids])
    assert net.head.weight is net.emb.weight
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])


def test_wrong_calibration_batches_name_the_layer_or_batch_and_leave_the_model_alone():
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ts.DataError, match=r"batch 1 \(\(3, 5\) torch.float32\)"):
        ts.plan_for_budget(net, 0.5, data=[torch.randn(3, 6), torch.randn(3, 5)], allocation="output")
    with pytest.raises(ts.DataError, match=r"batch 0 .*torch.float64"):
        ts.compress(net, {"0": {"method": "svd", "rank": 2}}, data=[torch.randn(3, 6, dtype=torch.float64)])
    with pytest.raises(ts.DataError, match="batch 0"):
        ts.correct(ts.compress(net, {"0": {"method": "svd", "rank": 2}}), net, [torch.randn(3, 7)])
    assert net.training and all(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])


def test_too_few_samples_for_held_out_scores_warn_what_was_done_instead():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    one = [torch.randn(1, 6)]
    with pytest.warns(UserWarning, match="in-sample"):
        plan = ts.plan_for_budget(net, 0.6, data=one, allocation="output")
    assert plan.layers
    with pytest.warns(UserWarning, match="in-sample"):
        ts.plan_for_budget(net, 0.6, data=one, heldout=True)


def test_padding_tokens_stay_out_of_the_statistics():
    """A tokenizer batch's ``attention_mask``: the padded positions' rows are no input the
    network's output depends on, so the moments equal those of the unpadded sentences."""

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 6)
            self.lin = nn.Linear(6, 5)
            self.out = nn.Linear(5, 4)

        def forward(self, input_ids, attention_mask):
            h = self.out(torch.tanh(self.lin(self.emb(input_ids))))
            return h * attention_mask[..., None]

    torch.manual_seed(0)
    net = Enc().double()
    lengths = [5, 3, 2, 4]
    ids = torch.randint(1, 30, (4, 5))
    mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    padded = collect_stats(net, [{"input_ids": ids, "attention_mask": mask}], ["lin", "out"], gradients=True,
                           probes=20, halves=False)
    alone = [collect_stats(net, [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}],
                           ["lin", "out"], gradients=True, probes=20, halves=False) for i, n in enumerate(lengths)]
    for n in ("lin", "out"):
        assert padded[n].count == sum(lengths)
        assert_close(padded[n].patch, sum(a[n].patch for a in alone), rtol=1e-10, atol=1e-12)
        assert padded[n].grad_count == sum(lengths)
        assert_close(padded[n].grad, sum(a[n].grad for a in alone), rtol=1e-10, atol=1e-12)


def _deep_tanh(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 6)).double()
    x = torch.randn(48, 12, dtype=torch.float64) * torch.logspace(0, -1, 12, dtype=torch.float64)
    data = [x[:24], x[24:]]
    return net, data, collect_stats(net, data, ["0", "2", "4", "6"], gradients=True, probes=6)


def test_auto_measure_keeps_the_plan_that_loses_less_held_out(monkeypatch, caplog):
    """``measure="auto"`` makes the allocation with and without the end-to-end rescaling and
    keeps the one whose whole plan loses less on the second half (class scores: top-1
    disagreement first, then the output loss); on these two networks the rescaling helps one
    and hurts the other, so each choice is made once."""
    import logging

    from tensorscope import budget
    from tensorscope.allocation import heldout_plan_scores, split_halves

    winners = set()
    for seed in (0, 9):
        net, data, stats = _deep_tanh(seed)
        plans = {m: ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output", measure=m)
                 for m in (True, False)}
        assert plans[True] != plans[False]
        damage = {m: heldout_plan_scores(net, dict(net.named_modules()), stats, split_halves(data), p.layers)
                  for m, p in plans.items()}
        best = min(damage, key=lambda m: damage[m].key())
        assert damage[best].disagreement is not None  # (N, 6) class scores
        assert damage[best].key() < damage[not best].key()
        with caplog.at_level(logging.DEBUG, logger="tensorscope.budget"):
            auto = ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output")
        assert auto == plans[best]
        assert f"kept the plan {'with' if best else 'without'} it" in caplog.text
        caplog.clear()
        winners.add(best)
    assert winners == {True, False}
    # the whole-plan measurement runs only for "auto", and only when the two plans differ
    calls = []
    real = budget.heldout_plan_scores
    monkeypatch.setattr(budget, "heldout_plan_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output", measure=True)
    ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output", measure=False)
    assert calls == []
    ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output")
    assert len(calls) == 2
    net, data, stats = _deep_tanh(1)  # here both allocations give the same plan
    same = [ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output", measure=m)
            for m in (True, False)]
    calls.clear()
    assert same[0] == same[1] == ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output")
    assert calls == []


def test_auto_measure_ranks_a_classifiers_plans_by_top1_disagreement_first(monkeypatch):
    """Between the two allocations, fewer held-out top-1 disagreements win over a lower
    output loss; the loss decides between plans that disagree as often."""
    from tensorscope import budget
    from tensorscope.allocation import PlanScores

    net, data, stats = _deep_tanh(0)
    plans = {m: ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output", measure=m)
             for m in (True, False)}
    for unscaled, scaled, kept in ((PlanScores(1.0, 0.25), PlanScores(0.5, 0.30), False),
                                   (PlanScores(0.5, 0.30), PlanScores(1.0, 0.25), True),
                                   (PlanScores(0.5, 0.25), PlanScores(1.0, 0.25), False),
                                   (PlanScores(1.0, None), PlanScores(0.5, None), True)):
        answers = iter((unscaled, scaled))
        monkeypatch.setattr(budget, "heldout_plan_scores", lambda *a, **k: next(answers))
        assert ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output") == plans[kept]


def test_heldout_plan_scores_count_top1_disagreements_directly():
    from tensorscope.allocation import heldout_plan_scores, split_halves

    net, data, stats = _deep_tanh(4)
    plan = ts.plan_for_budget(net, 0.2, stats=stats, data=data, allocation="output")
    parts = split_halves(data)
    got = heldout_plan_scores(net, dict(net.named_modules()), stats, parts, plan.layers)
    small = ts.compress(net, plan, stats=stats.halves[0])
    with torch.no_grad():
        x = torch.cat(parts[1])
        want = float((small(x).argmax(-1) != net(x).argmax(-1)).double().mean())
    assert 0 < want < 1
    assert got.disagreement == pytest.approx(want, abs=1e-12)
    assert got.loss == pytest.approx(measured_damage(net, small, parts[1]), rel=1e6 * torch.finfo(torch.float64).eps)
    # not class scores: no disagreement
    enc = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    x = _tokens(40, 3, 8)
    st = collect_stats(enc, [x[:20], x[20:]], ["0", "2"], gradients=True, probes=4)
    p = ts.plan_for_budget(enc, 0.5, stats=st, data=[x[:20], x[20:]], allocation="output")
    assert heldout_plan_scores(enc, dict(enc.named_modules()), st, split_halves([x[:20], x[20:]]),
                               p.layers).disagreement is None


def test_heldout_plan_damage_equals_a_direct_computation():
    """The whole plan's damage: factors fitted on the first half, the compressed network built
    from them, output loss on the second half's data against the original."""
    from tensorscope.allocation import heldout_plan_damage, reference_outputs, split_halves

    net, data, stats = _deep_tanh(0)
    plan = ts.plan_for_budget(net, 0.4, stats=stats, data=data, allocation="output")
    assert len(plan.layers) >= 3
    parts = split_halves(data)
    modules = dict(net.named_modules())
    got = heldout_plan_damage(net, modules, stats, parts, plan.layers)
    a, _ = stats.halves
    small = ts.compress(net, plan, stats=a)
    direct = measured_damage(net, small, parts[1])
    assert direct > 0
    assert got == pytest.approx(direct, rel=1e6 * torch.finfo(torch.float64).eps)
    # refs given, a group (scored by its weights) and a dense option change nothing
    from tensorscope.budget import _Option

    more = {**plan.layers, ("group", "g"): plan.layers[next(iter(plan.layers))],
            "2": _Option(0.0, 0.0, None, None, 0, None)}
    dense2 = {n: o for n, o in plan.layers.items() if n != "2"}
    assert heldout_plan_damage(net, modules, stats, parts, more, reference_outputs(net, parts[1])) == pytest.approx(
        heldout_plan_damage(net, modules, stats, parts, dense2), rel=1e-12)
    with pytest.raises(ts.BudgetError, match="refs="):
        heldout_plan_damage(net, modules, stats, parts, plan.layers, refs=reference_outputs(net, parts[0][:0]))


def _inverted_residual(seed: int = 0) -> nn.Module:
    """1x1 expand, depthwise 3x3, 1x1 project, pooled classifier (EfficientNet's block), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(6, 24, 1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(),
                         nn.Conv2d(24, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).double().eval()


def test_dense_correction_solves_each_layers_ridge_regression():
    """``correct(dense=True)`` refits the layers the plan left dense after the first truncated
    one: each refitted weight is the ridge regression of the original layer's outputs on the
    compressed network's inputs (checked against a direct least-squares solve per group), the
    layers before it keep their weights, and no parameter is added."""
    net = _inverted_residual()
    x = torch.randn(32, 6, 6, 6, dtype=torch.float64)
    small = ts.compress(net, {"0": {"method": "svd", "rank": 2}})
    ridge = 1e-3
    fixed = correct(small, net, [x[:16], x[16:]], ridge=ridge, dense=True)
    assert ts.count_params(fixed) == ts.count_params(small)
    # the depthwise conv: per channel a regression over its 3x3 patch of the compressed input
    with torch.no_grad():
        h_hat, h = fixed[1](fixed[0](x)), net[1](net[0](x))
    unfold = lambda t: torch.nn.functional.unfold(t, 3, padding=1).reshape(32, 24, 9, 36)  # noqa: E731
    ph, p = unfold(h_hat), unfold(h)
    w = net[2].weight.detach().reshape(24, 9)
    for c in (0, 7, 23):
        a = ph[:, c].permute(0, 2, 1).reshape(-1, 9)
        b = p[:, c].permute(0, 2, 1).reshape(-1, 9)
        ch, cx = a.T @ a / a.shape[0], b.T @ a / a.shape[0]
        lam = ridge * torch.diagonal(ch).mean()
        want = torch.linalg.solve(ch + lam * torch.eye(9, dtype=ch.dtype), (w[c] @ (cx + lam * torch.eye(9, dtype=ch.dtype))))
        assert_close(fixed[2].weight.detach().reshape(24, 9)[c], want, rtol=1e-8, atol=1e-10)
    assert not torch.equal(fixed[6].weight, net[6].weight)  # the classifier too
    assert torch.equal(fixed[2].bias, net[2].bias)  # weights only
    # ridge=inf keeps every weight; dense=False leaves the dense layers alone
    kept = correct(small, net, [x], ridge=float("inf"), dense=True)
    alone = correct(small, net, [x], ridge=ridge)
    for m in (kept, alone):
        for i in (2, 4, 6):
            assert torch.equal(m[i].weight, net[i].weight)


def test_dense_correction_is_exact_where_nothing_changed_and_helps_where_it_did():
    net = _inverted_residual(1)
    x = torch.randn(48, 6, 6, 6, dtype=torch.float64)
    calib, held = [x[:24], x[24:40]], [x[40:]]
    with warnings.catch_warnings():  # more parameters than dense: the point here is exactness
        warnings.simplefilter("ignore")
        full = ts.compress(net, {"0": {"method": "svd", "rank": 6}})  # full rank: the same inputs everywhere
    same = correct(full, net, calib, dense=True)
    eps = torch.finfo(torch.float64).eps
    for i in (2, 4, 6):
        assert_close(same[i].weight, net[i].weight, rtol=1e3 * eps * 24, atol=1e3 * eps * 24)
    small = ts.compress(net, {"0": {"method": "svd", "rank": 2}, "4": {"method": "svd", "rank": 2}}, data=calib)
    loss = lambda m, d: float(sum(((m(b) - net(b)) ** 2).sum() for b in d))  # noqa: E731
    with torch.no_grad():
        chains = correct(small, net, calib)
        both = correct(small, net, calib, dense=True)
        assert loss(both, calib) < loss(chains, calib)
        assert loss(both, held) < loss(chains, held)
