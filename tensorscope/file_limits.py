"""File size limits and sniffing: the one place that decides whether a file is read at all.

Checkpoints, users' weights files, data files and the explorer's uploads all pass through
here before anything parses them: a size limit on the file (or the uploaded bytes), a
refusal of directories, devices and empty files, a look at the first bytes to tell
safetensors from ``torch.save`` files, and a zip-bomb check on the sizes a zip declares
(a ``torch.save`` file is a zip) before it is unpacked.

This module sits at the bottom of the import graph: it imports nothing from tensorscope
but :mod:`tensorscope.errors`.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile

from .errors import CheckpointError, DataError, FileTooLargeError

__all__ = [
    "ENV_MAX_BYTES",
    "DEFAULT_MAX_BYTES",
    "MAX_ZIP_ENTRIES",
    "ENV_MAX_UPLOAD_MB",
    "max_bytes",
    "limit_hint",
    "check_file",
    "sniff",
    "zip_entries",
    "check_zip",
    "check_bytes_size",
    "check_zip_bytes",
]

#: environment variable overriding the default size limit (bytes)
ENV_MAX_BYTES = "TENSORSCOPE_MAX_FILE_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
#: a zip (torch.save file) with more entries than this is refused
MAX_ZIP_ENTRIES = 100_000
#: environment variable the explorer reads its upload limit from (MB), named in messages
ENV_MAX_UPLOAD_MB = "TENSORSCOPE_MAX_UPLOAD_MB"

#: what reading a zip's directory raises on a truncated or corrupt zip
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError)


def max_bytes(max_bytes: int | None) -> int:
    """The size limit in bytes: ``max_bytes`` if given, else env ``TENSORSCOPE_MAX_FILE_BYTES``, else 4 GiB."""
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


def limit_hint(limit: int) -> str:
    """The end of a "too large" message: the limit and how to raise it."""
    return f"the limit is {limit:,} bytes (raise it with max_bytes= or the environment variable {ENV_MAX_BYTES})"


def check_file(path: str, limit: int) -> int:
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
        raise FileTooLargeError(f"{path!r} is {size:,} bytes; {limit_hint(limit)}")
    if size == 0:
        raise CheckpointError(
            f"{path!r} is empty (0 bytes): not a checkpoint (an interrupted save or download?)"
        )
    return size


def sniff(path: str, size: int) -> str:
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


# ---- zips: what they declare once unpacked ------------------------------------------------


def zip_entries(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """(number of entries, bytes they declare once unpacked) of a zip on disk or in memory.

    Reads only the zip's central directory, never an entry. A truncated or corrupt zip
    raises what :mod:`zipfile` raises (one of ``zipfile.BadZipFile``, ``OSError``,
    ``ValueError``, ``EOFError`` ...); the checks below turn that into tensorscope's errors.
    """
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with zipfile.ZipFile(file) as zf:
        infos = zf.infolist()
    return len(infos), sum(i.file_size for i in infos)


def check_zip(path: str, limit: int) -> None:
    """Refuse a zip whose entries declare more than ``limit`` bytes once unpacked."""
    try:
        count, total = zip_entries(path)
    except _ZIP_ERRORS as e:
        raise CheckpointError(
            f"{path!r} starts like a torch.save (zip) file but its zip directory cannot be read "
            f"(truncated or corrupt?): {e}"
        ) from None
    if count > MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{path!r} holds {count:,} zip entries; more than {MAX_ZIP_ENTRIES:,} are refused")
    if total > limit:
        raise FileTooLargeError(
            f"{path!r} declares {total:,} bytes once unpacked ({count} zip entries; a zip bomb?); "
            f"{limit_hint(limit)}"
        )


# ---- uploads: bytes in memory -------------------------------------------------------------


def check_bytes_size(data: bytes, limit: float, what: str) -> None:
    """Refuse uploaded bytes over ``limit`` bytes (:class:`FileTooLargeError`) or empty (:class:`DataError`).

    ``what`` names the upload in the message (``"evaluation data 'x.pt'"``); the message
    gives sizes in MB and names the server's ``TENSORSCOPE_MAX_UPLOAD_MB``.
    """
    if len(data) > limit:
        raise FileTooLargeError(
            f"{what} is {len(data) / (1 << 20):.1f} MB; files over {limit / (1 << 20):g} MB are refused "
            f"(set {ENV_MAX_UPLOAD_MB} on the server to change the limit)"
        )
    if len(data) == 0:
        raise DataError(f"{what} is empty (0 bytes)")


def check_zip_bytes(data: bytes, limit: float, what: str) -> None:
    """Refuse uploaded bytes that are a zip (a torch.save file) declaring over ``limit`` bytes unpacked.

    Bytes that are not a zip pass; a corrupt zip is a :class:`DataError`, one that expands
    past ``limit`` a :class:`FileTooLargeError`.
    """
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return
    try:
        _count, total = zip_entries(data)
    except _ZIP_ERRORS as e:
        raise DataError(f"{what} is a corrupt zip/torch file: {e}") from None
    if total > limit:
        raise FileTooLargeError(f"{what} expands to {total / (1 << 20):.0f} MB when unpacked; refused")
