"""A method from outside the package, announced by an entry point, works everywhere with no
edit to tensorscope: plan JSON, compress, plan_cost, save, load in a fresh process, export,
the CLI and the explorer state (its slider axes included). And registering goes wrong loudly.

The plugin lives in a temporary folder (a module plus a ``.dist-info`` with the entry point)
put on ``PYTHONPATH`` of child processes, so this process's registry stays as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tensorscope as ts
from tensorscope.errors import PluginError
from tensorscope.methods import Method, available_methods, get_method, register_method
from tensorscope.methods.svd import SVD

PLUGIN = '''
"""Truncated SVD with the singular values on the output factor: a method from outside tensorscope."""
import torch
from torch import nn

from tensorscope.layers import FactorizedLayer
from tensorscope.methods import Factors, Method, Option, RankAxis
from tensorscope.methods.base import resolve_int_rank


class LeftSVD(Method):
    name = "leftsvd"
    kinds = ("linear",)
    description = "SVD, singular values on the output side"
    option_specs = {"flip": Option("bool", help="put the singular values on the input side instead")}
    error_curve = False

    def max_rank(self, geom, options=None):
        return min(geom.in_features, geom.out_features)

    def resolve_rank(self, geom, rank, options=None):
        return resolve_int_rank(self.name, geom, rank, self.max_rank(geom))

    def rank_axes(self, geom, options=None):
        mx = self.max_rank(geom)
        return (RankAxis("k", "kept directions k", 1, mx, max(1, mx // 3), unfolding="out"),)

    def count_params(self, geom, rank, options=None):
        return rank * (geom.in_features + geom.out_features) + (geom.out_features if geom.bias else 0)

    def count_flops(self, geom, rank, options=None):
        return 2 * geom.tokens * rank * (geom.in_features + geom.out_features)

    def factorize(self, layer, rank, options=None, *, stats=None, refine=True):
        u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
        if (options or {}).get("flip"):
            first, second = s[:rank, None] * vh[:rank], u[:, :rank]
        else:
            first, second = vh[:rank], u[:, :rank] * s[:rank]
        return Factors(self.name, rank, {"first": first.float(), "second": second.float()})

    def empty_factors(self, geom, rank, options=None):
        return Factors(self.name, rank, {"first": torch.zeros(rank, geom.in_features),
                                         "second": torch.zeros(geom.out_features, rank)})

    def build(self, layer, factors):
        r = factors.rank
        a = nn.Linear(layer.in_features, r, bias=False)
        b = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
        a.weight.data.copy_(factors.tensors["first"])
        b.weight.data.copy_(factors.tensors["second"])
        if layer.bias is not None:
            b.bias.data.copy_(layer.bias.detach())
        return FactorizedLayer(a, b, method=self.name, rank=r, source="Linear")

    def reconstruct(self, layer, factors):
        return (factors.tensors["second"] @ factors.tensors["first"]).to(layer.weight.dtype)
'''

NETS = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 10))
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "tsplugin_demo.py").write_text(PLUGIN)
    (root / "tsplugin_nets.py").write_text(NETS)
    info = root / "tsplugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tsplugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tensorscope.methods]\nleftsvd = tsplugin_demo:LeftSVD\n")
    return root


def _run(site, code: str, *args: str, cwd=None) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else [sys.executable, "-m", "tensorscope", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res.stdout


def test_a_plugin_method_works_through_the_library_and_a_fresh_process(site, tmp_path):
    out = _run(site, f'''
        import json, torch, warnings
        import tensorscope as ts
        from tsplugin_nets import mlp
        assert "leftsvd" in ts.available_methods()
        model = mlp()
        x = torch.randn(7, 20)
        plan = ts.Plan.from_json(json.dumps({{"tensorscope_plan": 1, "layers": {{
            "0": {{"method": "leftsvd", "rank": 16, "flip": True}}, "2": {{"method": "leftsvd", "rank": 4}}}}}}))
        assert plan.to_json() == ts.Plan.from_json(plan.to_json()).to_json()
        cost = ts.plan_cost(model, plan, example_input=x[:1])
        small = ts.compress(model, plan)
        assert cost["params_after"] == ts.count_params(small), (cost, ts.count_params(small))
        full = ts.compress(model, {{"0": {{"method": "leftsvd", "rank": 16}}}})
        torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)  # exact at full rank
        ts.save(small, r"{tmp_path / 'small.pt'}", plan=plan, arch="tsplugin_nets:mlp")
        ts.export(small, r"{tmp_path / 'small.pt2'}", example_input=x[:1])
        torch.save((x, small(x).detach()), r"{tmp_path / 'io.pt'}")
        try:
            ts.Plan({{"0": {{"method": "leftsvd", "rank": 3, "flip": 1}}}})
            raise SystemExit("a bad option was accepted")
        except ts.PlanError as e:
            assert "flip must be true or false" in str(e), e
        print("ok", cost["params_after"])
    ''')
    assert out.startswith("ok")
    # a fresh process: the method is found through its entry point when the checkpoint names it
    out = _run(site, f'''
        import torch
        import tensorscope as ts
        from tensorscope.methods.registry import _REGISTRY
        assert "leftsvd" not in _REGISTRY  # not loaded yet: the checkpoint's plan will ask for it
        small = ts.load(r"{tmp_path / 'small.pt'}")
        x, y = torch.load(r"{tmp_path / 'io.pt'}", weights_only=True)
        torch.testing.assert_close(small(x), y)
        prog = torch.export.load(r"{tmp_path / 'small.pt2'}").module()
        torch.testing.assert_close(prog(x), y, rtol=1e-5, atol=1e-5)
        print("ok", type(small[0]).__name__, small[0].method)
    ''')
    assert out.split() == ["ok", "FactorizedLayer", "leftsvd"]


def test_a_plugin_method_works_from_the_cli(site, tmp_path):
    torch_code = '''
        import torch
        from tsplugin_nets import mlp
        torch.save(mlp().state_dict(), "model.pt")
    '''
    _run(site, torch_code, cwd=tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(
        {"tensorscope_plan": 1, "layers": {"0": {"method": "leftsvd", "rank": 5}}}))
    _run(site, "", "compress", "model.pt", "--arch", "tsplugin_nets:mlp", "--plan", "plan.json",
         "-o", "small.pt", "-q", cwd=tmp_path)
    assert (tmp_path / "small.pt").exists()
    listing = _run(site, "", "methods", cwd=tmp_path)
    assert "leftsvd" in listing and "svd" in listing


def test_a_plugin_method_drives_the_explorer_state_and_its_sliders(site):
    out = _run(site, '''
        import torch
        import tensorscope as ts
        from tensorscope.explorer import ExplorerState
        from tsplugin_nets import mlp
        model = mlp()
        x = torch.randn(64, 20)
        s = ExplorerState()
        assert s.load_network(model, x), s.error
        assert "leftsvd" in s.methods_for("0")
        axes = s.rank_axes("0", "leftsvd")
        assert [(a.name, a.label, a.low, a.high) for a in axes] == [("k", "kept directions k", 1, 16)], axes
        assert s.set_layer("0", "leftsvd", None), s.error          # the default rank from the axes
        assert s.set_rank_values("0", [6]), s.error                 # what a slider move does
        assert s.layer_choice("0") == ("leftsvd", 6)
        small = s.compressed_model()
        assert s.cost["params_after"] == ts.count_params(small)
        assert s.rank_text("0") == "6"
        try:  # the page: the plugin's slider, built from its rank axis, with no edit to the app
            import panel  # noqa: F401
        except ImportError:
            print("ok")
            raise SystemExit
        import sys
        sys.path.insert(0, r"{apps}")
        from explorer import ExplorerView
        view = ExplorerView(state=s, load=False)
        s.select("0")
        assert "leftsvd" in view.method_select.options and view.method_select.value == "leftsvd"
        [slider] = view.rank_sliders
        assert (slider.label, slider.start, slider.end, slider.value) == ("kept directions k", 1, 16, 6)
        slider.value = 3                                             # a person moves it
        assert s.layer_choice("0") == ("leftsvd", 3), s.error
        assert format(s.cost["params_after"], ",") in view.stats["params"].object
        print("ok")
    '''.replace("{apps}", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps")))
    assert out.strip().endswith("ok")


def test_a_broken_plugin_is_named_and_every_other_method_still_works(tmp_path):
    (tmp_path / "tsbroken.py").write_text("raise ImportError('needs a package that is not installed')\n")
    info = tmp_path / "tsbroken-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tsbroken\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[tensorscope.methods]\nbroken = tsbroken:Broken\n")
    built_in = available_methods()  # this process loads no plugin: the built-in methods
    out = _run(tmp_path, f'''
        import warnings
        import tensorscope as ts
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            names = ts.available_methods()
        assert names == {built_in!r}, names
        assert any("tsbroken" in str(w.message) for w in seen), [str(w.message) for w in seen]
        try:
            ts.Plan({{"fc": {{"method": "broken", "rank": 2}}}})
        except ts.PlanError as e:
            msg = str(e)
        assert "tsbroken" in msg and "failed to import" in msg and "svd" in msg, msg
        try:
            ts.Plan({{"fc": {{"method": "nothere", "rank": 2}}}})
        except ts.PlanError as e:
            assert "available methods: {', '.join(built_in)}" in str(e), e
        print("ok")
    ''')
    assert out.strip() == "ok"


class _Abstract(Method):
    name = "abstract_one"
    kinds = ("linear",)


def test_register_method_refuses_what_is_not_a_method():
    with pytest.raises(PluginError, match="subclass of tensorscope.methods.Method"):
        register_method(object)
    with pytest.raises(PluginError, match="subclass of tensorscope.methods.Method"):
        register_method(SVD())  # an instance, not a class

    class NoName(SVD):
        name = ""

    with pytest.raises(PluginError, match="needs a class attribute `name`"):
        register_method(NoName)

    class BadKinds(SVD):
        name = "badkinds"
        kinds = ("conv3d",)

    with pytest.raises(PluginError, match="needs `kinds`"):
        register_method(BadKinds)
    with pytest.raises(PluginError, match="cannot be instantiated"):
        register_method(_Abstract)
    assert "abstract_one" not in available_methods() and "badkinds" not in available_methods()


def test_register_method_refuses_a_taken_name_and_names_both_classes():
    class Impostor(SVD):
        name = "svd"

    with pytest.raises(PluginError) as e:
        register_method(Impostor)
    msg = str(e.value)
    assert "tensorscope.methods.svd.SVD" in msg and "Impostor" in msg
    assert type(get_method("svd")) is SVD  # untouched
    register_method(SVD)  # the same class again (a reloaded module) is fine
    assert type(get_method("svd")) is SVD


@pytest.mark.parametrize("name", available_methods())
def test_every_method_describes_its_ranks(name):
    """Rank axes, text and JSON forms round-trip for every built-in method, at every layer kind it takes."""
    from torch import nn

    m = get_method(name)
    for layer in (nn.Linear(24, 12), nn.Conv2d(8, 12, 3)):
        geom = ts.LayerGeometry.of(layer)
        if m.unsupported_reason(geom):
            continue
        axes = m.rank_axes(geom)
        assert axes and all(1 <= a.low <= a.default <= a.high for a in axes)
        top = m.rank_from_axes(geom, [a.high for a in axes])
        assert top == m.max_rank(geom)
        assert m.axis_values(top) == tuple(a.high for a in axes)
        rank = m.default_rank(geom)
        assert m.resolve_rank(geom, m.rank_from_text(m.rank_text(rank))) == rank
        assert m.resolve_rank(geom, m.rank_to_json(rank)) == rank
        json.dumps(m.rank_to_json(rank))
        assert m.count_params(geom, rank) < geom.dense_params or m.shrink_rank(geom, rank) is None
