"""tensorscope: compress trained PyTorch networks with tensor decompositions, and see how.

    import tensorscope as ts
    layers = ts.inspect(model, example_input=x)
    plan = ts.plan_for_budget(model, keep=0.25)
    small = ts.compress(model, plan)
    ts.save(small, "small.pt", plan=plan); small2 = ts.load("small.pt")
    ts.export(small, "small.pt2", example_input=x)
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .budget import plan_cost, plan_for_budget, sensitivity
from .errors import (
    ArchitectureError,
    BudgetError,
    CheckpointError,
    DataError,
    DecompositionError,
    FileTooLargeError,
    NonFiniteWeightError,
    PlanError,
    RankError,
    TensorscopeError,
    UntrustedFileError,
)
from .evaluate import evaluate
from .inventory import LayerInfo, count_flops, count_params, inspect
from .layers import FactorizedLayer
from .methods import BreakEvenWarning, LayerGeometry, available_methods, get_method
from .plan import LayerPlan, Plan
from .preview import preview
from .ranks import energy_rank, evbmf, vbmf_rank, weakened_rank
from .spectra import Spectrum, operator_spectrum, spectra, spectrum, tradeoff
from .surgery import compress, fold_batchnorm, plan_of, tensorize
from .execution import tune_execution
from .rules import plan_by_rule
# train is imported here, not lazily, for the same reason as export below: the function
# shares its name with its module
from .train import History, train
from .lowrank import lowrank_train

# export is imported here, not lazily: the function shares its name with its module, and
# importing tensorscope.export first (tensorscope.checkpoint re-exports it) would otherwise
# leave ts.export bound to the module instead of the function
from .export import export

# loaded on first use: they pull in heavier dependencies or are optional
_LAZY = {
    "save": "checkpoint",
    "load": "checkpoint",
    "load_model": "checkpoint",
    "describe": "checkpoint",
    "finetune": "recovery",
    "refine_layerwise": "recovery",
    "iterative": "recovery",
    "collect_stats": "calibration",
    "augment_calibration": "augment",
    "correct": "correction",
    "examples": None,
    "pretrained": None,
    "bayes": None,
}

__all__ = [
    "__version__",
    # inspect and measure
    "inspect", "LayerInfo", "count_params", "count_flops", "spectrum", "spectra", "Spectrum",
    "operator_spectrum", "tradeoff", "evaluate",
    # plan
    "Plan", "LayerPlan", "plan_for_budget", "plan_cost", "sensitivity", "energy_rank", "evbmf",
    "vbmf_rank", "weakened_rank", "available_methods", "get_method", "LayerGeometry", "plan_by_rule",
    # compress, recover, persist
    "compress", "tensorize", "tune_execution", "preview", "fold_batchnorm", "plan_of", "FactorizedLayer", "save",
    "load", "export", "load_model", "describe", "finetune", "refine_layerwise", "iterative", "collect_stats",
    "augment_calibration", "correct", "examples", "pretrained", "bayes",
    # train
    "train", "lowrank_train", "History",
    # errors and warnings
    "TensorscopeError", "PlanError", "RankError", "DecompositionError", "NonFiniteWeightError",
    "CheckpointError", "UntrustedFileError", "FileTooLargeError", "BudgetError", "DataError",
    "ArchitectureError", "BreakEvenWarning",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = mod if _LAZY[name] is None else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tensorscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
