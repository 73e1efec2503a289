"""`embgeom.sklearn.NearestNeighbors`: scikit-learn's brute-force NearestNeighbors (fit,
kneighbors, radius_neighbors, kneighbors_graph, radius_neighbors_graph) for metric "euclidean" and "cosine" on an embgeom Index, with
scikit-learn's estimator conventions (parameters in __init__, learned state in attributes
ending in "_", validate_data, check_is_fitted). scikit-learn is imported with this module.

The constructor takes scikit-learn's parameters: metric "minkowski" with p=2 (its default), "euclidean"
(or "l2") and "cosine" are answered; algorithm (any of scikit-learn's names) and leaf_size choose
among scikit-learn's search structures, which give the same neighbours, and are accepted and
recorded only (every search here is the exact scan); n_jobs is recorded only (the core uses
torch's thread count). Other metrics are refused.

Distances are the exact float64 values of the fitted rows and the queries as float32 (float64
input, fitted or queried, is rounded to float32 first, so a fitted row queried again is at
distance 0; rows closer than float32 resolves may tie), returned in scikit-learn's dtypes
(cosine: float32 when the fitted rows and the queries are float32; euclidean: float64); equal
distances are ordered by index (scikit-learn's order at ties is unspecified). cosine distance =
1 - cosine similarity; a zero-norm row has no direction and is at distance 1 from every row, as
scikit-learn has it (rows of norms below scikit-learn's 10 eps of their dtype, which its
normalize leaves unscaled, keep their direction here). The class is one of scikit-learn's
KNeighborsMixin / RadiusNeighborsMixin, so `sklearn.neighbors.kneighbors_graph(estimator, ...)`
takes a fitted one.
"""
from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
from sklearn.base import BaseEstimator

try:
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as _old:  # (validate_data is new in scikit-learn 1.6)
    import sklearn as _sklearn

    raise ImportError(f"embgeom.sklearn needs scikit-learn >= 1.6 (its validate_data), found "
                      f"{_sklearn.__version__}: pip install 'scikit-learn>=1.6'") from _old

from . import validation
from .api_types import Count, Scalar
from .index import Index

try:  # what sklearn.neighbors.kneighbors_graph(estimator) checks (a private module: optional)
    from sklearn.neighbors._base import KNeighborsMixin, RadiusNeighborsMixin
    _MIXINS: tuple = (KNeighborsMixin, RadiusNeighborsMixin)
except ImportError:  # pragma: no cover
    _MIXINS = ()

try:  # scikit-learn's own parameter error: a ValueError and a TypeError at once
    from sklearn.utils._param_validation import InvalidParameterError as _ParameterError
except ImportError:  # pragma: no cover
    _ParameterError = ValueError

METRICS = {"euclidean": "l2", "l2": "l2", "cosine": "cosine", "minkowski": "l2"}
ALGORITHMS = ("auto", "ball_tree", "kd_tree", "brute")


class NearestNeighbors(*_MIXINS, BaseEstimator):
    """Unsupervised nearest neighbours, scikit-learn's constructor. n_neighbors: default k of
    kneighbors (None: only radius queries); radius: default radius of radius_neighbors; metric:
    "minkowski" (p=2 only), "euclidean" (or "l2") or "cosine"; algorithm, leaf_size, n_jobs:
    accepted and recorded (every search is the exact scan); metric_params: None or {} (or {"p":
    2}); dtype (ours): the scan precision of the index ("float32" or "bfloat16"; results are
    exact either way)."""

    def __init__(self, *, n_neighbors: Count | None = 5, radius: Scalar = 1.0, algorithm: str = "auto",
                 leaf_size: int = 30, metric: str = "minkowski", p: float = 2, metric_params: dict | None = None,
                 n_jobs: int | None = None, dtype: str = "float32"):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.metric = metric
        self.p = p
        self.metric_params = metric_params
        self.n_jobs = n_jobs
        self.dtype = dtype

    def _check_params(self) -> str:
        """The index metric the parameters ask for; ValueError naming the parameter that cannot
        be answered."""
        if self.metric not in METRICS:
            raise _ParameterError(f"metric: expected one of {', '.join(map(repr, METRICS))}, got {self.metric!r}")
        if self.algorithm not in ALGORITHMS:
            raise _ParameterError(f"algorithm: expected one of {', '.join(map(repr, ALGORITHMS))}, got {self.algorithm!r}")
        if isinstance(self.leaf_size, bool) or not isinstance(self.leaf_size, (int, np.integer)) or self.leaf_size < 1:
            raise _ParameterError(f"leaf_size: expected an int >= 1, got {self.leaf_size!r}")
        if self.n_jobs is not None and (isinstance(self.n_jobs, bool) or not isinstance(self.n_jobs, (int, np.integer))):
            raise _ParameterError(f"n_jobs: expected None or an int, got {self.n_jobs!r}")
        params = {} if self.metric_params is None else self.metric_params
        if not isinstance(params, dict) or set(params) - {"p"}:
            raise _ParameterError(f"metric_params: expected None or {{'p': 2}}, got {self.metric_params!r}")
        if "p" in params and self.p is not None:  # scikit-learn's own warning, in its category
            warnings.warn("Parameter p is found in metric_params. The corresponding parameter from __init__ is "
                          "ignored.", SyntaxWarning, stacklevel=3)
        p = params.get("p", self.p)
        if self.metric == "minkowski" and p != 2:
            raise _ParameterError(f"p: only p=2 (euclidean) is answered with metric 'minkowski', got {p!r}")
        if self.n_neighbors is not None and (isinstance(self.n_neighbors, bool)
                                             or not isinstance(self.n_neighbors, (int, np.integer))
                                             or self.n_neighbors < 1):
            raise _ParameterError(f"n_neighbors: expected None or an int >= 1, got {self.n_neighbors!r}")
        try:
            validation.number(self.radius, "radius")
        except TypeError:
            raise _ParameterError(f"radius: expected a number, got {self.radius!r}") from None
        return METRICS[self.metric]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        return tags

    def fit(self, X, y=None) -> NearestNeighbors:
        metric = self._check_params()
        given = X
        X = validate_data(self, _numpy_if_tensor(X), dtype=[np.float64, np.float32], ensure_min_samples=1)
        with validation.renamed(corpus="X"):
            self.index_ = Index(np.ascontiguousarray(X), metric=metric, dtype=self.dtype)
        self.n_samples_fit_ = X.shape[0]
        self.effective_metric_ = "euclidean" if self.metric == "minkowski" else self.metric  # (as scikit-learn's)
        self.effective_metric_params_ = {}
        self._fit_float32 = X.dtype == np.float32
        # under cosine the zero rows, at distance 1 from every row (scikit-learn's cosine of a
        # zero row is 0); the index never lists them
        self._zero_rows = np.flatnonzero(~np.any(X != 0, axis=1)) if metric == "cosine" else np.zeros(0, np.int64)
        # the fitted array itself, as a query: scikit-learn's cosine then puts every row at
        # distance 0 from itself (its `X is Y` diagonal), a zero row too; that is the caller's
        # array where validation kept it as it is (a float ndarray), as scikit-learn keeps it
        self.__dict__.pop("_fit_X_cache", None)
        self._fit_given = weakref.ref(X) if X is given else None
        return self

    @property
    def _fit_X(self) -> np.ndarray:
        """The fitted rows as stored (float32, one array kept), where scikit-learn keeps its
        own: its kneighbors_graph(estimator, include_self=True) queries them."""
        if "_fit_X_cache" not in self.__dict__:
            self.__dict__["_fit_X_cache"] = self.index_.vectors().cpu().numpy()
        return self.__dict__["_fit_X_cache"]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fit_X_cache", None)  # (a view of the index's rows: rebuilt on use)
        state["_fit_given"] = None       # (a weak reference does not pickle)
        return state

    def _is_fit_input(self, X) -> bool:
        """X is the very array the estimator was fitted on (or its _fit_X)."""
        if X is None:
            return False
        given = getattr(self, "_fit_given", None)
        return X is self.__dict__.get("_fit_X_cache") or (given is not None and X is given())

    def _query(self, X):
        if X is None:
            return None
        return validate_data(self, _numpy_if_tensor(X), dtype=[np.float64, np.float32], reset=False)

    def _queries(self, Xq) -> torch.Tensor:
        """The rows to search: the stored ones (X=None), or the queries rounded to float32 as the
        fitted rows were (a fitted float64 row queried again had been 1e-8 from its own copy);
        a read-only array (a memory map's) is read where it is."""
        if Xq is None:
            return self.index_.vectors()
        return validation.numpy_tensor(np.ascontiguousarray(Xq, dtype=np.float32))

    def _distance_dtype(self, Xq):
        """scikit-learn's brute cosine keeps float32 when the fitted rows and the queries
        (X=None: the fitted rows) are float32; every other distance is float64."""
        single = self.index_.metric == "cosine" and self._fit_float32 and (Xq is None or Xq.dtype == np.float32)
        return np.float32 if single else np.float64

    def _to_distance(self, s: np.ndarray, Xq) -> np.ndarray:
        """Similarities -> distances, in scikit-learn's dtype."""
        d = s if self.index_.metric == "l2" else np.clip(1.0 - s, 0.0, 2.0)
        return d.astype(self._distance_dtype(Xq), copy=False)

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """(distances (Q, k) in scikit-learn's dtype (module docstring), indices (Q, k) int64),
        nearest first, equal distances by index. X=None: the fitted rows query, each not counted
        as its own neighbour."""
        check_is_fitted(self)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if k is None:
            raise _ParameterError("n_neighbors: this estimator was made with n_neighbors=None; pass n_neighbors")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise _ParameterError(f"n_neighbors: expected an int >= 1, got {k!r}")
        dist, ids = self._kneighbors(self._query(X), int(k), itself=self._is_fit_input(X))
        return (dist, ids) if return_distance else ids

    def _kneighbors(self, Xq, k: int, itself: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """kneighbors of validated queries (None: the fitted rows, themselves excluded; itself:
        the queries are the fitted array, each row at distance 0 from itself)."""
        self_query = Xq is None
        limit = self.n_samples_fit_ - (1 if self_query else 0)
        if k > limit:
            raise ValueError(f"n_neighbors: expected <= n_samples_fit = {self.n_samples_fit_}"
                             f"{' - 1 (X=None)' if self_query else ''}, got {k}")
        queries = self._queries(Xq)
        with validation.renamed(queries="X"):
            s, ids = self.index_.search(queries, k + (1 if self_query else 0), float64=True)
        s, ids = s.cpu().numpy(), ids.cpu().numpy()
        zero_query = self._zero_queries(queries)
        if self._zero_rows.size or zero_query.any():
            s, ids = self._with_zero_rows(s, ids, zero_query, k + (1 if self_query else 0), itself)
        if self_query:  # drop each row itself (or, where it is not listed, the last one)
            own = ids == np.arange(ids.shape[0])[:, None]
            own[~own.any(1), -1] = True
            keep = ~own
            s = s[keep].reshape(ids.shape[0], k)
            ids = ids[keep].reshape(ids.shape[0], k)
        dist = self._to_distance(s, Xq)
        # equal distances as reported (two similarities an ulp apart round to one float32
        # distance) by index
        order = np.lexsort((ids, dist), axis=-1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def _zero_queries(self, queries: torch.Tensor) -> np.ndarray:
        """(Q,) bool: the queries that are zero rows, under cosine (none under l2, where a zero
        row is a point like any other)."""
        if self.index_.metric != "cosine":
            return np.zeros(queries.shape[0], bool)
        return ~torch.any(queries != 0, dim=1).cpu().numpy()

    def _with_zero_rows(self, s: np.ndarray, ids: np.ndarray, zero_query: np.ndarray, width: int,
                        itself: bool = False):
        """Cosine search results with scikit-learn's zero rows: a zero fitted row scores 0
        (distance 1) against every query, a zero query 0 against every row (itself: the queries
        are the fitted rows, and a zero one scores 1 against itself, scikit-learn's diagonal).
        Each query's width best of its listed rows and the zero rows, by (score desc, index asc)."""
        n = self.n_samples_fit_
        extra = self._zero_rows[:width]
        cand_s = np.concatenate([s, np.zeros((s.shape[0], extra.size))], axis=1)
        cand_i = np.concatenate([ids, np.broadcast_to(extra, (s.shape[0], extra.size))], axis=1)
        if zero_query.any():  # every row at score 0: the first width rows by index
            cand_s[zero_query] = -np.inf
            cand_i[zero_query] = -1
            first = np.arange(min(width, n))
            cand_s[zero_query, :first.size] = 0.0
            cand_i[zero_query, :first.size] = first
        cand_s = np.where(cand_i < 0, -np.inf, cand_s)
        order = np.lexsort((np.where(cand_i < 0, n, cand_i), -cand_s), axis=-1)[:, :width]
        s, ids = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        if itself:  # a zero row against itself: first, at score 1 (distance 0)
            for q in np.flatnonzero(zero_query):
                others = [i for i in range(min(width + 1, n)) if i != q][:width - 1]
                ids[q] = np.concatenate([[q], others]).astype(np.int64)
                s[q] = np.concatenate([[1.0], np.zeros(width - 1)])
        return np.where(ids < 0, np.nan, s), ids

    def radius_neighbors(self, X=None, radius=None, return_distance=True, sort_results=False):
        """Per query, every fitted row within `radius` (its distance as reported, in its dtype,
        <= radius): object arrays of (distances, indices) arrays; nearest first with
        sort_results=True (equal distances by index), else by index, as scikit-learn's brute
        search lists them. radius inf: every fitted row; NaN, or a negative
        cosine radius: no row; a negative euclidean radius is refused (scikit-learn's brute
        search, all three)."""
        check_is_fitted(self)
        if sort_results and not return_distance:
            raise ValueError("sort_results: return_distance must be True if sort_results is True")
        given = self.radius if radius is None else radius
        r = float(given)
        # the listing test as scikit-learn's `d <= radius`: a numpy float64 radius compares in
        # float64, a Python float (NumPy 2's weak scalar) in the distances' dtype (not its float32
        # euclidean reduction's d^2 <= float32(float32(r)^2): the distances reported are exact,
        # and one given back as the radius lists its row; README, drop-ins)
        r_test = given if isinstance(given, (np.generic, np.ndarray)) else r
        if r < 0 and self.index_.metric == "l2":
            raise ValueError(f"radius: expected a distance >= 0 (or inf: every row), got {r}")
        if math.isnan(r) or r < 0:  # no distance is below it
            Xq = self._query(X)
            Q = self.n_samples_fit_ if Xq is None else Xq.shape[0]
            empty = np.zeros(0, self._distance_dtype(Xq))
            return _object_rows([empty] * Q, [np.zeros(0, np.int64)] * Q, return_distance)
        if r == math.inf:  # every fitted row, as kneighbors lists them all (its -1 padding left out)
            X_all = None if X is None else self._query(X)
            k = self.n_samples_fit_ - (1 if X is None else 0)
            if k == 0:
                Q = self.n_samples_fit_ if X is None else X_all.shape[0]
                empty = np.zeros(0, self._distance_dtype(X_all))
                return _object_rows([empty] * Q, [np.zeros(0, np.int64)] * Q, return_distance)
            # (X_all validated once: no feature-name warning)
            dist, ids = self._kneighbors(X_all, k, itself=self._is_fit_input(X))
            found = ids >= 0
            return _object_rows(*_listed([d[f] for d, f in zip(dist, found)], [i[f] for i, f in zip(ids, found)],
                                         sort_results), return_distance)
        Xq = self._query(X)
        self_query = Xq is None
        queries = self._queries(Xq)
        with validation.renamed(queries="X"):
            if self.index_.metric == "l2":
                lims, s, ids = self.index_._range(queries, r, float64=True, by_score=sort_results)
            else:
                # decided on the distance reported (1 - s, rounded, in its dtype), not on s >= 1 - r:
                # rounded apart, a distance equal to the radius had been left out and one above it
                # listed. The search takes every s whose distance may round to <= r (a float32
                # distance by half an ulp of r), the filter below the rest.
                slack = abs(r) * 2.0 ** -23 + 2.0 ** -50
                lims, s, ids = self.index_._range(queries, 1.0 - r - slack, float64=True, by_score=sort_results)
        lims, s, ids = lims.cpu().numpy(), s.cpu().numpy(), ids.cpu().numpy()
        dist = self._to_distance(s, Xq)
        Q = lims.shape[0] - 1
        # under cosine a zero row (fitted or queried) is at distance 1 from every row, and a zero
        # row of the fitted array queried as itself at 0 from itself (scikit-learn's diagonal)
        cosine = self.index_.metric == "cosine"
        one = self._to_distance(np.zeros(1), Xq)
        at_one = cosine and bool(one[0] <= r_test)
        zero_query = self._zero_queries(queries)
        itself = cosine and self._is_fit_input(X)
        out_d, out_i = [], []
        for q in range(Q):
            d_q, i_q = dist[lims[q]:lims[q + 1]], ids[lims[q]:lims[q + 1]]
            if zero_query[q]:
                i_q = np.arange(self.n_samples_fit_) if at_one else np.zeros(0, np.int64)
                d_q = np.repeat(one, i_q.size)
                if itself:
                    i_q = np.union1d(i_q, [q])
                    d_q = np.where(i_q == q, 0.0, one[0]).astype(one.dtype)
            elif at_one and self._zero_rows.size:
                d_q = np.concatenate([d_q, np.repeat(one, self._zero_rows.size)])
                i_q = np.concatenate([i_q, self._zero_rows])
                if not sort_results:   # (the rest came by id)
                    order = np.argsort(i_q, kind="stable")
                    d_q, i_q = d_q[order], i_q[order]
            if sort_results:
                order = np.lexsort((i_q, d_q))  # (equal distances as reported by index)
                d_q, i_q = d_q[order], i_q[order]
            keep = np.ones(i_q.shape, bool) if self.index_.metric == "l2" else d_q <= r_test
            if self_query:
                keep &= i_q != q
            d_q, i_q = d_q[keep], i_q[keep]
            out_d.append(d_q)
            out_i.append(i_q)
        return _object_rows(out_d, out_i, return_distance)

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity"):
        """scipy.sparse CSR (Q, n_samples_fit): each query's k neighbours, 1.0
        (mode="connectivity") or their distances (mode="distance", zeros kept as entries), as
        scikit-learn's; X=None: the fitted rows, each not its own neighbour (under cosine a
        zero row is at distance 1 from every row, as scikit-learn has it)."""
        _graph_mode(mode)
        dist, ids = self.kneighbors(X, n_neighbors, return_distance=True)
        found = ids >= 0
        indptr = np.concatenate([[0], np.cumsum(found.sum(1))])
        data = np.ones(int(indptr[-1])) if mode == "connectivity" else dist[found]
        return _csr(data, ids[found], indptr, ids.shape[0], self.n_samples_fit_)

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity", sort_results=False):
        """scipy.sparse CSR (Q, n_samples_fit) of radius_neighbors: 1.0 or the distances
        (zeros kept as entries); each query's entries nearest first with mode="distance" and
        sort_results=True, else by column, as scikit-learn's brute search leaves them."""
        _graph_mode(mode)
        dist, ids = self.radius_neighbors(X, radius, return_distance=True,
                                          sort_results=sort_results and mode == "distance")
        counts = np.array([len(i) for i in ids], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        cols = np.concatenate(list(ids)) if len(ids) else np.zeros(0, np.int64)
        data = np.ones(len(cols)) if mode == "connectivity" else \
            (np.concatenate(list(dist)) if len(dist) else np.zeros(0))
        return _csr(data, cols, indptr, len(ids), self.n_samples_fit_)


def _numpy_if_tensor(X):
    """A torch tensor as the numpy array scikit-learn would make of it: validate_data with a
    dtype list turned a tensor (no numpy dtype) into float64, where scikit-learn keeps float32."""
    if isinstance(X, torch.Tensor) and X.dtype != torch.bfloat16:  # (numpy has no bfloat16)
        validation.dense_tensor(X, "X")
        return X.detach().cpu().resolve_conj().resolve_neg().numpy()
    return X


def _listed(dist: list, ids: list, sort_results: bool) -> tuple[list, list]:
    """radius_neighbors' rows (each nearest first) as returned: by index unless sort_results,
    the order scikit-learn's brute search gives them (np.where over each row)."""
    if sort_results:
        return dist, ids
    order = [np.argsort(i, kind="stable") for i in ids]
    return [d[o] for d, o in zip(dist, order)], [i[o] for i, o in zip(ids, order)]


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
    """The graph as scikit-learn builds it, data in its dtype: from 1.8 a csr_array of int64
    indices in the sparse interface scikit-learn is set to hand out; before, a csr_matrix made
    from the three arrays, which scipy narrows to int32 indices (Python 3.10 has at most 1.7)."""
    from scipy.sparse import csr_array, csr_matrix

    arrays = (np.asarray(data), np.asarray(indices, np.int64), np.asarray(indptr, np.int64))
    try:
        from sklearn.utils import _align_api_if_sparse   # scikit-learn >= 1.8
    except ImportError:
        return csr_matrix(arrays, shape=(rows, cols))
    return _align_api_if_sparse(csr_array(arrays, shape=(rows, cols)))
