"""A bounded, thread-safe memo for expensive factorizations (SVDs, Gram eigendecompositions).

Keys start with a fingerprint of the weight's bytes, so the same weights share one entry
across models, sessions and calls, and an edited weight never hits a stale entry. Values
are immutable tensors: callers must not modify what they get back.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

import torch


class TensorMemo:
    """Per-tensor memo of a value derived from its contents, valid while the tensor is unchanged.

    Keyed weakly by the tensor object and checked against its storage pointer, version
    counter (bumped by in-place writes), shape, dtype and strides, so an edited or swapped
    weight (``layer.weight.data = w``) is never served a stale value. Hashing or scanning a
    64 MB weight takes tens of milliseconds: a slider move must not pay it each time.
    """

    def __init__(self):
        self._memo: dict[int, tuple] = {}  # id(tensor) -> (weakref, state, value, sample)
        self._lock = threading.Lock()

    @staticmethod
    def _state(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, tuple(t.stride()), t.device)

    @staticmethod
    def _sample(t: torch.Tensor) -> torch.Tensor | None:
        """64 evenly spaced entries: writes through ``.data`` do not bump the version counter."""
        d = t.detach()
        if not d.is_contiguous() or d.numel() == 0:
            return None
        flat = d.view(-1)
        return flat[:: max(1, flat.numel() // 64)][:64].clone()

    def get(self, t: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        state, sample = self._state(t), self._sample(t)
        key = id(t)
        with self._lock:
            hit = self._memo.get(key)
        if (hit is not None and hit[0]() is t and hit[1] == state
                and (sample is None) == (hit[3] is None) and (sample is None or torch.equal(sample, hit[3]))):
            return hit[2]
        value = compute(t)
        try:
            ref = weakref.ref(t, lambda _r, key=key: self._forget(key, _r))
        except TypeError:  # not weak-referenceable: do not memoise
            return value
        with self._lock:
            self._memo[key] = (ref, state, value, sample)
        return value

    def _forget(self, key: int, ref: "weakref.ref") -> None:
        with self._lock:
            if key in self._memo and self._memo[key][0] is ref:
                del self._memo[key]


_fingerprints = TensorMemo()
#: whether a parameter holds only finite values (see ``methods.base.check_finite``)
finite_memo = TensorMemo()


def fingerprint(t: torch.Tensor) -> str:
    """A content hash of a tensor (shape, dtype and bytes), memoised while it is unchanged."""
    return _fingerprints.get(t, _fingerprint)


def _fingerprint(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    shape = tuple(t.shape)  # the real shape: a (5, 2, 1, 1) and a (5, 1, 2, 1) kernel share their bytes
    t = t.contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{shape}|{t.dtype}".encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    if isinstance(getattr(v, "tensors", None), dict):  # a method's Factors
        return _nbytes(v.tensors)
    return 64


class FactorCache:
    """LRU memo bounded by bytes. ``misses`` counts computations (tests check it)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Event] = {}  # keys being computed now
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value for ``key``, computing it once even when threads ask at the same time.

        Different keys compute in parallel; a second caller of a key being computed waits for
        that computation instead of repeating it (an SVD of a big layer takes seconds).
        """
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return self._data[key][0]
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._pending[key] = threading.Event()
                    break
            pending.wait()  # finished: loop to read it (or, if it failed or was too big, compute)
        try:
            value = compute()  # outside the lock: other layers may compute meanwhile
        except BaseException:
            with self._lock:
                del self._pending[key]
            pending.set()
            raise
        size = _nbytes(value)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes:
                self._data[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, s) = self._data.popitem(last=False)
                    self._bytes -= s
            del self._pending[key]
        pending.set()
        return value

    def peek(self, key: Hashable) -> Any:
        """The cached value for ``key``, or None; never computes."""
        with self._lock:
            hit = self._data.get(key)
            return None if hit is None else hit[0]

    @contextlib.contextmanager
    def limited(self, max_bytes: int) -> Iterator[None]:
        """Hold at most ``max_bytes`` while the block runs (then the previous limit again).

        Streaming a model from disk factorizes one layer after another: a 1 GiB memo of
        their SVDs would hold more than the layers themselves.
        """
        with self._lock:
            old = self.max_bytes
            self.max_bytes = min(old, max(int(max_bytes), 0))
            self._trim()
        try:
            yield
        finally:
            with self._lock:
                self.max_bytes = old

    def _trim(self) -> None:
        while self._bytes > self.max_bytes and self._data:
            _, (_, s) = self._data.popitem(last=False)
            self._bytes -= s

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)


#: the process-wide cache used by methods and spectra
factor_cache = FactorCache()
