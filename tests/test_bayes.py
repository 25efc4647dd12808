"""Bayesian incremental updates (issue 18, part 3): ``ts.bayes`` (Kochurov et al. 2018)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorscope as ts
from tensorscope import bayes
from tensorscope.errors import CheckpointError, DataError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- exact conjugacy: linear-Gaussian regression ---------------------------------------------------


def _orthogonal_parts(d: int, n: int, parts: int, noise_var: float, seed: int = 0):
    """``parts`` designs whose columns (with a column of ones for the bias) are orthogonal."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    out = []
    for _ in range(parts):
        a = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)], 1)
        q, _ = torch.linalg.qr(a)
        x = q[:, 1:] * (torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.5) * n ** 0.5
        y = x @ w + 0.3 + noise_var ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        out.append((x, y[:, None]))
    return out


def _batch_posterior(parts, prec0: float, noise_var: float):
    """The exact posterior of weight and bias given every part at once (full covariance)."""
    x = torch.cat([torch.cat([xp, torch.ones(len(xp), 1, dtype=xp.dtype)], 1) for xp, _ in parts])
    y = torch.cat([yp for _, yp in parts])[:, 0]
    prec = prec0 * torch.eye(x.shape[1], dtype=x.dtype) + x.T @ x / noise_var
    cov = torch.linalg.inv(prec)
    return cov @ (x.T @ y / noise_var), cov


def test_sequential_conjugate_updates_equal_the_batch_posterior():
    d, noise_var, prec0 = 6, 0.5, 2.0
    parts = _orthogonal_parts(d, 40, 5, noise_var)
    torch.manual_seed(0)
    model = nn.Linear(d, 1).double()
    start = _state(model)
    post = bayes.isotropic_prior(model, prec0)
    m = model
    for x, y in parts:  # two batches per part: the update sums over them
        m, post = bayes.update(m, [(x[:15], y[:15]), (x[15:], y[15:])], post, "laplace", solver="newton",
                               noise_var=noise_var)
    mean, cov = _batch_posterior(parts, prec0, noise_var)
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 1e-12  # the batch posterior is diagonal here
    torch.testing.assert_close(post.mean["weight"][0], mean[:d], rtol=0, atol=1e-10)
    torch.testing.assert_close(post.mean["bias"], mean[d:], rtol=0, atol=1e-10)
    torch.testing.assert_close(post.var["weight"][0], torch.diag(cov)[:d], rtol=0, atol=1e-10)
    torch.testing.assert_close(post.var["bias"], torch.diag(cov)[d:], rtol=0, atol=1e-10)
    torch.testing.assert_close(m.weight.detach()[0], mean[:d], rtol=0, atol=1e-10)  # the model carries the means
    assert post.info["parts"] == 5 and post.info["samples"] == 200
    assert _same(start, model.state_dict())  # the input model is never modified


def test_the_train_solver_reaches_the_same_mode():
    """The prior's term is scaled per sample: ts.train's mean loss plus it has the posterior's mode."""
    d, noise_var, prec0 = 4, 0.5, 2.0
    parts = _orthogonal_parts(d, 30, 1, noise_var, seed=1)
    torch.manual_seed(0)
    model = nn.Linear(d, 1).double()
    prior = bayes.isotropic_prior(model, prec0)
    exact, _ = bayes.update(model, parts, prior, "laplace", solver="newton", noise_var=noise_var)
    trained, post = bayes.update(model, parts, prior, "laplace", noise_var=noise_var, epochs=600, optimizer="sgd",
                                 lr=0.02)
    torch.testing.assert_close(trained.weight, exact.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(trained.bias, exact.bias, rtol=0, atol=1e-6)
    assert len(post.history) == 601 and post.history[-1].extra is not None


def test_kl_is_zero_when_the_posterior_equals_the_prior():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    prior = bayes.laplace_prior(model, [(x, y)])
    assert float(bayes.kl_divergence(prior, prior)) == 0.0
    same = bayes.Posterior(prior.mean, prior.var, plan=prior.plan)
    assert float(same.kl(prior)) == 0.0
    # and the closed form for one shifted, narrower weight
    mean = {k: v.clone() for k, v in prior.mean.items()}
    var = {k: v.clone() for k, v in prior.var.items()}
    mean["0.bias"][0] += 0.5
    var["0.bias"][0] *= 0.25
    q = bayes.Posterior(mean, var)
    vp = float(prior.var["0.bias"][0])
    want = 0.5 * (torch.log(torch.tensor(4.0)) + 0.25 + 0.25 / vp - 1.0)
    assert abs(float(q.kl(prior)) - float(want)) < 1e-6


def test_the_vi_loss_is_the_kl_to_the_prior_per_sample():
    """The VI update's extra_loss is kl_weight * KL(q || prior) / N; zero while q is the prior."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    prior = bayes.isotropic_prior(model, 100.0, centre="weights")
    _, post = bayes.update(model, [(x, y)], prior, "vi", kl_weight=2.0, epochs=3, init_var=None)
    assert post.history[1].extra == pytest.approx(0.0, abs=1e-9)  # the first step: q = prior
    assert post.history[2].extra > 0 and float(post.kl(prior)) > 0
    # the differentiable KL of the training loss is the posterior's KL
    terms = sum(bayes._kl_terms(post.mean[n], post.var[n].log(), prior.mean[n], prior.var[n]) for n in post.names)
    assert float(terms) == pytest.approx(float(post.kl(prior)), rel=1e-3)  # float32 sums


# ---- the curvature ---------------------------------------------------------------------------------


def _explicit_curvatures(net, x, y):
    ggn = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    fisher = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    params = list(net.parameters())
    for i in range(len(x)):
        out = net(x[i:i + 1])[0]
        p = out.softmax(-1)
        h = torch.diag(p) - torch.outer(p, p)  # cross-entropy's Hessian in the scores
        jac = torch.stack([torch.cat([t.flatten() for t in torch.autograd.grad(net(x[i:i + 1])[0, c], params)])
                           for c in range(out.numel())])
        diag = ((h @ jac) * jac).sum(0)
        g = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), params)
        off = 0
        for (n, q), gi in zip(net.named_parameters(), g):
            ggn[n] += diag[off:off + q.numel()].reshape(q.shape)
            fisher[n] += gi ** 2
            off += q.numel()
    return ggn, fisher


def test_laplace_prior_precisions_are_the_ggn_and_the_empirical_fisher():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    ggn, fisher = _explicit_curvatures(net, x, y)
    start = _state(net)
    p1 = bayes.laplace_prior(net, [(x[:6], y[:6]), (x[6:], y[6:])], prior_precision=0.5)
    p2 = bayes.laplace_prior(net, [(x, y)], prior_precision=0.5, curvature="empirical")
    for n in ggn:
        torch.testing.assert_close(1 / p1.var[n], 0.5 + ggn[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(1 / p2.var[n], 0.5 + fisher[n], rtol=1e-4, atol=1e-5)
        assert torch.equal(p1.mean[n], start[n])
    assert _same(start, net.state_dict()) and p1.info["samples"] == 11


def test_a_conv_net_with_batchnorm_and_a_teacher():
    """Per-sample curvature of a conv net in eval mode (BatchNorm's running statistics), both kinds,
    chunked or not, and an update that distils from a teacher on unlabelled images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net(torch.randn(16, 1, 8, 8))  # running statistics away from their defaults
    net.eval()
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    ggn, fisher = _explicit_curvatures(net, x, y)
    p1 = bayes.laplace_prior(net, [(x, y)])
    p2 = bayes.laplace_prior(net, [(x, y)], curvature="empirical")
    for n in ggn:
        torch.testing.assert_close(1 / p1.var[n], 1 + ggn[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(1 / p2.var[n], 1 + fisher[n], rtol=1e-4, atol=1e-5)
    model, post = bayes.update(net, [x], p1, "laplace", teacher=net, epochs=1)
    assert post.names == p1.names and not torch.equal(model[1].running_mean, net[1].running_mean)
    model, post = bayes.update(net, [x], p1, "vi", teacher=net, epochs=1)
    assert post.info["method"] == "vi"


def test_chunks_give_the_same_curvature(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    whole = bayes.laplace_prior(net, [(x, y)])
    monkeypatch.setattr(bayes, "CHUNK_ELEMENTS", 1)  # one sample per chunk
    parts = bayes.laplace_prior(net, [(x, y)])
    for n in whole.names:
        torch.testing.assert_close(parts.var[n], whole.var[n])


# ---- updates on a network ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(96, 8)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, -1.0])).argmax(1)
    trained, _ = ts.train(net, [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)], epochs=30, optimizer="adam",
                          lr=1e-2)
    return trained, x, y


@pytest.mark.parametrize("method", ["laplace", "vi"])
def test_update_returns_a_model_and_its_posterior(small_net, method):
    net, x, y = small_net
    prior = bayes.laplace_prior(net, [(x[:48], y[:48])])
    start = _state(net)
    part = [(x[48:], y[48:])]
    model, post = bayes.update(net, part, prior, method, epochs=3)
    assert _same(start, net.state_dict())
    assert post.names == prior.names and post.shapes == prior.shapes
    assert all(bool((v > 0).all()) for v in post.var.values())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), post.mean[n])
    assert post.info == {"method": method, "kl_weight": 1.0, "parts": 2, "samples": 96,
                         **({"solver": "train", "curvature": "ggn"} if method == "laplace" else {})}
    post.check(model)
    model2, post2 = bayes.update(model, part, post, method, epochs=1)  # the posterior is the next prior
    assert post2.info["parts"] == 3
    if method == "laplace":  # precisions only grow
        assert all(bool((post2.var[n] <= post.var[n] * (1 + 1e-5)).all()) for n in post.names)


def test_a_teacher_replaces_missing_labels(small_net):
    net, x, _ = small_net
    prior = bayes.laplace_prior(net, [x[:48]], teacher=net)
    model, post = bayes.update(net, [x[48:]], prior, "laplace", teacher=net, epochs=1)
    assert post.info["parts"] == 2


def test_a_posterior_file_round_trips(tmp_path, small_net):
    net, x, y = small_net
    post = bayes.laplace_prior(net, [(x, y)])
    path = tmp_path / "post.safetensors"
    post.save(path)
    back = bayes.Posterior.load(path)
    assert back.names == post.names and back.plan is None and back.info == post.info
    for n in post.names:
        assert torch.equal(back.mean[n], post.mean[n]) and torch.equal(back.var[n], post.var[n])
    back.check(net)
    # the record: format, plan, names, shapes
    from tensorscope.safetensors_header import _read_header

    h = _read_header(str(path), path.stat().st_size, 1 << 30)
    rec = json.loads(h.metadata[bayes.META_KEY])
    assert rec[bayes.META_KEY] == 1 and rec["names"] == post.names and rec["plan"] is None
    assert rec["shapes"]["0.weight"] == [16, 8] and set(h.tensors) == {f"{k}/{n}" for n in post.names
                                                                       for k in ("mean", "var")}
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically


def test_posterior_files_are_checked_before_reading(tmp_path, small_net):
    from safetensors.torch import save_file

    net, x, y = small_net
    post = bayes.laplace_prior(net, [(x, y)])
    good = tmp_path / "post.safetensors"
    post.save(good)
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(CheckpointError, match="truncated|data section"):
        bayes.Posterior.load(tmp_path / "cut.safetensors")
    rec = post.record()
    tensors = {f"{k}/{n}": getattr(post, k)[n].contiguous() for n in post.names for k in ("mean", "var")}
    save_file({**tensors, "extra": torch.zeros(1)}, tmp_path / "extra.safetensors",
              metadata={bayes.META_KEY: json.dumps(rec)})
    with pytest.raises(CheckpointError, match="'extra' is not named"):
        bayes.Posterior.load(tmp_path / "extra.safetensors")
    bad = {**tensors, "var/0.bias": -torch.ones(16)}
    save_file(bad, tmp_path / "neg.safetensors", metadata={bayes.META_KEY: json.dumps(rec)})
    with pytest.raises(CheckpointError, match="finite and > 0"):
        bayes.Posterior.load(tmp_path / "neg.safetensors")
    shapes = {**rec, "shapes": {**rec["shapes"], "0.bias": [15]}}
    save_file(tensors, tmp_path / "shape.safetensors", metadata={bayes.META_KEY: json.dumps(shapes)})
    with pytest.raises(CheckpointError, match="'0.bias': the record says shape"):
        bayes.Posterior.load(tmp_path / "shape.safetensors")
    newer = {**rec, bayes.META_KEY: 99}
    save_file(tensors, tmp_path / "newer.safetensors", metadata={bayes.META_KEY: json.dumps(newer)})
    with pytest.raises(CheckpointError, match="format 99"):
        bayes.Posterior.load(tmp_path / "newer.safetensors")
    ts.save(net, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="model checkpoint, not a posterior"):
        bayes.Posterior.load(tmp_path / "model.pt")
    torch.save(tensors, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="torch.save"):
        bayes.Posterior.load(tmp_path / "pickle.pt")


# ---- the posterior belongs to one model ------------------------------------------------------------


def test_check_names_the_first_mismatch(small_net):
    net, x, y = small_net
    post = bayes.laplace_prior(net, [(x, y)])
    wider = nn.Sequential(nn.Linear(8, 17), nn.ReLU(), nn.Linear(17, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(CheckpointError, match=r"parameter '0.weight' is 16x8 in the posterior but 17x8"):
        post.check(wider)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match=r"the model's parameter '5.weight' has no distribution"):
        post.check(other)
    fewer = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    with pytest.raises(CheckpointError, match=r"the posterior's parameter '4.weight' is not"):
        post.check(fewer)
    with pytest.raises(CheckpointError, match="different parameters"):
        bayes.kl_divergence(post, bayes.isotropic_prior(fewer))


def test_compressing_again_invalidates_a_posterior(small_net, tmp_path):
    net, x, y = small_net
    small = ts.compress(net, ts.Plan({"2": {"method": "svd", "rank": 4}}))
    post = bayes.laplace_prior(small, [(x, y)])
    post.check(small)
    post.save(tmp_path / "p.safetensors")
    back = bayes.Posterior.load(tmp_path / "p.safetensors")
    assert back.plan == ts.plan_of(small)
    back.check(small)
    again = ts.compress(net, ts.Plan({"2": {"method": "svd", "rank": 3}}))
    with pytest.raises(CheckpointError, match=r"layer '2' is .*\"rank\": 4.* in the posterior's plan but .*\"rank\": 3"):
        back.check(again)
    with pytest.raises(CheckpointError, match="made for a model compressed with plan .* but this model is uncompressed"):
        back.check(net)
    with pytest.raises(CheckpointError, match="made for an uncompressed model"):
        bayes.laplace_prior(net, [(x, y)]).check(small)


def test_bad_input_fails_before_any_training(small_net, monkeypatch):
    net, x, y = small_net
    prior = bayes.laplace_prior(net, [(x, y)])
    start = _state(net)

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(bayes, "train", no_training)
    monkeypatch.setattr(bayes._Likelihood, "curvature", no_training)
    for method in ("laplace", "vi"):
        with pytest.raises(DataError, match="no labels and no teacher"):
            bayes.update(net, [x], prior, method)
        other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        with pytest.raises(CheckpointError, match="does not describe the model"):
            bayes.update(other, [(x, y)], prior, method)
        with pytest.raises(DataError, match="no batches"):
            bayes.update(net, [], prior, method)
    with pytest.raises(ValueError, match="method must be one of"):
        bayes.update(net, [(x, y)], prior, "mcmc")
    with pytest.raises(ValueError, match="kl_weight"):
        bayes.update(net, [(x, y)], prior, kl_weight=0)
    with pytest.raises(ValueError, match='solver="newton" is for method="laplace"'):
        bayes.update(net, [(x, y)], prior, "vi", solver="newton")
    with pytest.raises(TypeError, match="Posterior"):
        bayes.update(net, [(x, y)], {"0.weight": (0, 1)})
    with pytest.raises(DataError, match="no labels and no teacher"):
        bayes.laplace_prior(net, [x])
    assert _same(start, net.state_dict())


def test_ts_bayes_is_the_module():
    assert ts.bayes is bayes and bayes.STATUS in ("stable", "experimental")
    assert "bayes" in ts.__all__ and callable(ts.bayes.update)


def test_posterior_refuses_bad_values():
    with pytest.raises(ValueError, match="finite and > 0"):
        bayes.Posterior({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match="same names"):
        bayes.Posterior({"w": torch.zeros(2)}, {"v": torch.ones(2)})
    p = bayes.Posterior({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    assert copy.deepcopy(p).names == ["w"] and "1 tensors" in repr(p)
