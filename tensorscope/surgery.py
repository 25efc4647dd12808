"""Model surgery: apply a plan to a copy of a model.

``compress(model, plan)`` deep-copies the model, replaces each planned layer by the chain
its method builds (each plan group: one factorization, whose members share one core), and
returns the copy; the original is never modified. Everything is validated before any
factorization starts, so a bad plan fails fast and leaves nothing
half-done. ``tensorize(model, plan)`` builds the same structure without factorizing, with
fresh random weights, for training a factorized network from scratch.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .calibration import collect_stats
from .errors import DecompositionError, PlanError, TensorscopeError
from .forward_check import behaviour
from .layers import EXECUTE, FactorizedLayer
from .methods.base import BreakEvenWarning, check_finite, warn_if_past_break_even
from .plan import Plan, ResolvedGroup, ResolvedLayer, as_plan
from .preview import cached_factors, cached_group_factors
from .progress import Progress
from .sources import ON_DISK
from .streaming import compress_source

PLAN_ATTR = "_tensorscope_plan"
FOLD_ATTR = "_tensorscope_fold_bn"


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


# ---- BatchNorm folding --------------------------------------------------------------------


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) name pairs where the BN consumes only that conv's output."""
    pairs: list[tuple[str, str]] = []
    try:
        import torch.fx as fx

        gm = fx.symbolic_trace(model)
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
                continue
            src = node.args[0] if node.args else None
            if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                    and len(src.users) == 1):
                pairs.append((str(src.target), str(node.target)))
        return pairs
    except Exception:  # not traceable (data-dependent control flow): use Sequential adjacency
        pass
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for (n1, a), (n2, b) in zip(children, children[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    pre = f"{name}." if name else ""
                    pairs.append((pre + n1, pre + n2))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d into the Conv2d before it, in place (eval-mode statistics).

    The BN becomes ``nn.Identity`` so the model's own forward is unchanged; returns the
    folded (conv, bn) pairs. Decomposing a folded conv compresses what inference computes.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        fused.train(model.training)
        set_submodule(model, conv_name, fused)
        set_submodule(model, bn_name, nn.Identity())
    return pairs


# ---- compress -----------------------------------------------------------------------------


def compress(
    model: nn.Module,
    plan: Any,
    *,
    data: Any = None,
    fold_bn: bool = False,
    refine: bool = True,
    max_batches: int | None = None,
    progress: bool | Callable[[float, str], None] = False,
    stats: Mapping[str, Any] | None = None,
    correct: bool = False,
    out: str | os.PathLike | None = None,
    **on_disk: Any,
) -> nn.Module:
    """Return a copy of ``model`` with the planned layers decomposed.

    Parameters
    ----------
    model : nn.Module, or a path
        Not modified. A path is weights on disk (a ``.safetensors`` file or a folder of
        shards): they are compressed a layer at a time into the folder ``out`` (shards, index
        and plan; ``tensorscope.load(out)`` rebuilds the model), which is returned; a killed
        run resumes, and under ``torchrun`` the layers are shared among the processes.
        ``on_disk`` takes ``arch=``, ``arch_kwargs=`` and ``shard_bytes=``; see
        :func:`tensorscope.streaming.compress_source`.
    plan : Plan, dict, JSON text or path
        See :class:`tensorscope.Plan`.
    data : iterable of batches, optional
        Calibration data: factors then minimise the error of each layer's output on it
        (whitened factorizations) instead of the error of its weights.
    fold_bn : bool
        Fold each BatchNorm2d into the conv before it first (as deployment tools do).
    refine : bool
        Spend a little more time on better factors (HOOI sweeps for Tucker-2, full CP-ALS).
    progress : bool or callable
        A tqdm bar, or ``callable(fraction, message)``.
    stats : dict, optional
        Statistics already collected by :func:`tensorscope.collect_stats` (instead of ``data``),
        e.g. the ones the explorer's preview used or ``plan_for_budget`` planned with, so both
        build the same factors and nothing is gathered twice. Plan entries with output
        weighting (``svd``'s ``fisher``) need them gathered with ``gradients=True`` (with
        ``data=`` that happens here).
    correct : bool
        With ``data``: refit each factorized layer, in network order, to the inputs the
        compressed network gives it (:func:`tensorscope.correct`, closed form, one pass).
    """
    if isinstance(model, ON_DISK):
        if as_plan(plan).groups:
            raise PlanError("plan groups (joint decompositions) stack their members' kernels, which weights on disk "
                            "do not allow yet: load the model in memory to compress a plan with groups")
        if out is None:
            raise TypeError("compressing weights on disk writes a folder of shards: pass out='folder'")
        if data is not None or fold_bn or max_batches is not None:
            raise TypeError("data=, max_batches= and fold_bn= need the model in memory; for data-aware factors of "
                            "weights on disk pass stats= (tensorscope.collect_stats, or tensorscope.distributed."
                            "collect_stats under torchrun)")
        return compress_source(model, plan, out=out, stats=stats, refine=refine, progress=progress, **on_disk)
    if out is not None or on_disk:
        raise TypeError(f"out= and {sorted(on_disk) or 'its options'} are for weights on disk; save a compressed "
                        "model with tensorscope.save")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module; got {type(model).__name__}")
    plan = as_plan(plan)
    new = copy.deepcopy(model)
    if fold_bn:
        fold_batchnorm(new)
    resolved = plan.validate(new)
    groups = plan.resolve_groups(new)
    _refuse_unfactorizable(resolved)
    for r in resolved:  # refuse NaN/Inf before spending time on anything
        check_finite(r.module, r.name)
    for g in groups:
        for n, m in zip(g.members, g.modules):
            check_finite(m, n)
    if data is not None and stats is not None and not correct:
        raise TypeError("compress takes data= or stats=, not both")
    if correct and data is None:
        raise TypeError("compress(correct=True) refits layers on the compressed network's inputs: pass data=")
    wants_grads = [r.name for r in resolved if r.method.needs_gradients(r.options)]
    if data is not None and stats is None and resolved:
        stats = collect_stats(new, data, [r.name for r in resolved], max_batches=max_batches, progress=progress,
                              halves=False, gradients=bool(wants_grads))
    elif stats is not None and wants_grads:
        lacking = [n for n in wants_grads if n in stats and getattr(stats[n], "grad", None) is None]
        if lacking:
            raise PlanError(f"layer {lacking[0]!r}: its plan entry weighs outputs (fisher) but stats= holds no "
                            "output-gradient moments; collect them with ts.collect_stats(..., gradients=True)")
    if stats is not None:
        _warn_few_rows(resolved, stats)
    bar = Progress(progress, total=len(resolved) + len(groups), desc="decomposing")
    try:
        for r in resolved:
            bar.set_message(f"{r.name}: {r.method.name} rank {r.rank}")
            set_submodule(new, r.name, _decompose_one(r, stats, refine))
            bar.update(1)
        for g in groups:  # one unit each: one factorization, one shared core (data does not change it)
            bar.set_message(f"group {g.name}: {g.method.name} rank {g.rank}")
            _place_group(new, g, _decompose_group(g, refine))
            bar.update(1)
    finally:
        bar.close()
    object.__setattr__(new, PLAN_ATTR, plan)
    object.__setattr__(new, FOLD_ATTR, bool(fold_bn))
    if correct and resolved:
        from .correction import correct as _correct

        ref = model
        if fold_bn:  # the reference the chains were made from: the folded original
            ref = copy.deepcopy(model)
            fold_batchnorm(ref)
        new = _correct(new, ref, data, stats=stats, max_batches=max_batches, progress=progress)
    return new


def _warn_few_rows(resolved: list[ResolvedLayer], stats: Mapping[str, Any]) -> None:
    """Warn when whitened factors are fitted on fewer input rows than the layer has inputs and
    the plan did not choose them on held-out data (no ``shrinkage`` option): they fit those
    rows and may generalise worse than plain factors."""
    few = []
    for r in resolved:
        st = stats.get(r.name)
        if st is None or not r.method.uses_data or "shrinkage" in r.options or not hasattr(st, "patch"):
            continue
        if st.count < st.patch.shape[-1]:
            few.append(f"{r.name} ({st.count} rows, {st.patch.shape[-1]} inputs)")
    if few:
        warnings.warn(f"data-aware factors of {', '.join(few[:3])}{' ...' if len(few) > 3 else ''} are fitted on "
                      "fewer input rows than inputs: their input moment is singular, so it was whitened with a "
                      "ridge of its mean diagonal added (ridge= of collect_stats), and on other data these factors "
                      "can be worse than plain ones. Plan with "
                      "data (plan_for_budget chooses whitened, shrunk or plain factors per layer on held-out data) "
                      "or give these entries a shrinkage option (1.0: plain)", stacklevel=3)


def _refuse_unfactorizable(resolved: list[ResolvedLayer]) -> None:
    """PlanError naming the first entry whose method cannot factorize it (``Method.factorize_refusal``)."""
    for r in resolved:
        why = r.method.factorize_refusal(r.geometry, r.options)
        if why:
            raise PlanError(f"layer {r.name!r}: {why}")


def with_input_padding(layer: nn.Module, built: nn.Module) -> nn.Module:
    """``built`` with the zero padding that ``layer``'s own forward applies (a TensorFlow-style
    "same" conv port) in front, so the chain computes what the layer did; ``built`` itself
    when the layer pads as its class declares (see :mod:`tensorscope.forward_check`)."""
    pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None
    if pad is None:
        return built
    return type(built)(pad, *built, method=built.method, rank=built.rank, source=built.source,
                       options=built.options)


def finish_chain(r: ResolvedLayer, built: nn.Module) -> nn.Module:
    """``built`` as it goes into the model: behind the layer's own padding
    (:func:`with_input_padding`), running in the form the plan entry's ``execute`` option
    names (:mod:`tensorscope.layers`)."""
    built = with_input_padding(r.module, built)
    mode = r.options.get(EXECUTE)
    if mode is not None:
        if not isinstance(built, FactorizedLayer):
            raise PlanError(f"layer {r.name!r}: method {r.method.name!r} builds no chain that takes execute={mode!r}")
        try:
            built.set_execution(mode)
        except PlanError as e:
            raise PlanError(f"layer {r.name!r}: {e}") from None
    return built


def _decompose_one(r: ResolvedLayer, stats: Any, refine: bool) -> nn.Module:
    warn_if_past_break_even(r.method, r.geometry, r.rank, r.options, name=r.name)
    try:
        layer_stats = stats.get(r.name) if stats is not None else None
        factors = cached_factors(r, refine, layer_stats)
        built = finish_chain(r, r.method.build(r.module, factors))
    except TensorscopeError as e:
        raise type(e)(f"layer {r.name!r}: {e}") from e
    except (RuntimeError, ValueError, torch.linalg.LinAlgError) as e:
        raise DecompositionError(
            f"layer {r.name!r}: {r.method.name} at rank {r.rank} failed: {type(e).__name__}: {e}"
        ) from e
    built.train(r.module.training)
    return built


def _decompose_group(g: ResolvedGroup, refine: bool) -> list[nn.Module]:
    try:
        return g.method.build_group(g.modules, cached_group_factors(g, refine), g.name)
    except TensorscopeError as e:
        raise type(e)(f"group {g.name!r}: {e}") from e
    except (RuntimeError, ValueError, torch.linalg.LinAlgError) as e:
        raise DecompositionError(f"group {g.name!r}: {g.method.name} at rank {g.rank} failed: "
                                 f"{type(e).__name__}: {e}") from e


def _place_group(model: nn.Module, g: ResolvedGroup, built: list[nn.Module]) -> None:
    """Put each member's module where the member was (with the padding its forward applied)."""
    for name, layer, b in zip(g.members, g.modules, built):
        pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None
        if pad is not None:
            b = FactorizedLayer(pad, b, method=g.method.name, rank=g.rank, source=type(layer).__name__)
        b.train(layer.training)
        set_submodule(model, name, b)


# ---- tensorize ----------------------------------------------------------------------------

TENSORIZE_INITS = ("random", "factorize")


def _check_resettable(name: str, method: str, built: nn.Module) -> None:
    """Every module of a built chain that holds parameters must draw its own (``reset_parameters``)."""
    for child in built.children():
        has_params = any(True for _ in child.parameters())
        if has_params and not callable(getattr(child, "reset_parameters", None)):
            raise DecompositionError(
                f"layer {name!r}: tensorize(init='random') needs reset_parameters() on every module method "
                f"{method!r} builds, and {type(child).__name__} has none; give it one, or use init='factorize'"
            )


def tensorize(model: nn.Module, plan: Any, *, init: str = "random", seed: int = 0) -> nn.Module:
    """Return a copy of ``model`` with the structure of ``plan``, ready to train.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    plan : Plan, dict, JSON text or path
        See :class:`tensorscope.Plan`; recorded on the copy (``plan_of``), so ``ts.save``,
        ``ts.load`` and ``ts.export`` work as for a compressed model.
    init : ``"random"`` or ``"factorize"``
        ``"random"``: each planned layer becomes the module its method builds, drawn afresh
        by its ``reset_parameters()`` (tensor-train and tensor-ring layers: normal cores
        whose rebuilt weight has Glorot variance; chains of ``nn.Linear``/``nn.Conv2d``:
        each layer's own initialisation); nothing is factorized, so entries ``compress``
        refuses (``shuffle``) are built. ``"factorize"``: exactly ``compress(model, plan)``.
    seed : int
        Seeds the random initialisation (torch's global random state is left as it was).

    Raises
    ------
    PlanError, RankError
        Before any work, naming the layer, the value and the fix (as ``compress``).

    References
    ----------
    Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015 (TT layers trained from a
    random start).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tensorize expects an nn.Module; got {type(model).__name__}")
    if init not in TENSORIZE_INITS:
        raise PlanError(f"tensorize: init must be 'random' (fresh weights to train) or 'factorize' (the factors of "
                        f"the trained weights, as compress); got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"tensorize: seed must be an integer; got {seed!r}")
    if init == "factorize":
        return compress(model, plan)
    plan = as_plan(plan)
    new = copy.deepcopy(model)
    resolved = plan.validate(new)
    groups = plan.resolve_groups(new)
    for r in resolved:
        warn_if_past_break_even(r.method, r.geometry, r.rank, r.options, name=r.name)
    mods = [r.module for r in resolved] + [m for g in groups for m in g.modules]
    devices = sorted({p.device.index or 0 for m in mods for p in m.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for r in resolved:
            try:
                built = finish_chain(r, r.method.skeleton(r.module, r.rank, r.options))
            except TensorscopeError as e:
                raise type(e)(f"layer {r.name!r}: {e}") from e
            _check_resettable(r.name, r.method.name, built)
            reset = getattr(built, "reset_parameters", None)
            if callable(reset):
                reset()
            built.train(r.module.training)
            set_submodule(new, r.name, built)
        for g in groups:
            members = g.method.skeleton_group(g.modules, g.rank, g.options, g.name)
            unique = {id(m): m for b in members for m in b.modules() if callable(getattr(m, "reset_parameters", None))}
            for m in unique.values():  # what the members share is drawn once
                m.reset_parameters()
            _place_group(new, g, members)
    object.__setattr__(new, PLAN_ATTR, plan)
    object.__setattr__(new, FOLD_ATTR, False)
    return new


def apply_skeleton(model: nn.Module, plan: Any, *, fold_bn: bool = False) -> nn.Module:
    """Give ``model`` (in place) the structure ``compress`` would build, without factorizing.

    Used to load a checkpoint: the factorized modules get the right shapes (zero weights)
    and the state dict is then loaded into them.
    """
    plan = as_plan(plan)
    if fold_bn:
        fold_batchnorm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BreakEvenWarning)
        for r in plan.validate(model):
            built = finish_chain(r, r.method.skeleton(r.module, r.rank, r.options))
            built.train(r.module.training)
            set_submodule(model, r.name, built)
        for g in plan.resolve_groups(model):  # one shared core per group, as compress builds it
            _place_group(model, g, g.method.skeleton_group(g.modules, g.rank, g.options, g.name))
    object.__setattr__(model, PLAN_ATTR, plan)
    object.__setattr__(model, FOLD_ATTR, bool(fold_bn))
    return model


def plan_of(model: nn.Module) -> Plan | None:
    """The plan ``compress`` applied to make ``model`` (None for an uncompressed model)."""
    return getattr(model, PLAN_ATTR, None)
