"""GPU benchmark (issue 7): embgeom's triton/cuda engines against the GPU baselines, one run.

    python benchmarks/bench_gpu.py                                   # everything (long)
    python benchmarks/bench_gpu.py --n 1048576 --d 768 --dtype bf16  # the headline row
    python benchmarks/bench_gpu.py --n 30522 --d 384 --dtype bf16 tf32 --providers triton torch-chunked

Workloads (metric column):
  pairwise_stats     full all-pairs output (2000 bins, top/bottom-10, row top-10, outside
                     [-0.2, 0.2]) over the N(N-1)/2 unique pairs of N x d unit rows;
                     baseline "torch-chunked": mm + histc + topk per row chunk, same precision.
  row_topk10         per-row top-10 neighbours only; baselines "torch-mm-topk" (chunked mm +
                     topk), "faiss-gpu" (exact GpuIndexFlatIP, fp16 storage for bf16 runs),
                     "cuvs" (brute_force, if importable).
  attention_entropy  (8, 12, 512, 512) fp32 probabilities: triton vs the torch backend; the
                     roofline column is % of HBM bandwidth.
dtype: bf16 (fast, bf16 products), tf32 (fast, tf32 products), fp32 (exact, ieee fp32).
tflops counts 2*d FLOPs per unique pair for every provider (the same work, so ratios are time
ratios); roofline_pct is that over the device's dense tensor peak for the dtype. Each result is
checked against torch-chunked (count, moments, histogram, top pairs) before its row is written.
Each row is appended to benchmarks/results/gpu.csv (or --csv PATH) as soon as it is measured;
without a usable GPU the script exits (--check-args checks the arguments only, no GPU needed).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

FULL = dict(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2), outside_limit=1000)
ROWTOPK = dict(bins=0, topk=0, bottomk=0, row_topk=10)
# dense (no sparsity) tensor-core peaks in TFLOP/s and HBM bandwidth in GB/s, by device name
PEAKS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2, "hbm": 2000.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0, "hbm": 3900.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm": 3350.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm": 4800.0}),
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "hbm": 4000.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5, "hbm": 2039.0}),
)


def device_peaks(name: str) -> dict:
    """The peaks of the longest PEAKS key in the device's name: "NVIDIA GH200 480GB" holds "H200"
    too, "NVIDIA H100 PCIe" holds "H100"."""
    for key, peaks in sorted(PEAKS, key=lambda kv: -len(kv[0])):
        if key in name:
            return peaks
    return {}


def make_data(n, d, seed=0):
    """Unit-norm rows with a shared direction (cosines spread like real embeddings)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g)
    x += 0.5 * torch.randn(1, d, device="cuda", generator=g)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def first_run(fn):
    """One synchronised call (the correctness check doubles as the warm-up): (result, s)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def timed(fn, repeats, first, first_counts=False):
    """Median/p20/p80 in ms. Short calls: triton.testing.do_bench; long ones (first > 0.5 s,
    already warmed up by the checked run): `repeats` synchronised wall-clock runs, of which the
    checked run is the first when first_counts (a baseline with nothing to compile: timed once
    at --repeats 1, not twice)."""
    import torch
    import triton.testing

    if first < 0.5:
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(25, int(first * 1e3)), rep=max(200, int(20 * first * 1e3)),
                                                quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    times = [first * 1e3] if first_counts else []
    for _ in range(repeats - len(times)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return {"median_ms": times[len(times) // 2], "p20_ms": pct(0.2), "p80_ms": pct(0.8)}


def set_precision(dtype):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"


# ---------------------------------------------------------------------------------------------
# providers: each returns a dict with count/mean/hist/top (what it computed) for the check
# ---------------------------------------------------------------------------------------------

def run_embgeom(x, dtype, opts, engine_cls, block=None):
    from embgeom.engine.config import PairwiseConfig
    from embgeom.engine.runner import run_engine

    cfg = PairwiseConfig(**{k: v for k, v in opts.items()}, lo=-1.0, hi=1.0,
                         precision="exact" if dtype == "fp32" else "fast")
    kw = {} if dtype == "fp32" else {"fast_dtype": dtype}
    if block:
        kw["block"] = block
    eng = engine_cls(x, None, cfg, **kw)
    st = run_engine(eng)
    r = st.finalize(cfg, d=x.shape[1], backend=eng.name, device=x.device, seconds=0.0)
    return {"count": r.count, "mean": r.mean, "hist": None if r.hist is None else r.hist.counts,
            "top": None if r.top_pairs is None else r.top_pairs.values, "bound": st.hist_error_bound,
            "row_idx": None if r.row_topk is None else r.row_topk.indices, "result": r}


def recheck(prov, got, x) -> bool:
    """verify.recheck (benchmarks/verify.py) on an embgeom result: lists against float64, counts summing to
    N(N-1)/2 (values are rescored exactly in fast precision, so an fp32 tolerance)."""
    from verify import recheck as verify

    rep = verify(got["result"], x, tol=1e-5 * max(1.0, math.sqrt(x.shape[1]) / 8) * 4)
    print(f"  recheck {prov}: {'ok' if rep['ok'] else 'FAILED'} {rep['checked']} {rep['failures']}", flush=True)
    return rep["ok"]


def torch_chunked(x, dtype, opts, chunk_elems=1 << 29):
    """The all-pairs statistics the plain way: per row chunk, the upper-triangle block of x x^T in the same
    precision, then histc / sums / topk, and running per-row top-k over both sides."""
    import torch

    n = x.shape[0]
    xin = x.bfloat16() if dtype == "bf16" else x
    bins, k, rk = opts["bins"], opts["topk"], opts["row_topk"]
    a, b = opts.get("outside") or (None, None)
    C = max(64, min(n, chunk_elems // max(n, 1)))
    hist = torch.zeros(bins, dtype=torch.int64, device="cuda") if bins else None
    s = torch.zeros(2, dtype=torch.float64, device="cuda")
    outside = torch.zeros((), dtype=torch.int64, device="cuda")
    top = torch.empty(0, device="cuda")
    bottom = torch.empty(0, device="cuda")
    rv = torch.full((n, rk), -math.inf, device="cuda") if rk else None
    ri = torch.full((n, rk), -1, dtype=torch.int64, device="cuda") if rk else None

    def merge_rows(rows, vals, idx):
        cv = torch.cat([rv[rows], vals], 1)
        ci = torch.cat([ri[rows], idx], 1)
        v2, p = cv.topk(rk, dim=1)
        rv[rows], ri[rows] = v2, torch.gather(ci, 1, p)

    for c0 in range(0, n, C):
        c1 = min(n, c0 + C)
        S = (xin[c0:c1] @ xin[c0:].T).float().clamp_(-1, 1)  # (h, n - c0)
        h = c1 - c0
        tri = torch.ones(h, h, dtype=torch.bool, device="cuda").triu_(1)
        diag = S[:, :h][tri]
        off = S[:, h:].reshape(-1)
        for part in (diag, off):
            if part.numel() == 0:
                continue
            if bins:
                hist += torch.histc(part, bins, -1.0, 1.0).long()
            s += torch.stack([part.double().sum(), part.double().square().sum()])
            if a is not None:
                outside += ((part < a) | (part > b)).sum()
            if k:
                top = torch.cat([top, part.topk(min(k, part.numel())).values]).topk(min(k, top.numel() + part.numel())).values
                bottom = torch.cat([bottom, part.topk(min(k, part.numel()), largest=False).values])
                bottom = bottom.topk(min(k, bottom.numel()), largest=False).values
        if rk:
            M = S.clone()
            M[:, :h].masked_fill_(~tri, -math.inf)
            kk = min(rk, M.shape[1])
            v, p = M.topk(kk, dim=1)
            merge_rows(torch.arange(c0, c1, device="cuda"), v, p + c0)
            # column side: rows c0.. gain their neighbours among the (smaller) rows c0..c1
            vc, pc = M.topk(min(rk, h), dim=0)
            merge_rows(torch.arange(c0, n, device="cuda"), vc.T.contiguous(), (pc + c0).T.contiguous())
    count = n * (n - 1) // 2
    return {"count": count, "mean": float(s[0]) / max(count, 1), "hist": hist, "top": top.double(),
            "bound": 0.0, "row_idx": ri}


def torch_mm_topk(x, dtype, k=10, chunk_elems=1 << 29):
    import torch

    n = x.shape[0]
    xin = x.bfloat16() if dtype == "bf16" else x
    C = max(64, min(n, chunk_elems // max(n, 1)))
    out = torch.empty(n, k, dtype=torch.int64, device="cuda")
    for c0 in range(0, n, C):
        c1 = min(n, c0 + C)
        S = (xin[c0:c1] @ xin.T).float()
        S[torch.arange(c1 - c0, device="cuda"), torch.arange(c0, c1, device="cuda")] = -math.inf
        out[c0:c1] = S.topk(k, dim=1).indices
    return {"row_idx": out}


def faiss_gpu(x, dtype, k=10):
    import faiss
    import numpy as np

    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError("faiss has no GPU support (install faiss-gpu)")
    res = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = dtype == "bf16"
    index = faiss.GpuIndexFlatIP(res, x.shape[1], cfg)
    xn = np.ascontiguousarray(x.float().cpu().numpy())

    def run():
        index.reset()
        index.add(xn)
        return index.search(xn, k + 1)

    return run


def cuvs_bf(x, k=10):
    from cuvs.neighbors import brute_force

    def run():
        index = brute_force.build(x)
        return brute_force.search(index, x, k + 1)

    return run


# ---------------------------------------------------------------------------------------------

def neighbour_overlap(a, b):
    """Mean share of row i's listed neighbours in a that b lists too (order-free)."""
    import torch

    hits = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[0], 1 << 16):
        hits += (a[s:s + (1 << 16), :, None] == b[s:s + (1 << 16), None, :]).any(-1).double().sum()
    return float(hits) / max(a.numel(), 1)


def drop_self(idx, k):
    """(n, k + 1) kNN results that include the query itself -> the first k others."""
    import torch

    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    other = idx != rows
    order = torch.argsort((~other).to(torch.int8), dim=1, stable=True)[:, :k]
    return torch.gather(idx, 1, order)


def check(name, got, want, dtype):
    """Problems of `got` against the torch baseline in the same precision; [] = consistent.
    bf16 baselines round every score to bf16 (8 bits), so their histogram is not comparable
    and near-tied neighbours reorder: looser checks there; a real bug fails them all."""
    import torch

    bad = []
    loose = dtype == "bf16"
    if want.get("count") is not None and got.get("count") is not None and got["count"] != want["count"]:
        bad.append(f"count {got['count']} != {want['count']}")
    if got.get("mean") is not None and want.get("mean") is not None and abs(got["mean"] - want["mean"]) > (1e-2 if loose else 1e-3):
        bad.append(f"mean {got['mean']} vs {want['mean']}")
    if not loose and got.get("hist") is not None and want.get("hist") is not None:
        moved = (got["hist"] - want["hist"]).abs().sum().item() / max(want["count"], 1)
        if moved > 1e-2:
            bad.append(f"histogram differs on {moved:.2%} of pairs")
    if got.get("top") is not None and want.get("top") is not None and want["top"].numel():
        if not torch.allclose(got["top"].double().cpu(), want["top"].double().cpu(), atol=2e-2):
            bad.append("top pairs differ")
    if got.get("row_idx") is not None and want.get("row_idx") is not None:
        agree = neighbour_overlap(got["row_idx"].to(want["row_idx"].device), want["row_idx"])
        if agree < (0.7 if loose else 0.95):
            bad.append(f"row top-k overlap {agree:.3f}")
    if bad:
        print(f"  CHECK FAILED {name}: " + "; ".join(bad), flush=True)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[30522, 262144, 1048576])
    ap.add_argument("--d", type=int, nargs="+", default=[384, 768])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "tf32"], choices=["bf16", "tf32", "fp32"])
    ap.add_argument("--workloads", nargs="+", default=["pairwise_stats", "row_topk10", "attention_entropy"])
    ap.add_argument("--providers", nargs="+",
                    default=["triton", "cuda", "torch-chunked", "torch-mm-topk", "faiss-gpu", "cuvs"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=None,
                    help="tile side of the triton/cuda engines (default 64; 128 trades spills for MMA size)")
    ap.add_argument("--csv", default="gpu.csv",
                    help="file name in benchmarks/results, or a path; each row is appended as soon as it is measured")
    ap.add_argument("--recheck", action="store_true",
                    help="float64 recheck of embgeom's lists and counts (benchmarks/verify.py)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--check-args", action="store_true",
                    help="check the arguments, print what would run and exit (no GPU work; gpu_check.sh --dry-run)")
    args = ap.parse_args(argv)
    known = {"triton", "cuda", "torch-chunked", "torch-mm-topk", "faiss-gpu", "cuvs"}
    bad = sorted(set(args.providers) - known) + sorted(set(args.workloads) - {"pairwise_stats", "row_topk10",
                                                                              "attention_entropy"})
    if bad or args.repeats < 1 or min(args.n) < 2 or min(args.d) < 1:
        ap.error(f"unknown providers/workloads {bad}" if bad else "--repeats >= 1, --n >= 2, --d >= 1")
    if args.check_args:
        print(f"bench_gpu (check only): n={args.n} d={args.d} dtype={args.dtype} workloads={args.workloads} "
              f"providers={args.providers} repeats={args.repeats} recheck={args.recheck} "
              f"csv={'-' if args.no_csv else args.csv}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no usable CUDA device (torch.cuda.is_available() is False); "
              "run this on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    import embgeom
    from embgeom.backends import cuda as cuda_backend, registry, triton as triton_backend

    registry.ensure_registered()
    dev_name = torch.cuda.get_device_name()
    peaks = device_peaks(dev_name)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    import triton

    versions = f"{common.versions()} triton={triton.__version__} cuda={torch.version.cuda}"
    sha, date = common.git_sha(), common.today()
    rows = []
    print(f"device: {dev_name} ({sms} SMs)  peaks: {peaks or 'unknown'}")
    engines = {"triton": triton_backend.TritonEngine}
    if registry.cuda_ext() is not None and hasattr(registry.cuda_ext(), "row_topk_merge"):
        engines["cuda"] = cuda_backend.CudaEngine

    def label(prov):
        return f"{prov}-b{args.block}" if (args.block and prov in engines) else prov

    def record(metric, provider, n, m, d, dtype, t, work_flops=None, work_bytes=None, pairs=None):
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
        row = {"metric": metric, "provider": provider, "n": n, "m": m, "d": d, "dtype": dtype, "device": dev_name,
               "threads": sms, **{k: round(v, 3) for k, v in t.items()}, "peak_mb": round(peak_mb, 1),
               "versions": versions, "git_sha": sha, "date": date}
        sec = t["median_ms"] / 1e3
        if pairs:
            row["pairs_per_s"] = f"{pairs / sec:.4g}"
        if work_flops:
            tf = work_flops / sec / 1e12
            row["tflops"] = round(tf, 2)
            if peaks.get(dtype):
                row["roofline_pct"] = round(100 * tf / peaks[dtype], 1)
        if work_bytes:  # bandwidth-bound: roofline = % of HBM bandwidth
            gbs = work_bytes / sec / 1e9
            if peaks.get("hbm"):
                row["roofline_pct"] = round(100 * gbs / peaks["hbm"], 1)
            print(f"  {metric}: {gbs:.0f} GB/s", flush=True)
        rows.append(row)
        if not args.no_csv:  # written now: a step killed later keeps what it measured
            common.append_rows(args.csv, [row])
        print(f"  {metric:18} {provider:14} n={n:<8} d={d:<4} {dtype:5} {t['median_ms']:10.2f} ms"
              f"  {row.get('tflops', '')} TFLOP/s  {row.get('roofline_pct', '')}%  peak {peak_mb:.0f} MiB", flush=True)

    for n in args.n:
        for d in args.d:
            x = make_data(n, d)
            pairs = n * (n - 1) // 2
            flops = 2.0 * d * pairs
            for dtype in args.dtype:
                set_precision(dtype)
                if "pairwise_stats" in args.workloads:
                    want, t_first = first_run(lambda: torch_chunked(x, dtype, FULL))
                    for prov in args.providers:
                        if prov in engines:
                            fn = lambda e=engines[prov]: run_embgeom(x, dtype, FULL, e, args.block)  # noqa: E731
                        elif prov == "torch-chunked":
                            fn = lambda: torch_chunked(x, dtype, FULL)  # noqa: E731
                        else:
                            continue
                        torch.cuda.reset_peak_memory_stats()
                        got, first = (want, t_first) if prov == "torch-chunked" else first_run(fn)
                        if check(prov, got, want, dtype) or (args.recheck and prov in engines
                                                              and not recheck(prov, got, x)):
                            continue
                        record("pairwise_stats", label(prov), n, n, d, dtype,
                               timed(fn, args.repeats, first, first_counts=prov == "torch-chunked"), flops, pairs=pairs)
                if "row_topk10" in args.workloads:
                    want, t_first = first_run(lambda: torch_mm_topk(x, dtype))
                    for prov in args.providers:
                        try:
                            if prov in engines:
                                fn = lambda e=engines[prov]: run_embgeom(x, dtype, ROWTOPK, e, args.block)  # noqa: E731
                            elif prov == "torch-mm-topk":
                                fn = lambda: torch_mm_topk(x, dtype)  # noqa: E731
                            elif prov == "faiss-gpu":
                                fn = faiss_gpu(x, dtype)
                            elif prov == "cuvs":
                                fn = cuvs_bf(x)
                            else:
                                continue
                            torch.cuda.reset_peak_memory_stats()
                            got, first = (want, t_first) if prov == "torch-mm-topk" else first_run(fn)
                        except Exception as exc:  # noqa: BLE001 - an absent baseline is reported, not fatal
                            print(f"  skip {prov}: {type(exc).__name__}: {exc}")
                            continue
                        if isinstance(got, tuple):  # faiss (D, I) / cuVS (distances, neighbors)
                            got = {"row_idx": drop_self(torch.as_tensor(got[1], device="cuda").long(), 10)}
                        if check(prov, got, want, dtype) or (args.recheck and prov in engines
                                                              and not recheck(prov, got, x)):
                            continue
                        record("row_topk10", label(prov), n, n, d, dtype,
                               timed(fn, args.repeats, first, first_counts=prov == "torch-mm-topk"), flops, pairs=pairs)
            x = None  # frees the rows before the next shape (a `del` reads as undefined to the lambdas above)
            torch.cuda.empty_cache()

    if "attention_entropy" in args.workloads:
        B, H, T = 8, 12, 512
        g = torch.Generator(device="cuda").manual_seed(0)
        p = torch.softmax(torch.randn(B, H, T, T, device="cuda", generator=g) * 2, -1)
        mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
        want = embgeom.attention_entropy(p, mask, backend="torch").row_entropy
        nbytes = p.numel() * 4 + want.numel() * 4
        for prov in ("triton", "torch"):
            fn = lambda b=prov: embgeom.attention_entropy(p, mask, backend=b)  # noqa: E731
            torch.cuda.reset_peak_memory_stats()
            got, first = first_run(fn)
            if not torch.allclose(got.row_entropy, want, atol=1e-4, equal_nan=True):
                print(f"  CHECK FAILED attention_entropy {prov}")
                continue
            record("attention_entropy", prov, B * H * T, T, 0, "fp32", timed(fn, args.repeats, first),
                   work_bytes=nbytes, pairs=B * H * T * T)

    if rows and not args.no_csv:
        print(f"appended {len(rows)} rows to {common.RESULTS / args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
