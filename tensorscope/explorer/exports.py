"""Exports of an explorer session: the plan's compressed model, built once per plan, as a file."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

from torch import nn

from .. import checkpoint
from ..errors import DataError, TensorscopeError
from ..inventory import count_params
from ..methods import BreakEvenWarning
from ..plan import Plan
from ..surgery import compress
from .session import _Session

EXPORT_KINDS = ("checkpoint", "exported_program", "torchscript", "plan")


class _Exports(_Session):
    """The compressed model and its files (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

    def compressed_model(self) -> nn.Module:
        """The factorized model of the current plan (built once per plan; the same factors as the preview)."""
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
        with self._busy(f"exporting the compressed model ({kind.replace('_', ' ')})"):
            return self._export_file(kind, base)

    def _export_file(self, kind: str, base: str) -> tuple[str, bytes]:
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
