"""`embgeom.sklearn.NearestNeighbors`: scikit-learn's brute-force NearestNeighbors (fit,
kneighbors, radius_neighbors, kneighbors_graph, radius_neighbors_graph) for metric "euclidean" and "cosine" on an embgeom Index, with
scikit-learn's estimator conventions (parameters in __init__, learned state in attributes
ending in "_", validate_data, check_is_fitted). scikit-learn is imported with this module.

Distances are the exact float64 values of the fitted rows (float32 storage); equal distances are
ordered by index (scikit-learn's order at ties is unspecified). cosine distance = 1 - cosine
similarity; a zero-norm row has no direction and is never a neighbour (scikit-learn gives it
distance 1 to everything).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

from . import validation
from .index import Index

METRICS = {"euclidean": "l2", "l2": "l2", "cosine": "cosine"}


class NearestNeighbors(BaseEstimator):
    """Unsupervised nearest neighbours. n_neighbors: default k of kneighbors; radius: default
    radius of radius_neighbors; metric: "euclidean" (or "l2") or "cosine"; dtype: the scan
    precision of the index ("float32" or "bfloat16"; results are exact either way)."""

    def __init__(self, n_neighbors: int = 5, radius: float = 1.0, metric: str = "euclidean",
                 dtype: str = "float32"):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.metric = metric
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        return tags

    def fit(self, X, y=None):
        if self.metric not in METRICS:
            raise ValueError(f"metric: expected one of {', '.join(map(repr, METRICS))}, got {self.metric!r}")
        if isinstance(self.n_neighbors, bool) or not isinstance(self.n_neighbors, (int, np.integer)) \
                or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors: expected an int >= 1, got {self.n_neighbors!r}")
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=1)
        with validation.renamed(corpus="X"):
            self.index_ = Index(np.ascontiguousarray(X), metric=METRICS[self.metric], dtype=self.dtype)
        self.n_samples_fit_ = X.shape[0]
        self.effective_metric_ = "euclidean" if METRICS[self.metric] == "l2" else "cosine"
        return self

    def _query(self, X):
        if X is None:
            return None
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    def _to_distance(self, s: np.ndarray) -> np.ndarray:
        return s if self.index_.metric == "l2" else np.clip(1.0 - s, 0.0, 2.0)

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """(distances (Q, k) float64, indices (Q, k) int64), nearest first. X=None: the fitted
        rows query, each not counted as its own neighbour."""
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_neighbors: expected an int >= 1, got {k!r}")
        Xq = self._query(X)
        self_query = Xq is None
        limit = self.n_samples_fit_ - (1 if self_query else 0)
        if k > limit:
            raise ValueError(f"n_neighbors: expected <= n_samples_fit = {self.n_samples_fit_}"
                             f"{' - 1 (X=None)' if self_query else ''}, got {k}")
        queries = self.index_.vectors() if self_query else torch.from_numpy(np.ascontiguousarray(Xq))
        with validation.renamed(queries="X"):
            s, ids = self.index_.search(queries, k + (1 if self_query else 0), float64=True)
        s, ids = s.cpu().numpy(), ids.cpu().numpy()
        if self_query:  # drop each row itself (or, where it is not listed, the last one)
            own = ids == np.arange(ids.shape[0])[:, None]
            own[~own.any(1), -1] = True
            keep = ~own
            s = s[keep].reshape(ids.shape[0], k)
            ids = ids[keep].reshape(ids.shape[0], k)
        dist = self._to_distance(s)
        return (dist, ids) if return_distance else ids

    def radius_neighbors(self, X=None, radius=None, return_distance=True, sort_results=False):
        """Per query, every fitted row within `radius`: object arrays of (distances, indices)
        arrays; nearest first (the results are always sorted, whatever sort_results). radius inf:
        every fitted row, as scikit-learn; a negative or NaN radius is refused (scikit-learn
        refuses a negative euclidean one and answers nothing for NaN)."""
        check_is_fitted(self)
        if sort_results and not return_distance:
            raise ValueError("sort_results: return_distance must be True if sort_results is True")
        r = float(self.radius if radius is None else radius)
        if math.isnan(r) or r < 0:
            raise ValueError(f"radius: expected a distance >= 0 (or inf: every row), got {r}")
        if r == math.inf:  # every fitted row, as kneighbors lists them all (its -1 padding left out)
            X_all = None if X is None else self._query(X)
            k = self.n_samples_fit_ - (1 if X is None else 0)
            if k == 0:
                Q = self.n_samples_fit_ if X is None else X_all.shape[0]
                return _object_rows([np.zeros(0)] * Q, [np.zeros(0, np.int64)] * Q, return_distance)
            dist, ids = self.kneighbors(X_all, k)
            found = ids >= 0
            return _object_rows([d[f] for d, f in zip(dist, found)], [i[f] for i, f in zip(ids, found)],
                                return_distance)
        Xq = self._query(X)
        self_query = Xq is None
        queries = self.index_.vectors() if self_query else torch.from_numpy(np.ascontiguousarray(Xq))
        with validation.renamed(queries="X"):
            if self.index_.metric == "l2":
                lims, s, ids = self.index_.range_search(queries, r, float64=True)
            else:
                lims, s, ids = self.index_.range_search(queries, 1.0 - r, float64=True)
        lims, s, ids = lims.cpu().numpy(), s.cpu().numpy(), ids.cpu().numpy()
        dist = self._to_distance(s)
        Q = lims.shape[0] - 1
        out_d, out_i = [], []
        for q in range(Q):
            d_q, i_q = dist[lims[q]:lims[q + 1]], ids[lims[q]:lims[q + 1]]
            if self_query:
                mine = i_q != q
                d_q, i_q = d_q[mine], i_q[mine]
            out_d.append(d_q)
            out_i.append(i_q)
        return _object_rows(out_d, out_i, return_distance)

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """scipy.sparse CSR (Q, n_samples_fit): each query's k neighbours, 1.0
        (mode="connectivity") or their distances (mode="distance", zeros kept as entries), as
        scikit-learn's; X=None: the fitted rows, each not its own neighbour. Under cosine a
        zero row is nobody's neighbour and a zero query has none: kneighbors' padding (id -1)
        is left out, so such a query's row holds fewer than k entries."""
        _graph_mode(mode)
        dist, ids = self.kneighbors(X, n_neighbors, return_distance=True)
        found = ids >= 0
        indptr = np.concatenate([[0], np.cumsum(found.sum(1))])
        data = np.ones(int(indptr[-1])) if mode == "connectivity" else dist[found]
        return _csr(data, ids[found], indptr, ids.shape[0], self.n_samples_fit_)

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity", sort_results=False):
        """scipy.sparse CSR (Q, n_samples_fit) of radius_neighbors: 1.0 or the distances
        (zeros kept as entries), each query's entries nearest first."""
        _graph_mode(mode)
        dist, ids = self.radius_neighbors(X, radius, return_distance=True, sort_results=sort_results)
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        cols = np.concatenate(list(ids)) if len(ids) else np.zeros(0, np.int64)
        data = np.ones(len(cols)) if mode == "connectivity" else \
            (np.concatenate(list(dist)) if len(dist) else np.zeros(0))
        return _csr(data, cols, indptr, len(ids), self.n_samples_fit_)


def _object_rows(dist: list, ids: list, return_distance: bool):
    """radius_neighbors' result: object arrays of each query's (distances, indices) arrays."""
    out_d, out_i = np.empty(len(ids), dtype=object), np.empty(len(ids), dtype=object)
    for q, (d, i) in enumerate(zip(dist, ids)):
        out_d[q], out_i[q] = d, i
    return (out_d, out_i) if return_distance else out_i


def _graph_mode(mode) -> None:
    if mode not in ("connectivity", "distance"):
        raise ValueError(f"mode: expected 'connectivity' or 'distance', got {mode!r}")


def _csr(data, indices, indptr, rows: int, cols: int):
    from scipy.sparse import csr_matrix

    return csr_matrix((np.asarray(data, np.float64), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
                      shape=(rows, cols))
