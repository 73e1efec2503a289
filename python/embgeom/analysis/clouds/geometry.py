"""Geometry of point clouds: labelled sets (silhouette, within/between cosine, per-label and
per-pair distributions) and token trajectories (docs/metrics.md, point clouds).
"""
from __future__ import annotations

import numpy as np
import torch
from ... import validation
from ...api import pairwise_stats



def as_matrix(x, name: str = "x") -> np.ndarray:
    """(N, D) float32 numpy array from a tensor / array (validation.embeddings: shape, dtype,
    finite rows)."""
    x = validation.embeddings(np.asarray(x) if not isinstance(x, (torch.Tensor, np.ndarray)) else x, name)
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


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
