"""The thresholds the Triton all-pairs kernel filters with: the histogram's bin edges, and each
ranked list's candidate threshold (seeded from a column sample, refreshed from the merged lists
before every band, raised when a stream's candidate buffer overflows).

A list threshold is always a lower bound of the list's final k-th best key, so no pair of a final
list is ever filtered out (kernels/triton/pairwise.py explains the kernel side).
"""
from __future__ import annotations

import math

import torch

from ..numerics import bin_scale, saturated, spread_rows
from .gpu_plan import GLOBAL_BUCKETS, STREAMS

# out_cut before any outside pair is known: every (i, j) can still enter the list
NO_CUT = 2 ** 31 - 1


def _f32_order(f: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 key of fp32 values (-0.0 == 0.0)."""
    bits = f.contiguous().view(torch.int32).long()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _f32_from_order(k: torch.Tensor) -> torch.Tensor:
    bits = torch.where(k >= 0, k, (-k) | 0x80000000)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)
    return bits.to(torch.int32).view(torch.float32)


def hist_edges(lo: float, hi: float, bins: int) -> torch.Tensor:
    """(bins + 1,) float32: edges[b] = the smallest fp32 v with floor((v - lo) * bins/(hi - lo))
    >= b in float64 (the definition every engine uses); edges[0] = -inf, edges[bins] = +inf.
    Bisection over the ordered fp32 bit patterns (exact, also for subnormals)."""
    scale = bin_scale(lo, hi, bins)
    b = torch.arange(1, bins, dtype=torch.float64)
    inf = torch.tensor([math.inf], dtype=torch.float32)
    below = _f32_order(-inf).expand(b.shape).clone()  # bin(-inf) < b
    above = _f32_order(inf).expand(b.shape).clone()   # bin(+inf) >= b
    while bool(((above - below) > 1).any()):
        mid = (below + above) // 2
        ok = torch.floor((_f32_from_order(mid).double() - lo) * scale) >= b
        above = torch.where(ok, mid, above)
        below = torch.where(ok, below, mid)
    return torch.cat([-inf, _f32_from_order(above), inf])


def binning_error(lo: float, hi: float, bins: int) -> float:
    """Bound of |fp32 estimate v * scale_f + off_f - float64 (v - lo) * scale| in bins (the
    kernel reads an edge only within this distance of an integer). The estimate is corrected by
    one bin, towards the nearer edge, so this must stay < 1/2 (the engine refuses otherwise)."""
    scale = bin_scale(lo, hi, bins)
    return 4 * 2.0 ** -24 * max(abs(lo), abs(hi), 1.0) * scale + bins * 2.0 ** -22


class Thresholds:
    """The list thresholds of TritonEngine (a mixin: the state lives on the engine, which the
    kernel launch reads). gthr: the global streams' (top, bottom, near) keys, then their tie cuts'
    keys; rthr: the per-row streams' keys, one per row, then their tie cuts' keys; ties (int32):
    the tie cuts' pairs (i, j) of the three global streams, then the per-row cuts' columns;
    gbuck/rbuck: live bucket maxima (interpreter plan only); out_cut: the (i, j) before which
    outside pairs can still enter their list.

    A tie cut (exact mode; top, bottom and the per-row lists): k known pairs rank at or before
    (key, pair) in the list's order (key, then (i, j), or the column for a row), so the kernel
    drops a pair with that key that comes after it. Without it every pair equal to the k-th best
    (duplicate rows: 1,770 pairs at cosine 1 among 60 copies) waited in the buffer, which grew
    to hold them all.

    Reads the engine's cfg, device, mode, n, m, d, self_mode, kinds_k, active, groups, lists, rows,
    x32, y32, xsq, ysq, xv, yv, has_valid, norm_max, seed_sample, cv/ci/cj."""

    def _reset_thresholds(self) -> None:
        dev = self.device
        self.gthr = torch.full((6,), -math.inf, dtype=torch.float32, device=dev)
        self.gthr[3:] = math.nan                 # no tie cut: no key equals NaN
        self.gbuck = torch.full((3, GLOBAL_BUCKETS), -math.inf, dtype=torch.float32, device=dev)
        self.rthr = torch.full((4, max(self.n, 1)), -math.inf, dtype=torch.float32, device=dev)
        self.rthr[2:] = math.nan
        self.ties = torch.full((6 + 2 * max(self.n, 1),), NO_CUT, dtype=torch.int32, device=dev)
        self.rbuck = [torch.full((max(self.n, 1), max(g, 1)), -math.inf, dtype=torch.float32, device=dev)
                      for g in self.groups[3:5]]
        self.out_cut = (NO_CUT, 0)  # (i, j): only pairs before it can still enter the list
        self._seeded = False

    def _key(self, s: int, v: torch.Tensor) -> torch.Tensor:
        """The kernel's fp32 key of stream s (larger is better)."""
        v = v.float()
        if s in (1, 4):
            return -v
        if s == 2:
            return -(v - torch.tensor(float(self.cfg.near or 0.0), dtype=torch.float32)).abs()
        return v

    def _cuts_ties(self, s: int) -> bool:
        """Stream s takes tie cuts: exact mode's top and bottom lists and per-row lists (the near
        list is ordered by a float64 distance the kernel's fp32 key does not reproduce)."""
        return self.mode == "exact" and s != 2

    def _raise_global(self, s: int, key: torch.Tensor, i: int, j: int) -> bool:
        """(key, (i, j)): the k-th of k known pairs of global stream s in its list's order. The
        threshold rises to key; at an equal key the tie cut moves to (i, j) when that is earlier.
        True when anything changed."""
        if bool(key > self.gthr[s]):
            self.gthr[s] = key
            if self._cuts_ties(s):
                self.gthr[3 + s] = key
                self.ties[2 * s], self.ties[2 * s + 1] = i, j
            return True
        if not (self._cuts_ties(s) and bool(key == self.gthr[s])):
            return False
        if bool(self.gthr[3 + s] == key) and (i, j) >= (int(self.ties[2 * s]), int(self.ties[2 * s + 1])):
            return False
        self.gthr[3 + s] = key
        self.ties[2 * s], self.ties[2 * s + 1] = i, j
        return True

    def _raise_rows(self, s: int, rows: torch.Tensor, key: torch.Tensor, col: torch.Tensor) -> bool:
        """As _raise_global for per-row stream s: rows' k-th known neighbours (key, column)."""
        thr = self.rthr[s - 3]
        before = thr[rows].clone()
        thr[rows] = torch.maximum(before, key)
        changed = bool((thr[rows] > before).any())
        if not self._cuts_ties(s):
            return changed
        cut_key, cut_col = self.rthr[s - 1], self.ties[6 + (s - 3) * self.n:6 + (s - 2) * self.n]
        old_key, old_col = cut_key[rows].clone(), cut_col[rows].long()
        at = key == thr[rows]                                   # the k-th key is the row's threshold
        earlier = at & ((old_key != key) | (col < old_col))
        cut_key[rows[earlier]] = key[earlier]
        cut_col[rows[earlier]] = col[earlier].to(torch.int32)
        return changed or bool(earlier.any())

    def _refresh_thresholds(self) -> None:
        """Seed each stream's threshold (and tie cut) with the merged state's k-th best key (a
        lower bound of the final k-th best: thresholds only ever rise)."""
        for s, kind in enumerate(STREAMS[:3]):
            k = self.kinds_k[kind]
            v, i, j = self.lists[kind]
            if k and v.numel() >= k:
                self._raise_global(s, self._key(s, v[k - 1:k])[0], int(i[k - 1]), int(j[k - 1]))
        for s, kind in enumerate(STREAMS[3:5], 3):
            if kind in self.rows:
                v, i = self.rows[kind]
                full = (i[:, -1] >= 0).nonzero()[:, 0]
                if full.numel():
                    self._raise_rows(s, full, self._key(s, v[full, -1]), i[full, -1])
        if self.cfg.outside:
            v, i, j = self.lists["outside_pairs"]
            k = self.kinds_k["outside_pairs"]
            if k and v.numel() >= k:  # k = 0 when no pair can be listed (engine/limits.py)
                self.out_cut = min(self.out_cut, (int(i[-1]), int(j[-1])))

    def _seed_thresholds(self) -> None:
        """Before the first band: each row's k-th best key against a spread sample of columns
        (bf16 products, minus their error bound) is a valid lower bound of its final k-th best;
        likewise the sample pairs' k-th best for the global lists. Without it the first band
        would hand almost every pair of its rows to the candidate buffers."""
        self._seeded = True
        rows_s = [s for s in (3, 4) if self.active[s]]
        glob_s = [s for s in (0, 1, 2) if self.active[s]]
        S = min(self.seed_sample, self.m)
        if S == 0 or not (rows_s or glob_s):
            return
        dev, cfg = self.device, self.cfg
        idx = spread_rows(self.m, S, device=dev)
        ys = saturated(self.y32[idx], torch.bfloat16).to(torch.bfloat16)
        u = 2.0 ** -8  # bf16 inputs and bf16 output rounding
        nx, ny = self.norm_max
        meps = (3 * u + u * u + 2 * (self.d + 2) * 2.0 ** -24) * nx * ny * 1.01
        if cfg.metric == "euclidean":
            meps = math.sqrt(2 * meps)
        yok = self.yv.bool()[idx] if self.has_valid else None
        glob_keys = {s: [] for s in glob_s}
        chunk = max(1, (1 << 24) // idx.numel())
        for c0 in range(0, self.n, chunk):
            c1 = min(self.n, c0 + chunk)
            dot = (saturated(self.x32[c0:c1], torch.bfloat16).to(torch.bfloat16) @ ys.T).float()
            if cfg.metric == "cosine":
                v = dot.clamp(-1.0, 1.0)
            elif cfg.metric == "euclidean":
                v = (self.xsq[c0:c1, None] + self.ysq[idx][None, :] - 2 * dot).clamp(min=0).sqrt()
            else:
                v = dot
            ok = torch.ones_like(v, dtype=torch.bool)
            if yok is not None:
                ok &= self.xv.bool()[c0:c1, None] & yok[None, :]
            rows = torch.arange(c0, c1, device=dev)[:, None]
            if self.self_mode:
                ok &= rows != idx[None, :]
            for s in rows_s:
                k = self.kinds_k[STREAMS[s]]
                if v.shape[1] < k:
                    continue
                key = torch.where(ok, self._key(s, v), torch.full_like(v, -math.inf))
                kth = key.topk(k, dim=1).values[:, -1] - meps
                self.rthr[s - 3, c0:c1] = torch.maximum(self.rthr[s - 3, c0:c1], kth)
            okg = ok & (rows < idx[None, :]) if self.self_mode else ok  # each pair once
            for s in glob_s:
                key = torch.where(okg, self._key(s, v), torch.full_like(v, -math.inf)).flatten()
                glob_keys[s].append(key.topk(min(self.kinds_k[STREAMS[s]], key.numel())).values)
        for s in glob_s:
            keys = torch.cat(glob_keys[s])
            k = self.kinds_k[STREAMS[s]]
            if keys.numel() >= k:
                self.gthr[s] = torch.maximum(self.gthr[s], keys.topk(k).values[-1] - meps)

    def _raise_threshold(self, s: int, n: int) -> bool:
        """Stream s overflowed: its buffer holds n genuine candidates of this band, whose k-th
        best is a valid (higher) threshold. Returns False if nothing rose (ties): grow."""
        k = self.kinds_k[STREAMS[s]]
        v, i, j = self.cv[s, :n], self.ci[s, :n].long(), self.cj[s, :n].long()
        if s == 5:
            if self.mode != "exact":
                # fast mode buffers the pairs within the products' error of a or b too: a cut at
                # the k-th of those had ended the list before pairs that are outside (it came
                # back short, or empty); the cut counts the exactly outside ones only
                exact = self._rescore(i, j)
                out = (exact < self.out_a) | (exact > self.out_b)
                i, j = i[out], j[out]
                if i.numel() < k:
                    return False
            lin = i * self.m + j
            kth = int(lin.topk(k, largest=False).values[-1])
            cut = (kth // self.m, kth % self.m + 1)  # pairs up to the k-th buffered one
            if cut < self.out_cut:
                self.out_cut = cut
                return True
            return False
        key = self._key(s, v)
        if s < 3:  # the k-th in the list's order: key descending, then (i, j)
            order = torch.argsort(i * self.m + j, stable=True)
            order = order[torch.argsort(-key[order], stable=True)][k - 1]
            return self._raise_global(s, key[order], int(i[order]), int(j[order]))
        col = j
        if self.self_mode:  # each buffered (i, j) is a neighbour of both rows
            i, col, key = torch.cat([i, j]), torch.cat([j, i]), torch.cat([key, key])
        # per row, in the list's order: key descending, then column
        order = torch.argsort(col, stable=True)
        order = order[torch.argsort(-key[order], stable=True)]
        order = order[torch.argsort(i[order], stable=True)]
        rows_sorted, key_sorted, col_sorted = i[order], key[order], col[order]
        uniq, counts = torch.unique_consecutive(rows_sorted, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        full = counts >= k
        if not bool(full.any()):
            return False
        at = starts[full] + k - 1
        return self._raise_rows(s, uniq[full], key_sorted[at], col_sorted[at])
