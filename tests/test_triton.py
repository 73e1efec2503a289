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
from embgeom.backends import cuda as cuda_backend, gpu_thresholds, triton as triton_backend  # noqa: E402
from embgeom.engine.config import PairwiseConfig  # noqa: E402
from embgeom.engine.runner import run_engine  # noqa: E402
from embgeom.kernels.triton import pairwise as pairwise_kernels  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

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
    edges = gpu_thresholds.hist_edges(-1.0, 1.0, 2000)
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


@pytest.mark.parametrize("cross", [False, True])
def test_ties_at_the_kth_value_are_cut_by_index(cross):
    """Sixty copies of one row: 1,770 pairs (3,600 in cross mode) tie at cosine 1. Exact mode cuts
    ties past the k-th pair in the list's order in the kernel: the top list's buffer keeps its
    first size (it had grown until every tied pair fitted), and with row lists it holds what the
    lists need (each copy's 3 nearest are the first copies: about 3 pairs a copy), not every
    tied pair. The lists are the reference's, ties by (i, j) and by column."""
    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.standard_normal((1, 8)).astype(np.float32))
    x = torch.cat([base.repeat(60, 1), torch.from_numpy(rng.standard_normal((10, 8)).astype(np.float32))])
    y = x.flip(0).contiguous() if cross else None
    for opts, most in ((dict(bins=20, topk=5, bottomk=3), 1), (dict(bins=0, topk=0, bottomk=0, row_topk=3), 8)):
        cfg = PairwiseConfig(metric="cosine", **_cfg_opts(opts))
        eng = triton_backend.TritonEngine(x, y, cfg, block=16, group=1, programs=1, capacity=64)
        first = eng.cap
        got = run_engine(eng).finalize(cfg, d=8, backend="triton", device=x.device, seconds=0.0)
        assert eng.cap <= most * first, (opts, first, eng.cap)
        check_stats(got, x, y, exact_ties=True, metric="cosine", **opts)  # (cosine: range (-1, 1))


def test_tiling_invariance():
    x = small_int_embeddings(61, 7, seed=5)
    opts = dict(ALL_OUTPUTS, outside=(-3.0, 3.0))
    results = []
    # square tiles and the GPU's shape (bn = 2 bm, 4 bm: the self-mode walk starts each band at
    # band_row0 * bm // bn; live bounds bucket rows and columns of non-square slabs)
    for kw in (dict(block=16, group=1, programs=3), dict(block=32, group=2, programs=1), dict(block=64),
               dict(block=16, block_n=32, group=3, programs=2), dict(block=16, block_n=64, group=1, split=2)):
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


def test_bf16_inputs_past_its_largest_saturate():
    # a value past bf16's largest finite one (3.3961e38) had been inf in the product's input (and
    # in the threshold seeds' products): NaN products beside tiny columns, an inf bound; it
    # saturates (numerics.saturated), a finite rounding the bound covers
    x = torch.zeros(20, 8)
    x[torch.arange(20), torch.arange(20) % 8] = 3.4e38
    y = torch.full((24, 8), 1.5e-38)
    eng = triton_backend.TritonEngine(x, y, PairwiseConfig(metric="dot", precision="fast", lo=-40.0, hi=40.0),
                                      fast_dtype="bf16", block=16)
    assert torch.isfinite(eng.xin.float()).all() and math.isfinite(eng.eps)
    assert float(eng.xin.float().max()) == float(torch.finfo(torch.bfloat16).max)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_rows_whose_float32_norms_overflow_or_underflow_keep_their_lists(precision):
    # rows of norm 1e30 beside rows of norm 1e-30 (legal under dot: their products are near 1):
    # their float32 norms had been inf and 0, the seeds' margin inf * 0 = NaN, every threshold
    # NaN, and no pair passed the candidate filter (empty top lists, rows padded)
    big = 1e30
    x = torch.tensor([[big, 0.0], [-big, 0.0], [big / 2, big / 3]])
    y = torch.tensor([[1 / big, 0.0], [2 / big, 1 / big], [0.0, 1.5 / big], [-0.5 / big, 0.5 / big]])
    opts = dict(metric="dot", bins=4, range=(-20.0, 20.0), topk=3, bottomk=3, row_topk=2, row_bottomk=2)
    got = embgeom.pairwise_stats(x, y, backend="triton", precision=precision, **opts)
    want = embgeom.pairwise_stats(x, y, backend="cpp", precision="exact", **opts)
    for pairs in ("top_pairs", "bottom_pairs"):
        a, b = getattr(got, pairs), getattr(want, pairs)
        assert a.i.tolist() == b.i.tolist() and a.j.tolist() == b.j.tolist() and a.values.tolist() == b.values.tolist()
    for rows in ("row_topk", "row_bottomk"):
        a, b = getattr(got, rows), getattr(want, rows)
        assert a.indices.tolist() == b.indices.tolist() and a.values.tolist() == b.values.tolist()
    assert got.hist.counts.tolist() == want.hist.counts.tolist()
    assert abs(got.mean - want.mean) <= got.error_bound + 1e-6  # (fast: bf16 products, within the bound)


@pytest.mark.parametrize("delta, b", [(-2.0 ** -10, 0.9995), (2.0 ** -10, 1.0005)])
def test_fast_outside_list_holds_the_exact_outside_pairs(delta, b):
    """Fast mode's outside list: pairs taken within the products' error of a or b, rescored,
    kept where the exact value is outside (the bf16 value had decided: 0.9990234375 listed as
    outside (-5, 0.9995), 1.0009765625 left out of (-5, 1.0005)). Counts stay within M (docs)."""
    x = torch.tensor([[1.0 + delta, 0.0]])
    y = torch.tensor([[1.0, 0.0]])
    want = [[0, 0, 1.0 + delta]] if 1.0 + delta > b else []
    for precision in ("exact", "fast"):
        s = embgeom.pairwise_stats(x, y, metric="dot", range=(-2.0, 2.0), outside=(-5.0, b), backend="triton",
                                   precision=precision)
        assert s.outside.pairs.to_list() == want, precision


@pytest.mark.parametrize("fast_dtype", ["bf16", "tf32"])
def test_fast_outside_list_cut_counts_exactly_outside_pairs(fast_dtype):
    """A full outside buffer in fast mode holds pairs within the products' error of b too (here
    70 values exactly b): the list's cut at the k-th buffered pair had ended it before the 10
    pairs that are outside, and it came back empty. The cut counts the exactly outside ones."""
    x = torch.tensor([[1.0]])
    y = torch.tensor([10.0] * 70 + [11.0] * 10)[:, None]
    opts = dict(metric="dot", bins=0, topk=1, bottomk=1, outside=(-10.0, 10.0), outside_limit=2)
    want = [[0, 70, 11.0], [0, 71, 11.0]]
    for precision in ("exact", "fast"):
        got, _ = _engine_stats(x, y, engine_kw=dict(capacity=1, fast_dtype=fast_dtype),
                               precision=precision, **_cfg_opts(opts, (-20.0, 20.0)))
        assert got.outside.count == 10 and got.outside.truncated, precision
        assert got.outside.pairs.to_list() == want, precision


def test_moments_subtract_the_shift_in_float64():
    """Values far from the shift's size (every bin edge of (-3, 5) and the fp32 values either
    side, against y = 1: the shift is 1): v - shift in fp32 had rounded (-3.0000002 - 1 = -4) and
    the mean came out 1.0000000155 where every other engine gives 1.0000000088."""
    edges = torch.linspace(-3.0, 5.0, 9)
    vals = torch.cat([torch.nextafter(edges, torch.tensor(-math.inf)), edges,
                      torch.nextafter(edges, torch.tensor(math.inf))])
    x, y = vals[:, None], torch.tensor([[1.0]])
    got = embgeom.pairwise_stats(x, y, metric="dot", bins=8, range=(-3.0, 5.0), backend="triton")
    want = reference.pairwise_stats(x, y, metric="dot", bins=8, range=(-3.0, 5.0))
    assert got.mean == pytest.approx(want["mean"], rel=1e-15)
    assert got.std == pytest.approx(want["std"], rel=1e-14)


def test_global_live_bound_buckets_fit_their_buffer():
    """A slab side of 128 with topk 100 had asked for 128 buckets per global list in a buffer of
    64 per list: the lists' buckets overlapped and the last ran past the buffer."""
    from embgeom.backends.gpu_plan import GLOBAL_BUCKETS, stream_groups

    lengths = dict(top=100, bottom=100, near=100, row_top=100, row_bottom=100)
    assert stream_groups(lengths, 128) == [0, 0, 0, 128, 128]
    assert stream_groups(lengths, 64) == [0, 0, 0, 0, 0]
    assert stream_groups(dict(lengths, top=40), 128)[0] == GLOBAL_BUCKETS


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

p = pairwise.signature("tensordesc<bf16[64,64]>", "tensordesc<bf16[128,64]>")
full = pairwise.constexprs(metric=0, self_mode=True, has_valid=True, in_prec="", do_stats=True, nb=2048, ghist=False,
                           has_out=True, collect_close=False, streams=[True] * 6, groups=[16, 16, 16, 0, 0],
                           bm=64, bk=64, upcast=False, split=4, bn=128)
k = compile_(pairwise._pairwise_stats_kernel, p, full, 4)
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


@triton.jit
def _append_probe_kernel(cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap):
    rows = tl.arange(0, 4)
    cols = tl.arange(0, 8)
    m = ((rows[:, None] + cols[None, :]) % 2) == 0
    v = (rows[:, None] * 8 + cols[None, :]).to(tl.float32)
    pairwise_kernels._append(m, v, rows, cols, 1, cnt_ptr, cv_ptr, ci_ptr, cj_ptr, cap, False)


def test_candidate_counts_are_64_bit():
    # a band's appends can pass 2^31: an int32 counter would wrap negative, `off < cap` would
    # hold and stores would land before the buffer (and a wrap hides the overflow from the
    # retry). The int32 append counter stops taking appends at cap; the int64 drop counter
    # counts the rest, and the engine reads their sum.
    cap = 8
    buf = torch.zeros(22, dtype=torch.int32)
    cnt, dropped = buf[:7], buf[8:22].view(torch.int64)
    cv = torch.full((2, cap), -1.0)
    ci = torch.full((2, cap), -1, dtype=torch.int32)
    cj = torch.full((2, cap), -1, dtype=torch.int32)
    cnt[1] = cap - 3  # room for 3: the first 3 of 16 pairs are stored, the counter sees 16
    _append_probe_kernel[(1,)](buf, cv, ci, cj, cap)
    assert int(cnt[1]) == cap - 3 + 16 and int(dropped[1]) == 0
    assert bool((cv[1, cap - 3:] >= 0).all()) and bool((ci[1, cap - 3:] >= 0).all())
    assert bool((cv[1, :cap - 3] == -1).all()) and bool((cv[0] == -1).all())
    dropped[1] = 2 ** 40  # the stream is full: the next tile only counts, in int64
    _append_probe_kernel[(1,)](buf, cv, ci, cj, cap)
    assert int(cnt[1]) == cap - 3 + 16 and int(dropped[1]) == 2 ** 40 + 16
    assert int(cnt[0]) == 0 and int(dropped[0]) == 0 and int(dropped[2]) == 0
    eng = triton_backend.TritonEngine(torch.randn(5, 4), None, PairwiseConfig(row_topk=2))
    eng.cnt[1], eng.dropped[1] = 2 ** 31 - 1, 2 ** 33
    assert eng._counts()[1] == 2 ** 31 - 1 + 2 ** 33


def test_occupancy_change_keeps_first_band_statistics(monkeypatch):
    # the compiled kernel's registers (stubbed: 96 -> 2 programs per SM) change the program
    # count after the first launch; the per-program partial sums of that band must be reduced
    # before the buffers are replaced
    from types import SimpleNamespace

    from embgeom.kernels.triton import pairwise

    real = pairwise.launch_pairwise
    grids = []

    def stub(grid, *a, **kw):
        grids.append(grid)
        real(grid, *a, **kw)
        return SimpleNamespace(n_regs=96)

    monkeypatch.setattr(pairwise, "launch_pairwise", stub)
    x = small_int_embeddings(70, 5, seed=2)
    opts = dict(bins=9, topk=3, bottomk=2, outside=(-2.0, 2.0), outside_limit=5)
    cfg = PairwiseConfig(metric="dot", lo=-12.0, hi=12.0, **opts)
    eng = triton_backend.TritonEngine(x, None, cfg, block=16, group=1, programs=2)
    eng._occupancy_pending, eng.sms = True, 3  # as on a 3-SM GPU
    st = run_engine(eng)
    assert eng.programs == 6 and grids[0] == 2 and max(grids) > 2
    assert st.count == 70 * 69 // 2 and int(st.hist.sum()) == 70 * 69 // 2
    got = st.finalize(cfg, d=5, backend="triton", device=x.device, seconds=0.0)
    check_stats(got, x, exact_ties=True, metric="dot", range=(-12.0, 12.0), **opts)


@pytest.mark.parametrize("metric,rng,outside", [("dot", (-4.0, 4.0), (-1.0, 1.0)),
                                                ("euclidean", (0.0, 4.0), (0.5, 2.0))])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("bm,bn", [(32, 32), (16, 32)])
def test_gpu_configuration_slabs_without_live_bounds(metric, rng, outside, cross, bm, bn):
    # what the GPU plan launches: a tile of bm x 2 bm (64 x 128 there), the epilogue on 4 slabs
    # per tile (tl.split) and no live bucket maxima; tiny capacity forces every stream through
    # its retries
    x = small_int_embeddings(70, 3, seed=7, low=-1, high=2)
    y = small_int_embeddings(45, 3, seed=8, low=-1, high=2) if cross else None
    opts = dict(ALL_OUTPUTS, outside=outside, outside_limit=9, near=1.0)
    got, eng = _engine_stats(x, y, engine_kw=dict(block=bm, block_n=bn, group=1, programs=2, capacity=1, split=4,
                                                  live_bounds=False),
                             metric=metric, **_cfg_opts(opts, rng))
    assert eng.plan.split == 4 and eng.groups == [0] * 5 and eng.cap > 78 and (eng.bm, eng.bn) == (bm, bn)
    check_stats(got, x, y, exact_ties=True, metric=metric, range=rng, **opts)


@pytest.mark.parametrize("bn", [16, 32])
def test_histogram_invalid_pairs_go_to_the_spare_slot(bn):
    # partial tiles (n not a tile multiple), diagonal tiles and zero rows: the kernel's
    # histogram takes no mask (see kernels/triton/pairwise.py); every invalid element of a
    # launched tile is counted in slot bins + 2, which the engine drops
    x = make_embeddings(37, 8, zero_rows=3, seed=21)
    cfg = PairwiseConfig(bins=50, topk=2, bottomk=2)
    eng = triton_backend.TritonEngine(x, None, cfg, block=16, block_n=bn, group=4, programs=2)
    assert eng.nbands == 1 and eng.nb >= cfg.bins + 3
    st = run_engine(eng)
    slots = eng.hist_buf.view(-1, eng.nb).sum(0)
    launched = eng.plan.tiles(0, True)[2] * eng.bm * eng.bn
    assert int(slots[cfg.bins + 2]) == launched - st.count and int(slots[cfg.bins + 3:].sum()) == 0
    assert st.count == 34 * 33 // 2 and int(st.hist.sum()) == st.count
    want = reference.pairwise_stats(x, bins=50, topk=2, bottomk=2)
    assert st.hist.tolist() == [want["hist"]["underflow"], *want["hist"]["counts"].tolist(), want["hist"]["overflow"]]
    wide = triton_backend.TritonEngine(x, None, PairwiseConfig(bins=9000), block=16)
    assert wide.nb == 0 and wide.hist_buf.dtype == torch.int64  # global atomics count in int64


class _LaunchRecorder:
    """Stands in for the kernel object: records each launch's arguments by name."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(zip(self.fn.arg_names, args)))
            return self.fn[grid](*args, **kwargs)
        return launch

    def __getattr__(self, name):
        return getattr(self.fn, name)


_DTYPE_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64",
                torch.uint8: "*u8"}


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_launches_match_the_signature_and_compile_once_per_run(monkeypatch, metric):
    # many bands (the last one short), tiny buffers (retries, a growing capacity) and an
    # outside list whose cut moves: every integer that changes between launches must be
    # excluded from Triton's specialisation (== 1, divisibility by 16), or a run compiles new
    # variants mid-way; every argument has the type the static profile compiles
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    rec = _LaunchRecorder(pairwise_kernels._pairwise_stats_kernel)
    monkeypatch.setattr(pairwise_kernels, "_pairwise_stats_kernel", rec)
    x = small_int_embeddings(100, 4, seed=5, low=-1, high=2)  # 7 block-rows: bands of 2, 2, 2, 1
    opts = dict(ALL_OUTPUTS, outside=(-0.5, 0.5), outside_limit=5)
    rng = (0.0, 4.0) if metric == "euclidean" else (-1.0, 1.0)
    _engine_stats(x, engine_kw=dict(block=16, group=2, programs=2, capacity=1), metric=metric, **_cfg_opts(opts, rng))
    assert len(rec.launches) > 6
    types = pairwise_kernels.signature("desc")
    dns = set(pairwise_kernels.DO_NOT_SPECIALIZE)
    varying, keys = set(), set()
    for launch in rec.launches:
        key = []
        for name, value in launch.items():
            if name in ("x_desc", "y_desc"):
                continue
            if isinstance(value, torch.Tensor):
                assert _DTYPE_TYPES[value.dtype] == types[name], (name, value.dtype)
            elif isinstance(value, float):
                assert types[name] == "fp32", name
            else:
                assert isinstance(value, int) and types[name] == "i32" and abs(value) < 2 ** 31, (name, value)
                key.append(native_specialize_impl(BaseBackend, value, False, name not in dns, True))
                if value != rec.launches[0][name]:
                    varying.add(name)
        keys.add(tuple(key))
    assert varying <= dns, f"run-varying integers specialised: {sorted(varying - dns)}"
    assert {"band_row0", "band_rows", "num_tiles", "cap", "cut_i"} <= varying  # the run exercised them
    assert len(keys) == 1  # one specialisation of the integers for the whole run
    kwargs = getattr(rec.fn, "kwargs", None) or {}
    declared = kwargs.get("do_not_specialize") or rec.fn.do_not_specialize
    assert set(declared) == dns


_WIDE_STRIDE = """
import sys, torch, embgeom
S = 2 ** 30   # one element 2^30 apart: 4 GiB of storage reserved, a handful of elements touched
if sys.argv[1] == "entropy":
    attn = torch.empty_strided((1, 1, 3, 3), (1, 1, 1, S), dtype=torch.float16)   # [q, k] at q + k*S
    for q in range(3):
        for k in range(3):
            attn[0, 0, q, k] = (q + 2 * k + 1) / (3 * q + 9)
    got = [embgeom.attention_entropy(attn, backend=b).row_entropy.double() for b in ("torch", "triton")]
else:
    x = torch.empty_strided((1, 2, 3), (1, 1, S), dtype=torch.float16)             # [t, d] at t + d*S
    for t in range(2):
        for d in range(3):
            x[0, t, d] = float(1 + t + d)
    got = [embgeom.cone_index(x, backend=b).index.double() for b in ("torch", "triton")]
print(float((got[0] - got[1]).abs().max()))
"""


@pytest.mark.parametrize("kernel", ["entropy", "cone"])
def test_offsets_past_int32_are_64_bit(kernel, tmp_path):
    """A view whose key (entropy) or feature (cone) stride times its index passes 2^31 (a
    transposed (T, T) map with T >= 46,341; (B, D, T) states seen as (B, T, D)): the kernels had
    multiplied that index in int32, wrapped, and read outside the tensor (a SIGSEGV under the
    interpreter, an illegal address on a GPU). In its own process, so a crash fails the test."""
    import subprocess
    import sys

    script = tmp_path / "wide.py"
    script.write_text(_WIDE_STRIDE)
    r = subprocess.run([sys.executable, str(script), kernel], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert float(r.stdout.strip()) < 1e-3, r.stdout


def test_rows_beyond_the_kernels_32_bit_offsets_are_refused():
    """The kernel reads its per-row thresholds at (stream - 1) * rows in int32: more than
    (2^31 - 1) // 3 rows is refused before any work, naming the argument (rows expanded from one,
    no memory)."""
    big = torch.zeros(1, 4).expand(triton_backend.MAX_ROWS + 1, 4)
    ok = torch.zeros(3, 4)
    cfg = PairwiseConfig()
    for x, y, name in ((big, None, "x"), (ok, big, "y")):
        with pytest.raises(ValueError, match=rf"^{name}: 715,827,883 rows, the triton backend takes at most 715,827,882"):
            triton_backend.TritonEngine(x, y, cfg)
