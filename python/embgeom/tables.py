"""HTML tables: the one table writer of notebook summaries (results, neighbours, traces) and of
the report pages (report/). Below every other module, so a result can show itself in a notebook
without importing the page writers."""
from __future__ import annotations

import html
from typing import Any

from .formatting import fmt


class Raw(str):
    """A cell that is already HTML (a link, a formatted fragment): written as it is."""


# Columns of identifiers (row and token ids, positions): written as they are, never "25,021"
ID_COLUMNS = {"i", "j", "id", "ids", "token id", "position", "row", "column", "col", "index"}


def table_html(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """An HTML table; headers None: rows only (e.g. name / value pairs). Numbers go through the
    one formatter, except in identifier columns (ID_COLUMNS)."""
    ids = {c for c, h in enumerate(headers or []) if str(h).strip().lower() in ID_COLUMNS}

    def cell(c, v):
        if isinstance(v, Raw):
            return str(v)
        if c in ids and isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
            return str(int(v))
        return html.escape(fmt(v))

    head = "" if headers is None else "<tr>" + "".join(f"<th>{h if isinstance(h, Raw) else html.escape(h)}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{cell(c, v)}</td>" for c, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"
