"""Point clouds: 2-D projections on an exact neighbour graph and the geometry of labelled sets.

Definitions (docs/metrics.md, point clouds):
- exact cosine k-NN graph: `pairwise_stats(x, row_topk=k)`, self excluded, ties by column index;
  distance = 1 - cosine similarity.
- UMAP (umap-learn) gets that graph as `precomputed_knn` with the point itself prepended at
  distance 0 (umap's own neighbour lists start with the point), so n_neighbors = k + 1.
- t-SNE (openTSNE) gets it as a `PrecomputedNeighbors` index for `PerplexityBasedNN`, with
  k = min(N - 1, 3 * perplexity), the neighbour count openTSNE itself uses.
- PCA: eigenvectors of the covariance (float64), explained-variance ratio per component.
- silhouette: scikit-learn's `silhouette_score`, cosine distance in the original space and
  Euclidean distance in the projection.
- within / between cosine: mean cosine over all pairs i < j with the same / a different label,
  from per-label sums of unit vectors (sum over pairs of a set = (||sum u||^2 - n) / 2).
umap-learn and openTSNE load on first use; their absence is a ValueError that names the package.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..api import pairwise_stats

METHODS = ("umap", "tsne", "pca")


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{package} is not installed; `pip install {package}` "
                         f"(or `pip install 'embgeom[clouds]'`)") from None


def as_matrix(x, name: str = "x") -> np.ndarray:
    """(N, D) float32 numpy array from a tensor / array; clear errors otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected (N, D) float, got {tuple(x.shape)} {x.dtype}")
    if not np.isfinite(x).all():
        bad = np.nonzero(~np.isfinite(x).all(1))[0][:10].tolist()
        raise ValueError(f"{name}: NaN or Inf in rows {bad}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------------------------- graph
def exact_knn(x, k: int, *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact cosine k-NN graph from the fused engine's per-row top-k.

    x: (N, D); k <= N - 1. Returns indices (N, k) int64 (self excluded, ties by column index),
    similarities (N, k) float32 (descending) and the seconds it took. Zero rows have no
    direction: they are an error here."""
    xm = as_matrix(x)
    n = xm.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k: expected 1 <= k <= N - 1 = {n - 1}, got {k}")
    zero = np.nonzero(~np.any(xm != 0, axis=1))[0]
    if zero.size:
        raise ValueError(f"x: zero rows have no cosine neighbours: rows {zero[:10].tolist()}")
    start = time.perf_counter()
    res = pairwise_stats(torch.from_numpy(xm), metric="cosine", bins=0, topk=0, bottomk=0,
                         row_topk=k, backend=backend)
    seconds = time.perf_counter() - start
    idx = res.row_topk.indices.cpu().numpy().astype(np.int64)
    sim = res.row_topk.values.cpu().float().numpy()
    return idx, sim, seconds


def knn_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_i ∩ exact_i| / k (both (N, k), self excluded)."""
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact))
    return hits / float(exact.size)


# ------------------------------------------------------------------------------------ PCA
def pca_fit(x, axes: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (N, D) -> (explained-variance ratio (min(N, D),) descending, mean (D,), components
    (D, axes)), from the D x D covariance in float64; each component's sign makes its
    largest-magnitude loading positive (deterministic)."""
    xd = torch.as_tensor(as_matrix(x), dtype=torch.float64)
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
    return ratio, (as_matrix(x).astype(np.float64) - mean) @ comps


def pca_curves(x, labels: list[str] | None = None) -> dict:
    """Cumulative explained variance of the whole cloud and of each label's points (thesis 2.3.2):
    {"all": [..], "<label>": [..]} (labels with fewer than 2 points are left out)."""
    ratio, _ = pca(x, axes=0)
    out = {"all": np.cumsum(ratio).tolist()}
    if labels is not None:
        lab = np.asarray(labels)
        xm = as_matrix(x)
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
        return out


def umap_layout(x: np.ndarray, idx: np.ndarray, sim: np.ndarray, *, seed: int = 0, **kwargs) -> np.ndarray:
    """UMAP of x (N, D) on a precomputed cosine graph (idx, sim: (N, k), self excluded)."""
    umap = _require("umap", "umap-learn")
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
        reducer = umap.UMAP(n_neighbors=k + 1, metric="cosine", random_state=seed,
                            precomputed_knn=(knn_i, knn_d), **kwargs)
        return reducer.fit_transform(x).astype(np.float32)


def tsne_layout(x: np.ndarray, idx: np.ndarray, sim: np.ndarray, *, perplexity: float = 30.0,
                seed: int = 0, n_jobs: int = 1, **kwargs) -> np.ndarray:
    """openTSNE of x (N, D) on a precomputed cosine graph (idx, sim: (N, k), self excluded);
    PCA initialisation as openTSNE's default."""
    _require("openTSNE", "openTSNE")
    from openTSNE import TSNE
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    dist = np.ascontiguousarray(np.clip(1.0 - sim, 0.0, 2.0), dtype=np.float64)
    index = PrecomputedNeighbors(np.ascontiguousarray(idx, dtype=np.int64), dist)
    aff = PerplexityBasedNN(knn_index=index, perplexity=perplexity, n_jobs=n_jobs, random_state=seed)
    emb = TSNE(perplexity=perplexity, metric="cosine", random_state=seed, n_jobs=n_jobs,
               **kwargs).fit(x, affinities=aff)
    return np.asarray(emb, dtype=np.float32)


def project(x, method: str = "umap", labels=None, k: int = 15, perplexity: float = 30.0,
            seed: int = 0, *, backend: str | None = None, n_jobs: int | None = None) -> Projection:
    """2-D projection of the rows of x on the exact cosine neighbour graph.

    x: (N, D) tensor or array; method: "umap" (k neighbours besides the point itself), "tsne"
    (k = min(N - 1, 3 * perplexity), `k` ignored) or "pca"; labels: N strings or None. The same
    seed gives the same embedding. Returns a Projection (embedding (N, 2) float32, the graph
    for umap/tsne, the explained variance for pca, silhouettes with labels). n_jobs: openTSNE
    threads (default: every core; the tests check a small input gives the same embedding with
    one thread)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    xm = as_matrix(x)
    n, d = xm.shape
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"labels: expected {n} (one per row), got {len(labels)}")
    if not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    start = time.perf_counter()
    out = Projection(method=method, embedding=np.zeros((n, 2), np.float32), n=n, d=d, seed=seed,
                     labels=labels)
    if method == "pca":
        ratio, proj = pca(xm, axes=2)
        out.embedding = proj.astype(np.float32)
        out.explained_variance = ratio
        out.pca_curves = pca_curves(xm, labels)
    else:
        if n < 3:
            raise ValueError(f"x: {method} needs at least 3 rows, got {n}")
        if method == "tsne":
            if not perplexity > 0:
                raise ValueError(f"perplexity: expected > 0, got {perplexity}")
            k = min(n - 1, int(3 * perplexity))
            out.perplexity = float(perplexity)
        elif not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        k = min(k, n - 1)
        idx, sim, out.knn_seconds = exact_knn(xm, k, backend=backend)
        out.k, out.indices, out.similarities = k, idx, sim
        if method == "umap":
            out.embedding = umap_layout(xm, idx, sim, seed=seed)
        else:
            import os

            out.embedding = tsne_layout(xm, idx, sim, perplexity=min(float(perplexity), (n - 1) / 3.0),
                                        seed=seed, n_jobs=n_jobs or os.cpu_count() or 1)
    out.seconds = time.perf_counter() - start
    if labels is not None:
        out.silhouette = {"original": silhouette(xm, labels, "cosine"),
                          "projection": silhouette(out.embedding, labels, "euclidean")}
    return out


# -------------------------------------------------------------------------- labelled sets
def silhouette(x, labels, metric: str = "cosine") -> float | None:
    """scikit-learn's mean silhouette coefficient; None unless 2 <= labels <= N - 1."""
    from sklearn.metrics import silhouette_score

    xm = as_matrix(x) if not isinstance(x, np.ndarray) or x.dtype != np.float64 else x
    distinct = len(set(labels))
    if not 2 <= distinct <= len(labels) - 1:
        return None
    return float(silhouette_score(xm, np.asarray(labels), metric=metric))


def within_between_cosine(x, labels) -> tuple[float | None, float | None]:
    """Mean cosine over pairs i < j with the same label and with different labels (float64).
    Zero rows are left out; None where there is no such pair."""
    xd = torch.from_numpy(np.array(x, dtype=np.float64))
    norms = torch.linalg.vector_norm(xd, dim=1)
    keep = norms > 0
    u = xd[keep] / norms[keep, None]
    lab = np.asarray(labels)[keep.numpy()]
    n = u.shape[0]
    total = (float(u.sum(0).square().sum()) - n) / 2.0
    within = 0.0
    within_pairs = 0
    for name in np.unique(lab):
        g = u[torch.from_numpy(lab == name)]
        within += (float(g.sum(0).square().sum()) - g.shape[0]) / 2.0
        within_pairs += g.shape[0] * (g.shape[0] - 1) // 2
    between_pairs = n * (n - 1) // 2 - within_pairs
    return (within / within_pairs if within_pairs else None,
            (total - within) / between_pairs if between_pairs else None)


def set_stats(x, y=None, *, bins: int = 100, backend: str | None = None) -> dict:
    """All-pairs cosine and Euclidean distributions of one set (self mode) or two (cross mode),
    from pairwise_stats: count, mean, std, min, max and a histogram each (Euclidean over
    [0, max ||x|| + max ||y||])."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = None if y is None else torch.as_tensor(np.asarray(y, dtype=np.float32))
    if xt.shape[0] < (2 if yt is None else 1) or (yt is not None and yt.shape[0] < 1):
        return {"count": 0}
    hi = float(torch.linalg.vector_norm(xt, dim=1).max()) + \
        float(torch.linalg.vector_norm(yt if yt is not None else xt, dim=1).max())
    out = {}
    for metric, rng in (("cosine", (-1.0, 1.0)), ("euclidean", (0.0, max(hi, 1e-6)))):
        s = pairwise_stats(xt, yt, metric=metric, bins=bins, range=rng, topk=0, bottomk=0,
                           backend=backend)
        out[metric] = {"count": s.count, "mean": s.mean, "std": s.std,
                       "min": None if s.min is None else s.min[2],
                       "max": None if s.max is None else s.max[2], "hist": s.hist.to_dict()}
    return out


def norm_stats(x) -> dict:
    nrm = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    return {"count": int(nrm.size), "mean": float(nrm.mean()), "std": float(nrm.std()),
            "min": float(nrm.min()), "max": float(nrm.max())}


MAX_PAIR_LABELS = 20


def group_geometry(cls, labels, *, bins: int = 100, backend: str | None = None) -> dict:
    """Geometry of labelled [CLS] vectors at every depth.

    cls: (N, L+1, D) array (a memmap is read one depth at a time); labels: N strings.
    Returns {"labels", "counts", "silhouette" [L+1], "within_cosine" [L+1],
    "between_cosine" [L+1], "last": {"per_label": {label: {cosine, euclidean, norms}},
    "per_pair": {"a|b": {cosine, euclidean}}}} (per_pair only up to MAX_PAIR_LABELS labels)."""
    labels = [str(v) for v in labels]
    n, depths, _ = cls.shape
    if len(labels) != n:
        raise ValueError(f"--labels: expected {n} labels (one per text), got {len(labels)}")
    names = sorted(set(labels))
    lab = np.asarray(labels)
    out = {"labels": names, "counts": [int((lab == g).sum()) for g in names],
           "silhouette": [], "within_cosine": [], "between_cosine": []}
    for l in range(depths):
        x = np.asarray(cls[:, l], dtype=np.float32)
        out["silhouette"].append(silhouette(x, labels, "cosine"))
        w, b = within_between_cosine(x, labels)
        out["within_cosine"].append(w)
        out["between_cosine"].append(b)
    last = np.asarray(cls[:, depths - 1], dtype=np.float32)
    per_label = {}
    for g in names:
        rows = last[lab == g]
        per_label[g] = {**set_stats(rows, bins=bins, backend=backend), "norms": norm_stats(rows)}
    per_pair = {}
    if len(names) <= MAX_PAIR_LABELS:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                per_pair[f"{a}|{b}"] = set_stats(last[lab == a], last[lab == b], bins=bins, backend=backend)
    out["last"] = {"depth": depths - 1, "per_label": per_label, "per_pair": per_pair,
                   "per_pair_note": None if len(names) <= MAX_PAIR_LABELS else
                   f"more than {MAX_PAIR_LABELS} labels: label pairs left out"}
    return out


# ---------------------------------------------------------------------------- trajectories
def trajectory_steps(states) -> dict:
    """states: (n_tokens, L+1, D) -> per token step distance ||h_l - h_(l-1)|| (n, L), step cosine
    (n, L) and norm (n, L+1), float64."""
    h = torch.as_tensor(np.asarray(states), dtype=torch.float64)
    norms = torch.linalg.vector_norm(h, dim=-1)
    step = torch.linalg.vector_norm(h[:, 1:] - h[:, :-1], dim=-1)
    dot = (h[:, 1:] * h[:, :-1]).sum(-1)
    cos = dot / (norms[:, 1:] * norms[:, :-1]).clamp_min(1e-300)
    return {"step_distance": step.numpy(), "step_cosine": cos.numpy(), "norm": norms.numpy()}


def read_labels(path: str, n: int | None = None, what: str = "--labels") -> list[str]:
    """One label per non-blank line (UTF-8); with n, exactly n of them."""
    import os

    from .trace import read_lines

    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file: {path}")
    labels = [line.strip() for line in read_lines(path)]
    if n is not None and len(labels) != n:
        raise ValueError(f"{what}: {path} has {len(labels)} labels, expected {n} (one per row/text)")
    return labels
