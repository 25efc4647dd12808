"""Checkpoints, users' networks and standalone exports.

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
              "user": {...},                       # save(metadata=...)
              "aliases": {"out.weight": "emb.weight"},  # tied tensors, stored once
              "extra_state": {...}}                # JSON get_extra_state() values

The tensors are the compressed model's ``state_dict()``. Loading rebuilds the uncompressed
architecture (``model=``, ``arch=`` or the recorded reference), gives it the plan's
structure with :func:`tensorscope.surgery.apply_skeleton` and loads the state dict into it.

The header is read and checked here, before any tensor is read: a header that lies about
its length, shapes or offsets is refused without allocating what it declares.

:func:`load_model` reads a *user's* network (a ``.safetensors`` or ``torch.save`` state dict,
a pickled whole module only with ``trust=True``, a Hugging Face folder).
:func:`export` writes a file that torch alone runs (``torch.export`` / TorchScript / ONNX).
"""

from __future__ import annotations

import copy
import datetime as _dt
import inspect
import json
import math
import os
import pickle
import re
import stat
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ._arch import build_arch, get_arch, import_factory, set_arch
from ._io import atomic_path
from ._version import __version__
from .errors import (
    ArchitectureError,
    CheckpointError,
    FileTooLargeError,
    TensorscopeError,
    UntrustedFileError,
)
from .plan import Plan, as_plan
from .surgery import FOLD_ATTR, apply_skeleton, plan_of

__all__ = [
    "save",
    "load",
    "load_model",
    "export",
    "describe",
    "FORMAT_VERSION",
    "MissingExtraError",
    "NonFiniteWarning",
]

#: the checkpoint format this version writes and the newest it reads
FORMAT_VERSION = 1
#: the safetensors metadata key holding tensorscope's JSON record
META_KEY = "tensorscope"
#: environment variable overriding the default size limit (bytes)
ENV_MAX_BYTES = "TENSORSCOPE_MAX_FILE_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
#: the largest header safetensors itself accepts
MAX_HEADER_BYTES = 100_000_000
MAX_USER_METADATA_CHARS = 1 << 20
MAX_ZIP_ENTRIES = 100_000

_REF_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# safetensors dtype names -> (torch dtype name, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}


class MissingExtraError(TensorscopeError, ImportError):
    """An optional dependency (an extra such as ``tensorscope[onnx]``) is not installed."""


class NonFiniteWarning(UserWarning):
    """A loaded tensor holds NaN or Inf (loaded anyway: it is the user's model)."""


# ---- size limit and file sniffing ---------------------------------------------------------


def _max_bytes(max_bytes: int | None) -> int:
    if max_bytes is None:
        env = os.environ.get(ENV_MAX_BYTES)
        if env is None or not env.strip():
            return DEFAULT_MAX_BYTES
        try:
            value = int(env.strip())
        except ValueError:
            raise CheckpointError(
                f"environment variable {ENV_MAX_BYTES}={env!r} is not an integer number of bytes"
            ) from None
        if value <= 0:
            raise CheckpointError(f"environment variable {ENV_MAX_BYTES}={env!r} must be a positive number of bytes")
        return value
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise CheckpointError(f"max_bytes must be a positive integer (bytes) or None; got {max_bytes!r}")
    return max_bytes


def _limit_hint(limit: int) -> str:
    return f"the limit is {limit:,} bytes (raise it with max_bytes= or the environment variable {ENV_MAX_BYTES})"


def _check_file(path: str, limit: int) -> int:
    """The size of a regular file at ``path``, refusing directories, devices and big files."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path!r}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path!r} is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path!r} is not a regular file (a device, pipe or socket); refusing to read it")
    size = st.st_size
    if size > limit:
        raise FileTooLargeError(f"{path!r} is {size:,} bytes; {_limit_hint(limit)}")
    if size == 0:
        raise CheckpointError(
            f"{path!r} is empty (0 bytes): not a checkpoint (an interrupted save or download?)"
        )
    return size


def _sniff(path: str, size: int) -> str:
    """'safetensors', 'torch_zip', 'torch_pickle' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and n <= size - 8:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch_pickle"
    return "unknown"


# ---- the safetensors header ---------------------------------------------------------------


@dataclass
class _Header:
    path: str
    size: int
    header_len: int
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _bad(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path!r} is not a valid checkpoint: {what}")


def _read_header(path: str, size: int, limit: int) -> _Header:
    """Read and check the safetensors header without reading any tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"the file is {size} bytes, shorter than the 8-byte header length (truncated?)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise _bad(
                path,
                f"its first 8 bytes declare a {n:,}-byte header, over the {MAX_HEADER_BYTES:,} bytes "
                "safetensors allows (random bytes, or not a safetensors file)",
            )
        if n > size - 8:
            raise _bad(
                path,
                f"its first 8 bytes declare a {n:,}-byte header but the file is only {size:,} bytes "
                "(truncated, or not a safetensors file)",
            )
        raw = f.read(n)
    if len(raw) != n:
        raise _bad(path, "the file ended inside its header (truncated?)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(path, "its header is not JSON (random bytes, or a corrupt file)") from None
    if not isinstance(doc, dict):
        raise _bad(path, f"its header is JSON {type(doc).__name__}, not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, '"__metadata__" must map strings to strings')
    data_len = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _bad(path, f"tensor {name!r}: an entry needs dtype, shape and data_offsets; got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES or getattr(torch, _ST_DTYPES[dtype][0], None) is None:
            raise _bad(path, f"tensor {name!r}: unsupported dtype {dtype!r:.40}")
        if not isinstance(shape, list) or len(shape) > 64 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _bad(path, f"tensor {name!r}: shape must be a list of non-negative integers; got {shape!r:.200}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(path, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end; got {offsets!r:.200}")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][1]
        if end - begin != nbytes:
            raise _bad(
                path,
                f"tensor {name!r}: shape {shape} of {dtype} is {nbytes:,} bytes but its data_offsets "
                f"[{begin:,}, {end:,}] span {end - begin:,} bytes (the header contradicts itself)",
            )
        if end > data_len:
            raise _bad(
                path,
                f"tensor {name!r}: its data ends at byte {end:,} of the data section, which has only "
                f"{data_len:,} bytes (truncated file?)",
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
    # the tensors must tile the data section: no overlap, no gap, nothing left over
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos:,} bytes"
            raise _bad(path, f"tensor {name!r}: its data_offsets start at {begin:,}, which {what}")
        pos = end
    if pos != data_len:
        raise _bad(path, f"the tensors cover {pos:,} bytes but the data section has {data_len:,} bytes")
    if pos > limit:
        raise FileTooLargeError(f"{path!r} declares {pos:,} bytes of tensors; {_limit_hint(limit)}")
    return _Header(path, size, n, tensors, metadata)


def _read_tensors(h: _Header) -> dict[str, Tensor]:
    """Read every tensor that the (checked) header describes, from one open file."""
    if sys.byteorder != "little":  # safetensors data is little-endian; let the library convert
        from safetensors import safe_open

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
        if not _REF_RE.match(arch["ref"]):
            raise _bad(h.path, f"its architecture reference {arch['ref']!r:.200} is not 'package.module:factory'")
    if not isinstance(rec.get("fold_bn", False), bool):
        raise _bad(h.path, f'"fold_bn" must be true or false; got {rec.get("fold_bn")!r:.50}')
    aliases = rec.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v in h.tensors and k not in h.tensors
        for k, v in aliases.items()
    ):
        raise _bad(h.path, '"aliases" must map keys absent from the file to tensors present in it')
    extra = rec.get("extra_state") or {}
    if not isinstance(extra, dict):
        raise _bad(h.path, '"extra_state" must be a JSON object')
    return rec


def _record_plan(rec: Mapping[str, Any], path: str) -> Plan | None:
    if rec.get("plan") is None:
        return None
    try:
        return as_plan(rec["plan"])
    except TensorscopeError as e:
        raise _bad(path, f"its plan is invalid: {e}") from None


# ---- save ---------------------------------------------------------------------------------


def _st_save_file(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file (one function, so tests can make a write fail midway)."""
    from safetensors.torch import save_file

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
        if not isinstance(arch, str) or not _REF_RE.match(arch):
            raise ArchitectureError(
                f"an architecture reference looks like 'package.module:factory'; got {arch!r}"
            )
        arch_rec: dict[str, Any] | None = {"ref": arch, "kwargs": dict(arch_kwargs or {})}
    else:
        if arch_kwargs is not None:
            raise TypeError("arch_kwargs= needs arch= (the factory they are passed to)")
        arch_rec = get_arch(model)
        if arch_rec is not None and not _REF_RE.match(str(arch_rec.get("ref", ""))):
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
        "dtype": _main_dtype(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "user": user,
        "aliases": aliases,
        "extra_state": extra,
    }
    with atomic_path(path) as tmp:
        _st_save_file(tensors, tmp, {META_KEY: json.dumps(record)})


# ---- load ---------------------------------------------------------------------------------


_NO_ARCH_HINT = (
    "Pass the uncompressed network, load(path, model=MyNet(...)), or a factory that builds "
    "it, load(path, arch='package.module:factory', arch_kwargs={...})."
)

#: packages whose functions a checkpoint may not name as its factory without trust=True:
#: they hold loaders and process launchers that, called with the recorded arguments,
#: would run code from elsewhere
_DENIED_FACTORY_PACKAGES = {
    "torch", "numpy", "scipy", "pandas", "joblib", "dill", "cloudpickle", "yaml", "tensorscope",
    "transformers", "huggingface_hub", "safetensors", "IPython", "pip", "setuptools", "_pytest", "pytest",
}


def _check_file_factory(ref: str, path: str, trust: bool) -> None:
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
    if top in _DENIED_FACTORY_PACKAGES and not ref.startswith("tensorscope.examples:"):
        raise untrusted
    if not inspect.isfunction(factory) or getattr(factory, "__module__", None) != mod_name:
        raise untrusted  # a builtin, or a function re-exported from elsewhere


def _architecture(
    rec: Mapping[str, Any], path: str, model: Any, arch: Any, arch_kwargs: Any, trust: bool
) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """(a fresh uncompressed network, its arch record, how it was obtained)."""
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
            f"arguments, and save() got no arch=). {_NO_ARCH_HINT}"
        )
    ref = file_arch["ref"]
    kwargs = arch_kwargs if arch_kwargs is not None else file_arch.get("kwargs", {})
    try:
        _check_file_factory(ref, path, trust)
        net = build_arch(ref, kwargs)
    except ArchitectureError as e:
        raise ArchitectureError(
            f"{e}. The checkpoint {path!r} was saved from architecture {ref!r}: make that module "
            f"importable (install its package, or add its folder to sys.path), or {_NO_ARCH_HINT[0].lower()}"
            f"{_NO_ARCH_HINT[1:]}"
        ) from e
    return net, get_arch(net), f"architecture {ref!r}"


def _fmt_keys(keys: list, n: int = 5) -> str:
    shown = ", ".join(map(str, keys[:n]))
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _load_state(
    net: nn.Module, sd: dict[str, Any], path: str, source: str, *, strict: bool = True
) -> None:
    """Load ``sd`` into ``net``, naming missing, unexpected and wrong-shape keys."""
    expected = net.state_dict(keep_vars=True)
    if not any(k in expected for k in sd) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel / DDP
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if k in expected and isinstance(sd[k], Tensor) and isinstance(expected[k], Tensor)
        and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    # torch's load_state_dict would cast these silently (int -> float, complex -> real drops
    # the imaginary part) or fail deep inside (sparse, meta): garbage weights, not an error
    not_dense = [f"{k}: {v.layout} on {v.device}" for k, v in sd.items()
                 if isinstance(v, Tensor) and (v.layout != torch.strided or v.device.type == "meta")]
    wrong_dtype = [
        f"{k}: file {sd[k].dtype} vs model {expected[k].dtype}"
        for k in sd
        if k in expected and isinstance(sd[k], Tensor) and isinstance(expected[k], Tensor)
        and _dtype_kind(sd[k]) != _dtype_kind(expected[k])
    ]
    problems = []
    if missing and strict:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_fmt_keys(wrong)}")
    if not_dense:
        problems.append(f"not dense tensors: {_fmt_keys(not_dense)}")
    if wrong_dtype:
        problems.append(f"wrong dtypes: {_fmt_keys(wrong_dtype)}")
    if problems:
        raise CheckpointError(
            f"the checkpoint {path!r} does not match {source}: " + "; ".join(problems)
            + ". Check that the architecture (and its arguments) is the one the weights were saved from."
        )
    if not strict and (missing or unexpected):
        warnings.warn(
            f"loading {path!r} into {source} with strict=False: "
            + "; ".join(
                s for s in (
                    f"missing keys: {_fmt_keys(missing)}" if missing else "",
                    f"unexpected keys: {_fmt_keys(unexpected)}" if unexpected else "",
                ) if s
            ),
            stacklevel=3,
        )
    # keep the saved dtypes (a float16 checkpoint stays float16); .data keeps tied params tied
    for k, t in expected.items():
        v = sd.get(k)
        if isinstance(t, Tensor) and isinstance(v, Tensor) and t.dtype != v.dtype and (
            t.is_floating_point() and v.is_floating_point() or t.is_complex() and v.is_complex()
        ):
            t.data = t.data.to(v.dtype)
    try:
        net.load_state_dict(sd, strict=strict)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint {path!r} does not match {source}: {e}") from None


def _dtype_kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer"


def _non_finite(v: Any) -> bool:
    if not (isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel()):
        return False
    if v.layout != torch.strided or v.device.type == "meta":
        return False  # refused by _load_state
    if v.dtype.itemsize == 1:  # float8 types have no isfinite kernel
        v = v.float()
    return not bool(torch.isfinite(v).all())


def _warn_non_finite(sd: Mapping[str, Any], path: str) -> None:
    bad = [k for k, v in sd.items() if _non_finite(v)]
    if bad:
        warnings.warn(
            f"{path!r}: tensor(s) {_fmt_keys(bad)} hold NaN or Inf; loaded as saved",
            NonFiniteWarning,
            stacklevel=3,
        )


def _finish(net: nn.Module, map_location: Any) -> nn.Module:
    if map_location is not None and not (isinstance(map_location, str) and map_location == "cpu"):
        if not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"map_location must be a device name or torch.device; got {type(map_location).__name__}")
        net = net.to(map_location)
    return net.eval()


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
    limit = _max_bytes(max_bytes)
    size = _check_file(path, limit)
    kind = _sniff(path, size)
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
    net, arch_rec, source = _architecture(rec, path, model, arch, arch_kwargs, trust)
    already = plan_of(net)
    if already is not None:  # model= was a compressed model
        if plan is None or already.to_dict() != plan.to_dict() or bool(getattr(net, FOLD_ATTR, False)) != fold_bn:
            raise CheckpointError(
                f"model= for {path!r} must be the original, uncompressed architecture; the one given "
                f"was already compressed with a different plan ({already!r})"
            )
    elif plan is not None or fold_bn:
        try:
            apply_skeleton(net, plan if plan is not None else Plan(), fold_bn=fold_bn)
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
    if arch_rec is not None:
        set_arch(net, arch_rec["ref"], arch_rec.get("kwargs") or {})
    return _finish(net, map_location)


def describe(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, Any]:
    """The record of a tensorscope checkpoint, without reading its tensors.

    Returns the header's ``"tensorscope"`` record (format, versions, plan, arch, fold_bn,
    dtype, created, user, ...) plus ``"file"``: ``{"path", "bytes", "tensors", "params"}``.
    """
    path = os.fspath(path)
    limit = _max_bytes(max_bytes)
    size = _check_file(path, limit)
    kind = _sniff(path, size)
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


# ---- a user's network ---------------------------------------------------------------------


def _check_zip(path: str, limit: int) -> None:
    """Refuse a zip whose entries declare more than ``limit`` bytes once unpacked."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path!r} starts like a torch.save (zip) file but its zip directory cannot be read "
            f"(truncated or corrupt?): {e}"
        ) from None
    if len(infos) > MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{path!r} holds {len(infos):,} zip entries; more than {MAX_ZIP_ENTRIES:,} are refused")
    total = sum(i.file_size for i in infos)
    if total > limit:
        raise FileTooLargeError(
            f"{path!r} declares {total:,} bytes once unpacked ({len(infos)} zip entries; a zip bomb?); "
            f"{_limit_hint(limit)}"
        )


def _unsafe_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))[:8]
    except Exception:
        return []


def _torch_load(path: str, kind: str, limit: int, trust: bool) -> Any:
    """torch.load, always with weights_only spelled out; pickled code only with trust=True."""
    if kind == "torch_zip":
        _check_zip(path, limit)
    try:
        # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes
        # the default, so it cannot weaken this call
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            found = _unsafe_globals(path)
            names = f" (it references {', '.join(found)})" if found else ""
            raise UntrustedFileError(
                f"{path!r} holds pickled Python objects beyond tensors{names}: loading it would "
                f"execute code from the file. Pass trust=True only for a file you trust (you made "
                f"it, or its source is trustworthy), or save a state_dict instead: "
                f"torch.save(model.state_dict(), path) or tensorscope.save(model, path)."
            ) from None
        weights_only_error = e
    except Exception as e:  # corrupt zip, truncated pickle, bare EOFError ...
        raise CheckpointError(f"cannot read {path!r} as a torch.save file: {type(e).__name__}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts the file
    except Exception as e:
        raise CheckpointError(
            f"cannot unpickle {path!r} even with trust=True: {type(e).__name__}: {e} (the classes it "
            f"pickled must be importable under the same names). Safe load error: {weights_only_error}"
        ) from None


_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "module")


def _state_dict_of(obj: Any, path: str) -> Any:
    """A state dict (or a whole module) from what torch.load returned."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            v = obj.get(key) if all(isinstance(k, str) for k in obj) else None
            if isinstance(v, nn.Module):
                return v
            if isinstance(v, Mapping) and v and any(isinstance(x, Tensor) for x in v.values()):
                return dict(v)
        if obj and all(isinstance(k, str) for k in obj) and any(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(
        f"{path!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors, or a dict with "
        f"a 'state_dict' or 'model' entry holding one)"
    )


def _user_arch(arch: Any, arch_kwargs: Any) -> tuple[nn.Module, str]:
    if isinstance(arch, nn.Module):
        return copy.deepcopy(arch), f"the architecture given ({type(arch).__name__})"
    if isinstance(arch, str):
        return build_arch(arch, arch_kwargs), f"architecture {arch!r}"
    raise TypeError(f"arch must be 'package.module:factory' or an nn.Module; got {type(arch).__name__}")


def _dir_size(folder: str, limit: int) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
            if total > limit:
                raise FileTooLargeError(f"the folder {folder!r} holds more than {limit:,} bytes; {_limit_hint(limit)}")
    return total


def _load_hf_dir(folder: str, limit: int, trust: bool) -> nn.Module:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{folder!r} is a folder without config.json: not a Hugging Face model folder. Pass a "
            f"weights file (.safetensors, .pt, .pth) instead."
        )
    _dir_size(folder, limit)
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(
            f"{folder!r} is a Hugging Face model folder; reading it needs the transformers package: "
            f"pip install 'tensorscope[transformers]'"
        ) from None
    try:
        if os.path.getsize(cfg_path) > 16 << 20:
            raise CheckpointError(f"{cfg_path!r} is over 16 MB; not a model config")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {cfg_path!r}: {e}") from None
    names = cfg.get("architectures") if isinstance(cfg, dict) else None
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    auto = "AutoModel"
    for n in names:
        if n.endswith("ForSequenceClassification"):
            auto = "AutoModelForSequenceClassification"
        elif n.endswith("ForCausalLM") or n.endswith("LMHeadModel"):
            auto = "AutoModelForCausalLM"
        elif n.endswith("ForMaskedLM"):
            auto = "AutoModelForMaskedLM"
        elif n.endswith("ForTokenClassification"):
            auto = "AutoModelForTokenClassification"
        elif n.endswith("ForImageClassification"):
            auto = "AutoModelForImageClassification"
        if auto != "AutoModel":
            break
    cls = getattr(transformers, auto, None) or transformers.AutoModel
    try:
        # a local folder only: never download; its own code runs only with trust=True
        return cls.from_pretrained(folder, local_files_only=True, trust_remote_code=bool(trust))
    except Exception as e:
        raise CheckpointError(f"transformers could not load {folder!r} with {cls.__name__}: {type(e).__name__}: {e}") from None


def load_model(
    weights: str | os.PathLike | None = None,
    arch: str | nn.Module | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    map_location: Any = "cpu",
    strict: bool = True,
    max_bytes: int | None = None,
) -> nn.Module:
    """Load a user's network, in eval mode.

    ``weights`` may be:

    * a tensorscope checkpoint (read with :func:`load`);
    * a ``.safetensors`` state dict, with ``arch`` building the network;
    * a ``torch.save`` state dict (``.pt``/``.pth``; also a dict with a ``"state_dict"`` or
      ``"model"`` entry), read with ``weights_only=True``, with ``arch``;
    * a ``torch.save`` of a whole module: pickled code, read only with ``trust=True``;
    * a Hugging Face model folder (``config.json``), with the ``transformers`` extra; never
      downloads;
    * ``None``: just build ``arch`` (random initialisation).

    ``arch`` is ``"package.module:factory"`` (with ``arch_kwargs``) or an ``nn.Module``
    instance (deep-copied). ``strict=False`` tolerates missing and unexpected keys (with a
    warning); wrong shapes are always an error.
    """
    limit = _max_bytes(max_bytes)
    if weights is None:
        if arch is None:
            raise TypeError("load_model needs weights=, arch= or both")
        net, _ = _user_arch(arch, arch_kwargs)
        return _finish(net, map_location)
    path = os.fspath(weights)
    if os.path.isdir(path):
        return _finish(_load_hf_dir(path, limit, trust), map_location)
    size = _check_file(path, limit)
    kind = _sniff(path, size)
    if kind == "safetensors" or (kind == "unknown" and path.endswith(".safetensors")):
        h = _read_header(path, size, limit)
        rec = _record(h)
        if rec is not None:
            model = arch if isinstance(arch, nn.Module) else None
            ref = arch if isinstance(arch, str) else None
            return _load_checkpoint(h, rec, model=model, arch=ref, arch_kwargs=arch_kwargs,
                                    map_location=map_location, trust=trust)
        if arch is None:
            raise CheckpointError(
                f"{path!r} holds weights only (a safetensors state dict); pass the architecture "
                f"they belong to: load_model({path!r}, arch='package.module:factory')"
            )
        sd: Any = _read_tensors(h)
        net, source = _user_arch(arch, arch_kwargs)
    elif kind in ("torch_zip", "torch_pickle"):
        obj = _state_dict_of(_torch_load(path, kind, limit, trust), path)
        if isinstance(obj, nn.Module):
            return _finish(obj, map_location)
        if arch is None:
            raise CheckpointError(
                f"{path!r} holds a state dict (weights only); pass the architecture they belong to: "
                f"load_model({path!r}, arch='package.module:factory')"
            )
        sd = obj
        net, source = _user_arch(arch, arch_kwargs)
    else:
        raise CheckpointError(
            f"{path!r} is neither a safetensors file, a torch.save file nor a Hugging Face folder "
            f"(random bytes, or a truncated or corrupt file?)"
        )
    _warn_non_finite(sd, path)
    _load_state(net, sd, path, source, strict=strict)
    return _finish(net, map_location)


# ---- export -------------------------------------------------------------------------------

_FORMATS = {
    "exported_program": "exported_program", "export": "exported_program", "torch.export": "exported_program",
    "pt2": "exported_program", "ep": "exported_program",
    "torchscript": "torchscript", "jit": "torchscript", "script": "torchscript",
    "onnx": "onnx",
}
_SUFFIX = {"exported_program": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


def _split(example_input: Any) -> tuple[tuple, dict]:
    try:
        from .data import split_batch
    except ImportError:  # pragma: no cover - data.py is part of the package
        split_batch = None
    if split_batch is not None:
        b = split_batch(example_input)
        return tuple(b.args), dict(b.kwargs)
    if isinstance(example_input, (tuple, list)):  # (inputs, targets)
        example_input = example_input[0]
    if isinstance(example_input, Tensor):
        return (example_input,), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    raise TensorscopeError(f"example_input must be a tensor, a dict of tensors or (inputs, targets); got {type(example_input).__name__}")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for t in (*args, *kwargs.values()):
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Spec marking dim 0 of every input with the batch size as one shared dynamic dim."""
    b = _batch_size(args, kwargs)
    if b is None:
        return None
    dim = torch.export.Dim("batch")

    def spec(t: Any) -> Any:
        return {0: dim} if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


def _tolerances(expected: Any) -> dict[str, float]:
    leaves = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            leaves.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)

    walk(expected)
    if leaves and all(t.dtype in (torch.float32, torch.complex64) for t in leaves if t.is_floating_point() or t.is_complex()):
        return {"rtol": 1e-4, "atol": 1e-4}
    return {}


def _verify(got: Any, expected: Any, fmt: str, path: str) -> None:
    try:
        torch.testing.assert_close(got, expected, **_tolerances(expected))
    except (AssertionError, TypeError, ValueError) as e:
        raise TensorscopeError(
            f"the {fmt} export written to {path!r} does not reproduce the model's output on the "
            f"example input; nothing was written. {e}"
        ) from None


def _export_program(model: nn.Module, args: tuple, kwargs: dict, tmp: str, dynamic: bool) -> None:
    ep = None
    if dynamic:
        try:
            t_args, t_kwargs = args, kwargs
            if _batch_size(args, kwargs) == 1:
                # torch.export specializes a size-1 dimension to the constant 1: trace with the
                # sample twice (the program still runs any batch size, 1 included)
                def twice(t: Any) -> Any:
                    return torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 else t

                t_args = tuple(twice(a) for a in args)
                t_kwargs = {k: twice(v) for k, v in kwargs.items()}
            shapes = _dynamic_shapes(model, t_args, t_kwargs)
            if shapes is not None:
                ep = torch.export.export(model, t_args, t_kwargs or None, dynamic_shapes=shapes)
        except Exception as e:
            warnings.warn(
                f"export with a dynamic batch dimension failed ({type(e).__name__}: {str(e)[:300]}); "
                f"exporting with the example input's fixed shapes instead",
                stacklevel=3,
            )
            ep = None
    if ep is None:
        ep = torch.export.export(model, args, kwargs or None)
    torch.export.save(ep, tmp)


def _export_torchscript(model: nn.Module, args: tuple, kwargs: dict, tmp: str) -> None:
    if kwargs:
        sig = inspect.signature(model.forward)
        all_kwargs = dict(sig.bind(*args, **kwargs).arguments)
        trace_kw: dict[str, Any] = {"example_kwarg_inputs": all_kwargs}
    else:
        trace_kw = {"example_inputs": args}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(model, check_trace=False, **trace_kw)
        except RuntimeError:  # outputs that are dicts or lists need strict=False
            traced = torch.jit.trace(model, check_trace=False, strict=False, **trace_kw)
        torch.jit.save(traced, tmp)


def _export_onnx(model: nn.Module, args: tuple, kwargs: dict, tmp: str, dynamic: bool, expected: Any, path: str) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "format='onnx' needs the onnx package: pip install 'tensorscope[onnx]'"
        ) from None
    shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    torch.onnx.export(model, args, tmp, kwargs=kwargs or None, dynamic_shapes=shapes)
    try:
        import onnxruntime as ort
    except ImportError:
        import onnx

        onnx.checker.check_model(tmp)
        warnings.warn(
            "the ONNX export was checked for validity but its outputs were not compared "
            "(install onnxruntime to compare them)",
            stacklevel=3,
        )
        return
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    values = [a for a in args] + list(kwargs.values())
    feeds = {n: v.detach().cpu().numpy() for n, v in zip(names, values) if isinstance(v, Tensor)}
    outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
    flat, _ = torch.utils._pytree.tree_flatten(expected)
    _verify(outs, [t for t in flat if isinstance(t, Tensor)], "onnx", path)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    *,
    format: str = "exported_program",
    dynamic_batch: bool = True,
) -> str:
    """Write ``model`` as a file that torch alone runs (no tensorscope needed), and check it.

    Formats: ``"exported_program"`` (``torch.export``; load with
    ``torch.export.load(path).module()``; the batch dimension is dynamic when possible),
    ``"torchscript"`` (``torch.jit.trace``; load with ``torch.jit.load``) and ``"onnx"``
    (needs ``pip install 'tensorscope[onnx]'``). ``example_input`` follows the batch
    convention (a tensor, a dict of keyword tensors, or ``(inputs, targets)``). A path
    without an extension gets ``.pt2`` / ``.pt`` / ``.onnx``.

    The file is written atomically and verified: it is reloaded and its output on the
    example input compared with the model's (``rtol = atol = 1e-4`` for float32); a
    mismatch raises :class:`TensorscopeError` and leaves no file. Returns the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects an nn.Module; got {type(model).__name__}")
    fmt = _FORMATS.get(str(format).lower().replace("-", "_"))
    if fmt is None:
        raise TensorscopeError(f"unknown export format {format!r}; choose 'exported_program', 'torchscript' or 'onnx'")
    path = os.fspath(path)
    if not os.path.splitext(os.path.basename(path))[1]:
        path += _SUFFIX[fmt]
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; export needs a file path")
    args, kwargs = _split(example_input)
    if fmt == "onnx":  # fail before any work when the extra is missing
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise MissingExtraError("format='onnx' needs the onnx package: pip install 'tensorscope[onnx]'") from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*args, **kwargs)
        suffix = os.path.splitext(path)[1]
        with atomic_path(path, suffix=suffix) as tmp:
            if fmt == "exported_program":
                _export_program(model, args, kwargs, tmp, dynamic_batch)
                loaded = torch.export.load(tmp).module()
                with torch.no_grad():
                    got = loaded(*args, **kwargs)
                _verify(got, expected, fmt, path)
            elif fmt == "torchscript":
                _export_torchscript(model, args, kwargs, tmp)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    loaded = torch.jit.load(tmp, map_location="cpu")
                with torch.no_grad():
                    got = loaded(*args, **kwargs)
                _verify(got, expected, fmt, path)
            else:
                _export_onnx(model, args, kwargs, tmp, dynamic_batch, expected, path)
    finally:
        model.train(was_training)
    return path
