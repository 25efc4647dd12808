"""Checkpoints (save/load/describe), users' networks (load_model) and standalone exports.

Tolerances: a checkpoint loaded in the same process reproduces the saved model's output
bit for bit (rtol = atol = 0): same weights, same kernels. In a fresh process we allow
rtol = atol = 1e-6 (float32). Exports are compared with rtol = atol = 1e-4 (float32), the
tolerance ``export`` itself verifies with, since torch.export / TorchScript may reorder ops.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:  # archs must be importable under the same name in subprocesses
    sys.path.insert(0, HERE)

import archs  # noqa: E402

from tensorscope._arch import build_arch, get_arch  # noqa: E402
from tensorscope.checkpoint import (  # noqa: E402
    MissingExtraError,
    NonFiniteWarning,
    describe,
    export,
    load,
    load_model,
    save,
)
from tensorscope import checkpoint as ckpt  # noqa: E402
from tensorscope.errors import (  # noqa: E402
    ArchitectureError,
    CheckpointError,
    FileTooLargeError,
    TensorscopeError,
    UntrustedFileError,
)
from tensorscope.methods import available_methods  # noqa: E402
from tensorscope.surgery import compress, plan_of  # noqa: E402

EXACT = dict(rtol=0.0, atol=0.0)
FRESH = dict(rtol=1e-6, atol=1e-6)
EXPORT = dict(rtol=1e-4, atol=1e-4)

PLANS = {
    "svd": {"stem.0": {"method": "svd", "rank": 4}, "down": {"method": "svd", "rank": 0.5},
            "head": {"method": "svd", "rank": 5}},
    "tucker2": {"block.conv1": {"method": "tucker2", "rank": [8, 6]},
                "down": {"method": "tucker2", "rank": [12, 8]}},
    "cp": {"block.conv2": {"method": "cp", "rank": 6, "iters": 10, "seed": 0}},
}
if "tt" in available_methods():
    PLANS["tt"] = {"down": {"method": "tt", "rank": 4}, "head": {"method": "tt", "rank": 3}}
if "rcp" in available_methods():
    PLANS["rcp"] = {"block.conv2": {"method": "rcp", "rank": 6, "iters": 10, "seed": 0},
                    "down": {"method": "rcp", "rank": 4, "in_shape": [2, 2, 4], "out_shape": [2, 4, 4]}}
if "rtucker" in available_methods():
    PLANS["rtucker"] = {"block.conv1": {"method": "rtucker", "rank": [3, 2, 3, 2]},
                        "down": {"method": "rtucker", "rank": 2, "in_shape": [4, 4], "out_shape": [4, 8]}}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE])
    env.pop("TENSORSCOPE_MAX_FILE_BYTES", None)
    return env


def _run(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(cwd), env=env if env is not None else _env(), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, f"subprocess failed:\nSTDOUT:\n{res.stdout}\nSTDERR:\n{res.stderr[-4000:]}"
    return res


def _quiet_compress(model, plan, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(model, plan, **kw)


@pytest.fixture(scope="module")
def cnn():
    return archs.small_cnn()


@pytest.fixture(scope="module")
def x():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def compressed(cnn):
    return {name: _quiet_compress(cnn, plan).eval() for name, plan in PLANS.items()}


@pytest.fixture(scope="module")
def good(tmp_path_factory, compressed, x):
    """A valid checkpoint and its expected output: loading it must keep working after failures."""
    path = tmp_path_factory.mktemp("good") / "good.pt"
    model = compressed["svd"]
    save(model, path)
    with torch.no_grad():
        return path, model(x)


def assert_still_loads(good, x):
    path, expected = good
    with torch.no_grad():
        torch.testing.assert_close(load(path)(x), expected, **EXACT)


def _no_temp_files(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.startswith(".tmp-")]


# ---- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(PLANS))
def test_round_trip_in_process(method, compressed, x, tmp_path):
    model = compressed[method]
    path = tmp_path / f"{method}.pt"
    save(model, path, metadata={"note": method})
    loaded = load(path)
    assert not loaded.training
    assert plan_of(loaded) == plan_of(model)
    assert get_arch(loaded) == {"ref": "archs:SmallCNN", "kwargs": {}}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **EXACT)
    # the state dicts are identical, key for key
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a loaded model can be saved again and still loads without arguments
    save(loaded, tmp_path / "again.pt")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "again.pt")(x), model(x), **EXACT)
    info = describe(path)
    assert info["format"] == 1 and info["user"] == {"note": method}
    assert info["plan"] == plan_of(model).to_dict()
    assert info["file"]["tensors"] == len(a)


def test_checkpoint_is_safetensors_without_pickle(compressed, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "m.pt"
    save(compressed["svd"], path)
    raw = path.read_bytes()
    assert not raw.startswith(b"PK") and b"\x80\x02" != raw[:2]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(compressed["svd"].state_dict())
    rec = json.loads(meta["tensorscope"])
    assert {"format", "tensorscope_version", "torch_version", "plan", "arch", "fold_bn", "dtype",
            "created", "user"} <= set(rec)
    assert rec["dtype"] == "float32" and rec["fold_bn"] is False


def test_round_trip_fold_bn(cnn, x, tmp_path):
    model = _quiet_compress(cnn, PLANS["tucker2"], fold_bn=True).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path = tmp_path / "folded.pt"
    save(model, path)
    assert describe(path)["fold_bn"] is True
    loaded = load(path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **EXACT)


def test_factory_with_kwargs_round_trip(tmp_path):
    base = build_arch("archs:make_mlp", {"d_in": 12, "hidden": 10})
    model = _quiet_compress(base, {"fc1": {"method": "svd", "rank": 4}}).eval()
    path = tmp_path / "mlp.pt"
    save(model, path)
    assert describe(path)["arch"] == {"ref": "archs:make_mlp", "kwargs": {"d_in": 12, "hidden": 10}}
    xin = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(load(path)(xin), model(xin), **EXACT)


def test_round_trip_fresh_process(compressed, cnn, x, tmp_path):
    """Every method's checkpoint (plus fold_bn and a kwargs factory) loads in a new process."""
    expected = {}
    for method, model in compressed.items():
        save(model, tmp_path / f"{method}.pt")
        with torch.no_grad():
            expected[method] = model(x)
    folded = _quiet_compress(cnn, PLANS["svd"], fold_bn=True).eval()
    save(folded, tmp_path / "folded.pt")
    mlp = _quiet_compress(build_arch("archs:make_mlp", {"d_in": 12, "hidden": 10}),
                          {"fc1": {"method": "svd", "rank": 4}}).eval()
    save(mlp, tmp_path / "mlp.pt")
    xm = torch.randn(3, 12)
    with torch.no_grad():
        expected["folded"] = folded(x)
        expected["mlp"] = mlp(xm)
    torch.save({"x": x, "xm": xm, **expected}, tmp_path / "expected.pth")
    res = _run(
        f"""
        import sys, torch
        import tensorscope.checkpoint as c
        d = torch.load("expected.pth", weights_only=True)
        names = {sorted(expected)!r}
        for name in names:
            m = c.load(name + ".pt")
            inp = d["xm"] if name == "mlp" else d["x"]
            with torch.no_grad():
                torch.testing.assert_close(m(inp), d[name], rtol={FRESH['rtol']}, atol={FRESH['atol']})
        print("OK", len(names))
        """,
        cwd=tmp_path,
    )
    assert f"OK {len(expected)}" in res.stdout


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = archs.TiedLM().eval()
    path = tmp_path / "tied.pt"
    save(model, path)
    assert describe(path)["aliases"] == {"out.weight": "emb.weight"}
    loaded = load(path)
    assert loaded.out.weight is loaded.emb.weight
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), **EXACT)


def test_dtype_is_kept(tmp_path):
    base = build_arch("archs:make_mlp", {"d_in": 6, "hidden": 8}).double()
    model = _quiet_compress(base, {"fc1": {"method": "svd", "rank": 3}}).eval()
    save(model, tmp_path / "f64.pt")
    assert describe(tmp_path / "f64.pt")["dtype"] == "float64"
    loaded = load(tmp_path / "f64.pt")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    xin = torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xin), model(xin), **EXACT)


def test_model_argument_for_unnamed_architecture(x, tmp_path, good):
    class Local(nn.Module):  # defined here: no importable reference
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, inp):
            return self.fc(self.conv(inp).mean((2, 3)))

    torch.manual_seed(0)
    base = Local().eval()
    assert get_arch(base) is None
    model = _quiet_compress(base, {"conv": {"method": "svd", "rank": 3}}).eval()
    path = tmp_path / "local.pt"
    save(model, path)
    assert describe(path)["arch"] is None
    with pytest.raises(CheckpointError, match="model="):
        load(path)
    template = Local()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    loaded = load(path, model=template)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), **EXACT)
    assert isinstance(template.conv, nn.Conv2d)  # the template is not modified
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())
    # a compressed model is not an architecture to load into (unless it has the same plan)
    other = _quiet_compress(base, {"conv": {"method": "svd", "rank": 2}})
    with pytest.raises(CheckpointError, match="uncompressed"):
        load(path, model=other)
    assert_still_loads(good, x)


def test_arch_argument_overrides(tmp_path):
    base = archs.MLP(6, 8, 3)  # needs arguments: no reference can be inferred
    assert get_arch(base) is None
    save(base, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="arch="):
        load(tmp_path / "plain.pt")
    loaded = load(tmp_path / "plain.pt", arch="archs:make_mlp", arch_kwargs={"d_in": 6, "hidden": 8, "d_out": 3})
    xin = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xin), base(xin), **EXACT)
    # an explicit reference at save time
    save(base, tmp_path / "ref.pt", arch="archs:MLP", arch_kwargs={"d_in": 6, "hidden": 8, "d_out": 3})
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ref.pt")(xin), base(xin), **EXACT)


def test_wrong_architecture_is_a_checkpoint_error(compressed, tmp_path, good, x):
    path = tmp_path / "m.pt"
    save(compressed["tucker2"], path)
    with pytest.raises(CheckpointError, match="does not match"):
        load(path, arch="archs:small_cnn", arch_kwargs={"width": 8})
    with pytest.raises(CheckpointError, match="does not match"):
        load(path, model=archs.TiedLM())  # the plan names layers this model lacks
    assert_still_loads(good, x)


def test_nonfinite_weights_save_and_warn(tmp_path):
    model = archs.MLP(4, 5, 2)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
        model.fc2.bias[0] = float("inf")
    save(model, tmp_path / "nan.pt", arch="archs:MLP", arch_kwargs={"d_in": 4, "hidden": 5, "d_out": 2})
    with pytest.warns(NonFiniteWarning, match="fc1.weight"):
        loaded = load(tmp_path / "nan.pt")
    assert torch.isnan(loaded.fc1.weight[0, 0]) and torch.isinf(loaded.fc2.bias[0])


# ---- export -------------------------------------------------------------------------------


def test_export_loads_with_torch_only(cnn, x, tmp_path):
    plan = {"stem.0": {"method": "svd", "rank": 3}, "block.conv1": {"method": "tucker2", "rank": [8, 8]},
            "block.conv2": {"method": "cp", "rank": 6, "iters": 5, "seed": 0}}
    if "tt" in PLANS:
        plan.update(PLANS["tt"])
    else:
        plan["head"] = {"method": "svd", "rank": 4}
    model = _quiet_compress(cnn, plan).eval()
    ep_path = export(model, tmp_path / "small_export", x)
    assert ep_path == str(tmp_path / "small_export.pt2") and os.path.isfile(ep_path)
    ts_path = export(model, tmp_path / "small.torchscript.pt", x, format="torchscript")
    assert ts_path == str(tmp_path / "small.torchscript.pt")
    x7 = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x), "x7": x7, "y7": model(x7)}, tmp_path / "io.pth")
    env = _env()
    env.pop("PYTHONPATH")  # torch only: tensorscope cannot even be found
    res = _run(
        f"""
        import sys, torch
        d = torch.load("io.pth", weights_only=True)
        tol = dict(rtol={EXPORT['rtol']}, atol={EXPORT['atol']})
        ep = torch.export.load("small_export.pt2").module()
        torch.testing.assert_close(ep(d["x"]), d["y"], **tol)
        torch.testing.assert_close(ep(d["x7"]), d["y7"], **tol)   # dynamic batch
        ts = torch.jit.load("small.torchscript.pt")
        with torch.no_grad():
            torch.testing.assert_close(ts(d["x"]), d["y"], **tol)
        assert "tensorscope" not in sys.modules, "the export imported tensorscope"
        print("OK torch-only")
        """,
        cwd=tmp_path, env=env,
    )
    assert "OK torch-only" in res.stdout
    assert model.training is False


@pytest.mark.parametrize("method", [m for m in ("rcp", "rtucker") if m in PLANS])
def test_export_reshaped_layers(method, compressed, x, tmp_path):
    """The reshaped layers (plain torch ops) run under torch.export and torch.jit.trace."""
    model = compressed[method]
    ep = torch.export.load(export(model, tmp_path / f"{method}_export", x)).module()
    tj = torch.jit.load(export(model, tmp_path / f"{method}.torchscript.pt", x, format="torchscript"))
    x7 = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ep(x), model(x), **EXPORT)
        torch.testing.assert_close(ep(x7), model(x7), **EXPORT)  # dynamic batch
        torch.testing.assert_close(tj(x), model(x), **EXPORT)


def test_export_keyword_inputs_and_target_tuples(tmp_path):
    torch.manual_seed(0)
    model = archs.KwargsNet()
    model.train()
    batch = {"input_ids": torch.randint(0, 30, (3, 5)), "attention_mask": torch.ones(3, 5)}
    path = export(model, tmp_path / "kw.pt2", batch)
    assert model.training  # the training flag is restored
    ep = torch.export.load(path).module()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ep(**batch), model(**batch), **EXPORT)
    ts = export(model, tmp_path / "kw_ts", batch, format="torchscript")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(ts)(**batch), model(**batch), **EXPORT)
    # (inputs, targets): the targets are not inputs
    mlp = archs.MLP(4, 6, 2).eval()
    xin, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    path = export(mlp, tmp_path / "mlp", (xin, y), format="torchscript")
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(path)(xin), mlp(xin), **EXPORT)


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, inp):
        return self.fc(inp) + torch.rand_like(inp)


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, inp):
        return self.fc(inp.reshape(3, 12))  # the batch size is baked in


def test_export_verification_failure_leaves_no_file(tmp_path):
    target = tmp_path / "noisy.pt2"
    target.write_bytes(b"previous")
    for fmt in ("exported_program", "torchscript"):
        with pytest.raises(TensorscopeError, match="does not reproduce"):
            export(_Noisy(), target, torch.randn(3, 4), format=fmt)
        assert target.read_bytes() == b"previous"
        assert _no_temp_files(tmp_path)


def test_export_falls_back_to_static_batch(tmp_path):
    model = _FixedBatch().eval()
    xin = torch.randn(3, 4, 3)
    with pytest.warns(UserWarning, match="dynamic batch"):
        path = export(model, tmp_path / "fixed.pt2", xin)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(xin), model(xin), **EXPORT)


def test_export_onnx_without_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if onnx were not installed
    with pytest.raises(MissingExtraError, match=r"tensorscope\[onnx\]"):
        export(archs.MLP(4, 6, 2), tmp_path / "m.onnx", torch.randn(2, 4), format="onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(TensorscopeError, match="unknown export format"):
        export(archs.MLP(4, 6, 2), tmp_path / "m", torch.randn(2, 4), format="tflite")


# ---- bad files ----------------------------------------------------------------------------


def _rewrite_header(src, dst, mutate) -> None:
    data = open(src, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


def _set_record(header, **changes) -> None:
    rec = json.loads(header["__metadata__"]["tensorscope"])
    rec.update(changes)
    header["__metadata__"]["tensorscope"] = json.dumps(rec)


def test_empty_random_truncated_files(tmp_path, good, x):
    src, _ = good
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(empty)
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError):
        load(rnd)
    with pytest.raises(CheckpointError):
        load_model(rnd, arch="archs:SmallCNN")
    data = src.read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(half)
    tiny = tmp_path / "tiny.pt"
    tiny.write_bytes(data[:5])
    with pytest.raises(CheckpointError):
        load(tiny)
    with pytest.raises(CheckpointError, match="directory"):
        load(tmp_path)
    assert_still_loads(good, x)


def test_lying_headers(tmp_path, good, x):
    src, _ = good
    data = src.read_bytes()
    cases = {}
    # header length larger than the file, and larger than safetensors allows
    (tmp_path / "longer.pt").write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    cases["longer.pt"] = "header"
    (tmp_path / "huge_n.pt").write_bytes((1 << 40).to_bytes(8, "little") + data[8:])
    cases["huge_n.pt"] = "header"
    (tmp_path / "notjson.pt").write_bytes((6).to_bytes(8, "little") + b"{nope}" + b"\0" * 16)
    cases["notjson.pt"] = "not JSON"

    def huge_shape(h):  # declares 40 GB in a tiny file: must not be allocated
        h[_first_tensor(h)]["shape"] = [100_000, 100_000]

    def past_end(h):
        t = h[_first_tensor(h)]
        t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + 10**9]

    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    def bad_dtype(h):
        h[_first_tensor(h)]["dtype"] = "F99"

    def negative(h):
        h[_first_tensor(h)]["shape"] = [-1, 4]

    for name, fn, msg in [("shape.pt", huge_shape, "contradicts"), ("past.pt", past_end, "contradicts|truncated"),
                          ("overlap.pt", overlap, "overlap|gap|contradicts"), ("dtype.pt", bad_dtype, "dtype"),
                          ("neg.pt", negative, "shape")]:
        _rewrite_header(src, tmp_path / name, fn)
        cases[name] = msg
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg):
            load(tmp_path / name)
        with pytest.raises(CheckpointError):
            describe(tmp_path / name)
    assert_still_loads(good, x)


def test_newer_format_and_bad_records(tmp_path, good, x):
    src, _ = good
    _rewrite_header(src, tmp_path / "v999.pt", lambda h: _set_record(h, format=999, tensorscope_version="9.0"))
    with pytest.raises(CheckpointError, match=r"format 999.*9\.0.*[Uu]pgrade tensorscope"):
        load(tmp_path / "v999.pt")
    _rewrite_header(src, tmp_path / "plan.pt", lambda h: _set_record(h, plan={"tensorscope_plan": 1, "layers": 3}))
    with pytest.raises(CheckpointError, match="plan"):
        load(tmp_path / "plan.pt")
    # a plain safetensors file is a state dict, not a tensorscope checkpoint
    _rewrite_header(src, tmp_path / "plain.safetensors", lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match="load_model"):
        load(tmp_path / "plain.safetensors")
    assert_still_loads(good, x)


def test_recorded_reference_is_checked(tmp_path, good, x):
    src, _ = good
    _rewrite_header(src, tmp_path / "nomod.pt",
                    lambda h: _set_record(h, arch={"ref": "no_such_pkg_zz.models:Net", "kwargs": {}}))
    with pytest.raises(ArchitectureError, match="no_such_pkg_zz"):
        load(tmp_path / "nomod.pt")
    marker = tmp_path / "MARKER_ARCH"
    _rewrite_header(src, tmp_path / "gadget.pt", lambda h: _set_record(
        h, arch={"ref": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}))
    with pytest.raises(UntrustedFileError):
        load(tmp_path / "gadget.pt")
    _rewrite_header(src, tmp_path / "gadget2.pt", lambda h: _set_record(
        h, arch={"ref": "torch.hub:load", "kwargs": {"repo_or_dir": str(tmp_path)}}))
    with pytest.raises(UntrustedFileError):
        load(tmp_path / "gadget2.pt")
    assert not marker.exists()
    _rewrite_header(src, tmp_path / "badref.pt", lambda h: _set_record(h, arch={"ref": "os.system('x')", "kwargs": {}}))
    with pytest.raises(CheckpointError):
        load(tmp_path / "badref.pt")
    assert_still_loads(good, x)


def test_size_limits(tmp_path, good, x, monkeypatch):
    src, _ = good
    with pytest.raises(FileTooLargeError, match="max_bytes"):
        load(src, max_bytes=100)
    with pytest.raises(FileTooLargeError):
        describe(src, max_bytes=100)
    with pytest.raises(FileTooLargeError):
        load_model(src, max_bytes=100)
    monkeypatch.setenv("TENSORSCOPE_MAX_FILE_BYTES", "100")
    with pytest.raises(FileTooLargeError):
        load(src)
    monkeypatch.setenv("TENSORSCOPE_MAX_FILE_BYTES", "lots")
    with pytest.raises(CheckpointError, match="TENSORSCOPE_MAX_FILE_BYTES"):
        load(src)
    monkeypatch.delenv("TENSORSCOPE_MAX_FILE_BYTES")
    assert_still_loads(good, x)


def test_zip_bomb_is_refused(tmp_path, good, x):
    bomb = tmp_path / "bomb.pt"
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data.pkl", "w") as f:
            for _ in range(50):  # 50 MB of zeros, about 50 KB compressed
                f.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(FileTooLargeError, match="unpacked"):
        load_model(bomb, arch="archs:SmallCNN", max_bytes=10 << 20)
    assert_still_loads(good, x)


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw_pickle"])
def test_malicious_pickle_never_runs(layout, tmp_path, good, x, monkeypatch):
    marker = tmp_path / "MARKER"
    payload = {"weights": torch.zeros(2), "x": archs.Payload(str(marker))}
    path = tmp_path / f"evil_{layout}.pt"
    if layout == "zip":
        torch.save(payload, path)
    elif layout == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for force in (None, "1"):  # this environment variable must not weaken loading
        if force:
            monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", force)
        with pytest.raises((UntrustedFileError, CheckpointError)) as info:
            load_model(path, arch="archs:SmallCNN")
        if layout == "zip":
            assert isinstance(info.value, UntrustedFileError)
            assert "trust=True" in str(info.value) and "system" in str(info.value)
        with pytest.raises(CheckpointError, match="load_model"):
            load(path)
        with pytest.raises(CheckpointError):
            describe(path)
        assert not marker.exists()
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    assert_still_loads(good, x)


def test_pickle_importing_a_module_never_runs(tmp_path, good, x, monkeypatch):
    marker = tmp_path / "MARKER_IMPORT"
    (tmp_path / "evil_mod_zz.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil_import.pt"
    torch.save({"w": torch.ones(1), "m": archs.ImportPayload("evil_mod_zz")}, path)
    with pytest.raises(UntrustedFileError, match="import_module"):
        load_model(path, arch="archs:SmallCNN")
    with pytest.raises(UntrustedFileError):
        load_model(path)
    assert not marker.exists() and "evil_mod_zz" not in sys.modules
    assert_still_loads(good, x)


def test_whole_module_pickle_needs_trust(cnn, x, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(cnn, path)
    with pytest.raises(UntrustedFileError, match="trust=True"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert isinstance(loaded, archs.SmallCNN) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cnn(x), **EXACT)
    torch.save({"model": cnn, "epoch": 3}, tmp_path / "train_ckpt.pt")  # a module inside a dict
    with pytest.raises(UntrustedFileError):
        load_model(tmp_path / "train_ckpt.pt")
    assert isinstance(load_model(tmp_path / "train_ckpt.pt", trust=True), archs.SmallCNN)


def test_user_state_dicts(cnn, x, tmp_path):
    from safetensors.torch import save_file

    sd = cnn.state_dict()
    layouts = {
        "plain.pth": sd,
        "nested.pt": {"state_dict": sd, "epoch": 4, "optimizer": {"lr": 0.1}},
        "model_key.pt": {"model": sd},
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in [*layouts, "w.safetensors"]:
        m = load_model(tmp_path / name, arch="archs:SmallCNN")
        assert not m.training
        with torch.no_grad():
            torch.testing.assert_close(m(x), cnn(x), **EXACT)
    # an nn.Module instance as the architecture (deep-copied)
    template = archs.SmallCNN()
    m = load_model(tmp_path / "plain.pth", arch=template)
    assert m is not template
    # weights without an architecture
    with pytest.raises(CheckpointError, match="arch="):
        load_model(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="arch="):
        load_model(tmp_path / "w.safetensors")
    # a tensorscope checkpoint goes through load()
    save(cnn, tmp_path / "ts.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ts.pt")(x), cnn(x), **EXACT)
    # no weights: just the architecture
    fresh = load_model(arch="archs:make_mlp", arch_kwargs={"d_in": 3, "hidden": 4})
    assert isinstance(fresh, archs.MLP) and not fresh.training


def test_state_dict_mismatches(cnn, tmp_path, good, x):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in cnn.state_dict().items()}
    missing = {k: v for k, v in sd.items() if not k.startswith("head.")}
    extra = {**sd, "extra.weight": torch.zeros(3)}
    wrong = {**sd, "head.weight": torch.zeros(3, 32)}
    for name, obj, pattern in [("missing", missing, "missing keys: head.weight"),
                               ("extra", extra, "unexpected keys: extra.weight"),
                               ("wrong", wrong, r"wrong shapes: head.weight: file \(3, 32\) vs model \(10, 32\)")]:
        torch.save(obj, tmp_path / f"{name}.pt")
        save_file(obj, str(tmp_path / f"{name}.safetensors"))
        for ext in ("pt", "safetensors"):
            with pytest.raises(CheckpointError, match=pattern) as info:
                load_model(tmp_path / f"{name}.{ext}", arch="archs:SmallCNN")
            assert "does not match" in str(info.value)
    with pytest.warns(UserWarning, match="strict=False"):
        load_model(tmp_path / "missing.pt", arch="archs:SmallCNN", strict=False)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_model(tmp_path / "wrong.pt", arch="archs:SmallCNN", strict=False)
    # a corrupt torch zip
    data = open(tmp_path / "missing.pt", "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "cut.pt", arch="archs:SmallCNN")
    assert_still_loads(good, x)


def test_hugging_face_folder_without_transformers(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"tensorscope\[transformers\]"):
        load_model(folder)


# ---- failed saves -------------------------------------------------------------------------


class _BrokenStateDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def state_dict(self, *args, **kwargs):
        raise RuntimeError("state_dict exploded")


def test_failed_save_leaves_nothing_and_keeps_existing(tmp_path, good, x, compressed, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        save(compressed["svd"], folder)
    assert os.listdir(folder) == [] and _no_temp_files(tmp_path)
    with pytest.raises(TypeError):
        save("not a model", tmp_path / "x.pt")

    target = tmp_path / "existing.pt"
    save(compressed["cp"], target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="exploded"):
        save(_BrokenStateDict(), target)
    assert target.read_bytes() == before and _no_temp_files(tmp_path)

    def half_write(tensors, path, metadata):  # the disk fills up midway
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.format, "_st_save_file", half_write)
    with pytest.raises(OSError, match="No space"):
        save(compressed["svd"], target)
    with pytest.raises(OSError):
        save(compressed["svd"], tmp_path / "new.pt")
    monkeypatch.undo()
    assert target.read_bytes() == before and _no_temp_files(tmp_path)
    assert not (tmp_path / "new.pt").exists()
    with pytest.raises(TypeError, match="JSON"):
        save(compressed["svd"], tmp_path / "meta.pt", metadata={"f": object()})
    assert not (tmp_path / "meta.pt").exists()
    with pytest.raises(CheckpointError, match="differs"):
        save(compressed["svd"], tmp_path / "plan.pt", plan={"head": {"method": "svd", "rank": 2}})
    with torch.no_grad():
        torch.testing.assert_close(load(target)(x), compressed["cp"](x), **EXACT)
    assert_still_loads(good, x)
