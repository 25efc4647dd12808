"""Layers that are a Linear or a Conv2d in all but storage, seen as one: transformers'
``Conv1D`` and torch's ``nn.Conv1d``.

GPT-2-style models (``transformers.pytorch_utils.Conv1D``) compute ``y = x @ W + b`` with
``W`` stored ``in x out``: an ``nn.Linear`` whose weight is ``W^T``. Rather than teach every
method, planner and preview a second weight layout, tensorscope looks at such a layer
through a :class:`Conv1DView`: an ``nn.Linear`` whose weight is the transposed *view* of the
layer's weight (same memory, nothing copied) and whose bias is the layer's own parameter.
Everything that reads layers (``inspect``, spectra, plans, ``compress``, statistics) reads
the view; what runs the model and hooks into it uses the layer itself (:func:`hooked`);
weights written back for previews go through :func:`set_dense_weight`.

A torch ``nn.Conv1d`` (weight ``out x in/g x k``) is a ``nn.Conv2d`` of kernel ``(1, k)``,
stride ``(1, s)``, padding ``(0, p)``, dilation ``(1, d)`` (same groups, bias and padding
mode) on its input seen as ``(N, C, 1, L)``: its :class:`Conv1dView` is that Conv2d, with
the layer's weight unsqueezed (a view) as weight. Methods, calibration and spectra see a
Conv2d; the chain built from it takes and returns the layer's ``(N, C, L)`` tensors
(:class:`tensorscope.layers.FactorizedLayer` ``conv1d``), and what reads the layer's own
inputs puts them in the view's layout with :func:`view_input`.

Weights on disk (:mod:`tensorscope.sources`) know the same layers by these helpers too: a
skeleton has an ``nn.Linear`` in their place and reads their weight transposed.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["Conv1DView", "Conv1dView", "is_conv1d", "is_torch_conv1d", "linear_view", "layer_modules", "hooked",
           "dense_weight", "set_dense_weight", "as_linear", "view_input", "view_shape", "shown_shape",
           "check_conv1d_input"]


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


def is_torch_conv1d(module: nn.Module) -> bool:
    """A torch ``nn.Conv1d`` (or subclass) with its 3-D weight initialised."""
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.Conv1d) and isinstance(w, torch.Tensor)
            and not isinstance(w, nn.parameter.UninitializedParameter) and w.dim() == 3)


def _geometry_2d(layer: nn.Conv1d) -> dict:
    """The Conv2d arguments of a Conv1d: a height of 1 (kernel 1, stride 1, no padding, dilation 1)."""
    pad = layer.padding if isinstance(layer.padding, str) else (0, layer.padding[0])
    return dict(kernel_size=(1, layer.kernel_size[0]), stride=(1, layer.stride[0]), padding=pad,
                dilation=(1, layer.dilation[0]), groups=layer.groups, padding_mode=layer.padding_mode)


class Conv1dView(nn.Conv2d):
    """An ``nn.Conv2d`` over an ``nn.Conv1d``'s parameters: kernel ``(1, k)``, weight
    ``layer.weight.unsqueeze(2)`` (a view), the same bias, on the input seen as ``(N, C, 1, L)``.
    It is never run in the model; ``source`` is the layer it shows."""

    kind_name = "Conv1d"

    def __init__(self, layer: nn.Conv1d):
        w = layer.weight
        super().__init__(layer.in_channels, layer.out_channels, bias=False, device="meta", dtype=w.dtype,
                         **_geometry_2d(layer))
        self.weight = nn.Parameter(w.detach().unsqueeze(2), requires_grad=False)
        self.bias = layer.bias
        self.train(layer.training)
        object.__setattr__(self, "source", layer)
        object.__setattr__(self, "_made_from", _geometry_2d(layer))

    def current(self) -> bool:
        """Still a view of its layer's parameters and geometry (not replaced since)."""
        w, src = self.weight, self.source
        return (src.weight.data_ptr() == w.data_ptr() and tuple(src.weight.shape) == (*w.shape[:2], w.shape[3])
                and self.bias is src.bias and src.weight.dtype == w.dtype and _geometry_2d(src) == self._made_from)


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def linear_view(module: nn.Module) -> nn.Module:
    """``module`` as the layer tensorscope decomposes: its :class:`Conv1DView` for a ``Conv1D``,
    its :class:`Conv1dView` for an ``nn.Conv1d`` (one per layer while its parameters stay the
    same), ``module`` itself otherwise."""
    if is_conv1d(module):
        make = Conv1DView
    elif is_torch_conv1d(module):
        make = Conv1dView
    else:
        return module
    view = _VIEWS.get(module)
    if view is None or not isinstance(view, make) or not view.current():
        view = _VIEWS[module] = make(module)
    view.train(module.training)
    return view


def layer_modules(model: nn.Module, remove_duplicate: bool = True) -> dict[str, nn.Module]:
    """``dict(model.named_modules())`` with every ``Conv1D`` replaced by its view."""
    return {n: linear_view(m) for n, m in model.named_modules(remove_duplicate=remove_duplicate)}


def hooked(module: nn.Module) -> nn.Module:
    """The module that runs in the model for ``module`` (a view's layer): where hooks go."""
    return module.source if isinstance(module, (Conv1DView, Conv1dView)) else module


def view_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A tensor that ran through the layer itself (its input, or its output's gradient) in
    the layout of ``module``, the layer tensorscope sees: ``(N, C, L)`` becomes ``(N, C, 1, L)``
    for a :class:`Conv1dView`; unchanged otherwise."""
    return x.unsqueeze(-2) if isinstance(module, Conv1dView) else x


def check_conv1d_input(view: Conv1dView, x: torch.Tensor) -> None:
    """RuntimeError unless ``x`` is an input the view's ``nn.Conv1d`` takes: the channel check
    of a Conv2d's statistics (``calibration._patches``) in the Conv1d's own terms (torch's
    own error for an ``(N, L)`` input speaks of an unbatched ``(1, N, L)``)."""
    c = view.in_channels
    if x.dim() not in (2, 3) or x.shape[-2] != c:
        raise RuntimeError(f"a Conv1d with {c} input channels got an input of shape {tuple(x.shape)} "
                           f"(wanted (N, {c}, L))")


def view_shape(module: nn.Module, shape: tuple) -> tuple:
    """The shape :func:`view_input` gives a tensor of ``shape``."""
    shape = tuple(shape)
    return (*shape[:-1], 1, shape[-1]) if isinstance(module, Conv1dView) and shape else shape


def shown_shape(module: nn.Module) -> tuple[int, ...]:
    """The weight shape users know the layer by: an ``nn.Conv1d``'s own ``out x in/g x k``
    (not its view's), a ``Conv1D``'s Linear ``out x in``."""
    return tuple(hooked(module).weight.shape if isinstance(module, Conv1dView) else module.weight.shape)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear``/``nn.Conv2d`` layout (``out x in ...``; an ``nn.Conv1d``'s
    with a kernel height of 1)."""
    if is_conv1d(module):
        return module.weight.t()
    return module.weight.unsqueeze(2) if is_torch_conv1d(module) else module.weight


def set_dense_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Give ``module`` the weight ``w`` given in ``nn.Linear``/``nn.Conv2d`` layout (transposed
    for a ``Conv1D``, the kernel height of 1 dropped for an ``nn.Conv1d``)."""
    module = hooked(module)
    w = w.to(module.weight.dtype)
    if is_conv1d(module):
        w = w.t().contiguous()
    elif is_torch_conv1d(module) and w.dim() == 4:
        w = w.squeeze(2)
    module.weight.data = w


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
