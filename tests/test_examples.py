"""The built-in example networks: registry, data split, training, cache.

Training all three examples once (a session fixture, in a temporary cache folder) is the
expensive part; every other test either reuses those results or replaces the training
function with a fast stand-in.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import tensorscope.examples as E
from tensorscope._arch import build_arch, get_arch
from tensorscope.evaluate import evaluate

TARGETS = {"lenet5": 0.97, "mlp": 0.95, "resnet8": 0.97, "tower": 0.97}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Each example trained once into a fresh cache folder: {name: (Example, progress calls)}."""
    cache = tmp_path_factory.mktemp("examples-cache")
    out = {}
    threads = torch.get_num_threads()
    for name in E.list_examples():
        calls: list[tuple[float, str]] = []
        ex = E.load_example(name, cache_dir=cache, progress=lambda f, m: calls.append((f, m)))
        out[name] = (ex, calls)
    assert torch.get_num_threads() == threads  # training runs on one thread, then restores
    return cache, out


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by building the untrained network; counts the calls per name."""
    counts: dict[str, int] = {}

    def fake(info, train, progress):
        counts[info.name] = counts.get(info.name, 0) + 1
        if callable(progress):
            progress(0.5, "fake training")
        return E.build_example(info.name).eval()

    monkeypatch.setattr(E, "_train", fake)
    return counts


# --------------------------------------------------------------------------- registry and nets


def test_registry_lists_the_three():
    assert {"lenet5", "mlp", "resnet8"} <= set(E.list_examples())
    info = E.example_info("lenet5")
    assert info.input_shape == (1, 28, 28) and info.description
    with pytest.raises(KeyError, match="known examples"):
        E.example_info("alexnet")
    with pytest.raises(ValueError, match="already registered"):
        E.register_example("mlp", description="again", input_shape=(1,))(E.mlp)


@pytest.mark.parametrize("name", ["lenet5", "mlp", "resnet8"])
def test_build_is_deterministic_and_names_its_architecture(name):
    state = torch.get_rng_state()
    a, b = E.build_example(name), E.build_example(name)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    info = E.example_info(name)
    x = torch.randn(3, *info.input_shape)
    assert a(x).shape == (3, 10)
    arch = get_arch(a)
    assert arch == {"ref": f"tensorscope.examples:{name}", "kwargs": {}}
    rebuilt = build_arch(arch["ref"])
    assert type(rebuilt) is type(a)


def test_layer_names_are_readable():
    lenet = dict(E.build_example("lenet5").named_modules())
    assert isinstance(lenet["features.0"], torch.nn.Conv2d) and lenet["features.0"].out_channels == 20
    assert isinstance(lenet["features.3"], torch.nn.Conv2d) and lenet["features.3"].out_channels == 50
    assert lenet["classifier.1"].in_features == 800 and lenet["classifier.1"].out_features == 500
    assert lenet["classifier.3"].out_features == 10
    mlp = dict(E.build_example("mlp").named_modules())
    assert [mlp[n].out_features for n in ("fc1", "fc2", "fc3")] == [1024, 1024, 10]
    res = dict(E.build_example("resnet8").named_modules())
    assert isinstance(res["layer2.shortcut.0"], torch.nn.Conv2d)
    assert res["layer2.shortcut.0"].stride == (2, 2)
    assert isinstance(res["layer1.shortcut"], torch.nn.Identity)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in res.values())
    assert res["fc"].in_features == 64


# --------------------------------------------------------------------------- data


def test_mnist_splits_are_seeded_disjoint_and_balanced():
    train, test = E.mnist_splits()
    (xt, yt), (xs, ys) = train.tensors, test.tensors
    assert xt.shape == (4000, 1, 28, 28) and xs.shape == (1000, 1, 28, 28)
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    # normalized pixels: background is (0 - mean) / std, the ink reaches (1 - mean) / std
    assert_close(xt.min(), torch.tensor((0 - 0.1307) / 0.3081))
    assert_close(xt.max(), torch.tensor((1 - 0.1307) / 0.3081))
    assert abs(float((xt * 0.3081 + 0.1307).mean()) - 0.13) < 0.02
    # disjoint: no test image is a training image
    rows = {bytes(r.numpy().tobytes()) for r in xt.reshape(4000, -1)}
    assert not any(bytes(r.numpy().tobytes()) in rows for r in xs.reshape(1000, -1))
    # shuffled (the source is sorted by class) and roughly balanced
    assert torch.bincount(ys, minlength=10).min() >= 70 and torch.bincount(ys).max() <= 130
    assert torch.bincount(yt, minlength=10).min() >= 340 and torch.bincount(yt).max() <= 460
    assert (yt[:100].unique().numel()) == 10
    # seeded: the same split again, another one for another seed; new tensors each call
    train2, _ = E.mnist_splits()
    assert torch.equal(train2.tensors[0], xt) and torch.equal(train2.tensors[1], yt)
    assert train2.tensors[0] is not xt
    other, _ = E.mnist_splits(seed=1)
    assert not torch.equal(other.tensors[1], yt)


# --------------------------------------------------------------------------- trained examples


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "mlp", "resnet8", "tower"])
def test_trained_examples_reach_their_accuracy(trained, name):
    cache, results = trained
    ex, calls = results[name]
    assert not ex.from_cache and ex.path == E.cache_path(name, cache) and ex.path.exists()
    assert ex.accuracy >= TARGETS[name], (name, ex.accuracy)
    assert not ex.model.training
    # the reported accuracy is the test set's, measured through the public evaluate
    r = evaluate(ex.model, ex.test_loader(batch_size=100))
    assert r["samples"] == 1000 and r["accuracy"] == pytest.approx(ex.accuracy)
    # progress: starts at 0, never goes back, ends at exactly 1.0, with messages
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(a <= b for a, b in zip(fractions, fractions[1:]))
    assert len(fractions) > 10 and all(isinstance(m, str) and m for _, m in calls)
    print(f"{name}: test accuracy {ex.accuracy:.4f}, trained in {ex.train_seconds:.1f} s")


@pytest.mark.slow
def test_example_helpers(trained):
    ex = trained[1]["lenet5"][0]
    assert ex.input_shape == (1, 28, 28) and ex.name == "lenet5" and ex.description
    batches = list(ex.calibration(n=100))
    assert all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches)
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, ex.train.tensors[0][:100])
    assert ex.example_input(3).shape == (3, 1, 28, 28)
    assert sum(len(b[1]) for b in ex.test_loader()) == 1000
    first = [b[1] for b in ex.train_loader(batch_size=500, shuffle=True)]
    again = [b[1] for b in ex.train_loader(batch_size=500, shuffle=True)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(torch.cat(first), ex.train.tensors[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "mlp", "resnet8"])
def test_second_load_comes_from_the_cache(trained, name, monkeypatch):
    cache, results = trained
    first = results[name][0]

    def no_training(*a, **k):
        raise AssertionError("trained although the cache holds the weights")

    monkeypatch.setattr(E, "_train", no_training)
    mtime = first.path.stat().st_mtime_ns
    calls = []
    ex = E.load_example(name, cache_dir=cache, progress=lambda f, m: calls.append(f))
    assert ex.from_cache and ex.train_seconds == 0.0
    assert first.path.stat().st_mtime_ns == mtime
    assert ex.accuracy == pytest.approx(first.accuracy)
    for (k, v), (k2, v2) in zip(ex.model.state_dict().items(), first.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert calls[-1] == 1.0
    # the environment variable names the default folder
    monkeypatch.setenv("TENSORSCOPE_CACHE_DIR", str(cache))
    assert E.load_example(name).from_cache


@pytest.mark.slow
def test_corrupt_cache_is_retrained_deterministically(trained, tmp_path):
    """Retraining into another folder gives bit-identical weights; a corrupt file warns."""
    ref = trained[1]["mlp"][0]
    path = E.cache_path("mlp", tmp_path)
    path.write_bytes(b"\x00garbage, not safetensors" * 10)
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        ex = E.load_example("mlp", cache_dir=tmp_path, progress=lambda f, m: None)
    assert not ex.from_cache
    for (k, v), (k2, v2) in zip(ex.model.state_dict().items(), ref.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), f"training is not deterministic: {k} differs"
    assert ex.accuracy == ref.accuracy
    # the file was overwritten with a good one, and no temporary file is left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E._load_cached(E.build_example("mlp"), path, E.example_info("mlp").recipe) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --------------------------------------------------------------------------- cache mechanics (no real training)


def test_cached_file_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    recipe = E.example_info("mlp").recipe
    good = tmp_path / "good.safetensors"
    E._save_atomic(E.build_example("mlp").state_dict(), good, {"recipe": recipe})
    assert E._load_cached(E.build_example("mlp"), good, recipe) is None
    state = E.build_example("mlp").state_dict()
    bad = tmp_path / "bad.safetensors"
    state["fc1.weight"] = torch.zeros(3, 3)
    save_file(state, str(bad), metadata={"recipe": recipe})
    assert "fc1.weight" in E._load_cached(E.build_example("mlp"), bad, recipe)
    state = E.build_example("mlp").state_dict()
    state["fc2.bias"][0] = float("nan")
    save_file(state, str(bad), metadata={"recipe": recipe})
    assert "NaN" in E._load_cached(E.build_example("mlp"), bad, recipe)
    # weights made by an older recipe are not reused
    save_file(E.build_example("mlp").state_dict(), str(bad), metadata={"recipe": "old"})
    assert "recipe" in E._load_cached(E.build_example("mlp"), bad, recipe)
    assert E._load_cached(E.build_example("mlp"), tmp_path / "missing.safetensors", recipe)


def test_wrong_network_in_cache_is_retrained(tmp_path, fake_training):
    from safetensors.torch import save_file

    path = E.cache_path("mlp", tmp_path)
    save_file(E.build_example("lenet5").state_dict(), str(path), metadata={"recipe": E.example_info("mlp").recipe})
    with pytest.warns(RuntimeWarning, match="keys differ"):
        ex = E.load_example("mlp", cache_dir=tmp_path)
    assert fake_training == {"mlp": 1} and not ex.from_cache
    assert E.load_example("mlp", cache_dir=tmp_path).from_cache
    assert fake_training == {"mlp": 1}
    E.load_example("mlp", cache_dir=tmp_path, retrain=True)
    assert fake_training == {"mlp": 2}


def test_concurrent_loads_train_once_and_write_whole_files(tmp_path, monkeypatch):
    started = threading.Event()
    counts = []

    def slow_fake(info, train, progress):
        counts.append(info.name)
        started.set()
        threading.Event().wait(0.3)  # long enough for the other thread to arrive
        return E.build_example(info.name).eval()

    monkeypatch.setattr(E, "_train", slow_fake)
    results, errors = [], []

    def load():
        try:
            results.append(E.load_example("mlp", cache_dir=tmp_path, progress=lambda f, m: None))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert counts == ["mlp"]  # one thread trained, the others waited and read the cache
    assert sorted(r.from_cache for r in results) == [False, True, True]
    assert [p.name for p in tmp_path.iterdir()] == ["mlp-v1.safetensors"]


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = tmp_path / "x.safetensors"
    E._save_atomic({"a": torch.ones(2)}, path, {"recipe": "r"})
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        E._save_atomic({"a": torch.zeros(2)}, path, {"recipe": "r"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_unwritable_cache_only_warns(tmp_path, fake_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not cache"):
        ex = E.load_example("lenet5", cache_dir=blocker / "sub")
    assert ex.model is not None and not ex.from_cache


def test_cache_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORSCOPE_CACHE_DIR", str(tmp_path / "env"))
    assert E.cache_path("mlp") == tmp_path / "env" / "mlp-v1.safetensors"
    assert E.cache_path("mlp", tmp_path / "arg") == tmp_path / "arg" / "mlp-v1.safetensors"
    monkeypatch.delenv("TENSORSCOPE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert E.resolve_cache_dir() == tmp_path / "xdg" / "tensorscope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert E.resolve_cache_dir() == Path.home() / ".cache" / "tensorscope"


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
