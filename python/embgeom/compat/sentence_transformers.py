"""sentence-transformers' `util` search functions on an embgeom Index (docs/metrics.md,
drop-ins): the same arguments and return values, exact float64 rescoring and a fixed tie order
(score desc, id asc). sentence-transformers itself is not imported.

    from embgeom.compat.sentence_transformers import semantic_search
    hits = semantic_search(query_embeddings, corpus_embeddings, top_k=10)

cos_sim and dot_score on float32, bfloat16 or float16 rows run on the index. float64 rows, and
any other score_function (a callable taking two (n, D) tensors and returning their (n, m) scores,
as the library calls it), are scored chunk by chunk as the library does (float64 rows in float64,
the function on the rows as given) and ranked with the same tie order.

Differences, all at ties or degenerate rows: equal scores are ordered by id (torch.topk's order
is unspecified); under cos_sim a zero-norm row has no direction and is never returned
(sentence-transformers scores it 0 against everything); a NaN or infinite value in either input
is refused with a ValueError naming the rows, and NaN scores from a score_function with one
naming it (sentence-transformers returns NaN scores in no defined order); a float64 row of norm
below 1e-12 keeps its direction under cos_sim (the library divides it by 1e-12, not its norm).
"""
from __future__ import annotations

import contextlib
import gc
import math
from typing import Any, Callable

import numpy as np
import torch

from .. import validation
from ..community_detection import communities
from ..index import Index, native_bf16
from ..api_types import Scalar
from ..numerics import spread_rows


def _metric(score_function: Callable | str | None) -> str | None:
    """cos_sim -> cosine, dot_score -> dot (sentence-transformers' own functions, or the names
    'cos_sim' / 'cosine' / 'dot_score' / 'dot'); None for any other callable, which is called (a
    function of the caller's that is also named `dot`, a scaled one say, is not taken for
    sentence-transformers')."""
    if score_function is None:
        return "cosine"
    if isinstance(score_function, str):
        name = score_function
    elif str(getattr(score_function, "__module__", "")).split(".")[0] == "sentence_transformers":
        name = getattr(score_function, "__name__", "")
    else:
        name = None
    if name in ("cos_sim", "pytorch_cos_sim", "cosine"):
        return "cosine"
    if name in ("dot_score", "dot"):
        return "dot"
    if callable(score_function) and not isinstance(score_function, str):
        return None
    raise ValueError(f"score_function: expected a callable (such as sentence_transformers.util.cos_sim or "
                     f"dot_score) or 'cosine' / 'dot', got {score_function!r}")


# -- the scored path: float64 rows or the caller's score_function, chunk by chunk -----------------

def _integer_rows(x: np.ndarray | torch.Tensor) -> bool:
    return x.dtype.kind in "iub" if isinstance(x, np.ndarray) else \
        (not x.dtype.is_floating_point and not x.dtype.is_complex)


def _scored_rows(x: torch.Tensor, name: str, d: int | None = None) -> torch.Tensor:
    """(N, D) rows for the scored path, N may be 0: finite float values, or integer rows
    (quantized embeddings: _tensor) as they are; D as the other input's."""
    integers = _integer_rows(x)
    if integers:
        validation.dense_tensor(x, name)
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"{name}: expected (N, D) rows with D >= 1, got {tuple(x.shape)}")
    else:
        x = validation.matrix(x, name, rows_may_be_empty=True)
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name}: expected D = {d} to match the corpus, got {tuple(x.shape)}")
    if not integers:  # (integers hold no NaN or Inf)
        validation.check_finite(x, name)
    return x


class _Scorer:
    """Scores of query rows against corpus rows as sentence-transformers computes them: the
    caller's function on the rows as given, or (metric) cos_sim / dot_score in float64; under
    cosine a zero row has no direction (never a neighbour, no neighbours)."""

    def __init__(self, metric: str | None, function: Callable | None,
                 names: tuple[str, str] = ("query_embeddings", "corpus_embeddings")):
        self.metric, self.function, self.names = metric, function, names

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ready to score, and (cosine) which of them have a direction."""
        if self.function is not None:
            return x, None
        x = x.to(torch.float64)
        if self.metric == "dot":
            return x, None
        # x / |x| as the library's normalize takes it (the same bits: its scores); a row whose
        # norm underflows (below 1e-12, where the library divides by 1e-12 instead) or
        # overflows is scaled by its largest magnitude first, so that it keeps its direction
        norms = torch.linalg.vector_norm(x, dim=1)
        plain = (norms >= 1e-12) & torch.isfinite(norms)
        peak = x.abs().amax(dim=1) if x.shape[0] else x.new_zeros(0)
        valid = peak > 0
        odd = valid & ~plain
        if bool(odd.any()):
            scaled = x[odd] / peak[odd, None]
            x = x.clone()
            x[odd] = scaled
            norms = norms.clone()
            norms[odd] = torch.linalg.vector_norm(scaled, dim=1)
        return x / torch.where(valid, norms, 1.0)[:, None], valid

    def __call__(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.function is None:
            s = q @ c.T
            if bool(torch.isnan(s).any()):  # (inf - inf in a sum: dot products past float64's range)
                queries, corpus = self.names
                raise ValueError(f"{queries}: dot products {'of its rows' if queries == corpus else 'with ' + corpus} "
                                 "beyond float64's range (NaN scores); scale the rows down")
            return s
        s = self.function(q, c)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (q.shape[0], c.shape[0]):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"score_function: expected a ({q.shape[0]}, {c.shape[0]}) tensor of scores for "
                            f"{q.shape[0]} x {c.shape[0]} rows, got {got}")
        s = s.detach()
        if not s.dtype.is_floating_point:
            s = s.double()
        if bool(torch.isnan(s).any()):
            raise ValueError("score_function: returned NaN scores")
        return s


def _ranked(values: np.ndarray, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first `width` entries by (value desc, id asc): (Q, C) -> (Q, min(width, C))."""
    order = np.lexsort((ids, -values), axis=-1)[:, :width]
    return np.take_along_axis(values, order, 1), np.take_along_axis(ids, order, 1)


def _best_of_chunk(scores: torch.Tensor, width: int, first_id: int,
                   valid: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `width` best columns of one corpus chunk's scores (Q, C) by (score desc, id
    asc), as float64 values and global ids (first_id + column); columns without a direction
    (valid False) get -inf and id -1. torch.topk finds each row's width-th score t; a row takes
    its columns above t and, of those equal to t, the first ones by column (a row of many equal
    scores had put every tied column through one sort: 13x the score block's memory)."""
    q, c = scores.shape
    width = min(width, c)
    if valid is not None:
        scores = scores.masked_fill(~valid[None, :], -math.inf)
    if width == 0 or q == 0:
        return np.zeros((q, width)), np.zeros((q, width), np.int64)
    kth = torch.topk(scores, width, dim=1).values[:, -1:]
    above = scores > kth
    at = scores == kth
    room = width - above.sum(dim=1, keepdim=True)  # (>= 1: t is the width-th largest)
    taken = above | (at & (at.to(torch.int32).cumsum_(dim=1) <= room))  # (one int32 block)
    rows, cols = torch.nonzero(taken, as_tuple=True)  # (exactly width a row, in row order)
    v, ids = _ranked(scores[rows, cols].double().cpu().numpy().reshape(q, width),
                     cols.cpu().numpy().reshape(q, width) + first_id, width)
    if valid is not None:
        ids = np.where(np.isneginf(v) & ~valid.cpu().numpy()[ids - first_id], -1, ids)
    return v, ids


def _scored_neighbours(queries: torch.Tensor, corpus: torch.Tensor, width: int, scorer: _Scorer,
                       query_chunk_size: int, corpus_chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every query's `width` best corpus rows by (score desc, id asc), chunk by chunk as
    sentence-transformers scores them: (Q, w) float64 scores and int64 ids, -1 past the rows
    that have a direction (w = min(width, N))."""
    if queries.device != corpus.device:  # (the library's rule: queries go to the corpus)
        queries = queries.to(corpus.device)
    c_rows, c_valid = scorer.rows(corpus)
    q_rows, q_valid = (c_rows, c_valid) if queries is corpus else scorer.rows(queries)  # (mining: one copy)
    n, w = corpus.shape[0], min(width, corpus.shape[0])
    values, ids = np.full((queries.shape[0], w), -math.inf), np.full((queries.shape[0], w), -1, np.int64)
    for q0 in range(0, queries.shape[0], query_chunk_size):
        q1 = min(queries.shape[0], q0 + query_chunk_size)
        best_v, best_i = values[q0:q1, :0], ids[q0:q1, :0]
        for c0 in range(0, n, corpus_chunk_size):
            c1 = min(n, c0 + corpus_chunk_size)
            v, i = _best_of_chunk(scorer(q_rows[q0:q1], c_rows[c0:c1]), w, c0,
                                  None if c_valid is None else c_valid[c0:c1])
            best_v, best_i = _ranked(np.concatenate([best_v, v], 1), np.concatenate([best_i, i], 1), w) \
                if best_v.shape[1] else (v, i)
        values[q0:q1], ids[q0:q1] = best_v, best_i
    if q_valid is not None:
        ids[~q_valid.cpu().numpy()] = -1
    return values, ids


def _tensor(x: Any, name: str, quantized: bool = False) -> torch.Tensor:
    """The rows as a tensor; quantized: integer rows (sentence-transformers' int8 / uint8 /
    binary embeddings) taken as they are, for a score_function of the caller's to score."""
    if isinstance(x, list):
        x = _stack_rows(x, name)
    if quantized and isinstance(x, np.ndarray) and _integer_rows(x):  # (as_tensor takes float arrays only)
        t = validation.numpy_tensor(np.ascontiguousarray(x))
    else:
        t = validation.as_tensor(x, name)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t


def _stack_rows(rows: list, name: str) -> torch.Tensor:
    """A list of row tensors / arrays (as sentence-transformers' encode returns them), or of
    numbers (one row) -> one tensor; a TypeError / ValueError naming `name` for anything else."""
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
           for v in rows):
        return torch.tensor([float(v) for v in rows], dtype=torch.float32)
    if rows and all(isinstance(r, (list, tuple)) for r in rows):  # nested lists: torch.tensor(a)'s input
        return _nested_rows(rows, name)
    if not all(isinstance(r, (torch.Tensor, np.ndarray)) for r in rows):
        kinds = sorted({type(r).__name__ for r in rows if not isinstance(r, (torch.Tensor, np.ndarray))})
        raise TypeError(f"{name}: a list must hold float rows (tensors, arrays or lists of numbers) or "
                        f"numbers, got {', '.join(kinds)}")
    tensors = [validation.as_tensor(r, f"{name}[{k}]") for k, r in enumerate(rows)]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"{name}: the rows of a list must have one shape, got {sorted(shapes)}")
    return torch.stack(tensors)


def _nested_rows(rows: list, name: str) -> torch.Tensor:
    """Rows given as lists of numbers -> one float32 tensor (what torch.tensor makes of Python
    floats); a ValueError naming `name` for rows of different lengths."""
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(f"{name}: the rows of a list must have one length, got {sorted(lengths)}")
    for k, r in enumerate(rows):
        bad = [type(v).__name__ for v in r
               if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_))]
        if bad:
            raise TypeError(f"{name}[{k}]: a row given as a list must hold numbers, got {bad[0]}")
    return torch.tensor(np.asarray(rows, dtype=np.float64), dtype=torch.float32)


def semantic_search(query_embeddings, corpus_embeddings, query_chunk_size: int = 100,
                    corpus_chunk_size: int = 500000, top_k: int = 10,
                    score_function: Callable | str | None = None) -> list[list[dict[str, int | float]]]:
    """For each query, the top_k corpus rows: a list per query of {"corpus_id", "score"} dicts,
    score descending. query_embeddings: (Q, D) or (D,); corpus_embeddings: (N, D).
    score_function: cos_sim (default) or dot_score, which run on the index for float32 / 16-bit
    rows (the chunk sizes then accepted for compatibility: the index blocks its own scan), or
    any callable (q, c) -> (q, c) scores; float64 rows and other callables are scored in
    query_chunk_size x corpus_chunk_size blocks as the library scores them."""
    query_chunk_size = validation.positive_int(query_chunk_size, "query_chunk_size", allow_zero=False)
    corpus_chunk_size = validation.positive_int(corpus_chunk_size, "corpus_chunk_size", allow_zero=False)
    top_k = validation.positive_int(top_k, "top_k")
    metric = _metric(score_function)
    corpus = _tensor(corpus_embeddings, "corpus_embeddings", quantized=metric is None)
    queries = _tensor(query_embeddings, "query_embeddings", quantized=metric is None)
    if metric is None or torch.float64 in (corpus.dtype, queries.dtype):
        corpus = _scored_rows(corpus, "corpus_embeddings")
        queries = _scored_rows(queries, "query_embeddings", corpus.shape[1])
        scores, ids = _scored_neighbours(queries, corpus, top_k, _Scorer(metric, None if metric else score_function),
                                         query_chunk_size, corpus_chunk_size)
        return _hits(scores, ids)
    with validation.renamed(corpus="corpus_embeddings", queries="query_embeddings"):
        index = Index(corpus, metric=metric, copy=False)  # (read during this call only)
        if top_k == 0:  # sentence-transformers' answer: an empty list per query
            index.search(queries.to(index.device), 1)  # (the queries checked as for any top_k)
            return [[] for _ in range(queries.shape[0])]
        width = min(top_k, max(1, index.ntotal))
        same = queries is corpus or (queries.shape == corpus.shape and queries.dtype == corpus.dtype
                                     and torch.equal(queries, corpus))
        if same and corpus.dtype == torch.float32 and corpus.device == index.device:
            scores, ids = index.search_stored(width)  # every row against all: half the products
        else:
            scores, ids = index.search(queries.to(index.device), width)
    return _hits(scores.cpu().numpy(), ids.cpu().numpy())


def _hits(scores: np.ndarray, ids: np.ndarray) -> list[list[dict[str, int | float]]]:
    """semantic_search's answer from (Q, k) scores and ids (-1: no row)."""
    # numpy's tolist: torch's took 0.4 s for 30,522 x 11
    with _no_gc():
        return [[{"corpus_id": i, "score": s} for s, i in zip(s_row, i_row) if i >= 0]
                for s_row, i_row in zip(scores.astype(np.float64).tolist(), ids.tolist())]


def paraphrase_mining_embeddings(embeddings, query_chunk_size: int = 5000, corpus_chunk_size: int = 100000,
                                 max_pairs: int = 500000, top_k: int = 100,
                                 score_function: Callable | str | None = None) -> list[list[float | int]]:
    """The highest-scoring pairs among each row's top_k neighbours: [score, i, j] with i < j,
    score descending (ties by (i, j)), at most max_pairs (top_k or max_pairs 0: none, as
    sentence-transformers). score_function as semantic_search's (float64 rows and callables
    other than cos_sim / dot_score scored in chunks, as the library does)."""
    query_chunk_size = validation.positive_int(query_chunk_size, "query_chunk_size", allow_zero=False)
    corpus_chunk_size = validation.positive_int(corpus_chunk_size, "corpus_chunk_size", allow_zero=False)
    max_pairs = validation.positive_int(max_pairs, "max_pairs")
    top_k = validation.positive_int(top_k, "top_k")
    metric = _metric(score_function)
    x = _tensor(embeddings, "embeddings", quantized=metric is None)
    if metric is None or x.dtype == torch.float64:
        x = _scored_rows(x, "embeddings")
        if x.shape[0] < 2 or top_k == 0 or max_pairs == 0:
            return []
        scorer = _Scorer(metric, None if metric else score_function, names=("embeddings", "embeddings"))
        s_all, j_all = _scored_neighbours(x, x, top_k + 1, scorer, query_chunk_size, corpus_chunk_size)
        return _mined_pairs_replayed(s_all, j_all, top_k, max_pairs)
    with validation.renamed(corpus="embeddings"):
        index = Index(x, metric=metric)
    n = index.ntotal
    if n < 2 or top_k == 0 or max_pairs == 0:
        return []
    if max_pairs <= top_k:
        best = _global_top_pairs(index, max_pairs)
        if best is not None:
            return best
    width = min(top_k + 1, n)
    if n <= STORED_SEARCH_ROWS:
        # every row against all in one self-mode engine run (half the products); its lists
        # hold n x (width + 16) candidates, so larger inputs search in blocks of rows
        floor = _mining_floor(index, width, top_k, max_pairs)
        if floor is not None:
            s_all, j_all = (t.cpu().numpy() for t in index.search_stored(width, floor=floor))
            mined = _mined_pairs(s_all, j_all, top_k, max_pairs, cut=True)
            if mined is not None:
                return mined
        s_all, j_all = (t.cpu().numpy() for t in index.search_stored(width))
    else:
        scores, ids = [], []
        for r0 in range(0, n, 4096):
            s_blk, i_blk = index.search(index.vectors(r0, min(n, r0 + 4096)), width)
            scores.append(s_blk.cpu().numpy())
            ids.append(i_blk.cpu().numpy())
        s_all, j_all = np.concatenate(scores), np.concatenate(ids)
    return _mined_pairs(s_all, j_all, top_k, max_pairs)


# Paraphrase mining's floor (_mining_floor): rows sampled (fewer than ENGINE_PREPARE_QUERIES, so
# their search scans the corpus instead of packing it for the engine: 0.08 s on the vocabulary,
# 0.17 s at 256 rows), and how many more distinct pairs than max_pairs the sample must promise
FLOOR_SAMPLE_ROWS = 192
FLOOR_SAFETY = 1.25


def _mining_floor(index: Index, width: int, top_k: int, max_pairs: int) -> float | None:
    """A score below every pair of paraphrase mining's answer, most likely: the answer is the
    best max_pairs of the rows' top_k lists, so it needs nothing of those lists below the
    max_pairs-th distinct pair, and search_stored(floor=) skips the rest (the vocabulary's
    default mining: 1.3 M list entries above the floor against 3.6 M, the engine run
    1.9-2.2 s against 3.4-4.0). From FLOOR_SAMPLE_ROWS evenly spread rows' lists: the score
    above which all rows' lists would hold 2 * FLOOR_SAFETY * max_pairs entries (a pair is at
    most two entries). Whether the floored lists hold max_pairs distinct pairs is checked
    afterwards (_mined_pairs), so an estimate too high costs a second run, never a wrong
    answer. None where the sample says the lists hold too few pairs, or for small inputs."""
    n = index.ntotal
    if n <= 4 * FLOOR_SAMPLE_ROWS or index.metric == "l2":
        return None
    rows = spread_rows(n, FLOOR_SAMPLE_ROWS)
    s, j = index.search(index.vectors()[rows], width, float64=True)
    s, j = s.cpu().numpy(), j.cpu().numpy()
    entries = np.sort(s[_first_others(j, rows.numpy(), top_k)])[::-1]
    want = math.ceil(2 * FLOOR_SAFETY * max_pairs * FLOOR_SAMPLE_ROWS / n)
    if want >= len(entries):
        return None
    return float(entries[want])


def _first_others(j: np.ndarray, rows: np.ndarray, top_k: int) -> np.ndarray:
    """Of neighbour lists j (Q, w) of the rows `rows` (Q,) (-1 padding), each row's first top_k
    entries other than itself, as upstream takes them: a (Q, w) bool mask."""
    kept = (j >= 0) & (j != rows[:, None])
    kept &= np.cumsum(kept, axis=1) <= top_k
    return kept


def _mined_pairs(s_all: np.ndarray, j_all: np.ndarray, top_k: int, max_pairs: int,
                 cut: bool = False) -> list[list[float | int]] | None:
    """Paraphrase mining's answer from every row's neighbour list (scores descending, ties by
    index, -1 padding; the row itself may be listed): each row's first top_k other rows, one
    entry per pair, the best max_pairs by (score desc, i, j).

    cut: the lists are each row's lists cut at a floor (search_stored(floor=)). A pair at or
    above it is in a row's top_k list exactly when it is in the cut list (a row with fewer than
    top_k entries there has fewer than top_k scores at or above it), so the pairs at or above
    the floor are the uncut lists' pairs at or above it. When they number at least max_pairs the
    answer is among them; else None (the caller mines the uncut lists)."""
    n = len(j_all)
    rows = np.arange(n)
    i_all = np.broadcast_to(rows[:, None], j_all.shape)
    kept = _first_others(j_all, rows, top_k)
    # a full row's kept list is everything up to its last kept entry (score, index) in the
    # list's order; a shorter row kept every other row it lists
    count = kept.sum(1)
    last = kept.shape[1] - 1 - np.argmax(kept[:, ::-1], axis=1)
    full = count == top_k
    last_s = np.where(full, s_all[rows, last], -np.inf)
    last_j = np.where(full, j_all[rows, last], n)
    i_, j_, s_ = i_all[kept], j_all[kept], s_all[kept]
    # one entry per pair, the first met in row order (upstream keeps the first direction): an
    # entry of row i naming an earlier row j repeats row j's entry when i is in j's kept list
    # (exact scores are the same from both rows)
    in_j = (s_ > last_s[j_]) | ((s_ == last_s[j_]) & (i_ <= last_j[j_]))
    keep = (j_ > i_) | ~in_j
    a, b, s_ = np.minimum(i_, j_)[keep], np.maximum(i_, j_)[keep], s_[keep]
    if cut and len(s_) < max_pairs:
        return None
    if len(s_) > max_pairs:  # sort only the pairs at or above the max_pairs-th score
        kth = np.partition(s_, len(s_) - max_pairs)[len(s_) - max_pairs]
        best = np.flatnonzero(s_ >= kth)
        a, b, s_ = a[best], b[best], s_[best]
    order = _pair_order(s_, a, b)[:max_pairs]
    return _pair_lists(s_[order], a[order], b[order])


def _mined_pairs_replayed(s_all: np.ndarray, j_all: np.ndarray, top_k: int, max_pairs: int) -> list[list[float | int]]:
    """paraphrase_mining_embeddings' own loop over every row's neighbour list (scores that need
    not be symmetric to the last bit: a score_function's, or float64 products of differently
    chunked rows): rows in order, each row's first top_k others, a pair taken once (the score of
    the first row listing it) into a heap of the best max_pairs, a pair pushed out of it free to
    come back from its other row, nothing below the last score pushed out and never -inf.
    Equal scores: the heap keeps and lists the smaller (i, j) (the library skips a pair equal to
    the last score pushed out; here it competes, so that ties go as on the index path)."""
    import heapq

    heap: list[tuple[float, int, int]] = []  # (score, -i, -j): the worst, then the largest pair, leaves first
    queued: set[tuple[int, int]] = set()
    floor = -math.inf
    for i, (s_row, j_row) in _rows_as_lists(s_all, j_all):
        taken = 0
        for s, j in zip(s_row, j_row):
            if j < 0 or j == i:
                continue
            if taken == top_k:
                break
            taken += 1
            if s < floor or s == -math.inf:
                continue
            pair = (i, j) if i < j else (j, i)
            if pair in queued:
                continue
            queued.add(pair)
            if len(heap) < max_pairs:
                heapq.heappush(heap, (s, -pair[0], -pair[1]))
            else:
                out = heapq.heappushpop(heap, (s, -pair[0], -pair[1]))
                queued.discard((-out[1], -out[2]))
                floor = out[0]
    score = np.array([h[0] for h in heap], dtype=np.float64)
    a = np.array([-h[1] for h in heap], dtype=np.int64)
    b = np.array([-h[2] for h in heap], dtype=np.int64)
    order = _pair_order(score, a, b)
    return _pair_lists(score[order], a[order], b[order])


def _rows_as_lists(s_all: np.ndarray, j_all: np.ndarray, block: int = 4096):
    """(i, (scores, ids)) of every row as Python lists, a block of rows converted at a time (the
    whole lists at once had been 5x the arrays' memory)."""
    for r0 in range(0, len(j_all), block):
        rows = zip(s_all[r0:r0 + block].tolist(), j_all[r0:r0 + block].tolist())
        yield from enumerate(rows, start=r0)


def _pair_order(score: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The order of pairs by (score desc, i asc, j asc), scores finite: one argsort of the
    scores, then a lexsort of only the entries in runs of equal scores (few: a lexsort of all
    500,000 pairs of the vocabulary's default mining took 0.11 s)."""
    score = score.astype(np.float64, copy=False)
    order = np.argsort(-score, kind="stable")
    ranked = score[order]
    tied = np.zeros(len(order), dtype=bool)
    tied[1:] = ranked[1:] == ranked[:-1]
    tied[:-1] |= tied[1:]
    at = np.flatnonzero(tied)
    if at.size:  # the runs keep their places: sorted by score first, they fill them in order
        sub = order[at]
        order[at] = sub[np.lexsort((j[sub], i[sub], -score[sub]))]
    return order


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector paused while a large result of plain lists and dicts (no
    cycles) is built: its passes over the growing result took two thirds of the time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _pair_lists(score: np.ndarray, i: np.ndarray, j: np.ndarray) -> list[list[float | int]]:
    """[[score, i, j], ...] as Python floats and ints (whole columns through tolist: indexing
    numpy scalars one by one took 2 s for 500,000 pairs, 0.2 s this way)."""
    with _no_gc():
        return list(map(list, zip(score.astype(np.float64).tolist(), i.tolist(), j.tolist())))


def _global_top_pairs(index: Index, max_pairs: int) -> list[list[float | int]] | None:
    """The max_pairs best pairs i < j of the index's rows by exact float64 value, from the
    all-pairs engine's global top list in self mode (half the products of a search per row).
    When max_pairs <= top_k this is paraphrase mining's answer: a pair among the best P has at
    most P - 1 better pairs in its own row, so it is within its row's top_k. The engine's values
    are within the scan margin m of the exact ones (docs/metrics.md, prepared index): its list
    of the best max_pairs + PAD pairs is rescored, and the answer stands only where the list's
    last engine value is below the max_pairs-th exact value by more than 2m (no pair outside
    the list can reach or tie it); otherwise None (the caller searches row by row)."""
    from ..api import pairwise_stats

    st = index._store
    n = st.n
    want = min(max_pairs + PAD_PAIRS, n * (n - 1) // 2)
    rows = index.vectors()
    # with a bf16 product the engine filters by it and lists exact fp32 values: the same
    # list as exact mode (1.1 s against 2.0 s on the vocabulary, Zen 4)
    res = pairwise_stats(rows, metric=index.metric, bins=0, topk=want, bottomk=0, row_topk=0, near=None,
                         outside=None, precision="fast" if native_bf16() else "exact")
    i, j = res.top_pairs.i.to(torch.int64), res.top_pairs.j.to(torch.int64)
    if i.numel() == 0:
        return []
    # the stored float32 rows are the queries (no float64 copy of the input); a zero row has
    # no cosine with anything
    norms = st.norms[:n]
    exact = index._exact_pairs(st, rows, i, j)
    keep = ~torch.isnan(exact)
    if index.metric == "cosine":
        keep &= norms[i] > 0
    i, j, exact, engine = i[keep], j[keep], exact[keep], res.top_pairs.values.double()[keep]
    # ranked and reported as the row-by-row path does: the exact value rounded to float32
    # (Index.search's scores), then (i, j)
    score = exact.float().double()
    order = _pair_order(score.numpy(), i.numpy(), j.numpy())[:max_pairs]
    complete = i.numel() < want  # every pair of the input is in the list
    if not complete:
        if len(order) < max_pairs:
            return None
        margin = index._stored_margin(st)
        if not float(engine.min()) < float(exact[order[-1]]) - 2 * margin:
            return None
    return _pair_lists(score.numpy()[order], i.numpy()[order], j.numpy()[order])


STORED_SEARCH_ROWS = 1 << 18  # up to this many rows, paraphrase mining takes Index.search_stored
PAD_PAIRS = 64  # engine pairs beyond max_pairs, so the boundary check of _global_top_pairs holds


def community_detection(embeddings, threshold: Scalar = 0.75, min_community_size: int = 10,
                        batch_size: int = 1024, show_progress_bar: bool = False) -> list[list[int]]:
    """Groups of rows with cosine >= threshold to a centre, centre first, largest first
    (embgeom.communities)."""
    x = embeddings
    if isinstance(x, (list, np.ndarray)) and len(x) == 0:
        return []
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        return []
    with validation.renamed(x="embeddings"):
        x = _tensor(x, "embeddings")
        if validation.finite_float(threshold, "threshold") > 1.0:  # no cosine reaches it: [] as the library
            return []
        return communities(x, threshold, min_community_size, batch_size)
