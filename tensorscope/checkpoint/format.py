"""The tensorscope checkpoint format: one safetensors file, checked before it is read.

A **tensorscope checkpoint** is one file in the `safetensors
<https://github.com/huggingface/safetensors>`_ format, whatever its extension (``.pt`` is
fine). It holds no pickle, so reading it never runs code from the file. Layout::

    [8 bytes: little-endian u64 N][N bytes: JSON header][tensor data]

    header = {"<state-dict key>": {"dtype": "F32", "shape": [...], "data_offsets": [b, e]}, ...,
              "__metadata__": {"tensorscope": "<JSON text of the record below>"}}

    record = {"format": 1, "tensorscope_version": "0.1.0", "torch_version": "2.x",
              "plan": {"tensorscope_plan": 1, "layers": {...}} | null,
              "arch": {"ref": "package.module:factory", "kwargs": {...}} | null,
              "fold_bn": false, "dtype": "float32", "created": "<ISO 8601, UTC>",
              "fold_pairs": [["conv", "bn"], ...] | null,  # the folded pairs (fold_bn: true)
              "user": {...},                       # save(metadata=...)
              "aliases": {"out.weight": "emb.weight"},  # tied tensors, stored once
              "extra_state": {...},                # JSON get_extra_state() values
              "checksums": {"fc1.0": "shuffle 7: sha256:..."}}  # module checksums (below)

Module checksums. A module may hold state that is neither in its state dict nor in the plan
but is derived from it, such as the permutation a shuffled tensor-train layer generates
from its seed (a non-persistent buffer). Such a module defines ``tensorscope_checksum()``
(a string, or None when there is nothing to check); :func:`save` records every non-None
one under ``"checksums"`` by module name, and :func:`load` refuses a file whose checksums
differ from those of the model it rebuilt (the layer would compute another function).

The tensors are the compressed model's ``state_dict()``. Loading rebuilds the uncompressed
architecture (``model=``, ``arch=`` or the recorded reference), gives it the plan's
structure with :func:`tensorscope.surgery.apply_skeleton` and loads the state dict into it.

The header is read and checked here, before any tensor is read: a header that lies about
its length, shapes or offsets is refused without allocating what it declares.

:func:`save` writes one, :func:`load` restores the model, :func:`describe` returns the record
without reading any tensor.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .. import file_limits
from .._arch import get_arch, set_arch
from .._io import atomic_path
from .._version import __version__
from ..arch_trust import REF_RE, resolve_architecture
from ..errors import ArchitectureError, CheckpointError, TensorscopeError
from ..plan import Plan, as_plan
from ..safetensors_header import MAX_HEADER_BYTES, _ST_DTYPES, _bad, _Header, _read_header
from ..surgery import FOLD_ATTR, FOLD_PAIRS_ATTR, apply_skeleton, plan_of
from .state import _finish, _load_state, _warn_non_finite

__all__ = ["save", "load", "describe", "FORMAT_VERSION", "META_KEY"]

#: the checkpoint format this version writes and the newest it reads
FORMAT_VERSION = 1
#: the safetensors metadata key holding tensorscope's JSON record
META_KEY = "tensorscope"
MAX_USER_METADATA_CHARS = 1 << 20

# ---- the safetensors header: tensorscope.safetensors_header (shared with tensorscope.sources) ----


def _read_tensors(h: _Header) -> dict[str, Tensor]:
    """Read every tensor that the (checked) header describes, from one open file."""
    if sys.byteorder != "little":  # safetensors data is little-endian; let the library convert
        try:
            with safe_open(h.path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in h.tensors}
        except Exception as e:
            raise _bad(h.path, f"{type(e).__name__}: {e}") from None
    out: dict[str, Tensor] = {}
    try:
        with open(h.path, "rb") as f:
            for name, (dtype, shape, begin, end) in h.tensors.items():
                tdtype = getattr(torch, _ST_DTYPES[dtype][0])
                if end == begin:
                    out[name] = torch.empty(shape, dtype=tdtype)
                    continue
                buf = bytearray(end - begin)
                f.seek(h.data_start + begin)
                if f.readinto(buf) != len(buf):
                    raise _bad(h.path, f"the file ended inside tensor {name!r} (truncated while reading?)")
                out[name] = torch.frombuffer(buf, dtype=tdtype).reshape(shape)
    except OSError as e:
        raise CheckpointError(f"cannot read {h.path!r}: {e}") from None
    return out


def _record(h: _Header) -> dict[str, Any] | None:
    """The parsed tensorscope record of a checked header (None for a plain safetensors file)."""
    text = h.metadata.get(META_KEY)
    if text is None:
        return None
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError):
        raise _bad(h.path, f'its "{META_KEY}" metadata is not JSON') from None
    if not isinstance(rec, dict):
        raise _bad(h.path, f'its "{META_KEY}" metadata is not a JSON object')
    fmt = rec.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise _bad(h.path, f"its format version is {fmt!r}; expected a positive integer")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{h.path!r} is a tensorscope checkpoint in format {fmt}, written by tensorscope "
            f"{rec.get('tensorscope_version', '?')}; this tensorscope ({__version__}) reads format "
            f"{FORMAT_VERSION} and older. Upgrade tensorscope (pip install -U tensorscope) to load it."
        )
    arch = rec.get("arch")
    if arch is not None:
        if not (isinstance(arch, dict) and isinstance(arch.get("ref"), str)
                and isinstance(arch.get("kwargs", {}), dict)):
            raise _bad(h.path, f'"arch" must be {{"ref": "package.module:factory", "kwargs": {{...}}}}; got {arch!r:.200}')
        if not REF_RE.match(arch["ref"]):
            raise _bad(h.path, f"its architecture reference {arch['ref']!r:.200} is not 'package.module:factory'")
    if not isinstance(rec.get("fold_bn", False), bool):
        raise _bad(h.path, f'"fold_bn" must be true or false; got {rec.get("fold_bn")!r:.50}')
    pairs = rec.get("fold_pairs")
    if pairs is not None and not (isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs)):
        raise _bad(h.path, f'"fold_pairs" must be a list of [conv, bn] module names; got {pairs!r:.100}')
    aliases = rec.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v in h.tensors and k not in h.tensors
        for k, v in aliases.items()
    ):
        raise _bad(h.path, '"aliases" must map keys absent from the file to tensors present in it')
    extra = rec.get("extra_state") or {}
    if not isinstance(extra, dict):
        raise _bad(h.path, '"extra_state" must be a JSON object')
    sums = rec.get("checksums") or {}
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        raise _bad(h.path, '"checksums" must map module names to strings')
    return rec


def module_checksums(model: nn.Module) -> dict[str, str]:
    """``{module name: tensorscope_checksum()}`` for every module that defines one (None skipped)."""
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        fn = getattr(mod, "tensorscope_checksum", None)
        if callable(fn):
            value = fn()
            if value is not None:
                out[name] = str(value)
    return out


def _check_checksums(net: nn.Module, rec: Mapping[str, Any], path: str, source: str) -> None:
    """CheckpointError naming the first module whose checksum differs from the recorded one."""
    want = rec.get("checksums") or {}
    got = module_checksums(net)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            recorded = repr(want[name]) if name in want else "no checksum"
            built = repr(got[name]) if name in got else "none"
            raise CheckpointError(
                f"the checkpoint {path!r} does not match {source}: module {name!r} was saved with {recorded} but "
                f"this tensorscope ({__version__}) builds it with {built}, so it would compute another function "
                f"(e.g. a shuffle permutation generated differently, or a plan edited by hand). Load it with the "
                f"tensorscope that wrote it ({rec.get('tensorscope_version', '?')})"
            )


def _record_plan(rec: Mapping[str, Any], path: str) -> Plan | None:
    if rec.get("plan") is None:
        return None
    try:
        return as_plan(rec["plan"])
    except TensorscopeError as e:
        raise _bad(path, f"its plan is invalid: {e}") from None


# ---- save ---------------------------------------------------------------------------------


def _st_save_file(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file (one function, so tests can make a write fail midway).

    """
    save_file(tensors, path, metadata=metadata)


def _json_metadata(value: Any, what: str) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serializable (str, numbers, lists, dicts); {e}") from None
    return value


def _tensors_for_save(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], dict[str, Any]]:
    """The state dict as (tensors to write, aliases of tied tensors, JSON extra states)."""
    sd = model.state_dict()
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    extra: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            if key.endswith("_extra_state"):
                extra[key] = _json_metadata(value, f"the extra state {key!r} (from get_extra_state)")
                continue
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if t.layout != torch.strided:
            raise TypeError(f"tensor {key!r} has layout {t.layout}; only dense tensors can be saved")
        if t.device.type == "meta":
            raise TypeError(f"tensor {key!r} is on the meta device (it has no data to save)")
        if t.dtype not in _SAVE_DTYPES:
            raise TypeError(
                f"tensor {key!r} has dtype {t.dtype}, which the safetensors format cannot store"
            )
        if t.numel() > 0:
            ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if ident in seen:  # the same tensor under two names (tied weights)
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
        tensors[key] = t
    # tensors still sharing memory (overlapping views) must be written as separate copies
    by_storage: dict[tuple, list[str]] = {}
    for key, t in tensors.items():
        if t.numel() > 0:
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(key)
    shared = {k for keys in by_storage.values() if len(keys) > 1 for k in keys}
    for key, t in list(tensors.items()):
        t = t.to("cpu")
        if key in shared or not t.is_contiguous():
            t = t.contiguous().clone() if key in shared else t.contiguous()
        tensors[key] = t
    return tensors, aliases, extra


_SAVE_DTYPES = {getattr(torch, name) for name, _ in _ST_DTYPES.values() if getattr(torch, name, None) is not None}


def _main_dtype(model: nn.Module) -> str | None:
    counts: dict[torch.dtype, int] = {}
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return None
    return str(max(counts, key=counts.get)).replace("torch.", "")


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    plan: Any = None,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save ``model`` (usually a compressed one) as a tensorscope checkpoint.

    One safetensors file (no pickle), whatever the extension; written atomically, so a
    failed save leaves no file behind and never clobbers an existing one.

    Parameters
    ----------
    model : nn.Module
    path : str or PathLike
    plan : Plan, dict, JSON text or path, optional
        Defaults to the plan ``compress`` applied (``plan_of(model)``); giving a different
        one is an error (the checkpoint would not load).
    arch, arch_kwargs : optional
        ``"package.module:factory"`` building the *uncompressed* architecture, and its JSON
        keyword arguments. Default: the reference recorded on the model
        (``tensorscope._arch.set_arch``), or one inferred from its class when that is safe.
    metadata : dict, optional
        JSON-serializable user metadata, stored under ``"user"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module; got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; save needs a file path such as 'model.pt'")
    applied = plan_of(model)
    if plan is None:
        plan_obj = applied
    else:
        plan_obj = as_plan(plan)
        if applied is not None and plan_obj.to_dict() != applied.to_dict():
            raise CheckpointError(
                f"the plan given ({plan_obj!r}) differs from the one compress applied to this model "
                f"({applied!r}); the checkpoint would not load. Leave plan= out."
            )
    if arch is not None:
        if not isinstance(arch, str) or not REF_RE.match(arch):
            raise ArchitectureError(
                f"an architecture reference looks like 'package.module:factory'; got {arch!r}"
            )
        arch_rec: dict[str, Any] | None = {"ref": arch, "kwargs": dict(arch_kwargs or {})}
    else:
        if arch_kwargs is not None:
            raise TypeError("arch_kwargs= needs arch= (the factory they are passed to)")
        arch_rec = get_arch(model)
        if arch_rec is not None and not REF_RE.match(str(arch_rec.get("ref", ""))):
            arch_rec = None
    if arch_rec is not None:
        arch_rec = {"ref": arch_rec["ref"], "kwargs": _json_metadata(dict(arch_rec.get("kwargs") or {}), "arch_kwargs")}
    user = _json_metadata(dict(metadata or {}), "metadata")
    if len(json.dumps(user)) > MAX_USER_METADATA_CHARS:
        raise ValueError(f"metadata is over {MAX_USER_METADATA_CHARS:,} characters of JSON; keep it small")

    tensors, aliases, extra = _tensors_for_save(model)
    record = {
        "format": FORMAT_VERSION,
        "tensorscope_version": __version__,
        "torch_version": torch.__version__,
        "plan": plan_obj.to_dict() if plan_obj is not None else None,
        "arch": arch_rec,
        "fold_bn": bool(getattr(model, FOLD_ATTR, False)),
        "fold_pairs": ([list(p) for p in getattr(model, FOLD_PAIRS_ATTR)]
                       if getattr(model, FOLD_PAIRS_ATTR, None) is not None else None),
        "dtype": _main_dtype(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "user": user,
        "aliases": aliases,
        "extra_state": extra,
        "checksums": module_checksums(model),
    }
    with atomic_path(path) as tmp:
        _st_save_file(tensors, tmp, {META_KEY: json.dumps(record)})


# ---- load ---------------------------------------------------------------------------------


def _torch_file_error(path: str, kind: str) -> CheckpointError:
    what = "zip" if kind == "torch_zip" else "pickle"
    return CheckpointError(
        f"{path!r} is a torch.save ({what}) file, not a tensorscope checkpoint (a safetensors "
        f"file written by tensorscope.save). To read a network saved with torch.save use "
        f"tensorscope.load_model({path!r}, arch='package.module:factory')."
    )


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
    """Restore a model written by :func:`save`, in eval mode.

    The architecture comes from ``model=`` (an instance of the original, uncompressed
    architecture: deep-copied, not modified), else ``arch=`` (``"package.module:factory"``,
    with ``arch_kwargs`` defaulting to the recorded ones), else the reference recorded in the
    file. The file holds no code; ``trust=True`` only lets a recorded factory that is not an
    ``nn.Module`` class and lives in the standard library or a package with loaders be called.

    Raises
    ------
    FileTooLargeError
        The file (or what its header declares) is over ``max_bytes`` (default: env
        ``TENSORSCOPE_MAX_FILE_BYTES`` or 4 GiB).
    CheckpointError
        Empty, truncated or corrupt file; a header that contradicts itself; a newer format;
        a torch.save file; no architecture available; weights that do not fit it.
    ArchitectureError
        The architecture reference cannot be imported or called.
    """
    path = os.fspath(path)
    limit = file_limits.max_bytes(max_bytes)
    size = file_limits.check_file(path, limit)
    kind = file_limits.sniff(path, size)
    if kind in ("torch_zip", "torch_pickle"):
        raise _torch_file_error(path, kind)
    h = _read_header(path, size, limit)
    rec = _record(h)
    if rec is None:
        raise CheckpointError(
            f"{path!r} is a safetensors file without tensorscope's metadata: a plain state dict, not "
            f"a tensorscope checkpoint. Read it with tensorscope.load_model({path!r}, "
            f"arch='package.module:factory')."
        )
    return _load_checkpoint(h, rec, model=model, arch=arch, arch_kwargs=arch_kwargs,
                            map_location=map_location, trust=trust)


def _load_checkpoint(h: _Header, rec: dict[str, Any], *, model, arch, arch_kwargs, map_location, trust) -> nn.Module:
    path = h.path
    plan = _record_plan(rec, path)
    fold_bn = bool(rec.get("fold_bn", False))
    net, arch_rec, source = resolve_architecture(rec, path, model, arch, arch_kwargs, trust)
    already = plan_of(net)
    if already is not None:  # model= was a compressed model
        if plan is None or already.to_dict() != plan.to_dict() or bool(getattr(net, FOLD_ATTR, False)) != fold_bn:
            raise CheckpointError(
                f"model= for {path!r} must be the original, uncompressed architecture; the one given "
                f"was already compressed with a different plan ({already!r})"
            )
    elif plan is not None or fold_bn:
        try:
            pairs = rec.get("fold_pairs")
            apply_skeleton(net, plan if plan is not None else Plan(), fold_bn=fold_bn,
                           fold=[tuple(p) for p in pairs] if pairs is not None else None)
        except TensorscopeError as e:
            raise CheckpointError(
                f"the checkpoint {path!r} does not match {source}: its plan cannot be applied to it: {e}"
            ) from None
    sd: dict[str, Any] = _read_tensors(h)
    for alias, canonical in (rec.get("aliases") or {}).items():
        sd[alias] = sd[canonical]
    expected = net.state_dict(keep_vars=True)
    for key, value in (rec.get("extra_state") or {}).items():
        if key in expected or key not in sd:
            sd[key] = value
    _warn_non_finite(sd, path)
    _load_state(net, sd, path, source)
    _check_checksums(net, rec, path, source)
    if arch_rec is not None:
        set_arch(net, arch_rec["ref"], arch_rec.get("kwargs") or {})
    return _finish(net, map_location)


def describe(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The record of a tensorscope checkpoint, without reading its tensors.

    Returns the header's ``"tensorscope"`` record (format, versions, plan, arch, fold_bn,
    dtype, created, user, ...) plus ``"file"``: ``{"path", "bytes", "tensors", "params"}``.
    """
    path = os.fspath(path)
    limit = file_limits.max_bytes(max_bytes)
    size = file_limits.check_file(path, limit)
    kind = file_limits.sniff(path, size)
    if kind in ("torch_zip", "torch_pickle"):
        raise _torch_file_error(path, kind)
    h = _read_header(path, size, limit)
    rec = _record(h)
    if rec is None:
        raise CheckpointError(f"{path!r} is a safetensors file without tensorscope's metadata, not a tensorscope checkpoint")
    rec = dict(rec)
    rec["file"] = {
        "path": path,
        "bytes": size,
        "tensors": len(h.tensors),
        "params": sum(math.prod(s) for _, s, _, _ in h.tensors.values()),
    }
    return rec
