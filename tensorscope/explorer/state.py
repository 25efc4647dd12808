"""The explorer's state: one network, one plan, and everything the dashboard shows about them.

:class:`ExplorerState` is a ``param.Parameterized`` object with no Panel import, one per
browser session; how it stays fast and how it is composed: see :mod:`tensorscope.explorer`.
This module holds the class itself: its parameters, the attributes its job mixins share,
and plan editing (layers, budget, presets, costs, the table, the plots' data).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import weakref
from concurrent.futures import Executor
from typing import Any

import numpy as np
import param
from torch import Tensor, nn

from ..budget import plan_for_budget
from ..errors import DataError
from ..inventory import LayerInfo
from ..methods import LayerGeometry, RankAxis, get_method, planner_methods
from ..methods.group import DEFAULT_GROUP_METHOD, get_group_method
from ..plan import Plan, as_plan
from ..ranks import energy_rank
from ..views import linear_view
from ..recovery import RANK_RULES
from ..rules import plan_by_rule
from . import groups as _groups
from . import limits
from .common import DENSE, _batches, _Layer, _rank_key, _rank_text, shared_result
from .compare import _Compare
from .data_aware import _DataAware
from .evaluator import _EvalData, _Evaluator
from .exports import _Exports
from .latency import _Latency
from .loading import _Loading
from .real import example_names
from .quality import _Quality
from .session import _release_memory
from .stages import _Stages


class _ScratchDir:
    """A session's scratch folder (uploads, exports), removed by ``cleanup()`` or, silently, when
    the session is garbage collected: ``TemporaryDirectory`` warns then ("Implicitly cleaning
    up"), and a warning raised inside a load was reported as a note about the uploaded file."""

    def __init__(self, prefix: str):
        self.name = tempfile.mkdtemp(prefix=prefix)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def cleanup(self) -> None:
        self._finalizer()


class ExplorerState(_Loading, _DataAware, _Quality, _Exports, _Compare, _Latency, _Stages, param.Parameterized):
    """One network, one plan, and what the explorer shows about them (one per session).

    Inputs a person changes: :meth:`load_example` (and :meth:`open_ready`, what a page opens
    on), :meth:`load_upload`, :meth:`load_eval_upload`, :meth:`use_eval`, :meth:`select`,
    :meth:`set_layer`, :meth:`set_rank_values`, :meth:`set_group`, :meth:`remove_group`,
    :meth:`set_group_rank_values`, :meth:`apply_budget`, :meth:`apply_preset`,
    :meth:`pin`, :meth:`restore`, :meth:`measure_latency`, :meth:`run_iterative`, :meth:`use_stage`,
    :meth:`load_pretrained`, :meth:`load_folder`; and the settings ``budget_keep``,
    ``budget_by`` and ``preset_energy``, which re-plan as they change (debounced). Results the
    view shows are parameters: ``table``, ``cost``, ``quality``, ``history``, ``pins``,
    ``latency``, ``stages``, ``message``, ``error``, ``busy``, ``progress``; and :meth:`rank_rows`,
    :meth:`spectrum_data`, :meth:`comparison`.

    The jobs are mixins, one module each (see :mod:`tensorscope.explorer.session`): loading
    and evaluation data (``loading.py``, ``eval_data.py``), data-aware mode and fine-tuning
    (``data_aware.py``), the quality preview (``quality.py``), exports (``exports.py``), pins
    and comparisons (``compare.py``), latency (``latency.py``). This class declares the
    parameters and the private attributes they share, and edits the plan.
    """

    # -- what is loaded ---------------------------------------------------------------------
    example = param.Selector(default=None, objects=[None, *example_names()], allow_None=True,
                             doc="The built-in example or pretrained network loaded (None for an upload).")
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
    budget_keep = param.Number(default=0.25, bounds=(0.0, 1.0), inclusive_bounds=(False, True), doc=(
        "The share of the network's parameters (or FLOPs) the budget planner keeps."))
    budget_by = param.Selector(default="params", objects=["params", "flops"],
                               doc="What the budget counts: parameters or FLOPs per sample.")
    preset_energy = param.Number(default=0.9, bounds=(0.5, 0.999), doc=(
        "The share of each unfolding's energy the energy preset keeps (it picks every layer's ranks)."))
    finetune_steps = param.Integer(default=limits.FINETUNE_STEPS, bounds=(1, 5000), doc=(
        "Optimizer steps of a fine-tune: distillation from the original on the calibration data."))

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
    busy = param.Boolean(default=False, doc="A job that shows progress is running.")
    loading = param.Boolean(default=False, doc="What the page shows is being replaced (network, data, mode).")
    progress = param.Number(default=0.0, bounds=(0.0, 1.0))
    progress_message = param.String(default="")
    version = param.Integer(default=0, doc="Bumped when a new network is installed.")
    plan_version = param.Integer(default=0, doc="Bumped on every plan change.")
    pins = param.List(default=[], doc="Pinned configurations (see pin), oldest first.")
    compare_a = param.Integer(default=None, allow_None=True, doc="The pin shown on the left of the comparison.")
    compare_b = param.Integer(default=None, allow_None=True, doc="The pin shown on the right of the comparison.")
    latency = param.Dict(default={}, doc="The last latency measurement (see measure_latency).")
    stages = param.List(default=[], doc="The last iterative compression, one row per stage (see run_iterative).")
    stoppable = param.Boolean(default=False, doc="A job stop() can end (fine-tuning, compression in stages) runs.")
    iterative_stages = param.Integer(default=3, bounds=(1, limits.MAX_STAGES), doc=(
        "Stages of an iterative compression: compress, fine-tune, compress further, ..."))
    iterative_rule = param.Selector(default="budget", objects=list(RANK_RULES), doc=(
        "How each stage picks ranks: the budget planner on a schedule reaching Keep, or MUSCO's weakened VBMF rule."))
    latency_batch = param.Integer(default=limits.LATENCY_BATCH, bounds=(2, 1024), doc=(
        "The batch size latency is measured at, besides batch 1."))

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
        self._options: dict[str, dict] = {}  # layer -> its plan entry's method options
        self._groups: list = []  # the plan's joint groups, resolved (ResolvedGroup), one unit each
        self._measured_error: dict[str, tuple[Any, float]] = {}  # layer -> (key, relative weight error)
        self._focus: str | None = None
        self._quality_wanted = 0
        self._quality_running = False
        self._export_memo: tuple[str, nn.Module] | None = None
        self._calib: tuple | None = None  # (inputs, labels or None, description)
        # a built-in example with its own calibration data: what both give is shared by sessions
        self._shared_key: tuple | None = None
        self._stats: dict | None = None  # layer -> LayerStats of the calibration data (data-aware mode)
        self._upload_dir = _ScratchDir("tensorscope-explorer-")
        self._runs: dict[str, dict] = {}  # coalesced jobs (see _latest)
        self._budget_applied: tuple | None = None  # (keep, by) of the last budget plan asked for
        self._data_version = 0  # bumped whenever the evaluation data changes
        self._outcomes: dict[str, Any] = {}  # history key -> top-1 predictions on the evaluation data
        self._pin_preds: dict[int, Any] = {}  # pin id -> its predictions
        self._next_pin = 1
        self._latency_memo: dict[str, dict] = {}  # plan JSON -> latency measured (this network)
        self._stage_plans: list[str] = []  # the plan of each stage of the last iterative run (JSON)
        self._stop = threading.Event()  # set by stop(): the fine-tuning or staged compression under way ends

    # -- what is loaded, read-only (the view, tests and notebooks ask these) --------------------
    @property
    def eval_inputs(self) -> Tensor | None:
        """The inputs the quality preview evaluates on (None without evaluation data)."""
        return self._data.inputs if self._data is not None else None

    @property
    def eval_targets(self) -> Tensor | None:
        """Their labels (None without labels: quality is then agreement with the original)."""
        return self._data.targets if self._data is not None else None

    @property
    def example_input(self) -> Tensor | None:
        """One evaluation sample, batch of one (what FLOPs and exports are measured with)."""
        return self._data.inputs[:1] if self._data is not None else None

    @property
    def calibration_inputs(self) -> Tensor | None:
        """The calibration inputs (data-aware mode, fine-tuning); None when there are none."""
        return self._calib[0] if self._calib is not None else None

    def calibration_statistics(self, name: str):
        """Layer ``name``'s input statistics on the calibration data (``LayerStats``), once the
        data-aware mode has collected them; None before."""
        return self._stats.get(name) if self._stats else None

    def layer_info(self, name: str) -> LayerInfo:
        """What :func:`tensorscope.inspect` says about layer ``name`` (kind, shape, geometry, max ranks)."""
        if name not in self._layers:
            raise DataError(f"no decomposable layer {name!r}")
        return self._layers[name].info

    def layer_spectrum(self, name: str, unfolding: str = "out", *, data_aware: bool | None = None):
        """The spectrum of one unfolding ("out" or "in") of layer ``name``: as shown now
        (``data_aware=None``), of the weights alone (False) or whitened by the calibration
        data (True; None until the data-aware mode computed it). None for an unfolding no
        rank axis reads."""
        if name not in self._layers:
            raise DataError(f"no decomposable layer {name!r}")
        layer = self._layers[name]
        view = (layer.spectrum, layer.spectrum_in) if data_aware is None else (
            layer.aware if data_aware else layer.plain)
        if view is None:
            return None
        return view[0] if unfolding == "out" else view[1]

    def layer_metrics(self, name: str) -> dict:
        """Stable rank, effective rank, ... of the spectrum shown for layer ``name``."""
        return dict(self._layers[name].metrics) if name in self._layers else {}

    def layer_cost(self, name: str) -> tuple[int, int | None]:
        """(parameters, FLOPs per sample) of layer ``name`` under the plan (FLOPs None without an input)."""
        if name not in self._layers:
            raise DataError(f"no decomposable layer {name!r}")
        return self._layer_after(name)

    @property
    def preview_stats(self) -> dict:
        """The quality preview's counters: ``full`` and ``incremental`` runs so far, the ``last``
        kind and its ``last_ms``, and whether the network could be ``traced`` (incremental
        re-runs need a ``torch.fx`` trace)."""
        ev = self._evaluator
        if ev is None:
            return {"full": 0, "incremental": 0, "last": "", "last_ms": 0.0, "traced": False}
        return {**ev.stats, "traced": ev.gm is not None}

    # -- the plan ---------------------------------------------------------------------------
    def select(self, name: str) -> None:
        if name in self._layers:
            self.selected = name

    def layer_choice(self, name: str) -> tuple[str, Any]:
        """(method, canonical rank) of a layer in the current plan; ``("dense", None)`` if not planned."""
        return self._resolved.get(name, (DENSE, None))

    def methods_for(self, name: str) -> list[str]:
        """The methods that can decompose layer ``name`` (the method selector's choices)."""
        return self._layers[name].methods if name in self._layers else []

    def layer_options(self, name: str) -> dict:
        """The method options of layer ``name``'s plan entry (e.g. a TT layer's in_shape)."""
        return dict(self._options.get(name, {}))

    def rank_axes(self, name: str, method: str | None = None) -> tuple[RankAxis, ...]:
        """The sliders of layer ``name`` under ``method`` (default: its current one), from the
        method's own rank axes; empty for a dense layer."""
        method = method or self.layer_choice(name)[0]
        if method == DENSE or name not in self._layers or method not in self._layers[name].methods:
            return ()
        same = method == self.layer_choice(name)[0]
        return get_method(method).rank_axes(self._layers[name].geometry, self._options.get(name) if same else None)

    def axis_values(self, name: str) -> tuple[int, ...]:
        """The current rank of layer ``name``, one integer per rank axis (empty when dense)."""
        method, rank = self.layer_choice(name)
        return () if method == DENSE else get_method(method).axis_values(rank)

    def rank_text(self, name: str) -> str:
        """The current rank of layer ``name`` as its method writes it ("" when dense)."""
        return _rank_text(*self.layer_choice(name))

    def set_rank_values(self, name: str, values, *, refresh: bool = True) -> bool:
        """Set layer ``name``'s rank from one value per rank axis (what moving its sliders does)."""

        def work():
            method = self.layer_choice(name)[0]
            if method == DENSE:
                raise DataError(f"layer {name!r} is dense: choose a method before a rank")
            geom = self._layers[name].geometry
            return get_method(method).rank_from_axes(geom, list(values), self._options.get(name))

        rank = self._guard(f"Layer {name}", work)
        return rank is not None and self.set_layer(name, self.layer_choice(name)[0], rank, refresh=refresh)

    # -- joint groups (one row of the ranks view each) ------------------------------------------
    def group_names(self) -> list[str]:
        """The plan's groups, in the plan's order."""
        return [g.name for g in self._groups]

    def group_of(self, layer: str) -> str | None:
        """The group layer ``layer`` belongs to (None when it is in none)."""
        return self.plan.group_of(layer)

    def _group(self, name: str):
        g = next((g for g in self._groups if g.name == name), None)
        if g is None:
            known = ", ".join(map(repr, self.group_names())) or "none"
            raise DataError(f"no group {name!r} in the plan (groups: {known}); form one with set_group")
        return g

    def group_rank_axes(self, name: str) -> tuple[RankAxis, ...]:
        """The sliders of group ``name``: its group method's rank axes over its members."""
        g = self._group(name)
        return g.method.rank_axes(g.geometries, g.options)

    def group_axis_values(self, name: str) -> tuple[int, ...]:
        """The current rank of group ``name``, one integer per rank axis."""
        g = self._group(name)
        return g.method.axis_values(g.rank)

    def group_cost(self, name: str) -> tuple[int, int | None]:
        """(parameters, FLOPs per sample) of all of group ``name``'s members, what they share counted once."""
        g = self._group(name)
        return (g.method.count_params_group(g.geometries, g.rank, g.options),
                g.method.count_flops_group(g.geometries, g.rank, g.options))

    def set_group(self, name: str, layers, method: str = DEFAULT_GROUP_METHOD, rank: Any = None, *,
                  refresh: bool = True, **options) -> bool:
        """Decompose ``layers`` together as group ``name`` with a group method (joint_tucker: one
        shared core), replacing a group of that name; True on success. ``rank`` None starts
        every rank axis at its default. The members' own plan entries give way to the group;
        what the plan refuses (a one-layer group, kernels of different shapes, a layer in two
        groups, a rank out of range) is a message in ``error``, the plan unchanged."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"a group needs a name (non-empty text); got {name!r}")
            members = [layers] if isinstance(layers, str) else list(layers)
            taken = [n for n in members if n in self.plan.layers]
            base = Plan({n: lp for n, lp in self.plan.layers.items() if n not in members}, self.plan.groups)
            r = rank
            if r is None:  # the members checked first: the plan's messages name what is wrong
                Plan({}, {name: {"method": method, "layers": members, "rank": 1.0, **options}}).resolve_groups(
                    self._model, {n: l.info.geometry for n, l in self._layers.items()})
                g = get_group_method(method)
                geoms = [self._layers[n].geometry if n in self._layers
                         else LayerGeometry.of(linear_view(self._model.get_submodule(n))) for n in members]
                r = g.rank_to_json(_groups.default_rank(g, geoms, g.check_options(options)))
            plan = base.with_group(name, method, members, r, **options)
            with self._lock:
                self._set_plan(plan, focus=None)
            self.error = ""
            g = self._group(name)
            note = f"; their own entries ({', '.join(taken)}) give way to it" if taken else ""
            self.message = (f"Group {name}: {g.method.name} at rank {g.method.rank_text(g.rank)} over "
                            f"{len(g.members)} layers{note}.")
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard(f"Group {name}", work))

    def remove_group(self, name: str, *, refresh: bool = True) -> bool:
        """Take group ``name`` out of the plan: its members become dense."""

        def work():
            self._group(name)
            with self._lock:
                self._set_plan(self.plan.with_group(name, None), focus=None)
            self.error = ""
            self.message = f"Group {name} removed: its layers are dense."
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard(f"Group {name}", work))

    def set_group_rank_values(self, name: str, values, *, refresh: bool = True) -> bool:
        """Set group ``name``'s rank from one value per rank axis (what moving its sliders does)."""

        def work():
            g = self._group(name)
            rank = _groups.rank_from_values(g.method, g.geometries, values, g.options)
            plan = self.plan.with_group(name, g.method.name, list(g.members), g.method.rank_to_json(rank), **g.options)
            with self._lock:
                self._set_plan(plan, focus=None)
            self.error = ""
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard(f"Group {name}", work))

    def default_rank(self, name: str, method: str, options: dict | None = None) -> Any:
        """A sensible starting rank when a layer's method is switched: each rank axis keeps 90% of
        the energy of the spectrum it reads (or takes the method's default), stepped down while
        the factorized layer would not be smaller than the dense one."""
        layer = self._layers[name]
        pick = lambda unfolding: energy_rank(layer.spectrum_of(unfolding), 0.9)  # noqa: E731
        return get_method(method).default_rank(layer.geometry, pick, options)

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
                # a layer keeps its options (a TT layer's shapes) while its method stays the same
                options = self._options.get(name, {}) if self.layer_choice(name)[0] == method else {}
                r = self.default_rank(name, method, options) if rank is None else rank
                canon = m.resolve_rank(layer.geometry, r, options)
                limits._check_work(name, layer, method, canon, options)
                plan = self.plan.with_layer(name, method, m.rank_to_json(canon), **options)
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
            p = as_plan(plan)
            p.validate(self._model, {n: l.info.geometry for n, l in self._layers.items()})
            with self._lock:
                self._set_plan(p, focus=None)
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Plan", work))

    def apply_budget(self, keep: float | None = None, by: str | None = None, *, refresh: bool = True) -> bool:
        """Fill in every layer's method and ranks from the budget planner (svd and tucker2); the
        plan's joint groups are priced as one unit each and get their ranks from it too (a
        group it leaves dense leaves the plan)."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            k = float(self.budget_keep if keep is None else keep)
            b = self.budget_by if by is None else by
            self._budget_applied = (k, b)  # before the update: the settings' watcher must not re-plan
            self.param.update(budget_keep=k, budget_by=b)
            if b == "flops" and self._data is None:
                raise DataError("a FLOPs budget needs an input: load evaluation data or give an input shape")
            with self._busy(f"planning for {k:.0%} of the {b}"):
                example_input = self._data.inputs[:1] if self._data is not None else None
                data = _batches(self._calib[0], None) if (self.calibrate and self._calib is not None) else None
                stats = self._calibration_stats() if data is not None else None  # the mode's pass, not another

                # the page's groups stay groups: the planner prices each as one unit and picks its rank
                groups = {g: {"method": gp.method, "layers": list(gp.layers), **gp.options}
                          for g, gp in self.plan.groups.items()}

                def plan_it():
                    return plan_for_budget(self._model, k, by=b, methods="auto", example_input=example_input,
                                           layers=list(self._layers), data=data, stats=stats,
                                           groups=groups or None).to_json(indent=None)

                if data is not None and self._shared_key is not None:  # seconds of statistics: once per server
                    key = ("budget", k, b, *self._shared_key, Plan({}, self.plan.groups).to_json(indent=None))
                    plan = Plan.from_json(shared_result(key, plan_it))
                else:
                    plan = Plan.from_json(plan_it())
                with self._lock:
                    self._set_plan(plan, focus=None)
            got = self.cost["params_after"] / self.cost["params"] if b == "params" else (
                self.cost["flops_after"] / self.cost["flops"])
            self.message = f"Budget: keep {k:.0%} of the {b} -> the plan keeps {got:.1%} ({len(plan)} layers decomposed)."
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Budget", work))

    @param.depends("budget_keep", "budget_by", watch=True)
    def _budget_moved(self) -> None:
        """The budget settings changed (the Keep slider moved): re-plan, debounced, off the caller's thread."""
        if self._model is None or (self.budget_keep, self.budget_by) == self._budget_applied:
            return
        self._latest("budget", lambda: self.apply_budget(), delay=limits.SLIDER_DEBOUNCE_S)

    @param.depends("preset_energy", watch=True)
    def _energy_moved(self) -> None:
        """The energy preset's setting changed: apply the preset, debounced."""
        if self._model is None:
            return
        self._latest("preset", lambda: self.apply_preset("energy"), delay=limits.SLIDER_DEBOUNCE_S)

    @property
    def replanning(self) -> bool:
        """A re-plan asked for by a moved setting (Keep, energy) is running or queued."""
        with self._lock:
            return any(r["running"] for r in self._runs.values())

    def open_ready(self, keep: float | None = None) -> bool:
        """What a page opens on, once a network is loaded: the data-aware mode when calibration
        data came with it, the budget planner's plan keeping ``keep`` of the parameters
        (default ``limits.OPEN_KEEP``), and the largest decomposed layer selected, so its
        method and rank sliders are in view and every number shows before and after."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            k = float(limits.OPEN_KEEP if keep is None else keep)
            aware = self._calib is not None and (self.calibrate or self.set_calibrate(True))
            if not self.apply_budget(k, "params", refresh=False):
                return False
            planned = [n for n in self.layer_names if n in self._resolved] or list(self.layer_names)
            if planned:
                self.select(max(planned, key=lambda n: self._layers[n].info.params))
            self.message = (
                f"Opened on the budget planner's plan for {k:.0%} of the parameters"
                + (f", with data-aware factors from {self._calib[2]}" if aware else "")
                + f" ({len(self.plan)} layer(s) decomposed). Move any rank slider, or Keep to re-plan.")
            self.request_quality()
            return True

        return bool(self._guard("Opening", work))

    def open_example(self, name: str, keep: float | None = None) -> bool:
        """:meth:`load_example`, then :meth:`open_ready` (what a new page does)."""
        return self.load_example(name) and self.open_ready(keep)

    def rank_rows(self, text: str = "") -> list[dict[str, Any]]:
        """The ranks view: one row per layer (network order) whose name or method contains
        ``text``: its method and the methods it may take, its rank axes and their values,
        the rank as text, and its parameters before and after. A joint group is one row, in
        its first member's place (``"group"``: its name, ``"members"``: its layers; found by
        its name, method or a member's name), its parameters counted once."""
        t = (text or "").strip().lower()
        rows = []
        first = {g.members[0]: g for g in self._groups}
        in_group = {n for g in self._groups for n in g.members}
        for name in self.layer_names:
            if name in first:
                row = _groups.rank_row(first[name])
                if not t or any(t in x.lower() for x in (row["group"], row["method"], *row["members"])):
                    rows.append(row)
            if name in in_group:
                continue
            method, _ = self.layer_choice(name)
            if t and t not in name.lower() and t not in method.lower():
                continue
            p, _ = self._layer_after(name)
            rows.append({"layer": name, "group": None, "kind": self._layers[name].info.kind, "method": method,
                         "methods": [DENSE, *self.methods_for(name)], "axes": self.rank_axes(name),
                         "values": self.axis_values(name), "rank": self.rank_text(name),
                         "params": int(self._layers[name].info.params), "params_after": int(p)})
        return rows

    def apply_preset(self, kind: str, value: float | None = None, *, refresh: bool = True) -> bool:
        """Ranks from a rule, per layer, by :func:`tensorscope.plan_by_rule` (the one
        implementation of the rules): ``("energy", 0.9)`` keeps 90% of each unfolding's energy
        (``preset_energy`` when no value is given); ``("vbmf",)`` uses the VBMF rank. The
        rule reads the spectra the page shows (whitened in the data-aware mode). A layer on a
        method with a cheap error curve keeps it, others get the planner's first method; a
        layer whose rank would not make it smaller stays dense; joint groups stay as they are."""

        def work():
            if kind not in ("energy", "vbmf"):
                raise DataError(f"preset must be 'energy' or 'vbmf'; got {kind!r}")
            keep = float(self.preset_energy if value is None else value)
            if kind == "energy" and not 0.0 < keep <= 1.0:
                raise DataError(f"energy to keep must be in (0, 1]; got {value!r}")
            # layers grouped by the method they prefer: their own when it has a cheap error curve
            groups: dict[str, list[str]] = {}
            in_group = {n for g in self._groups for n in g.members}  # groups keep their own ranks
            for name, layer in self._layers.items():
                choices = planner_methods(layer.geometry) if name not in in_group else []
                if choices:
                    own = self._resolved.get(name, (None,))[0]
                    groups.setdefault(own if own in choices else choices[0], []).append(name)
            shown = lambda name, unfolding: self._layers[name].spectrum_of(unfolding)  # noqa: E731
            entries: dict[str, Any] = {}
            for method, names in groups.items():
                menu = [method, *[m for m in planner_methods() if m != method]]
                plan = plan_by_rule(self._model, kind, keep=keep, methods=menu, layers=names, spectra=shown)
                entries.update({n: lp.to_dict() for n, lp in plan.items()})
            order = {n: i for i, n in enumerate(self._layers)}
            layers = {n: entries[n] for n in sorted(entries, key=order.__getitem__)}
            dense = len(self._layers) - len(layers) - len(in_group)
            with self._lock:
                self._set_plan(Plan(layers, self.plan.groups), focus=None)
            what = f"{keep:.0%} energy" if kind == "energy" else "VBMF"
            note = f"; {dense} layer(s) stay dense (no smaller at that rank)" if dense else ""
            self.message = f"Preset {what}: {len(layers)} layer(s) decomposed{note}."
            if refresh:
                self.request_quality()
            return True

        return bool(self._guard("Preset", work))

    def _set_plan(self, plan: Plan, focus: str | None) -> None:
        """Install ``plan`` and recompute costs and the table (cheap; caller holds the lock)."""
        resolved, options = {}, {}
        geoms = {n: l.info.geometry for n, l in self._layers.items()}
        for r in plan.validate(self._model, geoms) if self._model is not None else []:
            resolved[r.name] = (r.method.name, r.rank)
            options[r.name] = dict(r.options)
        self._resolved, self._options = resolved, options
        self._groups = _groups.resolve(plan, self._model, geoms)  # joint groups: one unit each
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
        m, options = get_method(method), self._options.get(name)
        return m.count_params(geom, rank, options), m.count_flops(geom, rank, options)

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
        dp, df, db = _groups.cost_delta(self._groups)
        params_after, bytes_after = params_after + dp, bytes_after + db
        flops_after = None if (flops_after is None or df is None) else flops_after + df
        return {
            "params": self._base_params, "params_after": params_after,
            "flops": self._base_flops, "flops_after": flops_after,
            "bytes": self._base_bytes, "bytes_after": bytes_after,
            "ratio": self._base_params / params_after if params_after else float("inf"),
            "flops_ratio": (self._base_flops / flops_after) if (self._base_flops and flops_after) else None,
            "layers_planned": len(self._resolved) + sum(len(g.members) for g in self._groups),
        }

    def layer_error(self, name: str) -> float | None:
        """Relative Frobenius error of a layer's weight under the plan (None while unknown: a
        method without cheap errors, until the preview has measured it).

        In data-aware mode: the relative error of the layer's output on the calibration data.
        """
        method, rank = self._resolved.get(name, (DENSE, None))
        if method == DENSE:
            return 0.0
        key = (method, _rank_key(method, rank), self.refine, self.calibrate)
        measured = self._measured_error.get(name)
        if measured is not None and measured[0] == key:
            return measured[1]
        stats = self._stats.get(name) if (self.calibrate and self._stats) else None
        return get_method(method).cheap_error(self._layers[name].module, rank, stats, self._options.get(name))

    def _table(self):
        import pandas as pd  # optional: comes with the app's extras, not a core dependency

        rows = []
        group_rows, in_group = _groups.table_rows(self._groups)
        for name, layer in self._layers.items():
            info = layer.info
            method, rank = self._resolved.get(name, (DENSE, None))
            p, f = self._layer_after(name)
            err = self.layer_error(name)
            if name in in_group:  # its share is in its group's row
                method, p, err = in_group[name], 0, None
            rows.append({
                "layer": name,
                "type": info.kind,
                "shape": "×".join(str(s) for s in info.weight_shape),
                "params": int(info.params),
                "MFLOPs": (info.flops / 1e6) if info.flops is not None else float("nan"),
                "method": method,
                "rank": _rank_text(method, rank),
                "params after": int(p),
                "ratio": info.geometry.dense_params / p if p else float("inf" if name not in in_group else "nan"),
                "rel. error": float("nan") if err is None else float(err),
                "energy %": float("nan") if err is None else round(100.0 * (1.0 - float(err) ** 2), 1),
            })
        rows += group_rows
        return pd.DataFrame(rows, columns=["layer", "type", "shape", "params", "MFLOPs", "method", "rank",
                                           "params after", "ratio", "rel. error", "energy %"])

    # -- what the plots show -----------------------------------------------------------------
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
        cut_out = cut_in = None  # where the plan's rank cuts each spectrum (axes that truncate one)
        for ax, v in zip(self.rank_axes(name), self.axis_values(name)):
            if ax.truncates and ax.unfolding == "out":
                cut_out = int(v) * layer.spectrum.groups
            elif ax.truncates and ax.unfolding == "in":
                cut_in = int(v)
        keep_out, keep_in = (k if cut_out is None else cut_out), cut_in
        idx = np.arange(1, k + 1)
        out: dict[str, Any] = {
            "layer": name, "kind": layer.info.kind, "method": method, "rank": rank,
            "rank_text": _rank_text(method, rank),
            "index": idx, "values": np.maximum(s, floor), "kept": idx <= keep_out,
            "cut": cut_out,
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
