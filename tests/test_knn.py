"""embgeom.knn (FAISS) against brute-force numpy, approximate recall, validation, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import embgeom  # noqa: E402
from embgeom import cli  # noqa: E402
from embgeom.neighbours import recall_at_k  # noqa: E402


def brute_force(x: np.ndarray, k: int, queries=None, exclude_self=True) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k in float64, ties by id, zero rows never neighbours."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    xn = x / np.where(norms > 0, norms, 1)[:, None]
    q = xn if queries is None else queries
    s = q @ xn.T
    s[:, norms == 0] = -np.inf
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    ids = np.broadcast_to(np.arange(x.shape[0]), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _recall(indices: np.ndarray, x: np.ndarray, k: int) -> float:
    """|found & true| / |true| over the rows that have neighbours (brute force, float64)."""
    want, _ = brute_force(x, k)
    rows = np.linalg.norm(x, axis=1) > 0
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(indices[rows], want[rows]))
    return hits / (int(rows.sum()) * k)


def test_recall_at_k_counts_valid_entries():
    assert recall_at_k(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[2, 3, -1], [6, 5, 4]])) == pytest.approx(4 / 5)
    assert recall_at_k(np.array([[-1]]), np.array([[-1]])) is None


@pytest.fixture
def points():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 24)).astype(np.float32)
    x[10] = 0.0          # zero row: excluded, never a neighbour
    x[20] = x[30]        # duplicates: tie at cosine 1
    x[40] = 2.0 * x[50]  # same direction
    return x


def test_flat_matches_brute_force(points):
    got = embgeom.knn(points, 7)
    want_i, want_v = brute_force(points, 7)
    rows = np.arange(len(points)) != 10
    assert got.indices.dtype == torch.int64 and tuple(got.indices.shape) == (600, 7)
    np.testing.assert_array_equal(got.indices.numpy()[rows], want_i[rows])
    np.testing.assert_allclose(got.values.numpy()[rows], want_v[rows], atol=1e-5)
    assert got.indices[10].tolist() == [-1] * 7 and torch.isnan(got.values[10]).all()
    assert got.excluded_rows == [10]
    assert 10 not in got.indices.numpy()
    assert got.indices[20, 0] == 30 and got.indices[30, 0] == 20
    assert got.indices[40, 0] == 50
    assert got.recall is None and got.index == "flat" and got.self_query


def test_ties_ordered_by_id():
    x = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), (6, 1))  # 6 copies each
    got = embgeom.knn(x, 4)
    assert got.indices[0].tolist() == [2, 4, 6, 8]
    assert got.indices[11].tolist() == [1, 3, 5, 7]


def test_query_ids_and_external_queries(points):
    by_id = embgeom.knn(points, 5, queries=torch.tensor([3, 20, 599]))
    full = embgeom.knn(points, 5)
    np.testing.assert_array_equal(by_id.indices.numpy(), full.indices.numpy()[[3, 20, 599]])
    q = points[:4] + 0.01
    ext = embgeom.knn(points, 5, queries=q)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want_i, _ = brute_force(points, 5, queries=qn, exclude_self=False)
    np.testing.assert_array_equal(ext.indices.numpy(), want_i)
    assert not ext.self_query


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_no_query_rows_is_an_empty_answer(points, kind):
    """(0, D) query rows answer (0, k), as an empty id list and FAISS do (they had been refused)."""
    r = embgeom.knn(points, 5, queries=points[:0], index=kind)
    assert tuple(r.indices.shape) == tuple(r.values.shape) == (0, 5) and not r.self_query
    with pytest.raises(ValueError, match="queries: expected 24 columns"):
        embgeom.knn(points, 5, queries=np.zeros((0, 7), np.float32))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall(points, kind):
    got = embgeom.knn(torch.from_numpy(points), 10, index=kind)
    assert got.index == kind
    assert tuple(got.indices.shape) == (600, 10)
    # recall@10 against float64 brute force, counted here (the zero row has no neighbours)
    assert got.recall == pytest.approx(_recall(got.indices.numpy(), points, 10))
    # searching everywhere finds every neighbour: all IVF lists, or a very wide HNSW beam
    wide = dict(nprobe=got.params["nlist"]) if kind == "ivf" else dict(ef_search=600)
    full = embgeom.knn(points, 10, index=kind, **wide)
    assert full.recall == pytest.approx(_recall(full.indices.numpy(), points, 10))
    assert full.recall >= 0.99 and full.recall >= got.recall
    d = got.to_dict()
    json.dumps(d)
    assert d["recall"] == got.recall and d["params"]


def test_an_nprobe_past_nlist_records_the_lists_probed(points):
    """FAISS probes at most every list: params say what ran, and it is the exact answer."""
    got = embgeom.knn(points, 5, index="ivf", nlist=4, nprobe=999)
    assert got.params["nprobe"] == 4 and got.recall == 1.0


def test_agrees_with_pairwise_row_topk(points):
    ps = embgeom.pairwise_stats(points, bins=0, topk=0, bottomk=0, row_topk=6)
    got = embgeom.knn(points, 6)
    rows = np.arange(len(points)) != 10
    np.testing.assert_array_equal(got.indices.numpy()[rows], ps.row_topk.indices.numpy()[rows])


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=600), "k: expected <= 599"),
    (dict(k=0), "k: expected >= 1"),
    (dict(k=3, queries=np.zeros((2, 5), np.float32)), "queries: expected 24 columns, as many as the indexed rows have"),
    (dict(k=3, queries=torch.tensor([0, 600])), r"queries: row ids must be in \[0, 600\)"),
    (dict(k=3, index="lsh"), "index: expected one of"),
    (dict(k=3, device="tpu"), "device: expected"),
    (dict(k=3, device="cudafoo"), "device: expected"),  # (any string starting 'cuda' had passed)
    (dict(k=3, device="cuda:7"), "device: 'cuda:7' asked for"),
    (dict(k=3, nprobe=4), "nprobe: only for index='ivf', got index='flat'"),
    (dict(k=3, index="ivf", ef_search=64), "ef_search: only for index='hnsw', got index='ivf'"),
    (dict(k=3, index="hnsw", nlist=8), "nlist: only for index='ivf'"),
    (dict(k=3, hnsw_m=8), "hnsw_m: only for index='hnsw'"),
    (dict(k=3, index="hnsw", hnsw_m=1), "hnsw_m: expected an int >= 2, got 1"),  # FAISS crashes on 1
])
def test_bad_inputs(points, kwargs, match):
    with pytest.raises(ValueError, match=match):
        embgeom.knn(points, **kwargs)


def test_near_duplicates_tie_at_one_in_id_order():
    """FAISS's fp32 cosines of near-copies pass 1 (1.0000001): they are clamped before they are
    ranked, so ties at 1.0 come in id order (pairwise_stats' row lists rank the clamped values
    too; its own fp32 products of these near-copies differ from FAISS's in the last bit)."""
    rng = np.random.default_rng(17)
    for _ in range(60):
        q = rng.standard_normal(64)
        x = np.vstack([q] + [q + rng.standard_normal(64) * 3e-8 for _ in range(20)]
                      + [rng.standard_normal((30, 64))]).astype(np.float32)
        got = embgeom.knn(x, 5, queries=[0])
        ids, vals = got.indices[0].tolist(), got.values[0].tolist()
        assert all(vals[c] > vals[c + 1] or ids[c] < ids[c + 1] for c in range(4)), (ids, vals)


def test_bad_x():
    with pytest.raises(ValueError, match=r"x: expected \(N, D\)"):
        embgeom.knn(np.zeros(5, np.float32), 1)
    with pytest.raises(TypeError, match="x: expected a float array"):
        embgeom.knn(np.zeros((5, 2), np.int32), 1)
    with pytest.raises(ValueError, match="x: NaN or Inf in 1 row"):
        embgeom.knn(np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 1.0]], np.float32), 1)


def test_cli(points, tmp_path, capsys):
    np.save(tmp_path / "x.npy", points)
    out = tmp_path / "knn.json"
    assert cli.main(["knn", str(tmp_path / "x.npy"), "--k", "4", "--index", "hnsw", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["n"] == 600 and data["k"] == 4 and len(data["indices"]) == 600
    assert data["recall"] == pytest.approx(_recall(np.array(data["indices"]), points, 4))
    assert "recall@4" in capsys.readouterr().err
    assert cli.main(["knn", str(tmp_path / "missing.npy"), "--k", "4", "--json", str(out)]) == 2
    assert "X: file not found" in capsys.readouterr().err
    assert cli.main(["knn", str(tmp_path / "x.npy"), "--k", "900", "--json", str(out)]) == 2
    assert "k: expected <= 599" in capsys.readouterr().err
    assert cli.main(["knn", str(tmp_path / "x.npy"), "--k", "4", "--nprobe", "4", "--json", str(out)]) == 2
    assert "--nprobe: only for --index ivf, got --index flat" in capsys.readouterr().err


def test_ties_past_the_fetched_candidates_go_to_the_smaller_id():
    """19 rows tie for row 19 (more than k + tie_margin): the search widens until the tie group
    is whole, so the list is the smallest ids, as pairwise_stats' row lists."""
    x = np.ones((20, 2), np.float32)
    x[-1] = [1, 0]
    assert embgeom.knn(x, 2).indices[-1].tolist() == [0, 1]
    rng = np.random.default_rng(0)
    y = rng.standard_normal((300, 8)).astype(np.float32)
    y[100:140] = y[5]  # a group of 41 identical rows
    want = embgeom.pairwise_stats(y, row_topk=5, bins=0).row_topk.indices
    assert torch.equal(torch.as_tensor(embgeom.knn(y, 5).indices), torch.as_tensor(want))


def test_rows_of_any_float32_magnitude():
    """Norms in float64 (numerics.unit_rows): an fp32 norm overflows at 1e20 and underflows at 1e-25."""
    for scale in (1e20, 1e-25):
        x = np.array([[1, 0], [1, 1e-2], [0, 1]], np.float32) * np.float32(scale)
        r = embgeom.knn(x, 1)
        assert r.indices.flatten().tolist() == [1, 0, 1] and r.excluded_rows == []
        assert abs(float(r.values[0, 0]) - 1 / np.sqrt(1 + 1e-4)) < 1e-6


def test_queries_that_are_not_row_ids_are_refused():
    x = np.eye(4, dtype=np.float32) + 0.1
    with pytest.raises(TypeError, match="queries: .* bool tensor"):
        embgeom.knn(x, 1, queries=torch.tensor([True, False, True, True]))
    with pytest.raises(TypeError, match="queries: a list must hold int row ids"):
        embgeom.knn(x, 1, queries=[0.0, 1.0])
    assert embgeom.knn(x, 1, queries=[0, 1]).indices.flatten().tolist() == [1, 0]


def test_a_search_past_memory_is_refused_naming_k(points, monkeypatch):
    """Queries x (k + its tie margin) answers past the memory free: a ValueError naming k before
    the search (a k near N had failed in numpy's allocator after FAISS's search)."""
    from embgeom import neighbours
    from embgeom.engine import limits

    monkeypatch.setattr(neighbours, "SEARCH_ENTRY_BYTES", 1 << 20)   # as if the answers were large
    monkeypatch.setattr(limits, "memory_available", lambda: (1 << 30, "the machine has"))
    n = points.shape[0]
    with pytest.raises(ValueError, match=rf"^k: {n:,} queries x [\d,]+ candidates \(k and its tie margin\) need "
                                         r"about [\d.,]+ GiB, the machine has 1\.0 GiB available; lower k"):
        embgeom.knn(points, k=n - 1)
    assert embgeom.knn(points, queries=[0], k=3).indices.shape == (1, 3)   # what fits still runs


def test_progress_shows_the_build_and_a_bar_of_queries_and_changes_nothing(points, monkeypatch):
    """knn had run silent (111 s for an HNSW index of 100,000 rows); the searches go in parts
    of SEARCH_PART queries, each query's answer its own."""
    import io

    from embgeom import neighbours
    from embgeom.progress import Progress

    stream = io.StringIO()
    monkeypatch.setattr(neighbours, "SEARCH_PART", 64)
    got = embgeom.knn(points, 5, index="hnsw", progress=Progress(enabled=True, prefix="k", stream=stream))
    monkeypatch.setattr(neighbours, "SEARCH_PART", 1 << 20)
    whole = embgeom.knn(points, 5, index="hnsw")
    np.testing.assert_array_equal(got.indices.numpy(), whole.indices.numpy())
    np.testing.assert_array_equal(got.values.numpy(), whole.values.numpy())
    assert got.recall == whole.recall
    err = stream.getvalue()
    n = len(points)
    assert f"k: building the hnsw index of {n - 1:,} rows" in err  # (the zero row is not indexed)
    assert "k: queries: 100%" in err and "k: exact search for recall: 100%" in err and f"{n}/{n}" in err
