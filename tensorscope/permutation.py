"""Seeded permutations of our own, stable across torch and numpy versions.

Random shuffling before a tensor decomposition (RsTD) fixes a permutation of a weight's
entries by a seed that a plan stores. ``torch.randperm``'s stream is not promised across
torch versions, so the permutation is defined here, by an algorithm that is written down
and tested against fixed outputs:

1. **Keys.** ``k_i = splitmix64(seed, i)`` for ``i = 0 .. n-1``: SplitMix64 (Steele, Lea
   and Flood 2014; the generator Java's ``SplittableRandom`` and Vigna's xoshiro seeding
   use) evaluated at counter ``i``, all arithmetic modulo ``2**64``::

       z = seed + (i + 1) * 0x9E3779B97F4A7C15
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       k_i = z ^ (z >> 31)

   (``k_0, k_1, ...`` are exactly the outputs of a sequential SplitMix64 seeded with
   ``seed``.)
2. **Order.** The permutation lists ``0 .. n-1`` sorted by their keys, ascending; equal
   keys (probability below ``n**2 / 2**65``) keep index order (a stable sort).

Sorting random keys gives every permutation with equal probability up to key ties, like a
Fisher-Yates shuffle, but runs vectorised in numpy: a 4096 x 4096 weight (16.8M entries)
takes a few seconds, where a Python Fisher-Yates loop would take minutes.

A shuffled layer uses ``perm`` as ``W.flatten() = T.flatten()[perm]``: the layer's weight,
flattened row-major, is the tensorized weight ``T`` read in the order ``perm``.
:func:`permutation_checksum` is what a checkpoint records to refuse a permutation that
changed.

References
----------
Steele, Lea, Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["splitmix64", "seeded_permutation", "permutation_checksum", "MAX_SEED"]

#: seeds are integers in [0, MAX_SEED] (SplitMix64 takes 64 bits; plans keep to 32)
MAX_SEED = 2**32 - 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"a permutation seed is an integer in [0, 2**64); got {seed!r}")
    return int(seed)


def splitmix64(seed: int, n: int) -> np.ndarray:
    """The first ``n`` outputs of SplitMix64 seeded with ``seed`` (uint64 array).

    Examples
    --------
    >>> hex(int(splitmix64(0, 1)[0]))
    '0xe220a8397b1dcdaf'
    """
    seed = _check_seed(seed)
    counters = np.arange(1, int(n) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + counters * _GOLDEN  # arrays wrap modulo 2**64
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def seeded_permutation(seed: int, n: int) -> np.ndarray:
    """The permutation of ``0 .. n-1`` that ``seed`` fixes (int64 array; see the module docstring).

    Examples
    --------
    >>> seeded_permutation(0, 8).tolist()
    [2, 4, 6, 5, 1, 7, 0, 3]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"a permutation length is a non-negative integer; got {n!r}")
    return np.argsort(splitmix64(seed, int(n)), kind="stable").astype(np.int64)


def permutation_checksum(perm) -> str:
    """``"sha256:<hex>"`` of a permutation's entries as little-endian int64 (numpy or torch)."""
    arr = perm.detach().cpu().numpy() if hasattr(perm, "detach") else np.asarray(perm)
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(arr, dtype="<i8").tobytes()).hexdigest()
