"""The `torch` backend: chunked PyTorch on any device, tiles of `block` x `block`, never N x N.

The baseline every compiled kernel must beat, and the fallback on devices without one. Its
rules (normalisation, binning, the near-duplicate distance, tie order) are those of
embgeom.numerics, shared with every other engine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..engine.config import DEFAULTS, PairwiseConfig
from ..engine.lists import better_extreme, merge_pairs, merge_rows, select_smallest
from ..engine.state import EngineState, list_limits, to_numpy
from ..numerics import (LIST_KINDS, NEAR_DUPLICATE_TAU, bin_index, correct_sqrt, direct_distance, f32_down, f32_up,
                        moment_shift, order_key, unit_rows)
from .registry import register


def exact_only(x, *, precision=DEFAULTS.precision, **_):
    if precision != "exact":
        return [f"precision {precision!r} is not implemented here (exact only; the cpp backend runs {precision!r})"]
    return []


class TorchEngine:
    """Chunked PyTorch on any device: tiles of `block` x `block`, never N x N.

    The baseline every compiled kernel must beat, and the fallback on devices without one.
    """

    name = "torch"

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, shift: float | None = None):
        self.cfg = cfg
        self.self_mode = y is None
        compute = torch.float32  # exact mode is defined as fp32 products of fp32-normalised rows
        self.x, self.x_valid, excluded_x = self._prepare(x.to(compute))
        if self.self_mode:
            self.y, self.y_valid, excluded_y = self.x, self.x_valid, None
        else:
            self.y, self.y_valid, excluded_y = self._prepare(y.to(compute))
        if cfg.metric == "euclidean":
            self.x_sq = (self.x * self.x).sum(1)
            self.y_sq = self.x_sq if self.self_mode else (self.y * self.y).sum(1)
        self.n, self.m = self.x.shape[0], self.y.shape[0]
        b = max(1, cfg.block)
        self.row_blocks = [(s, min(s + b, self.n)) for s in range(0, self.n, b)]
        self.col_blocks = [(s, min(s + b, self.m)) for s in range(0, self.m, b)]
        if self.self_mode:
            self.tiles = [(r, c) for r in range(len(self.row_blocks)) for c in range(r, len(self.col_blocks))]
        else:
            self.tiles = [(r, c) for r in range(len(self.row_blocks)) for c in range(len(self.col_blocks))]
        self._state = EngineState.empty(cfg, self.n, None if self.self_mode else self.m)
        # moments: sums of (v - shift) and its square over all tiles, as every engine
        self.shift = moment_shift(self.x, None if self.self_mode else self.y, cfg.metric) if shift is None else shift
        self._sums = [0.0, 0.0]
        self._state.excluded_rows = excluded_x
        if excluded_y is not None:
            self._state.excluded_cols = excluded_y

    def _prepare(self, v: torch.Tensor):
        v = v.contiguous()
        if self.cfg.metric != "cosine":
            return v, None, np.zeros(0, np.int64)
        v, valid = unit_rows(v)
        return v, valid, to_numpy(torch.nonzero(~valid).flatten()).astype(np.int64)

    # engine protocol -----------------------------------------------------------------------
    def num_tiles(self) -> int:
        return len(self.tiles)

    def tile_pairs(self, begin: int, end: int) -> int:
        total = 0
        for r, c in self.tiles[begin:end]:
            (r0, r1), (c0, c1) = self.row_blocks[r], self.col_blocks[c]
            h, w = r1 - r0, c1 - c0
            total += h * (h - 1) // 2 if (self.self_mode and r == c) else h * w
        return total

    @property
    def tiles_done(self) -> int:
        return self._state.tiles_done

    def state(self) -> EngineState:
        out = self._state.copy()
        out.set_shifted(out.count, self.shift, *self._sums)
        return out

    def load_state(self, state: EngineState) -> None:
        self._state = state.copy()
        self._sums = list(state.shifted_sums(self.shift))

    def run(self, begin: int, end: int) -> None:
        if begin != self._state.tiles_done:
            raise ValueError(f"tiles must run in order: expected begin={self._state.tiles_done}, got {begin}")
        cfg = self.cfg
        state = self._state
        for t in range(begin, end):
            part = self._tile(*self.tiles[t])
            # row-local outputs are merged in place, only on the rows this tile touched
            for key, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
                for row0, pv, pi in part.pop(key + "_segments", []):
                    rows = slice(row0, row0 + pv.shape[0])
                    sv, si = getattr(state, key)
                    mv, mi = merge_rows((sv[rows], si[rows]), (pv, pi), k, largest)
                    sv[rows], si[rows] = to_numpy(mv), to_numpy(mi)
            for key in ("outside_rows", "outside_cols"):
                for row0, counts in part.pop(key + "_segments", []):
                    getattr(state, key)[row0:row0 + counts.shape[0]] += counts
            state.tiles_done += 1
            count, s1, s2 = part["moments"]
            state.count += count
            self._sums[0] += s1
            self._sums[1] += s2
            state.min = better_extreme("min", state.min, part["min"])
            state.max = better_extreme("max", state.max, part["max"])
            if part["hist"] is not None:
                state.hist = state.hist + part["hist"]
            for kind, limit in list_limits(cfg).items():
                if len(part[kind][0]):
                    setattr(state, kind, tuple(to_numpy(v) for v in merge_pairs(kind, getattr(state, kind), part[kind], limit, cfg.near)))
            state.outside_count += part["outside_count"]

    # one tile --------------------------------------------------------------------------------
    def _values(self, r0, r1, c0, c1):
        a, b = self.x[r0:r1], self.y[c0:c1]
        v = a @ b.T
        if self.cfg.metric == "cosine":
            v = v.clamp_(-1.0, 1.0)
        elif self.cfg.metric == "euclidean":
            scale = self.x_sq[r0:r1, None] + self.y_sq[None, c0:c1]
            d2 = (scale - 2 * v).clamp_(min=0)
            close = (d2 < NEAR_DUPLICATE_TAU * scale).nonzero()
            v = correct_sqrt(d2)
            if close.numel():
                v[close[:, 0], close[:, 1]] = direct_distance(a[close[:, 0]], b[close[:, 1]])
        return v

    def _tile(self, r, c) -> dict:
        cfg = self.cfg
        (r0, r1), (c0, c1) = self.row_blocks[r], self.col_blocks[c]
        vals = self._values(r0, r1, c0, c1)
        dev = vals.device
        valid = torch.ones_like(vals, dtype=torch.bool)
        if self.x_valid is not None:
            valid &= self.x_valid[r0:r1, None] & self.y_valid[None, c0:c1]
        diagonal = self.self_mode and r == c
        if diagonal:
            valid &= torch.ones_like(valid).triu(diagonal=1)
        part = {"moments": (0, 0.0, 0.0), "min": None, "max": None, "hist": None,
                "outside_count": 0}
        for kind in LIST_KINDS:
            part[kind] = (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        sel = vals[valid]
        count = int(sel.numel())
        if count == 0:
            return part
        sel64 = sel.double()
        centred = sel64 - self.shift
        part["moments"] = (count, float(centred.sum()), float((centred * centred).sum()))
        width = c1 - c0
        inf = torch.tensor(math.inf, device=dev, dtype=vals.dtype)

        def at(flat):
            f = int(flat)
            return (float(vals.view(-1)[f]), r0 + f // width, c0 + f % width)

        part["min"] = at(torch.argmin(torch.where(valid, vals, inf)))
        part["max"] = at(torch.argmax(torch.where(valid, vals, -inf)))
        if cfg.bins:
            slot = bin_index(sel64, cfg.lo, cfg.hi, cfg.bins)
            part["hist"] = to_numpy(torch.bincount(slot, minlength=cfg.bins + 2))
        flat_vals = vals.reshape(1, -1)
        flat_valid = valid.reshape(1, -1)
        for kind, k in (("top", cfg.topk), ("bottom", cfg.bottomk), ("near", cfg.near_k if cfg.near is not None else 0)):
            if not k:
                continue
            key = order_key(kind, flat_vals.double(), cfg.near)
            key = torch.where(flat_valid, key, torch.full_like(key, math.inf))
            pos, keys = select_smallest(key, min(k, count))
            pos = pos[0]
            part[kind] = (to_numpy(flat_vals[0, pos].double()), to_numpy(r0 + pos // width), to_numpy(c0 + pos % width))
        for key_name, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
            if k:
                part[key_name + "_segments"] = self._row_lists(vals, valid, r0, c0, k, largest)
        if cfg.outside:
            a, b = cfg.outside
            if vals.dtype == torch.float32:   # v < a <=> v < f32_up(a) for fp32 v (torch rounds a to nearest)
                a, b = f32_up(a), f32_down(b)
            else:
                vals = vals.double()
            out_mask = valid & ((vals < a) | (vals > b))
            part["outside_count"] = int(out_mask.sum())
            part["outside_rows_segments"] = [(r0, to_numpy(out_mask.sum(1)))]
            if self.self_mode:
                part["outside_rows_segments"].append((c0, to_numpy(out_mask.sum(0))))
            else:
                part["outside_cols_segments"] = [(c0, to_numpy(out_mask.sum(0)))]
            hits = out_mask.nonzero()[: cfg.outside_limit]
            if hits.numel():
                part["outside_pairs"] = (to_numpy(vals[hits[:, 0], hits[:, 1]].double()),
                                         to_numpy(hits[:, 0] + r0), to_numpy(hits[:, 1] + c0))
        return part

    def _row_lists(self, vals, valid, r0, c0, k, largest):
        """Per-row candidates of this tile: [(first_row, values (h, k), columns (h, k))] for rows
        r0.. and, in self mode, for rows c0.. from the transposed tile (row i's neighbours j < i;
        the diagonal tile's lower triangle is the transpose of its upper one)."""
        sources = [(vals, valid, r0, c0)]
        if self.self_mode:
            sources.append((vals.T, valid.T, c0, r0))
        segments = []
        for v, ok, row0, col0 in sources:
            key = -v.double() if largest else v.double()
            key = torch.where(ok, key, torch.full_like(key, math.inf))
            pos, keys = select_smallest(key, k)
            got_v = torch.gather(v, 1, pos).float()
            got_i = pos + col0
            bad = torch.isinf(keys)
            got_v = torch.where(bad, torch.full_like(got_v, math.nan), got_v)
            got_i = torch.where(bad, torch.full_like(got_i, -1), got_i)
            segments.append((row0, to_numpy(got_v), to_numpy(got_i)))
        return segments


def torch_cone_unit_sums(x: torch.Tensor, mask: torch.Tensor | None, chunk: int = 65536):
    """x: (B, T, D), mask: (B, T) -> sums (B, D) f64, used (B,), zero (B,), in row chunks."""
    B, T, D = x.shape
    sums = torch.zeros(B, D, dtype=torch.float64, device=x.device)
    used = torch.zeros(B, dtype=torch.int64, device=x.device)
    zero = torch.zeros(B, dtype=torch.int64, device=x.device)
    for t0 in range(0, T, chunk):
        # (the engines' input is fp32: float64 rows are rounded first, as the C++ core reads them)
        part = x[:, t0:t0 + chunk]
        part = (part.float() if part.dtype == torch.float64 else part).double()
        valid = torch.ones(part.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask[:, t0:t0 + chunk]
        unit, nonzero = unit_rows(part)
        keep = valid & nonzero
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



register("torch", "pairwise_stats", TorchEngine, exact_only)
register("torch", "cone_index", torch_cone_unit_sums)
register("torch", "attention_entropy", torch_row_entropy)
