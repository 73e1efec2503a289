"""The interactive pages in a headless browser (Playwright driving an installed Chromium): the
projection scatter (a Plotly figure) zooms under the wheel and resets on a double click, a
search finds a token and Enter lists its nearest neighbours, which must be those of knn.npz, as
must the list a click on a point shows; a WebGL (scattergl) page of 1,500 points does the same;
no page asks the network for anything; the attention view keeps one token's lines on hover.
Skipped, with the reason, where Playwright or a Chromium binary is missing (nothing is
downloaded at test time; Debian's chromium or chromium-headless-shell and `pip install
playwright` are enough)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from embgeom.cli import main

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        except Exception as exc:  # no bundled browser and none on PATH
            pytest.skip(f"no Chromium to drive (looked for {', '.join(BROWSERS)} on PATH and "
                        f"Playwright's own): {str(exc).splitlines()[0]}")
        yield b
        b.close()


def _open(browser, path):
    """The page loaded and its figure drawn; (page, errors, requests beyond the file itself)."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors, requests = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: r.url != path.as_uri() and requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("#plot[data-ready='1']", timeout=30000)
    return page, errors, requests


def _ranges(page):
    return page.evaluate("(() => { const L = document.getElementById('plot')._fullLayout;"
                         " return [L.xaxis.range.slice(), L.yaxis.range.slice()]; })()")


def _click_row(page, row):
    """Click the point of input row `row` where Plotly draws it (pixels from the axes' l2p)."""
    x, y = page.evaluate("""(r => { const gd = document.getElementById('plot'), L = gd._fullLayout;
        for (const tr of gd.data) { const j = (tr.customdata || []).indexOf(r);
          if (j >= 0) return [L._size.l + L.xaxis.l2p(tr.x[j]), L._size.t + L.yaxis.l2p(tr.y[j])]; } })""", row)
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + x + 30, box["y"] + y + 30)
    page.mouse.move(box["x"] + x, box["y"] + y)
    page.wait_for_timeout(200)        # Plotly's click reports the hovered point: hover first
    page.mouse.click(box["x"] + x, box["y"] + y)


def _listed(page):
    return [int(a.get_attribute("data-j")) for a in page.query_selector_all("#info a[data-j]")]


def test_projection_page_zoom_search_neighbours(browser, tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (20, 8)) for c in (0.0, 3.0, -3.0)]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "texts.txt").write_text("\n".join(f"tok{i}" for i in range(60)) + "\n")
    out = tmp_path / "out"
    assert main(["project", str(tmp_path / "x.npy"), "--texts", str(tmp_path / "texts.txt"),
                 "--method", "tsne", "--perplexity", "5", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    knn = np.load(out / "knn.npz")
    page, errors, requests = _open(browser, out / "projection.html")
    before = _ranges(page)
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    page.wait_for_timeout(300)
    zoomed = _ranges(page)
    assert zoomed != before, "the wheel did not zoom the scatter"
    assert zoomed[0][1] - zoomed[0][0] < before[0][1] - before[0][0]
    page.dblclick("#plot .nsewdrag")
    page.wait_for_timeout(300)
    assert np.allclose(_ranges(page), before), "a double click did not reset the view"
    page.fill("#q", "tok17")
    page.press("#q", "Enter")
    assert page.text_content("#found") == "1 match"
    assert _listed(page) == knn["indices"][17, :10].tolist()
    assert "tok17" in page.text_content("#info")
    assert _ranges(page) != before, "Enter did not zoom to the match"
    assert page.evaluate("document.getElementById('plot').data[0].selectedpoints") == [17]
    page.fill("#q", "no such token")                     # no match dims nothing
    assert page.text_content("#found") == "0 matches"
    assert page.evaluate("document.getElementById('plot').data[0].selectedpoints") is None
    # a click on another point lists its neighbours
    page.fill("#q", "")
    page.dblclick("#plot .nsewdrag")
    page.wait_for_timeout(700)                           # past Plotly's double-click window
    _click_row(page, 42)
    page.wait_for_timeout(300)
    assert page.text_content("#info").startswith("#42 tok42")
    assert _listed(page) == knn["indices"][42, :10].tolist()
    assert errors == [] and requests == []


def test_webgl_scatter_page(browser, tmp_path):
    """Above GL_POINTS the traces are scattergl; search, click and the neighbour list still work."""
    from embgeom.report.interactive import GL_POINTS, write_scatter_html

    n = 1500
    assert n > GL_POINTS
    rng = np.random.default_rng(1)
    xy = rng.normal(size=(n, 2))
    idx = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1:11]
    sim = -np.sort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1:11]
    path = tmp_path / "gl.html"
    write_scatter_html(str(path), xy, ["word"] * (n - 50) + ["position"] * 50, [f"w{i}" for i in range(n)],
                       ids=np.arange(n) + 5000, knn=(idx, sim), xlabel="UMAP 1", ylabel="UMAP 2")
    page, errors, requests = _open(browser, path)
    assert page.evaluate("document.getElementById('plot').data.map(t => t.type)") == ["scattergl"] * 4
    buttons = page.evaluate("Array.from(document.querySelectorAll('.modebar-btn')).map(e => e.dataset.title)")
    assert "Pan" in buttons and not any("Share" in b for b in buttons), buttons   # no upload to Plotly Cloud
    page.fill("#q", "5234")                              # the id of row 234 (no text has it)
    page.press("#q", "Enter")
    assert page.text_content("#found") == "1 match"
    assert page.text_content("#info").startswith("5234 w234 [word]")
    assert _listed(page) == idx[234].tolist()
    page.fill("#q", "")
    page.dblclick("#plot .nsewdrag")
    page.wait_for_timeout(300)
    row = int(np.argmax(xy[:, 0]))                       # the rightmost point: nothing drawn over it
    _click_row(page, row)
    page.wait_for_timeout(300)
    assert page.text_content("#info").startswith(f"{row + 5000} w{row} ")
    assert _listed(page) == idx[row].tolist()
    assert errors == [] and requests == []


def test_attention_view_hover(browser, tiny_bert_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat .\nit rained all day .\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["text", str(corpus), "--out", str(out), "--model", tiny_bert_dir, "--quiet",
                 "--show-texts", "1"]) == 0
    tokens = json.loads((out / "head_maps.json").read_text())[0]["tokens"]
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "attention_view.html").as_uri())
    assert page.locator("#text option").count() == 1 and page.locator("#layer option").count() == 2
    box = page.locator("#view").bounding_box()
    # the page's rows: 20 px from y = 30; the query column left of the middle
    page.mouse.move(box["x"] + 150, box["y"] + 30 + 2 * 20 + 10)
    assert page.text_content("#focus").startswith(f'query 2 "{tokens[2]}"')
    page.mouse.click(box["x"] + 500, box["y"] + 30 + 10)
    assert "pinned" in page.text_content("#focus") and 'key 0 "[CLS]"' in page.text_content("#focus")
    assert errors == []
