"""The explorer's state: one network, one plan, and everything the dashboard shows about them.

:class:`ExplorerState` is a ``param.Parameterized`` object with no Panel import: the
dashboard (``apps/explorer.py``) is a thin view over it, the tests drive it directly and a
notebook can use it on its own. Each browser session owns one state object; the only things
shared between sessions are immutable (a built-in example's weights, factorizations keyed by
a hash of the weights in :data:`tensorscope._cache.factor_cache`) and the worker threads.

How it stays fast (see DESIGN.md, "How the explorer stays fast"):

* every layer's spectrum and error-versus-parameters curves are computed once, when a
  network is loaded; a rank change only counts parameters and FLOPs from the layer's
  geometry and reads errors off those curves (no SVD, no factorization);
* the quality preview runs the original architecture with reconstructed weights on a fixed
  evaluation sample, in a worker thread, with at most one run per session in flight: a
  newer request supersedes an older one (it stops between chunks and the newest plan is
  evaluated next);
* after a change confined to one layer, the preview re-runs only the part of the network
  that depends on that layer, from activations recorded on the previous run (a
  ``torch.fx`` trace; networks fx cannot trace are run whole).

Methods that may be slow (:meth:`ExplorerState.load_example`, :meth:`open_ready`,
:meth:`load_upload`, :meth:`refresh_quality`, :meth:`apply_budget`, :meth:`export_bytes`,
:meth:`measure_latency`, :meth:`run_iterative`, :meth:`load_pretrained`, :meth:`load_folder`) are blocking and thread-safe; the view submits them to
:data:`EXECUTOR`. With ``executor=None`` (the default, for tests and notebooks) plan edits
refresh the quality synchronously, and a moved budget or preset setting re-plans at once.

The modules, one job each (``ExplorerState`` combines the job mixins; none imports it):

- ``limits``: server limits and settings, the worker threads, upload size checks. The
  limits are read from that module when used: change them there
  (``tensorscope.explorer.limits.MAX_UPLOAD_MB = 10``), not on this package.
- ``common``: what the explorer knows about a layer, rank text, the spectrum overview.
- ``evaluator``: the live preview's evaluator and the process-wide trace guard.
- ``session``: progress, busy flag, errors, worker threads (the mixins' common base).
- ``eval_data``, ``loading``: evaluation data; examples, in-memory networks, uploads.
- ``data_aware``: calibration data, data-aware mode, fine-tuning.
- ``quality``: the quality preview loop. ``exports``: the compressed model as a file.
- ``compare``: pinned configurations, compared side by side and restored.
- ``latency``: the compressed model timed against the original on the server.
- ``real``: pretrained networks next to the examples, Hugging Face folders on the server's
  disk (only under ``TENSORSCOPE_EXPLORER_HF_ROOT``).
- ``stages``: iterative compression (``ts.iterative``) run from the page, one row per stage.
- ``state``: :class:`ExplorerState` itself: plan editing, what a page opens on
  (:meth:`~ExplorerState.open_ready`), settings that re-plan as they move, the ranks view's rows.

What the view and tests read is public: parameters, and ``eval_inputs``, ``layer_info``,
``layer_spectrum``, ``layer_cost``, ``rank_axes``, ``axis_values``, ``rank_rows``,
``spectrum_data``, ``comparison``, ``preview_stats``, ... (the private attributes are the
mixins' shared storage).
"""

from __future__ import annotations

# what code outside imports from here (the app, tests, benchmarks, notebooks), private names
# included; the limits are copies: change them on ``limits`` (see above)
from ..densify import probe_dense as _probe_dense  # noqa: F401
from ..units import format_bytes, format_count
from . import limits  # noqa: F401
from .common import DENSE, _Layer  # noqa: F401
from .evaluator import TRACE_GUARD, _EvalData, _Evaluator, _TraceGuard  # noqa: F401
from .exports import EXPORT_KINDS
from .limits import (  # noqa: F401
    CALIBRATION_SAMPLES,
    CALIBRATION_TRAIN_SAMPLES,
    CHUNK,
    EVAL_SAMPLES,
    EXECUTOR,
    FINETUNE_STEPS,
    MAX_CP_WORK,
    MAX_HISTORY,
    MAX_LAYER_PARAMS,
    MAX_UPLOAD_MB,
)
from .loading import _example_memo  # noqa: F401
from .session import _release_memory  # noqa: F401
from .state import ExplorerState

__all__ = [
    "ExplorerState",
    "EXECUTOR",
    "MAX_UPLOAD_MB",
    "EVAL_SAMPLES",
    "EXPORT_KINDS",
    "format_count",
    "format_bytes",
]
