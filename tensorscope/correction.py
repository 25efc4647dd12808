"""Sequential correction: refit each compressed layer to the inputs the compressed network gives it.

Factors fitted on the original network's activations are optimal for inputs the compressed
network no longer produces: every truncated layer changes what the layers after it see.
:func:`correct` walks the factorized layers in the order the network runs them, and for each
one gathers, on the calibration data, the second moment of its input in the compressed
network (earlier layers already corrected), ``C^ = E[x^ x^T]``, and the cross moment with
its input in the original network, ``E[x x^T]``. The weight that best maps the compressed
inputs to the original outputs is the ridge regression

    ``A = W (E[x x^T] + l I) (C^ + l I)^{-1}``     (``l = ridge * tr(C^)/n``),

and the method truncates ``A`` in the metric of ``C^`` (with the factors' own options, e.g.
the output weighting of ``fisher``) at the layer's rank: reduced-rank regression in closed
form, the idea of SVD-LLM's sequential update, for the whole factor pair. One pass: each
layer needs one forward of both networks up to it, never a backward pass. The ridge pulls
the refit back toward ``W`` where the few calibration rows say little (0.1 measured best on
MiniLM with 32 sentences; ``ridge=inf`` keeps ``W``).

Methods refit through ``Method.correct`` (``svd`` does); chains of other methods are left as
they are. With ``dense=True`` the layers the plan left dense and that run after a compressed
one (a depthwise conv between two truncated 1x1 convs, a classifier) are refitted too, by the
same ridge regression at full rank: per group, so a depthwise conv's regression has only
``kh * kw`` unknowns per channel and is well determined by a few images. It costs no parameter.

References
----------
Wang et al., "SVD-LLM: truncation-aware singular value decomposition for large language model
compression", ICLR 2025 (sequential parameter update). Izenman, "Reduced-rank regression for
the multivariate linear model", J. Multivariate Anal. 1975.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from .calibration import DEFAULT_RIDGE as DEFAULT_STATS_RIDGE, LayerStats, _Accumulator, _token_mask
from .data import describe_batch, iter_batches, split_batch
from .errors import DataError
from . import linalg
from .layers import FactorizedLayer, for_layer
from .methods import get_method
from .progress import Progress
from .views import dense_weight, hooked, layer_modules, linear_view, set_dense_weight
from .forward_check import behaviour

__all__ = ["DEFAULT_RIDGE", "correct"]

#: ridge of the refit, relative to the mean input energy (see the module docstring)
DEFAULT_RIDGE = 0.1


_PLAN_ATTR, _FOLD_ATTR = "_tensorscope_plan", "_tensorscope_fold_bn"  # as tensorscope.surgery writes them
_FOLD_PAIRS_ATTR = "_tensorscope_fold_pairs"


class _Stop(Exception):
    pass


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _padded(layer: nn.Module, built: nn.Module) -> nn.Module:
    """``built`` behind the padding ``layer``'s own forward applies, taking the layer's own
    tensors (``surgery.with_input_padding``)."""
    pad = behaviour(layer).padding_module(layer) if isinstance(layer, nn.Conv2d) else None
    if pad is not None:
        built = FactorizedLayer(pad, *built, method=built.method, rank=built.rank, source=built.source,
                                options=built.options)
    return for_layer(layer, built)  # an nn.Conv1d's chain takes and returns (N, C, L)


def _run(model: nn.Module, batch: Any, index: int) -> None:
    """The model's forward on one batch; its own error becomes a :class:`DataError` naming the batch."""
    b = split_batch(batch)
    try:
        with torch.no_grad():
            model(*b.args, **b.kwargs)
    except _Stop:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, named with the batch
        raise DataError(f"calibration batch {index} ({describe_batch(b)}) failed in the model's forward: "
                        f"{type(e).__name__}: {str(e)[:300]}") from e


def _order(model: nn.Module, names: list[str], batch: Any) -> list[str]:
    """``names`` in the order the network first calls them on ``batch``."""
    seen: list[str] = []
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.append(n) if n not in seen else None)
             for n in names]
    try:
        _run(model, batch, 0)
    finally:
        for h in hooks:
            h.remove()
    return seen + [n for n in names if n not in seen]


def _input_of(model: nn.Module, name: str, batch: Any, index: int = 0) -> torch.Tensor:
    """The input of module ``name`` on ``batch`` number ``index`` (the forward stops there)."""
    got: list[torch.Tensor] = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise _Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        _run(model, batch, index)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise DataError(f"the calibration data never reached layer {name!r}")
    return got[0]


def _dense_layers(new: nn.Module, originals: Mapping[str, nn.Module], factorized: list[str]) -> list[str]:
    """The layers of ``new`` still dense that a ridge refit can take: plain ``nn.Linear``/
    ``nn.Conv2d`` (or a ``Conv1D``'s view) of the original's shape, outside any chain, without
    a weight parametrization, whose forward is what their class says (or pads first)."""
    inside = tuple(f + "." for f in factorized)
    out = []
    for n, m in layer_modules(new).items():
        o = originals.get(n)
        if (not n or n.startswith(inside) or n in factorized or o is None
                or not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m) is not type(o)
                or m.weight.shape != o.weight.shape or hasattr(hooked(m), "parametrizations")
                or not m.weight.dtype.is_floating_point):
            continue
        if behaviour(o).kind == "refused":
            continue
        out.append(n)
    return out


def _refit_dense(new: nn.Module, name: str, layer: nn.Module, hat: torch.Tensor, cross: torch.Tensor, rows: int,
                 ridge: float) -> None:
    """``A = W (X + l I)(C^ + l I)^{-1}`` per group, written into ``new``'s layer ``name``."""
    if rows <= 0 or not math.isfinite(ridge):
        return
    a = linalg.ridge_refit(linalg.grouped_matrix(layer), hat / rows, cross / rows, ridge)
    if not torch.isfinite(a).all():
        return  # a singular moment: the layer keeps its weight
    target = linear_view(new.get_submodule(name))
    with torch.no_grad():
        set_dense_weight(target, a.reshape(dense_weight(layer).shape))


def _moments(model: nn.Module, compressed: nn.Module, name: str, layer: nn.Module, batches: list):
    """``(sum x^ x^T, sum x x^T, rows)`` per group over the calibration rows of one layer."""
    acc = _Accumulator(layer, DEFAULT_STATS_RIDGE)
    g, n = acc.groups, acc.n
    hat = torch.zeros(g, n, n, dtype=torch.float64)
    cross = torch.zeros(g, n, n, dtype=torch.float64)
    rows = 0
    for i, batch in enumerate(batches):
        x, xh = _input_of(model, name, batch, i), _input_of(compressed, name, batch, i)
        mask = _token_mask(split_batch(batch).kwargs)  # padding positions stay out, as in collect_stats
        for r, rh in zip(acc.rows(x, mask), acc.rows(xh, mask)):
            r = r.to(torch.float64).reshape(-1, g, n).transpose(0, 1)
            rh = rh.to(torch.float64).reshape(-1, g, n).transpose(0, 1)
            hat += rh.transpose(1, 2) @ rh
            cross += r.transpose(1, 2) @ rh
            rows += r.shape[1]
    return hat, cross, rows


def correct(
    compressed: nn.Module,
    model: nn.Module,
    data: Any,
    *,
    stats: Mapping[str, Any] | None = None,
    ridge: float = DEFAULT_RIDGE,
    dense: bool = False,
    max_batches: int | None = None,
    progress: Any = False,
) -> nn.Module:
    """A copy of ``compressed`` whose factorized layers are refitted, in network order, to the
    inputs the compressed network gives them (see the module docstring).

    ``model`` is the original network ``compressed`` was made from (``compress(model, plan)``),
    ``data`` calibration batches, ``stats`` the statistics the factors were fitted with (their
    output-gradient moments weigh the refit of ``fisher`` factors). ``dense``: also refit the
    layers left dense that run after the first compressed layer (``nn.Linear``, ``nn.Conv2d``
    including depthwise and grouped convs, a ``Conv1D``), weights only, at their own shape.
    Neither model is modified.
    """
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"ridge must be a non-negative number; got {ridge!r}")
    batches = list(iter_batches(data, max_batches=max_batches))
    if not batches:
        raise DataError("correct needs at least one batch of calibration data")
    new = copy.deepcopy(compressed).eval()
    was = model.training
    model.eval()
    originals = layer_modules(model)  # a GPT-2 Conv1D as its Linear view, an nn.Conv1d as its Conv2d view
    names = [n for n, m in new.named_modules() if isinstance(m, FactorizedLayer) and n in originals]
    plain = _dense_layers(new, originals, names) if dense else []
    plan = getattr(compressed, _PLAN_ATTR, None)
    try:
        order = _order(new, names + plain, batches[0])
        first = next((i for i, n in enumerate(order) if n in names), len(order))
        order = [n for i, n in enumerate(order) if n in names or i > first]  # before it, inputs are unchanged
        with Progress(progress, total=len(order), desc="sequential correction") as bar:
            for name in order:
                bar.set_message(name)
                layer = originals[name]
                if name not in names:
                    _refit_dense(new, name, layer, *_moments(model, new, name, layer, batches), ridge)
                    bar.update(1)
                    continue
                chain = new.get_submodule(name)
                method = get_method(chain.method)
                hat, cross, rows = _moments(model, new, name, layer, batches)
                st = stats.get(name) if stats is not None else None
                kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
                fit = LayerStats(kind, hat, rows, tuple(getattr(layer, "kernel_size", (1, 1))),
                                 grad=None if st is None else st.grad, grad_count=0 if st is None else st.grad_count)
                entry = plan.layers.get(name) if plan is not None else None
                options = dict(entry.options) if entry is not None else dict(getattr(chain, "options", {}) or {})
                fixed = method.correct(layer, chain, fit, cross, options=options, ridge=ridge)
                if fixed is not None:
                    fixed = _padded(layer, fixed)
                    fixed.train(chain.training)
                    _set(new, name, fixed)
                bar.update(1)
    finally:
        model.train(was)
    for attr in (_PLAN_ATTR, _FOLD_ATTR, _FOLD_PAIRS_ATTR):
        if hasattr(compressed, attr):
            object.__setattr__(new, attr, getattr(compressed, attr))
    return new
