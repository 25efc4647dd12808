"""One target for the whole model: allocate ranks across layers to lose as little as possible.

Each layer offers a menu of (cost, error) options: every rank of every method with a cheap
error curve (``svd``, and ``tucker2`` over all rank pairs), plus "keep it dense" (error 0).
The loss of a plan is the sum over layers of the squared relative error, i.e. the fraction
of each layer's energy discarded (with data: of its output energy on that data), or with
``allocation="output"`` the estimated loss of the network's output (:mod:`.allocation`).
With data, one pass gathers every statistic (:func:`~tensorscope.collect_stats`), and the
same statistics serve any number of budgets and ``compress`` (``stats=``). On the
Pareto options of every layer, a multiple-choice knapsack by dynamic programming over
rounded costs picks the plan of least loss within the budget (greedy steps along each
layer's convex hull, the usual shortcut, miss the target by far more than the tolerance when
rank steps are coarse); a final pass spends what rounding left.

``sensitivity`` measures instead of estimating: it truncates one layer at a time and
evaluates the network.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .allocation import (ALLOCATIONS, HELDOUT_ROWS, as_options, candidate_losses, heldout_plan_scores, measured_scales,
                         reference_outputs, split_halves)
from .calibration import DEFAULT_PROBES, Calibration, collect_stats
from .data import forward, iter_batches, split_batch
from .errors import BudgetError, PlanError, RankError
from .evaluate import evaluate
from .inventory import LayerInfo, count_flops, count_params, inspect
from .methods import get_method, planner_methods
from .methods.group import DEFAULT_GROUP_METHOD
from .plan import Plan, as_plan
from .preview import preview_weights, swapped_weights
from .progress import Progress
from .sources import ON_DISK, open_source
from .spectra import Tradeoff, tradeoff
from .views import layer_modules

_log = logging.getLogger(__name__)

@dataclass
class _Option:
    cost: float
    loss: float
    method: str | None  # None: dense
    rank: Any
    params: int
    flops: int | None
    options: dict | None = None
    group: bool = False  # an option of a joint group (method is a group method)


def _pareto(opts: list[_Option]) -> list[_Option]:
    opts = sorted(opts, key=lambda o: (o.cost, o.loss))
    pareto: list[_Option] = []
    for o in opts:
        if not pareto or o.loss < pareto[-1].loss - 1e-15:
            pareto.append(o)
    return pareto


def _group_menu(g: Any, by: str) -> tuple[list[_Option], float]:
    """A joint group's options (one unit) and its dense cost.

    Its loss is ``n_members x`` the squared relative error of the stacked kernels, the sum of
    the members' own squared relative errors when their kernels hold equal energy (the
    per-layer menus' unit); groups are scored on their weights, with or without data."""
    t = g.method.tradeoff_group(g.modules, g.geometries, g.name) if g.method.error_curve else None
    if t is None:
        raise BudgetError(f"group {g.name!r}: group method {g.method.name!r} has no cheap error curve, so the "
                          "planner cannot price it; set its rank by hand (Plan.with_group)")
    if by == "flops" and t.flops is None:
        raise BudgetError(f"group {g.name!r}: a FLOPs budget needs every member's input size (example_input=)")
    dense_cost = float(t.dense_params if by == "params" else t.dense_flops)
    cost = t.params if by == "params" else t.flops
    n = len(g.members)
    opts = [_Option(dense_cost, 0.0, None, None, int(t.dense_params), t.dense_flops)]
    for i, rank in enumerate(t.ranks):
        if float(cost[i]) < dense_cost:
            opts.append(_Option(float(cost[i]), n * float(t.errors[i]) ** 2, g.method.name, tuple(rank),
                                int(t.params[i]), None if t.flops is None else int(t.flops[i]), None, True))
    return _pareto(opts), dense_cost


def _as_groups(groups: Any) -> dict[str, dict]:
    """``groups=`` of :func:`plan_for_budget` as plan group entries without a rank."""
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise BudgetError('groups= maps group names to lists of layer names (joint_tucker) or to '
                          '{"method": ..., "layers": [...]}; got ' + type(groups).__name__)
    out = {}
    for name, spec in groups.items():
        if isinstance(spec, Mapping):
            spec = dict(spec)
        elif isinstance(spec, (list, tuple)):
            spec = {"method": DEFAULT_GROUP_METHOD, "layers": list(spec)}
        else:
            raise BudgetError(f"groups[{name!r}] must be a list of layer names or a group entry; got {spec!r}")
        if "rank" in spec:
            raise BudgetError(f"groups[{name!r}]: the planner chooses the rank; leave \"rank\" out")
        spec.setdefault("method", DEFAULT_GROUP_METHOD)
        out[name] = spec
    return out



def _menu(info: LayerInfo, module: nn.Module, methods: Sequence[str], by: str, stats: Any,
          halves: tuple | None = None, heldout: bool | str = "auto", allocation: str = "layer",
          variants: Any = "auto") -> list[_Option]:
    """The layer's Pareto options: cheapest first, each strictly better than the cheaper ones.

    "Keep it dense" (method ``None``) is one of them unless a cheaper rank is already exact.
    ``halves``: statistics of two halves of the data, to score ranks held out; each factor
    variant of a method (``Method.data_variants``) is one more set of options.
    """
    geom = info.geometry
    dense = _Option(float(geom.dense_params if by == "params" else geom.dense_flops), 0.0, None, None,
                    geom.dense_params, geom.dense_flops)
    scored: list[tuple[bool, _Option]] = []
    for m in methods:
        if m not in info.max_rank:
            continue
        method = get_method(m)
        curve = lambda st, m=m: tradeoff(module, m, info.name, geom, stats=st)  # noqa: E731
        for options, t, losses, held in candidate_losses(method, module, geom, curve, stats, halves, heldout,
                                                         allocation, variants):
            cost = t.params if by == "params" else t.flops
            for i, rank in enumerate(t.ranks):
                c = float(cost[i])
                if c >= dense.cost:
                    continue
                scored.append((held, _Option(c, float(losses[i]), m, rank, int(t.params[i]),
                                             None if t.flops is None else int(t.flops[i]), options or None)))
    # in-sample scores flatter the factors (they fit the data they are scored on): where some
    # method's options are scored held out, only those compete
    any_held = any(h for h, _ in scored)
    return _pareto([dense] + [o for h, o in scored if h or not any_held])


def _allocate(menus: list[list[_Option]], budget: float, floor: float, bins: int) -> list[int]:
    """Pick one option per layer minimising the summed loss with total cost <= ``budget``.

    A multiple-choice knapsack solved by dynamic programming over costs rounded *up* to
    ``budget / bins`` (so the true total never exceeds the budget). Among plans with equal
    loss up to float error the most expensive is kept, and when the optimum falls below
    ``floor`` the cheapest-loss plan at or above it is preferred: the contract is to land
    within the tolerance of the target. Greedy steps along each layer's convex hull are
    optimal only at hull vertices; with coarse rank steps (small layers) they can miss the
    target by far more than the tolerance, which this does not.
    """
    q = budget / bins
    # rounding up can push a plan that fits exactly past ``bins``: keep one bin of slack per
    # layer in the table and check the exact total when reading plans back
    size = bins + len(menus) + 1
    dp = np.full(size, np.inf)
    dp[0] = 0.0
    choice = []
    for menu in menus:
        new = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int32)
        for k, o in enumerate(menu):
            c = int(np.ceil(o.cost / q - 1e-9))
            if c >= size:
                break  # options are sorted by cost
            cand = dp[: size - c] + o.loss
            view = new[c:]
            better = cand < view
            view[better] = cand[better]
            arg[c:][better] = k
        dp = new
        choice.append(arg)

    def backtrack(b: int) -> tuple[list[int], float]:
        picks = [0] * len(menus)
        for li in range(len(menus) - 1, -1, -1):
            k = int(choice[li][b])
            picks[li] = k
            b -= int(np.ceil(menus[li][k].cost / q - 1e-9))
        return picks, sum(menus[li][k].cost for li, k in enumerate(picks))

    idx = np.nonzero(np.isfinite(dp))[0]
    # best loss first; among (near-)ties the most expensive: same quality, closer to the target
    order = sorted(idx.tolist(), key=lambda b: (round(float(dp[b]), 12), -b))
    fallback = None
    for b in order:
        picks, cost = backtrack(b)
        if cost > budget:
            continue
        if cost >= floor:
            return picks
        if fallback is None:
            fallback = picks
    return fallback if fallback is not None else [0] * len(menus)


def plan_for_budget(
    model: nn.Module,
    keep: float,
    *,
    by: str = "params",
    methods: Sequence[str] | str = "auto",
    data: Any = None,
    example_input: Any = None,
    layers: Iterable[str] | None = None,
    tolerance: float = 0.02,
    heldout: bool | str = "auto",
    progress: Any = False,
    stats: Any = None,
    allocation: str = "layer",
    variants: Any = "auto",
    probes: int = DEFAULT_PROBES,
    measure: bool | str = "auto",
    groups: Mapping[str, Any] | None = None,
) -> Plan:
    """A plan keeping about ``keep`` of the model's parameters (or FLOPs), losing as little as possible.

    ``model`` may be a path to weights on disk (a ``.safetensors`` file or a folder of shards,
    :mod:`tensorscope.sources`): planned from the weights alone (``by="params"``, no data),
    one layer in memory at a time.

    Parameters
    ----------
    keep : float in (0, 1]
        Fraction of the whole model's parameters (``by="params"``) or FLOPs (``by="flops"``).
    methods : names, or "auto"
        Methods the planner may choose between, per layer ("auto", the default: every
        registered method with a cheap error curve, i.e. ``svd`` and ``tucker2`` built in).
        Methods without one (``cp``, ``tt``) cannot be planned: each rank would need its own
        factorization.
    data : iterable of batches, optional
        Use the layers' output errors on this data (whitened spectra) instead of weight errors.
        Its statistics are gathered in one pass (:func:`tensorscope.collect_stats`). With few
        samples, :func:`tensorscope.augment_calibration` makes more from them.
    stats : Calibration, optional
        Statistics already gathered by :func:`tensorscope.collect_stats` (instead of
        ``data``): plan many budgets, then ``compress(model, plan, stats=stats)``, from one
        pass over the data. With ``allocation="output"`` they must hold gradients.
    allocation : "layer" or "output"
        What the planner minimises: the sum of the layers' own squared relative errors
        (``"layer"``, default), or the estimated loss of the network's output (``"output"``,
        needs data: the input and output-gradient moments of every layer, Fisher/K-FAC; see
        :mod:`tensorscope.allocation` for the rule and what it follows).
    variants : "auto" or list of option dicts
        With data and held-out scores: the factor variants scored per layer (``"auto"``:
        each method's ``data_variants``, for ``svd`` whitened, shrunk and plain factors, and
        with ``"output"`` output-weighted ones). The chosen variant's options are written in
        the plan, so ``compress`` rebuilds the same factors.
    probes : int
        With ``allocation="output"`` and ``data``: output-gradient probes per sample.
    measure : bool or "auto"
        Check the estimates end to end: each layer's option (the chosen one, or one that
        halves it) is built from the first half of the statistics and the network's output
        loss measured on the second half of ``data`` against the estimate from that half's
        moments; each layer's curve is rescaled by measured / estimated and the
        budget allocated again (:func:`tensorscope.allocation.measured_scales`). ``True``:
        always keep the rescaled allocation; ``False``: never rescale. ``"auto"`` (default,
        with ``allocation="output"`` and ``data`` that has two halves): make both allocations
        and keep the one whose whole plan loses less on held-out data (every layer fitted on
        the first half, all swapped in at once, measured on the second half:
        :func:`tensorscope.allocation.heldout_plan_scores`; a classifier's plans by their
        top-1 disagreement with the original first, the output loss between plans that tie);
        the rescaling helps on MiniLM and hurts on EfficientNet-Lite0, so neither is right
        for every network. The rescaled one is kept when both lose the same. Which was kept is logged at DEBUG level on the
        ``tensorscope.budget`` logger.
    heldout : bool or "auto"
        With ``data``: score each rank on the half of the data its factors were not fitted to
        (both ways, averaged), not on the data it fits. In-sample scores flatter wide layers
        with few calibration samples, which then take the damage. ``"auto"`` (default) does it
        for ``allocation="output"``, and for ``"layer"`` on the layers that saw fewer than
        ``4 x`` as many input rows as they have inputs, where in-sample scores are known to
        mislead; with plenty of rows both agree and the in-sample score is the less noisy one.
    example_input : optional
        Needed for ``by="flops"`` (the first batch of ``data`` is used otherwise).
    layers : names, optional
        Restrict the planner to these layers (others stay dense).
    groups : dict, optional
        Joint groups to plan, each as one unit: ``{"stage1": ["b1.conv", "b2.conv", ...]}``
        (a ``joint_tucker`` group) or ``{"stage1": {"method": ..., "layers": [...]}}``. The
        planner prices every rank of the group (its cheap error curve, from the stacked
        kernels' weights even with ``data``) against keeping its members dense, alongside the
        other layers' options; a chosen group goes into the plan's ``"groups"``. Members are
        planned only as the group. Without ``groups=`` no group is formed: which layers to
        decompose together is the user's choice. Not with ``allocation="output"``.

    Raises :class:`BudgetError` when the target cannot be reached (it says the smallest
    reachable fraction).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (0.0 < keep <= 1.0):
        raise BudgetError(f"keep must be a fraction in (0, 1]; got {keep!r}")
    if by not in ("params", "flops"):
        raise BudgetError(f'by must be "params" or "flops"; got {by!r}')
    if methods == "auto":
        methods = planner_methods()
    if isinstance(methods, str):
        methods = (methods,)
    no_curve = [m for m in methods if not get_method(m).error_curve]
    if no_curve:
        raise BudgetError(
            f"method(s) {no_curve} have no cheap error curve: each of their ranks needs its own factorization, so "
            f"the budget planner cannot price them; plan with {planner_methods()} (or set their ranks by hand)")
    if allocation not in ALLOCATIONS:
        raise BudgetError(f"allocation must be one of {ALLOCATIONS}; got {allocation!r}")
    if heldout not in (True, False, "auto"):
        raise BudgetError(f'heldout must be True, False or "auto"; got {heldout!r}')
    variants = as_options(variants)
    if stats is not None and not isinstance(stats, Mapping):
        raise BudgetError(f"stats= must map layer names to LayerStats (ts.collect_stats); got {type(stats).__name__}")
    source = None
    if isinstance(model, ON_DISK):
        if data is not None or stats is not None or by != "params":
            raise BudgetError('a model on disk is planned from its weights alone: by="params", without data= '
                              "(load it in memory for data-aware or FLOPs budgets)")
        source = open_source(model)
        model = source.skeleton()
    if data is not None:
        data = list(iter_batches(data))  # read once: a generator would be spent by the first pass
        if example_input is None:
            example_input = data[0] if data else None
    if allocation == "output" and data is None and stats is None:
        raise BudgetError('allocation="output" estimates what the network\'s output loses: it needs data= '
                          "(calibration batches) or stats= (ts.collect_stats(..., gradients=True))")
    if by == "flops" and example_input is None:
        raise BudgetError('a FLOPs budget needs an example input: pass example_input= (or data=)')
    group_specs = _as_groups(groups)
    if group_specs and allocation == "output":
        raise BudgetError('groups= are scored by their weights; allocation="output" scores the network\'s output '
                          'loss, which they cannot be compared with: use allocation="layer"')
    infos = inspect(model, example_input)
    if source is None:
        _warn_left_dense(model, infos.skipped, layers)
    resolved_groups = []
    if group_specs:
        try:
            gplan = Plan(groups={g: {**spec, "rank": 1.0} for g, spec in group_specs.items()})
            resolved_groups = gplan.resolve_groups(model, {i.name: i.geometry for i in infos})
        except (PlanError, RankError) as e:
            raise BudgetError(f"groups=: {e}") from None
        grouped = {n for g in resolved_groups for n in g.members}
        infos = [i for i in infos if i.name not in grouped]
    if layers is not None:
        wanted = set(layers)
        infos = [i for i in infos if i.name in wanted]
    if by == "flops":  # a layer the example input never reaches costs no FLOPs
        infos = [i for i in infos if i.geometry.dense_flops is not None]
    # layers no planned method can make smaller (depthwise convs) stay dense: no statistics for them
    infos = [i for i in infos if _can_shrink(i, methods)]
    total = count_params(model) if by == "params" else count_flops(model, example_input)
    if keep >= 1.0:
        return Plan()
    if source is not None and resolved_groups:
        raise BudgetError("groups= need the model in memory (their kernels are stacked)")
    names_ = [i.name for i in infos]
    if data is not None and stats is None:
        stats = collect_stats(model, data, names_, halves=heldout is not False, gradients=allocation == "output",
                              probes=probes, progress=progress)
    halves = None
    if stats is not None:
        missing = [n for n in names_ if n not in stats]
        if missing:
            raise BudgetError(f"stats= has no statistics of layer(s) {missing[:5]}; collect them for every layer "
                              "to plan (or restrict layers=)")
        if allocation == "output" and any(getattr(stats[n], "grad", None) is None for n in names_):
            raise BudgetError('allocation="output" needs output-gradient moments: '
                              "ts.collect_stats(model, data, gradients=True)")
        if heldout is not False and isinstance(stats, Calibration) and stats.has_halves:
            halves = True
        few = [n for n in names_ if stats[n].count < HELDOUT_ROWS * stats[n].patch.shape[-1]]
        wanted_held = heldout is True or (heldout == "auto" and (allocation == "output" or few))
        if wanted_held and halves is None:
            warnings.warn("the calibration statistics have no halves (one sample, or collected with halves=False): "
                          "ranks and factor variants are scored in-sample, on the data the factors fit, which "
                          "flatters whitened factors; pass at least two samples for held-out scores", stacklevel=2)
    modules = source.loader() if source is not None else layer_modules(model)  # on disk: read when asked
    menus: dict[str, list[_Option]] = {}
    with Progress(progress, total=len(infos), desc="planning") as bar:
        for k, info in enumerate(infos):
            bar.set_message(info.name)
            n = info.name
            menus[n] = _menu(info, modules[n], methods, by, stats[n] if stats is not None else None,
                             stats.half(n) if halves else None, heldout, allocation, variants)
            if halves and (k + 1 == len(infos) or stats.get(infos[k + 1].name) is not stats[n]):
                stats.release(n)  # the halves' factors: not needed again, and as large as the layer
            bar.update(1)
    # not the menus' last options: on rank-deficient weights a low rank is as exact as dense
    # and dense drops out of the Pareto menu
    dense_cost = {i.name: float(i.geometry.dense_params if by == "params" else i.geometry.dense_flops) for i in infos}
    for g in resolved_groups:  # one unit each, keyed apart from layer names
        menus[("group", g.name)], dense_cost[("group", g.name)] = _group_menu(g, by)
    names = list(menus)
    dense_total = sum(dense_cost[n] for n in names)
    fixed = total - dense_total
    target = keep * total
    smallest = fixed + sum(menus[n][0].cost for n in names)
    if smallest > target * (1 + tolerance):
        raise BudgetError(
            f"cannot keep only {keep:.1%} of the {by}: the smallest plan with methods {list(methods)} keeps "
            f"{smallest / total:.1%} (layers that are not decomposed hold {fixed / total:.1%}); raise keep"
        )
    budget = max(target - fixed, 0.0)
    if smallest > target:  # reachable only within the tolerance above the target
        budget = max(target * (1 + tolerance) - fixed, 0.0)
    # enough cost resolution that rounding every layer up loses under a quarter of the tolerance
    bins = int(min(_MAX_BINS, max(2000, np.ceil(4 * len(names) / max(tolerance, 1e-3)))))
    floor = max(target * (1 - tolerance) - fixed, 0.0)

    def allocate() -> dict[str, int]:
        picks = _allocate([menus[n] for n in names], budget, floor, bins) if budget > 0 else [0] * len(names)
        chosen = dict(zip(names, picks))
        spent = fixed + sum(menus[n][chosen[n]].cost for n in names)
        _fill(menus, chosen, spent, max(target, smallest))
        return chosen

    chosen = allocate()
    choose = measure == "auto"  # both allocations made, the one with less held-out damage kept
    if choose:
        measure = allocation == "output" and data is not None and halves is not None
    if measure and allocation != "output":
        raise BudgetError('measure=True rescales estimates of the output loss: it needs allocation="output"')
    if measure:
        parts = split_halves(data) if data is not None else None
        if parts is None or not halves:
            raise BudgetError("measure=True checks the estimates end to end on held-out calibration data: pass "
                              "data= (at least two samples) with statistics that have halves")
        probes = {}
        for n in names:
            if isinstance(n, tuple):  # a group: scored by its weights, not measured
                continue
            menu, o = menus[n], menus[n][chosen[n]]
            if o.method is None:  # dense: check the option that halves the layer
                cand = [x for x in menu if x.method is not None]
                if not cand:
                    continue
                dense_cost = next((x.cost for x in menu if x.method is None), menu[-1].cost)
                o = min(cand, key=lambda x: abs(x.cost - 0.5 * dense_cost))
            probes[n] = o
        refs = reference_outputs(model, parts[1])
        scales = measured_scales(model, modules, stats, parts, probes, progress, refs=refs)
        for n, k in scales.items():
            for o in menus[n]:
                o.loss *= k
        unscaled, chosen = chosen, allocate()
        if choose and unscaled != chosen:
            planned = lambda ch: {n: menus[n][i] for n, i in ch.items() if not isinstance(n, tuple)}  # noqa: E731
            memo: dict = {}
            before = heldout_plan_scores(model, modules, stats, parts, planned(unscaled), refs, memo)
            after = heldout_plan_scores(model, modules, stats, parts, planned(chosen), refs, memo)
            if before.key() < after.key():
                chosen = unscaled
            _log.debug("plan_for_budget(measure='auto'): held out, without the rescaling: output loss %.6g, top-1 "
                       "disagreement %s; with it: %.6g, %s: kept the plan %s it", before.loss, before.disagreement,
                       after.loss, after.disagreement, "without" if before.key() < after.key() else "with")
    plan_layers, plan_groups = {}, {}
    members = {("group", g.name): list(g.members) for g in resolved_groups}
    for n, i in chosen.items():
        o = menus[n][i]
        if o.method is None:
            continue
        rank = list(o.rank) if isinstance(o.rank, tuple) else int(o.rank)
        if o.group:
            plan_groups[n[1]] = {"method": o.method, "layers": members[n], "rank": rank}
        else:
            plan_layers[n] = {"method": o.method, "rank": rank, **(o.options or {})}
    return Plan(plan_layers, plan_groups)


_MAX_BINS = 20000


def plannable_layers(model: nn.Module, methods: Sequence[str] | str = "auto", by: str = "params",
                     example_input: Any = None) -> list[str]:
    """The layers :func:`plan_for_budget` would plan: what to gather statistics of
    (``collect_stats(model, data, plannable_layers(model))``) before planning with ``stats=``."""
    if methods == "auto":
        methods = planner_methods()
    if isinstance(methods, str):
        methods = (methods,)
    infos = inspect(model, example_input)
    if by == "flops":
        infos = [i for i in infos if i.geometry.dense_flops is not None]
    return [i.name for i in infos if _can_shrink(i, methods)]


def _warn_left_dense(model: nn.Module, skipped: list[LayerInfo], layers: Iterable[str] | None) -> None:
    """Say which Linear/Conv1d/Conv2d layers the plan leaves dense and why (tied or parametrized
    weights, a forward that does more than its class, depthwise convs no method shrinks)."""
    mods = dict(model.named_modules())
    wanted = None if layers is None else set(layers)
    left = [i for i in skipped if isinstance(mods.get(i.name), (nn.Linear, nn.Conv1d, nn.Conv2d))
            and (wanted is None or i.name in wanted)]
    if left:
        more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
        warnings.warn(f"plan_for_budget leaves {len(left)} layer(s) dense: "
                      + "; ".join(f"{i.name}: {i.reason}" for i in left[:3]) + more, stacklevel=3)


def _can_shrink(info: LayerInfo, methods: Sequence[str]) -> bool:
    """Whether some method's smallest rank gives ``info``'s layer fewer parameters than dense."""
    for m in methods:
        if m not in info.max_rank:
            continue
        method = get_method(m)
        try:
            low = method.rank_from_axes(info.geometry, [ax.low for ax in method.rank_axes(info.geometry)])
            if method.count_params(info.geometry, low) < info.geometry.dense_params:
                return True
        except Exception:  # noqa: BLE001 - a method that cannot say: let the planner price it
            return True
    return False


def _fill(menus: dict[str, list[_Option]], chosen: dict[str, int], spent: float, limit: float) -> float:
    """Spend what rounding left: move single layers to better options while the total stays <= limit."""
    while True:
        best = None
        for n, i in chosen.items():
            cur = menus[n][i]
            for k in range(i + 1, len(menus[n])):
                o = menus[n][k]
                step = o.cost - cur.cost
                if spent + step > limit:
                    break
                gain = cur.loss - o.loss
                if best is None or gain > best[0]:
                    best = (gain, n, k, step)
        if best is None or best[0] <= 0:
            return spent
        _, n, k, step = best
        chosen[n] = k
        spent += step


def plan_cost(model: nn.Module, plan: Any, example_input: Any = None) -> dict[str, Any]:
    """Parameters (and FLOPs per sample with an example input) before and after ``plan``, without building.

    ``"layers"`` prices each per-layer entry, ``"groups"`` each group as one unit (what its
    members share counted once)."""
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
    per_group = {}
    for g in plan.resolve_groups(model, {n: i.geometry for n, i in infos.items()}):  # one unit, counted once
        p = g.method.count_params_group(g.geometries, g.rank, g.options)
        f = g.method.count_flops_group(g.geometries, g.rank, g.options)
        dense_p = sum(x.dense_params for x in g.geometries)
        dense_f = None if any(x.dense_flops is None for x in g.geometries) else sum(x.dense_flops for x in g.geometries)
        after += p - dense_p
        if flops_after is not None and f is not None and dense_f is not None:
            flops_after += f - dense_f
        per_group[g.name] = {"params": p, "dense_params": dense_p, "flops": f, "dense_flops": dense_f,
                             "rank": g.rank, "method": g.method.name, "layers": list(g.members)}
    return {"params": params, "params_after": after, "flops": flops, "flops_after": flops_after,
            "ratio": params / after if after else float("inf"), "layers": per_layer, "groups": per_group}


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
    return list(iter_batches(data, max_batches=max_batches))


class _Frozen(nn.Module):
    """The original model's outputs on a fixed list of batches, replayed (for swapped-weight runs)."""

    def __init__(self, model: nn.Module, batches: list):
        super().__init__()
        with torch.no_grad():
            self._outs = [forward(model, b) for b in batches]
        self._i = 0

    def rewind(self) -> None:
        self._i = 0

    def forward(self, *args, **kwargs):
        out = self._outs[self._i % len(self._outs)]
        self._i += 1
        return out
