"""attention_view.html: a bertviz-style token-to-token attention view (canvas + inline
JavaScript, no library, no network) of the texts kept by `embgeom text --head-maps N /
--show-texts SEL`. A text, a layer and any set of heads are chosen; the text's tokens stand in
two columns (queries left, keys right) joined by one line per (query, key, head), its opacity
the attention weight, its colour the head's. Hovering a token keeps only its lines and writes the
weights of the chosen heads beside the other column; a click pins it."""
from __future__ import annotations

import html

HEAD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
               "#7b4173", "#3182bd"]

_SCRIPT = r"""
(function(){
const D = JSON.parse(document.getElementById('view-data').textContent);
const cv = document.getElementById('view'), ctx = cv.getContext('2d');
const selText = document.getElementById('text'), selLayer = document.getElementById('layer');
const headBox = document.getElementById('heads'), info = document.getElementById('focus');
const ROW = 20, TOP = 30, XL = 190, XR = 430, W = 620, MIN = 0.01;
let s = 0, l = 0, heads = new Set(D.heads_range), focus = null, pinned = false;
D.samples.forEach((t, k) => {
  const o = document.createElement('option'); o.value = k;
  o.textContent = 'text ' + t.text + ': ' + t.tokens.join(' ').slice(0, 90); selText.appendChild(o);
});
for (let k = 0; k < D.layers; k++) {
  const o = document.createElement('option'); o.value = k; o.textContent = 'layer ' + (k + 1); selLayer.appendChild(o);
}
D.heads_range.forEach(h => {
  const lab = document.createElement('label'); lab.style.marginRight = '.6em'; lab.style.whiteSpace = 'nowrap';
  const c = document.createElement('input'); c.type = 'checkbox'; c.checked = true; c.dataset.h = h;
  c.addEventListener('change', () => { c.checked ? heads.add(h) : heads.delete(h); draw(); });
  lab.appendChild(c);
  const sw = document.createElement('b'); sw.textContent = ' \u25A0 '; sw.style.color = D.colors[h % D.colors.length];
  lab.appendChild(sw); lab.appendChild(document.createTextNode('head ' + h)); headBox.appendChild(lab);
});
function setAll(on){
  headBox.querySelectorAll('input').forEach(c => { c.checked = on; });
  heads = new Set(on ? D.heads_range : []); draw();
}
document.getElementById('all').addEventListener('click', () => setAll(true));
document.getElementById('none').addEventListener('click', () => setAll(false));
selText.addEventListener('change', () => { s = +selText.value; focus = null; pinned = false; draw(); });
selLayer.addEventListener('change', () => { l = +selLayer.value; draw(); });
const y = i => TOP + i * ROW + ROW / 2;
function draw(){
  const t = D.samples[s], n = t.tokens.length, m = t.maps[l];
  cv.width = W; cv.height = TOP + n * ROW + 10;
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.font = '12px sans-serif'; ctx.fillStyle = '#555'; ctx.textBaseline = 'middle';
  ctx.textAlign = 'right'; ctx.fillText('queries (rows)', XL, 12);
  ctx.textAlign = 'left'; ctx.fillText('keys (columns)', XR, 12);
  const order = [...heads].sort((a, b) => a - b);
  ctx.lineWidth = 2;
  for (const h of order) {
    ctx.strokeStyle = D.colors[h % D.colors.length];
    for (let i = 0; i < n; i++) {
      if (focus && focus.side === 'q' && focus.i !== i) continue;
      for (let j = 0; j < n; j++) {
        if (focus && focus.side === 'k' && focus.i !== j) continue;
        const w = m[h][i][j];
        if (w < MIN) continue;
        ctx.globalAlpha = Math.min(1, w) * (order.length > 1 ? 0.75 : 1);
        ctx.beginPath(); ctx.moveTo(XL + 6, y(i)); ctx.lineTo(XR - 6, y(j)); ctx.stroke();
      }
    }
  }
  ctx.globalAlpha = 1;
  for (let i = 0; i < n; i++) {
    const on = q => focus && focus.side === q && focus.i === i;
    ctx.fillStyle = on('q') ? '#d62728' : '#000'; ctx.textAlign = 'right';
    ctx.fillText(t.tokens[i].slice(0, 24), XL, y(i));
    ctx.fillStyle = on('k') ? '#d62728' : '#000'; ctx.textAlign = 'left';
    ctx.fillText(t.tokens[i].slice(0, 24), XR, y(i));
  }
  if (focus) {  // the chosen heads' weights beside the other column
    ctx.textAlign = focus.side === 'q' ? 'left' : 'right';
    ctx.font = '11px monospace';
    for (let j = 0; j < n; j++) {
      const vals = order.map(h => focus.side === 'q' ? m[h][focus.i][j] : m[h][j][focus.i]);
      ctx.fillStyle = '#333';
      const txt = vals.slice(0, 4).map(v => v.toFixed(2)).join(' ') + (vals.length > 4 ? ' ...' : '');
      ctx.fillText(txt, focus.side === 'q' ? XR + 110 : 10, y(j));
    }
    info.textContent = (focus.side === 'q' ? 'query ' : 'key ') + focus.i + ' "' + t.tokens[focus.i] +
      '": weights of heads ' + order.join(', ') + (pinned ? ' (pinned; click again to release)' : ' (click to pin)');
  } else {
    info.textContent = 'Hover a token to see only its lines and weights; click to pin.';
  }
}
function at(e){
  const b = cv.getBoundingClientRect(), mx = (e.clientX - b.left) * cv.width / b.width;
  const my = (e.clientY - b.top) * cv.height / b.height, i = Math.floor((my - TOP) / ROW);
  if (i < 0 || i >= D.samples[s].tokens.length) return null;
  return {side: mx < (XL + XR) / 2 ? 'q' : 'k', i: i};
}
cv.addEventListener('mousemove', e => { if (pinned) return; focus = at(e); draw(); });
cv.addEventListener('mouseleave', () => { if (!pinned) { focus = null; draw(); } });
cv.addEventListener('click', e => {
  const f = at(e);
  if (pinned && (!f || (focus && f.side === focus.side && f.i === focus.i))) { pinned = false; focus = f; }
  else if (f) { pinned = true; focus = f; }
  draw();
});
window.embgeomView = {select: (text, layer, hs) => {  // for scripted checks: choose and redraw
  s = text; l = layer; selText.value = text; selLayer.value = layer;
  if (hs) { heads = new Set(hs); headBox.querySelectorAll('input').forEach(c => { c.checked = heads.has(+c.dataset.h); }); }
  draw();
}};
draw();
})();
"""


def write_attention_view(path: str, samples: list[dict], layers: int, heads: int, *,
                         title: str = "attention view", provenance: dict | None = None,
                         decimals: int = 3) -> str:
    """samples: [{"text": id, "tokens": [str] (n), "maps": [L][H][n][n] (lists, array or tensor)}]
    (head_maps.json's entries) -> path, one self-contained HTML page."""
    from .html import write_script_page

    data = {"layers": layers, "heads_range": list(range(heads)), "colors": HEAD_COLORS, "samples": []}
    for k, sm in enumerate(samples):
        maps = sm["maps"].tolist() if hasattr(sm["maps"], "tolist") else sm["maps"]
        data["samples"].append({
            "text": int(sm.get("text", k)), "tokens": [str(t) for t in sm["tokens"]],
            "maps": [[[[round(float(v), decimals) for v in row] for row in m] for m in lay] for lay in maps]})
    style = ("body{font-family:sans-serif;margin:1em;max-width:1100px}"
             "#view{border:1px solid #ddd;cursor:pointer;max-width:100%}#heads{margin:.4em 0;font-size:13px}"
             "#focus{font-size:13px;color:#333;min-height:1.2em}")
    body = (f"<h2>{html.escape(title)}</h2>"
            "<p style='font-size:13px'>Each line joins a query token (left) to a key token (right); its "
            "opacity is the attention weight of that head (lines under 0.01 are not drawn), its colour the "
            "head's. Layers are numbered 1..L, heads from 0 (docs/metrics.md, layers, depths and heads); "
            "texts by their 0-based index over the corpus's non-blank lines. Long texts show their first 64 "
            "tokens (rows of a cut text do not sum to 1).</p>"
            "<p><label>text <select id='text'></select></label> "
            "<label>layer <select id='layer'></select></label> "
            "<button id='all'>all heads</button> <button id='none'>no head</button></p>"
            "<div id='heads'></div><p id='focus'></p><canvas id='view'></canvas>")
    write_script_page(path, title, style, body, "view-data", data, _SCRIPT, provenance)
    return path
