"""A Chinese (NPUKIT_LANG=zh) dashboard in a real JupyterLab: Chinese labels in the page, drawn in a CJK font.

The notebook is written on the fly under build/ (git-ignored): a LatencyDashboard on the tiny model, so the
test takes seconds, not a SmolLM2 run. The notebooks/zh/ edition itself runs under nbval.
"""
from __future__ import annotations

import json
import re

import pytest

from tests.jupyter_fixture import ROOT, run_notebook_in_browser, screenshot, shutdown_kernel, widget_output

pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
pytestmark = pytest.mark.browser

CELLS = [
    'import npukit\nfrom npukit import cjk\n\nnpukit.set_language("zh")\nprint("CJK font:", cjk.find_cjk_font())',
    'from npukit.dashboards import LatencyDashboard\n\n'
    'dash = LatencyDashboard("tiny-llama", device="cpu", dtype="float32", prompt_tokens=8, max_new_tokens=4,\n'
    '                        repeats=1, cache="with KV cache")\n'
    'dash.run()\ndash',
]

# The width of Latin text in the font, against the same text in the generic fallback: equal widths mean the
# browser does not have the font and drew the fallback instead.
_FONT_IS_INSTALLED_JS = """family => {
  const c = document.createElement('canvas').getContext('2d');
  const text = 'npukit 0123 WWW iii';
  c.font = '32px monospace';
  const fallback = c.measureText(text).width;
  c.font = `32px "${family}", monospace`;
  return c.measureText(text).width !== fallback;
}"""


def write_notebook(path) -> None:
    cells = [{"cell_type": "code", "execution_count": None, "id": f"zh{i}", "metadata": {}, "outputs": [],
              "source": src} for i, src in enumerate(CELLS)]
    nb = {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                      "name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(nb, ensure_ascii=False))


def test_zh_dashboard_shows_chinese_labels_in_a_cjk_font(lab_page):
    from npukit.cjk import find_cjk_font

    font = find_cjk_font()
    if font is None:
        pytest.skip("no CJK font installed: scripts/test.sh installs fonts-noto-cjk")
    path = ROOT / "build" / "zh_dashboard_browser_test.ipynb"
    write_notebook(path)
    page = lab_page
    run_notebook_in_browser(page, str(path.relative_to(ROOT)))
    assert page.get_by_text(f"CJK font: {font}").count() == 1  # the kernel found the same font

    dash = widget_output(page, "时延与内存")  # the title, in Chinese
    dash.get_by_text("完成：共 1 次运行").wait_for()
    assert dash.get_by_role("button", name=re.compile(r"运行$")).count() == 1  # (the icon is part of the name)
    assert "内存峰值" in dash.locator("table").inner_text() and "使用 KV Cache" in dash.inner_text()
    assert dash.locator("img").first.evaluate("img => img.naturalWidth") > 100  # the chart (labels in CJK font)

    # The label is drawn with a real CJK font, not fallback boxes: the font is installed for the browser, and the
    # title's glyphs are as wide as CJK glyphs are (about one em each; missing-glyph boxes are narrower).
    assert page.evaluate(_FONT_IS_INSTALLED_JS, font), f"chromium does not see {font}"
    em = dash.locator("h3").first.evaluate("""h => {
        const c = document.createElement('canvas').getContext('2d');
        c.font = getComputedStyle(h).font;
        return c.measureText('时延与内存').width / parseFloat(getComputedStyle(h).fontSize) / 5;
    }""")
    assert 0.9 < em < 1.1, em
    screenshot(dash, "zh_latency_dashboard")
    shutdown_kernel(page)
    path.unlink()
