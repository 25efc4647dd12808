"""Loading a network into an explorer session: built-in examples, a notebook's model, uploads.

Everything the explorer computes once per network (spectra, error curves, costs, the
evaluator) is built off the event loop by :meth:`_Loading._prepare` into a :class:`_Loaded`
and swapped in at once by :meth:`_Loading._install`.
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from .. import checkpoint
from ..arch_trust import check_file_factory
from .. import examples as _examples
from ..pretrained import available_pretrained
from .._arch import build_arch, get_arch
from ..densify import probe_dense
from ..errors import ArchitectureError, DataError, UntrustedFileError
from ..inventory import LayerInfo, count_flops, count_params, inspect
from ..methods import get_method, planner_methods
from ..plan import Plan, as_plan
from ..spectra import layer_spectrum, tradeoff
from ..surgery import plan_of, set_submodule
from ..units import format_count
from ..views import layer_modules, linear_view, set_dense_weight
from . import limits
from .common import _Layer, _overview
from .eval_data import EVAL_ORDER, _check_data, _EvalSources
from .evaluator import _EvalData, _Evaluator
from .limits import _check_size
from .real import _RealNetworks, example_names


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
    evaluator: _Evaluator | None
    params: int
    flops: int | None
    nbytes: int
    plan: Plan
    messages: list[str] = field(default_factory=list)
    overview: Any = None
    calibration: tuple | None = None  # (inputs, labels or None, description): data-aware mode, fine-tuning


def _check_arch(ref: str) -> None:
    """Refuse an architecture reference a visitor typed that could do harm when called.

    The explorer is a server: whoever opens the page can type a reference, and calling it
    runs code in the server. The same rule as for a reference recorded in a file applies:
    an ``nn.Module`` subclass, or a plain function defined in a package outside the
    standard library and the loaders (``torch.hub``, ``pickle`` ...). Set
    ``TENSORSCOPE_EXPLORER_ANY_ARCH=1`` on a server only you use to lift it.
    """
    if os.environ.get("TENSORSCOPE_EXPLORER_ANY_ARCH") == "1":
        return
    try:
        check_file_factory(ref, "the architecture field", trust=False)
    except UntrustedFileError:
        raise ArchitectureError(
            f"architecture {ref!r} is refused: the server only calls an nn.Module class or a factory function "
            "from a package outside the standard library and the loaders (e.g. mypackage.models:make_net)"
        ) from None


def _densify(compressed: nn.Module) -> tuple[nn.Module, Plan]:
    """A compressed model back in its original architecture, each factorized layer multiplied out."""
    plan = plan_of(compressed)
    arch = get_arch(compressed)
    if plan is None or arch is None:
        raise DataError("this checkpoint does not record its plan and architecture; it cannot be edited here")
    dense = copy.deepcopy(compressed)
    template_model = build_arch(arch["ref"], arch.get("kwargs") or {})
    for name in plan:
        template = copy.deepcopy(template_model.get_submodule(name))
        w, b = probe_dense(compressed.get_submodule(name), linear_view(template))
        set_dense_weight(template, w)  # a Conv1D stores it transposed
        if b is not None:
            template.bias.data = b.to(template.bias.dtype)
        set_submodule(dense, name, template)
    object.__setattr__(dense, "_tensorscope_plan", None)
    return dense.eval(), plan


def _example_data(train, test) -> dict[str, _EvalData]:
    """The built-in examples' evaluation choices: the held-out split and a calibration batch."""
    n_eval, n_cal = limits.EVAL_SAMPLES, limits.CALIBRATION_SAMPLES
    x, y = test.tensors
    held = _EvalData(x[:n_eval], y[:n_eval], f"held-out test split ({min(n_eval, len(y))} MNIST images)", "held-out")
    cal_x = train.tensors[0][:n_cal]
    calib = _EvalData(cal_x, None, f"calibration batch ({len(cal_x)} training images, agreement with the original)",
                      "calibration")
    return {"held-out": held, "none": calib}


def _example_calibration(train) -> tuple:
    x, y = train.tensors
    n = min(limits.CALIBRATION_TRAIN_SAMPLES, len(y))
    return x[:n], y[:n], f"{n} training images of the example (with labels)"


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


class _Loading(_EvalSources, _RealNetworks):
    """Loading networks (mixin of :class:`~tensorscope.explorer.ExplorerState`; it picks their
    evaluation data with :class:`_EvalSources`)."""

    @property
    def model(self) -> nn.Module | None:
        """The loaded (uncompressed) network; never modified."""
        return self._model

    @property
    def layers(self) -> dict[str, _Layer]:
        return self._layers

    def load_example(self, name: str) -> bool:
        """Load a built-in example (trained on first use) with its held-out split, or an installed
        pretrained network with its own data (:mod:`tensorscope.pretrained`); True on success."""

        if name in available_pretrained():  # a real network offered next to the examples
            return self.load_pretrained(name)

        def work():
            if name not in _examples.list_examples():
                raise DataError(f"no example named {name!r}; choose one of {example_names()}")
            with self._busy(f"loading {name}", loading=True):
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
            if not isinstance(model, nn.Module):
                raise DataError(f"load_network expects an nn.Module; got {type(model).__name__}")
            net = copy.deepcopy(model).eval()
            choices = {}
            if inputs is not None:
                x = inputs[:limits.EVAL_SAMPLES].detach().cpu()
                y = labels[:limits.EVAL_SAMPLES].detach().cpu().long() if labels is not None else None
                kind = "held-out" if y is not None else "none"
                desc = f"{len(x)} samples given" + (", with labels" if y is not None else ", agreement with the original")
                d = _EvalData(x, y, desc, "held-out" if y is not None else "calibration")
                _check_data(net, d, "the inputs given")
                choices[kind] = d
            with self._busy(f"loading {name}", loading=True):
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
            with self._busy(f"reading {safe_name}", loading=True):
                folder = tempfile.mkdtemp(dir=self._upload_dir.name)
                path = os.path.join(folder, safe_name)
                with open(path, "wb") as f:
                    f.write(data)
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        model = checkpoint.load_model(path, arch=arch_ref, trust=bool(trust),
                                                      max_bytes=int(limits.MAX_UPLOAD_MB * (1 << 20)))
                finally:
                    try:
                        os.remove(path)
                        os.rmdir(folder)
                    except OSError:
                        pass
                # what the file says (not torch's deprecations, nor a collected object's ResourceWarning)
                notes = [str(w.message) for w in caught
                         if not issubclass(w.category, (DeprecationWarning, ResourceWarning))]
                self._report(0.2, "inspecting the network")
                plan = Plan()
                if plan_of(model) is not None:  # a tensorscope checkpoint: edit its plan on the dense form
                    model, plan = _densify(model)
                    notes.insert(0, f"tensorscope checkpoint: its {len(plan)} factorized layer(s) were multiplied "
                                    "out; the plan it carries is loaded")
                choices = self._data_for(model)
                arch_rec = get_arch(model) or {}
                calibration = None
                if str(arch_rec.get("ref", "")).startswith("tensorscope.examples:"):
                    # a built-in example's architecture: its held-out split applies (no training needed)
                    train, test = _examples.mnist_splits()
                    choices = {**_example_data(train, test), **choices}
                    calibration = _example_calibration(train)
                order = list(EVAL_ORDER)
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

    def _prepare(self, model: nn.Module, source: str, example: str | None, choices: dict[str, _EvalData],
                 wanted: str, plan: Plan, start: float = 0.0, calibration: tuple | None = None) -> _Loaded:
        """Everything about a network the explorer computes once (off the event loop)."""
        data = choices.get(wanted)
        example_input = data.inputs[:1] if data is not None else None
        self._report(start, "listing layers")
        infos = inspect(model, example_input)
        modules = layer_modules(model)  # a Conv1D as its Linear view
        layers: dict[str, _Layer] = {}
        n = max(len(infos), 1)
        for i, info in enumerate(infos):
            self._report(start + (1 - start) * 0.8 * i / n, f"spectrum of {info.name} ({i + 1}/{len(infos)})")
            mod = modules[info.name]
            spec = layer_spectrum(mod, info.name, "out")
            spec_in = layer_spectrum(mod, info.name, "in") if _reads_in(info) else None
            trade = {}
            for m in planner_methods(info.geometry):
                t = tradeoff(mod, m, info.name, info.geometry)
                if t is not None:
                    trade[m] = t
            layers[info.name] = _Layer(info, mod, spec, spec_in, trade, spec.total_energy, spec.metrics())
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
            self._shared_key = (("example", loaded.example, len(loaded.calibration[0]))
                                if loaded.example is not None and loaded.calibration is not None else None)
            self._budget_applied = None
            self._latency_memo = {}
            self._outcomes = {}
            self._stage_plans = []
            self._data_version += 1
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
                eval_choices=sorted(loaded.data_choices, key=EVAL_ORDER.index),
                eval_source=eval_source,
                eval_description=loaded.data.description if loaded.data else "no evaluation data",
                history=[],
                error="",
                calibrate=False,
                calibration_description=loaded.calibration[2] if loaded.calibration else "no calibration data",
                recovery={},
                latency={},
                stages=[],
                version=self.version + 1,
            )
            self._set_plan(loaded.plan, focus=None)


def _reads_in(info: LayerInfo) -> bool:
    """Whether a rank axis of any method for this layer reads the input-channel spectrum."""
    return any(ax.unfolding == "in" for m in info.max_rank for ax in get_method(m).rank_axes(info.geometry))
