"""Root conftest: nbval settings shared by every notebook under notebooks/."""


def pytest_collectstart(collector):
    # NOTE: stderr carries progress bars and warnings that differ run to run; widget and HTML views are
    # compared through their text/plain, which we keep stable.
    if getattr(collector, "fspath", None) is not None and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("text/html", "application/javascript", "stderr",
                                   "application/vnd.jupyter.widget-view+json", "image/png")
