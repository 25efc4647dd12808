"""Plan groups (format 2) and the joint Tucker group method (T-Net): one core shared by layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tensorscope as ts
from tensorscope.errors import PlanError, RankError
from tensorscope.methods import get_group_method
from tensorscope.methods.joint_tucker import JointTuckerConv, JointTuckerCore
from tensorscope.preview import preview

pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")

JT = get_group_method("joint_tucker")
TOL64 = dict(rtol=1e-9, atol=1e-10)


class Tower(nn.Module):
    """A stem, four same-shaped residual 3x3 convs (mixed bias, stride, padding) with BatchNorm,
    one conv of another shape, and a classifier."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.convs = nn.ModuleList([
            nn.Conv2d(c, c, 3, padding=1),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.Conv2d(c, c, 3, padding=(1, 1), dilation=1),
            nn.Conv2d(c, c, 3, padding=2, dilation=2),
        ])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for _ in self.convs])
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)  # same kernel, other stride
        self.wide = nn.Conv2d(c, 2 * c, 3, padding=1)  # another kernel shape
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(x + bn(conv(x)))
        x = F.relu(self.wide(F.relu(self.down(x))))
        return self.fc(x.mean((2, 3)))


MEMBERS = ["convs.0", "convs.1", "convs.2", "convs.3", "down"]


def tower(dtype=torch.float64, seed: int = 0) -> Tower:
    torch.manual_seed(seed)
    m = Tower().to(dtype)
    for bn in m.bns:  # non-trivial BatchNorm statistics, kept per layer
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def group_plan(rank, members=MEMBERS, **layers) -> dict:
    return {"tensorscope_plan": 2, "layers": layers,
            "groups": {"stage1": {"method": "joint_tucker", "layers": list(members), "rank": rank}}}


X = torch.randn(3, 2, 10, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ---- exactness and the shared core -------------------------------------------------------


def test_full_rank_is_exact_and_members_share_one_core():
    model = tower()
    small = ts.compress(model, group_plan([5, 6, 6]))
    torch.testing.assert_close(small(X), model(X), **TOL64)
    cores = {id(small.get_submodule(n).shared) for n in MEMBERS}
    assert len(cores) == 1
    assert all(isinstance(small.get_submodule(n), JointTuckerConv) for n in MEMBERS)
    assert isinstance(small.bns[0], nn.BatchNorm2d) and small.down.stride == (2, 2)  # stays per layer
    assert small.convs[1].bias is None and small.convs[0].bias is not None
    # the core reproduces each stacked kernel, in order
    core = small.convs[0].shared
    for k, n in enumerate(MEMBERS):
        torch.testing.assert_close(core.kernel(k), model.get_submodule(n).weight, **TOL64)
    # the original is untouched
    assert isinstance(model.convs[0], nn.Conv2d)


def test_full_rank_as_a_fraction_and_float32():
    model = tower(torch.float32)
    small = ts.compress(model, group_plan(1.0))
    x = X.float()
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(small(x), model(x), rtol=200 * eps, atol=200 * eps)


@pytest.mark.parametrize("rank", [[1, 1, 1], [2, 3, 4], [5, 2, 6], [3, 6, 2]])
def test_truncated_group_computes_its_reconstructed_kernels(rank):
    """What is built computes exactly with the kernels the preview reconstructs (refine=False)."""
    model = tower()
    plan = group_plan(rank)
    small = ts.compress(model, plan, refine=False)
    torch.testing.assert_close(small(X), preview(model, plan)(X), **TOL64)


def test_hosvd_error_curve_is_the_truncation_error():
    model = tower()
    layers = [model.get_submodule(n) for n in MEMBERS]
    geoms = [ts.LayerGeometry.of(m) for m in layers]
    t = JT.tradeoff_group(layers, geoms)
    stack = torch.stack([m.weight.detach() for m in layers])
    for k in range(0, len(t.ranks), max(1, len(t.ranks) // 7)):
        f = JT.factorize_group(layers, t.ranks[k], refine=False)
        rec = torch.stack(JT.reconstruct_group(layers, f))
        err = float((rec - stack).norm() / stack.norm())
        assert err == pytest.approx(t.errors[k], abs=1e-9)
        assert t.params[k] == JT.count_params_group(geoms, t.ranks[k])
    # refined factors (HOOI sweeps) are never worse than the plain truncation
    r = t.ranks[len(t.ranks) // 2]
    plain = torch.stack(JT.reconstruct_group(layers, JT.factorize_group(layers, r, refine=False)))
    refined = torch.stack(JT.reconstruct_group(layers, JT.factorize_group(layers, r, refine=True)))
    assert (refined - stack).norm() <= (plain - stack).norm() * (1 + 1e-12)


# ---- cost from geometry ------------------------------------------------------------------


@pytest.mark.parametrize("rank", [[1, 1, 1], [2, 3, 4], [5, 6, 6]])
def test_predicted_params_and_flops_equal_built_and_flop_counter(rank):
    model = tower(torch.float32)
    plan = group_plan(rank, fc={"method": "svd", "rank": 2})
    x = X[:1].float()
    cost = ts.plan_cost(model, plan, example_input=x)
    small = ts.compress(model, plan)
    assert cost["params_after"] == ts.count_params(small)  # the shared core counted once
    with FlopCounterMode(display=False) as fc:
        small(x)
    assert cost["flops_after"] == fc.get_total_flops() == ts.count_flops(small, x)
    g = cost["groups"]["stage1"]
    assert g["layers"] == MEMBERS and tuple(g["rank"]) == tuple(rank)
    # the group's own count: one core plus every member's bias
    members = [small.get_submodule(n) for n in MEMBERS]
    distinct = {id(p): p for m in members for p in m.parameters()}
    assert g["params"] == sum(p.numel() for p in distinct.values())


# ---- checkpoints, export, tensorize ----------------------------------------------------------


def test_save_load_shares_one_core_and_reproduces_the_kernels(tmp_path):
    model = tower()
    small = ts.compress(model, group_plan([5, 6, 6]))
    path = tmp_path / "small.safetensors"
    ts.save(small, path)
    loaded = ts.load(path, model=tower(seed=5))
    cores = {id(loaded.get_submodule(n).shared) for n in MEMBERS}
    assert len(cores) == 1
    assert ts.count_params(loaded) == ts.count_params(small)
    core = loaded.convs[0].shared
    for k, n in enumerate(MEMBERS):
        torch.testing.assert_close(core.kernel(k), model.get_submodule(n).weight, **TOL64)
    torch.testing.assert_close(loaded(X), model(X), **TOL64)
    assert ts.plan_of(loaded) == ts.plan_of(small)
    # training the loaded model moves every member's kernel through the one core
    loaded.convs[0].shared.core.data.mul_(2)
    assert torch.equal(loaded.convs[3].shared.core, loaded.convs[0].shared.core)


def test_export_keeps_one_copy_of_the_core(tmp_path):
    model = tower(torch.float32)
    small = ts.compress(model, group_plan([2, 3, 4]))
    x = X.float()
    path = ts.export(small, tmp_path / "small", example_input=x)
    ep = torch.export.load(str(path))
    torch.testing.assert_close(ep.module()(x), small(x))
    storages = {v.data_ptr(): v.numel() for v in ep.state_dict.values()}
    n_buffers = sum(b.numel() for b in small.buffers())
    assert sum(storages.values()) == ts.count_params(small) + n_buffers


def test_tensorize_random_group_trains_through_one_core():
    model = tower(torch.float32)
    net = ts.tensorize(model, group_plan([2, 3, 3]), init="random", seed=3)
    again = ts.tensorize(model, group_plan([2, 3, 3]), init="random", seed=3)
    core = net.convs[0].shared
    assert all(net.get_submodule(n).shared is core for n in MEMBERS)
    torch.testing.assert_close(core.core, again.convs[0].shared.core)  # seeded
    assert core.core.abs().sum() > 0 and core.u_layer.abs().sum() > 0
    loss = net(X.float()).pow(2).sum()
    loss.backward()
    for p in (core.core, core.u_layer, core.u_out, core.u_in):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # each rebuilt kernel has about the Glorot variance (averaged over members and seeds)
    var = torch.stack([core.kernel(k).detach().var() for k in range(len(MEMBERS))]).mean()
    target = 2.0 / ((6 + 6) * 9)
    assert 0.3 * target < var < 3 * target


# ---- the plan format ---------------------------------------------------------------------


def test_format_2_round_trip_and_format_1_still_read():
    plan = ts.Plan.from_dict(group_plan([2, 3, 4], fc={"method": "svd", "rank": 2}))
    doc = json.loads(plan.to_json())
    assert doc["tensorscope_plan"] == 2 and doc["groups"]["stage1"]["layers"] == MEMBERS
    assert ts.Plan.from_json(plan.to_json()) == plan
    assert len(plan) == 1 + len(MEMBERS) and plan.group_of("down") == "stage1" and plan.group_of("fc") is None
    old = {"tensorscope_plan": 1, "layers": {"fc": {"method": "svd", "rank": 2}}}
    p1 = ts.Plan.from_dict(old)
    assert p1.to_dict() == old  # a plan without groups stays format 1, which older tensorscope reads
    # editing a layer keeps the groups
    assert plan.with_layer("stem", "svd", 2).groups == plan.groups
    assert ts.Plan.from_dict({"tensorscope_plan": 2, "layers": {}}).to_dict()["tensorscope_plan"] == 1


def _refused(plan, exc=PlanError, model=None, *words):
    model = model if model is not None else tower()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc) as info:
        ts.compress(model, plan)
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) for n in MEMBERS)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_members_of_different_kernel_shape_are_refused():
    _refused(group_plan([2, 3, 3], members=["convs.0", "wide"]), PlanError, None,
             "stage1", "'wide'", "(12, 6, 3, 3)", "(6, 6, 3, 3)", "move it")


def test_a_layer_in_two_groups_or_in_a_group_and_layers_is_refused():
    doc = group_plan([2, 3, 3], members=["convs.0", "convs.1"])
    doc["groups"]["other"] = {"method": "joint_tucker", "layers": ["convs.2", "convs.1"], "rank": [2, 3, 3]}
    with pytest.raises(PlanError, match=r"'convs.1' is in two groups, 'stage1' and 'other'.*remove it"):
        ts.Plan.from_dict(doc)
    both = group_plan([2, 3, 3], members=["convs.0", "convs.1"], **{"convs.1": {"method": "tucker2", "rank": 2}})
    with pytest.raises(PlanError, match=r"'convs.1' is both in group 'stage1' and in \"layers\".*remove one"):
        ts.Plan.from_dict(both)
    with pytest.raises(PlanError, match="both in group"):
        ts.Plan.from_dict(group_plan([2, 3, 3], members=["convs.0", "convs.1"])).with_layer("convs.0", "svd", 2)


def test_a_one_layer_group_and_repeated_members_are_refused():
    with pytest.raises(PlanError, match=r"group 'stage1': has 1 layer\(s\) \['convs.0'\].*at least 2.*\"layers\""):
        ts.Plan.from_dict(group_plan([1, 3, 3], members=["convs.0"]))
    with pytest.raises(PlanError, match="'convs.0' is listed twice"):
        ts.Plan.from_dict(group_plan([1, 3, 3], members=["convs.0", "convs.0"]))


@pytest.mark.parametrize("rank, words", [
    ([6, 3, 3], ["stage1", "r_layer 6", "[1, 5]"]),
    ([2, 0, 3], ["stage1", "r_out 0", "[1, 6]"]),
    ([2, 3, 7], ["stage1", "r_in 7", "[1, 6]"]),
    ([2, 3], ["stage1", "[r_layer, r_out, r_in]"]),
    (1.5, ["stage1", "(0, 1]"]),
])
def test_ranks_out_of_range_are_refused_before_any_work(rank, words):
    _refused(group_plan(rank), RankError, None, *words)


def test_unknown_members_wrong_methods_and_old_formats_are_refused():
    _refused(group_plan([2, 3, 3], members=["convs.0", "convs.9"]), PlanError, None, "'convs.9'", "not in the model")
    with pytest.raises(PlanError, match="'tucker2' is a per-layer method"):
        ts.Plan.from_dict({"tensorscope_plan": 2, "groups": {"g": {"method": "tucker2", "layers": ["a", "b"],
                                                                    "rank": 2}}})
    with pytest.raises(PlanError, match="decomposes several layers together.*\"groups\""):
        ts.Plan({"convs.0": {"method": "joint_tucker", "rank": [1, 2, 2]}})
    with pytest.raises(PlanError, match="need plan format 2"):
        ts.Plan.from_dict({"tensorscope_plan": 1, "layers": {}, "groups": {}})
    with pytest.raises(PlanError, match="unknown key"):
        ts.Plan.from_dict(group_plan([2, 3, 3]) | {"groups": {"g": {"method": "joint_tucker", "layers": MEMBERS,
                                                                     "rank": 1.0, "colour": "red"}}})
    _refused(group_plan([2, 3, 3], members=["convs.0", "fc"]), PlanError, None, "'fc'", "conv2d")


# ---- the preview cache -------------------------------------------------------------------


def test_preview_and_compress_factorize_a_group_once(monkeypatch):
    from tensorscope._cache import factor_cache

    factor_cache.clear()
    model = tower()
    calls = []
    original = type(JT).factorize_group

    def counting(self, layers, rank, options=None, *, refine=True):
        calls.append((tuple(rank), refine))
        return original(self, layers, rank, options, refine=refine)

    monkeypatch.setattr(type(JT), "factorize_group", counting)
    plan = group_plan([2, 3, 4])
    from tensorscope.preview import preview_weights

    w = preview_weights(model, plan, refine=True)
    assert sorted(w) == sorted(MEMBERS)
    small = ts.compress(model, plan)
    assert calls == [((2, 3, 4), True)]
    torch.testing.assert_close(small(X), preview(model, plan, refine=True)(X), **TOL64)


def test_joint_core_is_a_module_of_its_own():
    core = JointTuckerCore(3, 4, 5, (3, 3), (2, 3, 4))
    core.reset_parameters()
    assert core.kernel(2).shape == (4, 5, 3, 3)
    assert torch.allclose(core.u_out.t() @ core.u_out, torch.eye(3), atol=1e-5)


# ---- the budget planner ------------------------------------------------------------------

GROUPED = ["convs.0", "convs.1", "convs.2", "convs.3"]


@pytest.mark.parametrize("keep", [0.6, 0.35])
def test_plan_for_budget_plans_a_group_as_one_unit(keep):
    model = tower(torch.float32)
    plan = ts.plan_for_budget(model, keep, groups={"tower": GROUPED})
    assert not set(GROUPED) & set(plan.layers)  # members are planned only as the group
    cost = ts.plan_cost(model, plan)
    assert cost["params_after"] <= keep * cost["params"] * 1.02
    small = ts.compress(model, plan)
    assert ts.count_params(small) == cost["params_after"]
    if "tower" in plan.groups:
        assert plan.groups["tower"].layers == tuple(GROUPED) and plan.groups["tower"].method == "joint_tucker"
    # without groups= no group is formed
    assert not ts.plan_for_budget(model, keep).groups


def test_plan_for_budget_by_flops_with_a_group():
    model = tower(torch.float32)
    x = X[:1].float()
    plan = ts.plan_for_budget(model, 0.4, by="flops", example_input=x,
                              groups={"g": {"method": "joint_tucker", "layers": GROUPED}})
    cost = ts.plan_cost(model, plan, example_input=x)
    assert cost["flops_after"] <= 0.4 * cost["flops"] * 1.02
    assert cost["flops_after"] == ts.count_flops(ts.compress(model, plan), x)


def test_plan_for_budget_refuses_bad_groups():
    from tensorscope.errors import BudgetError

    model = tower(torch.float32)
    with pytest.raises(BudgetError, match="has 1 layer"):
        ts.plan_for_budget(model, 0.5, groups={"g": ["convs.0"]})
    with pytest.raises(BudgetError, match="'wide'.*differs"):
        ts.plan_for_budget(model, 0.5, groups={"g": ["convs.0", "wide"]})
    with pytest.raises(BudgetError, match="chooses the rank"):
        ts.plan_for_budget(model, 0.5, groups={"g": {"layers": GROUPED, "rank": [1, 2, 2]}})


# ---- the explorer ------------------------------------------------------------------------


def test_explorer_state_costs_previews_and_lists_a_group_as_one_unit():
    pytest.importorskip("pandas")
    from tensorscope.explorer import ExplorerState

    s = ExplorerState()
    assert s.load_example("tower"), s.error
    members = [f"blocks.{k}.conv" for k in range(6)]
    doc = {"tensorscope_plan": 2, "layers": {"fc": {"method": "svd", "rank": 4}},
           "groups": {"tower": {"method": "joint_tucker", "layers": members, "rank": [3, 8, 8]}}}
    assert s.set_plan(doc), s.error
    assert s.plan.groups["tower"].layers == tuple(members)
    cost = ts.plan_cost(s.model, doc)
    assert s.cost["params_after"] == cost["params_after"]
    assert s.cost["layers_planned"] == 7
    table = s.table
    row = table[table["type"] == "group"]
    assert len(row) == 1 and row["params after"].iloc[0] == cost["groups"]["tower"]["params"]
    assert set(table[table["method"] == "group tower"]["layer"]) == set(members)
    # the live preview runs the members' slices of the group: as the compressed network does
    small = ts.compress(s.model, doc, refine=s.refine)
    q = s.refresh_quality(incremental=False)
    got = ts.evaluate(small, [(s.eval_inputs, s.eval_targets)])
    assert q["metric"] == "accuracy" and q["plan"] == pytest.approx(got["accuracy"], abs=1.5 / got["samples"])
    alone = ts.evaluate(ts.compress(s.model, {"fc": {"method": "svd", "rank": 4}}), [(s.eval_inputs, s.eval_targets)])
    assert q["plan"] != pytest.approx(alone["accuracy"], abs=1e-9)  # the group is in the preview
    # editing another layer keeps the group
    assert s.set_layer("stem.0", "svd", 4), s.error
    assert "tower" in s.plan.groups
    assert ts.count_params(small) == cost["params_after"]


def test_the_group_plan_in_the_readme_validates_on_tower():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    doc = next(d for d in re.findall(r"```json\n(\{.*?)```", readme, re.S) if '"groups"' in d)
    plan = ts.Plan.from_json(doc)
    model = ts.examples.build_example("tower")
    (g,) = plan.resolve_groups(model)
    assert len(g.members) == 6 and g.rank == (3, 8, 8)
    assert ts.compress(model.eval(), plan)(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_torchscript_export_of_a_group(tmp_path):
    model = tower(torch.float32)
    small = ts.compress(model, group_plan([2, 3, 4]))
    x = X.float()
    path = ts.export(small, tmp_path / "small", example_input=x, format="torchscript")
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(x), small(x))


def test_weights_on_disk_refuse_groups(tmp_path):
    with pytest.raises(PlanError, match="groups.*in memory"):
        ts.compress(str(tmp_path / "w.safetensors"), group_plan([2, 3, 3]), out=tmp_path / "out")


def test_densify_carries_what_group_members_compute():
    """``recovery.densify`` (iterative compression's rank choices start from it) puts every
    member of a joint group, and every per-layer chain, back as the dense layer it computes:
    the densified original computes what the compressed model computes, not the original."""
    from tensorscope.recovery import densify

    model = tower()
    small = ts.compress(model, group_plan([3, 4, 4], wide={"method": "svd", "rank": 3}))
    assert (small(X) - model(X)).abs().max() > 1e-3  # something to carry
    dense = densify(small, model)
    assert ts.count_params(dense) == ts.count_params(model)
    torch.testing.assert_close(dense(X), small(X), **TOL64)
    torch.testing.assert_close(model(X), tower()(X), **TOL64)  # the original untouched
