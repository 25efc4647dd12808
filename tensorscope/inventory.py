"""Which layers of a model can be decomposed, what they cost, and how far each can go.

``inspect(model, example_input)`` lists the decomposable layers (names from
``model.named_modules()``) with their shape, parameters, FLOPs per sample and the maximal
rank of every method that applies; the layers it leaves alone are in ``.skipped``, each
with the reason. FLOPs need an example input (hooks record each layer's input size) and
follow ``FlopCounterMode``: a multiply-add is 2 FLOPs, per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torch.utils.flop_counter import FlopCounterMode

from .data import describe_batch, split_batch
from .errors import DataError
from .forward_check import behaviour
from .layers import FactorizedLayer
from .methods import LayerGeometry, get_method, methods_for
from .sources import ON_DISK, open_source
from .units import format_count, text_table
from .views import (Conv1dView, Conv1DView, check_conv1d_input, hooked, layer_modules, linear_view, shown_shape,
                    view_shape)

# Parents whose forward reads a child's ``.weight`` directly: replacing that child by a chain
# would break them (nn.MultiheadAttention calls F.multi_head_attention_forward with
# out_proj.weight; nn.Transformer*Layer's fast path reads linear1.weight etc.).
_WEIGHT_READING_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class LayerInfo:
    """One layer as ``inspect`` sees it."""

    name: str
    kind: str  # the module's class name, e.g. "Conv2d"
    weight_shape: tuple[int, ...]
    params: int
    flops: int | None  # per sample; None without an example input
    max_rank: dict[str, Any] = field(default_factory=dict)  # method -> rank at which it is exact
    reason: str | None = None  # why it is left alone (None: decomposable)
    geometry: LayerGeometry | None = None
    note: str | None = None  # e.g. which methods cannot make a depthwise conv smaller

    @property
    def methods(self) -> list[str]:
        return list(self.max_rank)

    @property
    def decomposable(self) -> bool:
        return self.reason is None


class LayerList(list):
    """A list of decomposable :class:`LayerInfo`; ``.skipped`` holds the others with reasons."""

    skipped: list[LayerInfo]

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)

    def by_name(self) -> dict[str, LayerInfo]:
        return {l.name: l for l in self}

    def __str__(self) -> str:
        """A table: what ``print(ts.inspect(model, x))`` shows."""
        rows = [[i.name, i.kind, "x".join(map(str, i.weight_shape)), format_count(i.params),
                 format_count(i.flops, "FLOPs"),
                 ", ".join(f"{m} {get_method(m).rank_text(r)}" for m, r in i.max_rank.items())]
                for i in self]
        text = text_table(rows, ["layer", "type", "weight", "params", "FLOPs", "max rank per method"], "llrrrl")
        for i in self:
            if i.note:
                text += f"\nnote: {i.name} ({i.kind}): {i.note}"
        for i in self.skipped:
            text += f"\nleft alone: {i.name} ({i.kind}): {i.reason}"
        return text


class ModelIndex:
    """Names, parents and parameter owners of a model, computed once (nothing quadratic)."""

    def __init__(self, model: nn.Module):
        self.model = model
        real = dict(model.named_modules(remove_duplicate=False))
        self.modules = {n: linear_view(m) for n, m in real.items()}  # Conv1D, nn.Conv1d: their views
        self.owners: dict[int, list[str]] = {}
        for name, mod in real.items():
            for p in mod.parameters(recurse=False):
                self.owners.setdefault(id(p), []).append(name)

    def parent(self, name: str) -> nn.Module | None:
        if not name:
            return None
        return self.modules.get(name.rpartition(".")[0])

    def reason(self, name: str) -> str | None:
        """Why layer ``name`` is left alone, or None when it can be decomposed."""
        module = self.modules[name]
        if not isinstance(module, (nn.Linear, nn.Conv2d)):  # an nn.Conv1d is seen as a Conv2d (its view)
            return _type_reason(module)
        w = module.weight
        if isinstance(w, nn.parameter.UninitializedParameter):
            return "its weight is not initialised yet (lazy module): run one forward pass first"
        if w.numel() == 0:
            return "its weight is empty"
        parent = self.parent(name)
        if isinstance(parent, FactorizedLayer):
            return "it is already part of a factorized layer"
        if isinstance(parent, _WEIGHT_READING_PARENTS):
            return (f"its parent {type(parent).__name__} reads its .weight directly, so it cannot be replaced "
                    "by a chain of layers")
        if parent is not None and hasattr(parent, "parametrizations"):
            return "it is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
        real = hooked(module)  # a view (Conv1D, nn.Conv1d): the layer itself
        if hasattr(real, "parametrizations"):
            return "its weight is parametrized (weight/spectral norm); remove the parametrization first"
        shared = [n for n in self.owners.get(id(hooked(module).weight), []) if n != name]
        if shared:
            return (f"its weight is tied to {', '.join(map(repr, shared))}; decomposing it would untie the "
                    "weights and add parameters")
        if isinstance(module, Conv1DView):  # transformers' Conv1D computes x @ W + b: only hooks change that
            hooks = len(real._forward_hooks) + len(real._forward_pre_hooks)
            if not hooks:
                return None
            return (f"it has {hooks} forward hook(s) registered, which change what it computes and which a "
                    "factorized chain would not run; remove them (handle.remove()) before compressing")
        return behaviour(module).reason  # a forward that does more than its class says (an nn.Conv1d's: its own)


def _no_smaller_reason(geom: LayerGeometry, ranks: dict) -> str | None:
    """Why no method can make this grouped conv smaller (a depthwise conv: one small filter per
    channel), or None. Checked at every method's lowest rank; a plan may still name the layer
    (it is then built as asked, with a BreakEvenWarning). Ungrouped layers stay listed even
    when tiny: their spectra are still worth seeing."""
    if not ranks or geom.groups == 1:
        return None
    lowest = {}
    for m in ranks:
        method = get_method(m)
        axes = method.rank_axes(geom)
        lowest[m] = method.count_params(geom, method.rank_from_axes(geom, [a.low for a in axes]))
    if min(lowest.values()) < geom.dense_params:
        return None
    what = " (a depthwise conv: one filter per channel)" if geom.groups > 1 and geom.groups == geom.in_features else ""
    detail = ", ".join(f"{m} {p:,}" for m, p in lowest.items())
    return (f"no method makes it smaller{what}: at the lowest rank {detail} parameters, against "
            f"{geom.dense_params:,} dense; it is left as is")


def _grouped_note(geom: LayerGeometry, ranks: dict) -> str | None:
    """For a grouped conv some methods cannot shrink: which can, and by how much at their lowest rank."""
    if geom.groups == 1 or not ranks:
        return None
    lowest = {}
    for m in ranks:
        method = get_method(m)
        lowest[m] = method.count_params(geom, method.rank_from_axes(geom, [a.low for a in method.rank_axes(geom)]))
    cannot = [m for m, p in lowest.items() if p >= geom.dense_params]
    if not cannot:
        return None
    can = ", ".join(f"{m} ({lowest[m]:,} params at its lowest rank)" for m in lowest if m not in cannot)
    what = "a depthwise conv" if geom.groups == geom.in_features else f"a conv in {geom.groups} groups"
    return (f"{what} ({geom.dense_params:,} params): only {can} makes it smaller; {', '.join(cannot)} "
            "cannot at any rank, so a planner limited to them leaves it dense")


def _type_reason(module: nn.Module) -> str:
    cls = type(module).__name__
    if cls == "Conv1D":  # transformers' GPT-2 style layer with a weight that is not a matrix
        return "a Conv1D whose weight is not an in x out matrix; it is left as is"
    if isinstance(module, nn.Conv1d):  # one that is not seen through its view: a lazy one
        return "its weight is not initialised yet (lazy module): run one forward pass first"
    if isinstance(module, nn.Conv3d):
        return f"{cls} is not supported yet: tensorscope decomposes nn.Linear, nn.Conv1d and nn.Conv2d"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{cls} (transposed convolution) is not supported yet"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "an embedding is a lookup table, not a product; it is left as is"
    return f"{cls} is not a layer tensorscope decomposes (nn.Linear, nn.Conv1d, nn.Conv2d)"


def _kind(module: nn.Module) -> str:
    """The layer's class name as users know it (``Conv1D``, ``Conv1d`` for their views)."""
    return getattr(module, "kind_name", type(module).__name__)


def _has_matrix_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    if isinstance(w, nn.parameter.UninitializedParameter):  # a lazy layer: listed with the reason
        return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
    return isinstance(w, torch.Tensor) and w.dim() >= 2


def record_input_sizes(model: nn.Module, example_input: Any, names: list[str]) -> tuple[dict[str, tuple], int]:
    """Run one forward pass and record each named layer's input shape; returns (shapes, batch)."""
    views = layer_modules(model)
    modules = {n: hooked(m) for n, m in views.items()}
    shapes: dict[str, tuple] = {}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            if args and isinstance(args[0], torch.Tensor) and n not in shapes:
                if isinstance(views[n], Conv1dView):
                    check_conv1d_input(views[n], args[0])
                shapes[n] = tuple(args[0].shape)
        hooks.append(modules[n].register_forward_pre_hook(hook))
    batch = split_batch(example_input)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*batch.args, **batch.kwargs)
    except Exception as e:  # noqa: BLE001 - the model's own error, named with the input
        raise DataError(f"the example input ({describe_batch(batch)}) failed in the model's forward: "
                        f"{type(e).__name__}: {str(e)[:300]}. Give inputs the model accepts (the first batch "
                        "of data= is used as the example)") from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes, max(batch.size, 1)


def geometry_from_shape(module: nn.Module, shape: tuple | None, batch: int) -> LayerGeometry:
    if shape is None:
        return LayerGeometry.of(module)
    if isinstance(module, nn.Conv2d):
        size = tuple(view_shape(module, shape)[-2:])  # an nn.Conv1d's (N, C, L): a height of 1
        pad = behaviour(module).padding_module(module)  # a port that pads in forward convolves the padded input
        return LayerGeometry.of(module, in_size=pad.padded_size(size) if pad is not None else size, batch=batch)
    numel = 1
    for s in shape[:-1]:
        numel *= s
    return LayerGeometry.of(module, tokens=max(1, numel // batch), batch=batch)


def inspect(model: nn.Module, example_input: Any = None, *, include_skipped: bool = False) -> LayerList:
    """List the layers of ``model`` that can be decomposed, with cost and maximal ranks.

    Parameters
    ----------
    model : nn.Module, or a path
        A path is weights on disk (a ``.safetensors`` file or a folder of shards with its
        index, :mod:`tensorscope.sources`): only the headers are read. Its 1-D weights
        (norms) are listed in ``.skipped`` too.
    example_input : optional
        A batch in the data convention (tensor, dict of tensors, or ``(inputs, targets)``).
        Needed for FLOPs, which are reported per sample.
    include_skipped : bool
        Also put the layers that are left alone (with their ``reason``) in the list itself;
        they are always available in ``result.skipped``.
    """
    source = None
    if isinstance(model, ON_DISK):  # weights on disk: their architecture on the meta device
        if example_input is not None:
            raise TypeError("FLOPs need the model in memory: inspect a path without example_input")
        source = open_source(model)
        model = source.skeleton()
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect expects an nn.Module (or a path to safetensors weights); got {type(model).__name__}")
    index = ModelIndex(model)
    candidates = [n for n, m in index.modules.items() if n and _has_matrix_weight(m)]
    seen_ids: set[int] = set()
    unique = []
    for n in candidates:  # a module registered under two names is listed once
        if id(index.modules[n]) not in seen_ids:
            seen_ids.add(id(index.modules[n]))
            unique.append(n)
    reasons = {n: index.reason(n) for n in unique}
    shapes: dict[str, tuple] = {}
    batch = 1
    if example_input is not None:
        shapes, batch = record_input_sizes(model, example_input, [n for n in unique if reasons[n] is None])
    good, skipped = [], []
    for n in unique:
        mod = index.modules[n]
        if isinstance(mod.weight, nn.parameter.UninitializedParameter):  # lazy: no shape yet
            skipped.append(LayerInfo(n, _kind(mod), (), 0, None, {}, reasons[n]))
            continue
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        if reasons[n] is not None:
            skipped.append(LayerInfo(n, _kind(mod), shown_shape(mod), params, None, {}, reasons[n]))
            continue
        geom = geometry_from_shape(mod, shapes.get(n), batch)
        ranks = {m: get_method(m).max_rank(geom) for m in methods_for(geom)}
        why = _no_smaller_reason(geom, ranks)
        if why is not None:
            skipped.append(LayerInfo(n, _kind(mod), shown_shape(mod), params, None, {}, why))
            continue
        flops = geom.dense_flops if n in shapes else None
        good.append(LayerInfo(n, _kind(mod), shown_shape(mod), params, flops, ranks, None, geom,
                              _grouped_note(geom, ranks)))
    if source is not None:
        skipped += [LayerInfo(n, kind, shape, params, None, {}, "a 1-D weight (a norm's scale): nothing to decompose")
                    for n, kind, shape, params in source.vectors()]
    if include_skipped:
        return LayerList(good + skipped, skipped)
    return LayerList(good, skipped)


def undecomposable_reason(model: nn.Module, name: str, module: nn.Module | None = None) -> str | None:
    """Why ``name`` cannot be decomposed (one-off check; ``ModelIndex`` for many layers)."""
    return ModelIndex(model).reason(name)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs per sample of one forward pass, as ``FlopCounterMode`` counts them."""
    batch = split_batch(example_input)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(*batch.args, **batch.kwargs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // max(batch.size, 1)
