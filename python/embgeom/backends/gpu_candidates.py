"""The candidate buffers of the Triton all-pairs kernel and their exact selection on the host.

The kernel appends every pair that passes a stream's threshold to that stream's buffer (value,
i, j); after a band the host rescores them exactly (fp32, the `exact` definition, in `fast`
precision) and merges them into the ranked lists: value, then (i, j). Stream 6 holds the
euclidean near-duplicates the kernel leaves out of every reduction; they are measured directly
here and added to all of them.
"""
from __future__ import annotations

import math

import torch

from ..engine.lists import merge_rows, sort_pairs
from ..numerics import LIST_KINDS, NEAR_DUPLICATE_TAU, bin_index, direct_distance
from .gpu_plan import STREAMS

# candidate streams in the buffers: the six of STREAMS, then the near-duplicates
NUM_BUFFERS = len(STREAMS) + 1
# pairs rescored per step (bounds the gathered rows' memory)
RESCORE_CHUNK = 1 << 16


class Candidates:
    """The candidate buffers and ranked lists of TritonEngine (a mixin: the kernel launch reads
    the buffers from the engine). cv/ci/cj: (7, cap) values and pairs; cnt_buf: per stream an
    int32 append counter and an int64 count of the pairs that found no room; lists: the global
    ranked lists (float64 values, i, j); rows: the per-row lists (float32 values, columns).

    Reads the engine's cfg, device, n, m, mode, self_mode, kinds_k, active, shift, bins, out_a,
    out_b, x32, y32, xsq, ysq, and its accumulators (count, sums, hist, outside_count,
    out_rows, out_cols)."""

    def _init_candidates(self, cap: int) -> None:
        # slots 0-6: int32 append counters; slots 8-21 as int64 7 x 1: drop counters. Their sum
        # counts every candidate, past 2^31 too (see the kernel's _append)
        self.cnt_buf = torch.zeros(22, dtype=torch.int32, device=self.device)
        self.cnt, self.dropped = self.cnt_buf[:NUM_BUFFERS], self.cnt_buf[8:22].view(torch.int64)
        self.candidates = [0] * NUM_BUFFERS  # pairs each stream handed to the exact selection (diagnostics)
        self._alloc_candidates(cap)

    def _alloc_candidates(self, cap: int, keep: bool = False) -> None:
        if cap > 1 << 30:  # the kernel's int32 append counters stay below cap + 2^24
            raise RuntimeError(f"candidate buffers of {cap} slots per stream: over 2^30 (ties too many to rank)")
        dev = self.device
        new = (torch.zeros(NUM_BUFFERS, cap, dtype=torch.float32, device=dev),
               torch.zeros(NUM_BUFFERS, cap, dtype=torch.int32, device=dev),
               torch.zeros(NUM_BUFFERS, cap, dtype=torch.int32, device=dev))
        if keep:
            for old, nw in zip((self.cv, self.ci, self.cj), new):
                nw[:, :old.shape[1]] = old
        self.cv, self.ci, self.cj = new
        self.cap = cap

    def _clear_stream(self, s: int) -> None:
        """Empty stream s's buffer before it runs again."""
        self.cnt[s], self.dropped[s] = 0, 0

    def _counts(self) -> list[int]:
        """Candidates each stream met in the last launch (stored or not), int64."""
        return (self.cnt.long() + self.dropped).tolist()

    def _reset_lists(self) -> None:
        dev = self.device
        empty = (torch.zeros(0, dtype=torch.float64, device=dev), torch.zeros(0, dtype=torch.int64, device=dev),
                 torch.zeros(0, dtype=torch.int64, device=dev))
        self.lists = {s: empty for s in LIST_KINDS}
        self.rows = {}
        for s in STREAMS[3:5]:
            k = self.kinds_k[s]
            if k:
                self.rows[s] = (torch.full((self.n, k), math.nan, dtype=torch.float32, device=dev),
                                torch.full((self.n, k), -1, dtype=torch.int64, device=dev))

    # exact selection on the candidates -------------------------------------------------------
    def _rescore(self, i: torch.Tensor, j: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """Exact fp32 values of pairs (i, j): the `exact` definition (as the torch engine:
        euclidean near-duplicates, or all pairs with direct=True, from the difference)."""
        out = torch.empty(i.numel(), dtype=torch.float32, device=self.device)
        step = RESCORE_CHUNK
        for s in range(0, i.numel(), step):
            ra, rb = self.x32[i[s:s + step]], self.y32[j[s:s + step]]
            if self.cfg.metric == "euclidean":
                scale = self.xsq[i[s:s + step]] + self.ysq[j[s:s + step]]
                d2 = (scale - 2 * (ra * rb).sum(1)).clamp(min=0)
                redo = torch.ones_like(d2, dtype=torch.bool) if direct else d2 < NEAR_DUPLICATE_TAU * scale
                val = d2.sqrt()
                val[redo] = direct_distance(ra[redo], rb[redo])
            else:
                val = (ra * rb).sum(1)
                if self.cfg.metric == "cosine":
                    val = val.clamp(-1.0, 1.0)
            out[s:s + step] = val
        return out

    def _close_pairs(self, n: int) -> None:
        """Euclidean near-duplicates the kernel left out: direct distances, then every
        reduction of the kernel (count, moments, histogram, outside) and the list merges."""
        cfg = self.cfg
        i, j = self.ci[6, :n].long(), self.cj[6, :n].long()
        v = self._rescore(i, j, direct=True)
        v64 = v.double()
        self.count += n
        centred = v64 - self.shift
        self.sums += torch.stack([centred.sum(), (centred * centred).sum()])
        if self.bins:
            self.hist += torch.bincount(bin_index(v64, cfg.lo, cfg.hi, cfg.bins), minlength=cfg.bins + 2)
        out = (v < self.out_a) | (v > self.out_b) if cfg.outside else None
        if out is not None:
            self.outside_count += out.sum()
            self.out_rows.index_add_(0, i[out], torch.ones_like(i[out]))
            self.out_cols.index_add_(0, j[out], torch.ones_like(j[out]))
        for s, kind in enumerate(STREAMS[:5]):
            if self.active[s]:
                self._select(s, kind, v, i, j)
        if out is not None and self.active[5]:
            self._merge_pairs("outside_pairs", v[out], i[out], j[out])

    def _merge(self, s: int, kind: str, n: int) -> None:
        """Stream s's n buffered candidates into its list (rescored exactly in `fast`)."""
        v, i, j = self.cv[s, :n], self.ci[s, :n].long(), self.cj[s, :n].long()
        if self.mode != "exact":
            v = self._rescore(i, j)
            if kind == "outside_pairs":  # (taken within the products' error of a or b)
                out = (v < self.out_a) | (v > self.out_b)
                v, i, j = v[out], i[out], j[out]
        self._select(s, kind, v, i, j)

    def _select(self, s: int, kind: str, v: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        """Exact values of pairs (i, j) into stream s's list."""
        if s in (3, 4):
            if self.self_mode:  # a pair (i, j) is a candidate of rows i and j
                i, j, v = torch.cat([i, j]), torch.cat([j, i]), torch.cat([v, v])
            self._merge_rows(kind, i, j, v.float(), largest=(s == 3))
            return
        self._merge_pairs(kind, v, i, j)

    def _merge_pairs(self, kind: str, v: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> None:
        old = self.lists[kind]
        self.lists[kind] = sort_pairs(kind, torch.cat([old[0], v.double()]), torch.cat([old[1], i]),
                                      torch.cat([old[2], j]), self.cfg.near, self.kinds_k[kind])

    def _merge_rows(self, kind: str, i: torch.Tensor, j: torch.Tensor, v: torch.Tensor, largest: bool) -> None:
        """Candidates (row i, column j, value v) into the per-row lists, exact order (the cuda
        backend replaces this with its CUDA merge)."""
        k = self.kinds_k[kind]
        key = -v.double() if largest else v.double()
        order = torch.argsort(j, stable=True)
        order = order[torch.argsort(key[order], stable=True)]
        order = order[torch.argsort(i[order], stable=True)]
        i, j, v = i[order], j[order], v[order]
        uniq, counts = torch.unique_consecutive(i, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        seg = torch.repeat_interleave(torch.arange(uniq.numel(), device=i.device), counts)
        rank = torch.arange(i.numel(), device=i.device) - starts[seg]
        keep = rank < k
        dv = torch.full((uniq.numel(), k), math.nan, dtype=torch.float32, device=i.device)
        di = torch.full((uniq.numel(), k), -1, dtype=torch.int64, device=i.device)
        dv[seg[keep], rank[keep]] = v[keep]
        di[seg[keep], rank[keep]] = j[keep]
        sv, si = self.rows[kind]
        mv, mi = merge_rows((sv[uniq], si[uniq]), (dv, di), k, largest)
        sv[uniq] = mv.to(sv.device, torch.float32)
        si[uniq] = mi.to(si.device, torch.int64)
