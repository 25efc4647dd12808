"""Plans (JSON contract, validation) and model surgery (compress, BN folding, inspect)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import tensorscope as ts

TOL = dict(rtol=1e-4, atol=1e-4)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 16, 2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4, bias=False)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x):
        return self.head(self.grouped(self.dw(self.layer1(self.stem(x)))))


def trained_like(model: nn.Module) -> nn.Module:
    """Give BN layers non-trivial statistics, then switch to eval."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


@pytest.fixture
def net():
    torch.manual_seed(0)
    return trained_like(ResNetish())


def full_plan(model: nn.Module, method_for) -> ts.Plan:
    layers = {}
    for info in ts.inspect(model):
        m = method_for(info)
        if m:
            layers[info.name] = {"method": m, "rank": 1.0}
    return ts.Plan(layers)


# ---- plan documents -----------------------------------------------------------------------


def test_plan_json_round_trip_matches_design_document():
    doc = {
        "tensorscope_plan": 1,
        "layers": {
            "features.0": {"method": "tucker2", "rank": [8, 16]},
            "features.3": {"method": "cp", "rank": 24},
            "classifier.1": {"method": "tt", "rank": [1, 8, 8, 1], "in_shape": [4, 8, 5, 5], "out_shape": [5, 5, 5, 4]},
            "classifier.3": {"method": "svd", "rank": 12},
        },
    }
    plan = ts.Plan.from_json(json.dumps(doc))
    assert json.loads(plan.to_json()) == doc
    assert ts.Plan.from_json(plan.to_json()) == plan
    assert ts.Plan({"fc1": {"method": "svd", "rank": 8}})["fc1"].rank == 8


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ("[]", "JSON object"),
    ('{"layers": {}}', "tensorscope_plan"),
    ('{"tensorscope_plan": 3, "layers": {}}', "version 3"),  # format 2 (groups) is read since issue 17
    ('{"tensorscope_plan": 1, "layers": []}', "layers"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "svd"}}}', "rank"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "magic", "rank": 2}}}', "unknown method"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "svd", "rank": "x"}}}', "rank must be"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "svd", "rank": 2, "ranks": 3}}}', "unknown key"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "tt", "rank": 2, "in_shape": [0, 4]}}}', "positive"),
    ('{"tensorscope_plan": 1, "layers": {"a": {"method": "svd", "rank": NaN}}}', "finite"),
    ('{"tensorscope_plan": 1, "layers": {"a": 5}}', "entry"),
    ("[" * 100000, "not valid JSON"),
])
def test_malformed_plans_give_plan_errors(text, match):
    with pytest.raises(ts.PlanError, match=match):
        ts.Plan.from_json(text)


def test_validation_names_layer_and_fix(net):
    with pytest.raises(ts.PlanError, match="did you mean.*'layer1.conv1'"):
        ts.Plan({"layer1.conv": {"method": "svd", "rank": 2}}).validate(net)
    with pytest.raises(ts.PlanError, match="handles conv2d"):
        ts.Plan({"head.2": {"method": "tucker2", "rank": 2}}).validate(net)
    with pytest.raises(ts.RankError, match=r"layer 'layer1.conv1'.*\[1, 16\]"):
        ts.Plan({"layer1.conv1": {"method": "svd", "rank": 17}}).validate(net)
    with pytest.raises(ts.PlanError, match="cannot be decomposed"):
        ts.Plan({"stem.1": {"method": "svd", "rank": 2}}).validate(net)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=12))
def test_plan_parser_never_raises_anything_but_plan_error(doc):
    for candidate in (doc, {"tensorscope_plan": 1, "layers": doc}, {"tensorscope_plan": 1, "layers": {"x": doc}}):
        try:
            ts.Plan.from_json(json.dumps(candidate))
        except ts.PlanError:
            pass


# ---- compress -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ts.available_methods())
def test_residual_net_full_rank_is_exact_and_original_untouched(net, method):
    before = copy.deepcopy(net.state_dict())

    def pick(info):
        return method if method in info.max_rank else ("svd" if "svd" in info.max_rank else None)

    plan = full_plan(net, pick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(net, plan)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_close(small(x), net(x), **TOL)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert ts.plan_of(small) == plan
    assert not any(isinstance(m, ts.FactorizedLayer) for m in net.modules())
    built = [m for m in small.modules() if isinstance(m, ts.FactorizedLayer)]
    assert len(built) == len(plan)


def test_predicted_params_equal_built(net):
    plan = ts.Plan({"stem.0": {"method": "tucker2", "rank": [4, 2]}, "layer1.conv1": {"method": "cp", "rank": 5},
                    "layer1.conv2": {"method": "svd", "rank": 0.5}, "grouped": {"method": "svd", "rank": 2},
                    "head.2": {"method": "tt", "rank": 2, "in_shape": [4, 6], "out_shape": [2, 5]}})
    x = torch.randn(2, 3, 16, 16)
    cost = ts.plan_cost(net, plan, x)
    small = ts.compress(net, plan)
    assert cost["params_after"] == ts.count_params(small)
    # FLOPs per sample at the example's batch: the TT layer forms its weight once per call,
    # which the call's samples share
    assert cost["flops_after"] == ts.count_flops(small, x)
    assert ts.plan_cost(net, plan, x[:1])["flops_after"] == ts.count_flops(small, x[:1]) > cost["flops_after"]
    plan2 = plan.with_layer("head.2", "tt", 2, in_shape=[4, 6], out_shape=[2, 5], batch=2)
    assert ts.plan_cost(net, plan2, x)["flops_after"] == ts.count_flops(ts.compress(net, plan2), x)


def test_fold_bn_keeps_outputs_and_removes_bn(net):
    small = ts.compress(net, ts.Plan(), fold_bn=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_close(small(x), net(x), **TOL)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    plan = full_plan(net, lambda i: "svd" if "svd" in i.max_rank else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        folded = ts.compress(net, plan, fold_bn=True)
    with torch.no_grad():
        assert_close(folded(x), net(x), **TOL)


def test_compress_refuses_before_doing_any_work(net):
    net2 = copy.deepcopy(net)
    net2.grouped.weight.data[0, 0, 0, 0] = float("inf")
    plan = ts.Plan({"stem.0": {"method": "cp", "rank": 3}, "grouped": {"method": "svd", "rank": 2}})
    with pytest.raises(ts.NonFiniteWeightError, match="grouped"):
        ts.compress(net2, plan)


def test_empty_plan_and_empty_model():
    m = nn.Sequential()
    assert ts.inspect(m) == []
    assert ts.count_params(ts.compress(m, ts.Plan())) == 0


# ---- inspect ------------------------------------------------------------------------------


def test_inspect_lists_layers_with_flops_and_reasons(net):
    x = torch.randn(2, 3, 16, 16)
    infos = ts.inspect(net, x)
    names = [i.name for i in infos]
    assert names == ["stem.0", "layer1.conv1", "layer1.conv2", "layer1.short.0", "dw", "grouped", "head.2"]
    by = infos.by_name()
    assert by["stem.0"].flops == 2 * 16 * 16 * 8 * 3 * 9
    assert by["head.2"].flops == 2 * 24 * 10
    assert by["dw"].max_rank["svd"] == 1  # depthwise: per group a 1 x 9 matrix
    assert "tt" not in by["grouped"].max_rank  # TT refuses grouped convs
    assert sum(i.flops for i in infos) <= ts.count_flops(net, x)


def test_inspect_explains_what_it_skips():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv3d(3, 4, 3)
            self.emb = nn.Embedding(10, 4)
            self.att = nn.MultiheadAttention(8, 2)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16)
            self.tied_a = nn.Linear(4, 4)
            self.tied_b = nn.Linear(4, 4)
            self.tied_b.weight = self.tied_a.weight
            self.fine = nn.Linear(4, 4)

    infos = ts.inspect(Odd(), include_skipped=True)
    reasons = {i.name: i.reason for i in infos}
    assert "Conv3d is not supported yet" in reasons["c1"]
    assert "lookup" in reasons["emb"]
    assert "reads its .weight" in reasons["att.out_proj"]
    assert "reads its .weight" in reasons["enc.linear1"]
    assert "tied" in reasons["tied_a"]
    assert reasons["fine"] is None
    assert [i.name for i in ts.inspect(Odd())] == ["fine"]


def test_transformers_conv1d_is_listed_as_a_linear():
    class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D: y = x @ W + b, W in x out
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 12))
            self.bias = nn.Parameter(torch.zeros(12))

        def forward(self, x):
            return x @ self.weight + self.bias

    m = nn.Sequential(Conv1D())
    (info,) = ts.inspect(m)
    assert (info.kind, info.weight_shape, info.max_rank["svd"]) == ("Conv1D", (12, 8), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(m, ts.Plan({"0": {"method": "svd", "rank": 1.0}}))
    x = torch.randn(5, 8)
    torch.testing.assert_close(small(x), m(x))


def test_depthwise_conv_is_listed_with_the_methods_that_can_shrink_it():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Conv2d(8, 16, 1))
    infos = ts.inspect(m, torch.randn(1, 8, 6, 6)).by_name()
    note = infos["0"].note
    assert note and "depthwise" in note and "only cp" in note and "svd" in note and "tucker2" in note
    assert infos["1"].note is None
    assert "note: 0 (Conv2d)" in str(ts.inspect(m))


def test_transformer_encoder_with_dict_batches_compresses():
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.ff1 = nn.Linear(16, 32)
            self.ff2 = nn.Linear(32, 16)
            self.out = nn.Linear(16, 5)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            h = h + self.ff2(torch.relu(self.ff1(h)))
            if attention_mask is not None:
                h = h * attention_mask[..., None]
            return self.out(h.mean(1))

    model = Tiny().eval()
    batch = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7)}
    infos = ts.inspect(model, batch).by_name()
    assert infos["ff1"].flops == 2 * 7 * 16 * 32  # per sample: 7 tokens
    plan = ts.Plan({n: {"method": "svd", "rank": 1.0} for n in infos})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(model, plan, data=[batch])
    with torch.no_grad():
        assert_close(small(**batch), model(**batch), **TOL)
