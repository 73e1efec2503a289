"""Position-embedding geometry and vocabulary projections for `embgeom vocab` (thesis 4.2.3, 4.2.5).

- cosine curves: for positions p in `rows`, cos(p, q) for q = 0..W-1 (raw) and cos(p, p + s)
  for s = 0..W-1 (shifted, relative to p; None past the last position);
- helix period: in each plane of the first three principal components of the position path,
  the angle around the path's centre is unwrapped and fitted by least squares, theta(p) ~ a + b p;
  period = 2 pi / |b| positions, with the fit's R^2; the plane with the best R^2 gives `period`;
- [CLS] vs position 0: norms, Euclidean distance, max-coordinate (l_inf) distance and cosine of the
  [CLS] word embedding and the position-0 embedding;
- joint PCA: words and positions stacked, one 2-D PCA;
- projections (--projections): UMAP and t-SNE of the word and position embeddings on the exact
  cosine graph (clouds.project);
- sinusoidal: the fixed encodings of "Attention is all you need" (arXiv 1706.03762, section 3.5)
  for the thesis' figure 6 (positions 0..127, width 512, and their pairwise cosines) and for the
  learned table's own positions and width, with the same geometry beside the learned one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from ...numerics import cosine_matrix
from ..clouds import projection as clouds



CURVE_ROWS = tuple(range(1, 11))


CURVE_WINDOW = 128


MIN_POSITIONS = 4  # the 3-D PCA path of the positions needs more points than axes

# the thesis' figure 6: the first 128 positions of the original transformer's d_model = 512
THESIS_SINUSOIDAL = (128, 512)


def sinusoidal(positions, width: int, formula: str = "vaswani") -> np.ndarray:
    """(len(positions), width) float64 fixed position encodings. formula "vaswani" (arXiv
    1706.03762): PE[p, 2i] = sin(p / 10000^(2i / width)), PE[p, 2i + 1] = cos(p / 10000^(2i /
    width)); "printed": the thesis' formula read literally, coordinate k = sin (k even) or cos
    (k odd) of p / 10000^(2k / width)."""
    if formula not in ("vaswani", "printed"):
        raise ValueError(f"formula: expected 'vaswani' or 'printed', got {formula!r}")
    p = np.asarray(positions, dtype=np.float64)[:, None]
    k = np.arange(width)
    expo = 2 * (k // 2) if formula == "vaswani" else 2 * k
    angle = p / np.power(10000.0, expo / width)
    return np.where(k % 2 == 0, np.sin(angle), np.cos(angle))


def _nan_mean(v: np.ndarray) -> float | None:
    """The mean of the values that are not NaN (None when there are none)."""
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def offset_profile(cos: np.ndarray) -> list[float | None]:
    """Mean cosine between positions p and p + k for each offset k = 0..P-1 of a cosine matrix
    (P, P); a zero row's NaN cosines left out, None where an offset has none."""
    return [_nan_mean(np.diagonal(cos, k)) for k in range(cos.shape[0])]


def components_for(ratio: np.ndarray, share: float) -> int | None:
    """The principal components that explain `share` of the variance (ratios descending); None
    without variance."""
    total = np.cumsum(ratio)
    return int(np.searchsorted(total, share) + 1) if total.size and total[-1] > 0 else None


def table_geometry(x: np.ndarray) -> dict:
    """Geometry of a position table (P, D), reported alike for the learned and the sinusoidal
    ones: norms (min, max), the pairwise cosines off the diagonal (mean, min, max), the mean
    cosine at each offset k = p' - p (offset_profile, k = 0..P-1), the PCA components for 90% of
    the variance and the helix period of the 3-D PCA path."""
    x = np.asarray(x, dtype=np.float64)
    nrm = np.linalg.norm(x, axis=1)
    cos = cosine_matrix(torch.from_numpy(x)).numpy()
    P = x.shape[0]
    off = cos[~np.eye(P, dtype=bool)]
    off = off[~np.isnan(off)]   # (a zero row's: no direction)
    ratio, mean, comps = clouds.pca_fit(x, min(3, x.shape[1]))
    return {"positions": P, "width": int(x.shape[1]),
            "norm_min": float(nrm.min()), "norm_max": float(nrm.max()),
            "cosine_mean": float(off.mean()) if off.size else None,
            "cosine_min": float(off.min()) if off.size else None, "cosine_max": float(off.max()) if off.size else None,
            "offset_profile": offset_profile(cos),
            "components_for_90pct": components_for(ratio, 0.9),
            "helix": helix_period((x - mean) @ comps)}


def sinusoidal_section(pos: torch.Tensor, pos_range: tuple[int, int]) -> tuple[dict, dict]:
    """The sinusoidal encodings beside the learned ones: `figure6` (the thesis' figure: positions
    0..127, width 512, in both readings of the formula) and `matched` (positions A..B-1 at the
    model's width, Vaswani's formula) with `learned` (the same geometry of the learned table)."""
    a, b = pos_range
    n, d = THESIS_SINUSOIDAL
    fig6 = {f: sinusoidal(range(n), d, f) for f in ("vaswani", "printed")}
    matched = sinusoidal(range(a, b), pos.shape[1])
    learned = table_geometry(pos.double().cpu().numpy())
    rep = {"figure6": {"positions": [0, n], "width": d, **{f: table_geometry(v) for f, v in fig6.items()}},
           "matched": {"range": [a, b], **table_geometry(matched)}, "learned": learned,
           "definition": "vaswani: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)) "
                         "(arXiv 1706.03762); printed: coordinate k = sin (k even) / cos (k odd) of "
                         "p / 10000^(2k/d), the thesis' formula read literally"}
    plots = {"figure6": fig6, "range": (a, b), "matched_profile": rep["matched"]["offset_profile"],
             "learned_profile": learned["offset_profile"]}
    return rep, plots


UNKNOWN_SIZE = 1 << 62  # parse_range's size before the model (and its table) is loaded


def parse_range(text: str | None, size: int) -> tuple[int, int] | None:
    """"A:B" (B exclusive, either side may be empty) -> (A, B) within [0, size], at least
    MIN_POSITIONS long."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else size
    except ValueError:
        raise ValueError(f"--positions: expected A:B (e.g. 0:384), got {text!r}") from None
    if not 0 <= a < b <= size:
        bound = f" <= {size}" if size < UNKNOWN_SIZE else ""
        raise ValueError(f"--positions: expected 0 <= A < B{bound}, got {a}:{parts[1].strip() or 'end'}")
    if b - a < MIN_POSITIONS:
        raise ValueError(f"--positions: expected at least {MIN_POSITIONS} positions, got {a}:{b}")
    return a, b


def cosine_curves(pos: torch.Tensor, rows=CURVE_ROWS, window: int = CURVE_WINDOW, offset: int = 0) -> dict:
    """pos: (P, D). Rows outside [0, P) are skipped; `offset` is added to reported positions."""
    P = pos.shape[0]
    w = min(window, P)
    rows = [r for r in rows if 0 <= r < P]
    cos = cosine_matrix(pos) if rows else None      # (a zero row's cosines: NaN, written null)
    raw, shifted = [], []

    def plain(v):
        return [None if math.isnan(c) else c for c in v.tolist()]

    for r in rows:
        raw.append(plain(cos[r, :w]))
        s = plain(cos[r, r:r + w])
        shifted.append(s + [None] * (w - len(s)))
    return {"rows": [r + offset for r in rows], "window": w, "raw": raw, "shifted": shifted}


def helix_period(path: np.ndarray) -> dict:
    """path: (P, 3) PCA coordinates of consecutive positions -> per plane {period, r2, turns}
    and the best plane's period (None when no plane turns)."""
    path = np.asarray(path, dtype=np.float64)
    p = np.arange(path.shape[0], dtype=np.float64)
    planes = {}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if path.shape[0] < 3 or path.shape[1] <= b:
            continue
        c = path[:, [a, b]] - path[:, [a, b]].mean(0)
        theta = np.unwrap(np.arctan2(c[:, 1], c[:, 0]))
        A = np.stack([np.ones_like(p), p], 1)
        coef, *_ = np.linalg.lstsq(A, theta, rcond=None)
        resid = theta - A @ coef
        ss = ((theta - theta.mean()) ** 2).sum()
        r2 = float(1 - (resid ** 2).sum() / ss) if ss > 0 else 0.0
        slope = float(coef[1])
        # turns from the fitted slope (not the end points' angles): period x turns = P - 1
        planes[f"{a + 1}-{b + 1}"] = {"period": float(2 * np.pi / abs(slope)) if slope else None,
                                      "r2": r2, "turns": float(abs(slope) * (p.size - 1) / (2 * np.pi))}
    best = max((k for k in planes if planes[k]["period"] is not None and planes[k]["turns"] >= 1),
               key=lambda k: planes[k]["r2"], default=None)
    return {"planes": planes, "plane": best, "period": planes[best]["period"] if best else None,
            "definition": "theta(p) = unwrapped angle around the centre in a PCA plane; "
                          "least-squares theta ~ a + b p; period = 2 pi / |b| positions; "
                          "turns = |b| (P - 1) / (2 pi) over the P positions"}


def cls_vs_position0(word: torch.Tensor, pos: torch.Tensor, cls_id: int | None) -> dict | None:
    if cls_id is None or pos is None or not 0 <= cls_id < word.shape[0]:
        return None
    a, b = word[cls_id].double(), pos[0].double()
    na, nb = float(a.norm()), float(b.norm())
    return {"cls_norm": na, "position0_norm": nb, "euclidean": float((a - b).norm()),
            "max_coordinate": float((a - b).abs().max()),
            "cosine": float(a @ b / (na * nb)) if na > 0 and nb > 0 else None}


def section(word, words, pos_full, pos_range, tokenizer) -> tuple[dict, dict]:
    """The position-geometry section: report dict and arrays for the plots. pos_range = (A, B)."""
    a, b = pos_range
    pos = pos_full[a:b]
    ratio, mean, comps = clouds.pca_fit(pos.cpu().numpy(), 3)
    path = (pos.double().cpu().numpy() - mean) @ comps
    curves = cosine_curves(pos, offset=a)
    joint_x = torch.cat([words, pos]).cpu().numpy()
    joint_ratio, joint = clouds.pca(joint_x, 2)
    sin_rep, sin_plots = sinusoidal_section(pos, (a, b))
    rep = {"range": [a, b], "cosine_curves": curves, "helix": helix_period(path),
           "cls_vs_position0": cls_vs_position0(word, pos_full, getattr(tokenizer, "cls_token_id", None)),
           "joint_pca_explained_variance": joint_ratio[:2].tolist(), "sinusoidal": sin_rep}
    plots = {"range": (a, b), "pos": pos.cpu().numpy(), "curves": curves, "path": path,
             "joint": joint, "n_words": words.shape[0], "sinusoidal": sin_plots}
    return rep, plots


def _named(progress, what: str):
    """progress for one projection: its prefix says what is projected ("embgeom vocab, words")."""
    from ...progress import Progress

    if not isinstance(progress, Progress) or not progress.enabled:
        return False
    return Progress(enabled=True, prefix=f"{progress.prefix}, {what}", stream=progress.stream, log=progress.log)


def projections(words, ids, tokens, pos, pos_range, *, seed: int = 0, progress=False,
                layouts=None) -> tuple[dict, dict]:
    """UMAP and t-SNE of the word and position embeddings on the exact graph. Returns (report,
    {name: (xy, labels, texts, ids, (knn indices, similarities))}); ids are token ids for words and
    position ids for positions. progress: a progress.Progress (each projection's phases and bars,
    named by what they project) or False. layouts: a layouts.LayoutCheckpoint: saved layouts are
    taken from it, each new one is saved to it when done."""
    rep, arrays = {}, {}
    a, _ = pos_range
    buckets = [f"{128 * (p // 128)}-{128 * (p // 128) + 127}" for p in range(a, a + pos.shape[0])]
    for name, x, labels, texts, row_ids in (
            ("words", words, None, [tokens[int(i)] for i in ids], [int(i) for i in ids]),
            ("positions", pos, buckets, [f"position {a + p}" for p in range(pos.shape[0])],
             list(range(a, a + pos.shape[0])))):
        for method in ("umap", "tsne"):
            key = f"{name}_{method}"
            pr = layouts.get(key, x.shape[0], x.shape[1], seed) if layouts is not None else None
            if pr is None:
                pr = clouds.project(x.cpu().numpy(), method=method, labels=labels, seed=seed,
                                    progress=_named(progress, name))
                if layouts is not None:
                    layouts.keep(key, pr)
            rep[key] = pr.to_dict()
            # (xy, labels, hover texts, ids: token ids / position ids, the exact graph)
            arrays[key] = (pr.embedding, labels, texts, row_ids, (pr.indices, pr.similarities))
    return rep, arrays
