"""The quality preview of an explorer session: the current plan's accuracy, kept up to date.

At most one refresh per session runs at a time; a newer plan supersedes an older one (it
stops between chunks and the newest plan is evaluated next). Each refresh puts the plan's
reconstructed weights in the session's :class:`~.evaluator._Evaluator` and records the
result in ``quality`` and ``history``.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any

from ..evaluate import headline_metric
from ..methods import get_method
from ..plan import Plan, ResolvedLayer
from ..preview import reconstructed_weight
from . import groups as _groups
from . import limits
from .common import _rank_key, _rank_text
from .evaluator import TRACE_GUARD, _Superseded
from .session import _Session


class _Quality(_Session):
    """The live quality preview (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

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

    def refresh_quality(self, incremental: bool = True) -> dict[str, Any]:
        """Evaluate the current plan on the evaluation data (blocking; thread-safe).

        Reconstructs each planned layer's weight (memoised per layer, method and rank; CP-ALS
        and TT-SVD only the first time), puts them in the evaluator's private copy of the
        network and runs it, re-running only what the last edited layer feeds when that is
        all that changed. ``incremental=False`` forgets the recorded activations first: the
        whole network runs (``quality["run"] == "full"``). Stops early, raising nothing, when
        a newer plan supersedes this one.
        """
        with self._eval_lock:
            with self._lock:
                version = self.plan_version
                plan, resolved, evaluator = self.plan, dict(self._resolved), self._evaluator
                groups = list(self._groups)
                focus, refine = self._focus, self.refine
                model, cost = self._model, dict(self.cost)
                stats = self._stats if self.calibrate else None
            if evaluator is None:
                return {}

            def stop() -> bool:
                return self.plan_version != version or self._evaluator is not evaluator

            weights = {}
            errors = {}
            n_slow = sum(1 for m, _ in resolved.values() if get_method(m).slow)
            for i, (name, (method, rank)) in enumerate(resolved.items()):
                if stop():
                    raise _Superseded()
                layer = self._layers[name]
                m = get_method(method)
                key = (method, _rank_key(method, rank), refine, stats is not None)
                r = ResolvedLayer(name, layer.module, m, rank, dict(plan[name].options), layer.geometry)
                if m.slow and n_slow:
                    self._report(i / max(len(resolved), 1), f"{method} factors of {name} at rank {m.rank_text(rank)}")
                st = stats[name] if stats is not None else None
                w = reconstructed_weight(r, refine=refine, stats=st)
                weights[name] = (key, w)
                known = self._measured_error.get(name)
                if not m.cheap_error_is_exact and (known is None or known[0] != key):
                    if st is not None:
                        errors[name] = (key, st.output_error(layer.module.weight, w))
                    else:
                        ref = layer.module.weight.detach().double()
                        denom = math.sqrt(layer.norm2) if layer.norm2 > 0 else float(ref.norm())
                        errors[name] = (key, float((w.double() - ref).norm()) / denom if denom > 0 else 0.0)
            weights.update(_groups.preview_weights(groups, refine))  # each member's slice of its group
            if stop():
                raise _Superseded()
            if not incremental:
                evaluator.frontier = None
                evaluator.last = None
            changed = evaluator.install(weights)
            metrics = evaluator.run(changed, focus, stop)
            base = evaluator.baseline()
            with self._lock:
                if stop():
                    raise _Superseded()
                self._measured_error.update(errors)
                # the network may name its own metric (a sentence encoder: cosine); else accuracy, agreement
                metric = headline_metric(metrics, model) or "agreement"
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
                    "quality": metrics.get(metric), "agreement": metrics.get("agreement"), "metric": metric,
                    "layers": len(plan), "label": self.describe_plan(plan), "plan": plan.to_json(indent=None),
                }
                original = Plan().to_json(indent=None)
                hist = list(self.history) or [{
                    "params": cost["params"], "flops": cost["flops"], "ratio": 1.0, "quality": base.get(metric),
                    "agreement": base.get("agreement"), "metric": metric, "layers": 0, "label": "original",
                    "plan": original}]
                self._outcomes[original] = evaluator.reference_pred
                if len(plan):  # the newest evaluation of a configuration replaces an older one
                    hist = [h for h in hist if h["plan"] != entry["plan"]] + [entry]
                    self._outcomes[entry["plan"]] = evaluator.last_pred
                hist = hist[-limits.MAX_HISTORY:]
                self._keep_outcomes(hist)
                self.param.update(quality=quality, history=hist, table=self._table(),
                                  quality_pending=False, progress_message="")
            return quality

    def _keep_outcomes(self, history: list[dict]) -> None:
        """Forget the predictions of configurations no longer in the history (caller holds the lock)."""
        keys = {h["plan"] for h in history}
        for k in [k for k in self._outcomes if k not in keys]:
            del self._outcomes[k]

    @staticmethod
    def describe_plan(plan: Plan) -> str:
        if not len(plan):
            return "original"
        parts = [f"{n}: {lp.method} {_rank_text(lp.method, lp.rank)}" for n, lp in plan.items()]
        return "; ".join(parts[:4]) + (f"; +{len(parts) - 4} more" if len(parts) > 4 else "")
