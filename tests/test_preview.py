"""The fast preview (original architecture, reconstructed weights) computes what the built
factorized model computes; sensitivity sweeps one layer at a time through it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

import tensorscope as ts
from tensorscope.budget import sensitivity
from tensorscope.preview import preview_weights, swapped_weights

import nets

_one_thread = pytest.fixture(scope="module", autouse=True)(nets.one_thread)


@pytest.fixture(scope="module")
def model():
    return nets.residual_cnn()


@pytest.fixture(scope="module")
def x():
    return nets.residual_input(6)


def _compress(model, plan):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ts.compress(model, plan, refine=False).eval()


PLANS = {
    "svd": {
        "stem": {"method": "svd", "rank": 4},
        "block1.conv1": {"method": "svd", "rank": 8},
        "block1.shortcut.0": {"method": "svd", "rank": 6},
        "grouped": {"method": "svd", "rank": 3},
        "dilated": {"method": "svd", "rank": 0.25},
        "fc1": {"method": "svd", "rank": 10},
        "head": {"method": "svd", "rank": 4},
    },
    "tucker2": {
        "block1.conv2": {"method": "tucker2", "rank": [8, 12]},
        "grouped": {"method": "tucker2", "rank": [4, 3]},
        "depthwise": {"method": "tucker2", "rank": [1, 1]},
        "block2.conv1": {"method": "tucker2", "rank": 0.5},
        "block2.shortcut.0": {"method": "tucker2", "rank": [20, 10]},
        "dilated": {"method": "tucker2", "rank": [16, 16]},
    },
    "cp": {
        "block1.conv1": {"method": "cp", "rank": 6},
        "grouped": {"method": "cp", "rank": 4},
        "dilated": {"method": "cp", "rank": 8},
    },
}


@pytest.mark.parametrize("method", list(PLANS))
def test_preview_computes_what_the_built_model_computes(model, x, method):
    plan = ts.Plan(PLANS[method])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = _compress(model, plan)
    fast = ts.preview(model, plan)
    # same architecture: no factorized module in the preview
    assert [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        y_small, y_fast, y = small(x), fast(x), model(x)
    assert_close(y_fast, y_small, rtol=1e-4, atol=1e-5)
    assert (y_fast - y).abs().max() > 1e-3, "the plan must actually change the function"
    res = ts.evaluate(fast, [x], reference=small)
    assert res["agreement"] == 1.0 and res["relative_error"] < 1e-4
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_preview_at_full_rank_is_the_original(model, x):
    plan = ts.Plan({
        "block1.conv2": {"method": "svd", "rank": 1.0},
        "dilated": {"method": "tucker2", "rank": 1.0},
        "fc1": {"method": "svd", "rank": 1.0},
    })
    with torch.no_grad():
        assert_close(ts.preview(model, plan)(x), model(x), rtol=1e-4, atol=1e-5)


def test_preview_weights_are_the_truncations(model):
    s = ts.spectrum(model, "block2.conv2")
    for r in (1, 7, 30):
        w_hat = preview_weights(model, ts.Plan({"block2.conv2": {"method": "svd", "rank": r}}))["block2.conv2"]
        w = model.block2.conv2.weight.detach().double()
        err = float((w - w_hat.double()).norm() / w.norm())
        assert err == pytest.approx(s.relative_error(r), rel=1e-4, abs=1e-6)


def test_swapped_weights_restores_on_error(model, x):
    w0 = model.fc1.weight.detach().clone()
    ptr = model.fc1.weight.data_ptr()
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_weights(model, {"fc1": torch.zeros_like(w0)}):
            assert model.fc1.weight.abs().sum() == 0
            raise RuntimeError("boom")
    assert model.fc1.weight.data_ptr() == ptr and torch.equal(model.fc1.weight.detach(), w0)


# ---- sensitivity ----------------------------------------------------------------------------

def _data(n_batches=3, with_labels=False):
    out = []
    for s in range(n_batches):
        xb = nets.residual_input(16, seed=100 + s)
        out.append((xb, torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(s))) if with_labels else xb)
    return out


def test_sensitivity_rows_and_monotone_quality(model):
    data = _data()
    layers = ["block1.conv2", "block2.conv2", "dilated", "fc1"]
    ranks = (0.05, 0.25, 0.5, 1.0)
    seen = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity(model, data, layers=layers, ranks=ranks, progress=lambda f, m: seen.append(f))
    assert len(rows) == len(layers) * len(ranks)
    assert [(r["layer"]) for r in rows] == [l for l in layers for _ in ranks]
    for r in rows:
        assert {"layer", "method", "rank", "params", "dense_params", "agreement", "relative_error", "cosine",
                "samples", "baseline"} <= set(r)
        assert r["method"] == "svd" and r["samples"] == 48
    # full rank: the same function
    for r in rows[len(ranks) - 1::len(ranks)]:
        assert r["agreement"] == 1.0 and r["relative_error"] < 1e-4
    # lower rank: lower (or equal) agreement and higher error, on average over the layers
    by_rank = [rows[i::len(ranks)] for i in range(len(ranks))]  # rows are layer-major
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    agree = [mean(rs, "agreement") for rs in by_rank]
    errs = [mean(rs, "relative_error") for rs in by_rank]
    assert agree == sorted(agree), agree
    assert errs == sorted(errs, reverse=True), errs
    # per layer, the relative output error falls as the rank grows
    for i in range(len(layers)):
        e = [rows[i * len(ranks) + j]["relative_error"] for j in range(len(ranks))]
        assert e == sorted(e, reverse=True), (layers[i], e)
    # params follow the method's count
    svd = ts.get_method("svd")
    infos = ts.inspect(model).by_name()
    for r in rows:
        assert r["params"] == svd.count_params(infos[r["layer"]].geometry, r["rank"])
        assert r["dense_params"] == infos[r["layer"]].params
    # progress reached the end; the model is unchanged
    assert seen and seen[-1] == pytest.approx(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sensitivity_row_equals_evaluating_the_built_model(model):
    """The fast path's numbers are those of the compressed model itself."""
    data = _data(2, with_labels=True)
    rows = sensitivity(model, data, layers=["block2.conv1"], ranks=(6,))
    (row,) = rows
    small = _compress(model, ts.Plan({"block2.conv1": {"method": "svd", "rank": 6}}))
    res = ts.evaluate(small, data, reference=model)
    for k in ("accuracy", "loss", "agreement", "relative_error", "cosine"):
        assert row[k] == pytest.approx(res[k], rel=1e-4, abs=1e-6), k
    assert row["baseline"]["accuracy"] == pytest.approx(ts.evaluate(model, data)["accuracy"])


def test_sensitivity_with_tucker2(model):
    data = _data(1)
    rows = sensitivity(model, data, layers=["block1.conv2", "fc1"], ranks=(0.25, 1.0), method="tucker2")
    assert {r["layer"] for r in rows} == {"block1.conv2"}  # tucker2 does not apply to Linear
    assert rows[0]["rank"] == (8, 8) and rows[-1]["relative_error"] < 1e-4


def test_compress_reuses_the_factors_the_preview_computed(model, x):
    """A slow factorization (CP-ALS) previewed at a rank is not run again when that plan is built."""
    from tensorscope.methods.cp import CP

    conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    plan = {conv: {"method": "cp", "rank": 3, "seed": 7}}
    calls = []
    original = CP.factorize

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    CP.factorize = counting
    try:
        ts.preview(model, plan, refine=True)
        assert len(calls) == 1
        small = ts.compress(model, plan)  # refine=True: the same factors
        assert len(calls) == 1, "compress factorized again instead of reusing the preview's factors"
        ts.compress(model, {conv: {"method": "cp", "rank": 3, "seed": 8}})  # another key: computed
        assert len(calls) == 2
    finally:
        CP.factorize = original
    assert_close(small(x), ts.compress(model, plan)(x))
