"""pairwise_stats through the public API, every CPU backend against the float64 reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import embgeom
from embgeom.backends import registry

from conftest import CPU_CAPS, blas_products
from helpers import check_stats, make_embeddings, small_int_embeddings, tolerance

ALL_OUTPUTS = dict(bins=50, topk=5, bottomk=5, near=0.0, near_k=4, row_topk=3, row_bottomk=2,
                   outside=(-0.2, 0.2), outside_limit=7)


def _backend_param(name, cap=None):
    registry.ensure_registered()
    why = registry.BACKENDS[name].reasons("pairwise_stats", torch.zeros(1, 1))
    marks = [pytest.mark.skipif(bool(why), reason="; ".join(why))]
    if cap is None:
        return pytest.param(name, marks=marks)
    return pytest.param(name, marks=[*marks, pytest.mark.cpu_cap(cap)], id=f"{name}-cpu={cap}")


# the C++ engine once per vector level the host supports (EMBGEOM_CPU)
BACKENDS = [_backend_param("torch")] + [_backend_param("cpp", cap) for cap in CPU_CAPS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,block", [(1, 8, 256), (2, 5, 256), (37, 16, 8), (129, 64, 64), (70, 768, 32)])
def test_self_mode_all_outputs(backend, n, d, block):
    x = make_embeddings(n, d, zero_rows=2 if n > 5 else 0, duplicate_rows=2 if n > 5 else 0)
    got = embgeom.pairwise_stats(x, backend=backend, block=block, **ALL_OUTPUTS)
    assert got.backend == backend
    check_stats(got, x, tol=tolerance(torch.float32, d=d), **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,d", [(1, 1, 4), (23, 9, 16), (40, 67, 32)])
def test_cross_mode_all_outputs(backend, n, m, d):
    x = make_embeddings(n, d, zero_rows=1 if n > 5 else 0, seed=1)
    y = make_embeddings(m, d, zero_rows=1 if m > 5 else 0, seed=2)
    got = embgeom.pairwise_stats(x, y, backend=backend, block=16, **ALL_OUTPUTS)
    assert got.mode == "cross" and got.m == m
    want = check_stats(got, x, y, tol=tolerance(torch.float32, d=d), **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})
    assert got.excluded_cols == want["excluded_cols"]
    if ALL_OUTPUTS["outside"]:
        assert got.outside.col_counts.shape == (m,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric,rng", [("dot", (-30.0, 30.0)), ("euclidean", (0.0, 12.0))])
def test_dot_and_euclidean_exact_ties(backend, metric, rng):
    # small integers: every value is exact in fp32, so ties are real and must break by (i, j)
    x = small_int_embeddings(45, 6)
    x[10] = x[3]
    opts = dict(ALL_OUTPUTS, outside=(-2.0, 2.0) if metric == "dot" else (1.0, 4.0), near=1.0)
    got = embgeom.pairwise_stats(x, metric=metric, range=rng, backend=backend, block=8, **opts)
    check_stats(got, x, tol=1e-4, exact_ties=True, metric=metric, range=rng, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_exact_ties(backend):
    x, y = small_int_embeddings(19, 5, seed=3), small_int_embeddings(13, 5, seed=4)
    opts = dict(ALL_OUTPUTS, outside=(-1.0, 1.0))
    got = embgeom.pairwise_stats(x, y, metric="dot", range=(-20.0, 20.0), backend=backend, block=4, **opts)
    check_stats(got, x, y, tol=1e-4, exact_ties=True, metric="dot", range=(-20.0, 20.0), **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact_input", [True, False], ids=["int-dot", "float-cosine"])
def test_block_invariance(backend, exact_input):
    if exact_input:
        x, opts = small_int_embeddings(61, 7, seed=5), dict(ALL_OUTPUTS, metric="dot", range=(-20.0, 20.0), outside=(-3.0, 3.0))
    else:
        if backend == "torch":
            pytest.skip("torch matmul rounding depends on the tile shape; only exact inputs are invariant")
        if backend == "cpp" and blas_products():
            pytest.skip("OpenBLAS rounding depends on the tile shape; only exact inputs are invariant")
        x, opts = make_embeddings(61, 12, zero_rows=1, duplicate_rows=3, seed=5), ALL_OUTPUTS
    results = [embgeom.pairwise_stats(x, backend=backend, block=b, **opts).to_dict() for b in (1, 7, 64, 100)]
    for r in results:
        r.pop("seconds")
    for r in results[1:]:
        assert r["count"] == results[0]["count"]
        assert r["hist"] == results[0]["hist"]
        for key in ("top_pairs", "bottom_pairs", "near_pairs", "min", "max", "row_topk", "row_bottomk", "outside"):
            assert r[key] == results[0][key], key


def test_all_zero_rows_cosine():
    x = torch.zeros(4, 3)
    got = embgeom.pairwise_stats(x, row_topk=2)
    assert got.count == 0 and got.excluded_rows == [0, 1, 2, 3]
    assert got.min is None and got.top_pairs.to_list() == []
    assert (got.row_topk.indices == -1).all()
    d = got.to_dict()
    assert d["mean"] is None and d["row_topk"]["values"][0] == [None, None]


def test_outputs_switch_off():
    x = make_embeddings(20, 8)
    got = embgeom.pairwise_stats(x, bins=0, topk=0, bottomk=0)
    d = got.to_dict()
    assert d["hist"] is None and d["top_pairs"] == [] and "row_topk" not in d and "outside" not in d


def test_input_dtypes_and_numpy_and_strides():
    x = make_embeddings(30, 16)
    base = embgeom.pairwise_stats(x, backend="torch")
    for variant in (x.double(), x.numpy(), x.T.contiguous().T, x.half()):
        got = embgeom.pairwise_stats(variant, backend="torch")
        assert got.count == base.count
        tol = 2e-3 if getattr(variant, "dtype", None) == torch.float16 else 1e-6
        assert abs(got.mean - base.mean) < tol
    bf = embgeom.pairwise_stats(x.bfloat16(), backend="torch")
    assert abs(bf.mean - base.mean) < 2e-2


def test_mean_cosine_matches_cone_identity():
    x = make_embeddings(50, 10, seed=9)
    stats = embgeom.pairwise_stats(x, bins=0, topk=0, bottomk=0)
    cone = embgeom.cone_index(x)
    assert abs(float(cone.mean_cosine()[0]) - stats.mean) < 1e-5


def test_json_layout():
    x = make_embeddings(12, 4)
    d = embgeom.pairwise_stats(x, row_topk=2, outside=(-0.1, 0.1)).to_dict()
    for key in ("n", "m", "d", "mode", "metric", "precision", "backend", "count", "mean", "std", "min",
                "max", "hist", "top_pairs", "bottom_pairs", "near_pairs", "row_topk", "outside",
                "excluded_rows", "seconds"):
        assert key in d, key
    assert set(d["hist"]) >= {"lo", "hi", "bins", "counts", "underflow", "overflow"}
    assert set(d["outside"]) >= {"a", "b", "count", "pairs"}
    assert all(i < j for i, j, _ in d["top_pairs"])
    assert sum(d["hist"]["counts"]) + d["hist"]["underflow"] + d["hist"]["overflow"] == d["count"] == 66


def test_reference_backend_through_api():
    x = make_embeddings(15, 6, zero_rows=1)
    got = embgeom.pairwise_stats(x, backend="reference", **ALL_OUTPUTS)
    check_stats(got, x, tol=1e-6, **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})


def test_env_backend_selection(monkeypatch):
    monkeypatch.setenv("EMBGEOM_BACKEND", "torch")
    assert embgeom.pairwise_stats(make_embeddings(5, 3)).backend == "torch"
    monkeypatch.setenv("EMBGEOM_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend"):
        embgeom.pairwise_stats(make_embeddings(5, 3))


def test_explicit_unusable_backend_lists_reasons():
    with pytest.raises(ValueError, match="cuda"):
        embgeom.pairwise_stats(make_embeddings(5, 3), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_near_duplicates_are_accurate(backend):
    # |a|^2 + |b|^2 - 2ab loses everything for near-identical rows; distances must stay exact
    x = make_embeddings(40, 32, seed=8) * 10
    x[5] = x[17]
    x[9] = x[30] + 1e-3
    got = embgeom.pairwise_stats(x, metric="euclidean", range=(0.0, 200.0), bins=100, row_bottomk=1,
                                 backend=backend)
    assert got.min[:2] == (5, 17) and got.min[2] == 0.0
    want = float(torch.linalg.vector_norm((x[9] - x[30]).double()))
    pair = [p for p in got.bottom_pairs.to_list() if p[:2] == [9, 30]][0]
    assert pair[2] == pytest.approx(want, rel=1e-4)
    assert got.row_bottomk.indices[5, 0] == 17 and got.row_bottomk.values[5, 0] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_histogram_value_just_below_hi_goes_to_last_bin(backend):
    # (v - lo) * bins / (hi - lo) can round up to `bins` for v a hair below hi
    v, lo, hi, bins = 0.8626903891563416, -0.8656357526779175, 0.8626903891563417, 259
    assert math.floor((v - lo) * (bins / (hi - lo))) == bins  # the rounding this test is about
    x = torch.tensor([[v], [1.0]])
    got = embgeom.pairwise_stats(x, metric="dot", range=(lo, hi), bins=bins, backend=backend)
    assert got.hist.counts[-1] == 1 and got.hist.overflow == 0


def test_auto_dispatch_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert embgeom.pairwise_stats(make_embeddings(5, 3)).backend in ("cpp", "torch")
