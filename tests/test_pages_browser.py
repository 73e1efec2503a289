"""The interactive pages in a headless browser (Playwright driving an installed Chromium): the
projection scatter (a Plotly figure) zooms under the wheel and resets on a double click, a
search finds a token and Enter lists its nearest neighbours, which must be those of knn.npz, as
must the list a click on a point shows; a WebGL (scattergl) page of 1,500 points does the same;
no page asks the network for anything; the attention view keeps one token's lines on hover.
The real outputs of `make demo` and `make demo-text` (reports/, or $EMBGEOM_DEMO_REPORTS; skipped
where absent): every page opened the same way, every figure's axes titled (no browser needed).
Skipped, with the reason, where Playwright or a Chromium binary is missing (nothing is
downloaded at test time; Debian's chromium or chromium-headless-shell and `pip install
playwright` are enough)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import scatter_page

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


def _zoom_and_reset(page, wait_ms):
    """The wheel over the plot's centre narrows the x range; a double click restores the view.
    Returns the view's ranges before."""
    before = _ranges(page)
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    page.wait_for_timeout(wait_ms)
    zoomed = _ranges(page)
    assert zoomed != before, "the wheel did not zoom the scatter"
    assert zoomed[0][1] - zoomed[0][0] < before[0][1] - before[0][0], "the wheel did not zoom the scatter"
    page.dblclick("#plot .nsewdrag")
    page.wait_for_timeout(wait_ms)
    assert np.allclose(_ranges(page), before), "a double click did not reset the view"
    return before


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
    before = _zoom_and_reset(page, 300)
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


# ---- the real outputs of `make demo` and `make demo-text` ------------------------------------
# Not produced here (several minutes): run `make demo` and `make demo-text` first, or point
# EMBGEOM_DEMO_REPORTS at the folder holding their vocab/ and text/ (default: reports/ at the
# repository root). Skipped, with that reason, where they are absent.

REPO = Path(__file__).resolve().parents[1]
DEMO_ROOT = Path(os.environ.get("EMBGEOM_DEMO_REPORTS") or REPO / "reports")
# what the Makefile targets write: demo -> vocab/, demo-text -> text/<run>/
DEMO_EXPECTED = ("vocab/report.html", "text/synonyms/report.html", "text/trajectories/report.html",
                 "text/synonyms_tsne/projection.html", "text/vocab/report.html")
DEMO_PAGES = sorted([*DEMO_ROOT.glob("vocab/*.html"), *DEMO_ROOT.glob("text/*/*.html")])


def _demo_pages_present():
    missing = [f"{p}/" for p in ("vocab", "text") if not (DEMO_ROOT / p).is_dir()]
    if missing:
        pytest.skip(f"no demo outputs in {DEMO_ROOT} ({', '.join(missing)} missing): run make demo and "
                    "make demo-text first (or set EMBGEOM_DEMO_REPORTS to the folder holding vocab/ and text/)")
    absent = [p for p in DEMO_EXPECTED if not (DEMO_ROOT / p).is_file()]
    assert not absent, f"the demo runs in {DEMO_ROOT} are incomplete (rerun make demo / make demo-text): {absent}"


def _demo_id(p):
    return str(p.relative_to(DEMO_ROOT)) if p is not None else "no-demo-outputs"


def _page_knn(path, data):
    """The neighbour graph a scatter page shows (data["knn"]): (indices (N, k) of the file beside
    the page it names (knn.npz, <page>_knn.npz), the page's own (N, k_show) lists), or None. A
    page that names no file (head_mds.html: JS divergences) must not claim one in its heading;
    its own lists stand for the file."""
    if not data["knn"]:
        return None
    shown, name = np.asarray(data["knn"]["i"]), data["knn"].get("file")
    if not name:
        assert ".npz" not in data["knn"]["note"], f"{path.name}: the heading names a file the page does not"
        return shown, shown
    f = path.parent / name
    assert f.is_file(), f"{path.name}: the neighbour file {name} is not beside the page"
    assert name in data["knn"]["note"], (path.name, data["knn"]["note"])
    return np.load(f)["indices"], shown


def _unique_query(data):
    """(row, query) for a row whose text (or id) the page's search finds alone (the page's rule:
    the lower-cased query inside "text id"), preferring rows spread over the input."""
    n, t, ids = data["n"], data["t"], data["ids"]
    hay = [((t[i] if t else "") + " " + str(ids[i] if ids else i)).lower() for i in range(n)]
    for i in np.random.default_rng(0).permutation(n)[:300].tolist():
        for q in ([t[i].strip()] if t else []) + [str(ids[i] if ids else i)]:
            s = q.lower()
            if s and sum(s in h for h in hay) == 1:
                return i, q
    pytest.fail("no row the search finds alone")


def _name(data, i):
    """The page's name of row i (its `name` in the script): id or #row, text, [label]."""
    ident = str(data["ids"][i]) if data["ids"] else f"#{i}"
    return ident + (" " + data["t"][i] if data["t"] else "") + (f" [{data['rows'][i][2]}]" if data["labelled"] else "")


def test_demo_figures_titled_and_neighbours_on_file():
    """No browser: every Plotly figure in the demo pages has a title and titled axes (read from
    the figure JSON each scatter page holds), each page has the provenance footer, and every
    neighbour list a page shows is the file beside it."""
    from helpers import untitled_plotly_axes

    _demo_pages_present()
    folders = sorted({p.parent for p in DEMO_PAGES})
    bad, scatters = [], []
    for folder in folders:
        b, pages = untitled_plotly_axes(folder)
        bad += [(folder.name, *x) for x in b]
        scatters += [folder / p for p in pages]
    assert bad == [], bad
    # every page that draws a Plotly figure is one of those read
    plotly_pages = [p for p in DEMO_PAGES if "Plotly.newPlot" in p.read_text(encoding="utf-8")]
    assert sorted(plotly_pages) == sorted(scatters)
    assert DEMO_ROOT / "text/synonyms_tsne/projection.html" in scatters
    for path in scatters:
        data = scatter_page(path)
        knn = _page_knn(path, data)
        if knn is not None:
            on_file, shown = knn
            assert on_file.shape[0] == data["n"], path
            assert np.array_equal(shown, on_file[:, :shown.shape[1]]), f"{path}: the page's neighbours are not its file's"


@pytest.mark.parametrize("path", DEMO_PAGES or [None], ids=_demo_id)
def test_demo_page_in_browser(browser, path):
    """Each page of the demo runs loads offline (no request beyond the file, no console error);
    a scatter page zooms under the wheel, resets on a double click, finds a token by search and
    lists the neighbours of knn.npz (or the page's named file) on Enter and on a click; a
    report.html links only pages and anchors that exist, and links every page beside it."""
    _demo_pages_present()
    uri = path.as_uri()
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    errors, blocked = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.route("**/*", lambda r: r.continue_() if r.request.url == uri else (blocked.append(r.request.url), r.abort()))
    text = path.read_text(encoding="utf-8")
    scatter = "Plotly.newPlot" in text
    page.goto(uri, wait_until="load", timeout=120000)
    try:
        if scatter:
            _demo_scatter(page, path)
        if path.name == "report.html":
            _demo_report(page, path, text)
        assert errors == [] and blocked == [], (errors, blocked)
    finally:
        page.close()


def _demo_scatter(page, path):
    data = scatter_page(path)
    page.wait_for_selector("#plot[data-ready='1']", timeout=120000)
    _zoom_and_reset(page, 500)
    knn = _page_knn(path, data)
    want = (lambda i: [j for j in knn[0][i, :knn[1].shape[1]].tolist() if j >= 0]) if knn else (lambda i: [])
    row, query = _unique_query(data)
    page.fill("#q", query)
    page.press("#q", "Enter")
    assert page.text_content("#found") == "1 match", query
    assert page.text_content("#info").startswith(_name(data, row)), (query, page.text_content("#info"))
    assert _listed(page) == want(row), query
    # a click on the most isolated point (near-duplicate texts lie on one another: the rightmost
    # point of synonyms_tsne hides under its twin) lists its neighbours
    from scipy.spatial import cKDTree

    page.fill("#q", "")
    page.dblclick("#plot .nsewdrag")
    page.wait_for_timeout(700)                           # past Plotly's double-click window
    xy = np.array([r[:2] for r in data["rows"]], dtype=float)
    xy /= np.where(np.ptp(xy, axis=0) > 0, np.ptp(xy, axis=0), 1.0)
    row = int(np.argmax(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    _click_row(page, row)
    page.wait_for_timeout(500)
    assert page.text_content("#info").startswith(_name(data, row)), page.text_content("#info")
    assert _listed(page) == want(row)


def _demo_report(page, path, text):
    folder = path.parent
    hrefs = set(re.findall(r"href=['\"]([^'\"]*)['\"]", text))
    ids = set(re.findall(r"\bid=['\"]([^'\"]+)['\"]", text))
    anchors = [h for h in hrefs if h.startswith("#") and h != "#"]
    assert [h for h in anchors if h[1:] not in ids] == [], "links to anchors the page lacks"
    local = [h for h in hrefs if h and not h.startswith(("#", "http://", "https://", "mailto:"))]
    assert [h for h in local if not (folder / h.split("#")[0]).is_file()] == [], "links to missing pages"
    side = {p.name for p in folder.glob("*.html")} - {"report.html"}
    assert side <= {h.split("#")[0] for h in local}, "pages beside report.html it does not link"
    # every inlined picture decodes
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || !i.naturalWidth).map(i => i.alt)")
    assert broken == []
