"""The plan: one JSON document saying what happens to each layer.

It is what the explorer edits, what ``compress`` applies and what a checkpoint carries::

    {"tensorscope_plan": 2,
     "layers": {"features.0": {"method": "tucker2", "rank": [8, 16]},
                "classifier.3": {"method": "svd", "rank": 12}},
     "groups": {"stage1": {"method": "joint_tucker", "layers": ["b1.conv", "b2.conv"], "rank": [2, 8, 8]}}}

Layers not named stay as they are. ``rank`` is an integer, a list (Tucker-2: ``[r_out,
r_in]``; TT: bond ranks with 1 at both ends) or a float in (0, 1] meaning that fraction of
the layer's full rank. A group (format 2) decomposes its layers together with a group method
(:mod:`tensorscope.methods.group`); a layer is in at most one group and then not in
``"layers"``. A plan without groups is written as format 1, which older tensorscope reads;
formats 1 and 2 are read. Parsing checks the document's shape; :meth:`Plan.validate` checks
it against a model (layer names, methods, ranks, group members) before any work starts.
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
from .methods.group import GroupMethod, get_group_method, is_group_method, kernel_shape

FORMAT_VERSION = 2  # the newest format read and written; 2 added "groups"
READS = (1, 2)
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
class GroupPlan:
    """Layers decomposed together: a group method, its members (in order) and a rank as written."""

    method: str
    layers: tuple[str, ...]
    rank: Any
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": list(self.layers), "rank": _jsonable(self.rank),
                **{k: _jsonable(v) for k, v in self.options.items()}}


@dataclass(frozen=True)
class ResolvedGroup:
    """A group checked against the model: its members' modules and geometries, the method
    object and the canonical rank."""

    name: str
    method: GroupMethod
    rank: Any
    options: Mapping[str, Any]
    members: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    geometries: tuple[LayerGeometry, ...]


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
    if is_group_method(method):
        raise PlanError(f"layer {name!r}: {method!r} decomposes several layers together; name it in \"groups\" "
                        f"({{\"g\": {{\"method\": {method!r}, \"layers\": [...], \"rank\": ...}}}}), not in \"layers\"")
    m = get_method(method)  # raises PlanError naming the known methods (or the plugin that failed)
    options = m.check_options({k: v for k, v in entry.items() if k not in ("method", "rank")}, f"layer {name!r}: ")
    return LayerPlan(method, _check_rank_shape(name, entry["rank"]), options)


def _parse_group(name: Any, entry: Any) -> GroupPlan:
    if not isinstance(name, str) or not name:
        raise PlanError(f"group names are non-empty strings; got {name!r}")
    if isinstance(entry, GroupPlan):
        return entry
    where = f"group {name!r}: "
    if not isinstance(entry, Mapping):
        raise PlanError(f'{where}each group is an object like {{"method": "joint_tucker", "layers": ["a", "b"], '
                        f'"rank": [2, 8, 8]}}; got {entry!r}')
    missing = [k for k in ("method", "layers", "rank") if k not in entry]
    if missing:
        raise PlanError(f"{where}a group needs \"method\", \"layers\" and \"rank\"; {missing} missing")
    method = get_group_method(entry["method"]) if is_group_method(entry["method"]) else None
    if method is None:
        try:
            get_method(entry["method"])
            per_layer = True
        except PlanError:
            per_layer = False
        hint = (f"{entry['method']!r} is a per-layer method: name each layer in \"layers\" instead"
                if per_layer else "group methods: " + ", ".join(_group_methods()))
        raise PlanError(f"{where}unknown group method {entry['method']!r}; {hint}")
    members = entry["layers"]
    if not (isinstance(members, (list, tuple)) and all(isinstance(x, str) and x for x in members)):
        raise PlanError(f'{where}"layers" must be a list of layer names; got {members!r}')
    dup = sorted({x for x in members if list(members).count(x) > 1})
    if dup:
        raise PlanError(f"{where}layer {dup[0]!r} is listed twice; name each member once")
    if len(members) < method.min_members:
        raise PlanError(f"{where}has {len(members)} layer(s) {list(members)}; a {method.name} group needs at least "
                        f"{method.min_members}: add layers of the same kernel shape, or plan "
                        f"{'that layer' if members else 'its layers'} under \"layers\" with a per-layer method")
    options = method.check_options({k: v for k, v in entry.items() if k not in ("method", "layers", "rank")}, where)
    return GroupPlan(method.name, tuple(members), _check_rank_shape(f"group {name}", entry["rank"]), options)


def _group_methods() -> list[str]:
    from .methods.group import available_group_methods

    return available_group_methods()


class Plan:
    """An ordered mapping from layer names to :class:`LayerPlan`, and groups of layers
    decomposed together (:class:`GroupPlan`).

    ``Plan({"fc1": {"method": "svd", "rank": 8}})``; ``Plan(layers, groups={"g": {...}})``;
    ``Plan.from_json(text)``; ``plan.to_json()``. Iterating, ``in`` and ``plan[name]`` see the
    per-layer entries; ``len(plan)`` counts every decomposed layer, group members included.
    """

    def __init__(self, layers: Mapping[str, Any] | None = None, groups: Mapping[str, Any] | None = None):
        if layers is None:
            layers = {}
        if isinstance(layers, Plan):
            groups = layers.groups if groups is None else groups
            layers = layers.layers
        if not isinstance(layers, Mapping):
            raise PlanError(f"a plan maps layer names to entries; got {type(layers).__name__}")
        if "tensorscope_plan" in layers and ("layers" in layers or "groups" in layers):  # a whole document
            doc = Plan.from_dict(dict(layers))
            layers, groups = doc.layers, (doc.groups if groups is None else groups)
        self.layers: dict[str, LayerPlan] = {n: _parse_entry(n, e) for n, e in layers.items()}
        if groups is None:
            groups = {}
        if not isinstance(groups, Mapping):
            raise PlanError(f'"groups" maps group names to entries; got {type(groups).__name__}')
        self.groups: dict[str, GroupPlan] = {n: _parse_group(n, e) for n, e in groups.items()}
        owner: dict[str, str] = {}
        for g, gp in self.groups.items():
            for layer in gp.layers:
                if layer in self.layers:
                    raise PlanError(f"layer {layer!r} is both in group {g!r} and in \"layers\" "
                                    f"({self.layers[layer].method}); a layer is decomposed once: remove one of them")
                if layer in owner:
                    raise PlanError(f"layer {layer!r} is in two groups, {owner[layer]!r} and {g!r}; a layer "
                                    "belongs to at most one group: remove it from one")
                owner[layer] = g

    def group_of(self, layer: str) -> str | None:
        """The name of the group ``layer`` belongs to (None when it is in none)."""
        return next((g for g, gp in self.groups.items() if layer in gp.layers), None)

    def decomposed(self) -> list[str]:
        """Every layer the plan decomposes: per-layer entries, then group members."""
        return list(self.layers) + [n for gp in self.groups.values() for n in gp.layers]

    def __bool__(self) -> bool:
        return bool(self.layers or self.groups)

    # ---- mapping protocol ------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers) + sum(len(gp.layers) for gp in self.groups.values())

    def items(self):
        return self.layers.items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {p.method}@{_jsonable(p.rank)}" for n, p in self.layers.items())
        if self.groups:
            inner += ("; " if inner else "") + "groups " + ", ".join(
                f"{g!r}: {p.method}@{_jsonable(p.rank)} over {len(p.layers)} layers" for g, p in self.groups.items())
        return f"Plan({{{inner}}})"

    def with_layer(self, name: str, method: str | None = None, rank: Any = None, **options) -> "Plan":
        """A copy with one layer set (``method=None`` removes it)."""
        layers = dict(self.layers)
        if method is None:
            layers.pop(name, None)
        else:
            layers[name] = _parse_entry(name, {"method": method, "rank": rank, **options})
        return Plan(layers, self.groups)

    def with_group(self, name: str, method: str | None = None, layers: Any = None, rank: Any = None,
                   **options) -> "Plan":
        """A copy with one group set (``method=None`` removes it)."""
        groups = dict(self.groups)
        if method is None:
            groups.pop(name, None)
        else:
            groups[name] = _parse_group(name, {"method": method, "layers": layers, "rank": rank, **options})
        return Plan(self.layers, groups)

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc = {"tensorscope_plan": 2 if self.groups else 1, "layers": {n: p.to_dict() for n, p in self.layers.items()}}
        if self.groups:
            doc["groups"] = {g: p.to_dict() for g, p in self.groups.items()}
        return doc

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, doc: Any) -> "Plan":
        if not isinstance(doc, Mapping):
            raise PlanError(f"a plan document is a JSON object; got {type(doc).__name__}")
        version = doc.get("tensorscope_plan")
        if version is None:
            raise PlanError('not a tensorscope plan: the key "tensorscope_plan" (format version) is missing')
        if isinstance(version, bool) or version not in READS:
            raise PlanError(
                f"plan format version {version!r} is not supported by this tensorscope (reads versions "
                f"{', '.join(map(str, READS))}); upgrade tensorscope or re-export the plan"
            )
        extra = set(doc) - {"tensorscope_plan", "layers", "groups"}
        if extra:
            raise PlanError(f"unknown top-level key(s) in plan: {sorted(extra, key=repr)}")
        if "groups" in doc and version < 2:
            raise PlanError(f'"groups" need plan format 2; this document says "tensorscope_plan": {version!r}: '
                            'set it to 2')
        layers = doc.get("layers", {})
        if not isinstance(layers, Mapping):
            raise PlanError(f'"layers" must be an object mapping layer names to entries; got {type(layers).__name__}')
        return cls(layers, doc.get("groups") or {})

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
        self.resolve_groups(model, geometries, index)
        return resolved

    def resolve_groups(self, model: nn.Module, geometries: Mapping[str, LayerGeometry] | None = None,
                       index: ModelIndex | None = None) -> list[ResolvedGroup]:
        """Check every group against ``model`` and resolve its rank; raise before any work.

        :class:`PlanError` names the group, the member and the fix (a layer the model lacks or
        that cannot be decomposed, a member the group method does not take, members of
        different kernel shapes); :class:`RankError` a rank out of range.
        """
        index = index or ModelIndex(model)
        modules = index.modules
        out = []
        for g, gp in self.groups.items():
            method = get_group_method(gp.method)
            mods, geoms = [], []
            for name in gp.layers:
                where = f"group {g!r}: layer {name!r}"
                if name not in modules:
                    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
                    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                    raise PlanError(f"{where} is not in the model{hint}")
                module = modules[name]
                reason = index.reason(name)
                if reason:
                    raise PlanError(f"{where} cannot be decomposed: {reason}")
                geom = (geometries or {}).get(name) or LayerGeometry.of(module)
                why = method.unsupported_reason(geom)
                if why:
                    raise PlanError(f"{where} ({type(module).__name__}): {why}")
                if geoms:
                    why = method.mismatch(geoms[0], geom)
                    if why:
                        raise PlanError(f"{where}: {why} (the kernel of the first member {gp.layers[0]!r}); a group "
                                        "stacks kernels of one shape: move it to another group or to \"layers\"")
                mods.append(module)
                geoms.append(geom)
            if len({id(m) for m in mods}) != len(mods):
                raise PlanError(f"group {g!r}: two of its names are the same module; name each layer once")
            try:
                rank = method.resolve_rank(geoms, gp.rank, gp.options)
            except (RankError, PlanError) as e:
                raise type(e)(f"group {g!r} ({method.name} over {len(geoms)} layers of kernel "
                              f"{kernel_shape(geoms[0])}): {e}") from None
            out.append(ResolvedGroup(g, method, rank, dict(gp.options), tuple(gp.layers), tuple(mods), tuple(geoms)))
        return out


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
