"""report.html: one self-contained page (plots inlined as base64, no network); tables come from
embgeom.tables."""
from __future__ import annotations

import base64
import html
import os


def script_json(data) -> str:
    """`data` as JSON to put inside <script type=application/json>: every <, > and & written as
    \\u003c, \\u003e, \\u0026 (the same string to JSON.parse), so no text in it (a corpus line, a
    token, a label: "</script>", "<!--<script>") can end or reshape the element; replacing "</"
    alone had let "<!--<script" swallow the rest of the page."""
    import json

    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def write_script_page(path: str, title: str, style: str, body: str, data_id: str, data: dict,
                      script: str, provenance: dict | None = None) -> str:
    """An interactive page: `body`, then `data` as JSON in <script type=application/json
    id=data_id> and the page's own `script`, then the provenance footer; self-contained, written
    through io.atomic_write. Returns path."""
    from ..io import atomic_write

    payload = script_json(data)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}"
            f"<script type='application/json' id='{data_id}'>{payload}</script>"
            f"<script>{script}</script>{provenance_html(provenance)}</body></html>")
    with atomic_write(path) as f:
        f.write(page)
    return path


def _plain(v) -> str:
    """A provenance value as a reader writes it: lists as 138 x 7 x 384 for shapes, else joined;
    None (report.json's null: no depth for an (N, D) input) as "none", not Python's None."""
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return " x ".join(str(x) for x in v) if all(isinstance(x, int) for x in v) else ", ".join(str(x) for x in v)
    return str(v)


def provenance_html(prov: dict | None) -> str:
    """The page footer: how this report was made (the report.json `provenance` object)."""
    if not prov:
        return ""
    from ..formatting import fmt, seconds

    model = prov.get("model") or {}
    rows = [("command", f"<code>{html.escape(prov.get('command') or '')}</code>"),
            ("embgeom", html.escape(f"{prov.get('version') or 'unknown version'}, git "
                                    f"{prov.get('git_sha') or 'unknown (not run from a git tree)'}")),
            ("python / torch", html.escape(f"{prov.get('python')} / {prov.get('torch')}"))]
    if model:
        rows.append(("model", html.escape(f"{model.get('name')} ({model.get('path')}), revision "
                                          f"{model.get('revision') or 'unknown'}")))
    if prov.get("seed") is not None:
        rows.append(("seed", html.escape(str(prov["seed"]))))
    for entry in prov.get("inputs") or []:
        rows.append((f"input {html.escape(entry['name'])}",
                     html.escape(f"{entry['path']} ({fmt(entry['bytes'])} bytes)")))
    for key in ("input", "depth", "depth_rule"):
        if key in prov:
            v = prov[key]
            # a dict (project's input: file, shape, ...) as "key: value" parts, not Python's repr
            text = "; ".join(f"{k.replace('_', ' ')}: {_plain(x)}" for k, x in v.items()) if isinstance(v, dict) else _plain(v)
            rows.append((key.replace("_", " "), html.escape(text)))
    rows.append(("started", html.escape(f"{prov.get('started')} (UTC); wall time up to this page "
                                        f"{seconds(prov.get('total_seconds') or 0.0)}")))
    cells = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<footer id='provenance'><h2>Provenance</h2><table>{cells}</table></footer>"


def write_html(path: str, title: str, sections: list[tuple[str, str, list[str]]],
               provenance: dict | None = None) -> None:
    """sections: (heading, html body, [png paths]); images are inlined as data URIs so the
    file is self-contained (no network, no sibling files needed). provenance: the report's
    `provenance` object, shown as the page footer. The interactive pages already written beside
    `path` (*.html) are linked under the contents; the definitions the page links to
    (report/definitions.py) follow the last section."""
    from .definitions import definitions_html

    folder = os.path.dirname(os.path.abspath(path))
    side = sorted(f for f in os.listdir(folder) if f.endswith(".html") and f != os.path.basename(path))
    defs = definitions_html("".join(body for _, body, _ in sections))
    sections = list(sections) + ([("Definitions", "<p>What each linked metric name means (the full "
                                   "text, with tolerances and papers, is docs/metrics.md).</p>" + defs, [])]
                                 if defs else [])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:13px}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    # a table of contents: one anchor per section
    parts.append("<nav><b>Contents</b><ol>" + "".join(
        f"<li><a href='#s{i}'>{html.escape(h)}</a></li>" for i, (h, _, _) in enumerate(sections))
        + ("<li><a href='#provenance'>Provenance</a></li>" if provenance else "") + "</ol>"
        + ("<p><b>Interactive pages</b> (beside this file): " + ", ".join(
            f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in side) + "</p>" if side else "")
        + "</nav>")
    for i, (heading, body, images) in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(heading)} "
                     f"<a href='#' style='font-size:12px'>top</a></h2>{body}")
        for img in images:
            with open(img, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            parts.append(f"<p><img alt='{html.escape(os.path.basename(img))}' src='data:image/png;base64,{data}'></p>")
        parts.append("</section>")
    parts.append(provenance_html(provenance))
    parts.append("</body></html>")
    from ..io import atomic_write

    with atomic_write(path, name="report.html") as f:
        f.write("\n".join(parts))
