"""The explorer in a browser: ``panel serve apps/explorer.py`` driven by Playwright.

One server per module (starting it takes 10-15 s); each test opens its own page, i.e. its
own session. Chromium is Debian's (``/usr/bin/chromium``), never one Playwright downloads.
Elements are found by visible text or by the ``css_classes`` the app sets (``ts-...``);
Playwright's CSS locators pierce Panel's shadow roots.

Screenshots of the main views are written to ``docs/`` (the README shows one).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from explorer_page import select_layer, text, wait_loaded

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TENSORSCOPE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 120  # s: server start and first page on a busy 2-core machine
UI_TIMEOUT = 60_000  # ms: a wait for something the page computes

playwright_sync = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)


@pytest.fixture
def page(browser, server):
    """A new session with the default example loaded."""
    context = browser.new_context(viewport={"width": 1600, "height": 1400}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(UI_TIMEOUT)
    pg.goto(server, timeout=START_TIMEOUT * 1000)
    wait_loaded(pg)
    yield pg
    context.close()


def wait_change(pg, css: str, old: str, timeout: float = UI_TIMEOUT / 1000) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = text(pg, css)
        if now != old:
            return now
        time.sleep(0.1)
    raise AssertionError(f"{css} stayed {old!r}")


def wait_quality_settled(pg) -> str:
    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached")
    return text(pg, ".ts-quality-value")


def test_page_loads_with_the_example(page):
    page.get_by_text("example lenet5", exact=False).first.wait_for()
    assert text(page, ".ts-params-value") == "431 k"
    assert re.fullmatch(r"\d+\.\d%", text(page, ".ts-quality-value"))
    for name in ("features.0", "features.3", "classifier.1", "classifier.3"):
        page.locator(".ts-table").get_by_text(name, exact=True).first.wait_for()
    assert not page.locator(".ts-error").is_visible()


def test_rank_slider_changes_parameters_and_accuracy(page):
    select_layer(page, "classifier.1")
    page.locator(".ts-method select").select_option("svd")
    handle = page.locator(".ts-rank .noUi-handle").first
    handle.wait_for()
    params_before = wait_change(page, ".ts-params-exact", "431,080")
    acc_before = wait_quality_settled(page)
    handle.focus()
    page.keyboard.press("Home")  # rank 1: the layer keeps almost nothing
    params_after = wait_change(page, ".ts-params-exact", params_before)
    assert int(params_after.replace(",", "")) < int(params_before.replace(",", ""))
    assert int(params_after.replace(",", "")) == 431_080 - 400_500 + (800 + 500) * 1 + 500
    acc_after = wait_change(page, ".ts-quality-value", acc_before)
    acc_after = wait_quality_settled(page)
    assert float(acc_after.rstrip("%")) < float(acc_before.rstrip("%")) - 20
    assert page.locator(".ts-ranks").get_by_text("rank").count() >= 1


def test_table_sorts_searches_and_shows_the_spectrum(page):
    table = page.locator(".ts-table")
    table.locator(".tabulator-col[tabulator-field='params'] .tabulator-col-title").click()  # sort by size
    select_layer(page, "classifier.3")  # a click in the sorted table selects the row clicked
    table.get_by_placeholder("search").click()
    page.keyboard.type("classifier")  # the search box filters the rows as one types
    table.get_by_text("features.0", exact=True).wait_for(state="detached")
    assert table.get_by_text("classifier.1", exact=True).count() >= 1
    page.keyboard.press("Control+A")
    page.keyboard.press("Backspace")
    table.get_by_text("features.3", exact=True).wait_for()
    select_layer(page, "features.3")
    card = page.locator(".ts-spectrum-card")
    card.locator("canvas").nth(2).wait_for()  # singular values, energy, error vs parameters
    page.locator(".ts-method select").select_option("tucker2")
    page.locator(".ts-rank .noUi-handle").nth(1).wait_for()  # two sliders: r_out and r_in
    assert page.locator(".ts-rank .noUi-handle").count() == 2
    wait_quality_settled(page)
    time.sleep(1.0)  # let the plots draw
    (ROOT / "docs").mkdir(exist_ok=True)
    page.locator(".ts-spectrum-row").screenshot(path=str(ROOT / "docs" / "explorer-spectrum.png"))


def test_export_checkpoint_loads_with_the_shown_parameter_count(page, tmp_path):
    import tensorscope as ts

    page.locator(".ts-auto button").click()  # the budget planner at the default 25%
    shown = wait_change(page, ".ts-params-exact", "431,080")
    wait_quality_settled(page)
    n_shown = int(shown.replace(",", ""))
    assert abs(n_shown / 431_080 - 0.25) < 0.02 * 0.25
    with page.expect_download(timeout=UI_TIMEOUT) as dl:
        page.locator(".ts-export-checkpoint button").click()
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.name == "lenet5-compressed.safetensors"
    model = ts.load(path)
    assert ts.count_params(model) == n_shown
    assert len(ts.plan_of(model)) >= 1 and ts.plan_of(model) is not None
    page.locator(".ts-message").get_by_text("Exported lenet5-compressed.safetensors").wait_for()
    select_layer(page, "classifier.1")  # a layer the plan cuts, for the screenshot
    time.sleep(1.5)
    page.screenshot(path=str(ROOT / "docs" / "explorer.png"), full_page=True)


def test_corrupt_upload_shows_an_error_and_keeps_the_model(page):
    page.locator(".ts-model-file input[type=file]").set_input_files(
        files=[{"name": "broken.pt", "mimeType": "application/octet-stream", "buffer": b"\x80\x02garbage" * 64}])
    time.sleep(0.5)  # the file travels over the websocket
    page.locator(".ts-upload button").click()
    err = page.locator(".ts-error").get_by_text("Could not load 'broken.pt'")
    err.wait_for()
    assert "431,080" == text(page, ".ts-params-exact")  # the example is still loaded
    select_layer(page, "classifier.3")  # and the page still works


def test_sessions_do_not_share_state(browser, server):
    pages = []
    contexts = []
    for _ in range(2):
        ctx = browser.new_context(viewport={"width": 1400, "height": 1200})
        pg = ctx.new_page()
        pg.set_default_timeout(UI_TIMEOUT)
        pg.goto(server, timeout=START_TIMEOUT * 1000)
        contexts.append(ctx)
        pages.append(pg)
    try:
        a, b = pages
        wait_loaded(a)
        wait_loaded(b)
        select_layer(a, "classifier.1")
        a.locator(".ts-method select").select_option("svd")
        a_params = wait_change(a, ".ts-params-exact", "431,080")
        b.locator(".ts-auto button").click()
        b_params = wait_change(b, ".ts-params-exact", "431,080")
        assert a_params != b_params
        time.sleep(1.0)
        assert text(a, ".ts-params-exact") == a_params  # b's plan did not reach a
        assert text(b, ".ts-params-exact") == b_params
        # b never selected classifier.1: its controls still show the first layer
        b.locator(".ts-controls").get_by_text("features.0").first.wait_for(timeout=5000)
    finally:
        for ctx in contexts:
            ctx.close()


def test_data_aware_switch_and_fine_tune(page):
    page.locator(".ts-auto button").click()  # a plan to fine-tune: the budget at 25%
    wait_change(page, ".ts-params-exact", "431,080")
    acc_plain = wait_quality_settled(page)
    page.locator(".ts-calibrate").first.click()  # "use calibration data"
    page.locator(".ts-message").get_by_text("Data-aware mode on").wait_for()
    page.get_by_text("what each layer's", exact=False).first.wait_for()  # the sidebar says what is shown
    wait_quality_settled(page)
    page.locator(".ts-finetune-steps input").fill("20")
    page.locator(".ts-finetune-steps input").press("Enter")
    page.locator(".ts-finetune button").click()
    page.locator(".ts-message").get_by_text("Fine-tuned 20 steps").wait_for()
    page.get_by_text("exports are the fine-tuned model", exact=False).first.wait_for()
    assert not page.locator(".ts-error").is_visible()
    assert re.fullmatch(r"\d+\.\d%", acc_plain)
