"""The batch convention: the one way tensorscope reads data.

Data is any iterable of batches; a ``DataLoader`` works. A batch is one of:

* a tensor: the model's single positional input;
* a dict of keyword tensors, as a Hugging Face tokenizer returns: ``model(**batch)``;
* a tuple or list ``(inputs, targets)``, as a ``DataLoader`` over a ``TensorDataset``
  yields. ``targets`` is optional (a 1-tuple is inputs only), and ``inputs`` may itself be
  a tensor or a dict of keyword tensors. Elements after the second are ignored, so
  ``(x, y, weights)`` still reads as inputs ``x`` and targets ``y``.

Labels are optional everywhere. Every function here raises
:class:`tensorscope.errors.DataError` with the type it received and the convention when a
batch does not follow it.
"""

from __future__ import annotations

import io
import itertools
import os
import stat
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import file_limits
from .errors import CheckpointError, DataError, FileTooLargeError

__all__ = [
    "Batch",
    "split_batch",
    "forward",
    "output_tensor",
    "iter_batches",
    "num_samples",
    "parse_data_file",
    "load_data_file",
    "CONVENTION",
]

CONVENTION = (
    "a batch is a tensor, a dict of keyword tensors (as a tokenizer returns), or a "
    "tuple/list (inputs, targets) with optional targets, where inputs is a tensor or a dict"
)


def _describe(obj: Any) -> str:
    """A short description of what was received, for error messages."""
    name = type(obj).__name__
    if isinstance(obj, Tensor):
        return f"Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(type(o).__name__ for o in obj[:4])
        more = ", ..." if len(obj) > 4 else ""
        return f"{name} of length {len(obj)} ({inner}{more})"
    if isinstance(obj, Mapping):
        keys = list(obj.keys())[:6]
        return f"{name} with keys {keys}"
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{name} {text}"


@dataclass
class Batch:
    """One batch split into what the model's forward takes and the optional targets."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    target: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of samples: the first dimension of the first input tensor."""
        for t in (*self.args, *self.kwargs.values()):
            if isinstance(t, Tensor):
                return int(t.shape[0]) if t.dim() > 0 else 1
        return 0

    def to(self, device: torch.device | str | None) -> "Batch":
        """A copy with every tensor moved to ``device`` (``None``: unchanged)."""
        if device is None:
            return self
        mv = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        return Batch(
            args=tuple(mv(a) for a in self.args),
            kwargs={k: mv(v) for k, v in self.kwargs.items()},
            target=mv(self.target) if self.target is not None else None,
        )

    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``: the raw output, before :func:`output_tensor`."""
        return model(*self.args, **self.kwargs)


def _split_inputs(inputs: Any, whole: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        if not any(isinstance(v, Tensor) for v in inputs.values()):
            raise DataError(
                f"a dict batch must hold at least one tensor; got {_describe(whole)}. "
                f"Convention: {CONVENTION}."
            )
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise DataError(
                f"a dict batch is passed as keyword arguments, so its keys must be strings; "
                f"got keys {bad[:4]} in {_describe(whole)}. Convention: {CONVENTION}."
            )
        return (), dict(inputs)
    raise DataError(f"cannot read a batch from {_describe(whole)}. Convention: {CONVENTION}.")


def split_batch(batch: Any) -> Batch:
    """Split one batch into positional inputs, keyword inputs and optional targets.

    Parameters
    ----------
    batch
        A tensor, a dict of keyword tensors, or a tuple/list ``(inputs, targets)``
        (``targets`` optional) whose inputs are a tensor or a dict.

    Raises
    ------
    DataError
        When ``batch`` is none of these (a string, ``None``, an empty tuple, a dict with no
        tensors, targets that are not a tensor ...).
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise DataError(f"got an empty {type(batch).__name__} as a batch. Convention: {CONVENTION}.")
        args, kwargs = _split_inputs(batch[0], batch)
        target = batch[1] if len(batch) > 1 else None
        if target is not None and not isinstance(target, Tensor):
            raise DataError(
                f"the second element of a tuple batch is the targets and must be a tensor; "
                f"got {_describe(batch)}. Convention: {CONVENTION}."
            )
        return Batch(args, kwargs, target)
    args, kwargs = _split_inputs(batch, batch)
    return Batch(args, kwargs, None)


def describe_batch(b: Batch) -> str:
    """The shapes and dtypes of a split batch's tensors, for error messages."""
    parts = [f"{tuple(a.shape)} {a.dtype}" for a in b.args if isinstance(a, torch.Tensor)]
    parts += [f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in b.kwargs.items() if isinstance(v, torch.Tensor)]
    return ", ".join(parts) or "no tensors"


def output_tensor(out: Any) -> Tensor:
    """The tensor to measure in a model's output.

    A tensor as is; an object with ``.logits`` (a Hugging Face ``ModelOutput``) gives its
    logits, else its ``.last_hidden_state``; a dict gives ``"logits"``, else
    ``"last_hidden_state"``, else its first tensor value; a tuple or list gives its first
    element (recursively).
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), Tensor):
                return out[key]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    else:
        for attr in ("logits", "last_hidden_state"):
            v = getattr(out, attr, None)
            if isinstance(v, Tensor):
                return v
        if isinstance(out, (tuple, list)) and len(out) > 0:
            return output_tensor(out[0])
    raise DataError(
        f"cannot find the output tensor in a model output of type {_describe(out)}; expected "
        "a tensor, an object or dict with 'logits' or 'last_hidden_state', or a tuple whose "
        "first element is one of these"
    )


def forward(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Tensor:
    """Run ``model`` on one batch (moving its tensors to ``device`` if given); the output tensor."""
    b = batch if isinstance(batch, Batch) else split_batch(batch)
    return output_tensor(b.to(device).call(model))


def iter_batches(data: Any, max_batches: int | None = None) -> Iterator[Any]:
    """Iterate over the batches of ``data``, at most ``max_batches`` of them.

    ``data`` is an iterable of batches (a ``DataLoader``, a list of tensors, a generator).
    A bare tensor or a bare dict is taken as ONE batch, not iterated (iterating a tensor
    would give its rows, and a dict its keys). A non-iterable raises ``DataError`` at once,
    not on the first ``next``.
    """
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 0):
        raise DataError(f"max_batches must be a non-negative integer or None; got {max_batches!r}")
    if isinstance(data, (Tensor, Mapping)):
        it: Iterator[Any] = iter((data,))
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(
            f"data must be an iterable of batches (a DataLoader, a list of batches) or one "
            f"batch as a tensor or dict; got {_describe(data)}. Convention: {CONVENTION}."
        )
    else:
        it = iter(data)
    return it if max_batches is None else itertools.islice(it, max_batches)


def num_samples(data: Any, max_batches: int | None = None) -> int | None:
    """Best-effort count of samples without iterating; ``None`` when unknown.

    Knows a tensor or dict (one batch), a ``DataLoader`` over a sized dataset, and a list
    or tuple of batches.
    """
    if isinstance(data, (Tensor, Mapping)):
        try:
            return split_batch(data).size
        except DataError:
            return None
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(data, "batch_size"):
        try:
            n = len(dataset)
        except TypeError:
            return None
        bs = data.batch_size
        if bs and getattr(data, "drop_last", False):
            n = (n // bs) * bs
        if max_batches is not None and bs:
            return min(n, max_batches * bs)
        return n if max_batches is None else None
    if isinstance(data, (list, tuple)):
        batches = data if max_batches is None else data[:max_batches]
        try:
            return sum(split_batch(b).size for b in batches)
        except DataError:
            return None
    return None


# ---- data files -----------------------------------------------------------------------------

_INPUT_KEYS = ("inputs", "input", "x", "X", "images", "data", "features")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y", "Y")


def parse_data_file(data: bytes, filename: str) -> tuple[Tensor, Tensor | None]:
    """Inputs (and optional labels) from the bytes of a ``.pt``/``.pth`` or ``.npz`` file.

    A ``.pt`` holds a tensor, a pair ``(inputs, labels)`` or a dict with keys like
    ``x``/``inputs`` and ``y``/``labels`` (read with ``weights_only=True``: never code); an
    ``.npz`` holds arrays under such keys (read with ``allow_pickle=False``). Size limits are
    the caller's: :func:`load_data_file` checks them before reading.
    """
    import numpy as np

    name = filename.lower()
    if not data:
        raise DataError(f"{filename!r} is empty (0 bytes)")
    if name.endswith(".npz"):
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:
            raise DataError(f"{filename!r} is not a readable .npz file: {type(e).__name__}: {e}") from None
        for k, v in arrays.items():  # np.load gives raw bytes for a member that is not a .npy
            if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
                what = f"an array of dtype {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
                raise DataError(f"{filename!r}: entry {k!r} holds {what}, not numbers")
        # reshape: ascontiguousarray turns a 0-d array into a 1-d one
        obj: Any = {k: torch.from_numpy(np.ascontiguousarray(v).reshape(v.shape)) for k, v in arrays.items()}
    elif name.endswith((".pt", ".pth")):
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(
                f"{filename!r} is not a torch.save file of tensors that can be read safely "
                f"(weights_only=True): {type(e).__name__}: {str(e)[:200]}"
            ) from None
    else:
        raise DataError(f"data files must be .pt/.pth (torch.save) or .npz; got {filename!r}")
    x, y = _inputs_and_labels(obj, filename)
    for what, t in (("inputs", x), ("labels", y)):
        if isinstance(t, Tensor) and (t.layout != torch.strided or t.device.type != "cpu"):
            raise DataError(f"{filename!r}: the {what} must be a dense tensor; got a {t.layout} tensor on {t.device}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise DataError(f"{filename!r}: the inputs must be a non-empty tensor with samples along dim 0")
    if x.is_complex():  # .float() would silently drop the imaginary part
        raise DataError(f"{filename!r}: the inputs must be real numbers; got {x.dtype}")
    if not x.is_floating_point() or x.dtype.itemsize == 1:  # float8 types have no isfinite
        x = x.float()
    if y is not None:
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{filename!r}: labels must be a 1-D tensor with one class index per sample "
                f"({x.shape[0]}); got {tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}"
            )
        if y.is_complex():
            raise DataError(f"{filename!r}: labels must be integer class indices; got {y.dtype}")
        if y.is_floating_point():
            yf = y.double()  # inf == inf.round() and 1e30 is integral: neither casts to a valid index
            if not bool((torch.isfinite(yf) & (yf == yf.round()) & (yf.abs() < 2**53)).all()):
                raise DataError(f"{filename!r}: labels must be integer class indices")
        y = y.long()
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{filename!r}: the inputs hold NaN or Inf values")
    return x, y


def _inputs_and_labels(obj: Any, filename: str) -> tuple[Any, Any]:
    if isinstance(obj, Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2:
        return obj[0], (obj[1] if len(obj) > 1 else None)
    if isinstance(obj, Mapping):
        x = next((obj[k] for k in _INPUT_KEYS if k in obj), None)
        y = next((obj[k] for k in _LABEL_KEYS if k in obj), None)
        if x is None:
            tensors = [k for k, v in obj.items() if isinstance(v, Tensor) and k not in _LABEL_KEYS]
            if len(tensors) == 1:
                x = obj[tensors[0]]
        if x is not None:
            return x, y
    raise DataError(
        f"{filename!r} holds {type(obj).__name__}; expected a tensor of inputs, a pair (inputs, labels), "
        f"or a dict with keys like 'x'/'inputs' and 'y'/'labels'"
    )


def load_data_file(path: str | os.PathLike, *, batch_size: int = 256, max_bytes: int | None = None) -> list:
    """A data file (see :func:`parse_data_file`) as a list of batches ``(x, y)`` or ``x``.

    Refuses a file over the size limit (``TENSORSCOPE_MAX_FILE_BYTES``, default 4 GiB) and
    a zip whose entries declare more than that once unpacked, before reading it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer; got {batch_size!r}")
    path = os.fspath(path)
    limit = file_limits.max_bytes(max_bytes)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such data file: {path!r}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path!r} is not a regular file (a folder, device or pipe?)")
    if st.st_size > limit:
        raise FileTooLargeError(f"data file {path!r} is {st.st_size:,} bytes; {file_limits.limit_hint(limit)}")
    if zipfile.is_zipfile(path):
        try:
            file_limits.check_zip(path, limit)  # a zip bomb is refused by its declared sizes
        except FileTooLargeError:
            raise
        except CheckpointError as e:
            raise DataError(str(e)) from None
    with open(path, "rb") as f:
        x, y = parse_data_file(f.read(), os.path.basename(path))
    return [
        (x[i:i + batch_size], y[i:i + batch_size]) if y is not None else x[i:i + batch_size]
        for i in range(0, x.shape[0], batch_size)
    ]
