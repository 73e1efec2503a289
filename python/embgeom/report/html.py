"""report.html: one self-contained page (plots inlined as base64, no network); tables come from
embgeom.tables."""
from __future__ import annotations

import base64
import html
import os


def write_html(path: str, title: str, sections: list[tuple[str, str, list[str]]]) -> None:
    """sections: (heading, html body, [png paths]); images are inlined as data URIs so the
    file is self-contained (no network, no sibling files needed)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:13px}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    # a table of contents: one anchor per section
    parts.append("<nav><b>Contents</b><ol>" + "".join(
        f"<li><a href='#s{i}'>{html.escape(h)}</a></li>" for i, (h, _, _) in enumerate(sections))
        + "</ol></nav>")
    for i, (heading, body, images) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(heading)} "
                     f"<a href='#' style='font-size:12px'>top</a></h2>{body}")
        for img in images:
            with open(img, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            parts.append(f"<p><img alt='{html.escape(os.path.basename(img))}' src='data:image/png;base64,{data}'></p>")
        parts.append("</section>")
    parts.append("</body></html>")
    from ..io import atomic_write

    with atomic_write(path, name="report.html") as f:
        f.write("\n".join(parts))
