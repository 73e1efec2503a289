"""The float64 reference against independent brute-force numpy loops on tiny inputs."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from embgeom import reference


def _np_values(x, y, metric):
    y = x if y is None else y
    out = np.zeros((len(x), len(y)))
    for i, j in itertools.product(range(len(x)), range(len(y))):
        a, b = x[i], y[j]
        if metric == "cosine":
            na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            out[i, j] = np.nan if na == 0 or nb == 0 else max(-1.0, min(1.0, sum(p * q for p, q in zip(a, b)) / (na * nb)))
        elif metric == "dot":
            out[i, j] = sum(p * q for p, q in zip(a, b))
        else:
            out[i, j] = math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))
    return out


def _np_pairs(x, y, metric):
    vals = _np_values(x, y, metric)
    pairs = []
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if (y is None and j <= i) or np.isnan(vals[i, j]):
                continue
            pairs.append((i, j, vals[i, j]))
    return pairs


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("cross", [False, True])
def test_pairwise_reference_vs_numpy(metric, cross):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4))
    x[2] = 0
    y = rng.normal(size=(6, 4)) if cross else None
    pairs = _np_pairs(x, y, metric)
    vals = np.array([p[2] for p in pairs])
    lo, hi = (-1.0, 1.0) if metric == "cosine" else (float(vals.min()) - 0.1, float(vals.max()) + 0.1)
    got = reference.pairwise_stats(x, y, metric=metric, bins=7, range=(lo, hi), topk=3, bottomk=3,
                                   near=0.1, near_k=2, row_topk=2, outside=(-0.3, 0.3), outside_limit=4)
    assert got["count"] == len(pairs)
    assert got["mean"] == pytest.approx(vals.mean(), abs=1e-12)
    assert got["std"] == pytest.approx(vals.std(), abs=1e-12)
    counts, _ = np.histogram(vals, bins=7, range=(lo, hi))
    assert got["hist"]["counts"].tolist() == counts.tolist()
    by = lambda key: [[i, j, pytest.approx(v, abs=1e-12)] for i, j, v in sorted(pairs, key=key)]
    assert got["top_pairs"] == by(lambda p: (-p[2], p[0], p[1]))[:3]
    assert got["bottom_pairs"] == by(lambda p: (p[2], p[0], p[1]))[:3]
    assert got["near_pairs"] == by(lambda p: (abs(p[2] - 0.1), p[0], p[1]))[:2]
    assert got["min"] == by(lambda p: (p[2], p[0], p[1]))[0]
    outside = [p for p in pairs if p[2] < -0.3 or p[2] > 0.3]
    assert got["outside"]["count"] == len(outside)
    assert [p[:2] for p in got["outside"]["pairs"]] == [list(p[:2]) for p in sorted(outside)[:4]]
    full = _np_values(x, y, metric)
    for i in range(len(x)):
        cand = [(j, full[i, j]) for j in range(full.shape[1]) if not np.isnan(full[i, j]) and (cross or j != i)]
        want = [j for j, _ in sorted(cand, key=lambda c: (-c[1], c[0]))[:2]]
        assert got["row_topk"]["indices"][i].tolist()[:len(want)] == want
    if metric == "cosine":
        assert got["excluded_rows"] == [2]


def test_cone_index_reference_vs_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 4))
    x[0, 1] = 0
    mask = np.ones((3, 5), bool)
    mask[2, 3:] = False
    got = reference.cone_index(x, mask)
    for b in range(3):
        rows = [r for t, r in enumerate(x[b]) if mask[b, t] and np.linalg.norm(r) > 0]
        s = sum(r / np.linalg.norm(r) for r in rows)
        assert got["index"][b].item() == pytest.approx(np.linalg.norm(s), abs=1e-12)
        assert got["n"][b].item() == len(rows)
        # identity: mean off-diagonal cosine = (I^2 - n) / (n (n - 1))
        n = len(rows)
        cos = [np.dot(a, c) / np.linalg.norm(a) / np.linalg.norm(c) for a, c in itertools.permutations(rows, 2)]
        assert np.mean(cos) == pytest.approx((np.linalg.norm(s) ** 2 - n) / (n * (n - 1)), abs=1e-12)
    assert got["zero_rows"].tolist() == [1, 0, 0]


def test_attention_entropy_reference_vs_numpy():
    rng = np.random.default_rng(2)
    B, H, T = 2, 3, 5
    mask = np.ones((B, T), bool)
    mask[1, 3:] = False
    logits = rng.normal(size=(B, H, T, T))
    p = np.exp(logits)
    p = p * mask[:, None, None, :]
    p /= p.sum(-1, keepdims=True)
    got = reference.attention_entropy(p, mask, smoothing=0.0)
    for b, h, q in itertools.product(range(B), range(H), range(T)):
        if not mask[b, q]:
            assert math.isnan(got["row_entropy"][b, h, q].item())
            continue
        row = p[b, h, q][mask[b]]
        want = -sum(v * math.log(v) for v in row if v > 0)
        assert got["row_entropy"][b, h, q].item() == pytest.approx(want, abs=1e-12)
    assert got["uniform_baseline"].tolist() == pytest.approx([math.log(5), math.log(3)])
    smooth = reference.attention_entropy(p, mask, smoothing=1.0)
    assert smooth["row_entropy"][1, 0, 0].item() == pytest.approx(math.log(3))
