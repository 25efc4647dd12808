"""The data an explorer session evaluates on: held-out splits, uploads, a calibration batch.

:func:`_check_data` says whether a sample fits a network (and its labels its outputs);
:class:`_EvalSources` switches the session's evaluation data and rebuilds its evaluator.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import Tensor, nn

from ..data import output_tensor, parse_data_file
from ..errors import DataError
from ..evaluate import IGNORE_INDEX
from ..inventory import count_flops, inspect
from ..units import parse_shape
from . import limits
from .evaluator import _EvalData, _Evaluator
from .limits import _check_size, _check_zip_bytes
from .session import _Session

#: the order of the evaluation choices in the selector
EVAL_ORDER = ["held-out", "uploaded", "none"]


def _parse_eval_file(data: bytes, filename: str) -> tuple[Tensor, Tensor | None]:
    """Inputs (and labels) from an uploaded ``.pt``/``.pth`` (torch.save) or ``.npz`` file."""
    _check_size(data, f"evaluation data {filename!r}")
    if filename.lower().endswith((".pt", ".pth")):
        _check_zip_bytes(data, f"evaluation data {filename!r}")
    return parse_data_file(data, filename)


def _sample_shape(text: str) -> tuple[int, ...] | None:
    """The typed input shape of one sample (None when nothing is typed)."""
    if not (text or "").strip().strip("()[]").strip():
        return None
    return parse_shape(text, "input shape", max_numel=limits.MAX_SAMPLE_NUMEL)


def _check_data(model: nn.Module, data: _EvalData, what: str) -> None:
    """Refuse a sample the network cannot run on, or labels that do not fit its outputs.

    Labels are class indices along the output's last dim: ``(N,)`` for ``(N, C)`` outputs,
    ``(N, T)`` for ``(N, T, C)`` ones; positions labelled ``-100`` are ignored.
    """
    try:
        with torch.inference_mode():
            out = output_tensor(copy.deepcopy(model).eval()(data.inputs[:2]))
    except Exception as e:
        raise DataError(
            f"the network cannot run on {what}: inputs of shape {tuple(data.inputs.shape[1:])} per sample "
            f"do not fit it ({type(e).__name__}: {str(e)[:160]})"
        ) from None
    t = data.targets
    if t is not None:
        if out.dim() < 2 or t.is_floating_point() or tuple(t.shape[1:]) != tuple(out.shape[1:-1]):
            raise DataError(f"{what} has labels of shape {tuple(t.shape[1:])} per sample but the network's output "
                            f"has shape {tuple(out.shape)}, not (batch, classes) or (batch, positions, classes)")
        kept = t[t != IGNORE_INDEX]
        if kept.numel():
            top = int(kept.max())
            if top >= out.shape[-1] or int(kept.min()) < 0:
                raise DataError(f"{what} has labels up to {top}, but the network has {out.shape[-1]} outputs")


class _EvalSources(_Session):
    """Choosing the evaluation data (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

    def load_eval_upload(self, data: bytes, filename: str) -> bool:
        """Use an uploaded ``.pt``/``.npz`` of inputs (and labels) as the evaluation data."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            x, y = _parse_eval_file(bytes(data), filename)
            n = int(x.shape[0])
            x, y = x[:limits.EVAL_SAMPLES], (y[:limits.EVAL_SAMPLES] if y is not None else None)
            desc = f"uploaded {os.path.basename(filename)} ({len(x)}{f' of {n}' if n > len(x) else ''} samples"
            desc += ", with labels)" if y is not None else ", agreement with the original)"
            data_ = _EvalData(x.contiguous(), y, desc, "uploaded")
            _check_data(self._model, data_, filename)
            with self._busy("evaluating on the uploaded data", loading=True):
                self._switch_data({**self._data_choices, "uploaded": data_}, "uploaded")
            self.message = f"Evaluation data: {desc}."
            return True

        return bool(self._guard(f"Could not use {filename!r} as evaluation data", work))

    def use_eval(self, kind: str) -> bool:
        """Switch the evaluation data: "held-out", "uploaded" or "none" (agreement on a calibration batch)."""

        def work():
            choices = dict(self._data_choices)
            if kind == "none" and "none" not in choices:
                shape = _sample_shape(self.input_shape)
                if shape is None:
                    raise DataError("without evaluation data, give one sample's input shape (e.g. 1,28,28)")
                n = limits.CALIBRATION_SAMPLES
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(n, *shape, generator=gen)
                data_ = _EvalData(x, None, f"calibration batch ({n} random N(0,1) inputs of shape "
                                           f"{tuple(shape)}, agreement with the original)", "calibration")
                _check_data(self._model, data_, "the calibration batch")
                choices["none"] = data_
            if kind not in choices:
                raise DataError(f"no {kind!r} evaluation data available; available: {sorted(choices)}")
            with self._busy("switching evaluation data", loading=True):
                self._switch_data(choices, kind)
            return True

        return bool(self._guard("Could not switch the evaluation data", work))

    def _data_for(self, model: nn.Module) -> dict[str, _EvalData]:
        """The current eval data choices that fit a newly uploaded network."""
        out = {}
        for k, d in self._data_choices.items():
            try:
                _check_data(model, d, "the current evaluation data")
                out[k] = d
            except DataError:
                pass
        if "none" not in out and self.input_shape.strip():
            try:
                shape = _sample_shape(self.input_shape)
                if shape is None:
                    return out
                n = limits.CALIBRATION_SAMPLES
                gen = torch.Generator().manual_seed(0)
                d = _EvalData(torch.randn(n, *shape, generator=gen), None,
                              f"calibration batch ({n} random inputs, agreement)", "calibration")
                _check_data(model, d, "the calibration batch")
                out["none"] = d
            except DataError:
                pass
        return out

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
            self._data_version += 1
            self._outcomes = {}
            self._base_flops = flops
            self.param.update(eval_source={"calibration": "none"}.get(data.kind, data.kind),
                              eval_choices=sorted(choices, key=EVAL_ORDER.index),
                              eval_description=data.description, history=[])
            self._set_plan(self.plan, focus=None)
        self.request_quality()
