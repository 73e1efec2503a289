"""Attention heads as the papers measure them, streamed per batch (docs/metrics.md, attention heads).

* Clark et al. (arXiv 1906.04341): the Jensen-Shannon divergence between heads summed over every
  real query row (`clark_js_sums`), its metric MDS (`mds_embedding`), smoothed row entropy over a
  text's rows and from [CLS], [SEP] -> [SEP] attention.
* The geometry-of-BERT authors (arXiv 2502.12033, their code): the value-histogram entropy of a
  head's map (20 equal-width bins) and the k90 statistic.
* Ours (labelled so in the report): the gate-pattern features and their label rule, and the two
  readings of "directionality of subspace selection".

`HeadsAccumulator.update(batch)` takes an `embgeom.analysis.text.trace.Batch`; every state is a sum or
a histogram of fixed size, so memory does not grow with the corpus (the sample head maps kept for
the report are the first few texts only).

Conventions: attn (B, H, T, T), rows = queries; mask (B, T) bool, True = real token (padding at
the end of a row, as the tokenizer pads); n = a text's number of real tokens; heads in layer-major
order, index = (layer - 1) * H + head for layer 1..L and head 0..H-1 (docs/metrics.md, layers, depths
and heads); a loop index l over layers is layer l + 1.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from ... import validation
from ...engine.checkpoint import Resumable, check_samples
from ...numerics import js_terms

JS_SMOOTHING = 0.001          # Clark head_distances.py: P = 0.999 A + 0.001 / n
ENTROPY_SMOOTHING = 0.0001    # Clark General_Analysis: A' = 0.9999 A + 0.0001 / n
VALUE_BINS = 20               # geometry-of-BERT code: pd.cut(values, 20)
ENTROPY_BINS = 1000           # resolution of the normalised-entropy median (ours)
K90_MASS = 0.9
MAX_MAP_TOKENS = 64           # sample head maps: the first 64 real tokens of a text (display only)
BROAD_NATS = 3.8              # Clark Fig. 6 "attends broadly"
GATE_LABELS = ("closed gate", "directional gate", "backward contextual gate",
               "forward contextual gate", "open gate", "none")
PATTERN_FEATURES = ("diagonal", "previous", "next", "back3", "forward3", "cls_sep", "top_column",
                    "top3_columns", "k90_median", "normalised_entropy")


# ------------------------------------------------------------------------------ per batch
def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p ln p over the last axis (nats, 0 ln 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(-1)


def clark_js_sums(attentions, mask: torch.Tensor, row_chunk: int = 512) -> torch.Tensor:
    """Clark's head distance for one batch: for every pair of heads (a, b) the JS divergence
    (nats) between their smoothed rows P = 0.999 A + 0.001/n, summed over every real query row
    ([CLS]/[SEP] included). attentions: L of (B, H, T, T). Returns (L*H, L*H) float64, symmetric,
    zero diagonal.

    Each key adds 1/2 [p ln(2p/s) + q ln(2q/s)], s = p + q, taken without cancellation (js_terms):
    the identity ln 2 + (sum p ln p + sum q ln q - sum s ln s) / 2 had subtracted sums of O(1)
    per row, and heads with JS 1e-7 a row came out 13 % low. The C++ core's js_pair_sums on the
    CPU (float32 terms, float64 sums in a fixed order), elsewhere one head against all later
    heads at once (a (K-a-1, R, T) tensor); rows in chunks of row_chunk."""
    from ...backends import registry

    L = len(attentions)
    B, H, T, _ = attentions[0].shape
    K = L * H
    rows = mask.reshape(-1).nonzero()[:, 0]                              # real (text, query) rows
    n = mask.sum(1).to(torch.float32)
    inv_n = (JS_SMOOTHING / n.clamp(min=1)).repeat_interleave(T)[rows]     # (R,)
    keys = mask.to(torch.float32).repeat_interleave(T, 0)[rows]            # (R, T)
    out = torch.zeros(K, K, dtype=torch.float64, device=mask.device)
    for start in range(0, rows.numel(), row_chunk):
        sel = rows[start:start + row_chunk]
        R = sel.numel()
        P = torch.empty(K, R, T, dtype=torch.float32, device=mask.device)
        for l, attn in enumerate(attentions):
            a = attn.to(torch.float32).permute(1, 0, 2, 3).reshape(H, B * T, T)[:, sel]
            P[l * H:(l + 1) * H] = ((1.0 - JS_SMOOTHING) * a + inv_n[None, start:start + R, None]) \
                * keys[None, start:start + R]
        # padded keys get 1/2 in both rows: p = q there, a 0 term, so no mask is needed
        P += 0.5 * (1.0 - keys[None, start:start + R])
        pair_sums = registry.cpp_kernel("js_pair_sums", P)
        if pair_sums is not None:                                          # the C++ core's loop
            out += torch.from_numpy(pair_sums(P.contiguous().numpy())).to(out.device)  # (K, K), a < b
            continue
        for a in range(K - 1):
            out[a, a + 1:] += js_terms(P[a], P[a + 1:]).sum(-1).double().sum(-1)
    return out + out.T


def k90(attn: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, T) int64: the fewest largest entries of each row whose sum is
    >= 0.9 (geometry-of-BERT code, after Ramsauer et al.)."""
    if attn.device.type == "cpu" and attn.dtype in (torch.float32, torch.float64):
        # numpy's sort of the last axis is several times faster than torch's on the CPU (128-wide
        # rows: 23 ms against 169 ms a layer of 32 x 12 x 128 rows); the sorted values are the
        # same, and both cumsums add left to right in float64, so the counts are identical. The
        # negated entries sorted ascending are the entries in descending order, negated (exact),
        # and their running sums the negated running sums: contiguous, no reversed view
        from ...backends import registry

        srt = np.sort(-attn.detach().numpy(), -1)
        count = registry.cpp_kernel("prefix_sums_below", attn)
        if count is not None:  # the running sums in C++ (numpy's float64 copy and cumsum: 40 ms a layer)
            return torch.from_numpy(count(srt, K90_MASS) + 1)
        cum = srt.astype(np.float64)
        np.cumsum(cum, -1, out=cum)
        return torch.from_numpy(np.count_nonzero(cum > -K90_MASS, -1).astype(np.int64) + 1)
    srt = attn.sort(-1, descending=True).values
    cum = srt.double().cumsum(-1)
    return (cum < K90_MASS).sum(-1) + 1


def value_histogram_entropy(attn: torch.Tensor, mask: torch.Tensor, pad_to: int | None = None) -> torch.Tensor:
    """The authors' Shannon entropy of a map's value histogram, per text and head: the n*n
    entries on real tokens in 20 equal-width bins between their min and max (right-closed bins,
    the lowest one including the min, as pandas.cut), p_b = count_b / n^2, -sum p_b ln p_b
    (nats). attn (B, H, T, T) -> (B, H) float64 (0 for a constant map, NaN for one whose real
    entries hold NaN or inf). pad_to = P: the map as
    the authors' code bins it, zero-padded to P x P (their inputs are padded to the model's
    length, pad rows and columns zeroed): P^2 - n^2 more zeros, the range widened to take 0.
    Float32 maps on the CPU: the C++ core's value_histogram (the same edges and counts)."""
    from ...backends import registry

    B, H, T, _ = attn.shape
    n2 = (mask.sum(1).double() ** 2)[:, None]                                # n^2 (B, 1)
    if pad_to is not None and int(n2.max()) > pad_to * pad_to:
        raise ValueError(f"pad_to: {pad_to} is shorter than a map's {int(n2.max() ** 0.5)} real tokens")
    kernel = registry.cpp_kernel("value_histogram", attn)
    if kernel is not None:
        counts, zero_bin = (torch.from_numpy(t) for t in kernel(attn.contiguous().numpy(),
                                                                mask.to(torch.uint8).contiguous().numpy(),
                                                                pad_to is not None))
        counts, zero_bin = counts.double(), zero_bin[..., None]
    else:
        counts, zero_bin = _value_counts(attn, mask, pad_to is not None)
    bad = zero_bin[..., 0] < 0                                               # NaN / inf entries
    zero_bin = zero_bin.clamp(min=0)
    if pad_to is not None:
        counts.scatter_add_(-1, zero_bin, (pad_to * pad_to - n2).expand(B, H)[..., None] * (counts.sum(-1, keepdim=True) > 0))
        n2 = torch.full_like(n2, float(pad_to * pad_to))
    p = counts / n2[..., None].clamp(min=1)
    ent = row_entropy(p)
    return torch.where(bad.to(ent.device), torch.full_like(ent, math.nan), ent)


def _value_counts(attn: torch.Tensor, mask: torch.Tensor, widen_to_zero: bool):
    """value_histogram_entropy's counts (B, H, 20) float64 (zero for a constant map) and the bin
    of 0 (B, H, 1) int64, -1 for a map whose real entries hold NaN or inf, in torch (any device
    and dtype)."""
    B, H, T, _ = attn.shape
    pair = (mask[:, :, None] & mask[:, None, :])[:, None]                  # (B, 1, T, T)
    inf = torch.tensor(math.inf, dtype=attn.dtype, device=attn.device)
    x = torch.where(pair, attn, inf)                                       # padding never counted
    lo = x.amin(dim=(2, 3)).double()                                       # (B, H), exact values
    hi = torch.where(pair, attn, -inf).amax(dim=(2, 3)).double()
    if widen_to_zero:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    # inner edges e_b = b * (hi - lo) / 20 + lo (numpy's linspace, as pd.cut builds them), each
    # float64 edge rounded down to the largest float32 not above it so that the float32 test
    # x <= e is exact; bin b = (e_b, e_b+1], the min in bin 0, the max in bin 19, padding (inf)
    # past the max in a dump slot 20
    step = (hi - lo) / VALUE_BINS
    e = torch.arange(1, VALUE_BINS, dtype=torch.float64, device=attn.device) * step[..., None] + lo[..., None]
    e32 = e.to(attn.dtype)
    e32 = torch.where(e32.double() > e, torch.nextafter(e32, torch.full_like(e32, -math.inf)), e32)
    edges = torch.cat([e32, hi.to(attn.dtype)[..., None]], -1).contiguous()           # (B, H, 20)
    idx = torch.searchsorted(edges, x.reshape(B, H, T * T), right=False)                  # 0..20
    idx += (torch.arange(B * H, device=attn.device) * (VALUE_BINS + 1)).view(B, H, 1)
    counts = torch.bincount(idx.reshape(-1), minlength=B * H * (VALUE_BINS + 1))
    counts = counts.view(B, H, VALUE_BINS + 1)[..., :VALUE_BINS].double()
    counts = torch.where((step > 0)[..., None], counts, torch.zeros_like(counts))
    zero_bin = torch.searchsorted(edges, torch.zeros(B, H, 1, dtype=attn.dtype, device=attn.device))
    # amin / amax carry NaN and inf (a map without a real entry has lo = inf, hi = -inf: no histogram)
    bad = (~(torch.isfinite(lo) & torch.isfinite(hi)) & pair.flatten(1).any(1)[:, None])[..., None]
    return counts, torch.where(bad, torch.full_like(zero_bin, -1), zero_bin.clamp(max=VALUE_BINS - 1))


def ranks(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of the real entries along the last axis, equal values given the mean of the
    ranks they span (scipy.stats.rankdata's "average"; padding ranked last)."""
    v = torch.where(mask, x, torch.full_like(x, torch.finfo(x.dtype).max))
    order = v.argsort(dim=-1, stable=True)
    s = v.gather(-1, order)
    T = x.shape[-1]
    pos = torch.arange(T, device=x.device).expand_as(s)
    first = torch.ones_like(s, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = torch.ones_like(s, dtype=torch.bool)
    last[..., :-1] = s[..., :-1] != s[..., 1:]
    start = torch.where(first, pos, 0).cummax(-1).values
    end = torch.where(last, pos, T - 1).flip(-1).cummin(-1).values.flip(-1)
    return torch.empty_like(x).scatter_(-1, order, ((start + end) / 2).to(x.dtype))


def spearman(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last axis over the real entries: Pearson's of their ranks,
    ties averaged (scipy.stats.spearmanr; rows of entropy exactly 0, saturated softmax rows, tie:
    ordinal ranks had ordered them by position, so that the padding of a batch moved the value).
    x, y (..., T); mask (..., T) -> (...); NaN for fewer than 3 entries or a constant ranking."""
    m = mask.to(x.dtype)
    n = m.sum(-1)
    rx, ry = ranks(x, mask) * m, ranks(y, mask) * m
    mx, my = rx.sum(-1) / n.clamp(min=1), ry.sum(-1) / n.clamp(min=1)
    dx, dy = (rx - mx[..., None]) * m, (ry - my[..., None]) * m
    r = (dx * dy).sum(-1) / ((dx * dx).sum(-1) * (dy * dy).sum(-1)).sqrt()

    def constant(v):  # (a zeroed head's |q|: every rank equal, a correlation 0 / 0)
        return torch.where(mask, v, math.inf).amin(-1) == torch.where(mask, v, -math.inf).amax(-1)

    return torch.where((n >= 3) & ~constant(x) & ~constant(y), r, torch.full_like(r, math.nan))


def skew_fraction(model) -> torch.Tensor:
    """Per head sigma = ||(M - M^T)/2||_F / ||M||_F with M = W_Q,h^T W_K,h (D x D), the bilinear
    form x M y^T of the head's scores (true per-head slices of nn.Linear weights, rows h*d_h ..).
    Returns (L, H) float64 (ours: reading (a) of docs/metrics.md, directionality)."""
    qs, ks = _projections(model)
    H = model.config.num_attention_heads
    out = []
    for q, k in zip(qs, ks):
        wq, wk = q.weight.detach().double().cpu(), k.weight.detach().double().cpu()
        d = wq.shape[0] // H
        row = []
        for h in range(H):
            M = wq[h * d:(h + 1) * d].T @ wk[h * d:(h + 1) * d]
            row.append(float(torch.linalg.matrix_norm(0.5 * (M - M.T)) / torch.linalg.matrix_norm(M)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _projections(model):
    qs = [m for name, m in model.named_modules()
          if name.endswith("attention.self.query") and "crossattention" not in name]
    ks = [m for name, m in model.named_modules()
          if name.endswith("attention.self.key") and "crossattention" not in name]
    if not qs or len(qs) != len(ks):
        raise ValueError("model: no '*.attention.self.query' / '.key' projections found; "
                         "directionality supports BERT-family encoders")
    return qs, ks


@contextmanager
def capture_qk(model) -> Iterator[dict]:
    """Forward hooks on every layer's query and key projections: yields a dict filled on each
    forward pass, {l: {"q": (B, T, D), "k": (B, T, D)}} for layer l + 1 (bias included: the true q, k)."""
    qs, ks = _projections(model)
    store: dict = {}

    def hook(layer, kind):
        def fn(_m, _inp, out):
            store.setdefault(layer, {})[kind] = out
        return fn

    handles = [m.register_forward_hook(hook(l, "q")) for l, m in enumerate(qs)]
    handles += [m.register_forward_hook(hook(l, "k")) for l, m in enumerate(ks)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- reduction
def gate_label(f: dict, mean_length: float) -> str:
    """The first rule that fires (ours: the rule of docs/metrics.md, gate patterns; cluster head and instance gate are
    not evaluated). f: the pattern features of one head."""
    if f["diagonal"] + f["cls_sep"] >= 0.6:
        return "closed gate"
    if (f["top_column"] >= 0.5 or f["top3_columns"] >= 0.6) and f["k90_median"] <= 3:
        return "directional gate"
    if f["back3"] >= 0.5:
        return "backward contextual gate"
    if f["forward3"] >= 0.5:
        return "forward contextual gate"
    if f["normalised_entropy"] >= 0.78 or f["k90_median"] >= mean_length / 2:
        return "open gate"
    return "none"


def _hist_median(hist: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Lower median of counts hist (..., V) whose bins carry values (V,); NaN if empty."""
    total = hist.sum(-1, keepdim=True)
    cum = hist.cumsum(-1)
    idx = (cum * 2 < total).sum(-1, keepdim=True).clamp(max=hist.shape[-1] - 1)
    out = values[idx[..., 0]].double()
    return torch.where(total[..., 0] > 0, out, torch.full_like(out, math.nan))


class HeadsAccumulator(Resumable):
    """Streamed per-head measures of docs/metrics.md, attention heads. update(batch) per batch; result(tokenizer)
    for the report.json block `attention_heads`.

    js: Clark's JS sums (K^2 x rows work: opt-in); directionality: the positive-cos share, the
    Spearman correlation and the map asymmetry (needs `capture_qk` active around the forward
    passes, its dict as qk) plus the weight skew fraction; sample_maps: keep the real-token maps
    of the first N texts for the report's head-map grid, or of the first N that sample_filter(index,
    text) accepts (index: 0-based over the texts in order, as cls.npy's rows; with text_ids, the
    corpus id text_ids[k] of the k-th text traced, where a selection of the corpus is traced)."""

    not_saved = ("qk", "sample_filter", "text_ids")
    fixed = ("L", "H", "max_len", "js", "directionality", "sample_maps")
    count = "seen"

    def __init__(self, L: int, H: int, max_len: int, device, *, js: bool = False,
                 directionality: bool = False, qk: dict | None = None, sample_maps: int = 0,
                 sample_filter=None, text_ids: list[int] | None = None):
        if directionality and qk is None:
            raise ValueError("directionality: pass qk=the dict of capture_qk(model)")
        if js:  # (its MDS runs at the end: a missing scikit-learn had failed after every forward pass)
            validation.require_package("sklearn.manifold", "scikit-learn", "heads", option="clark_js",
                                       why="the MDS of the heads")
        self.L, self.H, self.max_len = L, H, max_len
        self.js, self.directionality, self.qk, self.sample_maps = js, directionality, qk, sample_maps
        z = lambda *s, dt=torch.float64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.s = {
            "texts": z(()), "rows": z(()), "ln_n": z(()), "n_rows": z(()),
            "clark_entropy": z(L, H), "cls_entropy": z(L, H),
            "sep_to_sep": z(L, H), "sep_texts": z(()),
            "diagonal": z(L, H), "previous": z(L, H), "next": z(L, H), "back3": z(L, H),
            "forward3": z(L, H), "cls_sep": z(L, H), "top_column": z(L, H), "top3_columns": z(L, H),
            "k90_hist": z(L, H, max_len + 1), "nent_hist": z(L, H, ENTROPY_BINS), "value_entropy": z(L, H),
            "raw_entropy": z(L, H),
        }
        if js:
            self.s["js"] = z(L * H, L * H)
        if directionality:
            self.s.update(positive_share=z(L, H), spearman=z(L, H), spearman_n=z(L, H),
                          asymmetry=z(L, H))
        self.samples: list[dict] = []
        self.sample_filter = sample_filter
        self.text_ids = text_ids
        self.seen = 0                 # texts updated so far: the index of the next batch's first text
        self.seconds: dict[str, float] = {}

    def _tick(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - t0
        return t

    def check_restored(self) -> None:
        check_samples(self.samples, self.sample_maps, self.seen, self.text_ids, "HeadsAccumulator.samples",
                      ("text", "ids", "maps"))

    def update(self, b) -> None:
        s, H = self.s, self.H
        mask = b.mask
        B, T = mask.shape
        q = mask.double()
        n = q.sum(1)
        s["texts"] += B
        s["rows"] += n.sum()
        s["ln_n"] += n.clamp(min=1).log().sum()
        s["n_rows"] += (n * n).sum()
        sepf = b.sep.to(b.attentions[0].dtype)
        nsep = b.sep.sum(1).double()
        s["sep_texts"] += (nsep > 0).sum()
        cls_sep = (b.cls | b.sep).to(b.attentions[0].dtype)
        # the row-entropy kernel (embgeom.attention_entropy without its input checks; NaN on
        # padded rows), as the default trace takes it
        from ...backends import registry

        _, entropy_kernel = registry.pick("attention_entropy", b.attentions[0])
        t0 = time.perf_counter()
        for l, attn in enumerate(b.attentions):
            a = attn * mask[:, None, None, :].to(attn.dtype)                  # padded keys exactly 0
            qr = q[:, None, :]                                                 # (B, 1, T) real rows
            # Clark's smoothed entropies (per text mean over rows, then summed over texts)
            ent = entropy_kernel(a, mask, ENTROPY_SMOOTHING).to(a.device).double().nan_to_num(0.0)  # (B, H, T)
            s["clark_entropy"][l] += ((ent * qr).sum(-1) / n.clamp(min=1)[:, None]).sum(0)
            s["cls_entropy"][l] += ent[:, :, 0].sum(0)
            # [SEP] -> [SEP]: per text the mean over its [SEP] rows of their mass on [SEP] keys
            to_sep = torch.bmm(a.reshape(B, H * T, T), sepf[:, :, None]).view(B, H, T).double()
            per_text = (to_sep * b.sep[:, None, :]).sum(-1) / nsep.clamp(min=1)[:, None]
            s["sep_to_sep"][l] += per_text.sum(0)
            t0 = self._tick("clark entropy + sep", t0)
            # pattern features (ours), means over every real row
            ad = a                                                             # float32 terms, float64 sums
            qr = qr.to(a.dtype)
            s["diagonal"][l] += (ad.diagonal(0, 2, 3) * qr).double().sum(dim=(0, 2))
            back = [ad.diagonal(-w, 2, 3) for w in (1, 2, 3)]                  # A[i, i-w]
            fwd = [ad.diagonal(w, 2, 3) for w in (1, 2, 3)]                    # A[i, i+w]
            s["previous"][l] += (back[0] * qr[..., 1:]).double().sum(dim=(0, 2)) if T > 1 else 0.0
            s["next"][l] += (fwd[0] * qr[..., :-1]).double().sum(dim=(0, 2)) if T > 1 else 0.0
            for w in range(min(3, T - 1)):
                s["back3"][l] += (back[w] * qr[..., w + 1:]).double().sum(dim=(0, 2))
                s["forward3"][l] += (fwd[w] * qr[..., :T - w - 1]).double().sum(dim=(0, 2))
            to_special = torch.bmm(a.reshape(B, H * T, T), cls_sep[:, :, None]).view(B, H, T).double()
            s["cls_sep"][l] += (to_special * qr).sum(dim=(0, 2))
            col = torch.bmm(qr.expand(B, H, T).reshape(B * H, 1, T),
                            a.reshape(B * H, T, T)).view(B, H, T).double() / n.clamp(min=1)[:, None, None]
            top = col.topk(min(3, T), dim=-1).values
            s["top_column"][l] += top[..., 0].sum(0)
            s["top3_columns"][l] += top.sum(-1).sum(0)
            k = k90(a)                                                         # (B, H, T)
            kh = torch.zeros(H, self.max_len + 1, dtype=torch.float64, device=mask.device)
            kh.scatter_add_(1, k.transpose(0, 1).reshape(H, -1),
                            q[None].expand(H, B, T).reshape(H, -1))
            s["k90_hist"][l] += kh
            raw = entropy_kernel(a, mask, 0.0).to(a.device).double().nan_to_num(0.0)  # (B, H, T)
            s["raw_entropy"][l] += (raw * qr).sum(dim=(0, 2))
            ok = (n >= 2)[:, None, None] & mask[:, None, :]
            nent = raw / n.clamp(min=2).log()[:, None, None]
            bins = (nent * ENTROPY_BINS).long().clamp(0, ENTROPY_BINS - 1)
            eh = torch.zeros(H, ENTROPY_BINS, dtype=torch.float64, device=mask.device)
            eh.scatter_add_(1, bins.transpose(0, 1).reshape(H, -1),
                            ok.expand(B, H, T).transpose(0, 1).reshape(H, -1).double())
            s["nent_hist"][l] += eh
            t0 = self._tick("patterns", t0)
            s["value_entropy"][l] += value_histogram_entropy(a, mask).sum(0)
            t0 = self._tick("value entropy", t0)
            if self.directionality:
                self._directionality(l, a, mask, row_entropy(a.double()))
                t0 = self._tick("directionality", t0)
        if self.js:
            s["js"] += clark_js_sums(b.attentions, mask)
            t0 = self._tick("clark js", t0)
        if len(self.samples) < self.sample_maps:
            for i in range(B):
                k = self.seen + i if self.text_ids is None else self.text_ids[self.seen + i]
                if len(self.samples) >= self.sample_maps:
                    break
                if self.sample_filter is not None and not self.sample_filter(k, b.texts[i] if b.texts else ""):
                    continue
                m = min(int(n[i]), MAX_MAP_TOKENS)
                self.samples.append({
                    "text": k, "ids": b.input_ids[i, :m].tolist(),
                    "maps": torch.stack([at[i, :, :m, :m] for at in b.attentions]).float().cpu()})
            self._tick("sample maps", t0)
        self.seen += B

    def _directionality(self, l: int, a: torch.Tensor, mask: torch.Tensor, raw: torch.Tensor) -> None:
        s, H = self.s, self.H
        B, T = mask.shape
        got = self.qk.get(l)
        if not got or "q" not in got or "k" not in got:
            raise ValueError("directionality: no captured q/k for layer "
                             f"{l + 1}; run the forward passes inside capture_qk(model)")
        qv, kv = got["q"], got["k"]
        d = qv.shape[-1] // H
        qh = qv.view(B, T, H, d).transpose(1, 2)                               # (B, H, T, d)
        kh = kv.view(B, T, H, d).transpose(1, 2)
        pos = (qh @ kh.transpose(-1, -2)) > 0                                  # cos > 0 <=> q.k > 0
        qr = mask.double()[:, None, :]
        # the share of each row's own mass, in float64: float32 rows sum to 1 only to rounding,
        # so a share of the unnormalised sum could pass 1
        a64 = a.double()
        total = a64.sum(-1)
        share = (a64 * pos).sum(-1) / torch.where(total > 0, total, torch.ones_like(total))
        s["positive_share"][l] += (share * qr).sum(dim=(0, 2))
        qn = torch.linalg.vector_norm(qh.double(), dim=-1)                     # (B, H, T)
        rho = spearman(qn, raw, mask[:, None, :].expand(B, H, T))
        s["spearman"][l] += torch.nan_to_num(rho, nan=0.0).sum(0)
        s["spearman_n"][l] += (~rho.isnan()).double().sum(0)
        pair = (mask[:, :, None] & mask[:, None, :])[:, None].double()
        ad = a.double() * pair
        num = torch.linalg.matrix_norm(ad - ad.transpose(-1, -2))
        s["asymmetry"][l] += (num / (2 * torch.linalg.matrix_norm(ad))).sum(0)

    def merge(self, other: "HeadsAccumulator") -> None:
        for k, v in other.s.items():
            self.s[k] += v.to(self.s[k].device)
        self.samples = (self.samples + other.samples)[:self.sample_maps]

    def result(self, model=None, tokenizer=None, attention_to: dict | None = None) -> dict:
        """The `attention_heads` block of report.json (tensors float64 on CPU; see docs/metrics.md, attention heads).
        model: for the weight skew fraction (directionality); attention_to: TraceResult's
        attention_to_per_text (or attention_to) means, for the behaviour markers of the MDS map."""
        s, L, H = {k: v.cpu() for k, v in self.s.items()}, self.L, self.H
        texts, rows = float(s["texts"]), float(s["rows"])
        if texts == 0:
            raise ValueError("texts: no non-blank text to analyse (empty corpus)")
        mean_len = float(s["n_rows"]) / rows                                   # row-weighted mean n
        k90_med = _hist_median(s["k90_hist"], torch.arange(self.max_len + 1))
        nent_med = _hist_median(s["nent_hist"], (torch.arange(ENTROPY_BINS) + 0.5) / ENTROPY_BINS)
        feats = {
            "diagonal": s["diagonal"] / rows, "previous": s["previous"] / rows, "next": s["next"] / rows,
            "back3": s["back3"] / rows, "forward3": s["forward3"] / rows, "cls_sep": s["cls_sep"] / rows,
            "top_column": s["top_column"] / texts, "top3_columns": s["top3_columns"] / texts,
            "k90_median": k90_med, "normalised_entropy": nent_med,
        }
        patterns = []
        for l in range(L):
            row = []
            for h in range(H):
                f = {k: float(v[l, h]) for k, v in feats.items()}
                f["label"] = gate_label(f, mean_len)
                row.append(f)
            patterns.append(row)
        out = {
            "definitions": "docs/metrics.md, attention heads; js_divergence, mds, clark_entropy, cls_entropy, sep_to_sep: "
                           "Clark et al. arXiv 1906.04341; value_entropy, k90: arXiv 2502.12033 "
                           "authors' code; patterns (labels and criteria) and directionality: ours",
            "clark_entropy": s["clark_entropy"] / texts,
            "cls_entropy": s["cls_entropy"] / texts,
            "uniform_entropy": float(s["ln_n"]) / texts,
            "sep_to_sep": s["sep_to_sep"] / max(float(s["sep_texts"]), 1.0),
            "row_entropy": s["raw_entropy"] / rows,
            "value_entropy": s["value_entropy"] / texts,
            "value_entropy_max": math.log(VALUE_BINS),
            "patterns": patterns,
            "pattern_labels": list(GATE_LABELS),
            "mean_length": mean_len,
        }
        if self.js:
            js = s["js"]
            out["js_divergence"] = js
            out["mds"] = mds_embedding(js)
            out["mds_behaviour"] = behaviours(out["clark_entropy"], attention_to)
        if self.directionality:
            d = {
                "positive_cos_share": s["positive_share"] / rows,
                "spearman_qnorm_entropy": torch.where(s["spearman_n"] > 0,
                                                      s["spearman"] / s["spearman_n"].clamp(min=1),
                                                      torch.full_like(s["spearman"], math.nan)),
                "asymmetry": s["asymmetry"] / texts,
            }
            if model is not None:
                d["skew_fraction"] = skew_fraction(model)
            out["directionality"] = d
        if self.samples:
            out["sample_maps"] = [{
                "text": sm["text"], "tokens": tokenizer.convert_ids_to_tokens(sm["ids"]) if tokenizer is not None
                else [str(i) for i in sm["ids"]],
                "maps": sm["maps"]} for sm in self.samples]
        return out


PERIOD_COMMA = "'.' or ','"   # Clark's Fig. 6 marker for heads on periods and commas


def behaviours(clark_entropy: torch.Tensor, attention_to: dict | None) -> list[list[str]]:
    """Clark Fig. 6 markers per head: "broad" (mean entropy > 3.8 nats), "next"/"previous"
    (>= 0.5), "[CLS]"/"[SEP]"/"'.' or ','" (>= 0.6; the last on the mass on tokens '.' and ','
    together, as Clark's code marks them, not on every punctuation token), first that holds in
    that order, else "other". attention_to: {cls, sep, period, comma, prev, next} (L, H) means;
    `embgeom text` passes TraceResult.attention_to_per_text (Clark's per-text-first averages)."""
    L, H = clark_entropy.shape
    out = []
    for l in range(L):
        row = []
        for h in range(H):
            lab = "other"
            if float(clark_entropy[l, h]) > BROAD_NATS:
                lab = "broad"
            elif attention_to is not None:
                v = {k: float(t[l, h]) for k, t in attention_to.items()}
                v["period_comma"] = v.get("period", 0.0) + v.get("comma", 0.0)
                for key, name, thr in (("next", "next", 0.5), ("prev", "previous", 0.5),
                                       ("cls", "[CLS]", 0.6), ("sep", "[SEP]", 0.6),
                                       ("period_comma", PERIOD_COMMA, 0.6)):
                    if v.get(key, 0.0) >= thr:
                        lab = name
                        break
            row.append(lab)
        out.append(row)
    return out


def mds_embedding(dissimilarity: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Clark's Fig. 6 map: scikit-learn metric MDS of the summed JS matrix as it is
    (precomputed, no square root), n_init=5, max_iter=1000, eps=1e-10, random init, fixed seed.
    (K, K) -> (K, 2) float64."""
    import numpy as np
    from sklearn.manifold import MDS

    d = dissimilarity.double().cpu().numpy()
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    kw = dict(n_components=2, n_init=5, max_iter=1000, eps=1e-10, random_state=seed)
    try:
        mds = MDS(metric_mds=True, metric="precomputed", init="random", **kw)
    except TypeError:                                      # scikit-learn < 1.8
        mds = MDS(metric=True, dissimilarity="precomputed", **kw)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # all dissimilarities 0 (one head, or heads alike): scikit-learn's stress ratio is 0 / 0
        # at every iteration, a RuntimeWarning each (9,990 lines on stderr); the layout is 0
        warnings.simplefilter("ignore", RuntimeWarning)
        return torch.from_numpy(mds.fit_transform(d)).double()
