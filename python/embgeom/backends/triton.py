"""The `triton` backend: the fused all-pairs kernel of embgeom.kernels.triton on CUDA tensors (and on
CPU tensors under TRITON_INTERPRET=1, for tests), and the text kernels' launchers.

The engine runs *bands* of block-rows (one kernel launch each; the engine's tiles, so checkpoints
and progress work per band). After a launch it reduces the per-program partial sums and
histograms, then selects exactly on the candidate buffers (backends/gpu_candidates.py): value
(exact fp32 rescoring in `fast` precision), then (i, j). The thresholds the kernel filters with
are kept in backends/gpu_thresholds.py; see kernels/triton/pairwise.py for why no pair of a final
list can be filtered out. The `cuda` backend (backends/cuda.py) is this engine with a CUDA merge.
"""
from __future__ import annotations

import numpy as np
import torch

from ..engine.config import PairwiseConfig
from ..engine.lists import merge_pairs
from ..engine.state import EngineState, list_limits, to_numpy
from ..numerics import (NEAR_DUPLICATE_TAU, UNIT_ROUNDOFF, f32_down, f32_up, fast_error_bound, moment_shift, saturated,
                        rounding_norms, unit_rows)
from .gpu_candidates import NUM_BUFFERS, Candidates
from .gpu_cone_entropy import triton_cone_unit_sums, triton_row_entropy
from .gpu_plan import (STREAMS, hist_slots, list_lengths, make_plan, next_pow2, programs_for, slab_side, stream_groups,
                       variant)
from .gpu_thresholds import Thresholds, binning_error, hist_edges
from .registry import register

FAST_DTYPES = tuple(UNIT_ROUNDOFF)
# Row counts the kernel's 32-bit offsets take: its per-row threshold arrays are read at
# (stream - 1) * rows for streams up to 4 (kernels/triton/pairwise.py), and ids are int32.
MAX_ROWS = (2**31 - 1) // 3


class TritonEngine(Thresholds, Candidates):
    """Fused all-pairs engine (engine protocol of embgeom.engine.runner). x: (N, D), y: (M, D) or None.

    fast_dtype: input type of the products in `fast` precision ("bf16", "fp16", "tf32").
    block/block_n/group/programs/capacity/split: tile rows and columns, block-rows per band,
    persistent programs, candidate slots per stream, epilogue slabs per tile
    (embgeom.backends.gpu_plan; defaults suit an H100; tests shrink them).
    """

    name = "triton"

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, *,
                 fast_dtype: str = "bf16", block: int | None = None, group: int | None = None,
                 programs: int | None = None, capacity: int | None = None, split: int | None = None,
                 live_bounds: bool | None = None, block_n: int | None = None, shift: float | None = None):
        if fast_dtype not in FAST_DTYPES:
            raise ValueError(f"fast_dtype: expected one of {', '.join(FAST_DTYPES)}, got {fast_dtype!r}")
        for name, v in (("x", x), ("y", y)):
            if v is not None and v.shape[0] > MAX_ROWS:
                raise ValueError(f"{name}: {v.shape[0]:,} rows, the {self.name} backend takes at most {MAX_ROWS:,} "
                                 "(its kernel's 32-bit offsets); use backend='cpp' or embgeom.distributed")
        self.cfg = cfg
        self.self_mode = y is None
        self.device = x.device
        on_gpu = x.device.type == "cuda"
        self.mode = "exact" if cfg.precision == "exact" else fast_dtype
        self.x32, xv, ex = self._prepare(x)
        if self.self_mode:
            self.y32, yv, ey = self.x32, xv, None
        else:
            self.y32, yv, ey = self._prepare(y)
        self.n, self.d = self.x32.shape
        self.m = self.y32.shape[0]
        self.has_valid = xv is not None
        dummy_u8 = torch.ones(1, dtype=torch.uint8, device=self.device)
        self.xv = xv.to(torch.uint8) if xv is not None else dummy_u8
        self.yv = yv.to(torch.uint8) if yv is not None else self.xv
        self.xsq = (self.x32 * self.x32).sum(1) if cfg.metric == "euclidean" else self.x32.new_zeros(1)
        self.ysq = self.xsq if (self.self_mode or cfg.metric != "euclidean") else (self.y32 * self.y32).sum(1)
        # kernel inputs: rows padded with zeros to 16-byte multiples (TMA descriptors)
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mode, torch.float32)
        self.xin = self._padded(self.x32, dt)
        self.yin = self.xin if self.self_mode else self._padded(self.y32, dt)

        # which outputs: top/bottom always (they also give max/min), the rest as asked
        self.kinds_k = list_lengths(cfg)
        self.active = [self.kinds_k[s] > 0 for s in STREAMS]
        need = max(self.kinds_k.values())
        self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count if on_gpu else 0
        self.plan = make_plan(self.n, self.m, self.d, elem_bytes=self.xin.element_size(), on_gpu=on_gpu,
                              sms=self.sms, cfg_block=cfg.block, row_k=max(cfg.row_topk, cfg.row_bottomk),
                              need=need, block=block, group=group, programs=programs, capacity=capacity,
                              split=split, live_bounds=live_bounds, mma=self.mode != "exact", block_n=block_n)
        plan = self.plan
        self.bm, self.bn, self.bk, self.group = plan.bm, plan.block_n, plan.bk, plan.group
        self.nbr, self.nbc, self.nbands = plan.nbr, plan.nbc, plan.nbands
        self.programs, self.cap, self.seed_sample = plan.programs, plan.capacity, plan.seed_sample
        # set from the first compiled kernel's registers, applied once that band's partial sums
        # are reduced (they live in per-program buffers that a new program count replaces)
        self._occupancy_pending = plan.occupancy_pending
        self._programs_next = None
        self.groups = stream_groups(self.kinds_k, slab_side(plan), plan.live_bounds)

        # error of the products (fast) -> filter margin and histogram error bound
        nx = float(torch.linalg.vector_norm(self.x32, dim=1, dtype=torch.float64).max()) if self.n else 0.0
        ny = float(torch.linalg.vector_norm(self.y32, dim=1, dtype=torch.float64).max()) if self.m else 0.0
        if self.mode == "fp16" and max(float(self.x32.abs().max()) if self.n else 0.0,
                                       float(self.y32.abs().max()) if self.m else 0.0) > 6e4:
            raise ValueError("fast_dtype='fp16': values beyond the fp16 range (|v| > 6e4); use 'bf16' or 'tf32'")
        eps = 0.0 if self.mode == "exact" else self._fast_error_bound()
        self.eps = eps
        self.shift = moment_shift(self.x32, None if self.self_mode else self.y32, cfg.metric) if shift is None else shift
        self.margin = 2 * eps
        self.norm_max = (nx, ny)
        vmax = {"cosine": 1.0, "dot": nx * ny, "euclidean": nx + ny}[cfg.metric]
        near = cfg.near if cfg.near is not None else 0.0
        # the kernel's near key is fp32 (|v - near_f32|), the final order float64: cover both
        self.near_margin = self.margin + 2.0 ** -21 * (2 * abs(near) + vmax)

        # histogram
        self.bins = cfg.bins
        if self.bins:
            if binning_error(cfg.lo, cfg.hi, cfg.bins) >= 0.5:
                raise ValueError(f"range: ({cfg.lo}, {cfg.hi}) with {cfg.bins} bins is too narrow for the "
                                 "triton kernel's fp32 binning; use backend='cpp' or 'torch'")
            self.edges = hist_edges(cfg.lo, cfg.hi, cfg.bins).to(self.device)
            self.lo_f, self.hi_f = f32_up(cfg.lo), f32_down(cfg.hi)
            self.scale_f = cfg.bins / (cfg.hi - cfg.lo)
            self.off_f = -cfg.lo * self.scale_f
            self.edge_w = min(0.5, 2 * binning_error(cfg.lo, cfg.hi, cfg.bins))
            self.nb = hist_slots(self.bins)
        else:
            self.edges = torch.zeros(2, device=self.device)
            self.lo_f, self.hi_f, self.scale_f, self.nb = 0.0, 1.0, 1.0, 0
            self.off_f, self.edge_w = 0.0, 0.5
        if cfg.outside:
            self.out_a, self.out_b = f32_up(cfg.outside[0]), f32_down(cfg.outside[1])
        else:
            self.out_a, self.out_b = 0.0, 0.0

        dev = self.device
        # int64 counts (the global-atomics histogram of a band can pass 2^31)
        self.hist_buf = torch.zeros(self.bins + 3 if self.bins else 1, dtype=torch.int64, device=dev)
        self._set_programs(self.programs)
        self._init_candidates(self.cap)
        self.excluded_rows = ex
        self.excluded_cols = ey if ey is not None else np.zeros(0, np.int64)
        self._reset_accumulators()

    # inputs ----------------------------------------------------------------------------------
    def _prepare(self, v: torch.Tensor):
        """fp32 rows; for cosine normalised in fp32 exactly as the torch/C++ engines do."""
        v = v.to(torch.float32).contiguous()
        if self.cfg.metric != "cosine":
            return v, None, np.zeros(0, np.int64)
        v, valid = unit_rows(v)
        return v.contiguous(), valid, to_numpy(torch.nonzero(~valid).flatten()).astype(np.int64)

    def _fast_error_bound(self) -> float:
        """embgeom.numerics.fast_error_bound from the rows as the products see them."""
        def norms(rows, rounded):
            if self.mode == "tf32":
                # tf32 keeps 10 mantissa bits; truncation errs at least as much as rounding
                rounded = (rows.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)
                full, _, delta = rounding_norms(rows, rounded)
                return full, full + delta, delta
            return rounding_norms(rows, rounded[:rows.shape[0], :rows.shape[1]])

        xs = norms(self.x32, self.xin)
        ys = xs if self.self_mode else norms(self.y32, self.yin)
        return fast_error_bound(d=self.d, metric=self.cfg.metric, x_full=xs[0], x_rounded=xs[1],
                                x_delta=xs[2], y_full=ys[0], y_rounded=ys[1], y_delta=ys[2])

    @staticmethod
    def _padded(v: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        per16 = 16 // torch.empty(0, dtype=dt).element_size()
        d_pad = max(per16, -(-v.shape[1] // per16) * per16)
        out = torch.zeros(max(v.shape[0], 1), d_pad, dtype=dt, device=v.device)
        out[:v.shape[0], :v.shape[1]] = saturated(v, dt)
        return out

    def _reset_accumulators(self) -> None:
        dev = self.device
        self.tiles_done = 0
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.sums = torch.zeros(2, dtype=torch.float64, device=dev)  # sums of (v - shift), (v - shift)^2
        self.outside_count = torch.zeros((), dtype=torch.int64, device=dev)
        self.hist = torch.zeros(self.bins + 2, dtype=torch.int64, device=dev) if self.bins else None
        self.out_rows = torch.zeros(max(self.n, 1), dtype=torch.int64, device=dev)
        self.out_cols = self.out_rows if self.self_mode else torch.zeros(max(self.m, 1), dtype=torch.int64, device=dev)
        self._reset_lists()
        self._reset_thresholds()

    # engine protocol -------------------------------------------------------------------------
    def num_tiles(self) -> int:
        return self.nbands

    def _band_rows(self, b: int) -> tuple[int, int]:
        return b * self.group * self.bm, min(self.n, (b + 1) * self.group * self.bm)

    def tile_pairs(self, begin: int, end: int) -> int:
        total = 0
        for b in range(begin, end):
            a, e = self._band_rows(b)
            if self.self_mode:
                total += (e - a) * (self.n - 1) - (a + e - 1) * (e - a) // 2
            else:
                total += (e - a) * self.m
        return total

    def run(self, begin: int, end: int) -> None:
        if begin != self.tiles_done:
            raise ValueError(f"tiles must run in order: expected begin={self.tiles_done}, got {begin}")
        for b in range(begin, end):
            self._band(b)
            self.tiles_done += 1

    def state(self) -> EngineState:
        cfg = self.cfg
        st = EngineState.empty(cfg, self.n, None if self.self_mode else self.m)
        st.tiles_done = self.tiles_done
        st.set_shifted(int(self.count), self.shift, *self.sums.tolist())
        if self.bins:
            st.hist = to_numpy(self.hist).astype(np.int64)
        limits = dict(list_limits(cfg), near=self.kinds_k["near"], outside_pairs=self.kinds_k["outside_pairs"])
        for kind, limit in limits.items():
            v, i, j = self.lists[kind]
            setattr(st, kind, (to_numpy(v[:limit]).astype(np.float64), to_numpy(i[:limit]).astype(np.int64),
                               to_numpy(j[:limit]).astype(np.int64)))
        for name, kind in (("max", "top"), ("min", "bottom")):
            v, i, j = self.lists[kind]
            setattr(st, name, (float(v[0]), int(i[0]), int(j[0])) if v.numel() else None)
        for kind, (v, i) in self.rows.items():
            setattr(st, kind, (to_numpy(v).astype(np.float32), to_numpy(i).astype(np.int64)))
        if cfg.outside:
            st.outside_count = int(self.outside_count)
            st.outside_rows = to_numpy(self.out_rows[:self.n]).astype(np.int64)
            if not self.self_mode:
                st.outside_cols = to_numpy(self.out_cols[:self.m]).astype(np.int64)
        st.excluded_rows = self.excluded_rows
        st.excluded_cols = self.excluded_cols
        st.hist_error_bound = self.eps
        return st

    def load_state(self, state: EngineState) -> None:
        dev = self.device
        self._reset_accumulators()
        self.tiles_done = int(state.tiles_done)
        self.count.fill_(int(state.count))
        sums = state.shifted_sums(self.shift)
        self.sums.copy_(torch.tensor(sums, dtype=torch.float64))
        if self.bins:
            self.hist.copy_(torch.as_tensor(np.asarray(state.hist), dtype=torch.int64))

        def dev3(t):
            return tuple(torch.as_tensor(np.asarray(a), dtype=dt).to(dev)
                         for a, dt in zip(t, (torch.float64, torch.int64, torch.int64)))

        for kind, extreme in (("top", "max"), ("bottom", "min"), ("near", None), ("outside_pairs", None)):
            got = dev3(getattr(state, kind))
            e = getattr(state, extreme) if extreme else None
            if e is not None and got[0].numel() == 0:  # topk=0: keep max
                got = merge_pairs(kind, got, dev3(([e[0]], [e[1]], [e[2]])), self.kinds_k[kind], self.cfg.near)
            self.lists[kind] = tuple(t.to(dev) for t in got)
        for kind in self.rows:
            v, i = getattr(state, kind)
            self.rows[kind] = (torch.as_tensor(np.asarray(v), dtype=torch.float32).to(dev).contiguous(),
                               torch.as_tensor(np.asarray(i), dtype=torch.int64).to(dev).contiguous())
        if self.cfg.outside:
            self.outside_count.fill_(int(state.outside_count))
            self.out_rows[:self.n] = torch.as_tensor(np.asarray(state.outside_rows), dtype=torch.int64)
            if not self.self_mode:
                self.out_cols[:self.m] = torch.as_tensor(np.asarray(state.outside_cols), dtype=torch.int64)

    # one band --------------------------------------------------------------------------------
    def _band(self, b: int) -> None:
        r0, rows, ntiles = self.plan.tiles(b, self.self_mode)
        if not self._seeded:
            self._seed_thresholds()
        self._refresh_thresholds()
        self.cnt_buf.zero_()
        if self.bins and not self.nb:
            self.hist_buf.zero_()
        euclid = self.cfg.metric == "euclidean"
        # the kernel counts outside pairs only in the per-row (and per-column) counters: the
        # band's total is their increase (self mode: one array, two increments per pair)
        outside_before = self.out_rows[:self.n].sum() if self.cfg.outside else None
        grid = self._launch(r0, rows, ntiles, True, self.active, collect_close=euclid)
        counts = self._counts()
        stored = [self.cap] * NUM_BUFFERS  # room each stream had when it last ran
        if euclid and counts[6] > self.cap:  # more near-duplicates than room: collect them again
            self._alloc_candidates(next_pow2(counts[6]), keep=True)
            stored[6] = self.cap
            self._clear_stream(6)
            self._launch(r0, rows, ntiles, False, [False] * len(STREAMS), collect_close=True)
            counts = self._counts()
        # stats of this band
        self.count += self.part_cnt[:grid].sum()
        self.sums += torch.stack([self.part_sum[:grid].sum(), self.part_sq[:grid].sum()])
        if self.cfg.outside:
            self.outside_count += (self.out_rows[:self.n].sum() - outside_before) // (2 if self.self_mode else 1)
        if self.bins:
            h = self.hist_buf[:grid * self.nb].view(grid, self.nb).sum(0) if self.nb else self.hist_buf
            self.hist += h[: self.bins + 2]  # slot bins + 2: the invalid pairs, dropped
        # an overflowed stream gets a higher threshold or an earlier tie cut (or more room) and
        # runs again alone; from the third retry of a band on, more room too (a tie cut may
        # settle only the rows whose candidates filled the buffer: one retry each would be slow)
        retries = 0
        while True:
            over = [s for s in range(len(STREAMS)) if self.active[s] and counts[s] > stored[s]]
            if not over:
                break
            retry = [False] * len(STREAMS)
            retries += 1
            grow = retries > 2
            for s in over:
                grow |= not self._raise_threshold(s, stored[s])
                retry[s] = True
            if grow:
                self._alloc_candidates(2 * self.cap, keep=True)
            for s in over:
                self._clear_stream(s)
                stored[s] = self.cap
            self._launch(r0, rows, ntiles, False, retry)
            counts = self._counts()
        if self._programs_next is not None:  # band statistics reduced above: now resize
            self._set_programs(self._programs_next)
            self._programs_next = None
        if euclid and counts[6]:
            self._close_pairs(counts[6])
        for s in range(NUM_BUFFERS):
            self.candidates[s] += counts[s]
        for s, kind in enumerate(STREAMS):
            if self.active[s] and counts[s]:
                self._merge(s, kind, counts[s])

    def _launch(self, r0: int, rows: int, ntiles: int, do_stats: bool, streams, collect_close=False) -> int:
        from embgeom.kernels.triton import pairwise  # imports triton: only when a band runs

        grid = max(1, min(self.programs, ntiles))
        cfg = self.cfg
        compiled = pairwise.launch_pairwise(
            grid, self.xin, self.yin, self.xv, self.yv, self.xsq, self.ysq, self.n, self.m, self.d,
            r0, rows, ntiles, self.part_cnt, self.part_sum, self.part_sq,
            self.hist_buf, self.edges, self.lo_f, self.hi_f, self.scale_f, self.off_f, self.edge_w,
            max(self.bins, 1),
            self.out_a, self.out_b, self.out_rows, self.out_cols, self.gthr, self.gbuck, self.rthr,
            self.ties, self.rbuck[0], self.rbuck[1], self.cnt_buf,
            self.cv, self.ci, self.cj, self.cap, float(cfg.near or 0.0), self.margin,
            self.near_margin, *self.out_cut, self.shift, NEAR_DUPLICATE_TAU,
            **variant(cfg, mode=self.mode, plan=self.plan, self_mode=self.self_mode,
                      has_valid=self.has_valid, do_stats=do_stats, streams=streams,
                      collect_close=collect_close))
        if self._occupancy_pending and do_stats:
            # only noted here: this launch's partial sums still sit in the per-program buffers
            self._occupancy_pending = False
            regs = int(getattr(compiled, "n_regs", 0) or 0)
            shared = int(getattr(getattr(compiled, "metadata", None), "shared", 0) or 0)
            shared += pairwise.block_library_bytes(self.nb if do_stats else 0, self.plan.num_warps,
                                                   self.device.type != "cpu")
            if regs:
                programs = programs_for(regs, self.sms, self.plan.num_warps, shared)
                if programs != self.programs:
                    self._programs_next = programs
        return grid

    def _set_programs(self, programs: int) -> None:
        dev, P = self.device, programs
        self.programs = P
        self.part_cnt = torch.zeros(P, dtype=torch.int64, device=dev)
        self.part_sum = torch.zeros(P, dtype=torch.float64, device=dev)
        self.part_sq = torch.zeros(P, dtype=torch.float64, device=dev)
        if self.nb:
            self.hist_buf = torch.zeros(P * self.nb, dtype=torch.int64, device=dev)



register("triton", "pairwise_stats", TritonEngine)
register("triton", "cone_index", triton_cone_unit_sums)
register("triton", "attention_entropy", triton_row_entropy)
