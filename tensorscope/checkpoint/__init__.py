"""Checkpoints and users' networks: save, load, describe and load_model, by concern.

* :mod:`.format`: the tensorscope checkpoint (one safetensors file, its header checked
  before any tensor is read): :func:`save`, :func:`load`, :func:`describe`;
* :mod:`.user_models`: users' weights (state dicts, pickled modules with ``trust=True``,
  Hugging Face folders): :func:`load_model`;
* :mod:`.state`: loading a state dict into a network, naming every mismatch;
* :mod:`.folder`: a folder of shards that ``compress(path, plan, out=folder)`` wrote
  (:func:`load` takes a file or such a folder).

Beside this package: :mod:`tensorscope.export` (:func:`export`, re-exported here),
:mod:`tensorscope.file_limits` (size limits, sniffing, zip bombs) and
:mod:`tensorscope.arch_trust` (which recorded architecture references may be called).
The public names, and the private ones other modules and tests use, are importable
from ``tensorscope.checkpoint`` as before.
"""

from __future__ import annotations

from ..arch_trust import check_file_factory as _check_file_factory
from ..errors import MissingExtraError
from ..export import export
from ..file_limits import DEFAULT_MAX_BYTES, ENV_MAX_BYTES, MAX_ZIP_ENTRIES
from ..file_limits import check_file as _check_file
from ..file_limits import check_zip as _check_zip
from ..file_limits import limit_hint as _limit_hint
from ..file_limits import max_bytes as _max_bytes
from ..file_limits import sniff as _sniff
from .format import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    MAX_USER_METADATA_CHARS,
    META_KEY,
    _st_save_file,  # save() calls it from here: tests replace it to make a write fail
    describe,
    save,
)
from .folder import load  # a file (format.load), or a folder of shards that compress wrote
from .state import NonFiniteWarning
from .user_models import load_model

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
