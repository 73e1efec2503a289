"""The numeric rules exist twice, python/embgeom/numerics.py and csrc/numerics.h: the C++ copy
agrees with the Python one, function by function (tests/test_numerics.py checks the engines)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embgeom import numerics

_C = pytest.importorskip("embgeom._C")


def test_near_duplicate_tau():
    assert _C.NEAR_DUPLICATE_TAU == numerics.NEAR_DUPLICATE_TAU == 1.0 / 64


@pytest.mark.parametrize("lo,hi,bins", [(-1.0, 1.0, 2000), (-1.0, 1.0, 7), (0.0, 12.0, 50), (-30.0, 30.0, 3)])
def test_bin_index_at_exact_edges(lo, hi, bins):
    w = (hi - lo) / bins
    edges = lo + w * np.arange(bins + 1)
    v = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
                        [lo, hi, lo - 1, hi + 1, np.nextafter(hi, -np.inf), np.nextafter(lo, np.inf)]])
    # fp32 values too: the engines bin fp32 values converted to float64
    v = np.concatenate([v, v.astype(np.float32).astype(np.float64)])
    want = numerics.bin_index(v, lo, hi, bins)
    got = np.array([_C.bin_index(float(u), lo, hi, bins) for u in v])
    np.testing.assert_array_equal(got, want)
    assert want[v == hi].tolist() == [bins] * int((v == hi).sum())  # hi falls in the last bin
    assert _C.bin_index(lo - 1, lo, hi, bins) == 0 and _C.bin_index(hi + 1, lo, hi, bins) == bins + 1
    t = numerics.bin_index(torch.tensor(v), lo, hi, bins).numpy()
    np.testing.assert_array_equal(t, want)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("d", [1, 384, 4096])
def test_fast_error_bound(metric, d):
    rng = np.random.default_rng(d)
    for _ in range(5):
        norms = dict(zip(("x_full", "x_rounded", "x_delta", "y_full", "y_rounded", "y_delta"),
                         (float(a) for a in rng.uniform(0.0, 40.0, 6))))
        want = numerics.fast_error_bound(d=d, metric=metric, **norms)
        assert _C.fast_error_bound(d=d, metric=metric, **norms) == pytest.approx(want, rel=1e-15)


def test_order_key():
    for kind in numerics.LIST_KINDS:
        for v in (-0.75, 0.0, 0.3, 2.5):
            near = 0.25
            py = float(numerics.order_key(kind, torch.tensor([v], dtype=torch.float64), near=near)[0])
            assert -_C.order_key(kind, v, near) == py or (py == 0.0 and _C.order_key(kind, v, near) == 0.0)
    with pytest.raises(ValueError, match="kind"):
        _C.order_key("sideways", 0.0)


def test_direct_distance():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(77).astype(np.float32)
    b = (a + 1e-4 * rng.standard_normal(77)).astype(np.float32)
    want = float(numerics.direct_distance(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0])
    assert _C.direct_distance(a, b) == want
    assert math.isclose(want, float(np.linalg.norm(a.astype(np.float64) - b)), rel_tol=1e-6)
