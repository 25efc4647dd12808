"""The group-method contract: one decomposition shared by several same-shaped layers.

A plan's ``"groups"`` entry names layers whose kernels are decomposed *together* (T-Net,
Kossaifi et al. 2019: one low-rank tensor over the stacked kernels). A :class:`GroupMethod`
is asked what a :class:`~tensorscope.methods.Method` is asked, for a list of members:

- identity: ``name``, ``kinds``, ``description``; options: ``option_specs``/``check_options``;
- ranks: ``rank_axes``, ``max_rank``, ``resolve_rank``, ``rank_text``/``rank_to_json``;
- what a member may be: ``unsupported_reason`` (per member) and ``mismatch`` (a member
  against the first one);
- cost from geometry alone, of the whole group counted once: ``count_params_group``,
  ``count_flops_group``; a cheap error curve ``tradeoff_group`` for the budget planner;
- work: ``factorize_group``, ``build_group`` (one module per member, sharing what the group
  shares), ``empty_factors_group`` and ``skeleton_group`` (for loading),
  ``reconstruct_group`` (the members' dense kernels, for live previews).

Group methods have their own registry (:func:`register_group_method`, :func:`get_group_method`):
a plan's ``"layers"`` entry never names one, and a group never names a per-layer method.
"""

from __future__ import annotations

import abc
import threading
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..errors import PlanError, PluginError
from .base import Factors, LayerGeometry, Option, RankAxis, Tradeoff

__all__ = ["DEFAULT_GROUP_METHOD", "GroupMethod", "available_group_methods", "get_group_method",
           "register_group_method"]


class GroupMethod(abc.ABC):
    """One joint decomposition of several layers. Stateless; the registry holds one instance."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    option_specs: ClassVar[Mapping[str, Option]] = {}
    rank_separator: ClassVar[str] = "×"
    #: the smallest number of members (a group of one is a per-layer method's job)
    min_members: ClassVar[int] = 2
    #: ``tradeoff_group`` gives a cheap error curve (the budget planner can price the group)
    error_curve: ClassVar[bool] = False

    # ---- what can be grouped ---------------------------------------------------------
    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        """Why a layer of this geometry cannot be a member (None when it can)."""
        if geom.kind not in self.kinds:
            return f"group method {self.name!r} takes {', '.join(self.kinds)} layers, not {geom.kind}"
        return None

    def mismatch(self, first: LayerGeometry, geom: LayerGeometry) -> str | None:
        """Why a member cannot share a decomposition with the group's first member (None if it can).

        Default: the kernels must have one shape and dtype (they are stacked)."""
        if kernel_shape(first) != kernel_shape(geom):
            return f"kernel {kernel_shape(geom)} differs from {kernel_shape(first)}"
        if first.dtype != geom.dtype:
            return f"dtype {geom.dtype} differs from {first.dtype}"
        return None

    def check_options(self, options: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
        options = dict(options or {})
        unknown = set(options) - set(self.option_specs)
        if unknown:
            allowed = sorted(set(self.option_specs) | {"method", "rank", "layers"})
            raise PlanError(f"{where}unknown key(s) {sorted(unknown, key=repr)} for group method {self.name!r}; "
                            f"allowed: {allowed}")
        return {k: self.option_specs[k].check(k, v, where) for k, v in options.items()}

    # ---- ranks -----------------------------------------------------------------------
    @abc.abstractmethod
    def max_rank(self, geoms: Sequence[LayerGeometry], options: Mapping[str, Any] | None = None) -> Any:
        """The rank at which every member is exact, in canonical form."""

    @abc.abstractmethod
    def resolve_rank(self, geoms: Sequence[LayerGeometry], rank: Any,
                     options: Mapping[str, Any] | None = None) -> Any:
        """A plan's rank in canonical form; :class:`RankError` naming the value and range."""

    @abc.abstractmethod
    def rank_axes(self, geoms: Sequence[LayerGeometry],
                  options: Mapping[str, Any] | None = None) -> tuple[RankAxis, ...]:
        """The integers a rank is made of (one slider each)."""

    def axis_values(self, rank: Any) -> tuple[int, ...]:
        return tuple(int(r) for r in rank) if isinstance(rank, (tuple, list)) else (int(rank),)

    def rank_text(self, rank: Any) -> str:
        if isinstance(rank, (tuple, list)):
            return self.rank_separator.join(str(int(r)) for r in rank)
        return f"{rank:g}" if isinstance(rank, float) else str(int(rank))

    def rank_to_json(self, rank: Any) -> Any:
        if isinstance(rank, (tuple, list)):
            return [int(r) for r in rank]
        return rank if isinstance(rank, float) else int(rank)

    # ---- cost without building -------------------------------------------------------
    @abc.abstractmethod
    def count_params_group(self, geoms: Sequence[LayerGeometry], rank: Any,
                           options: Mapping[str, Any] | None = None) -> int:
        """Parameters of every built member together, what they share counted once, biases included."""

    @abc.abstractmethod
    def count_flops_group(self, geoms: Sequence[LayerGeometry], rank: Any,
                          options: Mapping[str, Any] | None = None) -> int | None:
        """FLOPs of one sample through every member (None if an input size is unknown)."""

    def tradeoff_group(self, layers: Sequence[nn.Module], geoms: Sequence[LayerGeometry],
                       name: str = "") -> Tradeoff | None:
        """Error against cost over all ranks from one factorization (None when unavailable)."""
        return None

    # ---- work ------------------------------------------------------------------------
    @abc.abstractmethod
    def factorize_group(self, layers: Sequence[nn.Module], rank: Any, options: Mapping[str, Any] | None = None,
                        *, refine: bool = True) -> Factors:
        """The shared factors of the members' kernels at ``rank`` (canonical)."""

    @abc.abstractmethod
    def build_group(self, layers: Sequence[nn.Module], factors: Factors, name: str = "") -> list[nn.Module]:
        """One module per member (in order), sharing one object for what the group shares;
        ``name`` is the group's (the modules may show it)."""

    @abc.abstractmethod
    def empty_factors_group(self, geoms: Sequence[LayerGeometry], rank: Any,
                            options: Mapping[str, Any] | None = None) -> Factors:
        """Zero factors of the right shapes, for skeletons a checkpoint is loaded into."""

    @abc.abstractmethod
    def reconstruct_group(self, layers: Sequence[nn.Module], factors: Factors) -> list[torch.Tensor]:
        """The dense kernel each member's module computes with (same shapes as the weights)."""

    def skeleton_group(self, layers: Sequence[nn.Module], rank: Any, options: Mapping[str, Any] | None = None,
                       name: str = "") -> list[nn.Module]:
        """The members' modules without factorizing (zero weights, one shared core)."""
        geoms = [LayerGeometry.of(m) for m in layers]
        rank = self.resolve_rank(geoms, rank, options)
        return self.build_group(layers, self.empty_factors_group(geoms, rank, options), name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kinds": list(self.kinds), "description": self.description,
                "options": sorted(self.option_specs), "error_curve": self.error_curve, "group": True}


def kernel_shape(geom: LayerGeometry) -> tuple[int, ...]:
    """A member's weight shape, ``(out, in / groups, kh, kw)`` (Linear: ``(out, in)``)."""
    if geom.kind == "linear":
        return (geom.out_features, geom.in_features)
    return (geom.out_features, geom.in_features // geom.groups, *geom.kernel_size)


#: the group method ``plan_for_budget(groups=...)`` uses for a bare list of layer names
DEFAULT_GROUP_METHOD = "joint_tucker"

_REGISTRY: dict[str, GroupMethod] = {}
_LOCK = threading.RLock()


def register_group_method(cls: type[GroupMethod]) -> type[GroupMethod]:
    """Class decorator: put one instance of a :class:`GroupMethod` subclass in the registry;
    a name another class holds is refused (:class:`PluginError`)."""
    if not isinstance(cls, type) or not issubclass(cls, GroupMethod):
        raise PluginError(f"register_group_method takes a subclass of GroupMethod; got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"group method class {cls.__qualname__} needs a class attribute `name`")
    instance = cls()
    with _LOCK:
        taken = _REGISTRY.get(name)
        if taken is not None and type(taken).__qualname__ != cls.__qualname__:
            raise PluginError(f"group method name {name!r} is already taken by {type(taken).__qualname__}")
        _REGISTRY[name] = instance
    return cls


def get_group_method(name: Any) -> GroupMethod:
    """The registered group method ``name``; :class:`PlanError` naming the known ones."""
    hit = _REGISTRY.get(name) if isinstance(name, str) else None
    if hit is None:
        raise PlanError(f"unknown group method {name!r}; group methods: {', '.join(available_group_methods())}")
    return hit


def is_group_method(name: Any) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def available_group_methods() -> list[str]:
    return sorted(_REGISTRY)
