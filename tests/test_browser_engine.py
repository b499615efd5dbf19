"""The engine tuning dashboard (notebook 07) in a real JupyterLab: run the notebook, change knobs in the
browser, run again, and check that the table, plots and status line follow; a bad knob combination must
show in the status line and leave the dashboard usable.

Uses the harness of ``jupyter_fixture.py`` (one JupyterLab per session, Debian's chromium). Screenshots go
to $NPUKIT_ARTIFACTS (default artifacts/). Slow by nature: ``pytest -m "not browser"`` skips it.
"""
from __future__ import annotations

import re

import pytest

# NOTE: the fixtures (jupyter_lab, browser, lab_page) come from the root conftest's pytest_plugins; importing
# them here again would start a second session-wide playwright beside the first.
from tests.jupyter_fixture import run_notebook_in_browser, screenshot, shutdown_kernel, widget_output

expect = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)").expect
pytestmark = pytest.mark.browser

RUN_TIMEOUT_MS = 300_000  # a dashboard run on a busy 2-core machine takes tens of seconds


def set_slider(dash, description: str, value: int) -> None:
    """Type a value into an ipywidgets slider's editable readout (as a user would)."""
    readout = dash.locator(".widget-slider").filter(has_text=description).locator(".widget-readout")
    readout.click()
    readout.press("Control+A")
    readout.type(str(value))
    readout.press("Enter")
    expect(readout).to_have_text(str(value))


def test_engine_dashboard_in_browser(lab_page):
    page = lab_page
    run_notebook_in_browser(page, "notebooks/07_benchmark_and_tune.ipynb")
    dash = widget_output(page, "Engine tuning")
    table = dash.locator("table")
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(2)  # the notebook's run and its HF static comparison
    assert "run 1" in table.inner_text() and "HF static batches" in table.inner_text()
    chart = dash.locator("img").first
    assert chart.evaluate("img => img.naturalWidth") > 100
    chart_before = chart.get_attribute("src")
    screenshot(dash, "07_engine_dashboard")

    # a second run with other knobs, without the (slow) static comparison, on the same workload as the first
    first = dash.get_by_text(re.compile(r"^done: run 1: \d+ requests")).inner_text()
    num_requests = re.search(r"run 1: (\d+) requests", first).group(1)
    dash.get_by_role("checkbox", name="also run HF static batches").uncheck()
    set_slider(dash, "max_num_seqs", 4)
    dash.get_by_role("button", name=re.compile(r"\bRun$")).click()
    dash.get_by_text(re.compile(rf"^done: run 2: {num_requests} requests")).wait_for(timeout=RUN_TIMEOUT_MS)
    expect(rows).to_have_count(3)
    second = rows.nth(1).locator("td")
    assert second.nth(0).inner_text() == "run 2" and second.nth(1).inner_text() == "4"  # max_num_seqs column
    expect(chart).not_to_have_attribute("src", chart_before)  # the plots were redrawn
    screenshot(dash, "07_engine_dashboard_after_run")

    # a KV cache too small for one prompt: the status line says why, nothing is added, the buttons work
    set_slider(dash, "num_kv_blocks", 1)
    dash.get_by_role("button", name=re.compile(r"\bRun$")).click()
    dash.get_by_text(re.compile(r"ValueError: the prompt has \d+ tokens but the whole KV cache holds 16")).wait_for(
        timeout=RUN_TIMEOUT_MS)
    expect(rows).to_have_count(3)
    expect(dash.get_by_role("button", name=re.compile(r"\bRun$"))).to_be_enabled()
    screenshot(dash, "07_engine_dashboard_error")
    shutdown_kernel(page)
