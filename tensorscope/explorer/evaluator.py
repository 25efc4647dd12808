"""The explorer's live preview: the original architecture with a plan's weights, on a fixed sample.

:class:`_Evaluator` re-runs only what a changed layer feeds, from activations recorded on the
previous run (a ``torch.fx`` trace; networks fx cannot trace are run whole), and scores the
outputs with :func:`tensorscope.evaluate.metrics`, the function ``ts.evaluate`` uses.
:data:`TRACE_GUARD` keeps forward passes of every session away from a ``torch.fx`` trace.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from ..data import output_tensor
from ..evaluate import metrics as output_metrics
from ..views import dense_weight, is_conv1d, set_dense_weight
from . import limits


def predictions(out: Tensor) -> np.ndarray | None:
    """Top-1 class of each sample (and position) of a network's outputs, as int32; None for
    outputs without a class dimension."""
    if out.dim() < 2:
        return None
    return out.argmax(-1).to(torch.int32).cpu().numpy()


class _TraceGuard:
    """No forward pass while ``torch.fx`` traces, in any session.

    ``fx.symbolic_trace`` patches ``nn.Module.__call__`` for the whole process while it runs:
    a forward in another thread meanwhile fails with ``NameError: module is not installed as
    a submodule`` (reproduced every time with two threads). Work on the explorer's worker
    threads holds this guard shared; tracing holds it alone. A thread already holding it
    shared may trace (its own hold is set aside meanwhile), and waiting tracers go first, so
    a stream of evaluations cannot starve a session that is loading.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._tracing = False
        self._waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def running(self):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._tracing or self._waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @contextlib.contextmanager
    def tracing(self):
        held = getattr(self._local, "depth", 0) > 0
        with self._cond:
            if held:
                self._readers -= 1
            self._waiting += 1
            while self._tracing or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                if held:
                    self._readers += 1
                self._cond.notify_all()


#: shared by every session of the process (see _TraceGuard)
TRACE_GUARD = _TraceGuard()


class _Superseded(Exception):
    """A quality refresh stopped because a newer plan was asked for."""


@dataclass
class _EvalData:
    """The fixed sample the preview evaluates on."""

    inputs: Tensor
    targets: Tensor | None
    description: str
    kind: str  # "held-out", "uploaded", "calibration"


class _Evaluator:
    """The original architecture with a plan's reconstructed weights, on a fixed sample.

    Owns a private copy of the network (the session's model keeps its original weights, so
    spectra and exports computed meanwhile never see swapped ones). After a change confined
    to one layer ``L`` it re-runs only the nodes of the network's ``torch.fx`` graph that
    depend on ``L``, starting from the values recorded on the previous run at the nodes
    feeding them (for a chain, just ``L``'s input). Anything else is a full run.
    """

    def __init__(self, model: nn.Module, data: _EvalData, chunk: int | None = None):
        chunk = limits.CHUNK if chunk is None else chunk
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.data = data
        n = int(data.inputs.shape[0])
        self.chunks = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
        self.original = {name: dense_weight(mod).detach().clone() for name, mod in self.model.named_modules()
                         if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_conv1d(mod)}
        self.installed: dict[str, Any] = {}  # layer -> key of the weight now in the copy (absent: original)
        self.frontier: dict[str, Any] | None = None  # {"layer", "sig", "values": [per chunk {node: tensor}]}
        self.gm = None
        self.incremental: dict[str, tuple[list, list]] = {}  # layer -> (dirty nodes, frontier nodes)
        self.stats = {"full": 0, "incremental": 0, "last": "", "last_ms": 0.0}
        self._trace()
        with torch.inference_mode():
            self.reference = torch.cat([self._forward(self.data.inputs[c]) for c in self.chunks])
        self.last: dict[str, float] | None = self.metrics(self.reference)  # nothing installed: the original
        #: top-1 predictions of the original and of the last run (compare pinned configurations)
        self.reference_pred = predictions(self.reference)
        self.last_pred = self.reference_pred

    # -- graph ------------------------------------------------------------------------------
    def _trace(self) -> None:
        try:
            with TRACE_GUARD.tracing():
                gm = fx.symbolic_trace(self.model)
        except Exception:  # data-dependent control flow, unsupported ops: run the model whole
            return
        nodes = list(gm.graph.nodes)
        attrs = [str(n.target) for n in nodes if n.op == "get_attr"]
        for name in self.original:
            calls = [n for n in nodes if n.op == "call_module" and n.target == name]
            # a layer whose weight the graph reads directly (F.linear(x, self.fc.weight)) or
            # that is never called as a module cannot be re-run from its input
            if not calls or any(a == name or a.startswith(name + ".") for a in attrs):
                continue
            dirty: set = set()
            stack = list(calls)
            while stack:
                n = stack.pop()
                if n in dirty:
                    continue
                dirty.add(n)
                stack.extend(n.users)
            order = [n for n in nodes if n in dirty]
            feed = []
            for n in order:
                for a in n.all_input_nodes:
                    if a not in dirty and a not in feed:
                        feed.append(a)
            self.incremental[name] = (order, feed)
        self.gm = gm
        self.nodes = nodes

    def _forward(self, x: Tensor) -> Tensor:
        return output_tensor(self.model(x))

    def _run_graph(self, x: Tensor, skip: dict | None, record: list | None) -> Tensor:
        """Run the fx graph on ``x``; ``skip`` pre-fills node values (only dirty nodes run)."""
        record_set = set(record or ())
        kept: dict = {}

        class _Run(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n in record_set:
                    kept[n] = out
                return out

        interp = _Run(self.gm)
        env = None
        if skip is not None:
            env = dict(skip)
        out = interp.run(x, initial_env=env)
        self._kept = kept
        return output_tensor(out)

    # -- weights ----------------------------------------------------------------------------
    def install(self, weights: dict[str, tuple[Any, Tensor]]) -> set[str]:
        """Put the plan's weights in the copy (``weights``: layer -> (key, tensor)); the changed layers."""
        changed = set()
        for name in set(self.installed) | set(weights):
            new_key = weights[name][0] if name in weights else None
            if self.installed.get(name) == new_key:
                continue
            mod = self.model.get_submodule(name)
            w = weights[name][1] if name in weights else self.original[name]
            set_dense_weight(mod, w)  # a Conv1D stores it transposed
            if new_key is None:
                self.installed.pop(name, None)
            else:
                self.installed[name] = new_key
            changed.add(name)
        return changed

    def _signature(self, but: str) -> tuple:
        return tuple(sorted((n, json.dumps(k, default=str)) for n, k in self.installed.items() if n != but))

    # -- evaluation -------------------------------------------------------------------------
    def run(self, changed: set[str], focus: str | None, stop: Callable[[], bool]) -> dict[str, float]:
        """Evaluate the installed weights; ``changed`` are the layers changed since the last run."""
        t0 = time.perf_counter()
        if not changed and self.last is not None:
            return dict(self.last)
        fr = self.frontier
        use_inc = (
            self.gm is not None and fr is not None and len(changed) == 1 and fr["layer"] in changed
            and fr["sig"] == self._signature(fr["layer"])
        )
        record_for = focus if (self.gm is not None and focus in self.incremental) else None
        outs = []
        new_values = []
        with torch.inference_mode():
            for i, c in enumerate(self.chunks):
                if stop():
                    raise _Superseded()
                x = self.data.inputs[c]
                if use_inc:
                    order, feed = self.incremental[fr["layer"]]
                    dirty = set(order)
                    env = {n: None for n in self.nodes if n not in dirty}
                    env.update(fr["values"][i])
                    outs.append(self._run_graph(x, env, None))
                elif record_for is not None:
                    _, feed = self.incremental[record_for]
                    outs.append(self._run_graph(x, None, feed))
                    new_values.append(self._kept)
                else:
                    outs.append(self._forward(x))
        if not use_inc:
            self.frontier = (
                {"layer": record_for, "sig": self._signature(record_for), "values": new_values}
                if record_for is not None else None
            )
        self._kept = {}
        out = torch.cat(outs)
        metrics = self.metrics(out)
        self.last_pred = predictions(out)
        kind = "incremental" if use_inc else "full"
        self.stats[kind] += 1
        self.stats["last"] = kind
        self.stats["last_ms"] = (time.perf_counter() - t0) * 1e3
        self.last = metrics
        return dict(metrics)

    def metrics(self, out: Tensor) -> dict[str, float]:
        """What :func:`tensorscope.evaluate.evaluate` gives for these outputs on the sample
        (against its labels and the original network's outputs): the same function."""
        return output_metrics(out, self.data.targets, self.reference)

    def baseline(self) -> dict[str, float]:
        return self.metrics(self.reference)
