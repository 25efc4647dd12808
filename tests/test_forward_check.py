"""Layers whose forward does more than their class says: handled exactly, or refused with the
reason; never silently wrong (a TensorFlow port's "same"-padding conv, with padding=0)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import tensorscope as ts
from tensorscope.forward_check import InputPadding, behaviour, same_padding
from tensorscope.recovery import dense_weight

TOL64 = dict(rtol=1e-9, atol=1e-9)


class TFSameConv(nn.Conv2d):
    """EfficientNet-style port: padding=0 declared, TensorFlow "same" padding done in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StaticPadConv(nn.Conv2d):
    """A port with a fixed asymmetric padding module in front (padding computed for one image size)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return super().forward(self.pad(x))


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class Net(nn.Module):
    def __init__(self, conv=TFSameConv):
        super().__init__()
        self.stem = conv(3, 8, 3, stride=2)
        self.mid = conv(8, 12, 5, stride=1)
        self.down = conv(12, 16, 3, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.mid(x))
        x = self.down(x)
        return self.fc(x.mean((-2, -1)))


def _net(conv=TFSameConv):
    torch.manual_seed(0)
    return Net(conv).double().eval()


@pytest.mark.parametrize("conv", [TFSameConv, StaticPadConv])
def test_ports_that_pad_in_forward_are_recognised(conv):
    b = behaviour(conv(4, 6, 3, stride=2))
    assert b.kind == "padded"
    assert b.same == (conv is TFSameConv)
    assert behaviour(nn.Conv2d(4, 6, 3)).kind == "plain"


@pytest.mark.parametrize("method, rank", [("svd", 1.0), ("tucker2", 1.0), ("cp", 1.0), ("tt", 1.0)])
@pytest.mark.parametrize("size", [17, 20, 33])  # odd, even, and another remainder
def test_full_rank_is_exact_through_padding_in_forward(method, rank, size):
    model = _net()
    plan = {n: {"method": method, "rank": rank} for n in ("stem", "mid", "down")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(model, plan)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    assert_close(small(x), model(x), **TOL64)
    assert isinstance(small.stem[0], InputPadding)


def test_data_aware_full_rank_is_exact_and_statistics_see_the_padding():
    model = _net()
    calib = [torch.randn(4, 3, 20, 20, dtype=torch.float64)]
    plan = {n: {"method": "svd", "rank": 1.0} for n in ("stem", "mid", "down")}
    small = ts.compress(model, plan, data=calib)
    x = torch.randn(2, 3, 21, 21, dtype=torch.float64)
    assert_close(small(x), model(x), **TOL64)
    # output error from the statistics equals the measured one, which needs the padded patches
    stats = ts.collect_stats(model, calib, ["mid"])["mid"]
    approx = get_half_rank_weight(model.mid)
    predicted = stats.output_error(model.mid.weight, approx)
    h = {}
    model.stem.register_forward_hook(lambda m, a, out: h.__setitem__("x", torch.relu(out)))
    with torch.no_grad():
        model(calib[0])
    xin = h["x"]
    ref = model.mid(xin)
    got = F.conv2d(InputPadding(None, (5, 5), (1, 1), (1, 1))(xin), approx, model.mid.bias)
    measured = float((got - ref).norm() / (ref - model.mid.bias[:, None, None]).norm())
    assert predicted == pytest.approx(measured, rel=1e-6)


def get_half_rank_weight(conv):
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = len(s) // 2
    return ((u[:, :r] * s[:r]) @ vh[:r]).reshape(conv.weight.shape)


def test_flops_count_the_padded_input():
    model = _net()
    x = torch.randn(1, 3, 21, 21, dtype=torch.float64)
    infos = ts.inspect(model, x).by_name()
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("stem", "mid", "down"):
        layer = getattr(model, name)
        counter = FlopCounterMode(display=False)
        seen = {}
        h = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        with torch.no_grad():
            model(x)
        h.remove()
        with counter, torch.no_grad():
            layer(seen["x"])
        assert infos[name].flops == counter.get_total_flops(), name


def test_save_load_export_round_trip_with_padding_in_forward(tmp_path):
    model = _net()
    plan = {"stem": {"method": "tucker2", "rank": [4, 2]}, "mid": {"method": "svd", "rank": 6}}
    small = ts.compress(model, plan)
    ts.save(small, tmp_path / "s.pt", plan=plan)
    again = ts.load(tmp_path / "s.pt", model=_net())
    x = torch.randn(2, 3, 19, 19, dtype=torch.float64)
    assert_close(again(x), small(x), **TOL64)
    ts.export(small, tmp_path / "s.pt2", example_input=x[:1])
    prog = torch.export.load(str(tmp_path / "s.pt2")).module()
    assert_close(prog(x), small(x), **TOL64)


def test_densify_of_a_padded_chain_gives_back_the_weight():
    model = _net()
    small = ts.compress(model, {"mid": {"method": "svd", "rank": 1.0}})
    assert_close(dense_weight(small.mid, model.mid), model.mid.weight.detach(), **TOL64)


def test_a_forward_that_does_something_else_is_refused_everywhere():
    model = _net(ScaledConv)
    infos = ts.inspect(model)
    assert [i.name for i in infos] == ["fc"]
    reason = {i.name: i.reason for i in infos.skipped}["mid"]
    assert "ScaledConv.forward computes something other than a convolution" in reason
    with pytest.raises(ts.PlanError, match="ScaledConv.forward"):
        ts.compress(model, {"mid": {"method": "svd", "rank": 2}})


def test_forward_hooks_are_refused_with_the_fix():
    model = _net(nn.Conv2d)
    handle = model.mid.register_forward_hook(lambda m, a, out: out * 0)
    with pytest.raises(ts.PlanError, match=r"forward hook.*handle.remove"):
        ts.compress(model, {"mid": {"method": "svd", "rank": 2}})
    handle.remove()
    ts.compress(model, {"mid": {"method": "svd", "rank": 2}})


def test_depthwise_convs_no_method_can_shrink_are_listed_with_why_they_stay():
    # a 3x3 depthwise conv is listed: CP at rank 1 (a separable filter per channel) is smaller;
    # 1x3 and 1x1 depthwise convs cannot be made smaller by any method
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, (1, 3), groups=8),
                          nn.Conv2d(8, 8, 1, groups=8), nn.Conv2d(8, 16, 1))
    infos = ts.inspect(model)
    assert [i.name for i in infos] == ["0", "3"]
    assert "cp" in infos.by_name()["0"].max_rank
    reasons = {i.name: i.reason for i in infos.skipped}
    assert set(reasons) == {"1", "2"}
    assert all("no method makes it smaller (a depthwise conv" in r for r in reasons.values())


@pytest.mark.parametrize("size, k, s", [(10, 3, 2), (11, 3, 2), (7, 5, 1), (224, 3, 2)])
def test_same_padding_matches_tensorflow(size, k, s):
    out = math.ceil(size / s)
    before, after = same_padding(size, k, s, 1)
    assert (size + before + after - k) // s + 1 == out and 0 <= after - before <= 1
