"""Rank allocation by what the network loses: scores of candidate truncations for the planner.

The budget planner (:func:`tensorscope.plan_for_budget`) offers every layer a menu of
(cost, loss) options and picks one per layer, by a multiple-choice knapsack, that minimises
the summed loss within the budget. What "loss" means is the allocation rule:

``allocation="layer"`` (the default)
    Each layer's own squared relative error: of its weight without data, of its output on
    the calibration data with data. Every layer counts alike, however much the network's
    output depends on it.

``allocation="output"``
    The estimated increase of the loss of the network's *output* per sample when the layer's
    weight ``W`` becomes ``W_r``::

        dL(W_r) ~ 1/2 * (rows / samples) * tr(G (W - W_r) C (W - W_r)^T)

    where ``C`` is the mean second moment of the layer's inputs (per row: token or output
    position) and ``G`` the mean second moment of the gradient of the output loss with
    respect to the layer's output, both gathered in one pass by
    ``collect_stats(..., gradients=True)``. The output loss is the distance to the original
    network's own output: the KL divergence of the softmax for class scores ``(N, C)``,
    half the squared error otherwise (positions an ``attention_mask`` hides excluded). At the
    original network its gradient is zero, so the first-order term vanishes and this is the
    second-order (Gauss-Newton, i.e. Fisher) term, with the curvature of each layer's output
    Kronecker-factored as K-FAC does (inputs and output gradients taken independent, rows
    independent). The same ``G`` also weighs the factors themselves: ``svd`` with the option
    ``fisher`` truncates ``R^T W L`` (``R R^T = G``, ``L L^T = C``), which minimises exactly
    this estimate, where the whitened SVD minimises the layer's own output error.

    Scores are held out: factors are fitted on one half of the calibration data and scored
    with the other half's moments, both ways, averaged (``Calibration.halves``), so a layer
    whose whitened factors fit 32 sentences but not the next ones is seen to suffer. The
    planner scores several factor variants per layer the same way (``Method.data_variants``:
    for ``svd`` the input moment shrunk by 0, 0.3 or 1 and the output moment by 0.1 or 0.5,
    see :meth:`tensorscope.calibration.LayerStats.shrunk`) and keeps, per layer, the variant
    and rank the knapsack prefers. A method that cannot score this way (``tucker2``) enters
    with its in-sample relative error times the layer's whole estimated loss
    ``dL(0)``.

Because every option is priced in the same unit, the loss of the network's output, the
knapsack pools all layers' singular values as ZS-SVD (Abbasi et al. 2026) does, spending the
budget where the network loses least, instead of where each layer loses least; "keep this
layer dense" stays one of the options. The estimate is checked against damage measured end
to end by :func:`measured_damage` (``tests/test_allocation.py``; ``bench/real_networks.py``
prints both).

With held-out calibration data the planner also measures (``plan_for_budget(measure=...)``):
:func:`measured_scales` fits one option per layer on the first half, measures the network's
output loss on the second half with that layer alone replaced, and rescales the layer's
whole curve by measured / estimated; the budget is then allocated again. That corrects the
estimate where it misprices a layer (coherent errors over positions, nonlinearities) but,
one layer at a time, cannot see how the errors of all layers add up, and it helps on some
networks (MiniLM at 50%) and hurts on others (EfficientNet-Lite0 at 75% of its parameters).
So ``measure="auto"`` makes both allocations and keeps the one whose whole plan loses less
as measured by :func:`heldout_plan_scores`: every planned layer fitted on the first half,
all swapped in at once, measured on the second half's batches. For a classifier (class
scores ``(N, C)``) it ranks by top-1 disagreement with the original first, the output loss
only between plans that tie: on EfficientNet-Lite0 with four calibration photos the KL loss
and the agreement rank the two plans differently, and the agreement is what generalised.

References
----------
LeCun, Denker and Solla, "Optimal brain damage", NeurIPS 1989 (second-order saliency).
Martens and Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", ICML 2015. Wang et al., "EigenDamage: structured pruning in the Kronecker-factored
eigenbasis", ICML 2019. Hsu et al., "Language model compression with weighted low-rank
factorization" (FWSVD), ICLR 2022. Yuan et al., "ASVD: activation-aware singular value
decomposition", 2023. Wang et al., "SVD-LLM: truncation-aware singular value decomposition",
ICLR 2025, and "SVD-LLM v2", NAACL 2025. Abbasi et al., "Zero Sum SVD: balancing loss
sensitivity for low rank LLM compression", arXiv 2602.02848, 2026.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from . import linalg
from .data import forward, iter_batches, split_batch
from .errors import BudgetError, PlanError

__all__ = ["ALLOCATIONS", "HELDOUT_ROWS", "PlanScores", "candidate_losses", "heldout_plan_damage", "heldout_plan_scores", "measured_damage", "output_scale",
           "output_loss", "reference_outputs"]

ALLOCATIONS = ("layer", "output")
#: with heldout="auto" and allocation="layer", layers with fewer calibration input rows than
#: this many times their input size are scored held out
HELDOUT_ROWS = 4


def output_scale(layer: nn.Module, stats: Any) -> float:
    """``1/2 rows/samples tr(G W C W^T)``: the estimated output loss of zeroing the layer."""
    g = stats.grad_moment()
    if g is None:
        raise BudgetError("the statistics hold no output-gradient moments: collect_stats(..., gradients=True)")
    w = linalg.grouped_matrix(layer)
    wc = w @ stats.moment("patch")
    return float(0.5 * stats.count / max(stats.samples, 1) * ((g @ w) * wc).sum())


def _variants(method, geom, variants: Any, output: bool) -> list[dict]:
    if variants == "auto":
        return [dict(v) for v in method.data_variants(geom, output)]
    out = []
    for v in variants:
        try:
            out.append(method.check_options(v))
        except PlanError:  # an option this method does not take: not one of its variants
            continue
    return out or [{}]


def candidate_losses(method, layer: nn.Module, geom, curve: Callable[[Any], Any], stats: Any,
                     halves: tuple | None, heldout: bool | str, allocation: str,
                     variants: Any = "auto") -> Iterator[tuple[dict, Any, np.ndarray, bool]]:
    """``(options, curve, loss per rank of curve, scored held out)`` for each factor variant the
    planner should weigh.

    ``curve(stats)`` gives the method's :class:`~tensorscope.methods.Tradeoff` (its ranks and
    costs; with statistics, its in-sample relative errors), asked for only where needed: held
    -out scores replace the in-sample errors, and the whitened spectrum behind them is then
    never computed. Losses are relative squared errors (``"layer"``) or estimated output losses
    per sample (``"output"``).
    """
    if stats is None:
        t = curve(None)
        if t is not None:
            yield {}, t, np.asarray(t.errors, dtype=np.float64) ** 2, False
        return
    output = allocation == "output"
    if output:
        held = halves is not None and heldout is not False
    else:
        held = halves is not None and (heldout is True or (
            heldout == "auto" and stats.count < HELDOUT_ROWS * stats.patch.shape[-1]))
    if not output and not held:  # in-sample, whitened factors always win: nothing to choose
        t = curve(stats)
        if t is not None:
            yield {}, t, np.asarray(t.errors, dtype=np.float64) ** 2, False
        return
    plain = None
    for options in _variants(method, geom, variants, output):
        if held:
            a, b = halves
            ab = method.heldout_losses(layer, a, b, options, output=output)
            ba = method.heldout_losses(layer, b, a, options, output=output) if ab is not None else None
            pairs = None if ab is None or ba is None else [ab, ba]
        else:
            one = method.heldout_losses(layer, stats, stats, options, output=True)
            pairs = None if one is None else [one]
        if pairs is None:  # the method cannot score this way: its in-sample curve (scaled)
            if options:
                continue
            t = curve(stats)
            if t is None:
                return
            loss = np.asarray(t.errors, dtype=np.float64) ** 2
            yield {}, t, loss * output_scale(layer, stats) if output else loss, False
            continue
        if plain is None:
            plain = curve(None)  # ranks and costs only
            if plain is None:
                return
        n = len(plain.ranks)
        if output:
            loss = sum(np.asarray(p[0][:n], dtype=np.float64) for p in pairs) / len(pairs)
        else:
            loss = sum(np.asarray(p[0][:n], dtype=np.float64) / p[1] if p[1] > 0 else np.zeros(n)
                       for p in pairs) / len(pairs)
        yield options, plain, loss, held


def output_loss(out: torch.Tensor, ref: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """The output loss per sample the ``"output"`` allocation estimates (summed over the batch):
    the KL divergence of the softmax from the reference's for class scores ``(N, C)``, half the
    squared error otherwise (positions an ``attention_mask`` of a dict batch hides excluded)."""
    if out.dim() == 2 and out.shape[1] > 1:
        lp, lq = torch.log_softmax(out.double(), -1), torch.log_softmax(ref.double(), -1)
        return (lq.exp() * (lq - lp)).sum()
    d = (out.double() - ref.double()) ** 2
    if batch is not None:
        kw = split_batch(batch).kwargs
        m = kw.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2 and d.dim() >= 3 and tuple(m.shape) == tuple(d.shape[:2]):
            d = d * m.to(d.dtype).reshape(*m.shape, *([1] * (d.dim() - 2)))
    return 0.5 * d.sum()


@torch.no_grad()
def measured_damage(model: nn.Module, compressed: nn.Module, data: Any) -> float:
    """The output loss per sample (:func:`output_loss`) of ``compressed`` against ``model``,
    measured end to end on ``data``: what the ``"output"`` allocation estimates."""
    total, n = 0.0, 0
    was = (model.training, compressed.training)
    model.eval()
    compressed.eval()
    try:
        for batch in iter_batches(data):
            total += float(output_loss(forward(compressed, batch), forward(model, batch), batch))
            n += split_batch(batch).size
    finally:
        model.train(was[0])
        compressed.train(was[1])
    return total / max(n, 1)


def estimated_damage(model: nn.Module, plan: Any, stats: Mapping[str, Any], check: Mapping[str, Any] | None = None,
                     ) -> dict[str, float]:
    """Per planned layer, the ``"output"`` estimate of what its entry of ``plan`` costs the
    network (factors fitted on ``stats``, scored on ``check``'s moments, default ``stats``)."""
    from .plan import as_plan

    check = stats if check is None else check
    out = {}
    for r in as_plan(plan).validate(model):
        losses = r.method.heldout_losses(r.module, stats[r.name], check[r.name], r.options, output=True)
        if losses is None:
            continue
        out[r.name] = float(losses[0][_rank_index(r)])
    return out


def _rank_index(r) -> int:
    rank = r.rank
    return int(rank[0] if isinstance(rank, (tuple, list)) else rank) - 1


def split_halves(batches: list) -> tuple[list, list] | None:
    """The two halves of the data as :func:`tensorscope.collect_stats` splits them: alternate
    batches, or the two halves of the rows of a single batch; None when it cannot be split."""
    batches = list(batches)
    if len(batches) >= 2:
        return batches[0::2], batches[1::2]
    if len(batches) != 1:
        return None
    b = split_batch(batches[0])
    n = b.size
    if n < 2:
        return None
    h = n // 2
    cut = lambda v, sl: v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731

    def part(sl: slice):
        args = tuple(cut(a, sl) for a in b.args)
        kwargs = {k: cut(v, sl) for k, v in b.kwargs.items()}
        inputs = kwargs if not args else (args[0] if len(args) == 1 and not kwargs else None)
        if inputs is None:
            return None
        return inputs if b.target is None else (inputs, cut(b.target, sl))

    first, second = part(slice(0, h)), part(slice(h, n))
    return None if first is None or second is None else ([first], [second])


@torch.no_grad()
def measured_scales(model: nn.Module, modules: Mapping[str, nn.Module], stats: Any, parts: tuple[list, list],
                    options: Mapping[str, Any], progress: Any = False, refs: list | None = None) -> dict[str, float]:
    """Per layer, measured / estimated output loss of one option: the check of the estimates.

    ``options`` maps layer names to planner options (method, rank, options). Each is fitted on
    the first half's statistics, put in the original architecture (its reconstructed weight)
    and the output loss measured end to end on the second half's batches, against the
    estimate of the same factors from the second half's moments. Where interactions the
    estimate leaves out (coherent errors over a sample's positions, nonlinearities, the
    layers after it) make a layer matter more or less than estimated, its whole curve is
    rescaled by this ratio (clipped to [1e-2, 1e3]).

    Both sides are held out on purpose: factors fitted on all the statistics reproduce the
    calibration rows of a layer with fewer rows than inputs almost exactly, so an in-sample
    measurement there is near zero and the ratio meaningless (tried on EfficientNet-Lite0:
    its classifier was scaled by 0.02 and then cut to rank 50, top-1 agreement 0.06).

    ``refs``: the original's outputs on the second half's batches (:func:`reference_outputs`),
    when the caller has them already.
    """
    from .methods import get_method
    from .preview import swapped_weights
    from .progress import Progress

    _, check = parts
    was = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        refs = reference_outputs(model, check) if refs is None else refs
        n = sum(split_batch(b).size for b in check)
        with Progress(progress, total=len(options), desc="checking estimates") as bar:
            for name, o in options.items():
                bar.set_message(name)
                pair = stats.half(name)
                if pair is None:
                    bar.update(1)
                    continue
                a, b = pair
                method, module = get_method(o.method), modules[name]
                opts = dict(o.options or {})
                est = method.heldout_losses(module, a, b, opts, output=True)
                if est is None:
                    bar.update(1)
                    continue
                idx = [i for i, r in enumerate(_ranks_of(method, module)) if r == o.rank]
                e = float(est[0][idx[0]]) if idx else None
                w = method.reconstruct(module, method.factorize(module, o.rank, opts, stats=a))
                with swapped_weights(model, {name: w}):
                    got = sum(float(output_loss(forward(model, bt), ref, bt)) for bt, ref in zip(check, refs)) / n
                if e is not None and e > 0 and got > 0:
                    out[name] = float(np.clip(got / e, 1e-2, 1e3))
                stats.release(name)
                bar.update(1)
    finally:
        model.train(was)
    return out


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list) -> list:
    """The original network's outputs on ``batches`` (in eval mode): what the end-to-end checks
    measure against, computed once for all of them."""
    was = model.training
    model.eval()
    try:
        return [forward(model, b) for b in batches]
    finally:
        model.train(was)


@torch.no_grad()
def heldout_plan_damage(model: nn.Module, modules: Mapping[str, nn.Module], stats: Any, parts: tuple[list, list],
                        options: Mapping[Any, Any], refs: list | None = None, memo: dict | None = None) -> float:
    """The output loss per sample of a whole plan on held-out calibration data (the ``loss``
    of :func:`heldout_plan_scores`, which see)."""
    return heldout_plan_scores(model, modules, stats, parts, options, refs, memo).loss


class PlanScores(NamedTuple):
    """A whole plan measured on held-out data: ``loss``, the output loss per sample
    (:func:`output_loss`); ``disagreement``, the fraction of samples whose top-1 class differs
    from the original's (class scores ``(N, C)`` only, else ``None``)."""

    loss: float
    disagreement: float | None

    def key(self) -> tuple[float, float]:
        """What ``plan_for_budget(measure="auto")`` ranks plans by: the classifier's headline
        metric first (top-1 disagreement), the output loss between plans that tie on it."""
        return (self.disagreement if self.disagreement is not None else 0.0, self.loss)


def heldout_plan_scores(model: nn.Module, modules: Mapping[str, nn.Module], stats: Any, parts: tuple[list, list],
                        options: Mapping[Any, Any], refs: list | None = None,
                        memo: dict | None = None) -> PlanScores:
    """A whole plan measured end to end on held-out calibration data (:class:`PlanScores`: the
    output loss per sample, and a classifier's top-1 disagreement): what
    ``plan_for_budget(measure="auto")`` compares its plans by.

    ``options`` maps layer names to planner options (method, rank, options; a dense option,
    ``method`` None, leaves the layer as it is). Every layer's factors are fitted on the first
    half's statistics (``stats.half``; a layer whose statistics have no halves on all of
    them), all put in the original architecture at once (their reconstructed weights) and the
    output loss measured on the second half's batches (``parts[1]``) against the original's
    outputs (``refs``, :func:`reference_outputs` of ``parts[1]``, computed here when not given).
    Unlike :func:`measured_scales` (one layer at a time) this sees how the layers' errors add
    up through the network. Groups (tuple names) are scored by their weights and skipped.
    ``memo`` (a dict) keeps the fitted weights between calls, so layers two plans give the
    same option are fitted once.
    """
    from .methods import get_method
    from .preview import swapped_weights

    check = parts[1]
    refs = reference_outputs(model, check) if refs is None else refs
    if len(refs) != len(check):
        raise BudgetError(f"refs= holds {len(refs)} outputs for {len(check)} held-out batches: compute them with "
                          "reference_outputs(model, parts[1])")
    memo = {} if memo is None else memo
    weights = {}
    for name, o in options.items():
        if isinstance(name, tuple) or o.method is None:  # a group (scored by its weights) or dense
            continue
        opts = dict(o.options or {})
        key = (name, o.method, tuple(o.rank) if isinstance(o.rank, (list, tuple)) else o.rank,
               tuple(sorted((k, repr(v)) for k, v in opts.items())))
        if key not in memo:
            pair = stats.half(name)
            fit = pair[0] if pair is not None else stats[name]
            method, module = get_method(o.method), modules[name]
            memo[key] = method.reconstruct(module, method.factorize(module, o.rank, opts, stats=fit))
            stats.release(name)
        weights[name] = memo[key]
    was = model.training
    model.eval()
    total, wrong, classes = 0.0, 0, True
    try:
        n = sum(split_batch(b).size for b in check)
        with swapped_weights(model, weights), torch.no_grad():
            for bt, ref in zip(check, refs):
                out = forward(model, bt)
                total += float(output_loss(out, ref, bt))
                classes = classes and out.dim() == 2 and out.shape[1] > 1
                if classes:
                    wrong += int((out.argmax(-1) != ref.argmax(-1)).sum())
    finally:
        model.train(was)
    return PlanScores(total / max(n, 1), wrong / max(n, 1) if classes and check else None)


def _ranks_of(method, module: nn.Module) -> list:
    from .methods.base import LayerGeometry

    t = method.tradeoff(module, LayerGeometry.of(module))
    return list(t.ranks) if t is not None else []


def as_options(variants: Any) -> Any:
    """Check ``plan_for_budget(variants=...)``: ``"auto"`` or a list of option dicts."""
    if variants == "auto":
        return variants
    if isinstance(variants, Mapping) or not isinstance(variants, Sequence) or isinstance(variants, str) or not all(
            isinstance(v, Mapping) for v in variants) or not variants:
        raise BudgetError(f'variants must be "auto" or a non-empty list of option dicts, e.g. '
                          f'[{{"shrinkage": 0.3}}]; got {variants!r}')
    return [dict(v) for v in variants]
