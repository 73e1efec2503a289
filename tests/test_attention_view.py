"""--show-texts and attention_view.html: the texts chosen by ids or a regex, the page written and
linked, and its script run under node against a recording canvas (the lines it draws are the
weights of head_maps.json)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from embgeom.cli import main
from helpers import scatter_page

CORPUS = ["the cat sat on the mat .", "a dog barks , loudly .", "she was in the house .",
          "the dog sat .", "it rained all day ."]


def _run(tiny_bert_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    code = main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--quiet",
                 "--batch-size", "2", *extra])
    return code, out


def test_show_texts_ids_and_regex(tiny_bert_dir, tmp_path, capsys):
    code, out = _run(tiny_bert_dir, tmp_path / "a", "--show-texts", "4,1")
    assert code == 0
    maps = json.loads((out / "head_maps.json").read_text())
    assert [m["text"] for m in maps] == [1, 4]
    assert maps[0]["tokens"][:3] == ["[CLS]", "a", "dog"]
    report = json.loads((out / "report.json").read_text())
    assert report["attention_heads"]["sample_maps"]["texts"] == [1, 4]
    # the context-similarity maps follow the same texts
    assert report["context_similarity"]["maps"]["text_ids"] == [1, 4]
    assert sorted(np.load(out / "context_maps.npz").files) == ["text1_S", "text1_tokens", "text4_S", "text4_tokens"]
    page = (out / "attention_view.html").read_text()
    assert "view-data" in page and "http" not in page and "Provenance" in page
    assert "href='attention_view.html'" in (out / "report.html").read_text()

    # a regex, capped by --head-maps: the first match only
    code, out = _run(tiny_bert_dir, tmp_path / "b", "--show-texts", r"\bdog\b", "--head-maps", "1")
    assert code == 0
    assert [m["text"] for m in json.loads((out / "head_maps.json").read_text())] == [1]
    # fewer matches than asked: a note, and the matches kept
    code, out = _run(tiny_bert_dir, tmp_path / "c", "--show-texts", "dog")
    assert code == 0
    assert [m["text"] for m in json.loads((out / "head_maps.json").read_text())] == [1, 3]
    assert "selected 2 text(s) of the 4 asked for" in capsys.readouterr().err


@pytest.mark.parametrize("sel,message", [("7", "text id 7 out of range; the corpus has 5 texts"),
                                         ("a(b", "neither comma-separated text ids nor a valid regular"),
                                         ("-1", "text ids are 0-based and never negative, got '-1'"),
                                         ("0,-3", "text ids are 0-based and never negative")])
def test_show_texts_errors(tiny_bert_dir, tmp_path, capsys, sel, message):
    code, _ = _run(tiny_bert_dir, tmp_path, "--show-texts", sel)
    assert code == 2
    assert message in capsys.readouterr().err


# a DOM just large enough for the page script; the canvas records every line it strokes
_HARNESS = r"""
const lines = [];
function el(id) {
  return {id, style: {}, dataset: {}, children: [], value: '0', textContent: '', checked: false, width: 0, height: 0,
    appendChild(c) { this.children.push(c); }, addEventListener() {},
    querySelectorAll() { return this.children.filter(c => c.type === 'checkbox'); },
    getBoundingClientRect() { return {left: 0, top: 0, width: this.width, height: this.height}; },
    getContext() { let from = null; const ctx = {globalAlpha: 1, strokeStyle: '', lineWidth: 1,
      clearRect() {}, fillText() {}, beginPath() {}, moveTo(x, y) { from = [x, y]; },
      lineTo(x, y) { lines.push({alpha: ctx.globalAlpha, color: ctx.strokeStyle, y0: from[1], y1: y}); },
      stroke() {}}; return ctx; }};
}
const els = {};
global.window = {};
global.document = {getElementById(id) {
    if (id === 'view-data') return {textContent: DATA};
    return els[id] || (els[id] = el(id)); },
  createElement(tag) { return el(tag); }, createTextNode(t) { return {textContent: t}; }};
"""


def test_attention_view_draws_the_weights(tiny_bert_dir, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page script cannot be run here")
    code, out = _run(tiny_bert_dir, tmp_path, "--show-texts", "2")
    assert code == 0
    page = (out / "attention_view.html").read_text()
    data = re.search(r"id='view-data'>(.*?)</script>", page, re.S).group(1)
    script = re.findall(r"<script>(.*?)</script>", page, re.S)[-1]
    layer, head = 1, 2
    js = (f"const DATA = {json.dumps(data)};\n" + _HARNESS + script
          + f"\nlines.length = 0; window.embgeomView.select(0, {layer}, [{head}]);\n"
          "console.log(JSON.stringify(lines));")
    r = subprocess.run([node, "-"], input=js, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    drawn = json.loads(r.stdout)
    m = json.loads((out / "head_maps.json").read_text())[0]["maps"][layer][head]
    row, top = 20, 30                              # the page's row height and first row
    want = sorted((i, j, w) for i, r_ in enumerate(m) for j, w in enumerate(r_) if w >= 0.01)
    got = sorted((round((d["y0"] - top - row / 2) / row), round((d["y1"] - top - row / 2) / row),
                  d["alpha"]) for d in drawn)
    assert want and [g[:2] for g in got] == [w[:2] for w in want]
    assert max(abs(g[2] - min(1, w[2])) for g, w in zip(got, want)) < 1e-9
    assert {d["color"] for d in drawn} == {"#2ca02c"}   # head 2's colour only


def test_head_mds_page(tiny_bert_dir, tmp_path):
    """head_mds.html: one point per head named 'L{l} h{h}' at its MDS coordinates, id
    (l - 1) * H + h, and a click's list the nearest heads by report.json's js_divergence."""
    import numpy as np

    code, out = _run(tiny_bert_dir, tmp_path, "--clark-js")
    assert code == 0
    ah = json.loads((out / "report.json").read_text())["attention_heads"]
    assert "href='head_mds.html'" in (out / "report.html").read_text()
    data = scatter_page(out / "head_mds.html")      # the Plotly figure and the page's data
    L, H = 2, 4
    assert data["t"] == [f"L{l} h{h}" for l in range(1, L + 1) for h in range(H)]
    assert data["ids"] == list(range(L * H))
    np.testing.assert_allclose([r[:2] for r in data["rows"]], np.asarray(ah["mds"]), atol=1e-5)
    assert [r[2] for r in data["rows"]] == [b for row in ah["mds_behaviour"] for b in row]
    hover = [h for tr in data["figure"]["data"][:data["match_trace"]] for h in tr["hovertext"]]
    assert sorted(hover) == sorted(f"{k} L{k // H + 1} h{k % H} [{b}]" for k, b in
                                   enumerate(b for row in ah["mds_behaviour"] for b in row))
    layout = data["figure"]["layout"]
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == ("MDS 1", "MDS 2")
    js = np.asarray(ah["js_divergence"])
    for k in range(L * H):
        near = data["knn"]["i"][k]
        assert k not in near and len(near) == L * H - 1
        d = js[k, near]
        assert np.all(np.diff(d) >= 0) and d[0] == np.delete(js[k], k).min()
    assert "summed JS divergence" in data["knn"]["note"]


def test_show_texts_ids_are_ascii_digits():
    """'²' and '١' are digits to str.isdigit: '²' had raised int()'s error naming no option, '١'
    had been text id 1; both are regular expressions (texts holding them)."""
    from embgeom.analysis.heads.text_extras import parse_show_texts

    for spec in ("²", "١", "1,²"):
        accept, named = parse_show_texts(spec)
        assert accept(0, f"a {spec} b") and not accept(1, "plain text")
    accept, named = parse_show_texts("1,3")
    assert named == 2 and accept(3, "") and not accept(2, "")
