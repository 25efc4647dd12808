"""One target for the whole model: allocate ranks across layers to lose as little as possible.

Each layer offers a menu of (cost, error) options: every rank of every method with a cheap
error curve (``svd``, and ``tucker2`` over all rank pairs), plus "keep it dense" (error 0).
The loss of a plan is the sum over layers of the squared relative error, i.e. the fraction
of each layer's energy discarded (with data: of its output energy on that data). On the
lower convex hull of each layer's menu, taking steps greedily by error reduction per unit
of cost is optimal for that objective; a final pass spends what is left of the budget.

``sensitivity`` measures instead of estimating: it truncates one layer at a time and
evaluates the network.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import BudgetError
from .inventory import LayerInfo, count_flops, count_params, inspect
from .methods import get_method
from .plan import Plan
from .progress import Progress
from .spectra import Tradeoff, tradeoff

DEFAULT_METHODS = ("svd", "tucker2")


@dataclass
class _Option:
    cost: float
    loss: float
    method: str | None  # None: dense
    rank: Any
    params: int
    flops: int | None


def _menu(info: LayerInfo, module: nn.Module, methods: Sequence[str], by: str, stats: Any) -> list[_Option]:
    geom = info.geometry
    dense = _Option(float(geom.dense_params if by == "params" else geom.dense_flops), 0.0, None, None,
                    geom.dense_params, geom.dense_flops)
    opts = [dense]
    for m in methods:
        if m not in info.max_rank:
            continue
        t: Tradeoff | None = tradeoff(module, m, info.name, geom, stats=stats)
        if t is None:
            continue
        cost = t.params if by == "params" else t.flops
        for i, rank in enumerate(t.ranks):
            c = float(cost[i])
            if c >= dense.cost:
                continue
            opts.append(_Option(c, float(t.errors[i]) ** 2, m, rank, int(t.params[i]),
                                None if t.flops is None else int(t.flops[i])))
    return _lower_hull(opts)


def _lower_hull(opts: list[_Option]) -> list[_Option]:
    """The options on the lower convex hull of (cost, loss), cheapest first."""
    opts = sorted(opts, key=lambda o: (o.cost, o.loss))
    pareto: list[_Option] = []
    for o in opts:
        if not pareto or o.loss < pareto[-1].loss - 1e-15:
            pareto.append(o)
    hull: list[_Option] = []
    for o in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # keep b only if it lies strictly below the segment a -> o
            if (b.loss - a.loss) * (o.cost - a.cost) >= (o.loss - a.loss) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def plan_for_budget(
    model: nn.Module,
    keep: float,
    *,
    by: str = "params",
    methods: Sequence[str] | str = DEFAULT_METHODS,
    data: Any = None,
    example_input: Any = None,
    layers: Iterable[str] | None = None,
    tolerance: float = 0.02,
    progress: Any = False,
) -> Plan:
    """A plan keeping about ``keep`` of the model's parameters (or FLOPs), losing as little as possible.

    Parameters
    ----------
    keep : float in (0, 1]
        Fraction of the whole model's parameters (``by="params"``) or FLOPs (``by="flops"``).
    methods : names, or "auto"
        Methods the planner may choose between, per layer ("auto": all with a cheap error
        curve, i.e. ``svd`` and ``tucker2``).
    data : iterable of batches, optional
        Use the layers' output errors on this data (whitened spectra) instead of weight errors.
    example_input : optional
        Needed for ``by="flops"`` (the first batch of ``data`` is used otherwise).
    layers : names, optional
        Restrict the planner to these layers (others stay dense).

    Raises :class:`BudgetError` when the target cannot be reached (it says the smallest
    reachable fraction).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0.0 < keep <= 1.0):
        raise BudgetError(f"keep must be a fraction in (0, 1]; got {keep!r}")
    if by not in ("params", "flops"):
        raise BudgetError(f'by must be "params" or "flops"; got {by!r}')
    if methods == "auto":
        methods = DEFAULT_METHODS
    if isinstance(methods, str):
        methods = (methods,)
    for m in methods:
        get_method(m)
    if example_input is None and data is not None:
        from .data import iter_batches

        example_input = next(iter(iter_batches(data, max_batches=1)), None)
    if by == "flops" and example_input is None:
        raise BudgetError('a FLOPs budget needs an example input: pass example_input= (or data=)')
    infos = inspect(model, example_input)
    if layers is not None:
        wanted = set(layers)
        infos = [i for i in infos if i.name in wanted]
    if by == "flops":  # a layer the example input never reaches costs no FLOPs
        infos = [i for i in infos if i.geometry.dense_flops is not None]
    total = count_params(model) if by == "params" else count_flops(model, example_input)
    if keep >= 1.0:
        return Plan()
    stats = None
    if data is not None:
        from .calibration import collect_stats

        stats = collect_stats(model, data, [i.name for i in infos], progress=progress)
    modules = dict(model.named_modules())
    menus: dict[str, list[_Option]] = {}
    with Progress(progress, total=len(infos), desc="planning") as bar:
        for info in infos:
            bar.set_message(info.name)
            menus[info.name] = _menu(info, modules[info.name], methods, by, stats.get(info.name) if stats else None)
            bar.update(1)
    dense_total = sum(m[-1].cost for m in menus.values())  # the last hull option is "dense"
    fixed = total - dense_total
    target = keep * total
    chosen = {n: 0 for n in menus}
    spent = fixed + sum(m[0].cost for m in menus.values())
    if spent > target * (1 + tolerance):
        raise BudgetError(
            f"cannot keep only {keep:.1%} of the {by}: the smallest plan with methods {list(methods)} keeps "
            f"{spent / total:.1%} (layers that are not decomposed hold {fixed / total:.1%}); raise keep"
        )
    heap = []

    def push(n: str) -> None:
        i = chosen[n]
        menu = menus[n]
        if i + 1 < len(menu):
            a, b = menu[i], menu[i + 1]
            gain = (a.loss - b.loss) / max(b.cost - a.cost, 1e-12)
            heapq.heappush(heap, (-gain, n))

    for n in menus:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        i = chosen[n]
        step = menus[n][i + 1].cost - menus[n][i].cost
        if spent + step <= target:
            chosen[n] = i + 1
            spent += step
            push(n)
    plan_layers = {}
    for n, i in chosen.items():
        o = menus[n][i]
        if o.method is not None:
            plan_layers[n] = {"method": o.method, "rank": list(o.rank) if isinstance(o.rank, tuple) else int(o.rank)}
    plan = Plan(plan_layers)
    # spend what the hull steps left over: raise single ranks while it fits (any layer)
    if spent < target * (1 - tolerance):
        plan, spent = _fill(plan, infos, by, spent, target, methods)
    return plan


def _fill(plan: Plan, infos: list[LayerInfo], by: str, spent: float, target: float, methods) -> tuple[Plan, float]:
    """Raise svd ranks one step at a time, cheapest error first, until the budget is used."""
    by_name = {i.name: i for i in infos}
    layers = dict(plan.layers)
    progress = True
    while progress and spent < target:
        progress = False
        for name, lp in list(layers.items()):
            info = by_name[name]
            m = get_method(lp.method)
            rank = m.resolve_rank(info.geometry, lp.rank)
            bigger = _next_rank(rank, m.max_rank(info.geometry))
            if bigger is None:
                continue
            cost = (m.count_params if by == "params" else m.count_flops)
            step = cost(info.geometry, bigger) - cost(info.geometry, rank)
            if 0 < step and spent + step <= target:
                layers[name] = type(lp)(lp.method, list(bigger) if isinstance(bigger, tuple) else bigger, lp.options)
                spent += step
                progress = True
    return Plan(layers), spent


def _next_rank(rank, max_rank):
    if isinstance(rank, tuple):
        for k in range(len(rank)):
            if rank[k] < max_rank[k]:
                return tuple(r + 1 if j == k else r for j, r in enumerate(rank))
        return None
    return rank + 1 if rank < max_rank else None


def plan_cost(model: nn.Module, plan: Any, example_input: Any = None) -> dict[str, Any]:
    """Parameters (and FLOPs per sample with an example input) before and after ``plan``, without building."""
    from .plan import as_plan

    plan = as_plan(plan)
    infos = inspect(model, example_input).by_name()
    resolved = plan.validate(model, {n: i.geometry for n, i in infos.items()})
    params = count_params(model)
    after = params
    flops = count_flops(model, example_input) if example_input is not None else None
    flops_after = flops
    per_layer = {}
    for r in resolved:
        p = r.method.count_params(r.geometry, r.rank, r.options)
        f = r.method.count_flops(r.geometry, r.rank, r.options)
        after += p - r.geometry.dense_params
        if flops_after is not None and f is not None and r.geometry.dense_flops is not None:
            flops_after += f - r.geometry.dense_flops
        per_layer[r.name] = {"params": p, "dense_params": r.geometry.dense_params, "flops": f,
                             "dense_flops": r.geometry.dense_flops, "rank": r.rank, "method": r.method.name}
    return {"params": params, "params_after": after, "flops": flops, "flops_after": flops_after,
            "ratio": params / after if after else float("inf"), "layers": per_layer}


def sensitivity(
    model: nn.Module,
    data: Any,
    *,
    layers: Iterable[str] | None = None,
    ranks: Sequence[float | int] = (0.05, 0.1, 0.25, 0.5),
    method: str = "svd",
    max_batches: int | None = 4,
    progress: Any = False,
) -> list[dict[str, Any]]:
    """Quality after truncating one layer at a time (the rest dense), for a few ranks.

    Returns rows ``{layer, method, rank, params, dense_params, <metrics>}`` where the
    metrics are :func:`tensorscope.evaluate`'s: accuracy and loss with labels, agreement and
    relative output error against the original without them. Uses the fast preview (the
    original architecture with truncated weights), so nothing is built.
    """
    from .evaluate import evaluate
    from .preview import preview_weights, swapped_weights

    infos = inspect(model)
    if layers is not None:
        wanted = set(layers)
        infos = [i for i in infos if i.name in wanted]
    infos = [i for i in infos if method in i.max_rank]
    batches = _materialise(data, max_batches)
    base = evaluate(model, batches, reference=model)
    reference = _Frozen(model, batches)  # the original's outputs, computed before any swap
    rows = []
    with Progress(progress, total=len(infos) * len(ranks), desc="sensitivity") as bar:
        for info in infos:
            for r in ranks:
                bar.set_message(f"{info.name} @ {r}")
                plan = Plan({info.name: {"method": method, "rank": r}})
                weights = preview_weights(model, plan)
                m = get_method(method)
                canon = m.resolve_rank(info.geometry, r)
                reference.rewind()
                with swapped_weights(model, weights):
                    res = evaluate(model, batches, reference=reference)
                rows.append({"layer": info.name, "method": method, "rank": canon,
                             "params": m.count_params(info.geometry, canon), "dense_params": info.params,
                             **{k: v for k, v in res.items()}, "baseline": base})
                bar.update(1)
    return rows


def _materialise(data: Any, max_batches: int | None) -> list:
    from .data import iter_batches

    return list(iter_batches(data, max_batches=max_batches))


class _Frozen(nn.Module):
    """The original model's outputs on a fixed list of batches, replayed (for swapped-weight runs)."""

    def __init__(self, model: nn.Module, batches: list):
        super().__init__()
        from .data import forward

        with torch.no_grad():
            self._outs = [forward(model, b) for b in batches]
        self._i = 0

    def rewind(self) -> None:
        self._i = 0

    def forward(self, *args, **kwargs):
        out = self._outs[self._i % len(self._outs)]
        self._i += 1
        return out
