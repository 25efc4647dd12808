"""The library's exceptions.

One base class, ``TensorscopeError``, so a caller can catch everything tensorscope raises
on bad input with one ``except``; a few subclasses where callers need to tell cases apart.
Messages say what was wrong, the value that was given, and what to do instead.
"""

from __future__ import annotations

__all__ = [
    "TensorscopeError",
    "PlanError",
    "RankError",
    "DecompositionError",
    "NonFiniteWeightError",
    "CheckpointError",
    "UntrustedFileError",
    "FileTooLargeError",
    "BudgetError",
    "DataError",
    "ArchitectureError",
    "MissingExtraError",
]


class TensorscopeError(Exception):
    """Base class of every error tensorscope raises on bad input."""


class PlanError(TensorscopeError, ValueError):
    """A plan is malformed or does not fit the model (unknown layer, bad method, ...)."""


class RankError(PlanError):
    """A rank is out of range for the layer and method it was given for."""


class DecompositionError(TensorscopeError):
    """A layer cannot be decomposed by the requested method."""


class NonFiniteWeightError(DecompositionError, ValueError):
    """A weight holds NaN or Inf, on which LAPACK can hang or return garbage."""


class CheckpointError(TensorscopeError, ValueError):
    """A file is not a checkpoint tensorscope can read (corrupt, truncated, wrong shapes)."""


class UntrustedFileError(CheckpointError):
    """Reading the file would execute pickled code and the caller did not say they trust it."""


class FileTooLargeError(CheckpointError):
    """A file, or what it declares it will expand to, is over the configured size limit."""


class BudgetError(TensorscopeError, ValueError):
    """A whole-model budget cannot be met (too small to reach, or malformed)."""


class DataError(TensorscopeError, ValueError):
    """Calibration or evaluation data does not follow the batch convention."""


class ArchitectureError(TensorscopeError, ValueError):
    """An architecture reference ``package.module:factory`` cannot be imported or called."""


class MissingExtraError(TensorscopeError, ImportError):
    """An optional dependency (an extra such as ``tensorscope[onnx]``) is not installed."""


class PluginError(TensorscopeError, TypeError):
    """A method cannot be registered: not a Method, no name, a taken name, or a plugin that
    failed to import. The message names the class or the entry point."""
