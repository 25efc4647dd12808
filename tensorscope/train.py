"""A training loop for the library's own needs, and the records it (and ``iterative``) keep.

:func:`train` trains a copy of a network with SGD (momentum) or Adam for a number of
epochs, on the batch convention of :mod:`tensorscope.data`: cross-entropy with class
labels, MSE with float targets, distillation from a ``teacher`` (or both). Two hooks make it
the base of other algorithms without a second loop:

- ``extra_loss(model)`` is added to the loss of every step (a regulariser, a prior);
- ``step_hook(model, step)`` runs after every optimizer step, under ``torch.no_grad()``
  (a proximal step, a posterior update, a projection).

What happened is a :class:`History`: one record per epoch (or per stage of
:func:`tensorscope.iterative`), and ``History.to_frame()`` turns it into a table.

References
----------
Hinton, Vinyals and Dean, "Distilling the knowledge in a neural network", 2015 (the
distillation loss). Sutskever et al., "On the importance of initialization and momentum in
deep learning", ICML 2013 (SGD with momentum). Kingma and Ba, "Adam", ICLR 2015.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import iter_batches, output_tensor, split_batch
from .errors import DataError
from .evaluate import RunningMetrics
from .progress import Progress

__all__ = ["Epoch", "History", "NonFiniteLossWarning", "task_loss", "train", "DEFAULT_LRS"]

#: default step sizes per optimizer (used when ``lr`` is not given)
DEFAULT_LRS = {"sgd": 0.01, "adam": 1e-3}


class NonFiniteLossWarning(UserWarning):
    """Training stopped at a NaN or infinite loss; the best state seen is returned."""


# ---- the loss ---------------------------------------------------------------------------------


def task_loss(out: torch.Tensor, target: torch.Tensor | None, teacher_out: torch.Tensor | None,
              temperature: float = 2.0, label_weight: float = 0.5) -> torch.Tensor:
    """The loss of one batch: labels, a teacher, or both.

    Integer targets: cross-entropy (``-100`` ignored). Float targets: MSE. A teacher's
    outputs: KL divergence of temperature-softened distributions for ``(N, C)`` scores
    (times ``T**2``, Hinton et al. 2015), MSE for other outputs. With both, ``label_weight``
    weighs the labels and ``1 - label_weight`` the teacher.
    """
    terms = []
    if target is not None:
        if target.dtype in (torch.int64, torch.int32) and out.dim() >= 2:
            terms.append((label_weight if teacher_out is not None else 1.0,
                          F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100)))
        else:
            terms.append((label_weight if teacher_out is not None else 1.0, F.mse_loss(out, target.to(out.dtype))))
    if teacher_out is not None:
        w = 1.0 - label_weight if target is not None else 1.0
        if out.dim() == 2:  # class scores: match the softened distributions
            t = temperature
            kd = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(teacher_out / t, -1), log_target=True,
                          reduction="batchmean") * t * t
        else:  # hidden states, token logits: match the outputs themselves
            kd = F.mse_loss(out, teacher_out)
        terms.append((w, kd))
    return sum(w * l for w, l in terms)


# ---- records ----------------------------------------------------------------------------------


@dataclass
class Epoch:
    """One epoch of :func:`train` (epoch 0: the starting point, before any step).

    ``loss`` is the mean training objective over the epoch's steps (task loss plus
    ``extra_loss``), ``extra`` the mean of ``extra_loss`` alone; ``val`` holds the
    objective (``objective``) and :func:`tensorscope.evaluate`'s metrics on the validation
    data; ``info`` what the algorithm built on :func:`train` recorded (e.g. energy ranks).
    """

    epoch: int
    steps: int
    loss: float | None = None
    extra: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, numbers.Number))


def _flatten(prefix: str, value: Any, row: dict[str, Any]) -> None:
    """One value of a record into table cells: dicts by ``prefix.key``, ranks as ``16x8``,
    lists of names joined; arrays, tensors, plans and other objects are left out."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, row)
    elif _scalar(value):
        row[prefix] = value.item() if hasattr(value, "item") else value
    elif isinstance(value, (tuple, list)) and all(_scalar(v) for v in value):
        if value and all(isinstance(v, numbers.Integral) for v in value):
            row[prefix] = "x".join(str(int(v)) for v in value)
        else:
            row[prefix] = ", ".join(str(v) for v in value)


class History(list):
    """The records of a run, in order: :class:`Epoch` for :func:`train`, ``Stage`` for
    :func:`tensorscope.iterative`. A list (index it, iterate it) with a table view.

    ``meta`` holds what is constant over the run (e.g. each layer's threshold); ``stopped``
    says why a run ended early (``None`` when it ran to the end).
    """

    def __init__(self, records=(), *, meta: dict[str, Any] | None = None, stopped: str | None = None):
        super().__init__(records)
        self.meta: dict[str, Any] = dict(meta or {})
        self.stopped = stopped

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per record: scalar fields as they are, dict fields as ``field.key``
        (``info`` without its prefix), ranks as text; non-tabular values left out."""
        out = []
        for rec in self:
            row: dict[str, Any] = {}
            for f in fields(rec):
                _flatten("" if f.name == "info" else f.name, getattr(rec, f.name), row)
            out.append(row)
        return out

    def to_frame(self):
        """The records as a ``pandas.DataFrame`` (one row each; see :meth:`rows`)."""
        import pandas as pd  # optional dependency (the app and notebook extras install it)

        return pd.DataFrame(self.rows())

    def __repr__(self) -> str:
        stop = f", stopped={self.stopped!r}" if self.stopped else ""
        return f"History({list.__repr__(self)}{stop})"


# ---- the loop ---------------------------------------------------------------------------------


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and isinstance(value, numbers.Integral)
    if not ok:
        what = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {what}; got {value!r}")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(data: Any, what: str) -> Any:
    """Something that can be iterated once per epoch: a re-iterable (a list, a DataLoader) as
    it is, a bare tensor or dict as one batch, a one-shot iterator read into a list."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    it = iter_batches(data)  # DataError for what is not an iterable of batches
    if iter(data) is data:  # a generator or iterator: it would be spent after one epoch
        data = list(it)
    if isinstance(data, (list, tuple)) and not data:
        raise DataError(f"{what} gave no batches")
    return data


def _validate(model: nn.Module, teacher: nn.Module | None, batches: Any, device: torch.device,
              temperature: float, label_weight: float) -> dict[str, float]:
    """The objective and the quality metrics on ``batches`` (one pass, eval mode)."""
    was = model.training
    model.eval()
    sums = RunningMetrics()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for raw in iter_batches(batches):
                b = split_batch(raw).to(device)
                out = output_tensor(b.call(model))
                t = output_tensor(b.call(teacher)) if teacher is not None else None
                total += float(task_loss(out, b.target, t, temperature, label_weight)) * b.size
                n += b.size
                sums.update(out, b.target, t, size=b.size)
    finally:
        model.train(was)
    if n == 0:
        raise DataError("val_data gave no batches")
    return {"objective": total / n, **{k: v for k, v in sums.result().items() if k != "samples"}}


def train(
    model: nn.Module,
    data: Any,
    *,
    epochs: int = 1,
    optimizer: str = "sgd",
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    teacher: nn.Module | None = None,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    val_data: Any = None,
    step_hook: Callable[[nn.Module, int], Any] | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    epoch_hook: Callable[[nn.Module, int], dict[str, Any] | None] | None = None,
    progress: Any = False,
) -> tuple[nn.Module, History]:
    """Train a copy of ``model`` and return it (in eval mode) with its :class:`History`.

    Parameters
    ----------
    model : nn.Module
        Not modified: a deep copy is trained. Every module is in training mode while it
        trains (dropout on, BatchNorm updates its statistics and its affine parameters).
    data : iterable of batches
        Batches as :mod:`tensorscope.data` reads them. One epoch is one pass over it; a
        ``DataLoader`` with ``shuffle=True`` reshuffles every epoch. A one-shot iterator is
        read into memory once.
    epochs : int
        Passes over ``data``.
    optimizer : "sgd" or "adam"
        SGD with ``momentum`` (Sutskever et al. 2013), or Adam (Kingma and Ba 2015).
    lr : float, optional
        Step size (default 0.01 for SGD, 1e-3 for Adam).
    teacher : nn.Module, optional
        Distil from its outputs (Hinton et al. 2015); needed when batches carry no labels.
    temperature, label_weight
        The distillation temperature, and the weight of the labels when both are used.
    val_data : iterable of batches, optional
        Measured at the start and after every epoch (``History[i].val``): the objective and
        :func:`tensorscope.evaluate`'s metrics (agreement with the teacher when there is one).
    step_hook : callable ``(model, step)``, optional
        Called after every optimizer step (``step`` counts from 1), under ``torch.no_grad()``,
        so it may change weights in place (a proximal step).
    extra_loss : callable ``model -> scalar tensor``, optional
        Added to every step's loss (a regulariser); its mean per epoch is ``History[i].extra``.
    epoch_hook : callable ``(model, epoch) -> dict``, optional
        Called at the start (epoch 0) and after every epoch; what it returns is stored in
        ``History[i].info`` (and becomes columns of ``History.to_frame()``).
    progress : bool or callable
        A tqdm bar, or ``callable(fraction, message)``.

    Returns
    -------
    (nn.Module, History)
        The trained copy and one :class:`Epoch` per epoch, epoch 0 first.

    A NaN or infinite loss stops training with a :class:`NonFiniteLossWarning`, and the best
    state seen is returned: the one of lowest validation objective with ``val_data``, else the
    last completed epoch's (the starting weights if none completed). ``History.stopped`` says so.

    Raises
    ------
    ValueError
        A bad ``epochs``, ``lr``, ``momentum`` or ``optimizer`` (before anything runs).
    DataError
        No batches, or batches without labels and no ``teacher``.
    """
    _check_positive("epochs", epochs, integer=True)
    optimizer = str(optimizer).lower()
    if optimizer not in DEFAULT_LRS:
        raise ValueError(f'optimizer must be "sgd" or "adam"; got {optimizer!r}')
    lr = DEFAULT_LRS[optimizer] if lr is None else lr
    _check_positive("lr", lr)
    if not (isinstance(momentum, numbers.Real) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
    if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    batches = _batches(data, "data")
    first = next(iter(iter_batches(batches)), None)
    if first is None:
        raise DataError("data gave no batches")
    if teacher is None and split_batch(first).target is None:
        raise DataError("train needs labels in the batches ((inputs, targets) tuples) or a teacher model to distil from")
    val_batches = _batches(val_data, "val_data") if val_data is not None else None

    student = copy.deepcopy(model)
    device = _device_of(student)
    if teacher is not None:
        teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def record(epoch: int, steps: int, loss=None, extra=None) -> Epoch:
        val = _validate(student, teacher, val_batches, device, temperature, label_weight) if val_batches else {}
        info = {}
        if epoch_hook is not None:
            with torch.no_grad():
                info = dict(epoch_hook(student, epoch) or {})
        return Epoch(epoch, steps, loss, extra, val, info)

    history = History(meta={"optimizer": optimizer, "lr": lr, "momentum": momentum if optimizer == "sgd" else None})
    history.append(record(0, 0))
    best_score = history[0].val.get("objective", math.inf)
    best_state = copy.deepcopy(student.state_dict())
    step = 0
    total = None
    try:
        total = epochs * len(batches)
    except TypeError:
        pass
    student.train()
    with Progress(progress, total=total or epochs, desc="training") as bar:
        for epoch in range(1, epochs + 1):
            loss_sum = extra_sum = 0.0
            n = 0
            diverged = False
            for raw in iter_batches(batches):
                b = split_batch(raw).to(device)
                with torch.no_grad():
                    t = output_tensor(b.call(teacher)) if teacher is not None else None
                out = output_tensor(b.call(student))
                loss = task_loss(out, b.target, t, temperature, label_weight)
                extra = extra_loss(student) if extra_loss is not None else None
                if extra is not None:
                    extra = extra if isinstance(extra, torch.Tensor) else torch.tensor(float(extra))
                    loss = loss + extra
                if not bool(torch.isfinite(loss.detach()).all()):
                    diverged = True
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step_hook is not None:
                    with torch.no_grad():
                        step_hook(student, step)
                loss_sum += float(loss.detach())
                extra_sum += float(extra.detach()) if extra is not None else 0.0
                n += 1
                if total:
                    bar.set_message(f"epoch {epoch}: loss {float(loss.detach()):.4f}")
                    bar.update(1)
            if diverged:
                history.stopped = f"non-finite loss at step {step + 1} (epoch {epoch}); returned the best state"
                warnings.warn(
                    f"training stopped: the loss became NaN or infinite at step {step + 1} (epoch {epoch}, "
                    f"{optimizer} lr={lr:g}); the best state seen is returned. Try a smaller lr.",
                    NonFiniteLossWarning, stacklevel=2)
                break
            rec = record(epoch, step, loss_sum / max(n, 1), extra_sum / max(n, 1) if extra_loss is not None else None)
            history.append(rec)
            score = rec.val.get("objective", -epoch)  # no validation data: the latest epoch is the best known
            if not math.isfinite(score):
                score = math.inf
            if score <= best_score or not val_batches:
                best_score = score
                best_state = copy.deepcopy(student.state_dict())
            if not total:
                bar.update(1)
    if history.stopped:
        student.load_state_dict(best_state)
    return student.eval(), history
