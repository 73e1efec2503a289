"""How the Triton all-pairs engine sizes a run: tile shape, pipeline, bands, programs, candidate
capacity. Pure arithmetic on the problem's shape (no tensors, no device queries), so the same plan
is what the engine launches, what the static profile compiles (benchmarks/gpu_static_profile.py)
and what the tests check. Why these numbers: docs/architecture.md (GPU engine) and the cost model
beside the kernel in kernels/triton/pairwise.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import DEFAULTS

# Hopper: a 64 x 128 tile is one warpgroup (4 warps) issuing one HGMMA 64x128x16 per k-step
# (the N = 128 wgmma shape), its fp32 accumulator 64 registers per thread. Two such programs fit
# one SM (2 x 128 threads x <= 255 registers <= the 64K register file), so one program's
# epilogue issues while the other's products run on the tensor cores. 3 stages of 64 x 64 and
# 128 x 64 bf16 operands (8 + 16 KB) = 72 KB of shared memory per program, 144 KB for two, which
# leaves room for the epilogue's layout conversions and histogram in 228 KB.
GPU_BLOCK_M = 64
GPU_BLOCK_N = 128
GPU_WARPS = 4
GPU_STAGES = 3
# exact fp32 (CUDA-core FMA): square 64 x 64 tiles in 8 warps
EXACT_BLOCK = 64
EXACT_WARPS = 8
# Hopper's per-SM limits (programs_for): register file, shared memory (a program's share
# includes 1 KB the hardware reserves per block), resident warps
SM_REGISTERS = 65536
SM_SHARED = 228 * 1024
SM_WARPS = 64
MAX_PROGRAMS_PER_SM = 4


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


@dataclass(frozen=True)
class GpuPlan:
    """bm x bn: tile (rows x columns; bn a multiple of bm); bk: k-step; group: block-rows per
    band (one launch); programs: persistent programs; capacity: candidate slots per stream;
    occupancy_pending: programs to be refined from the compiled kernel.

    Self mode walks the upper triangle: block-row r needs the column blocks from
    col_start(r) = r * bm // bn on (the first that holds a column > its first row). A band runs
    the rectangle of its block-rows x the column blocks from its first row's col_start; for
    bn > bm the tiles of later rows left of their own col_start hold no pair i < j (every element
    invalid, counted nowhere): at most bn / bm - 1 column blocks per block-row."""

    bm: int
    bk: int
    num_warps: int
    num_stages: int
    group: int
    programs: int
    capacity: int
    seed_sample: int
    nbr: int
    nbc: int
    nbands: int
    occupancy_pending: bool
    split: int = 1  # epilogue slabs per tile: (bm, bn / split) each (register pressure, see the kernel)
    live_bounds: bool = True  # tiles raise thresholds through bucket maxima (off on the GPU: registers)
    bn: int = 0  # tile columns (0: bm, square)

    @property
    def block_n(self) -> int:
        return self.bn or self.bm

    def col_start(self, row_block: int, self_mode: bool) -> int:
        """First column block a self-mode block-row needs (the kernel computes the same)."""
        return row_block * self.bm // self.block_n if self_mode else 0

    def tiles(self, band: int, self_mode: bool) -> tuple[int, int, int]:
        """(first block-row, block-rows, tiles) of band b."""
        r0 = band * self.group
        rows = min(self.group, self.nbr - r0)
        return r0, rows, rows * (self.nbc - self.col_start(r0, self_mode))

    def total_tiles(self, self_mode: bool) -> int:
        return sum(self.tiles(b, self_mode)[2] for b in range(self.nbands))


def make_plan(n: int, m: int, d: int, *, elem_bytes: int, on_gpu: bool, sms: int = 0,
              cfg_block: int = DEFAULTS.block, row_k: int = 1, need: int = 1, block: int | None = None,
              group: int | None = None, programs: int | None = None,
              capacity: int | None = None, split: int | None = None,
              live_bounds: bool | None = None, mma: bool = True, block_n: int | None = None) -> GpuPlan:
    """n, m: rows of x and y; d: columns; elem_bytes: 2 (bf16/fp16) or 4 (fp32/tf32);
    sms: multiprocessors (GPU); cfg_block: the config's tile edge (CPU interpreter only);
    row_k: the larger per-row list; need: the longest list; mma: the products run on tensor
    cores (False for exact fp32: CUDA-core FMA, whose operands sit in registers, so smaller
    tiles). block / block_n: tile rows / columns (block_n a multiple of block; default: the
    GPU shape, or square on the CPU interpreter). Overrides are for tests."""
    if block is None:
        # the CPU interpreter wants few, small tiles
        block = (GPU_BLOCK_M if mma else EXACT_BLOCK) if on_gpu else min(64, max(16, next_pow2(min(cfg_block, max(n, m, 1)))))
        if block_n is None and on_gpu:
            block_n = GPU_BLOCK_N if mma else EXACT_BLOCK
    bm = max(16, next_pow2(block))
    bn = max(bm, next_pow2(block_n or bm))
    # 128-byte operand rows (the widest TMA swizzle): 64 bf16 or 32 fp32 per k-step
    bk = (64 if elem_bytes == 2 else 32) if on_gpu else min(64, max(16, next_pow2(d)))
    nbr = -(-n // bm)
    nbc = -(-m // bn)
    pending = False
    if programs is None:
        # one program per SM until the compiled kernel's registers say more fit
        programs = sms if on_gpu else 2
        pending = on_gpu
    if group is None:
        # ~128 bands: few launches and syncs, yet frequent checkpoints and threshold refreshes;
        # a program's pairs of a band at most 2^30: its histogram slots and row counts are int32
        # until the band's end (at 8M rows, 128 bands gave a program 1.76 x 2^31 pairs)
        group = max(8, -(-nbr // 128)) if on_gpu else 4
        group = max(1, min(group, (1 << 30) * max(programs, 1) // (bm * bn * max(nbc, 1))))
    # candidates per band are ~ O(rows * k * log); the exact selection handles tens of millions
    default_cap = min(1 << 25, max(1 << 20, 4 * n * max(row_k, 1)))
    cap = max(capacity or (default_cap if on_gpu else (1 << 12)), 2 * need + 64)
    return GpuPlan(bm=bm, bn=bn, bk=bk, num_warps=GPU_WARPS if mma else EXACT_WARPS, num_stages=GPU_STAGES,
                   group=group, programs=programs, capacity=cap, seed_sample=4096 if on_gpu else 32,
                   nbr=nbr, nbc=nbc, nbands=-(-nbr // group), occupancy_pending=pending,
                   split=(4 if bn >= 128 else 1) if split is None else split,
                   # the live bucket maxima cost layout conversions and registers that push the
                   # epilogue into spills on sm_90; the sampled seed (4,096 columns x all rows)
                   # and the per-band refresh from the merged lists bound the candidates instead
                   live_bounds=not on_gpu if live_bounds is None else live_bounds)


def programs_per_sm(regs: int, num_warps: int = GPU_WARPS, shared: int = 0) -> int:
    """Programs of a compiled kernel (regs per thread, shared bytes per program) resident on one
    SM at once: registers are allocated per warp in units of 256 (8 per thread), shared memory
    per block with 1 KB reserved, at most 64 warps; at least 1, at most MAX_PROGRAMS_PER_SM."""
    per_warp = -(-max(regs, 1) // 8) * 8 * 32
    by_regs = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED // (shared + 1024) if shared else MAX_PROGRAMS_PER_SM
    return max(1, min(MAX_PROGRAMS_PER_SM, by_regs, by_shared, SM_WARPS // num_warps))


def programs_for(regs: int, sms: int, num_warps: int = GPU_WARPS, shared: int = 0) -> int:
    """Persistent programs for a compiled kernel using `regs` registers per thread and `shared`
    bytes of shared memory per program."""
    return programs_per_sm(regs, num_warps, shared) * sms


# ----------------------------------------------------------------------------------------------
# kernel variants: the compile-time switches of one launch
# ----------------------------------------------------------------------------------------------

# the candidate streams of the kernel, by index (the engine's lists of the same names); the
# kernel's stream 6 collects euclidean near-duplicates. The one definition of the list.
STREAMS = ("top", "bottom", "near", "row_top", "row_bottom", "outside_pairs")
# bins + 3 slots <= 8192 per program (underflow, bins, overflow, and a spare slot the invalid
# pairs of a tile are counted in and the host drops); more bins use global atomics
MAX_REGISTER_BINS = 8189
IN_PREC = {"exact": "ieee", "tf32": "tf32", "bf16": "", "fp16": ""}


def list_lengths(cfg) -> dict:
    """Entries of each candidate stream's list (0: stream off). top/bottom always run: they
    also give max/min."""
    return {"top": max(cfg.topk, 1), "bottom": max(cfg.bottomk, 1),
            "near": cfg.near_k if cfg.near is not None else 0,
            "row_top": cfg.row_topk, "row_bottom": cfg.row_bottomk,
            "outside_pairs": cfg.outside_limit if cfg.outside else 0}


def slab_side(plan: GpuPlan) -> int:
    """The shorter side of an epilogue slab (bm x bn / split): live-bound buckets split both."""
    return min(plan.bm, plan.block_n // plan.split)


# buckets of a global list's live bound: each list's row of the (3, GLOBAL_BUCKETS) gbuck buffer
# (the kernel's _global_stream indexes it so)
GLOBAL_BUCKETS = 64


def stream_groups(lengths: dict, bm: int, live: bool = True) -> list[int]:
    """Live-bound buckets per stream (0: none): next_pow2(k), at most one per slab row and column
    (bm: the slab's shorter side), at most GLOBAL_BUCKETS for the global lists (a slab side of 128
    had given 128 buckets: the lists' rows of gbuck overlapped, the last one ran past it)."""
    if not live:
        return [0] * 5
    out = []
    for s, name in enumerate(STREAMS[:5]):
        g = next_pow2(lengths[name]) if lengths[name] else 0
        out.append(g if g <= (bm if s >= 3 else min(bm, GLOBAL_BUCKETS)) else 0)
    return out


def hist_slots(bins: int) -> int:
    """Per-program histogram slots (power of two >= bins + 3: slot bins + 2 takes the invalid
    pairs, see kernels/triton/pairwise.py); 0: global atomics instead."""
    return next_pow2(bins + 3) if bins and bins <= MAX_REGISTER_BINS else 0


def variant(cfg, *, mode: str, plan: GpuPlan, self_mode: bool, has_valid: bool, do_stats: bool,
            streams, collect_close: bool) -> dict:
    """Keyword arguments of kernels.triton.pairwise.launch_pairwise that fix the compiled
    kernel (mode: exact/bf16/fp16/tf32; streams: 6 bools)."""
    nb = hist_slots(cfg.bins)
    return dict(metric={"cosine": 0, "dot": 1, "euclidean": 2}[cfg.metric], self_mode=self_mode,
                has_valid=has_valid, in_prec=IN_PREC[mode], do_stats=do_stats,
                nb=nb if (do_stats and cfg.bins) else 0, ghist=bool(do_stats and cfg.bins and not nb),
                has_out=bool(do_stats and cfg.outside), collect_close=bool(collect_close),
                streams=[bool(s) for s in streams],
                groups=stream_groups(list_lengths(cfg), slab_side(plan), plan.live_bounds),
                bm=plan.bm, bn=plan.block_n, bk=plan.bk, split=plan.split, num_warps=plan.num_warps, num_stages=plan.num_stages)
