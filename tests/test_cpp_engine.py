"""embgeom._C.PairwiseEngine against a brute-force float64 numpy computation.

fp32 kernel values differ from the float64 reference by rounding, so every comparison is
tolerance-aware: a count near a bin edge or threshold must lie between the number of values
safely inside and the number possibly inside, and top lists must contain every reference pair
clearly beyond the k-th value. Invariance checks (block, threads, resume, fast vs exact lists)
compare exactly.
"""
import math

import numpy as np
import pytest
from helpers import blas_products, pair_tolerance

from embgeom.backends.cpp import binding_options
from embgeom.engine.config import DEFAULTS

_C = pytest.importorskip("embgeom._C")
if not hasattr(_C, "PairwiseEngine"):
    pytest.skip("embgeom._C built without PairwiseEngine", allow_module_level=True)

# every test once per vector level this host supports (EMBGEOM_CPU, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_cap")

OPTS = dict(bins=40, lo=-1.0, hi=1.0, topk=6, bottomk=5, near=0.1, near_k=4, row_topk=3,
            row_bottomk=2, outside=(-0.25, 0.3), outside_limit=9)


def make_x(n, d, seed=0, zero_rows=(), dup=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    for r in zero_rows:
        if r < n:
            x[r] = 0
    for a, b in dup:
        if a < n and b < n:
            x[b] = x[a]
    return x


def engine_args(**kw):
    """Every keyword of _C.PairwiseEngine (the binding has no defaults): the config's defaults,
    one OpenMP default thread count, no moment shift, then kw."""
    return {**binding_options(DEFAULTS), **kw}


def run_engine(x, y=None, chunks=1, **kw):
    e = _C.PairwiseEngine(x, y, **engine_args(**kw))
    t = e.num_tiles()
    cuts = np.linspace(0, t, chunks + 1).astype(int)
    for a, b in zip(cuts[:-1], cuts[1:]):
        e.run(int(a), int(b))
    return e.state()


def reference(x, y, metric):
    """Float64 matrix of values, validity mask of pairs, valid rows of x and of y."""
    xd = x.astype(np.float64)
    yd = xd if y is None else y.astype(np.float64)
    nx, ny = np.linalg.norm(xd, axis=1), np.linalg.norm(yd, axis=1)
    okx, oky = np.ones(len(xd), bool), np.ones(len(yd), bool)
    if metric == "cosine":
        okx, oky = nx > 0, ny > 0
        xn = xd / np.where(okx, nx, 1)[:, None]
        yn = yd / np.where(oky, ny, 1)[:, None]
        v = np.clip(xn @ yn.T, -1, 1)
    elif metric == "dot":
        v = xd @ yd.T
    else:
        d2 = (nx ** 2)[:, None] + (ny ** 2)[None, :] - 2 * (xd @ yd.T)
        v = np.sqrt(np.maximum(d2, 0))
    valid = okx[:, None] & oky[None, :]
    if y is None:
        valid &= np.triu(np.ones_like(valid), 1)
    return v, valid, okx, oky


def check_against_reference(s, x, y, metric, opts, extra_tol=0.0):
    v, valid, okx, oky = reference(x, y, metric)
    tol = pair_tolerance(x, y, metric).numpy() + extra_tol
    I, J = np.nonzero(valid)
    vals, tv = v[I, J], tol[I, J]
    assert s["count"] == vals.size
    assert list(s["excluded_rows"]) == list(np.nonzero(~okx)[0])
    if y is not None:
        assert list(s["excluded_cols"]) == list(np.nonzero(~oky)[0])
    if vals.size:
        # moments as (count, mean, M2): the mean within the mean allowance, M2 within what the
        # per-pair allowances can move it (|d M2| <= sum 2 |v - mean| tv + tv^2, plus the mean's)
        n = vals.size
        mean = vals.mean()
        assert abs(s["mean"] - mean) <= tv.mean() + 1e-12
        dev = np.abs(vals - mean)
        assert abs(s["m2"] - ((vals - mean) ** 2).sum()) <= (2 * dev * tv + tv ** 2).sum() + n * tv.mean() ** 2 + 1e-9
        for key, best in (("max", vals.max()), ("min", vals.min())):
            got, i, j = s[key]
            assert valid[i, j] and abs(got - v[i, j]) <= tol[i, j] and abs(got - best) <= 2 * tv.max()
    else:
        assert s["max"] is None and s["min"] is None

    # histogram: counts between "safely in the bin" and "possibly in the bin"
    if opts.get("bins", 0):
        bins, lo, hi = opts["bins"], opts["lo"], opts["hi"]

        def bin_of(u):
            b = np.floor((u - lo) * (bins / (hi - lo)))
            b = np.clip(b, 0, bins - 1) + 1
            return np.where(u < lo, 0, np.where(u > hi, bins + 1, b)).astype(np.int64)

        b_lo, b_hi = bin_of(vals - tv), bin_of(vals + tv)
        h = np.asarray(s["hist"])
        assert h.sum() == vals.size
        lower = np.bincount(b_lo[b_lo == b_hi], minlength=bins + 2)
        upper = np.zeros(bins + 2, np.int64)
        for a, b in zip(b_lo, b_hi):
            upper[a:b + 1] += 1
        bad = np.nonzero((h < lower) | (h > upper))[0]
        assert bad.size == 0, f"hist bins {bad}: got {h[bad]}, lower {lower[bad]}, upper {upper[bad]}"

    # global lists: values match the reference at the reported pair, order is right, and every
    # reference pair clearly better than the k-th reference value is present
    def check_list(key, k, sign, key_fn):
        gv, gi, gj = (np.asarray(a) for a in s[key])
        assert len(gv) == min(k, vals.size)
        if not len(gv):
            return
        assert np.all(valid[gi, gj]) and np.all(np.abs(gv - v[gi, gj]) <= tol[gi, gj])
        kk = key_fn(gv)
        assert np.all(np.diff(kk) >= 0) and len(set(zip(gi, gj))) == len(gi)
        ref_keys = key_fn(vals)
        kth = np.sort(ref_keys)[len(gv) - 1]
        must = ref_keys < kth - 2 * tv.max()
        assert set(zip(I[must], J[must])) <= set(zip(gi, gj))

    check_list("top", opts.get("topk", 0), 1, lambda u: -u)
    check_list("bottom", opts.get("bottomk", 0), 1, lambda u: u)
    if opts.get("near") is not None:
        check_list("near", opts.get("near_k", 0), 1, lambda u: np.abs(u - opts["near"]))

    # per-row lists
    nrows = x.shape[0]
    for key, k, largest in (("row_top", opts.get("row_topk", 0), True),
                            ("row_bottom", opts.get("row_bottomk", 0), False)):
        if not k:
            assert s[key] is None
            continue
        rv, ri = (np.asarray(a) for a in s[key])
        assert rv.shape == (nrows, k) and ri.shape == (nrows, k)
        sym = valid | valid.T if y is None else valid
        for r in range(nrows):
            cols = np.nonzero(sym[r])[0]
            nv = min(k, cols.size)
            assert np.all(ri[r, nv:] == -1) and np.all(np.isnan(rv[r, nv:]))
            if not nv:
                continue
            gi, gv = ri[r, :nv], rv[r, :nv]
            assert np.all(sym[r, gi]) and len(set(gi)) == nv
            assert np.all(np.abs(gv - v[r, gi]) <= tol[r, gi])
            key_v = -gv if largest else gv
            assert np.all(np.diff(key_v) >= 0)
            ref = -v[r, cols] if largest else v[r, cols]
            kth = np.sort(ref)[nv - 1]
            must = cols[ref < kth - 2 * tol[r, cols].max()]
            assert set(must) <= set(gi)

    # outside [a, b]: counts between sure and possible, pairs listed in (i, j) order
    if opts.get("outside") is not None:
        a, b = opts["outside"]
        sure = (vals < a - tv) | (vals > b + tv)
        maybe = (vals < a + tv) | (vals > b - tv)
        assert sure.sum() <= s["outside_count"] <= maybe.sum()
        rows = np.asarray(s["outside_rows"])
        sure_r = np.bincount(I[sure], minlength=nrows)
        maybe_r = np.bincount(I[maybe], minlength=nrows)
        if y is None:
            sure_r += np.bincount(J[sure], minlength=nrows)
            maybe_r += np.bincount(J[maybe], minlength=nrows)
        else:
            cols = np.asarray(s["outside_cols"])
            assert np.all(np.bincount(J[sure], minlength=len(y)) <= cols)
            assert np.all(cols <= np.bincount(J[maybe], minlength=len(y)))
            assert cols.sum() == s["outside_count"]
        assert np.all(sure_r <= rows) and np.all(rows <= maybe_r)
        assert rows.sum() == s["outside_count"] * (2 if y is None else 1)
        pv, pi, pj = (np.asarray(q) for q in s["outside_pairs"])
        assert len(pv) == min(opts["outside_limit"], s["outside_count"])
        assert np.all(np.abs(pv - v[pi, pj]) <= tol[pi, pj])
        assert np.all((v[pi, pj] < a + tol[pi, pj]) | (v[pi, pj] > b - tol[pi, pj]))
        order = pi * (10 ** 9) + pj
        assert np.all(np.diff(order) > 0)
        if len(pv):  # every sure-outside pair before the last listed one is listed
            last = order[-1]
            ref_order = I[sure] * (10 ** 9) + J[sure]
            assert set(ref_order[ref_order <= last]) <= set(order)


def assert_states_equal(a, b, exact_sums=True, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k in skip:
            continue
        x, y = a[k], b[k]
        if k in ("mean", "m2", "shifted_sum", "shifted_sumsq") and not exact_sums:
            assert x == pytest.approx(y, rel=1e-12, abs=1e-12), k
        elif isinstance(x, tuple) or isinstance(y, tuple):
            assert (x is None) == (y is None), k
            if x is not None:
                assert len(x) == len(y), k
                for p, q in zip(x, y):
                    np.testing.assert_array_equal(np.asarray(p), np.asarray(q), err_msg=k)
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            assert x == y, k


CASES = [  # (n, d, block, zero rows, duplicate pairs)
    (1, 8, 8, (), ()),
    (2, 5, 1, (), ()),
    (37, 16, 8, (3,), ((5, 10), (5, 20))),
    (129, 24, 64, (0, 128), ((1, 2),)),
    (203, 300, 64, (5,), ((0, 202),)),  # d > k-block
]


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("n,d,block,zeros,dups", CASES)
def test_self_vs_reference(metric, n, d, block, zeros, dups):
    x = make_x(n, d, seed=n, zero_rows=zeros, dup=dups)
    opts = dict(OPTS)
    if metric != "cosine":
        opts.update(lo=-8.0 if metric == "dot" else 0.0, hi=8.0, outside=(-2.0, 5.0))
    s = run_engine(x, metric=metric, block=block, threads=2, **opts)
    check_against_reference(s, x, None, metric, opts)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
def test_cross_vs_reference(metric):
    x = make_x(45, 33, seed=1, zero_rows=(7,), dup=((2, 3),))
    y = make_x(29, 33, seed=2, zero_rows=(0,))
    y[5] = x[2]
    opts = dict(OPTS)
    if metric != "cosine":
        opts.update(lo=-10.0 if metric == "dot" else 0.0, hi=10.0, outside=(-3.0, 6.0))
    s = run_engine(x, y, metric=metric, block=16, threads=2, **opts)
    check_against_reference(s, x, y, metric, opts)


def test_euclidean_near_duplicates_direct():
    x = make_x(40, 32, seed=8) * 10
    x[5] = x[17]
    x[9] = x[30] + 1e-3
    s = run_engine(x, metric="euclidean", bins=10, lo=0.0, hi=200.0, bottomk=3, row_bottomk=1)
    want = np.linalg.norm(x[9].astype(np.float64) - x[30])
    pairs = {(i, j): v for v, i, j in zip(*s["bottom"])}
    assert s["min"] == (0.0, 5, 17) and pairs[(9, 30)] == pytest.approx(want, rel=1e-5)
    assert s["row_bottom"][1][30, 0] == 9


def test_all_rows_zero():
    x = np.zeros((5, 4), np.float32)
    s = run_engine(x, metric="cosine", **OPTS)
    assert s["count"] == 0 and s["max"] is None and list(s["excluded_rows"]) == [0, 1, 2, 3, 4]
    assert np.all(np.asarray(s["row_top"][1]) == -1)


def test_ties_prefer_smallest_indices():
    x = np.ones((6, 3), np.float32)  # every pair has cosine 1
    s = run_engine(x, metric="cosine", block=2, topk=3, bottomk=2, row_topk=2, bins=0,
                   near=None, outside=None)
    assert list(zip(s["top"][1], s["top"][2])) == [(0, 1), (0, 2), (0, 3)]
    assert list(zip(s["bottom"][1], s["bottom"][2])) == [(0, 1), (0, 2)]
    assert s["max"][1:] == (0, 1) and s["min"][1:] == (0, 1)
    assert s["row_top"][1].tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [0, 1]]
    assert s["hist"] is None and s["outside_rows"] is None


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_block_invariance(metric, monkeypatch):
    # Own kernels compute every pair as one FMA chain, whatever the tile; OpenBLAS's rounding
    # depends on the tile shape (its products are checked against the reference elsewhere), so
    # the invariance of the fused pass is checked on the level's own kernel.
    if blas_products():
        monkeypatch.setenv("EMBGEOM_GEMM", "avx2" if _C.cpu_info()["isa"] == "avx2" else "scalar")
    x = make_x(70, 20, seed=3, zero_rows=(4,), dup=((1, 9), (1, 33)))
    opts = dict(OPTS)
    if metric != "cosine":
        opts.update(lo=0.0, hi=10.0, outside=(2.0, 8.0))
    states = [run_engine(x, metric=metric, block=b, threads=2, **opts) for b in (1, 7, 64, 70, 500)]
    for s in states[1:]:
        assert_states_equal(states[0], s, exact_sums=False, skip=("tiles_done",))


def test_thread_and_chunk_invariance():
    x = make_x(150, 40, seed=4, zero_rows=(10,), dup=((3, 4),))
    a = run_engine(x, metric="cosine", block=16, threads=1, **OPTS)
    b = run_engine(x, metric="cosine", block=16, threads=2, **OPTS)
    c = run_engine(x, metric="cosine", block=16, threads=2, chunks=7, **OPTS)
    assert_states_equal(a, b)
    assert_states_equal(a, c)


@pytest.mark.parametrize("cross", [False, True])
def test_resume_from_state(cross):
    x = make_x(90, 24, seed=5, zero_rows=(2,), dup=((7, 8),))
    y = make_x(50, 24, seed=6, zero_rows=(3,)) if cross else None
    kw = dict(metric="cosine", block=16, threads=2, **OPTS)
    full = run_engine(x, y, **kw)
    e1 = _C.PairwiseEngine(x, y, **engine_args(**kw))
    half = e1.num_tiles() // 2
    e1.run(0, half)
    saved = e1.state()
    e2 = _C.PairwiseEngine(x, y, **engine_args(**kw))
    e2.load_state(saved)
    assert_states_equal(e2.state(), saved)
    e2.run(half, e2.num_tiles())
    assert_states_equal(full, e2.state())
    with pytest.raises(ValueError, match="in order"):
        e2.run(0, 1)


@pytest.mark.parametrize("limit", [300, 5000, 100_000])
@pytest.mark.parametrize("cross", [False, True])
def test_long_lists_merge_offers_in_batches(limit, cross):
    """Lists longer than PairList::kLazyK (256) take offers in batches: the outside list (first
    `limit` pairs in (i, j) order, truncated and complete), the top and bottom lists at 400 and
    300, against the reference, and the same under threads, chunks and a resumed state; with
    long per-row lists (the threads' heaps, merged at the end of each run)."""
    x = make_x(180, 24, seed=11, zero_rows=(9,), dup=((3, 4), (3, 170)))
    y = make_x(140, 24, seed=12, zero_rows=(0,)) if cross else None
    opts = dict(OPTS, topk=400, bottomk=300, outside=(-0.05, 0.05), outside_limit=limit,
                row_topk=150 if limit == 300 else 7, row_bottomk=120 if limit == 300 else 5)
    kw = dict(metric="cosine", block=16, **opts)
    one = run_engine(x, y, threads=1, **kw)
    check_against_reference(one, x, y, "cosine", opts)
    assert len(one["outside_pairs"][0]) == min(limit, one["outside_count"])
    assert_states_equal(one, run_engine(x, y, threads=2, chunks=5, **kw))
    e1 = _C.PairwiseEngine(x, y, **engine_args(threads=2, **kw))
    half = e1.num_tiles() // 3
    e1.run(0, half)
    e2 = _C.PairwiseEngine(x, y, **engine_args(threads=2, **kw))
    e2.load_state(e1.state())
    e2.run(half, e2.num_tiles())
    assert_states_equal(one, e2.state())


@pytest.fixture(params=["default", "avx512bf16", "amx"])
def bf16_product(request, monkeypatch):
    """Fast mode's product: the default pick, then each bf16 product EMBGEOM_GEMM forces (the
    AVX-512 bf16 dot, AMX tiles), skipped where the CPU lacks it."""
    if request.param != "default":
        monkeypatch.setenv("EMBGEOM_GEMM", request.param)
        got = _C.cpu_info()["gemm_fast"]
        if not got.startswith(request.param):
            pytest.skip(f"no {request.param} product at this CPU and level (fast runs {got})")
    return request.param


@pytest.mark.parametrize("fused", ["own", "portable"])
@pytest.mark.parametrize("topk", [0, 6])
@pytest.mark.parametrize("limit", [40, 100_000])
def test_fast_mode_outside_lists_equal_exact(topk, limit, fused, bf16_product, monkeypatch):
    """Fast mode's outside list and counts equal exact mode's: rows 0-59 a cluster (the first
    tiles, cold while the global lists fill, list most of their pairs, whose outside decisions
    wait for the tile's batch rescoring), rows 0 and 1 equal (so most of the cluster's pairs are
    no global candidates), b on the cluster's median value so that many pairs sit within the
    bf16 margin of it; long and truncated lists, 1 and 2 threads, chunks; the level's own
    fused pass and the portable one (EMBGEOM_FUSED)."""
    if fused == "portable":
        monkeypatch.setenv("EMBGEOM_FUSED", "portable")
    rng = np.random.default_rng(5)
    x = make_x(300, 200, seed=6, dup=((0, 299),))
    x[:60] = x[0] + 0.5 * rng.standard_normal((60, 200)).astype(np.float32)
    x[1] = x[0]
    xd = x[:60].astype(np.float64)
    xd /= np.linalg.norm(xd, axis=1, keepdims=True)
    b = float(np.median((xd @ xd.T)[np.triu_indices(60, 1)]))
    opts = dict(OPTS, topk=topk, bottomk=0, near=None, row_topk=0, row_bottomk=0, outside=(-2.0, b),
                outside_limit=limit)
    kw = dict(metric="cosine", block=32, **opts)
    exact = run_engine(x, None, threads=1, precision="exact", **kw)
    assert exact["outside_count"] > 800
    assert len(exact["outside_pairs"][0]) == min(limit, exact["outside_count"])
    check_against_reference(exact, x, None, "cosine", opts)
    for threads, chunks in ((1, 1), (2, 1), (2, 4)):
        fast = run_engine(x, None, threads=threads, chunks=chunks, precision="fast", **kw)
        keys = ("outside_count", "outside_rows", "outside_pairs", "top")
        assert_states_equal({k: exact[k] for k in keys}, {k: fast[k] for k in keys})


@pytest.mark.parametrize("metric,cross", [("cosine", False), ("cosine", True), ("dot", False),
                                          ("euclidean", False)])
def test_fast_mode_rescored(metric, cross, bf16_product):
    x = make_x(140, 300, seed=7, zero_rows=(5,), dup=((1, 2),))
    y = make_x(60, 300, seed=8) if cross else None
    opts = dict(OPTS, near=0.05)
    if metric != "cosine":
        opts.update(lo=0.0 if metric == "euclidean" else -60.0, hi=60.0, outside=(-20.0, 26.0), near=1.0)
    kw = dict(metric=metric, block=32, threads=2, **opts)
    exact = run_engine(x, y, precision="exact", **kw)
    fast = run_engine(x, y, precision="fast", **kw)
    eng = _C.PairwiseEngine(x, y, **engine_args(precision="fast", **kw))
    if "bf16" not in eng.kernel:
        assert fast["hist_error_bound"] == 0.0
    else:
        assert 0 < fast["hist_error_bound"] < (0.05 if metric == "cosine" else 20.0)
    # everything decided on rescored values equals exact mode
    for key in ("count", "min", "max", "top", "bottom", "near", "row_top", "row_bottom",
                "outside_count", "outside_rows", "outside_cols", "outside_pairs"):
        assert_states_equal({key: exact[key]}, {key: fast[key]})
    # histogram and sums within the reported bound
    check_against_reference(fast, x, y, metric, opts, extra_tol=fast["hist_error_bound"])


def test_fast_mode_thread_invariance():
    x = make_x(300, 96, seed=10, zero_rows=(17,), dup=((4, 5),))
    kw = dict(metric="cosine", precision="fast", block=32, **OPTS)
    a = run_engine(x, threads=1, **kw)
    b = run_engine(x, threads=2, chunks=5, **kw)
    assert_states_equal(a, b)


@pytest.mark.parametrize("k", [1, 3, 12])
def test_fast_mode_row_lists_with_near_ties(k, bf16_product):
    # 80 rows within bf16 rounding of one another: every row has far more candidates inside the
    # error band than its candidate buffer holds (spills), so only exact rescoring can order them
    rng = np.random.default_rng(11)
    x = make_x(150, 64, seed=11, dup=((0, 149),))
    x[:80] = x[0] + 1e-4 * rng.standard_normal((80, 64)).astype(np.float32)
    x[90:100] = -x[0]  # and a block of near-ties at the bottom
    kw = dict(metric="cosine", block=16, threads=2, bins=0, topk=0, bottomk=0, row_topk=k, row_bottomk=k)
    exact = run_engine(x, precision="exact", **kw)
    for chunks in (1, 6):
        fast = run_engine(x, precision="fast", chunks=chunks, **kw)
        assert_states_equal({"r": exact["row_top"]}, {"r": fast["row_top"]})
        assert_states_equal({"r": exact["row_bottom"]}, {"r": fast["row_bottom"]})



def test_fast_mode_row_lists_with_overflowing_products():
    """Products that overflow float32 to -inf fill a row's top list: its k-th best is -inf, a
    band with no float below it. A compaction looked for the band's float edge forever; now the
    run ends and its lists equal exact mode's. In a child process with a time limit, so a hang
    fails the test instead of stopping the suite."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "from embgeom.backends.cpp import CppEngine\n"
        "from embgeom.engine.config import make_config\n"
        "u = torch.ones(16)\n"
        "x = torch.cat([u.repeat(10, 1) * 1e19, -u.repeat(290, 1) * 1e19])\n"
        "lists = {}\n"
        "for prec in ('exact', 'fast'):\n"
        "    cfg = make_config(metric='dot', bins=0, topk=0, bottomk=0, near=None, row_topk=12, row_bottomk=3,\n"
        "                      outside=None, precision=prec)\n"
        "    eng = CppEngine(x, None, cfg)\n"
        "    eng.run(0, eng.num_tiles())\n"
        "    st = eng.state()\n"
        "    lists[prec] = [np.asarray(a) for a in st.row_top + st.row_bottom]\n"
        "assert np.isneginf(lists['exact'][0][0, -1])\n"
        "assert all(np.array_equal(a, b) for a, b in zip(lists['exact'], lists['fast']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

@pytest.mark.parametrize("big", [3.39e38, 3.4e38, float(np.finfo(np.float32).max)])
def test_fast_mode_takes_values_past_bf16s_largest(big, bf16_product):
    """A value that rounds past bf16's largest finite one (3.3961e38 and up) beside tiny columns:
    the bf16 copy had been inf, its products inf * 0 = NaN, the bound inf: wrong lists, padded
    rows. It now saturates to bf16's largest, a finite rounding inside the bound."""
    x = np.array([[big, 0.0], [-big, 0.0], [big / 2, big / 3]], np.float32)
    y = np.array([[2e-38, 0.0], [4e-38, 2e-38], [0.0, 3e-38], [-1e-38, 1e-38]], np.float32)
    opts = dict(bins=4, lo=-20.0, hi=20.0, topk=3, bottomk=3, near=None, row_topk=2, row_bottomk=2,
                outside=(-5.0, 5.0), outside_limit=20)
    kw = dict(metric="dot", block=32, threads=2, **opts)
    exact = run_engine(x, y, precision="exact", **kw)
    fast = run_engine(x, y, precision="fast", **kw)
    assert math.isfinite(fast["hist_error_bound"]) and math.isfinite(fast["mean"])
    for key in ("count", "min", "max", "top", "bottom", "row_top", "row_bottom", "outside_count",
                "outside_rows", "outside_cols", "outside_pairs"):
        assert_states_equal({key: exact[key]}, {key: fast[key]})
    check_against_reference(fast, x, y, "dot", opts, extra_tol=fast["hist_error_bound"])


@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("cross", [False, True])
def test_row_top_floor_cuts_the_lists(precision, cross):
    """set_row_top_floor(f): each row's top list is its k best values >= f, which is the list
    without a floor cut at f (a row with fewer values >= f has all of them in its list), with
    near ties at the floor (bf16 rounding puts them on both sides in fast mode), duplicate and
    zero rows, rows with nothing above the floor; bottom lists and the rest of the state are
    untouched."""
    rng = np.random.default_rng(21)
    x = make_x(170, 48, seed=21, zero_rows=(3,), dup=((0, 169),))
    x[:60] = x[1] + 0.2 * rng.standard_normal((60, 48)).astype(np.float32)
    y = make_x(90, 48, seed=22, dup=((4, 5),)) if cross else None
    if cross:
        y[:30] = x[1] + 0.2 * rng.standard_normal((30, 48)).astype(np.float32)
    kw = dict(metric="cosine", block=16, threads=2, precision=precision, bins=0, topk=0, bottomk=0,
              row_topk=9, row_bottomk=2)
    plain = run_engine(x, y, **kw)
    vals = plain["row_top"][0]
    floor = float(np.nanmedian(vals[:60, 4]))  # cuts the lists of the clustered rows mid-way
    # values within bf16 rounding of the floor, some above and some below it
    assert ((np.abs(vals - floor) < 5e-3) & (vals != floor)).sum() >= 2
    for chunks in (1, 4):
        e = _C.PairwiseEngine(x, y, **engine_args(**kw))
        e.set_row_top_floor(floor)
        cuts = np.linspace(0, e.num_tiles(), chunks + 1).astype(int)
        for a, b in zip(cuts[:-1], cuts[1:]):
            e.run(int(a), int(b))
        got = e.state()
        below = ~(vals >= floor)
        want_v = np.where(below, np.nan, vals)
        want_i = np.where(below, -1, plain["row_top"][1])
        np.testing.assert_array_equal(got["row_top"][1], want_i)
        np.testing.assert_array_equal(got["row_top"][0], want_v)
        assert_states_equal({"r": plain["row_bottom"]}, {"r": got["row_bottom"]})
    assert (want_i[60:] < 0).all() or cross  # random rows: nothing reaches the floor
    assert (want_i[:60] >= 0).sum(1).min() < 9 < (want_i[:60] >= 0).sum(1).max() + 1
    ran = _C.PairwiseEngine(x, y, **engine_args(**kw))
    ran.run(0, 1)
    with pytest.raises(ValueError, match="set_row_top_floor"):
        ran.set_row_top_floor(floor)
    nofloor = _C.PairwiseEngine(x, y, **engine_args(**kw))
    nofloor.set_row_top_floor(float("nan"))
    nofloor.run(0, nofloor.num_tiles())
    assert_states_equal({"r": plain["row_top"]}, {"r": nofloor.state()["row_top"]})


@pytest.mark.parametrize("fused", ["own", "portable"])
@pytest.mark.parametrize("metric,cross", [("cosine", False), ("cosine", True), ("dot", False)])
@pytest.mark.parametrize("outside", [None, (-0.3, 0.35)])
def test_lists_only(metric, cross, outside, fused, bf16_product, monkeypatch):
    """keep_lists_only(): the per-row lists, outside counts and outside pairs of a run without
    the statistics, exact and fast, 1 and 2 threads, chunks, the portable pass with and without
    outside counts; the state then holds no count, moments or extremes; refused after a run and
    with a histogram, global or near list or l2."""
    if fused == "portable":
        monkeypatch.setenv("EMBGEOM_FUSED", "portable")
    x = make_x(133, 40, seed=31, zero_rows=(7,), dup=((2, 3), (0, 132)))
    y = make_x(75, 40, seed=32, dup=((1, 2),)) if cross else None
    kw = dict(metric=metric, block=16, bins=0, topk=0, bottomk=0, row_topk=6, row_bottomk=3)
    if outside is not None:
        kw.update(outside=outside if metric == "cosine" else (-6.0, 7.0), outside_limit=40)
    keys = ("row_top", "row_bottom", "outside_count", "outside_rows", "outside_cols", "outside_pairs")
    for precision in ("exact", "fast"):
        want = run_engine(x, y, threads=1, precision=precision, **kw)
        for threads, chunks in ((1, 1), (2, 3)):
            e = _C.PairwiseEngine(x, y, **engine_args(threads=threads, precision=precision, **kw))
            e.keep_lists_only()
            cuts = np.linspace(0, e.num_tiles(), chunks + 1).astype(int)
            for a, b in zip(cuts[:-1], cuts[1:]):
                e.run(int(a), int(b))
            got = e.state()
            assert_states_equal({k: want[k] for k in keys}, {k: got[k] for k in keys})
            if outside is not None:
                assert want["outside_count"] > len(want["outside_pairs"][0]) > 0
            assert got["count"] == 0 and got["min"] is None and got["max"] is None
    ran = _C.PairwiseEngine(x, y, **engine_args(**kw))
    ran.run(0, 1)
    with pytest.raises(ValueError, match="keep_lists_only: the engine has run"):
        ran.keep_lists_only()
    for other in (dict(bins=10), dict(topk=2), dict(near=0.1), dict(metric="euclidean")):
        e = _C.PairwiseEngine(x, y, **engine_args(**{**kw, **other}))
        with pytest.raises(ValueError, match="needs metric cosine or dot and no histogram"):
            e.keep_lists_only()


def test_kernels_agree_bitwise(monkeypatch):
    x = make_x(61, 45, seed=9)
    monkeypatch.setenv("EMBGEOM_GEMM", "scalar")
    want = run_engine(x, metric="dot", block=16, bins=30, lo=-20.0, hi=20.0, topk=5, row_topk=2)
    level = _C.cpu_info()["isa"]
    own = {"avx512": ("avx512", "avx2"), "avx2": ("avx2",)}.get(level, ())
    for forced in own:
        monkeypatch.setenv("EMBGEOM_GEMM", forced)
        got = run_engine(x, metric="dot", block=16, bins=30, lo=-20.0, hi=20.0, topk=5, row_topk=2)
        # fp32 products are the same FMA chain on every kernel; sums may differ in order only
        assert_states_equal(want, got, exact_sums=False, skip=("tiles_done",))


def test_argument_errors():
    x = make_x(4, 3)
    with pytest.raises(ValueError, match="metric"):
        _C.PairwiseEngine(x, None, **engine_args(metric="manhattan"))
    with pytest.raises(ValueError, match="block"):
        _C.PairwiseEngine(x, None, **engine_args(block=0))
    with pytest.raises(ValueError, match="range"):
        _C.PairwiseEngine(x, None, **engine_args(bins=10, lo=1.0, hi=1.0))
    with pytest.raises(ValueError, match="outside"):
        _C.PairwiseEngine(x, None, **engine_args(outside=(1.0, 0.0)))
    with pytest.raises(ValueError, match="y"):
        _C.PairwiseEngine(x, make_x(3, 5), **engine_args())
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        _C.PairwiseEngine(bad, None, **engine_args())
    e = _C.PairwiseEngine(x, None, **engine_args())
    with pytest.raises(ValueError, match="tiles"):
        e.run(0, e.num_tiles() + 1)
    assert e.tile_pairs(0, e.num_tiles()) == 6 and math.isfinite(e.hist_error_bound)


def capped_note(info) -> str:
    """Why fast runs the exact product under a cap below avx512: the cap, where the CPU has a bf16
    product (it had said "no native bf16 dot" there, or blamed the CPU under EMBGEOM_GEMM)."""
    has_bf16 = any(f in info["cpu_features"] for f in ("avx512bf16", "amx-bf16"))
    return "EMBGEOM_CPU caps the vector level below avx512" if has_bf16 else "no native bf16 dot"


def test_cpu_cap_is_reported_and_checked(cpu_cap, monkeypatch):
    info = _C.cpu_info()
    assert info["cap"] == cpu_cap and info["isa"] == cpu_cap
    e = _C.PairwiseEngine(make_x(20, 7), None, **engine_args())
    assert e.isa == cpu_cap
    assert e.fused_pass == ("avx512" if cpu_cap == "avx512" else f"portable-{cpu_cap}")
    if cpu_cap == "avx2":  # the own AVX2 kernel over packed panels; fast runs the exact product
        assert e.kernel == "avx2-6x16" and info["gemm_fast"].startswith("avx2-6x16 (" + capped_note(info))
    if cpu_cap == "generic" and "openblas" in info["blas"] and "core=" in info["blas"]:
        assert e.kernel == "openblas-sgemm" and info["gemm_fast"].startswith("openblas-sgemm (" + capped_note(info))
    monkeypatch.setenv("EMBGEOM_CPU", "sse9")
    with pytest.raises(ValueError, match="EMBGEOM_CPU"):
        _C.PairwiseEngine(make_x(4, 3), None, **engine_args())


def test_embgeoms_openblas_stays_its_own():
    """The core opens the scipy-openblas32 wheel's library for itself alone: importing the wheel's
    package had opened it RTLD_GLOBAL, and scipy, loaded later, bound its BLAS calls to it (its
    ARPACK results changed with `import embgeom._C`: UMAP layouts with the process's history); and
    EMBGEOM_CPU caps that library alone (OPENBLAS_CORETYPE had stayed set for every OpenBLAS the
    process opened later). (The pin is removed from the subprocesses alone: what they check is the
    cap's own setting.)"""
    import json
    import os
    import subprocess
    import sys

    code = ("import ctypes, hashlib, json, sys, numpy as np\n"
            "if sys.argv[1] != 'none': import embgeom._C as C\n"
            "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p\n"
            "left = libc.getenv(b'OPENBLAS_CORETYPE')\n"
            "import scipy.sparse as sp, scipy.sparse.linalg as sla\n"
            "a = sp.random(600, 600, density=0.03, random_state=1); a = a + a.T\n"
            "v = sla.eigsh(a, 3, which='SM', tol=1e-4, v0=np.ones(600), ncv=20, maxiter=3000)[1]\n"
            "blas = C.cpu_info()['blas'] if sys.argv[1] != 'none' else ''\n"
            "print(json.dumps({'left': left and left.decode(), 'blas': blas,\n"
            "                  'arpack': hashlib.sha256(v.tobytes()).hexdigest()}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "EMBGEOM_CPU")}
    runs = {}
    for run, cap in (("none", None), ("native", None), ("avx2", "avx2")):
        out = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True, check=True,
                             env={**env, "EMBGEOM_CPU": cap} if cap else env)
        runs[run] = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(r["left"] is None for r in runs.values())
    if "core=" in runs["avx2"]["blas"]:
        assert runs["avx2"]["blas"].endswith("core=Haswell")
    assert runs["native"]["arpack"] == runs["none"]["arpack"] == runs["avx2"]["arpack"]


def test_without_openblas_the_own_kernels_run(cpu_cap):
    """EMBGEOM_OPENBLAS=0 (as without the wheel): own kernels, and `info` says why."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy as np, embgeom._C as C; from embgeom.engine.config import make_config; "
            "from embgeom.backends.cpp import binding_options; "
            "x = np.random.default_rng(0).standard_normal((50, 9)).astype(np.float32); "
            "e = C.PairwiseEngine(x, None, **binding_options(make_config(bins=10, topk=3))); e.run(0, e.num_tiles()); s = e.state(); "
            "print(json.dumps({'info': C.cpu_info(), 'kernel': e.kernel, 'count': s['count'], 'top': s['top'][1].tolist()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "EMBGEOM_OPENBLAS": "0", "EMBGEOM_CPU": cpu_cap}).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert "EMBGEOM_OPENBLAS=0" in r["info"]["blas"]
    assert not r["kernel"].startswith("openblas") and r["count"] == 50 * 49 // 2
    x = np.random.default_rng(0).standard_normal((50, 9)).astype(np.float32)
    assert r["top"] == run_engine(x, bins=10, topk=3)["top"][1].tolist()  # same top pairs as in-process


@pytest.mark.parametrize("bins", [24, 8, 96])
def test_histogram_exact_edges_follow_the_one_bin_rule(bins):
    """Integer dots land exactly on bin edges (and on lo / hi): every pass (vector blocks, tails)
    bins them as numerics.bin_index does."""
    from embgeom import numerics

    rng = np.random.default_rng(bins)
    x = rng.integers(-2, 3, size=(83, 5)).astype(np.float32)
    v = (x.astype(np.float64) @ x.T.astype(np.float64))[np.triu_indices(83, 1)]
    lo, hi = -12.0, 12.0  # edges at multiples of 24 / bins, some values outside
    edges = lo + (hi - lo) / bins * np.arange(bins + 1)
    assert np.isin(v, edges).sum() > 100 and (v == hi).any() and (np.abs(v) > hi).any()
    s = run_engine(x, metric="dot", block=32, bins=bins, lo=lo, hi=hi, topk=0, bottomk=0)
    want = np.bincount(numerics.bin_index(v, lo, hi, bins), minlength=bins + 2)
    np.testing.assert_array_equal(np.asarray(s["hist"]), want)


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("cross", [False, True])
def test_row_lists_exact_under_heavy_ties(k, cross):
    """Integer rows: every dot product is exact in float32 and most are tied, so each row's
    lists must equal a float64 sort by (value, column) exactly. With 300 rows each thread's
    reservoir (k + max(k / 2, 8) slots) fills and keeps its k best many times, with ties at the
    kept threshold; the same under threads, chunks and a resumed state."""
    rng = np.random.default_rng(5)
    x = rng.integers(-1, 2, size=(300, 8)).astype(np.float32)
    y = rng.integers(-1, 2, size=(170, 8)).astype(np.float32) if cross else None
    kw = dict(metric="dot", block=32, bins=0, topk=0, bottomk=0, row_topk=k, row_bottomk=k)
    got = run_engine(x, y, threads=2, chunks=3, **kw)
    cols = x if y is None else y
    v = x.astype(np.float64) @ cols.astype(np.float64).T
    if y is None:
        np.fill_diagonal(v, np.nan)
    for key, sign in (("row_top", -1.0), ("row_bottom", 1.0)):
        rv, ri = (np.asarray(a) for a in got[key])
        for r in range(len(x)):
            ok = np.nonzero(~np.isnan(v[r]))[0]
            order = ok[np.lexsort((ok, sign * v[r, ok]))][:k]  # value, then column ascending
            assert ri[r].tolist() == order.tolist(), (key, r)
            assert np.array_equal(rv[r], v[r, order].astype(np.float32))
    assert_states_equal(got, run_engine(x, y, threads=1, **kw))


def test_one_run_at_a_time_on_an_engine():
    """run() releases the GIL: a second run of the same tiles from another thread had been
    accepted and counted every pair twice; it and every read of the state wait their turn now."""
    import threading

    x = make_x(6000, 384, seed=11)
    for _ in range(5):  # the first run must still be under way when the second call comes
        e = _C.PairwiseEngine(x, None, **engine_args(metric="cosine", block=64, threads=1))
        t = e.num_tiles()
        worker = threading.Thread(target=e.run, args=(0, t))
        worker.start()
        while worker.is_alive() and not e.running:
            pass
        refused = []
        if e.running:
            for call in (lambda: e.run(0, t), e.state, lambda: e.tiles_done, e.keep_lists_only):
                with pytest.raises(ValueError, match="a run is under way in another thread") as err:
                    call()
                refused.append(err)
        worker.join()
        if refused:
            break
    assert len(refused) == 4
    assert not e.running and e.state()["count"] == 6000 * 5999 // 2 and e.tiles_done == t


def test_direct_calls_refuse_sizes_that_would_end_the_process():
    """A direct call with a billion threads or a row list past 2^30 had ended the process inside
    OpenMP (an allocation failing in a parallel region, or a size wrapped around)."""
    x = make_x(10, 8, seed=1)
    with pytest.raises(ValueError, match="threads: expected 0 .OpenMP's default. to 4096, got 1000000000"):
        _C.PairwiseEngine(x, None, **engine_args(threads=10**9))
    with pytest.raises(ValueError, match="row_topk: expected 0 to 1073741824, got 4611686018427387904"):
        _C.PairwiseEngine(x, None, **engine_args(row_topk=2**62))
    with pytest.raises(ValueError, match="threads: expected 0"):
        _C.eigvals_abs(np.eye(3)[None], 10**9)
    with pytest.raises(ValueError, match="threads: expected 0"):
        _C.sym_tridiagonal(np.eye(3)[None], -1)
    with pytest.raises(ValueError, match="threads: expected 0"):
        _C.prepare_columns(x, metric="cosine", precision="exact", threads=10**9)
