"""Layers that are a Linear in all but storage, seen as one: transformers' ``Conv1D``.

GPT-2-style models (``transformers.pytorch_utils.Conv1D``) compute ``y = x @ W + b`` with
``W`` stored ``in x out``: an ``nn.Linear`` whose weight is ``W^T``. Rather than teach every
method, planner and preview a second weight layout, tensorscope looks at such a layer
through a :class:`Conv1DView`: an ``nn.Linear`` whose weight is the transposed *view* of the
layer's weight (same memory, nothing copied) and whose bias is the layer's own parameter.
Everything that reads layers (``inspect``, spectra, plans, ``compress``, statistics) reads
the view; what runs the model and hooks into it uses the layer itself (:func:`hooked`);
weights written back for previews go through :func:`set_dense_weight`.

Weights on disk (:mod:`tensorscope.sources`) know the same layers by these helpers too: a
skeleton has an ``nn.Linear`` in their place and reads their weight transposed.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["Conv1DView", "is_conv1d", "linear_view", "layer_modules", "hooked", "dense_weight", "set_dense_weight",
           "as_linear"]


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (by class name, so transformers need not be imported) with a 2-D weight."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


class Conv1DView(nn.Linear):
    """An ``nn.Linear`` over a ``Conv1D``'s parameters: weight ``layer.weight.T`` (a view), the
    same bias. It is never run in the model; ``source`` is the layer it shows."""

    kind_name = "Conv1D"

    def __init__(self, layer: nn.Module):
        w = layer.weight
        super().__init__(w.shape[0], w.shape[1], bias=False, device="meta", dtype=w.dtype)
        self.weight = nn.Parameter(w.detach().t(), requires_grad=False)
        self.bias = getattr(layer, "bias", None)
        self.train(layer.training)
        object.__setattr__(self, "source", layer)

    def current(self) -> bool:
        """Still a view of its layer's parameters (not replaced since)."""
        w, src = self.weight, self.source
        return (src.weight.data_ptr() == w.data_ptr() and tuple(src.weight.shape) == tuple(w.shape)[::-1]
                and self.bias is getattr(src, "bias", None) and src.weight.dtype == w.dtype)


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, Conv1DView]" = weakref.WeakKeyDictionary()


def linear_view(module: nn.Module) -> nn.Module:
    """``module`` as the layer tensorscope decomposes: its :class:`Conv1DView` for a ``Conv1D``
    (one per layer while its parameters stay the same), ``module`` itself otherwise."""
    if not is_conv1d(module):
        return module
    view = _VIEWS.get(module)
    if view is None or not view.current():
        view = _VIEWS[module] = Conv1DView(module)
    view.train(module.training)
    return view


def layer_modules(model: nn.Module, remove_duplicate: bool = True) -> dict[str, nn.Module]:
    """``dict(model.named_modules())`` with every ``Conv1D`` replaced by its view."""
    return {n: linear_view(m) for n, m in model.named_modules(remove_duplicate=remove_duplicate)}


def hooked(module: nn.Module) -> nn.Module:
    """The module that runs in the model for ``module`` (a view's layer): where hooks go."""
    return module.source if isinstance(module, Conv1DView) else module


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear``/``nn.Conv2d`` layout (``out x in ...``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_dense_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Give ``module`` the weight ``w`` given in ``nn.Linear`` layout (transposed for a ``Conv1D``)."""
    module = hooked(module)
    w = w.to(module.weight.dtype)
    module.weight.data = w.t().contiguous() if is_conv1d(module) else w


def as_linear(layer: nn.Module, device: torch.device | str | None = None) -> nn.Linear:
    """A standalone ``nn.Linear`` computing what a ``Conv1D`` computes (weights copied, or
    shapes only on the meta device)."""
    nx, nf = layer.weight.shape
    lin = nn.Linear(nx, nf, bias=getattr(layer, "bias", None) is not None, dtype=layer.weight.dtype,
                    device=device if device is not None else layer.weight.device)
    if lin.weight.device.type != "meta":
        with torch.no_grad():
            lin.weight.copy_(layer.weight.t())
            if lin.bias is not None:
                lin.bias.copy_(layer.bias)
    return lin
