"""benchmarks/bench_split_bound.py: its bound never drops a pair of a row's true top-k."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_split_bound as bsb


def test_bound_keeps_every_true_top_k_pair():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 16)) * np.linspace(3, 0.1, 16)  # a decaying spectrum
    x[7] = x[3]                                                   # a duplicate row: ties
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z = bsb.principal(x)
    np.testing.assert_allclose(z @ z.T, x @ x.T, atol=1e-12)      # the rotation keeps products
    rows = np.arange(len(x))
    k = 5
    exact = x @ x.T
    kth = bsb.kth_best(exact, k)
    for p in (1, 4, 8, 15):
        bound = z[:, :p] @ z[:, :p].T + np.outer(*(2 * [np.linalg.norm(z[:, p:], axis=1)]))
        assert (bound >= exact - 1e-12).all()
        top = exact >= kth[:, None]
        assert (bound[top] >= kth[np.nonzero(top)[0]] - 1e-12).all()
        c = bsb.candidates(z, rows, p, k, block=32, prime=16)
        assert (c["final"] >= k).all() and (c["running"] >= c["final"]).all()


def test_report_has_every_split():
    x = np.random.default_rng(6).standard_normal((120, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = bsb.report(x, [3, 6, 9], k=4, rows=30, block=16, prime=8, gather=5.0)
    assert [r["p"] for r in got] == [3, 6, 9]
    for r in got:
        assert 4 <= r["final_median"] <= r["running_median"] <= len(x) and r["cost"] > r["p"] / 12
