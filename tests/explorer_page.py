"""What the browser tests read off the explorer's page (shared by both browser test modules).

Elements are found by the ``ts-...`` css classes the app sets; Playwright's locators pierce
Panel's shadow roots.
"""

from __future__ import annotations

import re

BASE = 431_080  # lenet5's parameters: what the page shows before any plan


def wait_loaded(pg, timeout_ms: float | None = None) -> None:
    """Until the default example is loaded and its quality measured."""
    pg.locator(".ts-params-exact").filter(has_text=f"{BASE:,}").wait_for(timeout=timeout_ms)
    pg.locator(".ts-quality-value").filter(has_text=re.compile(r"\d+\.\d%")).wait_for()
    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached")


def text(pg, css: str) -> str:
    return pg.locator(css).first.inner_text().strip()


def exact_params(pg) -> int:
    return int(text(pg, ".ts-params-exact").replace(",", ""))


def select_layer(pg, name: str) -> None:
    pg.locator(".ts-table").get_by_text(name, exact=True).first.click()
    pg.locator(".ts-spectrum-card").get_by_text(f"Spectrum of {name}").wait_for()
