"""Numbers with units, read the same in the CLI, the explorer and the notebooks."""

from __future__ import annotations

import math

from .errors import DataError

__all__ = ["format_count", "format_bytes", "text_table", "parse_shape"]


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


def text_table(rows: list[list[str]], header: list[str], align: str = "") -> str:
    """A plain-text table; ``align`` has one ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r: list) -> str:
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def parse_shape(text: str, what: str = "input shape", max_numel: int | None = None) -> tuple[int, ...]:
    """One sample's shape from text: ``"3,32,32"``, ``"3x32x32"``, ``"(3, 32, 32)"`` -> ``(3, 32, 32)``.

    Raises :class:`~tensorscope.errors.DataError` (naming ``what``) for empty text, anything
    that is not integers separated by commas or ``x``, a size that is not positive, or more
    than ``max_numel`` elements in all (no limit by default).
    """
    raw = "" if text is None else str(text)
    body = raw.strip().strip("()[]").strip()
    if not body:
        raise DataError(f"{what} is empty: give one sample's shape (no batch dimension), like 1,28,28")
    try:
        shape = tuple(int(p) for p in body.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise DataError(f"{what} must be integers separated by commas, like 1,28,28 (one sample, no batch); "
                        f"got {raw!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise DataError(f"{what} must be positive integers like 1,28,28; got {raw!r}")
    if max_numel is not None and math.prod(shape) > max_numel:
        raise DataError(f"{what} {raw!r} has {math.prod(shape):,} elements per sample; at most {max_numel:,} allowed")
    return shape
