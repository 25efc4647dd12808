"""Plan groups (joint decompositions) in the explorer: costed, previewed and listed as one unit.

A group comes with a plan loaded with ``"groups"`` or is formed in the page
(``ExplorerState.set_group``); the ranks view shows it as one row whose sliders are its group
method's rank axes (:func:`rank_row`, :func:`rank_from_values`). Each group is resolved
against the model once per plan, priced once (what its members share counted once), its
members' reconstructed kernels go into the live preview, and the table shows it as one
row, its members marked as belonging to it.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..errors import RankError
from ..methods import LayerGeometry
from ..methods.group import GroupMethod, available_group_methods, get_group_method
from ..plan import Plan, ResolvedGroup
from ..preview import reconstructed_group_weights
from .common import DENSE


def resolve(plan: Plan, model: nn.Module | None, geoms: Mapping[str, LayerGeometry]) -> list[ResolvedGroup]:
    """The plan's groups checked against ``model`` (none without a model)."""
    if model is None or not plan.groups:
        return []
    return plan.resolve_groups(model, geoms)


def cost_delta(groups: list[ResolvedGroup]) -> tuple[int, int | None, int]:
    """What the groups change: parameters, FLOPs (None when unknown) and bytes."""
    dp, df, db = 0, 0, 0
    for g in groups:
        p = g.method.count_params_group(g.geometries, g.rank, g.options)
        f = g.method.count_flops_group(g.geometries, g.rank, g.options)
        dense_p = sum(x.dense_params for x in g.geometries)
        dp += p - dense_p
        db += (p - dense_p) * g.modules[0].weight.element_size()
        if df is not None and f is not None and all(x.dense_flops is not None for x in g.geometries):
            df += f - sum(x.dense_flops for x in g.geometries)
        else:
            df = None
    return dp, df, db


def preview_weights(groups: list[ResolvedGroup], refine: bool) -> dict[str, tuple[Any, Any]]:
    """Each member's reconstructed kernel with its evaluator key (member -> (key, weight))."""
    out = {}
    for g in groups:
        key = ("group", g.name, g.method.name, tuple(g.rank), refine)
        for name, w in reconstructed_group_weights(g, refine).items():
            out[name] = (key, w)
    return out


def table_rows(groups: list[ResolvedGroup]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per group (the table's columns) and, per member, the label its row shows."""
    rows, members = [], {}
    for g in groups:
        dense = sum(x.dense_params for x in g.geometries)
        p = g.method.count_params_group(g.geometries, g.rank, g.options)
        label = f"group {g.name}"
        rows.append({"layer": f"{label} ({len(g.members)} layers)", "type": "group",
                     "shape": f"{len(g.members)}×" + "×".join(str(s) for s in g.modules[0].weight.shape),
                     "params": dense, "MFLOPs": float("nan"), "method": g.method.name,
                     "rank": g.method.rank_text(g.rank), "params after": int(p),
                     "ratio": dense / p if p else float("inf"), "rel. error": float("nan"), "energy %": float("nan")})
        for n in g.members:
            members[n] = label
    return rows, members


def rank_from_values(g: GroupMethod, geoms, values, options: Mapping[str, Any] | None = None) -> Any:
    """A group's canonical rank from one integer per rank axis (what its sliders give)."""
    values = [int(v) for v in values]
    axes = g.rank_axes(geoms, options)
    if len(values) != len(axes):
        raise RankError(f"{g.name}: {len(axes)} rank value(s) expected ({', '.join(a.name for a in axes)}); "
                        f"got {values}")
    return g.resolve_rank(geoms, values if len(values) > 1 else values[0], options)


def default_rank(g: GroupMethod, geoms, options: Mapping[str, Any] | None = None) -> Any:
    """The rank a new group starts at: each rank axis at its default."""
    return rank_from_values(g, geoms, [a.default for a in g.rank_axes(geoms, options)], options)


def rank_row(g: ResolvedGroup) -> dict[str, Any]:
    """The ranks view's row of one group: its method (dense ungroups it) and the group methods
    its members may take, its rank axes and values, and parameters before and after (counted once)."""
    fits = [name for name in available_group_methods()
            if _takes(get_group_method(name), g.geometries)]
    return {"layer": g.name, "group": g.name, "members": list(g.members), "kind": "group",
            "method": g.method.name, "methods": [DENSE, *fits],
            "axes": g.method.rank_axes(g.geometries, g.options), "values": g.method.axis_values(g.rank),
            "rank": g.method.rank_text(g.rank), "params": int(sum(x.dense_params for x in g.geometries)),
            "params_after": int(g.method.count_params_group(g.geometries, g.rank, g.options))}


def _takes(m: GroupMethod, geoms) -> bool:
    return all(m.unsupported_reason(x) is None for x in geoms) and all(m.mismatch(geoms[0], x) is None
                                                                        for x in geoms[1:])
