"""A real JupyterLab for browser tests, driven by playwright with Debian's chromium.

    # the fixtures are registered for every test module by the root conftest (pytest_plugins)
    from tests.jupyter_fixture import run_notebook_in_browser, widget_output

    @pytest.mark.browser
    def test_something(lab_page):
        run_notebook_in_browser(lab_page, "notebooks/03_generation_parameters.ipynb")
        dash = widget_output(lab_page, "Generation parameters")
        ...

- ``jupyter_lab`` (session): one ``jupyter lab`` on 127.0.0.1, empty token, root = the repo. Its settings,
  workspaces and runtime files live in a temporary folder; autosave is off, so running notebooks in the
  browser never rewrites the stored notebooks.
- ``browser`` (session): chromium from ``/usr/bin/chromium`` (no playwright browser download).
- ``lab_page`` (per test): a fresh page whose relative URLs point at the JupyterLab.
- ``run_notebook_in_browser(page, path)``: open a notebook, wait for its kernel, run all cells, wait until
  every cell has run and the kernel is idle; fails with the cell's error if one raised.
- ``shutdown_kernel(page)``, ``widget_output(page, text)``, ``screenshot(locator_or_page, name)``.

Screenshots go to ``$NPUKIT_ARTIFACTS`` (default ``artifacts/``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from npukit.parallel.executor import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NPUKIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 120
# NOTE: generous: a notebook that loads SmolLM2 and runs a dashboard takes ~1 min on a busy 2-core box.
RUN_ALL_TIMEOUT_S = 600

# JupyterLab user settings for the test server: no autosave (the repo's notebooks must not change),
# every cell kept in the DOM (no windowing), no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


def artifacts_dir() -> Path:
    path = Path(os.environ.get("NPUKIT_ARTIFACTS") or ROOT / "artifacts")
    if not path.is_absolute():
        path = ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class JupyterLab:
    url: str  # http://127.0.0.1:PORT/
    root: Path
    home: Path  # temporary config / data / runtime / settings
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_jupyter_lab(root: Path = ROOT) -> JupyterLab:
    """Start ``jupyter lab`` and wait until it answers; raise with its log if it does not."""
    import httpx

    home = Path(tempfile.mkdtemp(prefix="npukit-lab-"))
    settings = home / "settings"
    for name, values in LAB_SETTINGS.items():
        target = settings / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    port = free_port()
    env = dict(os.environ)
    # NOTE: the kernels inherit PYTHONPATH (set by the root conftest) so `import npukit` works uninstalled.
    env.update(JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
    log = home / "jupyter.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
           "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={settings}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.news_url=",
           "--ServerApp.port_retries=0",
           # NOTE: an absolute checkpoint_dir keeps JupyterLab's open-time checkpoints out of the repo.
           f"--FileCheckpoints.checkpoint_dir={home / 'checkpoints'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers often run as root
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=root,
                               start_new_session=True)
    lab = JupyterLab(f"http://127.0.0.1:{port}/", root, home, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            if httpx.get(lab.url + "api/status", timeout=2).status_code == 200:
                return lab
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_jupyter_lab(lab)
    raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT_S} s:\n{lab.log_tail()}")


def stop_jupyter_lab(lab: JupyterLab) -> None:
    # NOTE: the server was started in its own session: terminate only that process (it shuts its
    # kernels down), then kill it if it hangs.
    if lab.process.poll() is None:
        lab.process.terminate()
        try:
            lab.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.process.kill()
            lab.process.wait(timeout=10)
    shutil.rmtree(lab.home, ignore_errors=True)


@pytest.fixture(scope="session")
def jupyter_lab():
    lab = start_jupyter_lab()
    yield lab
    stop_jupyter_lab(lab)


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def lab_page(browser, jupyter_lab):
    context = browser.new_context(base_url=jupyter_lab.url, viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.jupyter_lab = jupyter_lab  # for helpers that need the server (log tail in failures)
    yield page
    context.close()


# ------------------------------------------------------------------------------------------------
# Driving a notebook
# ------------------------------------------------------------------------------------------------

_STATE_JS = """() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return {ready: false};
  const session = panel.sessionContext.session;
  const kernel = session && session.kernel;
  const cells = panel.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  cells.forEach((c, i) => {
    for (const o of c.model.outputs.toJSON()) {
      if (o.output_type === 'error') errors.push({cell: i, ename: o.ename, evalue: o.evalue});
    }
  });
  return {
    ready: true,
    path: panel.context.path,
    kernel: kernel ? kernel.status : 'none',
    cells: cells.length,
    executed: cells.filter(c => c.model.executionCount !== null).length,
    running: cells.filter(c => c.promptNode && c.promptNode.textContent.includes('*')).length,
    errors,
  };
}"""


def notebook_state(page) -> dict:
    return page.evaluate(_STATE_JS)


def wait_for_kernel_idle(page, timeout_s: float = RUN_ALL_TIMEOUT_S, settle_polls: int = 3) -> dict:
    """Wait until no cell is running and the kernel is idle for a few polls in a row."""
    deadline = time.monotonic() + timeout_s
    calm, state = 0, {}
    while time.monotonic() < deadline:
        state = notebook_state(page)
        if state.get("ready") and state["kernel"] == "idle" and state["running"] == 0:
            calm += 1
            if calm >= settle_polls:
                return state
        else:
            calm = 0
        page.wait_for_timeout(500)
    raise AssertionError(f"kernel not idle after {timeout_s} s: {state}")


def run_notebook_in_browser(page, path: str, timeout_s: float = RUN_ALL_TIMEOUT_S) -> dict:
    """Open ``path`` (relative to the repo) in JupyterLab, run all cells, wait for the end.

    Returns the final notebook state; fails if a cell raised (with the cell's error) or did not run.
    """
    stored = (ROOT / path).stat().st_mtime_ns
    page.goto(f"lab/tree/{path}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
    page.wait_for_function(f"() => window.jupyterapp.shell.currentWidget.context.path === {json.dumps(path)}")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
    wait_for_kernel_idle(page, timeout_s=120)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_timeout(1000)
    state = wait_for_kernel_idle(page, timeout_s)
    if state["errors"]:
        raise AssertionError(f"{path}: cells raised in the browser: {state['errors']}")
    if state["executed"] != state["cells"]:
        raise AssertionError(f"{path}: only {state['executed']} of {state['cells']} code cells ran")
    # NOTE: autosave is off in the test server; the stored notebook (outputs for nbval) must be untouched.
    assert (ROOT / path).stat().st_mtime_ns == stored, f"{path} was modified by the browser run"
    return state


def shutdown_kernel(page) -> None:
    """Shut the current notebook's kernel down (frees its model's memory)."""
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")


def widget_output(page, text: str):
    """The rendered widget tree (ipywidgets VBox) in a cell output that contains ``text``."""
    locator = page.locator(".jp-OutputArea-output .widget-vbox").filter(has_text=text).first
    locator.wait_for(state="visible")
    return locator


def screenshot(target, name: str) -> Path:
    """Save a PNG of a page or an element under $NPUKIT_ARTIFACTS."""
    path = artifacts_dir() / f"{name}.png"
    target.screenshot(path=str(path))
    return path
