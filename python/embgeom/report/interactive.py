"""The interactive scatter pages (projection.html, the --labels and --projections scatters,
head_mds.html): one Plotly figure per page, plotly.js inlined once (no network), a WebGL trace
(scattergl) above GL_POINTS points. Hovering a point shows its id, text/token and label;
Plotly's wheel zoom, drag pan and double-click reset; a search box highlights tokens / texts /
ids (Enter zooms to them); a click lists the point's nearest neighbours from the exact graph
(knn.npz) in a side panel; a legend entry hides or shows its label."""
from __future__ import annotations

import html
import math

import numpy as np

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]



def label_color(label, labels) -> str:
    """A label's colour in every figure of a report: its place among the run's labels sorted
    (as strings) in PALETTE, so a label reads in one colour from the scatters to the curves."""
    names = sorted({str(g) for g in labels})
    return PALETTE[names.index(str(label)) % len(PALETTE)]


GL_POINTS = 1000               # above this many points the traces are WebGL (scattergl)
PLOT_ID = "plot"               # the figure's <div>; the page data is <script id='data'>

_SCRIPT = r"""
(function(){
const P = JSON.parse(document.getElementById('data').textContent);
const gd = document.getElementById('plot'), info = document.getElementById('info');
const q = document.getElementById('q'), found = document.getElementById('found');
const F = P.figure, n = P.n, MATCH = P.match_trace, PICK = P.pick_trace;
const LABELS = [...Array(MATCH).keys()];
// each row's trace, place in it and coordinates (rows: the input's order, as knn.npz)
const where = new Array(n), X = new Array(n), Y = new Array(n);
LABELS.forEach(k => F.data[k].customdata.forEach((r, j) => { where[r] = [k, j]; X[r] = F.data[k].x[j]; Y[r] = F.data[k].y[j]; }));
const name = i => (P.ids ? P.ids[i] : '#' + i) + (P.t ? ' ' + P.t[i] : '') +
  (P.labelled ? ' [' + P.labels[where[i][0]] + ']' : '');
const esc = s => String(s).replace(/[&<>'"]/g, c => '&#' + c.charCodeAt(0) + ';');
function mark(k, rows, colors){
  const upd = {x: [rows.map(i => X[i])], y: [rows.map(i => Y[i])]};
  if (colors) upd['marker.color'] = [colors];
  return Plotly.restyle(gd, upd, [k]);
}
function show(i){
  if (i < 0 || i === undefined) { info.innerHTML = ''; mark(PICK, []); return; }
  let h = '<b>' + esc(name(i)) + '</b>';
  const near = [];
  if (P.knn) {
    h += '<br>' + esc(P.knn.note) + ':<ol>';
    P.knn.i[i].forEach((j, k) => { if (j >= 0) { near.push(j); h += '<li><a href="#" data-j="' + j + '">' + esc(name(j)) + '</a> ' + P.knn.s[i][k] + '</li>'; } });
    h += '</ol>';
  }
  info.innerHTML = h;
  info.querySelectorAll('a[data-j]').forEach(a => a.addEventListener('click', ev => { ev.preventDefault(); show(+a.dataset.j); }));
  mark(PICK, [i, ...near], [P.pick_color, ...near.map(() => P.near_color)]);
}
function search(zoom){
  const s = q.value.trim().toLowerCase(), rows = [];
  if (s) for (let i = 0; i < n; i++) {
    if (((P.t ? P.t[i] : '') + ' ' + (P.ids ? P.ids[i] : i)).toLowerCase().includes(s)) rows.push(i);
  }
  found.textContent = s ? rows.length + ' match' + (rows.length === 1 ? '' : 'es') : '';
  // the other points dimmed (each trace's `unselected` style), the matches ringed; no match
  // dims nothing
  const sel = LABELS.map(() => rows.length ? [] : null);
  rows.forEach(i => sel[where[i][0]].push(where[i][1]));
  Plotly.restyle(gd, {selectedpoints: sel}, LABELS);
  mark(MATCH, rows);
  if (zoom && rows.length) {
    // one match: the view takes in its neighbours too (their rings show where they lie)
    const near = rows.length === 1 && P.knn ? P.knn.i[rows[0]].filter(j => j >= 0) : [];
    const xs = rows.concat(near).map(i => X[i]), ys = rows.concat(near).map(i => Y[i]);
    const a = Math.min(...xs), b = Math.max(...xs), c = Math.min(...ys), d = Math.max(...ys);
    const mx = Math.max((b - a) * 0.2, P.span[0] * 0.02), my = Math.max((d - c) * 0.2, P.span[1] * 0.02);
    Plotly.relayout(gd, {'xaxis.range': [a - mx, b + mx], 'yaxis.range': [c - my, d + my]});
    if (rows.length === 1) show(rows[0]);
  }
}
Plotly.newPlot(gd, F.data, F.layout, P.config).then(() => {
  gd.on('plotly_click', ev => {
    const p = ev.points.find(p => p.curveNumber < MATCH);
    if (p) show(p.customdata);
  });
  q.addEventListener('input', () => search(false));
  q.addEventListener('keydown', e => { if (e.key === 'Enter') search(true); });
  gd.dataset.ready = '1';
});
})();
"""


def _plotly():
    """plotly's graph_objects and offline modules, or the one-line ValueError of a missing package."""
    from ..validation import require_package

    require_package("plotly", "plotly", "hf", why="the interactive scatter pages")
    import plotly.graph_objects as go
    import plotly.offline as offline

    return go, offline


def require_page_packages() -> None:
    """A scatter page's packages (plotly; matplotlib for its PNG), or the one-line ValueError
    naming the missing one: a command asks before its work, not after its layouts."""
    from ..validation import require_package

    _plotly()
    require_package("matplotlib", "matplotlib", "hf", why="the PNG plots")


def coordinate_decimals(xy: np.ndarray) -> int:
    """The decimals that keep a page's coordinates to 1e-5 of the points' spread (the page's
    size: no more digits than a screen shows): 5 for a spread of about 1, 11 for 1e-6 (rounded to
    5 decimals, a near-collinear cloud's PCA had put every point at (0, 0) on the page while the
    .npy and .png held its spread)."""
    finite = xy[np.isfinite(xy).all(1)] if xy.size else xy
    spread = float(np.ptp(finite, axis=0).max()) if finite.shape[0] else 0.0
    if spread <= 0.0:
        return 5
    return int(min(max(5 - math.floor(math.log10(spread)), 0), 320))


def scatter_figure(xy, labels=None, texts=None, *, title: str = "projection", ids=None,
                   xlabel: str = "dimension 1", ylabel: str = "dimension 2", height: int = 720):
    """The Plotly figure of a scatter page (a plotly.graph_objects.Figure): one trace per label
    (legend entries hide / show them; the largest labels drawn first, so a few hundred positions
    are not hidden under thirty thousand words), each point's row in customdata and its name
    (id, text, [label]) on hover; then two empty overlay traces the page fills: the search
    matches and the clicked point with its neighbours. WebGL traces above GL_POINTS points.
    Returns (figure, the label of each label trace, in trace order)."""
    go, _ = _plotly()

    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    lab = None if labels is None else [str(v) for v in labels]
    names = [""] if lab is None else sorted(set(lab))
    rows = {name: [] for name in names}
    for r in range(n):
        rows["" if lab is None else lab[r]].append(r)
    Trace = go.Scattergl if n > GL_POINTS else go.Scatter
    size = 4 if n > 5000 else 8
    ident = (lambda r: f"#{r}") if ids is None else (lambda r: str(ids[r]))
    decimals = coordinate_decimals(xy)
    fig = go.Figure()
    order = sorted(range(len(names)), key=lambda k: -len(rows[names[k]]))
    for k in order:
        name, rs = names[k], rows[names[k]]
        hover = [html.escape(ident(r) + ("" if texts is None else " " + str(texts[r])[:150])
                             + (f" [{name}]" if lab is not None else ""), quote=False) for r in rs]
        fig.add_trace(Trace(x=[round(float(xy[r, 0]), decimals) for r in rs],
                            y=[round(float(xy[r, 1]), decimals) for r in rs],
                            # (Plotly draws a few HTML tags in legend names: a label is text)
                            mode="markers", name=html.escape(name, quote=False) or "points",
                            showlegend=lab is not None,
                            legendrank=k, customdata=rs, hovertext=hover,
                            hovertemplate="%{hovertext}<extra></extra>",
                            marker=dict(color=label_color(name, names), size=size, opacity=0.8),
                            selected=dict(marker=dict(opacity=1.0)),
                            unselected=dict(marker=dict(opacity=0.1))))
    ring = dict(size=size + 8, symbol="circle-open", color="#000", line=dict(width=2))
    fig.add_trace(Trace(x=[], y=[], mode="markers", name="search matches", showlegend=False,
                        hoverinfo="skip", marker=ring))
    fig.add_trace(Trace(x=[], y=[], mode="markers", name="clicked point and its neighbours",
                        showlegend=False, hoverinfo="skip",
                        marker=dict(size=size + 8, symbol="circle-open", line=dict(width=2))))
    fig.update_layout(title=dict(text=html.escape(title, quote=False)), height=height,
                      template="plotly_white", hovermode="closest", dragmode="pan",
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(itemsizing="constant"),
                      xaxis=dict(title=dict(text=xlabel), zeroline=False),
                      yaxis=dict(title=dict(text=ylabel), zeroline=False))
    return fig, [names[k] for k in order]


def write_scatter_html(path: str, xy, labels=None, texts=None, *, title: str = "projection",
                       note: str = "", xlabel: str = "dimension 1", ylabel: str = "dimension 2",
                       provenance: dict | None = None, ids=None, knn=None, knn_show: int = 10,
                       knn_note: str = "", knn_file: str | None = None, knn_metric: str = "cosine") -> str:
    """The one writer of the scatter pages. xy: (N, 2); labels: N strings or None; texts: N
    strings shown on hover and searched, or None; xlabel / ylabel: the axis titles;
    provenance: the report's provenance object, shown as the page footer. ids: N ids shown for
    each point and searched (e.g. token ids; default the row, #r); knn: (indices (N, k),
    similarities (N, k), or distances with knn_metric="euclidean") of the exact neighbour graph:
    a click lists a point's first `knn_show` neighbours under the heading knn_note (default: the
    exact graph, its metric and its file). knn_file: the name of the file beside the page the
    whole graph is saved to (np.savez: indices (N, k) int64, similarities or distances (N, k);
    with ids also `ids` (N,) int64: the indices are rows of the page's points, ids[row] their ids,
    as a vocabulary page's token ids after the first 999), named in the page (data "knn" "file") so its
    lists can be checked against it; None: the page's lists are the only copy.
    The page holds plotly.js once and one JSON block (<script id='data'>): "figure" (the
    Plotly figure: data and layout), "t", "ids", "knn"."""
    import json

    from .html import write_script_page

    fig, names = scatter_figure(xy, labels, texts, title=title, ids=ids, xlabel=xlabel, ylabel=ylabel)
    xy = np.asarray(xy, dtype=np.float64)
    n = xy.shape[0]
    span = [float(np.ptp(xy[:, 0])) if n else 1.0, float(np.ptp(xy[:, 1])) if n else 1.0]
    data = {"figure": json.loads(fig.to_json()), "n": n, "labelled": labels is not None,
            "match_trace": len(names), "pick_trace": len(names) + 1,
            "labels": names if labels is not None else None,   # (each label trace's, as given)
            "pick_color": "#d62728", "near_color": "#ff7f0e", "span": [s or 1.0 for s in span],
            # no "Share chart" button: it uploads the figure to Plotly Cloud
            "config": {"scrollZoom": True, "displaylogo": False, "responsive": True,
                       "showSendToCloud": False},
            "t": None if texts is None else [str(t)[:300] for t in texts],
            "ids": None if ids is None else [int(v) for v in ids], "knn": None}
    if knn is not None:
        import os

        idx, sim = (np.asarray(a) for a in knn)
        if knn_file:
            values = {"similarities" if knn_metric == "cosine" else "distances": sim}
            if ids is not None:  # (the rows' token or position ids: the file reads on its own)
                values["ids"] = np.asarray([int(v) for v in ids], dtype=np.int64)
            np.savez(os.path.join(os.path.dirname(os.path.abspath(path)), knn_file),
                     indices=idx.astype(np.int64), **values)
        graph = "exact cosine graph" if knn_metric == "cosine" else "exact Euclidean graph, distances"
        knn_note = knn_note or (f"nearest neighbours ({graph}" + (f", {knn_file})" if knn_file else ")"))
        data["knn"] = {"note": knn_note, "file": knn_file, "i": idx[:, :knn_show].astype(np.int64).tolist(),
                       # 8 significant digits, a float32's (4 decimals had read 1 for every
                       # neighbour of an early layer's [CLS] cloud, cosine distances of 1e-7)
                       "s": [[None if not np.isfinite(v) else float(f"{v:.8g}") for v in row]
                             for row in sim[:, :knn_show]]}
    help_text = ("Wheel: zoom; drag: pan; double click: whole view; click a point: "
                 + ("its nearest neighbours; " if knn is not None else "select it; ")
                 + ("legend: hide or show a label; " if labels is not None else "")
                 + "search a token, text or id (Enter zooms to the matches).")
    style = ("body{font-family:sans-serif;margin:1em}#wrap{display:flex;gap:1em;align-items:flex-start}"
             f"#{PLOT_ID}{{flex:1 1 auto;min-width:0}}"
             "#info{font-size:13px;flex:0 0 24em;max-height:720px;overflow:auto}")
    body = (f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}</p><p style='font-size:12px'>{help_text}</p>"
            "<p><input id='q' type='search' placeholder='search token / text / id' size='30'> "
            "<span id='found'></span></p>"
            f"<div id='wrap'><div id='{PLOT_ID}'></div><div id='info'></div></div>"
            f"<script>{_plotly()[1].get_plotlyjs()}</script>")
    write_script_page(path, title, style, body, "data", data, _SCRIPT, provenance)
    return path


def scatter_png(out_dir: str, name: str, xy, labels=None, *, title: str = "", arrows=None,
                xlabel: str = "", ylabel: str = "") -> str:
    """A 2-D scatter coloured by label (matplotlib); arrows: {label: ((x0, y0), (x1, y1))} drawn
    in the label's colour."""
    from .plots import literal, new_figure, save_figure

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
                       color=label_color(g, groups), label=literal(g), zorder=2 + z)
            if arrows and g in arrows:
                start, end = arrows[g]
                ax.annotate("", xy=tuple(end), xytext=tuple(start),
                            arrowprops=dict(arrowstyle="->", color=label_color(g, groups), lw=2))
        if len(set(lab.tolist())) <= 20:
            ax.legend(fontsize=7, markerscale=1.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_figure(fig, out_dir, name)
