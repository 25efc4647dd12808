"""Pinned configurations of an explorer session: compared side by side, and restored.

Any point of the session's ``history`` can be pinned. A pin keeps what was measured when
that configuration was evaluated (parameters, FLOPs, quality, the top-1 prediction of every
evaluation sample) and the plan that gives it back. Two pins side by side: their per-layer
methods and ranks, costs, measured latency (where measured), accuracy per class, and the
evaluation samples whose prediction differs between them, with their images for image
data (after Boggust et al., "Compress and Compare", 2024).

A pin belongs to the network it was made on: after the session loads another network, a
pin can no longer be restored or compared (the request is a message; the session keeps its
network and plan).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from ..errors import DataError
from ..evaluate import IGNORE_INDEX
from ..methods import get_method
from ..plan import Plan
from . import limits
from .common import DENSE, _rank_text
from .data_aware import TUNED
from .session import _Session


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file of an 8-bit grey (H, W) or RGB (H, W, 3) image (no imaging library needed)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class _Compare(_Session):
    """Pins, comparisons and restores (mixin of :class:`~tensorscope.explorer.ExplorerState`)."""

    # -- pins -----------------------------------------------------------------------------
    def pin(self, index: int | None = None) -> int | None:
        """Pin the history's point ``index`` (None: the newest evaluation of the current plan);
        the pin's id, or None with ``error`` set. The two newest pins become the comparison."""

        def evaluated() -> bool:
            with self._lock:
                key = self.plan.to_json(indent=None)
                return any(h["plan"] == key for h in self.history)

        def work():
            if index is None and not evaluated() and self._evaluator is not None:
                # pinned while its accuracy is still on its way (a click right after a slider moved):
                # evaluate it now; the refresh is serialised with the background one
                self.refresh_quality()
            with self._lock:
                history = list(self.history)
                if not history:
                    raise DataError("nothing has been evaluated yet: pin a configuration once its accuracy shows")
                if index is None:
                    key = self.plan.to_json(indent=None)
                    found = [i for i, h in enumerate(history) if h["plan"] == key]
                    if not found:
                        raise DataError("the current plan has not been evaluated yet: pin it once its accuracy shows")
                    i = found[-1]
                else:
                    i = int(index)
                    if not 0 <= i < len(history):
                        raise DataError(f"no point {index} in the history (it has {len(history)})")
                h = history[i]
                pid = self._next_pin
                self._next_pin += 1
                pin = {
                    "id": pid, "label": f"#{pid}: {h['label']}", "key": h["plan"],
                    "plan": h["plan"].removesuffix(TUNED), "tuned": bool(h.get("tuned")),
                    "params": h["params"], "flops": h.get("flops"), "ratio": h.get("ratio"),
                    "quality": h.get("quality"), "agreement": h.get("agreement"), "metric": h.get("metric"),
                    "network": self.version, "source": self.source, "data": self._data_version,
                    "data_description": self.eval_description, "calibrate": self.calibrate,
                }
                self._pin_preds[pid] = self._outcomes.get(h["plan"])
                pins = [*self.pins, pin][-limits.MAX_PINS:]
                for gone in set(self._pin_preds) - {p["id"] for p in pins}:
                    del self._pin_preds[gone]
                a = pins[-2]["id"] if len(pins) > 1 else None
                self.param.update(pins=pins, compare_a=a, compare_b=pid)
            self.message = f"Pinned {pin['label']}" + (" (compared with the pin before it)." if a is not None else
                                                       ": pin another to compare them.")
            return pid

        return self._guard("Pin", work)

    def unpin(self, pin_id: int) -> bool:
        """Drop a pin."""
        with self._lock:
            pins = [p for p in self.pins if p["id"] != pin_id]
            self._pin_preds.pop(pin_id, None)
            ids = [p["id"] for p in pins]
            a = self.compare_a if self.compare_a in ids else None
            b = self.compare_b if self.compare_b in ids else (ids[-1] if ids else None)
            self.param.update(pins=pins, compare_a=a, compare_b=b)
        return True

    def _pin(self, pin_id: Any) -> dict:
        """A pin of this session's current network; DataError naming what went wrong."""
        for p in self.pins:
            if p["id"] == pin_id:
                if p["network"] != self.version:
                    raise DataError(f"pin {p['label'].split(':')[0]} was made on {p['source']}, which this session "
                                    f"has since replaced ({self.source or 'no network'}): it cannot be restored or "
                                    "compared here; pin configurations of this network instead")
                return p
        raise DataError(f"no pin {pin_id!r}: pin a point of the history first")

    def restore(self, pin_id: int) -> bool:
        """Make a pinned configuration the current plan again (a fine-tuned one: its plan; fine-tune
        again for its weights)."""

        def work():
            pin = self._pin(pin_id)
            if not self.set_plan(pin["plan"]):
                raise DataError(self.error)
            note = " Its fine-tuned weights are not kept: fine-tune again." if pin["tuned"] else ""
            self.message = f"Restored {pin['label']}.{note}"
            return True

        return bool(self._guard("Restore", work))

    # -- the comparison ---------------------------------------------------------------------
    def comparison(self, a: int | None = None, b: int | None = None) -> dict[str, Any]:
        """Two pins side by side (default: ``compare_a`` and ``compare_b``). Cheap: everything was
        measured when each was evaluated. Raises DataError for a missing or stale pin.

        Returns ``a``/``b`` (the pins), ``summary`` (rows: quantity, a, b), ``layers`` (one row
        per layer: method and rank in each, parameters in each), ``classes`` (per class: samples,
        accuracy in each; None without labels), ``changed`` (samples whose top-1 prediction
        differs: ``total``, ``shown``: [{index, label, a, b}]), ``images`` (whether the samples
        are images, see :meth:`sample_png`) and ``note`` (what could not be compared).
        """
        a = self.compare_a if a is None else a
        b = self.compare_b if b is None else b
        pa, pb = self._pin(a), self._pin(b)
        with self._lock:
            geoms = {n: l.info.geometry for n, l in self._layers.items()}
            resolved, grouped = [], []
            for p in (pa, pb):
                plan = Plan.from_json(p["plan"])
                resolved.append({r.name: r for r in plan.validate(self._model, geoms)})
                grouped.append({m: g for g in plan.resolve_groups(self._model, geoms) for m in g.members})
            latency = [self._latency_memo.get(p["plan"]) for p in (pa, pb)]
            preds = [self._pin_preds.get(pa["id"]), self._pin_preds.get(pb["id"])]
            data = self._data
            data_version = self._data_version
        layers = []
        for name in self.layer_names:
            row: dict[str, Any] = {"layer": name, "dense params": geoms[name].dense_params}
            for side, res, groups in zip("ab", resolved, grouped):
                r, g = res.get(name), groups.get(name)
                if g is not None:  # a joint group: its parameters counted once, at its first member
                    first = g.members[0]
                    row[f"method {side}"] = (f"{g.method.name} ({g.name})" if name == first
                                             else f"{g.method.name} ({g.name}, counted at {first})")
                    row[f"rank {side}"] = g.method.rank_text(g.rank)
                    row[f"params {side}"] = (int(g.method.count_params_group(g.geometries, g.rank, g.options))
                                             if name == first else 0)
                elif r is None:
                    row[f"method {side}"], row[f"rank {side}"], row[f"params {side}"] = DENSE, "", geoms[name].dense_params
                else:
                    row[f"method {side}"] = r.method.name
                    row[f"rank {side}"] = _rank_text(r.method.name, r.rank)
                    row[f"params {side}"] = get_method(r.method.name).count_params(r.geometry, r.rank, r.options)
            row["differs"] = (row["method a"], row["rank a"]) != (row["method b"], row["rank b"])
            layers.append(row)

        def lat(entry, which):
            return None if entry is None else entry.get(which)

        summary = [
            ("parameters", pa["params"], pb["params"]),
            ("FLOPs per sample", pa["flops"], pb["flops"]),
            ("compression", pa["ratio"], pb["ratio"]),
            (pa["metric"] or "accuracy", pa["quality"], pb["quality"]),
            ("agreement", pa["agreement"], pb["agreement"]),
            ("latency, batch 1 (ms)", lat(latency[0], "compressed_1"), lat(latency[1], "compressed_1")),
            ("latency, batch N (ms)", lat(latency[0], "compressed_n"), lat(latency[1], "compressed_n")),
            ("fine-tuned", pa["tuned"], pb["tuned"]),
        ]
        out: dict[str, Any] = {"a": pa, "b": pb, "summary": summary, "layers": layers, "classes": None,
                               "changed": {"total": 0, "shown": []}, "images": False, "note": ""}
        notes = []
        if pa["data"] != pb["data"]:
            notes.append("the two were evaluated on different data: per-class numbers and changed samples "
                         "are left out")
        elif preds[0] is None or preds[1] is None:
            notes.append("the outputs have no classes: per-class numbers and changed samples are left out")
        else:
            pred_a, pred_b = preds
            targets = data.targets if (data is not None and pa["data"] == data_version) else None
            labels = targets.numpy() if targets is not None and not targets.is_floating_point() else None
            if labels is not None and labels.shape == pred_a.shape:
                keep = labels != IGNORE_INDEX
                classes = []
                for c in np.unique(labels[keep]):
                    m = keep & (labels == c)
                    classes.append({"class": int(c), "samples": int(m.sum()),
                                    "accuracy a": float((pred_a[m] == c).mean()),
                                    "accuracy b": float((pred_b[m] == c).mean())})
                out["classes"] = classes
            differs = (pred_a != pred_b).reshape(len(pred_a), -1).any(axis=1)
            idx = np.flatnonzero(differs)
            shown = []
            for i in idx[:limits.MAX_CHANGED_SHOWN]:
                item = {"index": int(i), "a": pred_a[i].tolist(), "b": pred_b[i].tolist(), "label": None}
                if labels is not None and labels.shape == pred_a.shape:
                    item["label"] = labels[i].tolist()
                shown.append(item)
            out["changed"] = {"total": int(idx.size), "shown": shown, "samples": int(len(pred_a))}
            out["images"] = pa["data"] == data_version and data is not None and _is_image(data.inputs)
            if pa["data"] != data_version:
                notes.append("the evaluation data changed since: samples are listed without their images")
        out["note"] = "; ".join(notes)
        return out

    def sample_png(self, index: int, scale: int = 2) -> bytes:
        """Evaluation sample ``index`` as a PNG (image data only: (C, H, W) with 1 or 3 channels),
        stretched to 0-255, enlarged ``scale`` times."""
        data = self._data
        if data is None or not _is_image(data.inputs):
            raise DataError("the evaluation samples are not images")
        if not 0 <= int(index) < len(data.inputs):
            raise DataError(f"no evaluation sample {index}")
        x = data.inputs[int(index)].detach().float().cpu().numpy()
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
        lo, hi = float(x.min()), float(x.max())
        img = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
        img = (img * 255).round().astype(np.uint8)
        if scale > 1:
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
        return png_bytes(img)


def _is_image(inputs) -> bool:
    """Samples of shape (C, H, W) with one or three channels."""
    shape = tuple(inputs.shape[1:])
    return len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4
