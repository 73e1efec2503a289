"""benchmarks/bench_projection.py: its trustworthiness over every row is scikit-learn's."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_projection as bp


def test_trustworthiness_all_is_scikit_learns():
    manifold = pytest.importorskip("sklearn.manifold")
    rng = np.random.default_rng(0)
    for seed in range(3):
        x = rng.standard_normal((150, 12))
        emb = x[:, :2] + 0.5 * rng.standard_normal((150, 2))
        want = manifold.trustworthiness(x, emb, n_neighbors=7, metric="cosine")
        assert bp.trustworthiness_all(x, emb, 7, block=64) == pytest.approx(want, abs=1e-12), seed
    # duplicates: ties by index, as scikit-learn's argsort (its distances' rounding aside)
    # (duplicates had all taken the best rank: 0.006-0.007 above, 120 rows, 40 of them copies)
    for seed in range(3):
        x = rng.standard_normal((120, 10))
        x[60:90], x[90:100] = x[:30], x[0]
        emb = rng.standard_normal((120, 2))
        want = manifold.trustworthiness(x, emb, n_neighbors=5, metric="cosine")
        assert bp.trustworthiness_all(x, emb, 5) == pytest.approx(want, abs=1.5e-3), seed
