"""Users' networks: the weights files people already have, read without running their code.

:func:`load_model` reads a tensorscope checkpoint (through :mod:`.format`), a
``.safetensors`` or ``torch.save`` state dict (``weights_only=True``) with the architecture
it belongs to, a pickled whole module only with ``trust=True``, or a Hugging Face model
folder (with the ``transformers`` extra; never downloads).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .. import file_limits
from .._arch import build_arch
from ..errors import CheckpointError, FileTooLargeError, MissingExtraError, UntrustedFileError
from .format import _load_checkpoint, _read_header, _read_tensors, _record
from .state import _finish, _load_state, _warn_non_finite

__all__ = ["load_model"]


def _unsafe_globals(path: str) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))[:8]
    except Exception:
        return []


def _torch_load(path: str, kind: str, limit: int, trust: bool) -> Any:
    """torch.load, always with weights_only spelled out; pickled code only with trust=True."""
    if kind == "torch_zip":
        file_limits.check_zip(path, limit)
    try:
        # weights_only=True passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes
        # the default, so it cannot weaken this call
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            found = _unsafe_globals(path)
            names = f" (it references {', '.join(found)})" if found else ""
            raise UntrustedFileError(
                f"{path!r} holds pickled Python objects beyond tensors{names}: loading it would "
                f"execute code from the file. Pass trust=True only for a file you trust (you made "
                f"it, or its source is trustworthy), or save a state_dict instead: "
                f"torch.save(model.state_dict(), path) or tensorscope.save(model, path)."
            ) from None
        weights_only_error = e
    except Exception as e:  # corrupt zip, truncated pickle, bare EOFError ...
        raise CheckpointError(f"cannot read {path!r} as a torch.save file: {type(e).__name__}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the caller trusts the file
    except Exception as e:
        raise CheckpointError(
            f"cannot unpickle {path!r} even with trust=True: {type(e).__name__}: {e} (the classes it "
            f"pickled must be importable under the same names). Safe load error: {weights_only_error}"
        ) from None


_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net", "module")


def _state_dict_of(obj: Any, path: str) -> Any:
    """A state dict (or a whole module) from what torch.load returned."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            v = obj.get(key) if all(isinstance(k, str) for k in obj) else None
            if isinstance(v, nn.Module):
                return v
            if isinstance(v, Mapping) and v and any(isinstance(x, Tensor) for x in v.values()):
                return dict(v)
        if obj and all(isinstance(k, str) for k in obj) and any(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(
        f"{path!r} holds a {type(obj).__name__}, not a state dict (a dict of tensors, or a dict with "
        f"a 'state_dict' or 'model' entry holding one)"
    )


def _user_arch(arch: Any, arch_kwargs: Any) -> tuple[nn.Module, str]:
    if isinstance(arch, nn.Module):
        return copy.deepcopy(arch), f"the architecture given ({type(arch).__name__})"
    if isinstance(arch, str):
        return build_arch(arch, arch_kwargs), f"architecture {arch!r}"
    raise TypeError(f"arch must be 'package.module:factory' or an nn.Module; got {type(arch).__name__}")


def _dir_size(folder: str, limit: int) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
            if total > limit:
                raise FileTooLargeError(f"the folder {folder!r} holds more than {limit:,} bytes; {file_limits.limit_hint(limit)}")
    return total


def _load_hf_dir(folder: str, limit: int, trust: bool) -> nn.Module:
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(
            f"{folder!r} is a folder without config.json: not a Hugging Face model folder. Pass a "
            f"weights file (.safetensors, .pt, .pth) instead."
        )
    _dir_size(folder, limit)
    try:
        import transformers  # an optional extra, slow to import: only when a folder is given
    except ImportError:
        raise MissingExtraError(
            f"{folder!r} is a Hugging Face model folder; reading it needs the transformers package: "
            f"pip install 'tensorscope[transformers]'"
        ) from None
    try:
        if os.path.getsize(cfg_path) > 16 << 20:
            raise CheckpointError(f"{cfg_path!r} is over 16 MB; not a model config")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {cfg_path!r}: {e}") from None
    names = cfg.get("architectures") if isinstance(cfg, dict) else None
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    auto = "AutoModel"
    for n in names:
        if n.endswith("ForSequenceClassification"):
            auto = "AutoModelForSequenceClassification"
        elif n.endswith("ForCausalLM") or n.endswith("LMHeadModel"):
            auto = "AutoModelForCausalLM"
        elif n.endswith("ForMaskedLM"):
            auto = "AutoModelForMaskedLM"
        elif n.endswith("ForTokenClassification"):
            auto = "AutoModelForTokenClassification"
        elif n.endswith("ForImageClassification"):
            auto = "AutoModelForImageClassification"
        if auto != "AutoModel":
            break
    cls = getattr(transformers, auto, None) or transformers.AutoModel
    try:
        # a local folder only: never download; its own code runs only with trust=True
        return cls.from_pretrained(folder, local_files_only=True, trust_remote_code=bool(trust))
    except Exception as e:
        raise CheckpointError(f"transformers could not load {folder!r} with {cls.__name__}: {type(e).__name__}: {e}") from None


def load_model(
    weights: str | os.PathLike | None = None,
    arch: str | nn.Module | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
    map_location: Any = "cpu",
    strict: bool = True,
    max_bytes: int | None = None,
) -> nn.Module:
    """Load a user's network, in eval mode.

    ``weights`` may be:

    * a tensorscope checkpoint (read with :func:`load`);
    * a ``.safetensors`` state dict, with ``arch`` building the network;
    * a ``torch.save`` state dict (``.pt``/``.pth``; also a dict with a ``"state_dict"`` or
      ``"model"`` entry), read with ``weights_only=True``, with ``arch``;
    * a ``torch.save`` of a whole module: pickled code, read only with ``trust=True``;
    * a Hugging Face model folder (``config.json``), with the ``transformers`` extra; never
      downloads;
    * ``None``: just build ``arch`` (random initialisation).

    ``arch`` is ``"package.module:factory"`` (with ``arch_kwargs``) or an ``nn.Module``
    instance (deep-copied). ``strict=False`` tolerates missing and unexpected keys (with a
    warning); wrong shapes are always an error.
    """
    limit = file_limits.max_bytes(max_bytes)
    if weights is None:
        if arch is None:
            raise TypeError("load_model needs weights=, arch= or both")
        net, _ = _user_arch(arch, arch_kwargs)
        return _finish(net, map_location)
    path = os.fspath(weights)
    if os.path.isdir(path):
        return _finish(_load_hf_dir(path, limit, trust), map_location)
    size = file_limits.check_file(path, limit)
    kind = file_limits.sniff(path, size)
    if kind == "safetensors" or (kind == "unknown" and path.endswith(".safetensors")):
        h = _read_header(path, size, limit)
        rec = _record(h)
        if rec is not None:
            model = arch if isinstance(arch, nn.Module) else None
            ref = arch if isinstance(arch, str) else None
            return _load_checkpoint(h, rec, model=model, arch=ref, arch_kwargs=arch_kwargs,
                                    map_location=map_location, trust=trust)
        if arch is None:
            raise CheckpointError(
                f"{path!r} holds weights only (a safetensors state dict); pass the architecture "
                f"they belong to: load_model({path!r}, arch='package.module:factory')"
            )
        sd: Any = _read_tensors(h)
        net, source = _user_arch(arch, arch_kwargs)
    elif kind in ("torch_zip", "torch_pickle"):
        obj = _state_dict_of(_torch_load(path, kind, limit, trust), path)
        if isinstance(obj, nn.Module):
            return _finish(obj, map_location)
        if arch is None:
            raise CheckpointError(
                f"{path!r} holds a state dict (weights only); pass the architecture they belong to: "
                f"load_model({path!r}, arch='package.module:factory')"
            )
        sd = obj
        net, source = _user_arch(arch, arch_kwargs)
    else:
        raise CheckpointError(
            f"{path!r} is neither a safetensors file, a torch.save file nor a Hugging Face folder "
            f"(random bytes, or a truncated or corrupt file?)"
        )
    _warn_non_finite(sd, path)
    _load_state(net, sd, path, source, strict=strict)
    return _finish(net, map_location)
