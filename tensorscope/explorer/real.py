"""Real networks in an explorer session: pretrained examples, and Hugging Face folders on the server's disk.

The pretrained networks of :mod:`tensorscope.pretrained` are offered next to the built-in
examples when their packages are installed (:func:`example_names`); each brings its own
calibration and evaluation data, and names its quality metric (``tensorscope_metric``, read
by :func:`tensorscope.evaluate.headline_metric`): top-1 agreement, or embedding cosine.

A folder on the server's disk is read only where the server opts in:
``TENSORSCOPE_EXPLORER_HF_ROOT`` names the one folder under which a path typed in the page
may point (symbolic links resolved first). Unset, the path field is refused; a path outside
the root, or a folder that is not a model, is a message, and the session keeps its network.
"""

from __future__ import annotations

import copy
import os
import threading
from typing import Any

from .. import examples as _examples
from .. import pretrained as _pretrained
from ..errors import DataError
from ..plan import Plan
from ..units import format_count
from . import limits
from .evaluator import _EvalData
from .session import _Session

#: the environment variable naming the folder Hugging Face model folders may be read from
HF_ROOT_ENV = "TENSORSCOPE_EXPLORER_HF_ROOT"


def example_names() -> list[str]:
    """What the example list offers: the built-in examples, then the installed pretrained networks."""
    return [*_examples.list_examples(), *_pretrained.available_pretrained()]


def folder_root() -> str | None:
    """The folder model folders may be read from (``$TENSORSCOPE_EXPLORER_HF_ROOT``), None when not allowed."""
    root = os.environ.get(HF_ROOT_ENV, "").strip()
    return root or None


def allowed_folder(text: str) -> str:
    """The real path of the folder typed in the page, checked: the server allows folders, the
    path is under its root once links are resolved, and it holds a ``config.json``."""
    root = folder_root()
    if root is None:
        raise DataError(f"this server does not read model folders from its disk; whoever runs it can allow one "
                        f"folder with {HF_ROOT_ENV}=/path/to/models")
    text = (text or "").strip()
    if not text:
        raise DataError(f"type the path of a Hugging Face model folder under {root}")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, text))  # an absolute path replaces the root
    if os.path.commonpath([path, real_root]) != real_root:
        raise DataError(f"{text!r} is outside the folder this server reads models from ({root})")
    if not os.path.isdir(path):
        raise DataError(f"{text!r} is not a folder under {root}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{text!r} is not a Hugging Face model folder: it has no config.json")
    return path


def _data_choices(pre: _pretrained.Pretrained) -> dict[str, _EvalData]:
    """Its evaluation data (held out: never in the calibration data) and an agreement batch."""
    n_cal = limits.CALIBRATION_SAMPLES
    held = _EvalData(pre.evaluation[:limits.EVAL_SAMPLES], None, pre.evaluation_description, "held-out")
    cal = _EvalData(pre.calibration[:n_cal], None,
                    f"calibration batch ({len(pre.calibration[:n_cal])} calibration samples, {pre.metric} "
                    "with the original)", "calibration")
    return {"held-out": held, "none": cal}


# the pretrained networks with their data, loaded once per process (immutable; each session copies)
_memo: dict[str, Any] = {}
_memo_lock = threading.Lock()


def _shared_pretrained(name: str) -> _pretrained.Pretrained:
    with _memo_lock:
        pre = _memo.get(name)
    if pre is None:
        pre = _pretrained.load_pretrained(name, n_evaluation=limits.REAL_EVAL_SAMPLES,
                                          n_calibration=limits.REAL_CALIBRATION_SAMPLES)
        with _memo_lock:
            pre = _memo.setdefault(name, pre)
    return pre


class _RealNetworks(_Session):
    """Pretrained networks and model folders (mixin of :class:`~tensorscope.explorer.ExplorerState`;
    it installs them with the loading mixin's ``_prepare`` and ``_install``)."""

    def load_pretrained(self, name: str) -> bool:
        """Load an installed pretrained network with its own data; True on success."""

        def work():
            if name not in _pretrained.available_pretrained():
                raise DataError(f"no installed pretrained network named {name!r}; installed: "
                                f"{_pretrained.available_pretrained()} (pip install 'tensorscope[real]')")
            with self._busy(f"loading {name}", loading=True):
                self._report(0.05, f"reading {name} from its package")
                pre = _shared_pretrained(name)
                self._install_real(pre, name, f"pretrained {name}: {pre.description}")
                self.message = (f"Loaded {name} ({format_count(self.cost['params'], 'params')}); quality is "
                                f"{pre.metric} with the original on {pre.evaluation_description}.")
            return True

        return bool(self._guard(f"Could not load {name!r}", work))

    def load_folder(self, path: str) -> bool:
        """Load a Hugging Face model folder from the server's disk (see the module docstring)."""

        def work():
            folder = allowed_folder(path)
            with self._busy(f"reading {os.path.basename(folder)}", loading=True):
                self._report(0.05, "reading the model folder")
                model, pre = _pretrained.from_folder(folder, n_evaluation=limits.REAL_EVAL_SAMPLES,
                                                     n_calibration=limits.REAL_CALIBRATION_SAMPLES,
                                                     max_bytes=int(limits.MAX_FOLDER_MB * (1 << 20)))
                label = f"folder {os.path.basename(folder)}"
                if pre is not None:
                    self._install_real(pre, None, label)
                    note = f"quality is {pre.metric} with the original on {pre.evaluation_description}"
                else:
                    loaded = self._prepare(model.eval(), label, None, self._data_for(model), "none", Plan(), start=0.5)
                    self._install(loaded)
                    self.request_quality()
                    note = "no tokenizer or data came with it: upload evaluation data or give an input shape"
                self.message = f"Loaded {label} ({format_count(self.cost['params'], 'params')}); {note}."
            return True

        return bool(self._guard(f"Could not load the folder {path!r}", work))

    def _install_real(self, pre: _pretrained.Pretrained, example: str | None, source: str) -> None:
        model = copy.deepcopy(pre.model).eval()
        calibration = (pre.calibration, None, pre.calibration_description)
        loaded = self._prepare(model, source, example, _data_choices(pre), "held-out", Plan(), start=0.3,
                               calibration=calibration)
        self._install(loaded)
        self.request_quality()
