"""Context similarity beyond each token's argmax (docs/metrics.md, context similarity; arXiv
2512.21956): the per-head S = O O^T maps of the first N texts (`--head-maps N`), and
"high-similarity pairs" chosen by a rule (`--similar tau:X | topk:K`) with their distance
histogram and their same-sentence, [SEP], '.'-or-[SEP] and repeated-token shares.

The rules are **ours** (the paper's own rule could not be read): `tau:X` takes every ordered pair
(i, j), i != j real tokens, with cos(o_i, o_j) >= X (both orders of a pair; cosine, because raw
S has a scale of its own in every head); `topk:K` takes each real token's K largest S[i, j]
(raw scalar products, as the argmax; ties to the smaller j; fewer when the text has fewer
tokens). Selection in float64.
"""
from __future__ import annotations

import math
import time

import torch

from ...engine.checkpoint import Resumable, check_samples
from ..text.attention import sentence_index
from ..text.trace import sentence_tables

CONTEXT_MAPS_FILE = "context_maps.npz"


def parse_similar(text: str | None):
    """'tau:X' (-1 <= X <= 1) or 'topk:K' (K >= 1) -> (rule, value); None -> None."""
    if text is None:
        return None
    rule, _, value = str(text).partition(":")
    try:
        if rule == "tau":
            x = float(value)
            if not -1.0 <= x <= 1.0 or math.isnan(x):
                raise ValueError
            return ("tau", x)
        if rule == "topk":
            k = int(value)
            if k < 1:
                raise ValueError
            return ("topk", k)
    except ValueError:
        pass
    raise ValueError(f"--similar: expected tau:X with -1 <= X <= 1 or topk:K with K >= 1, got {text!r}")


NEAR_TAU = 1e-10   # well above the float64 rounding of a unit-row dot product (d <= 4096)


def select_pairs(o: torch.Tensor, mask: torch.Tensor, rule) -> torch.Tensor:
    """o (B, H, T, d) one layer's head outputs, mask (B, T) -> (B, H, T, T) bool: the ordered
    pairs (i, j) the rule selects (i, j real, i != j, texts with >= 2 real tokens)."""
    B, H, T, _ = o.shape
    o = o.double()
    n = mask.sum(1)
    valid = mask & (n >= 2)[:, None]
    pair_ok = valid[:, None, :, None] & valid[:, None, None, :]
    pair_ok = (pair_ok & ~torch.eye(T, dtype=torch.bool, device=o.device)).expand(B, H, T, T)
    kind, value = rule
    if kind == "tau":
        norm = torch.linalg.vector_norm(o, dim=-1, keepdim=True)
        u = o / torch.where(norm > 0, norm, torch.ones_like(norm))
        cos = u @ u.transpose(-1, -2)
        # pairs within rounding of tau are decided on cos = 1 - |u_i - u_j|^2 / 2 (or
        # |u_i + u_j|^2 / 2 - 1 below 0), exact where the rows are parallel: the dot product had
        # given identical rows 1 - 1.1e-16 and dropped them at tau:1 (opposite rows at tau:-1);
        # both orders of a pair are decided alike
        near = (cos - value).abs() <= NEAR_TAU
        near = near | near.transpose(-1, -2)
        if bool(near.any()):
            b, h, i, j = near.nonzero(as_tuple=True)
            ui, uj = u[b, h, i], u[b, h, j]
            plus = (cos[b, h, i, j] + cos[b, h, j, i]) >= 0
            close = torch.where(plus, 1 - ((ui - uj) ** 2).sum(-1) / 2, ((ui + uj) ** 2).sum(-1) / 2 - 1)
            cos = cos.clone()
            cos[b, h, i, j] = close.clamp(-1.0, 1.0)
        return pair_ok & (cos >= value) & (norm > 0) & (norm > 0).transpose(-1, -2)
    s = o @ o.transpose(-1, -2)
    s = s.masked_fill(~pair_ok, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices   # ties: smaller j first
    k = min(int(value), T)
    pick = torch.zeros(B, H, T, T, dtype=torch.bool, device=o.device)
    pick.scatter_(-1, order[..., :k], True)
    return pick & pair_ok


class SimilarityAccumulator(Resumable):
    """Observer of trace(): the selected pairs' sums per (layer, head) and the S maps of the
    first `maps` texts (real tokens only, float32)."""

    not_saved = ("tables", "tokenizer", "sample_filter", "rule", "text_ids")
    fixed = ("L", "H", "max_len", "maps")
    count = "seen"

    def __init__(self, L: int, H: int, max_len: int, tokenizer, rule=None, maps: int = 0,
                 sample_filter=None, text_ids: list[int] | None = None):
        self.L, self.H, self.max_len, self.rule, self.maps = L, H, max_len, rule, maps
        # the texts whose S maps are kept: the first `maps` that sample_filter(index, text) accepts
        # (--show-texts), the same texts as the attention maps of HeadsAccumulator
        self.sample_filter = sample_filter
        self.text_ids = text_ids  # (the corpus id of each text traced: HeadsAccumulator's)
        self.seen = 0
        self.tables = sentence_tables(tokenizer)
        self.tokenizer = tokenizer
        z = lambda *s: torch.zeros(*s, dtype=torch.int64)  # noqa: E731
        self.s = {k: z(L, H) for k in ("pairs", "distance", "same", "sep", "period", "repeat")}
        self.s["hist"] = z(L, H, max_len)
        self.tokens = 0
        self.samples: list[dict] = []
        self.seconds: dict[str, float] = {}

    def check_restored(self) -> None:
        check_samples(self.samples, self.maps, self.seen, self.text_ids, "SimilarityAccumulator.samples",
                      ("text", "tokens", "maps"))

    def update(self, b) -> None:
        t0 = time.perf_counter()
        mask = b.mask
        B, T = mask.shape
        for i in range(B):
            if len(self.samples) >= self.maps:
                break
            k = self.seen + i if self.text_ids is None else self.text_ids[self.seen + i]
            if self.sample_filter is not None and not self.sample_filter(k, b.texts[i] if b.texts else ""):
                continue
            idx = mask[i].nonzero().flatten()
            o = torch.stack([h[i, idx].transpose(0, 1) for h in b.head_outputs]).double()  # (L, H, n, d)
            self.samples.append({
                "text": k, "tokens": self.tokenizer.convert_ids_to_tokens(b.input_ids[i, idx].tolist()),
                "maps": (o @ o.transpose(-1, -2)).float().cpu()})
        self.seen += B
        if self.rule is not None:
            self._pairs(b)
            self.seconds["similar: pairs"] = self.seconds.get("similar: pairs", 0.0) + time.perf_counter() - t0

    def _pairs(self, b) -> None:
        mask, ids = b.mask, b.input_ids
        B, T = mask.shape
        ends, period = (t.to(mask.device)[ids] & mask for t in self.tables)
        sid = sentence_index(ends | b.sep)
        pos = torch.arange(T, device=mask.device)
        dist = (pos[:, None] - pos[None, :]).abs()                                   # (T, T)
        same = (sid[:, :, None] == sid[:, None, :])[:, None]                         # (B, 1, T, T)
        rep = (ids[:, :, None] == ids[:, None, :])[:, None]
        on_sep = b.sep[:, None, None, :]
        on_stop = (b.sep | period)[:, None, None, :]
        self.tokens += int((mask & (mask.sum(1) >= 2)[:, None]).sum())
        for l, h in enumerate(b.head_outputs):
            p = select_pairs(h.transpose(1, 2), mask, self.rule)                     # (B, H, T, T)
            cnt = lambda m, p=p: (p & m).sum(dim=(0, 2, 3)).cpu()  # noqa: E731
            self.s["pairs"][l] += p.sum(dim=(0, 2, 3)).cpu()
            self.s["distance"][l] += (p * dist).sum(dim=(0, 2, 3)).cpu()
            self.s["same"][l] += cnt(same)
            self.s["repeat"][l] += cnt(rep)
            self.s["sep"][l] += cnt(on_sep)
            self.s["period"][l] += cnt(on_stop)
            hist = torch.zeros(self.H, T, dtype=torch.int64, device=mask.device)
            hist.scatter_add_(1, dist.expand(B, self.H, T, T).transpose(0, 1).reshape(self.H, -1),
                              p.transpose(0, 1).reshape(self.H, -1).long())
            self.s["hist"][l, :, :T] += hist.cpu()

    def result(self) -> dict:
        """context_similarity.similar: the rule, pairs (L, H), pairs per token, mean |i - j|,
        distance_hist (L, H, d) and layer_distance_hist (L, d) (trimmed after the largest distance
        seen), same_sentence_share, separator_share, period_separator_share,
        repeated_token_share (L, H); NaN (null) for a head without pairs."""
        s = self.s
        pairs = s["pairs"].double()
        share = lambda k: torch.where(pairs > 0, s[k].double() / pairs.clamp(min=1),  # noqa: E731
                                      torch.full_like(pairs, math.nan))
        hist = s["hist"]
        seen = (hist.sum(dim=(0, 1)) > 0).nonzero()
        width = int(seen.max()) + 1 if seen.numel() else 0
        kind, value = self.rule
        return {"rule": f"{kind}:{value}", "pairs": s["pairs"].tolist(),
                "pairs_per_token": (pairs / max(self.tokens, 1)).tolist(),
                "mean_distance": share("distance").tolist(),
                "distance_hist": hist[..., :width].tolist(),
                "layer_distance_hist": hist[..., :width].sum(1).tolist(),
                "same_sentence_share": share("same").tolist(),
                "separator_share": share("sep").tolist(),
                "period_separator_share": share("period").tolist(),
                "repeated_token_share": share("repeat").tolist()}

    def write_maps(self, path: str) -> None:
        """context_maps.npz: text{k}_tokens (n,) str and text{k}_S (L, H, n, n) float32, k the text's
        0-based index in the corpus (as in head_maps.json)."""
        import numpy as np

        from ...io import atomic_write

        arrays = {}
        for sm in self.samples:
            k = sm["text"]
            arrays[f"text{k}_tokens"] = np.array(sm["tokens"])
            arrays[f"text{k}_S"] = sm["maps"].numpy()
        with atomic_write(path, binary=True, name=CONTEXT_MAPS_FILE) as f:
            np.savez(f, **arrays)
