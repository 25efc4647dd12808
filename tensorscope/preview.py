"""Fast previews of a plan: the original architecture with low-rank reconstructed weights.

A factorized chain computes exactly ``layer(x)`` with the weight its factors reconstruct, so
evaluating the original architecture with that weight gives the same outputs as the built
model, without building it. Reconstructions are memoised per (weight, method, rank), and
use the cheapest factors (plain truncation, short CP-ALS): what a slider move can afford.
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ._cache import factor_cache, fingerprint
from .plan import ResolvedLayer, as_plan


def reconstructed_weight(r: ResolvedLayer, refine: bool = False, stats: Any = None) -> torch.Tensor:
    """The dense weight that ``r``'s method and rank represent (memoised).

    With ``stats`` (the layer's :class:`~tensorscope.calibration.LayerStats`), the data-aware
    factors ``compress(..., data=...)`` builds.
    """
    key = (fingerprint(r.module.weight), getattr(r.module, "groups", 1), "recon", r.method.name,
           json.dumps(r.rank, default=list), json.dumps(dict(r.options), sort_keys=True, default=list), refine,
           None if stats is None else stats.token)

    def compute():
        factors = r.method.factorize(r.module, r.rank, r.options, stats=stats, refine=refine)
        return r.method.reconstruct(r.module, factors).detach()

    return factor_cache.get(key, compute)


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily give named layers of ``model`` other weights (restored on exit)."""
    saved = {}
    try:
        for name, w in weights.items():
            layer = model.get_submodule(name)
            saved[name] = layer.weight.data
            layer.weight.data = w.to(layer.weight.dtype)
        yield model
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def preview_weights(model: nn.Module, plan: Any, refine: bool = False) -> dict[str, torch.Tensor]:
    return {r.name: reconstructed_weight(r, refine) for r in as_plan(plan).validate(model)}


def preview(model: nn.Module, plan: Any, refine: bool = False) -> nn.Module:
    """A copy of ``model`` (same architecture) whose planned layers hold reconstructed weights."""
    weights = preview_weights(model, plan, refine)
    new = copy.deepcopy(model)
    for name, w in weights.items():
        new.get_submodule(name).weight.data = w.to(new.get_submodule(name).weight.dtype).clone()
    return new
