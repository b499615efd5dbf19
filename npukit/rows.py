"""``Rows``: a report that is a list of (label, value) rows, printed as aligned text or shown as an HTML table."""
from __future__ import annotations

import html


class Rows:
    """Subclasses define ``rows()``; ``print(report)`` aligns them, Jupyter shows them as a table."""

    def rows(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def __str__(self) -> str:
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{w}}  {v}" for k, v in self.rows())

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in self.rows())
        return f"<table>{body}</table>"
