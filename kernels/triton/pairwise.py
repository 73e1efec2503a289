"""Fused all-pairs statistics (docs/metrics.md): one tl.dot tile -> every requested reduction.

A launch covers one *band*: `band_rows` consecutive block-rows starting at `band_row0`, against
every column block (cross mode) or every column block from band_row0 * BM // BN on (self
mode: the upper triangle only, half the FLOPs; tiles are BM x BN, BN a multiple of BM). Programs are persistent: program p runs tiles p, p + P, ...;
inside a band, consecutive tiles walk down the band's block-rows before moving one column
block right (grouped order: the band's rows and one column block stay in L2).

Per program, in registers, merged once at the end: count and float64 sum / sum of squares;
a (NB,) sub-histogram in shared memory (written per program, reduced by the caller). Outside
counts go straight to the per-row (and per-column) counters: their total is the band's
increase of those counters, so no per-program accumulator holds it (registers: see _slab).

Ranked outputs (global top/bottom/near, per-row top/bottom, the first outside pairs) leave the
kernel as *candidates*: a tile appends (v, i, j) for every pair whose key reaches the stream's
running threshold, one relaxed atomic per appended pair on the stream's counter. A threshold is always a
lower bound of the k-th best key, so no pair of a final list is ever filtered out:
- the caller seeds it from a sample of columns before the first band, then from the merged
  state (its current k-th best key) before every band;
- where the plan enables live bounds (tests; off on the GPU, whose registers it costs), tiles
  raise it live: the stream's pairs are split into G = next_pow2(k) fixed buckets whose
  running maxima live in global memory (`atomic_max`, only when a tile improves one); their
  minimum is reached by G distinct pairs, so the k-th best key is at least that, and the bound
  tightens as the run goes on (per row: buckets by column position, N x G floats).
In `fast` precision the filter is `key >= threshold - margin`, margin = 2x the product error
bound, so pairs whose exact value belongs in a list survive the bf16/tf32 error.
The caller selects exactly (value, then (i, j)) on the small candidate set, and retries a band
with a higher threshold if a candidate buffer overflowed.

Cost model (sm_90, per element of a tile, d = 768; benchmarks/gpu_static_profile.py measures
the compiled variants, benchmarks/results/gpu_static_profile*.json keep the tables; every number
here is a static prediction, never a measurement):
- product: 768 bf16 MACs at 2,048 MAC/clk/SM (dense wgmma) = 0.375 SM-clocks;
- epilogue: thread-instructions issue at 128/clk/SM, so E instructions per element cost E/128
  clocks: E = 48 equals the product. Tiles are 64 x 128 in one warpgroup (4 warps): two
  programs fit an SM's registers (2 x 128 threads x <= 255), so one program's epilogue issues
  while the other's products run, and a tile costs max(product, epilogue, (product +
  epilogue) / 2) instead of their sum (one 8-warp 128 x 128 program per SM before);
- validity: one integer compare per element (each row's bound against each column's index);
  invalid pairs become NaN, which every later comparison rejects;
- moments: cvt to f64 (16/clk/SM), the shift (DADD), a select, DADD + DFMA, the count in
  int32: ~7 instructions;
- candidate streams: one score per element, key minus the lowest threshold that applies
  (lists of the same key merged per row and column: a subtract and a maximum, a min more for
  the column side of per-row lists), reduced to one maximum per row inside each warp, then
  one block-wide vote per slab (compiled kernels: a flag store and one bar.red.or, see the
  block library); only a slab where some score is >= 0 runs the streams' exact masks,
  counters and appends (_candidates). The model counts that region as cold (taken only by
  slabs that hold a candidate);
- histogram: FFMA + floor + cvt + clamp (~6), one predicated edge load within edge_w of an
  edge, then one shared-memory increment per element (ATOMS.POPC.INC, warp-aggregated in
  hardware) into the program's NB slots: the block library, an LLVM IR
  library linked in by Triton; the same instructions on Triton 3.6 and 3.9. tl.histogram, which the
  CPU interpreter runs, is lowered by Triton 3.6 (the lent machine's) with log2(NB) warp
  ballots per element and NB / 32 popcounts per lane: with NB = 2,048 some 250-300
  instructions per element, 5.6 s predicted for the full output against 1.8 s with the
  library (3.9 lowers it to shared increments, 2.1 s; the library's 1.9 s there).
Tiles: 64 x 128 (HGMMA 64x128x16), 3 stages of 64 x 64 and 128 x 64 operands; the epilogue
runs on 4 slabs of 64 x 32 (tl.split) so its registers stay beside the accumulator's 64 per
thread.

Streams (index s into thr/cnt/cand arrays): 0 top, 1 bottom, 2 near, 3 row top, 4 row bottom,
5 outside pairs (the first `outside_limit` by (i, j): only pairs before (cut_i, cut_j)),
6 euclidean near-duplicates (all of them, excluded from every in-kernel reduction).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.language import core as tl_core

# Integer arguments that change between the launches of one run (bands, retries with a larger
# buffer, the outside list's cut): Triton would otherwise specialise each on == 1 and on
# divisibility by 16 and compile another variant mid-run. N, M, D and bins stay specialised:
# they are constant for a run (tests/test_triton.py checks both halves on recorded launches).
DO_NOT_SPECIALIZE = ("band_row0", "band_rows", "num_tiles", "cap", "cut_i", "cut_j")


# ----------------------------------------------------------------------------------------------
# block library of compiled kernels: shared-memory histogram and the block-wide vote
# ----------------------------------------------------------------------------------------------
# Two things Triton 3.6 (the lent machine's) cannot say in its language, kept in a small LLVM IR
# library that Triton links into compiled kernels (extern_libs). The CPU interpreter cannot link
# IR and runs the language's own ops instead (same results).
#
# Histogram: no language op of Triton 3.6 increments shared memory per element: tl.histogram is
# lowered there with warp ballots, each lane popcounting its NB / 32 slots for every element
# (~200 instructions per element at NB = 2,048, more than the rest of the epilogue). The library
# keeps NB int32 slots in static shared memory, one relaxed atomic increment per element
# (ATOMS.POPC.INC: warp-aggregated in hardware), zeroed before the first tile and read after the
# last, each behind a block barrier. The calls are elementwise on the slot tile itself: no
# reshape, no mask, no layout to pair up.
#
# Vote ("does any thread of the block hold a candidate?"): a reduction of a tile to one scalar
# crosses warps through shared memory, and its second stage is a load predicated on the lane,
# which ptxas keeps alive from one tile to the next (a spilled register per reduction). The
# library instead lets each thread mark its own flag slot (predicated store, no shuffles) and
# takes the block's OR in one barrier (bar.red.or), which also clears the thread's slot.
BLOCK_LIB = "embgeom_block"
_BLOCK_IR_HIST = """\
@embgeom_hist_slots = internal addrspace(3) global [{nb} x i32] undef, align 16

define i32 @embgeom_hist_zero(i32 %slot) {{
  %p = getelementptr inbounds [{nb} x i32], ptr addrspace(3) @embgeom_hist_slots, i32 0, i32 %slot
  store volatile i32 0, ptr addrspace(3) %p, align 4
  ret i32 0
}}

define i32 @embgeom_hist_add(i32 %slot) {{
  %p = getelementptr inbounds [{nb} x i32], ptr addrspace(3) @embgeom_hist_slots, i32 0, i32 %slot
  %old = atomicrmw add ptr addrspace(3) %p, i32 1 monotonic, align 4
  ret i32 0
}}

define i32 @embgeom_hist_read(i32 %slot) {{
  %p = getelementptr inbounds [{nb} x i32], ptr addrspace(3) @embgeom_hist_slots, i32 0, i32 %slot
  %v = load volatile i32, ptr addrspace(3) %p, align 4
  ret i32 %v
}}
"""
_BLOCK_IR_VOTE = """\
@embgeom_vote_flags = internal addrspace(3) global [{threads} x i32] undef, align 16

declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()

define i32 @embgeom_vote_clear(i32 %unused) {{
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %p = getelementptr inbounds [{threads} x i32], ptr addrspace(3) @embgeom_vote_flags, i32 0, i32 %t
  store volatile i32 0, ptr addrspace(3) %p, align 4
  ret i32 0
}}

define i32 @embgeom_vote_mark(float %score) {{
  %hit = fcmp oge float %score, 0.0
  %bit = zext i1 %hit to i32
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %p = getelementptr inbounds [{threads} x i32], ptr addrspace(3) @embgeom_vote_flags, i32 0, i32 %t
  %old = atomicrmw or ptr addrspace(3) %p, i32 %bit monotonic, align 4
  ret i32 0
}}

define i32 @embgeom_vote_take(i32 %unused) {{
  %t = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()
  %p = getelementptr inbounds [{threads} x i32], ptr addrspace(3) @embgeom_vote_flags, i32 0, i32 %t
  %mine = load volatile i32, ptr addrspace(3) %p, align 4
  store volatile i32 0, ptr addrspace(3) %p, align 4
  %any = call i32 asm sideeffect "{{ .reg .pred %p<2>; setp.ne.u32 %p0, $1, 0; bar.red.or.pred %p1, 0, %p0; selp.u32 $0, 1, 0, %p1; }}", "=r,r,~{{memory}}"(i32 %mine)
  ret i32 %any
}}
"""


def block_library(nb: int, threads: int) -> str:
    """Path of the block library for nb histogram slots (0: none) and a block of `threads`
    threads (written once per shape and user; Triton hashes the file's content into its kernel
    cache key)."""
    d = Path(tempfile.gettempdir()) / f"embgeom-triton-{os.getuid() if hasattr(os, 'getuid') else 0}"
    path = d / f"{BLOCK_LIB}_{nb}_{threads}.ll"
    text = (_BLOCK_IR_HIST.format(nb=nb) + "\n" if nb else "") + _BLOCK_IR_VOTE.format(threads=threads)
    if not path.exists() or path.read_text() != text:
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a concurrent compile reads a whole file
    return str(path)


def block_library_bytes(nb: int, num_warps: int, linked: bool) -> int:
    """Static shared memory of the block library (not in Triton's metadata.shared)."""
    return 4 * (nb + 32 * num_warps) if linked else 0


def compile_options(nb: int, num_warps: int, linked: bool) -> dict:
    """Compiler options of a variant beside num_warps/num_stages: the block library in compiled
    kernels (the engine's launch and the static profile)."""
    return {"extern_libs": ((BLOCK_LIB, block_library(nb, 32 * num_warps)),)} if linked else {}


def _block_fn(symbol: str, arg_type: str):
    """A language-level call of the block library's function `symbol` (one argument, an int32
    result; not pure: the calls write shared memory)."""
    @tl_core.extern
    def call(arg, _semantic=None):
        return tl_core.extern_elementwise(
            BLOCK_LIB, "", [arg], {(tl_core.dtype(arg_type),): (symbol, tl_core.dtype("int32"))},
            is_pure=False, _semantic=_semantic)
    return call


_hist_zero = _block_fn("embgeom_hist_zero", "int32")    # (slot tile): its slot := 0
_hist_add = _block_fn("embgeom_hist_add", "int32")      # (slot tile): one increment per element
_hist_read = _block_fn("embgeom_hist_read", "int32")    # (slot tile): the slots' counts
_vote_clear = _block_fn("embgeom_vote_clear", "int32")  # (scalar): this thread's flag := 0
_vote_mark = _block_fn("embgeom_vote_mark", "fp32")     # (tile): flag |= any element >= 0
_vote_take = _block_fn("embgeom_vote_take", "int32")    # (scalar): the block's OR, flags cleared


@triton.jit
def _append(m, v, rows, cols, s, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, LINKED: tl.constexpr):
    """Append the masked pairs of a (R, C) tile to stream s as (v, row, col): one relaxed
    atomic per appended pair (predicated off elsewhere), so no tile-wide count or scan that
    every tile would pay; appends are rare once thresholds are seeded.

    Counting past 2^31 without int64 offsets per element (2 registers each): cnt_ptr[s] (int32)
    only takes appends while it is below cap, read uncached before each slab; a slab that finds
    the stream full adds its count to the int64 drop counter cnt_ptr[8 + 2s : 10 + 2s] instead.
    The int32 counter thus stays below cap + programs x slab size (< 2^31 for cap <= 2^30), and
    int32 + int64 counts every pair, so an overflow can neither wrap nor hide from the retry.

    Compiled (LINKED), the block takes one side of `if full`: each thread loads the counter
    itself while other programs' appends raise it, and threads on different sides of the drop
    path's row count (a reduction across warps, with a barrier, in the 8-warp exact variant)
    would hang the block. The block's OR of the threads' views decides (the vote library)."""
    full = tl.load(cnt_ptr + s, volatile=True) >= cap
    if LINKED:
        _vote_mark(tl.where(full, 0.0, -1.0))
        full = _vote_take(0) != 0
    if full:
        # one relaxed atomic per row that drops pairs: counted along the row inside the warp, no
        # cross-warp count (whose predicated second stage ptxas keeps alive across tiles)
        n_row = tl.sum(m.to(tl.int32), 1)
        drop_ptr = (cnt_ptr + 8).to(tl.pointer_type(tl.int64))
        tl.atomic_add(drop_ptr + s + 0 * rows, n_row.to(tl.int64), mask=n_row > 0, sem="relaxed")
    else:
        ii = rows[:, None] + 0 * cols[None, :]
        jj = cols[None, :] + 0 * rows[:, None]
        one = tl.full(m.shape, 1, tl.int32)
        off = tl.atomic_add(cnt_ptr + s + 0 * ii, one, mask=m, sem="relaxed")
        ok = m & (off < cap)
        base = cap.to(tl.int64) * s  # the stream's buffer: int32 offsets inside it
        tl.store(cv_ptr + base + off, v, mask=ok)
        tl.store(ci_ptr + base + off, ii, mask=ok)
        tl.store(cj_ptr + base + off, jj, mask=ok)


@triton.jit
def _global_stream(key, v, rows, cols, s: tl.constexpr, thr_ptr, gbuck_ptr, tie_ptr, cnt_ptr, cv_ptr,
                   ci_ptr, cj_ptr, cap, margin, G: tl.constexpr, BM: tl.constexpr, LINKED: tl.constexpr,
                   TIES: tl.constexpr):
    """Global list s. Live bound: the pairs are split into G buckets by tile-local row block; the
    running maximum of each bucket (gbuck, global memory) is a distinct pair, so their minimum
    bounds the G-th (>= k-th) best key, and it keeps rising as tiles go by. Tie cut (exact mode,
    top and bottom): k known pairs rank at or before (key thr_ptr[3 + s], pair tie_ptr[2s:2s+2])
    in the list's order (key, then (i, j)), so a pair with that key after that pair cannot enter:
    many equal values (duplicate rows) no longer all wait in the buffer."""
    k = tl.where(key == key, key, float("-inf"))  # invalid pairs are NaN (see the kernel)
    thr = tl.load(thr_ptr + s)
    if G > 0:
        tile_max = tl.max(tl.reshape(tl.max(k, 1), (G, BM // G)), 1)
        bptr = gbuck_ptr + s * 64 + tl.arange(0, G)  # (64: gpu_plan.GLOBAL_BUCKETS, G <= 64)
        old = tl.load(bptr)
        tl.atomic_max(bptr, tile_max, mask=tile_max > old, sem="relaxed")
        lb = tl.min(tl.maximum(old, tile_max), 0)
        if lb > thr:
            tl.atomic_max(thr_ptr + s, lb, sem="relaxed")
            thr = lb
    m = key >= thr - margin
    if TIES and s < 2:
        cut_v = tl.load(thr_ptr + 3 + s)
        tie_i = tl.load(tie_ptr + 2 * s)
        tie_j = tl.load(tie_ptr + 2 * s + 1)
        after = (rows[:, None] > tie_i) | ((rows[:, None] == tie_i) & (cols[None, :] > tie_j))
        m = m & ((key != cut_v) | (after == 0))
    _append(m, v, rows, cols, s, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, LINKED)


@triton.jit
def _row_stream(key, v, rows, cols, row_ok, col_ok, s: tl.constexpr, rthr_ptr, tie_ptr, rbuck_ptr, n_rows,
                cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, margin, SELF: tl.constexpr,
                G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, LINKED: tl.constexpr, TIES: tl.constexpr):
    """Per-row lists: row i gets neighbour j; in self mode row j also gets neighbour i, and a
    pair that passes either row's threshold is appended once as (i, j) (the caller offers it
    to both rows). Live bound per row as in _global_stream: row i's pairs (i, j) fall in G buckets by the
    tile-local position of j (the same on the row and on the column side, BM == BN), with
    running bucket maxima rbuck (N, G) in global memory. Tie cut per row as _global_stream's
    (exact mode): k known neighbours rank at or before (key rthr[s - 1][row], column
    tie_ptr[6 + (s - 3) N + row]), so a neighbour with that key past that column cannot enter."""
    k = tl.where(key == key, key, float("-inf"))  # invalid pairs are NaN (see the kernel)
    base = rthr_ptr + (s - 3) * n_rows
    cut_base = rthr_ptr + (s - 1) * n_rows
    col_base = tie_ptr + 6 + (s - 3) * n_rows
    thr = tl.load(base + rows, mask=row_ok, other=float("inf"))
    if G > 0:
        gs = tl.arange(0, G)
        tile_max = tl.max(tl.reshape(k, (BM, G, BN // G)), 2)
        bptr = rbuck_ptr + rows[:, None].to(tl.int64) * G + gs[None, :]
        old = tl.load(bptr, mask=row_ok[:, None], other=float("-inf"))
        tl.atomic_max(bptr, tile_max, mask=row_ok[:, None] & (tile_max > old), sem="relaxed")
        lb = tl.min(tl.maximum(old, tile_max), 1)
        tl.atomic_max(base + rows, lb, mask=row_ok & (lb > thr), sem="relaxed")
        thr = tl.maximum(thr, lb)
    m = key >= thr[:, None] - margin
    if TIES:
        cut_v = tl.load(cut_base + rows, mask=row_ok, other=float("nan"))
        cut_c = tl.load(col_base + rows, mask=row_ok, other=0)
        m = m & ((key != cut_v[:, None]) | (cols[None, :] <= cut_c[:, None]))
    if SELF:
        cthr = tl.load(base + cols, mask=col_ok, other=float("inf"))
        if G > 0:
            gs = tl.arange(0, G)
            ctile = tl.max(tl.reshape(k, (G, BM // G, BN)), 1)
            cptr = rbuck_ptr + cols[None, :].to(tl.int64) * G + gs[:, None]
            cold = tl.load(cptr, mask=col_ok[None, :], other=float("-inf"))
            tl.atomic_max(cptr, ctile, mask=col_ok[None, :] & (ctile > cold), sem="relaxed")
            clb = tl.min(tl.maximum(cold, ctile), 0)
            tl.atomic_max(base + cols, clb, mask=col_ok & (clb > cthr), sem="relaxed")
            cthr = tl.maximum(cthr, clb)
        # one append for both sides: the caller offers each (i, j) to rows i and j
        cm = key >= cthr[None, :] - margin
        if TIES:
            ccut_v = tl.load(cut_base + cols, mask=col_ok, other=float("nan"))
            ccut_c = tl.load(col_base + cols, mask=col_ok, other=0)
            cm = cm & ((key != ccut_v[None, :]) | (rows[:, None] <= ccut_c[None, :]))
        m = m | cm
    _append(m, v, rows, cols, s, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, LINKED)


@triton.jit
def _bin_slot(v, lo_f, hi_f, scale_f, off_f, edge_w, bins, edges_ptr):
    """Histogram slot: 0 underflow, 1..bins, bins + 1 overflow, bins + 2 an invalid pair (NaN:
    the caller's spare slot, dropped on the host). One FMA and a floor give the
    bin; it can differ from the float64 definition floor((v - lo) * bins / (hi - lo)) only when
    the estimate lies within edge_w (its error bound, < 1/2) of an integer, and only there one
    edge is read: edges[b] = the smallest fp32 value whose float64 bin is >= b
    (docs/metrics.md, histogram). lo_f/hi_f: lo/hi rounded inwards to fp32."""
    t = v * scale_f + off_f
    fb = tl.floor(t)
    fr = t - fb
    bn = tl.minimum(tl.maximum(fb.to(tl.int32), 0), bins - 1)
    up = fr >= 0.5  # nearer the next edge: the true bin may be bn + 1, else bn - 1
    near = (fr < edge_w) | (fr > 1.0 - edge_w)
    e = tl.load(edges_ptr + bn + up.to(tl.int32), mask=near, other=0.0)
    bn = tl.where(near & up & (v >= e), bn + 1, tl.where(near & (up == 0) & (v < e), bn - 1, bn))
    bn = tl.minimum(tl.maximum(bn, 0), bins - 1) + 1
    return tl.where(v != v, bins + 2, tl.where(v < lo_f, 0, tl.where(v > hi_f, bins + 1, bn)))


@triton.jit
def _tile_epilogue(
    acc, rows, cols, acc_n, acc_s, acc_q, hist,
    N, M, xv_ptr, yv_ptr, xsq_ptr, ysq_ptr, hist_ptr, edges_ptr,
    lo_f, hi_f, scale_f, off_f, edge_w, bins, out_a, out_b, out_rows_ptr, out_cols_ptr,
    gthr_ptr, gbuck_ptr, rthr_ptr, tie_ptr, rbuck_top_ptr, rbuck_bot_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap,
    near, margin, near_margin, cut_i, cut_j, shift, near_tau,
    METRIC: tl.constexpr, SELF: tl.constexpr, HAS_VALID: tl.constexpr, DO_STATS: tl.constexpr,
    NB: tl.constexpr, GHIST: tl.constexpr, LINKED: tl.constexpr, HAS_OUT: tl.constexpr,
    COLLECT_CLOSE: tl.constexpr,
    TOP: tl.constexpr, BOT: tl.constexpr, NEAR: tl.constexpr, RTOP: tl.constexpr,
    RBOT: tl.constexpr, OUTL: tl.constexpr,
    G_TOP: tl.constexpr, G_BOT: tl.constexpr, G_NEAR: tl.constexpr, G_RTOP: tl.constexpr,
    G_RBOT: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr, TIES: tl.constexpr,
):
    """Every reduction of one (BM, BW) slab of products: acc holds rows x cols. Returns the
    per-program accumulators (count, shifted sums, histogram).

    Hot path, per element: one integer compare for validity, the clamp, the statistics, and one
    "may this pair be a candidate?" score per element whose slab maximum gates every candidate
    stream: the streams' masks, counters and appends (_candidates) run only for a slab that
    holds a pair reaching some stream's threshold."""
    row_ok = rows < N
    col_ok = cols < M
    rok = row_ok
    cok = col_ok
    if HAS_VALID:
        rok = rok & (tl.load(xv_ptr + rows, mask=row_ok, other=0) != 0)
        cok = cok & (tl.load(yv_ptr + cols, mask=col_ok, other=0) != 0)
    # validity in one compare per element: row i's bound below column j's index (self mode:
    # i < j); an invalid row's bound is above every index, an invalid column's index below
    # every bound
    if SELF:
        rlo = tl.where(rok, rows, 2147483647)
    else:
        rlo = tl.where(rok, -1, 2147483647)
    chi = tl.where(cok, cols, -2)
    valid = rlo[:, None] < chi[None, :]
    if METRIC == 0:
        v = tl.minimum(tl.maximum(acc, -1.0), 1.0)
    elif METRIC == 1:
        v = acc
    else:
        xs = tl.load(xsq_ptr + rows, mask=row_ok, other=0.0)
        ys = tl.load(ysq_ptr + cols, mask=col_ok, other=0.0)
        scale2 = xs[:, None] + ys[None, :]
        d2 = tl.maximum(scale2 - 2.0 * acc, 0.0)
        # correctly rounded, as the float64 reference, torch and the C++ core take it: tl.sqrt is
        # the fast one on the GPU (sqrt.approx.ftz.f32 in the PTX), and exact mode reports the
        # kernel's values without rescoring them
        v = tl.sqrt_rn(d2)
        # |a|^2 + |b|^2 - 2ab cancels for near-duplicate rows: those few pairs leave the
        # kernel (stream 6) and the caller reduces their directly computed distances
        close = valid & (d2 < near_tau * scale2)
        if COLLECT_CLOSE:
            _append(close, v, rows, cols, 6, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, LINKED)
        valid = valid & (close == 0)

    if DO_STATS:
        # (v - shift) in float64, as every engine takes it (docs/metrics.md, moments): exact
        # there; in fp32 it rounded where v is far from the shift's size (-3.0000002 - 1 gave
        # -4); float64 sums; the count in int32 along a row (<= BW)
        vz = tl.where(valid, v.to(tl.float64) - shift, 0.0)
        acc_n += tl.sum(valid.to(tl.int32), 1)
        acc_s += tl.sum(vz, 1)
        acc_q += tl.sum(vz * vz, 1)
    # invalid pairs become NaN: every comparison below fails for them, so no (BM, BN)
    # predicate tile stays live next to the accumulator (ptxas has 7 predicate registers)
    v = tl.where(valid, v, float("nan"))
    if DO_STATS:
        if NB > 0:
            # per-program histogram: shared-memory increments in compiled kernels, tl.histogram
            # in the interpreter (see the cost model above). No mask in either: Triton may
            # reorder the elements of each rank-1 reshape feeding tl.histogram, and a mask
            # reshaped from another layout than the slots would pair with the wrong elements.
            # Invalid pairs go to the spare slot bins + 2 (< NB) instead.
            slot = _bin_slot(v, lo_f, hi_f, scale_f, off_f, edge_w, bins, edges_ptr)
            if LINKED:
                _hist_add(slot)
            else:
                hist += tl.histogram(tl.reshape(slot, (BM * BW,)), NB)
        if GHIST:
            # too many bins for a per-program histogram: global atomics (slower, same bins),
            # int64 counts (a band at 1M rows holds up to 8.6e9 pairs); slot and mask share
            # one layout here (no reshape)
            slot = _bin_slot(v, lo_f, hi_f, scale_f, off_f, edge_w, bins, edges_ptr)
            tl.atomic_add(hist_ptr + slot, tl.full(slot.shape, 1, tl.int64), mask=v == v, sem="relaxed")
        if HAS_OUT:
            om = ((v < out_a) | (v > out_b)).to(tl.int32)
            orow = tl.sum(om, 1)
            ocol = tl.sum(om, 0)
            tl.atomic_add(out_rows_ptr + rows, orow.to(tl.int64), mask=row_ok & (orow > 0), sem="relaxed")
            tl.atomic_add(out_cols_ptr + cols, ocol.to(tl.int64), mask=col_ok & (ocol > 0), sem="relaxed")

    if TOP or BOT or NEAR or RTOP or RBOT or OUTL:
        score = _candidate_score(v, rows, cols, row_ok, col_ok, gthr_ptr, rthr_ptr, N, out_a, out_b,
                                 near, margin, near_margin, cut_i, SELF, TOP, BOT, NEAR, RTOP, RBOT, OUTL)
        if LINKED:
            # per-row maxima inside each warp, then one block-wide OR (see the block library)
            _vote_mark(tl.max(score, 1))
            hit = _vote_take(0) != 0
        else:
            hit = tl.max(tl.max(score, 1), 0) >= 0.0
        if hit:
            _candidates(v, rows, cols, row_ok, col_ok, N, out_a, out_b,
                        gthr_ptr, gbuck_ptr, rthr_ptr, tie_ptr, rbuck_top_ptr, rbuck_bot_ptr, cnt_ptr, cv_ptr, ci_ptr,
                        cj_ptr, cap, near, margin, near_margin, cut_i, cut_j,
                        SELF, TOP, BOT, NEAR, RTOP, RBOT, OUTL,
                        G_TOP, G_BOT, G_NEAR, G_RTOP, G_RBOT, BM, BW, LINKED, TIES)
    return acc_n, acc_s, acc_q, hist


@triton.jit
def _key_score(score, key, rows, cols, row_ok, col_ok, g_ptr, r_ptr, margin,
               G: tl.constexpr, R: tl.constexpr, SELF: tl.constexpr):
    """score raised by key - t: t the global list's threshold (G) and the row's, in self mode
    also the column's, per-row list threshold (R), whichever is lowest, each minus margin."""
    t_row = tl.full(rows.shape, float("inf"), tl.float32)
    if G:
        t_row = tl.minimum(t_row, tl.load(g_ptr) - margin)
    if R:
        t_row = tl.minimum(t_row, tl.load(r_ptr + rows, mask=row_ok, other=float("inf")) - margin)
    if R and SELF:
        t_col = tl.load(r_ptr + cols, mask=col_ok, other=float("inf")) - margin
        score = tl.maximum(score, key - tl.minimum(t_row[:, None], t_col[None, :]))
    else:
        score = tl.maximum(score, key - t_row[:, None])
    return score


@triton.jit
def _candidate_score(v, rows, cols, row_ok, col_ok, gthr_ptr, rthr_ptr, n_rows, out_a, out_b,
                     near, margin, near_margin, cut_i,
                     SELF: tl.constexpr, TOP: tl.constexpr, BOT: tl.constexpr, NEAR: tl.constexpr,
                     RTOP: tl.constexpr, RBOT: tl.constexpr, OUTL: tl.constexpr):
    """Per element: >= 0 wherever a stream's mask in _candidates can hold (a superset: for
    fp32, key >= t implies key - t >= 0), NaN or < 0 elsewhere (invalid pairs are NaN, and
    tl.maximum drops NaN). Thresholds of the same key are merged per row and column first, so
    a key costs a subtract and a maximum per element (a min more with column thresholds)."""
    score = tl.full(v.shape, float("-inf"), tl.float32)
    if TOP or RTOP:
        score = _key_score(score, v, rows, cols, row_ok, col_ok, gthr_ptr, rthr_ptr, margin, TOP, RTOP, SELF)
    if BOT or RBOT:
        score = _key_score(score, -v, rows, cols, row_ok, col_ok, gthr_ptr + 1, rthr_ptr + n_rows, margin, BOT,
                           RBOT, SELF)
    if NEAR:
        score = tl.maximum(score, -tl.abs(v - near) - (tl.load(gthr_ptr + 2) - near_margin))
    if OUTL:
        # superset of "before (cut_i, cut_j)": rows up to cut_i; outside: v < a or v > b, within
        # the products' error (margin, 0 in exact mode: the host re-tests rescored values)
        o = tl.maximum(out_a - v, v - out_b) + margin
        score = tl.maximum(score, tl.where((rows <= cut_i)[:, None], o, float("-inf")))
    return score


@triton.jit
def _candidates(v, rows, cols, row_ok, col_ok, N, out_a, out_b,
                gthr_ptr, gbuck_ptr, rthr_ptr, tie_ptr, rbuck_top_ptr, rbuck_bot_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr,
                cap, near, margin, near_margin, cut_i, cut_j,
                SELF: tl.constexpr, TOP: tl.constexpr, BOT: tl.constexpr, NEAR: tl.constexpr,
                RTOP: tl.constexpr, RBOT: tl.constexpr, OUTL: tl.constexpr,
                G_TOP: tl.constexpr, G_BOT: tl.constexpr, G_NEAR: tl.constexpr, G_RTOP: tl.constexpr,
                G_RBOT: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr, LINKED: tl.constexpr,
                TIES: tl.constexpr):
    """The candidate streams of a slab that holds at least one candidate (rarely taken once
    thresholds are seeded): each stream's exact mask and its appends."""
    if TOP:
        _global_stream(v, v, rows, cols, 0, gthr_ptr, gbuck_ptr, tie_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr,
                       cap, margin, G_TOP, BM, LINKED, TIES)
    if BOT:
        _global_stream(-v, v, rows, cols, 1, gthr_ptr, gbuck_ptr, tie_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr,
                       cap, margin, G_BOT, BM, LINKED, TIES)
    if NEAR:
        _global_stream(-tl.abs(v - near), v, rows, cols, 2, gthr_ptr, gbuck_ptr, tie_ptr, cnt_ptr, cv_ptr,
                       ci_ptr, cj_ptr, cap, near_margin, G_NEAR, BM, LINKED, TIES)
    if RTOP:
        _row_stream(v, v, rows, cols, row_ok, col_ok, 3, rthr_ptr, tie_ptr, rbuck_top_ptr, N, cnt_ptr,
                    cv_ptr, ci_ptr, cj_ptr, cap, margin, SELF, G_RTOP, BM, BW, LINKED, TIES)
    if RBOT:
        _row_stream(-v, v, rows, cols, row_ok, col_ok, 4, rthr_ptr, tie_ptr, rbuck_bot_ptr, N, cnt_ptr,
                    cv_ptr, ci_ptr, cj_ptr, cap, margin, SELF, G_RBOT, BM, BW, LINKED, TIES)
    if OUTL:
        # only pairs before (cut_i, cut_j) in (i, j) order can still enter the list
        before = (rows[:, None] < cut_i) | ((rows[:, None] == cut_i) & (cols[None, :] < cut_j))
        om2 = ((v < out_a + margin) | (v > out_b - margin)) & before
        _append(om2, v, rows, cols, 5, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, LINKED)


@triton.jit
def _half(x, high: tl.constexpr):
    """The half of x along its last axis (of size 2) that `high` names."""
    lo, hi = tl.split(x)
    if high:
        return hi
    else:
        return lo


@triton.jit
def _slab(acc, q: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Columns [q * BN / SPLIT, (q + 1) * BN / SPLIT) of the (BM, BN) tile: SPLIT slabs run the
    epilogue one after the other, a 1 / SPLIT of its live registers next to the accumulator
    (a (64, 128) fp32 tile is 64 per thread). tl.split halves the last axis, so the tile is
    viewed as (BM, BN / SPLIT, 2, ...) with the slab's column bits from the lowest to the
    highest, and halved from the highest down (q's bits, highest first)."""
    if SPLIT == 1:
        return acc
    elif SPLIT == 2:
        return _half(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)), q)
    elif SPLIT == 4:
        x = tl.permute(tl.reshape(acc, (BM, 2, 2, BN // 4)), (0, 3, 2, 1))
        return _half(_half(x, q // 2), q % 2)
    else:
        x = tl.permute(tl.reshape(acc, (BM, 2, 2, 2, BN // 8)), (0, 4, 3, 2, 1))
        return _half(_half(_half(x, q // 4), (q // 2) % 2), q % 2)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def _pairwise_stats_kernel(
    x_desc, y_desc, xv_ptr, yv_ptr, xsq_ptr, ysq_ptr,
    N, M, D, band_row0, band_rows, num_tiles,
    # per-program reductions
    part_cnt_ptr, part_sum_ptr, part_sq_ptr, hist_ptr, edges_ptr,
    lo_f, hi_f, scale_f, off_f, edge_w, bins, out_a, out_b, out_rows_ptr, out_cols_ptr,
    # candidate streams
    gthr_ptr, gbuck_ptr, rthr_ptr, tie_ptr, rbuck_top_ptr, rbuck_bot_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap,
    near, margin, near_margin, cut_i, cut_j, shift, near_tau,
    METRIC: tl.constexpr, SELF: tl.constexpr, HAS_VALID: tl.constexpr, IN_PREC: tl.constexpr,
    DO_STATS: tl.constexpr, NB: tl.constexpr, GHIST: tl.constexpr, LINKED: tl.constexpr,
    HAS_OUT: tl.constexpr, COLLECT_CLOSE: tl.constexpr,
    TOP: tl.constexpr, BOT: tl.constexpr, NEAR: tl.constexpr, RTOP: tl.constexpr,
    RBOT: tl.constexpr, OUTL: tl.constexpr,
    G_TOP: tl.constexpr, G_BOT: tl.constexpr, G_NEAR: tl.constexpr, G_RTOP: tl.constexpr,
    G_RBOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    HB: tl.constexpr, TIES: tl.constexpr,
):
    """METRIC: 0 cosine (rows pre-normalised, values clamped), 1 dot, 2 euclidean.
    IN_PREC: "ieee" / "tf32" for fp32 rows, "" for 16-bit rows. NB: per-program histogram slots
    (power of two >= bins + 3; 0 = none), in shared memory (LINKED: compiled kernels, which also
    take the candidate vote from the block library) or registers (tl.histogram, the CPU
    interpreter); GHIST: histogram by global atomics into hist
    (bins + 3,)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_n = tl.zeros([BM], tl.int32)
    acc_s = tl.zeros([BM], tl.float64)
    acc_q = tl.zeros([BM], tl.float64)
    hist = tl.zeros([HB], tl.int32)  # HB = max(NB, 2): defined for every variant
    if LINKED:
        _vote_clear(0)  # each thread its own flag
        if NB > 0:
            _hist_zero(tl.arange(0, NB))
            tl.debug_barrier()  # every slot zeroed before any warp's first increment
    for t in range(pid, num_tiles, nprog):
        r = band_row0 + t % band_rows
        if SELF:
            # upper triangle: the band's first block-row needs the column blocks from
            # band_row0 * BM // BN on (gpu_plan.GpuPlan.tiles launches that rectangle)
            c = band_row0 * BM // BN + t // band_rows
        else:
            c = t // band_rows
        rows = r * BM + tl.arange(0, BM)
        # TMA tile loads (zero fill past N, M and D): no pointer tiles in registers, and the
        # loop pipelines into wgmma on Hopper
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, D, BK):
            a = x_desc.load([r * BM, k0])
            b = y_desc.load([c * BN, k0])
            if IN_PREC == "" and UPCAST:
                # the CPU interpreter mis-multiplies bf16 in tl.dot; bf16 products are exact in
                # fp32, so upcasting computes the same values as the tensor-core path
                acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
            elif IN_PREC == "":
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision=IN_PREC)
        for q in tl.static_range(SPLIT):
            acc_n, acc_s, acc_q, hist = _tile_epilogue(
                _slab(acc, q, SPLIT, BM, BN), rows, c * BN + q * (BN // SPLIT) + tl.arange(0, BN // SPLIT),
                acc_n, acc_s, acc_q, hist, N, M, xv_ptr, yv_ptr, xsq_ptr, ysq_ptr, hist_ptr, edges_ptr,
                lo_f, hi_f, scale_f, off_f, edge_w, bins, out_a, out_b, out_rows_ptr, out_cols_ptr,
                gthr_ptr, gbuck_ptr, rthr_ptr, tie_ptr, rbuck_top_ptr, rbuck_bot_ptr, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap,
                near, margin, near_margin, cut_i, cut_j, shift, near_tau,
                METRIC, SELF, HAS_VALID, DO_STATS, NB, GHIST, LINKED, HAS_OUT, COLLECT_CLOSE,
                TOP, BOT, NEAR, RTOP, RBOT, OUTL, G_TOP, G_BOT, G_NEAR, G_RTOP, G_RBOT, BM, BN // SPLIT, TIES)

    if DO_STATS:
        tl.store(part_cnt_ptr + pid, tl.sum(acc_n.to(tl.int64), 0))
        tl.store(part_sum_ptr + pid, tl.sum(acc_s, 0))
        tl.store(part_sq_ptr + pid, tl.sum(acc_q, 0))
        if NB > 0:
            if LINKED:
                tl.debug_barrier()  # every warp's increments done before the slots are read
                hist = _hist_read(tl.arange(0, NB))
            tl.store(hist_ptr + pid * NB + tl.arange(0, NB), hist.to(tl.int64))


def constexprs(*, metric, self_mode, has_valid, in_prec, do_stats, nb, ghist, has_out, collect_close,
               streams, groups, bm, bk, upcast, split=1, bn=None, linked=False):
    """The compile-time arguments of _pairwise_stats_kernel (see launch_pairwise); bn: tile
    columns (default bm); linked: the block library is linked in (compiled kernels: the histogram
    in shared memory and the candidate vote; see compile_options). Tie cuts (TIES) are compiled
    into exact fp32 variants only: the 16-bit and tf32 ones compare within a margin, where ties
    of the products' values decide nothing (and the cut's loads spilled registers there)."""
    return dict(METRIC=metric, SELF=self_mode, HAS_VALID=has_valid, IN_PREC=in_prec, DO_STATS=do_stats,
                NB=nb, GHIST=ghist, LINKED=bool(linked), HAS_OUT=has_out,
                COLLECT_CLOSE=collect_close, TOP=streams[0],
                BOT=streams[1], NEAR=streams[2], RTOP=streams[3], RBOT=streams[4], OUTL=streams[5],
                G_TOP=groups[0], G_BOT=groups[1], G_NEAR=groups[2], G_RTOP=groups[3], G_RBOT=groups[4],
                BM=bm, BN=bn or bm, BK=bk, UPCAST=upcast, SPLIT=split, HB=max(nb, 2),
                TIES=in_prec == "ieee")


# The argument types the engine launches _pairwise_stats_kernel with (its tensors' dtypes and
# Python scalars), written once: the static profile compiles exactly these, and
# tests/test_triton.py checks every recorded launch of the engine against them.
ARG_TYPES = dict(
    xv_ptr="*u8", yv_ptr="*u8", xsq_ptr="*fp32", ysq_ptr="*fp32",
    N="i32", M="i32", D="i32", band_row0="i32", band_rows="i32", num_tiles="i32",
    part_cnt_ptr="*i64", part_sum_ptr="*fp64", part_sq_ptr="*fp64",
    hist_ptr="*i64", edges_ptr="*fp32",
    lo_f="fp32", hi_f="fp32", scale_f="fp32", off_f="fp32", edge_w="fp32", bins="i32",
    out_a="fp32", out_b="fp32", out_rows_ptr="*i64", out_cols_ptr="*i64",
    gthr_ptr="*fp32", gbuck_ptr="*fp32", rthr_ptr="*fp32", tie_ptr="*i32", rbuck_top_ptr="*fp32",
    rbuck_bot_ptr="*fp32",
    cnt_ptr="*i32", cv_ptr="*fp32", ci_ptr="*i32", cj_ptr="*i32", cap="i32",
    near="fp32", margin="fp32", near_margin="fp32", cut_i="i32", cut_j="i32", shift="fp32", near_tau="fp32",
)


def signature(x_desc: str, y_desc: str | None = None) -> dict:
    """Argument types of _pairwise_stats_kernel's runtime arguments (x_desc / y_desc: the TMA
    descriptor types, e.g. "tensordesc<bf16[64,64]>" and "tensordesc<bf16[128,64]>"), as the
    engine launches it."""
    return dict(x_desc=x_desc, y_desc=y_desc or x_desc, **ARG_TYPES)


def specialization(ints: dict) -> dict:
    """The attributes Triton's JIT derives from a launch, for an ahead-of-time compile:
    ints: the integer arguments' values ({name: int}). Pointers are 16-byte aligned (torch
    allocations); an integer outside DO_NOT_SPECIALIZE is marked divisible by 16 when it is, and
    a 1 becomes a constant (returned under "constants"), as triton's own specialize_impl does."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = _pairwise_stats_kernel.arg_names
    attrs, consts = {}, {}
    for a, t in ARG_TYPES.items():
        if t.startswith("*"):
            attrs[(names.index(a),)] = [["tt.divisibility", 16]]
            continue
        if t != "i32":
            continue
        kind, spec = native_specialize_impl(BaseBackend, int(ints[a]), False, a not in DO_NOT_SPECIALIZE, True)
        if kind == "constexpr":
            consts[a] = spec
        elif spec and BaseBackend.parse_attr(spec):
            attrs[(names.index(a),)] = BaseBackend.parse_attr(spec)
    return dict(attrs=attrs, constants=consts)


def launch_pairwise(grid, x, y, xv, yv, xsq, ysq, n, m, d, band_row0, band_rows, num_tiles,
                    part_cnt, part_sum, part_sq, hist, edges, lo_f, hi_f, scale_f, off_f, edge_w, bins,
                    out_a, out_b, out_rows, out_cols, gthr, gbuck, rthr, ties, rbuck_top, rbuck_bot, cnt, cv,
                    ci, cj, cap, near, margin, near_margin, cut_i, cut_j, shift, near_tau, *, metric, self_mode, has_valid,
                    in_prec, do_stats, nb, ghist, has_out, collect_close, streams, groups, bm, bk,
                    split=1, bn=None, num_warps=4, num_stages=3):
    """x: (N, Dp), y: (M, Dp) contiguous, rows 16-byte aligned (Dp padded with zeros; TMA).
    streams: 6 bools (embgeom.backends.gpu_plan.STREAMS); groups: live-bound group counts for the first five.
    Returns the compiled kernel (registers/shared memory for the caller's occupancy)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bn = bn or bm
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    y_desc = x_desc if (y is x and bn == bm) else TensorDescriptor.from_tensor(y, [bn, bk])
    compiled = x.device.type != "cpu"  # the CPU interpreter cannot link the block library
    args = (x_desc, y_desc, xv, yv, xsq, ysq, n, m, d, band_row0, band_rows, num_tiles,
            part_cnt, part_sum, part_sq, hist, edges, lo_f, hi_f, scale_f, off_f, edge_w, bins,
            out_a, out_b, out_rows, out_cols, gthr, gbuck, rthr, ties, rbuck_top, rbuck_bot, cnt, cv, ci, cj, cap,
            near, margin, near_margin, cut_i, cut_j, shift, near_tau)
    kw = dict(**constexprs(metric=metric, self_mode=self_mode, has_valid=has_valid, in_prec=in_prec,
                           do_stats=do_stats, nb=nb, ghist=ghist, has_out=has_out, collect_close=collect_close,
                           streams=streams, groups=groups, bm=bm, bk=bk, upcast=not compiled, split=split,
                           bn=bn, linked=compiled),
              num_warps=num_warps, num_stages=num_stages, **compile_options(nb, num_warps, compiled))
    if compiled:
        # compile (or find) first, so the shared-memory opt-in is set before the first launch
        kernel = _pairwise_stats_kernel.warmup(*args, grid=(grid,), **kw)
        allow_block_library_shared(kernel.result() if hasattr(kernel, "result") else kernel)
    return _pairwise_stats_kernel[(grid,)](*args, **kw)


# Shared memory above 48 KB per block needs an opt-in on the kernel (the CUDA attribute
# MAX_DYNAMIC_SHARED_SIZE_BYTES). Triton 3.6 sets it only when its own, dynamic, share passes
# 48 KB; the block library's slots are static shared memory on top of that. The exact fp32
# variant with a histogram launches 42,000 dynamic + 9,216 static bytes with no opt-in: read
# from the code as the likely cause of both exact-precision test failures on an H200
# (2026-12-04, benchmarks/results/gpu_check_2026-12-04_h200.log, which holds no error text).
SHARED_WITHOUT_OPT_IN = 48 * 1024
CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_opted_in: set = set()


def shared_opt_in(static: int, dynamic: int) -> int | None:
    """The dynamic shared-memory opt-in a kernel with these static and dynamic bytes needs beyond
    what Triton sets, or None (total within 48 KB, or dynamic above it: Triton opted in)."""
    if static + dynamic <= SHARED_WITHOUT_OPT_IN or dynamic > SHARED_WITHOUT_OPT_IN:
        return None
    return dynamic


def allow_block_library_shared(kernel) -> None:
    """Set the opt-in shared_opt_in asks for on a compiled kernel (once per loaded function)."""
    import ctypes

    kernel._init_handles()  # loads the module on the current device (a no-op once loaded)
    fn = kernel.function
    if fn in _opted_in:
        return
    libcuda = ctypes.CDLL("libcuda.so.1")
    static = ctypes.c_int(0)
    err = libcuda.cuFuncGetAttribute(ctypes.byref(static), CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, ctypes.c_void_p(fn))
    if err:
        raise RuntimeError(f"cuFuncGetAttribute(SHARED_SIZE_BYTES) failed: CUresult {err}")
    want = shared_opt_in(static.value, int(kernel.metadata.shared))
    if want is not None:
        err = libcuda.cuFuncSetAttribute(ctypes.c_void_p(fn), CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                         ctypes.c_int(want))
        if err:
            raise RuntimeError(f"cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {want}) failed: CUresult {err} "
                               f"({static.value} static + {want} dynamic bytes of shared memory)")
    _opted_in.add(fn)
