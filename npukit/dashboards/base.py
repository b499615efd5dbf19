"""What every npukit dashboard shares: a widget tree, a status line, a progress bar, guarded actions.

A dashboard is a plain object that holds ipywidgets. Its actions (``run()``, ``generate()`` …) are
ordinary methods bound to buttons, so tests set widget values, call ``button.click()`` and read the
widgets back, with no kernel and no browser.

    dash = SomeDashboard(...)
    dash                      # last expression of a cell: displays the widgets
    dash.show()               # the same, from anywhere in a cell

Labels, status lines and plot labels come from npukit's message catalogues (``npukit.i18n.t``, and
``npukit.cjk.plot_text`` inside plots), so ``NPUKIT_LANG=zh`` or ``npukit.set_language("zh")`` before building a
dashboard makes it speak Chinese.

NOTE: the cell output of a dashboard carries a short, stable ``text/plain`` (the class name and the
model) instead of the widgets' default repr, which lists every widget value. nbval compares
``text/plain``, so a dashboard cell stays comparable however its values change.
"""
from __future__ import annotations

import functools
import html
import io
import os
from typing import Any, Callable

import ipywidgets as widgets

from npukit.i18n import is_message, t

# Colours that read on JupyterLab's light and dark themes.
OK_COLOUR, WARN_COLOUR, ERROR_COLOUR, MUTED_COLOUR = "#1a7f37", "#9a6700", "#cf222e", "#57606a"


class Snapshot:
    """A PNG with a stable one-line ``text/plain`` (so nbval compares the line, not the pixels)."""

    def __init__(self, png: bytes, title: str) -> None:
        self.png, self.title = png, title

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self) -> str:
        return f"<static chart: {self.title}>"


class Dashboard:
    """Base class: ``self.widget`` (the top container), ``self.status`` and ``self.progress``."""

    title_key = "dash.title"  # subclasses: the catalogue key of their title

    @property
    def title(self) -> str:
        return t(self.title_key)

    def __init__(self) -> None:
        self.status = widgets.HTML(value=self._status_html(t("dash.ready"), MUTED_COLOUR))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="",
                                            layout=widgets.Layout(width="260px", visibility="hidden"))
        self.last_error: BaseException | None = None
        self.busy = False
        self.widget: widgets.Widget = widgets.VBox()  # subclasses build the real tree

    # --- display -------------------------------------------------------------------------------
    def describe(self) -> str:
        """One stable line that names the dashboard (used as the cell's text/plain)."""
        return f"{type(self).__name__}()"

    def __repr__(self) -> str:
        return self.describe()

    def _repr_mimebundle_(self, **kwargs) -> dict[str, Any]:
        data = self.widget._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.describe()
        return data

    def snapshot(self) -> "Snapshot":
        """A static copy of the dashboard's chart (a PNG that a saved notebook keeps, unlike widgets).

        GitCode's notebook preview, nbviewer and printed handouts do not run widgets: end a cell with
        ``dash.snapshot()`` after ``dash.run()`` so that they show the plot of that run.
        """
        png = self._snapshot_png()
        if not png:
            raise ValueError(t("dash.nothing_yet", name=type(self).__name__))
        return Snapshot(png, f"{self.describe()}, last run")

    def _snapshot_png(self) -> bytes:
        chart = getattr(self, "chart", None)
        return bytes(chart.value) if chart is not None else b""

    def show(self) -> None:
        """Display the dashboard in the notebook (same as ending a cell with it)."""
        from IPython.display import display

        display(self)

    def header(self, subtitle: str = "") -> widgets.HTML:
        style = f"color:{MUTED_COLOUR};font-weight:normal"
        sub = f" <span style='{style}'>{html.escape(subtitle)}</span>" if subtitle else ""
        return widgets.HTML(f"<h3 style='margin:4px 0'>{html.escape(self.title)}{sub}</h3>")

    # --- status and progress -------------------------------------------------------------------
    @staticmethod
    def _status_html(text: str, colour: str) -> str:
        return f"<span style='color:{colour}'>{html.escape(text)}</span>"

    def set_status(self, text: str, kind: str = "info") -> None:
        """kind: info | ok | warn | error."""
        colour = {"info": MUTED_COLOUR, "ok": OK_COLOUR, "warn": WARN_COLOUR, "error": ERROR_COLOUR}[kind]
        self.status.value = self._status_html(text, colour)

    def start_progress(self, total: int, label: str = "") -> None:
        self.progress.max = max(1, int(total))
        self.progress.value = 0
        self.progress.description = label
        self.progress.layout.visibility = "visible"

    def step_progress(self, n: int = 1) -> None:
        self.progress.value = min(self.progress.max, self.progress.value + n)

    def end_progress(self) -> None:
        self.progress.value = self.progress.max
        self.progress.layout.visibility = "hidden"

    def buttons(self) -> list[widgets.Button]:
        """Buttons to disable while an action runs (subclasses list theirs)."""
        return []


def action(busy_key: str) -> Callable:
    """Decorate a dashboard method that buttons call: it shows ``t(busy_key)`` (or the text itself when it is
    not a message key), disables the buttons,
    and turns any exception into a red status line (kept in ``self.last_error``) instead of raising.

    NOTE: a widget callback that raises only logs a traceback in the kernel; the user sees nothing.
    Catching here is what keeps the dashboard alive and the error visible.
    """

    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self: Dashboard, *args, **kwargs):
            if self.busy:
                self.set_status(t("dash.busy"), "warn")
                return None
            self.busy = True
            self.last_error = None
            self.set_status(t(busy_key) if is_message(busy_key) else busy_key, "info")
            for b in self.buttons():
                b.disabled = True
            try:
                return method(self, *args, **kwargs)
            except Exception as e:  # shown, not raised: see NOTE above
                self.last_error = e
                self.set_status(f"{type(e).__name__}: {e}", "error")
                return None
            finally:
                self.busy = False
                self.progress.layout.visibility = "hidden"
                for b in self.buttons():
                    b.disabled = False

        return run

    return wrap


def resolve_model(model, tokenizer=None, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, name): ``model`` is an npukit model name / folder (loaded here) or a loaded model."""
    if isinstance(model, (str, os.PathLike)):
        from npukit.loading import load_model

        loaded, tok = load_model(model, device=device, dtype=dtype)
        return loaded, tok, str(model)
    if tokenizer is None:
        raise TypeError("pass the tokenizer with a loaded model: Dashboard(model, tokenizer), "
                        "or pass a model name such as 'smollm2-135m-instruct' to load it")
    return model, tokenizer, model_name(model)


def model_name(model) -> str:
    report = getattr(model, "load_report", None)
    if report is not None:
        return report.source.split(":", 1)[-1]
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def html_table(header: list[str], rows: list[list[str]], wrap_last: bool = False) -> str:
    """A small HTML table; cells are escaped. Numbers stay on one line; ``wrap_last`` lets the last column
    (free text such as a model's output) wrap, left-aligned."""
    cell = "padding:2px 6px;white-space:nowrap;text-align:right"
    last = "padding:2px 6px;white-space:normal;text-align:left;min-width:240px" if wrap_last else cell

    def tr(values: list, tag: str) -> str:
        styles = [cell] * (len(values) - 1) + [last]
        return "<tr>" + "".join(f"<{tag} style='{st}'>{html.escape(str(v))}</{tag}>"
                                for v, st in zip(values, styles)) + "</tr>"

    body = "".join(tr(row, "td") for row in rows)
    return f"<table style='border-collapse:collapse'><thead>{tr(header, 'th')}</thead><tbody>{body}</tbody></table>"


def new_figure(width: float, height: float):
    """A matplotlib Figure that is not registered with pyplot (so the notebook never shows it by itself)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=96, layout="constrained")


def figure_png(fig) -> bytes:
    """PNG bytes of a Figure, for an ``ipywidgets.Image``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
