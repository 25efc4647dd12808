"""The batch convention (tensorscope.data) and the quality metrics (tensorscope.evaluate)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from tensorscope.data import Batch, forward, iter_batches, num_samples, output_tensor, split_batch
from tensorscope.errors import DataError, TensorscopeError
from tensorscope.evaluate import evaluate, metrics, predict

X = torch.arange(12.0).reshape(4, 3)
Y = torch.tensor([0, 1, 1, 0])


# --------------------------------------------------------------------------- split_batch


@pytest.mark.parametrize(
    "batch, n_args, kw, has_target",
    [
        (X, 1, [], False),
        ({"input_ids": X.long(), "attention_mask": torch.ones(4, 3)}, 0, ["input_ids", "attention_mask"], False),
        ((X,), 1, [], False),
        ((X, Y), 1, [], True),
        ([X, Y], 1, [], True),
        (({"input_ids": X.long()}, Y), 0, ["input_ids"], True),
        (({"input_ids": X.long()},), 0, ["input_ids"], False),
        ((X, Y, torch.ones(4)), 1, [], True),  # extra elements (sample weights) ignored
    ],
    ids=["tensor", "dict", "1-tuple", "tuple", "list", "dict+target", "dict-1-tuple", "3-tuple"],
)
def test_split_batch_accepts_the_convention(batch, n_args, kw, has_target):
    b = split_batch(batch)
    assert isinstance(b, Batch)
    assert len(b.args) == n_args
    assert sorted(b.kwargs) == sorted(kw)
    assert (b.target is not None) == has_target
    if has_target:
        assert b.target is Y
    assert b.size == 4


@pytest.mark.parametrize(
    "bad",
    ["some text", None, (), [], {"a": 1, "b": "x"}, {}, 3.0, (None, Y), (X, "labels"), ("x", Y), {1: X}],
    ids=["str", "None", "empty-tuple", "empty-list", "dict-no-tensor", "empty-dict", "float",
         "tuple-None-inputs", "str-target", "str-inputs", "int-keys"],
)
def test_split_batch_rejects_with_a_useful_message(bad):
    with pytest.raises(DataError) as info:
        split_batch(bad)
    msg = str(info.value)
    assert type(bad).__name__ in msg  # names what was received
    assert "tensor" in msg  # and says what is expected
    assert isinstance(info.value, TensorscopeError) and isinstance(info.value, ValueError)


def test_batch_to_moves_every_tensor_and_keeps_the_original():
    b = split_batch(({"a": X}, Y))
    moved = b.to(torch.device("cpu"))
    assert moved.kwargs["a"].device.type == "cpu" and moved.target is not None
    assert b.to(None) is b


def test_forward_with_dict_batch_calls_with_keywords():
    class KW(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return {"logits": input_ids.float() * attention_mask}

    out = forward(KW(), ({"input_ids": X.long(), "attention_mask": torch.full((4, 3), 2.0)}, Y))
    assert_close(out, X * 2)


# --------------------------------------------------------------------------- output_tensor


class _ModelOutput(dict):
    """Like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def test_output_tensor_forms():
    t, h = torch.randn(2, 3), torch.randn(2, 5, 4)
    assert output_tensor(t) is t
    assert output_tensor((t, h)) is t
    assert output_tensor([(t,), h]) is t
    assert output_tensor({"logits": t, "hidden_states": h}) is t
    assert output_tensor({"last_hidden_state": h, "pooler_output": t}) is h
    assert output_tensor({"pooler": t}) is t
    assert output_tensor({"loss": None, "scores": t}) is t
    assert output_tensor(SimpleNamespace(logits=t, last_hidden_state=h)) is t
    assert output_tensor(SimpleNamespace(last_hidden_state=h)) is h
    assert output_tensor(_ModelOutput(loss=torch.tensor(1.0), logits=t)) is t


@pytest.mark.parametrize("bad", [None, "x", (), {"a": 1}, SimpleNamespace(logits=None), 3])
def test_output_tensor_rejects(bad):
    with pytest.raises(DataError, match="output"):
        output_tensor(bad)


# --------------------------------------------------------------------------- iter_batches


def test_iter_batches_limits_and_single_batches():
    loader = DataLoader(TensorDataset(X, Y), batch_size=1)
    assert len(list(iter_batches(loader))) == 4
    assert len(list(iter_batches(loader, max_batches=2))) == 2
    assert len(list(iter_batches(loader, max_batches=0))) == 0
    # a bare tensor or dict is ONE batch, not its rows or keys
    (only,) = list(iter_batches(X))
    assert only is X
    d = {"input_ids": X}
    assert list(iter_batches(d)) == [d]
    # a generator works
    assert len(list(iter_batches((X[i : i + 2] for i in range(0, 4, 2))))) == 2


@pytest.mark.parametrize("bad", [3, None, "text", object()])
def test_iter_batches_rejects_non_iterables(bad):
    with pytest.raises(DataError, match="iterable of batches"):
        iter_batches(bad)  # at once, not on the first next()


def test_num_samples():
    assert num_samples(DataLoader(TensorDataset(X, Y), batch_size=3)) == 4
    assert num_samples(DataLoader(TensorDataset(X, Y), batch_size=3, drop_last=True)) == 3
    assert num_samples(DataLoader(TensorDataset(X, Y), batch_size=1), max_batches=2) == 2
    assert num_samples(X) == 4
    assert num_samples([(X, Y), (X[:2], Y[:2])]) == 6
    assert num_samples(iter([X])) is None


# --------------------------------------------------------------------------- evaluate


class Fixed(nn.Module):
    """Returns the logits stored for each sample index (the input is the index)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, idx):
        return self.logits[idx.long()]


def test_evaluate_known_accuracy_and_loss():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.5, 0.0]])
    target = torch.tensor([0, 1, 1, 0])  # right, right, wrong, wrong -> 0.5
    data = DataLoader(TensorDataset(torch.arange(4), target), batch_size=3)
    r = evaluate(Fixed(logits), data)
    assert r["samples"] == 4
    assert r["accuracy"] == pytest.approx(0.5)
    expected = sum(-torch.log_softmax(logits[i], 0)[target[i]].item() for i in range(4)) / 4
    assert r["loss"] == pytest.approx(expected, rel=1e-6)
    assert "agreement" not in r


def test_evaluate_sequence_outputs_ignore_minus_100():
    # (N, T, C) outputs with (N, T) targets, -100 positions skipped as Hugging Face does
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 5.0
    logits[1, 0, 0] = logits[1, 1, 0] = logits[1, 2, 0] = 5.0
    target = torch.tensor([[1, 2, -100], [0, 3, -100]])  # 3 of 4 counted positions right
    r = evaluate(Fixed(logits), [(torch.arange(2), target)])
    assert r["accuracy"] == pytest.approx(0.75)
    mask = target != -100
    ce = F.cross_entropy(logits[mask], target[mask]).item()
    assert r["loss"] == pytest.approx(ce, rel=1e-6)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_evaluate_against_itself_and_a_perturbed_copy():
    net = _net()
    x, y = _data()
    r = evaluate(net, [x[:20], x[20:]], reference=net)
    assert r["agreement"] == 1.0
    assert r["relative_error"] == 0.0
    assert r["cosine"] == pytest.approx(1.0)
    assert r["samples"] == 40
    assert "accuracy" not in r

    other = _net()
    with torch.no_grad():
        other[4].weight.add_(torch.randn_like(other[4].weight))
    r2 = evaluate(other, DataLoader(TensorDataset(x, y), batch_size=8), reference=net)
    assert r2["agreement"] < 1.0
    assert r2["relative_error"] > 0.05
    assert r2["cosine"] < 1.0
    assert {"accuracy", "loss"} <= set(r2)
    # relative error over everything seen, computed by hand
    net.eval(), other.eval()
    with torch.no_grad():
        a, b = other(x), net(x)
    assert r2["relative_error"] == pytest.approx(((a - b).norm() / b.norm()).item(), rel=1e-5)
    assert r2["cosine"] == pytest.approx(F.cosine_similarity(a, b, dim=1).mean().item(), rel=1e-5)


def test_evaluate_restores_each_modules_training_mode():
    net, ref = _net(), _net(1)
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training model stays frozen
    ref.eval()
    x, y = _data()
    evaluate(net, [(x, y)], reference=ref)
    assert net.training and not net[1].training and net[3].training
    assert not ref.training and not any(m.training for m in ref.modules())
    # an error mid-way restores too
    with pytest.raises(DataError):
        evaluate(net, [(x, y), (x, "bad")])
    assert net.training and not net[1].training


def test_evaluate_same_numbers_for_any_batch_size():
    net, ref = _net(), _net(1)
    x, y = _data()
    r1 = evaluate(net, DataLoader(TensorDataset(x, y), batch_size=1), reference=ref)
    r10 = evaluate(net, DataLoader(TensorDataset(x, y), batch_size=10), reference=ref)
    assert r1.keys() == r10.keys()
    for k in r1:
        assert r1[k] == pytest.approx(r10[k], rel=1e-5, abs=1e-7), k


def test_evaluate_is_deterministic_under_dropout_and_leaves_no_grad():
    net = _net()
    x, y = _data()
    a = evaluate(net, [(x, y)])
    b = evaluate(net, [(x, y)])
    assert a == b
    assert all(p.grad is None for p in net.parameters())


def test_evaluate_max_batches_and_progress():
    net = _net()
    x, y = _data()
    r = evaluate(net, DataLoader(TensorDataset(x, y), batch_size=10), max_batches=2, progress=True)
    assert r["samples"] == 20
    calls = []
    r = evaluate(net, DataLoader(TensorDataset(x, y), batch_size=10), progress=lambda f, m: calls.append(f))
    assert r["samples"] == 40 and calls[-1] == 1.0 and calls == sorted(calls) and len(calls) >= 4
    calls.clear()  # a generator has no length: a final 1.0 all the same
    r = evaluate(net, ((x[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)), progress=lambda f, m: calls.append(f))
    assert r["samples"] == 40 and calls[-1] == 1.0


def test_evaluate_needs_labels_or_reference():
    with pytest.raises(DataError, match="labels or a reference"):
        evaluate(_net(), [torch.randn(4, 6)])


def test_evaluate_rejects_empty_data_and_mismatches():
    net = _net()
    with pytest.raises(DataError, match="no batches"):
        evaluate(net, [], reference=net)
    x, y = _data()
    with pytest.raises(DataError, match="targets of shape"):
        evaluate(net, [(x, y[:, None].expand(-1, 3))])
    with pytest.raises(DataError, match="different shapes"):
        evaluate(net, [x], reference=nn.Linear(6, 3))


def test_evaluate_float_targets_give_mse():
    lin = nn.Linear(3, 2)
    x = torch.randn(8, 3)
    with torch.no_grad():
        t = lin(x) + 1.0
    r = evaluate(lin, [(x, t)])
    assert r["mse"] == pytest.approx(1.0, rel=1e-5)
    assert "accuracy" not in r


def test_evaluate_on_hf_style_model_with_dict_batches():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10)

        def forward(self, input_ids, attention_mask=None):
            return _ModelOutput(logits=self.head(self.emb(input_ids)))

    torch.manual_seed(0)
    m = Tiny()
    ids = torch.randint(0, 10, (3, 5))
    labels = ids.clone()
    labels[:, -1] = -100
    r = evaluate(m, [({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)], reference=m)
    assert r["agreement"] == 1.0 and r["samples"] == 3
    assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"])


def test_predict_concatenates():
    net = _net()
    x, y = _data()
    out = predict(net, DataLoader(TensorDataset(x, y), batch_size=7))
    net.eval()
    with torch.no_grad():
        assert_close(out, net(x))
    with pytest.raises(DataError, match="no batches"):
        predict(net, [])


# --------------------------------------------------------------------------- one metrics function


def test_metrics_of_outputs_match_evaluate():
    # logits with -100 labels, sequence logits, float targets, embeddings against a reference
    torch.manual_seed(0)
    logits = torch.randn(12, 5)
    labels = torch.randint(0, 5, (12,))
    labels[::4] = -100
    ref = logits + 0.3 * torch.randn(12, 5)
    r = metrics(logits, labels, ref)
    assert r == pytest.approx(evaluate(Fixed(logits), [(torch.arange(12), labels)], reference=Fixed(ref)))
    kept = labels != -100
    assert r["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels)[kept].float().mean()))
    assert r["loss"] == pytest.approx(F.cross_entropy(logits[kept], labels[kept]).item(), rel=1e-6)
    seq, seq_labels = torch.randn(3, 4, 6), torch.randint(0, 6, (3, 4))
    seq_labels[:, -1] = -100
    r = metrics(seq, seq_labels)
    assert r["samples"] == 3 and r["accuracy"] == pytest.approx(
        float((seq.argmax(-1) == seq_labels)[seq_labels != -100].float().mean()))
    emb = torch.randn(8, 16)
    r = metrics(emb, reference=emb * 2)
    assert r["relative_error"] == pytest.approx(0.5) and r["cosine"] == pytest.approx(1.0)
    assert "accuracy" not in r and "loss" not in r
    r = metrics(emb, targets=emb + 1.0)
    assert r["mse"] == pytest.approx(1.0) and "accuracy" not in r
    assert metrics(emb) == {"samples": 8}


def _live_and_evaluate(model, perturbed, layer, x, y, chunk):
    """The explorer's live preview of ``perturbed``'s ``layer`` weight next to ``ts.evaluate``."""
    from tensorscope.explorer import _EvalData, _Evaluator

    ev = _Evaluator(model, _EvalData(x, y, "test", "held-out"), chunk=chunk)
    base = ev.baseline()
    ev.install({layer: ("perturbed", perturbed.get_submodule(layer).weight.detach().clone())})
    live = ev.run({layer}, layer, lambda: False)
    data = DataLoader(TensorDataset(x, y), batch_size=chunk + 3)  # batching differs from the preview's
    return base, live, evaluate(model, data, reference=model), evaluate(perturbed, data, reference=model)


def _assert_same(live, offline):
    for key in ("samples", "accuracy", "loss", "agreement", "relative_error", "cosine"):
        assert key in live and key in offline, key
        assert live[key] == pytest.approx(offline[key], rel=1e-5, abs=1e-7), key


def test_live_preview_equals_evaluate_with_ignored_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed[2].weight.add_(0.5 * torch.randn_like(perturbed[2].weight))
    x, y = _data(60)
    y[::3] = -100  # a third of the samples carry no label: out of accuracy and loss
    base, live, base_off, off = _live_and_evaluate(model, perturbed, "2", x, y, chunk=16)
    _assert_same(base, base_off)
    _assert_same(live, off)
    assert live["agreement"] < 1.0  # the perturbation shows
    kept = y != -100
    with torch.no_grad():
        acc = float((perturbed(x).argmax(-1) == y)[kept].float().mean())
    assert live["accuracy"] == pytest.approx(acc)


def test_live_preview_equals_evaluate_on_sequence_outputs():
    class Tagger(nn.Module):  # (N, T) token ids -> (N, T, C) logits
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.head = nn.Linear(8, 7)

        def forward(self, ids):
            return self.head(torch.relu(self.emb(ids)))

    torch.manual_seed(1)
    model = Tagger().eval()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.head.weight.add_(0.5 * torch.randn_like(perturbed.head.weight))
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 11, (30, 5), generator=g)
    y = torch.randint(0, 7, (30, 5), generator=g)
    y[:, -2:] = -100  # padding positions
    base, live, base_off, off = _live_and_evaluate(model, perturbed, "head", x, y, chunk=8)
    _assert_same(base, base_off)
    _assert_same(live, off)
    assert 0.0 < live["accuracy"] < 1.0


def test_explorer_quality_equals_evaluate_of_the_previewed_weights():
    """Through the state: sequence labels with -100 are accepted, and the quality shown is
    ``ts.evaluate``'s number for the network the preview ran."""
    from tensorscope.explorer import ExplorerState

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 16)
            self.hidden = nn.Linear(16, 16)
            self.head = nn.Linear(16, 7)

        def forward(self, ids):
            return self.head(torch.relu(self.hidden(self.emb(ids))))

    torch.manual_seed(3)
    model = Tagger().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 11, (40, 6), generator=g)
    with torch.no_grad():
        y = model(x).argmax(-1)
    y[:, -2:] = -100
    s = ExplorerState()
    assert s.load_network(model, x, y, name="tagger"), s.error
    assert s.quality["metric"] == "accuracy" and s.quality["plan"] == pytest.approx(1.0)
    assert s.set_layer("hidden", "svd", 2), s.error
    previewed = s._evaluator.model  # the original architecture with the plan's weights
    off = evaluate(previewed, [(x, y)], reference=s.model)
    assert s.quality["plan"] == pytest.approx(off["accuracy"]) and s.quality["plan"] < 1.0
    assert s.quality["loss"] == pytest.approx(off["loss"], rel=1e-5)
    assert s.quality["agreement"] == pytest.approx(off["agreement"])
    s.close()
