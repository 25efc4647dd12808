"""What one explorer server allows and how it runs: limits, sample counts, worker threads.

The limits are read where they are used (``limits.MAX_UPLOAD_MB``, not a copy taken at
import), so a test or a server script can change them on this module at run time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import file_limits
from ..errors import DataError
from ..methods import get_method
from .common import _Layer

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
#: the share of the parameters the plan a page opens on keeps (env ``TENSORSCOPE_EXPLORER_OPEN_KEEP``)
OPEN_KEEP = float(os.environ.get("TENSORSCOPE_EXPLORER_OPEN_KEEP", "0.25") or 0.25)
#: seconds a budget or preset slider waits for a drag to settle before planning
SLIDER_DEBOUNCE_S = 0.15
#: pinned configurations kept per session
MAX_PINS = 12
#: changed samples a comparison lists (with their images for image data)
MAX_CHANGED_SHOWN = 24
#: latency: timed runs per case (medians), the batch besides batch 1, and the most work one
#: measurement may start: (original + compressed FLOPs) x (1 + batch) x runs, in GFLOP
#: (env ``TENSORSCOPE_EXPLORER_MAX_LATENCY_GFLOP``)
LATENCY_REPEATS = 15
LATENCY_BATCH = 32
MAX_LATENCY_GFLOP = float(os.environ.get("TENSORSCOPE_EXPLORER_MAX_LATENCY_GFLOP", "200") or 200)

#: the pretrained networks' evaluation and calibration samples (the preview runs a real network
#: on every change; on a 2-core machine shared with other jobs, 34 EfficientNet-Lite0 crops took up to
#: 20 s and 34 MiniLM sentences 2.2 s; env
#: ``TENSORSCOPE_EXPLORER_REAL_EVAL``)
REAL_EVAL_SAMPLES = int(os.environ.get("TENSORSCOPE_EXPLORER_REAL_EVAL", "24") or 24)
REAL_CALIBRATION_SAMPLES = 32
#: a model folder read from the server's disk may hold at most this many MB
#: (env ``TENSORSCOPE_EXPLORER_MAX_FOLDER_MB``)
MAX_FOLDER_MB = float(os.environ.get("TENSORSCOPE_EXPLORER_MAX_FOLDER_MB", "2048") or 2048)
#: stages an iterative compression from the page may run
MAX_STAGES = 6

#: worker threads shared by every session (the state of each session is its own)
EXECUTOR = ThreadPoolExecutor(
    max_workers=int(os.environ.get("TENSORSCOPE_EXPLORER_WORKERS", "4")),
    thread_name_prefix="tensorscope-explorer",
)


def _check_work(name: str, layer: _Layer, method: str, rank: Any, options: dict | None = None) -> None:
    """Refuse a request that would tie up a shared server (see MAX_CP_WORK, MAX_LAYER_PARAMS).

    The size cap holds for every method; the work cap for methods that declare their fitting
    work (``Method.work``: rank x weight entries for CP-ALS).
    """
    geom = layer.geometry
    m = get_method(method)
    text = m.rank_text(rank)
    params = m.count_params(geom, rank, options)
    if params > MAX_LAYER_PARAMS:
        raise DataError(f"{name}: {method} at rank {text} would hold {params:,} parameters; this server "
                        f"allows at most {MAX_LAYER_PARAMS:,.0f} per layer (TENSORSCOPE_EXPLORER_MAX_LAYER_PARAMS)")
    work = m.work(geom, rank, options)
    if work is None or work <= MAX_CP_WORK:
        return
    hint = "choose a lower rank"
    axes = m.rank_axes(geom, options)
    if len(axes) == 1:  # the largest rank within the cap (work grows with the rank)
        lo, hi = axes[0].low, m.axis_values(rank)[0]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (m.work(geom, m.rank_from_axes(geom, [mid], options), options) or 0) <= MAX_CP_WORK:
                lo = mid
            else:
                hi = mid - 1
        hint = f"choose a rank of at most {lo}"
    raise DataError(f"{name}: {method} at rank {text} is {work:.3g} units of fitting work (rank × weight entries), "
                    f"more than this server allows per request; {hint} (or raise TENSORSCOPE_EXPLORER_MAX_CP_WORK)")


# ---- uploads ----------------------------------------------------------------------------------


def _check_size(data: bytes, what: str) -> None:
    """An upload over the server's limit, or empty, is refused (read at call time: tests change it)."""
    file_limits.check_bytes_size(data, MAX_UPLOAD_MB * (1 << 20), what)


def _check_zip_bytes(data: bytes, what: str) -> None:
    """A torch.save file is a zip: refuse one whose entries expand past four times the upload limit."""
    file_limits.check_zip_bytes(data, MAX_UPLOAD_MB * (1 << 20) * 4, what)
