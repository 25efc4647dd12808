"""Small architectures for the checkpoint tests, importable by reference (``archs:...``).

They live in their own module (not in a test file) so that a fresh Python process can
rebuild them from the reference recorded in a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class SmallCNN(nn.Module):
    """Conv + BatchNorm stem, a residual block, a strided conv and a Linear head.

    Built with no argument, so its reference can be inferred from the class
    (``archs:SmallCNN``).
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.block = ResBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.relu(self.down(x))
        return self.head(torch.flatten(self.pool(x), 1))


def small_cnn(width: int = 16, num_classes: int = 10, seed: int = 0) -> SmallCNN:
    """A deterministic :class:`SmallCNN` with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = SmallCNN(width, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_mlp(d_in: int, hidden: int, d_out: int = 5) -> MLP:
    """A factory that needs keyword arguments (recorded in the checkpoint)."""
    return MLP(d_in, hidden, d_out)


class TiedLM(nn.Module):
    """An embedding whose weight is shared with the output layer (tied weights)."""

    def __init__(self, vocab: int = 20, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


class KwargsNet(nn.Module):
    """A forward taking keyword tensors, as a Hugging Face model does."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.fc(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1))


class Payload:
    """Unpickling this runs ``touch <marker>``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class ImportPayload:
    """Unpickling this imports ``module`` (whose import code could do anything)."""

    def __init__(self, module: str):
        self.module = module

    def __reduce__(self):
        import importlib

        return (importlib.import_module, (self.module,))
