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
from .methods import Factors
from .plan import ResolvedLayer, as_plan


def _key(r: ResolvedLayer, what: str, refine: bool, stats: Any) -> tuple:
    return (fingerprint(r.module.weight), getattr(r.module, "groups", 1), what, r.method.name,
            json.dumps(r.rank, default=list), json.dumps(dict(r.options), sort_keys=True, default=list), refine,
            None if stats is None else stats.token)


def cached_factors(r: ResolvedLayer, refine: bool = False, stats: Any = None) -> Factors:
    """``r.method.factorize`` of ``r``, memoised by weight content, method, rank, options and
    statistics: the live preview and ``compress``/export share one factorization per key
    (a slow CP-ALS previewed at a rank is not run again when that plan is exported).

    The result is shared: callers must not modify its tensors (``build`` copies them).
    """
    return factor_cache.get(_key(r, "factors", refine, stats),
                            lambda: r.method.factorize(r.module, r.rank, r.options, stats=stats, refine=refine))


def reconstructed_weight(r: ResolvedLayer, refine: bool = False, stats: Any = None) -> torch.Tensor:
    """The dense weight that ``r``'s method and rank represent (memoised).

    With ``stats`` (the layer's :class:`~tensorscope.calibration.LayerStats`), the data-aware
    factors ``compress(..., data=...)`` builds.
    """
    return factor_cache.get(_key(r, "recon", refine, stats),
                            lambda: r.method.reconstruct(r.module, cached_factors(r, refine, stats)).detach())


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
