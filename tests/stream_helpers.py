"""Networks and helpers for the large-model tests (importable as ``stream_helpers:MLP``), and the
worker that ``torchrun`` starts (``python tests/stream_helpers.py worker ...``).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn


class MLP(nn.Module):
    """Linear layers with a norm between: built with no argument (reference ``stream_helpers:MLP``)."""

    def __init__(self, widths: tuple[int, ...] = (32, 48, 40, 36, 24, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norm = nn.LayerNorm(widths[1])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 0:
                x = self.norm(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class ConvNet1d(nn.Module):
    """Conv1d layers (strided, grouped, reflect-padded) and a Linear head: reference ``stream_helpers:ConvNet1d``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 12, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(12, 16, 3, padding=1, groups=2, bias=False)
        self.conv3 = nn.Conv1d(16, 16, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(16 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def make_data(n_batches: int = 5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 32, generator=g) for _ in range(n_batches)]


def write_shards(state_dict: dict[str, torch.Tensor], folder: str, shards: int = 3,
                 config: dict | None = None) -> str:
    """The Hugging Face layout: ``model-0000k-of-0000n.safetensors`` and the index."""
    os.makedirs(folder, exist_ok=True)
    keys = list(state_dict)
    per = -(-len(keys) // shards)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state_dict[key].detach().contiguous().clone() for key in keys[k * per:(k + 1) * per]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({key: name for key in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
             "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    return folder


MLP_PLAN = {"layers.0": {"method": "svd", "rank": 12}, "layers.1": {"method": "svd", "rank": 10},
            "layers.2": {"method": "svd", "rank": 9}, "layers.3": {"method": "svd", "rank": 8},
            "layers.4": {"method": "svd", "rank": 6}}


def worker(source: str, out: str, stats_path: str, mode: str) -> None:
    """One process under torchrun: statistics over its share of the data (all-reduced), then
    its share of the layers. ``mode="die"``: process 1 exits abruptly at its second layer."""
    import tensorscope as ts
    from tensorscope import distributed, streaming

    torch.set_num_threads(1)
    ctx = distributed.context()
    model = make_mlp()
    stats = distributed.collect_stats(model, make_data(), list(MLP_PLAN))
    if ctx.rank == 0:
        torch.save({n: (s.patch, s.count) for n, s in stats.items()}, stats_path)
    if mode == "die" and ctx.rank == 1:
        real, seen = streaming._do_item, []

        def dying(run, it, *args, **kwargs):
            seen.append(it.id)
            if len(seen) == 2:
                os._exit(3)  # killed: no exception, no report
            return real(run, it, *args, **kwargs)

        streaming._do_item = dying
    ts.compress(source, MLP_PLAN, out=out, stats=stats, shard_bytes=1)
    print(f"process {ctx.rank}: done", flush=True)
    distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(*sys.argv[2:6])
