"""Ranks from a rule, layer by layer: retained energy, VBMF, MUSCO's weakened VBMF.

:func:`plan_by_rule` is the one implementation of the rank presets (the explorer's buttons,
the CLI, :func:`tensorscope.iterative`'s ``rank_rule="weakened_vbmf"``). It never names a
method: each layer takes the first method of ``methods`` that can decompose it, and that
method's :meth:`~tensorscope.methods.Method.suggest_rank` asks the rule for one rank per
rank axis, from the spectrum of the unfolding the axis cuts (``"out"``: out x in*kh*kw,
``"in"``: in x out*kh*kw).

References
----------
Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 2013 (EVBMF). Kim et al., "Compression of
deep convolutional neural networks for fast and low power mobile applications", ICLR 2016
(VBMF ranks for Tucker-2). Gusak et al., "Automated multi-stage compression of neural
networks", ICCVW 2019 (MUSCO: weakened VBMF ranks, repeated).
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from torch import nn

from .errors import PlanError
from .inventory import ModelIndex, inspect
from .methods import LayerGeometry, Method, get_method, planner_methods
from .plan import Plan
from .ranks import evbmf, weakened_rank
from .spectra import Spectrum, layer_spectrum
from .views import layer_modules

__all__ = ["RULES", "check_layers", "numerical_rank", "plan_by_rule", "rule_pick", "weakened_schedule"]

RULES = ("energy", "vbmf", "weakened_vbmf")


# ---- checking arguments ------------------------------------------------------------------------


def check_layers(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    """The decomposable layers of ``model`` in network order, or the named ones (checked).

    Raises :class:`PlanError` for a name the model does not have (with close matches) or a
    layer that cannot be decomposed (with the reason), before any work.
    """
    if layers is None:
        return [i.name for i in inspect(model)]
    if isinstance(layers, str):
        layers = [layers]
    wanted = list(dict.fromkeys(layers))
    index = ModelIndex(model)
    for name in wanted:
        if not isinstance(name, str) or not name or name not in index.modules:
            close = difflib.get_close_matches(str(name), [n for n in index.modules if n], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise PlanError(f"the model has no layer {name!r}{hint}")
        reason = index.reason(name)
        if reason:
            raise PlanError(f"layer {name!r} cannot be decomposed: {reason}")
    order = {n: i for i, n in enumerate(index.modules)}
    return sorted(wanted, key=order.__getitem__)


def check_weakening(weakening: Any) -> float:
    if (isinstance(weakening, bool) or not isinstance(weakening, numbers.Real) or not math.isfinite(weakening)
            or not 0.0 <= weakening <= 1.0):
        raise ValueError(f"weakening must be a number in [0, 1]; got {weakening!r}")
    return float(weakening)


def check_min_rank(min_rank: Any) -> int:
    if isinstance(min_rank, bool) or not isinstance(min_rank, numbers.Integral) or min_rank < 1:
        raise ValueError(f"min_rank must be an integer >= 1; got {min_rank!r}")
    return int(min_rank)


def resolve_methods(methods: Sequence[str] | str) -> list[Method]:
    """``"auto"`` (the planner's menu, :func:`~tensorscope.methods.planner_methods`), one name
    or several, as method objects (PlanError for an unknown name)."""
    if methods == "auto":
        methods = planner_methods()
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise PlanError("methods is empty: name at least one method (or pass \"auto\")")
    return [get_method(m) for m in methods]


def first_method(methods: Sequence[Method], geom: LayerGeometry) -> Method | None:
    """The first of ``methods`` that can decompose a layer of this geometry."""
    return next((m for m in methods if m.unsupported_reason(geom) is None), None)


# ---- the rules ---------------------------------------------------------------------------------


def numerical_rank(spec: Spectrum) -> int:
    """The rank of a layer's unfolding up to float rounding (the most demanding group).

    Singular values above ``s_max * max(rows, cols) * eps`` count, as
    ``numpy.linalg.matrix_rank`` does, with float32's ``eps``: weights are float32, or are
    rebuilt from float32 factors, whose rounding leaves singular values of about 1e-7 of the
    largest past the true rank.
    """
    g = np.asarray(spec.grouped, dtype=np.float64)
    if g.size == 0:
        return 0
    top = g.max(axis=1, keepdims=True)
    tol = top * max(spec.shape) * np.finfo(np.float32).eps
    return int(max(int((row > t).sum()) for row, t in zip(g, tol[:, 0])) if np.any(top > 0) else 0)


def _core_vbmf(spec: Spectrum, rank: int, other_rank: int, khw: int) -> int:
    """EVBMF rank of the part of an unfolding its rank spans (the most demanding group).

    A layer of full rank gets the ordinary EVBMF of its unfolding. A layer of lower rank
    ``R`` (an earlier stage's factors, multiplied out) is treated as the ``R x C`` matrix of
    its nonzero singular values, with ``C`` the column dimension it can reach:
    ``min(cols, R_other * kh * kw)``, the shape of a Tucker-2 core of ranks ``(R, R_other)``
    (``R x R`` for a Linear layer's SVD). EVBMF of that matrix is what MUSCO computes on the
    core; the zero singular values past ``R`` would otherwise pass for noise-free directions.
    """
    if rank < 1:
        return 0
    grouped = np.asarray(spec.grouped, dtype=np.float64)
    if rank >= spec.max_rank:
        return max(evbmf(row, spec.shape).rank for row in grouped)
    shape = (rank, max(min(spec.shape[1], max(other_rank, 1) * khw), 1))
    return max(evbmf(row[:rank], shape).rank for row in grouped)


def rule_pick(layer: nn.Module, rule: str, *, keep: float = 0.99, weakening: float = 0.8, min_rank: int = 8,
              name: str = "", spectrum_of: Callable[[str], Spectrum] | None = None) -> Callable[[str], int]:
    """``pick(unfolding) -> rank`` for one layer under one rule (spectra computed on demand, cached).

    ``spectrum_of(unfolding)``: the spectra to read instead of the weights' own (e.g. whitened
    by calibration data, as the explorer's data-aware mode shows them).

    - ``"energy"``: the smallest rank keeping ``keep`` of the unfolding's energy.
    - ``"vbmf"``: the EVBMF rank (Nakajima et al. 2013), at least ``min_rank``.
    - ``"weakened_vbmf"``: with ``R`` the unfolding's current rank (:func:`numerical_rank`:
      full for a trained layer, the previous stage's rank for a rebuilt one) and ``R_v`` the
      EVBMF rank of what that rank spans, ``max(R - weakening * (R - R_v), min_rank)``, never
      above ``R`` (Gusak et al. 2019).
    """
    specs: dict[str, Spectrum] = {}
    khw = int(np.prod(getattr(layer, "kernel_size", (1, 1))))

    def spectrum(unfolding: str) -> Spectrum:
        if unfolding not in specs:
            specs[unfolding] = spectrum_of(unfolding) if spectrum_of is not None else layer_spectrum(layer, name, unfolding)
        return specs[unfolding]

    def pick(unfolding: str) -> int:
        spec = spectrum(unfolding)
        if rule == "energy":
            return spec.rank_for_energy(keep)
        full = numerical_rank(spec)
        other = numerical_rank(spectrum("in" if unfolding == "out" else "out"))
        v = _core_vbmf(spec, full, other, khw)
        if rule == "vbmf":
            return int(min(max(v, min_rank), spec.max_rank))
        return weakened_rank(full, v, weakening, min_rank)

    return pick


def weakened_schedule(rank: int, vbmf: Callable[[int], int] | int, stages: int, weakening: float = 0.8,
                      min_rank: int = 8) -> list[int]:
    """The ranks MUSCO's weakened rule gives one layer over ``stages`` stages, the start first.

    ``r_{k+1} = max(r_k - weakening * (r_k - v(r_k)), min_rank)`` with ``v(r)`` the VBMF rank
    of the layer at rank ``r`` (a callable, or one fixed rank). With a VBMF rank of about 39%
    of the current rank and ``weakening=0.8``, 256 channels go 256, 132, 68, 35, 18.
    """
    weakening = check_weakening(weakening)
    min_rank = check_min_rank(min_rank)
    ranks = [int(rank)]
    for _ in range(int(stages)):
        r = ranks[-1]
        v = vbmf(r) if callable(vbmf) else int(vbmf)
        ranks.append(weakened_rank(r, min(int(v), r), weakening, min_rank))
    return ranks


def plan_by_rule(
    model: nn.Module,
    rule: str = "energy",
    *,
    keep: float = 0.99,
    weakening: float = 0.8,
    min_rank: int = 8,
    methods: Sequence[str] | str = "auto",
    layers: Iterable[str] | None = None,
    spectra: Callable[[str, str], Spectrum] | None = None,
) -> Plan:
    """A plan whose ranks come from a rule applied to each layer's own spectra.

    Parameters
    ----------
    model : nn.Module
        Read only.
    rule : "energy", "vbmf" or "weakened_vbmf"
        ``"energy"``: per rank axis, the smallest rank keeping ``keep`` of the energy of the
        unfolding the axis cuts. ``"vbmf"``: the EVBMF rank of that unfolding (Nakajima et al.
        2013; Kim et al. 2016 for Tucker-2), at least ``min_rank``. ``"weakened_vbmf"``:
        MUSCO's rank ``max(R - weakening * (R - R_vbmf), min_rank)`` where ``R`` is the
        unfolding's current rank (Gusak et al. 2019); applied again to the rebuilt weights
        of a compressed layer it gives the next stage's rank (see :func:`rule_pick`).
    keep : float in (0, 1]
        Energy to keep (``"energy"`` only).
    weakening : float in [0, 1]
        ``0``: no compression, ``1``: the VBMF rank itself (``"weakened_vbmf"`` only).
    min_rank : int
        The smallest rank the VBMF rules give (a layer of lower rank keeps its rank).
    methods : "auto", a name or names
        Each layer takes the first of these that can decompose it (``"auto"``: the methods
        with a cheap error curve, :func:`tensorscope.methods.planner_methods`); its ranks come
        from the method's rank axes (:meth:`~tensorscope.methods.Method.suggest_rank`).
    layers : names, optional
        Only these layers (default: every decomposable layer).
    spectra : callable, optional
        ``spectra(layer_name, unfolding) -> Spectrum``: the spectra the rule reads instead of
        the weights' own (the explorer passes the ones it shows: whitened by calibration data
        in its data-aware mode). Default: the weights' spectra.

    Returns
    -------
    Plan
        One entry per layer that the rule makes smaller; a layer whose rule rank would not
        reduce its parameters, or that no method in ``methods`` applies to, stays dense.

    Raises
    ------
    ValueError
        ``keep`` outside (0, 1], ``weakening`` outside [0, 1], ``min_rank`` below 1.
    PlanError
        An unknown rule or method; an unknown layer (with close matches) or one that cannot
        be decomposed.
    """
    if rule not in RULES:
        raise PlanError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    if (isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not math.isfinite(keep)
            or not 0.0 < keep <= 1.0):
        raise ValueError(f"keep (the energy to keep) must be in (0, 1]; got {keep!r}")
    weakening = check_weakening(weakening)
    min_rank = check_min_rank(min_rank)
    menu = resolve_methods(methods)
    names = check_layers(model, layers)
    modules = layer_modules(model)  # Conv1D, nn.Conv1d: their views
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        layer = modules[name]
        geom = LayerGeometry.of(layer)
        method = first_method(menu, geom)
        if method is None:
            continue
        given = (lambda unfolding, name=name: spectra(name, unfolding)) if spectra is not None else None
        pick = rule_pick(layer, rule, keep=keep, weakening=weakening, min_rank=min_rank, name=name, spectrum_of=given)
        rank = method.suggest_rank(geom, pick)
        if method.count_params(geom, rank) >= geom.dense_params:
            continue  # not smaller at the rule's rank: stays dense
        entries[name] = {"method": method.name, "rank": method.rank_to_json(rank)}
    return Plan(entries)
