"""What the browser tests read off the explorer's page (shared by both browser test modules).

Elements are found by the ``ts-...`` css classes the app sets; Playwright's locators pierce
Panel's shadow roots.
"""

from __future__ import annotations

import re
import time

BASE = 431_080  # lenet5's parameters: the original network, every layer dense
UI_TIMEOUT_S = 150.0


def wait_loaded(pg, timeout_ms: float | None = None) -> None:
    """Until the default example is open: its budget plan in place, the accuracy measured and the
    selected layer's rank slider in view."""
    pg.locator(".ts-message").get_by_text("Opened on the budget planner").wait_for(timeout=timeout_ms)
    pg.locator(".ts-quality-value").filter(has_text=re.compile(r"\d+\.\d%")).wait_for(timeout=timeout_ms)
    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached", timeout=timeout_ms)
    pg.locator(".ts-rank .noUi-handle").first.wait_for(timeout=timeout_ms)


def text(pg, css: str) -> str:
    return pg.locator(css).first.inner_text().strip()


def exact_params(pg) -> int:
    return int(text(pg, ".ts-params-exact").replace(",", ""))


def wait_text_change(pg, css: str, old: str, timeout: float = UI_TIMEOUT_S) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = text(pg, css)
        if now != old:
            return now
        time.sleep(0.05)
    raise AssertionError(f"{css} stayed {old!r}")


def wait_params(pg, want: int, timeout: float = UI_TIMEOUT_S) -> float:
    """Seconds until the page shows ``want`` parameters."""
    t0 = time.perf_counter()
    while time.perf_counter() < t0 + timeout:
        if exact_params(pg) == want:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise AssertionError(f"the page shows {exact_params(pg):,} parameters, not {want:,}, after {timeout:.0f} s")


def all_dense(pg) -> None:
    """Undo the plan the page opened on: every layer dense."""
    pg.locator(".ts-reset button").click()
    wait_params(pg, BASE)
    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached")


def select_layer(pg, name: str) -> None:
    pg.locator(".ts-table").get_by_text(name, exact=True).first.click()
    pg.locator(".ts-spectrum-card").get_by_text(f"Spectrum of {name}").wait_for()
