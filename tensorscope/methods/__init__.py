"""Decomposition methods, one module each, registered by name.

``get_method("tucker2")`` returns the method object; ``available_methods()`` lists them,
plugins included. Writing a method: subclass :class:`Method` in one module and decorate it
with :func:`register_method` (or announce it with an entry point in the group
``tensorscope.methods``); see the README's "Adding a method".
"""

from .base import (
    BreakEvenWarning,
    Factors,
    LayerGeometry,
    Method,
    Option,
    RankAxis,
    Tradeoff,
)
from .registry import (
    ENTRY_POINT_GROUP,
    PluginWarning,
    available_methods,
    get_method,
    methods_for,
    planner_methods,
    register_method,
)

# importing a method module registers it; this order is the registry's (svd first)
from . import svd, tucker2, cp, tt, tr, rcp, rtucker  # noqa: E402,F401,I001
from .group import GroupMethod, available_group_methods, get_group_method, register_group_method  # noqa: E402
from . import joint_tucker  # noqa: E402,F401

__all__ = [
    "BreakEvenWarning",
    "ENTRY_POINT_GROUP",
    "Factors",
    "GroupMethod",
    "LayerGeometry",
    "Method",
    "Option",
    "PluginWarning",
    "RankAxis",
    "Tradeoff",
    "available_group_methods",
    "available_methods",
    "get_group_method",
    "get_method",
    "methods_for",
    "planner_methods",
    "register_group_method",
    "register_method",
]
