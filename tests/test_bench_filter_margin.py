"""benchmarks/bench_filter_margin.py: its margins bound the rounded products' error."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_filter_margin as bfm


def test_pair_margins_bound_the_rounded_products():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 24))
    x[5] = 0
    x[7, 3] = 40.0  # an outlier coordinate: a coarse int scale for that row
    x[x.any(1)] /= np.linalg.norm(x[x.any(1)], axis=1, keepdims=True)
    rows = np.arange(len(x))
    for _, side_a, side_b in bfm.COPIES:
        err = np.abs(x @ x.T - bfm.rounded(x, side_a) @ bfm.rounded(x, side_b).T)
        per_pair, whole = bfm.pair_margins(x, side_a, side_b, rows)
        assert (err <= per_pair + 1e-12).all() and (per_pair <= whole + 1e-12).all()
        assert whole > 0


def test_margins_report_every_copy():
    x = np.random.default_rng(4).standard_normal((300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = bfm.margins(x, k=5, rows=20)
    assert [(r["copy"], r["margin"]) for r in got] == [(c, m) for c, _, _ in bfm.COPIES for m in ("global", "per pair")]
    for r in got:
        assert r["median"] >= 5 and r["max"] <= len(x)
