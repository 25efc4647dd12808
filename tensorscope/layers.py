"""Modules that compressed models are made of.

A decomposed layer becomes a :class:`FactorizedLayer`: an ``nn.Sequential`` of ordinary
torch layers (or one small TT module) that also remembers which method and rank made it.
Being a plain ``Sequential`` keeps exports free of tensorscope: TorchScript and
``torch.export`` see only standard layers.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class FactorizedLayer(nn.Sequential):
    """The chain that replaces one decomposed layer; ``method`` and ``rank`` say how it was made."""

    def __init__(self, *modules: nn.Module, method: str, rank: Any, source: str, options: dict | None = None):
        super().__init__(*modules)
        self.method = method
        self.rank = rank
        self.source = source  # the replaced layer's type name, e.g. "Conv2d"
        self.options = dict(options or {})

    def reset_parameters(self) -> None:
        """A fresh random initialisation: each module of the chain draws its own
        (``reset_parameters`` of ``nn.Linear``/``nn.Conv2d``, or of a tensorized layer)."""
        for module in self:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def extra_repr(self) -> str:
        return f"method={self.method!r}, rank={self.rank!r}, source={self.source!r}"
