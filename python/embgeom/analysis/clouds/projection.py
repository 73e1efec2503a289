"""2-D projections on the exact neighbour graph: PCA, UMAP and t-SNE fed with the engine's exact
k nearest neighbours (docs/metrics.md, point clouds).
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
import numpy as np
import torch
from ... import validation
from ...formatting import fmt
from ...api_types import DataFrame, ProgressArg
from ...api import pairwise_stats
from ...backends import registry
from .geometry import as_matrix, as_matrix64, silhouette, translated



METHODS = ("umap", "tsne", "pca")


LAYOUT_PACKAGES = {"umap": ("umap", "umap-learn"), "tsne": ("openTSNE", "openTSNE")}


def _require(module: str, package: str):
    return validation.require_package(module, package, "clouds")


def require_packages(*methods: str) -> None:
    """ValueError naming the package a layout method needs, where it cannot be imported."""
    for method in methods:
        if method in LAYOUT_PACKAGES:
            _require(*LAYOUT_PACKAGES[method])


# ---------------------------------------------------------------------------------- graph
EPS64 = float(np.finfo(np.float64).eps)


def fp32_cosine_error(d: int) -> float:
    """A bound on |fp32 cosine - exact cosine| for the engine's exact-mode values, u = 2^-24:
    float64 rows rounded to float32 and their norm (2u a component), the unit rows rounded to
    float32 (u), so 6u over the products' absolute sum (<= 1 for unit rows), and a d-term fp32
    sum (gamma_d = d u / (1 - d u), any summation order); a tenth more covers the second-order
    terms and the float64 rescoring's own rounding."""
    du = (d + 6) * 2.0 ** -24
    return 1.1 * du / (1.0 - du)


GRAPH_METRICS = ("cosine", "euclidean")


def exact_knn(x, k: int, *, metric: str = "cosine", backend: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact k-NN graph in float64: the fused engine's per-row top-(k + extra) cosines (bottom for
    Euclidean distances) in fp32, their values recomputed in float64 from the input's rows and each
    row re-sorted by them (near-collinear clouds have cosine distances down to 1e-6, where the
    engine's float32 values keep one or two digits). A row's k best are certain when its k-th
    float64 value beats its last candidate's fp32 value by more than the fp32 error bound: every
    other column's exact value lies beyond. Rows without that certificate are searched in float64
    against every row.

    x: (N, D); k <= N - 1; metric "cosine" or "euclidean". Returns indices (N, k) int64 (self
    excluded; cosine descending or distance ascending, ties by column index), the values (N, k)
    float64 (cosine similarities, or Euclidean distances) and the seconds it took. Under cosine
    zero rows have no direction: they are an error there."""
    metric = validation.metric(metric, "metric", GRAPH_METRICS)
    xm = as_matrix(x)
    n = xm.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k: expected 1 <= k <= N - 1 = {n - 1}, got {k}")
    cosine = metric == "cosine"
    zero = np.nonzero(~np.any(xm != 0, axis=1))[0]
    if cosine and zero.size:
        raise ValueError(f"x: zero rows have no cosine neighbours: {validation.some_rows(zero.tolist())}")
    start = time.perf_counter()
    wide = min(n - 1, k + max(8, k // 8))  # the candidates beyond k make the certificate
    x64 = as_matrix64(x)
    rows = xm
    if not cosine:
        # distances do not move with a translation: the engine gets the rows less the row nearest
        # their float64 mean, so a cloud far from the origin keeps its digits in fp32 (embeddings
        # share a large common component); the certificate's norms are the translated ones
        centred = translated(x64)
        rows = centred.astype(np.float32)
    res = pairwise_stats(torch.from_numpy(rows), metric=metric, bins=0, topk=0, bottomk=0,
                         row_topk=wide if cosine else 0, row_bottomk=0 if cosine else wide, backend=backend)
    rows32 = res.row_topk if cosine else res.row_bottomk
    idx = rows32.indices.cpu().numpy().astype(np.int64)
    last32 = rows32.values.cpu().numpy().astype(np.float64)[:, -1]
    pair_values = registry.cpp_kernel("pair_values")
    if pair_values is not None and np.array_equal(xm, x64):  # float32 rows: the C++ pair sums
        def rescore(i, rows=None):
            return rescore_pairs(pair_values, xm, i, rows, metric)
    elif cosine:  # float64 rows: cosines in one fixed order, a function of the two rows alone
        scaled = scaled_rows(x64)

        def rescore(i, rows=None):
            return cosines64(scaled, i, rows)
    else:
        def rescore(i, rows=None):
            return rescore64(x64, i, rows, metric=metric)
    idx, val = _by_value(idx, rescore(idx), metric)
    if wide < n - 1:  # (with every other row a candidate there is nothing outside to fear)
        if cosine:
            sure = val[:, k - 1] > last32 + fp32_cosine_error(xm.shape[1])
        else:
            # |fp32 d^2 - d^2| <= e (|c_i|^2 + |c_j|^2) (fp32_euclidean_error; c the centred
            # rows, whose own float64 rounding e covers), |c_j| at most the largest norm; a column
            # outside the list has fp32 distance >= last32
            sq = np.einsum("ij,ij->i", centred, centred)
            floor = last32 * last32 * (1.0 - 2.0 ** -22) - fp32_euclidean_error(xm.shape[1]) * (sq + sq.max())
            sure = val[:, k - 1] * val[:, k - 1] < floor
        unsure = np.nonzero(~sure)[0]
        if unsure.size:
            found = knn_float64_rows(x64, unsure, k, metric=metric, centred=None if cosine else centred)
            idx[unsure, :k], val[unsure, :k] = _by_value(found, rescore(found, unsure), metric)
    seconds = time.perf_counter() - start
    return np.ascontiguousarray(idx[:, :k]), np.ascontiguousarray(val[:, :k]), seconds


def fp32_euclidean_error(d: int) -> float:
    """e with |fp32 squared distance - exact one| <= e (|x|^2 + |y|^2) for the engine's exact-mode
    Euclidean values (|x|^2 + |y|^2 - 2 x.y in fp32, or the direct sum for near-duplicates): the
    rows rounded to float32 (<= 4u (|x|^2 + |y|^2)), the norms' and the product's d-term fp32 sums
    (gamma_d each, 2 gamma_d over |x|^2 + |y|^2) and the two additions (4u): four times the cosine
    bound covers it with room."""
    return 4.0 * fp32_cosine_error(d)


def _by_value(idx: np.ndarray, val: np.ndarray, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by float64 value, cosine descending or distance ascending, ties by column
    ascending."""
    order = np.lexsort((idx, -val if metric == "cosine" else val), axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)


def knn_float64_rows(x64: np.ndarray, rows: np.ndarray, k: int, chunk: int = 256, *,
                     metric: str = "cosine", centred: np.ndarray | None = None) -> np.ndarray:
    """The k nearest columns of each of `rows` by float64 cosine (or Euclidean distance) against
    every row (itself excluded; ties by column), (len(rows), k) int64: the search behind rows whose
    fp32 candidates are not certain (exact_knn). centred: geometry.translated(x64), where the
    caller has it already (Euclidean)."""
    if metric == "euclidean":
        return _knn_float64_rows_euclidean(x64, rows, k, chunk, translated(x64) if centred is None else centred)
    nrm = np.linalg.norm(x64, axis=1)
    unit = x64 / nrm[:, None]
    # the product's cosines are within `slack` of cosines64's (the unit rows' rounding, the
    # D-term sums in an order the product's blocking sets, those of cosines64): the columns
    # within twice that of the k-th are rescored in the fixed order, which decides (identical
    # rows had been set an ulp apart by where they sat, and a tie group cut at k by that
    # instead of by column)
    slack = 4.0 * (x64.shape[1] + 4) * EPS64
    scaled = scaled_rows(x64)
    out = np.empty((rows.size, k), np.int64)
    for r0 in range(0, rows.size, chunk):
        part = rows[r0:r0 + chunk]
        vals = unit[part] @ unit.T
        vals[np.arange(part.size), part] = -np.inf
        # torch.topk: np.partition degrades on long ties (100 ns an element on identical rows)
        kth = torch.topk(torch.from_numpy(vals), k, dim=1, sorted=False).values.amin(1).numpy()
        for q in range(part.size):
            # every column that can be among the k best (fewer than k above the k-th's band, the
            # band's columns), ordered by their fixed-order cosines and column: no sort of a long
            # tie by the product's values
            cand = np.flatnonzero(vals[q] >= kth[q] - 2 * slack)
            cand = cand[cand != part[q]]
            exact = cosines64(scaled, cand[None, :], np.array([part[q]]))[0]
            out[r0 + q] = cand[np.lexsort((cand, -exact))[:k]]
    return out


def scaled_rows(x64: np.ndarray) -> np.ndarray:
    """x64 (N, D) with each row multiplied by the power of two that brings its largest magnitude
    into [0.5, 1): exact, cosines unchanged, and the rows' squared sums neither overflow nor
    underflow (cosines64's input)."""
    big = np.abs(x64).max(axis=1) if x64.size else np.zeros(x64.shape[0])
    return np.ascontiguousarray(np.ldexp(x64, -np.frexp(np.where(big > 0, big, 1.0))[1][:, None]))


def cosines64(scaled: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine of every row i (or rows[i]) of a float64 cloud, its rows scaled (scaled_rows), with
    its listed neighbours idx[i] (R, k), each s_qc / sqrt(s_qq s_cc) from three sums in one fixed
    order (_C.pair_cosines of float64 rows): a function of the two rows alone, so identical rows
    tie exactly wherever they sit. Without the C++ core: rescore64."""
    cosines = registry.cpp_kernel("pair_cosines")
    if cosines is None:
        return rescore64(scaled, idx, rows)
    rows = np.arange(idx.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    k = idx.shape[1]
    ids = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    return cosines(scaled, scaled, np.repeat(rows, k), ids).reshape(rows.size, k)


def _knn_float64_rows_euclidean(x64: np.ndarray, rows: np.ndarray, k: int, chunk: int,
                                centred: np.ndarray) -> np.ndarray:
    """knn_float64_rows under Euclidean distance. The squared distances of the translated rows c
    (geometry.translated) by float64 matrix products, s = |c_i|^2 + |c_j|^2 - 2 c_i.c_j, are
    within E = 4 (D + 6) eps64 (|c_i|^2 + |c_j|^2) of the exact ones (the products' and norms'
    D-term sums, the translation's rounding); every column whose s - E exceeds the row's k-th
    smallest s + E is out, and the rest get their exact distances from the differences of the
    input rows (no cancellation), or keep s where E is 0 (c_i = c_j = 0: both rows equal the
    reference row, s = 0 exactly). Cost: a float64
    product per chunk of rows plus the differences of the few columns near each row's boundary
    (scipy's cdist of a whole row took 20 ms against the vocabulary)."""
    sq = np.einsum("ij,ij->i", centred, centred)
    slack = 4.0 * (x64.shape[1] + 6) * EPS64
    out = np.empty((rows.size, k), np.int64)
    for r0 in range(0, rows.size, chunk):
        part = rows[r0:r0 + chunk]
        s = sq[part, None] + sq[None, :] - 2.0 * (centred[part] @ centred.T)
        err = slack * (sq[part, None] + sq[None, :])
        hi = s + err
        hi[np.arange(part.size), part] = np.inf
        bound = torch.topk(torch.from_numpy(hi), k, dim=1, largest=False, sorted=False).values.amax(1).numpy()
        for q in range(part.size):
            cand = np.flatnonzero(s[q] - err[q] <= bound[q])
            cand = cand[cand != part[q]]
            d2 = s[q, cand].copy()
            loose = err[q, cand] > 0
            if loose.any():
                diff = x64[cand[loose]] - x64[part[q]]
                d2[loose] = np.einsum("ij,ij->i", diff, diff)
            out[r0 + q] = cand[np.lexsort((cand, d2))[:k]]
    return out


def rescore_pairs(pair_values, xm: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None,
                  metric: str = "cosine") -> np.ndarray:
    """rescore64 for float32 rows xm (N, D): _C.pair_values' float64 sums of the exact products
    (one fixed order), divided by the float64 norms (the same sums of each row with itself), or
    its float64 sums of the squared differences (Euclidean). rescore64 gathers float64 copies of
    every listed row: 2.3-2.5 s for the vocabulary's 30,522 x 90 graph on the AVX2 Zen 3 host,
    this about 0.3 s."""
    rows = np.arange(idx.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    k = idx.shape[1]
    ids = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    if metric == "euclidean":
        return np.sqrt(pair_values(xm, xm, np.repeat(rows, k), ids, True)).reshape(rows.size, k)
    own = np.arange(xm.shape[0], dtype=np.int64)
    norm = np.sqrt(pair_values(xm, xm, own, own, False))
    dots = pair_values(xm, xm, np.repeat(rows, k), ids, False).reshape(rows.size, k)
    out = dots / (norm[rows, None] * norm[idx])
    return np.clip(out, -1.0, 1.0, out=out)


def rescore64(x64: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None, chunk: int = 256, *,
              metric: str = "cosine") -> np.ndarray:
    """Cosine (or Euclidean distance) of every row i (or rows[i]) with its listed neighbours
    idx[i] (R, k), float64: for cosine the unit rows' dot products as one matrix-vector product
    per row (np.matmul over a chunk of rows; np.einsum took 17 s of the 30,522 x 90 graph's
    rescoring, this about 1.5 s); distances from the differences themselves."""
    rows = np.arange(idx.shape[0]) if rows is None else np.asarray(rows)
    out = np.empty(idx.shape, np.float64)
    if metric == "euclidean":
        for r0 in range(0, idx.shape[0], chunk):
            part = slice(r0, r0 + chunk)
            out[part] = np.linalg.norm(x64[idx[part]] - x64[rows[part], None, :], axis=-1)
        return out
    nrm = np.linalg.norm(x64, axis=1)
    unit = x64 / np.where(nrm > 0, nrm, 1.0)[:, None]
    for r0 in range(0, idx.shape[0], chunk):
        part = slice(r0, r0 + chunk)
        out[part] = np.matmul(unit[idx[part]], unit[rows[part], :, None])[..., 0]
    return np.clip(out, -1.0, 1.0, out=out)


# ------------------------------------------------------------------------------------ PCA
# smallest eigenvalue of X^T X, as a share of the largest, that keeps ~7 digits (D eps / share)
GRAM_TRUST = 1e-6


def pca_fit(x, axes: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (N, D) -> (explained-variance ratio (min(N, D),) descending, mean (D,), components
    (D, axes)), in float64 of the rows as given (a float64 input is not rounded to float32); each
    component's sign makes its largest-magnitude loading positive (deterministic).

    From the eigenvalues of the D x D product X^T X of the centred rows when they are all within
    GRAM_TRUST of the largest; else from the singular values of the centred rows (of their
    D x D triangular factor when N > D): the product squares the condition number, and an
    eigenvalue below about D eps of the largest is rounding noise there (1.6e-16 for 1.4e-18
    across a 1e-9 spread). The product is 2-5x faster on the vocabulary. Centred rows have rank
    <= N - 1, so with N <= D the last ratio is exactly 0."""
    xd = torch.from_numpy(as_matrix64(x))
    n, d = xd.shape
    mean = xd.mean(0) if n else torch.zeros(d, dtype=torch.float64)
    if n < 2:
        return np.zeros(0), mean.numpy(), np.eye(d, axes)
    xc = xd - mean
    trusted = False
    if n > d:
        ev, vecs = torch.linalg.eigh(xc.T @ xc)
        ev, vecs = ev.flip(0), vecs.flip(1)
        trusted = bool(ev[-1] >= GRAM_TRUST * ev[0])
    if not trusted:
        _, sv, vh = torch.linalg.svd(torch.linalg.qr(xc, mode="r").R if n > d else xc, full_matrices=True)
        # singular values below numpy's matrix_rank tolerance are rounding: no spread there
        ev, vecs = torch.where(sv > sv[0] * max(n, d) * torch.finfo(sv.dtype).eps, sv * sv, 0.0), vh.T
    ev = ev[:min(n, d)].clone()
    if n <= d:
        ev[n - 1:] = 0.0
    # the sign: the largest-magnitude loading positive; loadings within 1e-9 of that magnitude
    # count as tied and the first of them decides (a (1, -1, 0) / sqrt 2 axis had flipped with
    # the rows' order, its two loadings differing in the last bits)
    mag = vecs.abs()
    pick = (mag >= mag.amax(0, keepdim=True) * (1 - 1e-9)).to(torch.int8).argmax(0)
    vecs = vecs * torch.sign(vecs[pick, torch.arange(d)])[None, :]
    total = ev.sum()
    ratio = (ev / total if total > 0 else ev).numpy()
    # an axis without spread is no direction of the cloud (with N <= D, the N - 1 past the first
    # N - 1; a rank-deficient cloud's): zero loadings, so that the rows lie on it at 0, where
    # rounding noise (1e-15) had filled the plot's whole height and an arrow from the origin's
    # image, at an arbitrary height, left the picture
    spread = torch.zeros(d, dtype=vecs.dtype)
    spread[:ev.numel()] = (ev > 0).to(vecs.dtype)
    comps = (vecs * spread)[:, :axes].numpy()
    if comps.shape[1] < axes:
        comps = np.pad(comps, ((0, 0), (0, axes - comps.shape[1])))
    return ratio, mean.numpy(), comps


def pca(x, axes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, D) -> (explained-variance ratio, projection (N, axes) float64); see pca_fit."""
    ratio, mean, comps = pca_fit(x, axes)
    return ratio, (as_matrix64(x) - mean) @ comps


def pca_curves(x, labels: list[str] | None = None) -> dict:
    """Cumulative explained variance of the whole cloud and of each label's points (thesis 2.3.2):
    {"all": [..]} and with labels "by_label": {"<label>": [..]} (labels with fewer than 2 points
    are left out; a label may be named "all")."""
    ratio, _ = pca(x, axes=0)
    out = {"all": np.cumsum(ratio).tolist()}
    if labels is not None:
        lab = np.asarray(labels)
        xm = as_matrix64(x)
        out["by_label"] = {}
        for name in sorted(set(labels)):
            rows = xm[lab == name]
            if rows.shape[0] >= 2:
                out["by_label"][name] = np.cumsum(pca(rows, axes=0)[0]).tolist()
    return out


# ----------------------------------------------------------------------------- projection
@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class Projection:
    """embedding: (N, 2) float32. indices (N, k) of the exact graph (graph methods) with
    similarities (N, k) under metric "cosine" or distances (N, k) under "euclidean",
    explained_variance: PCA ratios (pca), silhouette: {original, projection} (with labels; the
    original space's under the graph's metric). Arrays are numpy arrays (the layouts are numpy's
    libraries'), whatever the input."""

    method: str
    embedding: np.ndarray
    n: int
    d: int
    metric: str = "cosine"
    k: int = 0
    seconds: float = 0.0
    knn_seconds: float = 0.0
    seed: int = 0
    perplexity: float | None = None
    indices: np.ndarray | None = None
    similarities: np.ndarray | None = None
    distances: np.ndarray | None = None
    explained_variance: np.ndarray | None = None
    pca_curves: dict | None = None
    silhouette: dict | None = None
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """One line (the dataclass's own repr printed the arrays)."""
        sil = "" if not self.silhouette else ", silhouette=" + "/".join(
            fmt(v) for v in (self.silhouette.get("original"), self.silhouette.get("projection")))
        return (f"Projection({self.method}, n={fmt(self.n)}, d={fmt(self.d)}, metric={self.metric!r}, k={self.k}, "
                f"seconds={fmt(self.seconds, 3)}{sil})")

    def to_dict(self) -> dict:
        out = {"method": self.method, "metric": self.metric, "n": self.n, "d": self.d, "k": self.k,
               "seed": self.seed, "seconds": self.seconds, "knn_seconds": self.knn_seconds}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        if self.explained_variance is not None:
            out["explained_variance"] = self.explained_variance.tolist()
        if self.pca_curves is not None:
            out["pca_cumulative"] = self.pca_curves
        if self.silhouette is not None:
            out["silhouette"] = self.silhouette
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    @property
    def graph_values(self) -> np.ndarray | None:
        """The graph's values: similarities (cosine) or distances (euclidean); None for PCA."""
        return self.similarities if self.metric == "cosine" else self.distances

    def to_pandas(self) -> DataFrame:
        """One row per point: x, y (the layout), label (with labels), and the graph's nearest
        neighbour and its value (graph methods)."""
        from ...results import _pandas

        data = {"x": self.embedding[:, 0], "y": self.embedding[:, 1]}
        if self.labels is not None:
            data["label"] = self.labels
        if self.indices is not None and self.k:
            data["nearest"] = self.indices[:, 0]
            data["nearest_" + ("cosine" if self.metric == "cosine" else "distance")] = self.graph_values[:, 0]
        return _pandas().DataFrame(data)

    def _repr_html_(self) -> str:
        from ...tables import table_html

        rows = [("method", self.method), ("points", self.n), ("dimensions", self.d), ("metric", self.metric)]
        if self.k:
            rows.append(("neighbours", self.k))
        if self.perplexity is not None:
            rows.append(("perplexity", self.perplexity))
        if self.silhouette is not None:
            rows += [("silhouette, original", self.silhouette["original"]),
                     ("silhouette, projection", self.silhouette["projection"])]
        rows += [("seconds", self.seconds)] + [("note", note) for note in self.notes]
        return "<b>Projection</b>" + table_html(None, rows)


SPECTRAL_MIN_ROWS = 8  # up to this many rows UMAP starts from random positions (umap_layout)


def umap_layout(x: np.ndarray, idx: np.ndarray, values: np.ndarray, *, metric: str = "cosine", seed: int = 0,
                progress=None, **kwargs) -> np.ndarray:
    """UMAP of x (N, D) on a precomputed graph (idx, values: (N, k), self excluded; values the
    cosine similarities, or the Euclidean distances with metric="euclidean"). progress: a
    progress.Progress: umap-learn's own bar over its epochs, drawn like ours."""
    umap = _require("umap", "umap-learn")
    options = progress.tqdm_options("UMAP epochs", "epoch") if progress is not None else None
    if options is not None:
        kwargs.setdefault("tqdm_kwds", options)
    n, k = idx.shape
    self_col = np.arange(n, dtype=np.int64)[:, None]
    knn_i = np.ascontiguousarray(np.concatenate([self_col, idx], 1), dtype=np.int64)
    dist = np.clip(1.0 - values, 0.0, 2.0) if metric == "cosine" else values   # (umap's cosine distance)
    knn_d = np.ascontiguousarray(np.concatenate([np.zeros((n, 1), np.float32), dist], 1), dtype=np.float32)
    import warnings

    with warnings.catch_warnings():
        # no NNDescent search index: only `transform` of new points is unavailable
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        # (n_jobs 1 and, from umap-learn 0.5.5, -1)
        warnings.filterwarnings("ignore", message=".*n_jobs value -?[0-9]+ overridden.*")
        # umap-learn 0.5.5's call of scikit-learn >= 1.6's check_array
        warnings.filterwarnings("ignore", message=".*force_all_finite.*", category=FutureWarning)
        # k = N - 1 (every other row a neighbour): the graph holds them all, self included
        warnings.filterwarnings("ignore", message=".*n_neighbors is larger than the dataset size.*")
        # UMAP's spectral initialisation asks scipy for dim + 1 = 3 eigenvectors of the graph,
        # which needs more rows than that; a handful of rows start from random positions
        if n <= SPECTRAL_MIN_ROWS:
            kwargs.setdefault("init", "random")
        reducer = umap.UMAP(n_neighbors=k + 1, metric=metric, random_state=seed,
                            precomputed_knn=(knn_i, knn_d), **kwargs)
        return reducer.fit_transform(x).astype(np.float32)


def tsne_affinities(idx: np.ndarray, values: np.ndarray, *, metric: str = "cosine", perplexity: float = 30.0,
                    seed: int = 0, n_jobs: int = 1, **kwargs):
    """openTSNE's perplexity-calibrated affinities on a precomputed graph (idx, values: (N, k),
    self excluded; values the cosine similarities, or with metric="euclidean" the Euclidean
    distances, given as they are: p_j|i proportional to exp(-beta_i d_ij^2), openTSNE's and
    scikit-learn's default). For cosine the distances given are sqrt(2 - 2 s), the Euclidean distance of the
    unit rows: openTSNE squares distances, so p_j|i is proportional to exp(-beta_i (1 - s_ij)),
    the kernel of openTSNE's own cosine search from 1,000 rows on (Annoy's angular distance) and
    of scikit-learn's TSNE(metric="cosine"). 1 - s (openTSNE's exact search below 1,000 rows)
    would give exp(-beta (1 - s)^2), another kernel: on the vocabulary its layouts were less
    trustworthy (docs/metrics.md)."""
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    values = np.asarray(values, dtype=np.float64)
    dist = np.sqrt(np.clip(2.0 - 2.0 * values, 0.0, 4.0)) if metric == "cosine" else values
    index = PrecomputedNeighbors(np.ascontiguousarray(idx, dtype=np.int64), np.ascontiguousarray(dist))
    return PerplexityBasedNN(knn_index=index, perplexity=perplexity, n_jobs=n_jobs, random_state=seed, **kwargs)


class _ThreadedFFT:
    """numpy.fft's 2-D real transforms as openTSNE's FFT gradient calls them (rfft2(a),
    irfft2(a)), computed by scipy.fft with `workers` threads in the order numpy.fft computes them
    (rfft2: rfft over the last axis, then fft over the first; irfft2: ifft over the first, then
    irfft over the last): the same pocketfft transforms, bit for bit. Every other attribute is
    numpy.fft's."""

    def __init__(self, workers: int):
        import scipy.fft

        self._sp, self._workers = scipy.fft, workers

    def rfft2(self, a, *args, **kwargs):
        if args or kwargs or np.ndim(a) != 2:
            return np.fft.rfft2(a, *args, **kwargs)
        return self._sp.fft(self._sp.rfft(a, axis=1, workers=self._workers), axis=0, workers=self._workers)

    def irfft2(self, a, *args, **kwargs):
        if args or kwargs or np.ndim(a) != 2:
            return np.fft.irfft2(a, *args, **kwargs)
        w = self._workers
        return self._sp.irfft(self._sp.ifft(a, axis=0, workers=w), n=2 * (np.shape(a)[1] - 1), axis=1, workers=w)

    def __getattr__(self, name):
        return getattr(np.fft, name)


class _NumpyWithThreadedFFT:
    """numpy, with `fft` a _ThreadedFFT."""

    def __init__(self, workers: int):
        self.fft = _ThreadedFFT(workers)

    def __getattr__(self, name):
        return getattr(np, name)


_FFT_LOCK = threading.Lock()
_FFT_USERS = [0]


@contextlib.contextmanager
def threaded_tsne_fft(workers: int):
    """While active, openTSNE's FFT gradient (its numpy build: the module computing the 2-D
    convolutions reads numpy as `np`) runs its transforms on `workers` threads (_ThreadedFFT):
    the same layout bit for bit, its FFTs (half of a vocabulary t-SNE's time, single-threaded
    in numpy) 1.6x faster on 2 cores. A no-op for one worker, without scipy, under numpy 1.x (its
    FFTs are the C pocketfft, scipy's the C++ one numpy 2 took: the last bits differ), or where
    openTSNE's module is another build (FFTW) or reads numpy differently."""
    try:
        import openTSNE._matrix_mul.matrix_mul as mm
        import scipy.fft  # noqa: F401
    except ImportError:
        mm = None
    if mm is None or workers <= 1 or int(np.__version__.split(".")[0]) < 2 \
            or not isinstance(getattr(mm, "np", None), (type(np), _NumpyWithThreadedFFT)):
        yield
        return
    with _FFT_LOCK:
        if _FFT_USERS[0] == 0:
            mm.np = _NumpyWithThreadedFFT(workers)
        _FFT_USERS[0] += 1
    try:
        yield
    finally:
        with _FFT_LOCK:
            _FFT_USERS[0] -= 1
            if _FFT_USERS[0] == 0:
                mm.np = np


TSNE_PROGRESS_EVERY = 25  # iterations between progress updates (openTSNE's callbacks)


def tsne_layout(x: np.ndarray, idx: np.ndarray, values: np.ndarray, *, metric: str = "cosine",
                perplexity: float = 30.0, seed: int = 0, n_jobs: int = 1, progress=None, **kwargs) -> np.ndarray:
    """openTSNE of x (N, D) on a precomputed graph (idx, values: (N, k), self excluded; cosine
    similarities, or Euclidean distances with metric="euclidean"), with
    tsne_affinities; PCA initialisation as openTSNE's default; its FFT gradient's transforms on
    n_jobs threads (threaded_tsne_fft: the same layout). progress: a progress.Progress: the
    affinities as a phase, then a bar over the gradient-descent iterations (a callback every
    TSNE_PROGRESS_EVERY iterations; openTSNE then also sums the KL divergence, which leaves the
    layout unchanged)."""
    import contextlib

    from ...progress import Progress

    _require("openTSNE", "openTSNE")
    from openTSNE import TSNE

    progress = progress if progress is not None else Progress()
    with progress.phase("t-SNE affinities (perplexity calibration)"):
        aff = tsne_affinities(idx, values, metric=metric, perplexity=perplexity, seed=seed, n_jobs=n_jobs)
    tsne = TSNE(perplexity=perplexity, metric=metric, random_state=seed, n_jobs=n_jobs, **kwargs)
    bar_context = (progress.bar(tsne.early_exaggeration_iter + tsne.n_iter, "t-SNE iterations", unit="iteration")
                   if progress.enabled else contextlib.nullcontext())
    with bar_context as bar, threaded_tsne_fft(n_jobs):
        if bar is not None:
            def tick(iteration, error, embedding) -> bool:
                bar.update(TSNE_PROGRESS_EVERY)
                return False  # a true return would stop openTSNE's optimisation

            tsne.callbacks, tsne.callbacks_every_iters = tick, TSNE_PROGRESS_EVERY
        emb = tsne.fit(x, affinities=aff)
    return np.asarray(emb, dtype=np.float32)


DEFAULT_K = 15             # UMAP's neighbours besides the point itself
DEFAULT_PERPLEXITY = 30.0  # t-SNE's perplexity (k = 3 x perplexity)


def project(x, method: str = "umap", labels=None, k: int = DEFAULT_K,
            perplexity: float = DEFAULT_PERPLEXITY, seed: int = 0, *, metric: str = "cosine",
            backend: str | None = None, n_jobs: int | None = None, progress: ProgressArg = False) -> Projection:
    """2-D projection of the rows of x on the exact neighbour graph.

    x: (N, D) tensor or array; method: "umap" (k neighbours besides the point itself), "tsne"
    (k = min(N - 1, 3 * perplexity), `k` ignored) or "pca"; metric: the graph's and the original
    silhouette's geometry, "cosine" (directions: embeddings) or "euclidean" (positions: point
    clouds such as a Hopf link, where cosine would join points on one ray); PCA is Euclidean
    either way. labels: N strings or None. The same
    seed gives the same embedding. Returns a Projection (embedding (N, 2) float32, the graph
    for umap/tsne, the explained variance for pca, silhouettes with labels). n_jobs: openTSNE
    threads (default: every core; the tests check a small input gives the same embedding with
    one thread). progress: True or a progress.Progress: each phase (graph, layout) on stderr."""
    from ...progress import as_progress

    prog = as_progress(progress, "embgeom project")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    require_packages(method)  # (before the neighbour graph: a missing package had been said after it)
    metric = validation.metric(metric, "metric", GRAPH_METRICS)
    # (refused where float32 cannot hold the values: the graphs' rows and every method's (N, 2)
    # float32 embedding are float32; PCA itself then works on the float64 values as given)
    xm = as_matrix(x)
    n, d = xm.shape
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"labels: expected {n} (one per row), got {len(labels)}")
    seed = validation.seed(seed)
    if method == "tsne":
        if isinstance(perplexity, bool) or not isinstance(perplexity, (int, float, np.integer, np.floating)):
            raise TypeError(f"perplexity: expected a number, got {type(perplexity).__name__}")
        if not (math.isfinite(perplexity) and perplexity >= 1 / 3):
            raise ValueError(f"perplexity: expected a finite number >= 1/3 (the graph holds 3 x perplexity "
                             f"neighbours, at least one), got {perplexity}")
        if d < 2:
            raise ValueError(f"x: t-SNE needs rows of at least 2 columns (its start is the rows' first two "
                             f"principal components), got {d}")
    elif method == "umap" and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    start = time.perf_counter()
    out = Projection(method=method, embedding=np.zeros((n, 2), np.float32), n=n, d=d, metric=metric,
                     seed=seed, labels=labels)
    if method == "pca":
        with prog.phase("PCA"):
            x64 = as_matrix64(x)
            ratio, proj = pca(x64, axes=2)
            big = float(np.abs(proj).max()) if proj.size else 0.0
            if big > float(np.finfo(np.float32).max):  # (the cast had warned of an overflow, then "came out NaN")
                raise ValueError(f"x: the rows' PCA coordinates reach {big:.3g}, past float32's range (the "
                                 "layout's type): scale the rows down (the picture does not change)")
            out.embedding = proj.astype(np.float32)
            out.explained_variance = ratio
            out.pca_curves = pca_curves(x64, labels)
    else:
        if n < 3:
            raise ValueError(f"x: {method} needs at least 3 rows, got {n}")
        if method == "tsne":
            # openTSNE's graph holds 3 x perplexity neighbours: at most N - 1 of them
            out.perplexity = min(float(perplexity), (n - 1) / 3.0)
            if out.perplexity < perplexity:
                out.notes.append(f"perplexity {perplexity:g} lowered to (N - 1) / 3 = {out.perplexity:.4g} "
                                 f"for {n} rows")
            k = min(n - 1, int(3 * out.perplexity))
        else:
            if k < 1:
                raise ValueError(f"k: expected an int >= 1, got {k!r}")
            if k > n - 1:
                out.notes.append(f"k {k} lowered to N - 1 = {n - 1} for {n} rows")
            k = min(int(k), n - 1)
        with prog.phase(f"exact {k}-neighbour {metric} graph of {n:,} rows"):
            idx, val, out.knn_seconds = exact_knn(x, k, metric=metric, backend=backend)
        out.k, out.indices = k, idx
        if metric == "cosine":
            out.similarities = val
        else:
            out.distances = val
        if method == "tsne" and bool((1.0 - np.asarray(val) <= 4 * EPS64).all() if metric == "cosine"
                                     else (val == 0).all()):
            # every neighbour distance 0 (cosine: to float64 rounding): no perplexity can be
            # calibrated (openTSNE gives NaN); near-collinear clouds (1e-7) are laid out. All the
            # rows one point, or each row among k or more copies of itself (two groups of 20
            # identical rows at perplexity 2 had been called one point)
            x64 = as_matrix64(x)
            if metric == "cosine":
                unit = x64 / np.linalg.norm(x64, axis=1)[:, None]
                one = bool((1.0 - unit @ unit[0] <= 4 * EPS64).all())
            else:
                one = bool((x64 == x64[0]).all())
            if one:
                why = f"all {n} {'point in one direction' if metric == 'cosine' else 'are one point'}"
            else:
                why = (f"every row's {k} nearest neighbours are copies of it; raise the perplexity "
                       f"({out.perplexity:g}: {k} neighbours) until 3 x perplexity passes a row's number of "
                       "copies, or drop the copies")
            raise ValueError(f"x: t-SNE is undefined for these rows: {why} (every neighbour distance is 0)")
        if method == "umap":
            # the clock covers UMAP's graph and spectral start, its own bar the epochs
            with prog.phase("UMAP layout"):
                out.embedding = umap_layout(xm, idx, val, metric=metric, seed=seed, progress=prog)
        else:
            import os

            out.embedding = tsne_layout(xm, idx, val, metric=metric, perplexity=out.perplexity, seed=seed,
                                        n_jobs=n_jobs or os.cpu_count() or 1, progress=prog)
    if not np.isfinite(out.embedding).all():
        raise ValueError(f"x: the {method} layout of these rows is undefined: it came out NaN")
    out.seconds = time.perf_counter() - start
    if labels is not None:
        # float64 distances: the original space's cosine distances of a near-collinear cloud, and
        # the projection's coordinates widened from float32
        with prog.phase("silhouettes"):
            original, kept = x, labels
            if metric == "cosine":  # (PCA takes zero rows; they have no cosine distance)
                x64 = as_matrix64(x)
                zero = ~np.any(x64 != 0, axis=1)
                if zero.any():
                    original, kept = x64[~zero], [g for g, z in zip(labels, zero) if not z]
                    out.notes.append(f"silhouette.original leaves out {int(zero.sum())} zero row(s) "
                                     "(no direction: no cosine distance)")
            out.silhouette = {"original": silhouette(original, kept, metric),
                              "projection": silhouette(out.embedding.astype(np.float64), labels, "euclidean")}
    return out
