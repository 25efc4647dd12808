"""Data-aware factorization (whitening by input statistics) and recovery."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import tensorscope as ts
from tensorscope.calibration import collect_stats
from tensorscope.linalg import whitened_svd
from tensorscope.methods import get_method
from tensorscope.recovery import dense_weight


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs living mostly in a few directions, as real activations do."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g)
    scales = torch.logspace(0, -3, d)
    return (torch.randn(n, d, generator=g) * scales) @ basis


def output_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).pow(2).sum())


def test_whitened_svd_beats_plain_and_equals_whitened_tail():
    torch.manual_seed(0)
    layer = nn.Linear(32, 24).double()
    x = correlated_inputs(512, 32).double()
    model = nn.Sequential(layer)
    stats = collect_stats(model, [x], ["0"])["0"]
    stats.ridge = 0.0  # the identity below is exact without a ridge
    stats._memo.clear()
    m = get_method("svd")
    _, s, _ = whitened_svd(layer, stats)
    for r in (2, 6, 12):
        plain = m.decompose(layer, r)
        aware = m.build(layer, m.factorize(layer, r, stats=stats))
        e_plain, e_aware = output_error(plain, layer, x), output_error(aware, layer, x)
        assert e_aware <= e_plain + 1e-9
        # the discarded output energy is the tail of the whitened spectrum (C = X^T X / n)
        assert e_aware / x.shape[0] == pytest.approx(float(s[0, r:].pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("method", [n for n in ts.available_methods() if get_method(n).uses_data])
def test_data_aware_methods_exact_at_full_rank(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2)).double()
    data = [torch.randn(4, 3, 10, 10, dtype=torch.float64) for _ in range(3)]
    plan = ts.Plan({"0": {"method": method, "rank": 1.0}, "2": {"method": method, "rank": 1.0}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(net, plan, data=data)
    with torch.no_grad():
        assert_close(small(data[0]), net(data[0]), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_data_aware_conv_methods_reduce_output_error(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False).double()
    # inputs whose channels are strongly correlated
    mix = torch.randn(16, 4, dtype=torch.float64)
    x = torch.einsum("ck,bkhw->bchw", mix, torch.randn(32, 4, 8, 8, dtype=torch.float64))
    x = x + 0.01 * torch.randn_like(x)
    net = nn.Sequential(conv)
    rank = [6, 3] if method == "tucker2" else 6
    plain = ts.compress(net, {"0": {"method": method, "rank": rank}})
    aware = ts.compress(net, {"0": {"method": method, "rank": rank}}, data=[x])
    assert output_error(aware, net, x) < output_error(plain, net, x)


def test_statistics_do_not_depend_on_batching():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    x = torch.randn(20, 3, 6, 6)
    one = collect_stats(net, [x], ["0", "3"])
    ten = collect_stats(net, DataLoader(TensorDataset(x), batch_size=2), ["0", "3"])
    for n in ("0", "3"):
        assert one[n].count == ten[n].count
        assert_close(one[n].patch, ten[n].patch, rtol=1e-10, atol=1e-10)


def test_calibration_data_errors():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ts.DataError):
        collect_stats(net, [], ["0"])
    with pytest.raises(ts.DataError):
        ts.compress(net, {"0": {"method": "svd", "rank": 2}}, data=["not a batch"])


@pytest.mark.parametrize("method", ts.available_methods())
def test_dense_weight_probe_recovers_the_chain(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(2, 1), bias=True)
    m = get_method(method)
    chain = m.decompose(conv, m.resolve_rank(ts.LayerGeometry.of(conv), 0.5))
    w = dense_weight(chain, conv)
    ref = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(2, 1))
    ref.weight.data, ref.bias.data = w, conv.bias.data
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert_close(ref(x), chain(x), rtol=1e-4, atol=1e-5)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), (xtr, ytr), (xte, yte)


def test_finetune_and_layerwise_refinement_recover(digits_mlp):
    model, (xtr, ytr), (xte, yte) = digits_mlp
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=128)
    test = [(xte, yte)]
    plan = ts.Plan({"0": {"method": "svd", "rank": 4}, "2": {"method": "svd", "rank": 4}})
    small = ts.compress(model, plan)
    base = ts.evaluate(small, test, reference=model)
    refined = ts.refine_layerwise(small, model, [x for x, _ in train], steps=60)
    r = ts.evaluate(refined, test, reference=model)
    assert r["relative_error"] <= base["relative_error"] + 1e-6
    unlabeled = [x for x, _ in train]  # no labels: distillation from the teacher
    tuned = ts.finetune(small, unlabeled, teacher=model, steps=150, lr=3e-3)
    t = ts.evaluate(tuned, test, reference=model)
    assert t["agreement"] >= base["agreement"]
    assert ts.count_params(tuned) == ts.count_params(small)
    # the input model is not modified
    assert ts.evaluate(small, test, reference=model) == base
    with pytest.raises(ts.DataError, match="labels"):
        ts.finetune(small, unlabeled, steps=1)


def test_iterative_returns_history(digits_mlp):
    model, (xtr, ytr), (xte, yte) = digits_mlp
    data = DataLoader(TensorDataset(xtr, ytr), batch_size=200)
    small, history = ts.iterative(model, data, keep=0.3, steps=2, finetune_steps=30, val_data=[(xte, yte)])
    assert len(history) == 2
    assert history[0].keep > history[1].keep
    assert abs(ts.count_params(small) / ts.count_params(model) - 0.3) < 0.02
    assert all("accuracy" in s.after and "agreement" in s.after for s in history)


def test_stop_ends_finetune_and_iterative_where_asked(digits_mlp):
    """A Stop button: fine-tuning keeps its best weights so far; iterative keeps the stages done."""
    model, (xtr, ytr), (xte, yte) = digits_mlp
    data = [(xtr[i:i + 200], ytr[i:i + 200]) for i in range(0, len(xtr), 200)]
    small = ts.compress(model, ts.Plan({"0": {"method": "svd", "rank": 4}}))
    calls = []

    def stop_after(n):
        def stop():
            calls.append(1)
            return len(calls) > n
        return stop

    tuned = ts.finetune(small, data, teacher=model, steps=500, stop=stop_after(5))
    assert len(calls) == 6  # checked before each step: five steps ran, the sixth was stopped
    assert ts.count_params(tuned) == ts.count_params(small)
    calls.clear()
    # stop requested during stage 2's fine-tuning: stage 2 ends there and is kept; no stage 3

    def stop():
        calls.append(1)
        return len(calls) > 1 + 10 + 1 + 3  # stage 1 check, 10 steps, stage 2 check, 3 steps

    small2, history = ts.iterative(model, data, keep=0.3, steps=3, finetune_steps=10, val_data=[(xte, yte)],
                                   stop=stop)
    assert [s.stage for s in history] == [1, 2] and "stopped on request after stage 2" in history.stopped
    assert ts.count_params(small2) == history[-1].params
    _, none = ts.iterative(model, data, keep=0.3, steps=3, finetune_steps=10, stop=lambda: True)
    assert len(none) == 0 and "before the first stage" in none.stopped


def test_hugging_face_dict_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    infos = ts.inspect(model, batch)
    names = [i.name for i in infos]
    assert "bert.encoder.layer.0.attention.self.query" in names
    plan = ts.plan_for_budget(model, keep=0.8, data=[batch, batch])
    small = ts.compress(model, plan, data=[batch])
    res = ts.evaluate(small, [batch], reference=model)
    assert 0 <= res["relative_error"] < 1
    full = ts.Plan({n: {"method": "svd", "rank": 1.0} for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        exact = ts.compress(model, full, data=[batch])
    with torch.no_grad():
        assert_close(exact(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_heldout_errors_equal_a_direct_computation():
    """The held-out curve (fit on one half, score on the other) matches reconstructing each
    rank's weight and measuring its output error on the other half's inputs."""
    from tensorscope.methods.svd import heldout_svd_errors

    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    xa, xb = torch.randn(40, 24) @ torch.randn(24, 24), torch.randn(50, 24) @ torch.randn(24, 24)
    model = nn.Sequential(layer)
    a = ts.collect_stats(model, [xa], ["0"])["0"]
    b = ts.collect_stats(model, [xb], ["0"])["0"]
    got = heldout_svd_errors(layer, a, b)
    u, s, back = whitened_svd(layer, a)
    L = b.whitener("patch")[0]
    w = layer.weight.detach().double()
    # the curve is a square root of a difference of cumulative sums: near zero error its
    # absolute error is about sqrt(n * eps) of float64, whatever the BLAS (1.6e-8 seen on ARM)
    tol = 10 * math.sqrt(w.numel() * torch.finfo(torch.float64).eps)
    for r in range(1, 17):
        w_r = (u[0, :, :r] * s[0, :r]) @ back[0, :r]
        want = float(((w - w_r) @ L).norm() / (w @ L).norm())
        assert got[r - 1] == pytest.approx(want, rel=1e-6, abs=tol)
    assert got[-1] == pytest.approx(0.0, abs=1e-6)  # full rank is exact on any data


@pytest.mark.parametrize("heldout", [True, False, "auto"])
def test_budget_with_data_hits_its_target_in_every_scoring_mode(digits_mlp, heldout):
    model, (xtr, ytr), _ = digits_mlp
    for data in ([xtr[:300]], [xtr[i:i + 100] for i in range(0, 300, 100)]):  # one batch is split by rows
        plan = ts.plan_for_budget(model, 0.3, data=data, heldout=heldout)
        kept = ts.plan_cost(model, plan)["params_after"] / ts.count_params(model)
        assert abs(kept / 0.3 - 1) <= 0.02, (heldout, kept)
    with pytest.raises(ts.BudgetError):
        ts.plan_for_budget(model, 0.3, data=[xtr[:300]], heldout="sometimes")


def test_finetune_with_the_default_lr_improves_and_warns_when_it_cannot(digits_mlp):
    model, (xtr, ytr), (xte, yte) = digits_mlp
    small = ts.compress(model, {"0": {"method": "svd", "rank": 3}, "2": {"method": "svd", "rank": 3}})
    train = [(xtr[i:i + 100], ytr[i:i + 100]) for i in range(0, len(xtr) - 200, 100)]
    val = [(xtr[-200:], ytr[-200:])]
    base = ts.evaluate(small, [(xte, yte)], reference=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default must not need tuning to do something
        tuned = ts.finetune(small, train, teacher=model, steps=150, val_data=val)
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), small.state_dict().values()))
    assert ts.evaluate(tuned, [(xte, yte)], reference=model)["relative_error"] < base["relative_error"]
    with pytest.warns(UserWarning, match="did not improve"):  # absurd lr: the start is returned, and said
        same = ts.finetune(small, train, teacher=model, steps=60, lr=10.0, val_data=val, eval_every=10, patience=2)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), small.state_dict().values()))


def test_sequential_refinement_corrects_what_reaches_a_layer(digits_mlp):
    model, (xtr, _), (xte, yte) = digits_mlp
    calib = [xtr[i:i + 200] for i in range(0, 1000, 200)]
    plan = {"0": {"method": "svd", "rank": 4}, "2": {"method": "svd", "rank": 4}}
    small = ts.compress(model, plan, data=calib)  # each layer already optimal on its own inputs
    base = ts.evaluate(small, [(xte, yte)], reference=model)["relative_error"]
    seq = ts.refine_layerwise(small, model, calib, steps=80)
    alone = ts.refine_layerwise(small, model, calib, steps=80, sequential=False)
    e_seq = ts.evaluate(seq, [(xte, yte)], reference=model)["relative_error"]
    e_alone = ts.evaluate(alone, [(xte, yte)], reference=model)["relative_error"]
    assert e_seq < base and e_seq <= e_alone + 1e-6, (base, e_seq, e_alone)


def test_tt_says_it_ignores_calibration_data():
    from tensorscope.methods.tt import DataIgnoredWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    plan = {"0": {"method": "tt", "rank": [1, 2, 1], "in_shape": [4, 4], "out_shape": [4, 4]}}
    with pytest.warns(DataIgnoredWarning, match="tt ignores the calibration data"):
        aware = ts.compress(model, plan, data=[torch.randn(32, 16)])
    plain = ts.compress(model, plan)
    x = torch.randn(5, 16)
    assert_close(aware(x), plain(x))  # the same (data-free) factors, and said so


def test_finetune_takes_fresh_batches_from_a_callable_or_an_iterator(digits_mlp, monkeypatch):
    model, (xtr, ytr), (xte, yte) = digits_mlp
    small = ts.compress(model, {"0": {"method": "svd", "rank": 3}, "2": {"method": "svd", "rank": 3}})
    val = [xtr[-200:]]
    pool = xtr[:-200]
    g = torch.Generator().manual_seed(0)
    calls = []

    def fresh(step):  # new random rows each step, never the held-out ones
        calls.append(step)
        return pool[torch.randint(len(pool), (64,), generator=g)]

    seen = []
    real = ts.recovery._held_out_loss

    def spy(student, teacher, batches, *args):
        seen.append([b.data_ptr() for b in batches])
        return real(student, teacher, batches, *args)

    monkeypatch.setattr(ts.recovery, "_held_out_loss", spy)
    base = ts.evaluate(small, [(xte, yte)], reference=model)["relative_error"]
    tuned = ts.finetune(small, fresh, teacher=model, steps=40, lr=3e-3, val_data=val, eval_every=40)
    assert calls == list(range(1, 41))  # called once per step, with the step
    assert seen == [[val[0].data_ptr()]] * 2  # early stopping looks at val_data only: at the start and at step 40
    assert ts.evaluate(tuned, [(xte, yte)], reference=model)["relative_error"] < base

    taken = []

    def stream():
        for i in range(5):
            taken.append(i)
            yield pool[64 * i:64 * (i + 1)]

    seen.clear()
    ts.finetune(small, stream(), teacher=model, steps=50, lr=3e-3, val_data=val, eval_every=2)
    assert taken == [0, 1, 2, 3, 4]  # one batch a step, training ended when the iterator did
    assert seen == [[val[0].data_ptr()]] * 4  # the start, steps 2 and 4, and the last step (5)
    with pytest.raises(ts.DataError, match="val_data"):
        ts.finetune(small, fresh, teacher=model, steps=2)
    with pytest.raises(ts.DataError, match="returned None"):
        ts.finetune(small, lambda step: None, teacher=model, steps=2, val_data=val)
    with pytest.raises(ts.DataError, match="no batch"):
        ts.finetune(small, iter([]), teacher=model, steps=2, val_data=val)
