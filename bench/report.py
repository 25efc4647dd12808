"""What every benchmark script shares: the machine line and its section of docs/benchmarks.md."""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def load_average() -> str:
    """The 1/5/15-minute load averages (this machine is shared: every table says how busy it was)."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_section(section: str, text: str, doc: Path = DOC) -> None:
    """Replace the ``## section`` of ``doc`` with ``text`` (or append it), leaving the others as they are."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    head = f"## {section}"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == head), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + [""] + lines[end:])
    doc.write_text(new.rstrip("\n") + "\n")
