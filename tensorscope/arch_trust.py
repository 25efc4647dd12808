"""Which architecture references tensorscope will call, and where a loaded network's comes from.

:mod:`tensorscope._arch` imports and calls a ``"package.module:factory"`` reference. A
reference *recorded in a file* (or typed into the explorer by a visitor) is chosen by
someone else, and calling it runs code: :func:`check_file_factory` is the rule for those.
:func:`resolve_architecture` picks the network a checkpoint is loaded into: the caller's
``model=``, else their ``arch=``, else the file's reference once the rule allows it.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
from typing import Any, Mapping

from torch import nn

from ._arch import build_arch, get_arch, import_factory
from .errors import ArchitectureError, CheckpointError, UntrustedFileError

__all__ = [
    "REF_RE",
    "NO_ARCH_HINT",
    "DENIED_FACTORY_PACKAGES",
    "check_file_factory",
    "resolve_architecture",
]

#: the shape of an architecture reference, ``package.module:factory``
REF_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

NO_ARCH_HINT = (
    "Pass the uncompressed network, load(path, model=MyNet(...)), or a factory that builds "
    "it, load(path, arch='package.module:factory', arch_kwargs={...})."
)

#: packages whose functions a checkpoint may not name as its factory without trust=True:
#: they hold loaders and process launchers that, called with the recorded arguments,
#: would run code from elsewhere
DENIED_FACTORY_PACKAGES = {
    "torch", "numpy", "scipy", "pandas", "joblib", "dill", "cloudpickle", "yaml", "tensorscope",
    "transformers", "huggingface_hub", "safetensors", "IPython", "pip", "setuptools", "_pytest", "pytest",
}


def check_file_factory(ref: str, path: str, trust: bool) -> None:
    """Refuse a factory named by a *file* that could run arbitrary code when called.

    An ``nn.Module`` subclass is allowed, and so is a plain function defined in a
    non-standard-library module; functions from the standard library and from packages
    with loaders (``torch.hub:load``, ``subprocess:run`` ...) need ``trust=True``.
    """
    if trust:
        return
    mod_name, attr = ref.split(":")
    top = mod_name.split(".")[0]
    untrusted = UntrustedFileError(
        f"{path!r} names {ref!r} as the factory of its architecture; calling that with the "
        f"arguments recorded in the file could run arbitrary code, so it is refused. Pass the "
        f"architecture yourself (model=MyNet(...) or arch='package.module:factory'), or "
        f"trust=True if you trust this file."
    )
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise untrusted
    factory = import_factory(ref)
    if inspect.isclass(factory):
        if issubclass(factory, nn.Module):
            return
        raise untrusted
    if top in DENIED_FACTORY_PACKAGES and not ref.startswith("tensorscope.examples:"):
        raise untrusted
    if not inspect.isfunction(factory) or getattr(factory, "__module__", None) != mod_name:
        raise untrusted  # a builtin, or a function re-exported from elsewhere


def resolve_architecture(
    rec: Mapping[str, Any], path: str, model: Any, arch: Any, arch_kwargs: Any, trust: bool
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """(a fresh uncompressed network, its arch record, how it was obtained).

    ``rec`` is the checkpoint's record (its ``"arch"`` entry is the file's reference).
    """
    file_arch = rec.get("arch")
    if model is None and isinstance(arch, nn.Module):
        model, arch = arch, None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model= must be an nn.Module (the uncompressed architecture); got {type(model).__name__}")
        net = copy.deepcopy(model)
        return net, get_arch(model) or file_arch, f"the model= given ({type(model).__name__})"
    if arch is not None:
        if not isinstance(arch, str):
            raise TypeError(f"arch= must be 'package.module:factory' or an nn.Module; got {type(arch).__name__}")
        kwargs = arch_kwargs if arch_kwargs is not None else (file_arch or {}).get("kwargs", {})
        net = build_arch(arch, kwargs)
        return net, get_arch(net), f"architecture {arch!r}"
    if file_arch is None:
        raise CheckpointError(
            f"{path!r} records no architecture (it was saved from a model whose class tensorscope "
            f"cannot name: defined in __main__ or inside a function, or needing constructor "
            f"arguments, and save() got no arch=). {NO_ARCH_HINT}"
        )
    ref = file_arch["ref"]
    kwargs = arch_kwargs if arch_kwargs is not None else file_arch.get("kwargs", {})
    try:
        check_file_factory(ref, path, trust)
        net = build_arch(ref, kwargs)
    except ArchitectureError as e:
        raise ArchitectureError(
            f"{e}. The checkpoint {path!r} was saved from architecture {ref!r}: make that module "
            f"importable (install its package, or add its folder to sys.path), or {NO_ARCH_HINT[0].lower()}"
            f"{NO_ARCH_HINT[1:]}"
        ) from e
    return net, get_arch(net), f"architecture {ref!r}"
