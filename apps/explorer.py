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
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import threading
from typing import Any, Callable

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import NumeralTickFormatter

try:
    import tensorscope  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from tensorscope.examples import list_examples
from tensorscope.methods import available_methods, get_method, planner_methods
from tensorscope.explorer import (
    DENSE,
    EXECUTOR,
    FINETUNE_STEPS,
    MAX_UPLOAD_MB,
    ExplorerState,
    format_bytes,
    format_count,
)

pn.extension("tabulator", sizing_mode="stretch_width", notifications=False)
hv.extension("bokeh", logo=False)

ACCENT = "#2f6f9f"
KEPT = "#2f6f9f"
CUT = "#c8ccd2"
MARK = "#d9480f"
PALETTE = ["#2f6f9f", "#2b9348", "#9c36b5", "#e67700", "#c2255c", "#5c940d", "#1098ad", "#862e9c"]
#: one colour per method, in the registry's order (built-ins first, then plugins)
METHOD_COLORS = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(planner_methods() + sorted(
    set(available_methods()) - set(planner_methods())))}
IN_COLOR = PALETTE[1]  # the input-channel spectrum
PLOT_H = 300
COUNT_FMT = NumeralTickFormatter(format="0.[0]a")
DEFAULT_EXAMPLE = os.environ.get("TENSORSCOPE_EXPLORER_EXAMPLE", "lenet5")

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


class ExplorerView(pn.viewable.Viewer):
    """The dashboard of one session: widgets wired to an :class:`ExplorerState`.

    ``state`` defaults to a new state whose slow work runs on the shared worker threads;
    ``load`` names an example to load when the page opens.
    """

    state = param.ClassSelector(class_=ExplorerState)

    def __init__(self, state: ExplorerState | None = None, load: str | None = None, **params):
        super().__init__(state=state or ExplorerState(executor=EXECUTOR), **params)
        self._doc = pn.state.curdoc
        self._loop_thread = threading.get_ident()
        self._pending: set[Callable] = set()
        self._pending_lock = threading.Lock()
        self._syncing = False
        self._control_key: Any = None
        self._load_on_start = load
        self._rank_widgets: list = []
        self._build_widgets()
        self._build_plots()
        self._wire()
        self._render_all()

    # ------------------------------------------------------------------ thread-safe dispatch
    def _on_loop(self, fn: Callable[[], None]) -> Callable[..., None]:
        """A watcher calling ``fn`` on this session's event loop (state params change in worker
        threads; Bokeh models may only change under the document lock). Coalesced: a burst of
        events from a thread schedules ``fn`` once."""

        def cb(*_events):
            if self._doc is None or threading.get_ident() == self._loop_thread:
                fn()
                return
            with self._pending_lock:
                if fn in self._pending:
                    return
                self._pending.add(fn)
            doc = self._doc

            def run():
                with self._pending_lock:
                    self._pending.discard(fn)
                from panel.io.state import set_curdoc

                with set_curdoc(doc):
                    try:
                        fn()
                    except Exception as e:  # never kill the session over a render
                        import traceback

                        traceback.print_exc()
                        self.state.error = f"display error: {type(e).__name__}: {e}"

            try:
                doc.add_next_tick_callback(run)
            except Exception:  # the session is gone
                pass

        return cb

    def _submit(self, fn: Callable, *args, **kwargs):
        return self.state.submit(fn, *args, **kwargs)

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        s = self.state
        # network
        self.example_select = pn.widgets.Select(name="Built-in example", options=list_examples(),
                                                value=self._load_on_start or DEFAULT_EXAMPLE,
                                                css_classes=["ts-example"])
        self.load_button = pn.widgets.Button(name="Load example", button_type="primary", css_classes=["ts-load"])
        self.model_file = pn.widgets.FileInput(accept=".pt,.pth,.safetensors,.bin,.ckpt", css_classes=["ts-model-file"],
                                               name="Network file")
        self.arch_input = pn.widgets.TextInput(name="Architecture (package.module:factory)",
                                               placeholder="e.g. tensorscope.examples:lenet5",
                                               css_classes=["ts-arch"])
        self.trust_box = pn.widgets.Checkbox(name="I trust this file (allow a pickled whole module: runs code from it)",
                                             css_classes=["ts-trust"])
        self.upload_button = pn.widgets.Button(name="Load uploaded network", button_type="default",
                                               css_classes=["ts-upload"])
        self.upload_hint = pn.pane.Markdown(
            f"State dict (`.pt`, `.safetensors`) with its architecture, a tensorscope checkpoint "
            f"written here, or a pickled module if trusted. **Files over {MAX_UPLOAD_MB:g} MB are refused.**",
            styles={"font-size": "12px", "color": "#52606d"}, margin=(0, 10))
        # evaluation data
        self.eval_select = pn.widgets.RadioButtonGroup(name="Evaluation data", options=["held-out", "uploaded", "none"],
                                                       value=s.eval_source, button_type="default",
                                                       css_classes=["ts-eval"])
        self.eval_file = pn.widgets.FileInput(accept=".pt,.pth,.npz", css_classes=["ts-eval-file"])
        self.shape_input = pn.widgets.TextInput(name="Input shape of one sample (no data)", placeholder="1,28,28")
        self.eval_text = pn.pane.Markdown("", styles={"font-size": "12px", "color": "#52606d"}, margin=(0, 10))
        # data-aware mode and recovery
        self.calibrate_switch = pn.widgets.Switch(value=s.calibrate, css_classes=["ts-calibrate"], width=40,
                                                  height=24, sizing_mode="fixed", margin=(8, 10))
        self.calib_file = pn.widgets.FileInput(accept=".pt,.pth,.npz", css_classes=["ts-calib-file"])
        self.calib_text = pn.pane.Markdown("", styles={"font-size": "12px", "color": "#52606d"}, margin=(0, 10))
        self.finetune_steps = pn.widgets.IntInput(name="Fine-tune steps", value=FINETUNE_STEPS, start=1, end=5000,
                                                  step=50, width=130, css_classes=["ts-finetune-steps"])
        self.finetune_button = pn.widgets.Button(name="Fine-tune this plan", button_type="primary",
                                                 css_classes=["ts-finetune"])
        # budget and presets
        self.keep_slider = pn.widgets.FloatSlider(name="Keep", start=0.02, end=1.0, step=0.01, value=s.budget_keep,
                                                  format="0%", css_classes=["ts-keep"])
        self.by_select = pn.widgets.RadioButtonGroup(options=["params", "flops"], value=s.budget_by)
        self.auto_button = pn.widgets.Button(name="Auto: fill ranks for this budget", button_type="primary",
                                             css_classes=["ts-auto"])
        self.energy_slider = pn.widgets.FloatSlider(name="Energy kept per layer", start=0.5, end=0.999, step=0.005,
                                                    value=0.9, format="0.0%")
        self.energy_button = pn.widgets.Button(name="Energy preset", css_classes=["ts-energy"])
        self.vbmf_button = pn.widgets.Button(name="VBMF preset", css_classes=["ts-vbmf"])
        self.reset_button = pn.widgets.Button(name="All dense", css_classes=["ts-reset"])
        # export
        self.downloads = {
            kind: pn.widgets.FileDownload(callback=self._download(kind), filename=name, label=label, auto=True,
                                          embed=False, button_type="success" if kind == "checkpoint" else "default",
                                          css_classes=[f"ts-export-{kind}"])
            for kind, name, label in [
                ("checkpoint", "model-compressed.safetensors", "Checkpoint (ts.load)"),
                ("exported_program", "model-compressed.pt2", "ExportedProgram (.pt2)"),
                ("torchscript", "model-compressed.pt", "TorchScript (.pt)"),
                ("plan", "plan.json", "Plan (JSON)"),
            ]
        }
        # messages and progress
        self.error_alert = pn.pane.Alert("", alert_type="danger", visible=False, css_classes=["ts-error"])
        self.message_alert = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["ts-message"])
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, bar_color="primary",
                                               css_classes=["ts-progress"], height=18)
        self.progress_text = pn.pane.Markdown("", visible=False, styles={"font-size": "12px"}, margin=(0, 10))
        # summary
        self.stats = {k: pn.pane.HTML("", stylesheets=[STAT_CSS], css_classes=[f"ts-stat-{k}"], min_width=180,
                                      sizing_mode="stretch_width")
                      for k in ("params", "flops", "size", "quality", "agreement")}
        self.source_text = pn.pane.Markdown("", styles={"font-size": "13px", "color": "#3e4c59"}, margin=(0, 10))
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
        # per-layer controls (rebuilt when the selected layer or its method changes)
        self.controls_title = pn.pane.Markdown("", margin=(0, 10))
        self.method_select = pn.widgets.Select(name="Method", options=[DENSE], css_classes=["ts-method"])
        self.rank_box = pn.Column(sizing_mode="stretch_width", css_classes=["ts-ranks"])
        self.layer_info = pn.pane.Markdown("", styles={"font-size": "12px", "color": "#52606d"}, margin=(0, 10))

    # ------------------------------------------------------------------ plots
    def _build_plots(self) -> None:
        # a DynamicMap memoises frames by stream value: every event carries a new tick
        self._tick = 0
        self._spec_stream = hv.streams.Stream.define("Spec", tick=0)()
        self._hist_stream = hv.streams.Stream.define("Hist", tick=0)()
        opts = dict(framewise=True, axiswise=True)
        self.sv_plot = pn.pane.HoloViews(
            hv.DynamicMap(self._sv_element, streams=[self._spec_stream]).opts(**opts),
            css_classes=["ts-spectrum-plot"], sizing_mode="stretch_width", linked_axes=False)
        self.energy_plot = pn.pane.HoloViews(
            hv.DynamicMap(self._energy_element, streams=[self._spec_stream]).opts(**opts),
            sizing_mode="stretch_width", linked_axes=False)
        self.trade_plot = pn.pane.HoloViews(
            hv.DynamicMap(self._trade_element, streams=[self._spec_stream]).opts(**opts),
            sizing_mode="stretch_width", linked_axes=False)
        # rebuilt (not updated) on each load: its categorical axis changes with the network
        self.overview_plot = pn.pane.HoloViews(self._overview_element(), sizing_mode="stretch_width",
                                               linked_axes=False)
        self.history_plot = pn.pane.HoloViews(
            hv.DynamicMap(self._history_element, streams=[self._hist_stream]).opts(**opts),
            sizing_mode="stretch_width", linked_axes=False, css_classes=["ts-history-plot"])
        self.layers_card = pn.Card(self.table, title="Layers (click one to edit it; sortable; search in the header)",
                                   collapsible=False, sizing_mode="stretch_width", css_classes=["ts-layers-card"])
        self.spectrum_card = pn.Card(
            pn.Row(self.sv_plot, self.energy_plot, self.trade_plot),
            title="Spectrum", collapsible=False, css_classes=["ts-spectrum-card"], sizing_mode="stretch_width",
            height=PLOT_H + 70)

    def _sv_element(self, tick: int = 0):
        d = self.state.spectrum_data()
        if d:
            df = pd.DataFrame({"rank": d["index"], "singular value": d["values"], "kept": d["kept"]})
            cut_at = d["cut"]
            rows, cols = d["spectrum_shape"]
            title = f"Singular values ({rows}×{cols})"
        else:
            df = pd.DataFrame({"rank": np.arange(1, 3), "singular value": np.ones(2), "kept": np.ones(2, bool)})
            cut_at, title = None, "Singular values"
        # Tucker-2 also truncates the input-channel unfolding: its values and r_in, in green
        show_in = bool(d) and d.get("cut_in") is not None and "values_in" in d
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
        vline_in = hv.VLine((d.get("cut_in") or 1) + 0.5 if show_in else 1.5).opts(
            color=IN_COLOR, line_dash="dashed", line_width=2, alpha=1.0 if show_in else 0.0)
        vals = np.concatenate([df["singular value"].to_numpy(), di["singular value"].to_numpy()])
        ylim = (float(vals.min()) / 1.3, float(vals.max()) * 1.3)  # explicit: a log axis cannot pad to <= 0
        return _framewise(line * kept * cut * kept_in * cut_in * vline * vline_in).opts(
            title=title, logy=True, ylim=ylim, show_legend=True, legend_position="top_right", xlabel="index",
            ylabel="singular value (log)", responsive=True, height=PLOT_H, toolbar=None)

    def _energy_element(self, tick: int = 0):
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

    def _trade_element(self, tick: int = 0):
        d = self.state.spectrum_data()
        curves = []
        for m in planner_methods():  # the same curves in every frame: a DynamicMap keeps its first layout
            if d and m in d["tradeoffs"]:
                p, e = d["tradeoffs"][m]
                df = pd.DataFrame({"params": p, "relative error": e})
            else:
                df = pd.DataFrame({"params": [], "relative error": []})
            curves.append(hv.Curve(df, "params", "relative error", label=m).opts(
                color=METHOD_COLORS[m], line_width=2, tools=["hover"]))
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

    def _overview_element(self):
        df = self.state.overview
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

    def _history_element(self, tick: int = 0):
        h = self.state.history
        metric = (self.state.quality or {}).get("metric", "accuracy")
        if h:
            df = pd.DataFrame([{k: v for k, v in e.items() if k != "plan"} for e in h])
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

    # ------------------------------------------------------------------ wiring
    def _wire(self) -> None:
        s = self.state
        w = s.param.watch
        w(self._on_loop(self._render_status), ["busy", "progress", "progress_message", "error", "message"])
        w(self._on_loop(self._render_summary), ["cost", "quality", "quality_pending", "source", "eval_description"])
        w(self._on_loop(self._render_table), ["table"])
        w(self._on_loop(self._render_controls), ["selected", "plan", "version"])
        w(self._on_loop(self._render_spectrum), ["selected", "plan_version", "version", "table"])
        w(self._on_loop(self._render_overview), ["version", "overview"])
        w(self._on_loop(self._render_calibration), ["calibrate", "calibration_description", "recovery", "plan"])
        w(self._on_loop(self._render_history), ["history"])
        w(self._on_loop(self._render_eval), ["eval_source", "eval_choices", "eval_description"])

        self.load_button.on_click(lambda e: self._submit(s.load_example, self.example_select.value))
        self.upload_button.on_click(self._on_upload)
        self.eval_file.param.watch(self._on_eval_file, "value")
        self.eval_select.param.watch(self._on_eval_select, "value")
        self.shape_input.param.watch(lambda e: setattr(s, "input_shape", e.new), "value")
        self.calibrate_switch.param.watch(self._on_calibrate, "value")
        self.calib_file.param.watch(
            lambda e: e.new and self._submit(s.load_calibration_upload, e.new, self.calib_file.filename or "calib.pt"),
            "value")
        self.finetune_button.on_click(lambda e: self._submit(s.finetune, self.finetune_steps.value))
        self.auto_button.on_click(lambda e: self._submit(s.apply_budget, self.keep_slider.value, self.by_select.value))
        self.energy_button.on_click(lambda e: self._submit(s.apply_preset, "energy", self.energy_slider.value))
        self.vbmf_button.on_click(lambda e: self._submit(s.apply_preset, "vbmf"))
        self.reset_button.on_click(lambda e: s.set_plan({}))
        self.table.param.watch(self._on_table_select, "selection")
        self.method_select.param.watch(self._on_method, "value")

    def start(self) -> None:
        """Load the default example (called when the page has loaded, so progress shows)."""
        if self.state.model is None and self._load_on_start is not False:
            self._submit(self.state.load_example, self._load_on_start or DEFAULT_EXAMPLE)

    def _on_upload(self, _event) -> None:
        data, name = self.model_file.value, self.model_file.filename
        if not data:
            self.state.error = "Choose a network file first."
            return
        self._submit(self.state.load_upload, data, name, self.arch_input.value, self.trust_box.value)

    def _on_eval_file(self, event) -> None:
        if event.new:
            self._submit(self.state.load_eval_upload, event.new, self.eval_file.filename or "data.pt")

    def _on_eval_select(self, event) -> None:
        if self._syncing or event.new == self.state.eval_source:
            return
        if event.new == "uploaded" and "uploaded" not in self.state.eval_choices:
            self.state.message = "Upload a .pt or .npz file of inputs (and labels) below."
            return
        self._submit(self.state.use_eval, event.new)

    def _on_calibrate(self, event) -> None:
        if self._syncing or event.new == self.state.calibrate:
            return
        self._submit(self.state.set_calibrate, event.new)

    def _on_table_select(self, event) -> None:
        if self._syncing or not event.new:
            return
        df = self.table.value
        i = event.new[0]
        if df is not None and 0 <= i < len(df):
            self.state.select(str(df.iloc[i]["layer"]))

    def _on_method(self, event) -> None:
        if self._syncing or not self.state.selected:
            return
        self.state.set_layer(self.state.selected, event.new, None)

    def _on_rank(self, _event=None) -> None:
        if self._syncing or not self.state.selected:
            return
        name = self.state.selected
        if self.method_select.value != self.state.layer_choice(name)[0]:
            return
        values = [w.value for w in self._rank_widgets]
        self.state.set_rank_values(name, values)

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
    def _render_all(self) -> None:
        for fn in (self._render_status, self._render_summary, self._render_table, self._render_controls,
                   self._render_eval, self._render_calibration):
            fn()

    def _render_status(self) -> None:
        s = self.state
        self.error_alert.object = s.error
        self.error_alert.visible = bool(s.error)
        self.message_alert.object = s.message
        self.message_alert.visible = bool(s.message) and not s.error
        self.progress.visible = s.busy
        self.progress.value = int(round(100 * s.progress)) if s.busy else 0
        self.progress_text.object = s.progress_message if s.busy else ""
        self.progress_text.visible = s.busy
        for w in (self.load_button, self.upload_button, self.auto_button, self.energy_button, self.vbmf_button,
                  self.finetune_button, self.calibrate_switch):
            w.disabled = s.busy
        for card in (self.layers_card, self.spectrum_card):  # what is being replaced
            card.loading = s.busy

    def _render_summary(self) -> None:
        s = self.state
        c = s.cost or {}
        q = s.quality or {}
        pending = s.quality_pending
        if c:
            ratio = c.get("ratio") or 1.0
            self.stats["params"].object = _stat(
                "Parameters", format_count(c["params_after"]), format_count(c["params"]),
                f'<span class="ts-params-exact">{c["params_after"]:,}</span> · {ratio:.2f}× smaller · '
                f"{c.get('layers_planned', 0)} layer(s) decomposed", "ts-params")
            fr = c.get("flops_ratio")
            self.stats["flops"].object = _stat(
                "FLOPs per sample", format_count(c.get("flops_after")), format_count(c.get("flops")),
                f"{fr:.2f}× fewer (multiply-add = 2)" if fr else "needs an input", "ts-flops")
            self.stats["size"].object = _stat(
                "Size (float weights)", format_bytes(c["bytes_after"]), format_bytes(c["bytes"]),
                f"{c['bytes'] / c['bytes_after']:.2f}× smaller" if c["bytes_after"] else "", "ts-size")
        else:
            for k in ("params", "flops", "size"):
                self.stats[k].object = _stat(k.title(), "…", cls=f"ts-{k}")
        metric = q.get("metric", "accuracy")
        if q:
            drop = (q["plan"] - q["original"]) if q.get("plan") is not None and q.get("original") is not None else None
            cls = "ts-good" if drop is not None and drop > -0.01 else "ts-bad"
            sub = (f'<span class="{cls}">{100 * drop:+.1f} pts</span> · {q.get("samples", 0)} samples'
                   if drop is not None else "")
            self.stats["quality"].object = _stat(
                metric.title() + (" (updating…)" if pending else ""), _pct(q.get("plan")), _pct(q.get("original")),
                sub, "ts-quality", pending)
            self.stats["agreement"].object = _stat(
                "Agreement" + (" (updating…)" if pending else ""), _pct(q.get("agreement")), "",
                f"output error {q.get('relative_error', 0):.3f} · {q.get('ms', 0):.0f} ms ({q.get('run', '')})",
                "ts-agreement", pending)
        else:
            text = "updating…" if pending else "no evaluation data"
            self.stats["quality"].object = _stat("Accuracy", "…" if pending else "n/a", sub=text, cls="ts-quality")
            self.stats["agreement"].object = _stat("Agreement", "…" if pending else "n/a", cls="ts-agreement")
        self.source_text.object = f"**Network:** {s.source or 'none loaded'} · **Quality on:** {s.eval_description or '–'}"

    def _render_table(self) -> None:
        df = self.state.table
        if df is None:
            return
        self._syncing = True
        try:
            self.table.value = df
            self.table.height = min(460, 78 + 31 * max(len(df), 1))
            sel = self.state.selected
            if sel is not None and sel in set(df["layer"]):
                idx = int(np.flatnonzero(df["layer"].to_numpy() == sel)[0])
                if self.table.selection != [idx]:
                    self.table.selection = [idx]
        finally:
            self._syncing = False

    def _render_controls(self) -> None:
        s = self.state
        name = s.selected
        if name is None or name not in s.layers:
            self.controls_title.object = "### Layer\nLoad a network to see its layers."
            self.rank_box.objects = []
            self._rank_widgets = []
            return
        layer = s.layers[name]
        method, rank = s.layer_choice(name)
        key = (s.version, name, method, s.rank_axes(name, method))
        self._syncing = True
        try:
            self.controls_title.object = f"### {name}\n{layer.info.kind} {'×'.join(map(str, layer.info.weight_shape))}"
            self.method_select.options = [DENSE, *layer.methods]
            self.method_select.value = method
            if key != self._control_key:
                self._rank_widgets = self._make_rank_widgets(name, method)
                self.rank_box.objects = list(self._rank_widgets)
                self._control_key = key
            values = self.state.axis_values(name)
            for w, v in zip(self._rank_widgets, values):
                if w.value != v:
                    w.value = v
            self.layer_info.object = self._layer_text(name)
        finally:
            self._syncing = False
        self._render_table_selection()

    def _render_table_selection(self) -> None:
        df = self.table.value
        sel = self.state.selected
        if df is None or len(df) == 0 or sel is None:
            return
        hits = np.flatnonzero(df["layer"].to_numpy() == sel)
        if len(hits) and self.table.selection != [int(hits[0])]:
            self._syncing = True
            try:
                self.table.selection = [int(hits[0])]
            finally:
                self._syncing = False

    def _make_rank_widgets(self, name: str, method: str) -> list:
        # one slider per rank axis the method declares (a plugin's sliders come for free)
        widgets = []
        for ax in self.state.rank_axes(name, method):
            top = int(ax.high)
            w = pn.widgets.IntSlider(name=ax.label, start=int(ax.low), end=max(top, int(ax.low) + 1), value=int(ax.low),
                                     step=1, css_classes=["ts-rank"], disabled=top <= ax.low)
            w.param.watch(self._on_rank, "value")
            widgets.append(w)
        return widgets

    def _layer_text(self, name: str) -> str:
        s = self.state
        row = s.table[s.table["layer"] == name].iloc[0] if s.table is not None else None
        if row is None:
            return ""
        err = row["rel. error"]
        err_text = "computing…" if pd.isna(err) else f"{err:.3f}"
        m = s.layers[name].metrics
        method = s.layer_choice(name)[0]
        note = get_method(method).speed_note if method in available_methods() else ""
        return (f"{format_count(row['params'])} → **{format_count(row['params after'])}** params "
                f"({row['ratio']:.2f}×) · relative error {err_text}<br>"
                f"stable rank {m['stable_rank']:.1f} · effective rank {m['effective_rank']:.1f} of {m['max_rank']}"
                + (f"<br><span class='ts-speed-note'>⚠ {note}</span>" if note else ""))

    def _render_spectrum(self) -> None:
        self._tick += 1
        self._spec_stream.event(tick=self._tick)
        name = self.state.selected
        self.spectrum_card.title = f"Spectrum of {name}" if name else "Spectrum"
        if name in self.state.layers:
            self.layer_info.object = self._layer_text(name)

    def _render_overview(self) -> None:
        self.overview_plot.object = self._overview_element()
        self._render_spectrum()

    def _render_history(self) -> None:
        self._tick += 1
        self._hist_stream.event(tick=self._tick)

    def _render_calibration(self) -> None:
        s = self.state
        self._syncing = True
        try:
            self.calibrate_switch.value = s.calibrate
        finally:
            self._syncing = False
        mode = ("**on**: factors, spectra and errors are what each layer's *output* loses on"
                if s.calibrate else "off: factors and errors from the weights alone. Calibration data:")
        text = f"Data-aware {mode} {s.calibration_description}."
        rec = s.recovered()
        if rec:
            text += (f"<br>**Fine-tuned** {rec['steps']} steps: {rec['metric']} {_pct(rec['before'])} → "
                     f"**{_pct(rec['after'])}** (exports are the fine-tuned model).")
        self.calib_text.object = text

    def _render_eval(self) -> None:
        s = self.state
        self._syncing = True
        try:
            self.eval_select.value = s.eval_source
        finally:
            self._syncing = False
        self.eval_text.object = f"Now: {s.eval_description or 'none'}"

    # ------------------------------------------------------------------ layout
    def sidebar(self) -> list:
        return [
            pn.pane.Markdown("### Network", margin=(0, 10)),
            self.example_select, self.load_button,
            pn.layout.Divider(),
            self.model_file, self.arch_input, self.trust_box, self.upload_button, self.upload_hint,
            pn.pane.Markdown("### Evaluation data", margin=(10, 10, 0, 10)),
            self.eval_select, self.eval_file, self.shape_input, self.eval_text,
            pn.pane.Markdown("### Data-aware compression and recovery", margin=(10, 10, 0, 10)),
            pn.Row(self.calibrate_switch, pn.pane.Markdown("**use calibration data**", margin=(0, 0, 0, 8),
                                                           sizing_mode="fixed", width=220, height=36),
                   sizing_mode="fixed", width=300, height=44),
            self.calib_file, self.calib_text,
            pn.Row(self.finetune_steps, self.finetune_button),
            pn.pane.Markdown("### Let it choose", margin=(10, 10, 0, 10)),
            self.keep_slider, self.by_select, self.auto_button,
            self.energy_slider, pn.Row(self.energy_button, self.vbmf_button), self.reset_button,
            pn.pane.Markdown("### Export", margin=(10, 10, 0, 10)),
            *self.downloads.values(),
            pn.pane.Markdown("Exports are built from the factorized layers: their parameter count is the one shown.",
                             styles={"font-size": "12px", "color": "#52606d"}, margin=(0, 10)),
        ]

    def main(self) -> list:
        controls = pn.Card(self.controls_title, self.method_select, self.rank_box, self.layer_info,
                           title="Layer controls", collapsible=False, width=320, height=PLOT_H + 70, sizing_mode="fixed",
                           css_classes=["ts-controls"])
        stats = pn.GridBox(*self.stats.values(), ncols=len(self.stats), sizing_mode="stretch_width")
        return [
            pn.Column(self.progress, self.progress_text, self.error_alert, self.message_alert,
                      sizing_mode="stretch_width"),
            self.source_text,
            stats,
            self.layers_card,
            pn.Row(controls, self.spectrum_card, sizing_mode="stretch_width", css_classes=["ts-spectrum-row"]),
            pn.Row(pn.Card(self.overview_plot, title="Spectra of all layers", collapsible=False),
                   pn.Card(self.history_plot, title="History: every configuration evaluated", collapsible=False,
                           css_classes=["ts-history-card"]),
                   sizing_mode="stretch_width"),
        ]

    def __panel__(self):
        """Inline (notebook) layout: sidebar controls left, results right."""
        return pn.Row(pn.Column(*self.sidebar(), width=320, sizing_mode="fixed"),
                      pn.Column(*self.main(), sizing_mode="stretch_width"), sizing_mode="stretch_width")

    def template(self) -> pn.template.FastListTemplate:
        return pn.template.FastListTemplate(
            title="tensorscope explorer", sidebar=self.sidebar(), main=self.main(), accent=ACCENT,
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
