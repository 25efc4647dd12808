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
from .layers import EXECUTE
from .methods import Factors
from .plan import ResolvedGroup, ResolvedLayer, as_plan
from .views import set_dense_weight


def _key(r: ResolvedLayer, what: str, refine: bool, stats: Any) -> tuple:
    options = {k: v for k, v in r.options.items() if k != EXECUTE}  # how a chain runs: not its factors
    return (fingerprint(r.module.weight), getattr(r.module, "groups", 1), what, r.method.name,
            json.dumps(r.rank, default=list), json.dumps(options, sort_keys=True, default=list), refine,
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


def _group_key(g: ResolvedGroup, what: str, refine: bool) -> tuple:
    return (tuple(fingerprint(m.weight) for m in g.modules), what, g.method.name, json.dumps(g.rank, default=list),
            json.dumps(dict(g.options), sort_keys=True, default=list), refine)


def cached_group_factors(g: ResolvedGroup, refine: bool = False) -> Factors:
    """``g.method.factorize_group`` of a resolved group, memoised as one unit by its members'
    weight contents (in order), method, rank and options: a group previewed at a rank is not
    factorized again when that plan is compressed or exported. Shared: do not modify."""
    return factor_cache.get(_group_key(g, "factors", refine),
                            lambda: g.method.factorize_group(g.modules, g.rank, g.options, refine=refine))


def reconstructed_group_weights(g: ResolvedGroup, refine: bool = False) -> dict[str, torch.Tensor]:
    """The dense kernel each member of ``g`` computes with, by member name (memoised)."""
    ws = factor_cache.get(_group_key(g, "recon", refine),
                          lambda: [w.detach() for w in g.method.reconstruct_group(g.modules,
                                                                                   cached_group_factors(g, refine))])
    return dict(zip(g.members, ws))


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily give named layers of ``model`` other weights (restored on exit)."""
    saved = {}
    try:
        for name, w in weights.items():
            layer = model.get_submodule(name)
            saved[name] = layer.weight.data
            set_dense_weight(layer, w)  # a Conv1D stores it transposed
        yield model
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def preview_weights(model: nn.Module, plan: Any, refine: bool = False) -> dict[str, torch.Tensor]:
    """The reconstructed weight of every layer ``plan`` decomposes, group members included."""
    plan = as_plan(plan)
    weights = {r.name: reconstructed_weight(r, refine) for r in plan.validate(model)}
    for g in plan.resolve_groups(model):
        weights.update(reconstructed_group_weights(g, refine))
    return weights


def preview(model: nn.Module, plan: Any, refine: bool = False) -> nn.Module:
    """A copy of ``model`` (same architecture) whose planned layers hold reconstructed weights."""
    weights = preview_weights(model, plan, refine)
    new = copy.deepcopy(model)
    for name, w in weights.items():
        set_dense_weight(new.get_submodule(name), w.clone())
    return new
