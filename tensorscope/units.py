"""Numbers with units, read the same in the CLI, the explorer and the notebooks."""

from __future__ import annotations

import math

__all__ = ["format_count", "format_bytes"]


def format_count(n: float | int | None, unit: str = "") -> str:
    """``431080`` -> ``"431 k"``; with a unit, ``format_count(431080, "params")`` -> ``"431 k params"``."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "n/a"
    n = float(n)
    text = f"{n:.0f}"
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            text = f"{n / div:.3g} {prefix}"
            break
    return f"{text} {unit}" if unit else text


def format_bytes(n: float | int | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for div, unit in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"
