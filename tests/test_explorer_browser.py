"""The explorer in a browser: ``panel serve apps/explorer.py`` driven by Playwright.

One server per module (starting it takes 10-15 s); each test opens its own page, i.e. its
own session. Chromium is Debian's (``/usr/bin/chromium``), never one Playwright downloads.
Elements are found by visible text or by the ``css_classes`` the app sets (``ts-...``);
Playwright's CSS locators pierce Panel's shadow roots.

Screenshots of the main views are written to ``docs/`` (the README shows them): the page as it
opens, the ranks view, two pinned configurations compared, a latency measurement.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from explorer_page import BASE, all_dense, exact_params, select_layer, text, wait_loaded, wait_params
from explorer_page import wait_text_change as wait_change

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TENSORSCOPE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 120  # s: server start and first page on a busy 2-core machine
UI_TIMEOUT = 150_000  # ms: a wait for something the page computes (generous: CI machines are shared)

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
    wait_loaded(pg, START_TIMEOUT * 1000)
    yield pg
    context.close()



DOCS = ROOT / "docs"
ACCURACY_S = 2.0  # the most a rank move may take to show its accuracy (issue 15)


def wait_quality_settled(pg) -> str:
    pg.locator(".ts-stat.ts-quality .ts-pending").wait_for(state="detached")
    return text(pg, ".ts-quality-value")


def shot(locator, name: str) -> None:
    DOCS.mkdir(exist_ok=True)
    time.sleep(1.0)  # let the plots draw
    locator.screenshot(path=str(DOCS / name))


def test_first_load_is_ready_and_its_rank_slider_moves_params_and_accuracy(page):
    """No click: the page opened on the budget plan, the largest layer's slider in view."""
    page.get_by_text("example lenet5", exact=False).first.wait_for()
    assert 0.24 * BASE < exact_params(page) < 0.26 * BASE  # the budget planner at 25%
    assert page.locator(".ts-params .ts-before").first.inner_text().startswith("431 k")  # before -> after
    page.locator(".ts-message").get_by_text("with data-aware factors", exact=False).wait_for()  # lenet5 brings data
    page.locator(".ts-controls").get_by_text("classifier.1").first.wait_for()  # the largest layer
    assert page.locator(".ts-method select").input_value() == "svd"
    for name in ("features.0", "features.3", "classifier.1", "classifier.3"):
        page.locator(".ts-table").get_by_text(name, exact=True).first.wait_for()
    assert not page.locator(".ts-error").is_visible()
    DOCS.mkdir(exist_ok=True)
    time.sleep(1.0)  # let the plots draw
    page.screenshot(path=str(DOCS / "explorer-open.png"))  # the page as it opens
    handle = page.locator(".ts-rank .noUi-handle").first
    assert handle.is_visible()
    params_before, acc_before = exact_params(page), wait_quality_settled(page)
    handle.focus()
    t0 = time.perf_counter()
    page.keyboard.press("Home")  # rank 1: the layer keeps almost nothing
    wait_change(page, ".ts-params-exact", f"{params_before:,}")
    assert exact_params(page) == BASE - 400_500 + (800 + 500) * 1 + 500
    acc_after = wait_change(page, ".ts-quality-value", acc_before, timeout=30)
    accuracy_s = time.perf_counter() - t0
    acc_after = wait_quality_settled(page)
    print(f"\nrank move -> accuracy shown: {accuracy_s:.2f} s")
    assert float(acc_after.rstrip("%")) < float(acc_before.rstrip("%")) - 20
    assert accuracy_s < ACCURACY_S, f"the accuracy took {accuracy_s:.2f} s to follow a rank move"
    assert page.locator(".ts-ranks").get_by_text("rank").count() >= 1


def test_keep_slider_changes_the_plan_as_it_moves(page):
    before = exact_params(page)
    handle = page.locator(".ts-keep .noUi-handle").first
    handle.focus()
    for _ in range(10):  # 25% -> 15%, no button
        page.keyboard.press("ArrowLeft")
    wait_change(page, ".ts-params-exact", f"{before:,}")
    page.locator(".ts-message").get_by_text("Budget: keep 15%").wait_for()
    assert 0.14 * BASE < exact_params(page) < 0.16 * BASE
    assert re.fullmatch(r"\d+\.\d%", wait_quality_settled(page))


def test_ranks_view_moves_a_layer(page):
    rows = page.locator(".ts-ranks-view .ts-rank-row")
    assert rows.count() == 4
    row = rows.filter(has_text="features.3")
    before = exact_params(page)
    row.locator(".ts-row-method select").select_option("svd")  # dense -> svd, at its default rank
    after_method = int(wait_change(page, ".ts-params-exact", f"{before:,}").replace(",", ""))
    handle = row.locator(".ts-row-rank .noUi-handle").first
    handle.wait_for()
    handle.focus()
    page.keyboard.press("Home")  # rank 1
    wait_change(page, ".ts-params-exact", f"{after_method:,}")
    assert exact_params(page) == before - 25_050 + (500 + 50) * 1 + 50
    table_row = page.locator(".ts-table .tabulator-row").filter(has_text="features.3")
    table_row.filter(has_text="svd").wait_for()  # the same plan everywhere
    wait_quality_settled(page)
    page.locator(".ts-rank-filter input").fill("classifier")  # filterable for networks of many layers
    page.locator(".ts-ranks-view .ts-rank-row").filter(has_text="features.3").wait_for(state="detached")
    assert page.locator(".ts-ranks-view .ts-rank-row").count() == 2
    page.locator(".ts-rank-filter input").fill("")
    page.locator(".ts-ranks-view .ts-rank-row").nth(3).wait_for()
    shot(page.locator(".ts-layer-row"), "explorer-ranks.png")


def test_pin_compare_and_restore(page):
    params_a = exact_params(page)
    page.locator(".ts-pin-current button").click()  # A: the plan the page opened on
    page.locator(".ts-message").get_by_text("Pinned #1").wait_for()
    handle = page.locator(".ts-rank .noUi-handle").first
    handle.focus()
    page.keyboard.press("Home")  # classifier.1 at a low rank: predictions change
    for _ in range(5):
        page.keyboard.press("ArrowUp")
    params_b = int(wait_change(page, ".ts-params-exact", f"{params_a:,}").replace(",", ""))
    wait_quality_settled(page)
    time.sleep(0.5)
    params_b = exact_params(page)
    page.locator(".ts-pin-current button").click()  # B
    page.locator(".ts-message").get_by_text("Pinned #2").wait_for()
    cmp = page.locator(".ts-compare")
    cmp.locator(".ts-compare-classes").wait_for()  # accuracy per class, side by side
    assert cmp.locator(".ts-compare-classes tr").count() == 11  # header + ten digits
    cmp.locator(".ts-changed-title").wait_for()  # the samples whose prediction changed, with their images
    assert re.search(r"\d+ of 1000 evaluation samples change", cmp.locator(".ts-changed-title").inner_text())
    assert cmp.locator(".ts-changed img").count() >= 1
    summary = cmp.locator(".ts-cmp-summary").inner_text()
    assert "A: #1" in summary and "B: #2" in summary and "parameters" in summary
    shot(page.locator(".ts-compare-card"), "explorer-compare.png")
    # any point of the history: pin the original from the history table, then compare it with A
    page.locator(".ts-history-table .tabulator-row").first.get_by_text("pin", exact=True).click()
    page.locator(".ts-message").get_by_text("Pinned #3").wait_for()
    cmp.get_by_text("B: #3: original").first.wait_for()
    page.locator(".ts-compare-a select").select_option(label=page.locator(".ts-compare-a option").nth(0).inner_text())
    cmp.get_by_text("A: #1").first.wait_for()
    page.locator(".ts-restore-a button").click()  # one click: A is the plan again
    wait_params(page, params_a)
    page.locator(".ts-message").get_by_text("Restored #1").wait_for()
    assert params_b != params_a


def test_latency_measurement_shows_a_ratio(page):
    page.locator(".ts-measure-latency button").click()
    ratio = page.locator(".ts-latency-ratio")
    ratio.wait_for()
    assert re.match(r"\d+\.\d\d× faster; batch 32: \d+\.\d\d×", ratio.first.inner_text())
    assert "FLOPs" in page.locator(".ts-latency").first.inner_text()
    page.locator(".ts-message").get_by_text("Latency on this server").wait_for()
    shot(page.locator(".ts-stats"), "explorer-latency.png")


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
    shot(page.locator(".ts-spectrum-row"), "explorer-spectrum.png")


def test_export_checkpoint_loads_with_the_shown_parameter_count(page, tmp_path):
    import tensorscope as ts

    n_shown = exact_params(page)  # the budget plan the page opened on
    wait_quality_settled(page)
    assert abs(n_shown / BASE - 0.25) < 0.02 * 0.25
    with page.expect_download(timeout=UI_TIMEOUT) as dl:
        page.locator(".ts-export-checkpoint button").click()
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    assert path.name == "lenet5-compressed.safetensors"
    model = ts.load(path)
    assert ts.count_params(model) == n_shown
    assert len(ts.plan_of(model)) >= 1 and ts.plan_of(model) is not None
    page.locator(".ts-message").get_by_text("Exported lenet5-compressed.safetensors").wait_for()
    time.sleep(1.5)
    page.screenshot(path=str(DOCS / "explorer.png"), full_page=True)


def test_corrupt_upload_shows_an_error_and_keeps_the_model(page):
    shown = text(page, ".ts-params-exact")
    page.locator(".ts-model-file input[type=file]").set_input_files(
        files=[{"name": "broken.pt", "mimeType": "application/octet-stream", "buffer": b"\x80\x02garbage" * 64}])
    time.sleep(0.5)  # the file travels over the websocket
    page.locator(".ts-upload button").click()
    err = page.locator(".ts-error").get_by_text("Could not load 'broken.pt'")
    err.wait_for()
    assert shown == text(page, ".ts-params-exact")  # the example and its plan are still loaded
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
        wait_loaded(a, START_TIMEOUT * 1000)
        wait_loaded(b, START_TIMEOUT * 1000)
        opened = exact_params(a)
        select_layer(a, "features.3")
        a.locator(".ts-method select").select_option("svd")
        a_params = wait_change(a, ".ts-params-exact", f"{opened:,}")
        all_dense(b)
        b_params = text(b, ".ts-params-exact")
        assert a_params != b_params
        time.sleep(1.0)
        assert text(a, ".ts-params-exact") == a_params  # b's plan did not reach a
        assert text(b, ".ts-params-exact") == b_params
        # b never selected features.3: its controls still show the layer it opened on
        b.locator(".ts-controls").get_by_text("classifier.1").first.wait_for(timeout=5000)
    finally:
        for ctx in contexts:
            ctx.close()


def test_data_aware_switch_and_fine_tune(page):
    acc_aware = wait_quality_settled(page)  # the page opened in data-aware mode
    page.get_by_text("what each layer's", exact=False).first.wait_for()  # the sidebar says what is shown
    page.locator(".ts-calibrate:not(.bk-disabled)").wait_for()  # disabled while the page is busy
    page.locator(".ts-calibrate").first.click()  # off: the weights alone
    page.locator(".ts-message").get_by_text("Data-aware mode off").wait_for()
    wait_quality_settled(page)
    page.locator(".ts-calibrate:not(.bk-disabled)").wait_for()
    page.locator(".ts-calibrate").first.click()  # and on again
    page.locator(".ts-message").get_by_text("Data-aware mode on").wait_for()
    wait_quality_settled(page)
    page.locator(".ts-finetune-steps input").fill("20")
    page.locator(".ts-finetune-steps input").press("Enter")
    page.locator(".ts-finetune button").click()
    page.locator(".ts-message").get_by_text("Fine-tuned 20 steps").wait_for()
    page.get_by_text("exports are the fine-tuned model", exact=False).first.wait_for()
    assert not page.locator(".ts-error").is_visible()
    assert re.fullmatch(r"\d+\.\d%", acc_aware)


def test_stop_ends_a_long_fine_tune_and_keeps_its_weights(page):
    box = page.locator(".ts-finetune-steps input")
    box.fill("5000")
    box.press("Enter")
    assert not page.locator(".ts-stop").is_visible()  # shown only while a job it can end runs
    page.locator(".ts-finetune button").click()
    page.locator(".ts-stop button").click()
    page.locator(".ts-message").get_by_text("Fine-tuning stopped on request (of 5000 steps").wait_for()
    page.locator(".ts-stop").wait_for(state="hidden")


def test_compress_in_stages_plots_each_stage_and_a_refused_folder_is_a_message(page):
    # a model folder typed in the page: refused on a server that did not opt in, the session kept
    shown = text(page, ".ts-params-exact")
    page.locator(".ts-folder input").fill("/etc")
    page.locator(".ts-load-folder button").click()
    page.locator(".ts-error").get_by_text("TENSORSCOPE_EXPLORER_HF_ROOT").wait_for()
    assert shown == text(page, ".ts-params-exact")
    # compress in stages: two stages, a short fine-tune each, then their plot
    for css, value in ((".ts-stages input", "2"), (".ts-finetune-steps input", "10")):
        box = page.locator(css).first
        box.fill(value)
        box.press("Enter")
    page.locator(".ts-iterative button").click()
    page.locator(".ts-message").get_by_text("Iterative (budget, 2 stage(s)").wait_for(timeout=240_000)
    plot = page.locator(".ts-stages-card")
    plot.locator("canvas").first.wait_for()  # Bokeh draws the plots (titles included) on canvases
    assert shown == text(page, ".ts-params-exact")  # the session's plan is left as it was
    shot(plot, "explorer-stages.png")
