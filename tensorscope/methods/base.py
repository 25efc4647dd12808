"""What every decomposition method provides, and the geometry of the layers they act on.

A method turns one ``nn.Linear`` or ``nn.Conv2d`` into a small chain of ordinary torch
layers. Each method module (``svd``, ``tucker2``, ``cp``, ``tt``) defines one subclass of
:class:`Method` and registers it with :func:`register_method`, so the planner, the CLI, the
explorer and the tests all list methods from one place.

Counting functions take a :class:`LayerGeometry` and a rank only: the planner and the
explorer price thousands of candidate ranks without building (or factorizing) anything.
FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add is 2 FLOPs, bias
additions and element-wise work are not counted; they are per batch of one sample.
"""

from __future__ import annotations

import abc
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import DecompositionError, NonFiniteWeightError, PlanError, RankError

Rank = Any  # int, or a tuple of ints; each method documents its canonical form


class BreakEvenWarning(UserWarning):
    """A rank was asked for at which the factorized layer is larger than the dense one."""


@dataclass(frozen=True)
class LayerGeometry:
    """Everything about a layer that its cost depends on (no weights).

    ``in_size`` is the spatial size (H, W) of the layer's input for conv layers when known
    (needed for FLOPs only); ``None`` when no example input was seen.
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

    @classmethod
    def of(cls, layer: nn.Module, in_size: tuple[int, int] | None = None, tokens: int = 1) -> "LayerGeometry":
        if isinstance(layer, nn.Linear):
            return cls(
                kind="linear",
                in_features=layer.in_features,
                out_features=layer.out_features,
                bias=layer.bias is not None,
                dtype=layer.weight.dtype,
                tokens=tokens,
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


@dataclass
class Factors:
    """The result of factorizing one layer: named tensors plus what is needed to build it."""

    method: str
    rank: Rank
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


class Method(abc.ABC):
    """One decomposition method. Subclasses are stateless; register one instance each."""

    name: ClassVar[str]
    #: layer kinds this method handles ("linear", "conv2d")
    kinds: ClassVar[tuple[str, ...]]
    #: whether a rank is a single int or a tuple (documented per method)
    description: ClassVar[str] = ""
    #: what docs/benchmarks.md measured about this form's CPU latency, where it is not a speed-up
    speed_note: ClassVar[str] = ""

    # ---- what can be decomposed -------------------------------------------------------
    def unsupported_reason(self, geom: LayerGeometry) -> str | None:
        """Why this method cannot decompose a layer of this geometry (None when it can)."""
        if geom.kind not in self.kinds:
            return f"method {self.name!r} handles {', '.join(self.kinds)} layers, not {geom.kind}"
        return None

    # ---- ranks -----------------------------------------------------------------------
    @abc.abstractmethod
    def max_rank(self, geom: LayerGeometry, options: Mapping[str, Any] | None = None) -> Rank:
        """The rank at which the factorized layer is exact, in canonical form."""

    @abc.abstractmethod
    def resolve_rank(self, geom: LayerGeometry, rank: Any, options: Mapping[str, Any] | None = None) -> Rank:
        """Turn a plan's rank (int, list, or a float fraction in (0, 1]) into canonical form.

        Raises :class:`RankError` naming the value and the valid range.
        """

    # ---- cost without building -------------------------------------------------------
    @abc.abstractmethod
    def count_params(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> int:
        """Parameters of the built module at this (canonical) rank, bias included."""

    @abc.abstractmethod
    def count_flops(self, geom: LayerGeometry, rank: Rank, options: Mapping[str, Any] | None = None) -> int | None:
        """FLOPs of one sample through the built module (None if the input size is unknown)."""

    # ---- factorize and build ---------------------------------------------------------
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

    def skeleton(self, layer: nn.Module, rank: Rank, options: Mapping[str, Any] | None = None) -> nn.Module:
        """The built module's structure without factorizing anything (weights are zeros)."""
        geom = LayerGeometry.of(layer)
        return self.build(layer, self.empty_factors(geom, self.resolve_rank(geom, rank, options), options))

    def reconstruct(self, layer: nn.Module, factors: Factors) -> torch.Tensor:
        """The dense weight the factors represent (same shape as ``layer.weight``).

        Used by live previews, which run the original architecture with this weight.
        Default: probe the built module, which is exact but slow; methods override it.
        """
        raise NotImplementedError

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


# ---- helpers shared by the methods -------------------------------------------------------


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach()).all())


def check_finite(layer: nn.Module, name: str = "") -> None:
    """Refuse NaN/Inf weights before any factorization (LAPACK can hang on them).

    Memoised per parameter while it is unchanged: the explorer asks on every slider move.
    """
    from .._cache import finite_memo

    for pname, p in layer.named_parameters(recurse=False):
        if not finite_memo.get(p, _all_finite):
            bad = int((~torch.isfinite(p)).sum())
            where = f"layer {name!r} " if name else ""
            raise NonFiniteWeightError(
                f"{where}{pname} holds {bad} NaN/Inf value(s) of {p.numel()}; "
                "factorizing it would fail or produce garbage. Fix the checkpoint (or the "
                "training run that produced it) before compressing."
            )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factorize in float64 for float64 weights, float32 otherwise (half types lack LAPACK)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---- registry ----------------------------------------------------------------------------

_REGISTRY: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: put one instance of a method in the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PlanError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def methods_for(geom: LayerGeometry) -> list[str]:
    """Names of the methods that can decompose a layer of this geometry."""
    return [n for n, m in sorted(_REGISTRY.items()) if m.unsupported_reason(geom) is None]

