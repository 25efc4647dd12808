"""The method contract: what every decomposition method declares, and what everything else asks.

A method turns one layer (``nn.Linear``, ``nn.Conv2d``) into a small chain of ordinary torch
layers. One module per method (``svd``, ``tucker2``, ``cp``, ``tt``, or a plugin's own)
defines one subclass of :class:`Method` and registers it (:mod:`.registry`). The plan, the
budget planner, the presets, the CLI, the explorer's state and its sliders all ask the
method, never its name:

- identity: ``name``, ``kinds``, ``description``, ``speed_note``;
- ranks: ``rank_axes`` (one slider each), ``rank_from_axes``/``axis_values``, ``resolve_rank``,
  ``max_rank``, and the written forms ``rank_text``/``rank_to_json``/``rank_from_text``;
- options: ``option_specs`` and ``check_options``;
- cost from geometry alone: ``count_params``, ``count_flops``, ``work``;
- behaviour flags: ``error_curve`` (a cheap error-versus-cost curve for the planner and
  presets), ``slow`` (refits per rank: memoised, shown as pending, capped by ``work``),
  ``uses_data`` (calibration statistics change its factors);
- work: ``factorize``, ``build``, ``empty_factors``, ``reconstruct``, ``tradeoff``,
  ``cheap_error``, ``heldout_errors``, and ``recompress`` where ``core_recompression``;
  ``factorize_refusal`` (an entry only ``tensorize`` builds, never ``compress``);
- with data: ``heldout_losses`` (held-out scores, also of the network's output loss),
  ``data_variants`` (option sets the planner chooses between per layer), ``needs_gradients``.

Counting functions take a :class:`LayerGeometry` and a rank only: the planner and the
explorer price thousands of candidate ranks without building (or factorizing) anything.
FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, bias
additions and element-wise work are not counted. They are per sample, as
:func:`tensorscope.count_flops` states them: a batch's total divided by its size, rounded
down. Work a built module does once per call whatever the batch (forming a weight from its
factors: a TT/TR layer that rebuilds, an SVD or Tucker-2 chain that runs folded or dense, a
joint-Tucker member mixing its core) is shared by the call's samples, so ``count_flops`` needs
their number: ``geom.batch`` (the example input's, :func:`per_sample_flops`).
"""

from __future__ import annotations

import abc
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..densify import probe_dense
from ..errors import DecompositionError, PlanError, RankError
from ..linalg import check_finite, compute_dtype

__all__ = [
    "BreakEvenWarning", "Factors", "LayerGeometry", "Method", "Option", "RankAxis", "Tradeoff",
    "as_pair", "check_finite", "compute_dtype", "per_sample_flops", "resolve_int_rank", "warn_if_past_break_even",
]

Rank = Any  # int, or a tuple of ints; each method documents its canonical form


class BreakEvenWarning(UserWarning):
    """A rank was asked for at which the factorized layer is larger than the dense one."""


@dataclass(frozen=True)
class LayerGeometry:
    """Everything about a layer that its cost depends on (no weights).

    ``in_size`` is the spatial size (H, W) of the layer's input for conv layers when known
    (needed for FLOPs only); ``None`` when no example input was seen. ``batch`` is the number
    of samples of that example input (``None`` without one): FLOPs per sample of a module
    that does some work once per call depend on it (:func:`per_sample_flops`).
    """

    kind: str  # "linear" or "conv2d"
    in_features: int  # Linear: in_features; Conv2d: in_channels
    out_features: int  # Linear: out_features; Conv2d: out_channels
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    dtype: torch.dtype = torch.float32
    in_size: tuple[int, int] | None = None
    # leading dimensions of a Linear's input besides the batch (e.g. sequence length): the
    # product of all but the last input dimension, per sample. 1 for a plain (B, in) input.
    tokens: int = 1
    # samples per call of the example input the sizes were measured on (None: none seen)
    batch: int | None = None

    @classmethod
    def of(cls, layer: nn.Module, in_size: tuple[int, int] | None = None, tokens: int = 1,
           batch: int | None = None) -> "LayerGeometry":
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise DecompositionError(f"LayerGeometry.of: batch must be a positive int (samples per call) or None; "
                                     f"got {batch!r}")
        if isinstance(layer, nn.Linear):
            return cls(
                kind="linear",
                in_features=layer.in_features,
                out_features=layer.out_features,
                bias=layer.bias is not None,
                dtype=layer.weight.dtype,
                tokens=tokens,
                batch=batch,
            )
        if isinstance(layer, nn.Conv2d):
            return cls(
                kind="conv2d",
                in_features=layer.in_channels,
                out_features=layer.out_channels,
                kernel_size=tuple(layer.kernel_size),
                stride=tuple(layer.stride),
                padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                dilation=tuple(layer.dilation),
                groups=layer.groups,
                bias=layer.bias is not None,
                padding_mode=layer.padding_mode,
                dtype=layer.weight.dtype,
                in_size=in_size,
                batch=batch,
            )
        raise DecompositionError(
            f"tensorscope decomposes nn.Linear and nn.Conv2d layers; got {type(layer).__name__}"
        )

    @property
    def khw(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def dense_params(self) -> int:
        w = self.out_features * (self.in_features // self.groups) * self.khw
        return w + (self.out_features if self.bias else 0)

    @property
    def out_size(self) -> tuple[int, int] | None:
        """Spatial size of a conv's output (None for Linear or when the input size is unknown)."""
        if self.kind != "conv2d" or self.in_size is None:
            return None
        if self.padding == "same":
            return tuple(self.in_size)  # type: ignore[return-value]
        pad = (0, 0) if self.padding == "valid" else self.padding
        return tuple(
            (self.in_size[i] + 2 * pad[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )  # type: ignore[return-value]

    @property
    def positions(self) -> int | None:
        """Output positions per sample: tokens for Linear, H_out*W_out for Conv2d."""
        if self.kind == "linear":
            return self.tokens
        out = self.out_size
        return None if out is None else out[0] * out[1]

    @property
    def dense_flops(self) -> int | None:
        pos = self.positions
        if pos is None:
            return None
        return 2 * pos * self.out_features * (self.in_features // self.groups) * self.khw


def per_sample_flops(geom: LayerGeometry, per_call: int, per_sample: int, default_batch: int = 1) -> int:
    """FLOPs per sample of a module that does ``per_call`` FLOPs once per call and ``per_sample``
    for each sample, called with ``geom.batch`` samples (``default_batch`` when the geometry
    saw no example input): ``(per_call + batch * per_sample) // batch``, what
    :func:`tensorscope.count_flops` reports for that batch (a batch's total over its size,
    rounded down).

    A model's count rounds once, its layers' predictions once each: with ``n`` layers that
    have per-call work, the sum of their predictions can be up to ``n - 1`` FLOPs below the
    model's count (never with one such layer, or at batch 1).
    """
    batch = geom.batch if geom.batch is not None else default_batch
    batch = max(1, int(batch))
    return (int(per_call) + batch * int(per_sample)) // batch


@dataclass
class Factors:
    """The result of factorizing one layer: named tensors plus what is needed to build it."""

    method: str
    rank: Rank
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tradeoff:
    """Relative error against parameter count for every rank of one layer and method."""

    layer: str
    method: str
    ranks: list[Any]
    params: np.ndarray
    errors: np.ndarray  # relative Frobenius error (or relative output error with data)
    flops: np.ndarray | None = None
    dense_params: int = 0
    dense_flops: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pareto(self) -> "Tradeoff":
        """Only the ranks no other rank beats on both parameters and error."""
        order = np.lexsort((self.errors, self.params))
        keep, best = [], np.inf
        for i in order:
            if self.errors[i] < best - 1e-15:
                keep.append(i)
                best = self.errors[i]
        keep = np.array(keep, dtype=int)
        return Tradeoff(self.layer, self.method, [self.ranks[i] for i in keep], self.params[keep], self.errors[keep],
                        None if self.flops is None else self.flops[keep], self.dense_params, self.dense_flops)


@dataclass(frozen=True)
class RankAxis:
    """One integer a rank is made of: one slider in the explorer, one column of a rank table.

    ``unfolding`` names the spectrum (``"out"`` or ``"in"``) whose energy or VBMF rank
    suggests a value for this axis (rules and presets fill it from there); ``truncates``
    says the axis literally cuts that spectrum, so plots can mark where.
    """

    name: str
    label: str
    low: int
    high: int
    default: int
    unfolding: str | None = None
    truncates: bool = False
    help: str = ""

    def clip(self, value: int) -> int:
        return int(min(max(int(value), self.low), self.high))


@dataclass(frozen=True)
class Option:
    """One option key a plan entry may carry besides ``method`` and ``rank``.

    ``kind`` is ``"int"`` (an integer in ``[low, high]``), ``"float"`` (a finite number in
    ``[low, high]``), ``"bool"``, ``"shape"`` (a non-empty list of positive integers) or
    ``"choice"`` (one of the strings in ``choices``).
    """

    kind: str
    low: float = 0
    high: float = 10_000
    help: str = ""
    choices: tuple[str, ...] = ()

    def check(self, key: str, value: Any, where: str = "") -> Any:
        """The value in canonical form (shapes become tuples); PlanError naming key and value."""
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
                raise PlanError(f"{where}{key} must be an integer in [{int(self.low)}, {int(self.high)}]; "
                                f"got {value!r}")
            return int(value)
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise PlanError(f"{where}{key} must be one of {', '.join(map(repr, self.choices))}; got {value!r}")
            return value
        if self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not self.low <= value <= self.high:
                raise PlanError(f"{where}{key} must be a number in [{self.low:g}, {self.high:g}]; got {value!r}")
            return float(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise PlanError(f"{where}{key} must be true or false; got {value!r}")
            return value
        if self.kind == "shape":
            if not (isinstance(value, (list, tuple)) and value
                    and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
                raise PlanError(f"{where}{key} must be a list of positive integers; got {value!r}")
            return tuple(int(x) for x in value)
        raise PlanError(f"{where}{key}: option kind {self.kind!r} is not one of int, float, bool, shape, choice")


_RANK_TEXT_SPLIT = re.compile(r"\s*[×xX,\-\s]\s*")


class Method(abc.ABC):
    """One decomposition method. Subclasses are stateless; the registry holds one instance each."""

    name: ClassVar[str]
    #: layer kinds this method handles ("linear", "conv2d")
    kinds: ClassVar[tuple[str, ...]]
    #: one line for lists and tooltips
    description: ClassVar[str] = ""
    #: what docs/benchmarks.md measured about this form's CPU latency, where it is not a speed-up
    speed_note: ClassVar[str] = ""
    #: option keys a plan entry may carry, and their checks
    option_specs: ClassVar[Mapping[str, Option]] = {}
    #: a cheap error-versus-cost curve over all ranks (``tradeoff``): the planner and presets use it
    error_curve: ClassVar[bool] = False
    #: ``cheap_error`` is the error of exactly what ``factorize`` builds (no need to measure)
    cheap_error_is_exact: ClassVar[bool] = False
    #: refits per rank (iterative): previews are memoised and shown pending, work is capped
    slow: ClassVar[bool] = False
    #: calibration statistics change its factors (data-aware)
    uses_data: ClassVar[bool] = False
    #: the string that separates the integers of a multi-axis rank in text
    rank_separator: ClassVar[str] = "-"
    #: ``recompress`` re-decomposes a built chain from its own factors (MUSCO's core path)
    core_recompression: ClassVar[bool] = False

    # ---- what can be decomposed -------------------------------------------------------
    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        """Why this method cannot decompose a layer of this geometry (None when it can)."""
        if geom.kind not in self.kinds:
            return f"method {self.name!r} handles {', '.join(self.kinds)} layers, not {geom.kind}"
        return None

    # ---- options -----------------------------------------------------------------------
    def check_options(self, options: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
        """Options in canonical form; PlanError for an unknown key or a bad value.

        ``where`` prefixes messages (e.g. ``"layer 'fc1': "``).
        """
        options = dict(options or {})
        unknown = set(options) - set(self.option_specs)
        if unknown:
            allowed = sorted(set(self.option_specs) | {"method", "rank"})
            raise PlanError(f"{where}unknown key(s) {sorted(unknown, key=repr)} for method {self.name!r}; "
                            f"allowed: {allowed}")
        return {k: self.option_specs[k].check(k, v, where) for k, v in options.items()}

    # ---- ranks -----------------------------------------------------------------------
    @abc.abstractmethod
    def max_rank(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> Rank:
        """The rank at which the factorized layer is exact, in canonical form."""

    @abc.abstractmethod
    def resolve_rank(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> Rank:
        """Turn a plan's rank (int, list, or a float fraction in (0, 1]) into canonical form.

        Raises :class:`RankError` naming the value and the valid range.
        """

    def rank_axes(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> tuple[RankAxis, ...]:
        """The integers a rank is made of, with their bounds and defaults (one slider each).

        Default: one axis ``rank`` for an integer maximum, one per entry for a tuple.
        """
        mx = self.max_rank(geom, options)
        if isinstance(mx, tuple):
            return tuple(RankAxis(f"rank{k}", f"rank {k + 1}", 1, int(m), max(1, int(m) // 2))
                         for k, m in enumerate(mx))
        return (RankAxis("rank", "rank", 1, int(mx), max(1, int(mx) // 2)),)

    def rank_from_axes(self, geom: LayerGeometry, values: Sequence[int], options: Mapping[str, Any] | None = None) -> Rank:
        """The canonical rank for one value per axis (the inverse of :meth:`axis_values`)."""
        values = [int(v) for v in values]
        return self.resolve_rank(geom, values[0] if len(values) == 1 else tuple(values), options)

    def axis_values(self, rank: Rank) -> tuple[int, ...]:
        """One integer per rank axis, from a canonical rank."""
        return tuple(int(r) for r in rank) if isinstance(rank, (tuple, list)) else (int(rank),)

    def rank_text(self, rank: Rank) -> str:
        """A canonical rank as people read it: ``"32"``, ``"16×8"``, ``"1-8-8-1"``."""
        if rank is None:
            return ""
        if isinstance(rank, (tuple, list)):
            return self.rank_separator.join(str(int(r)) for r in rank)
        if isinstance(rank, float):
            return f"{rank:g}"
        return str(int(rank))

    def rank_to_json(self, rank: Rank) -> Any:
        """A canonical rank as a plan writes it: an int, a float fraction, or a list of ints."""
        if isinstance(rank, (tuple, list)):
            return [int(r) for r in rank]
        return rank if isinstance(rank, float) else int(rank)

    def rank_from_text(self, text: str) -> Any:
        """Read what :meth:`rank_text` writes (also ``16x8``, ``16,8``, a fraction ``0.5``)."""
        t = str(text).strip()
        try:
            if re.fullmatch(r"[0-9]*\.[0-9]+|[0-9]+\.[0-9]*", t):
                return float(t)
            parts = [p for p in _RANK_TEXT_SPLIT.split(t) if p]
            ints = [int(p) for p in parts]
        except ValueError:
            ints = []
        if not ints:
            raise RankError(f"{self.name}: cannot read a rank from {text!r}; write e.g. "
                            f"{self.rank_text(1)!r} or a fraction such as '0.5'")
        return ints[0] if len(ints) == 1 else tuple(ints)

    def suggest_rank(self, geom: LayerGeometry, pick: Callable[[str], int] | None = None,
                     options: Mapping[str, Any] | None = None) -> Rank:
        """A rank from a rule: each axis with an ``unfolding`` takes ``pick(unfolding)`` (an
        energy or VBMF rank of that spectrum), clipped to its bounds; the others their default."""
        values = [ax.clip(pick(ax.unfolding)) if (pick is not None and ax.unfolding) else ax.default
                  for ax in self.rank_axes(geom, options)]
        return self.rank_from_axes(geom, values, options)

    def shrink_rank(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> Rank | None:
        """A smaller rank (every axis to 80%), or None when no axis can go lower."""
        axes = self.rank_axes(geom, options)
        values = self.axis_values(rank)
        smaller = [max(ax.low, int(v * 0.8)) for ax, v in zip(axes, values)]
        if list(smaller) == list(values):
            return None
        return self.rank_from_axes(geom, smaller, options)

    def default_rank(self, geom: LayerGeometry, pick: Callable[[str], int] | None = None,
                     options: Mapping[str, Any] | None = None) -> Rank:
        """A sensible starting rank: :meth:`suggest_rank`, stepped down while the factorized
        layer would not be smaller than the dense one (where a smaller rank exists)."""
        r = self.suggest_rank(geom, pick, options)
        for _ in range(64):
            if self.count_params(geom, r, options) < geom.dense_params:
                break
            smaller = self.shrink_rank(geom, r, options)
            if smaller is None:
                break
            r = smaller
        return r

    # ---- cost without building -------------------------------------------------------
    @abc.abstractmethod
    def count_params(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> int:
        """Parameters of the built module at this (canonical) rank, bias included."""

    @abc.abstractmethod
    def count_flops(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> int | None:
        """FLOPs of one sample through the built module (None if the input size is unknown);
        work done once per call is shared by ``geom.batch`` samples (:func:`per_sample_flops`)."""

    def work(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> float | None:
        """Fitting work of one factorization in "rank x weight entries" units, for methods whose
        cost grows with the rank (``slow``); None when it is bounded by one SVD."""
        return None

    # ---- errors without factorizing -----------------------------------------------------
    def tradeoff(self, layer: nn.Module, geom: LayerGeometry | None = None, stats: Any = None,
                 name: str = "") -> Tradeoff | None:
        """The error-versus-cost curve over all ranks from cached factors (``error_curve``
        methods); None when each rank's error needs its own factorization."""
        return None

    def cheap_error(self, layer: nn.Module, rank: Rank, stats: Any = None,
                    options: Mapping[str, Any] | None = None) -> float | None:
        """The relative error at ``rank`` from cached factors (with ``stats``: of the output on
        the calibration data), or None when it must be measured."""
        return None

    def heldout_errors(self, layer: nn.Module, fit: Any, check: Any) -> np.ndarray | None:
        """Relative output error on ``check``'s data of factors fitted on ``fit``'s, at every
        rank of the curve (None when the method cannot score held out)."""
        return None

    def heldout_losses(self, layer: nn.Module, fit: Any, check: Any, options: Mapping[str, Any] | None = None,
                       *, output: bool = False) -> tuple[np.ndarray, float] | None:
        """Squared error on ``check``'s data of factors fitted on ``fit``'s (with ``options``) at
        every rank of :meth:`tradeoff`'s curve, and the same for a zero weight.

        ``output=False``: the layer's own output error. ``output=True``: the estimated loss of
        the network's output per sample (``check`` holds output-gradient moments, see
        :mod:`tensorscope.allocation`). None when the method cannot score this way; the
        planner then scales the in-sample curve.
        """
        return None

    def data_variants(self, geom: LayerGeometry, output: bool = False) -> list[dict[str, Any]]:
        """Option sets the data-aware planner scores per layer (held out) and chooses between,
        e.g. whitened, shrunk and plain factors. Default: the plain options only."""
        return [{}]

    def needs_gradients(self, options: Mapping[str, Any] | None = None) -> bool:
        """Whether :meth:`factorize` with these options reads output-gradient moments."""
        return False

    def correct(self, layer: nn.Module, chain: nn.Module, fit: Any, cross: torch.Tensor, *,
                options: Mapping[str, Any] | None = None, ridge: float = 0.1) -> nn.Module | None:
        """A chain refitted to the inputs the compressed network gives the layer
        (:func:`tensorscope.correct`): ``fit`` holds their moments (a ``LayerStats``, with the
        layer's output-gradient moments when it had any), ``cross`` ``sum x x^T`` of the
        original network's inputs against them per group, ``options`` the plan entry's.
        Default: None, the chain stays as it is."""
        return None

    # ---- factorize and build ---------------------------------------------------------
    def factorize_refusal(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> str | None:
        """Why :meth:`factorize` cannot make this plan entry from a trained weight (None when it can).

        ``compress`` (and ``tensorize(init="factorize")``) raise it as a :class:`PlanError`
        naming the layer before any work; ``tensorize(init="random")`` builds the entry all
        the same (its structure does not need factors).
        """
        return None

    @abc.abstractmethod
    def factorize(
        self,
        layer: nn.Module,
        rank: Rank,
        options: Mapping[str, Any] | None = None,
        *,
        stats: Any = None,
        refine: bool = True,
    ) -> Factors:
        """Compute the factors of ``layer.weight`` at ``rank`` (canonical).

        ``stats`` optionally carries activation statistics for data-aware factorization;
        ``refine=False`` asks for the cheapest factors (used by live previews).
        """

    @abc.abstractmethod
    def build(self, layer: nn.Module, factors: Factors) -> nn.Module:
        """The torch module computing the factorized layer (same dtype and device)."""

    @abc.abstractmethod
    def empty_factors(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> Factors:
        """Zero factors of the right shapes, to build a skeleton a checkpoint is loaded into."""

    def recompress(self, layer: nn.Module, chain: nn.Module, rank: Rank,
                   options: Mapping[str, Any] | None = None) -> nn.Module | None:
        """Decompose an existing chain of this method again, at a smaller ``rank``, from its own
        factors instead of the dense weight (MUSCO's repeated compression of the core, Gusak
        et al. 2019). The result has the shape :meth:`build` gives ``layer`` at ``rank``, so a
        plan naming ``layer`` describes it and checkpoints load it unchanged.

        ``layer`` is the original (dense) layer or one of its geometry, ``chain`` what
        :meth:`build` made of it (possibly trained since). Default: ``None``, this method
        cannot (``core_recompression`` is False); callers rebuild from the dense weight.
        """
        return None

    def skeleton(self, layer: nn.Module, rank: Rank, options: Mapping[str, Any] | None = None) -> nn.Module:
        """The built module's structure without factorizing anything (weights are zeros)."""
        geom = LayerGeometry.of(layer)
        return self.build(layer, self.empty_factors(geom, self.resolve_rank(geom, rank, options), options))

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        """The dense weight the factors represent (same shape as ``layer.weight``).

        Used by live previews, which run the original architecture with this weight.
        Default: probe the built module (exact for any linear layer, slower than a contraction).
        """
        return probe_dense(self.build(layer, factors), layer)[0].to(layer.weight.dtype)

    def decompose(
        self,
        layer: nn.Module,
        rank: Any,
        options: Mapping[str, Any] | None = None,
        *,
        stats: Any = None,
        refine: bool = True,
    ) -> nn.Module:
        """Resolve the rank, check the weights, factorize and build in one call."""
        geom = LayerGeometry.of(layer)
        reason = self.unsupported_reason(geom)
        if reason:
            raise DecompositionError(reason)
        canon = self.resolve_rank(geom, rank, options)
        warn_if_past_break_even(self, geom, canon, options)
        check_finite(layer)
        factors = self.factorize(layer, canon, options, stats=stats, refine=refine)
        return self.build(layer, factors)

    def describe(self) -> dict[str, Any]:
        """What the method declares, for listings (CLI, explorer tooltips)."""
        return {"name": self.name, "kinds": list(self.kinds), "description": self.description,
                "options": sorted(self.option_specs), "error_curve": self.error_curve, "slow": self.slow,
                "uses_data": self.uses_data, "speed_note": self.speed_note}


# ---- helpers shared by the methods -------------------------------------------------------


def resolve_int_rank(method: str, geom: LayerGeometry, rank: Any, max_rank: int, what: str = "rank") -> int:
    """Check one integer rank, or turn a fraction in (0, 1] into one (1.0 -> max_rank)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise RankError(
            f"{method}: {what} must be an integer in [1, {max_rank}] or a fraction in (0, 1]; got {rank!r}"
        )
    if isinstance(rank, float):
        if not math.isfinite(rank) or not (0.0 < rank <= 1.0):
            if math.isfinite(rank) and rank > 1.0 and float(rank).is_integer():
                rank = int(rank)
            else:
                raise RankError(
                    f"{method}: a fractional {what} must lie in (0, 1] (1.0 keeps the layer exact); got {rank!r}"
                )
        else:
            return max(1, min(max_rank, int(round(rank * max_rank))))
    if rank < 1 or rank > max_rank:
        raise RankError(
            f"{method}: {what} {rank} is out of range for this layer; use an integer in [1, {max_rank}] "
            f"({max_rank} reproduces the layer exactly) or a fraction in (0, 1]"
        )
    return int(rank)


def warn_if_past_break_even(method: Method, geom: LayerGeometry, rank: Rank, options=None, name: str = "") -> None:
    """Warn (never refuse) when the factorized layer would have more parameters than the dense one."""
    p = method.count_params(geom, rank, options)
    if p > geom.dense_params:
        where = f"layer {name!r}: " if name else ""
        warnings.warn(
            f"{where}{method.name} at rank {rank} has {p:,} parameters, more than the dense layer's "
            f"{geom.dense_params:,} (compression ratio {geom.dense_params / p:.2f} < 1); lower the rank "
            "or leave the layer dense",
            BreakEvenWarning,
            stacklevel=3,
        )


def as_pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]
