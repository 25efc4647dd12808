"""Modules that compressed models are made of.

A decomposed layer becomes a :class:`FactorizedLayer`: an ``nn.Sequential`` of ordinary
torch layers (or one small TT module) that also remembers which method and rank made it.
Being a plain ``Sequential`` keeps exports free of tensorscope: TorchScript and
``torch.export`` see only standard layers.

How a chain runs is its ``execution``: ``"chain"`` (every module in turn, the default) or
another form a method's subclass offers (e.g. Tucker-2 folding a 1x1 step into its core
conv, or the dense kernel rebuilt from the factors on each call). Every form computes the
same function from the same parameters; only the order of the arithmetic differs. The plan
entry's ``execute`` option records the choice, so ``compress``, ``save``/``load`` and
exports agree (:func:`tensorscope.tune_execution` measures and sets it).

A chain that replaces an ``nn.Conv1d`` is built from the layer's Conv2d view
(:class:`tensorscope.views.Conv1dView`: kernel ``(1, k)``) and has ``conv1d`` set: it takes
and returns the layer's ``(N, C, L)`` tensors and runs its modules on ``(N, C, 1, L)``
(:meth:`FactorizedLayer.forward_view`). Plain torch ops: exports stay free of tensorscope.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import PlanError

#: how every chain can run: its modules one after the other
CHAIN = "chain"
#: the plan-entry option that records a chain's execution form
EXECUTE = "execute"


class FactorizedLayer(nn.Sequential):
    """The chain that replaces one decomposed layer; ``method`` and ``rank`` say how it was made."""

    #: the execution forms this class implements (subclasses add their own, see ``run``)
    executions: tuple[str, ...] = (CHAIN,)
    #: the form it runs in (a class default, so chains pickled before forms existed run as before)
    execution: str = CHAIN
    #: it replaces an ``nn.Conv1d``: inputs and outputs are ``(N, C, L)``, the modules run on ``(N, C, 1, L)``
    conv1d: bool = False

    def __init__(self, *modules: nn.Module, method: str, rank: Any, source: str, options: dict | None = None):
        super().__init__(*modules)
        self.method = method
        self.rank = rank
        self.source = source  # the replaced layer's type name, e.g. "Conv2d"
        self.options = dict(options or {})
        self.execution = CHAIN

    def available_executions(self) -> tuple[str, ...]:
        """The forms this chain can run in (a subclass may offer fewer for some geometries)."""
        return (CHAIN,)

    def set_execution(self, mode: str | None) -> "FactorizedLayer":
        """Run as ``mode`` from now on (None: ``"chain"``); PlanError for a form this chain lacks."""
        mode = CHAIN if mode is None else mode
        if mode not in self.available_executions():
            forms = ", ".join(map(repr, self.available_executions()))
            raise PlanError(f"a {self.method} chain of this layer runs as {forms}; got execute={mode!r}")
        self.execution = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1d:
            if x.dim() == 2:  # unbatched (C, L), as nn.Conv1d takes it: a batch of one
                return self.forward_view(x[None, :, None])[0, :, 0]
            return self.forward_view(x.unsqueeze(-2)).squeeze(-2)
        return self.forward_view(x)

    def forward_view(self, x: torch.Tensor) -> torch.Tensor:
        """The chain on the layout of the layer it was built from (a Conv1d's input with a
        height of 1, ``(N, C, 1, L)``; everyone else's input as it comes)."""
        if self.execution == CHAIN:
            return super().forward(x)
        return self.run(x, self.execution)

    def run(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Compute the chain's output in form ``mode`` (subclasses implement their forms)."""
        if mode == CHAIN:
            return super().forward(x)
        raise PlanError(f"{type(self).__name__} has no execution form {mode!r}")

    def leading(self, n: int) -> tuple[list[nn.Module], list[nn.Module]]:
        """The modules in front of the last ``n`` (e.g. the padding of a TensorFlow-style port) and those ``n``."""
        mods = list(self)
        return mods[:-n], mods[-n:]

    def reset_parameters(self) -> None:
        """A fresh random initialisation: each module of the chain draws its own
        (``reset_parameters`` of ``nn.Linear``/``nn.Conv2d``, or of a tensorized layer)."""
        for module in self:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def extra_repr(self) -> str:
        text = f"method={self.method!r}, rank={self.rank!r}, source={self.source!r}"
        if self.conv1d:
            text += ", conv1d=True"
        return text if self.execution == CHAIN else f"{text}, execution={self.execution!r}"


#: what a chain that replaces an ``nn.Conv1d`` keeps of it, for a parent's forward that reads them
#: (Whisper's encoder reads ``conv1.stride[0]``)
CONV1D_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode")


def for_layer(layer: nn.Module, built: nn.Module) -> nn.Module:
    """``built`` taking the tensors ``layer`` takes in the model: for the view of an
    ``nn.Conv1d`` (:class:`tensorscope.views.Conv1dView`) a chain with ``conv1d`` set and the
    layer's :data:`CONV1D_ATTRIBUTES` (a module that is no chain is put in one); ``built``
    itself otherwise."""
    from .views import Conv1dView

    if not isinstance(layer, Conv1dView):
        return built
    if not isinstance(built, FactorizedLayer):
        built = FactorizedLayer(built, method=str(getattr(built, "method", "")), rank=getattr(built, "rank", None),
                                source="Conv1d")
    built.conv1d = True
    built.source = "Conv1d"
    for name in CONV1D_ATTRIBUTES:
        setattr(built, name, getattr(layer.source, name))
    return built
