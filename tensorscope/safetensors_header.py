"""The safetensors header, read and checked before any tensor is: what every reader relies on.

A safetensors file is ``[8 bytes: little-endian u64 N][N bytes: JSON header][tensor data]``.
:func:`_read_header` parses the header and refuses one that lies about its length, shapes,
offsets or dtypes, or whose tensors do not tile the data section exactly, without
allocating what it declares. Tensorscope checkpoints (:mod:`tensorscope.checkpoint.format`)
and weights streamed from disk (:mod:`tensorscope.sources`) both read through it.

This module sits low in the import graph: it imports nothing from tensorscope but
:mod:`tensorscope.errors` and :mod:`tensorscope.file_limits`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from . import file_limits
from .errors import CheckpointError, FileTooLargeError

__all__ = ["MAX_HEADER_BYTES", "st_dtype", "torch_dtype"]

#: the largest header safetensors itself accepts
MAX_HEADER_BYTES = 100_000_000

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
        raise FileTooLargeError(f"{path!r} declares {pos:,} bytes of tensors; {file_limits.limit_hint(limit)}")
    return _Header(path, size, n, tensors, metadata)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    return getattr(torch, _ST_DTYPES[name][0])


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    want = str(dtype).replace("torch.", "")
    for name, (tname, _) in _ST_DTYPES.items():
        if tname == want:
            return name
    raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file")
