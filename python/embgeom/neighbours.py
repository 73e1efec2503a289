"""Nearest neighbours by cosine similarity on FAISS (docs/metrics.md, nearest neighbours).

Exact search is inner product on L2-normalised rows (IndexFlatIP); IVF-Flat and HNSW are the
approximate indexes, and for them recall@k against exact search is measured on the same
queries. faiss is imported on first use; a GPU index is used when faiss was built with GPU
support and a CUDA device is usable.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import numerics, validation
from .api_types import Count, DataFrame, DeviceArg, ProgressArg
from .formatting import counted, fmt
from .tables import table_html
from .results import RowTopK
from .progress import as_progress
from .threads import one_thread_in_forked_children

INDEXES = ("flat", "ivf", "hnsw")


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class KnnResult:
    """indices: (Q, k) int64 row ids of x (-1 = padding), values: (Q, k) float32 cosines (NaN =
    padding), rows ordered by (value desc, id asc). recall: recall@k of an approximate index
    against exact search (None for `flat`). excluded_rows: zero-norm rows of x, never returned
    as neighbours (their own result rows are padding when they are queries)."""

    indices: torch.Tensor
    values: torch.Tensor
    index: str
    k: int
    recall: float | None
    seconds: float
    device: str
    self_query: bool
    excluded_rows: list[int]
    params: dict

    def __repr__(self) -> str:
        """One line (the dataclass's own repr printed the tensors)."""
        recall = "" if self.recall is None else f", recall={fmt(self.recall)}"
        return (f"KnnResult({self.index}, queries={fmt(self.indices.shape[0])}, k={self.k}{recall}, "
                f"device={self.device!r}, seconds={fmt(self.seconds, 3)})")

    def to_dict(self) -> dict:
        vals = self.values.double().cpu().numpy()
        return {
            "index": self.index, "k": self.k, "device": self.device, "self_query": self.self_query,
            "recall": self.recall, "params": self.params, "seconds": self.seconds,
            "excluded_rows": [int(r) for r in self.excluded_rows],
            "indices": self.indices.cpu().tolist(),
            "values": [[None if math.isnan(v) else float(v) for v in row] for row in vals],
        }

    def to_pandas(self) -> DataFrame:
        """Long format: columns query, rank, neighbor, cosine; padding (-1) left out."""
        return RowTopK(self.indices, self.values).to_pandas().rename(
            columns={"row": "query", "column": "neighbor", "value": "cosine"})

    def _repr_html_(self) -> str:
        rows = [("index", self.index), ("k", self.k), ("queries", int(self.indices.shape[0])),
                ("recall@k", "exact" if self.recall is None else self.recall), ("device", self.device),
                ("seconds", self.seconds)]
        return "<b>KnnResult</b>" + table_html(None, rows)


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ValueError(f"knn: faiss is not installed ({exc}); `pip install faiss-cpu` "
                         "(or faiss-gpu for GPU indexes)") from None
    one_thread_in_forked_children("faiss", faiss.omp_set_num_threads)  # (its own OpenMP copy)
    return faiss


def _gpu_usable(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


NORMALISE_ROWS = 65536  # rows widened to float64 at a time (no float64 copy of a large x)


def _normalised(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """fp32 unit rows by numerics.unit_rows (float64 norms, as pairwise_stats: an fp32 norm
    overflows or underflows at magnitudes embeddings can have); -> (rows, valid mask)."""
    v = x.detach().to("cpu", torch.float32)
    unit = np.empty(tuple(v.shape), np.float32)
    valid = np.empty(v.shape[0], bool)
    for a in range(0, v.shape[0], NORMALISE_ROWS):
        u, ok = numerics.unit_rows(v[a:a + NORMALISE_ROWS])
        unit[a:a + NORMALISE_ROWS], valid[a:a + NORMALISE_ROWS] = u.numpy(), ok.numpy()
    return unit, valid


def _queries(queries: Any, x: torch.Tensor):
    """-> (query rows (Q, D) tensor, their ids in x or None). Int 1-D = ids of rows of x."""
    if queries is None:
        return x, np.arange(x.shape[0], dtype=np.int64)
    if isinstance(queries, (list, tuple, range)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in queries):
            raise TypeError("queries: a list must hold int row ids of x; pass (Q, D) float rows as an array")
        queries = torch.as_tensor(list(queries), dtype=torch.int64)
    if isinstance(queries, torch.Tensor) and queries.dtype == torch.bool:
        raise TypeError("queries: expected (Q,) int row ids or (Q, D) float rows, got a bool tensor")
    if isinstance(queries, np.ndarray) and queries.dtype.kind in "iu":
        if queries.size and queries.dtype.kind == "u" and int(queries.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"queries: row ids must be in [0, {x.shape[0]}), got max {int(queries.max())}")
        queries = torch.from_numpy(queries.astype(np.int64))
    if isinstance(queries, torch.Tensor) and not queries.dtype.is_floating_point:
        validation.dense_tensor(queries, "queries")
        if queries.dim() != 1:
            raise ValueError(f"queries: expected (Q,) row ids or (Q, D) float, got {tuple(queries.shape)} "
                             f"{str(queries.dtype).replace('torch.', '')}")
        ids = queries.to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= x.shape[0]):
            raise ValueError(f"queries: row ids must be in [0, {x.shape[0]}), got min {int(ids.min())}, "
                             f"max {int(ids.max())}")
        return x[ids.to(x.device)], ids.numpy()
    q = validation.embeddings(queries, "queries", rows_may_be_empty=True)  # (no queries: no rows, as an empty id list)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries: expected {x.shape[1]} columns, as many as the indexed rows have, got {tuple(q.shape)}")
    return q, None


def _build(faiss, kind: str, xn: np.ndarray, gpu: int | None, params: dict):
    n, d = xn.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(xn)
        index.nprobe = params["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
    if gpu is not None and kind != "hnsw":  # faiss has no GPU HNSW
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, gpu, index)
        index._embgeom_res = res  # keep the resources alive with the index
        if kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
    index.add(xn)
    return index


def _search(index, qn: np.ndarray, want: int, ids_map: np.ndarray, self_ids: np.ndarray | None,
            q_valid: np.ndarray, k: int, limit: int | None = None):
    """Search `want` candidates, map to x's ids, drop the query itself, order ties by id, keep k.
    A query whose last fetched candidate still ties with its k-th kept value may have tied rows
    of smaller id left unfetched: it is searched again with four times the candidates, up to
    `limit` (default: every indexed row)."""
    Q = qn.shape[0]
    out_i = np.full((Q, k), -1, np.int64)
    out_v = np.full((Q, k), np.nan, np.float32)
    if Q == 0 or want == 0:
        return out_i, out_v
    limit = index.ntotal if limit is None else limit
    rows = np.arange(Q)
    while rows.size:
        part_i, part_v, last = _search_once(index, qn[rows], want, ids_map,
                                            None if self_ids is None else self_ids[rows], q_valid[rows], k)
        out_i[rows], out_v[rows] = part_i, part_v
        if want >= limit:
            break
        # the k-th kept value (or the last one kept) ties with the smallest fetched one
        kth = part_v[np.arange(rows.size), np.maximum((part_i >= 0).sum(1) - 1, 0)]
        again = (part_i[:, -1] >= 0) & (last >= kth)
        rows, want = rows[again], min(limit, 4 * want)
    return out_i, out_v


SEARCH_PART = 16384  # queries a search call (FAISS's flat search takes them in blocks of 4,096)


def _search_in_parts(prog, desc: str, index, qn, want, ids_map, self_ids, q_valid, k, limit):
    """_search over the queries in parts of SEARCH_PART, a bar of queries on `prog` (each
    query's answer is its own: the parts give what one call gives)."""
    Q = qn.shape[0]
    out_i = np.full((Q, k), -1, np.int64)
    out_v = np.full((Q, k), np.nan, np.float32)
    with prog.bar(Q, desc, unit="query") as bar:
        for a in range(0, Q, SEARCH_PART):
            b = min(Q, a + SEARCH_PART)
            out_i[a:b], out_v[a:b] = _search(index, qn[a:b], want, ids_map,
                                             None if self_ids is None else self_ids[a:b], q_valid[a:b], k, limit)
            bar.update(b - a)
    return out_i, out_v


# bytes per (query, candidate) while a search's answers are ordered: FAISS's distances and
# labels, the ids mapped, the sort keys and order, the values and ids taken, the output
SEARCH_ENTRY_BYTES = 80


def _check_search_memory(Q: int, want: int) -> None:
    """ValueError naming k when Q queries x want candidates outgrow the memory free (knn had no
    estimate: a k near N on 20,000 rows failed in numpy's allocator after FAISS's search)."""
    from .engine.limits import refuse_past_memory

    refuse_past_memory(Q * want * SEARCH_ENTRY_BYTES, lambda need, free: (
        f"k: {Q:,} {'query' if Q == 1 else 'queries'} x {want:,} candidates (k and its tie margin) need "
        f"about {need}, {free}; lower k or search fewer queries at a time"))


def _search_once(index, qn: np.ndarray, want: int, ids_map: np.ndarray, self_ids: np.ndarray | None,
                 q_valid: np.ndarray, k: int):
    """One search of `want` candidates -> (ids (Q, k), values (Q, k), the smallest fetched
    value per query (-inf where fewer came back))."""
    Q = qn.shape[0]
    out_i = np.full((Q, k), -1, np.int64)
    out_v = np.full((Q, k), np.nan, np.float32)
    dist, lab = index.search(qn, want)
    # cosines clamped before they are ranked (as pairwise_stats ranks them): FAISS's fp32 1.0000001
    # of a near-duplicate would otherwise go before an equal 1.0 of a smaller id
    dist = np.clip(dist, -1.0, 1.0)
    last = np.where(lab[:, -1] >= 0, dist[:, -1], -np.inf)
    valid_hit = lab >= 0
    ids = np.where(valid_hit, ids_map[np.clip(lab, 0, None)], -1)
    if self_ids is not None:
        valid_hit &= ids != self_ids[:, None]
    vals = np.where(valid_hit, dist, -np.inf)
    ids = np.where(valid_hit, ids, np.iinfo(np.int64).max)
    order = np.lexsort((ids, -vals), axis=1)  # value desc, then id asc
    vals = np.take_along_axis(vals, order, 1)[:, :k]
    ids = np.take_along_axis(ids, order, 1)[:, :k]
    keep = np.isfinite(vals) & q_valid[:, None]
    w = vals.shape[1]
    out_i[:, :w] = np.where(keep, ids, -1)
    out_v[:, :w] = np.where(keep, vals, np.nan)
    return out_i, out_v, last


def recall_at_k(approx: np.ndarray | torch.Tensor, exact: np.ndarray | torch.Tensor) -> float | None:
    """|approx ∩ exact| / |exact| over the valid (non -1) entries of each row."""
    a, e = np.asarray(approx), np.asarray(exact)
    hits = total = 0
    for ra, re in zip(a, e):
        want = set(int(v) for v in re if v >= 0)
        total += len(want)
        hits += len(want.intersection(int(v) for v in ra if v >= 0))
    return hits / total if total else None


def knn(x, k: Count, *, queries=None, index: str = "flat", device: DeviceArg = None,
        nlist: int | None = None, nprobe: int | None = None, hnsw_m: int | None = None,
        ef_search: int | None = None, tie_margin: int = 8, progress: ProgressArg = False) -> KnnResult:
    """The k nearest rows of x by cosine similarity, for every query.

    k: 1 to N - 1 with self-queries (queries None or row ids), 1 to N with external queries;
    more is refused (Index.search pads instead, pairwise_stats' row lists are lowered with a
    note). x: (N, D) float. queries: None (every row of x queries, itself excluded), (Q,) int row ids
    of x (those rows query, themselves excluded) or (Q, D) float (external queries). index:
    "flat" (exact, IndexFlatIP on normalised rows), "ivf" (IVF-Flat, `nlist` lists, `nprobe`
    probed; default nlist ~4 sqrt(N) capped at N / 39, FAISS's 39 training points a list, and
    nprobe nlist / 8; an nprobe above nlist probes every list, and the result's params say so) or "hnsw" (`hnsw_m` links, default 32; `ef_search`, default max(64, 2k));
    an index's options given with another index are refused. Approximate indexes also run exact
    search and report recall@k. device: None = GPU when faiss-gpu and CUDA are usable, "cpu",
    "cuda" (the current CUDA device) or "cuda:i".
    Zero-norm rows have no direction: they are never neighbours. `tie_margin` extra candidates
    are fetched so that equal values are ordered by id. progress: True (or a progress.Progress):
    the index build as a phase, the searches as a bar of queries, on stderr. Returns KnnResult,
    tensors on x's device.
    """
    prog = as_progress(progress, "embgeom.knn")
    x = validation.embeddings(x, "x")
    index = validation.choice(index, "index", INDEXES)
    for name, value, owner in (("nlist", nlist, "ivf"), ("nprobe", nprobe, "ivf"),
                               ("hnsw_m", hnsw_m, "hnsw"), ("ef_search", ef_search, "hnsw")):
        if value is not None and index != owner:  # it would be ignored
            shown = validation.caller_name("index")
            said = (lambda v: f"{shown} {v}") if shown.startswith("--") else (lambda v: f"{shown}={v!r}")
            raise ValueError(f"{name}: only for {said(owner)}, got {said(index)}")
    k = validation.positive_int(k, "k", allow_zero=False)
    tie_margin = validation.positive_int(tie_margin, "tie_margin")
    q, self_ids = _queries(queries, x)
    n = x.shape[0]
    limit = n - 1 if self_ids is not None else n
    if k > limit:
        raise ValueError(f"k: expected <= {limit} ({'N - 1 for self-queries' if self_ids is not None else 'N'}, "
                         f"N = {n}), got {k}")
    faiss = _faiss()
    gpu = None  # the CUDA device's number for a GPU index
    if device is not None:
        dev = validation.device(device)
        if dev.type == "cuda":
            if not _gpu_usable(faiss):
                raise ValueError("device: a GPU index needs faiss with GPU support (faiss-gpu) and a usable "
                                 "CUDA device; use device='cpu'")
            gpu = torch.cuda.current_device() if dev.index is None else dev.index
    elif _gpu_usable(faiss):
        gpu = torch.cuda.current_device()
    use_gpu = gpu is not None

    start = time.perf_counter()
    xn, x_valid = _normalised(x)
    valid_ids = np.nonzero(x_valid)[0].astype(np.int64)
    excluded = np.nonzero(~x_valid)[0].tolist()
    base = np.ascontiguousarray(xn[valid_ids])
    if self_ids is not None:  # queries are rows of x: already normalised
        qn, q_valid = np.ascontiguousarray(xn[self_ids]), x_valid[self_ids]
    else:
        qn, q_valid = _normalised(q)
    n_valid = base.shape[0]
    params: dict = {}
    if index == "ivf":
        lists = nlist if nlist is not None else max(1, min(int(round(4 * math.sqrt(n_valid))), n_valid // 39 or 1))
        params = {"nlist": validation.positive_int(lists, "nlist", allow_zero=False)}
        if params["nlist"] > max(n_valid, 1):
            raise ValueError(f"nlist: expected <= number of non-zero rows ({n_valid}), got {params['nlist']}")
        # (FAISS probes at most every list: the value recorded is the one that runs)
        params["nprobe"] = min(params["nlist"], validation.positive_int(
            nprobe if nprobe is not None else max(1, params["nlist"] // 8), "nprobe", allow_zero=False))
    elif index == "hnsw":
        params = {"hnsw_m": validation.positive_int(32 if hnsw_m is None else hnsw_m, "hnsw_m",
                                                   allow_zero=False),
                  "ef_search": validation.positive_int(ef_search if ef_search is not None else max(64, 2 * k),
                                                      "ef_search", allow_zero=False),
                  "ef_construction": 80}
        if params["hnsw_m"] < 2:  # FAISS's HNSW graph with one link a node ends the process (SIGSEGV)
            raise ValueError(f"hnsw_m: expected an int >= 2, got {params['hnsw_m']}")
    want = min(n_valid, k + (1 if self_ids is not None else 0) + tie_margin)
    limit = min(n_valid, 2048) if use_gpu else n_valid  # GPU indexes limit k
    want = min(want, limit)
    _check_search_memory(qn.shape[0], want)
    recall = None  # measured for approximate indexes only
    if n_valid == 0:
        out_i = np.full((qn.shape[0], k), -1, np.int64)
        out_v = np.full((qn.shape[0], k), np.nan, np.float32)
    else:
        with prog.phase(f"building the {index} index of {counted(n_valid, 'row')}"):
            idx = _build(faiss, index, base, gpu, params)
        out_i, out_v = _search_in_parts(prog, "queries", idx, qn, want, valid_ids, self_ids, q_valid, k, limit)
        if index != "flat":
            exact = _build(faiss, "flat", base, gpu, {})
            ex_i, _ = _search_in_parts(prog, "exact search for recall", exact, qn, want, valid_ids, self_ids,
                                       q_valid, k, limit)
            recall = recall_at_k(out_i, ex_i)
    seconds = time.perf_counter() - start
    return KnnResult(
        indices=torch.from_numpy(out_i).to(x.device), values=torch.from_numpy(out_v).to(x.device),
        index=index, k=k, recall=recall, seconds=seconds,
        device=f"cuda:{gpu}" if use_gpu and index != "hnsw" else "cpu", self_query=self_ids is not None,
        excluded_rows=excluded, params=params)


# ---------------------------------------------------------------------------------------------
# CLI: embgeom knn X --k K [--index flat|ivf|hnsw] [--queries Q] --json OUT
# ---------------------------------------------------------------------------------------------


