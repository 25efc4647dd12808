"""Data-aware mode and recovery: calibration data, whitened spectra, fine-tuning.

Data-aware mode whitens each layer by its inputs' second moment on the calibration data, so
factors, spectra, errors and budgets measure what truncation costs the layer's *output*;
fine-tuning recovers a plan's compressed model on the same data, distilled from the original.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..calibration import collect_stats
from ..data import output_tensor
from ..errors import DataError
from ..evaluate import evaluate, headline_metric
from ..methods import planner_methods
from ..recovery import finetune as _finetune
from ..spectra import layer_spectrum, tradeoff
from . import limits
from .common import _batches, _overview, shared_result
from .eval_data import _check_data, _parse_eval_file
from .evaluator import _EvalData, predictions
from .session import _Session


#: what a fine-tuned configuration's history key adds to its plan's JSON
TUNED = "|tuned"


def _predictions_of(model, inputs):
    """Top-1 predictions of ``model`` on ``inputs`` (in chunks, as the preview runs)."""
    with torch.inference_mode():
        out = torch.cat([output_tensor(model(inputs[i:i + limits.CHUNK])) for i in range(0, len(inputs), limits.CHUNK)])
    return predictions(out)


class _DataAware(_Session):
    """Calibration data, data-aware mode and fine-tuning (mixin of
    :class:`~tensorscope.explorer.ExplorerState`)."""

    def load_calibration_upload(self, data: bytes, filename: str) -> bool:
        """Use an uploaded ``.pt``/``.npz`` of inputs (labels optional) as calibration data."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            x, y = _parse_eval_file(bytes(data), filename)
            d = _EvalData(x[:2], None, "", "calibration")
            _check_data(self._model, d, filename)
            desc = f"uploaded {os.path.basename(filename)} ({len(x)} samples{', with labels' if y is not None else ''})"
            was_on = self.calibrate
            with self._lock:
                self._calib = (x.contiguous(), y, desc)
                self._stats = None
                self._shared_key = None  # not the example's own calibration data any more
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
        if self._stats is None:
            if self._calib is None:
                raise DataError("no calibration data: upload a .pt/.npz of inputs as calibration data "
                                "(the built-in examples bring their training split)")
            x, y, _ = self._calib
            self._report(0.05, f"input statistics of {len(self._layers)} layers on {len(x)} samples")

            def collect():
                return collect_stats(self._model, _batches(x, None), list(self._layers))

            key = self._shared_key
            self._stats = shared_result(("stats", *key), collect) if key is not None else collect()
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
            with self._busy("data-aware mode: whitened spectra" if on_ else "weights-only mode", loading=True):
                if on_:
                    stats = self._calibration_stats()
                    n = max(len(self._layers), 1)
                    for i, (name, layer) in enumerate(self._layers.items()):
                        if layer.aware is None:
                            self._report(0.2 + 0.8 * i / n, f"whitened spectrum of {name}")

                            def whiten(layer=layer, name=name):
                                st = stats[name]
                                spec = layer_spectrum(layer.module, name, "out", st)
                                spec_in = (layer_spectrum(layer.module, name, "in", st)
                                           if layer.spectrum_in is not None else None)
                                curves = {m: tradeoff(layer.module, m, name, layer.info.geometry, stats=st)
                                          for m in planner_methods(layer.info.geometry)}
                                curves = {m: t for m, t in curves.items() if t is not None}
                                return spec, spec_in, curves, spec.metrics()

                            key = self._shared_key
                            layer.aware = shared_result(("whitened", name, *key), whiten) if key else whiten()
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

    def finetune(self, steps: int | None = None, lr: float | None = None) -> bool:
        """Recover the current plan's compressed model: a short fine-tune on the calibration data,
        distilled from the original (with its labels too, where it has them), for ``steps``
        steps (default: ``finetune_steps``). Blocking.

        The quality before and after lands in ``recovery`` and the history; exports of this plan
        are the fine-tuned model until the plan changes.
        """
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
            n_steps = int(self.finetune_steps if steps is None else steps)
            if not 1 <= n_steps <= 5000:
                raise DataError(f"fine-tuning steps must be between 1 and 5000; got {steps!r}")
            with self._lock:
                plan, version = self.plan, self.plan_version
            with self._busy(f"fine-tuning for {n_steps} steps"), self._stoppable() as stopped:
                self._report(0.0, "building the compressed model")
                small = self.compressed_model()
                x, y, desc = self._calib
                train = _batches(x, y, 64)
                evaluation = _batches(self._data.inputs, self._data.targets, limits.CHUNK)
                before = evaluate(small, evaluation, reference=self._model)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tuned = _finetune(small, train, teacher=self._model, steps=n_steps, stop=stopped,
                                      **({} if lr is None else {"lr": lr}),
                                      progress=lambda f, m: self._report(0.05 + 0.9 * f, f"fine-tuning: {m}"))
                after = evaluate(tuned, evaluation, reference=self._model)
                preds = _predictions_of(tuned, self._data.inputs)
            metric = headline_metric(after, self._model) or "agreement"
            with self._lock:
                if self.plan_version != version:
                    raise DataError("the plan changed while fine-tuning; fine-tune again")
                key = self._memo_key(plan)
                self._export_memo = (key, tuned)
                rec = {"plan": plan.to_json(indent=None), "steps": n_steps, "metric": metric, "data": desc,
                       "before": before.get(metric), "after": after.get(metric),
                       "agreement_before": before.get("agreement"), "agreement_after": after.get("agreement")}
                entry = {"params": self.cost["params_after"], "flops": self.cost["flops_after"],
                         "ratio": self.cost["ratio"], "quality": after.get(metric), "agreement": after.get("agreement"),
                         "metric": metric, "layers": len(plan),
                         "label": self.describe_plan(plan) + f" + fine-tuned {n_steps} steps",
                         "plan": plan.to_json(indent=None) + TUNED, "tuned": True}
                hist = [h for h in self.history if h["plan"] != entry["plan"]] + [entry]
                hist = hist[-limits.MAX_HISTORY:]
                self._outcomes[entry["plan"]] = preds
                self._keep_outcomes(hist)
                self.param.update(recovery=rec, history=hist)
            note = next((f" ({w.message})" for w in caught if "did not improve" in str(w.message)), "")
            what = (f"Fine-tuning stopped on request (of {n_steps} steps; the best weights up to then are kept)"
                    if stopped() else f"Fine-tuned {n_steps} steps")
            self.message = (f"{what} on {desc}: {metric} {before.get(metric, 0):.1%} -> "
                            f"{after.get(metric, 0):.1%}. Exports of this plan are the fine-tuned model.{note}")
            return True

        return bool(self._guard("Fine-tuning", work))

    def recovered(self) -> dict:
        """The last fine-tune if it was of the current plan, else ``{}``."""
        rec = self.recovery
        return rec if rec and rec.get("plan") == self.plan.to_json(indent=None) else {}
