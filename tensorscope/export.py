"""Standalone exports: a file that torch alone runs, verified against the model before it is kept.

:func:`export` writes ``torch.export`` programs (``.pt2``, with a dynamic batch dimension
when possible), TorchScript (``.pt``) or ONNX (``.onnx``, with the ``onnx`` extra), then
reloads the file and compares its output on the example input with the model's.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ._io import atomic_path
from .data import split_batch
from .errors import MissingExtraError, TensorscopeError

__all__ = ["export"]

_FORMATS = {
    "exported_program": "exported_program", "export": "exported_program", "torch.export": "exported_program",
    "pt2": "exported_program", "ep": "exported_program",
    "torchscript": "torchscript", "jit": "torchscript", "script": "torchscript",
    "onnx": "onnx",
}
_SUFFIX = {"exported_program": ".pt2", "torchscript": ".pt", "onnx": ".onnx"}


def _split(example_input: Any) -> tuple[tuple, dict]:
    b = split_batch(example_input)
    return tuple(b.args), dict(b.kwargs)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for t in (*args, *kwargs.values()):
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Spec marking dim 0 of every input with the batch size as one shared dynamic dim."""
    b = _batch_size(args, kwargs)
    if b is None:
        return None
    dim = torch.export.Dim("batch")

    def spec(t: Any) -> Any:
        return {0: dim} if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


def _tolerances(expected: Any) -> dict[str, float]:
    leaves = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            leaves.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)

    walk(expected)
    if leaves and all(t.dtype in (torch.float32, torch.complex64) for t in leaves if t.is_floating_point() or t.is_complex()):
        return {"rtol": 1e-4, "atol": 1e-4}
    return {}


def _verify(got: Any, expected: Any, fmt: str, path: str) -> None:
    try:
        torch.testing.assert_close(got, expected, **_tolerances(expected))
    except (AssertionError, TypeError, ValueError) as e:
        raise TensorscopeError(
            f"the {fmt} export written to {path!r} does not reproduce the model's output on the "
            f"example input; nothing was written. {e}"
        ) from None


def _export_program(model: nn.Module, args: tuple, kwargs: dict, tmp: str, dynamic: bool) -> None:
    ep = None
    if dynamic:
        try:
            t_args, t_kwargs = args, kwargs
            if _batch_size(args, kwargs) == 1:
                # torch.export specializes a size-1 dimension to the constant 1: trace with the
                # sample twice (the program still runs any batch size, 1 included)
                def twice(t: Any) -> Any:
                    return torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 else t

                t_args = tuple(twice(a) for a in args)
                t_kwargs = {k: twice(v) for k, v in kwargs.items()}
            shapes = _dynamic_shapes(model, t_args, t_kwargs)
            if shapes is not None:
                ep = torch.export.export(model, t_args, t_kwargs or None, dynamic_shapes=shapes)
        except Exception as e:
            warnings.warn(
                f"export with a dynamic batch dimension failed ({type(e).__name__}: {str(e)[:300]}); "
                f"exporting with the example input's fixed shapes instead",
                stacklevel=3,
            )
            ep = None
    if ep is None:
        ep = torch.export.export(model, args, kwargs or None)
    torch.export.save(ep, tmp)


def _export_torchscript(model: nn.Module, args: tuple, kwargs: dict, tmp: str) -> None:
    if kwargs:
        sig = inspect.signature(model.forward)
        all_kwargs = dict(sig.bind(*args, **kwargs).arguments)
        trace_kw: dict[str, Any] = {"example_kwarg_inputs": all_kwargs}
    else:
        trace_kw = {"example_inputs": args}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(model, check_trace=False, **trace_kw)
        except RuntimeError:  # outputs that are dicts or lists need strict=False
            traced = torch.jit.trace(model, check_trace=False, strict=False, **trace_kw)
        torch.jit.save(traced, tmp)


def _export_onnx(model: nn.Module, args: tuple, kwargs: dict, tmp: str, dynamic: bool, expected: Any, path: str) -> None:
    try:
        import onnx  # an optional extra: imported only for format='onnx'
    except ImportError:
        raise MissingExtraError(
            "format='onnx' needs the onnx package: pip install 'tensorscope[onnx]'"
        ) from None
    shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    torch.onnx.export(model, args, tmp, kwargs=kwargs or None, dynamic_shapes=shapes)
    try:
        import onnxruntime as ort  # optional: compares the exported file's outputs when installed
    except ImportError:
        onnx.checker.check_model(tmp)
        warnings.warn(
            "the ONNX export was checked for validity but its outputs were not compared "
            "(install onnxruntime to compare them)",
            stacklevel=3,
        )
        return
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    values = [a for a in args] + list(kwargs.values())
    feeds = {n: v.detach().cpu().numpy() for n, v in zip(names, values) if isinstance(v, Tensor)}
    outs = [torch.from_numpy(o) for o in sess.run(None, feeds)]
    flat, _ = torch.utils._pytree.tree_flatten(expected)
    _verify(outs, [t for t in flat if isinstance(t, Tensor)], "onnx", path)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any,
    *,
    format: str = "exported_program",
    dynamic_batch: bool = True,
) -> str:
    """Write ``model`` as a file that torch alone runs (no tensorscope needed), and check it.

    Formats: ``"exported_program"`` (``torch.export``; load with
    ``torch.export.load(path).module()``; the batch dimension is dynamic when possible),
    ``"torchscript"`` (``torch.jit.trace``; load with ``torch.jit.load``) and ``"onnx"``
    (needs ``pip install 'tensorscope[onnx]'``). ``example_input`` follows the batch
    convention (a tensor, a dict of keyword tensors, or ``(inputs, targets)``). A path
    without an extension gets ``.pt2`` / ``.pt`` / ``.onnx``.

    The file is written atomically and verified: it is reloaded and its output on the
    example input compared with the model's (``rtol = atol = 1e-4`` for float32); a
    mismatch raises :class:`TensorscopeError` and leaves no file. Returns the path written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects an nn.Module; got {type(model).__name__}")
    fmt = _FORMATS.get(str(format).lower().replace("-", "_"))
    if fmt is None:
        raise TensorscopeError(f"unknown export format {format!r}; choose 'exported_program', 'torchscript' or 'onnx'")
    path = os.fspath(path)
    if not os.path.splitext(os.path.basename(path))[1]:
        path += _SUFFIX[fmt]
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; export needs a file path")
    args, kwargs = _split(example_input)
    if fmt == "onnx":  # fail before any work when the extra is missing
        try:
            import onnx  # noqa: F401  (an optional extra: imported only for format='onnx')
        except ImportError:
            raise MissingExtraError("format='onnx' needs the onnx package: pip install 'tensorscope[onnx]'") from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*args, **kwargs)
        suffix = os.path.splitext(path)[1]
        with atomic_path(path, suffix=suffix) as tmp:
            if fmt == "exported_program":
                _export_program(model, args, kwargs, tmp, dynamic_batch)
                loaded = torch.export.load(tmp).module()
                with torch.no_grad():
                    got = loaded(*args, **kwargs)
                _verify(got, expected, fmt, path)
            elif fmt == "torchscript":
                _export_torchscript(model, args, kwargs, tmp)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    loaded = torch.jit.load(tmp, map_location="cpu")
                with torch.no_grad():
                    got = loaded(*args, **kwargs)
                _verify(got, expected, fmt, path)
            else:
                _export_onnx(model, args, kwargs, tmp, dynamic_batch, expected, path)
    finally:
        model.train(was_training)
    return path
