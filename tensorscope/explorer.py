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

Methods that may be slow (:meth:`ExplorerState.load_example`, :meth:`load_upload`,
:meth:`refresh_quality`, :meth:`apply_budget`, :meth:`export_bytes`) are blocking and
thread-safe; the view submits them to :data:`EXECUTOR`. With ``executor=None`` (the
default, for tests and notebooks) plan edits refresh the quality synchronously.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
import threading
import time
import warnings
import zipfile
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import param
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import examples as _examples
from .budget import plan_for_budget
from .data import parse_data_file
from .units import format_bytes, format_count
from .errors import DataError, FileTooLargeError, TensorscopeError
from .inventory import LayerInfo, count_flops, count_params, inspect
from .methods import get_method
from .methods.base import BreakEvenWarning
from .plan import Plan, ResolvedLayer
from .ranks import energy_rank, vbmf_rank
from .spectra import Spectrum, Tradeoff, layer_spectrum, tradeoff, tucker2_retained
from ._arch import get_arch
from .surgery import plan_of, set_submodule

__all__ = [
    "ExplorerState",
    "EXECUTOR",
    "MAX_UPLOAD_MB",
    "EVAL_SAMPLES",
    "EXPORT_KINDS",
    "format_count",
    "format_bytes",
]

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
#: methods the budget planner and the presets choose between
PLANNER_METHODS = ("svd", "tucker2")
EXPORT_KINDS = ("checkpoint", "exported_program", "torchscript", "plan")
#: a dense layer in the method selector
DENSE = "dense"

#: worker threads shared by every session (the state of each session is its own)
EXECUTOR = ThreadPoolExecutor(
    max_workers=int(os.environ.get("TENSORSCOPE_EXPLORER_WORKERS", "4")),
    thread_name_prefix="tensorscope-explorer",
)


class _TraceGuard:
    """No forward pass while ``torch.fx`` traces, in any session.

    ``fx.symbolic_trace`` patches ``nn.Module.__call__`` for the whole process while it runs:
    a forward in another thread meanwhile fails with ``NameError: module is not installed as
    a submodule`` (reproduced every time with two threads). Work on the explorer's worker
    threads holds this guard shared; tracing holds it alone. A thread already holding it
    shared may trace (its own hold is set aside meanwhile), and waiting tracers go first, so
    a stream of evaluations cannot starve a session that is loading.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._tracing = False
        self._waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def running(self):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._tracing or self._waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def tracing(self):
        held = getattr(self._local, "depth", 0) > 0
        with self._cond:
            if held:
                self._readers -= 1
            self._waiting += 1
            while self._tracing or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                if held:
                    self._readers += 1
                self._cond.notify_all()


#: shared by every session of the process (see _TraceGuard)
TRACE_GUARD = _TraceGuard()


class _Superseded(Exception):
    """A quality refresh stopped because a newer plan was asked for."""


def _rank_text(rank: Any) -> str:
    if rank is None:
        return ""
    if isinstance(rank, (tuple, list)):
        return "×".join(str(int(r)) for r in rank) if len(rank) == 2 else "-".join(str(int(r)) for r in rank)
    return str(int(rank))


def _jsonable_rank(rank: Any) -> Any:
    return [int(r) for r in rank] if isinstance(rank, (tuple, list)) else int(rank)


# ---- per-layer data computed once per load --------------------------------------------------


@dataclass
class _Layer:
    """What the explorer knows about one decomposable layer, computed when a network loads."""

    info: LayerInfo
    module: nn.Module
    spectrum: Spectrum  # the "out" unfolding: what svd truncates
    spectrum_in: Spectrum | None  # conv only: the input-channel unfolding (Tucker-2's r_in)
    tradeoffs: dict[str, Tradeoff]  # methods with a cheap error curve (svd, tucker2)
    tucker_energy: np.ndarray | None  # retained energy of HOSVD at (r_out, r_in), all pairs
    norm2: float  # ||W||_F^2
    metrics: dict = field(default_factory=dict)  # the out spectrum's metrics (stable rank, ...), computed once
    # (spectrum, spectrum_in, tradeoffs, metrics) of the weights, and whitened by calibration data
    plain: tuple | None = None
    aware: tuple | None = None

    def __post_init__(self) -> None:
        if self.plain is None:
            self.plain = (self.spectrum, self.spectrum_in, self.tradeoffs, self.metrics)

    def use(self, view: tuple) -> None:
        """Show one view: the weights' spectra (``plain``) or the whitened ones (``aware``)."""
        self.spectrum, self.spectrum_in, self.tradeoffs, self.metrics = view

    @property
    def geometry(self):
        return self.info.geometry

    @property
    def methods(self) -> list[str]:
        return list(self.info.max_rank)


@dataclass
class _EvalData:
    """The fixed sample the preview evaluates on."""

    inputs: Tensor
    targets: Tensor | None
    description: str
    kind: str  # "held-out", "uploaded", "calibration"


@dataclass
class _Loaded:
    """A network ready to be installed in the state (built off the event loop, swapped in at once)."""

    model: nn.Module
    source: str
    example: str | None
    layers: dict[str, _Layer]
    skipped: list[LayerInfo]
    data: _EvalData | None
    data_choices: dict[str, _EvalData]
    evaluator: "_Evaluator | None"
    params: int
    flops: int | None
    nbytes: int
    plan: Plan
    messages: list[str] = field(default_factory=list)
    overview: Any = None
    calibration: tuple | None = None  # (inputs, labels or None, description): data-aware mode, fine-tuning


# ---- the live preview -------------------------------------------------------------------


class _Evaluator:
    """The original architecture with a plan's reconstructed weights, on a fixed sample.

    Owns a private copy of the network (the session's model keeps its original weights, so
    spectra and exports computed meanwhile never see swapped ones). After a change confined
    to one layer ``L`` it re-runs only the nodes of the network's ``torch.fx`` graph that
    depend on ``L``, starting from the values recorded on the previous run at the nodes
    feeding them (for a chain, just ``L``'s input). Anything else is a full run.
    """

    def __init__(self, model: nn.Module, data: _EvalData, chunk: int = CHUNK):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.data = data
        n = int(data.inputs.shape[0])
        self.chunks = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
        self.original = {name: mod.weight.detach().clone() for name, mod in self.model.named_modules()
                         if isinstance(mod, (nn.Linear, nn.Conv2d))}
        self.installed: dict[str, Any] = {}  # layer -> key of the weight now in the copy (absent: original)
        self.frontier: dict[str, Any] | None = None  # {"layer", "sig", "values": [per chunk {node: tensor}]}
        self.gm = None
        self.incremental: dict[str, tuple[list, list]] = {}  # layer -> (dirty nodes, frontier nodes)
        self.stats = {"full": 0, "incremental": 0, "last": "", "last_ms": 0.0}
        self._trace()
        with torch.inference_mode():
            self.reference = torch.cat([self._forward(self.data.inputs[c]) for c in self.chunks])
        self.reference_pred = self.reference.argmax(dim=-1) if self.reference.dim() >= 2 else None
        self.last: dict[str, float] | None = self.metrics(self.reference)  # nothing installed: the original

    # -- graph ------------------------------------------------------------------------------
    def _trace(self) -> None:
        import torch.fx as fx

        try:
            with TRACE_GUARD.tracing():
                gm = fx.symbolic_trace(self.model)
        except Exception:  # data-dependent control flow, unsupported ops: run the model whole
            return
        nodes = list(gm.graph.nodes)
        attrs = [str(n.target) for n in nodes if n.op == "get_attr"]
        for name in self.original:
            calls = [n for n in nodes if n.op == "call_module" and n.target == name]
            # a layer whose weight the graph reads directly (F.linear(x, self.fc.weight)) or
            # that is never called as a module cannot be re-run from its input
            if not calls or any(a == name or a.startswith(name + ".") for a in attrs):
                continue
            dirty: set = set()
            stack = list(calls)
            while stack:
                n = stack.pop()
                if n in dirty:
                    continue
                dirty.add(n)
                stack.extend(n.users)
            order = [n for n in nodes if n in dirty]
            feed = []
            for n in order:
                for a in n.all_input_nodes:
                    if a not in dirty and a not in feed:
                        feed.append(a)
            self.incremental[name] = (order, feed)
        self.gm = gm
        self.nodes = nodes

    def _forward(self, x: Tensor) -> Tensor:
        from .data import output_tensor

        return output_tensor(self.model(x))

    def _run_graph(self, x: Tensor, skip: dict | None, record: list | None) -> Tensor:
        """Run the fx graph on ``x``; ``skip`` pre-fills node values (only dirty nodes run)."""
        import torch.fx as fx

        from .data import output_tensor

        record_set = set(record or ())
        kept: dict = {}

        class _Run(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in record_set:
                    kept[n] = out
                return out

        interp = _Run(self.gm)
        env = None
        if skip is not None:
            env = dict(skip)
        out = interp.run(x, initial_env=env)
        self._kept = kept
        return output_tensor(out)

    # -- weights ----------------------------------------------------------------------------
    def install(self, weights: dict[str, tuple[Any, Tensor]]) -> set[str]:
        """Put the plan's weights in the copy (``weights``: layer -> (key, tensor)); the changed layers."""
        changed = set()
        for name in set(self.installed) | set(weights):
            new_key = weights[name][0] if name in weights else None
            if self.installed.get(name) == new_key:
                continue
            mod = self.model.get_submodule(name)
            w = weights[name][1] if name in weights else self.original[name]
            mod.weight.data = w.to(mod.weight.dtype)
            if new_key is None:
                self.installed.pop(name, None)
            else:
                self.installed[name] = new_key
            changed.add(name)
        return changed

    def _signature(self, but: str) -> tuple:
        return tuple(sorted((n, json.dumps(k, default=str)) for n, k in self.installed.items() if n != but))

    # -- evaluation -------------------------------------------------------------------------
    def run(self, changed: set[str], focus: str | None, stop: Callable[[], bool]) -> dict[str, float]:
        """Evaluate the installed weights; ``changed`` are the layers changed since the last run."""
        t0 = time.perf_counter()
        if not changed and self.last is not None:
            return dict(self.last)
        fr = self.frontier
        use_inc = (
            self.gm is not None and fr is not None and len(changed) == 1 and fr["layer"] in changed
            and fr["sig"] == self._signature(fr["layer"])
        )
        record_for = focus if (self.gm is not None and focus in self.incremental) else None
        outs = []
        new_values = []
        with torch.inference_mode():
            for i, c in enumerate(self.chunks):
                if stop():
                    raise _Superseded()
                x = self.data.inputs[c]
                if use_inc:
                    order, feed = self.incremental[fr["layer"]]
                    dirty = set(order)
                    env = {n: None for n in self.nodes if n not in dirty}
                    env.update(fr["values"][i])
                    outs.append(self._run_graph(x, env, None))
                elif record_for is not None:
                    _, feed = self.incremental[record_for]
                    outs.append(self._run_graph(x, None, feed))
                    new_values.append(self._kept)
                else:
                    outs.append(self._forward(x))
        if not use_inc:
            self.frontier = (
                {"layer": record_for, "sig": self._signature(record_for), "values": new_values}
                if record_for is not None else None
            )
        self._kept = {}
        out = torch.cat(outs)
        metrics = self.metrics(out)
        kind = "incremental" if use_inc else "full"
        self.stats[kind] += 1
        self.stats["last"] = kind
        self.stats["last_ms"] = (time.perf_counter() - t0) * 1e3
        self.last = metrics
        return dict(metrics)

    def metrics(self, out: Tensor) -> dict[str, float]:
        res: dict[str, float] = {"samples": int(out.shape[0])}
        t = self.data.targets
        if t is not None and out.dim() == 2 and t.dim() == 1:
            res["accuracy"] = float((out.argmax(dim=-1) == t).float().mean())
            res["loss"] = float(F.cross_entropy(out.float(), t))
        if self.reference_pred is not None:
            res["agreement"] = float((out.argmax(dim=-1) == self.reference_pred).float().mean())
        ref = self.reference.double()
        denom = float(ref.norm())
        res["relative_error"] = float((out.double() - ref).norm()) / denom if denom > 0 else 0.0
        return res

    def baseline(self) -> dict[str, float]:
        return self.metrics(self.reference)


# ---- files --------------------------------------------------------------------------------


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


def _parse_eval_file(data: bytes, filename: str) -> tuple[Tensor, Tensor | None]:
    """Inputs (and labels) from an uploaded ``.pt``/``.pth`` (torch.save) or ``.npz`` file."""
    _check_size(data, f"evaluation data {filename!r}")
    if filename.lower().endswith((".pt", ".pth")):
        _check_zip_bytes(data, f"evaluation data {filename!r}")
    return parse_data_file(data, filename)


def _check_arch(ref: str) -> None:
    """Refuse an architecture reference a visitor typed that could do harm when called.

    The explorer is a server: whoever opens the page can type a reference, and calling it
    runs code in the server. The same rule as for a reference recorded in a file applies:
    an ``nn.Module`` subclass, or a plain function defined in a package outside the
    standard library and the loaders (``torch.hub``, ``pickle`` ...). Set
    ``TENSORSCOPE_EXPLORER_ANY_ARCH=1`` on a server only you use to lift it.
    """
    from .checkpoint import _check_file_factory
    from .errors import ArchitectureError, UntrustedFileError

    if os.environ.get("TENSORSCOPE_EXPLORER_ANY_ARCH") == "1":
        return
    try:
        _check_file_factory(ref, "the architecture field", trust=False)
    except UntrustedFileError:
        raise ArchitectureError(
            f"architecture {ref!r} is refused: the server only calls an nn.Module class or a factory function "
            "from a package outside the standard library and the loaders (e.g. mypackage.models:make_net)"
        ) from None


# ---- a checkpoint written by this app: back to the dense architecture ---------------------


def _probe_dense(module: nn.Module, template: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The dense weight and bias a factorized ``module`` computes, in ``template``'s layout.

    Probes the module (it is linear in its input): identity rows for a Linear; for a Conv2d,
    one-hot inputs placed where one output position sees the whole kernel window.
    """
    dtype = template.weight.dtype
    with torch.no_grad():
        if isinstance(template, nn.Linear):
            zero = module(torch.zeros(1, template.in_features, dtype=dtype))[0]
            eye = torch.eye(template.in_features, dtype=dtype)
            w = (module(eye) - zero).t().contiguous()
            return w, (zero.clone() if template.bias is not None else None)
        conv: nn.Conv2d = template
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        sh, sw = conv.stride
        if conv.padding == "same":
            ph, pw = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
        elif conv.padding == "valid":
            ph, pw = 0, 0
        else:
            ph, pw = conv.padding
        oy, ox = -(-ph // sh), -(-pw // sw)  # the first output position whose window is inside
        y0, x0 = oy * sh - ph, ox * sw - pw
        h, w_ = y0 + (kh - 1) * dh + 1, x0 + (kw - 1) * dw + 1
        if conv.padding == "same":  # "same" keeps the input size: the window must fit both sides
            h, w_ = h + ph, w_ + pw
        cin = conv.in_channels
        n = cin * kh * kw
        x = torch.zeros(n, cin, h, w_, dtype=dtype)
        idx = torch.arange(n)
        c, ky, kx = idx // (kh * kw), (idx // kw) % kh, idx % kw
        x[idx, c, y0 + ky * dh, x0 + kx * dw] = 1.0
        zero = module(torch.zeros(1, cin, h, w_, dtype=dtype))[0, :, oy, ox]
        resp = module(x)[:, :, oy, ox] - zero  # (cin*kh*kw, out)
        full = resp.t().reshape(conv.out_channels, cin, kh, kw)
        g = conv.groups
        if g > 1:  # keep each output's own group of input channels
            o_per, i_per = conv.out_channels // g, cin // g
            full = torch.stack([full[o, (o // o_per) * i_per:(o // o_per + 1) * i_per] for o in range(conv.out_channels)])
        return full.contiguous(), (zero.clone() if conv.bias is not None else None)


def _densify(compressed: nn.Module) -> tuple[nn.Module, Plan]:
    """A compressed model back in its original architecture, each factorized layer multiplied out."""
    from ._arch import build_arch

    plan = plan_of(compressed)
    arch = get_arch(compressed)
    if plan is None or arch is None:
        raise DataError("this checkpoint does not record its plan and architecture; it cannot be edited here")
    dense = copy.deepcopy(compressed)
    template_model = build_arch(arch["ref"], arch.get("kwargs") or {})
    for name in plan:
        template = copy.deepcopy(template_model.get_submodule(name))
        w, b = _probe_dense(compressed.get_submodule(name), template)
        template.weight.data = w.to(template.weight.dtype)
        if b is not None:
            template.bias.data = b.to(template.bias.dtype)
        set_submodule(dense, name, template)
    object.__setattr__(dense, "_tensorscope_plan", None)
    return dense.eval(), plan


def _example_data(train, test) -> dict[str, _EvalData]:
    """The built-in examples' evaluation choices: the held-out split and a calibration batch."""
    x, y = test.tensors
    held = _EvalData(x[:EVAL_SAMPLES], y[:EVAL_SAMPLES],
                     f"held-out test split ({min(EVAL_SAMPLES, len(y))} MNIST images)", "held-out")
    cal_x = train.tensors[0][:CALIBRATION_SAMPLES]
    calib = _EvalData(cal_x, None, f"calibration batch ({len(cal_x)} training images, agreement with the original)",
                      "calibration")
    return {"held-out": held, "none": calib}


def _example_calibration(train) -> tuple:
    x, y = train.tensors
    n = min(CALIBRATION_TRAIN_SAMPLES, len(y))
    return x[:n], y[:n], f"{n} training images of the example (with labels)"


def _batches(x: Tensor, y: Tensor | None, size: int = 128) -> list:
    return [(x[i:i + size], y[i:i + size]) if y is not None else x[i:i + size] for i in range(0, len(x), size)]


# ---- the example networks, loaded once per process (immutable; each session gets a copy) --

_example_memo: dict[str, Any] = {}
_example_lock = threading.Lock()


def _load_example_shared(name: str, progress: Callable[[float, str], None] | None):
    with _example_lock:
        ex = _example_memo.get(name)
    if ex is None:
        ex = _examples.load_example(name, progress=progress)
        with _example_lock:
            _example_memo.setdefault(name, ex)
    return ex


# ---- the state ------------------------------------------------------------------------------


class ExplorerState(param.Parameterized):
    """One network, one plan, and what the explorer shows about them (one per session).

    Inputs a person changes: :meth:`load_example`, :meth:`load_upload`, :meth:`load_eval_upload`,
    :meth:`use_eval`, :meth:`select`, :meth:`set_layer`, :meth:`apply_budget`,
    :meth:`apply_preset`. Results the view shows are parameters: ``table``, ``cost``,
    ``quality``, ``history``, ``message``, ``error``, ``busy``, ``progress``.
    """

    # -- what is loaded ---------------------------------------------------------------------
    example = param.Selector(default=None, objects=[None, *_examples.list_examples()], allow_None=True,
                             doc="The built-in example loaded (None for an upload).")
    source = param.String(default="", doc="What the network is, in words.")
    eval_source = param.Selector(default="none", objects=["held-out", "uploaded", "none"],
                                 doc="Which data the quality preview uses.")
    eval_description = param.String(default="")
    eval_choices = param.List(default=["none"], doc="The eval sources available now.")
    input_shape = param.String(default="", doc="One sample's shape, e.g. '1,28,28' (uploads without data).")
    selected = param.String(default=None, allow_None=True, doc="The layer whose controls and spectrum are shown.")
    refine = param.Boolean(default=True, doc=(
        "Preview and export with the refined factors (HOOI sweeps for Tucker-2, full CP-ALS), so the "
        "accuracy shown is the exported model's; off: the cheapest factors."))
    calibrate = param.Boolean(default=False, doc=(
        "Data-aware mode: factors, spectra, errors and budgets from the calibration data (what each layer's "
        "output loses on it), instead of from the weights alone."))
    calibration_description = param.String(default="no calibration data")
    recovery = param.Dict(default={}, doc="The last fine-tune: plan, steps and quality before and after.")
    budget_keep = param.Number(default=0.25, bounds=(0.0, 1.0), inclusive_bounds=(False, True))
    budget_by = param.Selector(default="params", objects=["params", "flops"])

    # -- results ----------------------------------------------------------------------------
    plan = param.ClassSelector(class_=Plan, default=Plan(), instantiate=False)
    layer_names = param.List(default=[])
    table = param.Parameter(default=None, doc="pandas DataFrame, one row per decomposable layer.")
    cost = param.Dict(default={})
    quality = param.Dict(default={})
    quality_pending = param.Boolean(default=False)
    history = param.List(default=[])
    overview = param.Parameter(default=None, doc="Tidy DataFrame of all layers' normalised spectra.")
    message = param.String(default="")
    error = param.String(default="")
    busy = param.Boolean(default=False)
    progress = param.Number(default=0.0, bounds=(0.0, 1.0))
    progress_message = param.String(default="")
    version = param.Integer(default=0, doc="Bumped when a new network is installed.")
    plan_version = param.Integer(default=0, doc="Bumped on every plan change.")

    def __init__(self, executor: Executor | None = None, **params):
        super().__init__(**params)
        self.executor = executor
        self._lock = threading.RLock()
        self._eval_lock = threading.Lock()
        self._model: nn.Module | None = None
        self._layers: dict[str, _Layer] = {}
        self._skipped: list[LayerInfo] = []
        self._data: _EvalData | None = None
        self._data_choices: dict[str, _EvalData] = {}
        self._evaluator: _Evaluator | None = None
        self._base_params = 0
        self._base_flops: int | None = None
        self._base_bytes = 0
        self._resolved: dict[str, tuple[str, Any]] = {}  # layer -> (method, canonical rank)
        self._measured_error: dict[str, tuple[Any, float]] = {}  # layer -> (key, relative weight error)
        self._focus: str | None = None
        self._quality_wanted = 0
        self._quality_running = False
        self._export_memo: tuple[str, nn.Module] | None = None
        self._calib: tuple | None = None  # (inputs, labels or None, description)
        self._stats: dict | None = None  # layer -> LayerStats of the calibration data (data-aware mode)
        self._upload_dir = tempfile.TemporaryDirectory(prefix="tensorscope-explorer-")

    # =====================================================================================
    # loading
    # =====================================================================================
    @property
    def model(self) -> nn.Module | None:
        """The loaded (uncompressed) network; never modified."""
        return self._model

    @property
    def layers(self) -> dict[str, _Layer]:
        return self._layers

    def _report(self, fraction: float, message: str) -> None:
        self.param.update(progress=float(min(max(fraction, 0.0), 1.0)), progress_message=message)

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; on bad input set ``error`` (the state keeps what it had) and return None."""
        try:
            return fn()
        except _Superseded:
            return None
        except (TensorscopeError, ValueError, KeyError, TypeError, RuntimeError, OSError,
                EOFError, UnicodeDecodeError, zipfile.BadZipFile, AttributeError, IndexError) as e:
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            self.param.update(error=f"{what}: {text}" if text else f"{what}: {type(e).__name__}")
            return None

    def _busy(self, message: str):
        state = self

        class _Ctx:
            def __enter__(self_):
                state.param.update(busy=True, progress=0.0, progress_message=message, error="")

            def __exit__(self_, *exc):
                state.param.update(busy=False, progress=1.0 if exc[0] is None else state.progress)

        return _Ctx()

    def load_example(self, name: str) -> bool:
        """Load a built-in example (trained on first use) with its held-out split; True on success."""

        def work():
            if name not in _examples.list_examples():
                raise DataError(f"no example named {name!r}; choose one of {_examples.list_examples()}")
            with self._busy(f"loading {name}"):
                ex = _load_example_shared(name, lambda f, m: self._report(0.6 * f, m))
                model = copy.deepcopy(ex.model).eval()
                choices = _example_data(ex.train, ex.test)
                loaded = self._prepare(model, f"example {name}: {ex.description}", name, choices, "held-out",
                                       Plan(), start=0.6, calibration=_example_calibration(ex.train))
                self._install(loaded)
                self.request_quality()
                self.message = (f"Loaded example {name} ({format_count(loaded.params, 'params')}, "
                                f"test accuracy {ex.accuracy:.1%}).")
            return True

        return bool(self._guard(f"Could not load example {name!r}", work))

    def load_network(self, model: nn.Module, inputs: Tensor | None = None, labels: Tensor | None = None,
                     name: str = "model", plan: Any = None, calibration: Any = None) -> bool:
        """Explore a network already in memory (a notebook's own model), with optional data.

        ``inputs`` (and ``labels``) are the evaluation sample (the first 1000 are used);
        without labels quality is agreement with the original. ``calibration`` is a tensor of
        inputs or a pair ``(inputs, labels)`` for the data-aware mode and fine-tuning. The
        model is copied, never modified.
        """

        def work():
            from .plan import as_plan

            if not isinstance(model, nn.Module):
                raise DataError(f"load_network expects an nn.Module; got {type(model).__name__}")
            net = copy.deepcopy(model).eval()
            choices = {}
            if inputs is not None:
                x = inputs[:EVAL_SAMPLES].detach().cpu()
                y = labels[:EVAL_SAMPLES].detach().cpu().long() if labels is not None else None
                kind = "held-out" if y is not None else "none"
                desc = f"{len(x)} samples given" + (", with labels" if y is not None else ", agreement with the original")
                d = _EvalData(x, y, desc, "held-out" if y is not None else "calibration")
                self._check_data(net, d, "the inputs given")
                choices[kind] = d
            with self._busy(f"loading {name}"):
                wanted = next(iter(choices), "none")
                calib = None
                if calibration is not None:
                    cx, cy = calibration if isinstance(calibration, (tuple, list)) else (calibration, None)
                    calib = (cx.detach().cpu(), None if cy is None else cy.detach().cpu().long(),
                             f"{len(cx)} calibration samples given" + (" (with labels)" if cy is not None else ""))
                loaded = self._prepare(net, name, None, choices, wanted, as_plan(plan) if plan else Plan(),
                                       calibration=calib)
                self._install(loaded)
                self.request_quality()
            self.message = f"Loaded {name} ({format_count(loaded.params, 'params')}, {len(loaded.layers)} decomposable layers)."
            return True

        return bool(self._guard(f"Could not load {name}", work))

    def load_upload(self, data: bytes, filename: str, arch: str | None = None, trust: bool = False) -> bool:
        """Load an uploaded network: a state dict (``.pt``/``.pth``/``.safetensors``, with ``arch``),
        a pickled whole module (only with ``trust``) or a tensorscope checkpoint from this app.

        On any problem ``error`` says what and the previous network stays loaded.
        """

        def work():
            from . import checkpoint

            if not isinstance(data, (bytes, bytearray)):
                raise DataError("no file received")
            _check_size(bytes(data), f"{filename!r}")
            safe_name = os.path.basename(filename or "upload.bin") or "upload.bin"
            arch_ref = (arch or "").strip() or None
            if arch_ref is not None:
                _check_arch(arch_ref)
            if trust and os.environ.get("TENSORSCOPE_EXPLORER_NO_PICKLE") == "1":
                raise DataError("this server does not read pickled files (TENSORSCOPE_EXPLORER_NO_PICKLE=1): "
                                "upload a state dict or safetensors file with its architecture")
            with self._busy(f"reading {safe_name}"):
                folder = tempfile.mkdtemp(dir=self._upload_dir.name)
                path = os.path.join(folder, safe_name)
                with open(path, "wb") as f:
                    f.write(data)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        model = checkpoint.load_model(path, arch=arch_ref, trust=bool(trust),
                                                      max_bytes=int(MAX_UPLOAD_MB * (1 << 20)))
                finally:
                    try:
                        os.remove(path)
                        os.rmdir(folder)
                    except OSError:
                        pass
                notes = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
                self._report(0.2, "inspecting the network")
                plan = Plan()
                if plan_of(model) is not None:  # a tensorscope checkpoint: edit its plan on the dense form
                    model, plan = _densify(model)
                    notes.append(f"tensorscope checkpoint: its {len(plan)} factorized layer(s) were multiplied "
                                 "out; the plan it carries is loaded")
                choices = self._data_for(model)
                arch_rec = get_arch(model) or {}
                calibration = None
                if str(arch_rec.get("ref", "")).startswith("tensorscope.examples:"):
                    # a built-in example's architecture: its held-out split applies (no training needed)
                    train, test = _examples.mnist_splits()
                    choices = {**_example_data(train, test), **choices}
                    calibration = _example_calibration(train)
                order = ["held-out", "uploaded", "none"]
                if self._model is not None and self.eval_source in choices:  # keep what the person chose
                    order.insert(0, self.eval_source)
                wanted = next((k for k in order if k in choices), "none")
                loaded = self._prepare(model.eval(), f"upload {safe_name}", None, choices, wanted, plan, start=0.2,
                                       calibration=calibration)
                self._install(loaded)
                self.request_quality()
                msg = f"Loaded {safe_name} ({format_count(loaded.params, 'params')}, {len(loaded.layers)} decomposable layers)."
                if not choices:
                    msg += " Upload evaluation data or give an input shape to see FLOPs and quality."
                self.message = " ".join([msg, *notes[:2]])
            return True

        return bool(self._guard(f"Could not load {filename!r}", work))

    def load_eval_upload(self, data: bytes, filename: str) -> bool:
        """Use an uploaded ``.pt``/``.npz`` of inputs (and labels) as the evaluation data."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            x, y = _parse_eval_file(bytes(data), filename)
            n = int(x.shape[0])
            x, y = x[:EVAL_SAMPLES], (y[:EVAL_SAMPLES] if y is not None else None)
            desc = f"uploaded {os.path.basename(filename)} ({len(x)}{f' of {n}' if n > len(x) else ''} samples"
            desc += ", with labels)" if y is not None else ", agreement with the original)"
            data_ = _EvalData(x.contiguous(), y, desc, "uploaded")
            self._check_data(self._model, data_, filename)
            with self._busy("evaluating on the uploaded data"):
                self._switch_data({**self._data_choices, "uploaded": data_}, "uploaded")
            self.message = f"Evaluation data: {desc}."
            return True

        return bool(self._guard(f"Could not use {filename!r} as evaluation data", work))

    def use_eval(self, kind: str) -> bool:
        """Switch the evaluation data: "held-out", "uploaded" or "none" (agreement on a calibration batch)."""

        def work():
            choices = dict(self._data_choices)
            if kind == "none" and "none" not in choices:
                shape = self._parse_shape(self.input_shape)
                if shape is None:
                    raise DataError("without evaluation data, give one sample's input shape (e.g. 1,28,28)")
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(CALIBRATION_SAMPLES, *shape, generator=gen)
                data_ = _EvalData(x, None, f"calibration batch ({CALIBRATION_SAMPLES} random N(0,1) inputs of shape "
                                           f"{tuple(shape)}, agreement with the original)", "calibration")
                self._check_data(self._model, data_, "the calibration batch")
                choices["none"] = data_
            if kind not in choices:
                raise DataError(f"no {kind!r} evaluation data available; available: {sorted(choices)}")
            with self._busy("switching evaluation data"):
                self._switch_data(choices, kind)
            return True

        return bool(self._guard("Could not switch the evaluation data", work))

    # =====================================================================================
    # data-aware mode and recovery
    # =====================================================================================
    def load_calibration_upload(self, data: bytes, filename: str) -> bool:
        """Use an uploaded ``.pt``/``.npz`` of inputs (labels optional) as calibration data."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            x, y = _parse_eval_file(bytes(data), filename)
            d = _EvalData(x[:2], None, "", "calibration")
            self._check_data(self._model, d, filename)
            desc = f"uploaded {os.path.basename(filename)} ({len(x)} samples{', with labels' if y is not None else ''})"
            was_on = self.calibrate
            with self._lock:
                self._calib = (x.contiguous(), y, desc)
                self._stats = None
                for layer in self._layers.values():  # whitened views of the old data are stale
                    layer.aware = None
                    layer.use(layer.plain)
                self._measured_error = {}
                self.param.update(calibration_description=desc, calibrate=False)
                self._set_plan(self.plan, focus=None)
            if was_on:  # recompute what the mode shows from the new data
                return self.set_calibrate(True)
            self.message = f"Calibration data: {desc}."
            return True

        return bool(self._guard(f"Could not use {filename!r} as calibration data", work))

    def _calibration_stats(self) -> dict:
        from .calibration import collect_stats

        if self._stats is None:
            if self._calib is None:
                raise DataError("no calibration data: upload a .pt/.npz of inputs as calibration data "
                                "(the built-in examples bring their training split)")
            x, y, _ = self._calib
            self._report(0.05, f"input statistics of {len(self._layers)} layers on {len(x)} samples")
            self._stats = collect_stats(self._model, _batches(x, None), list(self._layers))
        return self._stats

    def set_calibrate(self, on: bool) -> bool:
        """Switch the data-aware mode (blocking: the first switch collects statistics and whitened spectra).

        On: factors whiten each layer by its inputs' second moment on the calibration data, the
        spectra and errors shown are the whitened ones (what truncation cuts from the layer's
        *output*), and the budget planner uses them. Off: everything from the weights alone.
        """

        def work():
            if self._model is None:
                raise DataError("load a network first")
            on_ = bool(on)
            if on_ == self.calibrate:
                return True
            with self._busy("data-aware mode: whitened spectra" if on_ else "weights-only mode"):
                if on_:
                    stats = self._calibration_stats()
                    n = max(len(self._layers), 1)
                    for i, (name, layer) in enumerate(self._layers.items()):
                        if layer.aware is None:
                            self._report(0.2 + 0.8 * i / n, f"whitened spectrum of {name}")
                            st = stats[name]
                            spec = layer_spectrum(layer.module, name, "out", st)
                            spec_in = (layer_spectrum(layer.module, name, "in", st)
                                       if layer.info.geometry.kind == "conv2d" else None)
                            t = tradeoff(layer.module, "svd", name, layer.info.geometry, stats=st)
                            layer.aware = (spec, spec_in, {"svd": t} if t is not None else {}, spec.metrics())
                with self._lock:
                    for layer in self._layers.values():
                        layer.use(layer.aware if on_ else layer.plain)
                    self._measured_error = {}
                    self.param.update(calibrate=on_, overview=_overview(self._layers), history=[])
                    self._set_plan(self.plan, focus=None)
            self.message = (f"Data-aware mode on: factors, spectra and errors from {self._calib[2]}."
                            if on_ else "Data-aware mode off: factors and errors from the weights alone.")
            self.request_quality()
            return True

        return bool(self._guard("Data-aware mode", work))

    def finetune(self, steps: int = FINETUNE_STEPS, lr: float | None = None) -> bool:
        """Recover the current plan's compressed model: a short fine-tune on the calibration data,
        distilled from the original (with its labels too, where it has them). Blocking.

        The quality before and after lands in ``recovery`` and the history; exports of this plan
        are the fine-tuned model until the plan changes.
        """
        from .evaluate import evaluate
        from .recovery import finetune

        def work():
            if self._model is None:
                raise DataError("load a network first")
            if not len(self.plan):
                raise DataError("nothing to fine-tune: decompose at least one layer first")
            if self._calib is None:
                raise DataError("fine-tuning needs training data: upload calibration data "
                                "(the built-in examples bring their training split)")
            if self._data is None:
                raise DataError("load evaluation data to see what fine-tuning recovers")
            n_steps = int(steps)
            if not 1 <= n_steps <= 5000:
                raise DataError(f"fine-tuning steps must be between 1 and 5000; got {steps!r}")
            with self._lock:
                plan, version = self.plan, self.plan_version
            with self._busy(f"fine-tuning for {n_steps} steps"):
                self._report(0.0, "building the compressed model")
                small = self.compressed_model()
                x, y, desc = self._calib
                train = _batches(x, y, 64)
                evaluation = _batches(self._data.inputs, self._data.targets, CHUNK)
                before = evaluate(small, evaluation, reference=self._model)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tuned = finetune(small, train, teacher=self._model, steps=n_steps,
                                     **({} if lr is None else {"lr": lr}),
                                     progress=lambda f, m: self._report(0.05 + 0.9 * f, f"fine-tuning: {m}"))
                after = evaluate(tuned, evaluation, reference=self._model)
            metric = "accuracy" if "accuracy" in after else "agreement"
            with self._lock:
                if self.plan_version != version:
                    raise DataError("the plan changed while fine-tuning; fine-tune again")
                key = self._memo_key(plan)
                self._export_memo = (key, tuned)
                rec = {"plan": plan.to_json(indent=None), "steps": n_steps, "metric": metric, "data": desc,
                       "before": before.get(metric), "after": after.get(metric),
                       "agreement_before": before.get("agreement"), "agreement_after": after.get("agreement")}
                entry = {"params": self.cost["params_after"], "flops": self.cost["flops_after"],
                         "ratio": self.cost["ratio"], "quality": after.get(metric), "metric": metric,
                         "layers": len(plan), "label": self.describe_plan(plan) + f" + fine-tuned {n_steps} steps",
                         "plan": plan.to_json(indent=None) + "|tuned", "tuned": True}
                hist = [h for h in self.history if h["plan"] != entry["plan"]] + [entry]
                self.param.update(recovery=rec, history=hist[-MAX_HISTORY:])
            note = next((f" ({w.message})" for w in caught if "did not improve" in str(w.message)), "")
            self.message = (f"Fine-tuned {n_steps} steps on {desc}: {metric} {before.get(metric, 0):.1%} -> "
                            f"{after.get(metric, 0):.1%}. Exports of this plan are the fine-tuned model.{note}")
            return True

        return bool(self._guard("Fine-tuning", work))

    def recovered(self) -> dict:
        """The last fine-tune if it was of the current plan, else ``{}``."""
        rec = self.recovery
        return rec if rec and rec.get("plan") == self.plan.to_json(indent=None) else {}

    @staticmethod
    def _parse_shape(text: str) -> tuple[int, ...] | None:
        text = (text or "").strip().strip("()[]")
        if not text:
            return None
        try:
            shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
        except ValueError:
            raise DataError(f"input shape must be integers separated by commas, like 1,28,28; got {text!r}") from None
        if not shape or any(s <= 0 for s in shape) or math.prod(shape) > 10_000_000:
            raise DataError(f"input shape {text!r} is not a sensible sample shape")
        return shape

    def _check_data(self, model: nn.Module, data: _EvalData, what: str) -> None:
        from .data import output_tensor

        try:
            with torch.inference_mode():
                out = output_tensor(copy.deepcopy(model).eval()(data.inputs[:2]))
        except Exception as e:
            raise DataError(
                f"the network cannot run on {what}: inputs of shape {tuple(data.inputs.shape[1:])} per sample "
                f"do not fit it ({type(e).__name__}: {str(e)[:160]})"
            ) from None
        if data.targets is not None:
            if out.dim() != 2:
                raise DataError(f"{what} has labels but the network's output has shape {tuple(out.shape)}, "
                                "not (batch, classes)")
            top = int(data.targets.max())
            if top >= out.shape[1] or int(data.targets.min()) < 0:
                raise DataError(f"{what} has labels up to {top}, but the network has {out.shape[1]} outputs")

    def _data_for(self, model: nn.Module) -> dict[str, _EvalData]:
        """The current eval data choices that fit a newly uploaded network."""
        out = {}
        for k, d in self._data_choices.items():
            try:
                self._check_data(model, d, "the current evaluation data")
                out[k] = d
            except DataError:
                pass
        if "none" not in out and self.input_shape.strip():
            try:
                shape = self._parse_shape(self.input_shape)
                gen = torch.Generator().manual_seed(0)
                d = _EvalData(torch.randn(CALIBRATION_SAMPLES, *shape, generator=gen), None,
                              f"calibration batch ({CALIBRATION_SAMPLES} random inputs, agreement)", "calibration")
                self._check_data(model, d, "the calibration batch")
                out["none"] = d
            except DataError:
                pass
        return out

    def _prepare(self, model: nn.Module, source: str, example: str | None, choices: dict[str, _EvalData],
                 wanted: str, plan: Plan, start: float = 0.0, calibration: tuple | None = None) -> _Loaded:
        """Everything about a network the explorer computes once (off the event loop)."""
        data = choices.get(wanted)
        example_input = data.inputs[:1] if data is not None else None
        self._report(start, "listing layers")
        infos = inspect(model, example_input)
        modules = dict(model.named_modules())
        layers: dict[str, _Layer] = {}
        n = max(len(infos), 1)
        for i, info in enumerate(infos):
            self._report(start + (1 - start) * 0.8 * i / n, f"spectrum of {info.name} ({i + 1}/{len(infos)})")
            mod = modules[info.name]
            spec = layer_spectrum(mod, info.name, "out")
            spec_in = layer_spectrum(mod, info.name, "in") if info.geometry.kind == "conv2d" else None
            trade = {}
            for m in PLANNER_METHODS:
                if m in info.max_rank:
                    t = tradeoff(mod, m, info.name, info.geometry)
                    if t is not None:
                        trade[m] = t
            energy = tucker2_retained(mod) if "tucker2" in info.max_rank else None
            layers[info.name] = _Layer(info, mod, spec, spec_in, trade, energy, spec.total_energy, spec.metrics())
        self._report(start + (1 - start) * 0.85, "measuring the original network")
        params = count_params(model)
        flops = count_flops(model, example_input) if example_input is not None else None
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
        evaluator = _Evaluator(model, data) if data is not None else None
        if plan:
            plan.validate(model, {n: l.info.geometry for n, l in layers.items()})
        self._report(1.0, "ready")
        return _Loaded(model, source, example, layers, list(infos.skipped), data, choices, evaluator,
                       params, flops, nbytes, plan, overview=_overview(layers), calibration=calibration)

    def _install(self, loaded: _Loaded) -> None:
        with self._lock:
            self._model = loaded.model
            self._layers = loaded.layers
            self._skipped = loaded.skipped
            self._data = loaded.data
            self._data_choices = loaded.data_choices
            self._evaluator = loaded.evaluator
            self._base_params = loaded.params
            self._base_flops = loaded.flops
            self._base_bytes = loaded.nbytes
            self._measured_error = {}
            self._export_memo = None
            self._focus = None
            self._calib = loaded.calibration
            self._stats = None
            names = list(loaded.layers)
            sel = self.selected if self.selected in loaded.layers else (names[0] if names else None)
            eval_kind = loaded.data.kind if loaded.data is not None else None
            eval_source = {"held-out": "held-out", "uploaded": "uploaded", "calibration": "none"}.get(eval_kind, "none")
            self.param.update(
                example=loaded.example,
                source=loaded.source,
                layer_names=names,
                selected=sel,
                overview=loaded.overview,
                eval_choices=sorted(loaded.data_choices, key=["held-out", "uploaded", "none"].index),
                eval_source=eval_source,
                eval_description=loaded.data.description if loaded.data else "no evaluation data",
                history=[],
                error="",
                calibrate=False,
                calibration_description=loaded.calibration[2] if loaded.calibration else "no calibration data",
                recovery={},
                version=self.version + 1,
            )
            self._set_plan(loaded.plan, focus=None)

    def _switch_data(self, choices: dict[str, _EvalData], kind: str) -> None:
        data = choices[kind]
        evaluator = _Evaluator(self._model, data)
        flops = count_flops(self._model, data.inputs[:1])
        infos = inspect(self._model, data.inputs[:1]).by_name()
        with self._lock:
            for name, layer in self._layers.items():  # geometries now know the input sizes (FLOPs)
                if name in infos:
                    layer.info = infos[name]
            self._data, self._data_choices, self._evaluator = data, choices, evaluator
            self._base_flops = flops
            self.param.update(eval_source={"calibration": "none"}.get(data.kind, data.kind),
                              eval_choices=sorted(choices, key=["held-out", "uploaded", "none"].index),
                              eval_description=data.description, history=[])
            self._set_plan(self.plan, focus=None)
        self.request_quality()

    # =====================================================================================
    # the plan
    # =====================================================================================
    def select(self, name: str) -> None:
        if name in self._layers:
            self.selected = name

    def layer_choice(self, name: str) -> tuple[str, Any]:
        """(method, canonical rank) of a layer in the current plan; ``("dense", None)`` if not planned."""
        return self._resolved.get(name, (DENSE, None))

    def default_rank(self, name: str, method: str) -> Any:
        """A sensible starting rank when a layer's method is switched: keeps 90% of the energy, and
        stays below the dense layer's parameter count where possible."""
        layer = self._layers[name]
        geom = layer.geometry
        m = get_method(method)
        mx = layer.info.max_rank[method]
        if method == "svd":
            r = energy_rank(layer.spectrum, 0.9)
        elif method == "tucker2":
            r = (min(energy_rank(layer.spectrum, 0.9), mx[0]), min(energy_rank(layer.spectrum_in, 0.9), mx[1]))
        elif method == "cp":
            r = max(1, min(mx, energy_rank(layer.spectrum, 0.9)))
        else:  # tt: bonds of at most 16 (TT pays off at small bonds; FLOPs grow with their product)
            r = tuple([1, *[max(1, min(b // 2, 16)) for b in mx[1:-1]], 1])
        r = m.resolve_rank(geom, r)
        # step down while the factorized layer would be larger than the dense one
        for _ in range(64):
            if m.count_params(geom, r) < geom.dense_params:
                break
            r = _shrink(r)
        return m.resolve_rank(geom, r)

    def set_layer(self, name: str, method: str | None, rank: Any = None, *, refresh: bool = True) -> bool:
        """Set one layer's method and rank (``method`` None or "dense" leaves it dense); True on success.

        Cheap: the plan, the costs and the table row are updated from cached data; the quality
        refresh is requested (asynchronous with an executor).
        """

        def work():
            if name not in self._layers:
                raise DataError(f"no decomposable layer {name!r}")
            if method in (None, DENSE, "none"):
                plan = self.plan.with_layer(name, None)
            else:
                layer = self._layers[name]
                if method not in layer.info.max_rank:
                    raise DataError(f"method {method!r} does not apply to {name} ({layer.info.kind}); "
                                    f"choose one of {layer.methods}")
                m = get_method(method)
                r = self.default_rank(name, method) if rank is None else rank
                canon = m.resolve_rank(layer.geometry, r)
                _check_work(name, layer, method, canon)
                plan = self.plan.with_layer(name, method, _jsonable_rank(canon))
            with self._lock:
                self._set_plan(plan, focus=name)
            self.error = ""
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard(f"Layer {name}", work))

    def set_plan(self, plan: Any, *, refresh: bool = True) -> bool:
        """Replace the whole plan (a Plan, dict or JSON text)."""

        def work():
            from .plan import as_plan

            p = as_plan(plan)
            p.validate(self._model, {n: l.info.geometry for n, l in self._layers.items()})
            with self._lock:
                self._set_plan(p, focus=None)
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Plan", work))

    def apply_budget(self, keep: float | None = None, by: str | None = None, *, refresh: bool = True) -> bool:
        """Fill in every layer's method and ranks from the budget planner (svd and tucker2)."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            k = float(self.budget_keep if keep is None else keep)
            b = self.budget_by if by is None else by
            self.param.update(budget_keep=k, budget_by=b)
            if b == "flops" and self._data is None:
                raise DataError("a FLOPs budget needs an input: load evaluation data or give an input shape")
            with self._busy(f"planning for {k:.0%} of the {b}"):
                example_input = self._data.inputs[:1] if self._data is not None else None
                data = _batches(self._calib[0], None) if (self.calibrate and self._calib is not None) else None
                plan = plan_for_budget(self._model, k, by=b, methods=PLANNER_METHODS, example_input=example_input,
                                       layers=list(self._layers), data=data)
                with self._lock:
                    self._set_plan(plan, focus=None)
            got = self.cost["params_after"] / self.cost["params"] if b == "params" else (
                self.cost["flops_after"] / self.cost["flops"])
            self.message = f"Budget: keep {k:.0%} of the {b} -> the plan keeps {got:.1%} ({len(plan)} layers decomposed)."
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Budget", work))

    def apply_preset(self, kind: str, value: float | None = None, *, refresh: bool = True) -> bool:
        """Ranks from a rule, per layer: ``("energy", 0.9)`` keeps 90% of each unfolding's energy;
        ``("vbmf",)`` uses the VBMF rank. Layers on svd or tucker2 keep their method, others get
        svd; a layer whose rank would not make it smaller stays dense."""

        def work():
            if kind not in ("energy", "vbmf"):
                raise DataError(f"preset must be 'energy' or 'vbmf'; got {kind!r}")
            keep = 0.9 if value is None else float(value)
            if kind == "energy" and not 0.0 < keep <= 1.0:
                raise DataError(f"energy to keep must be in (0, 1]; got {value!r}")
            rule = (lambda s: energy_rank(s, keep)) if kind == "energy" else vbmf_rank
            layers = {}
            dense = []
            for name, layer in self._layers.items():
                method = self._resolved.get(name, (None,))[0]
                method = method if method in PLANNER_METHODS and method in layer.info.max_rank else "svd"
                m = get_method(method)
                if method == "tucker2":
                    mx = layer.info.max_rank["tucker2"]
                    r = (min(rule(layer.spectrum), mx[0]), min(rule(layer.spectrum_in), mx[1]))
                else:
                    r = rule(layer.spectrum)
                r = m.resolve_rank(layer.geometry, r)
                if m.count_params(layer.geometry, r) >= layer.geometry.dense_params:
                    dense.append(name)
                    continue
                layers[name] = {"method": method, "rank": _jsonable_rank(r)}
            with self._lock:
                self._set_plan(Plan(layers), focus=None)
            what = f"{keep:.0%} energy" if kind == "energy" else "VBMF"
            note = f"; {len(dense)} layer(s) stay dense (no smaller at that rank)" if dense else ""
            self.message = f"Preset {what}: {len(layers)} layer(s) decomposed{note}."
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Preset", work))

    def _set_plan(self, plan: Plan, focus: str | None) -> None:
        """Install ``plan`` and recompute costs and the table (cheap; caller holds the lock)."""
        resolved = {}
        geoms = {n: l.info.geometry for n, l in self._layers.items()}
        for r in plan.validate(self._model, geoms) if self._model is not None else []:
            resolved[r.name] = (r.method.name, r.rank)
        self._resolved = resolved
        self._focus = focus
        self._export_memo = None
        cost = self._cost()
        self.param.update(plan=plan, cost=cost, table=self._table(), plan_version=self.plan_version + 1,
                          quality_pending=self._evaluator is not None)

    def _layer_after(self, name: str) -> tuple[int, int | None]:
        layer = self._layers[name]
        geom = layer.geometry
        method, rank = self._resolved.get(name, (DENSE, None))
        if method == DENSE:
            return geom.dense_params, geom.dense_flops
        m = get_method(method)
        return m.count_params(geom, rank), m.count_flops(geom, rank)

    def _cost(self) -> dict[str, Any]:
        params_after = self._base_params
        flops_after = self._base_flops
        bytes_after = self._base_bytes
        for name, (method, rank) in self._resolved.items():
            geom = self._layers[name].geometry
            p, f = self._layer_after(name)
            params_after += p - geom.dense_params
            bytes_after += (p - geom.dense_params) * self._layers[name].module.weight.element_size()
            if flops_after is not None:
                flops_after = None if (f is None or geom.dense_flops is None) else flops_after + f - geom.dense_flops
        return {
            "params": self._base_params, "params_after": params_after,
            "flops": self._base_flops, "flops_after": flops_after,
            "bytes": self._base_bytes, "bytes_after": bytes_after,
            "ratio": self._base_params / params_after if params_after else float("inf"),
            "flops_ratio": (self._base_flops / flops_after) if (self._base_flops and flops_after) else None,
            "layers_planned": len(self._resolved),
        }

    def layer_error(self, name: str) -> float | None:
        """Relative Frobenius error of a layer's weight under the plan (None while unknown: cp/tt).

        In data-aware mode: the relative error of the layer's output on the calibration data.
        """
        method, rank = self._resolved.get(name, (DENSE, None))
        if method == DENSE:
            return 0.0
        key = (method, json.dumps(_jsonable_rank(rank)), self.refine, self.calibrate)
        measured = self._measured_error.get(name)
        if measured is not None and measured[0] == key:
            return measured[1]
        layer = self._layers[name]
        if method == "svd":
            return layer.spectrum.relative_error(int(rank))
        if method == "tucker2" and not self.calibrate and layer.tucker_energy is not None and layer.norm2 > 0:
            kept = float(layer.tucker_energy[rank[0] - 1, rank[1] - 1])
            return math.sqrt(max(0.0, 1.0 - kept / layer.norm2))
        return None

    def _table(self):
        import pandas as pd

        rows = []
        for name, layer in self._layers.items():
            info = layer.info
            method, rank = self._resolved.get(name, (DENSE, None))
            p, f = self._layer_after(name)
            err = self.layer_error(name)
            rows.append({
                "layer": name,
                "type": info.kind,
                "shape": "×".join(str(s) for s in info.weight_shape),
                "params": int(info.params),
                "MFLOPs": (info.flops / 1e6) if info.flops is not None else float("nan"),
                "method": method,
                "rank": _rank_text(rank),
                "params after": int(p),
                "ratio": info.geometry.dense_params / p if p else float("inf"),
                "rel. error": float("nan") if err is None else float(err),
                "energy %": float("nan") if err is None else round(100.0 * (1.0 - float(err) ** 2), 1),
            })
        return pd.DataFrame(rows, columns=["layer", "type", "shape", "params", "MFLOPs", "method", "rank",
                                           "params after", "ratio", "rel. error", "energy %"])

    # =====================================================================================
    # quality
    # =====================================================================================
    def request_quality(self) -> Future | dict | None:
        """Ask for the quality of the current plan. Without an executor: computed now. With one:
        at most one refresh per session runs; requests made meanwhile are folded into the next."""
        if self._evaluator is None:
            self.quality_pending = False
            return None
        if self.executor is None:
            return self._guard("Quality", self.refresh_quality)
        with self._lock:
            self._quality_wanted = self.plan_version
            self.quality_pending = True
            if self._quality_running:
                return None
            self._quality_running = True
        return self.executor.submit(self._quality_loop)

    def _quality_loop(self) -> None:
        while True:
            with self._lock:
                want = self._quality_wanted
            try:
                with TRACE_GUARD.running():
                    self._guard("Quality", self.refresh_quality)
            except BaseException:
                with self._lock:
                    self._quality_running = False
                raise
            with self._lock:
                if self._quality_wanted == want or self._evaluator is None:
                    self._quality_running = False
                    if self.plan_version == want:
                        self.quality_pending = False
                    return

    def refresh_quality(self) -> dict[str, Any]:
        """Evaluate the current plan on the evaluation data (blocking; thread-safe).

        Reconstructs each planned layer's weight (memoised per layer, method and rank; CP-ALS
        and TT-SVD only the first time), puts them in the evaluator's private copy of the
        network and runs it, re-running only what the last edited layer feeds when that is
        all that changed. Stops early, raising nothing, when a newer plan supersedes this one.
        """
        with self._eval_lock:
            with self._lock:
                version = self.plan_version
                plan, resolved, evaluator = self.plan, dict(self._resolved), self._evaluator
                focus, refine = self._focus, self.refine
                model, cost = self._model, dict(self.cost)
                stats = self._stats if self.calibrate else None
            if evaluator is None:
                return {}

            def stop() -> bool:
                return self.plan_version != version or self._evaluator is not evaluator

            from .preview import reconstructed_weight

            weights = {}
            errors = {}
            n_slow = sum(1 for m, _ in resolved.values() if m in ("cp", "tt"))
            for i, (name, (method, rank)) in enumerate(resolved.items()):
                if stop():
                    raise _Superseded()
                layer = self._layers[name]
                key = (method, json.dumps(_jsonable_rank(rank)), refine, stats is not None)
                r = ResolvedLayer(name, layer.module, get_method(method), rank,
                                  dict(plan[name].options), layer.geometry)
                if method in ("cp", "tt") and n_slow:
                    self._report(i / max(len(resolved), 1), f"{method} factors of {name} at rank {_rank_text(rank)}")
                st = stats[name] if stats is not None else None
                w = reconstructed_weight(r, refine=refine, stats=st)
                weights[name] = (key, w)
                known = self._measured_error.get(name)
                if method != "svd" and (known is None or known[0] != key):  # svd: exact from the spectrum
                    if st is not None:
                        errors[name] = (key, st.output_error(layer.module.weight, w))
                    else:
                        ref = layer.module.weight.detach().double()
                        denom = math.sqrt(layer.norm2) if layer.norm2 > 0 else float(ref.norm())
                        errors[name] = (key, float((w.double() - ref).norm()) / denom if denom > 0 else 0.0)
            if stop():
                raise _Superseded()
            changed = evaluator.install(weights)
            metrics = evaluator.run(changed, focus, stop)
            base = evaluator.baseline()
            with self._lock:
                if stop():
                    raise _Superseded()
                self._measured_error.update(errors)
                metric = "accuracy" if "accuracy" in metrics else "agreement"
                quality = {
                    "metric": metric,
                    "original": base.get(metric),
                    "plan": metrics.get(metric),
                    "agreement": metrics.get("agreement"),
                    "loss": metrics.get("loss"),
                    "original_loss": base.get("loss"),
                    "relative_error": metrics.get("relative_error"),
                    "samples": metrics.get("samples"),
                    "data": self.eval_description,
                    "ms": evaluator.stats["last_ms"],
                    "run": evaluator.stats["last"],
                }
                entry = {
                    "params": cost["params_after"], "flops": cost["flops_after"], "ratio": cost["ratio"],
                    "quality": metrics.get(metric), "metric": metric, "layers": len(plan),
                    "label": self.describe_plan(plan), "plan": plan.to_json(indent=None),
                }
                hist = list(self.history) or [{
                    "params": cost["params"], "flops": cost["flops"], "ratio": 1.0, "quality": base.get(metric),
                    "metric": metric, "layers": 0, "label": "original", "plan": Plan().to_json(indent=None)}]
                if len(plan):  # the newest evaluation of a configuration replaces an older one
                    hist = [h for h in hist if h["plan"] != entry["plan"]] + [entry]
                self.param.update(quality=quality, history=hist[-MAX_HISTORY:], table=self._table(),
                                  quality_pending=False, progress_message="")
            return quality

    @staticmethod
    def describe_plan(plan: Plan) -> str:
        if not len(plan):
            return "original"
        parts = [f"{n}: {lp.method} {_rank_text(lp.rank)}" for n, lp in plan.items()]
        return "; ".join(parts[:4]) + (f"; +{len(parts) - 4} more" if len(parts) > 4 else "")

    # =====================================================================================
    # what the plots show
    # =====================================================================================
    def spectrum_data(self, name: str | None = None) -> dict[str, Any]:
        """Arrays for the selected layer's plots (cheap: read from cached spectra and curves).

        ``values``/``kept``: singular values of the out unfolding (floored for a log axis) and
        which ones the plan keeps; ``values_in``/``kept_in`` for conv layers; ``energy``:
        cumulative energy; ``tradeoffs``: method -> (params, relative error) over all ranks;
        ``current``: the plan's point (params, error).
        """
        name = name or self.selected
        layer = self._layers.get(name)
        if layer is None:
            return {}
        method, rank = self._resolved.get(name, (DENSE, None))
        s = layer.spectrum.values.astype(np.float64)
        floor = max(float(s.max()) * 1e-7, 1e-30) if s.size else 1e-30
        k = s.size
        keep_out = k
        keep_in = None
        if method == "svd":
            keep_out = int(rank) * layer.spectrum.groups
        elif method == "tucker2":
            keep_out = int(rank[0]) * layer.spectrum.groups
            keep_in = int(rank[1])
        idx = np.arange(1, k + 1)
        out: dict[str, Any] = {
            "layer": name, "kind": layer.info.kind, "method": method, "rank": rank,
            "rank_text": _rank_text(rank),
            "index": idx, "values": np.maximum(s, floor), "kept": idx <= keep_out,
            "cut": keep_out if method in ("svd", "tucker2") else None,
            "energy": layer.spectrum.energy,
            "metrics": layer.metrics,
            "dense_params": layer.geometry.dense_params,
            "spectrum_shape": layer.spectrum.shape,
        }
        if layer.spectrum_in is not None:
            si = layer.spectrum_in.values.astype(np.float64)
            ii = np.arange(1, si.size + 1)
            out.update(index_in=ii, values_in=np.maximum(si, floor),
                       kept_in=ii <= (keep_in if keep_in is not None else si.size),
                       cut_in=keep_in)
        out["tradeoffs"] = {m: (t.params, t.errors) for m, t in layer.tradeoffs.items()}
        p, _ = self._layer_after(name)
        out["current"] = (p, self.layer_error(name))
        return out

    # =====================================================================================
    # export
    # =====================================================================================
    def compressed_model(self) -> nn.Module:
        """The factorized model of the current plan (built once per plan; the same factors as the preview)."""
        from .surgery import compress

        with self._lock:
            model, plan, refine = self._model, self.plan, self.refine
            memo = self._export_memo
        if model is None:
            raise DataError("load a network first")
        key = self._memo_key(plan)
        if memo is not None and memo[0] == key:
            return memo[1]
        stats = self._calibration_stats() if self.calibrate else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BreakEvenWarning)
            small = compress(model, plan, refine=refine, stats=stats)
        n = count_params(small)
        expected = self._cost_for(plan)["params_after"]
        if n != expected:  # the page must show what the file holds
            raise TensorscopeError(f"internal: the built model has {n:,} parameters but {expected:,} were predicted")
        with self._lock:
            if self.plan is plan:
                self._export_memo = (key, small)
        return small

    def _memo_key(self, plan: Plan) -> str:
        return plan.to_json(indent=None) + f"|{self.refine}|{self.calibrate}"

    def _cost_for(self, plan: Plan) -> dict[str, Any]:
        if plan is self.plan:
            return self.cost
        saved = self._resolved
        try:
            self._resolved = {r.name: (r.method.name, r.rank) for r in plan.validate(self._model)}
            return self._cost()
        finally:
            self._resolved = saved

    def export_bytes(self, kind: str) -> tuple[str, bytes]:
        """The compressed model (or the plan) as a file: ``(filename, bytes)``.

        ``kind``: "checkpoint" (a tensorscope checkpoint with the plan, ``ts.load`` reads it),
        "exported_program" (``torch.export``, ``torch.export.load``), "torchscript"
        (``torch.jit.load``) or "plan" (the plan JSON). Built from factorized modules: its
        parameter count is ``cost["params_after"]``. Raises TensorscopeError on failure.
        """
        from . import checkpoint

        if kind not in EXPORT_KINDS:
            raise DataError(f"export kind must be one of {EXPORT_KINDS}; got {kind!r}")
        base = (self.example or os.path.splitext(self.source.replace("upload ", ""))[0] or "model").replace(" ", "_")
        base = "".join(c for c in base if c.isalnum() or c in "-_.") or "model"
        with self._lock:
            plan = self.plan
        if kind == "plan":
            return f"{base}-plan.json", (plan.to_json() + "\n").encode()
        if self._model is None:
            raise DataError("load a network first")
        small = self.compressed_model()
        with tempfile.TemporaryDirectory(dir=self._upload_dir.name) as tmp:
            if kind == "checkpoint":
                fn = f"{base}-compressed.safetensors"
                path = os.path.join(tmp, fn)
                checkpoint.save(small, path, metadata={"written_by": "tensorscope explorer",
                                                       "params": int(count_params(small))})
            else:
                if self._data is None:
                    raise DataError("an export needs an example input: load evaluation data or give an input shape")
                fn = f"{base}-compressed.{'pt2' if kind == 'exported_program' else 'pt'}"
                path = os.path.join(tmp, fn)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    checkpoint.export(small, path, self._data.inputs[:2].clone(), format=kind)
            with open(path, "rb") as f:
                return fn, f.read()

    # =====================================================================================
    # threads
    # =====================================================================================
    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the executor (or now, without one); errors land in ``error``."""

        def call():
            try:
                with TRACE_GUARD.running():
                    return fn(*args, **kwargs)
            except TensorscopeError as e:
                self.error = str(e)
                raise
            except Exception as e:  # never fail silently in a worker thread: the page must say
                self.error = f"{getattr(fn, '__name__', 'work')} failed: {type(e).__name__}: {e}"
                raise

        if self.executor is None:
            fut: Future = Future()
            try:
                fut.set_result(call())
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(e)
            return fut
        return self.executor.submit(call)

    def close(self) -> None:
        """Drop the network and caches (a session ended)."""
        with self._lock:
            self._model = None
            self._evaluator = None
            self._layers = {}
            self._export_memo = None
            self._calib = None
            self._stats = None
        self._upload_dir.cleanup()
        _release_memory()


def _release_memory() -> None:
    """Hand memory freed by a closed session back to the OS.

    glibc keeps freed blocks in per-thread arenas (the worker threads each have one), so a
    server's resident size stays at its high-water mark after sessions close unless asked:
    measured +12.9% after 50 sessions without this, 35-40 MB returned by each trim.
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


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


def _shrink(rank: Any) -> Any:
    if isinstance(rank, tuple):
        if len(rank) == 2:
            return tuple(max(1, int(r * 0.8)) for r in rank)
        return tuple([rank[0], *[max(1, int(r * 0.8)) for r in rank[1:-1]], rank[-1]])
    return max(1, int(rank * 0.8))


def _overview(layers: dict[str, _Layer], bins: int = 48):
    """All layers' spectra on one grid: rank position as a fraction of each layer's maximum,
    log10 of the singular value over the largest (a tidy DataFrame for a heat map)."""
    import pandas as pd

    rows = []
    grid = (np.arange(bins) + 0.5) / bins
    for name, layer in layers.items():
        s = layer.spectrum.values.astype(np.float64)
        if s.size == 0 or s.max() <= 0:
            continue
        pos = (np.arange(s.size) + 0.5) / s.size
        v = np.log10(np.maximum(s / s.max(), 1e-6))
        vals = np.interp(grid, pos, v)
        for g, val in zip(grid, vals):
            rows.append({"layer": name, "position": float(g), "log10 s/s_max": float(val), "rank": int(math.ceil(g * s.size))})
    return pd.DataFrame(rows, columns=["layer", "position", "log10 s/s_max", "rank"])
