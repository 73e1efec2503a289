"""The interactive pages in a headless browser (Playwright driving an installed Chromium): the
projection scatter zooms under the wheel, a search finds a token and Enter lists its nearest
neighbours, which must be those of knn.npz; the attention view keeps one token's lines on hover.
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


def test_projection_page_zoom_search_neighbours(browser, tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (20, 8)) for c in (0.0, 3.0, -3.0)]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "texts.txt").write_text("\n".join(f"tok{i}" for i in range(60)) + "\n")
    out = tmp_path / "out"
    assert main(["project", str(tmp_path / "x.npy"), "--texts", str(tmp_path / "texts.txt"),
                 "--method", "tsne", "--perplexity", "5", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    knn = np.load(out / "knn.npz")
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "projection.html").as_uri())
    shot = lambda: page.evaluate("document.getElementById('cv').toDataURL()")  # noqa: E731
    before = shot()
    box = page.locator("#cv").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)
    assert shot() != before, "the wheel did not zoom the scatter"
    page.dblclick("#cv")
    assert shot() == before, "a double click did not reset the view"
    page.fill("#q", "tok17")
    page.press("#q", "Enter")
    assert page.text_content("#found") == "1 match"
    listed = [int(a.get_attribute("data-j")) for a in page.query_selector_all("#info a[data-j]")]
    assert listed == knn["indices"][17, :10].tolist()
    assert "tok17" in page.text_content("#info")
    assert errors == []


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
