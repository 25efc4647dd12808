"""torch ``nn.Conv1d`` layers, decomposed through their Conv2d view (kernel ``(1, k)``).

(``tests/test_conv1d.py`` is about transformers' GPT-2 ``Conv1D``, seen as an nn.Linear.)
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorscope as ts
from tensorscope.layers import FactorizedLayer
from tensorscope.views import Conv1dView, linear_view

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
CASES = {
    "plain": (6, 10, 5, 1, 0, 1, 1, True, "zeros"),
    "strided-padded": (6, 10, 5, 2, 2, 1, 1, False, "zeros"),
    "dilated": (6, 8, 3, 1, 2, 2, 1, True, "zeros"),
    "grouped": (6, 9, 3, 2, 1, 1, 3, True, "zeros"),
    "grouped-dilated-nobias": (8, 12, 3, 1, 3, 3, 2, False, "zeros"),
    "reflect": (6, 10, 5, 1, 2, 1, 1, True, "reflect"),
    "circular": (6, 10, 3, 2, 1, 1, 1, True, "circular"),
    "same": (6, 10, 4, 1, "same", 2, 1, True, "zeros"),
    "same-reflect": (6, 10, 3, 1, "same", 1, 1, True, "reflect"),
}
LENGTH = 23  # odd, not a multiple of any stride


def _net(case: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    cin, cout, k, s, p, d, g, bias, mode = CASES[case]
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias,
                                   padding_mode=mode)).to(dtype).eval()


def _x(case: str, dtype=torch.float64, n: int = 3) -> torch.Tensor:
    return torch.randn(n, CASES[case][0], LENGTH, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _full_rank_atol(ref: torch.Tensor, layer: nn.Conv1d) -> float:
    """Rounding of a chain of a few products over a receptive field of in/g * k inputs."""
    eps = torch.finfo(ref.dtype).eps
    fan = layer.in_channels // layer.groups * layer.kernel_size[0]
    return 64 * eps * math.sqrt(fan) * max(1.0, float(ref.abs().max()))


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_is_exact_at_full_rank(case, dtype):
    net, x = _net(case, dtype), _x(case, dtype)
    (info,) = ts.inspect(net, x)
    assert info.kind == "Conv1d" and info.weight_shape == tuple(net[0].weight.shape)
    assert {"svd", "tucker2", "cp"} <= set(info.max_rank)
    if CASES[case][6] == 1:
        assert "tt" in info.max_rank  # TT refuses grouped convs, as for Conv2d
    with torch.no_grad():
        ref = net(x)
    for method, rank in info.max_rank.items():
        small = _quiet(ts.compress, net, ts.Plan({"0": {"method": method, "rank": rank}}))
        chain = small[0]
        assert isinstance(chain, FactorizedLayer) and chain.conv1d and chain.source == "Conv1d", method
        with torch.no_grad():
            out = small(x)
        assert out.shape == ref.shape, method
        err = float((out - ref).abs().max().detach())
        assert err <= _full_rank_atol(ref, net[0]), (method, err)
        # unbatched input, as nn.Conv1d takes it
        torch.testing.assert_close(small(x[0]), out[0], rtol=0, atol=_full_rank_atol(ref, net[0]))
    assert isinstance(net[0], nn.Conv1d)  # the original is untouched


def test_the_view_is_the_same_convolution_on_the_same_memory():
    for case in CASES:
        net, x = _net(case), _x(case)
        view = linear_view(net[0])
        assert isinstance(view, Conv1dView) and view.weight.data_ptr() == net[0].weight.data_ptr()
        assert view.bias is net[0].bias and linear_view(net[0]) is view
        torch.testing.assert_close(view(x.unsqueeze(2)).squeeze(2), net[0](x), rtol=0, atol=1e-12)


def _twin_2d(net: nn.Sequential) -> nn.Sequential:
    """The same layer as an nn.Conv2d of kernel (1, k) on an input of height 1."""
    view = linear_view(net[0])
    conv = nn.Conv2d(view.in_channels, view.out_channels, view.kernel_size, stride=view.stride, padding=view.padding,
                     dilation=view.dilation, groups=view.groups, bias=view.bias is not None,
                     padding_mode=view.padding_mode, dtype=view.weight.dtype)
    conv.load_state_dict({"weight": view.weight.detach().clone(),
                          **({"bias": view.bias.detach().clone()} if view.bias is not None else {})})
    return nn.Sequential(conv).eval()


@pytest.mark.parametrize("case", ["strided-padded", "grouped", "reflect"])
def test_statistics_and_spectra_equal_those_of_the_conv2d_twin(case):
    net, x = _net(case), _x(case, n=5)
    twin = _twin_2d(net)
    a = ts.collect_stats(net, [x[:3], x[3:]], ["0"], gradients=True, probes=2)
    b = ts.collect_stats(twin, [x[:3].unsqueeze(2), x[3:].unsqueeze(2)], ["0"], gradients=True, probes=2)
    assert a["0"].count == b["0"].count and a["0"].kind == b["0"].kind == "conv2d"
    torch.testing.assert_close(a["0"].patch, b["0"].patch)
    torch.testing.assert_close(a["0"].grad, b["0"].grad)
    for unfolding in ("out", "in"):
        torch.testing.assert_close(torch.as_tensor(ts.spectrum(net, "0", unfolding=unfolding).grouped),
                                   torch.as_tensor(ts.spectrum(twin, "0", unfolding=unfolding).grouped))
    # data-aware factors: the same chain weights as the twin's
    plan = ts.Plan({"0": {"method": "svd", "rank": 2}})
    small, small2 = ts.compress(net, plan, stats=a), ts.compress(twin, plan, stats=b)
    for p, q in zip(small[0].parameters(), small2[0].parameters()):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(small(x), small2(x.unsqueeze(2)).squeeze(2))


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
@pytest.mark.parametrize("case", ["strided-padded", "grouped-dilated-nobias", "circular"])
def test_predicted_params_and_flops_equal_the_built_model(case, method):
    net, x = _net(case, torch.float32), _x(case, torch.float32)
    info = ts.inspect(net, x).by_name()["0"]
    assert info.params == sum(p.numel() for p in net.parameters())
    assert info.flops == ts.count_flops(net, x)  # FlopCounterMode's count of the Conv1d itself
    if method not in info.max_rank:
        assert method == "tt" and CASES[case][6] > 1
        return
    plan = ts.Plan({"0": {"method": method, "rank": 0.5}})
    cost = _quiet(ts.plan_cost, net, plan, x)
    small = _quiet(ts.compress, net, plan)
    assert ts.count_params(small) == cost["params_after"]
    # a TT layer that rebuilds its kernel does so once per call: the prediction shares it among
    # the example's samples, as count_flops does
    assert ts.count_flops(small, x) == cost["flops_after"]
    twin, x2 = _twin_2d(net), x.unsqueeze(2)
    assert _quiet(ts.plan_cost, twin, plan, x2) == cost
    assert ts.count_flops(_quiet(ts.compress, twin, plan), x2) == ts.count_flops(small, x)


def test_depthwise_conv1d_is_left_with_the_reason_of_a_depthwise_conv2d():
    one = nn.Sequential(nn.Conv1d(8, 8, 3, groups=8))
    two = nn.Sequential(nn.Conv2d(8, 8, (1, 3), groups=8))
    (a,), (b,) = ts.inspect(one).skipped, ts.inspect(two).skipped
    assert "cannot" not in a.reason and "no method makes it smaller (a depthwise conv" in a.reason
    assert a.reason == b.reason and a.kind == "Conv1d"
    assert ts.inspect(one) == []


def test_conv3d_stays_refused_and_a_lazy_conv1d_asks_for_a_forward():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.LazyConv1d(4, 3))
    reasons = {i.name: i.reason for i in ts.inspect(net, include_skipped=True)}
    assert "Conv3d is not supported yet" in reasons["0"] and "nn.Conv1d" in reasons["0"]
    assert "lazy" in reasons["1"]


def test_a_conv1d_given_the_wrong_input_is_one_clear_error_everywhere():
    """A 2-D (N, L) input, or the wrong channels: the DataError naming the batch, as for a Conv2d."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        r"\(6, 16\).*failed in the model's forward.*a Conv1d with 4 input channels got an input of shape \(\d+, 16\) "
        r"\(wanted \(N, 4, L\)\)": [torch.randn(6, 16)],
        r"\(6, 5, 16\).*failed in the model's forward.*a Conv1d with 4 input channels": [torch.randn(6, 5, 16)],
    }
    plan = ts.Plan({"0": {"method": "svd", "rank": 2}})
    for what, data in cases.items():
        for run in (lambda d: ts.collect_stats(model, d), lambda d: ts.plan_for_budget(model, keep=0.5, data=d),
                    lambda d: ts.compress(model, plan, data=d), lambda d: ts.inspect(model, d[0])):
            with pytest.raises(ts.DataError, match=what):
                run(data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class CausalConv1d(nn.Conv1d):
    """Pads (k - 1) * d zeros on the left in its forward (WaveNet-style), declaring padding=0."""

    def forward(self, x):
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class Squared(nn.Conv1d):
    def forward(self, x):
        return super().forward(x) ** 2


def test_forward_check_covers_conv1d_subclasses_and_hooks():
    torch.manual_seed(0)
    net = nn.Sequential(CausalConv1d(4, 6, 3, dilation=2), nn.ReLU(), Squared(6, 6, 3), nn.Conv1d(6, 6, 3)).double()
    x = torch.randn(2, 4, 19, dtype=torch.float64)
    infos = ts.inspect(net, x, include_skipped=True)
    reasons = {i.name: i.reason for i in infos}
    assert reasons["0"] is None  # a fixed left padding, put in front of the chain
    assert "Squared.forward computes something other than a convolution" in reasons["2"]
    rank = infos.by_name()["0"].max_rank["svd"]
    small = _quiet(ts.compress, net, ts.Plan({"0": {"method": "svd", "rank": rank}}))
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-12)
    with pytest.raises(ts.PlanError, match="Squared"):
        ts.compress(net, ts.Plan({"2": {"method": "svd", "rank": 2}}))
    h = net[3].register_forward_hook(lambda m, a, o: o * 2)
    try:
        skipped = {i.name: i.reason for i in ts.inspect(net).skipped}
        assert "forward hook" in skipped["3"]
    finally:
        h.remove()
    assert "3" in [i.name for i in ts.inspect(net)]


class AudioNet(nn.Module):
    """A small 1-D CNN: three Conv1d + BatchNorm1d + ReLU blocks, pooling, a Linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 24, 7, stride=2, padding=3, bias=False), nn.BatchNorm1d(24), nn.ReLU(),
            nn.Conv1d(24, 32, 5, padding=2, groups=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 32, 3, dilation=2, padding=2, padding_mode="reflect"), nn.BatchNorm1d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(-1))


def _audio_net() -> nn.Module:
    torch.manual_seed(0)
    net = AudioNet()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return net.eval()


def _signals(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 64)
    out = []
    for _ in range(n):  # correlated channels: a few sines plus noise
        f = torch.rand(8, 1, 1, generator=g) * 20
        base = torch.sin(2 * math.pi * f * t).sum(0)
        out.append(base.expand(8, 2, 64) * torch.rand(8, 2, 1, generator=g)
                   + 0.1 * torch.randn(8, 2, 64, generator=g))
    return out


CONVS = ["features.0", "features.3", "features.6"]


def test_fold_batchnorm_folds_conv1d_and_batchnorm1d_pairs():
    net, x = _audio_net(), _signals(1)[0]
    with torch.no_grad():
        ref = net(x)
    for example in (x, None):  # a probe run, and the trace
        model = copy.deepcopy(net)
        folded = ts.fold_batchnorm(model, example)
        assert sorted(folded) == [(c, f"features.{int(c[-1]) + 1}") for c in CONVS]
        assert all(isinstance(model.get_submodule(f"features.{i}"), nn.Identity) for i in (1, 4, 7))
        eps = torch.finfo(ref.dtype).eps
        with torch.no_grad():
            assert float((model(x) - ref).abs().max()) <= 16 * eps * 4 * max(1.0, float(ref.abs().max()))
    lin = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()  # a BatchNorm1d after a Linear is no pair
    assert ts.fold_batchnorm(lin, torch.randn(3, 4)) == []


def test_a_1d_cnn_through_plan_compress_correct_save_load_and_export(tmp_path):
    from tensorscope.allocation import measured_damage

    net, data = _audio_net(), _signals()
    x = data[0]
    infos = ts.inspect(net, x).by_name()
    assert set(CONVS) <= set(infos) and all(infos[n].kind == "Conv1d" for n in CONVS)

    # data-free and data-aware budget plans both choose among the Conv1d layers
    plan_free = ts.plan_for_budget(net, keep=0.5)
    plan = ts.plan_for_budget(net, keep=0.5, data=data)
    assert set(plan_free) & set(CONVS) and set(plan) & set(CONVS)
    stats = ts.collect_stats(net, data)
    assert set(ts.plan_for_budget(net, keep=0.5, stats=stats)) & set(CONVS)
    cost = ts.plan_cost(net, plan, x)
    small = ts.compress(net, plan, stats=stats)
    assert ts.count_params(small) == cost["params_after"] and ts.count_flops(small, x) == cost["flops_after"]
    # the preview (original architecture, reconstructed weights) computes what the chains do
    torch.testing.assert_close(ts.preview(net, plan)(x), ts.compress(net, plan)(x), rtol=1e-4, atol=1e-5)

    # sequential correction refits the Conv1d chains and lowers the damage on the calibration data
    fixed = ts.correct(small, net, data, stats=stats)
    assert [n for n in CONVS if n in plan] and all(fixed.get_submodule(n).conv1d for n in CONVS if n in plan)
    assert measured_damage(net, fixed, data) < measured_damage(net, small, data)

    # folded BatchNorms, data-aware factors, correction: saved, loaded and exported alike
    folded = ts.compress(net, plan, data=data, fold_bn=True, correct=True)
    assert isinstance(folded.features[1], nn.Identity)
    ref = folded(x)
    ts.save(folded, tmp_path / "a.pt")
    back = ts.load(tmp_path / "a.pt", model=AudioNet())
    assert torch.equal(back(x), ref)
    for fmt in ("exported_program", "torchscript"):
        path = ts.export(folded, tmp_path / f"a-{fmt}", example_input=x, format=fmt)
        prog = torch.export.load(path).module() if fmt == "exported_program" else torch.jit.load(path)
        with torch.no_grad():
            torch.testing.assert_close(prog(x), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(prog(x[:3]), folded(x[:3]), rtol=1e-5, atol=1e-6)  # any batch size

    # execution forms and a fresh trainable structure run on (N, C, L) too
    svd = ts.compress(net, ts.Plan({n: {"method": "svd", "rank": 4} for n in CONVS}))
    ts.tune_execution(svd, x, repeats=1)
    torch.testing.assert_close(svd(x), ts.compress(net, ts.Plan({n: {"method": "svd", "rank": 4}
                                                                  for n in CONVS}))(x), rtol=1e-5, atol=1e-6)
    assert "dense" in svd.get_submodule(CONVS[0]).available_executions()  # (not grouped CONVS[1])
    for n in (CONVS[0], CONVS[2]):
        svd.get_submodule(n).set_execution("dense")
    torch.testing.assert_close(svd(x), ts.compress(net, ts.Plan({n: {"method": "svd", "rank": 4}
                                                                  for n in CONVS}))(x), rtol=1e-5, atol=1e-6)
    assert _quiet(ts.tensorize, net, plan)(x).shape == ref.shape


def test_densify_multiplies_conv1d_chains_back_out():
    from tensorscope.recovery import densify

    net, x = _audio_net(), _signals(1)[0]
    plan = ts.Plan({"features.0": {"method": "tucker2", "rank": (6, 2)}, "features.3": {"method": "cp", "rank": 6}})
    small = ts.compress(net, plan)
    dense = densify(small, net)
    assert all(isinstance(dense.get_submodule(n), nn.Conv1d) for n in CONVS)
    torch.testing.assert_close(dense(x), small(x), rtol=1e-4, atol=1e-5)


def test_explorer_state_previews_a_conv1d_layer():
    """The explorer's state lists the Conv1d layers and previews a rank on one (the reconstructed
    weight installed, without its height of 1, into the Conv1d of its private copy)."""
    from tensorscope.explorer.evaluator import _EvalData
    from tensorscope.explorer.state import ExplorerState

    net = _audio_net()
    x = torch.cat(_signals(2))
    state = ExplorerState()
    try:
        loaded = state._prepare(net, "audio", None, {"held-out": _EvalData(x, None, "signals", "held-out")},
                                "held-out", ts.Plan())
        state._install(loaded)
        assert set(CONVS) <= set(loaded.layers)
        assert state.set_layer(CONVS[1], "svd", 4)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (state.quality or {}).get("plan") is None:
            time.sleep(0.2)
        small = ts.compress(net, ts.Plan({CONVS[1]: {"method": "svd", "rank": 4}}))
        want = ts.evaluate(small, [x], reference=net)["agreement"]
        assert state.quality["agreement"] == pytest.approx(want)
        assert all(isinstance(net.get_submodule(n), nn.Conv1d) for n in CONVS)  # the session's model untouched
    finally:
        state.close()


def test_a_joint_group_of_conv1d_layers_is_exact_at_full_rank_and_round_trips(tmp_path):
    def make():
        return nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv1d(8, 8, 3, padding=1)).double().eval()

    torch.manual_seed(0)
    net, x = make(), torch.randn(2, 8, 17, dtype=torch.float64)
    plan = ts.Plan.from_dict({"tensorscope_plan": 2, "groups": {"g": {"method": "joint_tucker",
                                                                      "layers": ["0", "2", "4"], "rank": 1.0}}})
    small = _quiet(ts.compress, net, plan)
    assert all(small[i].conv1d for i in (0, 2, 4))
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(small(x), ref, rtol=0, atol=_full_rank_atol(ref, net[0]))
    assert ts.count_params(small) == _quiet(ts.plan_cost, net, plan)["params_after"]
    ts.save(small, tmp_path / "g.pt")
    assert torch.equal(ts.load(tmp_path / "g.pt", model=make())(x), small(x))


def test_conv1d_weights_on_disk_compress_as_in_memory(tmp_path):
    """With the architecture named (arch=), a folder of shards holding Conv1d layers is
    compressed layer by layer and loads back as the in-memory model compresses. (Tensor names
    alone do not say a 3-D weight is a Conv1d, nor its stride, padding and groups: without the
    architecture it is listed as left alone.)"""
    from stream_helpers import ConvNet1d, write_shards

    torch.manual_seed(0)
    model = ConvNet1d().eval()
    folder = write_shards(model.state_dict(), str(tmp_path / "net"), shards=2)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    assert [i.name for i in ts.inspect(folder)] == ["fc"]
    plan = ts.plan_for_budget(model, keep=0.5)
    assert {"conv1", "conv2", "conv3"} & set(plan)
    out = ts.compress(folder, plan, out=tmp_path / "small", arch="stream_helpers:ConvNet1d")
    loaded, small = ts.load(out), ts.compress(model, plan)
    assert all(loaded.get_submodule(n).conv1d for n in plan if n.startswith("conv"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=1e-5, atol=1e-5)


def _whisper(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, num_mel_bins=20,
                                     max_source_positions=30, max_target_positions=20, vocab_size=60, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel(cfg).eval()


def test_whisper_conv_stem_compresses_and_its_encoder_still_reads_the_stride(tmp_path):
    """Whisper's encoder reads ``conv1.stride[0]`` in its forward: the chain keeps the Conv1d's
    geometry attributes, after compress and after load alike."""
    model = _whisper()
    batch = {"input_features": torch.randn(2, 20, 60, generator=torch.Generator().manual_seed(1)),
             "decoder_input_ids": torch.tensor([[1, 5, 6], [1, 7, 8]])}
    infos = ts.inspect(model, batch).by_name()
    assert infos["encoder.conv1"].kind == infos["encoder.conv2"].kind == "Conv1d"
    plan = ts.Plan({"encoder.conv1": {"method": "tucker2", "rank": infos["encoder.conv1"].max_rank["tucker2"]},
                    "encoder.conv2": {"method": "svd", "rank": infos["encoder.conv2"].max_rank["svd"]}})
    small = _quiet(ts.compress, model, plan)
    assert small.encoder.conv2.stride == (2,) and small.encoder.conv2.in_channels == 32
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = small(**batch).last_hidden_state
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(out, ref, rtol=0, atol=1e3 * eps * float(ref.abs().max()))
    ts.save(small, tmp_path / "w.pt")
    back = ts.load(tmp_path / "w.pt", model=_whisper(seed=5))
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, out)
