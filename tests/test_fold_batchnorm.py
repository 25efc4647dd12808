"""BatchNorm folding in networks torch.fx cannot trace: pairs found on a probe run's autograd
graph (``fold_batchnorm(model, example)``), the folded output checked, the original kept on
failure."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorscope as ts
from tensorscope.surgery import _first_batch

EPS = torch.finfo(torch.float32).eps


def close(a: torch.Tensor, b: torch.Tensor, folds: int) -> bool:
    """Equal up to the rounding a fold may add: a few eps per folded pair, at the output's scale."""
    return float((a - b).abs().max()) <= 16 * EPS * (folds + 1) * max(1.0, float(b.abs().max()))


def trained_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()


class SamePad(nn.Conv2d):
    """A TensorFlow-style port: ``padding=0`` declared, "same" padding applied in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Untraceable(nn.Module):
    """Conv/BN pairs called one after the other in forward (no nn.Sequential), with a
    data-dependent branch torch.fx cannot trace; a padding conv subclass, a depthwise and a
    grouped conv, and one conv whose output also feeds a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = SamePad(3, 8, 3, stride=2, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = SamePad(8, 8, 3, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(12)
        self.shared = nn.Conv2d(12, 12, 1, bias=False)  # output feeds bn3 and the residual add
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        if float(x.detach().mean()) > -1e9:  # data-dependent control flow
            x = F.relu6(self.bn1(self.dw(x)))
        x = self.bn2(self.grouped(x))
        y = self.shared(x)
        x = self.bn3(y) + y
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return trained_bns(Untraceable())


@pytest.fixture
def x():
    return torch.randn(3, 3, 15, 13, generator=torch.Generator().manual_seed(1))


def test_fx_cannot_trace_it_and_the_old_path_finds_nothing(net):
    import torch.fx as fx

    with pytest.raises(Exception):
        fx.symbolic_trace(net)
    model = copy.deepcopy(net)
    with pytest.warns(UserWarning, match="pass example="):
        assert ts.fold_batchnorm(model) == []  # no example: the trace-or-Sequential path, as before
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


def test_example_folds_untraceable_pairs_and_keeps_output(net, x):
    model = copy.deepcopy(net)
    with torch.no_grad():
        ref = net(x)
    folded = ts.fold_batchnorm(model, x)
    assert sorted(folded) == [("dw", "bn1"), ("grouped", "bn2"), ("stem", "bn0")]
    for bn in ("bn0", "bn1", "bn2"):
        assert isinstance(getattr(model, bn), nn.Identity)
    with torch.no_grad():
        got = model(x)
        other = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(2))  # not the probe
        assert close(got, ref, 3)
        assert close(model(other), net(other), 3)
    assert ref.abs().max() > 0.1  # the comparison compares something
    assert all(p.requires_grad for p in model.parameters())


def test_conv_with_a_second_consumer_is_not_folded(net, x):
    model = copy.deepcopy(net)
    folded = ts.fold_batchnorm(model, x)
    assert ("shared", "bn3") not in folded
    assert isinstance(model.bn3, nn.BatchNorm2d) and model.shared.bias is None
    assert "2 consumers" in folded.skipped["bn3"]


def test_padding_subclass_keeps_its_class_and_padding(net, x):
    model = copy.deepcopy(net)
    ts.fold_batchnorm(model, x)
    assert type(model.stem) is SamePad and type(model.dw) is SamePad
    assert model.stem.padding == (0, 0) and model.stem.bias is not None
    with torch.no_grad():  # the stem alone, folded, against conv then BN of the original
        want = net.bn0(net.stem(x))
        got = model.stem(x)
    assert got.shape == want.shape == (3, 8, 8, 7)  # "same" padding still applied in forward
    assert close(got, want, 1)
    # folding into a plain nn.Conv2d would have dropped the padding: the shapes would differ
    plain = nn.Conv2d(3, 8, 3, stride=2)
    assert plain(x).shape != want.shape


def test_depthwise_and_grouped_scale_per_output_channel(net, x):
    model = copy.deepcopy(net)
    ts.fold_batchnorm(model, x)
    scale = net.bn1.weight / torch.sqrt(net.bn1.running_var + net.bn1.eps)
    assert torch.allclose(model.dw.weight, net.dw.weight * scale.view(-1, 1, 1, 1), rtol=8 * EPS, atol=0)
    assert model.grouped.weight.shape == net.grouped.weight.shape == (12, 4, 3, 3)
    with torch.no_grad():
        h = F.relu6(net.bn1(net.dw(F.relu6(net.bn0(net.stem(x))))))
        assert close(model.grouped(h), net.bn2(net.grouped(h)), 1)


def test_bn_in_train_mode_is_left_with_a_warning(net, x):
    model = copy.deepcopy(net)
    model.bn1.train()
    before = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    with pytest.warns(UserWarning, match="bn1: in train mode"):
        folded = ts.fold_batchnorm(model, x)
    assert ("dw", "bn1") not in folded and ("stem", "bn0") in folded
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.bn1.training  # left, its mode kept
    assert not model.training and not model.dw.training
    for k, v in model.bn1.state_dict().items():  # the probe did not update its running statistics
        assert torch.equal(v, before[k]), k
    assert "train mode" in folded.skipped["bn1"]


def test_bn_without_running_stats_is_left(x):
    model = trained_bns(Untraceable())
    model.bn2 = nn.BatchNorm2d(12, track_running_stats=False).eval()
    with pytest.warns(UserWarning, match="no running statistics"):
        folded = ts.fold_batchnorm(model, x)
    assert ("grouped", "bn2") not in folded and isinstance(model.bn2, nn.BatchNorm2d)


class IgnoresBias(nn.Conv2d):
    """A conv whose forward drops its bias: folding a BN into it cannot be right."""

    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


def test_failed_check_restores_the_original(x):
    model = trained_bns(nn.Sequential(IgnoresBias(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    convs = (model[0], model[1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(ts.DecompositionError, match="left as it was"):
        ts.fold_batchnorm(model, x)
    assert model[0] is convs[0] and model[1] is convs[1]  # the very modules, unchanged
    assert model[0].bias is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_frozen_weights_fold_and_stay_frozen(net, x):
    model = copy.deepcopy(net)
    for p in model.parameters():
        p.requires_grad_(False)
    assert len(ts.fold_batchnorm(model, x)) == 3
    assert not any(p.requires_grad for p in model.parameters())


def test_compress_folds_with_its_first_batch_and_checkpoints_round_trip(net, x, tmp_path):
    data = [x, torch.randn(3, 3, 15, 13)]
    plan = ts.Plan({"grouped": {"method": "svd", "rank": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = ts.compress(net, plan, data=data, fold_bn=True)
    assert isinstance(small.bn0, nn.Identity) and isinstance(small.bn2, nn.Identity)
    assert isinstance(small.bn3, nn.BatchNorm2d)
    assert isinstance(net.bn0, nn.BatchNorm2d)  # the original is not modified
    path = tmp_path / "m.safetensors"
    ts.save(small, path)
    back = ts.load(path, model=trained_bns(Untraceable()))
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    assert isinstance(back.bn1, nn.Identity) and isinstance(back.bn3, nn.BatchNorm2d)


def test_compress_without_data_folds_with_an_example_input(net, x):
    """Data-free compress (the CLI's --fold-bn with --input-shape) probes with example_input."""
    plan = ts.Plan({"grouped": {"method": "svd", "rank": 4}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = ts.compress(net, plan, fold_bn=True, example_input=x)
        by_hand = copy.deepcopy(net)
        ts.fold_batchnorm(by_hand, x)
        by_hand = ts.compress(by_hand, plan)  # folded first, then the same truncation
    assert isinstance(small.bn0, nn.Identity) and isinstance(small.bn2, nn.Identity)
    assert isinstance(net.bn0, nn.BatchNorm2d)  # the original is not modified
    with torch.no_grad():
        assert torch.equal(small(x), by_hand(x))


def test_first_batch_keeps_a_one_pass_iterator_whole(x):
    batches = [x, x + 1, x + 2]
    first, data = _first_batch(iter(batches))
    assert first is batches[0]
    assert [b is a for a, b in zip(batches, data)] == [True, True, True]
    first, data = _first_batch(batches)
    assert first is batches[0] and data is batches
    first, data = _first_batch(x)  # a bare tensor is one batch
    assert first is x and data is x


def test_example_of_the_wrong_shape_is_a_clear_error_and_changes_nothing(net):
    model = copy.deepcopy(net)
    with pytest.raises(ts.DataError, match="probe forward on example="):
        ts.fold_batchnorm(model, torch.randn(2, 5, 15, 13))  # 5 channels for a 3-channel stem
    with pytest.raises(ts.DataError, match="probe forward on example=.*TypeError"):
        ts.fold_batchnorm(model, {"pixels": torch.randn(2, 3, 15, 13)})  # a keyword forward does not take
    assert all(isinstance(getattr(model, b), nn.BatchNorm2d) for b in ("bn0", "bn1", "bn2", "bn3"))
    assert all(p.requires_grad for p in model.parameters()) and not model.training
