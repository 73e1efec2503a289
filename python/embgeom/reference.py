"""The float64 specification of every metric, in plain PyTorch (docs/metrics.md, sections 1-4).

Readable over fast: it builds N x N matrices and loops in Python where that is clearer.
Only tests and small cross-checks use it; it is never picked by dispatch.
"""
from __future__ import annotations

import math

import torch

from .engine.config import PairwiseConfig, make_config
from .numerics import bin_index, unit_rows

__all__ = [
    "pairwise_values", "pairwise_stats", "cone_index", "attention_entropy", "attention_summary",
    "head_target_distribution", "js_distance", "context_similarity",
]


def _f64(t) -> torch.Tensor:
    """A detached float64 copy: the reference never takes part in autograd."""
    return torch.as_tensor(t).detach().double()


def pairwise_values(x, y=None, metric="cosine"):
    """All pair values in float64 and the pair mask.

    Returns (values (N, M), mask (N, M) bool, excluded_rows, excluded_cols): mask is True for
    counted pairs (i < j in self mode, both rows non-zero for cosine).
    """
    x = _f64(x).cpu()
    self_mode = y is None
    y = x if self_mode else _f64(y).cpu()
    n, m = x.shape[0], y.shape[0]
    mask = torch.ones(n, m, dtype=torch.bool)
    excluded_rows, excluded_cols = [], []
    if metric == "cosine":
        xu, xv = unit_rows(x)
        yu, yv = unit_rows(y)
        values = _pair_sums(xu, yu).clamp(-1.0, 1.0)
        mask &= xv[:, None] & yv[None, :]
        excluded_rows = torch.nonzero(~xv).flatten().tolist()
        excluded_cols = [] if self_mode else torch.nonzero(~yv).flatten().tolist()
    elif metric == "dot":
        values = _pair_sums(x, y)
    elif metric == "euclidean":
        values = torch.cdist(x, y)
    else:
        raise ValueError(f"metric: unknown {metric!r}")
    if self_mode:
        mask &= torch.ones(n, m, dtype=torch.bool).triu(diagonal=1)
    return values, mask, excluded_rows, excluded_cols


def _pair_sums(x, y):
    """x @ y.T, each pair's sum taken in one order for every pair (elementwise products summed
    along the rows, blocks of rows at a time): a BLAS dgemm need not (OpenBLAS's on an AVX2 Zen 3
    gave identical columns different values, and the reference broke exact ties by them)."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, y.shape[0] * x.shape[1]))
    for a in range(0, x.shape[0], step):
        out[a:a + step] = (x[a:a + step, None, :] * y[None, :, :]).sum(-1)
    return out


def _sorted_pairs(values, mask, key, limit):
    idx = mask.nonzero()
    vals = values[idx[:, 0], idx[:, 1]]
    items = sorted(zip(key(vals).tolist(), idx[:, 0].tolist(), idx[:, 1].tolist(), vals.tolist()))
    return [[i, j, v] for _, i, j, v in items[:limit]]


def _row_lists(values, mask, self_mode, k, largest):
    n = values.shape[0]
    full = mask | mask.T if self_mode else mask
    indices = torch.full((n, k), -1, dtype=torch.int64)
    vals = torch.full((n, k), math.nan, dtype=torch.float64)
    for i in range(n):
        cols = full[i].nonzero().flatten().tolist()
        ranked = sorted(cols, key=lambda j: ((-values[i, j]) if largest else values[i, j], j))[:k]
        for slot, j in enumerate(ranked):
            indices[i, slot] = j
            vals[i, slot] = values[i, j]
    return {"indices": indices, "values": vals}


def pairwise_stats(x, y=None, cfg: PairwiseConfig | None = None, **options) -> dict:
    """The all-pairs statistics (docs/metrics.md, section 1) by brute force: a dict with the keys
    of the CLI JSON (values as tensors/lists). cfg: the run's PairwiseConfig, or None to build one
    from the keyword options of embgeom.pairwise_stats (engine.config.make_config)."""
    if cfg is None:
        cfg = make_config(**options)
    elif options:
        raise TypeError(f"{next(iter(options))}: pass either cfg or keyword options, not both")
    metric, bins, near, outside = cfg.metric, cfg.bins, cfg.near, cfg.outside
    topk, bottomk, near_k, row_topk, row_bottomk = cfg.topk, cfg.bottomk, cfg.near_k, cfg.row_topk, cfg.row_bottomk
    self_mode = y is None
    values, mask, excluded_rows, excluded_cols = pairwise_values(x, y, metric)
    sel = values[mask]
    count = int(sel.numel())
    out = {"mode": "self" if self_mode else "cross", "metric": metric, "count": count,
           "values": values, "mask": mask, "excluded_rows": excluded_rows,
           "excluded_cols": excluded_cols}
    out["mean"] = float(sel.mean()) if count else math.nan
    out["std"] = float(sel.std(unbiased=False)) if count else math.nan
    if count:
        lo_pairs = _sorted_pairs(values, mask, lambda v: v, 1)
        hi_pairs = _sorted_pairs(values, mask, lambda v: -v, 1)
        out["min"], out["max"] = lo_pairs[0], hi_pairs[0]
    else:
        out["min"] = out["max"] = None
    if bins:
        lo, hi = cfg.lo, cfg.hi
        slots = torch.bincount(bin_index(sel, lo, hi, bins), minlength=bins + 2)
        out["hist"] = {"lo": lo, "hi": hi, "bins": bins, "counts": slots[1:-1],
                       "underflow": int(slots[0]), "overflow": int(slots[-1])}
    out["top_pairs"] = _sorted_pairs(values, mask, lambda v: -v, topk)
    out["bottom_pairs"] = _sorted_pairs(values, mask, lambda v: v, bottomk)
    out["near_pairs"] = [] if near is None else _sorted_pairs(values, mask, lambda v: (v - near).abs(), near_k)
    if row_topk:
        out["row_topk"] = _row_lists(values, mask, self_mode, row_topk, largest=True)
    if row_bottomk:
        out["row_bottomk"] = _row_lists(values, mask, self_mode, row_bottomk, largest=False)
    if outside is not None:
        a, b = outside
        hit = mask & ((values < a) | (values > b))
        rows = hit.sum(1) + (hit.sum(0) if self_mode else 0)
        out["outside"] = {"a": a, "b": b, "count": int(hit.sum()), "row_counts": rows,
                          "pairs": _sorted_pairs(values, hit, lambda v: torch.zeros_like(v), cfg.outside_limit)}
        if not self_mode:
            out["outside"]["col_counts"] = hit.sum(0)
    return out


def cone_index(x, mask=None) -> dict:
    """x: (B, T, D) or (N, D); mask: (B, T) bool. I_b = ||sum_i x_i/||x_i|| ||, zero rows out;
    "sums": the sums of unit rows themselves (B, D) (what a stream of chunks adds up)."""
    x = _f64(x).cpu()
    if x.dim() == 2:
        x = x[None]
        mask = None if mask is None else torch.as_tensor(mask)[None]
    B, T, _ = x.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
    sums, n, zero = torch.zeros(B, x.shape[2], dtype=torch.float64), [], []
    for b in range(B):
        rows = x[b][mask[b]]
        unit, valid = unit_rows(rows)
        sums[b] = unit[valid].sum(0)
        n.append(int(valid.sum()))
        zero.append(int((~valid).sum()))
    n = torch.tensor(n)
    index = torch.minimum(torch.linalg.vector_norm(sums, dim=1), n.double())  # (<= n, as rounded sums may not be)
    return {"index": index, "normalized": index / n.clamp(min=1), "n": n, "zero_rows": torch.tensor(zero),
            "sums": sums}


def attention_entropy(attn, mask=None, smoothing=0.0) -> dict:
    """attn: (B, H, T, T). Row entropy -sum p ln p in nats over valid keys; padded queries NaN.

    Returns row_entropy (B, H, T), mean (H,) over valid rows of all sequences and
    uniform_baseline (B,) = ln(n_valid)."""
    p = _f64(attn).cpu()
    B, H, T, _ = p.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
    ent = torch.full((B, H, T), math.nan, dtype=torch.float64)
    for b in range(B):
        keys = mask[b]
        n_valid = int(keys.sum())
        for h in range(H):
            for q in range(T):
                if not keys[q]:
                    continue
                row = p[b, h, q][keys]
                row = (1 - smoothing) * row + smoothing / n_valid
                nz = row[row > 0]
                ent[b, h, q] = float(-(nz * nz.log()).sum())
    valid_rows = mask[:, None, :].expand(B, H, T)
    mean = torch.stack([ent[:, h][valid_rows[:, h]].mean() for h in range(H)]) if H else ent.new_zeros(0)
    baseline = torch.log(mask.sum(1).double())
    return {"row_entropy": ent, "mean": mean, "uniform_baseline": baseline}


def attention_summary(attn, mask, special) -> dict:
    """Mean attention mass per head (H,) over valid query rows to [CLS], [SEP], punctuation, the
    previous and the next token; and the entropy of the head's mean attention distribution.

    special: dict of (B, T) bool tensors "cls", "sep", "punct"."""
    p = _f64(attn).cpu()
    B, H, T, _ = p.shape
    mask = torch.as_tensor(mask).bool().cpu()
    sums = {k: torch.zeros(H, dtype=torch.float64) for k in ("cls", "sep", "punct", "prev", "next")}
    rows = 0
    head_mean_entropy = torch.zeros(H, dtype=torch.float64)
    for b in range(B):
        valid = mask[b].nonzero().flatten().tolist()
        for q in valid:
            rows += 1
            for h in range(H):
                row = p[b, h, q]
                for key in ("cls", "sep", "punct"):
                    sums[key][h] += float(row[torch.as_tensor(special[key][b]).bool()].sum())
                if q - 1 >= 0 and mask[b, q - 1]:
                    sums["prev"][h] += float(row[q - 1])
                if q + 1 < T and mask[b, q + 1]:
                    sums["next"][h] += float(row[q + 1])
        for h in range(H):
            mean_row = p[b, h][mask[b]][:, mask[b]].mean(0)
            nz = mean_row[mean_row > 0]
            head_mean_entropy[h] += float(-(nz * nz.log()).sum())
    out = {k: v / max(rows, 1) for k, v in sums.items()}
    out["head_mean_entropy"] = head_mean_entropy / B
    return out


def head_target_distribution(attn, mask, special, max_len) -> torch.Tensor:
    """The distribution each head contributes to the JS distance matrix, summed over the real
    query rows of the batch: (H, 2 + 2*max_len - 1) float64 = [mass to [CLS], mass to [SEP],
    mass to every other real key j binned by the offset j - i (index 2 + (j - i) + max_len - 1)].
    Divided by the number of real rows of the corpus it is the head's mean attention
    distribution over these targets; js_distance compares heads by it.

    attn: (B, H, T, T); mask (B, T); special: dict of (B, T) bool "cls", "sep"."""
    p = _f64(attn).cpu()
    B, H, T, _ = p.shape
    mask = torch.as_tensor(mask).bool().cpu()
    cls = torch.as_tensor(special["cls"]).bool().cpu()
    sep = torch.as_tensor(special["sep"]).bool().cpu()
    out = torch.zeros(H, 2 + 2 * max_len - 1, dtype=torch.float64)
    for b in range(B):
        for i in mask[b].nonzero().flatten().tolist():
            for j in mask[b].nonzero().flatten().tolist():
                if cls[b, j]:
                    col = 0
                elif sep[b, j]:
                    col = 1
                else:
                    col = 2 + (j - i) + max_len - 1
                out[:, col] += p[b, :, i, j]
    return out


def js_distance(dists: torch.Tensor) -> torch.Tensor:
    """dists: (K, R) non-negative rows (one mean attention distribution per head, e.g.
    head_target_distribution; each row is normalised to sum 1). Returns the (K, K) Jensen-Shannon distance sqrt(JS divergence, nats)."""
    d = _f64(dists)
    d = d / d.sum(1, keepdim=True)
    K = d.shape[0]
    out = torch.zeros(K, K, dtype=torch.float64)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * (a[nz] / b[nz]).log()).sum())

    for i in range(K):
        for j in range(K):
            mid = 0.5 * (d[i] + d[j])
            out[i, j] = math.sqrt(max(0.5 * kl(d[i], mid) + 0.5 * kl(d[j], mid), 0.0))
    return out


def context_similarity(head_out, mask, separators, cosine=False) -> dict:
    """head_out: (B, T, d_h) one head's outputs O; mask (B, T); separators (B, T) bool.

    For each valid token i, its most similar other valid token j under S = O O^T (or cosine),
    ties to the smaller j. Returns per-token arrays and the summaries of docs/metrics.md, context similarity:
    distance |i - j| list, mean distance, the focus token count per sequence (the column with
    the most top-similarity hits, ties to the smaller position) and the share of hits that land
    on separator tokens."""
    o = _f64(head_out).cpu()
    B, T, _ = o.shape
    distances, sep_hits, hits, focus = [], 0, 0, []
    for b in range(B):
        idx = torch.as_tensor(mask[b]).bool().nonzero().flatten().tolist()
        if len(idx) < 2:
            focus.append(-1)
            continue
        v = o[b, idx]
        if cosine:
            v, _ = unit_rows(v)
        s = v @ v.T
        counts = [0] * len(idx)
        for a in range(len(idx)):
            best = max((s[a, c].item(), -c) for c in range(len(idx)) if c != a)
            c = -best[1]
            counts[c] += 1
            distances.append(abs(idx[a] - idx[c]))
            hits += 1
            sep_hits += int(bool(separators[b][idx[c]]))
        top = max(range(len(idx)), key=lambda c: (counts[c], -c))
        focus.append(idx[top])
    return {"distances": distances, "mean_distance": sum(distances) / max(len(distances), 1),
            "focus_token": focus, "separator_share": sep_hits / max(hits, 1)}
