"""One suite for every backend: pairwise_stats, cone_index and attention_entropy through the
public API against the float64 reference (embgeom.reference), per backend x device x input dtype.

Pairs that cannot run here are listed as skipped with the reason (helpers.backend_params): GPU
cases skip without a usable CUDA device, and triton on CPU tensors runs only in the
`TRITON_INTERPRET=1 pytest -m triton_interp` pass, on the small shapes (the interpreter is slow).
Tolerances are per pair (helpers.pair_tolerance); small-integer inputs, where fp32 is exact,
must match exactly, ties broken by (i, j).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import embgeom
from embgeom import reference

from helpers import backend_params, blas_products, check_stats, make_attention, make_embeddings, make_sequences, small_int_embeddings

ALL_OUTPUTS = dict(bins=50, topk=5, bottomk=5, near=0.0, near_k=4, row_topk=3, row_bottomk=2,
                   outside=(-0.2, 0.2), outside_limit=7)
PAIRWISE = backend_params("pairwise_stats")
CONE = backend_params("cone_index", ("cpp", "torch", "triton"))
ENTROPY = backend_params("attention_entropy", ("cpp", "torch", "triton"))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _small_only(backend, device, size):
    """The Triton interpreter runs one program after another: keep it to small shapes."""
    if backend == "triton" and device == "cpu" and size > 3000:
        pytest.skip("shape too large for the Triton interpreter (runs compiled on a GPU)")


@pytest.mark.parametrize("backend,device", PAIRWISE)
@pytest.mark.parametrize("n,d,block", [(0, 8, 256), (1, 8, 256), (2, 5, 256), (37, 16, 8), (70, 40, 16), (129, 64, 64),
                                       (70, 768, 32)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_mode_all_outputs(backend, device, dtype, n, d, block):
    _small_only(backend, device, n * d)
    x = make_embeddings(n, d, zero_rows=2 if n > 5 else 0, duplicate_rows=2 if n > 5 else 0).to(dtype)
    got = embgeom.pairwise_stats(x.to(device), backend=backend, block=block, **ALL_OUTPUTS)
    assert got.backend == backend
    assert got.top_pairs.values.device.type == device
    check_stats(got, x, **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})


@pytest.mark.parametrize("backend,device", PAIRWISE)
@pytest.mark.parametrize("n,m,d", [(0, 3, 4), (3, 0, 4), (1, 1, 4), (23, 9, 16), (40, 67, 32)])
def test_cross_mode_all_outputs(backend, device, n, m, d):
    x = make_embeddings(n, d, zero_rows=1 if n > 5 else 0, seed=1)
    y = make_embeddings(m, d, zero_rows=1 if m > 5 else 0, seed=2)
    got = embgeom.pairwise_stats(x.to(device), y.to(device), backend=backend, block=16, **ALL_OUTPUTS)
    assert got.mode == "cross" and got.m == m
    want = check_stats(got, x, y, **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})
    assert got.excluded_cols == want["excluded_cols"]
    assert got.outside.col_counts.shape == (m,)


@pytest.mark.parametrize("backend,device", PAIRWISE)
@pytest.mark.parametrize("metric,rng", [("dot", (-30.0, 30.0)), ("euclidean", (0.0, 12.0))])
def test_dot_and_euclidean_exact_ties(backend, device, metric, rng):
    # small integers: every value is exact in fp32, so ties are real and must break by (i, j)
    x = small_int_embeddings(45, 6)
    x[10] = x[3]
    opts = dict(ALL_OUTPUTS, outside=(-2.0, 2.0) if metric == "dot" else (1.0, 4.0), near=1.0)
    got = embgeom.pairwise_stats(x.to(device), metric=metric, range=rng, backend=backend, block=8, **opts)
    check_stats(got, x, exact_ties=True, metric=metric, range=rng, **opts)


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_cross_exact_ties(backend, device):
    x, y = small_int_embeddings(19, 5, seed=3), small_int_embeddings(13, 5, seed=4)
    opts = dict(ALL_OUTPUTS, outside=(-1.0, 1.0))
    got = embgeom.pairwise_stats(x.to(device), y.to(device), metric="dot", range=(-20.0, 20.0),
                                 backend=backend, block=4, **opts)
    check_stats(got, x, y, exact_ties=True, metric="dot", range=(-20.0, 20.0), **opts)


@pytest.mark.parametrize("backend,device", PAIRWISE)
@pytest.mark.parametrize("exact_input", [True, False], ids=["int-dot", "float-cosine"])
def test_tiling_invariance(backend, device, exact_input):
    """Blocks 1, 7, 64 and >= n give the same JSON (ranked lists, counts, histogram)."""
    if exact_input:
        x, opts = small_int_embeddings(61, 7, seed=5), dict(ALL_OUTPUTS, metric="dot", range=(-20.0, 20.0), outside=(-3.0, 3.0))
    else:
        if backend in ("torch", "triton", "cuda") or (backend == "cpp" and blas_products()):
            pytest.skip(f"{backend}: the product's rounding depends on the tile shape (BLAS); only exact inputs are invariant")
        x, opts = make_embeddings(61, 12, zero_rows=1, duplicate_rows=3, seed=5), ALL_OUTPUTS
    results = [embgeom.pairwise_stats(x.to(device), backend=backend, block=b, **opts).to_dict() for b in (1, 7, 64, 100)]
    for r in results:
        r.pop("seconds")
        if not exact_input:  # float sums in another order: the last bits of mean/std may move
            r.pop("mean"), r.pop("std")
    for r in results[1:]:
        assert r == results[0]


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_fast_precision_lists_equal_exact(backend, device):
    """`fast` rescoring: ranked lists, extremes and outside counts equal exact mode's (cpp:
    bit for bit; GPU engines rescore with another summation order, so the same pairs, values
    within the allowance); the histogram within its reported error bound (check_stats)."""
    x = make_embeddings(90, 48, zero_rows=1, duplicate_rows=2, seed=11)
    opts = dict(ALL_OUTPUTS, row_topk=4)
    try:
        fast = embgeom.pairwise_stats(x.to(device), backend=backend, precision="fast", block=32, **opts)
    except ValueError as exc:
        assert "precision" in str(exc)
        pytest.skip(f"{backend} has no fast mode: {exc}")
    exact = embgeom.pairwise_stats(x.to(device), backend=backend, precision="exact", block=32, **opts)
    a, b = fast.to_dict(), exact.to_dict()
    for key in ("top_pairs", "bottom_pairs", "near_pairs", "min", "max", "row_topk", "row_bottomk", "outside", "count"):
        if backend == "cpp":
            assert a[key] == b[key], key
    for key in ("top_pairs", "bottom_pairs", "near_pairs"):
        assert [p[:2] for p in a[key]] == [p[:2] for p in b[key]], key
    for key in ("min", "max"):
        assert a[key][:2] == b[key][:2], key
    assert a["row_topk"]["indices"] == b["row_topk"]["indices"]
    if fast.hist.error_bound == 0:  # no faster product on this path: fast runs the exact one
        for key in ("hist", "mean", "std"):
            assert a[key] == b[key], key
    check_stats(fast, x, **{**opts, "range": (-1.0, 1.0)})


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_euclidean_near_duplicates_are_accurate(backend, device):
    # |a|^2 + |b|^2 - 2ab loses everything for near-identical rows; distances must stay exact
    x = make_embeddings(40, 32, seed=8) * 10
    x[5] = x[17]
    x[9] = x[30] + 1e-3
    opts = dict(metric="euclidean", range=(0.0, 200.0), bins=100, row_bottomk=1, outside=(0.5, 150.0), outside_limit=5)
    got = embgeom.pairwise_stats(x.to(device), backend=backend, block=16, **opts)
    assert got.min[:2] == (5, 17) and got.min[2] == 0.0
    want = float(torch.linalg.vector_norm((x[9] - x[30]).double()))
    pair = [p for p in got.bottom_pairs.to_list() if p[:2] == [9, 30]][0]
    assert pair[2] == pytest.approx(want, rel=1e-4)
    assert got.row_bottomk.indices[5, 0] == 17 and got.row_bottomk.values[5, 0] == 0.0
    assert got.row_bottomk.indices[17, 0] == 5
    check_stats(got, x, **opts)


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_histogram_value_just_below_hi_goes_to_last_bin(backend, device):
    # (v - lo) * bins / (hi - lo) can round up to `bins` for v a hair below hi
    v, lo, hi, bins = 0.8626903891563416, -0.8656357526779175, 0.8626903891563417, 259
    assert math.floor((v - lo) * (bins / (hi - lo))) == bins  # the rounding this test is about
    x = torch.tensor([[v], [1.0]])
    got = embgeom.pairwise_stats(x.to(device), metric="dot", range=(lo, hi), bins=bins, backend=backend)
    assert got.hist.counts[-1] == 1 and got.hist.overflow == 0


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_outside_bounds_between_two_fp32_values(backend, device):
    """Outside counts compare the fp32 values with the bounds as given: 0.699999988 (fp32 0.7) is
    below 0.7 and 0.200000003 (fp32 0.2) above 0.2 (the torch backend had rounded the bounds to
    fp32 first and missed both); Euclidean values correctly rounded (torch's CPU sqrt is an ulp
    off for 7 of the integers below 2,000, 1421 among them)."""
    x = torch.tensor([[0.7], [1.0], [0.2]])
    y = torch.tensor([[1.0]])
    for bounds, want in (((0.7, 5.0), 2), ((-5.0, 0.2), 3)):
        got = embgeom.pairwise_stats(x.to(device), y.to(device), metric="dot", bins=0, outside=bounds,
                                     backend=backend)
        assert got.outside.count == want, (bounds, got.outside.pairs.to_list())
    pts = torch.tensor([[0.0, 0.0], [14.0, 35.0], [100.0, 0.0]])           # sqrt(1421): torch gives it an ulp off
    got = embgeom.pairwise_stats(pts.to(device), metric="euclidean", bins=0, topk=3, backend=backend)
    want = sorted((math.dist(pts[i].tolist(), pts[j].tolist()) for i in range(3) for j in range(i + 1, 3)), reverse=True)
    assert [float(v) for v in got.top_pairs.values] == [float(torch.tensor(w, dtype=torch.float32)) for w in want]


# ---------------------------------------------------------------------------------------------
# cone index and attention entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", CONE)
@pytest.mark.parametrize("B,T,D", [(1, 1, 3), (3, 7, 16), (4, 37, 200), (4, 600, 768)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cone_index_vs_reference(backend, device, B, T, D, dtype):
    _small_only(backend, device, B * T * D // 100)
    x, mask = make_sequences(B, T, D)
    x = x.to(dtype)
    want = reference.cone_index(x.double(), mask)
    got = embgeom.cone_index(x.to(device), mask.to(device), backend=backend)
    assert got.backend == backend
    assert got.n.tolist() == want["n"].tolist()
    assert got.zero_rows.tolist() == want["zero_rows"].tolist()
    # unit vectors summed in float64: error ~ T fp32 roundings of the normalisation
    torch.testing.assert_close(got.index.cpu().double(), want["index"], atol=1e-6 * T, rtol=1e-6, equal_nan=True)
    n = got.n
    assert torch.isnan(got.normalized[n == 0]).all()
    assert ((got.normalized[n > 0] >= 0) & (got.normalized[n > 0] <= 1 + 1e-6)).all()


@pytest.mark.parametrize("backend,device", ENTROPY)
@pytest.mark.parametrize("B,H,T", [(1, 1, 1), (3, 4, 9), (2, 3, 37), (2, 12, 128)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_attention_entropy_vs_reference(backend, device, B, H, T, smoothing):
    _small_only(backend, device, B * H * T * T // 10)
    _, mask = make_sequences(B, T, 2)
    p = make_attention(B, H, T, mask)
    p[0, 0, 0] = 0
    p[0, 0, 0, 0] = 1.0  # a one-hot row: entropy 0 (0 ln 0 = 0), or known in closed form when smoothed
    want = reference.attention_entropy(p, mask, smoothing)
    got = embgeom.attention_entropy(p.float().to(device), mask.to(device), smoothing=smoothing, backend=backend)
    atol = 1e-5 * max(1.0, math.log(T + 1))
    torch.testing.assert_close(got.row_entropy.cpu().double(), want["row_entropy"], atol=atol, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got.mean.cpu(), want["mean"], atol=atol, rtol=1e-5, equal_nan=True)
    n = int(mask[0].sum())
    a, b = 1 - smoothing + smoothing / n, smoothing / n
    one_hot = -(a * math.log(a) + ((n - 1) * b * math.log(b) if b > 0 else 0.0))
    assert got.row_entropy[0, 0, 0].item() == pytest.approx(one_hot, abs=atol)
    assert got.n_rows == int(mask.sum())


@pytest.mark.parametrize("backend,device", CONE)
def test_cone_index_strided_and_unmasked(backend, device):
    x, _ = make_sequences(2, 9, 24, seed=3)
    xt = x.to(device).transpose(1, 2).contiguous().transpose(1, 2)  # non-unit stride along D
    want = reference.cone_index(x.double())
    got = embgeom.cone_index(xt, backend=backend)
    torch.testing.assert_close(got.index.cpu().double(), want["index"], atol=1e-6 * 9, rtol=1e-6)
    assert got.zero_rows.tolist() == want["zero_rows"].tolist()


@pytest.mark.parametrize("backend,device", ENTROPY)
def test_attention_entropy_no_mask_fp16_strided(backend, device):
    p = make_attention(2, 2, 12, torch.ones(2, 12, dtype=torch.bool), seed=2)
    pt = p.half().to(device).transpose(2, 3).contiguous().transpose(2, 3)
    want = reference.attention_entropy(pt.cpu().double())
    got = embgeom.attention_entropy(pt, backend=backend)
    torch.testing.assert_close(got.row_entropy.cpu().double(), want["row_entropy"], atol=1e-4, rtol=1e-4)


def test_backend_auto_is_the_automatic_choice(monkeypatch):
    """Every --backend help names the default 'auto'; given, it had been refused."""
    import embgeom

    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    a = embgeom.pairwise_stats(x, backend="auto", bins=10)
    b = embgeom.pairwise_stats(x, bins=10)
    assert a.backend == b.backend and a.mean == b.mean
    monkeypatch.setenv("EMBGEOM_BACKEND", "auto")
    assert embgeom.pairwise_stats(x, bins=10).backend == b.backend


def test_auto_dispatch_on_cpu_tensors_does_not_import_triton():
    """Choosing a backend for CPU tensors passes over Triton without importing it (its import
    was 0.3 s of every process's first call)."""
    import subprocess
    import sys

    code = ("import sys, torch, embgeom\n"
            "x = torch.randn(20, 8)\n"
            "embgeom.pairwise_stats(x); embgeom.cone_index(x)\n"
            "embgeom.attention_entropy(torch.softmax(torch.randn(1, 2, 5, 5), -1))\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EMBGEOM_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
