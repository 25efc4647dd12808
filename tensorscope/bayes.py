"""Bayesian incremental updates: data that arrive in parts (Kochurov et al. 2018). EXPERIMENTAL.

Every weight ``theta_j`` carries a Gaussian, mean ``m_j`` and variance ``v_j`` (a diagonal
Gaussian over the network's trainable parameters). After part ``t`` of the data,

    p(theta | D_1..t)  is proportional to  p(D_t | theta) p(theta | D_1..t-1),

so the posterior after one part is the prior of the next, and a new part does not erase what
the old ones taught: a weight the old data pinned down (small variance) is expensive to move.

- :func:`laplace_prior` turns a trained network into a :class:`Posterior`: centred on its
  weights, precisions ``1/v = prior_precision + diag(H)``, ``H`` the Gauss-Newton matrix (or
  the empirical Fisher) summed over the data it was trained on (MacKay 1992; Ritter et al.
  2018).
- :func:`update` with ``method="laplace"`` finds the new mode (MAP) of
  ``sum_i nll_i(theta) + kl_weight/2 sum_j (theta_j - m_j)^2 / v_j`` on the part, by
  :func:`tensorscope.train` with the prior as ``extra_loss`` (``solver="train"``) or by
  Newton steps with the diagonal Gauss-Newton matrix (``solver="newton"``: exact in one step
  when the objective is quadratic with a diagonal Hessian), and sets the precisions to
  ``kl_weight/v + diag(H)`` at the new mode.
- :func:`update` with ``method="vi"`` trains means and log-variances of
  ``q(theta) = N(mu, diag(sigma^2))`` (weights drawn by the reparametrisation trick, one draw
  per step) by :func:`tensorscope.train`, with ``kl_weight * KL(q || prior) / N`` as
  ``extra_loss``: the negative evidence lower bound per sample (Blundell et al. 2015).

The likelihood is the training loss of :func:`tensorscope.train` per sample: cross-entropy
for class labels, a Gaussian ``N(y; f(x), noise_var)`` for float targets
(``||y - f(x)||^2 / (2 noise_var)``), the distillation loss when a ``teacher`` replaces
missing labels. :func:`tensorscope.train` minimises the *mean* loss of a batch, so the prior's
term is divided by the part's number of samples ``N`` (and for float targets scaled as MSE is),
which makes its optimum the posterior's mode.

A :class:`Posterior` maps parameter names to ``(mean, variance)`` and records the plan of the
model it describes (:func:`tensorscope.plan_of`); ``posterior.check(model)`` raises
:class:`~tensorscope.CheckpointError` naming the first mismatch (the plan, a name, a shape),
so compressing the model again invalidates it. ``posterior.save(path)`` writes one
safetensors file (``mean/<name>`` and ``var/<name>`` tensors, a JSON record in its metadata);
:meth:`Posterior.load` checks the header before reading any tensor.

Status: **experimental**. On the 8x8 digits in five class-biased parts (an MLP, 3 seeds) the
updates did not beat fine-tuning on each part by the one point required to ship them as
stable: after the last part Laplace was 0.3 points below fine-tuning and VI 3.4 below, and
retraining on all the data 2.7 above (the table: ``docs/benchmarks.md``, "Data in parts";
``bench/data_in_parts.py``).

References
----------
Kochurov, Garipov, Podoprikhin, Molchanov, Ashukha and Vetrov, "Bayesian incremental learning
for deep neural networks", ICLR workshop 2018. MacKay, "A practical Bayesian framework for
backpropagation networks", Neural Computation 1992. Ritter, Botev and Barber, "Online
structured Laplace approximations for overcoming catastrophic forgetting", NeurIPS 2018.
Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017 (EWC).
Blundell et al., "Weight uncertainty in neural networks", ICML 2015. Kunstner, Hennig and
Balles, "Limitations of the empirical Fisher approximation", NeurIPS 2019.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from . import file_limits
from ._io import atomic_path
from ._version import __version__
from .data import Batch, output_tensor, split_batch
from .errors import CheckpointError, DataError, TensorscopeError
from .plan import Plan
from .progress import Progress
from .safetensors_header import _bad, _read_header
from .surgery import plan_of
from .train import Epoch, History, _batches, task_loss, train

__all__ = [
    "FORMAT_VERSION", "META_KEY", "STATUS", "Posterior", "isotropic_prior", "kl_divergence", "laplace_prior",
    "load_posterior", "update",
]

#: the posterior file format this version writes and the newest it reads
FORMAT_VERSION = 1
#: the safetensors metadata key holding a posterior's JSON record
META_KEY = "tensorscope_posterior"
#: "experimental": the update did not beat fine-tuning by 1 point on class-biased parts
STATUS = "experimental"

METHODS = ("laplace", "vi")
SOLVERS = ("train", "newton")
CURVATURES = ("ggn", "empirical")
#: default passes over a part (``solver="train"`` and ``"vi"``) and Newton steps (``"newton"``)
DEFAULT_EPOCHS = {"train": 20, "vi": 20, "newton": 1}
#: the most entries a chunk of per-sample gradients or Jacobians may hold (float32: 128 MB)
CHUNK_ELEMENTS = 1 << 25
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


# ---- the posterior ---------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a posterior covers: every trainable one, in network order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _plan_dict(plan: Any) -> dict[str, Any] | None:
    return None if plan is None else plan.to_dict()


def _short(doc: Any, limit: int = 160) -> str:
    text = json.dumps(doc, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plan_mismatch(have: Plan | None, want: Plan | None) -> str | None:
    """What differs between the posterior's plan ``have`` and the model's ``want`` (None: nothing)."""
    a, b = _plan_dict(have), _plan_dict(want)
    if a == b:
        return None
    if a is None or b is None:
        made = "an uncompressed model" if a is None else f"a model compressed with plan {_short(a)}"
        this = "is uncompressed" if b is None else f"was compressed with plan {_short(b)}"
        return f"the posterior was made for {made}, but this model {this}"
    la, lb = a.get("layers", {}), b.get("layers", {})
    for name in list(dict.fromkeys([*la, *lb])):
        if la.get(name) != lb.get(name):
            pa = _short(la[name]) if name in la else "dense"
            pb = _short(lb[name]) if name in lb else "dense"
            return f"layer {name!r} is {pa} in the posterior's plan but {pb} in this model's plan"
    return f"the posterior's plan {_short(a)} differs from this model's plan {_short(b)}"


class Posterior:
    """A diagonal Gaussian over a model's trainable parameters, and the plan of that model.

    ``mean[name]`` and ``var[name]`` are tensors of the parameter's shape (variances > 0);
    ``plan`` is :func:`tensorscope.plan_of` of the model it was made for (``None``:
    uncompressed); ``info`` a JSON record of how it was made (method, parts, samples seen).
    ``history`` holds the :class:`~tensorscope.History` of the update that made it (not saved).
    """

    def __init__(self, mean: Mapping[str, Tensor], var: Mapping[str, Tensor], plan: Plan | None = None,
                 info: Mapping[str, Any] | None = None):
        if not isinstance(mean, Mapping) or not isinstance(var, Mapping):
            raise TypeError("mean and var must map parameter names to tensors")
        if list(mean) != list(var):
            raise ValueError(f"mean and var must have the same names in the same order; got {list(mean)[:5]} "
                             f"and {list(var)[:5]}")
        self.mean: dict[str, Tensor] = {}
        self.var: dict[str, Tensor] = {}
        for n in mean:
            m, v = mean[n], var[n]
            if not isinstance(m, Tensor) or not isinstance(v, Tensor) or not m.is_floating_point():
                raise TypeError(f"{n!r}: mean and var must be floating-point tensors")
            if m.shape != v.shape:
                raise ValueError(f"{n!r}: mean is {tuple(m.shape)} but var is {tuple(v.shape)}")
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"{n!r}: the mean holds NaN or infinite values")
            if not bool((torch.isfinite(v) & (v > 0)).all()):
                raise ValueError(f"{n!r}: every variance must be finite and > 0")
            self.mean[n] = m.detach().clone()
            self.var[n] = v.detach().to(m.dtype).clone()
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a tensorscope Plan or None; got {type(plan).__name__}")
        self.plan = plan
        self.info: dict[str, Any] = dict(info or {})
        self.history: History | None = None

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(m.shape) for n, m in self.mean.items()}

    def precision(self) -> dict[str, Tensor]:
        """``1 / var`` per parameter."""
        return {n: 1.0 / v for n, v in self.var.items()}

    def __repr__(self) -> str:
        count = sum(m.numel() for m in self.mean.values())
        plan = "uncompressed" if self.plan is None else f"plan of {len(self.plan)} layer(s)"
        return f"Posterior({len(self.mean)} tensors, {count:,} weights, {plan}, info={self.info!r:.120})"

    # ---- does it fit a model? ----

    def check(self, model: nn.Module) -> None:
        """Raise :class:`~tensorscope.CheckpointError` naming the first mismatch with ``model``.

        In order: the plan (``plan_of(model)`` must be the recorded one: compressing again
        invalidates a posterior), then every trainable parameter in network order (a name
        the posterior lacks or the model lacks, a shape that differs).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"check expects an nn.Module; got {type(model).__name__}")
        what = _plan_mismatch(self.plan, plan_of(model))
        if what is None:
            params = _trainable(model)
            for n, p in params.items():
                if n not in self.mean:
                    what = f"the model's parameter {n!r} has no distribution in the posterior"
                elif tuple(p.shape) != tuple(self.mean[n].shape):
                    what = (f"parameter {n!r} is {'x'.join(map(str, self.mean[n].shape))} in the posterior but "
                            f"{'x'.join(map(str, p.shape))} in the model")
                if what:
                    break
            else:
                missing = [n for n in self.mean if n not in params]
                if missing:
                    what = f"the posterior's parameter {missing[0]!r} is not a trainable parameter of the model"
        if what:
            raise CheckpointError(
                f"this posterior does not describe the model: {what}. A posterior belongs to one model (its plan "
                "and its parameters); after compressing, make a new prior with ts.bayes.laplace_prior")

    def kl(self, prior: "Posterior") -> Tensor:
        """``KL(self || prior)`` in nats (a float64 scalar); see :func:`kl_divergence`."""
        return kl_divergence(self, prior)

    # ---- files ----

    def record(self) -> dict[str, Any]:
        """The JSON record stored in the file's metadata."""
        return {META_KEY: FORMAT_VERSION, "tensorscope_version": __version__, "plan": _plan_dict(self.plan),
                "names": self.names, "shapes": {n: list(s) for n, s in self.shapes.items()}, "info": self.info}

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (no pickle), atomically: ``mean/<name>`` and ``var/<name>``
        tensors and the :meth:`record` as JSON under the metadata key ``"tensorscope_posterior"``."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path!r} is a directory; save needs a file path such as 'posterior.safetensors'")
        try:
            text = json.dumps(self.record(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"the posterior's info must be JSON-serializable; {e}") from None
        tensors: dict[str, Tensor] = {}
        for n in self.mean:
            tensors[f"mean/{n}"] = self.mean[n].detach().to("cpu").contiguous().clone()
            tensors[f"var/{n}"] = self.var[n].detach().to("cpu").contiguous().clone()
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={META_KEY: text})

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_bytes: int | None = None) -> "Posterior":
        """Read a file written by :meth:`save`; the header and the record are checked before any
        tensor is read (:class:`~tensorscope.CheckpointError` naming what is wrong)."""
        path = os.fspath(path)
        limit = file_limits.max_bytes(max_bytes)
        size = file_limits.check_file(path, limit)
        kind = file_limits.sniff(path, size)
        if kind in ("torch_zip", "torch_pickle"):
            raise CheckpointError(f"{path!r} is a torch.save file, not a tensorscope posterior (a safetensors file "
                                  "written by Posterior.save)")
        h = _read_header(path, size, limit)
        text = h.metadata.get(META_KEY)
        if text is None:
            if "tensorscope" in h.metadata:
                raise CheckpointError(f"{path!r} is a tensorscope model checkpoint, not a posterior: read it with "
                                      "ts.load")
            raise CheckpointError(f"{path!r} is a safetensors file without a {META_KEY!r} record: not a posterior "
                                  "written by Posterior.save")
        try:
            rec = json.loads(text)
        except (ValueError, RecursionError):
            raise _bad(path, f"its {META_KEY!r} metadata is not JSON") from None
        if not isinstance(rec, dict):
            raise _bad(path, f"its {META_KEY!r} metadata is not a JSON object")
        fmt = rec.get(META_KEY)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise _bad(path, f"its posterior format is {fmt!r:.40}; expected a positive integer")
        if fmt > FORMAT_VERSION:
            raise CheckpointError(f"{path!r} is a posterior in format {fmt}; this tensorscope ({__version__}) reads "
                                  f"format {FORMAT_VERSION} and older. Upgrade tensorscope to read it.")
        names, shapes = rec.get("names"), rec.get("shapes")
        if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names)):
            raise _bad(path, '"names" must be a list of distinct parameter names')
        if not (isinstance(shapes, dict) and set(shapes) == set(names) and all(
                isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
                for s in shapes.values())):
            raise _bad(path, '"shapes" must give a list of sizes for every name in "names"')
        plan = rec.get("plan")
        if plan is not None:
            if not isinstance(plan, dict):
                raise _bad(path, f'"plan" must be a plan object or null; got {plan!r:.80}')
            try:
                plan = Plan.from_dict(plan)
            except TensorscopeError as e:
                raise _bad(path, f"its plan is invalid: {e}") from None
        info = rec.get("info") or {}
        if not isinstance(info, dict):
            raise _bad(path, '"info" must be a JSON object')
        want = [f"{kind}/{n}" for n in names for kind in ("mean", "var")]
        for key in want:
            if key not in h.tensors:
                raise _bad(path, f"the record names {key!r} but the file holds no such tensor")
        extra = [k for k in h.tensors if k not in set(want)]
        if extra:
            raise _bad(path, f"tensor {extra[0]!r} is not named in the record")
        for n in names:
            (dm, sm, _, _), (dv, sv, _, _) = h.tensors[f"mean/{n}"], h.tensors[f"var/{n}"]
            if dm not in _FLOAT_DTYPES or dv != dm:
                raise _bad(path, f"{n!r}: mean and var must share one floating-point dtype; got {dm} and {dv}")
            if list(sm) != shapes[n] or list(sv) != shapes[n]:
                raise _bad(path, f"{n!r}: the record says shape {shapes[n]} but the tensors are {list(sm)} and "
                                 f"{list(sv)}")
        from .checkpoint.format import _read_tensors  # the one reader of checked headers

        tensors = _read_tensors(h)
        mean, var = {}, {}
        for n in names:
            m, v = tensors[f"mean/{n}"], tensors[f"var/{n}"]
            if not bool(torch.isfinite(m).all()):
                raise _bad(path, f"the mean of {n!r} holds NaN or infinite values")
            if not bool((torch.isfinite(v) & (v > 0)).all()):
                raise _bad(path, f"the variances of {n!r} must be finite and > 0")
            mean[n], var[n] = m, v
        return cls(mean, var, plan=plan, info=info)


def load_posterior(path: str | os.PathLike, *, max_bytes: int | None = None) -> Posterior:
    """:meth:`Posterior.load`."""
    return Posterior.load(path, max_bytes=max_bytes)


def _same_support(q: Posterior, p: Posterior) -> None:
    for n in q.names:
        if n not in p.mean:
            raise CheckpointError(f"the two posteriors cover different parameters: {n!r} is in the first only")
        if q.mean[n].shape != p.mean[n].shape:
            raise CheckpointError(f"parameter {n!r} has shape {tuple(q.mean[n].shape)} in one posterior and "
                                  f"{tuple(p.mean[n].shape)} in the other")
    for n in p.names:
        if n not in q.mean:
            raise CheckpointError(f"the two posteriors cover different parameters: {n!r} is in the second only")


def _kl_terms(mean: Tensor, logvar: Tensor, p_mean: Tensor, p_var: Tensor) -> Tensor:
    """``KL(N(mean, exp(logvar)) || N(p_mean, p_var))`` summed over entries (differentiable)."""
    var = logvar.exp()
    return 0.5 * (p_var.log() - logvar + (var + (mean - p_mean) ** 2) / p_var - 1.0).sum()


def kl_divergence(q: Posterior, p: Posterior) -> Tensor:
    """``KL(q || p) = 1/2 sum_j [log(v_p/v_q) + (v_q + (m_q - m_p)^2) / v_p - 1]``, a float64 scalar.

    Zero exactly when ``q`` equals ``p``. :class:`~tensorscope.CheckpointError` when they cover
    different parameters or shapes.
    """
    _same_support(q, p)
    total = torch.zeros((), dtype=torch.float64)
    for n in q.names:
        mq, vq = q.mean[n].double().cpu(), q.var[n].double().cpu()
        mp, vp = p.mean[n].double().cpu(), p.var[n].double().cpu()
        total = total + 0.5 * ((vp / vq).log() + (vq + (mq - mp) ** 2) / vp - 1.0).sum()
    return total


# ---- priors ----------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def isotropic_prior(model: nn.Module, precision: float = 1.0, *, centre: str = "zero") -> Posterior:
    """``N(0, 1/precision)`` (``centre="zero"``) or ``N(weights, 1/precision)`` (``"weights"``) for
    every trainable parameter of ``model``: the prior before any data."""
    precision = _check_positive("precision", precision)
    if centre not in ("zero", "weights"):
        raise ValueError(f'centre must be "zero" or "weights"; got {centre!r}')
    params = _trainable(model)
    mean = {n: (torch.zeros_like(p) if centre == "zero" else p.detach()) for n, p in params.items()}
    var = {n: torch.full_like(p, 1.0 / precision) for n, p in params.items()}
    return Posterior(mean, var, plan=plan_of(model), info={"method": "isotropic", "precision": precision,
                                                            "parts": 0, "samples": 0})


# ---- the likelihood and its curvature -------------------------------------------------------------


def _uses_mse(out: Tensor, target: Tensor | None, has_teacher: bool) -> bool:
    """Whether :func:`tensorscope.train.task_loss` is a squared error here (no class scores)."""
    ce = target is not None and target.dtype in (torch.int64, torch.int32) and out.dim() >= 2
    kd_scores = has_teacher and out.dim() == 2
    return not (ce or kd_scores)


def _nll_scale(out: Tensor, target: Tensor | None, has_teacher: bool, noise_var: float) -> float:
    """``s`` with ``task_loss = s * (negative log-likelihood of one sample)``: 1 for class scores;
    ``2 noise_var / D`` for a squared error over ``D`` outputs per sample (MSE averages them)."""
    if not _uses_mse(out, target, has_teacher):
        return 1.0
    return 2.0 * noise_var / max(out[0].numel(), 1)


class _Likelihood:
    """The per-sample negative log-likelihood of a network and its curvature, via ``torch.func``."""

    def __init__(self, net: nn.Module, names: list[str], teacher: nn.Module | None, temperature: float,
                 label_weight: float, scale: float):
        self.net = net
        self.names = names
        self.teacher = teacher
        self.temperature, self.label_weight, self.scale = temperature, label_weight, scale
        self.buffers = dict(net.named_buffers())

    # one sample at a time (under vmap): inputs without their batch dimension
    def out_one(self, params: dict[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        a = tuple(x.unsqueeze(0) if isinstance(x, Tensor) else x for x in args)
        k = {key: (x.unsqueeze(0) if isinstance(x, Tensor) else x) for key, x in kwargs.items()}
        out = output_tensor(functional_call(self.net, {**self.buffers, **params}, a, k))
        return out[0]

    def out_many(self, params: dict[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
        """The outputs of a batch (eval mode: the same as one sample at a time)."""
        return output_tensor(functional_call(self.net, {**self.buffers, **params}, args, kwargs))

    def loss_of_out(self, out: Tensor, target: Tensor | None, t: Tensor | None) -> Tensor:
        return task_loss(out.unsqueeze(0), None if target is None else target.unsqueeze(0),
                         None if t is None else t.unsqueeze(0), self.temperature, self.label_weight) / self.scale

    def nll_one(self, params, args, kwargs, target, t) -> Tensor:
        return self.loss_of_out(self.out_one(params, args, kwargs), target, t)

    def teacher_out(self, b: Batch) -> Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return output_tensor(b.call(self.teacher))

    @staticmethod
    def dims(b: Batch) -> tuple[tuple, dict]:
        return (tuple(0 if isinstance(a, Tensor) else None for a in b.args),
                {k: (0 if isinstance(v, Tensor) else None) for k, v in b.kwargs.items()})

    @staticmethod
    def chunk(b: Batch, t: Tensor | None, sl: slice) -> tuple[tuple, dict, Tensor | None, Tensor | None]:
        cut = lambda v: v[sl] if isinstance(v, Tensor) else v  # noqa: E731
        return (tuple(cut(a) for a in b.args), {k: cut(v) for k, v in b.kwargs.items()},
                None if b.target is None else b.target[sl], None if t is None else t[sl])

    def curvature(self, params: dict[str, Tensor], batches: Any, kind: str, bar: Progress | None = None
                  ) -> dict[str, Tensor]:
        """``sum_i diag(J_i^T H_i J_i)`` (``"ggn"``: ``H_i`` the loss's Hessian in the outputs) or
        ``sum_i g_i^2`` (``"empirical"``: ``g_i`` the per-sample gradient), over all samples."""
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        count = sum(p.numel() for p in params.values())
        device = next(iter(params.values())).device if params else torch.device("cpu")
        for raw in batches:
            b = split_batch(raw).to(device)
            t = self.teacher_out(b)
            adims, kdims = self.dims(b)
            ydim, tdim = (None if b.target is None else 0), (None if t is None else 0)
            n = b.size
            width = 1
            if kind == "ggn":
                with torch.no_grad():
                    width = max(self.out_many(params, *self.chunk(b, t, slice(0, 1))[:2])[0].numel(), 1)
            step = max(1, CHUNK_ELEMENTS // max(count * width, 1))
            for start in range(0, n, step):
                args, kwargs, y, tc = self.chunk(b, t, slice(start, start + step))
                if kind == "empirical":
                    g = vmap(grad(self.nll_one), in_dims=(None, adims, kdims, ydim, tdim))(params, args, kwargs, y, tc)
                    for name in total:
                        total[name] += g[name].pow(2).sum(0)
                    continue

                def flat_out(p, a, k):
                    return self.out_one(p, a, k).reshape(-1)

                jac = vmap(jacrev(flat_out), in_dims=(None, adims, kdims))(params, args, kwargs)
                with torch.no_grad():
                    outs = self.out_many(params, args, kwargs)
                shape = outs.shape[1:]

                def loss_flat(o, yy, tt):
                    return self.loss_of_out(o.reshape(shape), yy, tt)

                hess = vmap(hessian(loss_flat), in_dims=(0, ydim, tdim))(outs.reshape(outs.shape[0], -1), y, tc)
                for name in total:
                    j = jac[name].reshape(jac[name].shape[0], jac[name].shape[1], -1)  # (B, C, P)
                    total[name] += (j * torch.bmm(hess.to(j.dtype), j)).sum((0, 1)).reshape(total[name].shape)
            if bar is not None:
                bar.update(1)
        return total

    def gradient(self, student: nn.Module, batches: Any) -> tuple[dict[str, Tensor], float]:
        """``sum_i grad nll_i`` over all samples of ``batches`` at ``student``'s weights, and the sum."""
        params = {n: p for n, p in student.named_parameters() if n in set(self.names)}
        for p in params.values():
            p.grad = None
        total = 0.0
        device = next(iter(params.values())).device
        for raw in batches:
            b = split_batch(raw).to(device)
            t = self.teacher_out(b)
            out = output_tensor(b.call(student))
            loss = task_loss(out, b.target, t, self.temperature, self.label_weight) * (b.size / self.scale)
            loss.backward()
            total += float(loss.detach())
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                for n, p in params.items()}, total


# ---- checking the arguments ------------------------------------------------------------------------


def _first_batch(batches: Any, what: str) -> Batch:
    from .data import iter_batches

    first = next(iter(iter_batches(batches)), None)
    if first is None:
        raise DataError(f"{what} gave no batches")
    return split_batch(first)


def _count(batches: Any) -> int:
    from .data import iter_batches

    return sum(split_batch(b).size for b in iter_batches(batches))


def _prepare(model: nn.Module, data: Any, teacher: nn.Module | None, noise_var: float, what: str
             ) -> tuple[Any, int, float]:
    """(re-iterable batches, number of samples, likelihood scale); DataError before any work."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module; got {type(model).__name__}")
    batches = _batches(data, what)
    first = _first_batch(batches, what)
    if teacher is None and first.target is None:
        raise DataError(f"{what} has no labels and no teacher was given: the likelihood needs labels in the "
                        "batches ((inputs, targets) tuples) or a teacher model to distil from")
    n = _count(batches)
    if n < 1:
        raise DataError(f"{what} holds no samples")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    b = Batch(tuple(a[:1] if isinstance(a, Tensor) else a for a in first.args),
              {k: (v[:1] if isinstance(v, Tensor) else v) for k, v in first.kwargs.items()},
              None if first.target is None else first.target[:1]).to(device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # one sample in eval mode, no gradient: nothing in the model changes
    try:
        with torch.no_grad():
            out = output_tensor(b.call(model))
    finally:
        for m, was in modes:
            m.training = was
    return batches, n, _nll_scale(out, b.target, teacher is not None, noise_var)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


# ---- laplace_prior ---------------------------------------------------------------------------------


def laplace_prior(
    model: nn.Module,
    data: Any,
    *,
    prior_precision: float = 1.0,
    curvature: str = "ggn",
    teacher: nn.Module | None = None,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    noise_var: float = 1.0,
    progress: Any = False,
) -> Posterior:
    """The Laplace approximation around a trained network: the posterior its training data give.

    Centred on ``model``'s weights, with precisions ``prior_precision + diag(H)``, ``H`` summed
    over the samples of ``data`` (the data it was trained on):

    - ``curvature="ggn"``: the generalised Gauss-Newton matrix ``J_i^T H_i J_i`` (``J_i`` the
      Jacobian of the outputs, ``H_i`` the loss's Hessian in the outputs; for cross-entropy the
      Fisher information), the default;
    - ``"empirical"``: the empirical Fisher ``g_i g_i^T`` (per-sample gradients), cheaper by the
      number of outputs but a poor curvature where the fit is good (Kunstner et al. 2019).

    Per-sample quantities come from ``torch.func`` (``functional_call`` + ``vmap``), in eval
    mode (dropout off, BatchNorm's running statistics). ``model`` is not modified.

    Raises
    ------
    DataError
        No batches, or batches without labels and no ``teacher``.
    ValueError
        A bad ``prior_precision``, ``noise_var`` or ``curvature``.
    """
    prior_precision = _check_positive("prior_precision", prior_precision)
    noise_var = _check_positive("noise_var", noise_var)
    _check_choice("curvature", curvature, CURVATURES)
    batches, n, scale = _prepare(model, data, teacher, noise_var, "data")
    net = copy.deepcopy(model).eval()
    if teacher is not None:
        teacher.eval()
    names = list(_trainable(net))
    params = {k: p.detach() for k, p in net.named_parameters() if k in names}
    lik = _Likelihood(net, names, teacher, temperature, label_weight, scale)
    try:
        total = len(batches)
    except TypeError:
        total = 1
    with Progress(progress, total=total, desc="Laplace prior") as bar:
        h = lik.curvature(params, batches, curvature, bar)
    var = {k: 1.0 / (prior_precision + h[k]) for k in names}
    return Posterior(params, var, plan=plan_of(model),
                     info={"method": "laplace", "curvature": curvature, "prior_precision": prior_precision,
                           "parts": 1, "samples": n})


# ---- update ----------------------------------------------------------------------------------------


class _Variational(nn.Module):
    """A network whose listed parameters are drawn from ``N(mu, exp(logvar))`` at every call in
    training mode (the reparametrisation trick, ``torch.func.functional_call``), and are the
    means in eval mode."""

    def __init__(self, net: nn.Module, names: list[str], mean: dict[str, Tensor], logvar: dict[str, Tensor],
                 seed: int):
        super().__init__()
        self.net = net
        self.names = list(names)
        for n, p in net.named_parameters():
            if n in mean:
                p.requires_grad_(False)
        self.mu = nn.ParameterList([nn.Parameter(mean[n].detach().clone()) for n in self.names])
        self.logvar = nn.ParameterList([nn.Parameter(logvar[n].detach().clone()) for n in self.names])
        self.seed = seed
        self._gen: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def weights(self, sample: bool) -> dict[str, Tensor]:
        if not sample:
            return {n: m for n, m in zip(self.names, self.mu)}
        out = {}
        for n, m, lv in zip(self.names, self.mu, self.logvar):
            eps = torch.randn(m.shape, generator=self._generator(m.device), device=m.device, dtype=m.dtype)
            out[n] = m + eps * (0.5 * lv).exp()
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.net, self.weights(self.training), args, kwargs, strict=False)

    def __deepcopy__(self, memo):  # ts.train deep-copies its model; the generator cannot be copied
        gen, self._gen = self._gen, None
        try:
            new = copy.copy(self)
            new.__dict__ = copy.deepcopy(self.__dict__, memo)
        finally:
            self._gen = gen
        return new


def update(
    model: nn.Module,
    part: Any,
    prior: Posterior,
    method: str = "laplace",
    kl_weight: float = 1.0,
    *,
    solver: str = "train",
    curvature: str = "ggn",
    epochs: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    noise_var: float = 1.0,
    init_var: float | None = 1e-4,
    val_data: Any = None,
    seed: int = 0,
    progress: Any = False,
) -> tuple[nn.Module, Posterior]:
    """One Bayesian update on a new part of the data: the prior's posterior after ``part``.

    Experimental (see the module's docstring). Returns ``(model, posterior)``: a copy of
    ``model`` with the posterior's means as weights, and the :class:`Posterior` (the prior of
    the next part; ``posterior.history`` holds the training :class:`~tensorscope.History`).

    Parameters
    ----------
    model : nn.Module
        The network the prior describes (usually the previous update's model). Not modified;
        training starts from its weights.
    part : iterable of batches
        The new data, as :func:`tensorscope.train` reads it.
    prior : Posterior
        From :func:`laplace_prior`, :func:`isotropic_prior` or the previous update; it must
        describe ``model`` (:meth:`Posterior.check`).
    method : "laplace" or "vi"
        ``"laplace"``: the new mode of ``sum_i nll_i + kl_weight/2 sum_j (theta_j - m_j)^2/v_j``
        and precisions ``kl_weight/v_j + diag(H)_j`` there (``curvature``: ``"ggn"`` or
        ``"empirical"``). ``"vi"``: means and log-variances of a diagonal Gaussian trained on
        ``task loss + kl_weight * KL(q || prior) / N`` (one weight sample per step).
    kl_weight : float > 0
        The prior's weight (1: Bayes' rule); larger keeps the old parts more, smaller adapts more.
    solver : "train" or "newton"
        Laplace only. ``"train"``: :func:`tensorscope.train` with the prior as ``extra_loss``.
        ``"newton"``: ``epochs`` full-batch steps ``theta -= g / (kl_weight/v + diag(H))``
        (exact in one step for a quadratic objective with a diagonal Hessian, e.g. linear
        regression whose design has orthogonal columns).
    epochs : int, optional
        Passes over ``part`` (default 20), or Newton steps (default 1).
    optimizer, lr
        For :func:`tensorscope.train` (default Adam at 1e-3).
    teacher, temperature, label_weight
        As for :func:`tensorscope.train`; the likelihood is the training loss per sample.
    noise_var : float
        The variance of the Gaussian likelihood for float targets.
    init_var : float or None
        VI: the starting variances are ``min(prior variance, init_var)`` (``None``: the prior's);
        the means start at ``model``'s weights. Starting at a prior's large variances (those of
        weights the data did not constrain) drew networks too noisy to train in 20 epochs on
        the digits; 1e-4 did not.
    val_data, progress
        As for :func:`tensorscope.train`.
    seed : int
        VI: the seed of the weight draws.

    Raises
    ------
    TypeError
        ``prior`` is not a :class:`Posterior`.
    CheckpointError
        ``prior`` describes another model (plan, names, shapes): nothing is trained.
    DataError
        No batches, or batches without labels and no ``teacher``: nothing is trained.
    ValueError
        A bad ``method``, ``solver``, ``curvature``, ``kl_weight``, ``noise_var``, ``init_var``,
        or ``solver="newton"`` with ``method="vi"``.
    """
    _check_choice("method", method, METHODS)
    _check_choice("solver", solver, SOLVERS)
    _check_choice("curvature", curvature, CURVATURES)
    kl_weight = _check_positive("kl_weight", kl_weight)
    noise_var = _check_positive("noise_var", noise_var)
    if method == "vi" and solver != "train":
        raise ValueError('solver="newton" is for method="laplace"; VI is trained with ts.train')
    if init_var is not None:
        init_var = _check_positive("init_var", init_var)
    key = "newton" if solver == "newton" else ("vi" if method == "vi" else "train")
    epochs = DEFAULT_EPOCHS[key] if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
    if not isinstance(prior, Posterior):
        raise TypeError(f"prior must be a ts.bayes.Posterior; got {type(prior).__name__}")
    prior.check(model)
    batches, n, scale = _prepare(model, part, teacher, noise_var, "part")
    if teacher is not None:
        teacher.eval()
    names = list(_trainable(model))
    ref = _trainable(model)
    p_mean = {k: prior.mean[k].to(ref[k].device, ref[k].dtype) for k in names}
    p_var = {k: prior.var[k].to(ref[k].device, ref[k].dtype) for k in names}
    p_prec = {k: kl_weight / p_var[k] for k in names}  # the (weighted) prior's precision
    info = {"method": method, "kl_weight": kl_weight, "parts": int(prior.info.get("parts", 0)) + 1,
            "samples": int(prior.info.get("samples", 0)) + n}
    if method == "laplace":
        info.update(solver=solver, curvature=curvature)
        if solver == "train":
            def penalty(student: nn.Module) -> Tensor:
                params = dict(student.named_parameters())
                total = sum((p_prec[k] * (params[k] - p_mean[k]) ** 2).sum() for k in names)
                return 0.5 * scale * total / n

            trained, history = train(model, batches, epochs=epochs, optimizer=optimizer, lr=lr, teacher=teacher,
                                     temperature=temperature, label_weight=label_weight, val_data=val_data,
                                     extra_loss=penalty, progress=progress)
        else:
            trained, history = _newton(model, batches, names, p_mean, p_prec, epochs, curvature, teacher,
                                       temperature, label_weight, scale, progress)
        trained.eval()
        lik = _Likelihood(trained, names, teacher, temperature, label_weight, scale)
        params = {k: p.detach() for k, p in trained.named_parameters() if k in names}
        h = lik.curvature(params, batches, curvature)
        post = Posterior(params, {k: 1.0 / (p_prec[k] + h[k]) for k in names}, plan=plan_of(model), info=info)
        post.history = history
        return trained, post
    # variational inference
    start = {k: p.detach() for k, p in _trainable(model).items()}
    logvar = {k: (p_var[k] if init_var is None else p_var[k].clamp(max=init_var)).log() for k in names}
    wrapper = _Variational(copy.deepcopy(model), names, start, logvar, seed)

    def kl_term(w: nn.Module) -> Tensor:
        total = sum(_kl_terms(m, lv, p_mean[k], p_var[k]) for k, m, lv in zip(names, w.mu, w.logvar))
        return kl_weight * scale * total / n

    trained_w, history = train(wrapper, batches, epochs=epochs, optimizer=optimizer, lr=lr, teacher=teacher,
                               temperature=temperature, label_weight=label_weight, val_data=val_data,
                               extra_loss=kl_term, progress=progress)
    out = copy.deepcopy(model)
    mean = {k: m.detach().clone() for k, m in zip(names, trained_w.mu)}
    var = {k: lv.detach().exp() for k, lv in zip(names, trained_w.logvar)}
    with torch.no_grad():
        for k, p in out.named_parameters():
            if k in mean:
                p.copy_(mean[k])
        for (k, b), (_, b_new) in zip(out.named_buffers(), trained_w.net.named_buffers()):
            b.copy_(b_new)  # BatchNorm's running statistics, updated while training
    post = Posterior(mean, var, plan=plan_of(model), info=info)
    post.history = history
    return out.eval(), post


def _newton(model: nn.Module, batches: Any, names: list[str], p_mean: dict[str, Tensor], p_prec: dict[str, Tensor],
            steps: int, curvature: str, teacher, temperature: float, label_weight: float, scale: float,
            progress: Any) -> tuple[nn.Module, History]:
    """``steps`` diagonal Newton steps on ``sum_i nll_i + 1/2 sum_j p_prec_j (theta_j - p_mean_j)^2``."""
    student = copy.deepcopy(model).eval()
    lik = _Likelihood(student, names, teacher, temperature, label_weight, scale)
    history = History(meta={"solver": "newton", "curvature": curvature})
    history.append(Epoch(0, 0))
    with Progress(progress, total=steps, desc="Newton steps") as bar:
        for step in range(1, steps + 1):
            g, nll = lik.gradient(student, batches)
            with torch.no_grad():
                params = {k: p for k, p in student.named_parameters() if k in names}
                h = lik.curvature({k: p.detach() for k, p in params.items()}, batches, curvature)
                prior_term = 0.0
                for k, p in params.items():
                    diff = p - p_mean[k]
                    prior_term += float(0.5 * (p_prec[k] * diff * diff).sum())
                    p.sub_((g[k] + p_prec[k] * diff) / (p_prec[k] + h[k]))
                    p.grad = None
            history.append(Epoch(step, step, loss=nll + prior_term, extra=prior_term))
            bar.update(1)
    return student.eval(), history
