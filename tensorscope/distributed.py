"""Work spread over processes and machines with ``torch.distributed`` (nothing home-made).

Launch any tensorscope program with ``torchrun`` (``torchrun --nproc-per-node 2 -m
tensorscope compress ...``): :func:`context` joins the process group torchrun describes in
the environment (``gloo`` on CPU, ``NCCL`` on GPU, one process per GPU), or, without a
launcher, is a group of one: the same code path runs either way.

- :func:`collect_stats`: each process accumulates the input Gram matrices of its share of
  the calibration batches (batch ``i`` goes to process ``i mod N``), then one all-reduce
  per layer sums them: every process holds the statistics of all the data, equal to one
  process's up to the order of float64 additions.
- :func:`bin_pack`: which process does which piece of work, by balanced bin-packing of the
  predicted costs (largest first, to the least loaded process); every process computes the
  same answer, so no message is needed.
- :meth:`Context.agree`: every process reports success or its error; a failure anywhere
  becomes one error on every process naming the process and what failed, instead of the
  others waiting forever. A process that dies outright (killed, out of memory) breaks the
  group's connections: the others fail with a message saying so, and torchrun's summary
  names the process and its exit code.

Control messages (status, barriers) go over a ``gloo`` group even when the data goes over
NCCL, so they never occupy a GPU stream.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .calibration import DEFAULT_RIDGE, LayerStats, _Accumulator, collect_stats as _collect_stats
from .data import iter_batches
from .errors import DataError, TensorscopeError

__all__ = ["Context", "DistributedError", "all_reduce_stats", "bin_pack", "collect_stats", "context", "shard"]

#: seconds a process waits for the others at a collective (torch's default of 30 min is too
#: short when one process factorizes a large layer while the others have finished)
ENV_TIMEOUT = "TENSORSCOPE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600


class DistributedError(TensorscopeError):
    """A process of a distributed run failed or died; the message names it when it could report."""


@dataclass
class Context:
    """This process's place in the run: ``rank`` of ``world``, the backend, the data device."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    control: Any = None  # the gloo group for status messages (None: the default group)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"{what}: another process of the run stopped without reporting (killed, or out of memory?): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. The launcher's summary (torchrun) "
                "names it; rerun the same command to resume") from None

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            self._collective(what, dist.barrier, group=self.control)

    def gather(self, obj: Any, what: str = "exchange") -> list[Any]:
        """Every process's ``obj`` (picklable, small), on every process."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective(what, dist.all_gather_object, out, obj, group=self.control)
        return out

    def agree(self, error: str | None, what: str) -> None:
        """Raise on every process if any process reports an error (``None``: success)."""
        errors = self.gather(error, what)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            who = "; ".join(f"process {r} of {self.world}: {e}" if self.distributed else str(e) for r, e in bad)
            raise DistributedError(f"{what} failed: {who}")


_CONTEXT: Context | None = None


def _timeout() -> datetime.timedelta:
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise TensorscopeError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def context(backend: str | None = None) -> Context:
    """This process's :class:`Context`: the torch.distributed group torchrun set up
    (initialised here from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` when needed: ``nccl`` when
    CUDA is available, else ``gloo``), or a group of one without a launcher."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        if _CONTEXT is not None and _CONTEXT.world == dist.get_world_size():
            return _CONTEXT
        return _join(dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        if _CONTEXT is None or _CONTEXT.world != 1:
            _CONTEXT = Context()
        return _CONTEXT
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=_timeout())
    atexit.register(shutdown)  # a process that exits with gloo's threads alive aborts (SIGABRT)
    return _join(backend)


def shutdown() -> None:
    """Leave the process group :func:`context` joined; called at exit, safe to call twice."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def _join(backend: str) -> Context:
    global _CONTEXT
    backend = str(backend).lower()
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _CONTEXT = Context(dist.get_rank(), dist.get_world_size(), backend, device, control)
    return _CONTEXT


def bin_pack(costs: Sequence[float], world: int) -> list[int]:
    """The process (0..world-1) of each item: largest predicted cost first, each to the least
    loaded process (ties: the lowest index). Deterministic: every process computes the same."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        p = min(range(world), key=lambda r: (load[r], r))
        owner[i] = p
        load[p] += float(costs[i])
    return owner


def svd_cost(rows: int, cols: int) -> float:
    """Predicted work of an SVD of a ``rows x cols`` matrix: ``m n min(m, n)``."""
    return float(rows) * float(cols) * float(min(rows, cols))


def shard(data: Any, ctx: Context | None = None, max_batches: int | None = None) -> Iterable:
    """This process's share of the batches of ``data``: batch ``i`` when ``i mod world == rank``."""
    ctx = ctx or context()
    batches = iter_batches(data, max_batches=max_batches)
    return itertools.islice(batches, ctx.rank, None, ctx.world) if ctx.distributed else batches


def all_reduce_stats(stats: dict[str, LayerStats], ctx: Context | None = None) -> dict[str, LayerStats]:
    """The statistics summed over every process (each layer's Gram matrix and row count)."""
    ctx = ctx or context()
    if not ctx.distributed:
        return stats
    out = {}
    for name in sorted(stats):  # the same order on every process
        s = stats[name]
        patch = s.patch.to(ctx.device, torch.float64).contiguous().clone()
        count = torch.tensor([s.count], dtype=torch.int64, device=ctx.device)
        ctx._collective(f"summing the statistics of layer {name!r}", dist.all_reduce, patch)
        ctx._collective(f"summing the statistics of layer {name!r}", dist.all_reduce, count)
        out[name] = LayerStats(s.kind, patch.cpu(), int(count.item()), s.kernel, s.ridge)
    return {n: out[n] for n in stats}


def collect_stats(
    model: nn.Module,
    data: Any,
    layers: Iterable[str],
    *,
    max_batches: int | None = None,
    ridge: float = DEFAULT_RIDGE,
    progress: Any = False,
    ctx: Context | None = None,
) -> dict[str, LayerStats]:
    """:func:`tensorscope.collect_stats` over all processes: each runs its share of ``data``
    (batch ``i`` on process ``i mod N``) through its copy of ``model``, then the Gram
    matrices are summed by all-reduce. Every process gets the statistics of all the data.
    Without a launcher it is ``tensorscope.collect_stats``."""
    ctx = ctx or context()
    names = list(layers)
    if not ctx.distributed:
        return _collect_stats(model, data, names, max_batches=max_batches, ridge=ridge, progress=progress)
    local: dict[str, LayerStats] | None = None
    error = None
    try:
        mine = iter(shard(data, ctx, max_batches))
        first = next(mine, None)
        if first is None:  # fewer batches than processes: this one adds nothing
            modules = dict(model.named_modules())
            missing = [n for n in names if n not in modules]
            if missing:
                raise DataError(f"the model has no layer(s) {missing[:5]}")
            local = {n: _Accumulator(modules[n], ridge).result() for n in names}
        else:
            local = _collect_stats(model, itertools.chain([first], mine), names, ridge=ridge,
                                   progress=progress if ctx.is_main else False)
    except Exception as e:  # reported to every process below, so none waits forever
        error = f"{type(e).__name__}: {e}"
    ctx.agree(error, "collecting calibration statistics")
    assert local is not None
    total = all_reduce_stats(local, ctx)
    never = [n for n, s in total.items() if s.count == 0]
    if never:
        raise DataError(f"the calibration data never reached layer(s) {never[:5]}: their inputs are unknown")
    return total
