"""Small pieces every part of the explorer uses: what it knows about a layer, rank text,
batching, the all-layers spectrum overview."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from ..inventory import LayerInfo
from ..spectra import Spectrum, Tradeoff

#: methods the budget planner and the presets choose between
PLANNER_METHODS = ("svd", "tucker2")
#: a dense layer in the method selector
DENSE = "dense"


def _rank_text(rank: Any) -> str:
    if rank is None:
        return ""
    if isinstance(rank, (tuple, list)):
        return "×".join(str(int(r)) for r in rank) if len(rank) == 2 else "-".join(str(int(r)) for r in rank)
    return str(int(rank))


def _jsonable_rank(rank: Any) -> Any:
    return [int(r) for r in rank] if isinstance(rank, (tuple, list)) else int(rank)


def _shrink(rank: Any) -> Any:
    if isinstance(rank, tuple):
        if len(rank) == 2:
            return tuple(max(1, int(r * 0.8)) for r in rank)
        return tuple([rank[0], *[max(1, int(r * 0.8)) for r in rank[1:-1]], rank[-1]])
    return max(1, int(rank * 0.8))


def _batches(x: Tensor, y: Tensor | None, size: int = 128) -> list:
    return [(x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size] for i in range(0, len(x), size)]


@dataclass
class _Layer:
    """What the explorer knows about one decomposable layer, computed when a network loads."""

    info: LayerInfo
    module: nn.Module
    spectrum: Spectrum  # the "out" unfolding: what svd truncates
    spectrum_in: Spectrum | None  # conv only: the input-channel unfolding (Tucker-2's r_in)
    tradeoffs: dict[str, Tradeoff]  # methods with a cheap error curve (svd, tucker2)
    tucker_energy: np.ndarray | None  # retained energy of HOSVD at (r_out, r_in), all pairs
    norm2: float  # ||W||_F^2
    metrics: dict = field(default_factory=dict)  # the out spectrum's metrics (stable rank, ...), computed once
    # (spectrum, spectrum_in, tradeoffs, metrics) of the weights, and whitened by calibration data
    plain: tuple | None = None
    aware: tuple | None = None

    def __post_init__(self) -> None:
        if self.plain is None:
            self.plain = (self.spectrum, self.spectrum_in, self.tradeoffs, self.metrics)

    def use(self, view: tuple) -> None:
        """Show one view: the weights' spectra (``plain``) or the whitened ones (``aware``)."""
        self.spectrum, self.spectrum_in, self.tradeoffs, self.metrics = view

    @property
    def geometry(self):
        return self.info.geometry

    @property
    def methods(self) -> list[str]:
        return list(self.info.max_rank)


def _overview(layers: dict[str, _Layer], bins: int = 48):
    """All layers' spectra on one grid: rank position as a fraction of each layer's maximum,
    log10 of the singular value over the largest (a tidy DataFrame for a heat map)."""
    import pandas as pd  # optional: comes with the app's extras, not a core dependency

    rows = []
    grid = (np.arange(bins) + 0.5) / bins
    for name, layer in layers.items():
        s = layer.spectrum.values.astype(np.float64)
        if s.size == 0 or s.max() <= 0:
            continue
        pos = (np.arange(s.size) + 0.5) / s.size
        v = np.log10(np.maximum(s / s.max(), 1e-6))
        vals = np.interp(grid, pos, v)
        for g, val in zip(grid, vals):
            rows.append({"layer": name, "position": float(g), "log10 s/s_max": float(val), "rank": int(math.ceil(g * s.size))})
    return pd.DataFrame(rows, columns=["layer", "position", "log10 s/s_max", "rank"])
