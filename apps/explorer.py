"""The tensorscope explorer: ``panel serve apps/explorer.py``.

A thin Panel view over :class:`tensorscope.explorer.ExplorerState`; everything that
computes lives there. Serve it with::

    panel serve apps/explorer.py --websocket-max-message-size 104857600

(the flag lets uploads up to the 50 MB limit through: Bokeh's default websocket message
limit is 20 MB and an over-large message is dropped without an error). Each browser session
builds its own :class:`ExplorerView` in :func:`build`.

In a notebook::

    import sys; sys.path.insert(0, "apps")
    from explorer import ExplorerView
    view = ExplorerView(load="lenet5"); view      # the explorer, inline

How the view is wired (Panel's Param and Viewer idiom): widgets that edit a setting of the
state are made from its parameters (``from_param``); text, numbers and alerts are panes bound
to state parameters (``pn.bind``); widgets whose state changes need more than one value (the
per-layer controls, the table's selection) follow the state through ``param.depends(...,
watch=True)``; the view never names a decomposition method: it asks the state, which asks
the method (its rank axes, rank text, speed note).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import NumeralTickFormatter
from panel.io.state import set_curdoc

try:
    import tensorscope  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from tensorscope.explorer.real import example_names, folder_root
from tensorscope.explorer import (
    DENSE,
    EXECUTOR,
    MAX_UPLOAD_MB,
    ExplorerState,
    format_bytes,
    format_count,
)
from tensorscope.methods import available_methods, get_method

pn.extension("tabulator", sizing_mode="stretch_width", notifications=False)
hv.extension("bokeh", logo=False)

ACCENT = "#2f6f9f"
KEPT = "#2f6f9f"
CUT = "#c8ccd2"
MARK = "#d9480f"
IN_COLOR = "#2b9348"  # the input-channel spectrum, where a rank axis truncates it
#: method colours: assigned by each method's place in ``available_methods()`` (plugins included)
PALETTE = ("#2f6f9f", "#2b9348", "#9c36b5", "#e67700", "#c92a2a", "#0b7285", "#5f3dc4", "#5c940d")
PLOT_H = 300
COUNT_FMT = NumeralTickFormatter(format="0.[0]a")
DEFAULT_EXAMPLE = os.environ.get("TENSORSCOPE_EXPLORER_EXAMPLE", "lenet5")
HINT = {"font-size": "12px", "color": "#52606d"}
DEFER_MS = 100  # plots redraw this long after the change (the numbers, already computed, go first)
WAIT_QUALITY_S = 1.5  # and while the accuracy is being computed, up to this long after it
ROW_LIMIT = 40  # rows the ranks view shows at once (type in its filter to reach the others)

STAT_CSS = """
:host { display: block; }
.ts-stat { border: 1px solid #dde3ea; border-radius: 8px; padding: 8px 12px; background: #fbfcfd;
           font-family: system-ui, -apple-system, "Segoe UI", sans-serif; min-height: 84px; }
.ts-stat .ts-label { font-size: 12px; color: #5c6773; text-transform: uppercase; letter-spacing: .04em; }
.ts-stat .ts-main { font-size: 22px; font-weight: 600; color: #1f2933; white-space: nowrap; }
.ts-stat .ts-before { font-size: 14px; color: #7b8794; font-weight: 400; }
.ts-stat .ts-sub { font-size: 12px; color: #3e4c59; }
.ts-good { color: #2b8a3e; } .ts-bad { color: #c92a2a; }
.ts-pending { opacity: .45; }
"""

COMPARE_CSS = """
:host { display: block; }
.ts-cmp { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px; color: #1f2933; }
.ts-cmp table { border-collapse: collapse; margin: 4px 0 12px 0; }
.ts-cmp th, .ts-cmp td { padding: 3px 10px; border-bottom: 1px solid #e4e7eb; text-align: right; white-space: nowrap; }
.ts-cmp th:first-child, .ts-cmp td:first-child { text-align: left; }
.ts-cmp th { color: #52606d; font-weight: 600; background: #f5f7fa; }
.ts-cmp tr.ts-differs td { background: #fff8e6; }
.ts-cmp h4 { margin: 10px 0 4px 0; font-size: 14px; }
.ts-cmp .ts-hint { color: #52606d; }
.ts-cmp .ts-warn { background: #fff4e6; border: 1px solid #ffc078; border-radius: 6px; padding: 8px 12px; }
.ts-cmp .ts-up { color: #2b8a3e; } .ts-cmp .ts-down { color: #c92a2a; }
.ts-cmp .ts-gallery { display: flex; flex-wrap: wrap; gap: 6px; }
.ts-cmp .ts-sample { border: 1px solid #dde3ea; border-radius: 6px; padding: 4px; text-align: center; font-size: 11px; width: 92px; }
.ts-cmp .ts-sample img { width: 56px; height: 56px; image-rendering: pixelated; display: block; margin: 0 auto 2px auto; }
.ts-cmp .ts-cols { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
"""


def method_color(method: str) -> str:
    """A method's colour in every plot: the palette in the order of ``available_methods()``."""
    names = available_methods()
    return PALETTE[(names.index(method) if method in names else len(names)) % len(PALETTE)]


def _stat(label: str, main: str, before: str = "", sub: str = "", cls: str = "", pending: bool = False) -> str:
    before_html = f'<span class="ts-before">{before} → </span>' if before else ""
    return (
        f'<div class="ts-stat {cls}"><div class="ts-label">{label}</div>'
        f'<div class="ts-main{" ts-pending" if pending else ""}">{before_html}<span class="{cls}-value">{main}</span></div>'
        f'<div class="ts-sub">{sub}</div></div>'
    )


def _framewise(overlay: hv.Overlay) -> hv.Overlay:
    """Axes that follow each frame's data (a DynamicMap keeps its first frame's ranges otherwise)."""
    for el in overlay:
        el.opts(framewise=True)
    return overlay.opts(framewise=True)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _with_tip(widget, text: str, **row):
    """A widget followed by a tooltip icon (Panel's sliders and switches have no tooltip of their own)."""
    if not text:
        return widget
    icon = pn.widgets.TooltipIcon(value=text, width=24, sizing_mode="fixed", margin=(22, 4, 0, 0))
    return pn.Row(widget, icon, **{"sizing_mode": "stretch_width", "margin": 0, **row})


class _SessionLoop:
    """Runs a view update on its session's event loop, once per burst of state changes.

    The state's parameters change in worker threads (loading, budgets, the quality preview).
    Bound panes need nothing: Panel schedules their model updates on the session's loop. The
    updates passed here also read and rewrite the view's own widgets (rebuild rank sliders,
    select a table row), so they run on the session's thread, one at a time, and a burst of
    events from a worker schedules each update once.
    """

    def __init__(self, on_error: Callable[[str], None]):
        self.doc = pn.state.curdoc
        self.thread = threading.get_ident()
        self.on_error = on_error
        self._pending: set[Callable] = set()
        self._lock = threading.Lock()

    @property
    def served(self) -> bool:
        """Whether a server session's event loop runs the updates (not a notebook, not a test)."""
        return self.doc is not None and self.doc.session_context is not None

    def __call__(self, fn: Callable[[], None], defer: bool = False) -> None:
        """Run ``fn`` on the session's thread: now if already there (unless ``defer``: after
        the changes made so far have gone to the browser), else on the next tick."""
        doc = self.doc
        if not self.served or (threading.get_ident() == self.thread and not defer):
            fn()
            return
        with self._lock:
            if fn in self._pending:
                return
            self._pending.add(fn)

        def run():
            with self._lock:
                self._pending.discard(fn)
            with set_curdoc(doc):
                try:
                    fn()
                except Exception as e:  # never kill the session over a render
                    traceback.print_exc()
                    self.on_error(f"display error: {type(e).__name__}: {e}")

        try:
            if defer:  # behind the updates already queued (numbers first, then the plots)
                doc.add_timeout_callback(run, DEFER_MS)
            else:
                doc.add_next_tick_callback(run)
        except Exception:  # the session is gone
            pass


class RankRow:
    """One row of the ranks view: a layer's name (click: show it above), its method, one slider
    per rank axis of that method, and its parameters after. A joint group's row is the same,
    for the group: its group method (dense: ungroup) and its rank axes, the members' parameters
    counted once. Rebuilt when the method or rank axes change; otherwise its values follow the
    state in place."""

    def __init__(self, view: "ExplorerView", row: dict, key: Any):
        s = view.state
        name, method, group = row["layer"], row["method"], row.get("group")
        self.key = key
        if group is None:
            self.button = pn.widgets.Button(
                label=name, width=150, margin=(8, 4), css_classes=["ts-row-select"],
                description=f"Show {name} in the layer controls and the spectrum plots.")
            self.button.on_click(lambda _e: s.select(name))
            on_method, on_axis, what = view._on_row_method, view._on_axis, "dense: kept as it is"
        else:
            members = row["members"]
            self.button = pn.widgets.Button(
                label=f"{group} ({len(members)} layers)", width=150, margin=(8, 4),
                css_classes=["ts-row-select", "ts-row-group"],
                description=f"Joint group of {', '.join(members)}: one decomposition shared by all. "
                            f"Show {members[0]} in the layer controls.")
            self.button.on_click(lambda _e: s.select(members[0]))
            on_method, on_axis, what = view._on_group_method, view._on_group_axis, "dense: ungroup its layers"
        self.method = pn.widgets.Select(
            options=row["methods"], value=method, width=100, margin=(8, 4), css_classes=["ts-row-method"],
            description=f"How {name} is decomposed ({what}).")
        pn.bind(on_method, name, self.method, watch=True)
        self.sliders = []
        for i, (ax, v) in enumerate(zip(row["axes"], row["values"])):
            w = pn.widgets.IntSlider(label=ax.name, start=ax.low, end=max(ax.high, ax.low + 1), value=int(v), step=1,
                                     width=150, margin=(0, 6), css_classes=["ts-row-rank"], disabled=ax.high <= ax.low)
            pn.bind(on_axis, name, method, i, w, watch=True)
            self.sliders.append(w)
        self.after = pn.pane.HTML("", width=110, margin=(14, 4), styles={"font-size": "12px", "color": "#3e4c59"})
        help_ = "; ".join(ax.help or f"{ax.label} ({ax.low}-{ax.high})" for ax in row["axes"])
        tip = pn.widgets.TooltipIcon(value=(f"{method}: {help_}" if help_ else "Dense: choose a method to decompose "
                                            "this layer."), width=24, sizing_mode="fixed", margin=(14, 0))
        self.layout = pn.Row(self.button, self.method, *self.sliders, self.after, tip,
                             css_classes=["ts-rank-row"], sizing_mode="stretch_width", margin=0, height=56)
        self.update(row, s.selected)

    def update(self, row: dict, selected: str | None) -> None:
        """Show the state's values (each handler sees its own value back and does nothing)."""
        if self.method.value != row["method"]:
            self.method.value = row["method"]
        for w, v in zip(self.sliders, row["values"]):
            if w.value != v:
                w.value = int(v)
        after = f"{format_count(row['params_after'])} of {format_count(row['params'])}"
        if self.after.object != after:
            self.after.object = after
        kind = "primary" if selected in (row["layer"], *row.get("members", ())) else "default"
        if self.button.color != kind:
            self.button.color = kind


def _fmt(quantity: str, v: Any) -> str:
    """A number of the comparison, as the page shows it."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if quantity in ("parameters", "FLOPs per sample"):
        return format_count(v)
    if quantity == "compression":
        return f"{v:.2f}×"
    if quantity.startswith("latency"):
        return f"{v:.2f} ms"
    return _pct(v)


def _compare_html(cmp: dict, images: Callable[[int], str] | None) -> str:
    """Two pinned configurations side by side (see ExplorerState.comparison)."""
    a, b = cmp["a"], cmp["b"]
    head = f"<tr><th></th><th>A: {a['label']}</th><th>B: {b['label']}</th></tr>"
    rows = []
    for quantity, va, vb in cmp["summary"]:
        cls = ""
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool) and va != vb:
            better_b = (vb > va) if quantity in ("compression", "accuracy", "agreement", "cosine") else (vb < va)
            cls = " class='ts-up'" if better_b else " class='ts-down'"
        rows.append(f"<tr><td>{quantity}</td><td>{_fmt(quantity, va)}</td><td{cls}>{_fmt(quantity, vb)}</td></tr>")
    summary = f"<table class='ts-cmp-summary'>{head}{''.join(rows)}</table>"
    layer_rows = []
    for r in cmp["layers"]:
        cls = " class='ts-differs'" if r["differs"] else ""
        layer_rows.append(
            f"<tr{cls}><td>{r['layer']}</td><td>{r['method a']} {r['rank a']}</td><td>{format_count(r['params a'])}</td>"
            f"<td>{r['method b']} {r['rank b']}</td><td>{format_count(r['params b'])}</td></tr>")
    layers = ("<table class='ts-cmp-layers'><tr><th>layer</th><th>A: method rank</th><th>params</th>"
              f"<th>B: method rank</th><th>params</th></tr>{''.join(layer_rows)}</table>")
    parts = [f"<div class='ts-cols'><div><h4>Configurations</h4>{summary}</div><div><h4>Per layer "
             f"(differences highlighted)</h4>{layers}</div>"]
    if cmp["classes"]:
        crow = []
        for c in cmp["classes"]:
            d = c["accuracy b"] - c["accuracy a"]
            cls = "ts-up" if d > 0 else ("ts-down" if d < 0 else "")
            crow.append(f"<tr><td>{c['class']}</td><td>{c['samples']}</td><td>{_pct(c['accuracy a'])}</td>"
                        f"<td>{_pct(c['accuracy b'])}</td><td class='{cls}'>{100 * d:+.1f}</td></tr>")
        parts.append("<div><h4>Accuracy per class</h4><table class='ts-compare-classes'><tr><th>class</th>"
                     f"<th>samples</th><th>A</th><th>B</th><th>B − A (pts)</th></tr>{''.join(crow)}</table></div>")
    parts.append("</div>")
    ch = cmp["changed"]
    if ch.get("samples"):
        cards = []
        for item in ch["shown"]:
            img = images(item["index"]) if images is not None else ""
            label = "" if item["label"] is None else f"true {item['label']} · "
            cards.append(f"<div class='ts-sample'>{img}#{item['index']}<br>{label}A {item['a']} · B {item['b']}</div>")
        more = f" (the first {len(ch['shown'])} below)" if ch["total"] > len(ch["shown"]) else ""
        parts.append(f"<h4 class='ts-changed-title'>{ch['total']} of {ch['samples']} evaluation samples change their "
                     f"prediction between A and B{more}</h4><div class='ts-gallery ts-changed'>{''.join(cards)}</div>")
    if cmp["note"]:
        parts.append(f"<p class='ts-hint'>{cmp['note']}.</p>")
    return f"<div class='ts-cmp'>{''.join(parts)}</div>"


class ExplorerView(pn.viewable.Viewer):
    """The dashboard of one session: widgets wired to an :class:`ExplorerState`.

    ``state`` defaults to a new state whose slow work runs on the shared worker threads;
    ``load`` names an example to load when the page opens (False: none).
    """

    state = param.ClassSelector(class_=ExplorerState)
    plot_tick = param.Integer(default=0, doc="Bumped when the selected layer's plots must redraw.")
    history_tick = param.Integer(default=0, doc="Bumped when the history plot must redraw.")

    def __init__(self, state: ExplorerState | None = None, load: str | bool | None = None, **params):
        super().__init__(state=state or ExplorerState(executor=EXECUTOR), **params)
        self._loop = _SessionLoop(lambda text: setattr(self.state, "error", text))
        self._ticks = itertools.count(1)
        self._load_on_start = load
        self._control_key: Any = None
        self._plot_key: Any = None
        self._plot_asked = 0.0  # when the plots were last asked to redraw (time.monotonic)
        #: the ranks view's rows, by layer (those shown, and those hidden by its filter)
        self.layer_rows: dict[str, RankRow] = {}
        #: the selected layer's rank sliders, one per rank axis of its method
        self.rank_sliders: list[pn.widgets.IntSlider] = []
        self._build_widgets()
        self._build_plots()
        self._wire()
        self._render_table()
        self._render_controls()
        self._render_ranks()
        self._render_history_table()
        self._show_pins()
        self._render_busy()

    def _submit(self, fn: Callable, *args, **kwargs):
        return self.state.submit(fn, *args, **kwargs)

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        s = self.state
        busy = s.param.busy
        # network
        self.example_select = pn.widgets.Select(
            label="Example network", options=example_names(),
            value=self._load_on_start if self._load_on_start in example_names() else DEFAULT_EXAMPLE,
            css_classes=["ts-example"],
            description="A built-in MNIST network (trained on first use, then cached), or a real pretrained one "
                        "(listed when its packages are installed) with the data that ships with it.")
        self.load_button = pn.widgets.Button(
            label="Load example", color="primary", css_classes=["ts-load"],
            description="Replace this session's network and plan by the example chosen above.")
        root = folder_root()
        self.folder_input = pn.widgets.TextInput(
            label="Hugging Face folder on the server", css_classes=["ts-folder"],
            placeholder=f"a folder under {root}" if root else "not allowed on this server",
            description="A model folder (config.json, weights, tokenizer) on the server's disk, under the folder "
                        "the server allows (TENSORSCOPE_EXPLORER_HF_ROOT); text models get shipped sentences.")
        self.folder_button = pn.widgets.Button(
            label="Load folder", css_classes=["ts-load-folder"],
            description="Replace this session's network by the model folder above (the current one stays on error).")
        self.model_file = pn.widgets.FileInput(
            accept=".pt,.pth,.safetensors,.bin,.ckpt", css_classes=["ts-model-file"], label="Network file",
            description="A state dict, a checkpoint written here, or (if trusted) a pickled module.")
        self.arch_input = pn.widgets.TextInput(
            label="Architecture (package.module:factory)", placeholder="e.g. tensorscope.examples:lenet5",
            css_classes=["ts-arch"], description="What builds the network a state dict belongs to.")
        self.trust_box = pn.widgets.Checkbox(
            label="I trust this file (allow a pickled whole module: runs code from it)", css_classes=["ts-trust"])
        self.upload_button = pn.widgets.Button(
            label="Load uploaded network", color="default", css_classes=["ts-upload"],
            description="Replace this session's network by the file above (the current one stays on error).")
        self.upload_hint = pn.pane.Markdown(
            f"State dict (`.pt`, `.safetensors`) with its architecture, a tensorscope checkpoint "
            f"written here, or a pickled module if trusted. **Files over {MAX_UPLOAD_MB:g} MB are refused.**",
            styles=HINT, margin=(0, 10))
        # evaluation data: the selector follows the state; choosing submits the switch
        self.eval_select = pn.widgets.RadioButtonGroup(
            label="Evaluation data", options=["held-out", "uploaded", "none"], value=s.eval_source,
            color="default", css_classes=["ts-eval"],
            description="What the accuracy is measured on: held-out data, your upload, or agreement "
                        "with the original on a calibration batch.")
        self.eval_file = pn.widgets.FileInput(
            accept=".pt,.pth,.npz", css_classes=["ts-eval-file"],
            description="A .pt/.npz of inputs (and labels) to measure quality on.")
        self.shape_input = pn.widgets.TextInput.from_param(
            s.param.input_shape, label="Input shape of one sample (no data)", placeholder="1,28,28",
            description="Without evaluation data: one sample's shape, for FLOPs and a random calibration batch.")
        self.eval_text = pn.pane.Markdown(pn.bind(lambda d: f"Now: {d or 'none'}", s.param.eval_description),
                                          styles=HINT, margin=(0, 10))
        # data-aware mode and recovery: the switch follows the state; flipping it submits the switch
        self.calibrate_switch = pn.widgets.Switch(value=s.calibrate, css_classes=["ts-calibrate"], width=40,
                                                  height=24, sizing_mode="fixed", margin=(8, 10))
        self.calib_file = pn.widgets.FileInput(
            accept=".pt,.pth,.npz", css_classes=["ts-calib-file"],
            description="A .pt/.npz of inputs (labels optional) for data-aware factors and fine-tuning.")
        self.calib_text = pn.pane.Markdown(
            pn.bind(self._calibration_text, s.param.calibrate, s.param.calibration_description, s.param.recovery,
                    s.param.plan), styles=HINT, margin=(0, 10))
        self.finetune_steps = pn.widgets.IntInput.from_param(
            s.param.finetune_steps, label="Fine-tune steps", step=50, width=130, css_classes=["ts-finetune-steps"],
            description="How many optimizer steps the fine-tune runs.")
        self.finetune_button = pn.widgets.Button(
            label="Fine-tune this plan", color="primary", css_classes=["ts-finetune"],
            description="Distil the compressed model from the original on the calibration data; "
                        "shows the accuracy before and after.")
        # budget and presets: the sliders are the state's own settings
        self.keep_slider = pn.widgets.FloatSlider.from_param(
            s.param.budget_keep, label="Keep", start=0.02, end=1.0, step=0.01, format="0%", css_classes=["ts-keep"])
        self.by_select = pn.widgets.RadioButtonGroup.from_param(
            s.param.budget_by, label="Budget counts", description=s.param.budget_by.doc)
        self.auto_button = pn.widgets.Button(
            label="Auto: fill ranks for this budget", color="primary", css_classes=["ts-auto"],
            description="Every layer's method and ranks from the budget planner, for the share above, now "
                        "(moving Keep re-plans by itself).")
        self.energy_slider = pn.widgets.FloatSlider.from_param(
            s.param.preset_energy, label="Energy kept per layer", step=0.005, format="0.0%",
            css_classes=["ts-energy-slider"])
        self.energy_button = pn.widgets.Button(
            label="Energy preset", css_classes=["ts-energy"],
            description="Each layer's ranks keep the energy above of the spectra they cut, now (moving the "
                        "slider applies it by itself).")
        self.vbmf_button = pn.widgets.Button(
            label="VBMF preset", css_classes=["ts-vbmf"],
            description="Each layer's ranks from variational Bayesian matrix factorization (noise-level estimate).")
        # iterative compression (ts.iterative): stages, rule, run; its stages are plotted
        self.stages_input = pn.widgets.IntInput.from_param(
            s.param.iterative_stages, label="Stages", width=80, css_classes=["ts-stages"],
            description=s.param.iterative_stages.doc)
        self.rule_select = pn.widgets.Select.from_param(
            s.param.iterative_rule, label="Ranks per stage", width=140, css_classes=["ts-stage-rule"],
            description=s.param.iterative_rule.doc)
        self.iterative_button = pn.widgets.Button(
            label="Compress in stages", css_classes=["ts-iterative"],
            description="ts.iterative (MUSCO): compress, fine-tune on the calibration data, compress further; "
                        "each stage is plotted (parameters, quality before and after its fine-tuning).")
        self.reset_button = pn.widgets.Button(
            label="All dense", css_classes=["ts-reset"],
            description="Undo every decomposition: the original network.")
        # export
        self.downloads = {
            kind: pn.widgets.FileDownload(callback=self._download(kind), filename=name, label=label, auto=True,
                                          embed=False, color="success" if kind == "checkpoint" else "default",
                                          css_classes=[f"ts-export-{kind}"], description=tip)
            for kind, name, label, tip in [
                ("checkpoint", "model-compressed.safetensors", "Checkpoint (ts.load)",
                 "The compressed model with its plan: tensorscope.load reads it, no pickle."),
                ("exported_program", "model-compressed.pt2", "ExportedProgram (.pt2)",
                 "torch.export: torch.export.load(...).module() runs it with torch alone."),
                ("torchscript", "model-compressed.pt", "TorchScript (.pt)", "torch.jit.load runs it."),
                ("plan", "plan.json", "Plan (JSON)", "The plan only: every layer's method and rank."),
            ]
        }
        # messages and progress: bound to the state
        self.error_alert = pn.pane.Alert(s.param.error, alert_type="danger", visible=pn.bind(bool, s.param.error),
                                         css_classes=["ts-error"])
        self.message_alert = pn.pane.Alert(
            s.param.message, alert_type="info", css_classes=["ts-message"],
            visible=pn.bind(lambda m, e: bool(m) and not e, s.param.message, s.param.error))
        self.progress = pn.indicators.Progress(
            value=pn.bind(lambda p, b: int(round(100 * p)) if b else 0, s.param.progress, busy), max=100,
            visible=False, bar_color="primary", css_classes=["ts-progress"], height=18)
        # the message also shows while a slow method's factors are fitted for the accuracy (not busy)
        self.progress_text = pn.pane.Markdown(
            pn.bind(lambda b, q, m: m if (b or q) else "", busy, s.param.quality_pending, s.param.progress_message),
            visible=False, styles={"font-size": "12px"}, margin=(0, 10), css_classes=["ts-progress-text"])
        self.stop_button = pn.widgets.Button(
            label="Stop", color="warning", css_classes=["ts-stop"], width=90,
            visible=s.param.stoppable,
            description="End the fine-tuning or compression in stages at its next step; what it has done is kept.")
        # summary numbers
        stat = dict(stylesheets=[STAT_CSS], min_width=180, sizing_mode="stretch_width")
        self.stats = {
            "params": pn.pane.HTML(pn.bind(self._params_html, s.param.cost), css_classes=["ts-stat-params"], **stat),
            "flops": pn.pane.HTML(pn.bind(self._flops_html, s.param.cost), css_classes=["ts-stat-flops"], **stat),
            "size": pn.pane.HTML(pn.bind(self._size_html, s.param.cost), css_classes=["ts-stat-size"], **stat),
            "latency": pn.pane.HTML(pn.bind(self._latency_html, s.param.latency, s.param.plan, s.param.cost),
                                    css_classes=["ts-stat-latency"], **stat),
            "quality": pn.pane.HTML(pn.bind(self._quality_html, s.param.quality, s.param.quality_pending),
                                    css_classes=["ts-stat-quality"], **stat),
            "agreement": pn.pane.HTML(pn.bind(self._agreement_html, s.param.quality, s.param.quality_pending),
                                      css_classes=["ts-stat-agreement"], **stat),
        }
        self.source_text = pn.pane.Markdown(
            pn.bind(lambda src, ev: f"**Network:** {src or 'none loaded'} · **Quality on:** {ev or '–'}",
                    s.param.source, s.param.eval_description),
            styles={"font-size": "13px", "color": "#3e4c59"}, margin=(0, 10))
        # speed on this server
        self.latency_batch = pn.widgets.IntInput.from_param(
            s.param.latency_batch, label="Batch (besides 1)", step=8, width=130, css_classes=["ts-latency-batch"],
            description="The second batch size latency is measured at.")
        self.latency_button = pn.widgets.Button(
            label="Measure latency", css_classes=["ts-measure-latency"],
            description="Time the compressed model against the original on this server (1 thread, batch 1 and the "
                        "batch on the left, medians): the measured speed-up shows next to the FLOP ratio.")
        # the ranks view: every layer at hand
        self.rank_filter = pn.widgets.TextInput(
            placeholder="filter layers by name or method", css_classes=["ts-rank-filter"], width=260,
            description="Show only the layers whose name or method contains this text.")
        self.rank_count = pn.pane.Markdown("", styles=HINT, margin=(12, 10, 0, 10))
        # forming a joint group from the page (its checks are messages in the page)
        self.group_layers = pn.widgets.MultiChoice(
            placeholder="layers of one kernel shape", options=[], width=300, css_classes=["ts-group-layers"],
            description="Layers to decompose together, one core shared by all (T-Net): same kernel shape.")
        self.group_name = pn.widgets.TextInput(value="group1", width=90, css_classes=["ts-group-name"],
                                               description="The group's name in the plan.")
        self.group_button = pn.widgets.Button(label="Group", width=70, css_classes=["ts-group-button"],
                                              description="Decompose the chosen layers together (joint_tucker).")
        self.group_button.on_click(lambda _e: self._on_group_button())
        self.rank_rows_box = pn.Column(scroll=True, height=PLOT_H - 10, sizing_mode="stretch_width",
                                       css_classes=["ts-ranks-view"])
        # compare configurations
        self.history_table = pn.widgets.Tabulator(
            self._history_frame([]), disabled=True, show_index=False, height=260, layout="fit_data_stretch",
            selectable=False, buttons={"pin": "<span class='ts-pin'>pin</span>"}, css_classes=["ts-history-table"], pagination=None,
            header_tooltips={"pin": "Pin this configuration to compare it with another."},
            titles={"n": "#", "quality": "accuracy %"}, sizing_mode="stretch_width",
            formatters={"params": {"type": "money", "precision": 0, "thousand": ","},
                        "ratio": {"type": "money", "precision": 2, "symbol": "×", "symbolAfter": True},
                        "quality": {"type": "money", "precision": 1}})
        self.pin_button = pn.widgets.Button(
            label="Pin the current plan", css_classes=["ts-pin-current"],
            description="Pin the configuration shown now (once its accuracy shows) to compare it with another.")
        self.compare_a = pn.widgets.Select(label="A (left)", options={}, css_classes=["ts-compare-a"], width=300,
                                           description="The pinned configuration shown on the left.")
        self.compare_b = pn.widgets.Select(label="B (right)", options={}, css_classes=["ts-compare-b"], width=300,
                                           description="The pinned configuration shown on the right.")
        self.restore_a = pn.widgets.Button(label="Restore A", css_classes=["ts-restore-a"],
                                           description="Make configuration A the current plan again.")
        self.restore_b = pn.widgets.Button(label="Restore B", css_classes=["ts-restore-b"],
                                           description="Make configuration B the current plan again.")
        self.compare_pane = pn.pane.HTML(
            pn.bind(self._comparison, s.param.pins, s.param.compare_a, s.param.compare_b, s.param.latency,
                    s.param.version), stylesheets=[COMPARE_CSS], css_classes=["ts-compare"], sizing_mode="stretch_width")
        # layer table
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, selectable=1, show_index=False, height=200, layout="fit_columns",
            titles={"params after": "after", "rel. error": "error", "MFLOPs": "MFLOPs"},
            header_filters={"layer": {"type": "input", "func": "like", "placeholder": "search"},
                            "method": {"type": "input", "func": "like", "placeholder": "filter"},
                            "type": {"type": "input", "func": "like", "placeholder": "filter"}},
            formatters={
                "params": {"type": "money", "precision": 0, "thousand": ","},
                "params after": {"type": "money", "precision": 0, "thousand": ","},
                "MFLOPs": {"type": "money", "precision": 2},
                "ratio": {"type": "money", "precision": 2, "symbol": "×", "symbolAfter": True},
                "rel. error": {"type": "money", "precision": 3},
                "energy %": {"type": "progress", "max": 100, "legend": True, "color": ["#f1aeb5", "#ffe08a", "#9fd3a8"]},
            },
            css_classes=["ts-table"], pagination=None,
        )
        # the selected layer's controls (sliders rebuilt when the layer or its method changes)
        self.controls_title = pn.pane.Markdown(pn.bind(self._controls_title, s.param.selected, s.param.version,
                                                       s.param.plan_version),
                                               margin=(0, 10))
        self.method_select = pn.widgets.Select(
            label="Method", options=[DENSE], css_classes=["ts-method"],
            description="How this layer is decomposed (dense: kept as it is). Each method's rank sliders follow.")
        self.rank_box = pn.Column(sizing_mode="stretch_width", css_classes=["ts-ranks"])
        self.layer_info = pn.pane.Markdown(pn.bind(self._layer_text, s.param.selected, s.param.table),
                                           styles=HINT, margin=(0, 10))

    # ------------------------------------------------------------------ plots
    def _build_plots(self) -> None:
        s = self.state
        # a DynamicMap memoises frames by stream value: each redraw carries a new tick
        opts = dict(framewise=True, axiswise=True)
        spec = [self.param.plot_tick]
        # one curve slot per method with an error curve (a DynamicMap keeps its first frame's layers)
        self._curve_methods = [m for m in available_methods() if get_method(m).error_curve]
        self.sv_plot = pn.pane.HoloViews(hv.DynamicMap(self._sv_element, streams=spec).opts(**opts),
                                         css_classes=["ts-spectrum-plot"], sizing_mode="stretch_width",
                                         linked_axes=False)
        self.energy_plot = pn.pane.HoloViews(hv.DynamicMap(self._energy_element, streams=spec).opts(**opts),
                                             sizing_mode="stretch_width", linked_axes=False)
        self.trade_plot = pn.pane.HoloViews(hv.DynamicMap(self._trade_element, streams=spec).opts(**opts),
                                            sizing_mode="stretch_width", linked_axes=False)
        # rebuilt (not updated) on each load: its categorical axis changes with the network
        self.overview_plot = pn.pane.HoloViews(pn.bind(self._overview_element, s.param.overview),
                                               sizing_mode="stretch_width", linked_axes=False)
        self.stages_plot = pn.pane.HoloViews(pn.bind(self._stages_element, s.param.stages),
                                             sizing_mode="stretch_width", linked_axes=False,
                                             css_classes=["ts-stages-plot"])
        self.history_plot = pn.pane.HoloViews(
            hv.DynamicMap(self._history_element, streams=[self.param.history_tick]).opts(**opts),
            sizing_mode="stretch_width", linked_axes=False, css_classes=["ts-history-plot"])
        self.layers_card = pn.Card(self.table, title="Layers (click one to edit it; sortable; search in the header)",
                                   collapsible=False, sizing_mode="stretch_width", css_classes=["ts-layers-card"])
        self.spectrum_card = pn.Card(
            pn.Row(self.sv_plot, self.energy_plot, self.trade_plot),
            title=pn.bind(lambda n: f"Spectrum of {n}" if n else "Spectrum", s.param.selected),
            collapsible=False, css_classes=["ts-spectrum-card"], sizing_mode="stretch_width",
            height=PLOT_H + 70)

    def _sv_element(self, plot_tick: int = 0):
        d = self.state.spectrum_data()
        if d:
            df = pd.DataFrame({"rank": d["index"], "singular value": d["values"], "kept": d["kept"]})
            cut_at = d["cut"]
            rows, cols = d["spectrum_shape"]
            title = f"Singular values ({rows}×{cols})"
        else:
            df = pd.DataFrame({"rank": np.arange(1, 3), "singular value": np.ones(2), "kept": np.ones(2, bool)})
            cut_at, title = None, "Singular values"
        # where a rank axis also truncates the input-channel unfolding: its values and cut, in green
        show_in = bool(d) and d.get("cut_in") is not None
        if show_in:
            di = pd.DataFrame({"rank": d["index_in"], "singular value": d["values_in"], "kept": d["kept_in"]})
            title = "σ: out (blue), in (green)"
        else:
            di = df.iloc[:0]
        # the same elements, with the same labels, in every frame: a DynamicMap keeps its first frame's layout
        line = hv.Curve(df, "rank", "singular value").opts(color="#9aa5b1", line_width=1)
        kept = hv.Scatter(df[df.kept], "rank", ["singular value"], label="kept").opts(
            color=KEPT, size=5, tools=["hover"])
        cut = hv.Scatter(df[~df.kept], "rank", ["singular value"], label="discarded").opts(
            color=CUT, size=5, tools=["hover"])
        kept_in = hv.Scatter(di[di.kept], "rank", ["singular value"]).opts(
            color=IN_COLOR, size=5, marker="square", tools=["hover"])
        cut_in = hv.Scatter(di[~di.kept], "rank", ["singular value"]).opts(
            color=CUT, size=5, marker="square", tools=["hover"])
        vline = hv.VLine((cut_at or len(df)) + 0.5).opts(color=MARK, line_dash="dashed", line_width=2,
                                                         alpha=1.0 if cut_at is not None else 0.0)
        vline_in = hv.VLine((d["cut_in"] + 0.5) if show_in else 1.5).opts(
            color=IN_COLOR, line_dash="dashed", line_width=2, alpha=1.0 if show_in else 0.0)
        vals = np.concatenate([df["singular value"].to_numpy(), di["singular value"].to_numpy()])
        ylim = (float(vals.min()) / 1.3, float(vals.max()) * 1.3)  # explicit: a log axis cannot pad to <= 0
        return _framewise(line * kept * cut * kept_in * cut_in * vline * vline_in).opts(
            title=title, logy=True, ylim=ylim, show_legend=True, legend_position="top_right", xlabel="index",
            ylabel="singular value (log)", responsive=True, height=PLOT_H, toolbar=None)

    def _energy_element(self, plot_tick: int = 0):
        d = self.state.spectrum_data()
        e = d["energy"] if d else np.ones(2)
        cut = d["cut"] if d else None
        df = pd.DataFrame({"rank": np.arange(1, len(e) + 1), "energy kept": e})
        at = float(e[min(cut, len(e)) - 1]) if cut else 1.0
        curve = hv.Curve(df, "rank", "energy kept").opts(color=ACCENT, line_width=2, tools=["hover"])
        vline = hv.VLine((cut or len(e)) + 0.5).opts(color=MARK, line_dash="dashed", alpha=1.0 if cut else 0.0)
        point = hv.Scatter([(cut or len(e), at)], "rank", "energy kept").opts(color=MARK, size=9, tools=["hover"])
        where = f": {at:.1%}" if cut else ""
        return _framewise(curve * vline * point).opts(title=f"Energy kept{where}", ylim=(0, 1.02),
                                                      responsive=True, height=PLOT_H, toolbar=None, show_legend=False)

    def _trade_element(self, plot_tick: int = 0):
        d = self.state.spectrum_data()
        tradeoffs = d.get("tradeoffs", {}) if d else {}
        curves = []
        for m in self._curve_methods:  # the layer's curves, each in its method's slot
            p, e = tradeoffs.get(m, ([], []))
            df = pd.DataFrame({"params": p, "relative error": e})
            curves.append(hv.Curve(df, "params", "relative error", label=m).opts(
                color=method_color(m), line_width=2, tools=["hover"]))
        if d:
            p, err = d["current"]
            cur = [(p, err)] if err is not None else []
            dense = d["dense_params"]
        else:
            cur, dense = [], 0
        point = hv.Scatter(cur, "params", "relative error", label="plan").opts(
            color=MARK, size=11, marker="diamond", tools=["hover"])
        vline = hv.VLine(dense).opts(color="#7b8794", line_dash="dotted")  # the dense layer's size
        return _framewise(hv.Overlay([*curves, point, vline])).opts(
            title="Error vs parameters", legend_position="top_right", xticks=4,
            responsive=True, height=PLOT_H, toolbar=None, xlabel="parameters of the layer", xformatter=COUNT_FMT,
            ylabel="relative output error (calibration)" if self.state.calibrate else "relative weight error")

    def _overview_element(self, overview=None):
        df = overview if overview is not None else self.state.overview
        if df is None or len(df) == 0:
            return hv.Text(0.5, 0.5, "no network loaded").opts(responsive=True, height=PLOT_H + 20, xaxis=None,
                                                                 yaxis=None, toolbar=None)
        order = list(self.state.layer_names)[::-1]
        hm = hv.HeatMap(df, ["position", "layer"], ["log10 s/s_max", "rank"]).opts(
            cmap="viridis", colorbar=True, tools=["hover"], responsive=True, height=PLOT_H + 20, toolbar="above",
            title="All layers: normalised singular values (position = rank / max rank)",
            xlabel="rank / max rank", ylabel="", invert_yaxis=False,
            clim=(max(-4.0, float(df["log10 s/s_max"].min())), 0.0))
        if order:
            hm = hm.redim.values(layer=order)
        return hm

    def _history_element(self, history_tick: int = 0):
        h = self.state.history
        metric = (self.state.quality or {}).get("metric", "accuracy")
        if h:
            df = pd.DataFrame([{k: h_[k] for k in ("params", "quality", "label", "ratio")} for h_ in h])
            df["quality"] = df["quality"].astype(float)
        else:
            df = pd.DataFrame({"params": np.zeros(0), "quality": np.zeros(0), "label": np.array([], dtype=object),
                               "ratio": np.zeros(0)})
        pts = hv.Scatter(df, "params", ["quality", "label", "ratio"]).opts(
            color=ACCENT, size=8, alpha=0.75, tools=["hover"])
        last = df.tail(1) if len(df) else df
        cur = hv.Scatter(last, "params", ["quality", "label", "ratio"]).opts(color=MARK, size=12, marker="diamond")
        top = float(df["params"].max()) if len(df) else 1.0
        return _framewise(pts * cur).opts(title=f"This session: {metric} against parameters", xlabel="parameters",
                                          xlim=(0, top * 1.05), ylim=(0, 1.02), xformatter=COUNT_FMT,
                                          ylabel=metric, responsive=True, height=PLOT_H + 20, toolbar="above",
                                          show_legend=False)

    @staticmethod
    def _stages_element(stages: list):
        """Each stage of the last iterative run: quality before and after its fine-tuning, and parameters."""
        if not stages:
            return hv.Text(0.5, 0.5, "Press “Compress in stages” (sidebar) to compress in stages here.").opts(
                xaxis=None, yaxis=None, height=120, responsive=True, toolbar=None)
        metric = stages[0]["metric"]
        steps = []  # before -> after within a stage, then on to the next stage's before
        for r in stages:
            steps += [(r["stage"] - 0.15, r["before"], "before fine-tuning"), (r["stage"] + 0.15, r["after"], "after")]
        df = pd.DataFrame(steps, columns=["stage", metric, "when"]).astype({metric: float})
        rows = pd.DataFrame([{"stage": str(r["stage"]), "params": r["params"], "ratio": r["ratio"],
                              "changed": len(r["changed"])} for r in stages])
        quality = (hv.Curve(df, "stage", metric).opts(color=ACCENT)
                   * hv.Scatter(df, "stage", [metric, "when"]).opts(color=MARK, size=7, tools=["hover"])).opts(
            title=f"{metric} before and after each stage's fine-tuning", responsive=True,
            ylim=(max(0.0, float(df[metric].min()) - 0.05), 1.005), xticks=[r["stage"] for r in stages],
            height=PLOT_H - 40, toolbar="above", show_legend=False)
        params = hv.Bars(rows, "stage", ["params", "ratio", "changed"]).opts(
            color=ACCENT, tools=["hover"], yformatter=COUNT_FMT, responsive=True, height=PLOT_H - 40,
            toolbar="above", title="parameters after each stage (hover: ratio, layers changed)")
        return (quality + params).opts(shared_axes=False)

    # ------------------------------------------------------------------ wiring
    def _wire(self) -> None:
        s = self.state
        self.load_button.on_click(lambda e: self._submit(s.load_example, self.example_select.value))
        self.folder_button.on_click(lambda e: self._submit(s.load_folder, self.folder_input.value))
        self.iterative_button.on_click(lambda e: self._submit(s.run_iterative))
        self.upload_button.on_click(self._on_upload)
        self.finetune_button.on_click(lambda e: self._submit(s.finetune))
        self.stop_button.on_click(lambda e: s.stop())  # now, not queued behind the job it stops
        self.auto_button.on_click(lambda e: self._submit(s.apply_budget))
        self.energy_button.on_click(lambda e: self._submit(s.apply_preset, "energy"))
        self.vbmf_button.on_click(lambda e: self._submit(s.apply_preset, "vbmf"))
        self.reset_button.on_click(lambda e: s.set_plan({}))
        self.latency_button.on_click(lambda e: self._submit(s.measure_latency))
        self.pin_button.on_click(lambda e: s.pin())
        self.history_table.on_click(self._on_history_click)
        self.restore_a.on_click(lambda e: s.restore(s.compare_a))
        self.restore_b.on_click(lambda e: s.restore(s.compare_b))
        pn.bind(self._on_compare_pick, "compare_a", self.compare_a, watch=True)
        pn.bind(self._on_compare_pick, "compare_b", self.compare_b, watch=True)
        pn.bind(lambda _text: self._loop(self._render_ranks), self.rank_filter.param.value_input, watch=True)
        pn.bind(self._on_eval_file, self.eval_file, watch=True)
        pn.bind(self._on_calib_file, self.calib_file, watch=True)
        pn.bind(self._on_eval_select, self.eval_select, watch=True)
        pn.bind(self._on_calibrate, self.calibrate_switch, watch=True)
        pn.bind(self._on_table_select, self.table.param.selection, watch=True)
        pn.bind(self._on_method, self.method_select, watch=True)

    # the state -> the widgets that are not bound to one parameter
    @param.depends("state.table", "state.selected", watch=True)
    def _table_changed(self) -> None:
        self._loop(self._render_table)

    @param.depends("state.selected", "state.plan", "state.version", watch=True)
    def _controls_changed(self) -> None:
        self._loop(self._render_controls)

    @param.depends("state.selected", "state.plan_version", "state.version", "state.table", watch=True)
    def _replot(self) -> None:
        s = self.state
        # a new table after a quality refresh changes the plots only where it brought the
        # selected layer's measured error (methods whose error is measured, not read off a curve)
        key = (s.version, s.selected, s.plan_version, s.calibrate,
               s.layer_error(s.selected) if s.selected in s.layer_names else None)
        if key != self._plot_key:
            self._plot_key = key
            self._plot_asked = time.monotonic()
            # redrawing three plots takes a few hundred ms: after the numbers have gone out
            self._loop(self._bump_plot_tick, defer=True)

    def _bump_plot_tick(self) -> None:
        now = time.monotonic()
        if self.state.quality_pending and self._loop.served and now - self._plot_asked < WAIT_QUALITY_S:
            self._loop(self._bump_plot_tick, defer=True)  # the accuracy first: it is what a person waits for
            return
        self.plot_tick = next(self._ticks)

    @param.depends("state.history", watch=True)
    def _replot_history(self) -> None:
        self._loop(self._bump_history_tick, defer=True)

    def _bump_history_tick(self) -> None:
        self.history_tick = next(self._ticks)

    @param.depends("state.busy", "state.loading", "state.quality_pending", "state.progress_message", watch=True)
    def _busy_changed(self) -> None:
        self._loop(self._render_busy)

    def _render_busy(self) -> None:
        """Buttons off while a job runs; the plots and table grey while they are being replaced.

        Rendered from the state's current values on the session's thread, not bound to each
        event: a quick job flips these twice within milliseconds from a worker thread, and the
        last value must win (a grey overlay left behind blocks the table's clicks).
        """
        s = self.state
        for w in (self.load_button, self.folder_button, self.iterative_button, self.upload_button,
                  self.calibrate_switch, self.finetune_button,
                  self.auto_button, self.energy_button, self.vbmf_button, self.reset_button, self.latency_button,
                  self.restore_a, self.restore_b):
            if w.disabled != s.busy:
                w.disabled = s.busy
        if self.progress.visible != s.busy:
            self.progress.visible = s.busy
        text = bool(s.progress_message) and (s.busy or s.quality_pending)
        if self.progress_text.visible != text:
            self.progress_text.visible = text
        for card in (self.layers_card, self.spectrum_card):
            if card.loading != s.loading:
                card.loading = s.loading

    @param.depends("state.plan", "state.version", "state.selected", watch=True)
    def _ranks_changed(self) -> None:
        self._loop(self._render_ranks)

    @param.depends("state.history", watch=True)
    def _history_changed(self) -> None:
        self._loop(self._render_history_table)

    @param.depends("state.pins", "state.compare_a", "state.compare_b", watch=True)
    def _show_pins(self) -> None:
        s = self.state
        options = {p["label"]: p["id"] for p in s.pins}
        # options and values at once; _on_compare_pick sees the state's own values: no-op
        self.compare_a.param.update(options=options, value=s.compare_a if s.compare_a in options.values() else None)
        self.compare_b.param.update(options=options, value=s.compare_b if s.compare_b in options.values() else None)

    @param.depends("state.eval_source", watch=True)
    def _show_eval_source(self) -> None:
        self.eval_select.value = self.state.eval_source  # _on_eval_select sees the state's own value: no-op

    @param.depends("state.calibrate", watch=True)
    def _show_calibrate(self) -> None:
        self.calibrate_switch.value = self.state.calibrate  # _on_calibrate sees the state's own value: no-op

    def start(self) -> None:
        """Open the default example ready to explore (called when the page has loaded, so progress
        shows): loaded, a budget plan in place, the largest layer's sliders in view."""
        if self.state.model is None and self._load_on_start is not False:
            self._submit(self.state.open_example, self._load_on_start or DEFAULT_EXAMPLE)

    # ------------------------------------------------------------------ the person -> the state
    def _on_upload(self, _event) -> None:
        data, name = self.model_file.value, self.model_file.filename
        if not data:
            self.state.error = "Choose a network file first."
            return
        self._submit(self.state.load_upload, data, name, self.arch_input.value, self.trust_box.value)

    def _on_eval_file(self, data) -> None:
        if data:
            self._submit(self.state.load_eval_upload, data, self.eval_file.filename or "data.pt")

    def _on_calib_file(self, data) -> None:
        if data:
            self._submit(self.state.load_calibration_upload, data, self.calib_file.filename or "calib.pt")

    def _on_eval_select(self, kind: str) -> None:
        s = self.state
        if kind == s.eval_source:  # the state's own value, shown back
            return
        if kind == "uploaded" and "uploaded" not in s.eval_choices:
            s.message = "Upload a .pt or .npz file of inputs (and labels) below."
            self._show_eval_source()
            return
        self._submit(s.use_eval, kind).add_done_callback(lambda _f: self._show_eval_source())

    def _on_calibrate(self, on: bool) -> None:
        if on == self.state.calibrate:  # the state's own value, shown back
            return
        self._submit(self.state.set_calibrate, on).add_done_callback(lambda _f: self._show_calibrate())

    def _on_table_select(self, selection: list) -> None:
        df = self.table.value
        if selection and df is not None and 0 <= selection[0] < len(df):
            self.state.select(str(df.iloc[selection[0]]["layer"]))  # selecting the selected layer is a no-op

    def _on_method(self, method: str) -> None:
        s = self.state
        name = s.selected
        if not name or method == s.layer_choice(name)[0]:  # the state's own choice, shown back
            return
        if not s.set_layer(name, method, None):
            self._resync()

    def _on_row_method(self, name: str, method: str) -> None:
        if method == self.state.layer_choice(name)[0]:  # the state's own choice, shown back
            return
        if not self.state.set_layer(name, method, None):
            self._resync()

    def _on_group_method(self, name: str, method: str) -> None:
        """A group's method chosen in its row: dense ungroups, another group method re-forms it."""
        s = self.state
        if name not in s.group_names() or method == s.plan.groups[name].method:  # shown back
            return
        ok = (s.remove_group(name) if method == DENSE
              else s.set_group(name, list(s.plan.groups[name].layers), method))
        if not ok:
            self._resync()

    def _on_group_button(self) -> None:
        """Form a group of the layers chosen (the state's message or error says how it went)."""
        if self.state.set_group(self.group_name.value.strip(), list(self.group_layers.value)):
            self.group_layers.value = []

    def _on_group_axis(self, name: str, method: str, i: int, value: int) -> None:
        """One rank slider of group ``name`` moved: set that axis, keep the others."""
        s = self.state
        if name not in s.group_names() or s.plan.groups[name].method != method:
            return
        values = list(s.group_axis_values(name))
        if i >= len(values) or values[i] == value:  # the state's own value, shown back
            return
        values[i] = int(value)
        if not s.set_group_rank_values(name, values):
            self._resync()

    def _on_history_click(self, event) -> None:
        if event.column == "pin":
            self.state.pin(int(event.row))

    def _on_compare_pick(self, which: str, pin_id) -> None:
        if pin_id is not None and getattr(self.state, which) != pin_id:
            setattr(self.state, which, pin_id)

    def _resync(self) -> None:
        """A request was refused (the error says why): show what the plan holds."""
        self._render_controls()
        self._render_ranks()

    def _on_axis(self, name: str, method: str, i: int, value: int) -> None:
        """One rank slider of layer ``name`` moved: set that axis, keep the others."""
        s = self.state
        if s.layer_choice(name)[0] != method:  # a slider of a method the layer no longer has
            return
        values = list(s.axis_values(name))
        if i >= len(values) or values[i] == value:  # the state's own value, shown back
            return
        values[i] = int(value)
        if not s.set_rank_values(name, values):
            self._resync()

    def _download(self, kind: str):
        async def callback():
            fut = self.state.submit(self.state.export_bytes, kind)
            try:
                filename, data = await asyncio.wrap_future(fut)
            except Exception as e:
                self.state.error = f"Export ({kind}) failed: {e}"
                raise
            self.downloads[kind].filename = filename
            self.state.message = f"Exported {filename} ({format_bytes(len(data))})."
            return io.BytesIO(data)

        return callback

    # ------------------------------------------------------------------ rendering
    @staticmethod
    def _params_html(c: dict) -> str:
        if not c:
            return _stat("Parameters", "…", cls="ts-params")
        ratio = c.get("ratio") or 1.0
        return _stat("Parameters", format_count(c["params_after"]), format_count(c["params"]),
                     f'<span class="ts-params-exact">{c["params_after"]:,}</span> · {ratio:.2f}× smaller · '
                     f"{c.get('layers_planned', 0)} layer(s) decomposed", "ts-params")

    @staticmethod
    def _flops_html(c: dict) -> str:
        if not c:
            return _stat("Flops", "…", cls="ts-flops")
        fr = c.get("flops_ratio")
        return _stat("FLOPs per sample", format_count(c.get("flops_after")), format_count(c.get("flops")),
                     f"{fr:.2f}× fewer (multiply-add = 2)" if fr else "needs an input", "ts-flops")

    @staticmethod
    def _size_html(c: dict) -> str:
        if not c:
            return _stat("Size", "…", cls="ts-size")
        return _stat("Size (float weights)", format_bytes(c["bytes_after"]), format_bytes(c["bytes"]),
                     f"{c['bytes'] / c['bytes_after']:.2f}× smaller" if c["bytes_after"] else "", "ts-size")

    def _latency_html(self, latency: dict, *_deps) -> str:
        s = self.state
        lat = s.latency_for_plan()
        if not s.plan or not len(s.plan):
            return _stat("Latency (1 thread)", "–", sub="the original: decompose a layer, then measure", cls="ts-latency")
        if not lat:
            return _stat("Latency (1 thread)", "not measured", sub="press “Measure latency” (sidebar)", cls="ts-latency")
        flops = f" · FLOPs {lat['flops_ratio']:.2f}× fewer" if lat.get("flops_ratio") else ""
        notes = "".join(f"<br><span class='ts-speed-note'>⚠ {n}</span>" for n in lat["notes"])
        return _stat("Latency, batch 1", f"{lat['compressed_1']:.2f} ms", f"{lat['original_1']:.2f} ms",
                     f"<span class='ts-latency-ratio'>{lat['speedup_1']:.2f}× faster; batch {lat['batch']}: "
                     f"{lat['speedup_n']:.2f}×</span>{flops} (1 thread, this server){notes}", "ts-latency")

    @staticmethod
    def _quality_html(q: dict, pending: bool) -> str:
        if not q:
            return _stat("Accuracy", "…" if pending else "n/a", sub="updating…" if pending else "no evaluation data",
                         cls="ts-quality")
        drop = (q["plan"] - q["original"]) if q.get("plan") is not None and q.get("original") is not None else None
        cls = "ts-good" if drop is not None and drop > -0.01 else "ts-bad"
        sub = (f'<span class="{cls}">{100 * drop:+.1f} pts</span> · {q.get("samples", 0)} samples'
               if drop is not None else "")
        return _stat(q.get("metric", "accuracy").title() + (" (updating…)" if pending else ""), _pct(q.get("plan")),
                     _pct(q.get("original")), sub, "ts-quality", pending)

    @staticmethod
    def _agreement_html(q: dict, pending: bool) -> str:
        if not q:
            return _stat("Agreement", "…" if pending else "n/a", cls="ts-agreement")
        return _stat("Agreement" + (" (updating…)" if pending else ""), _pct(q.get("agreement")), "",
                     f"output error {q.get('relative_error', 0):.3f} · {q.get('ms', 0):.0f} ms ({q.get('run', '')})",
                     "ts-agreement", pending)

    def _calibration_text(self, calibrate: bool, description: str, *_deps) -> str:
        mode = ("**on**: factors, spectra and errors are what each layer's *output* loses on"
                if calibrate else "off: factors and errors from the weights alone. Calibration data:")
        text = f"Data-aware {mode} {description}."
        rec = self.state.recovered()
        if rec:
            text += (f"<br>**Fine-tuned** {rec['steps']} steps: {rec['metric']} {_pct(rec['before'])} → "
                     f"**{_pct(rec['after'])}** (exports are the fine-tuned model).")
        return text

    def _controls_title(self, name: str | None, _version: int = 0, _plan_version: int = 0) -> str:
        if name is None or name not in self.state.layer_names:
            return "### Layer\nLoad a network to see its layers."
        info = self.state.layer_info(name)
        group = self.state.group_of(name)
        note = (f"\n\nIn joint group **{group}**: its rank is the group's row in the ranks view "
                "(method dense there ungroups it)." if group else "")
        return f"### {name}\n{info.kind} {'×'.join(map(str, info.weight_shape))}{note}"

    def _layer_text(self, name: str | None, table=None) -> str:
        s = self.state
        table = s.table if table is None else table
        if name is None or table is None or name not in s.layer_names:
            return ""
        rows = table[table["layer"] == name]
        if not len(rows):
            return ""
        row = rows.iloc[0]
        err = row["rel. error"]
        err_text = "computing…" if pd.isna(err) else f"{err:.3f}"
        m = s.layer_metrics(name)
        method = s.layer_choice(name)[0]
        note = get_method(method).speed_note if method != DENSE else ""
        return (f"{format_count(row['params'])} → **{format_count(row['params after'])}** params "
                f"({row['ratio']:.2f}×) · relative error {err_text}<br>"
                f"stable rank {m['stable_rank']:.1f} · effective rank {m['effective_rank']:.1f} of {m['max_rank']}"
                + (f"<br><span class='ts-speed-note'>⚠ {note}</span>" if note else ""))

    def _comparison(self, pins: list, *_deps) -> str:
        s = self.state
        if len(pins) < 2:
            return ("<div class='ts-cmp'><p class='ts-hint'>Pin two points of the history (“pin” in the table on "
                    "the left, or “Pin the current plan”) to compare them side by side: per-layer ranks, parameters, "
                    "FLOPs, latency, accuracy per class and the samples whose prediction changed.</p></div>")
        try:
            cmp = s.comparison()
        except Exception as e:  # a pin of a replaced network, a pin that is gone: say so here
            return f"<div class='ts-cmp'><div class='ts-warn ts-compare-error'>{e}</div></div>"

        def image(i: int) -> str:
            data = base64.b64encode(s.sample_png(i)).decode()
            return f"<img src='data:image/png;base64,{data}' alt='sample {i}'>"

        return _compare_html(cmp, image if cmp["images"] else None)

    @staticmethod
    def _history_frame(history: list) -> pd.DataFrame:
        return pd.DataFrame({
            "n": pd.Series(range(len(history)), dtype="int64"),
            "configuration": pd.Series([e["label"] for e in history], dtype="object"),
            "params": pd.Series([int(e["params"]) for e in history], dtype="int64"),
            "ratio": pd.Series([float(e["ratio"]) for e in history], dtype="float64"),
            "quality": pd.Series([float("nan") if e["quality"] is None else 100 * e["quality"] for e in history],
                                 dtype="float64"),
        })

    def _render_history_table(self) -> None:
        h = self.state.history
        metric = h[-1]["metric"] if h else "accuracy"
        self.history_table.param.update(value=self._history_frame(h), titles={"n": "#", "quality": f"{metric} %"})

    def _render_ranks(self) -> None:
        s = self.state
        rows = s.rank_rows(self.rank_filter.value_input or "")
        shown = rows[:ROW_LIMIT]
        objects = []
        for row in shown:
            at = row["layer"] if row["group"] is None else ("group", row["group"])  # a group's row: by its name
            key = (s.version, row["layer"], row["method"], row["axes"], tuple(row.get("members", ())))
            r = self.layer_rows.get(at)
            if r is None or r.key != key:
                r = self.layer_rows[at] = RankRow(self, row, key)
            else:
                r.update(row, s.selected)
            objects.append(r.layout)
        alive = {*s.layer_names, *(("group", g) for g in s.group_names())}
        for name in [n for n in self.layer_rows if n not in alive]:  # another network or group gone: forget its rows
            del self.layer_rows[name]
        if [id(o) for o in objects] != [id(o) for o in self.rank_rows_box.objects]:
            self.rank_rows_box.objects = objects
        total = len(s.layer_names)
        grouped = sum(len(r["members"]) for r in rows if r["group"] is not None)
        in_rows = sum(1 for r in shown if r["group"] is None) + sum(len(r["members"]) for r in shown
                                                                     if r["group"] is not None)
        self.rank_count.object = (f"{in_rows} of {total} layers" + (f" ({grouped} in group rows)" if grouped else "")
                                  + (" (filter to see the others)" if len(rows) > len(shown) else ""))
        choices = [n for n in s.layer_names if s.group_of(n) is None]
        if self.group_layers.options != choices:
            self.group_layers.param.update(options=choices, value=[v for v in self.group_layers.value if v in choices])

    def _render_table(self) -> None:
        s = self.state
        df = s.table
        if df is None:
            return
        if df is not self.table.value:
            self.table.param.update(value=df, height=min(460, 78 + 31 * max(len(df), 1)))
        hits = np.flatnonzero(df["layer"].to_numpy() == s.selected) if s.selected is not None else []
        selection = [int(hits[0])] if len(hits) else []
        if self.table.selection != selection:
            self.table.selection = selection  # _on_table_select selects the selected layer: a no-op

    def _render_controls(self) -> None:
        s = self.state
        name = s.selected
        if name is None or name not in s.layer_names:
            self.rank_box.objects = []
            self.rank_sliders = []
            self._control_key = None
            return
        method = s.layer_choice(name)[0]
        # options and value at once: the value is always one of the options, and equals the
        # state's choice, so _on_method does nothing
        self.method_select.param.update(options=[DENSE, *s.methods_for(name)], value=method)
        axes = s.rank_axes(name)
        key = (s.version, name, method, axes)
        if key != self._control_key:
            self.rank_sliders = [self._axis_slider(name, method, i, ax) for i, ax in enumerate(axes)]
            self.rank_box.objects = [_with_tip(w, ax.help or self._axis_help(method, ax))
                                     for w, ax in zip(self.rank_sliders, axes)]
            self._control_key = key
        for w, v in zip(self.rank_sliders, s.axis_values(name)):
            if w.value != v:
                w.value = int(v)  # _on_axis sees the state's own value: a no-op

    def _axis_slider(self, name: str, method: str, i: int, ax) -> pn.widgets.IntSlider:
        w = pn.widgets.IntSlider(label=ax.label, start=ax.low, end=max(ax.high, ax.low + 1), value=ax.default,
                                 step=1, css_classes=["ts-rank"], disabled=ax.high <= ax.low)
        pn.bind(self._on_axis, name, method, i, w, watch=True)
        return w

    @staticmethod
    def _axis_help(method: str, ax) -> str:
        return f"{ax.label} of {method} ({ax.low}-{ax.high}): lower keeps fewer parameters and loses more."

    # ------------------------------------------------------------------ layout
    def sidebar(self) -> list:
        s = self.state
        return [
            pn.pane.Markdown("### Network", margin=(0, 10)),
            self.example_select, self.load_button,
            pn.Row(self.folder_input, self.folder_button),
            pn.layout.Divider(),
            self.model_file, self.arch_input, self.trust_box, self.upload_button, self.upload_hint,
            pn.pane.Markdown("### Evaluation data", margin=(10, 10, 0, 10)),
            self.eval_select, self.eval_file, self.shape_input, self.eval_text,
            pn.pane.Markdown("### Data-aware compression and recovery", margin=(10, 10, 0, 10)),
            pn.Row(self.calibrate_switch, pn.pane.Markdown("**use calibration data**", margin=(0, 0, 0, 8),
                                                           sizing_mode="fixed", width=190, height=36),
                   pn.widgets.TooltipIcon(value=s.param.calibrate.doc, width=24, sizing_mode="fixed",
                                          margin=(8, 0, 0, 0)),
                   sizing_mode="fixed", width=300, height=44),
            self.calib_file, self.calib_text,
            pn.Row(self.finetune_steps, self.finetune_button),
            pn.pane.Markdown("### Let it choose", margin=(10, 10, 0, 10)),
            _with_tip(self.keep_slider, s.param.budget_keep.doc), self.by_select, self.auto_button,
            _with_tip(self.energy_slider, s.param.preset_energy.doc),
            pn.Row(self.energy_button, self.vbmf_button), self.reset_button,
            pn.pane.Markdown("### Compress in stages", margin=(10, 10, 0, 10)),
            pn.Row(self.stages_input, self.rule_select), self.iterative_button,
            pn.pane.Markdown("### Speed on this server", margin=(10, 10, 0, 10)),
            pn.Row(self.latency_batch, self.latency_button),
            pn.pane.Markdown("Times both networks here, one thread, medians; other sessions share the machine, so "
                             "read the ratio.", styles=HINT, margin=(0, 10)),
            pn.pane.Markdown("### Export", margin=(10, 10, 0, 10)),
            *self.downloads.values(),
            pn.pane.Markdown("Exports are built from the factorized layers: their parameter count is the one shown.",
                             styles=HINT, margin=(0, 10)),
        ]

    def main(self) -> list:
        controls = pn.Card(self.controls_title, self.method_select, self.rank_box, self.layer_info,
                           title="Layer controls", collapsible=False, width=320, height=PLOT_H + 70, sizing_mode="fixed",
                           css_classes=["ts-controls"])
        ranks = pn.Card(pn.Row(self.rank_filter, self.rank_count, self.group_layers, self.group_name,
                               self.group_button),
                        self.rank_rows_box,
                        title="Ranks of every layer (move any row: the numbers and plots follow)", collapsible=False,
                        height=PLOT_H + 70, sizing_mode="stretch_width", css_classes=["ts-ranks-card"])
        stats = pn.GridBox(*self.stats.values(), ncols=len(self.stats), sizing_mode="stretch_width",
                           css_classes=["ts-stats"])
        compare = pn.Card(
            pn.Row(pn.Column(self.history_table, self.pin_button, width=560, sizing_mode="fixed"),
                   pn.Column(pn.Row(self.compare_a, self.compare_b), pn.Row(self.restore_a, self.restore_b),
                             self.compare_pane, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            title="Compare configurations: pin points of the history, two side by side", collapsible=False,
            sizing_mode="stretch_width", css_classes=["ts-compare-card"])
        return [
            pn.Column(pn.Row(self.progress, self.stop_button, sizing_mode="stretch_width"), self.progress_text,
                      self.error_alert, self.message_alert, sizing_mode="stretch_width"),
            self.source_text,
            stats,
            pn.Row(controls, ranks, sizing_mode="stretch_width", css_classes=["ts-layer-row"]),
            pn.Row(self.spectrum_card, sizing_mode="stretch_width", css_classes=["ts-spectrum-row"]),
            self.layers_card,
            pn.Row(pn.Card(self.overview_plot, title="Spectra of all layers", collapsible=False),
                   pn.Card(self.history_plot, title="History: every configuration evaluated", collapsible=False,
                           css_classes=["ts-history-card"]),
                   sizing_mode="stretch_width"),
            compare,
            pn.Card(self.stages_plot, title="Compression in stages (the last run of “Compress in stages”)",
                    collapsible=False, sizing_mode="stretch_width", css_classes=["ts-stages-card"]),
        ]

    def __panel__(self):
        """Inline (notebook) layout: sidebar controls left, results right."""
        return pn.Row(pn.Column(*self.sidebar(), width=320, sizing_mode="fixed"),
                      pn.Column(*self.main(), sizing_mode="stretch_width"), sizing_mode="stretch_width")

    def template(self) -> pn.template.FastListTemplate:
        # one root each for the sidebar and the main area: Bokeh re-walks every model of the
        # document for each root added, so forty roots made a page cost about twice as much
        return pn.template.FastListTemplate(
            title="tensorscope explorer", sidebar=[pn.Column(*self.sidebar(), sizing_mode="stretch_width")],
            main=[pn.Column(*self.main(), sizing_mode="stretch_width")], accent=ACCENT,
            header_background=ACCENT, sidebar_width=330, main_layout=None, theme_toggle=False,
        )


def build(load: str | None = None) -> pn.template.FastListTemplate:
    """One session's page: a new state and view, the default example loaded once the page is up."""
    view = ExplorerView(load=load or DEFAULT_EXAMPLE)
    page = view.template()
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        pn.state.onload(view.start)
        pn.state.on_session_destroyed(lambda ctx: view.state.close())
    else:
        view.start()
    page._explorer_view = view  # for debugging from a shell
    return page


if pn.state.served:
    build().servable()
