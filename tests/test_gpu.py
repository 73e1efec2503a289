"""GPU backends (`triton`, `cuda`) on a real device: realistic shapes against the float64
reference and the chunked torch engine on the same GPU, peak memory, the CUDA merge kernel.

Every test skips with "no usable CUDA device" where torch.cuda.is_available() is False (asked
at run time, not at collection).
"""
from __future__ import annotations

import math

import pytest
import torch

import embgeom
from embgeom import reference
from embgeom.backends import registry

from helpers import check_stats, make_embeddings

pytestmark = pytest.mark.gpu

ALL_OUTPUTS = dict(bins=2000, topk=10, bottomk=10, near=0.0, near_k=10, row_topk=10, row_bottomk=3,
                   outside=(-0.2, 0.2), outside_limit=100)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no usable CUDA device")
    if registry.triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: GPU tests need compiled Triton")
    return torch.device("cuda")


def _usable(backend, x):
    why = registry.BACKENDS[backend].reasons("pairwise_stats", x)
    if why:
        pytest.skip(f"{backend}: " + "; ".join(why))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cross_mode_tokens_by_positions(cuda, backend):
    x = make_embeddings(2000, 256, zero_rows=2, seed=1, device=cuda)
    y = make_embeddings(512, 256, zero_rows=1, seed=2, device=cuda)
    registry.ensure_registered()
    _usable(backend, x)
    got = embgeom.pairwise_stats(x, y, backend=backend, **ALL_OUTPUTS)
    want = check_stats(got, x.cpu(), y.cpu(),
                       **{**ALL_OUTPUTS, "range": (-1.0, 1.0)})
    assert got.excluded_cols == want["excluded_cols"]


@pytest.mark.parametrize("fast_dtype", ["bf16", "tf32"])
def test_fast_precision_lists_exact(cuda, fast_dtype):
    from embgeom.backends import triton as triton_backend
    from embgeom.engine.config import PairwiseConfig
    from embgeom.engine.runner import run_engine

    n, d = 1200, 768
    x = make_embeddings(n, d, zero_rows=1, duplicate_rows=2, seed=3, device=cuda)
    cfg = PairwiseConfig(**{k: v for k, v in ALL_OUTPUTS.items() if k != "outside"}, precision="fast")
    eng = triton_backend.TritonEngine(x, None, cfg, fast_dtype=fast_dtype)
    got = run_engine(eng).finalize(cfg, d=d, backend="triton", device=x.device, seconds=0.0)
    assert 0 < got.hist.error_bound < 0.05
    check_stats(got, x.cpu(), **{k: v for k, v in ALL_OUTPUTS.items() if k != "outside"}, range=(-1.0, 1.0))


def test_large_against_torch_engine_and_memory(cuda):
    """n = 60,000: triton vs the chunked torch engine on the same GPU; the N x N fp32 matrix
    (14.4 GB) never exists."""
    n, d = 60_000, 128
    x = make_embeddings(n, d, zero_rows=4, duplicate_rows=2, seed=5, device=cuda)
    opts = dict(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2), outside_limit=50)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = embgeom.pairwise_stats(x, backend="triton", **opts)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < n * n * 4 / 20, f"peak {peak / 2**20:.0f} MiB"
    ref = embgeom.pairwise_stats(x, backend="torch", block=4096, **opts)
    assert got.count == ref.count
    assert got.excluded_rows == ref.excluded_rows
    assert abs(got.mean - ref.mean) < 1e-6 and abs(got.std - ref.std) < 1e-6
    # fp32 accumulation order differs: only values within rounding of a bin edge may move
    moved = (got.hist.counts - ref.hist.counts).abs().sum().item()
    assert moved <= 1e-5 * ref.count + 10
    assert abs(got.outside.count - ref.outside.count) <= 1e-5 * ref.count + 10
    for a, b in ((got.top_pairs, ref.top_pairs), (got.bottom_pairs, ref.bottom_pairs)):
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    agree = (got.row_topk.indices == ref.row_topk.indices).float().mean().item()
    assert agree > 0.999
    pairs = list(zip(got.outside.pairs.i.tolist(), got.outside.pairs.j.tolist()))
    assert pairs == sorted(pairs) and len(pairs) == 50


def test_auto_dispatch_on_cuda_tensors(cuda):
    x = make_embeddings(300, 32, device=cuda)
    got = embgeom.pairwise_stats(x, bins=10, topk=2)
    # registry.FAILED_ON_DEVICE: auto passes over the GPU kernels until a GPU check passes
    want = ("torch",) if ("triton", "pairwise_stats") in registry.FAILED_ON_DEVICE else ("cuda", "triton")
    assert got.backend in want
    assert got.hist.counts.device.type == "cuda"
    assert embgeom.cone_index(x[None]).backend == "triton"


def test_cuda_row_topk_merge_kernel(cuda):
    from embgeom.engine.lists import merge_rows

    ext = registry.cuda_ext()
    if ext is None or not hasattr(ext, "row_topk_merge"):
        pytest.skip(registry.import_reason("embgeom._cuda"))
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k, c = 500, 7, 4000
    for largest in (True, False):
        vals = torch.full((n, k), math.nan)
        idx = torch.full((n, k), -1, dtype=torch.int64)
        rows = torch.randint(0, n, (c,), generator=g)
        cols = torch.randperm(n * 50, generator=g)[:c]  # unique (row, col) pairs
        cv = torch.randint(-5, 5, (c,), generator=g).float() / 4  # many ties
        order = torch.argsort(rows, stable=True)
        rows, cols, cv = rows[order], cols[order], cv[order]
        # expected: torch merge per row
        want_v, want_i = vals.clone(), idx.clone()
        for r in rows.unique().tolist():
            sel = rows == r
            dv = torch.full((1, int(sel.sum())), math.nan)
            dv[0] = cv[sel]
            mv, mi = merge_rows((want_v[r:r + 1], want_i[r:r + 1]), (dv, cols[sel][None]), k, largest)
            want_v[r], want_i[r] = mv[0].float(), mi[0]
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(counts, 0)
        dv_, di_ = vals.to(cuda).contiguous(), idx.to(cuda).contiguous()
        tensors = [t.to(cuda).contiguous() for t in (uniq, starts, cv, cols)]
        ext.row_topk_merge(dv_.data_ptr(), di_.data_ptr(), n, k, tensors[0].data_ptr(), tensors[1].data_ptr(),
                           uniq.numel(), tensors[2].data_ptr(), tensors[3].data_ptr(), largest,
                           torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert torch.equal(di_.cpu(), want_i)
        torch.testing.assert_close(dv_.cpu(), want_v, equal_nan=True)


def test_cone_index_realistic(cuda):
    B, T, D = 64, 512, 768
    x = make_embeddings(B * T, D, seed=6, device=cuda).reshape(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool, device=cuda)
    mask[1, 100:] = False
    mask[2] = False
    x[0, 3] = 0
    got = embgeom.cone_index(x, mask, backend="triton")
    want = embgeom.cone_index(x, mask, backend="torch")
    assert got.n.tolist() == want.n.tolist() and got.zero_rows.tolist() == want.zero_rows.tolist()
    torch.testing.assert_close(got.index.double(), want.index.double(), atol=1e-6 * T, rtol=1e-6)
    small = reference.cone_index(x[:4].cpu().double(), mask[:4].cpu())
    torch.testing.assert_close(got.index[:4].cpu().double(), small["index"], atol=1e-6 * T, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_attention_entropy_realistic(cuda, dtype, smoothing):
    B, H, T = 8, 12, 512
    g = torch.Generator(device="cpu").manual_seed(7)
    scores = torch.randn(B, H, T, T, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 300:] = False
    mask[2, 1:] = False
    p = torch.softmax(scores.masked_fill(~mask[:, None, None, :], -math.inf), -1).to(cuda, dtype)
    mask = mask.to(cuda)
    got = embgeom.attention_entropy(p, mask, smoothing=smoothing, backend="triton")
    want = embgeom.attention_entropy(p, mask, smoothing=smoothing, backend="torch")
    torch.testing.assert_close(got.row_entropy, want.row_entropy, atol=2e-5 * math.log(T), rtol=1e-5, equal_nan=True)
