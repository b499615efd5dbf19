"""Root conftest: nbval settings shared by every notebook under notebooks/.

Run the notebooks with:
    python -m pytest notebooks --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg \
        --nbval-cell-timeout 300
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# The browser-test fixtures (jupyter_lab, browser, lab_page), registered once so that every test module
# shares one JupyterLab per session. The module imports only the standard library and pytest up front.
pytest_plugins = ["tests.jupyter_fixture"]

# NOTE: nbval's kernels (and JupyterLab's, in the browser test) start in notebooks/ and inherit this
# environment: putting the repo root on PYTHONPATH makes `import npukit` work there even when the package
# is not pip-installed.
_path = os.environ.get("PYTHONPATH", "")
if str(ROOT) not in _path.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), _path) if p)


def pytest_collectstart(collector):
    # NOTE: stderr carries progress bars and warnings that differ run to run. HTML, images and widget
    # views are not compared; a cell's text/plain is, so notebooks keep it stable (dashboards print a
    # one-line repr, measured numbers go through nbval_sanitize.cfg or cells marked NBVAL_IGNORE_OUTPUT).
    path = getattr(collector, "path", None)
    if path is not None and path.suffix == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "stderr",
                                   "application/vnd.jupyter.widget-view+json", "image/png")


def pytest_collection_modifyitems(items):
    # NOTE: the session-wide sync playwright keeps an asyncio loop running in the main thread until the
    # session ends, which breaks every later asyncio.run(): run the browser tests last.
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
