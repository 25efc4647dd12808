"""Predicted FLOPs (``Method.count_flops`` on the geometry ``inspect`` measures, ``plan_cost``)
equal ``ts.count_flops`` of the built model: every registered method, every form it runs in
(``execute``, ``mode``, ``shuffle``), Linear and Conv2d/Conv1d geometries, batch 1 and > 1.

The counts are exact integers (``FlopCounterMode``: 2 per multiply-add of ``mm``/``conv``),
so the assertions are equalities. Work a module does once per call (forming a weight from
its factors) is shared by the call's samples: the prediction takes the example's batch from
the geometry (``LayerGeometry.batch``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tensorscope as ts
from tensorscope.methods import LayerGeometry, available_methods, get_method
from tensorscope.methods.base import per_sample_flops

pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")

# (name, layer, input shape of one sample): Linear with and without tokens, Conv2d 1x1 / 3x3 /
# stride 2 / dilation / groups / non-square kernel / padding="same", odd spatial sizes, a Conv1d
GEOMETRIES = {
    "linear": (lambda: nn.Linear(48, 40), (48,)),
    "linear-tokens": (lambda: nn.Linear(24, 36, bias=False), (5, 24)),
    "conv1x1": (lambda: nn.Conv2d(16, 24, 1), (16, 5, 7)),
    "conv3x3-pad": (lambda: nn.Conv2d(12, 16, 3, padding=1), (12, 9, 7)),
    "conv3x3-stride2": (lambda: nn.Conv2d(12, 16, 3, stride=2, padding=1), (12, 9, 9)),
    "conv3x3-dilated": (lambda: nn.Conv2d(8, 12, 3, padding=2, dilation=2, bias=False), (8, 11, 10)),
    "conv-grouped": (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=4), (16, 7, 7)),
    "conv3x1-strided": (lambda: nn.Conv2d(8, 12, (3, 1), stride=(2, 1), padding=(1, 0)), (8, 10, 5)),
    "conv-same": (lambda: nn.Conv2d(8, 8, 3, padding="same"), (8, 6, 5)),
    "conv1d": (lambda: nn.Conv1d(8, 12, 5, stride=2, padding=2), (8, 31)),
}


def variants(method) -> list[dict]:
    """Every form the method's chain runs in: plain, each ``execute`` form, each TT/TR ``mode``
    and a shuffled layer (built by ``tensorize``)."""
    specs = method.option_specs
    out = [{}]
    if "execute" in specs:
        out += [{"execute": e} for e in specs["execute"].choices if e != "chain"]
    if "mode" in specs:
        out += [{"mode": m} for m in specs["mode"].choices if m != "auto"]
    if "shuffle" in specs:
        out.append({"shuffle": 3})
    if "iters" in specs:  # the count does not depend on convergence
        out = [{**o, "iters": 3} for o in out]
    return out


CASES = [(m, g, o) for m in available_methods() for g in GEOMETRIES for o in variants(get_method(m))]


def _build(model: nn.Module, plan: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "shuffle" in plan["0"]:  # a shuffled entry is for training from scratch: compress refuses it
            return ts.tensorize(model, plan, init="random")
        return ts.compress(model, plan)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method, geometry, options", CASES,
                         ids=[f"{m}-{g}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}" for m, g, o in CASES])
def test_predicted_flops_equal_the_built_layers(method, geometry, options, batch):
    torch.manual_seed(0)
    make, shape = GEOMETRIES[geometry]
    model = nn.Sequential(make())
    x = torch.randn(batch, *shape)
    m = get_method(method)
    geom = ts.inspect(model, x).by_name()["0"].geometry
    assert geom.batch == batch
    if m.unsupported_reason(geom):  # a conv-only method on a Linear, or TT/TR on a grouped conv
        assert geom.kind not in m.kinds or geom.groups > 1, m.unsupported_reason(geom)
        return
    if "execute" in options and geom.groups > 1:  # the folded and dense forms are for ungrouped layers
        return
    plan = {"0": {"method": method, "rank": 0.5, **options}}
    cost = ts.plan_cost(model, plan, x)
    small = _build(model, plan)
    counted = ts.count_flops(small, x)
    rank = m.resolve_rank(geom, cost["layers"]["0"]["rank"], options)
    assert m.count_flops(geom, rank, options) == counted
    assert cost["layers"]["0"]["flops"] == counted == cost["flops_after"]
    assert small(x).shape == model(x).shape


# ---- by hand -----------------------------------------------------------------------------


def test_tt_conv_counted_by_hand():
    """Conv2d(4 -> 6, 3x3, padding 1) on 5x5, one channel core (in_shape [4], out_shape [6]),
    bonds (1, 3, 1): 25 output positions, kernel 9, C = 4, O = 6, r = 3.

    sweep, per sample: the spatial conv of every input channel to r maps, 2*C*r*9*25 = 5400,
    then the channel core as one mm of 25 rows, (r*C) in, O out: 2*25*12*6 = 3600; 9000 at
    every batch size.
    rebuild: forming the kernel is one mm (O*C, r) x (r, 9): 2*24*3*9 = 1296 per call; the
    dense conv 2*O*C*9*25 = 10800 per sample. Per sample at batch B: (1296 + B*10800) // B:
    12096 at 1, 11232 at 3, 11059 at 5 (55296 / 5 = 11059.2, rounded down as count_flops does).
    The prediction used to leave out the batch: 12096 at every batch (the defect).
    """
    tt = get_method("tt")
    layer = nn.Conv2d(4, 6, 3, padding=1)
    rank = (1, 3, 1)
    hand = {"sweep": {1: 9000, 3: 9000, 5: 9000}, "rebuild": {1: 12096, 3: 11232, 5: 11059}}
    for mode, by_batch in hand.items():
        opts = {"in_shape": [4], "out_shape": [6], "mode": mode}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = tt.build(layer, tt.factorize(layer, rank, opts))
        for batch, flops in by_batch.items():
            x = torch.randn(batch, 4, 5, 5)
            assert ts.count_flops(built, x) == flops
            assert tt.count_flops(LayerGeometry.of(layer, in_size=(5, 5), batch=batch), rank, opts) == flops
        # without an example the geometry has no batch: the entry's own "batch" option says it
        geom = LayerGeometry.of(layer, in_size=(5, 5))
        assert tt.count_flops(geom, rank, {**opts, "batch": 3}) == by_batch[3]


def test_svd_dense_and_tucker2_folds_counted_by_hand():
    """Conv2d(6 -> 8, 3x3) on 6x5 (no padding: 4x3 = 12 output positions, 30 input), C = 6,
    O = 8, k = 9; at batch 2.

    svd rank 2, dense: the product (8, 2) x (2, 54) once per call, 2*8*2*54 = 1728; the dense
    conv 2*12*8*6*9 = 10368 per sample: (1728 + 2*10368) // 2 = 11232.
    tucker2 [r_out, r_in] = [3, 2]: first 1x1 2*30*2*6 = 720, core 2*12*3*2*9 = 1296, last 1x1
    2*12*8*3 = 576 per sample (chain: 2592). fold_in: kernel (3, 2, 9) x (2, 6) = 2*3*2*9*6 = 648
    per call, the 3x3 conv 6 -> 3 2*12*3*6*9 = 3888 plus the last 1x1: (648 + 2*4464) // 2 = 4788.
    fold_out: (8, 3) x (3, 18) = 864 per call, the first 1x1 plus the 3x3 conv 2 -> 8,
    720 + 2*12*8*2*9 = 4176: (864 + 2*4176) // 2 = 4608. dense: 864 + (8*9, 2) x (2, 6) =
    864 + 1728 = 2592 per call, then the dense conv: (2592 + 2*10368) // 2 = 11664.
    """
    layer = nn.Sequential(nn.Conv2d(6, 8, 3))
    x = torch.randn(2, 6, 6, 5)
    hand = [("svd", 2, {}, 2 * 12 * 2 * (54 + 8)), ("svd", 2, {"execute": "dense"}, 11232),
            ("tucker2", [3, 2], {}, 2592), ("tucker2", [3, 2], {"execute": "fold_in"}, 4788),
            ("tucker2", [3, 2], {"execute": "fold_out"}, 4608), ("tucker2", [3, 2], {"execute": "dense"}, 11664)]
    geom = ts.inspect(layer, x).by_name()["0"].geometry
    for method, rank, opts, flops in hand:
        small = ts.compress(layer, {"0": {"method": method, "rank": rank, **opts}})
        assert ts.count_flops(small, x) == flops, (method, opts)
        m = get_method(method)
        assert m.count_flops(geom, m.resolve_rank(geom, rank), opts) == flops, (method, opts)


# ---- groups and whole models -------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, bias=False),
                                    nn.Conv2d(6, 6, 3, stride=2, padding=1)])

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return x


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_joint_tucker_group_mixes_each_core_once_per_call(batch):
    torch.manual_seed(1)
    model = Stack()
    x = torch.randn(batch, 6, 9, 7)
    plan = {"tensorscope_plan": 2, "layers": {},
            "groups": {"g": {"method": "joint_tucker", "layers": ["convs.0", "convs.1", "convs.2"], "rank": [2, 3, 4]}}}
    cost = ts.plan_cost(model, plan, x)
    assert cost["flops_after"] == cost["groups"]["g"]["flops"] == ts.count_flops(ts.compress(model, plan), x)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_model_of_rebuilding_layers_rounds_once(batch):
    """Two TT layers that rebuild: each layer's prediction is rounded down on its own, the
    model's count once, so the sum may be below it by at most one FLOP per extra such layer."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    x = torch.randn(batch, 4, 5, 5)
    plan = {n: {"method": "tt", "rank": 0.5, "mode": "rebuild"} for n in ("0", "2")}
    cost = ts.plan_cost(model, plan, x)
    small = ts.compress(model, plan)
    counted = ts.count_flops(small, x)
    assert 0 <= counted - cost["flops_after"] <= 1
    inputs = {"0": x, "2": torch.relu(model[0](x))}
    for n in ("0", "2"):  # each layer on its own is exact
        assert cost["layers"][n]["flops"] == ts.count_flops(getattr(small, n), inputs[n])
    if batch == 1:
        assert counted == cost["flops_after"]


def test_per_sample_flops_rounds_down_at_the_geometrys_batch():
    layer = nn.Linear(4, 3)
    assert per_sample_flops(LayerGeometry.of(layer, batch=4), 10, 7) == (10 + 4 * 7) // 4 == 9
    assert per_sample_flops(LayerGeometry.of(layer), 10, 7) == 17  # no example: one sample per call
    assert per_sample_flops(LayerGeometry.of(layer), 10, 7, default_batch=2) == 12
    with pytest.raises(ts.DecompositionError, match="batch must be a positive int"):
        LayerGeometry.of(layer, batch=0)
