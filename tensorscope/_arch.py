"""Architecture references: how a checkpoint names the code that builds a network.

A reference is ``"package.module:factory"`` plus JSON keyword arguments. Weights files hold
no code, so loading one needs the architecture from somewhere: the reference recorded at
save time, or one the caller passes. Importing a module runs its code, so a reference is
only ever imported when the caller (or a checkpoint they chose to load) names it.
"""

from __future__ import annotations

import importlib
import inspect as _inspect
import json
from typing import Any, Callable

from torch import nn

from .errors import ArchitectureError

ATTR = "_tensorscope_arch"


def set_arch(model: nn.Module, ref: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Record on ``model`` the factory that builds its (uncompressed) architecture."""
    kwargs = dict(kwargs or {})
    json.dumps(kwargs)  # must be JSON: it goes into the checkpoint's header
    object.__setattr__(model, ATTR, {"ref": ref, "kwargs": kwargs})
    return model


def get_arch(model: nn.Module) -> dict[str, Any] | None:
    """The recorded reference, or one inferred from the model's class when that is safe.

    A class from an importable module whose constructor needs no argument can be rebuilt
    from its qualified name; anything else (``__main__``, required arguments) cannot.
    """
    rec = getattr(model, ATTR, None)
    if rec is not None:
        return dict(rec)
    cls = type(model)
    mod = cls.__module__
    if mod == "__main__" or "<locals>" in cls.__qualname__ or mod.startswith("torch."):
        return None
    try:
        sig = _inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    required = [
        p for p in list(sig.parameters.values())[1:]
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        return None
    return {"ref": f"{mod}:{cls.__qualname__}", "kwargs": {}}


def import_factory(ref: str) -> Callable[..., nn.Module]:
    """Import ``package.module:factory`` (dots allowed after the colon for nested names)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ArchitectureError(
            f"an architecture reference looks like 'package.module:factory'; got {ref!r}"
        )
    mod_name, attr = ref.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # the module's own code may raise anything
        raise ArchitectureError(
            f"could not import module {mod_name!r} for architecture {ref!r}: "
            f"{type(e).__name__}: {e}. Check the name and that the package is installed."
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ArchitectureError(
                f"module {mod_name!r} has no attribute {attr!r} (architecture {ref!r})"
            ) from None
    if not callable(obj):
        raise ArchitectureError(f"architecture {ref!r} is not callable")
    return obj


def build_arch(ref: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call the factory and check that it gives an ``nn.Module``."""
    factory = import_factory(ref)
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise ArchitectureError(
            f"architecture factory {ref!r} raised {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"architecture factory {ref!r} returned {type(model).__name__}, not an nn.Module"
        )
    return set_arch(model, ref, kwargs)
