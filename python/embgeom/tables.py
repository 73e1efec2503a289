"""HTML tables: the one table writer of notebook summaries (results, neighbours, traces) and of
the report pages (report/). Below every other module, so a result can show itself in a notebook
without importing the page writers."""
from __future__ import annotations

import html
from typing import Any

from .formatting import fmt


class Raw(str):
    """A cell that is already HTML (a link, a formatted fragment): written as it is."""


def table_html(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """An HTML table; headers None: rows only (e.g. name / value pairs)."""
    def cell(v):
        if isinstance(v, Raw):
            return str(v)
        return html.escape(fmt(v))

    head = "" if headers is None else "<tr>" + "".join(f"<th>{h if isinstance(h, Raw) else html.escape(h)}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"
