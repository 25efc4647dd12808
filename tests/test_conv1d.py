"""GPT-2-style ``Conv1D`` layers (weight ``in x out``), decomposed through their Linear view."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import tensorscope as ts
from tensorscope.views import Conv1DView, as_linear, is_conv1d, linear_view

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 50, 10


def _gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(cfg).eval()


def _batches(n: int = 2, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (3, SEQ), generator=g)} for _ in range(n)]


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _linearized(model: nn.Module) -> nn.Module:
    """The same network with every Conv1D replaced by an nn.Linear (weights copied)."""
    new = copy.deepcopy(model)
    for name, mod in list(new.named_modules()):
        if is_conv1d(mod):
            parent, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(parent), leaf, as_linear(mod))
    return new


CONV1D = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
          "transformer.h.0.mlp.c_proj"]


def test_the_view_shares_the_layer_memory():
    model = _gpt2()
    layer = model.get_submodule(CONV1D[0])
    view = linear_view(layer)
    assert isinstance(view, Conv1DView) and view.weight.shape == layer.weight.shape[::-1]
    assert view.weight.data_ptr() == layer.weight.data_ptr() and view.bias is layer.bias
    assert linear_view(layer) is view  # one view per layer while its parameters stay
    x = torch.randn(4, layer.weight.shape[0])
    torch.testing.assert_close(view(x), layer(x))


def test_inspect_lists_conv1d_with_linear_geometry():
    model = _gpt2()
    infos = ts.inspect(model, _batches(1)[0]).by_name()
    for name in CONV1D:
        info = infos[name]
        layer = model.get_submodule(name)
        assert info.kind == "Conv1D"
        assert info.weight_shape == tuple(layer.weight.shape[::-1])  # out x in, as for nn.Linear
        assert info.flops == 2 * SEQ * layer.weight.numel()
        assert info.max_rank["svd"] == min(layer.weight.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_svd_full_rank_is_exact(dtype):
    model = _gpt2().to(dtype)
    names = [i.name for i in ts.inspect(model)]
    assert set(CONV1D) <= set(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ts.BreakEvenWarning)
        small = ts.compress(model, ts.Plan({n: {"method": "svd", "rank": 1.0} for n in names}))
    assert not any(is_conv1d(m) for m in small.modules())
    batch = _batches(1)[0]
    ref, out = _logits(model, batch), _logits(small, batch)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref, rtol=0, atol=1e3 * eps * float(ref.abs().max()))
    assert all(is_conv1d(m) for n, m in model.named_modules() if n in CONV1D)  # the original is untouched


def test_spectrum_and_stats_equal_those_of_the_linear_form():
    model = _gpt2()
    lin = _linearized(model)
    for name in CONV1D:
        torch.testing.assert_close(torch.as_tensor(ts.spectrum(model, name).grouped),
                                   torch.as_tensor(ts.spectrum(lin, name).grouped))
    data = _batches()
    a = ts.collect_stats(model, data, CONV1D)
    b = ts.collect_stats(lin, data, CONV1D)
    for name in CONV1D:
        assert a[name].count == b[name].count
        torch.testing.assert_close(a[name].patch, b[name].patch)


def test_budget_plan_compress_preview_save_load_and_export(tmp_path):
    model = _gpt2()
    data = _batches()
    plan = ts.plan_for_budget(model, keep=0.7)
    assert set(plan) & set(CONV1D)
    cost = ts.plan_cost(model, plan)
    small = ts.compress(model, plan)
    assert ts.count_params(small) == cost["params_after"]  # predicted from geometry = built
    # the preview (original architecture, reconstructed weights) computes what the chain does
    ref = _logits(small, data[0])
    torch.testing.assert_close(_logits(ts.preview(model, plan), data[0]), ref, rtol=1e-4, atol=1e-5)
    # next-token agreement with the original: evaluate's agreement over every position
    result = ts.evaluate(small, data, reference=model)
    assert 0.0 <= result["agreement"] <= 1.0
    ts.save(small, tmp_path / "g.pt")
    back = ts.load(tmp_path / "g.pt", model=_gpt2(seed=5))
    assert torch.equal(_logits(back, data[0]), ref)
    path = ts.export(small, tmp_path / "g", example_input=data[0], format="exported_program")
    prog = torch.export.load(path).module()
    with torch.no_grad():
        out = prog(**data[0])
    out = out.logits if hasattr(out, "logits") else (out["logits"] if isinstance(out, dict) else out[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_data_aware_plan_and_compress():
    model = _gpt2()
    data = _batches(4)
    stats = ts.collect_stats(model, data)
    plan = ts.plan_for_budget(model, keep=0.7, stats=stats)
    assert set(plan) & set(CONV1D)
    small = ts.compress(model, plan, stats=stats)
    assert ts.evaluate(small, data, reference=model)["agreement"] > 0.0


def test_sequential_correction_refits_conv1d_layers():
    """compress(correct=True) refits Conv1D chains (seen through their Linear view) and lowers
    the damage measured on the calibration data."""
    from tensorscope.allocation import measured_damage

    model = _gpt2()
    data = _batches(4)
    plan = ts.plan_for_budget(model, keep=0.6)
    assert set(plan) & set(CONV1D)
    plain = ts.compress(model, plan, data=data)
    fixed = ts.compress(model, plan, data=data, correct=True)
    assert measured_damage(model, fixed, data) < measured_damage(model, plain, data)


def test_a_conv1d_with_a_hook_is_refused_with_the_reason():
    model = _gpt2()
    h = model.get_submodule(CONV1D[0]).register_forward_hook(lambda m, a, o: o * 2)
    try:
        skipped = {i.name: i.reason for i in ts.inspect(model).skipped}
        assert "forward hook" in skipped[CONV1D[0]]
        with pytest.raises(ts.PlanError, match="forward hook"):
            ts.compress(model, ts.Plan({CONV1D[0]: {"method": "svd", "rank": 4}}))
    finally:
        h.remove()


def test_explorer_state_previews_a_conv1d_layer():
    """The explorer's state lists a GPT-2's Conv1D layers and previews a rank on them (the
    reconstructed weight is installed transposed into the Conv1D of its private copy)."""
    import time

    from tensorscope.explorer.evaluator import _EvalData
    from tensorscope.explorer.state import ExplorerState

    model = _gpt2()
    ids = _batches(1)[0]["input_ids"]
    state = ExplorerState()
    try:
        loaded = state._prepare(model, "gpt2", None, {"held-out": _EvalData(ids, None, "ids", "held-out")},
                                "held-out", ts.Plan())
        state._install(loaded)
        assert set(CONV1D) <= set(loaded.layers)
        assert state.set_layer(CONV1D[2], "svd", 4)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (state.quality or {}).get("plan") is None:
            time.sleep(0.2)
        small = ts.compress(model, ts.Plan({CONV1D[2]: {"method": "svd", "rank": 4}}))
        want = ts.evaluate(small, [ids], reference=model)["agreement"]
        assert state.quality["agreement"] == pytest.approx(want)
        assert all(is_conv1d(m) for n, m in model.named_modules() if n in CONV1D)  # the session's model untouched
    finally:
        state.close()
