"""A compressed model written as a folder of shards (``ts.compress(path, plan, out=folder)``), loaded back.

:func:`load` is ``tensorscope.load``: a file goes to :func:`tensorscope.checkpoint.format.load`,
a folder written by :mod:`tensorscope.streaming` to :func:`load_folder`. The folder's index
carries tensorscope's record (plan, architecture reference, Conv1D layers stored as
``Linear``, extra states, checksums); the architecture comes from ``model=``, ``arch=``, the
recorded reference, or the folder's Hugging Face ``config.json`` (transformers). It is built
without initialising its weights (they are all loaded), given the plan's structure with
:func:`tensorscope.surgery.apply_skeleton`, and the shards are read into it tensor by tensor.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from torch import nn

from .._arch import set_arch
from ..arch_trust import NO_ARCH_HINT, REF_RE, resolve_architecture
from ..errors import CheckpointError, TensorscopeError
from ..plan import as_plan
from ..sources import INDEX_NAME, hf_model, linear_for_conv1d, open_source
from ..streaming import FOLDER_FORMAT
from ..surgery import apply_skeleton
from . import format as _format
from .state import _finish, _load_state, _warn_non_finite

__all__ = ["load", "load_folder"]

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build a network without initialising its weights (all of them are loaded afterwards):
    untouched memory costs nothing, so building a 7B architecture does not need 28 GB.

    It replaces ``torch.nn.init``'s functions while the architecture is built: a module another
    thread initialises meanwhile is not initialised either."""
    import torch.nn.init as init

    saved = {n: getattr(init, n) for n in _INIT_FUNCTIONS if hasattr(init, n)}
    try:
        for n in saved:
            setattr(init, n, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def _record(source, folder: str) -> dict[str, Any]:
    rec = source.metadata.get("tensorscope")
    if not isinstance(rec, dict):
        raise CheckpointError(
            f"{folder!r} is a folder of weights, not one tensorscope compressed (its {INDEX_NAME} has no tensorscope "
            "record): read a Hugging Face folder with tensorscope.load_model(folder), or stream it "
            "(tensorscope.inspect/spectra/compress(folder, ...))")
    fmt = rec.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise CheckpointError(f"{folder!r}: its format version is {fmt!r}; expected a positive integer")
    if fmt > FOLDER_FORMAT:
        raise CheckpointError(f"{folder!r} was written in folder format {fmt} by tensorscope "
                              f"{rec.get('tensorscope_version', '?')}; this tensorscope reads format {FOLDER_FORMAT}: "
                              "upgrade tensorscope")
    arch = rec.get("arch")
    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get("ref"), str)
                                 and REF_RE.match(arch["ref"]) and isinstance(arch.get("kwargs", {}), dict)):
        raise CheckpointError(f'{folder!r}: "arch" must be {{"ref": "package.module:factory", "kwargs": {{...}}}}')
    for key, kind in (("transposed", list), ("extra_state", dict), ("checksums", dict)):
        if not isinstance(rec.get(key) or kind(), kind):
            raise CheckpointError(f"{folder!r}: {key!r} must be a JSON {kind.__name__}")
    if not all(isinstance(n, str) for n in rec.get("transposed") or []):
        raise CheckpointError(f"{folder!r}: 'transposed' must list module names")
    return rec


def load_folder(
    folder: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    map_location: Any = "cpu",
    trust: bool = False,
    max_bytes: int | None = None,
) -> nn.Module:
    """Restore a model that ``compress(path, plan, out=folder)`` wrote, in eval mode.

    The architecture: ``model=`` (the uncompressed network, deep-copied), else ``arch=``,
    else the recorded reference (the rules of :func:`tensorscope.load`), else the folder's
    ``config.json`` through transformers. ``max_bytes`` limits each tensor.
    """
    folder = os.fspath(folder)
    source = open_source(folder, max_bytes=max_bytes)
    rec = _record(source, folder)
    try:
        plan = as_plan(rec.get("plan") or {})
    except TensorscopeError as e:
        raise CheckpointError(f"{folder!r}: its plan is invalid: {e}") from None
    with _no_init():
        if model is not None or arch is not None or rec.get("arch") is not None:
            net, arch_rec, how = resolve_architecture(rec, folder, model, arch, arch_kwargs, trust)
        elif source.config is not None:
            net, arch_rec = hf_model(source.folder, source.config), None
            how = f"the architecture of {folder!r}/config.json"
        else:
            raise CheckpointError(f"{folder!r} records no architecture and has no config.json. {NO_ARCH_HINT}")
    linear_for_conv1d(net, rec.get("transposed") or [])
    try:
        apply_skeleton(net, plan)
    except TensorscopeError as e:
        raise CheckpointError(f"the folder {folder!r} does not match {how}: its plan cannot be applied to it: {e}") from None
    sd: dict[str, Any] = {k: source.read(k) for k in source.entries}
    expected = net.state_dict(keep_vars=True)
    by_tensor = {id(expected[k]): k for k in sd if k in expected}
    for k, t in expected.items():  # tied weights are stored once
        if k not in sd and id(t) in by_tensor:
            sd[k] = sd[by_tensor[id(t)]]
    for key, value in (rec.get("extra_state") or {}).items():
        sd[key] = value
    _warn_non_finite(sd, folder)
    _load_state(net, sd, folder, how)
    del sd
    _format._check_checksums(net, rec, folder, how)
    if arch_rec is not None:
        set_arch(net, arch_rec["ref"], arch_rec.get("kwargs") or {})
    return _finish(net, map_location)


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    map_location: Any = "cpu",
    trust: bool = False,
    max_bytes: int | None = None,
) -> nn.Module:
    """Restore a model written by :func:`tensorscope.save` (a file) or by
    ``tensorscope.compress(path, plan, out=folder)`` (a folder: :func:`load_folder`)."""
    kwargs = dict(model=model, arch=arch, arch_kwargs=arch_kwargs, map_location=map_location, trust=trust,
                  max_bytes=max_bytes)
    if os.path.isfile(os.path.join(os.fspath(path), INDEX_NAME)):  # a folder of shards (a plain folder: an error)
        return load_folder(path, **kwargs)
    return _format.load(path, **kwargs)


load.__doc__ = (load.__doc__ or "") + "\n\n    For a file:\n" + (_format.load.__doc__ or "")
