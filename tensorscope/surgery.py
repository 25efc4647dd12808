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
from .errors import DataError, DecompositionError, PlanError, TensorscopeError
from .forward_check import behaviour
from .layers import EXECUTE, FactorizedLayer, for_layer
from .methods.base import BreakEvenWarning, check_finite, warn_if_past_break_even
from .plan import Plan, ResolvedGroup, ResolvedLayer, as_plan
from .preview import cached_factors, cached_group_factors
from .progress import Progress
from .sources import ON_DISK
from .streaming import compress_source
from .views import Conv1dView

PLAN_ATTR = "_tensorscope_plan"
FOLD_ATTR = "_tensorscope_fold_bn"
FOLD_PAIRS_ATTR = "_tensorscope_fold_pairs"  # the (conv, bn) pairs folded, for a checkpoint to fold the same


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


# ---- BatchNorm folding --------------------------------------------------------------------


class FoldedPairs(list):
    """The (conv, bn) name pairs :func:`fold_batchnorm` folded; ``skipped`` maps each
    BatchNorm2d it left in place to the reason (another consumer of the conv's output, a BN
    in train mode or without running statistics, ...)."""

    def __init__(self, pairs=(), skipped: Mapping[str, str] | None = None):
        super().__init__(pairs)
        self.skipped: dict[str, str] = dict(skipped or {})


#: the BatchNorms folded, each into the conv of its dimension (Conv1d + BatchNorm1d, Conv2d + BatchNorm2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONVS = (nn.Conv1d, nn.Conv2d)


def _pairs_with(conv: Any, bn: Any) -> bool:
    """``bn`` normalizes what a conv of ``conv``'s kind returns (a BatchNorm1d after a Linear is no pair)."""
    return ((isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d))
            or (isinstance(conv, nn.Conv1d) and isinstance(bn, nn.BatchNorm1d)))


def _static_pairs(model: nn.Module, traced: list | None = None) -> list[tuple[str, str]]:
    """(conv, bn) name pairs found without running the model: a torch.fx trace where it
    traces, else a Conv2d then BatchNorm2d (Conv1d then BatchNorm1d) adjacent in an
    ``nn.Sequential`` (``traced``, if given, gets False appended then)."""
    pairs: list[tuple[str, str]] = []
    try:
        import torch.fx as fx

        gm = fx.symbolic_trace(model)
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(mods.get(node.target), _BNS):
                continue
            src = node.args[0] if node.args else None
            if (isinstance(src, fx.Node) and src.op == "call_module" and _pairs_with(mods.get(src.target),
                                                                                   mods[node.target])
                    and len(src.users) == 1):
                pairs.append((str(src.target), str(node.target)))
        return pairs
    except Exception:  # not traceable (data-dependent control flow): use Sequential adjacency
        if traced is not None:
            traced.append(False)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            children = list(mod.named_children())
            for (n1, a), (n2, b) in zip(children, children[1:]):
                if _pairs_with(a, b):
                    pre = f"{name}." if name else ""
                    pairs.append((pre + n1, pre + n2))
    return pairs


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict, Hugging Face ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _consumers(outputs: list[torch.Tensor]) -> dict[Any, int]:
    """How many edges of the autograd graph reaching ``outputs`` point at each node (a model
    output counts as one consumer of the node that made it)."""
    count: dict[Any, int] = {}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    for fn in stack:
        count[fn] = count.get(fn, 0) + 1
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for fn, _ in node.next_functions:
            if fn is not None:
                count[fn] = count.get(fn, 0) + 1
                stack.append(fn)
    return count


def _probe(model: nn.Module, example: Any) -> tuple[list[tuple[str, str]], dict[str, str], list[torch.Tensor]]:
    """Find conv -> BN pairs by running ``model`` (in eval mode) once on ``example`` with
    autograd on: the BN's input must be the very tensor the conv returned, unmodified, and
    the conv's output must have no consumer but the BN in the graph that reaches the
    output. Works on models torch.fx cannot trace. Returns the pairs, the BNs left with
    their reasons, and the (detached) outputs."""
    from .data import split_batch

    batch = split_batch(example)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, _CONVS)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BNS)}
    conv_out: dict[str, list[tuple[torch.Tensor, Any]]] = {}
    bn_calls: dict[str, list[tuple[Any, Any, Any]]] = {}

    def conv_hook(mod, args, out, n):
        conv_out.setdefault(n, []).append((out, getattr(out, "grad_fn", None)))

    def bn_hook(mod, args, out, n):
        x = args[0] if args else None
        bn_calls.setdefault(n, []).append((x, getattr(x, "grad_fn", None), getattr(out, "grad_fn", None)))

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: conv_hook(mod, a, o, n)) for n, m in convs.items()]
    hooks += [m.register_forward_hook(lambda mod, a, o, n=n: bn_hook(mod, a, o, n)) for n, m in bns.items()]
    params = [p for p in model.parameters() if not p.requires_grad]

    def grad_in(v):
        return v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    try:
        for p in params:  # a graph through every layer, even where the user froze weights
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model(*(grad_in(a) for a in batch.args), **{k: grad_in(v) for k, v in batch.kwargs.items()})
        outputs = _tensors(out)
        consumers = _consumers(outputs)
    except Exception as e:  # noqa: BLE001 - the model's own error (shape, dtype, keyword), named with example=
        raise DataError(f"fold_batchnorm: the probe forward on example= failed ({type(e).__name__}: {e}); "
                        "pass one batch as the model's forward takes it") from e
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(False)
    made_by = {id(calls[0][0]): n for n, calls in conv_out.items() if len(calls) == 1}
    pairs: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for b, calls in bn_calls.items():
        if len(calls) != 1:
            skipped[b] = f"called {len(calls)} times on the example"
            continue
        x, x_fn, out_fn = calls[0]
        c = made_by.get(id(x)) if isinstance(x, torch.Tensor) else None
        if c is None or not _pairs_with(convs[c], bns[b]):
            kind = "Conv1d" if isinstance(bns[b], nn.BatchNorm1d) else "Conv2d"
            skipped[b] = f"its input is not the output of a {kind} called once"
            continue
        fn = conv_out[c][0][1]
        if fn is None or x_fn is not fn:
            skipped[b] = f"its input is {c!r}'s output changed in place"
            continue
        if out_fn is None or not any(f is fn for f, _ in out_fn.next_functions):
            skipped[b] = f"its output does not come from {c!r}'s output"
            continue
        if consumers.get(fn, 0) != 1:
            skipped[b] = (f"{c!r}'s output has {consumers.get(fn, 0)} consumers in the graph that reaches the output "
                          "(folding needs the BN to be the only one)")
            continue
        pairs.append((c, b))
    for b in bns:
        if b not in bn_calls:
            skipped[b] = "not called on the example"
    return pairs, skipped, [t.detach() for t in outputs]


def _foldable(conv: nn.Module, bn: nn.Module, training: bool) -> str | None:
    """Why this pair cannot be folded, or None."""
    if training:
        return "in train mode (it normalizes by batch statistics): call model.eval() first to fold it"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "has no running statistics (track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return f"has {bn.num_features} features for a conv of {conv.out_channels} output channels"
    if nn.utils.parametrize.is_parametrized(conv):
        return "its conv's weight is parametrized"
    return None


def _fused(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` (same class, so a subclass keeps what its forward does, e.g. its
    own padding) whose weight and bias apply ``bn``'s eval-mode affine map per output
    channel (grouped and depthwise convs alike)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    fused = copy.deepcopy(conv)
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                    bn.eps, bn.weight, bn.bias)
    fused.bias.requires_grad_(conv.weight.requires_grad)  # a new bias trains as the weight does
    return fused


def fold_pairs(model: nn.Module, pairs: Any, *, values: bool = True) -> None:
    """Fold the given (conv, bn) pairs in place: each conv becomes a fused copy of itself and
    each BN ``nn.Identity``. ``values=False`` only gives the structure (a bias on the conv),
    for loading a checkpoint's state dict into it."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if values:
            fused = _fused(conv, bn)
        else:
            fused = copy.deepcopy(conv)
            if fused.bias is None:
                fused.bias = nn.Parameter(torch.zeros(fused.out_channels, dtype=fused.weight.dtype,
                                                      device=fused.weight.device))
        fused.train(conv.training)
        set_submodule(model, conv_name, fused)
        set_submodule(model, bn_name, nn.Identity())


def _fold_tolerance(ref: torch.Tensor, n_folded: int) -> float:
    """What folding may change in one output: rounding of the fused weights (a few eps of the
    dtype per folded pair) carried to the output's magnitude."""
    eps = torch.finfo(ref.dtype).eps if ref.is_floating_point() else 0.0
    scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    return 16.0 * eps * (n_folded + 1) * max(scale, 1.0)


def fold_batchnorm(model: nn.Module, example: Any = None) -> FoldedPairs:
    """Fold every BatchNorm2d into the Conv2d before it (BatchNorm1d into a Conv1d), in place
    (eval-mode statistics).

    The BN becomes ``nn.Identity`` so the model's own forward is unchanged, and the conv a
    copy of itself (same class: a conv that pads in its own ``forward`` keeps doing so) with
    the BN's scale and shift in its weight and bias. Decomposing a folded conv compresses
    what inference computes.

    Parameters
    ----------
    model : nn.Module
        Changed in place; BNs in train mode or without running statistics are left (with a
        warning saying why).
    example : batch, optional
        One input as the model's forward takes it. With it the pairs come from running the
        model once (autograd graph: the BN's input is exactly the conv's output, which nothing
        else uses), so models torch.fx cannot trace fold too, and the output on it is checked
        to be unchanged; if it is not, the model is restored and ``DecompositionError``
        raised. Without it: a torch.fx trace, else Conv2d/BatchNorm2d (Conv1d/BatchNorm1d)
        adjacent in an ``nn.Sequential``, unchecked.

    Returns
    -------
    FoldedPairs
        A list of the folded (conv, bn) pairs; ``.skipped``: BN name -> why it was left.
    """
    modes = {m: m.training for m in model.modules()}
    mods = dict(model.named_modules())
    untraced: list = []
    if example is None:
        found, skipped, ref = _static_pairs(model, untraced), {}, None
        missed = [n for n, m in mods.items() if isinstance(m, _BNS) and n not in {b for _, b in found}]
        if untraced and missed:
            warnings.warn(f"fold_batchnorm: torch.fx cannot trace this model and {len(missed)} BatchNorm "
                          f"({', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}) are not after a conv in an "
                          "nn.Sequential, so they were not folded; pass example= (one input batch; compress: data=) "
                          "to find their convs on a probe run", stacklevel=2)
    else:
        model.eval()
        try:
            found, skipped, ref = _probe(model, example)
        finally:
            _set_modes(modes)
    pairs = []
    for c, b in found:
        why = _foldable(mods[c], mods[b], modes[mods[b]])
        if why:
            skipped[b] = why
        else:
            pairs.append((c, b))
    originals = {n: mods[n] for pair in pairs for n in pair}
    fold_pairs(model, pairs)
    if ref is not None and pairs:
        _check_folded(model, example, ref, pairs, originals)
    unfoldable = {b: why for b, why in skipped.items() if any(b == p[1] for p in found)}
    if unfoldable:
        items = "; ".join(f"{b}: {why}" for b, why in list(unfoldable.items())[:3])
        warnings.warn(f"fold_batchnorm left {len(unfoldable)} BatchNorm after a conv unfolded ({items}"
                      f"{' ...' if len(unfoldable) > 3 else ''})", stacklevel=2)
    return FoldedPairs(pairs, skipped)


def _set_modes(modes: Mapping[nn.Module, bool]) -> None:
    """Give each module back its own train/eval flag (``train()`` would set its children's too)."""
    for m, t in modes.items():
        m.training = t


def _check_folded(model: nn.Module, example: Any, ref: list[torch.Tensor], pairs: list[tuple[str, str]],
                  originals: dict[str, nn.Module]) -> None:
    """The folded model's output on ``example`` equals ``ref``; else restore the originals and raise."""
    from .data import split_batch

    batch = split_batch(example)
    now = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            got = _tensors(model(*batch.args, **batch.kwargs))
    finally:
        _set_modes(now)
    worst = None
    if len(got) != len(ref):
        worst = f"{len(got)} output tensors instead of {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        if worst is not None:
            break
        if g.shape != r.shape:
            worst = f"output {i} has shape {tuple(g.shape)} instead of {tuple(r.shape)}"
        elif r.is_floating_point():
            err, tol = float((g - r).abs().max()) if r.numel() else 0.0, _fold_tolerance(r, len(pairs))
            if not err <= tol:
                worst = (f"output {i} moved by up to {err:.3g} (tolerance {tol:.3g}, "
                         f"max |output| {float(r.abs().max()):.3g})")
        elif not torch.equal(g, r):
            worst = f"output {i} changed"
    if worst is None:
        return
    for name, m in originals.items():
        set_submodule(model, name, m)
    raise DecompositionError(
        f"fold_batchnorm: folding {len(pairs)} conv/BN pairs changed the model's output on the example: {worst}. "
        "The model is left as it was; the model's forward may use a conv or BN in a way the graph did not show "
        "(a forward that reads the BN's attributes, a conv that ignores its bias); fold without that pair or "
        "compress without fold_bn")


# ---- compress -----------------------------------------------------------------------------


def compress(
    model: nn.Module,
    plan: Any,
    *,
    data: Any = None,
    fold_bn: bool = False,
    example_input: Any = None,
    refine: bool = True,
    max_batches: int | None = None,
    progress: bool | Callable[[float, str], None] = False,
    stats: Mapping[str, Any] | None = None,
    correct: bool | str = False,
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
        Fold each BatchNorm2d (BatchNorm1d) into the Conv2d (Conv1d) before it first (as deployment tools do); with
        ``data`` (its first batch) or ``example_input``, a probe run finds the pairs and checks
        the fold (:func:`fold_batchnorm`), so networks torch.fx cannot trace fold too.
    example_input : optional
        A batch the model takes: the probe of ``fold_bn`` without ``data``.
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
    correct : bool or "dense"
        With ``data``: refit each factorized layer, in network order, to the inputs the
        compressed network gives it (:func:`tensorscope.correct`, closed form, one pass);
        ``"dense"``: the layers left dense after the first compressed one too
        (``correct(dense=True)``).
    """
    if correct not in (False, True, "dense"):
        raise ValueError(f'correct must be False, True or "dense"; got {correct!r}')
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
    folded: list[tuple[str, str]] = []
    if fold_bn:
        example = example_input
        if data is not None:
            example, data = _first_batch(data)
        folded = list(fold_batchnorm(new, example))
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
    if fold_bn:
        object.__setattr__(new, FOLD_PAIRS_ATTR, folded)
    if correct and resolved:
        from .correction import correct as _correct

        ref = model
        if fold_bn:  # the reference the chains were made from: the folded original
            ref = copy.deepcopy(model)
            fold_pairs(ref, folded)
        new = _correct(new, ref, data, stats=stats, dense=correct == "dense", max_batches=max_batches,
                       progress=progress)
    return new


def _first_batch(data: Any) -> tuple[Any, Any]:
    """The first batch of ``data`` and ``data`` as it was (a one-pass iterator gets its
    first batch put back in front)."""
    import itertools

    from .data import iter_batches

    it = iter_batches(data)
    first = next(it, None)
    if first is not None and not isinstance(data, (torch.Tensor, Mapping)) and iter(data) is data:
        data = itertools.chain([first], it)
    return first, data


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
    "same" conv port) in front, so the chain computes what the layer did (see
    :mod:`tensorscope.forward_check`), taking the layer's own tensors (an ``nn.Conv1d``'s
    ``(N, C, L)``: :func:`tensorscope.layers.for_layer`)."""
    pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None
    if pad is not None:
        built = type(built)(pad, *built, method=built.method, rank=built.rank, source=built.source,
                            options=built.options)
    return for_layer(layer, built)  # an nn.Conv1d's chain takes and returns (N, C, L)


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
        elif isinstance(layer, Conv1dView) and not isinstance(b, FactorizedLayer):
            b = FactorizedLayer(b, method=g.method.name, rank=g.rank, source="Conv1d")
        b = for_layer(layer, b)  # an nn.Conv1d's member takes and returns (N, C, L)
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


def apply_skeleton(model: nn.Module, plan: Any, *, fold_bn: bool = False,
                   fold: list[tuple[str, str]] | None = None) -> nn.Module:
    """Give ``model`` (in place) the structure ``compress`` would build, without factorizing.

    Used to load a checkpoint: the factorized modules get the right shapes (zero weights)
    and the state dict is then loaded into them. ``fold``: the (conv, bn) pairs the
    compressed model folded (recorded since they may come from a probe run); without it,
    the pairs a trace or ``nn.Sequential`` adjacency finds (checkpoints written before).
    """
    plan = as_plan(plan)
    if fold_bn:
        if fold is None:
            fold = [(c, b) for c, b in _static_pairs(model)
                    if model.get_submodule(b).track_running_stats and model.get_submodule(b).running_mean is not None]
        fold_pairs(model, fold, values=False)
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
    if fold_bn:
        object.__setattr__(model, FOLD_PAIRS_ATTR, [tuple(p) for p in fold])
    return model


def plan_of(model: nn.Module) -> Plan | None:
    """The plan ``compress`` applied to make ``model`` (None for an uncompressed model)."""
    return getattr(model, PLAN_ATTR, None)
