"""Models larger than memory: weights streamed from disk, compressed a layer at a time into a
resumable folder of shards, loaded back, and the same work spread over processes by torchrun.

Everything streamed is compared with the in-memory result on the same small models saved
as 3 shards: same singular values, same plan, same factors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tensorscope as ts
from tensorscope import distributed, streaming
from tensorscope.cli import main
from tensorscope.errors import CheckpointError, PlanError, TensorscopeError
from tensorscope.sources import INDEX_NAME, open_source

import stream_helpers as helpers
from stream_helpers import MLP_PLAN, ConvNet, make_data, make_mlp, write_shards

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama and its Hugging Face folder: config.json, 3 shards and their index."""
    model = _llama()
    folder = tmp_path_factory.mktemp("llama") / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size="75KB")
    shards = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    assert len(shards) == 3 and (folder / INDEX_NAME).exists()
    return model, str(folder)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    model = make_mlp()
    folder = tmp_path_factory.mktemp("mlp") / "model"
    return model, write_shards(model.state_dict(), str(folder), 3)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    src = open_source(folder)
    return {k: src.read(k).clone() for k in src.entries}


def _digest(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256((Path(folder) / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return float((a.double() - b.double()).norm()) <= rel * max(float(b.double().norm()), 1e-30)


# ---- streamed equals in memory ------------------------------------------------------------


def test_streamed_inspect_spectra_plan_and_factors_equal_in_memory(llama, tmp_path):
    model, folder = llama
    a, b = ts.inspect(folder), ts.inspect(model)
    assert [(i.name, i.weight_shape, i.params, i.max_rank) for i in a] == \
           [(i.name, i.weight_shape, i.params, i.max_rank) for i in b]
    skipped = {i.name: i.reason for i in a.skipped}
    assert "embedding" in skipped["model.embed_tokens"] and "norm" in skipped["model.norm"]

    sa, sb = ts.spectra(folder), ts.spectra(model)
    assert list(sa) == list(sb)
    for n in sb:
        assert np.allclose(sa[n].values, sb[n].values, rtol=1e-6, atol=1e-6 * sb[n].values.max())

    pa, pb = ts.plan_for_budget(folder, keep=0.5), ts.plan_for_budget(model, keep=0.5)
    assert pa == pb and len(pa) >= 5

    out = ts.compress(folder, pa, out=tmp_path / "small", shard_bytes=30_000)
    small = ts.compress(model, pa)
    got, want = _tensors(out), small.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert _close(got[k], want[k]), k
    assert ts.Plan.load(tmp_path / "small" / "plan.json") == pa
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 3  # shards of bounded size

    loaded = ts.load(out)  # the architecture from the folder's config.json
    assert ts.plan_of(loaded) == pa
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, small(x).logits, atol=1e-5)


def test_plain_torch_model_on_disk_with_arch_and_export(mlp, tmp_path):
    model, folder = mlp
    plan = ts.plan_for_budget(folder, keep=0.6)
    assert plan == ts.plan_for_budget(model, keep=0.6)
    out = ts.compress(folder, plan, out=tmp_path / "small", arch="stream_helpers:MLP")
    with pytest.raises(TypeError, match="out="):
        ts.compress(folder, plan)
    loaded = ts.load(out)  # the recorded reference rebuilds the architecture
    small = ts.compress(model, plan)
    x = make_data(1)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), small(x), atol=1e-5)
    ts.export(loaded, tmp_path / "small.pt2", example_input=x)
    exported = torch.export.load(str(tmp_path / "small.pt2")).module()
    assert torch.allclose(exported(x), small(x), atol=1e-5)
    assert main(["export", str(out), "-o", str(tmp_path / "cli.pt2"), "--input-shape", "32", "-q"]) == 0
    assert main(["inspect", str(out), "-q"]) == 0  # a compressed folder loads whole, as a checkpoint does
    # without a recorded architecture, arch= or model= names it
    out2 = ts.compress(folder, plan, out=tmp_path / "small2")
    with pytest.raises(CheckpointError, match="records no architecture"):
        ts.load(out2)
    assert torch.allclose(ts.load(out2, arch="stream_helpers:MLP")(x), small(x), atol=1e-5)
    assert torch.allclose(ts.load(out2, model=helpers.MLP())(x), small(x), atol=1e-5)


def test_conv_layers_and_a_single_file(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    path = tmp_path / "conv.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert [i.name for i in ts.inspect(path)] == [i.name for i in ts.inspect(model)]
    plan = ts.plan_for_budget(path, keep=0.5)
    assert plan == ts.plan_for_budget(model, keep=0.5)
    out = ts.compress(path, plan, out=tmp_path / "small")
    got, want = _tensors(out), ts.compress(model, plan).state_dict()
    assert set(got) == set(want) and all(_close(got[k], want[k], 1e-5) for k in want)


def test_gpt2_conv1d_is_read_transposed(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    infos = ts.inspect(folder).by_name()
    attn = infos["transformer.h.0.attn.c_attn"]  # Conv1D(nf=96, nx=32): weight stored 32 x 96
    assert attn.kind == "Linear" and attn.weight_shape == (96, 32) and attn.max_rank["svd"] == 32
    plan = {n: {"method": "svd", "rank": 1.0} for n in infos}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)  # full rank: exact, and larger
        out = ts.compress(folder, plan, out=tmp_path / "small")
    loaded = ts.load(out)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-4)


# ---- resuming -------------------------------------------------------------------------------


def test_a_killed_run_resumes_and_equals_an_uninterrupted_one(llama, tmp_path, monkeypatch):
    _, folder = llama
    plan = ts.plan_for_budget(folder, keep=0.5)
    whole = ts.compress(folder, plan, out=tmp_path / "whole", shard_bytes=4_000)

    out = tmp_path / "resumed"
    real, calls = streaming._do_item, []

    def killed_at_the_6th(run, it, *args, **kwargs):
        calls.append(it.id)
        if len(calls) == 6:
            raise KeyboardInterrupt  # as if killed in the middle of a shard
        return real(run, it, *args, **kwargs)

    monkeypatch.setattr(streaming, "_do_item", killed_at_the_6th)
    with pytest.raises(KeyboardInterrupt):
        ts.compress(folder, plan, out=out, shard_bytes=4_000)
    names = os.listdir(out)
    assert INDEX_NAME not in names and not any(".partial" in n for n in names)
    done = [n for n in names if n.endswith(".safetensors")]
    assert len(done) >= 2  # some shards were complete before the kill
    # a half-written shard (a kill inside write) and a truncated one are never taken for whole
    (out / ".model-0123456789abcdef.safetensors.partial-1").write_bytes(b"\x00" * 100)
    victim = out / done[0]
    victim.write_bytes(victim.read_bytes()[:-7])

    monkeypatch.setattr(streaming, "_do_item", real)
    resumed_calls = []
    monkeypatch.setattr(streaming, "_do_item", lambda run, it, *a, **k: (resumed_calls.append(it.id),
                                                                          real(run, it, *a, **k))[1])
    ts.compress(folder, plan, out=out, shard_bytes=4_000)
    total = len(streaming._prepare(folder, plan, out, stats=None, refine=True, arch=None, arch_kwargs=None,
                                   shard_bytes=4_000).items)
    assert 0 < len(resumed_calls) < total  # only what was not done
    assert not any(".partial" in n for n in os.listdir(out))
    a, b = _tensors(str(out)), _tensors(whole)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # finished: running again does nothing
    resumed_calls.clear()
    ts.compress(folder, plan, out=out, shard_bytes=4_000)
    assert resumed_calls == []


# ---- bad input ------------------------------------------------------------------------------


def _bad_copy(folder: str, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(folder, bad)
    index = json.loads((bad / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    if how == "missing shard":
        os.remove(bad / shard)
    elif how == "index names a tensor no shard holds":
        index["weight_map"]["layers.9.weight"] = shard
        (bad / INDEX_NAME).write_text(json.dumps(index))
    elif how == "truncated shard":
        data = (bad / shard).read_bytes()
        (bad / shard).write_bytes(data[:-50])
    elif how == "header lies about sizes":
        data = (bad / shard).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["shape"] = [d + 1 for d in header[key]["shape"]]
        raw = json.dumps(header).encode()
        (bad / shard).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    elif how == "mixed dtypes":
        sd = make_mlp().state_dict()
        sd["layers.2.weight"] = sd["layers.2.weight"].double()
        shutil.rmtree(bad)
        write_shards(sd, str(bad), 3)
    return bad


@pytest.mark.parametrize("how, match", [
    ("missing shard", "missing shard"),
    ("index names a tensor no shard holds", "does not hold it"),
    ("truncated shard", "truncated"),
    ("header lies about sizes", "contradicts itself"),
    ("mixed dtypes", "mixes floating-point dtypes"),
])
def test_bad_weights_are_one_clear_error_and_nothing_is_written(mlp, tmp_path, how, match):
    _, folder = mlp
    bad = _bad_copy(folder, tmp_path, how)
    before = _digest(str(bad))
    out = tmp_path / "out"
    for call in (lambda: ts.compress(bad, MLP_PLAN, out=out), lambda: ts.spectra(bad), lambda: ts.inspect(bad),
                 lambda: ts.plan_for_budget(bad, keep=0.5)):
        with pytest.raises(CheckpointError, match=match):
            call()
    assert not out.exists() and _digest(str(bad)) == before
    assert main(["compress", str(bad), "--keep", "0.5", "-o", str(out), "-q"]) == 2
    assert not out.exists()


def test_a_plan_naming_what_is_not_there_and_resume_mismatches(mlp, tmp_path):
    _, folder = mlp
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="plan names layer 'layers.9'"):
        ts.compress(folder, {"layers.9": {"method": "svd", "rank": 2}}, out=out)
    with pytest.raises(PlanError, match="norm"):  # there, but not a layer to decompose
        ts.compress(folder, {"norm": {"method": "svd", "rank": 2}}, out=out)
    assert not out.exists()
    # a run killed half-way, resumed with another plan: refused before any new shard
    real = streaming._do_item
    calls = []

    def killed(run, it, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(run, it, *a, **k)

    streaming._do_item = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            ts.compress(folder, MLP_PLAN, out=out, shard_bytes=1)
    finally:
        streaming._do_item = real
    before = _digest(str(out))
    other = {**MLP_PLAN, "layers.0": {"method": "svd", "rank": 5}}
    with pytest.raises(CheckpointError, match="different compression.*plan"):
        ts.compress(folder, other, out=out, shard_bytes=1)
    assert _digest(str(out)) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        ts.compress(folder, MLP_PLAN, out=tmp_path / "full")
    with pytest.raises(CheckpointError, match="holds the weights being read"):
        ts.compress(folder, MLP_PLAN, out=folder)


def test_an_error_in_any_process_is_named_on_every_process():
    ctx = distributed.Context(rank=0, world=3)
    ctx.gather = lambda obj, what="": [None, "DecompositionError: layer 'x': boom", None]
    with pytest.raises(distributed.DistributedError, match=r"process 1 of 3: DecompositionError: layer 'x'"):
        ctx.agree(None, "compressing")
    assert distributed.bin_pack([1, 5, 2, 2], 2) == [1, 0, 1, 1]  # loads 5 and 5
    assert distributed.bin_pack([3.0, 3.0, 3.0], 1) == [0, 0, 0]


# ---- command line ---------------------------------------------------------------------------


def test_cli_streams_weights_on_disk(llama, tmp_path, capsys):
    _, folder = llama
    assert main(["spectra", folder, "-q"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "stable rank" in text
    assert main(["inspect", folder, "-q"]) == 0
    assert "left alone: model.embed_tokens" in capsys.readouterr().out
    out = tmp_path / "small"
    assert main(["compress", folder, "--keep", "0.5", "-o", str(out), "-q"]) == 0
    assert f"{len(ts.plan_for_budget(folder, keep=0.5))} layers decomposed" in capsys.readouterr().out
    assert ts.plan_of(ts.load(out)) == ts.plan_for_budget(folder, keep=0.5)


# ---- torchrun -------------------------------------------------------------------------------


def test_two_processes_under_torchrun_equal_one_and_a_dead_one_is_named(mlp, tmp_path):
    """2 processes (gloo): the same statistics and factors as one process; one of them dies
    half-way (the run fails naming it), and rerunning resumes."""
    model, folder = mlp
    out, stats_path = tmp_path / "dist", tmp_path / "stats.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}

    def launch(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(TESTS / "stream_helpers.py"), "worker", folder, str(out), str(stats_path), mode],
            env=env, capture_output=True, text=True, timeout=120)

    died = launch("die")
    assert died.returncode != 0
    report = died.stdout + died.stderr
    assert "rank      : 1" in report and "exitcode  : 3" in report  # torchrun names the process
    assert not (out / INDEX_NAME).exists()
    assert any(n.endswith(".safetensors") for n in os.listdir(out))  # process 1's first shard is whole
    finished = launch("ok")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "process 0: done" in finished.stdout and "process 1: done" in finished.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same LAPACK paths
    try:
        want = ts.collect_stats(model, make_data(), list(MLP_PLAN))
        got = torch.load(stats_path)
        for n, s in want.items():
            assert got[n][1] == s.count and _close(got[n][0], s.patch), n
        ref = ts.compress(folder, MLP_PLAN, out=tmp_path / "one", stats=want)
    finally:
        torch.set_num_threads(threads)
    a, b = _tensors(str(out)), _tensors(ref)
    assert set(a) == set(b)
    for k in b:
        assert _close(a[k], b[k]), k
