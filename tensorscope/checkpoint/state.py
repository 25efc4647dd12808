"""Loading a state dict into a network: a mismatch is an error that names it, never garbage.

Missing, unexpected, wrong-shape, wrong-kind-of-dtype and non-dense tensors are named in one
:class:`~tensorscope.errors.CheckpointError`; tensors holding NaN or Inf load with a
:class:`NonFiniteWarning`. Used for tensorscope checkpoints (:mod:`.format`) and users'
weights (:mod:`.user_models`) alike.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = ["NonFiniteWarning"]


class NonFiniteWarning(UserWarning):
    """A loaded tensor holds NaN or Inf (loaded anyway: it is the user's model)."""


def _fmt_keys(keys: list, n: int = 5) -> str:
    shown = ", ".join(map(str, keys[:n]))
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _load_state(
    net: nn.Module, sd: dict[str, Any], path: str, source: str, *, strict: bool = True
) -> None:
    """Load ``sd`` into ``net``, naming missing, unexpected and wrong-shape keys."""
    expected = net.state_dict(keep_vars=True)
    if not any(k in expected for k in sd) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel / DDP
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if k in expected and isinstance(sd[k], Tensor) and isinstance(expected[k], Tensor)
        and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    # torch's load_state_dict would cast these silently (int -> float, complex -> real drops
    # the imaginary part) or fail deep inside (sparse, meta): garbage weights, not an error
    not_dense = [f"{k}: {v.layout} on {v.device}" for k, v in sd.items()
                 if isinstance(v, Tensor) and (v.layout != torch.strided or v.device.type == "meta")]
    wrong_dtype = [
        f"{k}: file {sd[k].dtype} vs model {expected[k].dtype}"
        for k in sd
        if k in expected and isinstance(sd[k], Tensor) and isinstance(expected[k], Tensor)
        and _dtype_kind(sd[k]) != _dtype_kind(expected[k])
    ]
    problems = []
    if missing and strict:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_fmt_keys(wrong)}")
    if not_dense:
        problems.append(f"not dense tensors: {_fmt_keys(not_dense)}")
    if wrong_dtype:
        problems.append(f"wrong dtypes: {_fmt_keys(wrong_dtype)}")
    if problems:
        raise CheckpointError(
            f"the checkpoint {path!r} does not match {source}: " + "; ".join(problems)
            + ". Check that the architecture (and its arguments) is the one the weights were saved from."
        )
    if not strict and (missing or unexpected):
        warnings.warn(
            f"loading {path!r} into {source} with strict=False: "
            + "; ".join(
                s for s in (
                    f"missing keys: {_fmt_keys(missing)}" if missing else "",
                    f"unexpected keys: {_fmt_keys(unexpected)}" if unexpected else "",
                ) if s
            ),
            stacklevel=3,
        )
    # keep the saved dtypes (a float16 checkpoint stays float16); .data keeps tied params tied
    for k, t in expected.items():
        v = sd.get(k)
        if isinstance(t, Tensor) and isinstance(v, Tensor) and t.dtype != v.dtype and (
            t.is_floating_point() and v.is_floating_point() or t.is_complex() and v.is_complex()
        ):
            t.data = t.data.to(v.dtype)
    try:
        net.load_state_dict(sd, strict=strict)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint {path!r} does not match {source}: {e}") from None


def _dtype_kind(t: Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer"


def _non_finite(v: Any) -> bool:
    if not (isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel()):
        return False
    if v.layout != torch.strided or v.device.type == "meta":
        return False  # refused by _load_state
    if v.dtype.itemsize == 1:  # float8 types have no isfinite kernel
        v = v.float()
    return not bool(torch.isfinite(v).all())


def _warn_non_finite(sd: Mapping[str, Any], path: str) -> None:
    bad = [k for k, v in sd.items() if _non_finite(v)]
    if bad:
        warnings.warn(
            f"{path!r}: tensor(s) {_fmt_keys(bad)} hold NaN or Inf; loaded as saved",
            NonFiniteWarning,
            stacklevel=3,
        )


def _finish(net: nn.Module, map_location: Any) -> nn.Module:
    if map_location is not None and not (isinstance(map_location, str) and map_location == "cpu"):
        if not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"map_location must be a device name or torch.device; got {type(map_location).__name__}")
        net = net.to(map_location)
    return net.eval()
