"""Choose how each factorized chain runs, by timing its forms on the input it really gets.

A factorized chain saves FLOPs, but on a CPU a 1x1 step over a large, thin feature map
costs memory traffic far beyond its arithmetic, and a thin rank runs GEMMs far below peak:
a chain with half the FLOPs can take as long as the dense layer. Each chain class offers
other forms of the same function from the same parameters (:mod:`tensorscope.layers`:
Tucker-2 folds its first or last 1x1 into the core, or rebuilds the whole kernel; SVD
rebuilds its product). :func:`tune_execution` times every form of every chain on the input
the chain receives in one forward pass of an example, keeps the fastest, and records it in
the model's plan (the entry's ``execute`` option), so ``save``/``load``, ``compress`` with
that plan and exports run the same forms. Decisions depend on the machine, the thread
count and the example's batch and size: tune with what you deploy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import split_batch
from .layers import CHAIN, EXECUTE, FactorizedLayer
from .plan import Plan
from .surgery import PLAN_ATTR, plan_of
from .units import text_table

__all__ = ["ExecutionChoice", "ExecutionReport", "clock_for", "tune_execution", "set_executions"]


@dataclass
class ExecutionChoice:
    """One chain's measured forms (median seconds per call) and the form chosen."""

    name: str
    method: str
    chosen: str
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Time of the plain chain over the chosen form's (1.0 when the chain was kept)."""
        return self.seconds[CHAIN] / self.seconds[self.chosen] if self.seconds.get(self.chosen) else 1.0


class ExecutionReport(list):
    """The :class:`ExecutionChoice` of every chain that has more than one form; prints a table."""

    def __str__(self) -> str:
        forms = sorted({m for c in self for m in c.seconds}, key=lambda m: (m != CHAIN, m))
        rows = [[c.name, c.method, c.chosen, f"{c.speedup:.2f}x"]
                + [f"{c.seconds[m] * 1e3:.2f}" if m in c.seconds else "" for m in forms] for c in self]
        return text_table(rows, ["layer", "method", "runs as", "vs chain"] + [f"{m} ms" for m in forms],
                          "lllr" + "r" * len(forms))


def _chains(model: nn.Module) -> dict[str, FactorizedLayer]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, FactorizedLayer) and len(m.available_executions()) > 1}


def _inputs(model: nn.Module, example_input: Any, chains: dict[str, FactorizedLayer]) -> dict[str, torch.Tensor]:
    """Each chain's input on ``example_input``, in the layout its forms run on (``forward_view``)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, n):
        if n not in seen and args:
            x = args[0].detach()
            seen[n] = x.unsqueeze(-2) if mod.conv1d else x  # an nn.Conv1d's chain runs on (N, C, 1, L)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in chains.items()]
    batch = split_batch(example_input)
    try:
        with torch.inference_mode():
            model(*batch.args, **batch.kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def clock_for(clock: str = "auto"):
    """The timer: ``"cpu"`` is this thread's CPU time (what a forward costs on one thread, unmoved
    by other processes on a shared machine), ``"wall"`` the elapsed time; ``"auto"``: CPU time
    when torch runs on one intra-op thread (all work is in this thread), else wall time."""
    if clock not in ("auto", "cpu", "wall"):
        raise ValueError(f"clock must be 'auto', 'cpu' or 'wall'; got {clock!r}")
    if clock == "cpu" or (clock == "auto" and torch.get_num_threads() == 1):
        return time.thread_time
    return time.perf_counter


def _time_forms(layer: FactorizedLayer, x: torch.Tensor, repeats: int, clock) -> dict[str, float]:
    """Median seconds per call of each form, timed round-robin (drift hits every form alike)."""
    forms = layer.available_executions()
    runs: dict[str, list[float]] = {m: [] for m in forms}
    with torch.inference_mode():
        for m in forms:  # warm-up: allocator, kernel choice
            layer.run(x, m)
        for _ in range(repeats):
            for m in forms:
                t0 = clock()
                layer.run(x, m)
                runs[m].append(clock() - t0)
    return {m: statistics.median(v) for m, v in runs.items()}


def set_executions(model: nn.Module, choices: dict[str, str]) -> nn.Module:
    """Run the named chains of ``model`` in the given forms (in place) and record them in its plan."""
    for name, mode in choices.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, FactorizedLayer):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not a factorized chain")
        layer.set_execution(mode)
    plan = plan_of(model)
    if plan is not None:
        layers = {}
        for n, lp in plan.items():
            entry = lp.to_dict()
            if n in choices:
                entry.pop(EXECUTE, None)
                if choices[n] != CHAIN:
                    entry[EXECUTE] = choices[n]
            layers[n] = entry
        object.__setattr__(model, PLAN_ATTR, Plan(layers))
    return model


def tune_execution(model: nn.Module, example_input: Any, *, repeats: int = 5, margin: float = 0.05,
                   forms: str = "all", clock: str = "auto") -> ExecutionReport:
    """Time every execution form of every factorized chain of ``model`` and keep the fastest.

    Parameters
    ----------
    model : nn.Module
        A compressed model (``compress``, ``load``); changed in place: each chain's
        ``execution`` and the recorded plan's ``execute`` options (``save`` then records them).
    example_input
        A batch as the model's forward takes it, of the size it will run at: each chain is
        timed on the input it receives from this batch.
    repeats : int
        Timed calls per form (medians; forms alternate, so drift hits all alike).
    margin : float
        A form replaces the plain chain only when faster by more than this fraction (timing
        noise never flips a layer).
    forms : ``"all"`` or ``"chain"``
        ``"chain"`` resets every chain to its plain form without timing anything.
    clock : ``"auto"``, ``"cpu"`` or ``"wall"``
        See :func:`clock_for`: with one torch thread the thread's CPU time, so a busy machine
        does not decide for you.

    Returns
    -------
    ExecutionReport
        One :class:`ExecutionChoice` per chain with more than one form (``print`` it).
    """
    if forms not in ("all", "chain"):
        raise ValueError(f"forms must be 'all' or 'chain'; got {forms!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}")
    timer = clock_for(clock)
    chains = _chains(model)
    report = ExecutionReport()
    if forms == "chain":
        set_executions(model, {n: CHAIN for n in chains})
        report.extend(ExecutionChoice(n, c.method, CHAIN) for n, c in chains.items())
        return report
    was_training = model.training
    model.eval()
    try:
        xs = _inputs(model, example_input, chains)
        choices = {}
        for name, layer in chains.items():
            if name not in xs:  # never reached by this input: left as it is
                continue
            secs = _time_forms(layer, xs[name], repeats, timer)
            best = min(secs, key=secs.get)
            if best != CHAIN and secs[best] > secs[CHAIN] * (1 - margin):
                best = CHAIN
            choices[name] = best
            report.append(ExecutionChoice(name, layer.method, best, secs))
        set_executions(model, choices)
    finally:
        model.train(was_training)
    return report
