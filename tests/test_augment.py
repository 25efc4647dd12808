"""ts.augment_calibration: copies of calibration samples that keep their structure."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import tensorscope as ts
from tensorscope.allocation import split_halves
from tensorscope.errors import DataError

CLS, SEP, PAD = 1, 2, 0


def token_batch(n=6, t=12, seed=0, lo=10, hi=60):
    """A tokenizer-like batch: CLS ... SEP then padding, rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, t), generator=g)
    am = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        length = t - (i % 4)
        ids[i, 0], ids[i, length - 1] = CLS, SEP
        ids[i, length:], am[i, length:] = PAD, 0
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": torch.zeros_like(ids)}


def special_of(b):
    ids, am = b["input_ids"], b["attention_mask"]
    return (am == 0) | (ids == CLS) | (ids == SEP)


def test_tokens_keep_special_positions_and_repeat_the_rest():
    batches = [token_batch(seed=0), token_batch(seed=1)]
    out = ts.augment_calibration(batches, copies=3, rate=0.5, keep=[17])
    assert len(out) == 2
    for b, o in zip(batches, out):
        n = b["input_ids"].shape[0]
        assert o["input_ids"].shape == (4 * n, b["input_ids"].shape[1])
        assert o["input_ids"].dtype == b["input_ids"].dtype
        assert torch.equal(o["attention_mask"], b["attention_mask"].repeat(4, 1))
        assert torch.equal(o["token_type_ids"], b["token_type_ids"].repeat(4, 1))
        assert torch.equal(o["input_ids"][:n], b["input_ids"])  # the originals come first
        fixed = special_of(b) | (b["input_ids"] == 17)
        for j in range(1, 4):
            copy = o["input_ids"][j * n:(j + 1) * n]
            assert torch.equal(copy[fixed], b["input_ids"][fixed])
            assert (copy != b["input_ids"]).any()


def test_the_replaced_fraction_is_rate_within_a_binomial_bound():
    b = token_batch(n=64, t=40)
    vocab = torch.arange(1000, 3000)  # disjoint from the batch's ids: every replacement is a change
    copies, rate = 4, 0.3
    out = ts.augment_calibration([b, token_batch(n=2)], copies=copies, rate=rate, vocab=vocab)[0]
    n = b["input_ids"].shape[0]
    free = ~special_of(b)
    trials = int(free.sum()) * copies
    changed = sum(int((out["input_ids"][j * n:(j + 1) * n] != b["input_ids"])[free].sum()) for j in range(1, 5))
    assert abs(changed - rate * trials) < 5 * math.sqrt(trials * rate * (1 - rate))  # 5 sigma
    new = out["input_ids"][n:][out["input_ids"][n:] != b["input_ids"].repeat(copies, 1)]
    assert torch.isin(new, vocab).all()


def test_the_default_pool_is_the_data_s_own_tokens():
    b = token_batch(n=8, t=16, lo=10, hi=30)
    out = ts.augment_calibration([b, token_batch(n=2, lo=10, hi=30)], copies=4, rate=0.6, seed=3)[0]
    n = b["input_ids"].shape[0]
    orig = b["input_ids"].repeat(4, 1)
    new = out["input_ids"][n:][out["input_ids"][n:] != orig]
    assert new.numel() > 0
    assert ((new >= 10) & (new < 30)).all()  # never CLS, SEP or padding: they are special everywhere
    # an id drawn equal to its own is drawn again: a chosen position changes where the pool allows
    free = ~special_of(b).repeat(4, 1)
    frac = float((out["input_ids"][n:] != orig)[free].float().mean())
    assert 0.45 < frac < 0.75


@pytest.mark.parametrize("single", [False, True])
def test_each_half_draws_from_its_own_tokens(single):
    """The default pool never carries a word of one held-out half into the other's copies."""
    a, b = token_batch(n=4, lo=10, hi=20, seed=0), token_batch(n=4, lo=30, hi=40, seed=1)
    if single:
        data = {k: torch.cat([a[k], b[k]]) for k in a}
    else:
        data = [a, b, token_batch(n=4, lo=10, hi=20, seed=2)]
    out = ts.augment_calibration(data, copies=5, rate=0.7)
    for i, o in enumerate(out):
        free = ~special_of(o)
        lo, hi = (10, 20) if i % 2 == 0 else (30, 40)
        ids = o["input_ids"][free]
        assert ((ids >= lo) & (ids < hi)).all()


def test_same_seed_same_batches_and_originals_untouched():
    b = token_batch()
    before = {k: v.clone() for k, v in b.items()}
    one = ts.augment_calibration([b, b], copies=2, seed=5)
    two = ts.augment_calibration([b, b], copies=2, seed=5)
    other = ts.augment_calibration([b, b], copies=2, seed=6)
    for k in b:
        assert torch.equal(b[k], before[k])
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, two))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(one, other))


def test_a_bare_id_tensor_with_targets_and_keep_for_padding():
    ids = torch.randint(5, 50, (4, 9))
    ids[:, -3], ids[:, -2:] = SEP, PAD  # no attention_mask: only keep= protects the padding and SEP
    y = torch.tensor([0, 1, 2, 3])
    out = ts.augment_calibration([(ids, y), (ids, y)], copies=2, rate=0.9, keep=[PAD, SEP])
    x, t = out[0]
    assert x.shape == (12, 9) and torch.equal(t, y.repeat(3))
    assert torch.equal(x[:, -3:], ids[:, -3:].repeat(3, 1))
    assert torch.equal(x[:, 0], ids[:, 0].repeat(3))  # the first position: a row's own start
    assert (x[4:, 1:-3] != ids[:, 1:-3].repeat(2, 1)).any()


def test_a_single_batch_comes_back_as_two_halves_of_its_samples():
    """collect_stats splits one batch by rows, several by alternate batches: the augmented
    halves must hold the same sentences as the original halves, with their own copies."""
    b = token_batch(n=5)
    out = ts.augment_calibration(b, copies=3)
    assert len(out) == 2
    (h0,), (h1,) = split_halves([b])
    for part, o in ((h0, out[0]), (h1, out[1])):
        n = part["input_ids"].shape[0]
        assert torch.equal(o["input_ids"][:n], part["input_ids"])
        assert o["input_ids"].shape[0] == 4 * n
        assert torch.equal(o["attention_mask"], part["attention_mask"].repeat(4, 1))
    # a single sample cannot be split: it stays one batch
    assert len(ts.augment_calibration({k: v[:1] for k, v in b.items()}, copies=2)) == 1


def image_batch(n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 20, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_images_keep_shape_dtype_and_targets(dtype):
    x, y = image_batch(dtype=dtype), torch.arange(4)
    out = ts.augment_calibration([(x, y), (x, y)], copies=3)
    xa, ya = out[1]
    assert xa.shape == (16, 3, 16, 20) and xa.dtype == dtype
    assert torch.equal(xa[:4], x) and torch.equal(ya, y.repeat(4))
    assert torch.isfinite(xa).all()
    assert not torch.equal(xa[4:8], x)


def test_a_flip_only_copy_is_the_exact_mirror_image():
    x = image_batch()
    out = ts.augment_calibration([x, x], copies=2, rate=0.0, flip=1.0, brightness=0.0, contrast=0.0)
    assert torch.equal(out[0][4:8], x.flip(-1)) and torch.equal(out[0][8:], x.flip(-1))
    same = ts.augment_calibration([x, x], copies=1, rate=0.0, flip=0.0, brightness=0.0, contrast=0.0)
    assert torch.equal(same[0][4:], x)


def test_crops_of_a_constant_image_stay_constant():
    """Crops resample inside the image (border padding): a flat image has nothing to change."""
    x = torch.ones(3, 2, 8, 8) * torch.tensor([0.25, -1.5]).reshape(1, 2, 1, 1)
    out = ts.augment_calibration([x, x], copies=4, rate=0.7, brightness=0.0, contrast=0.0)[0]
    eps = torch.finfo(x.dtype).eps
    assert_close(out, x.repeat(5, 1, 1, 1), rtol=0, atol=16 * eps)


def test_pixel_values_dict_batches():
    x = image_batch()
    out = ts.augment_calibration([{"pixel_values": x, "labels": torch.arange(4)}] * 2, copies=1)
    assert out[0]["pixel_values"].shape == (8, 3, 16, 20)
    assert torch.equal(out[0]["labels"], torch.arange(4).repeat(2))


@pytest.mark.parametrize("kwargs, match", [
    ({"copies": 0}, "copies must be a positive integer"),
    ({"copies": 1.5}, "copies must be a positive integer"),
    ({"copies": True}, "copies must be a positive integer"),
    ({"rate": 1.0}, r"rate must be a number in \[0, 1\)"),
    ({"rate": -0.1}, r"rate must be a number in \[0, 1\)"),
    ({"rate": "half"}, r"rate must be a number in \[0, 1\)"),
    ({"flip": 2.0}, "flip must be"),
    ({"contrast": 1.0}, "contrast must be"),
    ({"seed": 0.5}, "seed must be an integer"),
    ({"vocab": [1.5, 2.0]}, "vocab= must be a sequence or 1-D tensor of integer"),
    ({"vocab": torch.tensor([0.5])}, "vocab= must be a 1-D tensor of integer"),
    ({"vocab": []}, "vocab= is empty"),
    ({"vocab": [-3, 4]}, "negative ids"),
    ({"keep": "CLS"}, "keep= must be a sequence"),
])
def test_bad_arguments(kwargs, match):
    b = token_batch()
    with pytest.raises(DataError, match=match):
        ts.augment_calibration([b, b], **kwargs)


@pytest.mark.parametrize("data, match", [
    ([torch.randn(4, 10)], "neither token ids .* nor images"),
    ([torch.randn(2, 3, 8)], "neither token ids .* nor images"),
    ([{"features": torch.randn(4, 10)}], "needs a tensor 'input_ids'"),
    (["some text"], "cannot augment"),
    ([], "no batches"),
    ([torch.randint(0, 9, (2, 5)), torch.randn(2, 3, 8, 8)], "mix token and image"),
    ([(torch.randn(4, 3, 8, 8), torch.arange(3))], "one row per sample"),
    ([{"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}], "attention_mask must"),
    ([{"input_ids": torch.tensor([[CLS, SEP], [CLS, SEP]])}], "no position to replace"),
])
def test_bad_data(data, match):
    with pytest.raises(DataError, match=match):
        ts.augment_calibration(data)


def test_token_arguments_on_images_are_refused():
    with pytest.raises(DataError, match="vocab= and keep= are token ids"):
        ts.augment_calibration([image_batch()], vocab=[1, 2, 3])


class TinyEncoder(nn.Module):
    """Embedding, two Linear layers and a masked output: a token model without transformers."""

    def __init__(self, vocab=64, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.fc2(torch.tanh(self.fc1(self.emb(input_ids))))


def test_augmented_batches_run_through_stats_planning_and_compression():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    orig = [token_batch(n=4, t=10, seed=s) for s in range(2)]
    aug = ts.augment_calibration(orig, copies=3)
    st = ts.collect_stats(model, aug, ["fc1", "fc2"], gradients=True, probes=2)
    tokens = sum(int(b["attention_mask"].sum()) for b in orig)
    assert st["fc1"].count == 4 * tokens
    a, b = st.halves
    assert a["fc1"].count == 4 * int(orig[0]["attention_mask"].sum())  # a sentence's copies in its own half
    plan = ts.plan_for_budget(model, 0.7, layers=["fc1", "fc2"], stats=st, data=aug, allocation="output")
    small = ts.compress(model, plan, stats=st)
    with torch.no_grad():
        assert torch.isfinite(small(**orig[0])).all()


def test_gradient_data_pairs_augmented_inputs_with_the_originals_gradients():
    torch.manual_seed(0)
    model = TinyEncoder().eval().double()
    orig = [token_batch(n=4, t=10, seed=s) for s in range(2)]
    aug = ts.augment_calibration(orig, copies=2)
    names = ["fc1", "fc2"]
    both = ts.collect_stats(model, aug, names, gradients=True, probes=3, gradient_data=orig)
    inputs = ts.collect_stats(model, aug, names)
    grads = ts.collect_stats(model, orig, names, gradients=True, probes=3)
    for n in names:
        assert torch.equal(both[n].patch, inputs[n].patch) and both[n].count == inputs[n].count
        assert torch.equal(both[n].grad, grads[n].grad) and both[n].grad_count == grads[n].grad_count
    (a, b), (ia, ib), (ga, gb) = both.halves, inputs.halves, grads.halves
    for n in names:
        assert torch.equal(a[n].patch, ia[n].patch) and torch.equal(b[n].patch, ib[n].patch)
        assert torch.equal(a[n].grad, ga[n].grad) and torch.equal(b[n].grad, gb[n].grad)
    plan = ts.plan_for_budget(model, 0.7, layers=names, stats=both, data=orig, allocation="output")
    assert set(plan.layers) <= set(names)
    with pytest.raises(DataError, match="pass gradients=True"):
        ts.collect_stats(model, aug, names, gradient_data=orig)
    with pytest.raises(DataError, match="both split in two halves"):
        ts.collect_stats(model, aug, names, gradients=True, gradient_data=[{k: v[:1] for k, v in orig[0].items()}])


def test_a_tiny_bert_calibrated_on_augmented_tokens():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    orig = [token_batch(n=4, t=10, seed=s) for s in range(2)]
    aug = ts.augment_calibration(orig, copies=2, vocab=list(range(10, 64)))
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    st = ts.collect_stats(model, aug, layers, gradients=True, probes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ts.plan_for_budget(model, 0.8, layers=layers, stats=st, data=aug, allocation="output")
        small = ts.compress(model, plan, stats=st)
    with torch.no_grad():
        assert torch.isfinite(small(**orig[0]).last_hidden_state).all()
