"""Triton kernels under the CPU interpreter: `TRITON_INTERPRET=1 pytest -m triton_interp`.

Tiny shapes (the interpreter is slow); every output against the float64 reference with the
tolerance-aware checks of helpers.py. Ties on small-integer inputs are exact and must break by
(i, j). Candidate-buffer overflow, multi-band schedules and checkpoint resume are forced with
small capacities and bands.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.triton_interp

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

import embgeom  # noqa: E402
from embgeom import reference  # noqa: E402
from embgeom.backends import cuda as cuda_backend, triton as triton_backend  # noqa: E402
from embgeom.engine.config import PairwiseConfig  # noqa: E402
from embgeom.engine.runner import run_engine  # noqa: E402

from helpers import assert_engine_states_equal, check_stats, make_embeddings, small_int_embeddings  # noqa: E402

ALL_OUTPUTS = dict(bins=50, topk=5, bottomk=5, near=0.0, near_k=4, row_topk=3, row_bottomk=2,
                   outside=(-0.2, 0.2), outside_limit=7)


def _engine_stats(x, y=None, *, engine_kw=None, **opts):
    """Run TritonEngine directly (to shrink bands/capacity) and finalize like the API does."""
    cfg = PairwiseConfig(**opts)
    eng = triton_backend.TritonEngine(x, y, cfg, **(engine_kw or {}))
    state = run_engine(eng)
    return state.finalize(cfg, d=x.shape[1],
                    backend="triton", device=x.device, seconds=0.0), eng


def _cfg_opts(opts, rng=(-1.0, 1.0)):
    out = {k: v for k, v in opts.items() if k != "range"}
    out["lo"], out["hi"] = rng
    return out


def test_histogram_edges_match_float64_definition():
    # values exactly on bin edges and at hi: the fp32 estimate + edge correction must agree with
    # floor((v - lo) * bins / (hi - lo)) in float64, hi in the last bin
    x = torch.tensor([[0.0, 1.0], [0.25, 1.0], [0.5, 1.0], [1.0, 1.0], [-1.0, 1.0], [3.0, 1.0]])
    got = embgeom.pairwise_stats(x, metric="dot", bins=8, range=(-1.0, 2.0), backend="triton",
                                 topk=0, bottomk=0)
    want = reference.pairwise_stats(x, metric="dot", bins=8, range=(-1.0, 2.0), topk=0, bottomk=0)
    assert got.hist.counts.tolist() == want["hist"]["counts"].tolist()
    assert (got.hist.underflow, got.hist.overflow) == (want["hist"]["underflow"], want["hist"]["overflow"])
    # more bins than the register histogram holds: the global-atomics path, same bins
    x2 = make_embeddings(30, 6, seed=12)
    got2 = embgeom.pairwise_stats(x2, metric="dot", bins=9000, range=(-8.0, 8.0), backend="triton", block=16)
    want2 = reference.pairwise_stats(x2, metric="dot", bins=9000, range=(-8.0, 8.0))
    assert got2.hist.counts.tolist() == want2["hist"]["counts"].tolist()
    edges = triton_backend.hist_edges(-1.0, 1.0, 2000)
    scale = 2000 / 2.0
    inner = edges[1:-1].double()
    b = torch.arange(1, 2000, dtype=torch.float64)
    assert bool((torch.floor((inner + 1.0) * scale) >= b).all())
    below = torch.nextafter(edges[1:-1], torch.tensor(-math.inf)).double()
    assert bool((torch.floor((below + 1.0) * scale) < b).all())


@pytest.mark.parametrize("metric,rng,outside", [("dot", (-4.0, 4.0), (-1.0, 1.0)),
                                                ("euclidean", (0.0, 4.0), (0.5, 2.0))])
def test_candidate_overflow_retries_and_multiband(metric, rng, outside):
    # capacity at its floor, one block-row per band, one program: every stream overflows and
    # must retry (raised threshold, or a larger buffer when ties block progress); 27 distinct
    # rows among 70 also overflow the euclidean near-duplicate stream
    x = small_int_embeddings(70, 3, seed=7, low=-1, high=2)
    opts = dict(ALL_OUTPUTS, outside=outside, outside_limit=9, near=1.0)
    got, eng = _engine_stats(x, engine_kw=dict(block=16, group=1, programs=1, capacity=1),
                             metric=metric, **_cfg_opts(opts, rng))
    assert eng.nbands == 5 and eng.cap > 78
    check_stats(got, x, exact_ties=True, metric=metric, range=rng, **opts)


def test_tiling_invariance():
    x = small_int_embeddings(61, 7, seed=5)
    opts = dict(ALL_OUTPUTS, outside=(-3.0, 3.0))
    results = []
    for kw in (dict(block=16, group=1, programs=3), dict(block=32, group=2, programs=1), dict(block=64)):
        got, _ = _engine_stats(x, engine_kw=kw, metric="dot", **_cfg_opts(opts, (-20.0, 20.0)))
        d = got.to_dict()
        d.pop("seconds")
        results.append(d)
    for r in results[1:]:
        assert r == results[0]


@pytest.mark.parametrize("fast_dtype", ["bf16", "fp16", "tf32"])
def test_fast_precision_rescored_lists(fast_dtype):
    n, d = 48, 32
    x = make_embeddings(n, d, zero_rows=1, duplicate_rows=2, seed=11)
    opts = dict(ALL_OUTPUTS, outside=None)
    got, eng = _engine_stats(x, engine_kw=dict(fast_dtype=fast_dtype, block=16),
                             precision="fast", **_cfg_opts(opts))
    bound = got.hist.error_bound
    assert bound > 0 and bound == eng.eps
    # ranked outputs rescored exactly (exact-mode allowances); moments and histogram within the bound
    check_stats(got, x, **{**opts, "range": (-1.0, 1.0)})


def test_checkpoint_resume_equals_full_run():
    x = make_embeddings(50, 12, zero_rows=1, duplicate_rows=1, seed=9)
    cfg = PairwiseConfig(**_cfg_opts(ALL_OUTPUTS))
    kw = dict(block=16, group=1)
    full = triton_backend.TritonEngine(x, None, cfg, **kw)
    full.run(0, full.num_tiles())
    first = triton_backend.TritonEngine(x, None, cfg, **kw)
    first.run(0, 2)
    saved = first.state()
    resumed = triton_backend.TritonEngine(x, None, cfg, **kw)
    resumed.load_state(saved)
    resumed.run(2, resumed.num_tiles())
    assert_engine_states_equal(full.state(), resumed.state())
    assert full.tile_pairs(0, full.num_tiles()) == 50 * 49 // 2


def test_api_checkpoint_file(tmp_path):
    x = make_embeddings(40, 8, seed=4)
    path = str(tmp_path / "ck.bin")
    a = embgeom.pairwise_stats(x, backend="triton", block=16, checkpoint=path, bins=20, topk=3).to_dict()
    b = embgeom.pairwise_stats(x, backend="triton", block=16, checkpoint=path, bins=20, topk=3).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from embgeom.kernels.triton import cone, entropy, pairwise

def compile_(fn, types, consts, num_warps):
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 3})

p = {a: "*fp32" for a in pairwise._pairwise_stats_kernel.arg_names if a.endswith("_ptr")}
p.update(x_desc="tensordesc<bf16[64,64]>", y_desc="tensordesc<bf16[64,64]>", xv_ptr="*u8", yv_ptr="*u8",
         part_cnt_ptr="*i64", part_out_ptr="*i64", out_rows_ptr="*i64", out_cols_ptr="*i64",
         part_sum_ptr="*fp64", part_sq_ptr="*fp64", hist_ptr="*i32", cnt_ptr="*i32", ci_ptr="*i32",
         cj_ptr="*i32", lo_f="fp32", hi_f="fp32", scale_f="fp32", out_a="fp32", out_b="fp32", near="fp32",
         margin="fp32", near_margin="fp32")
full = dict(METRIC=0, SELF=True, HAS_VALID=True, IN_PREC="", DO_STATS=True, NB=2048, GHIST=False,
            HAS_OUT=True, COLLECT_CLOSE=False, TOP=True, BOT=True, NEAR=True, RTOP=True, RBOT=True,
            OUTL=True, G_TOP=16, G_BOT=16, G_NEAR=16, G_RTOP=16, G_RBOT=4, BM=64, BN=64, BK=64, UPCAST=False)
k = compile_(pairwise._pairwise_stats_kernel, p, full, 8)
assert "wgmma" in k.asm["ptx"], "no tensor-core MMA in the PTX"
c = {a: "i32" for a in cone._cone_unit_sums_kernel.arg_names}
c.update(x_ptr="*bf16", mask_ptr="*u8", part_ptr="*fp64", used_ptr="*i64", zero_ptr="*i64")
compile_(cone._cone_unit_sums_kernel, c, dict(HAS_MASK=True, BLOCK_T=16, BLOCK_D=128), 4)
e = {a: "i32" for a in entropy._row_entropy_kernel.arg_names}
e.update(p_ptr="*fp32", mask_ptr="*u8", nvalid_ptr="*fp32", out_ptr="*fp32", smoothing="fp32")
compile_(entropy._row_entropy_kernel, e, dict(HAS_MASK=True, SMOOTH=True, BLOCK_R=16, BLOCK_K=128), 4)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs Python, not the compiler: build the kernels for an H100 (sm_90a, PTX
    and ptxas) without a GPU, in a subprocess without TRITON_INTERPRET, so front-end and
    lowering errors show up on CPU-only machines."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


def _host_row_topk_merge(vals, idx, n_rows, k, seg_rows, seg_start, num_segs, cand_v, cand_j, largest, stream):
    """Host mirror of kernels/cuda/topk_merge.cu (same pointer interface, CPU memory)."""
    import ctypes

    def arr(ptr, ctype, count):
        return np.ctypeslib.as_array((ctype * count).from_address(ptr))

    V, I = arr(vals, ctypes.c_float, n_rows * k).reshape(n_rows, k), arr(idx, ctypes.c_int64, n_rows * k).reshape(n_rows, k)
    rows, starts = arr(seg_rows, ctypes.c_int64, num_segs), arr(seg_start, ctypes.c_int64, num_segs + 1)
    total = int(starts[-1]) if num_segs else 0
    cv, cj = arr(cand_v, ctypes.c_float, total), arr(cand_j, ctypes.c_int64, total)

    def before(va, ia, vb, ib):
        if ia < 0:
            return False
        if ib < 0:
            return True
        if va != vb:
            return va > vb if largest else va < vb
        return ia < ib

    for s in range(num_segs):
        v, ix = V[rows[s]], I[rows[s]]
        for c in range(starts[s], starts[s + 1]):
            if not before(cv[c], cj[c], v[k - 1], ix[k - 1]):
                continue
            p = k - 1
            while p > 0 and before(cv[c], cj[c], v[p - 1], ix[p - 1]):
                v[p], ix[p] = v[p - 1], ix[p - 1]
                p -= 1
            v[p], ix[p] = cv[c], cj[c]


def test_cuda_engine_merge_glue(monkeypatch):
    # the cuda backend's Python side (row segments, dtypes, pointers) against the triton engine,
    # with a host mirror of the CUDA merge kernel standing in for embgeom._cuda
    from types import SimpleNamespace

    monkeypatch.setattr(cuda_backend, "cuda_ext", lambda: SimpleNamespace(row_topk_merge=_host_row_topk_merge))
    x = small_int_embeddings(50, 4, seed=13)
    opts = dict(bins=0, topk=3, bottomk=0, row_topk=4, row_bottomk=3)
    cfg = PairwiseConfig(metric="dot", **opts)
    states = []
    for cls in (triton_backend.TritonEngine, cuda_backend.CudaEngine):
        eng = cls(x, None, cfg, block=16, group=1, capacity=1)
        states.append(run_engine(eng))
    assert_engine_states_equal(states[0], states[1])
    got = states[1].finalize(cfg, d=4, backend="cuda", device=x.device, seconds=0.0)
    check_stats(got, x, exact_ties=True, metric="dot", **opts)


def test_near_duplicate_stream_growth_keeps_other_streams_exact():
    # many exact duplicates (d = 1): the near-duplicate stream outgrows the buffers while other
    # streams overflowed at the old size; both must be redone, never read past what was stored
    x = small_int_embeddings(50, 1, seed=3, low=-1, high=2)
    opts = dict(bins=7, topk=0, bottomk=0, row_topk=1, row_bottomk=2, outside=(0.5, 2.0), outside_limit=1)
    got, _ = _engine_stats(x, engine_kw=dict(block=16, group=2, programs=3, capacity=1),
                           metric="euclidean", **_cfg_opts(opts, (0.0, 5.0)))
    check_stats(got, x, exact_ties=True, metric="euclidean", range=(0.0, 5.0), **opts)
