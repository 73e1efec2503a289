"""Writing an analysis report: report.json, PNG plots and one self-contained report.html."""
from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any


def jsonable(obj: Any) -> Any:
    """Tensors/arrays -> lists, NaN/Inf -> None, tuples -> lists."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(data), f, indent=1)
    os.replace(tmp, path)


def save_figure(fig, out_dir: str, name: str) -> str:
    """Save a matplotlib figure as out_dir/name.png, close it, return the path."""
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def new_figure(width=7.0, height=4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def table_html(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: str, title: str, sections: list[tuple[str, str, list[str]]]) -> None:
    """sections: (heading, html body, [png paths]); images are inlined as data URIs so the
    file is self-contained (no network, no sibling files needed)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:13px}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body, images in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
        for img in images:
            with open(img, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            parts.append(f"<p><img alt='{html.escape(os.path.basename(img))}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
