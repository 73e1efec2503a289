"""The numeric rules of docs/metrics.md, once in embgeom.numerics, as every engine applies them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import embgeom
from embgeom import numerics, reference
from embgeom.backends.cpp import binding_options
from embgeom.engine.config import make_config

from helpers import backend_params

PAIRWISE = backend_params("pairwise_stats", ("cpp", "torch"))


def _values_as_pairs(values):
    """Cross mode of a column of values against [[1.0]]: the pair values are exactly `values`."""
    x = torch.tensor(values, dtype=torch.float32)[:, None]
    return x, torch.ones(1, 1)


def test_bin_index_at_exact_edges():
    lo, hi, bins = -1.0, 1.0, 8           # width 0.25: every edge is exact in binary
    edges = [lo + b * 0.25 for b in range(bins + 1)]
    slots = numerics.bin_index(np.array(edges), lo, hi, bins)
    assert slots.tolist() == list(range(1, bins + 1)) + [bins]   # edge b opens bin b; hi -> last bin
    # one ulp below an edge: the float64 rule decides (v - lo may round up onto the edge)
    below = np.nextafter(np.array(edges[1:-1]), -np.inf)
    rule = [min(math.floor((float(v) - lo) * (bins / (hi - lo))), bins - 1) + 1 for v in below]
    assert numerics.bin_index(below, lo, hi, bins).tolist() == rule
    assert rule[0] == 1 and rule[1] == 2   # e.g. -0.5 - ulp stays in bin 1 (slot 2)
    assert numerics.bin_index(np.array([np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)]), lo, hi, bins).tolist() == [0, bins + 1]
    t = numerics.bin_index(torch.tensor(edges, dtype=torch.float64), lo, hi, bins)
    assert t.tolist() == slots.tolist()


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_engines_bin_exact_edges_like_the_reference(backend, device):
    lo, hi, bins = -1.0, 1.0, 8
    edges = [lo + b * 0.25 for b in range(bins + 1)]
    below = [float(np.nextafter(np.float32(e), np.float32(-np.inf))) for e in edges[1:]]
    vals = edges + below + [-1.5, 1.5, 0.1, -0.1]
    x, y = _values_as_pairs(vals)
    got = embgeom.pairwise_stats(x.to(device), y.to(device), metric="dot", range=(lo, hi), bins=bins, backend=backend)
    want = reference.pairwise_stats(x, y, metric="dot", range=(lo, hi), bins=bins)["hist"]
    assert got.hist.counts.tolist() == want["counts"].tolist()
    assert (got.hist.underflow, got.hist.overflow) == (want["underflow"], want["overflow"]) == (1, 1)


@pytest.mark.parametrize("backend,device", PAIRWISE)
def test_variance_does_not_cancel_when_std_is_tiny_beside_the_mean(backend, device):
    # dot products near 3.2e5 spread by ~1: one-pass sumsq/n - mean^2 loses every digit
    g = torch.Generator().manual_seed(0)
    x = 20.0 + 1e-3 * torch.randn(300, 800, generator=g, dtype=torch.float64)
    got = embgeom.pairwise_stats(x.float().to(device), metric="dot", bins=0, topk=0, bottomk=0, backend=backend)
    want = reference.pairwise_stats(x.float(), metric="dot", bins=0, topk=0, bottomk=0)
    assert got.mean == pytest.approx(want["mean"], rel=1e-7)
    # fp32 products of |a||b| ~ 3.2e5 carry ~0.1 of rounding each: the std (~0.8) within that
    assert got.std == pytest.approx(want["std"], abs=0.2)


def test_moment_shift_is_exact_for_fp32_values():
    x = torch.tensor([[3.0, 1.0], [2.0, 5.0], [1.0, 1.0]])
    s = numerics.moment_shift(x, None, "dot")
    mantissa, _ = math.frexp(s)
    assert mantissa * 256 == int(mantissa * 256)                    # 8 significant bits
    unit = x.double() / torch.linalg.vector_norm(x.double(), dim=1, keepdim=True)
    assert numerics.moment_shift(x, None, "cosine") == numerics.moment_shift(unit, None, "dot")


def test_fast_error_bound_formula_matches_the_cpp_engine():
    _C = pytest.importorskip("embgeom._C")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 37, generator=g)
    y = torch.randn(20, 37, generator=g)
    for metric in ("dot", "euclidean"):
        cfg = make_config(metric=metric, precision="fast", bins=0, topk=1, bottomk=1)
        eng = _C.PairwiseEngine(x.numpy(), y.numpy(), **binding_options(cfg))
        if eng.kernel.find("bf16") < 0:
            pytest.skip(f"no bf16 product kernel on this CPU path ({eng.kernel})")
        xs = numerics.rounding_norms(x, x.bfloat16().float())
        ys = numerics.rounding_norms(y, y.bfloat16().float())
        want = numerics.fast_error_bound(d=37, metric=metric, x_full=xs[0], x_rounded=xs[1], x_delta=xs[2],
                                         y_full=ys[0], y_rounded=ys[1], y_delta=ys[2])
        assert eng.hist_error_bound == pytest.approx(want, rel=1e-9)


def test_near_duplicate_rule_and_direct_distance():
    a = torch.tensor([[1e3, 1.0, 2.0]], dtype=torch.float32)
    b = a + torch.tensor([[0.0, 1e-3, 0.0]])
    sq = float((a.double() ** 2).sum() + (b.double() ** 2).sum())
    formula = sq - 2 * float((a.double() * b.double()).sum())
    assert formula < numerics.NEAR_DUPLICATE_TAU * sq           # this pair takes the direct path
    d = numerics.direct_distance(a, b)
    assert d.dtype == torch.float32
    assert float(d) == pytest.approx(float(torch.linalg.vector_norm(a.double() - b.double())), rel=1e-6)


def _sort_rows_by_definition(values, idx, k, largest):
    """Two stable sorts: by column (padding last), then by value (padding and NaN last)."""
    pad = idx < 0
    col_key = torch.where(pad, torch.full_like(idx, torch.iinfo(torch.int64).max), idx)
    order = torch.argsort(col_key, dim=1, stable=True)
    vals = torch.gather(values, 1, order).double()
    key = torch.where(torch.gather(pad, 1, order), torch.full_like(vals, math.inf), -vals if largest else vals)
    order = torch.gather(order, 1, torch.argsort(key, dim=1, stable=True))[:, :k]
    return torch.gather(values, 1, order), torch.gather(idx, 1, order)


def test_sort_rows_skips_sorted_rows_and_matches_two_stable_sorts():
    """sort_rows leaves rows already in (value, column) order as they are and sorts the rest:
    the same as two stable sorts, with ties, signed zeros, infinities, NaN, padding in the
    middle, duplicate columns, presorted rows and float32 / float64 values."""
    from embgeom.engine.lists import sort_rows

    rng = np.random.default_rng(1)
    for trial in range(1500):
        R, C = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        if trial % 2:
            vals = rng.choice([0.0, -0.0, 0.5, 1.0, -1.0, np.nan, np.inf, -np.inf], size=(R, C))
        else:
            vals = rng.random((R, C)).round(1)
        v = torch.tensor(vals, dtype=torch.float64 if trial % 3 else torch.float32)
        ids = torch.tensor(rng.integers(0, 6 if trial % 7 == 0 else 20, C))[None].repeat(R, 1)
        ids = torch.where(torch.tensor(rng.random((R, C)) < 0.2), torch.full_like(ids, -1), ids)
        if trial % 5 == 0:
            v, ids = _sort_rows_by_definition(v, ids, C, bool(trial % 2))
        for largest in (True, False):
            k = int(rng.integers(1, C + 1))
            want, got = _sort_rows_by_definition(v, ids, k, largest), sort_rows(v, ids, k, largest)
            assert torch.equal(want[1], got[1]) and want[0].dtype == got[0].dtype, (trial, largest)
            assert torch.equal(torch.signbit(want[0]), torch.signbit(got[0]))
            assert torch.equal(want[0].nan_to_num(7.0), got[0].nan_to_num(7.0)), (trial, largest)


def test_cosine_matrix_identical_rows_exactly_one():
    """numerics.cosine_matrix (vocab's position and token-type tables, the text trace's group
    means): identical (here parallel) rows at most 1 (unclamped, their rounded unit rows gave
    1 + 2^-52), a zero row NaN (no direction), float64, symmetric."""
    from embgeom.numerics import cosine_matrix

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 384, generator=g, dtype=torch.float64) * 13).repeat(40, 1) \
        * torch.rand(40, 1, generator=g, dtype=torch.float64)
    x[7] = 0
    c = cosine_matrix(x.float())
    assert c.dtype == torch.float64 and bool((c.nan_to_num(7) == c.T.nan_to_num(7)).all())
    keep = torch.ones(40, dtype=torch.bool)
    keep[7] = False
    assert c[keep][:, keep].max().item() == 1.0 and c[keep][:, keep].min().item() >= 1.0 - 1e-12  # (parallel after rounding)
    assert bool(c[7].isnan().all()) and bool(c[:, 7].isnan().all())


def fp32_cosine_bound(d: int) -> float:
    """(d + 2) u for the product and (d / 2 + 3) u for each row's normalisation, u = 2^-24."""
    return (2 * d + 8) * 2.0 ** -24


def test_fp32_cosine_bound_holds_for_the_engines_values():
    """fp32_cosine_bound(d) bounds |fp32 cosine - float64 cosine| of the engine's exact values:
    random rows, rows of one large and many small entries, and near-orthogonal pairs, at d = 8
    and 384."""
    import embgeom

    rng = np.random.default_rng(11)
    for d in (8, 384):
        x = rng.standard_normal((300, d)).astype(np.float32)
        x[:50, 0] *= 1e3                                  # one large entry a row
        x[50:100] = x[100:150] + np.float32(1e-3) * rng.standard_normal((50, d)).astype(np.float32)
        got = embgeom.pairwise_stats(x, bins=0, topk=200, bottomk=200, near=0.0, near_k=200, backend="cpp")
        x64 = x.astype(np.float64)
        u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
        for lst in (got.top_pairs, got.bottom_pairs, got.near_pairs):
            i, j, v = lst.i.numpy(), lst.j.numpy(), lst.values.double().numpy()
            err = np.abs(v - np.einsum("ij,ij->i", u[i], u[j]))
            assert err.max() <= fp32_cosine_bound(d), (d, err.max(), fp32_cosine_bound(d))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2**24 + 4, 2**24 + 5, 2**31 + 11, 10**12 + 3])
@pytest.mark.parametrize("count", [1, 2, 3, 256, 4096])
def test_spread_rows_are_distinct_in_range_and_evenly_rounded(n, count):
    """The sample rows of the GPU engines' threshold seeding, the distributed ranks' agreement
    check and paraphrase mining's floor: float32 linspace had given row n from n = 16,777,220."""
    from fractions import Fraction

    from embgeom.numerics import spread_rows

    got = spread_rows(n, count).tolist()
    m = min(count, n)
    assert len(got) == m == len(set(got)) and got == sorted(got)
    assert got[0] == 0 and got[-1] == (n - 1 if m > 1 else 0)
    if m > 1:
        for q in (0, 1, m // 3, m - 2, m - 1):
            exact = Fraction(q * (n - 1), m - 1)
            assert abs(got[q] - exact) <= Fraction(1, 2)
    assert spread_rows(0, count).numel() == 0
