"""Measured speed of an explorer session's plan: the compressed model timed against the original.

FLOPs say what a plan saves on paper; whether a factorized chain runs faster depends on the
machine and the form (CP and TT chains of small convolutions often do not: each method
says so in its ``speed_note``). :meth:`_Latency.measure_latency` times both networks on this
server, in a worker thread, with one intra-op thread, at batch 1 and at ``latency_batch``
(medians of :data:`~.limits.LATENCY_REPEATS` runs after a warm-up run).

The server is shared: other sessions' work running meanwhile slows both models alike, so
read the ratio, not the milliseconds. One measurement runs at a time in the process.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Any

import torch

from ..data import output_tensor
from ..errors import DataError
from ..methods import get_method
from ..plan import Plan
from . import limits
from .session import _Session

#: one latency measurement at a time in the process (two would time each other)
_LATENCY_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread for the calling thread (PyTorch keeps the setting per thread: other
    sessions' worker threads keep theirs), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _median_ms(model, x, repeats: int) -> float:
    with torch.inference_mode():
        output_tensor(model(x))  # warm-up: allocations, first-call paths
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            output_tensor(model(x))
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


class _Latency(_Session):
    """Latency of the plan on this server (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

    def latency_work(self, batch: int | None = None, repeats: int | None = None) -> float | None:
        """GFLOP one measurement would run (both models, batch 1 and the batch, warm-up included);
        None without an input to count FLOPs with."""
        n = int(self.latency_batch if batch is None else batch)
        reps = limits.LATENCY_REPEATS if repeats is None else int(repeats)
        c = self.cost or {}
        if c.get("flops") is None or c.get("flops_after") is None:
            return None
        return (c["flops"] + c["flops_after"]) * (1 + n) * (reps + 1) / 1e9

    def measure_latency(self, batch: int | None = None, repeats: int | None = None) -> bool:
        """Time the current plan's compressed model against the original (blocking; off the
        event loop in the app). The result lands in ``latency`` and is kept per plan for
        comparisons; ``error`` says why when it cannot run (no input, over the server's cap)."""

        def work():
            if self._model is None:
                raise DataError("load a network first")
            if self._data is None:
                raise DataError("timing needs an input: load evaluation data or give an input shape")
            n = int(self.latency_batch if batch is None else batch)
            if not 2 <= n <= 1024:
                raise DataError(f"the latency batch must be between 2 and 1024; got {n}")
            reps = limits.LATENCY_REPEATS if repeats is None else int(repeats)
            if not 1 <= reps <= 1000:
                raise DataError(f"latency repeats must be between 1 and 1000; got {reps}")
            gflop = self.latency_work(n, reps)
            if gflop is None:
                raise DataError("timing needs the network's FLOPs: load evaluation data or give an input shape")
            if gflop > limits.MAX_LATENCY_GFLOP:
                raise DataError(
                    f"timing this network at batch {n} would run {gflop:,.0f} GFLOP, more than this server allows "
                    f"per measurement ({limits.MAX_LATENCY_GFLOP:,.0f}, TENSORSCOPE_EXPLORER_MAX_LATENCY_GFLOP): "
                    "choose a smaller batch, or time the exported model on your own machine")
            with self._lock:
                plan, version, cost = self.plan, self.version, dict(self.cost)
                model, inputs = self._model, self._data.inputs
            key = plan.to_json(indent=None)
            with self._busy(f"measuring latency: 1 thread, batch 1 and {n}, {reps} runs each"):
                self._report(0.02, "building the compressed model")
                small = self.compressed_model()
                x1 = inputs[:1].contiguous()
                xn = inputs[:n]
                if len(xn) < n:  # fewer samples than the batch: repeat them
                    xn = xn.repeat((n + len(xn) - 1) // len(xn), *([1] * (xn.dim() - 1)))[:n]
                xn = xn.contiguous()
                got: dict[str, float] = {}
                cases = [("original_1", "the original, batch 1", model, x1),
                         ("compressed_1", "the compressed model, batch 1", small, x1),
                         ("original_n", f"the original, batch {n}", model, xn),
                         ("compressed_n", f"the compressed model, batch {n}", small, xn)]
                with _LATENCY_LOCK, _one_thread():
                    for i, (name, what, net, x) in enumerate(cases):
                        self._report(0.1 + 0.9 * i / len(cases), f"timing {what}")
                        got[name] = _median_ms(net, x, reps)
            notes = []
            for _, lp in plan.items():
                note = get_method(lp.method).speed_note
                if note and f"{lp.method}: {note}" not in notes:
                    notes.append(f"{lp.method}: {note}")
            result: dict[str, Any] = {
                "plan": key, "network": version, "batch": n, "repeats": reps, "threads": 1, **got,
                "speedup_1": got["original_1"] / got["compressed_1"] if got["compressed_1"] else None,
                "speedup_n": got["original_n"] / got["compressed_n"] if got["compressed_n"] else None,
                "flops_ratio": cost.get("flops_ratio"), "notes": notes,
            }
            with self._lock:
                if self.version != version:
                    raise DataError("the network was replaced while timing; measure again")
                self._latency_memo[key] = result
                self._latency_memo[Plan().to_json(indent=None)] = {
                    "compressed_1": got["original_1"], "compressed_n": got["original_n"], "batch": n}
                self.latency = result
            self.message = (
                f"Latency on this server (1 thread, median of {reps}): batch 1 {got['compressed_1']:.2f} ms against "
                f"{got['original_1']:.2f} ms ({result['speedup_1']:.2f}× faster); batch {n} "
                f"{got['compressed_n']:.1f} ms against {got['original_n']:.1f} ms ({result['speedup_n']:.2f}×); "
                + (f"FLOPs {cost['flops_ratio']:.2f}× fewer." if cost.get("flops_ratio") else ""))
            return True

        return bool(self._guard("Latency", work))

    def latency_for_plan(self) -> dict:
        """The latency measured for the current plan on this network, or ``{}``."""
        lat = self.latency
        if lat and lat.get("network") == self.version and lat.get("plan") == self.plan.to_json(indent=None):
            return lat
        return {}


