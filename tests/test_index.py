"""embgeom.Index against float64 brute force: ids equal except at ties (equal float64 values,
ordered by id), every metric and scan dtype, odd shapes, save/load, add, threads, bad input."""
from __future__ import annotations

import math
import os
import re
import threading

import numpy as np
import pytest
import torch

from embgeom import Index
from embgeom import index as index_module
from embgeom.backends import registry

METRICS = ["cosine", "dot", "l2"]
DTYPES = [torch.float32, torch.bfloat16]


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def make_rows(n, d, seed=0, zero=(), dup=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    for r in zero:
        x[r] = 0
    for a, b in dup:
        x[b] = x[a]
    return x


def reference(x, q, metric):
    """(values (Q, N) float64 with excluded entries NaN, larger-is-better key)."""
    x64, q64 = x.double(), q.double()
    if metric == "cosine":
        xn, qn = x64.norm(dim=1), q64.norm(dim=1)
        v = (q64 @ x64.T) / (qn[:, None] * xn[None, :])
        v[:, xn == 0] = math.nan
        v[qn == 0, :] = math.nan
        return v.clamp(-1, 1), v.clamp(-1, 1)
    if metric == "dot":
        v = q64 @ x64.T
        return v, v
    v = torch.cdist(q64, x64)
    return v, -v


def ref_topk(x, q, k, metric):
    v, key = reference(x, q, metric)
    key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # ties: smaller id first
    ids = order[:, :k]
    vals = torch.gather(v, 1, ids)
    valid = torch.isfinite(torch.gather(key, 1, ids))
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    vals = torch.where(valid, vals, torch.full_like(vals, math.nan))
    short = k - ids.shape[1]  # k > N: padding
    return (torch.nn.functional.pad(vals, (0, short), value=math.nan),
            torch.nn.functional.pad(ids, (0, short), value=-1))


def assert_same_neighbours(got_v, got_i, want_v, want_i, tol=1e-6):
    """ids equal except where the reference's values tie (within tol) across the k boundary or
    inside the list; values within float32 rounding."""
    assert got_i.shape == want_i.shape
    pad = want_i < 0
    assert torch.equal(got_i < 0, pad), "padding differs"
    scale = torch.nan_to_num(want_v.abs(), nan=0.0).clamp(min=1.0)
    diff = (got_v.double() - want_v).abs() / scale
    assert bool((diff[~pad] <= tol).all()), f"values differ by {float(diff[~pad].max())}"
    wrong = (got_i != want_i) & ~pad
    for r, c in wrong.nonzero().tolist():  # a differing id must be a tie in the reference
        assert abs(float(got_v[r, c]) - float(want_v[r, c])) <= tol * float(scale[r, c]), (r, c)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n,d,k", [(1, 8, 1), (1, 8, 3), (257, 33, 10), (2000, 64, 7)])
def test_search_vs_float64(metric, dtype, n, d, k):
    x = make_rows(n, d, zero=(0,) if n > 5 else (), dup=((3, 7),) if n > 7 else ())
    q = make_rows(13, d, seed=1)
    q[4] = x[min(3, n - 1)]  # a query equal to a stored row
    index = Index(x, metric=metric, dtype=dtype)
    got_v, got_i = index.search(q, k)
    want_v, want_i = ref_topk(x, q, k, metric)
    assert got_v.dtype == torch.float32 and got_i.dtype == torch.int64
    assert_same_neighbours(got_v, got_i, want_v, want_i)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_few_queries_take_the_same_answers(metric, dtype, monkeypatch):
    """Up to SMALL_BATCH queries select candidates with numpy, more with torch.topk: same ids.
    A few queries scan with the C++ core's rows_dot where it is built, else numpy's product: the
    same answers either way."""
    x = make_rows(3000, 48, zero=(0,), dup=((3, 7), (11, 2999)))
    q = make_rows(9, 48, seed=2)
    q[1] = x[7]
    index = Index(x, metric=metric, dtype=dtype)
    batch_v, batch_i = index.search(q, 12)
    for rows in ([0], [1], [2, 3, 4], list(range(4))):
        v, i = index.search(q[rows], 12)
        assert torch.equal(i, batch_i[rows]) and torch.equal(v, batch_v[rows])
    calls = []
    real = index_module._rows_dot
    monkeypatch.setattr(index_module, "_rows_dot", lambda dt: calls.append(dt) or real(dt))
    one_v, one_i = Index(x, metric=metric, dtype=dtype).search(q[1:2], 12)
    monkeypatch.setattr(index_module, "_rows_dot", lambda dt: calls.append(dt) or None)
    bare_v, bare_i = Index(x, metric=metric, dtype=dtype).search(q[1:2], 12)
    assert torch.equal(one_i, bare_i) and torch.equal(one_v, bare_v) and torch.equal(one_i, batch_i[1:2])
    if dtype == torch.float32:
        assert calls and set(calls) == {torch.float32}  # the one-query float32 scan asked for the core
    want_v, want_i = ref_topk(x, q, 12, metric)
    assert_same_neighbours(batch_v, batch_i, want_v, want_i)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("qdtype", ["float32", "float64-numpy", "float16", "bfloat16"])
def test_few_queries_core_path_equals_the_general_one(metric, dtype, qdtype):
    """_search_few (up to SMALL_BATCH queries: numpy arrays and the core's few_search) gives
    _search's answers bit for bit:
    zero rows and a zero query (under dot and l2 it ties with every row), duplicates, a query equal to a row, k past n, n = 1, a cluster
    of near-ties whose lists are too short for the margin (then it hands over to _search)."""
    if index_module._rows_dot(torch.float32) is None:
        pytest.skip("the C++ core is not built: _search_few does not apply")
    cluster = make_rows(1, 24) + 1e-4 * make_rows(400, 24, seed=5)
    cases = [(make_rows(700, 24, zero=(0, 9), dup=((3, 7), (5, 699))), 12),
             (make_rows(5, 24, zero=(1,)), 9), (make_rows(1, 24), 3), (cluster, 10)]
    for x, k in cases:
        q = make_rows(4, 24, seed=3)
        q[1] = x[min(3, x.shape[0] - 1)]
        q[2] = 0
        q = {"float32": q, "float64-numpy": q.double().numpy(), "float16": q.half(), "bfloat16": q.bfloat16()}[qdtype]
        index = Index(x, metric=metric, dtype=dtype)
        for rows in ([0], [1, 2], [0, 1, 2, 3]):
            qr = q[rows]
            few = index._search_few(qr, k, True)
            want_v, want_i = index._search(qr, k, True, index._engine_candidates)
            if x is cluster and dtype == torch.bfloat16:
                continue  # (bf16 scans of the cluster may or may not be short: either way below)
            if few is None:  # (a zero query ties with every row under dot and l2: too short)
                assert x is cluster or (2 in rows and metric != "cosine"), "_search_few declined an ordinary search"
                continue
            assert torch.equal(few[1], want_i) and torch.equal(few[0].isnan(), want_v.isnan())
            assert torch.equal(few[0].nan_to_num(), want_v.nan_to_num())
        v, i = index.search(q, k, float64=True)  # whichever path takes it: exact
        ref_v, ref_i = ref_topk(x, torch.as_tensor(q).double(), k, metric)
        assert_same_neighbours(v, i, ref_v, ref_i, tol=1e-9)  # (cdist's float64 product: not 1e-12)
    bf = index_module.Index(make_rows(50, 24), metric=metric, dtype=dtype)
    with pytest.raises(ValueError, match="k"):
        bf.search(make_rows(1, 24), 0)
    with pytest.raises(ValueError, match="queries"):
        bf.search(make_rows(1, 23), 3)


def test_few_queries_past_the_kept_scan_buffer():
    """4 queries over 262,145 rows: a scan of more than the 2^20 values few_search keeps between
    calls, in a buffer of the call's own; the same bits as _search, twice in a row (the kept
    buffer, then the other)."""
    if index_module._rows_dot(torch.float32) is None:
        pytest.skip("the C++ core is not built: _search_few does not apply")
    x = make_rows(262_145, 8, seed=7, zero=(5,), dup=((3, 262_144),))
    q = make_rows(4, 8, seed=8)
    index = Index(x)
    want_v, want_i = index._search(q, 6, True, index._engine_candidates)
    for rows in ([0], [0, 1, 2, 3], [0, 1, 2, 3]):
        got = index._search_few(q[rows], 6, True)
        assert got is not None and torch.equal(got[1], want_i[rows]) and torch.equal(got[0], want_v[rows])


@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_go_to_the_smaller_id(metric):
    x = make_rows(50, 16)
    x[10] = x[20] = x[30] = x[40]  # four equal rows
    index = Index(x, metric=metric)
    _, ids = index.search(x[40:41], 4)
    assert ids.tolist() == [[10, 20, 30, 40]]


def test_float64_scores_and_bfloat16_many_near_ties():
    """Clustered rows (many candidates inside the bf16 error bound): the rescan path."""
    base = make_rows(1, 32)
    x = base + 1e-3 * make_rows(3000, 32, seed=2)
    index = Index(x, dtype=torch.bfloat16)
    v, i = index.search(x[:5], 10, float64=True)
    want_v, want_i = ref_topk(x, x[:5], 10, "cosine")
    assert v.dtype == torch.float64
    assert_same_neighbours(v, i, want_v, want_i, tol=1e-12)


def test_k_larger_than_n_and_zero_rows_pad():
    x = make_rows(4, 8, zero=(1,))
    index = Index(x)
    v, i = index.search(make_rows(2, 8, seed=3), 6)
    assert (i[:, 3:] == -1).all() and torch.isnan(v[:, 3:]).all()
    assert 1 not in i.tolist()[0]
    v, i = index.search(torch.zeros(1, 8), 2)  # a zero query has no direction
    assert (i == -1).all() and torch.isnan(v).all()


def test_empty_corpus_and_empty_queries():
    index = Index(np.zeros((0, 5), np.float32), metric="l2")
    v, i = index.search(make_rows(3, 5), 2)
    assert (i == -1).all() and torch.isnan(v).all()
    index.add(make_rows(3, 5))
    v, i = index.search(torch.zeros(0, 5), 2)
    assert v.shape == (0, 2) and i.shape == (0, 2)
    lims, s, ids = index.range_search(torch.zeros(0, 5), 1.0)
    assert lims.tolist() == [0] and s.numel() == 0 and ids.numel() == 0


def test_empty_index_saves_and_loads(tmp_path):
    Index(np.zeros((0, 8), np.float32), metric="dot").save(tmp_path / "empty.idx")
    index = Index.load(tmp_path / "empty.idx")
    assert index.ntotal == 0 and index.metric == "dot"
    v, i = index.search(make_rows(2, 8), 3)
    assert (i == -1).all()


def test_queries_in_any_memory_layout():
    x = make_rows(30, 6, seed=2).numpy()
    index = Index(x)
    want = index.search(np.ascontiguousarray(x[:4]), 3)[1]
    views = [np.asfortranarray(x[:4]), np.repeat(x[:4], 2, axis=1)[:, ::2], x[3::-1][::-1], x[::-1][-4:][::-1],
             torch.from_numpy(x[:4]).T.contiguous().T]
    for q in views:
        assert torch.equal(index.search(q, 3)[1], want)
        assert torch.equal(index.range_search(q, 0.2)[2], index.range_search(x[:4], 0.2)[2])
    assert torch.equal(Index(x[::-1]).search(x[:4], 3)[1], 29 - want)  # a reversed corpus too


def test_magnitudes_the_scan_cannot_take_are_refused():
    rng = np.random.default_rng(0)
    big = (rng.standard_normal((30, 8)) * 1e20).astype(np.float32)
    for metric in ("dot", "l2"):
        with pytest.raises(ValueError, match=f"corpus: rows with norms up to .* make {metric} products"):
            Index(big, metric=metric)
        index = Index(rng.standard_normal((5, 8)), metric=metric)
        with pytest.raises(ValueError, match="more: rows with norms"):
            index.add(np.full((1, 8), 1e37))
        with pytest.raises(ValueError, match="rows with norms up to .* beyond float32"):
            index.search(np.full((1, 8), 1e37), 2)
        # tiny rows: the message gives the products' size and the floor they fall below (it had
        # said "below float32's normal range (1.18e-38)" of products near 1e-33)
        with pytest.raises(ValueError, match=r"corpus: rows with norms of at most .* make "
                           rf"{metric} products of at most \d\.\d+e-3\d, below 1.97e-31 \(2\^24 times "
                           r"float32's smallest normal 1.18e-38\)"):
            Index(rng.standard_normal((10, 8)) * 1e-17, metric=metric)
    cosine = Index(big)  # cosine takes large rows
    assert torch.equal(cosine.search(big[:3], 1)[1].flatten(), torch.arange(3))
    wide = rng.standard_normal((5, 4))
    wide[2, 1] = 1e39  # finite in float64, infinite in float32
    with pytest.raises(ValueError, match=r"corpus: values up to 1e\+39 do not fit in float32"):
        Index(wide)
    tiny = rng.standard_normal((20, 8)).astype(np.float32)
    tiny[7] *= np.float32(1e-39)  # subnormal: its float32 scale 1/|c| overflows
    with pytest.raises(ValueError, match=r"corpus: 1 row\(s\) with norms outside .*: \[7\]"):
        Index(tiny)


def test_tiny_float64_query_keeps_its_direction():
    x = make_rows(12, 4, seed=1)
    index = Index(x)
    q = np.array([[1e-300, 0.0, 0.0, 0.0]])
    assert torch.equal(index.search(q, 3)[1], index.search(np.array([[1.0, 0, 0, 0]]), 3)[1])


@pytest.mark.parametrize("Q", [3, 40])  # few_search's one call, and the general path
def test_tiny_and_huge_float64_queries_score_their_true_cosines(Q):
    """Under cosine a float64 query set of any magnitude the index takes gets the cosines of its
    direction (its squared sum had underflowed below 1e-154: every cosine came out 1)."""
    x = make_rows(200, 8, seed=3)
    index = Index(x)
    q = make_rows(Q, 8, seed=4).double()
    want_v, want_i = index.search(q, 5, float64=True)
    # powers of two (1e-160, 1e-200, 1e-300, 1e30): the same cosines to the bit
    for scale in (2.0 ** -530, 2.0 ** -664, 2.0 ** -996, 2.0 ** 100):
        got_v, got_i = index.search(q * scale, 5, float64=True)
        assert torch.equal(got_i, want_i) and torch.equal(got_v, want_v), scale
        lims, v, i = index.range_search(q * scale, 0.3, float64=True)
        lims0, v0, i0 = index.range_search(q, 0.3, float64=True)
        assert torch.equal(lims, lims0) and torch.equal(i, i0) and torch.equal(v, v0), scale


@pytest.mark.parametrize("core", [True, False], ids=["core", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_identical_rows_score_exactly_one(dtype, core, monkeypatch):
    """A row against itself or an identical copy scores exactly 1.0 under cosine, in every path
    (few queries, many, search_stored, range_search at 1.0, pairs_above at 1.0, communities at
    1.0), with the C++ core and without it (torch's sums): the product of two separately
    rounded norms gave 1 - 2^-52 for about a quarter of rows, and a threshold of 1.0 then missed
    exact duplicates."""
    from embgeom import communities, pairs_above, read_pairs

    if not core:
        monkeypatch.setattr(registry, "cpp_kernel", lambda *a: None)

    g = np.random.default_rng(0)
    base = g.standard_normal((150, 8)).astype(np.float32)
    x = torch.from_numpy(np.vstack([base, base]))                     # row r and row r + 150 equal
    index = Index(x, dtype=dtype)
    for rows in (x[:3], x[:40], x[:3].double(), x[:40].double()):
        v, i = index.search(rows, 2, float64=True)
        assert bool((v == 1.0).all()), rows.shape
        assert torch.equal(i.sort(1).values, torch.stack([torch.arange(len(rows)), torch.arange(len(rows)) + 150], 1))
    v, _ = index.search_stored(2, float64=True)
    assert bool((v == 1.0).all())
    lims, v, i = index.range_search(x[:40], 1.0, float64=True)
    assert torch.equal(lims, torch.arange(0, 81, 2)) and bool((v == 1.0).all())
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pairs_above(index, 1.0, os.path.join(d, "p"))
        pi, pj, ps = read_pairs(os.path.join(d, "p"))
    assert np.array_equal(pi, np.arange(150)) and np.array_equal(pj, np.arange(150) + 150)
    groups = communities(index, 1.0, 2)
    assert sorted(sorted(c) for c in groups) == [[r, r + 150] for r in range(150)]
    # symmetric: (i, j) scores what (j, i) does
    vi, ii = index.search(x[:150], 6, float64=True)
    back = {}
    for r in range(150):
        for s_, c in zip(vi[r].tolist(), ii[r].tolist()):
            back[(r, c)] = s_
    for (r, c), s_ in back.items():
        if (c, r) in back:
            assert back[(c, r)] == s_


def test_core_pair_cosines():
    """_C.pair_cosines: the float64 cosine to 1e-12, exactly 1 for a row against its own values
    (float32 and float64 queries), symmetric, NaN for a zero row, 0 for a zero query, the same
    bits alone and threaded; indices out of range refused."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((300, 37)).astype(np.float32)
    rows[7] = 0
    q = rng.standard_normal((40, 37))
    q[3] = 0
    P = 9000
    qi, ci = rng.integers(0, 40, P), rng.integers(0, 300, P)
    got = core.pair_cosines(rows, q, qi, ci)
    r64 = rows.astype(np.float64)[ci]
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (r64 * q[qi]).sum(1) / (np.linalg.norm(r64, axis=1) * np.linalg.norm(q[qi], axis=1))
    real = (ci != 7) & (qi != 3)
    assert np.allclose(got[real], want[real], rtol=1e-12, atol=1e-12)
    assert np.isnan(got[ci == 7]).all() and (got[(qi == 3) & (ci != 7)] == 0).all()
    one = [core.pair_cosines(rows, q, qi[k:k + 1], ci[k:k + 1])[0] for k in range(9)]
    assert np.array_equal(np.array(one), got[:9], equal_nan=True)
    idx = np.arange(300)
    for own in (rows, rows.astype(np.float64)):
        self_cos = core.pair_cosines(rows, own, idx, idx)
        assert (self_cos[idx != 7] == 1.0).all()
    a, b = rng.integers(8, 300, 500), rng.integers(8, 300, 500)  # (row 7 is zero: NaN one way, 0 the other)
    for rq in (rows, rows.astype(np.float64)):
        assert np.array_equal(core.pair_cosines(rows, rq, a, b), core.pair_cosines(rows, rq, b, a))
    with pytest.raises(ValueError, match="outside"):
        core.pair_cosines(rows, q, np.array([0]), np.array([300]))


def test_vectors_slices_like_python():
    index = Index(np.ones((10, 4), np.float32))
    index.add(np.full((2, 4), 2, np.float32))  # spare capacity past ntotal must stay hidden
    assert index.vectors(0, -1).shape == (11, 4) and index.vectors(0, 100).shape == (12, 4)
    assert index.vectors(-3)[:, 0].tolist() == [1.0, 2.0, 2.0]
    assert index.vectors(5, 2).shape == (0, 4)


@pytest.mark.parametrize("metric,threshold", [("cosine", 0.2), ("dot", 3.0), ("l2", 7.5)])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_range_search_vs_float64(metric, threshold, dtype):
    x = make_rows(700, 24, zero=(5,), dup=((1, 2),))
    q = torch.cat([make_rows(9, 24, seed=4), x[1:2]])
    lims, s, ids = Index(x, metric=metric, dtype=dtype).range_search(q, threshold)
    v, key = reference(x, q, metric)
    for r in range(q.shape[0]):
        row = v[r]
        hit = (row <= threshold) if metric == "l2" else (row >= threshold)
        hit &= ~torch.isnan(row)
        want = torch.nonzero(hit).flatten()
        order = torch.sort(torch.where(hit, key[r], torch.full_like(key[r], -math.inf))[want],
                           descending=True, stable=True).indices
        got = ids[lims[r]:lims[r + 1]]
        assert got.tolist() == want[order].tolist()
        assert torch.allclose(s[lims[r]:lims[r + 1]].double(), row[want[order]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_a_float32_score_fed_back_as_threshold_lists_its_row(metric):
    """A float32 threshold (a score search returned, as a 0-d tensor, numpy.float32 or a
    one-element array) is compared with the values rounded to float32, as they are returned: the
    row it came from is listed (compared in float64, it had been left out about half the time)
    and every listed score passes it; a Python float keeps the float64 rule."""
    from embgeom.validation import float32_test_threshold

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    index = Index(x, metric=metric)
    s32, ids = index.search(q, 3)
    for r in range(20):
        for thr in (s32[r, 2], s32[r, 2].numpy(), np.float32(s32[r, 2]), s32[r, 2:3]):
            lims, s, got = index.range_search(q[r:r + 1], thr)
            assert int(ids[r, 2]) in got.tolist()
            passes = (s <= s32[r, 2]) if metric == "l2" else (s >= s32[r, 2])
            assert bool(passes.all())
        # exactly the rows whose float32 score passes: those of the float64 rule at a lower
        # threshold, filtered by their float32 rounding
        wide = float(s32[r, 2]) + (1e-3 if metric == "l2" else -1e-3)
        _, v64, cand = index.range_search(q[r:r + 1], wide, float64=True)
        v32 = v64.numpy().astype(np.float32)
        want = cand.numpy()[(v32 <= s32[r, 2].numpy()) if metric == "l2" else (v32 >= s32[r, 2].numpy())]
        assert sorted(index.range_search(q[r:r + 1], s32[r, 2])[2].tolist()) == sorted(want.tolist())
    # the float64 test threshold: the float32 rounding decides at and around the midpoints
    for t in (np.float32(0.75), np.float32(1.0000001), np.float32(-0.3), np.float32(3.0)):
        for below in (False, True):
            t64 = float32_test_threshold(float(t), below)
            outward = -np.inf if not below else np.inf    # one double past t64, away from t
            assert np.float32(t64) == t                   # t64 itself rounds to t: kept
            past = np.float32(np.nextafter(t64, outward))
            assert (past < t) if not below else (past > t)  # the next double does not


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_float32_score_fed_back_passes_every_threshold_taking_one(metric, tmp_path):
    """The float32 rule of range_search holds wherever a threshold is taken: pairs_above,
    search_stored(floor=) and communities list the pair whose returned score is the threshold
    (compared in float64 they had dropped it in about half the cases)."""
    from embgeom import communities, read_pairs

    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 6)).astype(np.float32)
    index = Index(x, metric=metric)
    s32, ids = index.search(x[:12], 2)   # column 1: each row's nearest other row
    for r in range(12):
        score, j = s32[r, 1], int(ids[r, 1])
        for form, thr in enumerate((score, score.numpy(), np.float32(score))):
            index.pairs_above(thr, tmp_path / f"p{r}_{form}")
            pi, pj, _ = read_pairs(tmp_path / f"p{r}_{form}")
            assert (min(r, j), max(r, j)) in set(zip(pi.tolist(), pj.tolist()))
            if metric == "cosine":
                _, got = index.search_stored(2, floor=thr)
                assert j in got[r].tolist()
    # communities: the best pair's score as the threshold, communities of 2: its pair is one
    s32, ids = Index(x).search(x, 2)
    best = int(torch.argmax(s32[:, 1]))
    got = communities(x, s32[best, 1], 2)
    assert sorted([best, int(ids[best, 1])]) in [sorted(c) for c in got]


def test_add_continues_ids_and_matches_one_index():
    x = make_rows(900, 16, seed=5)
    whole = Index(x)
    parts = Index(x[:100])
    for a in range(100, 900, 200):
        parts.add(x[a:a + 200])
    assert parts.ntotal == 900
    q = make_rows(6, 16, seed=6)
    for got, want in zip(parts.search(q, 9), whole.search(q, 9)):
        assert torch.equal(got, want)


def test_a_loaded_index_holds_one_file_descriptor(tmp_path):
    """Its arrays are views of one mapping of the file (a mapping per array had held 2 fds a
    float32 index, 3 a bf16 one: a process holding a few hundred reached the usual 1,024)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd here")
    Index(make_rows(500, 16, seed=11), dtype=torch.bfloat16).save(tmp_path / "a.index")
    before = len(os.listdir("/proc/self/fd"))
    held = [Index.load(tmp_path / "a.index") for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) - before == 5
    assert held[0].search(make_rows(2, 16, seed=12), 3)[1].shape == (2, 3)


def test_add_lets_the_old_snapshot_go(tmp_path):
    """What a search kept for the rows before an add (the engine's packed copy, a loaded file's
    mappings) is released by the add, not by a later search of 5 or more queries: a service
    that adds rows and answers single queries had held the old copy for good."""
    import gc
    import weakref

    x = make_rows(3000, 16, seed=7)
    Index(x).save(tmp_path / "old.index")
    index = Index.load(tmp_path / "old.index")
    index.search(make_rows(300, 16, seed=8), 5)  # the engine path: packed columns kept
    old = weakref.ref(index._store.rows)
    index.add(make_rows(10, 16, seed=9))
    index.search(make_rows(1, 16, seed=10), 5)   # one query: the scan
    gc.collect()
    assert old() is None
    (tmp_path / "old.index").unlink()
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert "old.index (deleted)" not in maps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adds_under_inference_mode_leave_the_index_growable(dtype):
    # buffers grown under torch.inference_mode had been inference tensors: every later add
    # outside it raised "Inplace update to inference tensor outside InferenceMode"
    x = make_rows(700, 16, seed=7)
    with torch.inference_mode():
        built_inside = Index(x[:100], dtype=dtype)
        built_inside.add(x[100:110])   # grown to 150 rows: 40 spare
    grown = Index(x[:100], dtype=dtype)
    with torch.inference_mode():
        grown.add(x[100:110])
    for index in (built_inside, grown):
        index.add(x[110:140])   # in place into the spare rows
        for a in range(140, 700, 80):   # grown again
            index.add(x[a:a + 80])
        assert index.ntotal == 700
        q = make_rows(5, 16, seed=8)
        for got, want in zip(index.search(q, 7), Index(x, dtype=dtype).search(q, 7)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 8])
def test_dot_queries_past_bf16s_largest_keep_exact_ids(dtype, queries):
    # a value rounding past bf16's largest finite one (3.3961e38) had become inf in the bf16
    # scan: inf * 0 = NaN scores, ids -1 (bf16 index, one query, every CPU path; a float32 index's
    # bf16 filter from 5 queries on AVX-512 bf16 hosts); (a corpus so large is refused: its rows
    # meet each other in pairs_above)
    corpus = np.array([[1e-10, 0.0], [2e-10, 1e-10], [-1e-10, 3e-10], [0.0, -2e-10]], np.float32)
    q = np.resize(np.array([[3.4e38, 0.0], [-3.39e38, 1e38], [3.4028e38, -3.4e38]], np.float32), (queries, 2))
    want = torch.from_numpy(q.astype(np.float64) @ corpus.astype(np.float64).T)
    index = Index(torch.from_numpy(corpus), metric="dot", dtype=dtype)
    for _ in range(2):
        scores, ids = index.search(torch.from_numpy(q), corpus.shape[0])
        assert torch.isfinite(scores).all()
        for r in range(queries):
            order = sorted(range(corpus.shape[0]), key=lambda j: (-float(want[r, j]), j))
            assert ids[r].tolist() == order


def test_corpus_is_copied():
    x = make_rows(30, 8)
    index = Index(x)
    before = index.search(x[:2], 3)
    x.mul_(-1)
    assert all(torch.equal(a, b) for a, b in zip(index.search(-x[:2], 3), before))


def test_copy_false_reads_the_callers_rows():
    x = make_rows(30, 8)
    shared = Index(x, copy=False)
    assert shared.vectors().data_ptr() == x.data_ptr()
    assert Index(x).vectors().data_ptr() != x.data_ptr()
    assert Index(x.double(), copy=False).vectors().dtype == torch.float32  # converted: a copy anyway


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_save_load_roundtrip(tmp_path, metric, dtype):
    x = make_rows(300, 20, zero=(3,))
    index = Index(x, metric=metric, dtype=dtype)
    path = tmp_path / "corpus.index"
    index.save(path)
    loaded = Index.load(path)
    assert (loaded.metric, loaded.dtype, loaded.ntotal, loaded.d) == (metric, dtype, 300, 20)
    q = make_rows(5, 20, seed=7)
    for got, want in zip(loaded.search(q, 8), index.search(q, 8)):
        assert torch.equal(got, want)
    for got, want in zip(loaded.search(q[:1], 8), index.search(q[:1], 8)):  # the few-query scans
        assert torch.equal(got, want)
    loaded.add(x[:10])  # a loaded (memory-mapped) index grows into its own buffers
    assert loaded.ntotal == 310 and Index.load(path).ntotal == 300
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_load_refuses_bad_files(tmp_path):
    index = Index(make_rows(40, 8))
    path = tmp_path / "a.index"
    index.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.index").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        Index.load(tmp_path / "trunc.index")
    flipped = bytearray(data)
    flipped[4096 + 10] ^= 0xFF  # a byte of the rows (the header takes the first page)
    (tmp_path / "flip.index").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="damaged"):
        Index.load(tmp_path / "flip.index")
    Index.load(tmp_path / "flip.index", verify=False)  # the caller's choice
    # a folder, a link in a loop, nothing: said as what they are (all had read "no index file")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for where, said in ((tmp_path, "is a folder, not an index file"),
                        (tmp_path / "loop", "is a link that leads nowhere (or in a loop)"),
                        (tmp_path / "none.index", "no index file at")):
        with pytest.raises(ValueError, match=f"^path: .*{re.escape(said)}"):
            Index.load(where)
    # the header's metric edited (same length, so every offset holds): the sha256 covers it
    edited = data.replace(b'"metric": "cosine"', b'"metric": "l2"    ', 1)
    assert edited != data and len(edited) == len(data)
    (tmp_path / "metric.index").write_bytes(edited.replace(b'"metric": "l2"    ', b'"metric": "dot"   ', 1))
    with pytest.raises(ValueError, match="damaged .the header's metric, dtype and shape"):
        Index.load(tmp_path / "metric.index")
    # a header nested past the JSON parser's depth: one line, not a RecursionError
    (tmp_path / "deep.index").write_bytes(b"EMBGEOM-INDEX2\n" + b"[" * 50000 + b"\n")
    with pytest.raises(ValueError, match="damaged header line"):
        Index.load(tmp_path / "deep.index")
    (tmp_path / "old.index").write_bytes(b"EMBGEOM-INDEX1\n{}\n")
    with pytest.raises(ValueError, match="another format version"):
        Index.load(tmp_path / "old.index")
    (tmp_path / "other.index").write_bytes(b"EMBGEOM-INDEX9\n{}\n")
    with pytest.raises(ValueError, match="another format version"):
        Index.load(tmp_path / "other.index")
    (tmp_path / "junk.index").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not an embgeom index file"):
        Index.load(tmp_path / "junk.index")
    with pytest.raises(ValueError, match="no index file"):
        Index.load(tmp_path / "missing.index")
    with pytest.raises(ValueError, match="no such folder"):
        index.save(tmp_path / "nope" / "a.index")


def _recrafted(path, change) -> bytes:
    """The index file at path with its arrays changed by change(arrays) and its sha256
    recomputed, as a crafted file would be (the hash alone finds damage, not intent)."""
    import json

    from embgeom.index import DATA_ALIGN, _file_digest, _raw_bytes

    data = bytearray(path.read_bytes())
    first = data.index(b"\n") + 1
    end = data.index(b"\n", first) + 1
    header = json.loads(data[first:end])
    base = end + (-end % DATA_ALIGN)
    arrays = {}
    for name, spec in header["arrays"].items():
        count = int(np.prod(spec["shape"]))
        arrays[name] = np.frombuffer(data, spec["dtype"], count, base + spec["offset"]).reshape(spec["shape"])
    arrays = {k: v.copy() for k, v in arrays.items()}
    change(arrays)
    h = _file_digest(header)
    for name, spec in header["arrays"].items():
        raw = _raw_bytes(np.ascontiguousarray(arrays[name]))
        data[base + spec["offset"]:base + spec["offset"] + len(raw)] = raw
        h.update(raw)
    line = data[first:end].replace(header["sha256"].encode(), h.hexdigest().encode())
    return bytes(data[:first] + line + data[end:])


@pytest.mark.parametrize("change, match", [
    (lambda a: a["rows"].__setitem__((3, 2), np.nan), r"rows: NaN or Inf in 1 row\(s\): \[3\]"),
    (lambda a: a["norms"].__setitem__(5, a["norms"][5] * 2), "stored norms are not the rows' norms"),
    # a row the scan cannot take, its norm made to match
    (lambda a: (a["rows"].__setitem__(7, 1e37), a["norms"].__setitem__(7, np.linalg.norm(a["rows"][7].astype(float)))),
     "norms outside"),
])
def test_load_refuses_crafted_files_with_their_hash_recomputed(tmp_path, change, match):
    path = tmp_path / "a.index"
    Index(make_rows(40, 8)).save(path)
    crafted = tmp_path / "crafted.index"
    crafted.write_bytes(_recrafted(path, lambda a: None))
    Index.load(crafted)  # unchanged arrays, the hash as saved: loads
    crafted.write_bytes(_recrafted(path, change))
    with pytest.raises(ValueError, match=match):
        Index.load(crafted)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("value", [np.nan, np.inf, 3e38, 0.0])
def test_load_refuses_crafted_bf16_scan_rows(tmp_path, metric, value):
    """A bf16 index's scan rows are checked against its rows: a NaN there had dropped the query's
    own row from search and range_search (their rounding bound NaN) without an error."""
    import torch

    path = tmp_path / "a.index"
    rows = make_rows(50, 8)
    Index(rows, metric=metric, dtype=torch.bfloat16).save(path)
    crafted = tmp_path / "crafted.index"
    crafted.write_bytes(_recrafted(path, lambda a: None))
    assert Index.load(crafted).search(rows[:1], 1)[1].tolist() == [[0]] or metric != "cosine"
    as_bf16 = torch.tensor([value], dtype=torch.float32).bfloat16().view(torch.int16).item()
    crafted.write_bytes(_recrafted(path, lambda a: a["scan"].__setitem__((0, 0), as_bf16)))
    with pytest.raises(ValueError, match="scan rows are not the rows' own"):
        Index.load(crafted)


def test_load_names_the_file_of_a_header_holding_a_huge_integer(tmp_path):
    path = tmp_path / "a.index"
    Index(make_rows(4, 3)).save(path)
    data = path.read_bytes()
    first = data.index(b"\n") + 1
    end = data.index(b"\n", first)
    path.write_bytes(data[:first] + b'{"n": ' + b"1" * 5000 + b"}" + data[end:])
    with pytest.raises(ValueError, match="has a damaged header line"):
        Index.load(path)


@pytest.mark.parametrize("verify", [True, False])
def test_load_reads_one_file_while_a_save_replaces_it(tmp_path, monkeypatch, verify):
    # a save renaming a new file over the path between the header's read and the arrays' maps had
    # given the old header with the new arrays (wrong lists with verify=False, "damaged" with it)
    import embgeom.index as index_module

    path, other = tmp_path / "live.index", tmp_path / "other.index"
    old = Index(make_rows(200, 16, seed=1))
    old.save(path)
    Index(make_rows(300, 16, seed=2)).save(other)
    real_mmap = index_module.mmap.mmap
    swapped = []

    def mmap_after_a_save(*args, **kwargs):
        if not swapped:
            os.replace(other, path)
            swapped.append(True)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(index_module.mmap, "mmap", mmap_after_a_save)
    loaded = Index.load(path, verify=verify)
    assert swapped and loaded.ntotal == 200
    q = make_rows(4, 16, seed=3)
    for got, want in zip(loaded.search(q, 5), old.search(q, 5)):
        assert torch.equal(got, want)


def test_reads_from_threads_while_adding():
    x = make_rows(3000, 16, seed=8)
    index = Index(x[:1000])
    q = make_rows(4, 16, seed=9)
    want = Index(x[:1000]).search(q, 5)
    errors = []

    def reader():
        for _ in range(20):
            v, i = index.search(q, 5)
            # rows added later may enter a result; what was there must stay consistent
            if not bool((i < index.ntotal).all()):
                errors.append("id beyond ntotal")
            if int(i.max()) < 1000 and not torch.equal(i, want[1]):
                errors.append("changed result")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for a in range(1000, 3000, 250):
        index.add(x[a:a + 250])
    for t in threads:
        t.join()
    assert not errors
    assert index.ntotal == 3000


def test_stored_reads_take_one_snapshot_while_adding(tmp_path):
    # an add() from another thread between two looks at the index (forced here inside the first):
    # search_stored had mixed the old rows as queries with the new rows searched, pairs_above had
    # written the old row count with the new rows' fingerprint (a folder nothing could resume)
    import json

    x = make_rows(300, 16, seed=10)
    want = Index(x[:200]).search_stored(4)
    index = Index(x[:200])

    def then_add(real):  # the method, then the add once
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            if index.ntotal == 200:
                index.add(x[200:])
            return out
        return wrapped

    index._queries, index.vectors = then_add(index._queries), then_add(index.vectors)
    for got, expected in zip(index.search_stored(4), want):
        assert torch.equal(got, expected)
    index = Index(x[:200])

    def fingerprint_after_add(st):
        index.add(x[200:])
        return Index._fingerprint(index, st)

    index._fingerprint = fingerprint_after_add
    index.pairs_above(0.5, tmp_path / "pairs")
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["n"] == 200 and manifest["fingerprint"] == Index(x[:200]).fingerprint()


def test_bad_input_names_the_argument():
    x = make_rows(10, 4)
    with pytest.raises(ValueError, match="metric"):
        Index(x, metric="manhattan")
    with pytest.raises(ValueError, match="dtype"):
        Index(x, dtype=torch.float16)
    with pytest.raises(ValueError, match="corpus"):
        Index(torch.zeros(3))
    with pytest.raises(TypeError, match="corpus"):
        Index(np.zeros((3, 2), np.int64))
    bad = x.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"corpus: NaN or Inf in 1 row\(s\): \[2\]"):
        Index(bad)
    index = Index(x)
    with pytest.raises(ValueError, match="queries: expected D = 4"):
        index.search(torch.zeros(2, 5), 1)
    with pytest.raises(ValueError, match="k: expected >= 1"):
        index.search(x, 0)
    with pytest.raises(TypeError, match="k: expected an int"):
        index.search(x, 2.5)
    with pytest.raises(ValueError, match=r"k: 10 queries x k = 10,000,000,000,000 results need about 1,490,116.1 GiB, "
                                         r".* GiB available; the index holds 10 rows"):
        index.search(x, 10**13)      # (the allocator's failure before)
    with pytest.raises(ValueError, match="more: expected D = 4"):
        index.add(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="threshold"):
        index.range_search(x, "high")
    with pytest.raises(ValueError, match="threshold: expected a distance >= 0"):
        Index(x, metric="l2").range_search(x, -1.0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("native", [False, True], ids=["no-bf16-dot", "bf16-dot"])
def test_bfloat16_index_few_queries_scan_bf16_rows(metric, native, monkeypatch):
    """A bf16 CPU index scans its bf16 rows with the C++ core's rows_dot_bf16 for up to
    BF16_ROWS_SCAN queries on every CPU path; beyond, its float32 rows where the CPU path has no
    bf16 dot (EMBGEOM_CPU=avx2, AVX2 hosts: torch would emulate bf16), else the bf16 product: the
    same answers as float64, search and range search, and the same as the other scan."""
    x = make_rows(1500, 40, zero=(0,), dup=((3, 7),))
    q = make_rows(40, 40, seed=3)
    q[2] = x[7]
    index = Index(x, metric=metric, dtype=torch.bfloat16)
    monkeypatch.setattr(index_module, "native_bf16", lambda: native)
    calls = []
    kernel = index_module._rows_dot(torch.bfloat16)
    if kernel is not None:
        # the scan of bf16 rows: rows_dot_bf16 (range search), or few_search given them (search)
        real = index_module._rows_dot
        monkeypatch.setattr(index_module, "_rows_dot",
                            lambda dt: (lambda *a: calls.append(1) or kernel(*a)) if dt == torch.bfloat16 else real(dt))
        real_cpp = registry.cpp_kernel

        def cpp_kernel(name, *tensors):
            f = real_cpp(name, *tensors)
            if name != "few_search" or f is None:
                return f
            return lambda qs, rows, *rest: (rows.dtype == np.int16 and calls.append(1)) or f(qs, rows, *rest)

        monkeypatch.setattr(registry, "cpp_kernel", cpp_kernel)
    want_v, want_i = ref_topk(x, q, 9, metric)
    many_v, many_i = index.search(q, 9)
    assert not calls  # 40 queries: the float32 rows
    assert_same_neighbours(many_v, many_i, want_v, want_i)
    for rows in (slice(0, 1), slice(1, 3), slice(2, 2 + index_module.BF16_ROWS_SCAN)):
        got_v, got_i = index.search(q[rows], 9)
        assert torch.equal(got_i, many_i[rows]) and torch.equal(got_v, many_v[rows])
    assert bool(calls) == (kernel is not None)
    t = {"cosine": 0.2, "dot": 2.0, "l2": 8.0}[metric]
    lims, v, i = index.range_search(q[2:3], t)
    lims_all, v_all, i_all = index.range_search(q, t)
    assert torch.equal(i, i_all[lims_all[2]:lims_all[3]]) and torch.equal(v, v_all[lims_all[2]:lims_all[3]])


@pytest.mark.parametrize("metric", METRICS)
def test_bf16_scan_rows_same_as_torch(metric, monkeypatch):
    """A bf16 index's scan rows and their rounding from the C++ core (bf16_scan_rows) equal the
    torch path's: the same bits (float64 products rounded to float32, then to bf16), the rounding
    to float64 summation order; zero rows, odd widths, tiny and large scales, one row, no rows, a
    loaded index (the scan read, not made) and added rows."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(11)
    for n, d, scale in ((700, 387, 1.0), (50, 1, 1e-20), (33, 17, 3e15), (1, 8, 1.0), (0, 5, 1.0)):
        x = torch.from_numpy((rng.standard_normal((n, d)) * scale).astype(np.float32))
        if n > 3:
            x[3] = 0
            x[n - 1] = x[0]
        if metric != "cosine":
            x = x / scale  # dot and l2 refuse products beyond float32's range or below its normals
        made = Index(x, metric=metric, dtype=torch.bfloat16)._store
        with monkeypatch.context() as m:
            m.setattr(core, "bf16_scan_rows", None, raising=False)  # cpp_kernel finds no kernel: torch
            want = Index(x, metric=metric, dtype=torch.bfloat16)._store
        assert torch.equal(made.scan[:n].view(torch.int16), want.scan[:n].view(torch.int16)), (n, d, scale)
        assert made.scan_delta == pytest.approx(want.scan_delta, rel=1e-14, abs=0)
        if n and d > 1:  # (width 1 under cosine: every unit row is +-1, exact in bf16)
            assert made.scan_delta > 0
    rows = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="out: expected a writable C-contiguous"):
        core.bf16_scan_rows(rows, None, None, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="scale, norm: expected"):
        core.bf16_scan_rows(rows, np.ones(3), None, np.zeros((2, 3), np.int16))


def test_core_scores_topk():
    """_C.scores_topk: the k largest of each row, largest first, equal values by column (the
    stable order of a descending sort), NaN as -inf, -inf / -1 past a row's length; ties across
    the running k-th best, blocks of 8 and their tails."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(3)
    for Q, N, k in ((1, 100_000, 14), (3, 37, 5), (2, 8, 8), (1, 5, 9), (2, 0, 3), (0, 6, 2), (2, 9, 0)):
        s = rng.integers(-3, 4, size=(Q, N)).astype(np.float32)  # many ties
        if N > 4:
            s[:, 1], s[:, 3] = np.nan, -np.inf
        vals, cols = core.scores_topk(s, k)
        assert vals.shape == (Q, k) and cols.shape == (Q, k) and cols.dtype == np.int64
        for q in range(Q):
            key = np.where(np.isnan(s[q]), -np.inf, s[q])
            want = np.argsort(-key, kind="stable")[:k]
            m = len(want)
            assert cols[q, :m].tolist() == want.tolist(), (Q, N, k, q)
            assert np.array_equal(vals[q, :m], key[want])
            assert (cols[q, m:] == -1).all() and (vals[q, m:] == -np.inf).all()


def test_bf16_scan_of_loaded_and_grown_index(tmp_path):
    x = make_rows(300, 24, seed=4, zero=(7,))
    index = Index(x[:200], dtype=torch.bfloat16)
    index.add(x[200:])
    whole = Index(x, dtype=torch.bfloat16)
    assert torch.equal(index._store.scan[:300].view(torch.int16), whole._store.scan.view(torch.int16))
    assert index._store.scan_delta == whole._store.scan_delta
    whole.save(tmp_path / "i.bin")
    loaded = Index.load(tmp_path / "i.bin")
    assert loaded._store.scan_delta == whole._store.scan_delta


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_core_rows_dot(dtype, monkeypatch):
    """_C.rows_dot_bf16 / rows_dot_f32: float32 queries times bf16 or float32 rows within the
    float32 summation bound of the float64 products, on every vector level, for odd widths (tails
    of 16 and 8), one row, no rows, no queries, query counts across its groups of four, rows with
    a stride, and more rows than one cache block (the 1,100 rows of width 387)."""
    core = pytest.importorskip("embgeom._C")
    rng = np.random.default_rng(5)
    levels = ["generic"] + (["avx2"] if core.cpu_info()["isa"] in ("avx2", "avx512") else [])
    kernel = core.rows_dot_bf16 if dtype == "bfloat16" else core.rows_dot_f32
    for d in (1, 7, 8, 15, 16, 17, 33, 387):
        wide = torch.from_numpy(rng.standard_normal((1100, d + 5))).to(getattr(torch, dtype))
        rows = wide[:, :d]                                              # row stride d + 5
        bits = rows.view(torch.int16).numpy() if dtype == "bfloat16" else rows.numpy()
        for Q in (0, 1, 3, 4, 6):
            q = rng.standard_normal((Q, d)).astype(np.float32)
            want = q.astype(np.float64) @ rows.double().numpy().T
            bound = (d + 2) * 2.0 ** -24 * (np.abs(q).astype(np.float64) @ np.abs(rows.double().numpy()).T)
            for level in levels:
                monkeypatch.setenv("EMBGEOM_CPU", level)
                got = kernel(q, bits)
                assert got.shape == (Q, 1100) and got.dtype == np.float32
                assert np.all(np.abs(got - want) <= bound + 1e-30), (d, Q, level)
                assert np.array_equal(kernel(q, bits[5:6]), got[:, 5:6])
                assert kernel(q, bits[:0]).shape == (Q, 0)
    monkeypatch.delenv("EMBGEOM_CPU")
    with pytest.raises(ValueError, match="rows: expected 4 columns"):
        kernel(np.zeros((1, 4), np.float32), np.zeros((2, 5), bits.dtype))
    # rows of the other kind are refused, not converted (float32 values read as bf16 had given NaN)
    other = np.zeros((2, 4), np.float32 if dtype == "bfloat16" else np.int16)
    with pytest.raises(ValueError, match="rows: expected .*, got dtype"):
        kernel(np.zeros((1, 4), np.float32), other)
    # an equivalent dtype object (metadata, '=' order) is the same kind: taken
    same = bits[:3].view(np.dtype(bits.dtype.str, metadata={"k": 1}))
    assert np.array_equal(kernel(q, same), kernel(q, bits[:3]))


def test_native_bf16_follows_the_core_dispatch(monkeypatch):
    """native_bf16 asks the core on every call, as a new engine reads EMBGEOM_CPU and
    EMBGEOM_GEMM: no bf16 product at the AVX2 level or with an fp32 product forced."""
    core = pytest.importorskip("embgeom._C")
    assert index_module.native_bf16() == core.cpu_info()["gemm_fast_bf16"]
    monkeypatch.setenv("EMBGEOM_CPU", "avx2")
    assert not index_module.native_bf16() and not core.cpu_info()["gemm_fast_bf16"]
    monkeypatch.delenv("EMBGEOM_CPU")
    monkeypatch.setenv("EMBGEOM_GEMM", "scalar")
    assert not index_module.native_bf16()


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_float32_engine_search_filters_by_bf16_where_it_can(metric, monkeypatch):
    """Where the engine has a bf16 product (native_bf16) a float32 index's engine search runs
    fast mode, whose lists hold exact mode's ids and fp32 values: the same answers as exact
    mode's engine and as float64 (equal rows tie to the smaller id)."""
    x = make_rows(700, 40, zero=(0,), dup=((3, 7),))
    x[20] = x[21] = x[22]
    q = make_rows(40, 40, seed=3)
    q[4] = x[20]
    monkeypatch.setattr(index_module, "ENGINE_PREPARE_QUERIES", 1)
    out = {}
    for native in (False, True):
        monkeypatch.setattr(index_module, "native_bf16", lambda native=native: native)
        index = Index(x, metric=metric)
        out[native] = index.search(q, 9)
        assert index._columns[1] == ("fast" if native else "exact")
    assert torch.equal(out[True][1], out[False][1])
    assert torch.equal(out[True][0].nan_to_num(7), out[False][0].nan_to_num(7))
    assert_same_neighbours(*out[True], *ref_topk(x, q, 9, metric))
    assert out[True][1][4, :3].tolist() == [20, 21, 22]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_many_queries_take_candidates_from_the_engine(metric, dtype, monkeypatch):
    """From ENGINE_BATCH queries a float32 cosine / dot search takes its candidates from the C++
    engine's per-row lists: the same ids and values as the torch scan, and as float64. The
    engine's prepared rows are made by a second search, or a first one bringing
    ENGINE_PREPARE_QUERIES queries: a first search with fewer scans (the same answers)."""
    x = make_rows(700, 40, zero=(0, 5), dup=((3, 7), (11, 699)))
    q = make_rows(index_module.ENGINE_BATCH + 3, 40, seed=3)
    q[1] = x[7]
    q[2] = 0  # a zero query: no neighbours under cosine
    x[20] = x[21] = x[22] = x[23]  # equal rows: ties to the smaller id
    q[4] = x[20]
    index = Index(x, metric=metric, dtype=dtype)
    taken = []
    original = Index._engine_candidates

    def spy(self, *args):
        taken.append(original(self, *args))
        return taken[-1]

    monkeypatch.setattr(Index, "_engine_candidates", spy)
    first_v, first_i = index.search(q, 9)
    assert taken == [None] and index._columns is None  # a first search with few queries: the scan
    got_v, got_i = index.search(q, 9)
    assert taken[1] is not None  # then the engine gave the candidates
    assert torch.equal(first_i, got_i) and torch.equal(first_v.nan_to_num(7), got_v.nan_to_num(7))
    many = Index(x, metric=metric, dtype=dtype)  # enough queries: the engine from the first search
    monkeypatch.setattr(index_module, "ENGINE_PREPARE_QUERIES", q.shape[0])
    taken.clear()
    assert torch.equal(many.search(q, 9)[1], got_i) and taken[0] is not None
    monkeypatch.setattr(index_module, "ENGINE_PREPARE_QUERIES", 256)
    monkeypatch.setattr(index_module, "ENGINE_BATCH", 10 ** 9)  # the torch scan
    monkeypatch.setattr(index_module, "ENGINE_BATCH_BF16", 10 ** 9)
    torch_v, torch_i = index.search(q, 9)
    assert torch.equal(got_i, torch_i) and torch.equal(got_v.nan_to_num(7), torch_v.nan_to_num(7))
    want_v, want_i = ref_topk(x, q, 9, metric)
    assert_same_neighbours(got_v, got_i, want_v, want_i)
    assert got_i[4, :4].tolist() == [20, 21, 22, 23]
    monkeypatch.setattr(index_module, "ENGINE_BATCH", 2)
    monkeypatch.setattr(index_module, "ENGINE_BATCH_BF16", 1)
    # one query: the engine only for a bf16 scan (a CPU with bf16 dot), the same neighbours
    taken.clear()
    one_v, one_i = index.search(q[4:5], 9)
    assert (bool(taken) and taken[0] is not None) == (index._scan_dtype() == torch.bfloat16)  # (or _search_few)
    assert torch.equal(one_i, got_i[4:5]) and torch.equal(one_v, got_v[4:5])
    # the prepared rows follow the product kernel (EMBGEOM_CPU read per run) and the rows
    monkeypatch.setenv("EMBGEOM_CPU", "avx2")
    v2, i2 = index.search(q, 9)
    assert torch.equal(i2, got_i)
    index.add(x[:50])
    v3, i3 = index.search(q, 9)
    want_v, want_i = ref_topk(torch.cat([x, x[:50]]), q, 9, metric)
    assert_same_neighbours(v3, i3, want_v, want_i)
    import pickle
    assert torch.equal(pickle.loads(pickle.dumps(index)).search(q, 9)[1], i3)


def test_core_pair_values_fixed_order_and_exact():
    """_C.pair_values: float64 sums of float32 rows times float64 queries (dot, squared
    distance) equal to a float64 reference to 1e-12, each pair's value the same whether it comes
    alone, in a small batch or in a threaded one; indices out of range are refused."""
    core = pytest.importorskip("embgeom._C")
    import numpy as np

    rng = np.random.default_rng(3)
    rows = rng.standard_normal((500, 37)).astype(np.float32)
    q = rng.standard_normal((40, 37))
    P = 9000  # above the threaded size
    qi, ci = rng.integers(0, 40, P), rng.integers(0, 500, P)
    for sqdist in (False, True):
        got = core.pair_values(rows, q, qi, ci, sqdist)
        r64 = rows.astype(np.float64)[ci]
        want = ((r64 - q[qi]) ** 2).sum(1) if sqdist else (r64 * q[qi]).sum(1)
        assert np.allclose(got, want, rtol=1e-12, atol=1e-12)
        few = core.pair_values(rows, q, qi[:7], ci[:7], sqdist)
        one = [core.pair_values(rows, q, qi[k:k + 1], ci[k:k + 1], sqdist)[0] for k in range(7)]
        assert np.array_equal(few, got[:7]) and np.array_equal(one, got[:7])
        q32 = q.astype(np.float32)  # float32 queries are read as they are: the sums of their widening
        assert np.array_equal(core.pair_values(rows, q32, qi, ci, sqdist),
                              core.pair_values(rows, q32.astype(np.float64), qi, ci, sqdist))
    with pytest.raises(ValueError, match="outside"):
        core.pair_values(rows, q, np.array([0]), np.array([500]), False)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_search_stored_equals_search_of_the_rows(metric, dtype):
    """search_stored(k) == search(vectors(), k): the self-mode candidates (the row itself at its
    exact value) give the same ids and scores, with duplicates, equal rows and a zero row, for
    k below and above N."""
    x = make_rows(300, 20, zero=(4,), dup=((2, 250), (7, 8)))
    x[20] = x[21] = x[22]
    index = Index(x, metric=metric, dtype=dtype)
    for k in (1, 5, 40, 400):
        got_v, got_i = index.search_stored(k)
        want_v, want_i = index.search(index.vectors(), k)
        assert torch.equal(got_i, want_i)
        assert torch.equal(got_v.nan_to_num(7), want_v.nan_to_num(7))
        if k > 300:  # every row is found (the zero row has none under cosine): a NaN-padded
            # engine list once kept nothing when k exceeded its count (bf16 cosine)
            found = (want_i >= 0).sum(1)
            assert int(found[5]) == (299 if metric == "cosine" else 300)
    taken = index._stored_candidates(index._store, None, 21)
    # a bf16 index scans its float32 rows where the CPU path has no bf16 dot (_scan_dtype)
    engine_runs = metric != "l2" and index._scan_dtype() == torch.float32 and index._pairs_engine_applies()
    assert (taken is not None) == engine_runs


@pytest.mark.parametrize("metric", METRICS)
def test_lists_reach_past_groups_of_identical_rows(metric, monkeypatch):
    """Identical rows tie in every list holding one of them: a search with many queries lists
    past the largest group (_tie_group, zero rows not counted), so no row is scanned again
    (_best_of_scan); grouped or not, the answers equal float64 brute force (ties by id)."""
    x = make_rows(300, 20, zero=tuple(range(280, 300)))
    x[:270] = x[:30].repeat_interleave(9, 0)  # 30 groups of 9 identical rows
    grouped_index = Index(x, metric=metric)
    assert grouped_index._tie_group(grouped_index._store) == 9  # (not the 20 zero rows)
    x = x[:280]  # (a zero query ties with every row under dot and l2: rescanned)
    rescans = []
    collect = index_module.Index._best_of_scan
    monkeypatch.setattr(index_module.Index, "_best_of_scan",
                        lambda self, st, q, *a: rescans.append(q.shape[0]) or collect(self, st, q, *a))
    index = Index(x, metric=metric)
    q = torch.cat([x[:200], x[:200] + 0.01])
    want_v, want_i = ref_topk(x, q, 3, metric)
    for grouped in (True, False):
        monkeypatch.setattr(index_module, "TIE_GROUP_QUERIES", 50 if grouped else 10 ** 9)
        rescans.clear()
        got_v, got_i = index.search(q, 3)
        assert_same_neighbours(got_v, got_i, want_v, want_i)
        stored_v, stored_i = index.search_stored(3)
        assert torch.equal(stored_i, index.search(index.vectors(), 3)[1])
        assert (sum(rescans) == 0) == grouped, rescans


@pytest.mark.parametrize("metric", METRICS)
def test_rescoring_and_rescans_in_blocks(metric, monkeypatch):
    """A search whose candidates came from the engine rescores RESCORE_PAIRS pairs a block, and
    the queries scanned again (_best_of_scan, here every row of a group of 9 identical rows, lists of
    7) go a score block of queries at a time: with tiny blocks, the answers of the default ones
    and of float64 brute force."""
    x = make_rows(280, 20)
    x[:270] = x[:30].repeat_interleave(9, 0)
    monkeypatch.setattr(index_module, "TIE_GROUP_QUERIES", 10 ** 9)  # lists of k + 4: rescans
    index = Index(x, metric=metric)
    want_v, want_i = ref_topk(x, x, 3, metric)
    full_v, full_i = index.search_stored(3)
    monkeypatch.setattr(index_module, "SCORE_BLOCK_BYTES", 4 * 280 * 16)  # 16 queries a score block
    monkeypatch.setattr(index_module, "RESCORE_PAIRS", 700)  # 100 queries (lists of 7) a block
    rescans = []
    collect = index_module.Index._best_of_scan
    monkeypatch.setattr(index_module.Index, "_best_of_scan",
                        lambda self, st, q, *a: rescans.append(q.shape[0]) or collect(self, st, q, *a))
    got_v, got_i = index.search_stored(3)
    assert torch.equal(got_i, full_i) and torch.equal(got_v.nan_to_num(7), full_v.nan_to_num(7))
    assert_same_neighbours(got_v, got_i, want_v, want_i)
    assert max(rescans) <= 16 or (metric != "l2" and max(rescans) == 100), rescans  # (l2: a scan's blocks)
    assert len(rescans) > 280 // 16, rescans  # split into score blocks


@pytest.mark.parametrize("metric", METRICS)
def test_queries_prepared_in_blocks(metric, monkeypatch):
    """Queries are prepared QUERY_PREP_ROWS at a time: a search over several blocks (float64
    queries, a zero query, a duplicate) gives each query's own search, and leaves the caller's
    float64 rows as they were."""
    monkeypatch.setattr(index_module, "QUERY_PREP_ROWS", 7)
    index = Index(make_rows(200, 12, seed=4), metric=metric)
    q = make_rows(30, 12, seed=5, zero=(9,), dup=((3, 20),)).double()
    before = q.clone()
    got_v, got_i = index.search(q, 4)
    assert torch.equal(q, before)
    for r in (0, 3, 6, 7, 9, 20, 29):
        v, i = index.search(q[r:r + 1], 4)
        assert torch.equal(i[0], got_i[r]) and torch.equal(v[0].nan_to_num(7), got_v[r].nan_to_num(7))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_search_stored_floor_cuts_the_lists(metric, dtype):
    """search_stored(k, floor=f) == search_stored(k) with the scores below f cut (NaN, id -1):
    the engine's lists start at the floor's scan threshold, so rows whose exact score lies
    within the scan margin of f, duplicates, equal rows, a zero row and rows with nothing above
    f all come out as the cut lists; the scan path (a bf16 index) cuts the same way."""
    x = make_rows(300, 20, zero=(4,), dup=((2, 250), (7, 8)))
    x[:80] = x[1] + 0.6 * make_rows(80, 20, seed=3)
    x[20] = x[21] = x[22]
    index = Index(x, metric=metric, dtype=dtype)
    for k in (1, 12, 400):
        plain_v, plain_i = index.search_stored(k, float64=True)
        floor = float(plain_v[:80, min(k, 12) - 1].nanmedian())
        # a floor on a real score: exact ties at it stay in, the next float below is out
        for f in (floor, math.nextafter(floor, math.inf)):
            got_v, got_i = index.search_stored(k, float64=True, floor=f)
            below = ~(plain_v >= f)
            assert torch.equal(got_i, plain_i.masked_fill(below, -1))
            assert torch.equal(got_v.nan_to_num(7), plain_v.masked_fill(below, math.nan).nan_to_num(7))
        assert (got_i[100:] < 0).sum() > 0
    assert index.search_stored(3, floor=floor)[0].dtype == torch.float32
    with pytest.raises(ValueError, match="floor"):
        index.search_stored(3, floor=math.inf)
    with pytest.raises(ValueError, match="floor.*l2"):
        Index(x, metric="l2").search_stored(3, floor=0.5)


@pytest.mark.parametrize("metric", METRICS)
def test_stored_rows_margin_bounds_every_rows_margin(metric):
    """The scan margin of the stored rows as queries (the self-mode pair paths): with a float32
    scan it comes from the largest stored norm without a float64 pass over the corpus, and it
    is never below any single row's margin as _queries computes it (rows of very different
    norms, zero and duplicate rows)."""
    x = make_rows(700, 33, zero=(5,), dup=((1, 2),))
    x[10:20] *= 1e3
    x[30:40] *= 1e-4
    index = Index(x, metric=metric)
    st = index._store
    per_row = index._queries(st.rows[:st.n], st)[3]
    bound = index._stored_margin(st)
    assert bound >= float(per_row.max())
    assert bound <= float(per_row.max()) * (1 + 1e-6)  # and not looser than it needs to be


def test_stored_norms_are_float64_norms_of_the_float32_rows(monkeypatch):
    """The stored float64 norms (the C++ core's float64 sums on the CPU, torch's without it) are
    the float32 rows' norms to float64 rounding, zero rows 0, including rows whose squares would
    overflow or underflow in float32."""
    x = make_rows(300, 37, zero=(4,))
    x[7] *= 1e30
    x[8] *= 1e-30
    want = torch.linalg.vector_norm(x.double(), dim=1)
    got = Index(x)._store.norms[:300]
    torch.testing.assert_close(got, want, rtol=4e-16, atol=0)
    assert got[4] == 0
    from embgeom.backends import registry

    monkeypatch.setattr(registry, "cpp_kernel", lambda *a: None)  # torch's float64 norms
    torch.testing.assert_close(Index(x)._store.norms[:300], want, rtol=0, atol=0)


def test_a_shallow_copy_and_its_original_add_apart(tmp_path):
    """copy.copy shares the stored buffers: each side's add() had written the same spare rows,
    so the copy's added row was replaced by the original's; an index file whose line ends a
    text tool changed to CRLF is named so, not 'another format version' of the same name."""
    import copy

    a = Index(torch.eye(4)[:3].repeat(40, 1), metric="cosine")
    a.add(torch.eye(4)[:1])                                      # (buffers with spare rows from here)
    b = copy.copy(a)
    b.add(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    a.add(torch.tensor([[0.0, 0.0, 0.0, 7.0]]))
    assert torch.equal(b.vectors(121), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(a.vectors(121), torch.tensor([[0.0, 0.0, 0.0, 7.0]]))
    scores, ids = b.search(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), 1)
    assert float(scores[0, 0]) == 0.0                            # b holds no row along the 4th axis
    a.save(tmp_path / "a.index")
    raw = (tmp_path / "a.index").read_bytes()
    first = raw.index(b"\n")
    (tmp_path / "crlf.index").write_bytes(raw[:first] + b"\r" + raw[first:])
    with pytest.raises(ValueError, match=r"line ends were changed \(CRLF\)"):
        Index.load(tmp_path / "crlf.index")


FORKED_CHILDREN = r"""
import multiprocessing, os, sys
import numpy as np, torch, embgeom

x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
index = embgeom.Index(x)                       # the parent's OpenMP threads start here
want = index.search(x[:32], 10)[1]
stats = embgeom.pairwise_stats(torch.from_numpy(x[:500]))
near = embgeom.knn(torch.from_numpy(x), 5).indices if "faiss" in sys.argv else None


def child(_):
    same = torch.equal(index.search(x[:32], 10)[1], want)
    same &= embgeom.pairwise_stats(torch.from_numpy(x[:500])).count == stats.count
    if near is not None:
        same &= torch.equal(torch.as_tensor(embgeom.knn(torch.from_numpy(x), 5).indices), torch.as_tensor(near))
    return bool(same), torch.get_num_threads()


pid = os.fork()
if pid == 0:
    ok, threads = child(0)
    os._exit(0 if ok and threads == 1 else 3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
with multiprocessing.get_context("fork").Pool(2) as pool:
    assert pool.map(child, range(2), chunksize=1) == [(True, 1)] * 2
assert torch.get_num_threads() == 2
print("children ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"), reason="needs fork and /proc")
def test_forked_children_run_on_one_thread_instead_of_hanging(tmp_path):
    # GNU OpenMP (the core's and torch's runtime; FAISS has its own copy) cannot start threads in
    # a child forked after its pool started: os.fork and fork pools had hung forever
    import importlib.util
    import subprocess
    import sys

    script = tmp_path / "forks.py"
    script.write_text(FORKED_CHILDREN)
    args = ["faiss"] if importlib.util.find_spec("faiss") else []
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "children ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_grown_index_keeps_one_copy_and_pickles_its_rows_in_use(dtype):
    # a float32 index's scan is its rows: grown apart by an add they had held every row twice;
    # a pickle had carried the spare capacity of the last add (1.5x the rows)
    import pickle

    x = make_rows(2000, 32, seed=9)
    index = Index(x, dtype=dtype)
    before = len(pickle.dumps(index))
    index.add(make_rows(10, 32, seed=10))
    st = index._store
    assert st.rows.shape[0] > st.n
    if dtype == torch.float32:
        assert st.scan.data_ptr() == st.rows.data_ptr()
    assert len(pickle.dumps(index)) < before * 1.02
    back = pickle.loads(pickle.dumps(index))
    q = make_rows(4, 32, seed=11)
    for got, want in zip(back.search(q, 6), index.search(q, 6)):
        assert torch.equal(got, want)
    back.add(make_rows(700, 32, seed=12))
    index.add(make_rows(700, 32, seed=12))
    for got, want in zip(back.search(q, 6), index.search(q, 6)):
        assert torch.equal(got, want)


def test_range_search_past_memory_is_refused_naming_threshold(monkeypatch):
    """A threshold every pair passes, on more pairs than memory holds: a ValueError naming the
    threshold as the matches are found (it had run minutes, then failed in the allocator);
    communities, which searches through it, says the same."""
    import embgeom
    from embgeom.engine import limits

    x = make_rows(3000, 8, seed=3)
    index = Index(x)
    monkeypatch.setattr(Index, "RANGE_CANDIDATE_BYTES", 1 << 10)   # as if 3000 x 3000 pairs were large
    monkeypatch.setattr(limits, "memory_available", lambda: (1 << 30, "the machine has"))
    with pytest.raises(ValueError, match=r"^threshold: -1\.0 matches [\d,]+ or more of the 3,000 x 3,000 "
                                         r"\(query, row\) pairs; holding them needs [\d.]+ GiB, the machine has "
                                         r"1\.0 GiB available: raise the threshold"):
        index.range_search(x, -1.0)
    lims, _, _ = index.range_search(x[:10], -1.0)   # what fits still runs
    assert lims[-1] == 10 * 3000
    monkeypatch.setattr(Index, "_pairs_engine_applies", lambda self: False)   # the range search path
    with pytest.raises(ValueError, match="^threshold: -1.0 matches "):
        embgeom.communities(x, threshold=-1.0, min_community_size=2)
    # the candidate communities themselves, batch after batch (each batch's search fits)
    from embgeom import community_detection

    monkeypatch.setattr(Index, "RANGE_CANDIDATE_BYTES", 64)
    monkeypatch.setattr(limits, "memory_available", lambda: (200 << 20, "the machine has"))
    monkeypatch.setattr(community_detection, "_check_held", lambda held, n, t, m, real=community_detection._check_held:
                        real(held * 1000, n, t, m))   # as if each member were 1000
    with pytest.raises(ValueError, match=r"^threshold: -1.0 puts [\d,]+ or more members in the candidate "
                                         r"communities of 3,000 rows .* raise the threshold$"):
        embgeom.communities(x, threshold=-1.0, min_community_size=2, batch_size=100)


def test_a_search_counts_the_engines_candidate_lists(monkeypatch):
    """The memory check of a search counts the C++ engine's candidate lists of min(k, N) a
    query, not only the (Q, k) results: 500 queries x k = 100,000 had passed it at 0.75 GiB and
    aborted in the engine's threads."""
    from embgeom.engine import limits

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(limits, "memory_available", lambda: (512 << 20, "the machine has"))
    x = make_rows(3000, 8, seed=5)
    index = Index(x)
    with pytest.raises(ValueError, match=r"^k: 3,000 queries x k = 3,000 results need about 0\.9 GiB, the machine "
                                         r"has 0\.5 GiB available$"):
        index.search(x, 3000)
    assert index.search(x[:10], 3000)[1].shape == (10, 3000)


TORCH_STARTED_THE_POOL = """
import os, sys, faulthandler, torch, embgeom
a = torch.randn(600, 600); (a @ a).sum()              # torch alone starts the OpenMP pool
x = torch.randn(1500, 32)
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(60, exit=True)
    ok = embgeom.pairwise_stats(x, bins=10).count == 1500 * 1499 // 2 and torch.get_num_threads() == 1
    os._exit(0 if ok else 3)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc/self/task"), reason="needs fork and /proc")
def test_a_child_forked_after_torch_alone_started_the_pool_runs(tmp_path):
    # the one-thread hook was registered at the first call into the core: a parent that had only
    # imported embgeom and run torch forked children that hung in their first embgeom call
    import subprocess
    import sys

    script = tmp_path / "torch_first.py"
    script.write_text(TORCH_STARTED_THE_POOL)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0 and "child 0" in done.stdout, (done.stdout, done.stderr[-2000:])


FIRST_CALLS_AT_ONCE = """
import importlib, threading, time, torch, embgeom, embgeom.api
real = importlib.import_module
def slow(name, *a):   # the backends' imports made slow, as on a cold disk: the window made wide
    if name.startswith("embgeom.backends."):
        time.sleep(0.05)
    return real(name, *a)
importlib.import_module = slow
x = torch.randn(200, 16)
barrier, errors = threading.Barrier(6), []
def call():
    barrier.wait()
    try:
        embgeom.pairwise_stats(x, bins=10)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=call) for _ in range(6)]
[t.start() for t in threads]; [t.join() for t in threads]
print("failed", len(errors), errors[:1])
"""


def test_first_calls_from_several_threads_at_once_find_the_backends(tmp_path):
    # the registry marked itself done before the backends' imports had registered their ops: the
    # other threads' first calls said "no backend can run pairwise_stats"
    import subprocess
    import sys

    script = tmp_path / "first_calls.py"
    script.write_text(FIRST_CALLS_AT_ONCE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "failed 0 " in done.stdout, (done.stdout, done.stderr[-2000:])


def test_euclidean_and_l2_name_one_metric():
    """pairwise_stats and projections say 'euclidean', Index and pairs_above 'l2' (FAISS's word):
    each takes the other's spelling for the same distances and reports its own."""
    import embgeom

    x = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    a = Index(x, metric="euclidean")
    assert a.metric == "l2"
    s1, i1 = a.search(x[:5], 3)
    s2, i2 = Index(x, metric="l2").search(x[:5], 3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    p = embgeom.pairwise_stats(x, metric="l2", bins=10, range=(0.0, 10.0), row_topk=0)
    q = embgeom.pairwise_stats(x, metric="euclidean", bins=10, range=(0.0, 10.0), row_topk=0)
    assert p.metric == q.metric == "euclidean" and p.mean == q.mean
    with pytest.raises(ValueError, match="metric: expected one of 'cosine', 'dot', 'l2'"):
        Index(x, metric="manhattan")


def test_save_and_engine_checkpoints_refuse_what_the_cli_refuses(tmp_path):
    """Index.save and pairwise_stats(checkpoint=) check their path as the CLI's outputs do: a
    dangling link (its target had been created), a file inside a sealed pairs or report folder
    (a pairs folder's manifest had been replaced, losing its pairs) are refused before anything
    is written, no lock file included."""
    import embgeom

    x = make_rows(30, 8, seed=2)
    index = Index(x)
    index.pairs_above(0.5, tmp_path / "pairs")
    before = sorted(os.listdir(tmp_path / "pairs"))
    os.symlink(tmp_path / "missing" / "target", tmp_path / "dangling")
    for path in (tmp_path / "dangling", tmp_path / "pairs" / "manifest.json", tmp_path / "pairs" / "x.index"):
        with pytest.raises(ValueError, match=r"^path: "):
            index.save(path)
        with pytest.raises(ValueError, match=r"^checkpoint: "):
            embgeom.pairwise_stats(x, checkpoint=path)
    assert sorted(os.listdir(tmp_path / "pairs")) == before
    assert not os.path.lexists(tmp_path / "missing") and not os.path.lexists(tmp_path / "dangling.lock")
    embgeom.read_pairs(tmp_path / "pairs")


@pytest.mark.parametrize("metric", METRICS)
def test_queries_tied_with_every_row_are_rescored_a_block_at_a_time(metric, monkeypatch):
    """A query whose kept list ends in a tie with every row (all rows identical) gets its k
    smallest ids, rescored one score block at a time into a running list: the whole corpus is
    never gathered per query (200,000 identical rows had taken 6.8 GB for 512 queries)."""
    x = make_rows(1, 12).repeat(10000, 1)
    index = Index(x, metric=metric)
    monkeypatch.setattr(index_module, "SCORE_BLOCK_BYTES", 4 * 40 * 500)   # blocks of 4,096 rows
    widths = []
    exact = index_module.Index._exact
    monkeypatch.setattr(index_module.Index, "_exact",
                        lambda self, st, q, ids: widths.append(ids.shape[1]) or exact(self, st, q, ids))
    v, i = index.search(x[:40], 5)
    assert (i == torch.arange(5)).all() and torch.isfinite(v).all()
    assert max(widths) <= 4096 + 5, widths
