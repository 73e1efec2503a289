"""Per-batch attention and head-output summaries (docs/metrics.md, attention rows and context similarity), vectorised torch on the tensors'
device. Every function returns *sums* (float64) and counts over one batch, so a corpus is the
sum of its batches (see `analysis.text.trace.TraceAccumulator`); nothing here keeps per-token state.

Conventions: attn (B, H, T, T) rows = queries (padded keys ~0); mask (B, T) bool (True = real
token); cls / sep / punct (B, T) bool; head_out (B, H, T, d_h).
"""
from __future__ import annotations

import torch

from ...backends import registry
from ...numerics import js_terms

TARGETS = ("cls", "sep", "punct", "prev", "next", "period", "comma", "sep_from_other")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 maps and head outputs as float32 (others as they are): the sums and
    products here are float32 at least (docs/metrics.md); in bf16 a context argmax differed from
    float64's on half the rows and the key masses in their fourth digit."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def special_mass(attn: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """attn (B, H, T, T), keys (B, T, K) 0/1 -> (B, H, T, K): each row's mass on each key set
    (one batched matmul over the attention viewed as (B, H*T, T); no broadcast copies)."""
    attn = at_least_fp32(attn)
    B, H, T, _ = attn.shape
    # keys as a contiguous (B, K, T) operand: BLAS then reads it transposed, about 4x faster
    # than a (B, T, K) one for K = 3 (measured on CPU)
    kt = keys.to(attn.dtype).transpose(1, 2).contiguous()
    return torch.bmm(attn.reshape(B, H * T, T), kt.transpose(1, 2)).view(B, H, T, -1)


def attention_targets(attn: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor,
                      sep: torch.Tensor, punct: torch.Tensor,
                      mass: torch.Tensor | None = None, period: torch.Tensor | None = None,
                      comma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Attention mass of each real query row to [CLS], [SEP], punctuation, the previous and the
    next real token, and (with `period` / `comma`, (B, T) bool) to '.' and to ',' alone, summed
    over the rows of the batch: dict of (H,) float64 (divide by the number of real rows,
    mask.sum(), for the mean). "sep_from_other" sums the mass on [SEP] of the real rows that
    are neither [CLS] nor [SEP] only (divide by their number, (mask & ~cls & ~sep).sum(); Clark
    et al., arXiv 1906.04341, section 3.2). mass: special_mass(attn, [cls, sep, punct(, period,
    comma)]) when the caller has it already. The sums over the batch of attention_targets_per_text."""
    return {k: v.sum(0) for k, v in attention_targets_per_text(attn, mask, cls, sep, punct, mass,
                                                                period, comma).items()}


def attention_targets_per_text(attn: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor,
                               sep: torch.Tensor, punct: torch.Tensor,
                               mass: torch.Tensor | None = None, period: torch.Tensor | None = None,
                               comma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """attention_targets per text: dict of (B, H) float64, each text's sums over its own real
    rows (divide by its mask.sum(1), or (mask & ~cls & ~sep).sum(1) for "sep_from_other", for
    the text's mean: Clark et al.'s per-text average before the mean over texts)."""
    attn = at_least_fp32(attn)
    q = mask.to(attn.dtype)
    marks = period is not None and comma is not None
    if mass is None:
        cols = [cls, sep, punct] + ([period, comma] if marks else [])
        mass = special_mass(attn, torch.stack(cols, dim=-1))             # (B, H, T, 3 or 5)
    per_head = (mass * q[:, None, :, None]).double().sum(dim=2)           # (B, H, K)
    names = ("cls", "sep", "punct") + (("period", "comma") if marks else ())
    out = {k: per_head[..., c] for c, k in enumerate(names)}
    other = (mask & ~cls & ~sep).to(attn.dtype)
    out["sep_from_other"] = (mass[..., 1] * other[:, None, :]).double().sum(dim=2)
    both = (mask[:, 1:] & mask[:, :-1]).to(attn.dtype)[:, None]           # (B, 1, T-1)
    out["prev"] = (torch.diagonal(attn, offset=-1, dim1=2, dim2=3) * both).double().sum(dim=2)
    out["next"] = (torch.diagonal(attn, offset=1, dim1=2, dim2=3) * both).double().sum(dim=2)
    return out


def head_mean_entropy(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each head's mean attention row over the real queries of a sequence
    ("broad" vs "focused" heads), summed over the sequences of the batch: (H,) float64."""
    attn = at_least_fp32(attn)
    B, H, T, _ = attn.shape
    q = mask.to(attn.dtype)
    n = q.sum(1).clamp(min=1)
    qh = q[:, None, None, :].expand(B, H, 1, T).reshape(B * H, 1, T)
    mean_row = torch.bmm(qh, attn.reshape(B * H, T, T)).view(B, H, T).double() / n.double()[:, None, None]
    mean_row = mean_row * mask[:, None, :]
    ent = -torch.special.xlogy(mean_row, mean_row).sum(-1)                # (B, H)
    return ent.sum(0)


def _buffer(workspace: dict | None, key, shape, dtype, device, zero=False) -> torch.Tensor:
    """A scratch tensor reused across calls when a workspace dict is given (large fresh
    allocations page-fault on every batch)."""
    if workspace is None:
        return torch.zeros(shape, dtype=dtype, device=device) if zero else torch.empty(shape, dtype=dtype, device=device)
    k = (key, tuple(shape), dtype, str(device))
    if k not in workspace:
        for old in [o for o in workspace if o[0] == key]:
            del workspace[old]
        workspace[k] = torch.zeros(shape, dtype=dtype, device=device)
    return workspace[k]


def offset_weight(mask, cls, sep, dtype) -> torch.Tensor:
    """(B, 1, T, T): 1 where the query is real and the key is a real token other than [CLS]/[SEP]."""
    other = mask & ~cls & ~sep
    return (mask[:, :, None] & other[:, None, :]).to(dtype)[:, None]


def target_distribution(attn: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor,
                        sep: torch.Tensor, max_len: int, workspace: dict | None = None,
                        mass: torch.Tensor | None = None) -> torch.Tensor:
    """Per head, the attention of every real query row split over R = 2 + 2*max_len - 1 targets:
    [mass to [CLS], mass to [SEP], then mass to every other real key binned by its relative
    offset j - i = -(max_len-1) .. max_len-1]. Each row sums to 1, so the batch sum divided by
    the number of rows is a probability distribution: the head's mean attention distribution
    that the JS distance matrix compares (Clark et al., arXiv 1906.04341, compare heads by their attention; relative
    offsets plus the two special targets keep its head types apart: [CLS]/[SEP]/previous/next/
    broad). Returns the batch sums (H, R) float64."""
    attn = at_least_fp32(attn)
    B, H, T, _ = attn.shape
    if T > max_len:
        raise ValueError(f"attn: sequence length {T} exceeds max_len {max_len}")
    q = mask.to(attn.dtype)
    weight = offset_weight(mask, cls, sep, attn.dtype)
    if mass is None:                                                                   # (B,H,T,2)
        mass = special_mass(attn, torch.stack([cls, sep], -1))
    special = (mass[..., :2] * q[:, None, :, None]).double().sum(dim=(0, 2))          # (H, 2)
    # The offsets are laid out alike in every sequence: sum the weighted maps over the batch
    # first (one pass over attn), then walk the diagonals of one (H, T, T) block. Relative-offset
    # sums without a Python loop: rows go into a buffer of width W = 2T-1 after T-1 zeros; a
    # stride of W+1 then walks one diagonal per offset (a diagonal running off the right end
    # lands in the next row's zeros; T-1 zeros at the very end cover the last row).
    # (float64 sums of the exact products attn * 0/1: float32 sums over a batch had put js_distance
    # up to 7e-6 off float64 on small models)
    summed = _buffer(workspace, "offset_maps", (H, T, T), torch.float64, attn.device)
    summed.zero_()
    for b in range(B):
        summed.add_(attn[b] * weight[b])
    W = 2 * T - 1
    flat = _buffer(workspace, "offsets", (H * T * W + T - 1,), torch.float64, attn.device, zero=True)
    flat[:H * T * W].view(H, T, W)[..., T - 1:].copy_(summed)
    diag = flat.as_strided((H, 2 * T - 1, T), (T * W, 1, W + 1))
    offsets = diag.sum(-1)                                                           # (H, 2T-1)
    out = torch.zeros(H, 2 + 2 * max_len - 1, dtype=torch.float64, device=attn.device)
    out[:, :2] = special
    c = 2 + max_len - 1
    out[:, c - (T - 1):c + T] = offsets
    return out


def _u8(t: torch.Tensor):
    """A bool / flag tensor as the C++ core's contiguous uint8 numpy array."""
    return t.to(torch.uint8).contiguous().numpy()


def fused_row_entropy(attn: torch.Tensor) -> bool:
    """Whether layer_summaries(..., row_entropy=True) takes the rows' entropies in its own pass
    over these maps (the C++ pass on CPU float32 maps, where the entropy kernel is the C++ one)."""
    return registry.cpp_kernel("attention_sums", at_least_fp32(attn)) is not None \
        and registry.pick("attention_entropy", attn)[0] == "cpp"


def layer_summaries(attn: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor, sep: torch.Tensor,
                    punct: torch.Tensor, period: torch.Tensor, comma: torch.Tensor, max_len: int,
                    workspace: dict | None = None, row_entropy: bool = False):
    """One layer's attention summaries of `embgeom text`: (attention_targets_per_text with
    period and comma, head_mean_entropy, target_distribution), and with row_entropy (where
    fused_row_entropy holds) a fourth item, the rows' entropies (B, H, T) float32 as
    attention_entropy(attn, mask) gives them (NaN for padded rows), taken while each row is in
    cache. On CPU float32 maps one C++ pass over them (_C.attention_sums; float64 sums, the key
    masses from the column sums); elsewhere the torch functions, which read the maps four times.
    16-bit maps are summed as float32."""
    attn = at_least_fp32(attn)
    B, H, T, _ = attn.shape
    keys = torch.stack([cls, sep, punct, period, comma], dim=-1)
    attention_sums = registry.cpp_kernel("attention_sums", attn)
    if row_entropy and not fused_row_entropy(attn):
        raise ValueError("row_entropy: the maps' rows take the entropy kernel of their backend here")
    if attention_sums is None:
        mass = special_mass(attn, keys)
        per = attention_targets_per_text(attn, mask, cls, sep, punct, mass=mass, period=period, comma=comma)
        return (per, head_mean_entropy(attn, mask),
                target_distribution(attn, mask, cls, sep, max_len, workspace=workspace, mass=mass))
    if T > max_len:
        raise ValueError(f"attn: sequence length {T} exceeds max_len {max_len}")
    out = attention_sums(attn.detach().contiguous().numpy(), _u8(mask), _u8(keys), _u8(mask & ~cls & ~sep),
                         entropy=row_entropy)
    key_mass, sep_other, prev, nxt, row_sum, offsets = (torch.from_numpy(x) for x in out[:6])
    per = {k: key_mass[..., c] for c, k in enumerate(("cls", "sep", "punct", "period", "comma"))}
    per.update(sep_from_other=sep_other, prev=prev, next=nxt)
    n = mask.sum(1).clamp(min=1).double()
    mean_row = row_sum / n[:, None, None] * mask[:, None, :]
    hme = (-torch.special.xlogy(mean_row, mean_row).sum(-1)).sum(0)
    dist = torch.zeros(H, 2 + 2 * max_len - 1, dtype=torch.float64)
    dist[:, :2] = key_mass[..., :2].sum(0)
    c = 2 + max_len - 1
    dist[:, c - (T - 1):c + T] = offsets
    if row_entropy:
        return per, hme, dist, torch.from_numpy(out[6])
    return per, hme, dist


def js_distance(dists: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance sqrt(JS divergence in nats) between the rows of dists (K, R)
    (non-negative; each row is normalised to sum 1). Returns (K, K) float64; O(K R) memory
    per row of the result."""
    p = dists.double()
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-300)
    out = torch.empty(p.shape[0], p.shape[0], dtype=torch.float64, device=p.device)
    for i in range(p.shape[0]):
        # terms >= 0 (numerics.js_terms): a difference of entropies had lost the digits of
        # nearly equal heads (0.9 % at a distance of 4e-8)
        out[i] = js_terms(p[i], p).sum(-1).sqrt()
    out.fill_diagonal_(0.0)
    return 0.5 * (out + out.T)


# context similarity's scores are computed this many bytes of (T, T) blocks at a time
CONTEXT_CHUNK_BYTES = 1 << 20


def context_argmax(head_out: torch.Tensor, mask: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
    """(B, H, T) int64: for every real token i of a sequence with >= 2 real tokens, the real
    j != i maximising S[i, j] = o_i . o_j (ties to the smaller j); other rows point at themselves.
    On CPU float32 tensors the C++ kernel (products in float32, every key within their error
    bound of the maximum rescored in float64: the float64 argmax); elsewhere torch's scores with
    the same float64 step (context_argmax_torch); 16-bit head outputs as float32."""
    head_out = at_least_fp32(head_out)
    kernel = registry.cpp_kernel("context_argmax", head_out)
    if kernel is None:
        return context_argmax_torch(head_out, mask, workspace)
    o = head_out if head_out.stride(-1) == 1 else head_out.contiguous()  # rows read in place
    return torch.from_numpy(kernel(o.detach().numpy(), _u8(mask)))


def context_argmax_torch(head_out: torch.Tensor, mask: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
    """context_argmax from torch's scores in head_out's dtype, a cache-sized chunk of heads at a
    time, then as the C++ kernel: every real key within the scores' error bound of a row's
    maximum rescored in float64 (the float64 argmax; float32 near-ties had taken the smaller
    position where float64 told them apart), every real key where |q| |k| may pass the dtype's
    range or a row holds NaN / inf; rows without an answer point at themselves."""
    head_out = at_least_fp32(head_out)
    B, H, T, d = head_out.shape
    o = head_out.reshape(B * H, T, d)
    # S in chunks of heads whose (T, T) blocks stay in cache (about 1 MB): the products and the
    # passes over them read cache, not a (B, H, T, T) array written and read again
    step = max(1, min(B * H, CONTEXT_CHUNK_BYTES // max(1, T * T * head_out.element_size())))
    s = _buffer(workspace, "similarity", (step, T, T), head_out.dtype, head_out.device)
    j = torch.empty(B * H, T, dtype=torch.int64, device=head_out.device)
    o64 = o.double()
    qn = torch.linalg.vector_norm(o64, dim=-1)                                    # (B H, T)
    real = mask.repeat_interleave(H, 0)                                           # (B H, T): b * H + h
    kmax = torch.where(real, qn, torch.zeros_like(qn)).amax(-1)                   # (B H,)
    for a in range(0, B * H, step):
        e = min(B * H, a + step)
        sa = s[:e - a]
        torch.matmul(o[a:e], o[a:e].transpose(-1, -2), out=sa)
        _rescore_near_maxima(sa, j[a:e], o64[a:e], real[a:e], qn[a:e], kmax[a:e])
    return j.view(B, H, T)


def _rescore_near_maxima(s: torch.Tensor, j: torch.Tensor, o64: torch.Tensor, real: torch.Tensor,
                         qn: torch.Tensor, kmax: torch.Tensor) -> None:
    """context_argmax_torch's answers on one chunk, into j (n, T): s (n, T, T) the scores. The
    candidates of a real row are its real keys (never itself, never a padded key, never a NaN
    score) within the bound |fl(q . k) - q . k| <= gamma_d |q| |k| + d eta of their maximum: one
    is the answer, several are rescored in float64; all real keys where that bound is not to be
    trusted (|q| |k| near the dtype's range, NaN, inf) or no score is a number. A row without an
    answer (padded, a one-token text, every product NaN) points at itself."""
    n, T, _ = s.shape
    d = o64.shape[-1]
    fin = torch.finfo(s.dtype)
    u, eta = fin.eps / 2, fin.smallest_normal * fin.eps                  # unit roundoff, subnormal spacing
    gamma = d * u / (1 - d * u)
    pos = torch.arange(T, device=s.device)
    # (n, T, T): a real query's real keys, not itself
    others = real[:, :, None] & real[:, None, :] & (pos[:, None] != pos[None, :])
    s64 = s.double()
    numbers = others & ~torch.isnan(s64)
    top = torch.where(numbers, s64, torch.full_like(s64, float("-inf"))).amax(-1, keepdim=True)
    bound = 2.02 * (gamma * qn[..., None] * kmax[:, None, None] + d * eta)
    cand = numbers & (s64 >= top - bound)
    # products or their sums past the dtype's range, NaN, inf, or no score a number: every real
    # key, in float64
    every = ~(qn * kmax[:, None] < 0.5 * fin.max) | (cand.sum(-1) == 0)
    cand |= every[..., None] & others
    count = cand.sum(-1)
    j.copy_(torch.where(count == 1, _first_true(cand), pos.expand_as(j)))
    redo = (count > 1) | (every & (count > 0))
    if not bool(redo.any()):
        return
    r, i = redo.nonzero(as_tuple=True)
    prod = torch.einsum("md,mtd->mt", o64[r, i], o64[r])                  # (m, T) float64
    valid = cand[r, i] & ~torch.isnan(prod)
    score = torch.where(valid, prod, torch.full_like(prod, float("-inf")))
    pick = _first_true(valid & (score == score.amax(-1, keepdim=True)))         # ties: the smaller j
    j[r, i] = torch.where(valid.any(-1), pick, i)                               # every product NaN: no answer


def _first_true(m: torch.Tensor) -> torch.Tensor:
    """The first position along the last axis where m holds (its length where none does)."""
    T = m.shape[-1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, T)).amin(-1)


def context_similarity(head_out: torch.Tensor, mask: torch.Tensor, sep: torch.Tensor,
                       input_ids: torch.Tensor, vocab_size: int,
                       workspace: dict | None = None, sentence: torch.Tensor | None = None,
                       period: torch.Tensor | None = None,
                       focus_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Context similarity (docs/metrics.md) for every head of one layer, one batch. head_out: (B, H, T, d_h), the head's
    output O before the output projection; S = O O^T (raw scalar products, arXiv 2512.21956).

    For every real token i of a sequence with >= 2 real tokens: j = argmax over real j != i of
    S[i, j] (ties to the smaller j). Returns sums over the batch:
      rows (H,) number of such tokens; distance (H,) sum of |i - j|; separator (H,) hits on
      [SEP]; repeated (H,) hits on another occurrence of the token's own id; distance_hist (H, T) counts of |i - j|; focus_counts (H, vocab_size): per sequence
      the focus token (the column j with the most hits, ties to the smaller position) counted by
      its token id.
    With sentence (B, T) int64 sentence index of each token (sentence_index) and period (B, T)
    bool ('.' tokens), also: same_sentence (H,) hits inside the token's own sentence and
    period_or_separator (H,) hits on '.' or [SEP] (arXiv 2512.21956 counts '.' with [SEP]).
    focus_counts: an (H, vocab_size) int64 tensor the focus counts are added to (and returned as
    focus_counts) instead of a new one (a caller's running sums: no (H, vocab_size) zeros and sum
    per layer, 0.8 ms of 2.9 MB each at the default model's vocabulary).
    """
    B, H, T, _ = head_out.shape
    n = mask.sum(1)
    qvalid = mask & (n >= 2)[:, None]                                      # (B, T)
    j = context_argmax(head_out, mask, workspace)
    summaries = registry.cpp_kernel("context_summaries")
    if summaries is not None and j.device.type == "cpu":
        # one C++ pass over j for every sum below (the torch ops took 2.5 ms a layer, 32 x 128)
        counts, hist, focus = (torch.from_numpy(x) for x in summaries(
            j.contiguous().numpy(), _u8(mask), _u8(sep), input_ids.to(torch.int64).contiguous().numpy(),
            None if sentence is None else sentence.to(torch.int64).contiguous().numpy(),
            None if period is None else _u8(period | sep)))
        out = dict(zip(("rows", "distance", "separator", "repeated"), counts[:4]), distance_hist=hist)
        if sentence is not None:
            out["same_sentence"] = counts[4]
        if period is not None:
            out["period_or_separator"] = counts[5]
    else:
        out, focus = _context_sums_torch(j, mask, qvalid, sep, input_ids, sentence, period)
    ids = input_ids.gather(1, focus.reshape(B, H).to(input_ids.device)).to(torch.int64)  # (B, H)
    has = (n >= 2)[:, None].expand(B, H).long()
    if focus_counts is None:
        focus_counts = torch.zeros(H, vocab_size, dtype=torch.int64, device=mask.device)
    focus_counts.scatter_add_(1, ids.T.to(focus_counts.device), has.T.to(focus_counts.device))
    out["focus_counts"] = focus_counts
    return out


def _context_sums_torch(j, mask, qvalid, sep, input_ids, sentence, period):
    """context_similarity's sums over the argmax j (B, H, T) in torch (the C++ core's
    context_summaries elsewhere): (the dict without focus_counts, focus (B, H) positions)."""
    B, H, T = j.shape
    w = qvalid[:, None, :].expand(B, H, T)
    pos = torch.arange(T, device=mask.device)
    dist = (j - pos).abs()
    wl = w.long()
    tok = input_ids[:, None, :].expand(B, H, T)
    out = {
        "rows": wl.sum(dim=(0, 2)),
        "distance": (dist * wl).sum(dim=(0, 2)),
        "separator": (sep[:, None, :].expand(B, H, T).gather(-1, j) & w).long().sum(dim=(0, 2)),
        "repeated": ((tok.gather(-1, j) == tok) & w).long().sum(dim=(0, 2)),
    }
    if sentence is not None:
        sid = sentence[:, None, :].expand(B, H, T)
        out["same_sentence"] = ((sid.gather(-1, j) == sid) & w).long().sum(dim=(0, 2))
    if period is not None:
        stop = (period | sep)[:, None, :].expand(B, H, T)
        out["period_or_separator"] = (stop.gather(-1, j) & w).long().sum(dim=(0, 2))
    hist = torch.zeros(H, T, dtype=torch.int64, device=mask.device)
    hist.scatter_add_(1, dist.transpose(0, 1).reshape(H, -1), wl.transpose(0, 1).reshape(H, -1))
    out["distance_hist"] = hist
    hits = torch.zeros(B, H, T, dtype=torch.int64, device=mask.device)
    hits.scatter_add_(-1, j, wl)
    return out, hits.argmax(-1)                                            # focus (B, H)


def sentence_index(ends: torch.Tensor) -> torch.Tensor:
    """ends (B, T) bool: sentence-final tokens ('.', '!', '?', [SEP]) -> (B, T) int64 sentence
    index; an end token belongs to the sentence it closes, the next token starts a new one."""
    starts = torch.zeros_like(ends, dtype=torch.int64)
    starts[:, 1:] = ends[:, :-1].long()
    return starts.cumsum(1)
