"""What one explorer server allows and how it runs: limits, sample counts, worker threads.

The limits are read where they are used (``limits.MAX_UPLOAD_MB``, not a copy taken at
import), so a test or a server script can change them on this module at run time.
"""

from __future__ import annotations

import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import DataError, FileTooLargeError
from ..methods import get_method
from .common import _Layer, _rank_text

#: uploads over this many MB are refused (env ``TENSORSCOPE_MAX_UPLOAD_MB``, default 50)
MAX_UPLOAD_MB = float(os.environ.get("TENSORSCOPE_MAX_UPLOAD_MB", "50") or 50)
#: the most work one request may start on a shared server: CP-ALS costs about rank x weight
#: entries per sweep (env ``TENSORSCOPE_EXPLORER_MAX_CP_WORK``), and no factorized layer may
#: hold more parameters than this (env ``TENSORSCOPE_EXPLORER_MAX_LAYER_PARAMS``)
MAX_CP_WORK = float(os.environ.get("TENSORSCOPE_EXPLORER_MAX_CP_WORK", "5e8") or 5e8)
MAX_LAYER_PARAMS = float(os.environ.get("TENSORSCOPE_EXPLORER_MAX_LAYER_PARAMS", "5e7") or 5e7)
#: the live preview evaluates at most this many samples
EVAL_SAMPLES = 1000
#: samples of the calibration batch used when there is no evaluation data
CALIBRATION_SAMPLES = 256
#: training samples used as calibration data (data-aware factors, fine-tuning) for the examples
CALIBRATION_TRAIN_SAMPLES = 512
#: fine-tuning steps the explorer's button runs by default
FINETUNE_STEPS = 150
#: samples per forward pass of the preview: small enough for the activations to stay in cache
#: (resnet8 on 2 cores: 1000 images in chunks of 250 run 2.5x faster than in one batch)
CHUNK = 250
#: the configurations kept in the session's history
MAX_HISTORY = 500
#: the most elements one sample of a typed input shape may have
MAX_SAMPLE_NUMEL = 10_000_000

#: worker threads shared by every session (the state of each session is its own)
EXECUTOR = ThreadPoolExecutor(
    max_workers=int(os.environ.get("TENSORSCOPE_EXPLORER_WORKERS", "4")),
    thread_name_prefix="tensorscope-explorer",
)


def _check_work(name: str, layer: _Layer, method: str, rank: Any) -> None:
    """Refuse a request that would tie up a shared server (see MAX_CP_WORK, MAX_LAYER_PARAMS)."""
    geom = layer.geometry
    params = get_method(method).count_params(geom, rank)
    if params > MAX_LAYER_PARAMS:
        raise DataError(f"{name}: {method} at rank {_rank_text(rank)} would hold {params:,} parameters; this server "
                        f"allows at most {MAX_LAYER_PARAMS:,.0f} per layer (TENSORSCOPE_EXPLORER_MAX_LAYER_PARAMS)")
    if method == "cp":
        numel = layer.module.weight.numel()
        if rank * numel > MAX_CP_WORK:
            top = max(1, int(MAX_CP_WORK // numel))
            raise DataError(f"{name}: CP rank {rank} on {numel:,} weights is more work than this server allows per "
                            f"request; choose a rank of at most {top} (or raise TENSORSCOPE_EXPLORER_MAX_CP_WORK)")


# ---- uploads ----------------------------------------------------------------------------------


def _check_size(data: bytes, what: str) -> None:
    limit = MAX_UPLOAD_MB * (1 << 20)
    if len(data) > limit:
        raise FileTooLargeError(
            f"{what} is {len(data) / (1 << 20):.1f} MB; files over {MAX_UPLOAD_MB:g} MB are refused "
            "(set TENSORSCOPE_MAX_UPLOAD_MB on the server to change the limit)"
        )
    if len(data) == 0:
        raise DataError(f"{what} is empty (0 bytes)")


def _check_zip_bytes(data: bytes, what: str) -> None:
    """A torch.save file is a zip: refuse one whose entries expand past the upload limit."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return
    limit = MAX_UPLOAD_MB * (1 << 20) * 4
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{what} is a corrupt zip/torch file: {e}") from None
    if total > limit:
        raise FileTooLargeError(f"{what} expands to {total / (1 << 20):.0f} MB when unpacked; refused")
