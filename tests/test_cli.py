"""The ``tensorscope`` command line: each command works on a built-in example and on a user's
files, and bad input is one line on stderr with exit status 2 and no file written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tensorscope as ts
from tensorscope.cli import EXIT_BAD_INPUT, main
from tensorscope.units import parse_shape

import archs


def run(capsys, *argv):
    rc = main(["-q" if a == "-q" else a for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_examples_lists_the_registry(capsys):
    rc, out, _ = run(capsys, "examples")
    assert rc == 0
    for name in ts.examples.list_examples():
        assert name in out


def test_inspect_table_and_json(capsys):
    rc, out, _ = run(capsys, "inspect", "lenet5", "-q")
    assert rc == 0
    infos = ts.inspect(ts.examples.build_example("lenet5"))
    for i in infos:
        assert i.name in out
    assert "FLOPs per sample" in out
    rc, out, _ = run(capsys, "inspect", "lenet5", "--json", "-q")
    rows = json.loads(out)
    assert [r["name"] for r in rows if r["reason"] is None] == [i.name for i in infos]
    assert all(r["params"] > 0 for r in rows)


def test_compress_keep_writes_a_checkpoint_that_hits_the_budget(capsys, tmp_path):
    out_path, plan_path = tmp_path / "small.pt", tmp_path / "plan.json"
    rc, out, _ = run(capsys, "compress", "lenet5", "--keep", "0.2", "-o", str(out_path),
                     "--plan-out", str(plan_path), "-q")
    assert rc == 0, out
    small = ts.load(out_path)
    original = ts.examples.load_example("lenet5").model
    kept = ts.count_params(small) / ts.count_params(original)
    assert abs(kept / 0.2 - 1) <= 0.02, kept
    assert ts.Plan.load(plan_path) == ts.plan_of(small)
    assert "accuracy" in out  # the example's test split is evaluated


def test_compress_with_a_plan_file_then_export_runs_in_torch(capsys, tmp_path):
    plan = ts.Plan({"features.3": {"method": "tucker2", "rank": [16, 8]}, "classifier.1": {"method": "svd", "rank": 32}})
    plan.save(tmp_path / "plan.json")
    rc, _, err = run(capsys, "compress", "lenet5", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "s.pt"), "-q")
    assert rc == 0, err
    small = ts.load(tmp_path / "s.pt")
    assert ts.plan_of(small) == plan
    rc, out, err = run(capsys, "export", str(tmp_path / "s.pt"), "-o", str(tmp_path / "s.pt2"), "--input-shape", "1,28,28", "-q")
    assert rc == 0, err
    prog = torch.export.load(str(tmp_path / "s.pt2")).module()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(prog(x), small(x), rtol=1e-4, atol=1e-4)
    # a built-in example's architecture knows its input shape; torchscript works too
    rc, _, err = run(capsys, "export", str(tmp_path / "s.pt"), "-o", str(tmp_path / "s.ts"), "--format", "torchscript", "-q")
    assert rc == 0, err
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "s.ts"))(x), small(x), rtol=1e-4, atol=1e-4)


def test_compress_with_data_and_finetune(capsys, tmp_path):
    ex = ts.examples.load_example("lenet5")
    x, y = ex.train.tensors
    torch.save({"x": x[:256], "y": y[:256]}, tmp_path / "calib.pt")
    np.savez(tmp_path / "eval.npz", inputs=ex.test.tensors[0][:200].numpy())  # no labels: agreement
    rc, out, err = run(capsys, "compress", "lenet5", "--keep", "0.1", "--data", str(tmp_path / "calib.pt"),
                       "--finetune", "20", "--eval", str(tmp_path / "eval.npz"), "-o", str(tmp_path / "s.pt"), "-q")
    assert rc == 0, err
    assert "agreement with the original" in out
    assert ts.count_params(ts.load(tmp_path / "s.pt")) < 0.11 * ts.count_params(ex.model)


def test_spectra_table_and_png(capsys, tmp_path):
    png = tmp_path / "s.png"
    rc, out, _ = run(capsys, "spectra", "resnet8", "--plot", str(png), "-q")
    assert rc == 0
    assert "layer1.conv1" in out and "stable rank" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, _ = run(capsys, "spectra", "lenet5", "--json", "-q")
    doc = json.loads(out)
    s = ts.spectrum(ts.examples.load_example("lenet5").model, "classifier.1")
    np.testing.assert_allclose(doc["classifier.1"]["values"], s.values, rtol=1e-6)


def test_user_state_dict_with_an_architecture(capsys, tmp_path):
    model = archs.small_cnn()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rc, out, err = run(capsys, "inspect", str(tmp_path / "w.pt"), "--arch", "archs:small_cnn", "--input-shape", "3,16,16", "-q")
    assert rc == 0, err
    for i in ts.inspect(model):
        assert i.name in out
    # without --arch: told what to pass
    rc, _, err = run(capsys, "inspect", str(tmp_path / "w.pt"), "-q")
    assert rc == EXIT_BAD_INPUT and "--arch" not in err and "arch=" in err


def test_one_shape_parser_for_the_cli_and_the_explorer():
    for text in ("3,32,32", "3x32x32", " (3, 32, 32) ", "[3,32,32]", "3,32,32,"):
        assert parse_shape(text) == (3, 32, 32)
    for bad, words in (("", "empty"), ("()", "empty"), ("3,a", "integers"), ("1,-2", "positive"), ("0", "positive")):
        with pytest.raises(ts.DataError, match=words):
            parse_shape(bad, "--input-shape")
    with pytest.raises(ts.DataError, match="at most"):
        parse_shape("1000,1000,1000", max_numel=10_000_000)
    # the explorer's input-shape field reads it too
    from tensorscope.explorer import ExplorerState

    s = ExplorerState()
    s.input_shape = "1,a"
    assert not s.use_eval("none") and "integers" in s.error
    s.close()


@pytest.mark.parametrize("case", ["random_bytes", "empty", "bad_plan", "unreachable_keep", "missing_file",
                                  "bad_shape", "pickle"])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(capsys, tmp_path, case):
    out = tmp_path / "out.pt"
    marker = tmp_path / "MARKER"
    if case == "random_bytes":
        (tmp_path / "m.pt").write_bytes(os.urandom(300))
        argv = ["compress", str(tmp_path / "m.pt"), "--keep", "0.5", "-o", str(out)]
    elif case == "empty":
        (tmp_path / "m.pt").write_bytes(b"")
        argv = ["compress", str(tmp_path / "m.pt"), "--keep", "0.5", "-o", str(out)]
    elif case == "bad_plan":
        (tmp_path / "p.json").write_text('{"tensorscope_plan": 1, "layers": {"features.3": {"method": "svd", "rank": 0}}}')
        argv = ["compress", "lenet5", "--plan", str(tmp_path / "p.json"), "-o", str(out)]
    elif case == "unreachable_keep":
        argv = ["compress", "lenet5", "--keep", "0.0001", "-o", str(out)]
    elif case == "missing_file":
        argv = ["inspect", str(tmp_path / "nope.pt")]
    elif case == "bad_shape":
        argv = ["export", "lenet5", "-o", str(out), "--input-shape", "1,-2"]
    else:  # a pickle that would run code: refused without --trust, marker never written
        torch.save({"w": torch.zeros(2), "x": archs.Payload(str(marker))}, tmp_path / "evil.pt")
        argv = ["inspect", str(tmp_path / "evil.pt")]
    rc, _, err = run(capsys, *argv, "-q")
    assert rc == EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorscope ") and "error:" in lines[0], err
    assert not out.exists()
    assert not marker.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_the_installed_entry_point_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "tensorscope")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "tensorscope.cli"]
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and ts.__version__ in r.stdout
