"""refine_layerwise(blocks=...): a block's factorized layers trained together on its output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorscope as ts
from tensorscope.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::tensorscope.methods.base.BreakEvenWarning")


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.layer1, self.layer2 = Block(c), Block(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(F.relu(self.stem(x)))).mean((2, 3)))


def _block_error(student, teacher, name, xs):
    outs = {}

    def grab(key):
        return lambda mod, args, out: outs.__setitem__(key, out.detach())

    hs = [student.get_submodule(name).register_forward_hook(grab("s")),
          teacher.get_submodule(name).register_forward_hook(grab("t"))]
    try:
        with torch.no_grad():
            student(xs)
            teacher(xs)
    finally:
        for h in hs:
            h.remove()
    return float((outs["s"] - outs["t"]).pow(2).mean() / outs["t"].pow(2).mean())


def test_blocks_train_their_factorized_layers_together_and_nothing_else():
    torch.manual_seed(0)
    model = Net().eval()
    for bn in (model.layer1.bn1, model.layer1.bn2, model.layer2.bn1, model.layer2.bn2):
        bn.running_var.uniform_(0.5, 2.0)
    plan = {f"layer{b}.conv{k}": {"method": "tucker2", "rank": [2, 2]} for b in (1, 2) for k in (1, 2)}
    small = ts.compress(model, plan)
    data = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    xs = torch.cat(data)
    before = {n: _block_error(small, model, n, xs) for n in ("layer1", "layer2")}
    refined = ts.refine_layerwise(small, model, data, steps=60, lr=1e-2, blocks=["layer2", "layer1"])
    after = {n: _block_error(refined, model, n, xs) for n in ("layer1", "layer2")}
    assert after["layer1"] < 0.8 * before["layer1"] and after["layer2"] < before["layer2"]
    # only the factorized layers moved; BatchNorm, stem and fc are as they were; small is untouched
    own = dict(small.named_parameters())
    moved = {n for n, p in refined.named_parameters() if not torch.equal(p, own[n])}
    assert moved and all(".conv" in n for n in moved), moved
    for n, b in refined.named_buffers():
        assert torch.equal(b, dict(small.named_buffers())[n]), n


def test_blocks_that_are_missing_nested_or_without_factors_are_refused():
    model = Net().eval()
    small = ts.compress(model, {"layer1.conv1": {"method": "tucker2", "rank": [2, 2]}})
    data = [torch.randn(4, 1, 8, 8)]
    with pytest.raises(DataError, match=r"block 'layer3' is not a module.*did you mean"):
        ts.refine_layerwise(small, model, data, blocks=["layer3"])
    with pytest.raises(DataError, match="'layer2' holds no factorized layer"):
        ts.refine_layerwise(small, model, data, blocks=["layer1", "layer2"])
    with pytest.raises(DataError, match="inside block 'layer1'"):
        ts.refine_layerwise(small, model, data, blocks=["layer1", "layer1.conv1"])
