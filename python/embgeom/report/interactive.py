"""projection.html: a self-contained interactive 2-D scatter (canvas + a few lines of inline
JavaScript, no library, no network). Hovering a point shows its row, label and text/token;
clicking a legend entry hides or shows that label."""
from __future__ import annotations

import html
import json

import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]

_SCRIPT = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const cv = document.getElementById('cv'), ctx = cv.getContext('2d'), tip = document.getElementById('tip');
const W = cv.width, H = cv.height, pad = 20, hidden = new Set();
let x0 = Math.min(...D.x), x1 = Math.max(...D.x), y0 = Math.min(...D.y), y1 = Math.max(...D.y);
const sx = v => pad + (v - x0) / ((x1 - x0) || 1) * (W - 2 * pad);
const sy = v => H - pad - (v - y0) / ((y1 - y0) || 1) * (H - 2 * pad);
const px = D.x.map(sx), py = D.y.map(sy), r = D.x.length > 5000 ? 1.5 : 3;
function draw(){
  ctx.clearRect(0, 0, W, H);
  for (let i = 0; i < px.length; i++) {
    if (hidden.has(D.c[i])) continue;
    ctx.fillStyle = D.colors[D.c[i]];
    ctx.beginPath(); ctx.arc(px[i], py[i], r, 0, 6.2832); ctx.fill();
  }
}
cv.addEventListener('mousemove', e => {
  const b = cv.getBoundingClientRect(), mx = (e.clientX - b.left) * W / b.width, my = (e.clientY - b.top) * H / b.height;
  let best = -1, bd = 64;
  for (let i = 0; i < px.length; i++) {
    if (hidden.has(D.c[i])) continue;
    const d = (px[i] - mx) ** 2 + (py[i] - my) ** 2;
    if (d < bd) { bd = d; best = i; }
  }
  if (best < 0) { tip.style.display = 'none'; return; }
  tip.textContent = '#' + best + (D.names.length > 1 || D.names[0] ? '  [' + D.names[D.c[best]] + ']' : '') + (D.t ? '  ' + D.t[best] : '');
  tip.style.left = (e.pageX + 12) + 'px'; tip.style.top = (e.pageY + 12) + 'px'; tip.style.display = 'block';
});
cv.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
document.querySelectorAll('#legend span').forEach(s => s.addEventListener('click', () => {
  const c = +s.dataset.c; hidden.has(c) ? hidden.delete(c) : hidden.add(c);
  s.style.opacity = hidden.has(c) ? 0.3 : 1; draw();
}));
draw();
})();
"""


def write_scatter_html(path: str, xy, labels=None, texts=None, *, title: str = "projection",
                       note: str = "", size: int = 760, provenance: dict | None = None) -> str:
    """xy: (N, 2); labels: N strings or None; texts: N strings shown on hover or None;
    provenance: the report's provenance object, shown as the page footer."""
    from .html import provenance_html

    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    if labels is None:
        names, codes = [""], [0] * n
    else:
        names = sorted(set(str(v) for v in labels))
        pos = {v: i for i, v in enumerate(names)}
        codes = [pos[str(v)] for v in labels]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    data = {"x": [round(float(v), 5) for v in xy[:, 0]], "y": [round(float(v), 5) for v in xy[:, 1]],
            "c": codes, "names": names, "colors": colors,
            "t": None if texts is None else [str(t)[:300] for t in texts]}
    # JSON inside <script type=application/json>: "</" must not close the element
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    legend = "".join(f"<span data-c='{i}' style='cursor:pointer;margin-right:1em'>"
                     f"<b style='color:{c}'>&#9679;</b> {html.escape(name)}</span>"
                     for i, (name, c) in enumerate(zip(names, colors)) if name)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:1em}}"
            "#cv{border:1px solid #ccc;max-width:100%}#tip{position:absolute;display:none;background:#fff;"
            "border:1px solid #888;padding:2px 6px;font-size:13px;max-width:480px;pointer-events:none}"
            "</style></head><body>"
            f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><div id='legend'>{legend}</div>"
            f"<canvas id='cv' width='{size}' height='{size}'></canvas><div id='tip'></div>"
            f"<script type='application/json' id='data'>{payload}</script>"
            f"<script>{_SCRIPT}</script>{provenance_html(provenance)}</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def scatter_png(out_dir: str, name: str, xy, labels=None, *, title: str = "", arrows=None,
                xlabel: str = "", ylabel: str = "") -> str:
    """A 2-D scatter coloured by label (matplotlib); arrows: {label: ((x0, y0), (x1, y1))} drawn
    in the label's colour."""
    from .plots import new_figure, save_figure

    xy = np.asarray(xy, dtype=np.float64)
    fig, ax = new_figure(6.5, 5.5)
    size = 2 if xy.shape[0] > 5000 else 12
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.7)
    else:
        lab = np.asarray([str(v) for v in labels])
        groups = sorted(set(lab.tolist()))
        # the smallest groups are drawn last (on top), so a few hundred positions are not hidden
        # under thirty thousand words
        order = sorted(range(len(groups)), key=lambda i: -int((lab == groups[i]).sum()))
        for z, i in enumerate(order):
            g = groups[i]
            m = lab == g
            few = m.sum() < 0.2 * len(lab)
            ax.scatter(xy[m, 0], xy[m, 1], s=size * (3 if few and size < 12 else 1), alpha=0.75,
                       color=PALETTE[i % len(PALETTE)], label=g, zorder=2 + z)
            if arrows and g in arrows:
                start, end = arrows[g]
                ax.annotate("", xy=tuple(end), xytext=tuple(start),
                            arrowprops=dict(arrowstyle="->", color=PALETTE[i % len(PALETTE)], lw=2))
        if len(set(lab.tolist())) <= 20:
            ax.legend(fontsize=7, markerscale=1.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, out_dir, name)
