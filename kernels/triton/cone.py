"""Cone index (docs/metrics.md, cone index): per set b, the sum of unit vectors over its valid, non-zero rows.

Grid (B, S): program (b, s) walks row blocks s, s + S, ... of sequence b, so a (1, 1e6, D)
stream still fills the GPU. Each row block is read twice (norms, then unit rows; the second
read hits L1/L2) and the program adds its (D,) float64 partial into its own slice of
part (B, S, D): no atomics, deterministic. The caller sums over S.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cone_unit_sums_kernel(x_ptr, mask_ptr, part_ptr, used_ptr, zero_ptr, T, D,
                           stride_xb, stride_xt, stride_xd, stride_mb, stride_mt,
                           HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    used = tl.zeros([BLOCK_T], tl.int32)
    zero = tl.zeros([BLOCK_T], tl.int32)
    x_b = x_ptr + b.to(tl.int64) * stride_xb
    part_b = part_ptr + (b * S + s).to(tl.int64) * D
    for t0 in range(s * BLOCK_T, T, S * BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        keep = rows < T
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + rows.to(tl.int64) * stride_mt, mask=rows < T, other=0) != 0)
        # norms in float64: no under/overflow for any finite fp32 row
        ss = tl.zeros([BLOCK_T], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            xx = tl.load(x_b + rows[:, None].to(tl.int64) * stride_xt + ds[None, :].to(tl.int64) * stride_xd,
                         mask=keep[:, None] & (ds[None, :] < D), other=0.0).to(tl.float64)
            ss += tl.sum(xx * xx, 1)
        nz = ss > 0
        inv = tl.where(keep & nz, 1.0 / tl.sqrt(tl.where(nz, ss, 1.0)), 0.0)
        used += (keep & nz).to(tl.int32)
        zero += (keep & (ss == 0)).to(tl.int32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dm = ds < D
            xx = tl.load(x_b + rows[:, None].to(tl.int64) * stride_xt + ds[None, :].to(tl.int64) * stride_xd,
                         mask=keep[:, None] & dm[None, :], other=0.0).to(tl.float64)
            add = tl.sum(xx * inv[:, None], 0)
            prev = tl.load(part_b + ds, mask=dm, other=0.0)
            tl.store(part_b + ds, prev + add, mask=dm)
    tl.store(used_ptr + b * S + s, tl.sum(used, 0).to(tl.int64))
    tl.store(zero_ptr + b * S + s, tl.sum(zero, 0).to(tl.int64))


def launch_cone(x, mask_u8, part, used, zero, *, block_t, block_d, num_warps=4):
    """x: (B, T, D) any strides; mask_u8: (B, T) uint8 or None; part: (B, S, D) float64 zeros;
    used/zero: (B, S) int64."""
    B, T, D = x.shape
    S = part.shape[1]
    m = mask_u8 if mask_u8 is not None else used
    smb, smt = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    _cone_unit_sums_kernel[(B, S)](
        x, m, part, used, zero, T, D, x.stride(0), x.stride(1), x.stride(2), smb, smt,
        HAS_MASK=mask_u8 is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
