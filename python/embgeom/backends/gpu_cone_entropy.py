"""The Triton launchers of the text kernels: the cone index's unit-vector sums and the attention
rows' entropy (kernels/triton/cone.py, entropy.py). Registered by backends/triton.py."""
from __future__ import annotations

import torch

from .gpu_plan import next_pow2


def triton_cone_unit_sums(x: torch.Tensor, mask: torch.Tensor | None):
    """x: (B, T, D), mask: (B, T) | None -> sums (B, D) f64, used (B,) i64, zero (B,) i64."""
    B, T, D = x.shape
    dev = x.device
    if x.numel() == 0:
        from .torch import torch_cone_unit_sums

        return torch_cone_unit_sums(x, mask)
    from embgeom.kernels.triton import cone  # imports triton: only when a launch runs

    on_gpu = dev.type == "cuda"
    block_t = 16
    block_d = min(128, next_pow2(D)) if on_gpu else min(1024, next_pow2(D))
    blocks = -(-T // block_t)
    # enough programs to fill the GPU: the T blocks of each row split over S partial sums
    target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if on_gpu else 2
    S = max(1, min(blocks, -(-target // B)))
    part = torch.zeros(B, S, D, dtype=torch.float64, device=dev)
    used = torch.zeros(B, S, dtype=torch.int64, device=dev)
    zero = torch.zeros(B, S, dtype=torch.int64, device=dev)
    mask_u8 = None if mask is None else mask.to(torch.uint8)
    cone.launch_cone(x, mask_u8, part, used, zero, block_t=block_t, block_d=block_d)
    return part.sum(1), used.sum(1), zero.sum(1)


def triton_row_entropy(attn: torch.Tensor, mask: torch.Tensor | None, smoothing: float = 0.0):
    """attn: (B, H, T, T) -> (B, H, T) float32 nats, NaN on padded query rows."""
    B, H, T, _ = attn.shape
    dev = attn.device
    out = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    from embgeom.kernels.triton import entropy  # imports triton: only when a launch runs

    if mask is not None:
        n_valid = mask.sum(1).clamp(min=1).to(torch.float32)
        mask_u8 = mask.to(torch.uint8)
    else:
        n_valid = torch.full((B,), float(T), dtype=torch.float32, device=dev)
        mask_u8 = None
    on_gpu = dev.type == "cuda"
    block_k = min(128 if on_gpu else 1024, next_pow2(T))
    block_r = 16 if on_gpu else min(64, next_pow2(T))
    entropy.launch_entropy(attn, mask_u8, n_valid, out, smoothing, block_r=block_r, block_k=block_k)
    return out
