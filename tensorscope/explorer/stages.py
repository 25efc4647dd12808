"""Iterative compression from the page: :func:`tensorscope.iterative` (MUSCO) on the session's network.

:meth:`_Stages.run_iterative` runs a few stages (compress, measure, fine-tune by distillation
from the original on the calibration data, measure again) in a worker thread with progress,
and keeps one row per stage in ``stages`` (:func:`stage_rows`): parameters, FLOPs, the
quality before and after the stage's fine-tuning, every decomposed layer's rank and the
layers the stage changed. The page plots them; :meth:`_Stages.use_stage` puts a stage's
ranks in the plan (the fine-tuned weights stay with the run: the plan is of the original's).
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from ..evaluate import headline_metric
from ..plan import Plan
from ..recovery import RANK_RULES, iterative
from . import limits
from .common import _batches, _rank_text
from .session import _Session


def stage_rows(history, model=None) -> list[dict[str, Any]]:
    """One row per stage of an :func:`tensorscope.iterative` history, the original first (stage 0).

    Keys: ``stage``, ``params``, ``flops``, ``ratio`` (original parameters over the stage's),
    ``before`` / ``after`` (the quality before and after the stage's fine-tuning, in the
    metric ``metric``: the network's own, :func:`tensorscope.evaluate.headline_metric`),
    ``ranks`` (layer -> rank as its method writes it), ``changed`` (layers the stage
    decomposed or decomposed again), ``plan`` (JSON).
    """
    meta = history.meta
    original = meta["original"]
    key = headline_metric(original, model) or "agreement"
    total = int(meta["params"])
    rows = [{"stage": 0, "params": total, "flops": meta.get("flops"), "ratio": 1.0, "before": original.get(key),
             "after": original.get(key), "metric": key, "ranks": {}, "changed": [], "plan": Plan().to_json(indent=None)}]
    for st in history:
        plan = st.plan if st.plan is not None else Plan()
        ranks = {n: (_rank_text(plan[n].method, r) if n in plan else str(r)) for n, r in st.ranks.items()}
        rows.append({"stage": int(st.stage), "params": int(st.params), "flops": st.flops,
                     "ratio": total / st.params if st.params else float("inf"),
                     "before": st.before.get(key), "after": st.after.get(key), "metric": key, "ranks": ranks,
                     "changed": list(st.changed), "plan": plan.to_json(indent=None)})
    return rows


class _Stages(_Session):
    """Iterative compression (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

    def run_iterative(self, stages: int | None = None, rule: str | None = None,
                      finetune_steps: int | None = None, keep: float | None = None) -> bool:
        """Compress the session's network in ``stages`` stages (default ``iterative_stages``) with
        ``rule`` (``iterative_rule``: ``"budget"`` reaches ``keep`` of the parameters, default
        ``budget_keep``, on a geometric schedule; ``"weakened_vbmf"`` is MUSCO's rule),
        fine-tuning ``finetune_steps`` steps (default ``finetune_steps``) after each; factors
        from the calibration data in the data-aware mode. Blocking (the view submits it). The
        rows land in ``stages``; the session's plan is left as it is."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            if self._calib is None:
                raise DataError("iterative compression fine-tunes on calibration data: load or upload some "
                                "(the built-in examples and pretrained networks bring theirs)")
            if self._data is None:
                raise DataError("load evaluation data to measure each stage")
            n = int(self.iterative_stages if stages is None else stages)
            if not 1 <= n <= limits.MAX_STAGES:
                raise DataError(f"stages must be between 1 and {limits.MAX_STAGES}; got {stages!r}")
            how = self.iterative_rule if rule is None else rule
            if how not in RANK_RULES:
                raise DataError(f"rank rule must be one of {', '.join(RANK_RULES)}; got {how!r}")
            steps = int(self.finetune_steps if finetune_steps is None else finetune_steps)
            if not 0 <= steps <= 5000:
                raise DataError(f"fine-tuning steps must be between 0 and 5000; got {finetune_steps!r}")
            with self._lock:
                model, version, aware = self._model, self.version, bool(self.calibrate)
                k = float(self.budget_keep if keep is None else keep)
                x, y, desc = self._calib
                evaluation = _batches(self._data.inputs, self._data.targets, limits.CHUNK)
            with self._busy(f"iterative compression: {n} stage(s)"), self._stoppable() as stopped:
                _, history = iterative(
                    model, _batches(x, y, 64), keep=k if how == "budget" else None, steps=n,
                    finetune_steps=steps, rank_rule=how, layers=list(self._layers), val_data=evaluation,
                    data_aware=aware, stop=stopped,
                    progress=lambda f, m: self._report(f, f"iterative: {m}"))
                rows = stage_rows(history, model)
            if self.version != version:
                raise DataError("the network changed while compressing in stages; run it again")
            self._stage_plans = [r["plan"] for r in rows]
            self.stages = rows
            last = rows[-1]
            stop = f" Stopped early: {history.stopped}." if history.stopped else ""
            self.message = (f"Iterative ({how}, {len(rows) - 1} stage(s), {steps} fine-tuning steps each on {desc}): "
                            f"{last['ratio']:.1f}x fewer parameters, {last['metric']} {rows[0]['after']:.1%} -> "
                            f"{last['after']:.1%}.{stop} “Use stage” puts a stage's ranks in the plan.")
            return True

        return bool(self._guard("Iterative compression", work))

    def use_stage(self, stage: int) -> bool:
        """Put the ranks of stage ``stage`` of the last iterative run in the plan (0: the original)."""
        plans = getattr(self, "_stage_plans", [])
        if not 0 <= int(stage) < len(plans):
            self.error = f"no stage {stage}: the last iterative run has stages 0 to {len(plans) - 1}"
            return False
        return self.set_plan(plans[int(stage)])
