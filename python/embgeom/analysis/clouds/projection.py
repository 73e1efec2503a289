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
from ...api import pairwise_stats
from ...backends import registry
from .geometry import as_matrix, as_matrix64, silhouette



METHODS = ("umap", "tsne", "pca")


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{package} is not installed; `pip install {package}` "
                         f"(or `pip install 'embgeom[clouds]'`)") from None


# ---------------------------------------------------------------------------------- graph
def fp32_cosine_error(d: int) -> float:
    """A bound on |fp32 cosine - exact cosine| for the engine's exact-mode values, u = 2^-24:
    float64 rows rounded to float32 and their norm (2u a component), the unit rows rounded to
    float32 (u), so 6u over the products' absolute sum (<= 1 for unit rows), and a d-term fp32
    sum (gamma_d = d u / (1 - d u), any summation order); a tenth more covers the second-order
    terms and the float64 rescoring's own rounding."""
    du = (d + 6) * 2.0 ** -24
    return 1.1 * du / (1.0 - du)


def exact_knn(x, k: int, *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact cosine k-NN graph in float64: the fused engine's per-row top-(k + extra) in fp32,
    their similarities recomputed in float64 from the input's rows and each row re-sorted by them
    (near-collinear clouds have cosine distances down to 1e-6, where the engine's float32 values
    keep one or two digits). A row's k best are certain when its k-th float64 value exceeds its
    last candidate's fp32 value by more than the fp32 error bound: every other column's exact
    value lies below. Rows without that certificate are searched in float64 against every row.

    x: (N, D); k <= N - 1. Returns indices (N, k) int64 (self excluded, float64 similarity
    descending, ties by column index), similarities (N, k) float64 and the seconds it took. Zero
    rows have no direction: they are an error here."""
    xm = as_matrix(x)
    n = xm.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k: expected 1 <= k <= N - 1 = {n - 1}, got {k}")
    zero = np.nonzero(~np.any(xm != 0, axis=1))[0]
    if zero.size:
        raise ValueError(f"x: zero rows have no cosine neighbours: rows {zero[:10].tolist()}")
    start = time.perf_counter()
    wide = min(n - 1, k + max(8, k // 8))  # the candidates beyond k make the certificate
    res = pairwise_stats(torch.from_numpy(xm), metric="cosine", bins=0, topk=0, bottomk=0,
                         row_topk=wide, backend=backend)
    idx = res.row_topk.indices.cpu().numpy().astype(np.int64)
    last32 = res.row_topk.values.cpu().numpy().astype(np.float64)[:, -1]
    x64 = as_matrix64(x)
    pair_values = registry.cpp_kernel("pair_values")
    if pair_values is not None and np.array_equal(xm, x64):  # float32 rows: the C++ pair sums
        def rescore(i, rows=None):
            return rescore_pairs(pair_values, xm, i, rows)
    else:
        def rescore(i, rows=None):
            return rescore64(x64, i, rows)
    idx, sim = _by_value(idx, rescore(idx))
    if wide < n - 1:  # (with every other row a candidate there is nothing outside to fear)
        unsure = np.nonzero(~(sim[:, k - 1] > last32 + fp32_cosine_error(xm.shape[1])))[0]
        if unsure.size:
            found = knn_float64_rows(x64, unsure, k)
            idx[unsure, :k], sim[unsure, :k] = _by_value(found, rescore(found, unsure))
    seconds = time.perf_counter() - start
    return np.ascontiguousarray(idx[:, :k]), np.ascontiguousarray(sim[:, :k]), seconds


def _by_value(idx: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row ordered by float64 similarity descending, ties by column ascending."""
    order = np.lexsort((idx, -sim), axis=1)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1)


def knn_float64_rows(x64: np.ndarray, rows: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """The k nearest columns of each of `rows` by float64 cosine against every row (itself
    excluded; ties by column), (len(rows), k) int64: the search behind rows whose fp32
    candidates are not certain (exact_knn)."""
    nrm = np.linalg.norm(x64, axis=1)
    unit = x64 / nrm[:, None]
    out = np.empty((rows.size, k), np.int64)
    for r0 in range(0, rows.size, chunk):
        part = rows[r0:r0 + chunk]
        vals = unit[part] @ unit.T
        vals[np.arange(part.size), part] = -np.inf
        # torch.topk: np.partition degrades on long ties (100 ns an element on identical rows)
        kth = torch.topk(torch.from_numpy(vals), k, dim=1, sorted=False).values.amin(1).numpy()
        for q in range(part.size):
            # the columns above the k-th value (fewer than k) by value, then those equal to it
            # by column (flatnonzero's order): no sort of a long tie (identical rows)
            above = np.flatnonzero(vals[q] > kth[q])
            above = above[np.lexsort((above, -vals[q, above]))]
            tied = np.flatnonzero(vals[q] == kth[q])[:k - above.size]
            out[r0 + q] = np.concatenate((above, tied))
    return out


def rescore_pairs(pair_values, xm: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """rescore64 for float32 rows xm (N, D): _C.pair_values' float64 sums of the exact products
    (one fixed order), divided by the float64 norms (the same sums of each row with itself).
    rescore64 gathers float64 copies of every listed row: 2.3-2.5 s for the vocabulary's
    30,522 x 90 graph on the AVX2 Zen 3 host, this about 0.3 s."""
    rows = np.arange(idx.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    k = idx.shape[1]
    ids = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    own = np.arange(xm.shape[0], dtype=np.int64)
    norm = np.sqrt(pair_values(xm, xm, own, own, False))
    dots = pair_values(xm, xm, np.repeat(rows, k), ids, False).reshape(rows.size, k)
    out = dots / (norm[rows, None] * norm[idx])
    return np.clip(out, -1.0, 1.0, out=out)


def rescore64(x64: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """Cosine of every row i (or rows[i]) with its listed neighbours idx[i] (R, k), float64: the
    unit rows' dot products as one matrix-vector product per row (np.matmul over a chunk of rows;
    np.einsum took 17 s of the 30,522 x 90 graph's rescoring, this about 1.5 s)."""
    rows = np.arange(idx.shape[0]) if rows is None else np.asarray(rows)
    nrm = np.linalg.norm(x64, axis=1)
    unit = x64 / np.where(nrm > 0, nrm, 1.0)[:, None]
    out = np.empty(idx.shape, np.float64)
    for r0 in range(0, idx.shape[0], chunk):
        part = slice(r0, r0 + chunk)
        out[part] = np.matmul(unit[idx[part]], unit[rows[part], :, None])[..., 0]
    return np.clip(out, -1.0, 1.0, out=out)


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_i ∩ exact_i| / k (both (N, k), self excluded)."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / float(exact.size)


# ------------------------------------------------------------------------------------ PCA
def pca_fit(x, axes: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (N, D) -> (explained-variance ratio (min(N, D),) descending, mean (D,), components
    (D, axes)), from the D x D covariance in float64 of the rows as given (a float64 input is
    not rounded to float32); each component's sign makes its largest-magnitude loading positive
    (deterministic)."""
    xd = torch.from_numpy(as_matrix64(x))
    n, d = xd.shape
    mean = xd.mean(0) if n else torch.zeros(d, dtype=torch.float64)
    if n < 2:
        return np.zeros(0), mean.numpy(), np.eye(d, axes)
    xc = xd - mean
    ev, vecs = torch.linalg.eigh(xc.T @ xc / (n - 1))
    ev, vecs = ev.flip(0).clamp_min(0)[:min(n, d)], vecs.flip(1)
    pick = vecs.abs().argmax(0)
    vecs = vecs * torch.sign(vecs[pick, torch.arange(d)])[None, :]
    total = ev.sum()
    ratio = (ev / total if total > 0 else ev).numpy()
    comps = vecs[:, :axes].numpy()
    if comps.shape[1] < axes:
        comps = np.pad(comps, ((0, 0), (0, axes - comps.shape[1])))
    return ratio, mean.numpy(), comps


def pca(x, axes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """x: (N, D) -> (explained-variance ratio, projection (N, axes) float64); see pca_fit."""
    ratio, mean, comps = pca_fit(x, axes)
    return ratio, (as_matrix64(x) - mean) @ comps


def pca_curves(x, labels: list[str] | None = None) -> dict:
    """Cumulative explained variance of the whole cloud and of each label's points (thesis 2.3.2):
    {"all": [..], "<label>": [..]} (labels with fewer than 2 points are left out)."""
    ratio, _ = pca(x, axes=0)
    out = {"all": np.cumsum(ratio).tolist()}
    if labels is not None:
        lab = np.asarray(labels)
        xm = as_matrix64(x)
        for name in sorted(set(labels)):
            rows = xm[lab == name]
            if rows.shape[0] >= 2:
                out[name] = np.cumsum(pca(rows, axes=0)[0]).tolist()
    return out


# ----------------------------------------------------------------------------- projection
@dataclass
class Projection:
    """embedding: (N, 2) float32. indices/similarities: (N, k) exact graph (graph methods),
    explained_variance: PCA ratios (pca), silhouette: {original, projection} (with labels)."""

    method: str
    embedding: np.ndarray
    n: int
    d: int
    k: int = 0
    seconds: float = 0.0
    knn_seconds: float = 0.0
    seed: int = 0
    perplexity: float | None = None
    indices: np.ndarray | None = None
    similarities: np.ndarray | None = None
    explained_variance: np.ndarray | None = None
    pca_curves: dict | None = None
    silhouette: dict | None = None
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {"method": self.method, "n": self.n, "d": self.d, "k": self.k, "seed": self.seed,
               "seconds": self.seconds, "knn_seconds": self.knn_seconds}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        if self.explained_variance is not None:
            out["explained_variance"] = self.explained_variance[:64].tolist()
        if self.pca_curves is not None:
            out["pca_cumulative"] = {k: v[:64] for k, v in self.pca_curves.items()}
        if self.silhouette is not None:
            out["silhouette"] = self.silhouette
        if self.notes:
            out["notes"] = list(self.notes)
        return out


SPECTRAL_MIN_ROWS = 8  # up to this many rows UMAP starts from random positions (umap_layout)


def umap_layout(x: np.ndarray, idx: np.ndarray, sim: np.ndarray, *, seed: int = 0, progress=None,
                **kwargs) -> np.ndarray:
    """UMAP of x (N, D) on a precomputed cosine graph (idx, sim: (N, k), self excluded).
    progress: a progress.Progress: umap-learn's own bar over its epochs, drawn like ours."""
    umap = _require("umap", "umap-learn")
    options = progress.tqdm_options("UMAP epochs", "epoch") if progress is not None else None
    if options is not None:
        kwargs.setdefault("tqdm_kwds", options)
    n, k = idx.shape
    self_col = np.arange(n, dtype=np.int64)[:, None]
    knn_i = np.ascontiguousarray(np.concatenate([self_col, idx], 1), dtype=np.int64)
    knn_d = np.ascontiguousarray(np.concatenate([np.zeros((n, 1), np.float32),
                                                 np.clip(1.0 - sim, 0.0, 2.0)], 1), dtype=np.float32)
    import warnings

    with warnings.catch_warnings():
        # no NNDescent search index: only `transform` of new points is unavailable
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value 1 overridden.*")
        # k = N - 1 (every other row a neighbour): the graph holds them all, self included
        warnings.filterwarnings("ignore", message=".*n_neighbors is larger than the dataset size.*")
        # UMAP's spectral initialisation asks scipy for dim + 1 = 3 eigenvectors of the graph,
        # which needs more rows than that; a handful of rows start from random positions
        if n <= SPECTRAL_MIN_ROWS:
            kwargs.setdefault("init", "random")
        reducer = umap.UMAP(n_neighbors=k + 1, metric="cosine", random_state=seed,
                            precomputed_knn=(knn_i, knn_d), **kwargs)
        return reducer.fit_transform(x).astype(np.float32)


def tsne_affinities(idx: np.ndarray, sim: np.ndarray, *, perplexity: float = 30.0, seed: int = 0,
                    n_jobs: int = 1, **kwargs):
    """openTSNE's perplexity-calibrated affinities on a precomputed cosine graph (idx, sim:
    (N, k), self excluded). The distances given are sqrt(2 - 2 s), the Euclidean distance of the
    unit rows: openTSNE squares distances, so p_j|i is proportional to exp(-beta_i (1 - s_ij)),
    the kernel of openTSNE's own cosine search from 1,000 rows on (Annoy's angular distance) and
    of scikit-learn's TSNE(metric="cosine"). 1 - s (openTSNE's exact search below 1,000 rows)
    would give exp(-beta (1 - s)^2), another kernel: on the vocabulary its layouts were less
    trustworthy (docs/metrics.md)."""
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    dist = np.sqrt(np.clip(2.0 - 2.0 * np.asarray(sim, dtype=np.float64), 0.0, 4.0))
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
    in numpy) 1.6x faster on 2 cores. A no-op for one worker, without scipy, or where openTSNE's
    module is another build (FFTW) or reads numpy differently."""
    try:
        import openTSNE._matrix_mul.matrix_mul as mm
        import scipy.fft  # noqa: F401
    except ImportError:
        mm = None
    if mm is None or workers <= 1 or not isinstance(getattr(mm, "np", None), (type(np), _NumpyWithThreadedFFT)):
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


def tsne_layout(x: np.ndarray, idx: np.ndarray, sim: np.ndarray, *, perplexity: float = 30.0,
                seed: int = 0, n_jobs: int = 1, progress=None, **kwargs) -> np.ndarray:
    """openTSNE of x (N, D) on a precomputed cosine graph (idx, sim: (N, k), self excluded), with
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
        aff = tsne_affinities(idx, sim, perplexity=perplexity, seed=seed, n_jobs=n_jobs)
    tsne = TSNE(perplexity=perplexity, metric="cosine", random_state=seed, n_jobs=n_jobs, **kwargs)
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
            perplexity: float = DEFAULT_PERPLEXITY, seed: int = 0, *, backend: str | None = None,
            n_jobs: int | None = None, progress=False) -> Projection:
    """2-D projection of the rows of x on the exact cosine neighbour graph.

    x: (N, D) tensor or array; method: "umap" (k neighbours besides the point itself), "tsne"
    (k = min(N - 1, 3 * perplexity), `k` ignored) or "pca"; labels: N strings or None. The same
    seed gives the same embedding. Returns a Projection (embedding (N, 2) float32, the graph
    for umap/tsne, the explained variance for pca, silhouettes with labels). n_jobs: openTSNE
    threads (default: every core; the tests check a small input gives the same embedding with
    one thread). progress: True or a progress.Progress: each phase (graph, layout) on stderr."""
    from ...progress import as_progress

    prog = as_progress(progress, "embgeom project")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    xm = as_matrix(x)
    n, d = xm.shape
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"labels: expected {n} (one per row), got {len(labels)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if method == "tsne":
        if isinstance(perplexity, bool) or not isinstance(perplexity, (int, float, np.integer, np.floating)):
            raise TypeError(f"perplexity: expected a number, got {type(perplexity).__name__}")
        if not (math.isfinite(perplexity) and perplexity > 0):
            raise ValueError(f"perplexity: expected a finite number > 0, got {perplexity}")
    elif method == "umap" and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    start = time.perf_counter()
    out = Projection(method=method, embedding=np.zeros((n, 2), np.float32), n=n, d=d, seed=seed,
                     labels=labels)
    if method == "pca":
        with prog.phase("PCA"):
            x64 = as_matrix64(x)
            ratio, proj = pca(x64, axes=2)
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
        with prog.phase(f"exact {k}-neighbour graph of {n} rows"):
            idx, sim, out.knn_seconds = exact_knn(x, k, backend=backend)
        out.k, out.indices, out.similarities = k, idx, sim
        if method == "tsne" and bool((np.asarray(sim) >= 1.0 - 1e-6).all()):
            # every neighbour distance 0: no perplexity can be calibrated (openTSNE gives NaN)
            raise ValueError(f"x: t-SNE is undefined for these rows: all {n} point in one direction "
                             "(every neighbour distance is 0)")
        if method == "umap":
            # the clock covers UMAP's graph and spectral start, its own bar the epochs
            with prog.phase("UMAP layout"):
                out.embedding = umap_layout(xm, idx, sim, seed=seed, progress=prog)
        else:
            import os

            out.embedding = tsne_layout(xm, idx, sim, perplexity=out.perplexity, seed=seed,
                                        n_jobs=n_jobs or os.cpu_count() or 1, progress=prog)
    if not np.isfinite(out.embedding).all():
        raise ValueError(f"x: the {method} layout of these rows is undefined: it came out NaN")
    out.seconds = time.perf_counter() - start
    if labels is not None:
        # float64 distances: the original space's cosine distances of a near-collinear cloud, and
        # the projection's coordinates widened from float32
        with prog.phase("silhouettes"):
            out.silhouette = {"original": silhouette(x, labels, "cosine"),
                              "projection": silhouette(out.embedding.astype(np.float64), labels, "euclidean")}
    return out
