"""Communities of near neighbours, as sentence-transformers' `util.community_detection` finds
them, on exact float64 cosines (docs/metrics.md, communities): the pairs at or above the
threshold from the all-pairs engine (Index.pairs_above's path) on the CPU, else the range search
of an Index row by row."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import validation
from .api_types import Scalar
from .index import Index, pair_band


def communities(x: Any, threshold: Scalar = 0.75, min_community_size: int = 10,
                batch_size: int = 1024) -> list[list[int]]:
    """Groups of rows whose cosine similarity to a central row is >= threshold.

    x: (N, D) float, or a cosine Index. Every row with at least `min_community_size` rows
    (itself included) at cosine >= threshold is a candidate centre; candidates are taken
    largest first (ties: smaller centre first), each keeping the rows no earlier community took,
    and kept when that leaves at least `min_community_size` rows. Each community lists its
    centre first, then its members by (cosine desc, id asc); communities are returned largest
    first. This is sentence-transformers' community_detection with exact float64 cosines and a
    fixed tie order; zero rows have no direction and belong to no community. A threshold above
    1 is a ValueError (no cosine reaches it; the sentence-transformers drop-in returns []).
    batch_size: rows searched at once (memory ~ batch_size x N scores) where the rows are
    searched one batch at a time: a GPU index, a CPU without the C++ engine, or more than 2^24
    pairs at or above the threshold; otherwise the all-pairs engine finds those pairs in bands
    of its own and batch_size is not used.
    """
    threshold = validation.score_threshold(threshold, "threshold")
    if threshold > 1.0:
        # (sentence-transformers returns [] here; its drop-in, compat, does the same)
        raise ValueError(f"threshold: a cosine is at most 1, so {threshold} would find no community; "
                         "expected a threshold <= 1")
    min_size = validation.positive_int(min_community_size, "min_community_size", allow_zero=False)
    batch_size = validation.positive_int(batch_size, "batch_size", allow_zero=False)
    if isinstance(x, Index):
        if x.metric != "cosine":
            raise ValueError(f"x: expected an Index with metric='cosine', got metric={x.metric!r}")
        index = x
    else:
        with validation.renamed(corpus="x"):
            index = Index(x, metric="cosine")
    n = index.ntotal
    if n < min_size:
        return []
    found = _engine_candidates(index, threshold, min_size) if index._pairs_engine_applies() else None
    if found is None:
        found = []  # (centre, members with the centre, their exact cosines), in centre order
        held = 0    # members listed in found
        for r0 in range(0, n, batch_size):
            rows = index.vectors(r0, min(n, r0 + batch_size))
            lims, values, ids = index.range_search(rows, threshold, float64=True)
            lims, values, ids = lims.cpu().numpy(), values.cpu().numpy(), ids.cpu().numpy()
            for q in range(rows.shape[0]):
                if lims[q + 1] - lims[q] >= min_size:
                    found.append((r0 + q, ids[lims[q]:lims[q + 1]], values[lims[q]:lims[q + 1]]))
                    held += int(lims[q + 1] - lims[q])
            _check_held(held, n, threshold, min_size)
    found.sort(key=lambda c: len(c[1]), reverse=True)  # stable: centres in id order among equals
    used = np.zeros(n, dtype=bool)
    out = []
    for centre, members, values in found:
        if used[centre]:
            continue
        free = ~used[members]
        if free.sum() >= min_size:
            # only kept communities are ordered (which rows a community takes does not depend
            # on the order): members by (cosine desc, id asc) after the centre
            others = free & (members != centre)
            m, v = members[others], values[others]
            group = [centre] + m[np.lexsort((m, -v))].tolist()
            out.append(group)
            used[group] = True
    return sorted(out, key=len, reverse=True)



def _check_held(held: int, n: int, threshold: float, min_size: int) -> None:
    """ValueError naming threshold when the candidate communities' members (an id and a float64
    cosine each) outgrow the memory free: every centre lists up to N rows, so a low threshold
    holds N^2 (the batches bound the search's memory, not these lists)."""
    from .engine.limits import refuse_past_memory

    refuse_past_memory(held * 16, lambda need, free: (
        f"threshold: {threshold} puts {held:,} or more members in the candidate communities of {n:,} rows "
        f"(each centre with >= {min_size} rows at or above it); they need {need}, {free}: raise the threshold"))


# pairs at or above the threshold held in memory by the engine path before it gives way to the
# range search (whose memory is one batch of scores)
ENGINE_PAIRS_LIMIT = 1 << 24
# pairs listed by one self-mode engine run before the bands of Index.pairs_above's path take
# over (the run's lists: about 40 bytes a pair per thread)
SELF_RUN_PAIRS = 1 << 21


def _engine_candidates(index: Index, threshold: float, min_size: int):
    """The candidate communities (centre, members, their exact cosines) of every row with at
    least min_size rows at cosine >= threshold, in row order, the centre among the members
    (in no particular order): the same rows and values as range_search row by row, from the pairs i < j of Index.pairs_above's engine path
    (half the products, the candidates filtered inside the engine's pass) and each row's own
    exact cosine with itself. None when more than ENGINE_PAIRS_LIMIT pairs qualify."""
    import torch

    st = index._store
    n = st.n
    # each pair scored as range_search scores a query row (its float32 row) against a stored
    # row: the exact cosine is the same for (i, j) and (j, i) (Index._exact_pairs), one value
    # for both directions
    q32 = st.rows[:n]
    found = index._engine_self_pairs(st, threshold, SELF_RUN_PAIRS)
    if found is not None:
        fi, fj = found
        fwd = index._exact_pairs(st, q32, fi, fj).numpy()
    else:
        _, nc = index._blocks(256, n)
        parts, held = [], 0
        band = pair_band()
        for r0 in range(0, n, band):
            for i, j, v in index._pairs_of_rows(st, r0, min(n, r0 + band), threshold, nc, True, exact64=True):
                parts.append((i, j, v))
                held += len(i)
                if held > ENGINE_PAIRS_LIMIT:
                    return None
        fi = torch.from_numpy(np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64))
        fj = torch.from_numpy(np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64))
        fwd = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
    rev = fwd
    # each row with itself (exactly 1, a zero row NaN)
    ids = torch.arange(n)
    own = index._exact_pairs(st, q32, ids, ids).numpy()
    keep = np.nonzero(~np.isnan(own) & (own >= threshold))[0]
    fi, fj = fi.numpy().astype(np.int64, copy=False), fj.numpy().astype(np.int64, copy=False)
    # each direction passes on its value, as range_search decides it for its query row (NaN
    # fails >=)
    ok_f = ok_r = fwd >= threshold
    counts = np.bincount(fi[ok_f], minlength=n) + np.bincount(fj[ok_r], minlength=n)
    counts[keep] += 1
    centre = counts >= min_size
    counts[~centre] = 0
    # only the candidate centres' rows are grouped: the forward direction by fi (the engine's
    # pairs come in (i, j) order; any order groups right, only slower), the reverse one sorted
    # by fj here, so that the stable sort below merges sorted runs (one argsort of all 2.9 M
    # entries of the vocabulary at 0.75 took 0.07 s)
    f, r = ok_f & centre[fi], ok_r & centre[fj]
    rev_order = np.argsort(fj[r], kind="stable")
    mine = keep[centre[keep]]
    i = np.concatenate([fi[f], fj[r][rev_order], mine])
    j = np.concatenate([fj[f], fi[r][rev_order], mine])
    v = np.concatenate([fwd[f], rev[r][rev_order], own[mine]])
    order = np.argsort(i, kind="stable")  # grouped by centre; communities() orders the members
    j, v = j[order], v[order]
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [(int(r), j[starts[r]:starts[r + 1]], v[starts[r]:starts[r + 1]]) for r in np.nonzero(centre)[0]]
