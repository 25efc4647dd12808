"""Decomposition methods, one module each, registered by name.

``get_method("tucker2")`` returns the method object; ``available_methods()`` lists them.
"""

from .base import (
    BreakEvenWarning,
    Factors,
    LayerGeometry,
    Method,
    available_methods,
    get_method,
    methods_for,
    register_method,
)

# importing a method module registers it
from . import cp, svd, tt, tucker2  # noqa: E402,F401

__all__ = [
    "BreakEvenWarning",
    "Factors",
    "LayerGeometry",
    "Method",
    "available_methods",
    "get_method",
    "methods_for",
    "register_method",
]
