"""An L x H grid of attention maps per sample text, drawn in the page (canvas, no network): the
maps travel as JSON inside report.html; a click on a head opens it large with the tokens on both
axes (rows = queries, columns = keys)."""
from __future__ import annotations

from .html import script_json

_SCRIPT = r"""
<script>
(function(){
const DATA = JSON.parse(document.getElementById('headmap-data').textContent);
function color(v){ // white -> dark blue
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - 230*t), g = Math.round(255 - 200*t), b = Math.round(255 - 90*t);
  return 'rgb(' + r + ',' + g + ',' + b + ')';
}
function draw(canvas, m, cell, x0, y0){
  const ctx = canvas.getContext('2d');
  const n = m.length;
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
    ctx.fillStyle = color(m[i][j] / DATA.scale);
    ctx.fillRect(x0 + j*cell, y0 + i*cell, Math.ceil(cell), Math.ceil(cell));
  }
}
function openBig(s, l, h){
  const text = DATA.samples[s], m = text.maps[l][h], toks = text.tokens, n = toks.length;
  const cell = Math.max(10, Math.min(28, Math.floor(640 / n)));
  const pad = 8 + 7 * Math.min(14, Math.max(...toks.map(t => t.length)));
  const c = document.getElementById('headmap-big');
  c.width = pad + n*cell + 10; c.height = pad + n*cell + 10;
  const ctx = c.getContext('2d');
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, c.width, c.height);
  draw(c, m, cell, pad, pad);
  ctx.fillStyle = '#000'; ctx.font = Math.min(12, cell) + 'px sans-serif';
  ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  for (let i = 0; i < n; i++) ctx.fillText(toks[i].slice(0, 14), pad - 4, pad + (i + 0.5)*cell);
  for (let j = 0; j < n; j++) {
    ctx.save(); ctx.translate(pad + (j + 0.5)*cell, pad - 4); ctx.rotate(-Math.PI/2);
    ctx.textAlign = 'left'; ctx.fillText(toks[j].slice(0, 14), 0, 0); ctx.restore();
  }
  document.getElementById('headmap-title').textContent =
    'text ' + DATA.samples[s].text + ', layer ' + (l + 1) + ', head ' + h + ' (rows: queries, columns: keys; ' +
    'darkest = ' + DATA.scale + ')';
  document.getElementById('headmap-overlay').style.display = 'flex';
}
const root = document.getElementById('headmap-grids');
DATA.samples.forEach(function(text, s){
  const box = document.createElement('div');
  const cap = document.createElement('p');
  cap.textContent = 'Text ' + text.text + ': ' + text.tokens.join(' ');
  box.appendChild(cap);
  const table = document.createElement('table');
  table.className = 'headgrid';
  const head = document.createElement('tr');
  const corner = document.createElement('th'); corner.textContent = 'layer / head'; head.appendChild(corner);
  for (let h = 0; h < DATA.heads; h++) {
    const th = document.createElement('th'); th.textContent = 'h' + h; head.appendChild(th);
  }
  table.appendChild(head);
  for (let l = 0; l < DATA.layers; l++) {
    const tr = document.createElement('tr');
    const th = document.createElement('th'); th.textContent = 'L' + (l + 1); tr.appendChild(th);
    for (let h = 0; h < DATA.heads; h++) {
      const td = document.createElement('td');
      const c = document.createElement('canvas');
      const n = text.tokens.length, cell = Math.max(1, 64 / n);
      c.width = Math.round(n * cell); c.height = c.width;
      c.title = 'layer ' + (l + 1) + ', head ' + h + ' (click to enlarge)';
      draw(c, text.maps[l][h], cell, 0, 0);
      c.addEventListener('click', function(){ openBig(s, l, h); });
      td.appendChild(c); tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  box.appendChild(table);
  root.appendChild(box);
});
document.getElementById('headmap-overlay').addEventListener('click', function(){
  this.style.display = 'none';
});
})();
</script>
"""

_STYLE = """
<style>
table.headgrid td{padding:1px;border:none} table.headgrid th{font-size:11px;background:none;border:none}
table.headgrid canvas{cursor:zoom-in;border:1px solid #ddd;width:64px;height:64px;image-rendering:pixelated}
#headmap-overlay{display:none;position:fixed;inset:0;background:rgba(0,0,0,.55);z-index:10;
  align-items:center;justify-content:center;flex-direction:column}
#headmap-overlay>div{background:#fff;padding:10px;max-width:95vw;max-height:95vh;overflow:auto}
</style>
"""


def headmaps_html(samples: list[dict], layers: int, heads: int, decimals: int = 3) -> str:
    """samples: [{"text": id (0-based over the corpus; default the position), "tokens": [str] (n),
    "maps": (L, H, n, n) tensor/array}] -> an HTML fragment
    (data, grid and the enlarge overlay; one script, no network)."""
    data = {"layers": layers, "heads": heads, "scale": 1.0, "samples": []}
    for sm in samples:
        maps = sm["maps"]
        maps = maps.tolist() if hasattr(maps, "tolist") else maps
        r = lambda x: round(float(x), decimals)  # noqa: E731
        data["samples"].append({"text": int(sm.get("text", len(data["samples"]))),
                                "tokens": [str(t) for t in sm["tokens"]],
                                "maps": [[[[r(v) for v in row] for row in m] for m in lay] for lay in maps]})
    blob = script_json(data)
    return (_STYLE + "<p>Each small square is one head's attention map on a text's real tokens "
            "(rows: queries, columns: keys; white 0, dark blue 1). Click a head to enlarge it with "
            "the tokens on the axes; click again to close. Long texts show their first 64 tokens.</p>"
            f"<script type='application/json' id='headmap-data'>{blob}</script>"
            "<div id='headmap-grids'></div>"
            "<div id='headmap-overlay'><div><p id='headmap-title'></p>"
            "<canvas id='headmap-big'></canvas></div></div>" + _SCRIPT)
