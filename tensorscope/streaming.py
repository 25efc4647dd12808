"""Compress a model on disk into a folder of shards, one layer in memory at a time, resumably.

``compress_source(path, plan, out=folder)`` (what ``ts.compress(path, plan, out=folder)``
runs) reads the weights through :mod:`tensorscope.sources`, factorizes each planned layer
with its method (the same ``factorize`` and ``build`` as in memory, so the same factors),
copies every other tensor through, and writes::

    out/
      tensorscope-run.json            the run: plan, source files (sizes, header hashes),
                                      options; written first, checked by every resumed run
      model-<16 hex>.safetensors      shards; each names its run and work items in its header
      config.json, tokenizer files    copied from the source folder
      plan.json                       the plan (ts.Plan.load)
      model.safetensors.index.json    written last: {"metadata": {"total_size": ..,
                                      "tensorscope": {format, plan, arch, transposed,
                                      extra_state, checksums, params}}, "weight_map": {..}}

The weights are the compressed model's state dict (each factorized layer's entries under
its name, as ``ts.save`` writes them); :func:`tensorscope.load` on the folder rebuilds it.

**Work items and processes.** Every source tensor belongs to one item: a planned layer
(weight and bias, factorized) or a tensor copied through. Items go to processes by
balanced bin-packing of their predicted cost (an SVD of ``m x n`` costs about
``m n min(m, n)``; a copy its bytes) with :mod:`tensorscope.distributed`; each process
groups its items in source order into shards of at most ``shard_bytes``. One process and
no launcher is the same code with a group of one.

**Resuming.** A shard is written under a temporary name (``.model-*.partial``) with its
header first (offsets known from the method's skeleton, so tensors stream in as they are
made) and renamed into place when complete: a shard's existence under its final name is its
completion marker, a half-written one is never taken for whole. A rerun of the same command
checks the run record (same plan, same source files, same options, else an error before
anything is written), deletes partial files, reads which items the complete shards hold, and
does only the others (bin-packed again over the processes it has). The index, written last
by process 0 once every item is in a shard, marks the folder complete; rerunning then does
nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from . import distributed
from .calibration import LayerStats
from ._cache import factor_cache
from ._io import atomic_write_bytes
from ._version import __version__
from .errors import CheckpointError, DecompositionError, PlanError, TensorscopeError
from .methods.base import BreakEvenWarning, check_finite, warn_if_past_break_even
from .plan import Plan, ResolvedLayer, as_plan
from .progress import Progress
from .safetensors_header import _read_header, st_dtype, torch_dtype
from .sources import INDEX_NAME, WeightSource, open_source
from .views import hooked, linear_view

__all__ = ["FOLDER_FORMAT", "RUN_NAME", "ShardWriter", "compress_source", "folder_record"]

#: the compressed folder's format (the "format" of the index's tensorscope record)
FOLDER_FORMAT = 1
RUN_NAME = "tensorscope-run.json"
PLAN_NAME = "plan.json"
DEFAULT_SHARD_BYTES = 1 << 30
_SHARD_RE = re.compile(r"^model-[0-9a-f]{16}\.safetensors$")
_PARTIAL_RE = re.compile(r"^\.model-[0-9a-f]{16}\.safetensors\.partial")
#: files of a Hugging Face folder worth carrying to the compressed one (small, not weights)
_COPIED_FILES = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
                           r"vocab\.(json|txt)|merges\.txt|added_tokens\.json|chat_template\.(jinja|json))$")
_MAX_COPIED_BYTES = 64 << 20
#: bytes of header left for metadata known only once a shard's layers are built
_HEADER_RESERVE = 64 << 10
#: relative cost of moving one byte, against one unit of ``m n min(m, n)``
_IO_COST = 64.0


# ---- writing one shard ----------------------------------------------------------------------


class ShardWriter:
    """Write one safetensors file whose tensors are known (name, dtype, shape) in advance,
    one tensor at a time, under a temporary name renamed into place by :meth:`close`.

    The header is written first with room to spare, so metadata known only at the end
    (``close(metadata=...)``) still fits; tensors must come in the declared order.
    """

    def __init__(self, path: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, reserve: int = _HEADER_RESERVE):
        self.path = path
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
        self.tensors = list(tensors)
        self.layout: dict[str, Any] = {}
        pos = 0
        for key, dtype, shape in self.tensors:
            n = 1
            for s in shape:
                n *= s
            nbytes = n * dtype.itemsize
            self.layout[key] = {"dtype": st_dtype(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        self.data_bytes = pos
        self.header_len = _padded(len(self._header(metadata)) + reserve)
        self._next = 0
        self._file = open(self.tmp, "wb")
        try:
            self._file.write(self.header_len.to_bytes(8, "little"))
            self._file.write(self._header(metadata).ljust(self.header_len, b" "))
        except BaseException:
            self.abort()
            raise

    def _header(self, metadata: Mapping[str, str] | None) -> bytes:
        doc = dict(self.layout)
        if metadata:
            doc = {"__metadata__": dict(metadata), **doc}
        return json.dumps(doc, separators=(",", ":")).encode()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.tensors) or self.tensors[self._next][0] != key:
            want = self.tensors[self._next][0] if self._next < len(self.tensors) else "nothing more"
            raise CheckpointError(f"{self.path!r}: tensor {key!r} written out of order (expected {want!r})")
        _, dtype, shape = self.tensors[self._next]
        t = tensor.detach()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path!r}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, but its shard was "
                                  f"laid out for {dtype} {tuple(shape)} (a method whose skeleton differs from what "
                                  "it builds)")
        t = t.to("cpu").contiguous()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self, metadata: Mapping[str, str] | None = None) -> None:
        """Finish the header with ``metadata``, sync, and rename the file into place."""
        if self._next != len(self.tensors):
            raise CheckpointError(f"{self.path!r}: closed after {self._next} of {len(self.tensors)} tensors")
        try:
            head = self._header(metadata)
            if len(head) <= self.header_len:
                self._file.seek(8)
                self._file.write(head.ljust(self.header_len, b" "))
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            else:  # more metadata than the room left: write the file again with a larger header
                self._file.close()
                self._rewrite(head)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        with contextlib.suppress(OSError):  # the rename itself durable (POSIX)
            fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _rewrite(self, head: bytes) -> None:
        n = _padded(len(head))
        again = self.tmp + "-2"
        with open(self.tmp, "rb") as src, open(again, "wb") as dst:
            dst.write(n.to_bytes(8, "little"))
            dst.write(head.ljust(n, b" "))
            src.seek(8 + self.header_len)
            shutil.copyfileobj(src, dst, 16 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(again, self.tmp)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)
        with contextlib.suppress(OSError):
            os.remove(self.tmp + "-2")


def _padded(n: int) -> int:
    return (n + 7) // 8 * 8


# ---- the work ------------------------------------------------------------------------------


@dataclass
class _Item:
    """One piece of work: a planned layer (factorized) or one tensor (copied through)."""

    id: str
    order: int
    inputs: list[str]
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    cost: float
    resolved: ResolvedLayer | None = None

    @property
    def out_bytes(self) -> int:
        total = 0
        for _, dtype, shape in self.outputs:
            n = 1
            for s in shape:
                n *= s
            total += n * dtype.itemsize
        return total


@dataclass
class _Run:
    source: WeightSource
    plan: Plan
    resolved: list[ResolvedLayer]
    items: list[_Item]
    record: dict[str, Any]
    run_id: str
    out: str
    shard_bytes: int
    transposed: list[str] = field(default_factory=list)
    device: torch.device = torch.device("cpu")


def _plain_forward(module: nn.Module) -> bool:
    """Whether the layer computes what its class declares (no forward override, no hooks; an
    ``nn.Conv1d``'s view: the layer's own)."""
    module = hooked(module)
    base = next(c for c in (nn.Linear, nn.Conv1d, nn.Conv2d) if isinstance(module, c))
    return (type(module).forward is base.forward and not module._forward_hooks
            and not module._forward_pre_hooks)


def _skeleton_outputs(r: ResolvedLayer) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The state-dict entries (name, dtype, shape) ``r``'s method builds, without factorizing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BreakEvenWarning)
        built = r.method.skeleton(r.module, r.rank, r.options)  # r.module is on meta: no memory
    return [(f"{r.name}.{k}", v.dtype, tuple(v.shape)) for k, v in built.state_dict().items()
            if isinstance(v, torch.Tensor)]


def _items(source: WeightSource, resolved: list[ResolvedLayer]) -> list[_Item]:
    order = {k: i for i, k in enumerate(source.entries)}
    items: list[_Item] = []
    consumed: set[str] = set()
    for r in resolved:
        keys = [f"{r.name}.{n}" for n, _ in list(r.module.named_parameters(recurse=False))
                + list(r.module.named_buffers(recurse=False)) if f"{r.name}.{n}" in source.entries]
        if f"{r.name}.weight" not in keys:
            raise PlanError(f"layer {r.name!r}: {source.path!r} holds no tensor {r.name + '.weight'!r} "
                            "(a tied weight stored under another name cannot be decomposed)")
        g = r.geometry
        rows, cols = g.out_features // g.groups, g.in_features // g.groups * g.khw
        io = sum(source.entries[k].nbytes for k in keys)
        items.append(_Item(f"layer:{r.name}", min(order[k] for k in keys), keys, _skeleton_outputs(r),
                           g.groups * distributed.svd_cost(rows, cols) + _IO_COST * io, r))
        consumed.update(keys)
    for key, e in source.entries.items():
        if key not in consumed:
            items.append(_Item(f"tensor:{key}", order[key], [key], [(key, torch_dtype(e.dtype), e.shape)],
                               _IO_COST * e.nbytes))
    items.sort(key=lambda it: it.order)
    return items


def _stats_token(stats: Mapping[str, Any] | None, names: list[str]) -> str | None:
    if stats is None:
        return None
    h = hashlib.sha256()
    for n in names:
        s = stats.get(n)
        h.update(f"{n}={s.token if s is not None else None};".encode())
    return h.hexdigest()


def _prepare(path: Any, plan: Any, out: Any, *, stats, refine, arch, arch_kwargs, shard_bytes) -> _Run:
    """Everything checked, nothing written: the source, the plan, the output folder."""
    source = open_source(path, arch=arch, arch_kwargs=arch_kwargs)
    arch, arch_kwargs = source.arch, source.arch_kwargs
    skel = source.skeleton()
    plan = as_plan(plan)
    resolved = plan.validate(skel)
    for r in resolved:
        why = r.method.factorize_refusal(r.geometry, r.options)
        if why:
            raise PlanError(f"layer {r.name!r}: {why}")
        if not _plain_forward(r.module):
            raise PlanError(f"layer {r.name!r}: its class {type(hooked(r.module)).__name__} overrides forward (or has hooks); "
                            "check it in memory: ts.compress(model, plan) probes what such a layer computes")
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(f"stats= must map layer names to LayerStats (ts.collect_stats); got {type(stats).__name__}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise TypeError(f"shard_bytes must be a positive number of bytes; got {shard_bytes!r}")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"out={out!r} is a file; compressing a model on disk writes a folder of shards")
    for f in source.files + ([source.folder] if source.folder else []):
        if os.path.abspath(f) == out or os.path.commonpath([os.path.abspath(f), out]) == out:
            raise CheckpointError(f"out={out!r} holds the weights being read ({f!r}); write to another folder "
                                  "(the input files are never modified)")
    items = _items(source, resolved)
    transposed = sorted(r.name for r in resolved if r.name in source.transposed)
    if arch is not None and not isinstance(arch, str):
        arch_rec = None
    else:
        arch_rec = {"ref": arch, "kwargs": dict(arch_kwargs or {})} if arch else None
    run = {
        "tensorscope_run": FOLDER_FORMAT,
        "tensorscope_version": __version__,
        "plan": plan.to_dict(),
        "source": {"path": os.path.abspath(source.path), "files": source.identity()},
        "arch": arch_rec,
        "architecture": source.architecture,
        "refine": bool(refine),
        "stats": _stats_token(stats, [r.name for r in resolved]),
        "transposed": transposed,
    }
    run_id = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    run["run"] = run_id
    return _Run(source, plan, resolved, items, run, run_id, out, shard_bytes, transposed)


def _check_out(run: _Run) -> str:
    """"new", "resume" or "done"; an error for a folder holding anything else."""
    out = run.out
    if not os.path.isdir(out) or not os.listdir(out):
        return "new"
    run_path = os.path.join(out, RUN_NAME)
    if not os.path.isfile(run_path):
        raise CheckpointError(f"out={out!r} exists and is not empty, and holds no tensorscope run ({RUN_NAME}); "
                              "choose a new folder (nothing was written)")
    try:
        with open(run_path, "rb") as f:
            old = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {run_path!r}: {e}; remove the folder to start over") from None
    if not isinstance(old, dict) or old.get("run") != run.run_id:
        diff = [k for k in ("plan", "source", "arch", "refine", "stats", "tensorscope_version")
                if not isinstance(old, dict) or old.get(k) != run.record.get(k)]
        raise CheckpointError(
            f"out={out!r} holds a run of a different compression (it differs in: {', '.join(diff) or 'its record'}); "
            "resuming it would mix two models. Rerun with the same plan, weights and options, or choose a new folder")
    if os.path.isfile(os.path.join(out, INDEX_NAME)):
        return "done"
    return "resume"


def _read_shard(path: str, run_id: str) -> list[str] | None:
    """The item ids of a complete shard of this run (None: not one)."""
    try:
        size = os.path.getsize(path)
        h = _read_header(path, size, size)
        meta = json.loads(h.metadata.get("tensorscope_shard", "null"))
    except (OSError, TensorscopeError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("run") != run_id or not isinstance(meta.get("items"), list):
        return None
    return [str(i) for i in meta["items"]]


def _scan(run: _Run) -> dict[str, str]:
    """item id -> shard file name, over the complete shards of this run in ``out``."""
    done: dict[str, str] = {}
    ids = {it.id for it in run.items}
    for name in sorted(os.listdir(run.out)):
        if not _SHARD_RE.match(name):
            continue
        got = _read_shard(os.path.join(run.out, name), run.run_id)
        if got is None or not set(got) <= ids:
            continue
        for i in got:
            done.setdefault(i, name)
    return done


def _cleanup(run: _Run) -> None:
    """Remove half-written files and shards that are not complete shards of this run."""
    for name in os.listdir(run.out):
        p = os.path.join(run.out, name)
        if _PARTIAL_RE.match(name) or (_SHARD_RE.match(name) and _read_shard(p, run.run_id) is None):
            with contextlib.suppress(OSError):
                os.remove(p)


def _shards_of(items: list[_Item], run: _Run) -> list[tuple[str, list[_Item]]]:
    groups: list[list[_Item]] = []
    size = 0
    for it in items:
        if not groups or size + it.out_bytes > run.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.out_bytes
    named = []
    for g in groups:
        digest = hashlib.sha256((run.run_id + "\n" + "\n".join(it.id for it in g)).encode()).hexdigest()[:16]
        named.append((f"model-{digest}.safetensors", g))
    return named


def _checksums(prefix: str, built: nn.Module) -> dict[str, str]:
    out = {}
    for sub, mod in built.named_modules():
        fn = getattr(mod, "tensorscope_checksum", None)
        if callable(fn):
            value = fn()
            if value is not None:
                out[f"{prefix}.{sub}" if sub else prefix] = str(value)
    return out


def _do_item(run: _Run, it: _Item, writer: ShardWriter, stats, refine: bool, extra: dict, sums: dict) -> None:
    source = run.source
    r = it.resolved
    if r is None:
        key = it.inputs[0]
        writer.write(key, source.read(key))
        return
    layer = linear_view(source.layer(r.name))  # an nn.Conv1d: its Conv2d view, as the plan resolved it
    check_finite(layer, r.name)
    layer_stats = stats.get(r.name) if stats is not None else None
    if run.device.type != "cpu":  # one process per GPU: factorize there (the shard is written from CPU)
        layer = layer.to(run.device)
        if layer_stats is not None:
            layer_stats = LayerStats(layer_stats.kind, layer_stats.patch.to(run.device), layer_stats.count,
                                     layer_stats.kernel, layer_stats.ridge)
    try:
        factors = r.method.factorize(layer, r.rank, r.options, stats=layer_stats, refine=refine)
        built = r.method.build(layer, factors)
    except TensorscopeError as e:
        raise type(e)(f"layer {r.name!r}: {e}") from e
    except (RuntimeError, ValueError, torch.linalg.LinAlgError) as e:
        raise DecompositionError(f"layer {r.name!r}: {r.method.name} at rank {r.rank} failed: "
                                 f"{type(e).__name__}: {e}") from e
    finally:
        if layer_stats is not None:  # its whitened SVD is memoised on it: one layer's, not all
            layer_stats._memo.clear()
    del factors, layer
    for k, v in built.state_dict().items():
        key = f"{r.name}.{k}"
        if isinstance(v, torch.Tensor):
            writer.write(key, v)
        elif k.endswith("_extra_state"):
            json.dumps(v)  # must be JSON, as ts.save requires
            extra[key] = v
        else:
            raise TypeError(f"state dict entry {key!r} is a {type(v).__name__}, not a tensor")
    sums.update(_checksums(r.name, built))


def _write_shard(run: _Run, name: str, items: list[_Item], stats, refine: bool, bar: Progress) -> None:
    outputs = [o for it in items for o in it.outputs]
    meta = {"run": run.run_id, "items": [it.id for it in items]}
    writer = ShardWriter(os.path.join(run.out, name), outputs, {"tensorscope_shard": json.dumps(meta)})
    extra: dict[str, Any] = {}
    sums: dict[str, str] = {}
    try:
        for it in items:
            bar.set_message(it.id.partition(":")[2])
            _do_item(run, it, writer, stats, refine, extra, sums)
            bar.update(1)
        meta.update({"extra_state": extra, "checksums": sums})
        writer.close({"tensorscope_shard": json.dumps(meta)})
    except BaseException:
        writer.abort()
        raise


def _finish(run: _Run, ctx: distributed.Context) -> None:
    """Process 0, once every item is in a shard: the side files, the plan, then the index."""
    out = run.out
    weight_map: dict[str, str] = {}
    extra: dict[str, Any] = {}
    sums: dict[str, str] = {}
    total = 0
    done = set()
    for name in sorted(os.listdir(out)):
        if not _SHARD_RE.match(name):
            continue
        p = os.path.join(out, name)
        items = _read_shard(p, run.run_id)
        if items is None or not set(items).isdisjoint(done):
            continue
        done.update(items)
        size = os.path.getsize(p)
        h = _read_header(p, size, size)
        meta = json.loads(h.metadata["tensorscope_shard"])
        for key, (_, _, begin, end) in h.tensors.items():
            weight_map[key] = name
            total += end - begin
        extra.update(meta.get("extra_state") or {})
        sums.update(meta.get("checksums") or {})
    missing = [it.id for it in run.items if it.id not in done]
    if missing:
        raise CheckpointError(f"{out!r}: {len(missing)} work item(s) are in no complete shard (e.g. {missing[0]!r}); "
                              "rerun to finish them")
    if run.source.folder:
        for name in sorted(os.listdir(run.source.folder)):
            src = os.path.join(run.source.folder, name)
            if _COPIED_FILES.match(name) and os.path.isfile(src) and os.path.getsize(src) <= _MAX_COPIED_BYTES:
                with open(src, "rb") as f:
                    atomic_write_bytes(os.path.join(out, name), f.read())
    run.plan.save(os.path.join(out, PLAN_NAME))
    params_before = run.source.count_params()
    params_after = params_before + sum(
        r.method.count_params(r.geometry, r.rank, r.options) - r.geometry.dense_params for r in run.resolved)
    record = folder_record(run, extra, sums, params_before, params_after)
    index = {"metadata": {"total_size": total, "tensorscope": record}, "weight_map": weight_map}
    atomic_write_bytes(os.path.join(out, INDEX_NAME), (json.dumps(index, indent=2) + "\n").encode())


def folder_record(run: _Run, extra: dict, sums: dict, before: int, after: int) -> dict[str, Any]:
    return {
        "format": FOLDER_FORMAT,
        "tensorscope_version": __version__,
        "torch_version": torch.__version__,
        "run": run.run_id,
        "plan": run.plan.to_dict(),
        "arch": run.record["arch"],
        "architecture": run.record["architecture"],
        "transposed": run.transposed,
        "dtype": str(run.source.dtype).replace("torch.", "") if run.source.dtype is not None else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra_state": extra,
        "checksums": sums,
        "params": {"before": before, "after": after},
        "source": run.record["source"]["path"],
    }


def compress_source(
    path: Any,
    plan: Any,
    *,
    out: Any,
    stats: Mapping[str, Any] | None = None,
    refine: bool = True,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: Any = None,
    progress: Any = False,
) -> str:
    """Compress the model stored at ``path`` (a ``.safetensors`` file or a sharded folder) into
    the folder ``out``, a layer at a time; returns ``out``. See the module docstring.

    ``stats``: calibration statistics by layer name (:func:`tensorscope.collect_stats`, or
    :func:`tensorscope.distributed.collect_stats` under torchrun) for data-aware factors.
    ``arch``: ``"package.module:factory"`` building the architecture (on the meta device),
    recorded for :func:`tensorscope.load`; default: the folder's ``config.json``, else the
    tensor names. Under ``torchrun`` the items are shared among the processes. ``device``:
    where layers are factorized (default: the process's GPU under NCCL, else the CPU).

    Raises, before anything is written: the errors of :func:`tensorscope.sources.open_source`
    (bad shards or index), :class:`PlanError`/:class:`RankError` (the plan does not fit the
    weights), :class:`CheckpointError` (``out`` holds something else, or a run of another
    plan). A failing process makes every process raise :class:`DistributedError` naming it.
    """
    ctx = distributed.context()
    error = None
    try:
        run = _prepare(path, plan, out, stats=stats, refine=refine, arch=arch, arch_kwargs=arch_kwargs,
                       shard_bytes=shard_bytes)
        state = _check_out(run)
        run.device = torch.device(device) if device is not None else ctx.device
    except Exception as e:
        if not ctx.distributed:
            raise
        error = f"{type(e).__name__}: {e}"
    ctx.agree(error, "checking the weights, the plan and the output folder (nothing was written)")
    if state == "done":
        return run.out
    if ctx.is_main:
        for r in run.resolved:
            warn_if_past_break_even(r.method, r.geometry, r.rank, r.options, name=r.name)
    # nothing has been written so far; from here on, only inside ``out``
    error, done = None, {}
    if ctx.is_main:  # one process reads the folder: the others may already be writing when it would
        try:
            os.makedirs(run.out, exist_ok=True)
            run_path = os.path.join(run.out, RUN_NAME)
            if not os.path.isfile(run_path):
                atomic_write_bytes(run_path, (json.dumps(run.record, indent=2) + "\n").encode())
            _cleanup(run)
            done = _scan(run)
        except OSError as e:
            error = f"cannot write to {run.out!r}: {e}"
    statuses = ctx.gather((error, sorted(done)), f"preparing {run.out!r}")
    ctx.agree(statuses[0][0], f"preparing {run.out!r}")
    done = set(statuses[0][1])
    todo = [it for it in run.items if it.id not in done]
    owner = distributed.bin_pack([it.cost for it in todo], ctx.world)
    mine = [it for it, o in zip(todo, owner) if o == ctx.rank]
    error = None
    where = f" (process {ctx.rank} of {ctx.world})" if ctx.distributed else ""
    bar = Progress(progress if ctx.is_main else False, total=len(mine), desc=f"compressing{where}")
    try:
        with factor_cache.limited(0), warnings.catch_warnings():
            warnings.simplefilter("ignore", BreakEvenWarning)  # warned once above, by process 0
            for name, items in _shards_of(mine, run):
                _write_shard(run, name, items, stats, refine, bar)
    except Exception as e:
        if not ctx.distributed:
            raise
        error = f"{type(e).__name__}: {e}"
    finally:
        bar.close()
    ctx.agree(error, f"compressing {run.source.path!r} into {run.out!r} (rerun the same command to resume)")
    error = None
    if ctx.is_main:
        try:
            _finish(run, ctx)
        except Exception as e:
            if not ctx.distributed:
                raise
            error = f"{type(e).__name__}: {e}"
    ctx.agree(error, f"writing the index of {run.out!r}")
    return run.out
