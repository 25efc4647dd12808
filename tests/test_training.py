"""Training for compression (issue 18, parts 0-2): ``ts.train``, ``History``, ``ts.plan_by_rule``,
``ts.lowrank_train`` (Alvarez and Salzmann 2017) and MUSCO's options of ``ts.iterative``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tensorscope as ts
from tensorscope.cli import EXIT_BAD_INPUT, main
from tensorscope.errors import BudgetError, DataError, PlanError
from tensorscope.lowrank import layer_taus, proximal_step, shrink_singular_values, weight_spectrum
from tensorscope.methods import get_method
from tensorscope.recovery import densify
from tensorscope.rules import rule_pick, weakened_schedule
from tensorscope.spectra import layer_spectrum
from tensorscope.train import NonFiniteLossWarning


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small networks: one intra-op thread is faster, and much faster on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """A small CNN on the 8x8 digits, trained for a few seconds."""
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    x = xtr.reshape(-1, 1, 8, 8)
    for _ in range(60):
        loss = nn.functional.cross_entropy(net(x), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = [(x[i:i + 200], ytr[i:i + 200]) for i in range(0, 1400, 200)]
    return net.eval(), data, [(xte.reshape(-1, 1, 8, 8), yte)]


# ---- ts.train ------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 1e-2)])
def test_train_reduces_the_loss_and_leaves_the_input_alone(digits, optimizer, lr):
    xtr, ytr, xte, yte = digits
    model = _mlp()
    before = _state(model)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=100, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trained, history = ts.train(model, loader, epochs=3, optimizer=optimizer, lr=lr, val_data=[(xte, yte)])
    assert _same(before, _state(model))
    assert [r.epoch for r in history] == [0, 1, 2, 3] and history[0].loss is None
    assert history[-1].loss < history[1].loss
    assert history[-1].val["objective"] < 0.5 * history[0].val["objective"]
    assert history[-1].val["accuracy"] > 0.8
    assert not trained.training
    frame = history.to_frame()
    assert list(frame["epoch"]) == [0, 1, 2, 3] and "val.accuracy" in frame and "val.objective" in frame


def test_train_calls_its_hooks_and_adds_the_extra_loss(digits):
    xtr, ytr, _, _ = digits
    data = [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, 1400, 200)]  # 7 batches
    steps, extras, epochs = [], [], []

    def extra(model):
        extras.append(1)
        return 0.01 * model[0].weight.pow(2).sum()

    _, history = ts.train(_mlp(), data, epochs=2, lr=0.05, extra_loss=extra,
                          step_hook=lambda m, s: steps.append((s, torch.is_grad_enabled())),
                          epoch_hook=lambda m, e: epochs.append(e) or {"probe": e * 10})
    assert [s for s, _ in steps] == list(range(1, 15)) and not any(g for _, g in steps)
    assert len(extras) == 14 and epochs == [0, 1, 2]
    assert history[1].extra > 0 and history[1].loss > history[1].extra
    assert list(history.to_frame()["probe"]) == [0, 10, 20]


def test_a_non_finite_loss_stops_with_a_warning_at_the_best_state(digits):
    xtr, ytr, xte, yte = digits
    data = [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, 1400, 200)]
    states = {}

    def extra(model):  # NaN from step 10 on (in the second epoch)
        extra.calls += 1
        return torch.tensor(float("nan")) if extra.calls >= 10 else torch.tensor(0.0)

    extra.calls = 0

    def keep(model, epoch):
        states[epoch] = _state(model)

    with pytest.warns(NonFiniteLossWarning, match="step 10"):
        trained, history = ts.train(_mlp(), data, epochs=3, lr=0.05, val_data=[(xte, yte)], extra_loss=extra,
                                    epoch_hook=keep)
    assert history.stopped and "non-finite" in history.stopped
    assert [r.epoch for r in history] == [0, 1]
    best = min((0, 1), key=lambda e: history[e].val["objective"])
    assert _same(_state(trained), states[best])
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_batchnorm_trains(digits):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    trained, _ = ts.train(model, [(xtr, ytr)], epochs=2, lr=0.1)
    bn, bn0 = trained[1], model[1]
    assert not torch.allclose(bn.running_mean, bn0.running_mean)
    assert not torch.allclose(bn.weight, bn0.weight)
    assert int(bn.num_batches_tracked) == 2 and int(bn0.num_batches_tracked) == 0


def test_train_bad_input_fails_before_training(digits):
    xtr, ytr, _, _ = digits
    model = _mlp()
    with pytest.raises(DataError, match="labels.*teacher"):
        ts.train(model, [xtr], epochs=1)
    with pytest.raises(ValueError, match="optimizer"):
        ts.train(model, [(xtr, ytr)], optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr.*-1"):
        ts.train(model, [(xtr, ytr)], lr=-1.0)
    with pytest.raises(DataError):
        ts.train(model, [], epochs=1)
    # a teacher instead of labels: distillation
    trained, history = ts.train(model, (x for x in [xtr[:700], xtr[700:]]), teacher=model, epochs=2, lr=0.05)
    assert len(history) == 3 and history[-1].loss < 1e-2


# ---- plan_by_rule --------------------------------------------------------------------------------


def test_plan_by_rule_energy_vbmf_and_weakened(trained_cnn):
    model = trained_cnn[0]
    plan = ts.plan_by_rule(model, "energy", keep=0.9, methods=("tucker2", "svd"), min_rank=1)
    conv, lin = model[2], model[6]
    assert plan["2"].method == "tucker2" and plan["6"].method == "svd"
    r_out = layer_spectrum(conv, "2", "out").rank_for_energy(0.9)
    r_in = layer_spectrum(conv, "2", "in").rank_for_energy(0.9)
    assert tuple(plan["2"].rank) == (r_out, r_in)
    assert plan["6"].rank == layer_spectrum(lin, "6", "out").rank_for_energy(0.9)
    # VBMF of a full-rank layer is the ordinary EVBMF rank (at least min_rank)
    vb = ts.plan_by_rule(model, "vbmf", methods="svd", min_rank=2, layers=["2"])
    assert vb["2"].rank == max(ts.vbmf_rank(layer_spectrum(conv, "2")), 2)
    # weakened: max(R - w (R - R_vbmf), min_rank), R = the full rank
    for w in (0.3, 0.8):
        wk = ts.plan_by_rule(model, "weakened_vbmf", weakening=w, methods="svd", min_rank=3, layers=["2"])
        full = layer_spectrum(conv, "2").max_rank
        assert wk["2"].rank == ts.weakened_rank(full, ts.vbmf_rank(layer_spectrum(conv, "2")), w, 3)
    # "auto" is the planner's menu, in its order: svd (the first) takes every layer here
    auto = ts.plan_by_rule(model, "energy", keep=0.9)
    assert all(e.method == get_method("svd").name for _, e in auto.items())


def test_vbmf_rule_recovers_the_rank_of_low_rank_plus_noise():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 10, generator=g, dtype=torch.float64), torch.randn(10, 576, generator=g, dtype=torch.float64)
    y = u @ v / 3 + 0.1 * torch.randn(64, 576, generator=g, dtype=torch.float64)
    lin = nn.Linear(576, 64)
    with torch.no_grad():
        lin.weight.copy_(y.float())
    tall = nn.Linear(64, 576)
    with torch.no_grad():
        tall.weight.copy_(y.t().float())
    for layer in (lin, tall):
        assert rule_pick(layer, "vbmf", min_rank=1)("out") == 10 == ts.vbmf_rank(layer_spectrum(layer))
    model = nn.Sequential(lin)
    assert ts.plan_by_rule(model, "vbmf", methods="svd", min_rank=1)["0"].rank == 10
    # rebuilt at rank 30 (as a stage leaves it), the weakened rule starts from R = 30
    small = ts.compress(model, {"0": {"method": "svd", "rank": 30}})
    rebuilt = densify(small, model)
    pick = rule_pick(rebuilt[0], "weakened_vbmf", weakening=0.5, min_rank=1)
    assert pick("out") == ts.weakened_rank(30, 10, 0.5, 1) == 20


def test_plan_by_rule_leaves_layers_that_would_grow_dense_and_checks_its_input(trained_cnn):
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 300))
    plan = ts.plan_by_rule(model, "energy", keep=1.0, methods="svd")
    assert "0" not in plan  # rank 10 of a 10 x 10 layer: svd would be larger
    named = nn.Sequential()
    named.add_module("classifier", nn.Linear(4, 4))
    with pytest.raises(PlanError, match="did you mean 'classifier'"):
        ts.plan_by_rule(named, layers=["classifer"])
    with pytest.raises(PlanError, match="cannot be decomposed"):
        ts.plan_by_rule(trained_cnn[0], layers=["1"])  # a ReLU
    with pytest.raises(ValueError, match="weakening.*1.5"):
        ts.plan_by_rule(model, "weakened_vbmf", weakening=1.5)
    with pytest.raises(ValueError, match="keep.*0"):
        ts.plan_by_rule(model, "energy", keep=0)
    with pytest.raises(PlanError, match="rule"):
        ts.plan_by_rule(model, "magic")


def test_the_budget_planner_says_cp_and_tt_have_no_cheap_error_curve(trained_cnn):
    for method in ("cp", "tt"):
        with pytest.raises(BudgetError, match=f"{method}.*no cheap error curve"):
            ts.plan_for_budget(trained_cnn[0], 0.5, methods=[method])


# ---- the weakened schedule -----------------------------------------------------------------------


def test_weakened_schedule_matches_the_formula():
    # a VBMF rank of about 39% of the current rank, w = 0.8: the example
    assert weakened_schedule(256, lambda r: round(0.394 * r), 4, 0.8) == [256, 132, 68, 35, 18]
    rng = np.random.default_rng(0)
    for _ in range(50):
        r0, w, floor = int(rng.integers(8, 600)), float(rng.uniform(0, 1)), int(rng.integers(1, 12))
        frac = float(rng.uniform(0, 1))
        got = weakened_schedule(r0, lambda r: int(frac * r), 5, w, floor)
        for a, b in zip(got, got[1:]):
            assert b == min(a, max(int(round(a - w * (a - int(frac * a)))), min(floor, a)))
    with pytest.raises(ValueError, match="weakening.*-0.1"):
        weakened_schedule(64, 10, 2, -0.1)


# ---- lowrank_train -------------------------------------------------------------------------------


def test_the_proximal_step_is_a_singular_value_shrink():
    g = torch.Generator().manual_seed(0)
    for layer in (nn.Linear(40, 24).double(), nn.Conv2d(8, 12, 3, groups=2).double(), nn.Linear(7, 30).double()):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
        w0 = layer.weight.detach().clone()
        groups = getattr(layer, "groups", 1)
        mats = w0.reshape(groups, w0.shape[0] // groups, -1)
        t = 0.7 * float(torch.linalg.svdvals(mats).median())
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
        want = (u * (s - t).clamp_min(0).unsqueeze(-2)) @ vh
        proximal_step(layer, t)
        torch.testing.assert_close(layer.weight.detach(), want.reshape(w0.shape), rtol=0, atol=1e-10)
        assert int((s > t).sum()) < s.numel()  # some values did reach zero
        w1 = layer.weight.detach().clone()
        proximal_step(layer, 0.0)
        assert torch.equal(layer.weight.detach(), w1)  # tau = 0: the identity, bit for bit
    torch.testing.assert_close(shrink_singular_values(mats, 0.0), mats, rtol=0, atol=1e-10)


def test_layer_taus_follow_the_square_root_rule():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 64))  # 256 and 1024 weights
    taus = layer_taus(model, ["0", "1"], 0.1)
    mean = (256 + 1024) / 2
    assert taus == pytest.approx({"0": 0.1 * math.sqrt(256 / mean), "1": 0.1 * math.sqrt(1024 / mean)})
    assert taus["1"] == pytest.approx(2 * taus["0"])


def test_lowrank_training_lowers_the_energy_ranks(digits):
    xtr, ytr, xte, yte = digits
    model = _mlp()
    before = _state(model)
    final = {}
    for tau in (0.0, 0.1):
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        trained, history = ts.lowrank_train(model, loader, tau=tau, epochs=6, lr=0.1, layers=["0", "2"],
                                            val_data=[(xte, yte)])
        final[tau] = history[-1].info["energy_rank"]
        assert set(history.meta["tau_l"]) == {"0", "2"}
        frame = history.to_frame()
        assert {"energy_rank.0", "energy_rank.2", "rank.0", "rank.2"} <= set(frame.columns)
        assert history[-1].val["accuracy"] > 0.8
        # what the history records is the spectrum plan_by_rule reads
        assert final[tau]["2"] == layer_spectrum(trained[2], "2").rank_for_energy(0.99)
        np.testing.assert_allclose(weight_spectrum(trained[2]).values, layer_spectrum(trained[2]).values,
                                   rtol=1e-5, atol=1e-6)
    assert _same(before, _state(model))
    for name in ("0", "2"):
        assert final[0.1][name] < 0.5 * final[0.0][name]
    # then truncate: the energy rule at 99% makes the regularised layers far smaller
    plan = ts.plan_by_rule(trained, "energy", keep=0.99, methods="svd", layers=["0", "2"])
    small = ts.compress(trained, plan)
    dense = sum(p.numel() for n in ("0", "2") for p in model.get_submodule(n).parameters())
    assert sum(p.numel() for n in ("0", "2") for p in small.get_submodule(n).parameters()) < dense / 4
    assert ts.evaluate(small, [(xte, yte)])["accuracy"] > 0.8


def test_lowrank_train_refuses_bad_input_before_training(digits):
    xtr, ytr, _, _ = digits
    model = _mlp()
    before = _state(model)
    for tau in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"tau.*{tau}"):
            ts.lowrank_train(model, [(xtr, ytr)], tau=tau)
    with pytest.raises(ValueError, match="SGD.*adam|adam.*SGD"):
        ts.lowrank_train(model, [(xtr, ytr)], tau=0.1, optimizer="adam")
    with pytest.raises(PlanError, match="'22'.*did you mean '2'"):
        ts.lowrank_train(model, [(xtr, ytr)], tau=0.1, layers=["22"])
    with pytest.raises(PlanError, match="'3' cannot be decomposed"):
        ts.lowrank_train(model, [(xtr, ytr)], tau=0.1, layers=["3"])
    with pytest.raises(DataError, match="labels"):
        ts.lowrank_train(model, [xtr], tau=0.1)
    assert _same(before, _state(model))


# ---- recompressing a Tucker-2 core ---------------------------------------------------------------


def test_the_core_merge_is_exact_at_full_rank_and_loads_into_the_tucker2_skeleton():
    torch.manual_seed(0)
    tucker2 = get_method("tucker2")
    for groups in (1, 2):
        conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups).double()
        chain = tucker2.decompose(conv, (4, 3))
        with torch.no_grad():  # as fine-tuning leaves them: factors no longer orthonormal
            for p in chain.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
        same = tucker2.recompress(conv, chain, (4, 3))
        torch.testing.assert_close(same(x), chain(x), rtol=0, atol=1e-10)
        smaller = tucker2.recompress(conv, chain, (2, 2))
        skeleton = tucker2.skeleton(conv, (2, 2))
        skeleton.load_state_dict(smaller.state_dict(), strict=True)
        assert smaller.rank == (2, 2) and smaller.method == tucker2.name
        with pytest.raises(ts.RankError, match="lowers ranks only"):
            tucker2.recompress(conv, chain, (5, 3))
    assert get_method("svd").recompress(nn.Linear(4, 4), nn.Sequential(), 2) is None
    assert not get_method("svd").core_recompression and tucker2.core_recompression


# ---- iterative: MUSCO's options ------------------------------------------------------------------


def test_weakened_stages_follow_plan_by_rule(trained_cnn):
    model, data, val = trained_cnn
    convs = ["0", "2"]
    small, history = ts.iterative(model, data, steps=3, finetune_steps=0, rank_rule="weakened_vbmf",
                                  methods="tucker2", layers=convs, min_rank=2, data_aware=False, val_data=val)
    # the same stages by hand: the rule on the rebuilt weights, a new decomposition each time
    current, compressed = model, None
    for stage in history:
        plan = ts.plan_by_rule(current, "weakened_vbmf", methods="tucker2", min_rank=2, layers=convs)
        assert {n: tuple(e.rank) for n, e in plan.items()} == {n: tuple(r) for n, r in stage.ranks.items()}
        compressed = ts.compress(current, plan)
        current = densify(compressed, model)
    assert history[0].ranks["2"][0] > history[-1].ranks["2"][0]
    assert all(isinstance(s.flops, int) and s.flops > 0 for s in history) and history.meta["flops"] > 0
    frame = history.to_frame()
    assert list(frame["stage"]) == [1, 2, 3] and "after.accuracy" in frame and "ranks.2" in frame


def test_core_recompression_gives_a_plain_tucker2_model(trained_cnn, tmp_path):
    model, data, val = trained_cnn
    before = _state(model)
    small, history = ts.iterative(model, data, steps=2, finetune_steps=5, rank_rule="weakened_vbmf",
                                  methods=("tucker2", "svd"), layers=["0", "2"], min_rank=2,
                                  recompress="core", val_data=val)
    assert _same(before, _state(model))
    plan = ts.plan_of(small)
    assert set(plan.layers) == {"0", "2"} and all(e.method == "tucker2" for _, e in plan.items())
    assert history[-1].changed and tuple(plan["2"].rank) == tuple(history[-1].ranks["2"])
    ts.save(small, tmp_path / "small.pt")
    again = ts.load(tmp_path / "small.pt", model=copy.deepcopy(model))
    x = val[0][0][:16]
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
    # a layer whose method cannot recompress its core: refused before any work
    with pytest.raises(PlanError, match="'6'.*svd"):
        ts.iterative(model, data, steps=2, rank_rule="weakened_vbmf", methods=("tucker2", "svd"),
                     recompress="core")


def test_layers_per_stage_and_max_drop(trained_cnn):
    model, data, val = trained_cnn
    _, history = ts.iterative(model, data, steps=3, finetune_steps=0, rank_rule="weakened_vbmf",
                              methods="tucker2", layers=["0", "2"], min_rank=1, layers_per_stage=1,
                              data_aware=False, val_data=val)
    changed = [s.changed for s in history]
    assert changed[:2] == [["0"], ["2"]] and changed[2:] in ([], [["0"]])  # stage 3: layer "0" again, if it can go lower
    assert "2" not in history[0].ranks and "0" in history[1].ranks
    with pytest.warns(UserWarning, match="max_drop"):
        small, stopped = ts.iterative(model, data, steps=3, finetune_steps=0, rank_rule="weakened_vbmf",
                                      weakening=1.0, min_rank=1, methods="tucker2", layers=["2"],
                                      max_drop=0.0, data_aware=False, val_data=val)
    assert len(stopped) == 1 and "max_drop" in stopped.stopped


def test_iterative_bad_input_fails_before_any_work(trained_cnn):
    model, data, _ = trained_cnn
    before = _state(model)
    with pytest.raises(ValueError, match="weakening.*1.2"):
        ts.iterative(model, data, rank_rule="weakened_vbmf", weakening=1.2)
    with pytest.raises(ValueError, match="keep"):
        ts.iterative(model, data)
    with pytest.raises(ValueError, match="layers_per_stage"):
        ts.iterative(model, data, keep=0.5, layers_per_stage=1)
    with pytest.raises(ValueError, match="rank_rule"):
        ts.iterative(model, data, rank_rule="vbmf")
    with pytest.raises(ValueError, match="recompress"):
        ts.iterative(model, data, keep=0.5, recompress="cores")
    with pytest.raises(PlanError, match="did you mean"):
        ts.iterative(model, data, keep=0.5, layers=["22"])
    assert _same(before, _state(model))


# ---- the command line ----------------------------------------------------------------------------


def test_cli_train_and_iterative_refuse_bad_input(capsys):
    for argv in (["train", "lenet5", "--tau", "-1"], ["train", "lenet5", "--tau", "nan"],
                 ["compress", "lenet5", "--iterative", "2", "-o", "x.pt"],
                 ["compress", "lenet5", "--iterative", "2", "--rank-rule", "weakened_vbmf", "--weakening", "2",
                  "-o", "x.pt"]):
        assert main(argv + ["-q"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err


def test_cli_train_on_a_users_network(capsys, tmp_path, digits):
    import archs

    xtr, ytr, xte, yte = digits
    torch.save(archs.make_mlp(64, 48, 10).state_dict(), tmp_path / "w.pt")
    torch.save({"inputs": xtr, "labels": ytr}, tmp_path / "train.pt")
    torch.save({"inputs": xte, "labels": yte}, tmp_path / "test.pt")
    argv = ["train", str(tmp_path / "w.pt"), "--arch", "archs:make_mlp", "--arch-kwargs",
            '{"d_in": 64, "hidden": 48, "d_out": 10}', "--data", str(tmp_path / "train.pt"), "--eval",
            str(tmp_path / "test.pt"), "--tau", "0.1", "--epochs", "3", "--lr", "0.05", "--layers", "fc1",
            "-o", str(tmp_path / "small.pt"), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "fc1 rank@0.99" in out and "accuracy trained" in out
    assert ts.plan_of(ts.load(tmp_path / "small.pt")) is not None
