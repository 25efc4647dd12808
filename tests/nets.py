"""Small test networks for the spectra, ranks, budget and preview tests.

Module-level classes and factories so that any test (or a fresh process) can import them:

* :class:`ResidualCNN` / :func:`residual_cnn`: BatchNorm, stride-2 blocks with a 1x1
  shortcut, a grouped conv, a depthwise conv, a bias-free conv, a dilated conv, a Linear
  head. Input ``(B, 3, 16, 16)``.
* :class:`TinyMLP` / :func:`tiny_mlp`: two hidden Linear layers. Input ``(B, 1, 8, 8)``.

Factories seed torch locally (the global random state is left as it was), so every call
gives the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_INPUT = (3, 16, 16)
MLP_INPUT = (1, 8, 8)


class DownBlock(nn.Module):
    """conv3x3 stride 2 (no bias) + BN, conv3x3 + BN, plus a 1x1 stride-2 conv shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A residual CNN exercising every conv variant the methods must keep.

    layers (decomposable): stem (3->16, 3x3, bias), block1.* (16->32, stride 2, 1x1
    shortcut), grouped (32->32, 3x3, groups=4), depthwise (32->32, 3x3, groups=32),
    block2.* (32->48, stride 2), dilated (48->48, 3x3, dilation 2, padding 2, bias),
    fc1 (48->40), head (40->10).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.block1 = DownBlock(16, 32)  # 16 -> 8
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn_g = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.block2 = DownBlock(32, 48)  # 8 -> 4
        self.dilated = nn.Conv2d(48, 48, 3, padding=2, dilation=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(48, 40)
        self.head = nn.Linear(40, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self.block1(x)
        x = x + F.relu(self.bn_g(self.grouped(x)))
        x = F.relu(self.depthwise(x))
        x = self.block2(x)
        x = F.relu(self.dilated(x)) + x
        x = self.pool(x).flatten(1)
        return self.head(F.relu(self.fc1(x)))


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 48, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _seeded(builder, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
        # non-trivial BatchNorm statistics, so folding/eval mode actually matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def residual_cnn(seed: int = 0) -> ResidualCNN:
    return _seeded(ResidualCNN, seed)


def tiny_mlp(seed: int = 0) -> TinyMLP:
    return _seeded(TinyMLP, seed)


def residual_input(batch: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *RESIDUAL_INPUT, generator=g)


def mlp_input(batch: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *MLP_INPUT, generator=g)


def one_thread():
    """A generator for a module-scoped autouse fixture: run on one intra-op thread, then restore.

    On a shared 2-core machine, MKL/OpenMP with 2 threads can be 100x slower than with one
    when the other core is busy (spin-waiting threads); tests here only need correctness.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
