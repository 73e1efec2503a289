"""Geometry of point clouds: labelled sets (silhouette, within/between cosine, per-label and
per-pair distributions) and token trajectories (docs/metrics.md, point clouds).

Every statistic here is computed in float64: the clouds the papers look at ([CLS] vectors of the
first layers, tokens between adjacent depths) are nearly collinear, with cosine distances down to
1e-6, where a float32 difference of near-equal numbers keeps one or two digits.
"""
from __future__ import annotations

import numpy as np
import torch
from ... import validation
from ...numerics import NEAR_DUPLICATE_TAU, bin_index


def as_matrix(x, name: str = "x") -> np.ndarray:
    """(N, D) float32 numpy array from a tensor / array (validation.embeddings: shape, dtype,
    finite rows)."""
    return np.ascontiguousarray(_validated_numpy(x, name, torch.float32), dtype=np.float32)


def as_matrix64(x, name: str = "x") -> np.ndarray:
    """(N, D) float64 numpy array (the input's values, no float32 rounding on the way)."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64 and x.ndim == 2 and np.isfinite(x).all():
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(_validated_numpy(x, name, torch.float64), dtype=np.float64)


def _validated_numpy(x, name: str, wide: torch.dtype) -> np.ndarray:
    """validation.embeddings, then numpy; bfloat16 tensors (numpy has no such dtype) widen
    to `wide` first, which holds their values exactly."""
    x = validation.embeddings(np.asarray(x) if not isinstance(x, (torch.Tensor, np.ndarray)) else x, name)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.to(wide) if x.dtype == torch.bfloat16 else x).numpy()
    return x

def translated(x64: np.ndarray) -> np.ndarray:
    """The rows less the row nearest their float64 mean: Euclidean distances do not move, and a
    cloud far from the origin keeps its digits in the |c_i|^2 + |c_j|^2 - 2 c_i.c_j of matrix
    products (1e4 + 1e-3 noise had lost them). A row of the cloud, not the mean itself, so
    identical rows become exact zeros (the mean's rounding had left 1e-16 in them)."""
    if not x64.shape[0]:
        return x64.copy()
    mean = x64.mean(0)
    dev = x64 - mean
    return x64 - x64[int(np.argmin(np.einsum("ij,ij->i", dev, dev)))]


# -------------------------------------------------------------------------- labelled sets
# rows of the distance matrix per step of the silhouette (float64: 32 MB at 2^22 entries)
SILHOUETTE_CHUNK = 1 << 22


def silhouette(x, labels, metric: str = "cosine") -> float | None:
    """Mean silhouette coefficient (Rousseeuw 1987; scikit-learn's `silhouette_score`
    conventions: a point alone in its label counts 0) of float64 rows; None unless
    2 <= labels <= N - 1. Distances by `pair_distances` (differences where the product formula
    cancels); memory O(chunk x N), never N x N."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")
    raw = as_matrix64(x)
    lab = np.asarray(labels)
    if lab.shape != (raw.shape[0],):
        raise ValueError(f"labels: expected one per row ({raw.shape[0]}), got {lab.shape[0] if lab.ndim else 0}")
    distinct, code = np.unique(lab, return_inverse=True)
    if not 2 <= len(distinct) <= len(lab) - 1:
        return None
    n = raw.shape[0]
    if metric == "euclidean":
        # the product formula on rows near the origin (fewer pairs need the direct distance),
        # the direct distance from the rows as given: a float64 cloud at 1e6 is rounded by the
        # translation (5e-4 of a 1e-6 distance)
        xm = translated(raw)
    else:
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        raw = xm = np.divide(raw, norms, out=np.zeros_like(raw), where=norms > 0)
    onehot = np.zeros((n, len(distinct)))
    onehot[np.arange(n), code] = 1.0
    size = onehot.sum(0)
    scores = np.empty(n)
    step = max(1, SILHOUETTE_CHUNK // max(n, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        dist = pair_distances(xm[a:b], xm, metric, raw[a:b], raw)
        dist[np.arange(b - a), np.arange(a, b)] = 0.0  # a point's distance to itself
        mean = (dist @ onehot) / size                   # (rows, labels): mean distance to each label
        own = code[a:b]
        rows = np.arange(b - a)
        alone = size[own] == 1
        intra = mean[rows, own] * size[own] / np.maximum(size[own] - 1, 1)
        mean[rows, own] = np.inf
        inter = mean.min(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (inter - intra) / np.maximum(intra, inter)
        scores[a:b] = np.where(alone, 0.0, np.nan_to_num(s))
    return float(scores.mean())


def pair_distances(a: np.ndarray, b: np.ndarray, metric: str, raw_a: np.ndarray | None = None,
                   raw_b: np.ndarray | None = None) -> np.ndarray:
    """(len(a), len(b)) float64 distances: Euclidean, or cosine 1 - a.b of unit rows (clipped to
    [0, 2]; zero rows at distance 1, as scikit-learn has them). From the product formula, and
    where it has cancelled (below NEAR_DUPLICATE_TAU of the scale, as the engine's rule) from the
    differences: |a - b| or |a - b|^2 / 2 = 1 - a.b, so near-equal and far-off rows keep their
    digits (two clusters 1e-3 apart at +-1e4 had given a silhouette of 0.53 for 0.52). raw_a /
    raw_b: the rows the differences are taken of (default a / b; Euclidean distances do not
    change under a translation, so a, b may be translated rows and raw_a, raw_b the originals)."""
    raw_a = a if raw_a is None else raw_a
    raw_b = b if raw_b is None else raw_b
    prod = a @ b.T
    if metric == "euclidean":
        scale = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :]
        d = scale - 2.0 * prod
        redo = d < NEAR_DUPLICATE_TAU * scale
    else:
        d = 1.0 - prod
        redo = d < NEAR_DUPLICATE_TAU
    i, j = np.nonzero(redo)
    step = 1 << 16  # pairs a step (bounds the gathered rows' memory)
    for s in range(0, i.size, step):
        ii, jj = i[s:s + step], j[s:s + step]
        diff = raw_a[ii] - raw_b[jj]
        sq = np.einsum("ij,ij->i", diff, diff)
        d[ii, jj] = sq if metric == "euclidean" else sq / 2.0
    if metric == "euclidean":
        return np.sqrt(np.maximum(d, 0.0))
    return np.clip(d, 0.0, 2.0)


def within_between_cosine(x, labels) -> tuple[float | None, float | None]:
    """Mean cosine over pairs i < j with the same label and with different labels (float64).
    Zero rows are left out; None where there is no such pair. From the sums of the unit rows
    (|sum u|^2 - n) / 2, within a few float64 ulps of the pairwise mean, clamped to [-1, 1] as
    every cosine is (identical rows: exactly 1, not 1 + 2^-50)."""
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
    def mean(s, pairs):
        return min(1.0, max(-1.0, s / pairs)) if pairs else None

    return mean(within, within_pairs), mean(total - within, between_pairs)


def set_stats(x, y=None, *, bins: int = 100, block: int = 1024) -> dict:
    """All-pairs cosine and Euclidean distributions of one set (self mode, pairs i < j) or two
    (cross mode), in float64: count, mean, population std (Chan's merge of per-block moments),
    min, max and a `bins`-bin histogram each (cosine over [-1, 1], Euclidean over
    [0, max ||x|| + max ||y||]; bins as docs/metrics.md, histogram). Cosine leaves zero rows out.
    Blocks of `block` x `block` pairs: memory O(block^2), never N x N."""
    xd = torch.from_numpy(as_matrix64(x))
    yd = None if y is None else torch.from_numpy(as_matrix64(y, "y"))
    if xd.shape[0] < (2 if yd is None else 1) or (yd is not None and yd.shape[0] < 1):
        return {"count": 0}
    hi = float(torch.linalg.vector_norm(xd, dim=1).max()) + \
        float(torch.linalg.vector_norm(yd if yd is not None else xd, dim=1).max())
    out = {}
    for metric, rng in (("cosine", (-1.0, 1.0)), ("euclidean", (0.0, max(hi, 1e-6)))):
        out[metric] = _pair_stats64(xd, yd, metric, bins, rng, block)
    return out


def _pair_stats64(x: torch.Tensor, y: torch.Tensor | None, metric: str, bins: int, rng, block: int) -> dict:
    def prep(v):
        if metric != "cosine":
            return v
        n = torch.linalg.vector_norm(v, dim=1)
        return v[n > 0] / n[n > 0, None]

    a_all = prep(x)
    b_all = a_all if y is None else prep(y)
    lo, hi = rng
    count, mean, m2 = 0, 0.0, 0.0
    vmin, vmax = np.inf, -np.inf
    slots = np.zeros(bins + 2, np.int64)
    n, m = a_all.shape[0], b_all.shape[0]
    for r0 in range(0, n, block):
        a = a_all[r0:r0 + block]
        for c0 in range((r0 if y is None else 0), m, block):
            b = b_all[c0:c0 + block]
            if metric == "cosine":
                v = (a @ b.T).clamp_(-1.0, 1.0)
            else:
                v = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
            if y is None and c0 == r0:
                v = v[torch.ones_like(v, dtype=torch.bool).triu(1)]
            v = v.reshape(-1)
            if v.numel() == 0:
                continue
            k = v.numel()
            bm = float(v.mean())
            bm2 = float((v - bm).square().sum())
            delta = bm - mean
            total = count + k
            mean += delta * k / total
            m2 += bm2 + delta * delta * count * k / total
            count = total
            vmin, vmax = min(vmin, float(v.min())), max(vmax, float(v.max()))
            if bins:
                slots += np.bincount(bin_index(v.numpy(), lo, hi, bins), minlength=bins + 2)
    if count == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None,
                "hist": {"lo": lo, "hi": hi, "bins": bins, "counts": [0] * bins, "underflow": 0, "overflow": 0}}
    return {"count": count, "mean": mean, "std": float(np.sqrt(m2 / count)), "min": vmin, "max": vmax,
            "hist": {"lo": lo, "hi": hi, "bins": bins, "counts": slots[1:bins + 1].tolist(),
                     "underflow": int(slots[0]), "overflow": int(slots[bins + 1])}}


def norm_stats(x) -> dict:
    nrm = np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1)
    return {"count": int(nrm.size), "mean": float(nrm.mean()), "std": float(nrm.std()),
            "min": float(nrm.min()), "max": float(nrm.max())}


MAX_PAIR_LABELS = 20


def pair_key(a: str, b: str) -> str:
    """per_pair's key of labels a and b: "a|b", where each label's own backslash is doubled and
    its own bar takes a backslash before it, so that no two pairs share a key (x with y|z, x|y
    with z)."""
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("|", "\\|")
    return f"{esc(a)}|{esc(b)}"


def group_geometry(cls, labels, *, bins: int = 100) -> dict:
    """Geometry of labelled [CLS] vectors at every depth.

    cls: (N, L+1, D) array (a memmap is read one depth at a time); labels: N strings.
    Returns {"labels", "counts", "silhouette" [L+1], "within_cosine" [L+1],
    "between_cosine" [L+1], "last": {"per_label": {label: {cosine, euclidean, norms}},
    "per_pair": {pair_key(a, b): {labels: [a, b], cosine, euclidean}}}} (per_pair only up to
    MAX_PAIR_LABELS labels)."""
    labels = [str(v) for v in labels]
    n, depths, _ = cls.shape
    if len(labels) != n:
        raise ValueError(f"--labels: expected {n} labels (one per text), got {len(labels)}")
    names = sorted(set(labels))
    lab = np.asarray(labels)
    out = {"labels": names, "counts": [int((lab == g).sum()) for g in names],
           "silhouette": [], "within_cosine": [], "between_cosine": []}
    for l in range(depths):
        x = np.asarray(cls[:, l], dtype=np.float64)
        out["silhouette"].append(silhouette(x, labels, "cosine"))
        w, b = within_between_cosine(x, labels)
        out["within_cosine"].append(w)
        out["between_cosine"].append(b)
    last = np.asarray(cls[:, depths - 1], dtype=np.float64)
    per_label = {}
    for g in names:
        rows = last[lab == g]
        per_label[g] = {**set_stats(rows, bins=bins), "norms": norm_stats(rows)}
    per_pair = {}
    if len(names) <= MAX_PAIR_LABELS:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                per_pair[pair_key(a, b)] = {"labels": [a, b],
                                            **set_stats(last[lab == a], last[lab == b], bins=bins)}
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
    cos = (dot / (norms[:, 1:] * norms[:, :-1]).clamp_min(1e-300)).clamp(-1.0, 1.0)  # (equal steps: 1, not 1 + ulp)
    return {"step_distance": step.numpy(), "step_cosine": cos.numpy(), "norm": norms.numpy()}
