"""Every figure of the text, vocab and project reports names its axes, a grid's axes at least once
per row / column or figure-wide (read from the figure objects as they are saved: matplotlib's
Axes, and the Plotly figure each interactive scatter page holds as JSON), and head axes carry
integer ticks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import untitled_plotly_axes

from embgeom.cli import main
from embgeom.report import plots

pytest.importorskip("matplotlib")

CORPUS = ["the king rode a horse.", "a queen sat on the throne.", "big dogs bark, small dogs yap.",
          "the cat sat on the mat.", "it rained all day.", "we went home early."]


@pytest.fixture
def figures(monkeypatch):
    seen = []
    real = plots.save_figure

    def record(fig, out_dir, name):
        # a grid may name an axis once: a figure-wide label (supxlabel / supylabel), or the
        # label of another panel in the same column (x) or row (y), as matplotlib's label_outer
        plain = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        sup = [getattr(fig, f"_sup{a}label", None) for a in "xy"]
        sup = [t.get_text() if t is not None else "" for t in sup]
        spans = {id(ax): ax.get_subplotspec() for ax in plain}
        col_x = {ss.colspan.start: ax.get_xlabel() for ax in plain
                 if (ss := spans[id(ax)]) is not None and ax.get_xlabel()}
        row_y = {ss.rowspan.start: ax.get_ylabel() for ax in plain
                 if (ss := spans[id(ax)]) is not None and ax.get_ylabel()}
        axes = []
        for ax in plain:
            ss = spans[id(ax)]
            labels = [ax.get_xlabel() or sup[0] or (col_x.get(ss.colspan.start, "") if ss else ""),
                      ax.get_ylabel() or sup[1] or (row_y.get(ss.rowspan.start, "") if ss else "")]
            if hasattr(ax, "get_zlabel"):
                labels.append(ax.get_zlabel())
            ticks = [t.get_text() for t in ax.get_xticklabels()]
            axes.append((labels, ticks))
        seen.append((name, axes))
        return real(fig, out_dir, name)

    monkeypatch.setattr(plots, "save_figure", record)
    # the page modules imported save_figure by name
    import embgeom.report as report
    import embgeom.report.head_sections as hs
    import embgeom.report.interactive as it
    import embgeom.report.syntax_page  # noqa: F401
    import embgeom.report.text_page as tp
    import embgeom.report.vocab_page as vp

    for mod in (report, hs, tp, vp):
        monkeypatch.setattr(mod, "save_figure", record)
    monkeypatch.setattr(plots, "save_axes", lambda fig, ax, out_dir, name, *, xlabel, ylabel, title:
                        (ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title), record(fig, out_dir, name))[-1])
    monkeypatch.setattr(vp, "save_axes", plots.save_axes)
    assert it  # scatter_png imports save_figure from .plots at call time
    return seen


def _unlabelled(seen):
    bad = []
    for name, axes in seen:
        for labels, ticks in axes:
            if not all(labels):
                bad.append((name, labels))
            if any(t.endswith(".5") for t in ticks) and any("head" in lab for lab in labels):
                bad.append((name, "fractional head ticks", ticks))
    return bad


def test_text_figures_have_labelled_axes(figures, tiny_bert_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    labels = tmp_path / "l.txt"
    labels.write_text("\n".join(["royal", "royal", "animal", "animal", "other", "other"]) + "\n")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"group": "g", "a": "the king", "b": "the queen"}\n'
                     '{"group": "h", "a": "big", "b": "small"}\n', encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "t"), "--model", tiny_bert_dir, "--quiet",
                 "--labels", str(labels), "--trajectories", "2", "--pairs", str(pairs), "--heads",
                 "--clark-js", "--gaussianity", "--similar", "topk:2", "--head-maps", "1", "--directionality"]) == 0
    assert len(figures) >= 12
    bad = _unlabelled(figures)
    assert bad == [], "\n".join(map(str, bad))
    assert "head_directionality" in dict(figures)  # (its layer axis named once, for its row)
    # Clark's strips (figures 2 and 4): the row entropy and the [CLS] row's, and eight attention
    # targets ([CLS], [SEP], '.' or ',', '.', ',', other -> [SEP], next, previous), one panel each,
    # over layers 1..L
    clark = dict(figures)["clark_heads"]
    assert len(clark) == 10
    assert all(labels[0] == plots.LAYER and ticks == ["1", "2"] for labels, ticks in clark)
    assert [labels[1] for labels, _ in clark] == ["entropy (nats)"] * 2 + ["attention mass per query row"] * 8
    # the interactive scatters (Plotly figures in the pages): every axis titled
    bad, pages = untitled_plotly_axes(tmp_path / "t")
    assert {"groups_pca.html", "head_mds.html"} <= set(pages) and bad == [], (pages, bad)


def test_project_page_axes_titled(tmp_path):
    """projection.html's Plotly figure names both axes after the method and has a title."""
    import numpy as np

    from helpers import scatter_page

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(30, 6)).astype(np.float32))
    for method, axis in (("pca", "PC"), ("tsne", "t-SNE")):
        out = tmp_path / method
        extra = ["--perplexity", "5"] if method == "tsne" else []
        assert main(["project", str(tmp_path / "x.npy"), "--method", method, *extra,
                     "--out", str(out), "--quiet"]) == 0
        assert untitled_plotly_axes(out) == ([], ["projection.html"])
        layout = scatter_page(out / "projection.html")["figure"]["layout"]
        assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == (f"{axis} 1", f"{axis} 2")


def test_scatter_page_neighbours_keep_a_float32s_digits(tmp_path):
    """The neighbour list a click shows keeps 8 significant digits: an early layer's [CLS] cloud
    has cosines of 0.99999985 and 0.99999976, which 4 decimals had shown as 1 and 1."""
    import numpy as np

    from embgeom.report.interactive import write_scatter_html
    from helpers import scatter_page

    sims = np.array([[0.99999985, 0.99999976], [0.99999983, 0.5]], dtype=np.float32)
    write_scatter_html(str(tmp_path / "p.html"), np.zeros((2, 2)), knn=(np.array([[1, 0], [0, 1]]), sims))
    shown = scatter_page(tmp_path / "p.html")["knn"]["s"]
    assert shown == [[0.99999982, 0.99999976], [0.99999982, 0.5]], shown  # (the float32 values, 8 digits)


def test_vocab_figures_have_labelled_axes(figures, tiny_bert_dir, tmp_path):
    import os

    # (a model folder named like markup: the page shows the name as text, it had ended the page)
    model = tmp_path / "tiny<!--x"
    os.symlink(tiny_bert_dir, model)
    assert main(["vocab", "--model", str(model), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert len(figures) >= 5
    bad = _unlabelled(figures)
    assert bad == [], "\n".join(map(str, bad))
    page = (tmp_path / "v" / "report.html").read_text(encoding="utf-8")
    assert "<!--" not in page and "tiny&lt;!--x" in page
    # the pairs nearest 0 show their float64 cosines: a float32 value within rounding of 0 is
    # mostly noise (2.2e-10 where float64 gives 1.7e-8, signs flipped in 7 of 10)
    import re

    from embgeom.formatting import fmt

    report = json.loads((tmp_path / "v" / "report.json").read_text())
    table = page[page.index("<h3>nearest to 0</h3>"):]
    table = table[:table.index("</table>")]
    cells = [re.findall(r"<td>(.*?)</td>", row)[2] for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    pairs = report["pairs"]
    assert cells == [fmt(v) for _, _, v in pairs["near_zero_tokens"]]
    from safetensors.torch import load_file

    word = load_file(f"{tiny_bert_dir}/model.safetensors")["embeddings.word_embeddings.weight"].double().numpy()
    for (i, j, _), (_, _, v) in zip(pairs["near_pairs"], pairs["near_zero_tokens"]):
        want = word[i] @ word[j] / (np.linalg.norm(word[i]) * np.linalg.norm(word[j]))
        assert v == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_vocab_projection_pages(tiny_bert_dir, tmp_path):
    """vocab --projections: the UMAP and t-SNE pages of words and positions are Plotly scatters
    with titled axes, the provenance footer, and token ids (not rows) on hover and in search."""
    pytest.importorskip("umap")
    pytest.importorskip("openTSNE")
    from helpers import scatter_page

    out = tmp_path / "v"
    assert main(["vocab", "--model", tiny_bert_dir, "--out", str(out), "--projections", "--quiet"]) == 0
    bad, pages = untitled_plotly_axes(out)
    assert set(pages) == {"words_umap.html", "words_tsne.html", "positions_umap.html",
                          "positions_tsne.html"} and bad == [], (pages, bad)
    data = scatter_page(out / "words_umap.html")
    layout = data["figure"]["layout"]
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == ("UMAP 1", "UMAP 2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    assert data["t"] == tok.convert_ids_to_tokens(data["ids"])    # ids are token ids
    assert data["ids"] != list(range(len(data["ids"])))
    assert len(data["knn"]["i"]) == data["n"] == len(data["ids"])
    # each page's neighbour lists are those of the graph file beside it, which the page names
    import numpy as np

    for page in pages:
        d = scatter_page(out / page)
        name = page.replace(".html", "_knn.npz")
        assert d["knn"]["file"] == name and name in d["knn"]["note"]
        on_file = np.load(out / name)
        assert on_file["indices"].dtype == np.int64 and on_file["indices"].shape == on_file["similarities"].shape
        k = len(d["knn"]["i"][0])
        assert on_file["indices"][:, :k].tolist() == d["knn"]["i"]
        # the rows' ids travel with the graph: its indices are rows, not token ids
        assert on_file["ids"].dtype == np.int64 and on_file["ids"].tolist() == d["ids"]


def test_scatter_script_parses():
    """The scatter pages' own script (search, neighbour list; Plotly draws, zooms and pans) is
    valid JavaScript (node --check); tests/test_pages_browser.py drives it in Chromium."""
    import shutil
    import subprocess

    from embgeom.report.interactive import _SCRIPT

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page script cannot be parsed here")
    r = subprocess.run([node, "--check", "-"], input=_SCRIPT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_scatter_page_without_plotly(tmp_path, monkeypatch):
    """Without plotly a scatter page fails with how to install it, not a bare ModuleNotFoundError;
    `embgeom project` says so before any work (it had printed a traceback after the layout)."""
    import sys

    from embgeom.report.interactive import write_scatter_html

    for name in ("plotly", "plotly.graph_objects", "plotly.offline"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError, match=r"plotly is not installed \(the interactive scatter pages\); "
                                         r"`pip install plotly` \(or `pip install 'embgeom\[hf\]'`\)"):
        write_scatter_html(str(tmp_path / "p.html"), [[0.0, 1.0], [1.0, 0.0]])
    assert not (tmp_path / "p.html").exists()
    import numpy as np

    from embgeom import cli
    from embgeom.analysis.clouds import projection

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32))
    monkeypatch.setattr(projection, "exact_knn", lambda *a, **k: pytest.fail("the graph was computed"))
    assert cli.main(["project", str(tmp_path / "x.npy"), "--method", "umap", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("labels", [["a"] * 6, list("abcdef"), list("aaabbb")],
                         ids=["one-label", "one-text-each", "two-labels"])
def test_label_cosine_panels_without_pairs_say_why(labels, tmp_path, monkeypatch, recwarn):
    """A panel with no pairs to draw (one label; labels of one text) carries a note, not empty
    axes and an empty legend; a panel with curves has its legend and no note (the curves are
    stairs, patches: the check had counted lines, and every panel said it had no pairs)."""
    import numpy as np

    import embgeom.report.text_page as tp
    from embgeom.analysis.clouds.geometry import group_geometry

    saved = {}
    real = tp.save_figure

    def keep(fig, out_dir, name):
        saved[name] = [(len(ax.patches), [t.get_text() for t in ax.texts], ax.get_legend() is not None)
                       for ax in fig.axes]
        return real(fig, out_dir, name)

    monkeypatch.setattr(tp, "save_figure", keep)
    cls = np.random.default_rng(0).standard_normal((6, 3, 16)).astype(np.float32)
    np.save(tmp_path / "cls.npy", cls)
    tp.group_plots(str(tmp_path), str(tmp_path / "cls.npy"), labels, group_geometry(cls, labels), None)
    panels = saved["groups_cosine_hist"]
    assert len(panels) == 2
    # within a label: curves where a label has two texts; across: where there are two labels
    assert [curves > 0 for curves, _, _ in panels] == [len(set(labels)) < 6, len(set(labels)) > 1]
    for curves, texts, legend in panels:
        assert (curves > 0 and legend and not texts) or (curves == 0 and texts and not legend), panels
    assert not [w for w in recwarn if "No artists with labels" in str(w.message)]


def test_page_data_cannot_end_or_reshape_its_script_element(tmp_path):
    """Texts, labels and tokens go into the pages' <script type=application/json> blocks with
    every <, > and & escaped (JSON's \\u003c ...): "</script>" cannot end the block and
    "<!--<script>" cannot make the browser read past its </script> (escaping "</" alone had let a
    corpus line "hello <!--<script> world" swallow the page's script and footer)."""
    import json

    import numpy as np

    from embgeom.report.interactive import write_scatter_html

    hostile = ["hello <!--<script> world", "</script><b>x</b>", "a & b -->", "<!--"]
    labels = ["<!--<b>L", "A&B</script>", "<!--<b>L", "c"]
    path = write_scatter_html(str(tmp_path / "p.html"), np.zeros((4, 2), np.float32), labels, hostile,
                              title="<!--t", note="n</script>")
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    block = page.split("id='data'>", 1)[1].split("</script>", 1)[0]
    assert not set("<>&") & set(block)
    data = json.loads(block)
    assert data["t"] == hostile
    # legend names are text to Plotly (it draws <b> and friends): escaped there, as given in labels
    names = [t["name"] for t in data["figure"]["data"][:data["match_trace"]]]
    assert sorted(names) == ["&lt;!--&lt;b&gt;L", "A&amp;B&lt;/script&gt;", "c"]
    assert sorted(data["labels"]) == ["<!--<b>L", "A&B</script>", "c"]
    assert [n.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for n in names] == data["labels"]
    assert path.endswith("p.html") and page.count("<!--") == 0


def test_users_strings_are_drawn_letter_for_letter(tiny_bert_dir, tmp_path, monkeypatch):
    """Labels, group names and tokens reach matplotlib as text, not mathtext: two `$` in one had
    started a formula whose parse error ended the run after its forward passes, and a label
    starting with `_` (fastText's `__label__pos`) was left out of every legend."""
    drawn = []
    real = plots.save_figure

    def record(fig, out_dir, name):
        fig.canvas.draw()  # (every text laid out, as the saved PNG has it)
        drawn.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        drawn.extend(t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.texts)
        return real(fig, out_dir, name)

    import embgeom.report as report
    import embgeom.report.head_sections as hs
    import embgeom.report.text_page as tp

    for mod in (plots, report, hs, tp):
        monkeypatch.setattr(mod, "save_figure", record)
    texts = ["it cost $5 and $6 .", "a dollar $$ sign .", "we paid $ 7 .", "the king rode on .",
             "a queen sat down .", "big dogs bark now ."]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    names = ["cost: $5%, $6", "__label__pos", "a$b_$c"]
    labels = tmp_path / "l.txt"
    labels.write_text("\n".join(names * 2) + "\n", encoding="utf-8")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"group": "a$b_$c", "a": "the king", "b": "the queen"}\n'
                     '{"group": "__h", "a": "big", "b": "small"}\n', encoding="utf-8")
    assert main(["text", str(corpus), "--out", str(tmp_path / "t"), "--model", tiny_bert_dir, "--quiet",
                 "--labels", str(labels), "--class-maps", "7", "--trajectories", "2", "--pairs", str(pairs)]) == 0
    def as_shown(text):  # (what the PNG shows of a text that is not mathtext)
        return text.replace("\u2060", "").replace("\\$", "$")

    shown = {as_shown(t) for t in drawn}
    for name in names:
        assert name in shown or any(s.startswith(name + " (") for s in shown), (name, sorted(shown))
    assert {"a$b_$c", "__h"} <= shown
    assert any("$" in s for s in shown if ":" in s)  # a token of the trajectories, "0:$"
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    drawn.clear()
    assert main(["project", str(tmp_path / "x.npy"), "--labels", str(labels), "--method", "pca",
                 "--out", str(tmp_path / "p")]) == 0
    assert set(names) <= {as_shown(t) for t in drawn}


def test_explained_variance_curves_take_the_scatters_colours(tmp_path, monkeypatch):
    """A label of one point has no curve; the others keep their scatter colours (the curves had
    been coloured by the labels with curves: b took a's colour, c b's)."""
    import numpy as np
    from matplotlib.colors import to_hex

    import embgeom.report.plots as plots
    from embgeom.analysis.clouds import projection
    from embgeom.report.interactive import label_color

    labels = ["a"] + ["b"] * 5 + ["c"] * 5
    x = np.random.default_rng(1).standard_normal((11, 4))
    seen = {}
    real = plots.save_figure

    def keep(fig, out_dir, name):
        seen.update({line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()})
        return real(fig, out_dir, name)

    monkeypatch.setattr(plots, "save_figure", keep)
    plots.explained_variance_png(str(tmp_path), "ev", projection.pca_curves(x, labels), labels)
    assert set(seen) == {"all points", "b", "c"}
    assert seen["b"] == label_color("b", labels) and seen["c"] == label_color("c", labels)


def test_curves_over_heads_leave_a_head_without_a_value_out():
    """The cone-index plot and the heads' bands took the plain mean, min and max over heads: one
    head without a value (None in report.json) had left a gap where the table beside it has a
    number; a layer with no value at all stays a gap, without a warning."""
    import warnings

    import numpy as np

    from embgeom.report.plots import over_heads

    v = np.array([[0.2, np.nan, 0.4], [np.nan, np.nan, np.nan], [0.1, 0.3, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, low, high = over_heads(v)
    np.testing.assert_allclose(mean, [0.3, np.nan, 0.3])
    np.testing.assert_array_equal(low, [0.2, np.nan, 0.1])
    np.testing.assert_array_equal(high, [0.4, np.nan, 0.5])
