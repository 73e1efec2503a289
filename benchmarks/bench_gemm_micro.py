"""Micro-benchmark of the C++ pairwise engine against plain matrix products.

    python benchmarks/bench_gemm_micro.py [--n 30522] [--d 384] [--threads 0] [--repeats 1] [--baselines]

--threads 0 (the default): the engine's OpenMP threads, OMP_NUM_THREADS or else every core.

Times, on the same random (n, d) float32 input: numpy `x @ x.T` (OpenBLAS, full matrix),
torch fp32 and bf16 `x @ x.T`, and embgeom._C.PairwiseEngine in self mode (cosine, 2000-bin
histogram, top/bottom-10 pairs, per-row top-10, outside [-0.2, 0.2]) in exact and fast precision,
plus the engine with every output off (GEMM + min/max/sum only). Prints wall seconds and the
fp32 GFLOP/s the engine's upper-triangle tiles represent (n^2 d flops).
Not part of the test suite; check `uptime` first, the numbers mean little on a busy machine.
"""
import argparse
import time

import numpy as np


def timed(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30522)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0: OpenMP's, OMP_NUM_THREADS or every core)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baselines", action="store_true", help="also time numpy/torch matmuls")
    a = ap.parse_args()
    from embgeom import _C
    from embgeom.backends.cpp import binding_options
    from embgeom.engine.config import DEFAULTS

    x = np.random.default_rng(0).standard_normal((a.n, a.d), dtype=np.float32)
    flops = float(a.n) * a.n * a.d  # upper triangle: n^2/2 pairs x 2d flops
    rows = []
    full = dict(bins=2000, lo=-1.0, hi=1.0, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2))
    none = dict(bins=0, topk=0, bottomk=0, row_topk=0, outside=None)
    for name, prec, opts in (("engine exact, outputs off", "exact", none),
                             ("engine exact, full", "exact", full),
                             ("engine fast, outputs off", "fast", none),
                             ("engine fast, full", "fast", full)):
        def go():
            e = _C.PairwiseEngine(x, None, **{**binding_options(DEFAULTS, threads=a.threads),
                                              "metric": "cosine", "precision": prec, **opts})
            e.run(0, e.num_tiles())
            return e.state()

        rows.append((name, timed(go, a.repeats), flops))
        show(rows[-1:])
    if a.baselines:  # after the engine: OpenBLAS has crashed on 30522^2 outputs in some envs
        k = len(rows)
        try:
            import torch

            t = torch.from_numpy(x)
            rows.append(("torch fp32 x @ x.T (full)", timed(lambda: t @ t.T, a.repeats), 2 * flops))
            tb = t.bfloat16()
            rows.append(("torch bf16 x @ x.T (full)", timed(lambda: tb @ tb.T, a.repeats), 2 * flops))
        except ImportError:
            pass
        show(rows[k:])
        rows.append(("numpy x @ x.T (full)", timed(lambda: x @ x.T, a.repeats), 2 * flops))
        show(rows[-1:])


def show(rows):
    for name, sec, fl in rows:
        print(f"{name:30s} {sec:8.3f} s  {fl / sec * 1e-9:7.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
