"""Building factorized networks to train: ``ts.tensorize``, trainable TT/TR layers (Glorot
initialisation, sweep and rebuild modes) and random shuffling (RsTD) through plans, save,
load and export."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorscope as ts
from tensorscope.layers import FactorizedLayer
from tensorscope.methods import LayerGeometry, get_method
from tensorscope.permutation import permutation_checksum, seeded_permutation, splitmix64
from tensorscope.tr_layers import TRConv2d, TRLinear
from tensorscope.tt_layers import TTConv2d, TTLinear, glorot_core_std

pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 6 * 6, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


PLAN = {"conv": {"method": "tt", "rank": 3}, "fc1": {"method": "tr", "rank": 4, "mode": "rebuild"},
        "fc2": {"method": "svd", "rank": 5}}


def flops_of(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return fc.get_total_flops()


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- tensorize -----------------------------------------------------------------------------------


def test_tensorize_builds_compress_structure_with_fresh_weights():
    model = net()
    before = state(model)
    x = torch.randn(2, 4, 6, 6)
    fresh = ts.tensorize(model, PLAN, seed=3)
    small = ts.compress(model, PLAN)
    assert same(state(model), before)  # the input is untouched
    assert [type(m) for m in fresh.modules()] == [type(m) for m in small.modules()]
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert ts.plan_of(fresh) == ts.plan_of(small)
    cost = ts.plan_cost(model, PLAN, example_input=x[:1])
    assert cost["params_after"] == ts.count_params(fresh)
    assert cost["flops_after"] == ts.count_flops(fresh, x[:1])
    # fresh weights: nothing of the trained layers is copied, not even the bias
    for name in PLAN:
        built = fresh.get_submodule(name)
        assert isinstance(built, FactorizedLayer)
        assert all(float(p.detach().abs().sum()) > 0 for p in built.parameters())
    assert not torch.allclose(fresh.fc1[0].bias, model.fc1.bias)
    # seeded: the same seed gives the same weights, another seed others; torch's stream is untouched
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = ts.tensorize(model, PLAN, seed=3)
    assert torch.equal(torch.rand(3), expected_next)
    assert same(state(again), state(fresh))
    assert not same(state(ts.tensorize(model, PLAN, seed=4)), state(fresh))


@pytest.mark.parametrize("method, rank", [("cp", 3), ("tucker2", [3, 2]), ("tt", 0.5), ("tr", 0.5)])
def test_tensorize_every_method(method, rank):
    model = net()
    plan = {"conv": {"method": method, "rank": rank}}
    fresh = ts.tensorize(model, plan)
    small = ts.compress(model, plan)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in small.modules()]
    assert ts.count_params(fresh) == ts.plan_cost(model, plan)["params_after"] == ts.count_params(small)


def test_tensorize_factorize_is_compress():
    model = net()
    x = torch.randn(3, 4, 6, 6)
    a = ts.tensorize(model, PLAN, init="factorize")
    b = ts.compress(model, PLAN)
    assert same(state(a), state(b))
    torch.testing.assert_close(a(x), b(x))


def test_tensorized_models_train():
    model = net()
    fresh = ts.tensorize(model, PLAN)
    x, y = torch.randn(16, 4, 6, 6), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(fresh(x), y).backward()
    for name in ("conv", "fc1"):
        grads = [p.grad for n, p in fresh.get_submodule(name).named_parameters() if "core" in n]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("bad, match", [
    ({"fc1": {"method": "tt", "rank": 3, "shuffle": 1.5}}, r"layer 'fc1': shuffle must be an integer.*got 1\.5"),
    ({"fc1": {"method": "tt", "rank": 3, "shuffle": True}}, r"layer 'fc1': shuffle must be an integer"),
    ({"fc1": {"method": "tr", "rank": 3, "shuffle": -1}}, r"layer 'fc1': shuffle must be an integer in \[0, 4294967295\]"),
    ({"fc1": {"method": "tt", "rank": 3, "mode": "fast"}}, r"layer 'fc1': mode must be one of 'auto', 'sweep', 'rebuild'"),
    ({"fc1": {"method": "tt", "rank": 3, "shuffle": 2, "mode": "sweep"}}, r"layer 'fc1': tt: shuffle=2 cannot run in mode 'sweep'"),
    ({"fc1": {"method": "tr", "rank": [2, 3, 3, 1]}}, r"layer 'fc1'.*ends 2 and 1, which differ.*\[2, 3, 3, 2\]"),
    ({"fc1": {"method": "tt", "rank": 3, "batch": 0}}, r"layer 'fc1': batch must be an integer in \[1, "),
])
def test_bad_plans_fail_before_any_work(bad, match):
    model = net()
    before = state(model)
    for build in (ts.tensorize, ts.compress):
        with pytest.raises(ts.PlanError, match=match):
            build(model, bad)
    assert same(state(model), before)


def test_bad_tensorize_arguments():
    with pytest.raises(ts.PlanError, match="init must be 'random'"):
        ts.tensorize(net(), PLAN, init="zeros")
    with pytest.raises(ts.PlanError, match="seed must be an integer"):
        ts.tensorize(net(), PLAN, seed=1.5)


def test_factorized_layer_reset_parameters_resets_each_module():
    model = nn.Sequential(nn.Linear(20, 16))
    small = ts.compress(model, {"0": {"method": "svd", "rank": 4}})
    before = state(small)
    small[0].reset_parameters()
    after = state(small)
    assert all(not torch.equal(before[k], after[k]) for k in before)


# ---- initialisation and gradients ------------------------------------------------------------------


LAYERS = [
    ("tt-linear", lambda: TTLinear([4, 8, 4], [8, 4, 4], [1, 4, 6, 1]), (128, 128)),
    ("tr-linear", lambda: TRLinear([4, 8, 4], [8, 4, 4], [3, 4, 5, 3]), (128, 128)),
    ("tt-conv", lambda: TTConv2d([4, 4], [4, 8], [1, 5, 4, 1], 3, padding=1), (32 * 9, 16 * 9)),
    ("tr-conv", lambda: TRConv2d([4, 4], [4, 8], [2, 5, 4, 2], 3, padding=1), (32 * 9, 16 * 9)),
]


@pytest.mark.parametrize("name, make, fans", LAYERS, ids=[c[0] for c in LAYERS])
def test_fresh_layers_have_glorot_variance_and_gradients(name, make, fans):
    fan_out, fan_in = fans
    target = 2.0 / (fan_in + fan_out)
    variances = []
    torch.manual_seed(0)
    for _ in range(24):
        layer = make()
        variances.append(float(layer.dense_weight().detach().var()))
    assert np.mean(variances) == pytest.approx(target, rel=0.10)
    # non-zero gradients for every core, in both modes
    for mode in ("sweep", "rebuild"):
        layer.mode = mode
        layer.zero_grad()
        x = torch.randn(3, layer._weight_shape[1], 5, 5) if "conv" in name else torch.randn(3, 128)
        layer(x).square().sum().backward()
        assert all(float(c.grad.abs().sum()) > 0 for c in layer.cores())


def test_the_variance_formula():
    # P index paths of products of n cores: P * std**(2n) = 2 / (fan_in + fan_out)
    std = glorot_core_std(100, 300, (2, 3, 4, 2))
    assert 2 * 3 * 4 * std ** 6 == pytest.approx(2 / 400)
    assert glorot_core_std(10, 10, (1, 1)) == pytest.approx(math.sqrt(0.1))


# ---- modes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tt", "tr"])
@pytest.mark.parametrize("conv", [False, True])
def test_sweep_and_rebuild_agree_and_counts_follow_the_mode(method, conv):
    torch.manual_seed(1)
    layer = (nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(24, 20)).double()
    m = get_method(method)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) if conv else torch.randn(4, 3, 24, dtype=torch.float64)
    geom = LayerGeometry.of(layer, in_size=(5, 5)) if conv else LayerGeometry.of(layer, tokens=3)
    rank = m.resolve_rank(geom, 0.6)
    outs = {}
    for mode in ("sweep", "rebuild"):
        for batch in (1, 4):
            opts = {"mode": mode, "batch": batch}
            built = m.decompose(layer, rank, opts)
            assert built[0].mode == mode and built.options["mode"] == mode
            outs[mode] = built(x)
            # FLOPs per sample at `batch` samples per call, as ts.count_flops divides a batch's total
            assert m.count_flops(geom, rank, opts) == flops_of(built, x[:batch]) // batch
    torch.testing.assert_close(outs["sweep"], outs["rebuild"], rtol=1e-9, atol=1e-10)


def test_the_automatic_mode_follows_the_batch_and_survives_save_and_load(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256))
    geom = LayerGeometry.of(model[0])
    tt = get_method("tt")
    picks = {b: tt.resolve_mode(geom, 16, {"batch": b}) for b in (1, 4096)}
    assert picks == {1: "sweep", 4096: "rebuild"}
    plan = {"0": {"method": "tt", "rank": 16, "batch": 4096}}
    fresh = ts.tensorize(model, plan)
    assert fresh[0][0].mode == "rebuild" and fresh[0][0].batch == 4096
    ts.save(fresh, tmp_path / "m.pt")
    back = ts.load(tmp_path / "m.pt", model=model)
    assert back[0][0].mode == "rebuild" and back[0][0].batch == 4096
    x = torch.randn(3, 256)
    torch.testing.assert_close(back(x), fresh(x))


# ---- shuffling ---------------------------------------------------------------------------------------


def test_the_permutation_is_ours_and_fixed():
    # SplitMix64 (Steele et al. 2014) reference outputs for seed 0
    assert [int(v) for v in splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert seeded_permutation(0, 8).tolist() == [2, 4, 6, 5, 1, 7, 0, 3]
    assert seeded_permutation(1, 8).tolist() == [4, 3, 7, 0, 1, 5, 6, 2]
    p = seeded_permutation(7, 1000)
    assert sorted(p.tolist()) == list(range(1000))
    assert permutation_checksum(p) == permutation_checksum(torch.from_numpy(p))
    assert permutation_checksum(p).startswith("sha256:") and permutation_checksum(p) != permutation_checksum(p[::-1])


SHUFFLED = {"conv": {"method": "tr", "rank": 3, "shuffle": 11}, "fc1": {"method": "tt", "rank": 4, "shuffle": 7},
            "fc2": {"method": "svd", "rank": 5}}


def test_shuffled_layers_apply_their_permutation():
    fresh = ts.tensorize(net(), SHUFFLED)
    layer = fresh.fc1[0]
    assert layer.mode == "rebuild" and layer.shuffle == 7
    assert "perm" not in layer.state_dict()  # a non-persistent buffer: the plan holds the seed
    plain = TTLinear(layer.in_shape, layer.out_shape, layer.ranks)
    plain.load_state_dict(layer.state_dict())
    perm = torch.from_numpy(seeded_permutation(7, layer.in_features * layer.out_features))
    torch.testing.assert_close(layer.dense_weight(), plain.dense_weight().reshape(-1)[perm].reshape(48, 288))
    x = torch.randn(2, 288)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias)


def test_compress_refuses_shuffle_and_points_to_tensorize():
    model = net()
    for build in (ts.compress, lambda m, p: ts.tensorize(m, p, init="factorize")):
        with pytest.raises(ts.PlanError) as e:
            build(model, SHUFFLED)
        msg = str(e.value)
        assert "layer 'conv'" in msg and "shuffle=11" in msg and "tensorize" in msg and "init='random'" in msg
    with pytest.raises(ts.PlanError, match="shuffle"):
        get_method("tt").factorize(model.fc1, 4, {"shuffle": 7})


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*is deprecated:DeprecationWarning")
def test_shuffled_layers_save_load_and_export_identically(tmp_path):
    model = net()
    fresh = ts.tensorize(model, SHUFFLED, seed=2).eval()
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        y = fresh(x)
    ts.save(fresh, tmp_path / "s.pt")
    record = ts.describe(tmp_path / "s.pt")
    assert set(record["checksums"]) == {"conv.0", "fc1.0"}
    assert record["checksums"]["fc1.0"].startswith("shuffle 7: sha256:")
    back = ts.load(tmp_path / "s.pt", model=model)
    torch.testing.assert_close(back(x), y, rtol=0, atol=0)
    for fmt in ("exported_program", "torchscript"):
        path = ts.export(fresh, tmp_path / f"s.{fmt}", example_input=x, format=fmt)
        loaded = torch.export.load(path).module() if fmt == "exported_program" else torch.jit.load(path)
        torch.testing.assert_close(loaded(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x[:1]), y[:1], rtol=1e-5, atol=1e-5)


def _rewrite_record(path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    record = json.loads(meta["tensorscope"])
    change(record)
    meta["tensorscope"] = json.dumps(record)
    save_file(tensors, str(path), metadata=meta)


def test_load_refuses_a_permutation_that_changed(tmp_path, monkeypatch):
    model = net()
    fresh = ts.tensorize(model, SHUFFLED)
    ts.save(fresh, tmp_path / "s.pt")
    # a plan edited by hand: another seed, another permutation
    _rewrite_record(tmp_path / "s.pt", lambda r: r["plan"]["layers"]["fc1"].update(shuffle=8))
    with pytest.raises(ts.CheckpointError, match=r"module 'fc1.0' was saved with 'shuffle 7: sha256:.*shuffle 8"):
        ts.load(tmp_path / "s.pt", model=model)
    # the same seed, but a permutation generated differently (another tensorscope)
    ts.save(fresh, tmp_path / "s.pt")
    import tensorscope.tt_layers as tt_layers

    monkeypatch.setattr(tt_layers, "seeded_permutation", lambda seed, n: np.arange(n)[::-1].copy())
    with pytest.raises(ts.CheckpointError, match="would compute another function"):
        ts.load(tmp_path / "s.pt", model=model)
    monkeypatch.undo()
    # a record whose checksums are missing is refused too
    _rewrite_record(tmp_path / "s.pt", lambda r: r.pop("checksums"))
    with pytest.raises(ts.CheckpointError, match="no checksum"):
        ts.load(tmp_path / "s.pt", model=model)


def test_checkpoints_without_shuffle_record_no_checksums(tmp_path):
    small = ts.compress(net(), PLAN)
    ts.save(small, tmp_path / "c.pt")
    assert ts.describe(tmp_path / "c.pt")["checksums"] == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.load(tmp_path / "c.pt", model=net())
