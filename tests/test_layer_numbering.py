"""One layer numbering everywhere (docs/metrics.md, layers, depths and heads): layers 1..L,
depths 0..L (0 = embeddings), heads from 0, in to_pandas, the HTML tables and the heat maps."""
from __future__ import annotations

import re

import pytest

import embgeom

TEXTS = ["the cat sat on the mat .", "a dog ran in the city ."]


@pytest.fixture(scope="module")
def traced(tiny_bert):
    model, tok = tiny_bert
    return embgeom.trace(model, tok, TEXTS, batch_size=2)


def _first_cells(page: str) -> list[str]:
    """The first cell of every body row of an HTML table."""
    return re.findall(r"<tr><td>([^<]*)</td>", page)


def test_to_pandas_layers_from_one(traced):
    L = traced.layers
    assert L == 2
    df = traced.to_pandas()
    assert df["layer"].tolist() == list(range(1, L + 1))
    assert [row[0] for row in traced.per_layer()] == list(range(1, L + 1))


def test_repr_html_layers_from_one(traced):
    page = traced._repr_html_()
    assert "<th>layer (1..L)</th>" in page
    assert _first_cells(page) == [str(l) for l in range(1, traced.layers + 1)]


def test_heat_map_ticks_layers_and_heads(traced):
    from embgeom.report.plots import HEAD, LAYER
    from embgeom.report.text_page import heatmap_figure

    L, H = traced.layers, traced.heads
    fig, ax = heatmap_figure(traced.entropy.cpu().numpy(), "entropy")
    try:
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(l) for l in range(1, L + 1)]
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(h) for h in range(H)]
        assert ax.get_yticks().tolist() == list(range(L))       # one integer tick per row
        assert ax.get_ylabel() == LAYER and ax.get_xlabel() == HEAD
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_text_report_tables_from_one(traced, tmp_path):
    from embgeom.report.text_page import write_report

    write_report(str(tmp_path), traced, traced.to_dict())
    page = (tmp_path / "report.html").read_text()
    assert "<th>layer (1..L)</th>" in page
    # the summary row, then the per-layer table and the focus-token table, each from layer 1
    cells = _first_cells(page)
    layers = [str(l) for l in range(1, traced.layers + 1)]
    assert cells[1:1 + traced.layers] == layers
    assert cells[1 + traced.layers:1 + 2 * traced.layers] == layers
