"""The `torch` backend (chunked PyTorch, any device, never N x N) and the `reference` backend
(float64 spec, opt-in only)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import reference
from ._backends import register
from ._pairwise import PairwiseConfig, TorchEngine, empty_state


def _exact_only(x, *, precision="exact", **_):
    if precision != "exact":
        return [f"precision={precision!r} is not implemented here (use precision='exact', or backend='cpp')"]
    return []


def torch_pairwise(x, y, cfg: PairwiseConfig):
    return TorchEngine(x, y, cfg)


def torch_cone_unit_sums(x: torch.Tensor, mask: torch.Tensor | None, chunk: int = 65536):
    """x: (B, T, D), mask: (B, T) -> sums (B, D) f64, used (B,), zero (B,), in row chunks."""
    B, T, D = x.shape
    sums = torch.zeros(B, D, dtype=torch.float64, device=x.device)
    used = torch.zeros(B, dtype=torch.int64, device=x.device)
    zero = torch.zeros(B, dtype=torch.int64, device=x.device)
    for t0 in range(0, T, chunk):
        part = x[:, t0:t0 + chunk].double()
        valid = torch.ones(part.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask[:, t0:t0 + chunk]
        norms = torch.linalg.vector_norm(part, dim=2)
        nonzero = norms > 0
        keep = valid & nonzero
        unit = part / torch.where(nonzero, norms, torch.ones_like(norms)).unsqueeze(2)
        sums += (unit * keep.unsqueeze(2)).sum(1)
        used += keep.sum(1)
        zero += (valid & ~nonzero).sum(1)
    return sums, used, zero


def torch_row_entropy(attn: torch.Tensor, mask: torch.Tensor | None, smoothing: float = 0.0):
    """attn: (B, H, T, T) -> (B, H, T) float32 nats, NaN on padded query rows."""
    B, H, T, _ = attn.shape
    p = attn.float()
    if mask is not None:
        keys = mask[:, None, None, :]
        p = p * keys
        n_valid = mask.sum(1).clamp(min=1).float()[:, None, None, None]
    else:
        keys = None
        n_valid = torch.tensor(float(T), device=attn.device)
    if smoothing:
        p = (1 - smoothing) * p + smoothing / n_valid
        if keys is not None:
            p = p * keys
    ent = -torch.special.xlogy(p, p).sum(-1)
    if mask is not None:
        ent = torch.where(mask[:, None, :], ent, torch.full_like(ent, math.nan))
    return ent


class ReferenceEngine:
    """The float64 spec wrapped as a one-tile engine, so `backend="reference"` runs through the
    same result path as every other backend."""

    name = "reference"

    def __init__(self, x, y, cfg: PairwiseConfig):
        self.x, self.y, self.cfg = x, y, cfg
        self._state = empty_state(cfg, x.shape[0], None if y is None else y.shape[0])

    def num_tiles(self):
        return 1

    def tile_pairs(self, begin, end):
        n = self.x.shape[0]
        full = n * (n - 1) // 2 if self.y is None else n * self.y.shape[0]
        return full if begin < 1 <= end else 0

    def state(self):
        return dict(self._state)

    def load_state(self, state):
        self._state = dict(state)

    def run(self, begin, end):
        if begin >= 1 or end < 1:
            return
        c = self.cfg
        r = reference.pairwise_stats(
            self.x, self.y, metric=c.metric, bins=c.bins, range=(c.lo, c.hi), topk=c.topk,
            bottomk=c.bottomk, near=c.near, near_k=c.near_k, row_topk=c.row_topk,
            row_bottomk=c.row_bottomk, outside=c.outside, outside_limit=c.outside_limit)
        s = self._state

        def triples(pairs):
            return (np.array([p[2] for p in pairs], np.float64), np.array([p[0] for p in pairs], np.int64),
                    np.array([p[1] for p in pairs], np.int64))

        s["tiles_done"] = 1
        sel = r["values"][r["mask"]]
        s["count"], s["sum"], s["sumsq"] = r["count"], float(sel.sum()), float((sel * sel).sum())
        s["min"] = None if r["min"] is None else (r["min"][2], r["min"][0], r["min"][1])
        s["max"] = None if r["max"] is None else (r["max"][2], r["max"][0], r["max"][1])
        if c.bins:
            h = r["hist"]
            s["hist"] = np.concatenate([[h["underflow"]], h["counts"].numpy(), [h["overflow"]]]).astype(np.int64)
        s["top"], s["bottom"], s["near"] = (triples(r[k]) for k in ("top_pairs", "bottom_pairs", "near_pairs"))
        for key, name in (("row_top", "row_topk"), ("row_bottom", "row_bottomk")):
            if name in r:
                s[key] = (r[name]["values"].float().numpy(), r[name]["indices"].numpy())
        if c.outside:
            o = r["outside"]
            s["outside_count"] = o["count"]
            s["outside_rows"] = o["row_counts"].numpy().astype(np.int64)
            if "col_counts" in o:
                s["outside_cols"] = o["col_counts"].numpy().astype(np.int64)
            s["outside_pairs"] = triples(o["pairs"])
        s["excluded_rows"] = np.array(r["excluded_rows"], np.int64)
        s["excluded_cols"] = np.array(r["excluded_cols"], np.int64)


def _reference_cone(x, mask):
    r = reference.cone_index(x.cpu(), None if mask is None else mask.cpu())
    # back to the unit-sum form: only the norm of the sum is defined, so use (I, 0, ..., 0)
    sums = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)
    sums[:, 0] = r["index"]
    return sums.to(x.device), r["n"].to(x.device), r["zero_rows"].to(x.device)


def _reference_entropy(attn, mask, smoothing=0.0):
    r = reference.attention_entropy(attn.cpu(), None if mask is None else mask.cpu(), smoothing)
    return r["row_entropy"].float().to(attn.device)


register("torch", "pairwise_stats", torch_pairwise, _exact_only)
register("torch", "cone_index", torch_cone_unit_sums)
register("torch", "attention_entropy", torch_row_entropy)
register("reference", "pairwise_stats", ReferenceEngine, _exact_only)
register("reference", "cone_index", _reference_cone)
register("reference", "attention_entropy", _reference_entropy)
