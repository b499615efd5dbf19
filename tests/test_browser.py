"""The dashboards in a real JupyterLab: open each dashboard notebook, run all, change a control, check it updates.

One JupyterLab serves the whole session (fixtures in ``jupyter_fixture.py``, registered by the root
conftest, so new test modules get them too); screenshots of each dashboard before and
after the change go to $NPUKIT_ARTIFACTS (default artifacts/). Slow by nature (each notebook loads
SmolLM2 and runs its cells), so they carry the ``browser`` marker: ``pytest -m "not browser"`` skips them.
"""
from __future__ import annotations

import re

import pytest

from tests.jupyter_fixture import run_notebook_in_browser, screenshot, shutdown_kernel, widget_output

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)").expect
pytestmark = pytest.mark.browser

# NOTE: a dashboard run on a busy 2-core machine takes tens of seconds; waits are generous on purpose.
RUN_TIMEOUT_MS = 300_000


def test_precision_dashboard_in_browser(lab_page):
    page = lab_page
    run_notebook_in_browser(page, "notebooks/02_precision_and_memory.ipynb")
    dash = widget_output(page, "Precision: fp32 vs bf16 vs fp16")
    table = dash.locator("table")
    assert "fp16" in table.inner_text() and "bf16" in table.inner_text()
    screenshot(dash, "02_precision_dashboard")

    dash.get_by_role("checkbox", name="fp16 (float16)").uncheck()
    dash.get_by_role("button", name="Compare").click()
    dash.get_by_text("done: 2 precisions compared").wait_for(timeout=RUN_TIMEOUT_MS)
    text = table.inner_text()
    assert "fp32" in text and "bf16" in text and "fp16" not in text
    assert dash.locator("img").first.evaluate("img => img.naturalWidth") > 100  # the bar charts
    screenshot(dash, "02_precision_dashboard_after_compare")
    shutdown_kernel(page)


def test_generation_dashboard_streams_in_browser(lab_page):
    page = lab_page
    run_notebook_in_browser(page, "notebooks/03_generation_parameters.ipynb")
    dash = widget_output(page, "Generation parameters")
    readout = dash.get_by_text(re.compile(r"^TTFT .* tok/s"))
    readout_before = readout.inner_text()
    screenshot(dash, "03_generation_dashboard")

    prompt = dash.locator("textarea").first
    prompt.fill("Tell me a short story about a robot.")
    dash.locator(".widget-dropdown").filter(has_text="preset").locator("select").select_option("creative")
    # Count how often the reply box changes while generating: streaming means many small updates.
    reply_box = dash.locator(".widget-html").filter(has_text="you:").first
    reply_box.evaluate("""el => {
        window.__npukitUpdates = 0;
        new MutationObserver(() => window.__npukitUpdates++).observe(el, {subtree: true, childList: true,
                                                                         characterData: true});
    }""")
    dash.get_by_role("button", name="Generate").click()
    expect(dash.locator("table tbody tr")).to_have_count(2, timeout=RUN_TIMEOUT_MS)  # the notebook's run + this one
    dash.get_by_text(re.compile(r"^done: \d+ tokens")).wait_for()

    assert "Tell me a short story about a robot." in reply_box.inner_text()
    assert page.evaluate("window.__npukitUpdates") >= 3, "the reply did not stream"
    readout_after = readout.inner_text()
    assert readout_after != readout_before and "tok/s" in readout_after
    screenshot(dash, "03_generation_dashboard_after_generate")
    shutdown_kernel(page)


def test_latency_dashboard_in_browser(lab_page):
    page = lab_page
    run_notebook_in_browser(page, "notebooks/04_kv_cache.ipynb")
    dash = widget_output(page, "Latency and memory")
    assert "no cache" in dash.locator("table").inner_text()
    screenshot(dash, "04_latency_dashboard")

    dash.get_by_role("button", name="with KV cache", exact=True).click()
    dash.get_by_role("button", name=re.compile(r"\bRun$")).click()
    dash.get_by_text(re.compile(r"^done: 3 runs of 32 prompt")).wait_for(timeout=RUN_TIMEOUT_MS)
    text = dash.locator("table").inner_text()
    assert "KV cache" in text and "no cache" not in text
    assert dash.locator("img").first.evaluate("img => img.naturalWidth") > 100
    screenshot(dash, "04_latency_dashboard_after_run")
    shutdown_kernel(page)
