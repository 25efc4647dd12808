"""How good a (compressed) model is: against labels, against a reference model, or both.

Everything streams: each metric is a running sum updated batch by batch, so evaluating on a
large dataset never holds all outputs in memory.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import iter_batches, output_tensor, split_batch
from .errors import DataError
from .progress import Progress, ProgressArg

__all__ = ["evaluate", "predict", "metrics", "headline_metric", "RunningMetrics", "IGNORE_INDEX", "METRIC_ATTR"]

IGNORE_INDEX = -100  # targets equal to this are skipped, as in Hugging Face and F.cross_entropy

#: the attribute a network sets to name the key of :func:`evaluate`'s result that measures it
#: (e.g. ``"cosine"`` for a sentence encoder, whose outputs are embeddings, not class scores)
METRIC_ATTR = "tensorscope_metric"

#: the default order: labels first, then agreement with the reference, then cosine
_DEFAULT_ORDER = ("accuracy", "agreement", "cosine", "mse")


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode; restore every submodule's own ``training`` flag afterwards."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _progress(
    it: Iterator[Any], data: Any, max_batches: int | None, progress: ProgressArg, desc: str
) -> Iterator[Any]:
    """``it`` with a tqdm bar (``progress=True``) or ``progress(fraction, message)`` calls."""
    if not progress:
        yield from it
        return
    try:
        total: int | None = 1 if isinstance(data, (Tensor, dict)) else len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    if total is None:  # a generator: no fraction to give until it ends
        if progress is True:
            from tqdm.auto import tqdm

            with tqdm(it, desc=desc, unit="batch", leave=False) as bar:
                yield from bar
        else:
            for i, b in enumerate(it):
                progress(0.0, f"{desc}: batch {i + 1}")
                yield b
            progress(1.0, desc)
        return
    with Progress(progress, total=total, desc=desc) as bar:
        for b in it:
            yield b
            bar.update()


def _class_targets(out: Tensor, target: Tensor) -> bool:
    """True when ``target`` holds class indices for ``out`` (classes along the last dim)."""
    return (
        out.dim() >= 2
        and not target.is_floating_point()
        and not target.is_complex()
        and tuple(target.shape) == tuple(out.shape[:-1])
    )


class RunningMetrics:
    """Running sums of every quality metric, updated one batch of outputs at a time.

    The one place tensorscope turns outputs into numbers: :func:`evaluate` feeds it batch by
    batch, :func:`metrics` all at once, and the explorer's live preview through
    :func:`metrics`, so the three always agree. See :func:`evaluate` for the keys.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.correct = 0
        self.counted = 0  # target positions not ignored
        self.loss_sum = 0.0
        self.sq_err = 0.0  # for mse
        self.sq_n = 0
        self.agree = 0
        self.agree_n = 0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.cos_sum = 0.0
        self.seen_target = False
        self.seen_reference = False

    def update(self, out: Tensor, target: Tensor | None = None, reference: Tensor | None = None,
               size: int | None = None) -> None:
        """Add one batch: the model's outputs, its targets and/or the reference's outputs.

        ``size`` is the number of samples in the batch (default: ``out.shape[0]``).
        """
        n = int(size) if size is not None else (int(out.shape[0]) if out.dim() >= 1 else 1)
        self.samples += n
        if target is not None:
            self.seen_target = True
            t = target.to(out.device)
            if _class_targets(out, t):
                mask = t != IGNORE_INDEX
                pred = out.argmax(dim=-1)
                self.correct += int((pred == t)[mask].sum())
                self.counted += int(mask.sum())
                logits = out.reshape(-1, out.shape[-1]).float()
                self.loss_sum += float(
                    F.cross_entropy(logits, t.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                )
            elif t.is_floating_point() and tuple(t.shape) == tuple(out.shape):
                self.sq_err += float(((out.double() - t.double()) ** 2).sum())
                self.sq_n += out.numel()
            else:
                raise DataError(
                    f"targets of shape {tuple(t.shape)} and dtype {t.dtype} do not fit the "
                    f"model's output of shape {tuple(out.shape)}: expected integer class "
                    f"indices of shape {tuple(out.shape[:-1])} (classes along the last "
                    f"dim, {IGNORE_INDEX} ignored) or float targets of the output's shape"
                )
        if reference is not None:
            self.seen_reference = True
            y_ref = reference.to(out.device)
            if y_ref.shape != out.shape:
                raise DataError(
                    f"model and reference give outputs of different shapes on the same "
                    f"batch: {tuple(out.shape)} and {tuple(y_ref.shape)}"
                )
            if out.dim() >= 2 and out.shape[-1] > 0:
                self.agree += int((out.argmax(dim=-1) == y_ref.argmax(dim=-1)).sum())
                self.agree_n += out.numel() // out.shape[-1]
            y, r = out.double(), y_ref.double()
            self.diff_sq += float(((y - r) ** 2).sum())
            self.ref_sq += float((r**2).sum())
            if out.dim() >= 1 and out.shape[0] == n and n > 0:
                self.cos_sum += float(
                    F.cosine_similarity(y.reshape(n, -1), r.reshape(n, -1), dim=1, eps=1e-12).sum()
                )
            else:
                self.cos_sum += float(F.cosine_similarity(y.reshape(1, -1), r.reshape(1, -1), eps=1e-12)) * n

    def result(self) -> dict[str, float | int]:
        result: dict[str, float | int] = {"samples": self.samples}
        if self.seen_target:
            if self.counted:
                result["accuracy"] = self.correct / self.counted
                result["loss"] = self.loss_sum / self.counted
            if self.sq_n:
                result["mse"] = self.sq_err / self.sq_n
        if self.seen_reference:
            if self.agree_n:
                result["agreement"] = self.agree / self.agree_n
            if self.ref_sq > 0:
                result["relative_error"] = math.sqrt(self.diff_sq) / math.sqrt(self.ref_sq)
            else:
                result["relative_error"] = 0.0 if self.diff_sq == 0 else float("inf")
            result["cosine"] = self.cos_sum / max(self.samples, 1)
        return result


def metrics(outputs: Tensor, targets: Tensor | None = None, reference: Tensor | None = None) -> dict[str, float | int]:
    """Quality numbers of a model's ``outputs`` (all samples at once), as :func:`evaluate` gives them.

    ``targets``: integer class indices of shape ``outputs.shape[:-1]`` (``(N,)`` for ``(N, C)``
    logits, ``(N, T)`` for ``(N, T, C)`` sequence logits; :data:`IGNORE_INDEX` positions are
    left out of ``accuracy`` and ``loss``), or float targets of the outputs' own shape
    (regression: ``mse``, no accuracy). ``reference``: the reference model's outputs on the
    same inputs (``agreement`` of top-1 predictions along the last dim, ``relative_error``,
    ``cosine``; embeddings and other outputs that are not logits get the last two).
    """
    sums = RunningMetrics()
    sums.update(outputs, targets, reference)
    return sums.result()


def headline_metric(result: dict[str, Any], model: nn.Module | None = None) -> str | None:
    """The key of an :func:`evaluate` / :func:`metrics` result that says how good ``model`` is.

    The hook: a network may name its own metric in a ``tensorscope_metric`` attribute
    (:data:`METRIC_ATTR`; a class attribute, a property or an instance attribute), e.g.
    ``"cosine"`` for a sentence encoder, whose top-1 "agreement" over embedding dimensions
    means nothing. That key is used when the result has it; otherwise ``accuracy`` (labels),
    then ``agreement``, ``cosine``, ``mse``. None when the result has none of them.
    """
    own = getattr(model, METRIC_ATTR, None) if model is not None else None
    if isinstance(own, str) and own in result:
        return own
    return next((k for k in _DEFAULT_ORDER if k in result), None)


def evaluate(
    model: nn.Module,
    data: Any,
    reference: nn.Module | None = None,
    *,
    max_batches: int | None = None,
    progress: ProgressArg = False,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Measure ``model`` on ``data`` against its labels and/or a ``reference`` model.

    Runs under ``torch.no_grad()`` with the models in eval mode; each module's training
    flag is restored afterwards.

    Parameters
    ----------
    model
        The model to measure.
    data
        An iterable of batches (see :mod:`tensorscope.data`); a bare tensor or dict is one
        batch. Targets come from ``(inputs, targets)`` tuples.
    reference
        Optional model to compare with, typically the uncompressed original.
    max_batches
        Stop after this many batches.
    progress
        ``True`` for a tqdm bar, or a callable ``progress(fraction, message)``.
    device
        Where to move each batch for ``model``; by default the device of ``model``'s
        parameters. The reference gets the batch on its own parameters' device.

    Returns
    -------
    dict
        ``samples`` always. With class-index targets (shape of the output without its
        last dim; ``-100`` ignored): ``accuracy`` (top-1 along the last dim) and ``loss``
        (cross-entropy, mean over the counted samples, or tokens for (N, T, C) outputs).
        With float targets of the output's own shape: ``mse``. With a reference:
        ``agreement`` (fraction of top-1 predictions along the last dim equal to the
        reference's; left out for 1-D outputs, which have no classes), ``relative_error`` (``||y - y_ref||_F / ||y_ref||_F`` over all
        outputs seen) and ``cosine`` (mean over samples of the cosine similarity of the
        flattened outputs).

    Raises
    ------
    DataError
        When batches carry no targets and no reference is given (quality needs one), when
        the data yields no batch, or when targets or reference outputs do not fit.
    """
    dev = torch.device(device) if device is not None else _device_of(model)
    ref_dev = _device_of(reference) if reference is not None else None

    sums = RunningMetrics()
    batches = _progress(iter_batches(data, max_batches), data, max_batches, progress, "evaluate")
    with torch.no_grad(), _eval_mode(model, reference):
        for i, raw in enumerate(batches):
            b = split_batch(raw)
            if i == 0 and reference is None and b.target is None:
                raise DataError(
                    "evaluate needs labels or a reference model to measure quality: the "
                    "batches carry no targets (give (inputs, targets) batches) and no "
                    "reference= was passed (give the original model to compare with)"
                )
            out = output_tensor(b.to(dev).call(model))
            y_ref = output_tensor(b.to(ref_dev).call(reference)) if reference is not None else None
            sums.update(out, b.target, y_ref, size=b.size)

    if sums.samples == 0:
        raise DataError("data gave no batches (or only empty ones): nothing to evaluate")
    return sums.result()


def predict(
    model: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    progress: ProgressArg = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """The model's outputs on every batch, concatenated along the first dim, on the CPU.

    Unlike :func:`evaluate` this keeps all outputs; use it for small data. Eval mode and
    ``no_grad`` as in :func:`evaluate`.
    """
    dev = torch.device(device) if device is not None else _device_of(model)
    outs: list[Tensor] = []
    batches = _progress(iter_batches(data, max_batches), data, max_batches, progress, "predict")
    with torch.no_grad(), _eval_mode(model):
        for raw in batches:
            outs.append(output_tensor(split_batch(raw).to(dev).call(model)).cpu())
    if not outs:
        raise DataError("data gave no batches: nothing to predict")
    try:
        return torch.cat(outs, dim=0)
    except RuntimeError as e:
        shapes = sorted({tuple(o.shape[1:]) for o in outs})
        raise DataError(
            f"outputs of different batches do not concatenate (shapes after the first dim: "
            f"{shapes[:4]}); pad the batches to one length or evaluate batch by batch"
        ) from e

