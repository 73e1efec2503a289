"""Communities of near neighbours, as sentence-transformers' `util.community_detection` finds
them, on the exact range search of an Index (docs/metrics.md, communities)."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import validation
from .index import Index


def communities(x: Any, threshold: float = 0.75, min_community_size: int = 10,
                batch_size: int = 1024) -> list[list[int]]:
    """Groups of rows whose cosine similarity to a central row is >= threshold.

    x: (N, D) float, or a cosine Index. Every row with at least `min_community_size` rows
    (itself included) at cosine >= threshold is a candidate centre; candidates are taken
    largest first (ties: smaller centre first), each keeping the rows no earlier community took,
    and kept when that leaves at least `min_community_size` rows. Each community lists its
    centre first, then its members by (cosine desc, id asc); communities are returned largest
    first. This is sentence-transformers' community_detection with exact float64 cosines and a
    fixed tie order; zero rows have no direction and belong to no community.
    batch_size: rows searched at once (memory ~ batch_size x N scores).
    """
    threshold = validation.finite_float(threshold, "threshold")
    min_size = validation.positive_int(min_community_size, "min_community_size", allow_zero=False)
    batch_size = validation.positive_int(batch_size, "batch_size", allow_zero=False)
    if isinstance(x, Index):
        if x.metric != "cosine":
            raise ValueError(f"x: expected an Index with metric='cosine', got metric={x.metric!r}")
        index = x
    else:
        index = Index(x, metric="cosine")
    n = index.ntotal
    if n < min_size:
        return []
    found = []  # (centre, members in (cosine desc, id asc) order, centre included)
    for r0 in range(0, n, batch_size):
        rows = index.vectors(r0, min(n, r0 + batch_size))
        lims, _, ids = index.range_search(rows, threshold)
        lims, ids = lims.cpu().numpy(), ids.cpu().numpy()
        for q in range(rows.shape[0]):
            if lims[q + 1] - lims[q] >= min_size:
                found.append((r0 + q, ids[lims[q]:lims[q + 1]]))
    found.sort(key=lambda c: len(c[1]), reverse=True)  # stable: centres in id order among equals
    used = np.zeros(n, dtype=bool)
    out = []
    for centre, members in found:
        if used[centre]:
            continue
        free = members[~used[members]]
        if len(free) >= min_size:
            group = [centre] + free[free != centre].tolist()
            out.append(group)
            used[group] = True
    return sorted(out, key=len, reverse=True)

