"""The registry of methods: one instance per name, built-ins and plugins alike.

``register_method`` refuses a second class under a taken name (the error names both), so a
plugin can never silently replace a method that plans and checkpoints already rely on.
Installed packages announce methods with an entry point in the group ``tensorscope.methods``
(``name = package.module:Class``); they are imported on the first lookup that needs them
(listing the methods, or a name that is not registered yet), and one that fails to import
is reported by name while every other method keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import threading
import warnings

from ..errors import PlanError, PluginError
from .base import LayerGeometry, Method

__all__ = [
    "ENTRY_POINT_GROUP", "PluginWarning", "available_methods", "get_method", "methods_for",
    "planner_methods", "register_method",
]

ENTRY_POINT_GROUP = "tensorscope.methods"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_KINDS = ("linear", "conv2d")

_REGISTRY: dict[str, Method] = {}  # in registration order: built-ins first
_LOCK = threading.RLock()
_SEEN_ENTRY_POINTS: set[tuple[str, str]] = set()  # (name, value) already tried
_FAILED: dict[str, str] = {}  # entry-point name -> why it could not be loaded
_SCANNED = False


class PluginWarning(UserWarning):
    """An installed plugin's method could not be loaded; every other method still works."""


def _qual(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: put one instance of a :class:`Method` subclass in the registry.

    Raises :class:`PluginError` for something that is not a Method subclass, a method without
    a valid ``name`` or ``kinds``, an abstract class, or a name another class already holds.
    Registering the same class again (a module reloaded) replaces it.
    """
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise PluginError(f"register_method takes a subclass of tensorscope.methods.Method; got {cls!r}")
    name = cls.__dict__.get("name", getattr(cls, "name", None))
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"method class {_qual(cls)} needs a class attribute `name`: a string of letters, digits "
                          f"and underscores starting with a letter (it names the method in plans); got {name!r}")
    kinds = getattr(cls, "kinds", None)
    if not isinstance(kinds, tuple) or not kinds or not all(k in _KINDS for k in kinds):
        raise PluginError(f"method {name!r} ({_qual(cls)}) needs `kinds`: a non-empty tuple of layer kinds from "
                          f"{_KINDS}; got {kinds!r}")
    try:
        instance = cls()
    except TypeError as e:  # abstract methods left unimplemented
        raise PluginError(f"method {name!r} ({_qual(cls)}) cannot be instantiated: {e}") from None
    with _LOCK:
        taken = _REGISTRY.get(name)
        if taken is not None and _qual(type(taken)) != _qual(cls):
            raise PluginError(f"method name {name!r} is already taken by {_qual(type(taken))}; {_qual(cls)} cannot "
                              "register under it. Give the new method another name")
        _REGISTRY[name] = instance
    return cls


def _entry_points() -> list:
    try:
        return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as e:  # a broken installation must not break the built-in methods
        warnings.warn(f"could not list the entry points in {ENTRY_POINT_GROUP!r}: {e}", PluginWarning, stacklevel=3)
        return []


def _dist_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None) or ep.value.split(":")[0].split(".")[0]


def _load_entry_point(ep) -> None:
    where = f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} (package {_dist_name(ep)!r})"
    try:
        obj = ep.load()
    except Exception as e:
        _FAILED[ep.name] = f"{where} failed to import: {type(e).__name__}: {e}"
        warnings.warn(f"tensorscope: {_FAILED[ep.name]}; the other methods still work", PluginWarning, stacklevel=4)
        return
    try:
        if not (isinstance(obj, type) and issubclass(obj, Method)):
            raise PluginError(f"{where} names {obj!r}, which is not a subclass of tensorscope.methods.Method")
        if getattr(obj, "name", None) != ep.name:
            raise PluginError(f"{where} names class {_qual(obj)} whose `name` is {getattr(obj, 'name', None)!r}; "
                              "the entry point's name and the class's name must be the same")
        if _REGISTRY.get(ep.name) is None or type(_REGISTRY[ep.name]) is not obj:
            register_method(obj)
        _FAILED.pop(ep.name, None)
    except PluginError as e:
        _FAILED[ep.name] = str(e) if str(e).startswith("entry point") else f"{where}: {e}"
        warnings.warn(f"tensorscope: {_FAILED[ep.name]}; the other methods still work", PluginWarning, stacklevel=4)


def _scan(force: bool = False) -> None:
    """Load the entry points not tried yet (once per process unless ``force``)."""
    global _SCANNED
    with _LOCK:
        if _SCANNED and not force:
            return
        if force:
            importlib.invalidate_caches()
        for ep in _entry_points():
            key = (ep.name, ep.value)
            if key in _SEEN_ENTRY_POINTS:
                continue
            _SEEN_ENTRY_POINTS.add(key)
            _load_entry_point(ep)
        _SCANNED = True


def get_method(name: str) -> Method:
    """The registered method called ``name``; plugins are looked up on a miss.

    Raises :class:`PlanError` naming the installed methods, or the plugin that should have
    provided ``name`` and why it did not load.
    """
    if isinstance(name, str):
        hit = _REGISTRY.get(name)
        if hit is not None:
            return hit
        _scan(force=True)
        hit = _REGISTRY.get(name)
        if hit is not None:
            return hit
        if name in _FAILED:
            raise PlanError(f"method {name!r} is not available: {_FAILED[name]}. Reinstall or fix that package; "
                            f"installed methods: {', '.join(available_methods())}")
    raise PlanError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")


def available_methods() -> list[str]:
    """Names of every registered method, plugins included, sorted."""
    _scan()
    return sorted(_REGISTRY)


def methods_for(geom: LayerGeometry) -> list[str]:
    """Names of the methods that can decompose a layer of this geometry (sorted)."""
    _scan()
    return [n for n, m in sorted(_REGISTRY.items()) if m.unsupported_reason(geom) is None]


def planner_methods(geom: LayerGeometry | None = None) -> list[str]:
    """Methods with a cheap error curve, in registration order (built-ins first): the budget
    planner's and the presets' default menu, restricted to ``geom`` when given."""
    _scan()
    return [n for n, m in _REGISTRY.items()
            if m.error_curve and (geom is None or m.unsupported_reason(geom) is None)]
