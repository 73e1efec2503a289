"""The drop-ins against the libraries they replace, on the same inputs (ties aside):
sentence-transformers' util functions, scikit-learn's NearestNeighbors (and its estimator
checks), FAISS's flat indexes. Each comparison is skipped where the library is not installed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import embgeom
from embgeom.compat import sentence_transformers as st_compat

from test_index import make_rows


def _tie_free(n=400, d=32, seed=0):
    return make_rows(n, d, seed=seed)


# -- sentence-transformers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_util():
    return pytest.importorskip("sentence_transformers.util", reason="sentence-transformers not installed")


@pytest.mark.parametrize("top_k", [1, 10, 500])
@pytest.mark.parametrize("score", ["cos_sim", "dot_score"])
def test_semantic_search_matches(st_util, top_k, score):
    corpus, queries = _tie_free(), make_rows(17, 32, seed=1)
    fn = getattr(st_util, score)
    want = st_util.semantic_search(queries, corpus, top_k=top_k, score_function=fn)
    got = st_compat.semantic_search(queries, corpus, top_k=top_k, score_function=fn)
    assert [[h["corpus_id"] for h in row] for row in got] == [[h["corpus_id"] for h in row] for row in want]
    for g_row, w_row in zip(got, want):
        assert np.allclose([h["score"] for h in g_row], [h["score"] for h in w_row], rtol=1e-5, atol=1e-5)
        assert all(type(h["corpus_id"]) is int and type(h["score"]) is float for h in g_row)
    one = st_compat.semantic_search(queries[0], corpus.numpy(), top_k=3)  # (D,) query, numpy corpus
    assert len(one) == 1 and len(one[0]) == 3


@pytest.mark.parametrize("top_k,max_pairs", [(5, 500000), (3, 40), (100, 1000), (100, 100), (50, 10)])
def test_paraphrase_mining_matches(st_util, top_k, max_pairs):
    x = _tie_free(300, 16, seed=2)
    want = st_util.paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs)
    got = st_compat.paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs)
    assert [p[1:] for p in got] == [p[1:] for p in want]
    assert np.allclose([p[0] for p in got], [p[0] for p in want], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [dict(), dict(query_chunk_size=5, corpus_chunk_size=37)])
def test_any_score_function_and_float64_rows_match(st_util, chunks):
    """A score_function other than cos_sim / dot_score is called on the rows as the library
    calls it, and float64 rows are scored in float64: the same ids and the same scores."""
    corpus, queries = _tie_free(300, 16, seed=3), make_rows(17, 16, seed=4)

    def ids(hits):
        return [[h["corpus_id"] for h in row] for row in hits]

    def scores(hits):
        return [[h["score"] for h in row] for row in hits]

    for fn, c, q in [(st_util.manhattan_sim, corpus, queries), (lambda a, b: st_util.euclidean_sim(a, b), corpus, queries),
                     (st_util.cos_sim, corpus.double(), queries.double()),
                     (st_util.dot_score, corpus.double(), queries.double())]:
        want = st_util.semantic_search(q, c, top_k=10, score_function=fn, **chunks)
        got = st_compat.semantic_search(q, c, top_k=10, score_function=fn, **chunks)
        assert ids(got) == ids(want) and scores(got) == scores(want)  # (the same bits: float64 x / |x|)
        want = st_util.paraphrase_mining_embeddings(c, top_k=5, score_function=fn, **chunks)
        got = st_compat.paraphrase_mining_embeddings(c, top_k=5, score_function=fn, **chunks)
        assert got == want


def test_quantized_rows_with_a_callers_score_function_match(st_util):
    """sentence-transformers' int8 / uint8 / binary embeddings (encode(precision=...)) scored by
    a function of the caller's (a Hamming similarity on packed bits, an int dot product) give
    the library's hits (they had been refused as not float); cos_sim / dot_score on them stay
    refused (the library fails on cos_sim, and its int8 products wrap)."""
    quantize = pytest.importorskip("sentence_transformers.quantization").quantize_embeddings
    rows = make_rows(120, 64, seed=8).numpy()
    table = torch.tensor([bin(v).count("1") for v in range(256)])

    def hamming_sim(a, b):  # packed bits: the number of equal bits
        return 8 * a.shape[1] - table[(a[:, None, :] ^ b[None, :, :]).long()].sum(-1)

    def int_dot(a, b):
        return a.long() @ b.long().T

    for precision, fn in (("ubinary", hamming_sim), ("binary", hamming_sim), ("int8", int_dot), ("uint8", int_dot)):
        q = quantize(rows, precision=precision, calibration_embeddings=rows)
        for c in (q, torch.from_numpy(q)):
            want = st_util.semantic_search(torch.from_numpy(q[:5]), torch.from_numpy(q), top_k=7, score_function=fn)
            got = st_compat.semantic_search(c[:5], c, top_k=7, score_function=fn)
            assert [[(h["corpus_id"], h["score"]) for h in r] for r in got] == \
                [[(h["corpus_id"], float(h["score"])) for h in r] for r in want] or \
                [[h["score"] for h in r] for r in got] == [[float(h["score"]) for h in r] for r in want]
        mined = st_compat.paraphrase_mining_embeddings(q, top_k=3, max_pairs=20, score_function=fn)
        assert len(mined) == 20 and all(isinstance(p[0], float) for p in mined)
    with pytest.raises(TypeError, match="corpus_embeddings: expected .*float"):
        st_compat.semantic_search(q[:2], q, top_k=3)


def test_mining_replays_the_library_on_asymmetric_and_masking_functions(st_util):
    """A score_function need not be symmetric nor finite: paraphrase mining keeps what the
    library's loop keeps (a pair pushed out of the heap may return from its other row with its
    own score; -inf pairs never), and a caller's function named like the library's is called."""
    m = torch.tensor([[1.0, 4, 7], [9, 8, 2], [5, 0, 3]], dtype=torch.float64)

    def table(a, b):  # row i's score for j: m[i, j] (the rows carry their ids)
        return m[a[:, 0].long()][:, b[:, 0].long()]

    rows = torch.arange(3, dtype=torch.float64)[:, None].repeat(1, 2)
    for max_pairs in (1, 2, 3):
        want = st_util.paraphrase_mining_embeddings(rows, top_k=2, max_pairs=max_pairs, score_function=table)
        assert st_compat.paraphrase_mining_embeddings(rows, top_k=2, max_pairs=max_pairs, score_function=table) == want
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = torch.from_numpy(rng.standard_normal((23, 4)))
        w = torch.from_numpy(rng.standard_normal((4, 4)))

        def skew(a, b):  # asymmetric, -inf below 0
            s = a @ w @ b.T
            return s.masked_fill(s < 0, -math.inf)

        for top_k, max_pairs, chunk in ((3, 5, 4), (5, 500, 7), (2, 1, 23)):
            want = st_util.paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, score_function=skew,
                                                        query_chunk_size=chunk, corpus_chunk_size=chunk)
            got = st_compat.paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, score_function=skew,
                                                         query_chunk_size=chunk, corpus_chunk_size=chunk)
            assert got == want and all(p[0] > -math.inf for p in got)

    def dot(a, b):  # a caller's own `dot`: a temperature, not sentence-transformers' dot_score
        return (a @ b.T) / 0.05

    x = make_rows(30, 8, seed=13)
    assert st_compat.semantic_search(x[:2], x, top_k=3, score_function=dot) == \
        st_util.semantic_search(x[:2], x, top_k=3, score_function=dot)


def test_scored_mining_ties_as_the_index_path():
    """Equal scores at the max_pairs cut keep the smaller (i, j) on the scored path as on the
    index path (a pair equal to the last score pushed out had been skipped, as the library's
    loop skips it: float64 and float32 rows of small integers mined different pairs)."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        x = torch.from_numpy(rng.integers(-2, 3, (12, 3)).astype(np.float64))
        for max_pairs in (1, 4, 9):
            scored = st_compat.paraphrase_mining_embeddings(x, top_k=2, max_pairs=max_pairs, score_function="dot_score")
            indexed = st_compat.paraphrase_mining_embeddings(x.float(), top_k=2, max_pairs=max_pairs,
                                                             score_function="dot_score")
            assert scored == indexed


def test_scored_path_rows_at_the_ends_of_float64():
    """float64 rows near 1e-200 or 1e200 have directions (their norms had underflowed to a zero
    row or overflowed); dot products past float64's range are refused, not a reshape error."""
    x = torch.tensor([[1e-200, 0.0], [0.0, 1.0], [1e200, 1e200], [-1.0, 0.0]], dtype=torch.float64)
    hits = st_compat.semantic_search(torch.tensor([1.0, 0.0], dtype=torch.float64), x, top_k=4)[0]
    assert [h["corpus_id"] for h in hits] == [0, 2, 1, 3]
    assert [h["score"] for h in hits] == pytest.approx([1.0, math.sqrt(0.5), 0.0, -1.0], abs=1e-15)
    with pytest.raises(ValueError, match="^query_embeddings: dot products with corpus_embeddings beyond"):
        st_compat.semantic_search(torch.tensor([[1e200, -1e200]], dtype=torch.float64), x[1:],
                                  score_function="dot_score")
    with pytest.raises(ValueError, match="^embeddings: dot products of its rows beyond"):
        st_compat.paraphrase_mining_embeddings(torch.tensor([[1e200, 1e200], [1e200, -1e200]], dtype=torch.float64),
                                               score_function="dot_score")


def test_scored_path_many_equal_scores():
    """A function scoring every pair alike: each query's first top_k ids, across chunks too."""
    x = make_rows(50, 4, seed=14)
    flat = lambda a, b: torch.zeros(a.shape[0], b.shape[0])  # noqa: E731
    for size in (500000, 7):
        hits = st_compat.semantic_search(x[:3], x, top_k=9, score_function=flat, corpus_chunk_size=size)
        assert [[h["corpus_id"] for h in row] for row in hits] == [list(range(9))] * 3


def test_scored_path_ties_by_id_and_zero_rows():
    """The scored path (float64 rows, a score_function) ranks as the index does: equal scores
    by id, across corpus chunks too; under cosine a zero row is never a neighbour and has none."""
    x = make_rows(40, 8, seed=5).double()
    x[[7, 21, 30]] = x[3].clone()  # four copies of row 3
    x[11] = 0
    for size in (500000, 6):
        hits = st_compat.semantic_search(x[[3, 11]], x, top_k=6, corpus_chunk_size=size)
        assert [h["corpus_id"] for h in hits[0]][:4] == [3, 7, 21, 30] and hits[1] == []
        assert len(st_compat.semantic_search(x[:1], x, top_k=100, corpus_chunk_size=size)[0]) == 39
    want = x[3].numpy() @ x.numpy().T
    got = st_compat.semantic_search(x[3], x, top_k=40, score_function=st_compat_dot)[0]
    assert [h["corpus_id"] for h in got] == list(np.lexsort((np.arange(40), -want)))
    assert np.allclose([h["score"] for h in got], sorted(want.tolist(), reverse=True), rtol=1e-15, atol=1e-14)


def st_compat_dot(a, b):
    return a @ b.T


def _mined_pairs_by_definition(s_all, j_all, top_k, max_pairs):
    """Paraphrase mining from neighbour lists written out directly: rows in order, each row's
    first top_k other rows, a pair kept where first met, then (score desc, i, j)."""
    seen = {}
    for i, (s_row, j_row) in enumerate(zip(s_all.tolist(), j_all.tolist())):
        taken = 0
        for s, j in zip(s_row, j_row):
            if j < 0 or j == i or taken == top_k:
                continue
            taken += 1
            seen.setdefault((min(i, j), max(i, j)), s)
    pairs = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))[:max_pairs]
    return [[s, a, b] for (a, b), s in pairs]


def test_mined_pairs_equal_the_definition_under_ties():
    """The vectorised dedup (an entry naming an earlier row repeats that row's entry when it is
    in that row's kept list, judged by the row's last kept (score, index)) against the
    definition, on small-integer rows: ties, duplicate and zero rows, rows that tie at their
    list's edge, lists shorter than top_k."""
    from embgeom.index import Index

    rng = np.random.default_rng(0)
    for trial in range(120):
        n, d = int(rng.integers(2, 50)), int(rng.integers(1, 5))
        x = torch.from_numpy(rng.integers(-2, 3, size=(n, d)).astype(np.float32))
        top_k, max_pairs = int(rng.integers(1, 12)), int(rng.integers(1, 60))
        index = Index(x, metric=("cosine", "dot")[trial % 2])
        s_all, j_all = (t.cpu().numpy() for t in index.search_stored(min(top_k + 1, n)))
        got = st_compat._mined_pairs(s_all, j_all, top_k, max_pairs)
        assert got == _mined_pairs_by_definition(s_all, j_all, top_k, max_pairs), (trial, n, d, top_k, max_pairs)


@pytest.mark.parametrize("score", ["cos_sim", "dot_score"])
def test_paraphrase_mining_global_list_path_equals_row_path(monkeypatch, score):
    """max_pairs <= top_k: the engine's global top list (rescored, boundary checked) gives what
    the row-by-row search gives, with duplicate rows, a zero row, and where every pair ties (the
    check fails and the row path answers)."""
    x = make_rows(400, 24, seed=5)
    x[7] = x[300]          # a duplicate pair: the best one
    x[11] = 0              # a zero row: never returned under cosine
    cases = [(x, 100, 100), (x, 40, 7), (x[:3], 5, 5), (torch.ones(30, 4), 20, 10)]
    fast = []
    real = st_compat._global_top_pairs
    monkeypatch.setattr(st_compat, "_global_top_pairs", lambda *a: fast.append(real(*a)) or fast[-1])
    got = [st_compat.paraphrase_mining_embeddings(e, top_k=k, max_pairs=m, score_function=score) for e, k, m in cases]
    monkeypatch.setattr(st_compat, "_global_top_pairs", lambda *a: None)
    want = [st_compat.paraphrase_mining_embeddings(e, top_k=k, max_pairs=m, score_function=score) for e, k, m in cases]
    assert got == want
    assert fast[0] is not None and fast[1] is not None  # the global list answered these
    assert fast[3] is None  # 435 equal pairs: the boundary check sends it to the row path
    if score == "cos_sim":
        assert got[0][0][1:] == [7, 300] and all(11 not in p[1:] for p in got[0])


def _mining_cases():
    """Inputs large enough for paraphrase mining's floor (more than 4 * FLOOR_SAMPLE_ROWS rows):
    clusters of near neighbours beside random rows, a duplicate and a zero row."""
    x = make_rows(1400, 16, seed=8)
    x[:500] = x[3] + 0.5 * make_rows(500, 16, seed=9)
    x[900] = x[901]
    x[1000] = 0
    return x


@pytest.mark.parametrize("score", ["cos_sim", "dot_score"])
def test_paraphrase_mining_floor_equals_unfloored(monkeypatch, score):
    """The floored lists (search_stored(floor=) at _mining_floor's estimate) give the unfloored
    answer; an estimate too high (fewer than max_pairs pairs above it) is caught and mined again
    without a floor; an estimate of None (too few pairs in all lists) mines without one."""
    x = _mining_cases()
    cases = [(100, 20000), (10, 3000), (30, 500000), (5, 700)]
    floors = []
    real = st_compat._mining_floor
    monkeypatch.setattr(st_compat, "_mining_floor", lambda *a: floors.append(real(*a)) or floors[-1])
    got = [st_compat.paraphrase_mining_embeddings(x, top_k=k, max_pairs=m, score_function=score) for k, m in cases]
    assert floors[0] is not None and floors[1] is not None and floors[2] is None
    monkeypatch.setattr(st_compat, "_mining_floor", lambda *a: None)
    want = [st_compat.paraphrase_mining_embeddings(x, top_k=k, max_pairs=m, score_function=score) for k, m in cases]
    assert got == want
    assert [len(g) for g in got[:2]] == [20000, 3000]
    # a floor above the answer's last score: too few pairs above it, mined again without it
    calls = []
    index_search = st_compat.Index.search_stored
    monkeypatch.setattr(st_compat.Index, "search_stored",
                        lambda self, k, **kw: calls.append(kw.get("floor")) or index_search(self, k, **kw))
    too_high = want[0][len(want[0]) // 2][0]
    monkeypatch.setattr(st_compat, "_mining_floor", lambda *a: too_high)
    assert st_compat.paraphrase_mining_embeddings(x, top_k=100, max_pairs=20000, score_function=score) == want[0]
    assert calls == [too_high, None]


def test_paraphrase_mining_floor_matches(st_util):
    x = _mining_cases()
    assert st_compat._mining_floor(st_compat.Index(x), 31, 30, 15000) is not None
    want = st_util.paraphrase_mining_embeddings(x, top_k=30, max_pairs=15000)
    got = st_compat.paraphrase_mining_embeddings(x, top_k=30, max_pairs=15000)
    # the same pairs; clustered rows give float32 near-ties, which upstream orders by its
    # float32 scores: order differs only between pairs whose exact scores are that close
    assert {tuple(p[1:]) for p in got} == {tuple(p[1:]) for p in want}
    score = {tuple(p[1:]): p[0] for p in got}
    for g, w in zip(got, want):
        assert g[1:] == w[1:] or abs(g[0] - score[tuple(w[1:])]) < 1e-6
    assert np.allclose([p[0] for p in got], [p[0] for p in want], rtol=1e-5, atol=1e-5)


def test_community_detection_matches(st_util):
    from test_pairs_above import _clusters

    x = _clusters(seed=3)
    want = st_util.community_detection(x, threshold=0.75, min_community_size=4)
    got = st_compat.community_detection(x, threshold=0.75, min_community_size=4)
    assert [(g[0], sorted(g)) for g in got] == [(g[0], sorted(g)) for g in want]
    assert st_compat.community_detection(np.zeros((0, 4), np.float32)) == []
    # above any cosine: the library's [] (embgeom.communities refuses it, naming why)
    assert st_compat.community_detection(x, threshold=2.0, min_community_size=1) == \
        st_util.community_detection(x, threshold=2.0, min_community_size=1) == []
    with pytest.raises(ValueError, match="threshold: a cosine is at most 1"):
        embgeom.communities(x, threshold=2.0)


def test_nested_lists_as_sentence_transformers_takes_them(st_util):
    """Rows as lists of Python floats (torch.tensor's input, which sentence-transformers takes):
    the same answers as the library; ragged rows and non-numbers refused, naming the argument."""
    x = _tie_free(30, 6, seed=4).double().tolist()
    got = st_compat.semantic_search(x[:4], x, top_k=3)
    want = st_util.semantic_search(x[:4], x, top_k=3)
    assert [[h["corpus_id"] for h in row] for row in got] == [[h["corpus_id"] for h in row] for row in want]
    assert [p[1:] for p in st_compat.paraphrase_mining_embeddings(x, top_k=3)] == \
        [p[1:] for p in st_util.paraphrase_mining_embeddings(x, top_k=3)]
    pairs = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]
    assert st_compat.community_detection(pairs, 0.9, 2) == st_util.community_detection(pairs, 0.9, 2) == [[0, 1]]
    with pytest.raises(ValueError, match="^corpus_embeddings: the rows of a list must have one length"):
        st_compat.semantic_search(x[:1], [[1.0, 2.0], [3.0]])
    with pytest.raises(TypeError, match=r"^corpus_embeddings\[1\]: a row given as a list must hold numbers"):
        st_compat.semantic_search(x[:1], [[1.0, 2.0], [3.0, "a"]])


def test_compat_bad_arguments():
    x = _tie_free(10, 4)
    with pytest.raises(ValueError, match="^score_function: expected a callable"):
        st_compat.semantic_search(x, x, score_function="manhattan")
    with pytest.raises(TypeError, match=r"^score_function: expected a \(10, 10\) tensor"):
        st_compat.semantic_search(x, x, score_function=lambda a, b: 1.0)
    with pytest.raises(ValueError, match="^score_function: returned NaN scores"):
        st_compat.paraphrase_mining_embeddings(x, score_function=lambda a, b: (a @ b.T) * math.nan)
    with pytest.raises(ValueError, match="^query_embeddings: expected D = 4"):
        st_compat.semantic_search(torch.zeros(2, 5, dtype=torch.float64), x.double())
    with pytest.raises(ValueError, match="top_k"):
        st_compat.semantic_search(x, x, top_k=-1)
    assert st_compat.semantic_search(x[:3], x, top_k=0) == [[], [], []]  # as sentence-transformers
    with pytest.raises(ValueError, match="query_embeddings: expected D = 4"):
        st_compat.semantic_search(torch.zeros(2, 5), x)
    with pytest.raises(ValueError, match="corpus_embeddings: expected"):
        st_compat.semantic_search(x, torch.zeros(3, 0))
    with pytest.raises(ValueError, match="embeddings: rows with norms up to .* make dot products"):
        st_compat.paraphrase_mining_embeddings(x * 1e20, score_function="dot_score")
    with pytest.raises(ValueError, match=r"embeddings: NaN or Inf"):
        st_compat.community_detection(torch.full((3, 4), math.nan))


# -- scikit-learn ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sk_neighbors():
    return pytest.importorskip("sklearn.neighbors", reason="scikit-learn not installed")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_nearest_neighbors_matches_sklearn(sk_neighbors, metric):
    from embgeom.sklearn import NearestNeighbors

    x = _tie_free(250, 12, seed=4).double().numpy()
    q = make_rows(9, 12, seed=5).double().numpy()
    ours = NearestNeighbors(n_neighbors=6, metric=metric).fit(x)
    ref = sk_neighbors.NearestNeighbors(n_neighbors=6, metric=metric, algorithm="brute").fit(x)
    for X in (q, None):
        d_got, i_got = ours.kneighbors(X)
        d_want, i_want = ref.kneighbors(X)
        assert np.array_equal(i_got, i_want)
        assert d_got.dtype == np.float64 and np.allclose(d_got, d_want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(ours.kneighbors(q, 2, return_distance=False), ref.kneighbors(q, 2, return_distance=False))
    radius = float(np.median(d_want[:, 3])) + 1e-4
    for X in (q, None):
        # the same rows in the same order: nearest first when sorted, else by index (np.where's)
        for sort in (True, False):
            d_got, i_got = ours.radius_neighbors(X, radius, sort_results=sort)
            d_want, i_want = ref.radius_neighbors(X, radius, sort_results=sort)
            for a, b, c, e in zip(i_got, i_want, d_got, d_want):
                assert np.array_equal(a, b)
                assert np.allclose(c, e, rtol=1e-6, atol=1e-6)
    assert ours.n_features_in_ == 12 and ours.n_samples_fit_ == 250


def test_nearest_neighbors_errors(sk_neighbors):
    from embgeom.sklearn import NearestNeighbors
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        NearestNeighbors().kneighbors(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="metric"):
        NearestNeighbors(metric="manhattan").fit(np.ones((3, 2)))
    nn = NearestNeighbors(n_neighbors=3).fit(np.random.default_rng(0).random((3, 2)))
    with pytest.raises(ValueError, match="n_neighbors: expected <= n_samples_fit = 3 - 1"):
        nn.kneighbors()
    with pytest.raises(ValueError, match="features"):
        nn.kneighbors(np.ones((1, 5)))
    with pytest.raises(ValueError, match="mode"):
        nn.kneighbors_graph(mode="weights")


def test_p_in_metric_params_warns_as_sklearn(sk_neighbors):
    """p given in metric_params: scikit-learn's warning (a SyntaxWarning), at the caller's fit."""
    from embgeom.sklearn import NearestNeighbors

    x = np.random.default_rng(0).random((4, 2))
    import warnings

    for cls in (NearestNeighbors, sk_neighbors.NearestNeighbors):
        with pytest.warns(SyntaxWarning, match="Parameter p is found in metric_params") as rec:
            cls(metric_params={"p": 2}).fit(x)
        assert cls is not NearestNeighbors or rec[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(p=None, metric_params={"p": 2}).fit(x)  # (scikit-learn's warning-free form)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_neighbour_graphs_match_sklearn(sk_neighbors, metric):
    from embgeom.sklearn import NearestNeighbors

    x = _tie_free(120, 8, seed=7).double().numpy()
    q = make_rows(5, 8, seed=8).double().numpy()
    radius = 3.5 if metric == "euclidean" else 0.6
    ours = NearestNeighbors(n_neighbors=4, radius=radius, metric=metric).fit(x)
    ref = sk_neighbors.NearestNeighbors(n_neighbors=4, radius=radius, metric=metric, algorithm="brute").fit(x)
    for X in (q, None):
        for mode in ("connectivity", "distance"):
            for name in ("kneighbors_graph", "radius_neighbors_graph"):
                for sort in ((False, True) if name == "radius_neighbors_graph" else (None,)):
                    kw = {} if sort is None else {"sort_results": sort}
                    if sort and mode == "connectivity":
                        continue
                    got, want = getattr(ours, name)(X, mode=mode, **kw), getattr(ref, name)(X, mode=mode, **kw)
                    assert got.format == "csr" and got.shape == want.shape and got.nnz == want.nnz
                    # the same entries in the same order (by column, or nearest first where
                    # scikit-learn sorts them): its CSR's has_sorted_indices alike
                    assert np.array_equal(got.indices, want.indices) and np.array_equal(got.indptr, want.indptr)
                    assert got.has_sorted_indices == want.has_sorted_indices
                    assert np.allclose(got.data, want.data, rtol=1e-6, atol=1e-6)


def test_cosine_zero_rows_at_distance_one_as_sklearn(sk_neighbors):
    """Under cosine a zero row (fitted or queried) is at distance 1 from every row, as
    scikit-learn's cosine has it: kneighbors lists it where that ranks it (ties by index), the
    radius search within a radius >= 1, and a graph fed to a precomputed classifier has k
    neighbours a row (the -1 padding of a zero row had made KNeighborsClassifier refuse it)."""
    from sklearn.neighbors import KNeighborsClassifier

    from embgeom.sklearn import NearestNeighbors

    x = _tie_free(40, 8, seed=3).double().numpy()
    x[[0, 7]] = 0.0
    q = np.vstack([x[1:4], np.zeros((1, 8))]).copy()
    ours = NearestNeighbors(metric="cosine").fit(x)
    ref = sk_neighbors.NearestNeighbors(metric="cosine", algorithm="brute").fit(x)
    for X in (None, q):
        for k in (3, 39):
            d_got, i_got = ours.kneighbors(X, n_neighbors=k)
            d_want, i_want = ref.kneighbors(X, n_neighbors=k)
            assert np.allclose(d_got, d_want, atol=1e-6) and (i_got >= 0).all()
            for r in range(i_got.shape[0]):  # the same rows, equal distances by index (at the cut: any)
                cut = np.isclose(d_want[r], d_want[r][-1], atol=1e-6)
                order = np.lexsort((i_want[r], np.round(d_want[r], 6)))
                assert list(i_got[r][~cut]) == list(i_want[r][order][~cut[order]])
        for radius in (0.5, 1.0, 1.7):
            got, want = ours.radius_neighbors(X, radius=radius)[1], ref.radius_neighbors(X, radius=radius)[1]
            assert [sorted(g.tolist()) for g in got] == [sorted(w.tolist()) for w in want]
    labels = np.arange(40) % 3
    graph = ours.kneighbors_graph(n_neighbors=5, mode="distance")
    assert graph.nnz == 40 * 5
    KNeighborsClassifier(5, metric="precomputed").fit(graph, labels).predict(graph)


def test_sklearn_graph_functions_include_self_under_cosine(sk_neighbors):
    """scikit-learn's kneighbors_graph / radius_neighbors_graph(estimator, include_self=True)
    query the fitted array itself, which its cosine puts at distance 0 from itself, zero rows
    included; equal reported distances are listed by index (float32 distances that round two
    similarities to one value had kept the similarities' order)."""
    from sklearn.neighbors import kneighbors_graph, radius_neighbors_graph

    from embgeom.sklearn import NearestNeighbors

    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    ours = NearestNeighbors(metric="cosine").fit(x)
    ref = sk_neighbors.NearestNeighbors(metric="cosine", algorithm="brute").fit(x)
    for graph, kw in ((kneighbors_graph, dict(n_neighbors=2)), (radius_neighbors_graph, dict(radius=0.5)),
                      (radius_neighbors_graph, dict(radius=1.0))):
        for mode in ("connectivity", "distance"):
            got = graph(ours, mode=mode, metric="cosine", include_self=True, **kw).toarray()
            want = graph(ref, mode=mode, metric="cosine", include_self=True, **kw).toarray()
            assert np.allclose(got, want)
    d, i = NearestNeighbors(metric="cosine").fit(np.array([[2, 3], [3, 3], [3, 2], [1, 1]], np.float32)) \
        .kneighbors(np.array([[2, 3]], np.float32), 4)
    assert d[0, 1] == d[0, 2] and list(i[0]) == [0, 1, 3, 2]


def test_sklearn_conventions_in_workflows(sk_neighbors):
    """A fitted float64 row queried again is at distance 0 (queries are rounded to float32 as
    the fitted rows were); sklearn.neighbors.kneighbors_graph takes the fitted estimator;
    an infinite radius on a DataFrame gives no feature-name warning, a read-only query no torch
    warning; parameter errors are scikit-learn's InvalidParameterError (ValueError and TypeError)."""
    import warnings

    from sklearn.neighbors import kneighbors_graph

    from embgeom.sklearn import NearestNeighbors

    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 3))
    x[5] = x[0]
    nn = NearestNeighbors(n_neighbors=2).fit(x)
    assert np.array_equal(nn.kneighbors(x[:2])[0][:, 0], [0.0, 0.0])
    assert [r.tolist() for r in nn.radius_neighbors(x[:2], radius=0)[1]] == [[0, 5], [1]]
    ref = sk_neighbors.NearestNeighbors(n_neighbors=2, algorithm="brute").fit(x)
    assert (kneighbors_graph(nn, 2) != kneighbors_graph(ref, 2)).nnz == 0
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(rng.random((20, 3)), columns=list("abc"))
    fixed = np.asarray(frame, dtype=np.float32)
    fixed.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = NearestNeighbors(n_neighbors=3).fit(frame)
        assert len(est.radius_neighbors(frame, radius=np.inf)[1][0]) == 20
        NearestNeighbors(n_neighbors=3).fit(fixed).kneighbors(fixed)
    for bad in (dict(radius="a"), dict(n_neighbors=2.0)):
        with pytest.raises(TypeError):
            NearestNeighbors(**bad).fit(x)
    with pytest.raises(ValueError, match="^n_neighbors: expected an int >= 1, got 2.0"):
        nn.kneighbors(n_neighbors=2.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_radius_neighbors_decide_on_the_distance_they_report(metric, dtype):
    """A radius equal to a distance kneighbors reported lists that row, and the distances
    radius_neighbors lists are <= the radius: cosine searches had cut at similarity >= 1 - r,
    which rounds apart from 1 - s <= r (a row at distance == r missed, one above r listed)."""
    from embgeom.sklearn import NearestNeighbors

    x = np.array([[6.0, 9.0, -5.0], [4.0, 3.0, 0.0]] + make_rows(40, 3, seed=4).double().tolist(), dtype)
    q = np.array([[-4.0, 7.0, -1.0], [1.0, 0.0, 0.0]] + make_rows(20, 3, seed=5).double().tolist(), dtype)
    nn = NearestNeighbors(metric=metric).fit(x)
    dist, ids = nn.kneighbors(q, n_neighbors=5)
    for row in range(q.shape[0]):
        for d, i in zip(dist[row], ids[row]):
            for r in (float(d), float(np.nextafter(d, 0.0)), float(np.nextafter(np.float64(d), 0.0))):
                got_d, got_i = nn.radius_neighbors(q[row:row + 1], radius=r)
                assert (got_d[0] <= r).all()
                assert (i in got_i[0]) == (d <= r)
            # a numpy float64 radius: scikit-learn's `d <= radius` compares in float64 (a Python
            # float is NumPy 2's weak scalar: the distances' dtype); rounded to float32 it had
            # come up to d and listed the row
            r64 = np.nextafter(np.float64(d), 0.0)
            got_d, got_i = nn.radius_neighbors(q[row:row + 1], radius=r64)
            assert (got_d[0] <= r64).all() and i not in got_i[0]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_infinite_radius_and_argument_names_as_sklearn(sk_neighbors, metric):
    """radius=inf lists every fitted row (nearest first when sorted, else by index, as
    scikit-learn's);
    sort_results without distances is refused as scikit-learn refuses it; errors name X."""
    from embgeom.sklearn import NearestNeighbors

    x = _tie_free(60, 8, seed=9).double().numpy()
    q = make_rows(4, 8, seed=10).double().numpy()
    ours = NearestNeighbors(metric=metric).fit(x)
    ref = sk_neighbors.NearestNeighbors(metric=metric, algorithm="brute").fit(x)
    for X in (q, None):
        for sort in (True, False):
            got_d, got_i = ours.radius_neighbors(X, radius=math.inf, sort_results=sort)
            want_d, want_i = ref.radius_neighbors(X, radius=math.inf, sort_results=sort)
            assert len(got_i) == len(want_i)
            for a, b, c, d in zip(got_d, got_i, want_d, want_i):
                assert np.array_equal(b, d) and np.allclose(a, c, rtol=1e-6, atol=1e-6)
        assert [len(i) for i in ours.radius_neighbors(X, radius=math.inf, return_distance=False)] == \
            [len(i) for i in want_i]
    with pytest.raises(ValueError, match="return_distance must be True if sort_results is True"):
        ours.radius_neighbors(q, 1.0, return_distance=False, sort_results=True)
    for bad in (-1.0, math.nan):  # scikit-learn's brute search: no row, or (euclidean, < 0) refused
        if metric == "euclidean" and bad < 0:
            with pytest.raises(ValueError, match="radius"):
                ours.radius_neighbors(q, bad)
            continue
        got_d, got_i = ours.radius_neighbors(q, bad)
        want_d, want_i = ref.radius_neighbors(q, bad)
        assert [len(i) for i in got_i] == [len(i) for i in want_i] == [0] * len(q)
    if metric == "euclidean":  # the index's own checks, under scikit-learn's argument name
        with pytest.raises(ValueError, match="^X: rows with norms up to"):
            ours.kneighbors(q * 1e30)
        with pytest.raises(ValueError, match="^X: rows with norms up to"):
            NearestNeighbors().fit(x * 1e30)


def test_nearest_neighbors_takes_sklearns_constructor_and_dtypes(sk_neighbors):
    """scikit-learn's own constructor call works unchanged (algorithm, leaf_size, p,
    metric_params, n_jobs, metric "minkowski" as its default), get_params has its keys, other
    metrics and p are refused naming them; distances and graphs come in its dtypes (cosine on
    float32 rows float32; graphs' indices and sparse type as its version makes them)."""
    from embgeom.sklearn import NearestNeighbors

    x = _tie_free(80, 8, seed=11).numpy()
    sk_keys = set(sk_neighbors.NearestNeighbors().get_params())
    assert sk_keys <= set(NearestNeighbors().get_params())
    for kw in (dict(), dict(algorithm="brute", n_jobs=2, leaf_size=10), dict(metric="minkowski", p=2),
               dict(metric="cosine", algorithm="brute", metric_params=None), dict(metric="l2"),
               dict(metric="cosine", fit_tensor=True)):
        # float32 torch tensors keep float32 as scikit-learn keeps them (they had become float64)
        fit_x = torch.from_numpy(x) if kw.pop("fit_tensor", False) else x
        ours = NearestNeighbors(n_neighbors=3, **kw).fit(fit_x)
        ref = sk_neighbors.NearestNeighbors(n_neighbors=3, **{**kw, "algorithm": "brute"}).fit(fit_x)
        assert ours.effective_metric_ == ref.effective_metric_ and ours.effective_metric_params_ == {}
        for X in (None, x[:5], x[:5].astype(np.float64), torch.from_numpy(x[:5])):
            (d, i), (dr, ir) = ours.kneighbors(X), ref.kneighbors(X)
            assert np.array_equal(i, ir) and d.dtype == dr.dtype and np.allclose(d, dr, atol=1e-6)
            (rd, ri), (rdr, rir) = ours.radius_neighbors(X, 1.0), ref.radius_neighbors(X, 1.0)
            assert all(a.dtype == b.dtype for a, b in zip(rd, rdr)) and all(a.dtype == b.dtype for a, b in zip(ri, rir))
            for name in ("kneighbors_graph", "radius_neighbors_graph"):
                for mode in ("connectivity", "distance"):
                    g, gr = getattr(ours, name)(X, mode=mode), getattr(ref, name)(X, mode=mode)
                    assert type(g) is type(gr) and g.indices.dtype == gr.indices.dtype
                    assert g.indptr.dtype == gr.indptr.dtype and g.dtype == gr.dtype
    one = np.ones((1, 4), np.float32)  # radius inf with no other row: empty, in the distances' dtype
    for metric in ("cosine", "euclidean"):
        got = NearestNeighbors(metric=metric).fit(one).radius_neighbors(radius=np.inf)[0][0]
        want = sk_neighbors.NearestNeighbors(metric=metric, algorithm="brute").fit(one).radius_neighbors(radius=np.inf)[0][0]
        assert got.dtype == want.dtype and len(got) == len(want) == 0
    radius_only = NearestNeighbors(n_neighbors=None, radius=2.0).fit(x)
    assert len(radius_only.radius_neighbors(x[:1])[1][0]) > 0
    with pytest.raises(ValueError, match="n_neighbors: this estimator was made with n_neighbors=None"):
        radius_only.kneighbors(x[:1])
    for bad, name in ((dict(metric="minkowski", p=1), "^p: "), (dict(metric_params={"w": 1}), "^metric_params: "),
                      (dict(algorithm="bogus"), "^algorithm: "), (dict(leaf_size=0), "^leaf_size: ")):
        with pytest.raises(ValueError, match=name):
            NearestNeighbors(**bad).fit(x)


def test_faiss_shaped_errors_name_x():
    from embgeom import faiss as egf

    ip = egf.IndexFlatIP(4)
    with pytest.raises(ValueError, match=r"^x: values up to 1e\+300, beyond float32"):
        ip.add(np.full((2, 4), 1e300))
    ip.add(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="^x: "):
        ip.search(np.full((1, 4), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="^x: "):
        ip.range_search(np.full((1, 4), np.inf, np.float32), 0.5)


def test_faiss_shaped_calls_faiss_takes():
    """Integer rows are converted as FAISS converts them; search(x, k, D=, I=) fills and returns
    the caller's arrays; params=None is taken; wrong buffers are refused naming them."""
    from embgeom import faiss as egf

    ip = egf.IndexFlatIP(3)
    ip.add(np.array([[1, 0, 0], [0, 2, 0], [1, 1, 1]], np.int32))
    assert ip.ntotal == 3
    D, I = np.empty((2, 2), np.float32), np.empty((2, 2), np.int64)
    got = ip.search(np.array([[1, 0, 0], [0, 1, 0]]), 2, params=None, D=D, I=I)
    assert got[0] is D and got[1] is I
    assert I.tolist() == [[0, 2], [1, 2]] and D.tolist() == [[1.0, 1.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match=r"^D: expected a writable C-contiguous \(2, 2\) float32"):
        ip.search(np.ones((2, 3)), 2, D=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="^I: "):
        ip.search(np.ones((2, 3)), 2, I=np.empty((2, 2), np.int32))
    with pytest.raises(ValueError, match="^params: "):
        ip.search(np.ones((1, 3)), 1, params=object())


def test_zero_top_k_or_max_pairs_mine_nothing(st_util):
    x = make_rows(30, 8, seed=2)
    for kw in (dict(top_k=0), dict(max_pairs=0)):
        assert st_compat.paraphrase_mining_embeddings(x, **kw) == st_util.paraphrase_mining_embeddings(x, **kw) == []


def test_check_estimator(sk_neighbors):
    from sklearn.utils.estimator_checks import check_estimator

    from embgeom.sklearn import NearestNeighbors

    check_estimator(NearestNeighbors())


# -- FAISS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["IndexFlatIP", "IndexFlatL2"])
def test_flat_indexes_match_faiss(kind):
    faiss = pytest.importorskip("faiss", reason="faiss not installed")
    from embgeom import faiss as egf

    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    ours, ref = getattr(egf, kind)(16), getattr(faiss, kind)(16)
    for part in (x[:200], x[200:]):
        ours.add(part)
        ref.add(part)
    assert ours.ntotal == ref.ntotal == 500 and ours.d == 16 and ours.metric_type == ref.metric_type
    ours.train(x)  # (nothing to learn: accepted, as FAISS does)
    assert ours.is_trained and ours.reconstruct(7).dtype == np.float32
    assert np.array_equal(ours.reconstruct(499), ref.reconstruct(499))
    assert np.array_equal(ours.reconstruct_n(3, 40), ref.reconstruct_n(3, 40))
    assert np.array_equal(ours.reconstruct_n(), ref.reconstruct_n())
    for k in (1, 10, 600):
        d_got, i_got = ours.search(q, k)
        d_want, i_want = ref.search(q, k)
        assert d_got.dtype == np.float32 and i_got.dtype == np.int64
        assert np.array_equal(i_got, i_want)
        assert np.allclose(d_got, d_want, rtol=1e-5, atol=1e-4)
    radius = float(np.median(d_want[:, 20])) + 1e-3
    l_got, d_got, i_got = ours.range_search(q, radius)
    l_want, d_want, i_want = ref.range_search(q, radius)
    assert l_got.dtype == l_want.dtype and np.array_equal(l_got, l_want)
    for r in range(q.shape[0]):
        a, b = slice(l_got[r], l_got[r + 1]), slice(l_want[r], l_want[r + 1])
        assert sorted(i_got[a].tolist()) == sorted(i_want[b].tolist())
    ours.reset()
    ref.reset()
    assert ours.ntotal == 0
    assert [a.tolist() for a in ours.search(q[:1], 2)] == [a.tolist() for a in ref.search(q[:1], 2)]


def test_flat_index_bad_input():
    from embgeom import faiss as egf

    index = egf.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    for call, match in ((lambda: index.reconstruct(-1), r"^key: expected 0 <= key < 4 \(ntotal\), got -1"),
                        (lambda: index.reconstruct(4), "^key: expected 0 <= key < 4"),
                        (lambda: index.reconstruct_n(2, 3), r"^ni: expected 0 \.\. 2 rows from n0 = 2"),
                        (lambda: index.reconstruct_n(5), "^n0: expected 0 <= n0 <= 4"),
                        (lambda: index.train(np.zeros((2, 3), np.float32)), r"^x: expected \(n, 4\)")):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="^key: expected an int, got float"):
        index.reconstruct(1.0)
    index.reset()
    with pytest.raises(ValueError, match=r"x: expected \(n, 4\)"):
        index.add(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="x: expected"):
        index.add(np.zeros((2, 4), np.complex64))
    with pytest.raises(ValueError, match="k: expected >= 1, got 0"):
        index.search(np.zeros((1, 4), np.float32), 0)
    with pytest.raises(TypeError, match="k: expected an int, got float"):  # (as every embgeom k)
        index.search(np.zeros((1, 4), np.float32), 2.0)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="k: 1 query x k = 10,000,000,000,000 results need"):
        index.search(np.zeros((1, 4), np.float32), 10**13)
    with pytest.raises(ValueError, match="d: expected >= 1, got 0"):
        egf.IndexFlatL2(0)
    with pytest.raises(ValueError, match="radius: expected a number"):
        index.range_search(np.zeros((1, 4), np.float32), float("nan"))


def test_flat_l2_range_search_radius_is_strict_on_squared_sums():
    """L2 < radius on the float64 squared sum: sqrt(3)^2 rounds to 2.9999999999999996, so a
    test on the distance's square kept a row at squared distance exactly 3."""
    from embgeom import faiss as egf

    index = egf.IndexFlatL2(3)
    index.add(np.zeros((1, 3), np.float32))
    q = np.ones((1, 3), np.float32)
    assert index.range_search(q, 3.0)[0].tolist() == [0, 0]
    lims, d, i = index.range_search(q, 3.5)
    assert lims.tolist() == [0, 1] and d.tolist() == [3.0] and i.tolist() == [0]
    assert index.range_search(q, float("inf"))[0].tolist() == [0, 1]
    rng = np.random.default_rng(9)
    x = rng.integers(-3, 4, (150, 5)).astype(np.float32)
    qs = rng.integers(-3, 4, (10, 5)).astype(np.float32)
    index.reset()
    index = egf.IndexFlatL2(5)
    index.add(x)
    sq = ((qs[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)  # exact on small integers
    for r in range(0, 40):
        lims, d, ids = index.range_search(qs, float(r))
        for k in range(len(qs)):
            got = sorted(ids[lims[k]:lims[k + 1]].tolist())
            assert got == np.nonzero(sq[k] < r)[0].tolist()
    ip = egf.IndexFlatIP(5)
    ip.add(x)
    assert ip.range_search(qs[:2], -math.inf)[0].tolist() == [0, 150, 300]


@pytest.mark.parametrize("threshold,size", [(0.75, 4), (0.3, 3), (0.999, 2)])
def test_communities_engine_path_equals_range_search(monkeypatch, threshold, size):
    """communities from the engine's pairs (half the products) equal the row-by-row range
    search: duplicates, a zero row, members ordered by (cosine desc, id asc)."""
    import importlib

    from test_pairs_above import _clusters

    comm = importlib.import_module("embgeom.community_detection")
    x = _clusters(seed=4)
    x[5] = x[9]
    x[12] = 0
    got = comm.communities(x, threshold, size)
    with monkeypatch.context() as m:
        m.setattr(comm, "_engine_candidates", lambda *a: None)
        want = comm.communities(x, threshold, size)
    assert got == want and got
    # each community: its centre, then members by (float64 cosine to the centre desc, id asc)
    x64 = np.asarray(x, dtype=np.float64)
    unit = x64 / np.maximum(np.linalg.norm(x64, axis=1), 1e-300)[:, None]
    for group in got:
        cos = unit[group[1:]] @ unit[group[0]]
        assert group[1:] == [group[1:][k] for k in np.lexsort((group[1:], -cos))]
    calls = []
    original = comm.Index._engine_self_pairs
    monkeypatch.setattr(comm.Index, "_engine_self_pairs", lambda *a: calls.append(original(*a)) or calls[-1])
    assert comm.communities(x, threshold, size) == want and calls[-1] is not None  # one self-mode run
    monkeypatch.setattr(comm, "SELF_RUN_PAIRS", 0)  # its list overflows: the bands of pairs_above
    assert comm.communities(x, threshold, size) == want and calls[-1] is None
    monkeypatch.setattr(comm, "ENGINE_PAIRS_LIMIT", 0)  # too many pairs: the range search answers
    assert comm.communities(x, threshold, size) == want


@pytest.mark.parametrize("n", [0, 1, 2, 7, 5000])
@pytest.mark.parametrize("levels", [1, 3, 60, 10 ** 9])
def test_pair_order_is_score_desc_then_i_then_j(n, levels):
    """_pair_order (paraphrase mining's ranking: an argsort, then a lexsort of the tied runs
    only) gives numpy's lexsort by (score desc, i, j), with few and many ties."""
    rng = np.random.default_rng(n + levels)
    s = (rng.integers(0, levels, n) / 7).astype(np.float32)
    i, j = rng.integers(0, 40, n), rng.integers(0, 40, n)
    got, want = st_compat._pair_order(s, i, j), np.lexsort((j, i, -s.astype(np.float64)))
    for key in (s, i, j):
        assert np.array_equal(key[got], key[want])


def test_graphs_before_sklearn_1_8_are_its_csr_matrix_of_int32_indices(sk_neighbors, monkeypatch):
    """Without scikit-learn 1.8's sparse-interface helper (1.7 is the last for Python 3.10) a
    graph is the csr_matrix scikit-learn 1.7 builds from the three arrays, int32 indices (a
    converted csr_array had kept int64 ones)."""
    import sklearn.utils
    from scipy.sparse import csr_matrix

    from embgeom.sklearn import NearestNeighbors

    monkeypatch.delattr(sklearn.utils, "_align_api_if_sparse", raising=False)
    x = _tie_free(30, 4, seed=2).numpy()
    for graph in (NearestNeighbors(n_neighbors=3).fit(x).kneighbors_graph(),
                  NearestNeighbors(radius=2.0).fit(x).radius_neighbors_graph(mode="distance")):
        want = csr_matrix((graph.data, graph.indices.astype(np.int64), graph.indptr.astype(np.int64)),
                          shape=graph.shape)
        assert type(graph) is csr_matrix and graph.indices.dtype == want.indices.dtype == np.int32
