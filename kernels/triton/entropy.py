"""Attention-row entropy (docs/metrics.md, attention rows): H = -sum_j p_ij ln p_ij over valid keys, nats.

One program per (b, h, block of query rows), streaming over keys in BLOCK_K chunks: every
probability is read once (bandwidth-bound by design). Padded keys count as p = 0; with
smoothing e, p' = (1 - e) p + e / n_valid on valid keys. Padded query rows are NaN.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_entropy_kernel(p_ptr, mask_ptr, nvalid_ptr, out_ptr, H, T,
                        stride_pb, stride_ph, stride_pq, stride_pk, stride_mb, stride_mt, smoothing,
                        HAS_MASK: tl.constexpr, SMOOTH: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < T
    base = p_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
    acc = tl.zeros([BLOCK_R], tl.float32)
    if SMOOTH:
        uniform = smoothing / tl.load(nvalid_ptr + b)
    for k0 in range(0, T, BLOCK_K):
        keys = k0 + tl.arange(0, BLOCK_K)
        key_ok = keys < T
        if HAS_MASK:
            key_ok = key_ok & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + keys.to(tl.int64) * stride_mt, mask=keys < T, other=0) != 0)
        p = tl.load(base + rows[:, None].to(tl.int64) * stride_pq + keys[None, :].to(tl.int64) * stride_pk,
                    mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)
        if SMOOTH:
            p = tl.where(key_ok[None, :], (1.0 - smoothing) * p + uniform, 0.0)
        acc += tl.sum(tl.where(p > 0, -p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), 1)
    q_ok = row_ok
    if HAS_MASK:
        q_ok = q_ok & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + rows.to(tl.int64) * stride_mt, mask=row_ok, other=0) != 0)
    out = tl.where(q_ok, acc, float("nan"))
    tl.store(out_ptr + bh.to(tl.int64) * T + rows, out, mask=row_ok)


def launch_entropy(attn, mask_u8, n_valid, out, smoothing, *, block_r, block_k, num_warps=4):
    """attn: (B, H, T, T) any strides; mask_u8: (B, T) uint8 or None; n_valid: (B,) float32;
    out: (B, H, T) float32 contiguous."""
    B, H, T, _ = attn.shape
    m = mask_u8 if mask_u8 is not None else n_valid
    smb, smt = (mask_u8.stride(0), mask_u8.stride(1)) if mask_u8 is not None else (0, 0)
    grid = (B * H, triton.cdiv(T, block_r))
    _row_entropy_kernel[grid](
        attn, m, n_valid, out, H, T, attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3),
        smb, smt, float(smoothing), HAS_MASK=mask_u8 is not None, SMOOTH=smoothing > 0,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
