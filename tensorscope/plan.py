"""The plan: one JSON document saying what happens to each layer.

It is what the explorer edits, what ``compress`` applies and what a checkpoint carries::

    {"tensorscope_plan": 1,
     "layers": {"features.0": {"method": "tucker2", "rank": [8, 16]},
                "classifier.3": {"method": "svd", "rank": 12}}}

Layers not named stay as they are. ``rank`` is an integer, a list (Tucker-2: ``[r_out,
r_in]``; TT: bond ranks with 1 at both ends) or a float in (0, 1] meaning that fraction of
the layer's full rank. Parsing checks the document's shape; :meth:`Plan.validate` checks it
against a model (layer names, methods, ranks) before any work starts.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from torch import nn

from ._io import atomic_write_bytes
from .errors import PlanError, RankError
from .inventory import ModelIndex
from .methods import LayerGeometry, Method, get_method

FORMAT_VERSION = 1
MAX_PLAN_BYTES = 8 << 20  # a plan is a few KB; refuse absurd documents before parsing


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: a method, a rank as written, and method options."""

    method: str
    rank: Any
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rank": _jsonable(self.rank), **{k: _jsonable(v) for k, v in self.options.items()}}


@dataclass(frozen=True)
class ResolvedLayer:
    """A plan entry checked against its layer: the module, method object and canonical rank."""

    name: str
    module: nn.Module
    method: Method
    rank: Any
    options: Mapping[str, Any]
    geometry: LayerGeometry


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _check_rank_shape(name: str, rank: Any) -> Any:
    def ok_scalar(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if ok_scalar(rank):
        if isinstance(rank, float) and not math.isfinite(rank):
            raise RankError(f"layer {name!r}: rank must be finite; got {rank!r}")
        return rank
    if isinstance(rank, (list, tuple)) and rank and all(ok_scalar(x) for x in rank):
        return tuple(rank)
    raise PlanError(
        f"layer {name!r}: rank must be an integer, a fraction in (0, 1], or a list of integers; got {rank!r}"
    )


def _parse_entry(name: Any, entry: Any) -> LayerPlan:
    if not isinstance(name, str) or not name:
        raise PlanError(f"layer names are the non-empty strings of model.named_modules(); got {name!r}")
    if isinstance(entry, LayerPlan):
        return entry
    if not isinstance(entry, Mapping):
        raise PlanError(
            f"layer {name!r}: each entry is an object like {{\"method\": \"svd\", \"rank\": 8}}; got {entry!r}"
        )
    if "method" not in entry or "rank" not in entry:
        raise PlanError(f"layer {name!r}: an entry needs both \"method\" and \"rank\"; got keys {sorted(entry, key=repr)}")
    method = entry["method"]
    if not isinstance(method, str):
        raise PlanError(f"layer {name!r}: method must be a string; got {method!r}")
    m = get_method(method)  # raises PlanError naming the known methods (or the plugin that failed)
    options = m.check_options({k: v for k, v in entry.items() if k not in ("method", "rank")}, f"layer {name!r}: ")
    return LayerPlan(method, _check_rank_shape(name, entry["rank"]), options)


class Plan:
    """An ordered mapping from layer names to :class:`LayerPlan`.

    ``Plan({"fc1": {"method": "svd", "rank": 8}})``; ``Plan.from_json(text)``; ``plan.to_json()``.
    """

    def __init__(self, layers: Mapping[str, Any] | None = None):
        if layers is None:
            layers = {}
        if isinstance(layers, Plan):
            layers = layers.layers
        if not isinstance(layers, Mapping):
            raise PlanError(f"a plan maps layer names to entries; got {type(layers).__name__}")
        if "tensorscope_plan" in layers and "layers" in layers:  # a whole document was passed
            layers = Plan.from_dict(dict(layers)).layers
        self.layers: dict[str, LayerPlan] = {n: _parse_entry(n, e) for n, e in layers.items()}

    # ---- mapping protocol ------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {p.method}@{_jsonable(p.rank)}" for n, p in self.layers.items())
        return f"Plan({{{inner}}})"

    def with_layer(self, name: str, method: str | None = None, rank: Any = None, **options) -> "Plan":
        """A copy with one layer set (``method=None`` removes it)."""
        layers = dict(self.layers)
        if method is None:
            layers.pop(name, None)
        else:
            layers[name] = _parse_entry(name, {"method": method, "rank": rank, **options})
        return Plan(layers)

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"tensorscope_plan": FORMAT_VERSION, "layers": {n: p.to_dict() for n, p in self.layers.items()}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, doc: Any) -> "Plan":
        if not isinstance(doc, Mapping):
            raise PlanError(f"a plan document is a JSON object; got {type(doc).__name__}")
        version = doc.get("tensorscope_plan")
        if version is None:
            raise PlanError('not a tensorscope plan: the key "tensorscope_plan" (format version) is missing')
        if version != FORMAT_VERSION:
            raise PlanError(
                f"plan format version {version!r} is not supported by this tensorscope (reads version "
                f"{FORMAT_VERSION}); upgrade tensorscope or re-export the plan"
            )
        extra = set(doc) - {"tensorscope_plan", "layers"}
        if extra:
            raise PlanError(f"unknown top-level key(s) in plan: {sorted(extra, key=repr)}")
        layers = doc.get("layers", {})
        if not isinstance(layers, Mapping):
            raise PlanError(f'"layers" must be an object mapping layer names to entries; got {type(layers).__name__}')
        return cls(layers)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8", errors="strict")
            except UnicodeDecodeError as e:
                raise PlanError(f"plan is not UTF-8 text: {e}") from None
        if not isinstance(text, str):
            raise PlanError(f"plan JSON must be text (str or bytes); got {type(text).__name__}")
        if len(text) > MAX_PLAN_BYTES:
            raise PlanError(f"plan is {len(text):,} characters; plans over {MAX_PLAN_BYTES:,} are refused")
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer over 4300 digits
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(doc)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            size = os.path.getsize(path)
            if size > MAX_PLAN_BYTES:
                raise PlanError(f"plan file {os.fspath(path)!r} is {size:,} bytes; plans over {MAX_PLAN_BYTES:,} are refused")
            with open(path, "rb") as f:
                return cls.from_json(f.read())
        except OSError as e:
            raise PlanError(f"cannot read plan file {os.fspath(path)!r}: {e}") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan file {os.fspath(path)!r} is not UTF-8 text") from None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, (self.to_json() + "\n").encode())

    # ---- checking against a model ----------------------------------------------------
    def validate(self, model: nn.Module, geometries: Mapping[str, LayerGeometry] | None = None) -> list[ResolvedLayer]:
        """Check every entry against ``model`` and resolve its rank; raise before any work.

        Raises :class:`PlanError` (unknown layer, layer not decomposable, method not valid for
        the layer) or :class:`RankError`, naming the layer and the fix.
        """
        index = ModelIndex(model)
        modules = index.modules
        resolved = []
        for name, lp in self.layers.items():
            if not name or name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise PlanError(f"plan names layer {name!r}, which the model does not have{hint}")
            module = modules[name]
            reason = index.reason(name)
            if reason:
                raise PlanError(f"layer {name!r} cannot be decomposed: {reason}")
            method = get_method(lp.method)
            geom = (geometries or {}).get(name) or LayerGeometry.of(module)
            why = method.unsupported_reason(geom)
            if why:
                raise PlanError(f"layer {name!r} ({type(module).__name__}): {why}")
            try:
                rank = method.resolve_rank(geom, lp.rank, lp.options)
            except (RankError, PlanError) as e:
                raise type(e)(f"layer {name!r} ({type(module).__name__} {tuple(module.weight.shape)}): {e}") from None
            resolved.append(ResolvedLayer(name, module, method, rank, dict(lp.options), geom))
        return resolved


def as_plan(plan: Any) -> Plan:
    """Accept a Plan, a mapping, a JSON string or a path to a JSON file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan) if "tensorscope_plan" in plan else Plan(plan)
    if isinstance(plan, (str, bytes)):
        text = plan.decode() if isinstance(plan, bytes) else plan
        if text.lstrip().startswith("{"):
            return Plan.from_json(text)
        return Plan.load(text)
    if isinstance(plan, os.PathLike):
        return Plan.load(plan)
    raise PlanError(f"expected a Plan, a dict, JSON text or a path to a plan file; got {type(plan).__name__}")
