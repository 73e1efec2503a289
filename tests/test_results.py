"""Results in a notebook: _repr_html_ summaries and to_pandas() tables match the result data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import embgeom

from helpers import make_embeddings

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def stats():
    x = make_embeddings(40, 8, zero_rows=1, seed=3)
    return embgeom.pairwise_stats(x, bins=10, topk=4, bottomk=3, row_topk=2, outside=(-0.3, 0.3), outside_limit=5)


def test_pair_lists_as_dataframes(stats):
    df = stats.to_pandas("top_pairs")
    assert list(df.columns) == ["i", "j", "value"]
    assert df.values.tolist() == [[float(v) for v in p] for p in stats.top_pairs.to_list()]
    out = stats.to_pandas("outside")
    assert len(out) == len(stats.outside.pairs) == 5


def test_row_lists_long_format_skip_padding(stats):
    df = stats.to_pandas("row_topk")
    idx = stats.row_topk.indices
    assert len(df) == int((idx >= 0).sum())
    row = df[df["row"] == 5].sort_values("rank")
    assert row["column"].tolist() == [c for c in idx[5].tolist() if c >= 0]
    assert np.allclose(row["value"].to_numpy(), stats.row_topk.values[5][idx[5] >= 0].double().numpy())


def test_histogram_table(stats):
    df = stats.to_pandas("hist")
    assert df["count"].sum() + stats.hist.underflow + stats.hist.overflow == stats.count
    assert df["lo"].iloc[0] == -1.0 and df["hi"].iloc[-1] == 1.0


def test_switched_off_and_unknown_tables(stats):
    with pytest.raises(ValueError, match="near_pairs"):
        stats.to_pandas("near_pairs")
    with pytest.raises(ValueError, match="which: expected one of"):
        stats.to_pandas("nope")


def test_html_summaries(stats):
    page = stats._repr_html_()
    assert "<table>" in page and f"{stats.count:,}" in page and "top_pairs" in page
    cone = embgeom.cone_index(make_embeddings(12, 5).reshape(2, 6, 5))
    assert cone._repr_html_().count("<tr>") == 1 + 2
    assert cone.to_pandas()["n"].tolist() == cone.n.tolist()
    p = torch.softmax(torch.randn(1, 3, 4, 4), -1)
    ent = embgeom.attention_entropy(p)
    assert ent._repr_html_().count("<tr>") == 1 + 3
    assert ent.to_pandas()["mean_entropy"].tolist() == pytest.approx(ent.mean.tolist())
    nn = embgeom.knn(make_embeddings(30, 6).numpy(), 3)
    assert len(nn.to_pandas()) == 30 * 3 and "KnnResult" in nn._repr_html_()


def test_trace_result_table(tiny_bert):
    model, tok = tiny_bert
    r = embgeom.trace(model, tok, ["the cat sat on the mat .", "a dog ran in the city ."], batch_size=2)
    df = r.to_pandas()
    assert list(df.columns) == list(r.PER_LAYER_COLUMNS) and len(df) == r.layers
    assert df["layer"].tolist() == list(range(1, r.layers + 1))
    assert df["cone_output"].tolist() == pytest.approx(r.cone_layer_output.tolist())
    assert df["entropy_mean"].tolist() == pytest.approx(r.entropy.mean(1).tolist())
    assert r._repr_html_().count("<tr>") == 1 + r.layers


def test_short_repr_and_scalar_summary(stats):
    text = repr(stats)
    assert len(text.splitlines()) == 3 and "tensor" not in text and "10 bins over [-1, 1]" in text
    assert f"count={stats.count:,}" in text and "row_topk=(40, 2)" in text
    s = stats.summary()
    assert len(s) == 1 and s["count"].iloc[0] == stats.count and s["hist_bins"].iloc[0] == 10
    assert s["mean"].iloc[0] == pytest.approx(stats.mean) and s["outside"].iloc[0] == stats.outside.count
    assert (s["max_i"].iloc[0], s["max_j"].iloc[0]) == (stats.max[0], stats.max[1])
    assert len(pd.concat([s, s])) == 2


def test_to_pandas_joins_token_strings(stats, tiny_bert):
    names = [f"w{r}" for r in range(stats.n)]
    df = stats.to_pandas("top_pairs", tokens=names)
    assert list(df.columns) == ["i", "token_i", "j", "token_j", "value"]
    assert df["token_i"].tolist() == [f"w{i}" for i in df["i"]] and df["token_j"].tolist() == [f"w{j}" for j in df["j"]]
    rows = stats.to_pandas("row_topk", tokens=names)
    assert list(rows.columns) == ["row", "token", "rank", "column", "neighbour", "value"]
    assert rows["neighbour"].tolist() == [f"w{c}" for c in rows["column"]]
    _, tokenizer = tiny_bert  # a tokenizer: row r = token id r
    df = stats.to_pandas("bottom_pairs", tokens=tokenizer)
    assert df["token_i"].tolist() == tokenizer.convert_ids_to_tokens(df["i"].tolist())
    with pytest.raises(ValueError, match="tokens: expected 40 strings"):
        stats.to_pandas("top_pairs", tokens=names[:3])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_resumed_moments_equal_the_uninterrupted_run_bit_for_bit(tmp_path, backend):
    """A checkpoint keeps the engine's shifted sums: resuming at any tile continues from them
    exactly, where converting back from (mean, m2) rounds the last digit of the std (it does at
    several of these split points)."""
    from embgeom.backends.cpp import CppEngine
    from embgeom.backends.torch import TorchEngine
    from embgeom.engine.checkpoint import load_checkpoint, save_checkpoint
    from embgeom.engine.config import make_config

    engine = {"torch": TorchEngine, "cpp": CppEngine}[backend]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g) + 0.5  # a mean far from 0: the shift matters
    cfg = make_config(metric="dot", range=(-50.0, 50.0), bins=64, block=32, row_topk=0, outside=None)
    whole = engine(x, None, cfg)
    whole.run(0, whole.num_tiles())
    a = whole.state()
    for split in range(1, whole.num_tiles()):
        part = engine(x, None, cfg)
        part.run(0, split)
        save_checkpoint(str(tmp_path / "c.ckpt"), "fp", part.state())
        resumed = engine(x, None, cfg)
        resumed.load_state(load_checkpoint(str(tmp_path / "c.ckpt"), "fp"))
        resumed.run(split, resumed.num_tiles())
        b = resumed.state()
        assert (a.count, a.mean, a.m2) == (b.count, b.mean, b.m2), split


def test_as_list_is_json_safe_at_every_depth():
    """as_list converts a whole tensor at once: NaN and Inf become None at any nesting depth
    (and for a 0-d tensor), finite values stay exact float64, integers stay ints."""
    from embgeom.results import as_list

    x = torch.tensor([[0.1, float("nan")], [float("-inf"), 2.0]], dtype=torch.float32)
    assert as_list(x) == [[float(torch.tensor(0.1)), None], [None, 2.0]]
    assert as_list(torch.ones(2, 1, 2, dtype=torch.float64) / 3) == [[[1 / 3, 1 / 3]], [[1 / 3, 1 / 3]]]
    assert as_list(torch.tensor(float("nan"))) is None and as_list(torch.tensor(2.5)) == 2.5
    assert as_list(torch.tensor([[1, 2]])) == [[1, 2]] and as_list(torch.zeros(0, 3)) == []


def test_fast_error_bound_without_a_histogram():
    """precision="fast" reports its values' bound on the result itself: with bins=0 there is no
    histogram to carry it (the moments were compared with no allowance); exact mode reports 0."""
    import embgeom
    from helpers import make_embeddings

    x = make_embeddings(60, 24, seed=3)
    with_hist = embgeom.pairwise_stats(x, precision="fast", bins=20, backend="cpp")
    bare = embgeom.pairwise_stats(x, precision="fast", bins=0, backend="cpp")
    assert bare.hist is None and bare.error_bound == with_hist.hist.error_bound == with_hist.error_bound
    assert ("error_bound" in bare.to_dict()) == (bare.error_bound > 0)
    assert embgeom.pairwise_stats(x, bins=0, backend="cpp").error_bound == 0.0
    assert abs(bare.mean - embgeom.pairwise_stats(x, bins=0, backend="reference").mean) <= bare.error_bound + 1e-6
