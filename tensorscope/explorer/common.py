"""Small pieces every part of the explorer uses: what it knows about a layer, rank text,
batching, the all-layers spectrum overview."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import Tensor, nn

from ..inventory import LayerInfo
from ..methods import get_method
from ..spectra import Spectrum, Tradeoff

#: a dense layer in the method selector
DENSE = "dense"


def _rank_text(method: str, rank: Any) -> str:
    """A rank as the method writes it ("" for a dense layer)."""
    return "" if rank is None or method == DENSE else get_method(method).rank_text(rank)


def _rank_key(method: str, rank: Any) -> str:
    """A rank as JSON text: part of the keys memoised errors are stored under."""
    return json.dumps(get_method(method).rank_to_json(rank))


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def shared_result(key: tuple, compute: Callable[[], Any]) -> Any:
    """A result every session of the process may share: computed once per ``key``, then read.

    Only for immutable results of immutable inputs: what a built-in example's own weights and
    own calibration data give (its calibration statistics, whitened spectra, data-aware budget
    plans). A page of a class of students then pays for them once per server, not per page.
    """
    with _SHARED_LOCK:
        if key in _SHARED:
            return _SHARED[key]
    value = compute()
    with _SHARED_LOCK:
        return _SHARED.setdefault(key, value)


def _batches(x: Tensor, y: Tensor | None, size: int = 128) -> list:
    return [(x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size] for i in range(0, len(x), size)]


@dataclass
class _Layer:
    """What the explorer knows about one decomposable layer, computed when a network loads."""

    info: LayerInfo
    module: nn.Module
    spectrum: Spectrum  # the "out" unfolding: what svd truncates
    spectrum_in: Spectrum | None  # the input-channel unfolding, where a method's rank axis reads it
    tradeoffs: dict[str, Tradeoff]  # the methods with a cheap error curve
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

    def spectrum_of(self, unfolding: str) -> Spectrum:
        """The spectrum a rank axis reads (the out one where the in one was not computed)."""
        return self.spectrum_in if unfolding == "in" and self.spectrum_in is not None else self.spectrum


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
