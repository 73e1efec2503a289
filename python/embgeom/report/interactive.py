"""projection.html: a self-contained interactive 2-D scatter (canvas + inline JavaScript, no
library, no network). Hovering a point shows its id, text/token and label; the wheel zooms, a
drag pans, a double click resets; a search box highlights tokens / texts / ids (Enter zooms to
them); a click lists the point's nearest neighbours from the exact graph (knn.npz); clicking a
legend entry hides or shows that label."""
from __future__ import annotations

import html

import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]

_SCRIPT = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const cv = document.getElementById('cv'), ctx = cv.getContext('2d'), tip = document.getElementById('tip');
const info = document.getElementById('info'), q = document.getElementById('q'), found = document.getElementById('found');
const W = cv.width, H = cv.height, pad = 20, hidden = new Set(), n = D.x.length;
const X0 = Math.min(...D.x), X1 = Math.max(...D.x), Y0 = Math.min(...D.y), Y1 = Math.max(...D.y);
let view = {x0: X0, x1: X1, y0: Y0, y1: Y1}, match = null, picked = -1, drag = null;
const sx = v => pad + (v - view.x0) / ((view.x1 - view.x0) || 1) * (W - 2 * pad);
const sy = v => H - pad - (v - view.y0) / ((view.y1 - view.y0) || 1) * (H - 2 * pad);
const ux = p => view.x0 + (p - pad) / (W - 2 * pad) * (view.x1 - view.x0);
const uy = p => view.y0 + (H - pad - p) / (H - 2 * pad) * (view.y1 - view.y0);
const r = n > 5000 ? 1.5 : 3;
const name = i => (D.ids ? D.ids[i] : '#' + i) + (D.t ? ' ' + D.t[i] : '') +
  (D.names.length > 1 || D.names[0] ? ' [' + D.names[D.c[i]] + ']' : '');
function draw(){
  ctx.clearRect(0, 0, W, H);
  for (let i = 0; i < n; i++) {
    if (hidden.has(D.c[i])) continue;
    ctx.globalAlpha = match && !match.has(i) ? 0.12 : 1;
    ctx.fillStyle = D.colors[D.c[i]];
    ctx.beginPath(); ctx.arc(sx(D.x[i]), sy(D.y[i]), r, 0, 6.2832); ctx.fill();
  }
  ctx.globalAlpha = 1;
  const ring = (i, c) => { ctx.strokeStyle = c; ctx.lineWidth = 2; ctx.beginPath();
    ctx.arc(sx(D.x[i]), sy(D.y[i]), r + 4, 0, 6.2832); ctx.stroke(); };
  if (match) match.forEach(i => ring(i, '#000'));
  if (picked >= 0) { ring(picked, '#d62728'); if (D.knn) D.knn.i[picked].forEach(j => j >= 0 && ring(j, '#ff7f0e')); }
}
function nearest(mx, my){
  let best = -1, bd = 64;
  for (let i = 0; i < n; i++) {
    if (hidden.has(D.c[i])) continue;
    const d = (sx(D.x[i]) - mx) ** 2 + (sy(D.y[i]) - my) ** 2;
    if (d < bd) { bd = d; best = i; }
  }
  return best;
}
function pos(e){ const b = cv.getBoundingClientRect(); return [(e.clientX - b.left) * W / b.width, (e.clientY - b.top) * H / b.height]; }
cv.addEventListener('mousemove', e => {
  const [mx, my] = pos(e);
  if (drag) {
    const dx = ux(drag[0]) - ux(mx), dy = uy(drag[1]) - uy(my);
    view = {x0: view.x0 + dx, x1: view.x1 + dx, y0: view.y0 + dy, y1: view.y1 + dy};
    drag = [mx, my, true]; draw(); return;
  }
  const best = nearest(mx, my);
  if (best < 0) { tip.style.display = 'none'; return; }
  tip.textContent = name(best);
  tip.style.left = (e.pageX + 12) + 'px'; tip.style.top = (e.pageY + 12) + 'px'; tip.style.display = 'block';
});
cv.addEventListener('mousedown', e => { drag = [...pos(e), false]; });
window.addEventListener('mouseup', e => {
  if (drag && !drag[2]) { const [mx, my] = pos(e); show(nearest(mx, my)); }
  drag = null;
});
cv.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
cv.addEventListener('wheel', e => {
  e.preventDefault();
  const [mx, my] = pos(e), cx = ux(mx), cy = uy(my), f = e.deltaY < 0 ? 0.8 : 1.25;
  view = {x0: cx + (view.x0 - cx) * f, x1: cx + (view.x1 - cx) * f, y0: cy + (view.y0 - cy) * f, y1: cy + (view.y1 - cy) * f};
  draw();
}, {passive: false});
cv.addEventListener('dblclick', () => { view = {x0: X0, x1: X1, y0: Y0, y1: Y1}; draw(); });
function show(i){
  picked = i;
  if (i < 0) { info.textContent = ''; draw(); return; }
  let h = '<b>' + esc(name(i)) + '</b>';
  if (D.knn) {
    h += '<br>' + esc(D.knn.note) + ':<ol>';
    D.knn.i[i].forEach((j, k) => { if (j >= 0) h += '<li><a href="#" data-j="' + j + '">' + esc(name(j)) + '</a> ' + D.knn.s[i][k] + '</li>'; });
    h += '</ol>';
  }
  info.innerHTML = h;
  info.querySelectorAll('a[data-j]').forEach(a => a.addEventListener('click', ev => { ev.preventDefault(); show(+a.dataset.j); }));
  draw();
}
function esc(s){ return String(s).replace(/[&<>'"]/g, c => '&#' + c.charCodeAt(0) + ';'); }
function search(zoom){
  const s = q.value.trim().toLowerCase();
  if (!s) { match = null; found.textContent = ''; draw(); return; }
  match = new Set();
  for (let i = 0; i < n; i++) {
    const text = ((D.t ? D.t[i] : '') + ' ' + (D.ids ? D.ids[i] : i)).toLowerCase();
    if (text.includes(s)) match.add(i);
  }
  found.textContent = match.size + ' match' + (match.size === 1 ? '' : 'es');
  if (zoom && match.size) {
    let a = Infinity, b = -Infinity, c = Infinity, d = -Infinity;
    match.forEach(i => { a = Math.min(a, D.x[i]); b = Math.max(b, D.x[i]); c = Math.min(c, D.y[i]); d = Math.max(d, D.y[i]); });
    const mx = Math.max((b - a) * 0.2, (X1 - X0) * 0.02), my = Math.max((d - c) * 0.2, (Y1 - Y0) * 0.02);
    view = {x0: a - mx, x1: b + mx, y0: c - my, y1: d + my};
    if (match.size === 1) show([...match][0]);
  }
  draw();
}
q.addEventListener('input', () => search(false));
q.addEventListener('keydown', e => { if (e.key === 'Enter') search(true); });
document.querySelectorAll('#legend span').forEach(s => s.addEventListener('click', () => {
  const c = +s.dataset.c; hidden.has(c) ? hidden.delete(c) : hidden.add(c);
  s.style.opacity = hidden.has(c) ? 0.3 : 1; draw();
}));
draw();
})();
"""


def write_scatter_html(path: str, xy, labels=None, texts=None, *, title: str = "projection",
                       note: str = "", size: int = 760, provenance: dict | None = None, ids=None,
                       knn=None, knn_show: int = 10,
                       knn_note: str = "nearest neighbours (exact cosine graph, knn.npz)") -> str:
    """xy: (N, 2); labels: N strings or None; texts: N strings shown on hover or None;
    provenance: the report's provenance object, shown as the page footer. ids: N ids shown for
    each point (e.g. token ids; default the row, #r); knn: (indices (N, k), similarities (N, k))
    of the exact neighbour graph: a click lists a point's first `knn_show` neighbours under the
    heading knn_note.
    The page zooms (wheel), pans (drag), resets (double click) and searches texts and ids."""
    from .html import write_script_page

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
            "t": None if texts is None else [str(t)[:300] for t in texts],
            "ids": None if ids is None else [int(v) for v in ids], "knn": None}
    if knn is not None:
        idx, sim = (np.asarray(a) for a in knn)
        data["knn"] = {"note": knn_note, "i": idx[:, :knn_show].astype(np.int64).tolist(),
                       "s": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                             for row in sim[:, :knn_show]]}
    legend = "".join(f"<span data-c='{i}' style='cursor:pointer;margin-right:1em'>"
                     f"<b style='color:{c}'>&#9679;</b> {html.escape(name)}</span>"
                     for i, (name, c) in enumerate(zip(names, colors)) if name)
    help_text = ("Wheel: zoom; drag: pan; double click: whole view; click a point: "
                 + ("its nearest neighbours; " if knn is not None else "select it; ")
                 + "legend: hide a label. Search a token, text or id (Enter zooms to the matches).")
    style = ("body{font-family:sans-serif;margin:1em}"
             "#cv{border:1px solid #ccc;max-width:100%;cursor:crosshair}#tip{position:absolute;display:none;"
             "background:#fff;border:1px solid #888;padding:2px 6px;font-size:13px;max-width:480px;"
             "pointer-events:none}#wrap{display:flex;gap:1em;align-items:flex-start}"
             "#info{font-size:13px;min-width:16em;max-width:28em}")
    body = (f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><p style='font-size:12px'>{help_text}</p>"
            "<p><input id='q' type='search' placeholder='search token / text / id' size='30'> "
            "<span id='found'></span></p>"
            f"<div id='legend'>{legend}</div>"
            f"<div id='wrap'><canvas id='cv' width='{size}' height='{size}'></canvas><div id='info'></div></div>"
            "<div id='tip'></div>")
    write_script_page(path, title, style, body, "data", data, _SCRIPT, provenance)
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
