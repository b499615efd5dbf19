"""The notebooks' conventions, checked without running them (nbval runs them)."""
import json
import re
from pathlib import Path

import pytest

# NOTE: every notebook follows these conventions (issue 9), in both editions (issue 14: notebooks/zh/).
_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(_DIR.glob("[0-9][0-9]_*.ipynb")) + sorted((_DIR / "zh").glob("[0-9][0-9]_*.ipynb"))
TRY_IT = ("## Try it", "## 动手试一试")  # the heading in each edition


def cells(path, kind):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_device_and_dtype_come_from_the_settings_cell(path):
    code = cells(path, "code")
    text = "\n".join(code)
    assert not re.search(r"device\s*=\s*['\"]cpu['\"]", text), "pin no device: use DEVICE"
    # every load_model(...) call outside NPU-only demonstrations (# NBVAL_SKIP), its arguments
    calls = [m.group(1) for c in code if "NBVAL_SKIP" not in c
             for m in re.finditer(r"load_model\((.*?)\)", c, flags=re.S)]
    if calls:
        settings = [c for c in code if 'os.environ.get("NPUKIT_DEVICE", "auto")' in c]
        assert len(settings) == 1 and 'os.environ.get("NPUKIT_DTYPE", "auto")' in settings[0]
    for args in calls:
        assert "device=DEVICE" in args, args
        # a dtype other than DTYPE only where the lesson compares precisions explicitly
        assert "dtype=DTYPE" in args or re.search(r'dtype=("float32"|half\b)', args), args

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_try_it_item_has_an_answer(path):
    try_it = [c for c in cells(path, "markdown") if c.startswith(TRY_IT)]
    assert len(try_it) == 1
    items = re.findall(r"^\d+\. ", try_it[0], flags=re.M)
    assert items and try_it[0].count("<details>") == len(items) == try_it[0].count("</details>")


def test_glossary_defines_the_jargon():
    glossary = (Path(__file__).resolve().parents[1] / "docs" / "glossary.md").read_text()
    for term in ("CANN", "ATB", "GQA", "TTFT", "TPOT", "ITL", "p99", "E2E", "memory-bound", "batch invariance"):
        assert term in glossary, term
