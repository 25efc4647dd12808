"""Execution forms of factorized chains (``execute``, ``tune_execution``): the same function
from the same parameters, recorded in the plan so save/load and exports agree."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorscope as ts
from tensorscope.errors import PlanError
from tensorscope.layers import CHAIN, FactorizedLayer


class SamePadConv(nn.Conv2d):
    """A TensorFlow-style port: padding=0 declared, "same" padding applied in forward."""

    def forward(self, x):
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(6, 12, 3, padding=1),  # 0
        nn.ReLU(),
        nn.Conv2d(12, 10, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=False),  # 2
        nn.ReLU(),
        SamePadConv(10, 8, 3, padding=0),  # 4
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # 5
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 20),  # 7
        nn.Linear(20, 5),  # 8
    ).eval()


PLAN = {
    "0": {"method": "tucker2", "rank": [5, 4]},
    "2": {"method": "tucker2", "rank": [7, 6]},
    "4": {"method": "svd", "rank": 5},
    "5": {"method": "tucker2", "rank": [3, 3]},  # grouped: the chain only
    "7": {"method": "svd", "rank": 6},
}


def _tol(t: torch.Tensor, n: int) -> dict:
    """Float error of reordered sums: eps times the size of the sums and of the values."""
    eps = torch.finfo(t.dtype).eps
    return {"rtol": 0.0, "atol": 64 * eps * n ** 0.5 * (float(t.abs().max()) + 1.0)}


def _compressed(plan=PLAN) -> tuple[nn.Module, nn.Module]:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, ts.compress(model, ts.Plan(plan)).eval()


X = torch.randn(3, 6, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_form_computes_the_chain(dtype):
    _, small = _compressed()
    small = small.to(dtype)
    x = X.to(dtype)
    with torch.no_grad():
        ref = small(x)
        n_params = ts.count_params(small)
        checked = 0
        for name, layer in small.named_modules():
            if not isinstance(layer, FactorizedLayer):
                continue
            for mode in layer.available_executions():
                layer.set_execution(mode)
                torch.testing.assert_close(small(x), ref, **_tol(ref, 12 * 9))
                assert ts.count_params(small) == n_params  # a form adds no parameter
                checked += mode != CHAIN
            layer.set_execution(CHAIN)
    assert checked == 2 * 3 + 1 + 1  # two Tucker-2 chains x 3 forms, the padded svd conv, the svd Linear


def test_forms_offered_per_chain():
    _, small = _compressed()
    assert small[0].available_executions() == ("chain", "fold_in", "fold_out", "dense")
    assert small[4].available_executions() == ("chain", "dense")  # behind the port's padding
    assert small[5].available_executions() == ("chain",)  # grouped
    assert small[7].available_executions() == ("chain", "dense")


def test_forms_run_backward_like_the_chain():
    _, small = _compressed()
    small.train()
    x = X.clone()
    grads = {}
    for mode in ("chain", "fold_in"):
        small[0].set_execution(mode)
        small.zero_grad()
        small(x).square().sum().backward()
        grads[mode] = [p.grad.clone() for p in small[0].parameters()]
    for a, b in zip(grads["chain"], grads["fold_in"]):
        torch.testing.assert_close(a, b, **_tol(a, 12 * 9 * 36))


def test_plan_option_builds_the_form_and_survives_save_load_and_export(tmp_path):
    plan = copy.deepcopy(PLAN)
    plan["0"]["execute"] = "fold_out"
    plan["2"]["execute"] = "dense"
    plan["7"]["execute"] = "dense"
    model, small = _compressed(plan)
    _, plain = _compressed()
    assert (small[0].execution, small[2].execution, small[7].execution) == ("fold_out", "dense", "dense")
    assert ts.count_params(small) == ts.count_params(plain)
    with torch.no_grad():
        torch.testing.assert_close(small(X), plain(X), **_tol(plain(X), 12 * 9))
    ts.save(small, tmp_path / "s.pt")
    back = ts.load(tmp_path / "s.pt", model=_net())
    assert (back[0].execution, back[2].execution, back[7].execution) == ("fold_out", "dense", "dense")
    with torch.no_grad():
        assert torch.equal(back(X), small(X))  # the same arithmetic: bit for bit
    for fmt in ("exported_program", "torchscript"):
        path = ts.export(small, tmp_path / f"s_{fmt}", example_input=X, format=fmt)
        runner = torch.export.load(path).module() if fmt == "exported_program" else torch.jit.load(path)
        with torch.no_grad():
            assert torch.equal(runner(X), small(X))
        sd = runner.state_dict()
        assert sum(t.numel() for k, t in sd.items() if "weight" in k or "bias" in k) == ts.count_params(small)


def test_bad_execute_values_are_refused_naming_the_layer():
    plan = copy.deepcopy(PLAN)
    plan["5"]["execute"] = "dense"  # grouped Tucker-2: no dense form
    with pytest.raises(PlanError, match=r"layer '5'.*execute='dense'"):
        _compressed(plan)
    with pytest.raises(PlanError, match="execute must be one of"):
        ts.Plan({"0": {"method": "tucker2", "rank": [5, 4], "execute": "fast"}}).validate(_net())


def test_tune_execution_records_its_choices_in_the_plan(tmp_path):
    model, small = _compressed()
    with torch.no_grad():
        ref = small(X)
    report = ts.tune_execution(small, X, repeats=1)
    assert {c.name for c in report} == {"0", "2", "4", "7"}  # the grouped chain has one form only
    for c in report:
        assert c.chosen in small.get_submodule(c.name).available_executions()
        assert set(c.seconds) == set(small.get_submodule(c.name).available_executions())
        assert small.get_submodule(c.name).execution == c.chosen
        assert ts.plan_of(small)[c.name].options.get("execute", "chain") == c.chosen
    assert "runs as" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(small(X), ref, **_tol(ref, 12 * 9))
    ts.save(small, tmp_path / "t.pt")
    back = ts.load(tmp_path / "t.pt", model=_net())
    assert {c.name: back.get_submodule(c.name).execution for c in report} == {c.name: c.chosen for c in report}
    ts.tune_execution(small, X, forms="chain")
    assert all(small.get_submodule(c.name).execution == "chain" for c in report)
    assert all("execute" not in lp.options for _, lp in ts.plan_of(small).items())


def test_factor_cache_ignores_the_execution_form():
    from tensorscope._cache import factor_cache

    plan = copy.deepcopy(PLAN)
    _compressed(plan)
    before = len(factor_cache) if hasattr(factor_cache, "__len__") else None
    plan["0"]["execute"] = "dense"
    _compressed(plan)
    if before is not None:
        assert len(factor_cache) == before  # same factors, not factorized again
