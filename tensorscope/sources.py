"""Weights on disk as a model: a ``.safetensors`` file, or a folder of shards and their index.

A language model of billions of parameters does not fit in memory, but tensorscope's
weight-only work (``inspect``, ``spectra``, ``plan_for_budget`` and ``compress``) needs one
layer at a time. :func:`open_source` reads and checks every header and the index up front
(nothing of a tensor), and gives a :class:`WeightSource`:

- :meth:`WeightSource.skeleton`: the architecture on the ``meta`` device (shapes, no
  memory), built from ``arch=`` (``"package.module:factory"``), else from the folder's
  Hugging Face ``config.json`` (transformers), else from the tensor names alone (a 2-D
  ``*.weight`` is a ``Linear``, a 4-D one a ``Conv2d``, one named like an embedding an
  ``Embedding``). Every function that takes a model works on it unchanged: names, reasons
  (embeddings, tied weights), geometries, plans, parameter counts.
- :meth:`WeightSource.layer`: one module of the skeleton with its own tensors read from
  disk (through safetensors' memory map, released when the module is dropped).

GPT-2's ``Conv1D`` stores its weight as ``in x out``: the skeleton has an ``nn.Linear`` in
its place and :meth:`layer` gives it the transposed weight (``transposed`` names them).

The layout read is Hugging Face's: ``model.safetensors.index.json`` maps each tensor to its
shard (``{"metadata": {...}, "weight_map": {"name": "model-00001-of-00003.safetensors"}}``);
a folder without an index holds exactly one ``.safetensors`` file. Bad input is refused when
the source is opened, before anything is computed or written: a missing shard, an index
naming a tensor its shard does not hold (or a shard holding tensors the index does not
name), a truncated shard or a header that lies about sizes (:mod:`.safetensors_header`),
floating-point tensors of different dtypes. The files are only ever read.

The size limit (``TENSORSCOPE_MAX_FILE_BYTES``, default 4 GiB) applies to each tensor read,
not to the files: a source is never read whole.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from . import file_limits
from ._arch import build_arch
from .errors import ArchitectureError, CheckpointError, FileTooLargeError, MissingExtraError
from .safetensors_header import _ST_DTYPES, _read_header, torch_dtype
from .views import as_linear, is_conv1d

__all__ = ["INDEX_NAME", "ON_DISK", "StoredTensors", "TensorEntry", "WeightSource", "hf_auto_class", "is_compressed_folder", "is_weights_path",
           "open_source"]

#: Hugging Face's name for the index of a sharded checkpoint
INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20
MAX_CONFIG_BYTES = 16 << 20

#: modules named like this are embeddings when the architecture is unknown (lookup tables)
_EMBEDDING_NAME = re.compile(r"(^|_)(emb|embed|embeds|embedding|embeddings|wte|wpe|shared)(_|$)|embed", re.I)
#: GPT-2 style models store these layers as transformers' Conv1D (weight ``in x out``)
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt"}
_CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
#: BatchNorm-style statistics: buffers, not parameters
_BUFFER_NAMES = {"running_mean", "running_var", "num_batches_tracked"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its shard, dtype (safetensors name) and shape."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ST_DTYPES[self.dtype][1]

    @property
    def floating(self) -> bool:
        return torch_dtype(self.dtype).is_floating_point


class StoredTensors(nn.Module):
    """A skeleton module for tensors that belong to no layer tensorscope knows (norms, ...)."""


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _read_json(path: str, limit: int, what: str) -> Any:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise CheckpointError(f"{path!r} is {size:,} bytes; {what} over {limit:,} bytes are refused")
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from None


def _check_shard_file(path: str) -> int:
    """The size of a safetensors file (any size: it is streamed), refusing other files."""
    if not os.path.exists(path):
        raise CheckpointError(f"missing shard: {path!r} does not exist")
    size = file_limits.check_file(path, sys.maxsize)
    kind = file_limits.sniff(path, size)
    if kind != "safetensors" and not path.endswith(".safetensors"):
        raise CheckpointError(
            f"{path!r} is not a safetensors file ({kind.replace('_', ' ')}); weights are streamed from "
            "safetensors files only (convert a torch.save checkpoint with safetensors.torch.save_file)")
    return size


def hf_auto_class(config: Mapping[str, Any]) -> str:
    """The transformers Auto class for a config's ``architectures`` (``"AutoModelForCausalLM"``...)."""
    names = config.get("architectures") if isinstance(config, Mapping) else None
    names = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    for n in names:
        for suffix, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                             ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                             ("ForMaskedLM", "AutoModelForMaskedLM"),
                             ("ForTokenClassification", "AutoModelForTokenClassification"),
                             ("ForImageClassification", "AutoModelForImageClassification")):
            if n.endswith(suffix):
                return auto
    return "AutoModel"


def hf_model(folder: str, config: Mapping[str, Any], device: Any = None) -> nn.Module:
    """The architecture a Hugging Face ``config.json`` names, built without weights (never
    downloads, never runs the folder's own code). ``device="meta"``: no memory at all."""
    try:
        import transformers  # an optional extra, slow to import: only for folders with a config
    except ImportError:
        raise MissingExtraError(
            f"{folder!r} has a Hugging Face config.json; building its architecture needs the transformers "
            "package: pip install 'tensorscope[transformers]' (or pass arch='package.module:factory')") from None
    auto = hf_auto_class(config)
    cls = getattr(transformers, auto, None) or transformers.AutoModel
    try:
        cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls.from_config(cfg)
    except Exception as e:
        raise ArchitectureError(f"transformers could not build {cls.__name__} from {folder!r}/config.json: "
                                f"{type(e).__name__}: {e}") from None


def is_compressed_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that ``compress(weights, plan, out=path)`` finished writing."""
    idx = os.path.join(os.fspath(path), INDEX_NAME)
    if not os.path.isfile(idx):
        return False
    try:
        meta = _read_json(idx, MAX_INDEX_BYTES, "indexes").get("metadata")
    except (CheckpointError, AttributeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("tensorscope"), dict)


def is_weights_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is weights to stream: a folder with a safetensors index or
    ``.safetensors`` files (not one that compress wrote), or a ``.safetensors`` file (not a
    tensorscope checkpoint)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_compressed_folder(path):
            return False
        return os.path.isfile(os.path.join(path, INDEX_NAME)) or any(
            n.endswith(".safetensors") for n in os.listdir(path))
    if not os.path.isfile(path):
        return False
    try:
        size = os.path.getsize(path)
        if size == 0 or file_limits.sniff(path, size) != "safetensors":
            return False
        h = _read_header(path, size, size)
    except (OSError, CheckpointError, FileTooLargeError):
        return path.endswith(".safetensors")
    return "tensorscope" not in h.metadata


class WeightSource:
    """The tensors of a model on disk, checked, read one at a time. Use :func:`open_source`."""

    def __init__(self, path: str, folder: str | None, entries: dict[str, TensorEntry], files: list[str],
                 index: dict[str, Any] | None, config: dict[str, Any] | None, max_tensor_bytes: int):
        self.path = path
        self.folder = folder
        self.entries = entries
        self.files = files
        self.index = index
        self.config = config
        self.max_tensor_bytes = max_tensor_bytes
        floating = {e.dtype for e in entries.values() if e.floating}
        self.dtype: torch.dtype | None = torch_dtype(floating.pop()) if floating else None
        self.transposed: set[str] = set()
        self.architecture = "the tensor names"
        self.arch: Any = None  # the default of skeleton(): open_source(path, arch=...)
        self.arch_kwargs: dict[str, Any] = {}
        self._skeletons: dict[str, tuple[nn.Module, set[str], str]] = {}
        self._skeleton: nn.Module | None = None

    def __repr__(self) -> str:
        return f"WeightSource({self.path!r}, {len(self.entries)} tensors in {len(self.files)} file(s))"

    # ---- what is there ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries.values())

    @property
    def metadata(self) -> dict[str, Any]:
        """The index's ``"metadata"`` (``{}`` without an index)."""
        meta = (self.index or {}).get("metadata") or {}
        return meta if isinstance(meta, dict) else {}

    def identity(self) -> list[dict[str, Any]]:
        """Each file's name, size and header hash: what a resumed run checks is unchanged."""
        out = []
        base = self.folder or os.path.dirname(self.path)
        for f in self.files:
            size = os.path.getsize(f)
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                digest = hashlib.sha256(fh.read(n)).hexdigest()
            out.append({"file": os.path.relpath(f, base), "bytes": size, "header_sha256": digest})
        return out

    # ---- reading ---------------------------------------------------------------------
    def read(self, key: str) -> torch.Tensor:
        """One tensor, through safetensors' memory map (released when the tensor is dropped)."""
        e = self.entries.get(key)
        if e is None:
            raise CheckpointError(f"{self.path!r} holds no tensor {key!r}")
        if e.nbytes > self.max_tensor_bytes:
            raise FileTooLargeError(f"tensor {key!r} of {e.file!r} is {e.nbytes:,} bytes; "
                                    f"{file_limits.limit_hint(self.max_tensor_bytes)}")
        try:
            with safe_open(e.file, framework="pt", device="cpu") as f:
                t = f.get_tensor(key)
        except Exception as ex:  # the file changed since it was checked (truncated, replaced)
            raise CheckpointError(f"cannot read tensor {key!r} from {e.file!r}: {type(ex).__name__}: {ex}") from None
        if tuple(t.shape) != e.shape or t.dtype != torch_dtype(e.dtype):
            raise CheckpointError(f"{e.file!r} changed while it was read: tensor {key!r} is now "
                                  f"{t.dtype} {tuple(t.shape)}, not {e.dtype} {list(e.shape)}")
        return t

    # ---- the architecture --------------------------------------------------------------
    def skeleton(self, arch: str | None = None, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
        """The model on the ``meta`` device (``arch``: default the one given to :func:`open_source`);
        :meth:`layer` then reads from this one."""
        if arch is None:
            arch, arch_kwargs = self.arch, self.arch_kwargs
        key = json.dumps([arch, dict(arch_kwargs or {})], sort_keys=True, default=str)
        if key not in self._skeletons:
            net, transposed, what = self._build_skeleton(arch, arch_kwargs)
            _check_keys(self, net, transposed, what)
            net.eval()
            self._skeletons[key] = (net, transposed, what)
        self._skeleton, self.transposed, self.architecture = self._skeletons[key]
        return self._skeleton

    def _build_skeleton(self, arch, arch_kwargs) -> tuple[nn.Module, set[str], str]:
        if arch is not None:
            if isinstance(arch, nn.Module):
                net, what = copy.deepcopy(arch).to("meta"), f"the architecture given ({type(arch).__name__})"
            else:
                with torch.device("meta"):
                    net = build_arch(arch, arch_kwargs)
                what = f"architecture {arch!r}"
            return self._cast(net), set(), what
        if self.config is not None and self.folder is not None:
            try:
                net = hf_model(self.folder, self.config, device="meta")
            except (MissingExtraError, ArchitectureError) as e:
                warnings.warn(f"{e}; layers are taken from the tensor names instead", stacklevel=4)
            else:
                return self._cast(net), _linear_for_conv1d(net), f"the architecture of {self.folder!r}/config.json"
        return _skeleton_from_names(self), _conv1d_by_name(self), "the tensor names"

    def _cast(self, net: nn.Module) -> nn.Module:
        return net.to(self.dtype) if self.dtype is not None else net

    def layer(self, name: str) -> nn.Module:
        """Module ``name`` of the skeleton with its own tensors read from disk (weights stay
        on disk until here, and are released with the module)."""
        skel = self._skeleton if self._skeleton is not None else self.skeleton()
        try:
            meta = skel.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{self.path!r}: the model has no module {name!r}") from None
        mod = copy.copy(meta)  # a shallow copy: the skeleton keeps its meta tensors
        mod._parameters = dict(meta._parameters)
        mod._buffers = dict(meta._buffers)
        mod._modules = {}
        for pname, p in meta.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            t = self.read(key)
            if name in self.transposed and pname == "weight":
                t = t.t().contiguous()
            mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, b in meta.named_buffers(recurse=False):
            key = f"{name}.{bname}" if name else bname
            if key in self.entries:
                mod._buffers[bname] = self.read(key)
        return mod

    def count_params(self) -> int:
        """Parameters of the model (tied ones once), from the skeleton: ``ts.count_params`` of it."""
        skel = self._skeleton if self._skeleton is not None else self.skeleton()
        return sum(p.numel() for p in skel.parameters())

    def vectors(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """(module name, class name, weight shape, parameters) of the modules whose weight is 1-D
        (norms' scales): listed by ``inspect``, left alone."""
        skel = self._skeleton if self._skeleton is not None else self.skeleton()
        out = []
        for name, mod in skel.named_modules():
            w = mod._parameters.get("weight") if name else None
            if isinstance(w, torch.Tensor) and w.dim() == 1 and f"{name}.weight" in self.entries:
                out.append((name, type(mod).__name__, tuple(w.shape),
                            sum(p.numel() for p in mod.parameters(recurse=False))))
        return out

    def loader(self) -> "LayerLoader":
        """A mapping layer name -> :meth:`layer` (each read when asked, never kept)."""
        return LayerLoader(self)


class LayerLoader(Mapping):
    """``{name: module}`` of a source's skeleton whose values are read from disk on access."""

    def __init__(self, source: WeightSource):
        self.source = source
        skel = source._skeleton if source._skeleton is not None else source.skeleton()
        self._names = [n for n, _ in skel.named_modules() if n]

    def __getitem__(self, name: str) -> nn.Module:
        return self.source.layer(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ---- opening and checking ----------------------------------------------------------------


def open_source(path: str | os.PathLike, *, arch: Any = None, arch_kwargs: Mapping[str, Any] | None = None,
                max_bytes: int | None = None) -> WeightSource:
    """Check a ``.safetensors`` file or a folder of shards (and its index) and open it.

    ``arch`` (``"package.module:factory"`` or an ``nn.Module``, with ``arch_kwargs``) names the
    architecture; default: the folder's ``config.json``, else the tensor names. A source can
    be passed wherever a path can (``ts.inspect(open_source(path, arch=...))``).

    Reads every header and the index, never a tensor. Raises :class:`CheckpointError` for a
    missing shard, an index and shards that disagree, a truncated shard, a header that lies,
    or floating-point tensors of different dtypes; :class:`FileTooLargeError` for a tensor
    over ``max_bytes`` (default ``TENSORSCOPE_MAX_FILE_BYTES`` or 4 GiB).
    """
    if isinstance(path, WeightSource):
        if arch is not None:
            path.arch, path.arch_kwargs = arch, dict(arch_kwargs or {})
        return path
    path = os.fspath(path)
    limit = file_limits.max_bytes(max_bytes)
    if sys.byteorder != "little":
        raise CheckpointError("streaming safetensors weights needs a little-endian machine")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    index = config = None
    folder = None
    if os.path.isdir(path):
        folder = os.path.abspath(path)
        cfg_path = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_path):
            config = _read_json(cfg_path, MAX_CONFIG_BYTES, "configs")
            if not isinstance(config, dict):
                raise CheckpointError(f"{cfg_path!r} is JSON {type(config).__name__}, not an object")
        idx_path = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(idx_path):
            index = _read_json(idx_path, MAX_INDEX_BYTES, "indexes")
            weight_map = _check_index(index, idx_path)
            shard_names = list(dict.fromkeys(weight_map.values()))
            files = [_shard_path(folder, n, idx_path) for n in shard_names]
        else:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not names:
                raise CheckpointError(
                    f"{path!r} holds no .safetensors weights (and no {INDEX_NAME}); weights are streamed "
                    "from safetensors files only")
            if len(names) > 1:
                raise CheckpointError(
                    f"{path!r} holds {len(names)} .safetensors files but no {INDEX_NAME} saying which tensor "
                    f"is in which: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
            files = [os.path.join(folder, names[0])]
            weight_map = None
    else:
        files = [os.path.abspath(path)]
        weight_map = None
    headers = {}
    for f in files:
        size = _check_shard_file(f)
        headers[f] = _read_header(f, size, size)
    entries: dict[str, TensorEntry] = {}
    if weight_map is not None:
        by_name = {n: p for n, p in zip(shard_names, files)}
        for key, shard in weight_map.items():
            h = headers[by_name[shard]]
            if key not in h.tensors:
                raise CheckpointError(
                    f"{INDEX_NAME} in {folder!r} says tensor {key!r} is in {shard!r}, which does not hold it "
                    "(a stale index, or a shard from another checkpoint)")
            dtype, shape, _, _ = h.tensors[key]
            entries[key] = TensorEntry(key, by_name[shard], dtype, shape)
        for f, h in headers.items():
            extra = [k for k in h.tensors if k not in entries or entries[k].file != f]
            if extra:
                raise CheckpointError(
                    f"{f!r} holds tensor(s) {', '.join(map(repr, extra[:3]))} that {INDEX_NAME} does not place "
                    "in it (a shard from another checkpoint?)")
    else:
        for f, h in headers.items():
            for key, (dtype, shape, begin, _) in sorted(h.tensors.items(), key=lambda kv: kv[1][2]):
                entries[key] = TensorEntry(key, f, dtype, shape)
    if not entries:
        raise CheckpointError(f"{path!r} holds no tensors")
    floating: dict[str, list[str]] = {}
    for e in entries.values():
        if e.floating:
            floating.setdefault(e.dtype, []).append(e.key)
    if len(floating) > 1:
        parts = "; ".join(f"{len(keys)} are {dt} (e.g. {keys[0]!r})" for dt, keys in
                          sorted(floating.items(), key=lambda kv: -len(kv[1])))
        raise CheckpointError(
            f"{path!r} mixes floating-point dtypes: {parts}. Streamed weights must share one dtype; convert "
            "the checkpoint to one (e.g. all bfloat16) first")
    source = WeightSource(path, folder, entries, files, index, config, limit)
    source.arch, source.arch_kwargs = arch, dict(arch_kwargs or {})
    return source


#: what ``inspect``, ``spectra``, ``plan_for_budget`` and ``compress`` read from disk
ON_DISK = (str, os.PathLike, WeightSource)


def _check_index(index: Any, where: str) -> dict[str, str]:
    if not isinstance(index, dict):
        raise CheckpointError(f"{where!r} is JSON {type(index).__name__}, not an object")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f'{where!r} has no "weight_map" object mapping tensor names to shard files')
    for k, v in wm.items():
        if not isinstance(k, str) or not isinstance(v, str) or not v:
            raise CheckpointError(f'{where!r}: "weight_map" must map tensor names to file names; got {k!r}: {v!r}')
    meta = index.get("metadata", {})
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f'{where!r}: "metadata" must be an object')
    return wm


def _shard_path(folder: str, name: str, where: str) -> str:
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm.startswith("..") or norm in (".", ""):
        raise CheckpointError(f"{where!r} names shard {name!r}, which is not a file inside {folder!r}")
    p = os.path.join(folder, norm)
    if not os.path.isfile(p):
        raise CheckpointError(f"missing shard: {where!r} names {name!r}, which is not in {folder!r}")
    return p


# ---- skeletons ----------------------------------------------------------------------------


def _linear_for_conv1d(net: nn.Module) -> set[str]:
    """Replace transformers' Conv1D (weight ``in x out``) by ``nn.Linear`` on meta; their names."""
    names = set()
    for name, mod in list(net.named_modules()):
        if is_conv1d(mod):
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, as_linear(mod, device="meta"))
            names.add(name)
    return names


def linear_for_conv1d(net: nn.Module, names: set[str] | list[str]) -> None:
    """Replace the named transformers Conv1D modules of a real (CPU) model by ``nn.Linear``
    computing the same (weight transposed): what a folder written from a stream expects."""
    for name in names:
        mod = net.get_submodule(name)
        if not is_conv1d(mod):
            raise CheckpointError(f"module {name!r} is a {type(mod).__name__}, not the Conv1D the folder records")
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, as_linear(mod))


def _conv1d_by_name(source: WeightSource) -> set[str]:
    if not (source.config and source.config.get("model_type") in _CONV1D_MODEL_TYPES):
        return set()
    return {k[: -len(".weight")] for k, e in source.entries.items()
            if k.endswith(".weight") and len(e.shape) == 2 and k[: -len(".weight")].rpartition(".")[2] in _CONV1D_NAMES}


def _skeleton_from_names(source: WeightSource) -> nn.Module:
    """A module tree from the tensor names: Linear for 2-D ``*.weight``, Conv2d for 4-D, Embedding
    for 2-D weights named like one, :class:`StoredTensors` holding anything else."""
    transposed = _conv1d_by_name(source)
    groups: dict[str, dict[str, TensorEntry]] = {}
    for key, e in source.entries.items():
        mod, _, leaf = key.rpartition(".")
        groups.setdefault(mod, {})[leaf] = e
    root = StoredTensors()
    for mod_name in sorted(groups, key=lambda n: (_natural_key(n))):
        tensors = groups[mod_name]
        module = _module_for(mod_name, tensors, mod_name in transposed)
        if not mod_name:
            for leaf, t in module.named_parameters(recurse=False):
                root.register_parameter(leaf, t)
            for leaf, t in module.named_buffers(recurse=False):
                root.register_buffer(leaf, t)
            continue
        parent = root
        parts = mod_name.split(".")
        for p in parts[:-1]:
            if p not in parent._modules:
                parent.add_module(p, StoredTensors())
            parent = parent._modules[p]
        if parts[-1] in parent._modules:  # created earlier as a parent: keep its children
            for child_name, child in parent._modules[parts[-1]].named_children():
                module.add_module(child_name, child)
        parent.add_module(parts[-1], module)
    return root


def _module_for(name: str, tensors: dict[str, TensorEntry], transposed: bool) -> nn.Module:
    w = tensors.get("weight")
    b = tensors.get("bias")
    leaf = name.rpartition(".")[2]
    others = set(tensors) - {"weight", "bias"}
    if w is not None and w.floating and not others:
        dtype = torch_dtype(w.dtype)
        if len(w.shape) == 2 and b is None and _EMBEDDING_NAME.search(leaf):
            return nn.Embedding(w.shape[0], w.shape[1], device="meta", dtype=dtype)
        if len(w.shape) == 2:
            out, inp = (w.shape[1], w.shape[0]) if transposed else w.shape
            if b is None or b.shape == (out,):
                return nn.Linear(inp, out, bias=b is not None, device="meta", dtype=dtype)
        if len(w.shape) == 4 and (b is None or b.shape == (w.shape[0],)):
            return nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=b is not None, device="meta",
                             dtype=dtype)
    m = StoredTensors()
    for leaf_name, e in tensors.items():
        t = torch.empty(e.shape, dtype=torch_dtype(e.dtype), device="meta")
        if leaf_name in _BUFFER_NAMES or not e.floating:
            m.register_buffer(leaf_name, t)
        else:
            m.register_parameter(leaf_name, nn.Parameter(t, requires_grad=False))
    return m


def _check_keys(source: WeightSource, net: nn.Module, transposed: set[str], what: str) -> None:
    """The source's tensors must be the skeleton's state dict (tied copies may be left out)."""
    expected = net.state_dict(keep_vars=True)
    unexpected = [k for k in source.entries if k not in expected]
    wrong = []
    for k, e in source.entries.items():
        if k in expected:
            shape = tuple(expected[k].shape)
            mod = k.rpartition(".")[0]
            if mod in transposed and k.endswith(".weight"):
                shape = shape[::-1]
            if shape != e.shape:
                wrong.append(f"{k}: file {list(e.shape)} vs model {list(shape)}")
    present = {id(expected[k]) for k in source.entries if k in expected}
    params = {id(p) for p in net.parameters()}
    missing = [k for k, t in expected.items()
               if k not in source.entries and id(t) in params and id(t) not in present]
    problems = []
    for label, keys in (("unexpected tensors", unexpected), ("missing tensors", missing), ("wrong shapes", wrong)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:4])}{f' (and {len(keys) - 4} more)' if len(keys) > 4 else ''}")
    if problems:
        raise CheckpointError(f"the weights in {source.path!r} do not match {what}: " + "; ".join(problems))
