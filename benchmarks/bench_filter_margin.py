"""Would a lower-precision filter product pay on AVX2? The rigorous error margins of bf16 and
int8 copies of the rows, the candidates each margin leaves to rescore, and the int8 / fp32
product rates of oneDNN with and without the AVX2 cap (issue 22's AVX2 drop-in targets).

    python benchmarks/bench_filter_margin.py                  # default vocabulary, k = 11, 400 rows
    python benchmarks/bench_filter_margin.py --random 30522   # random unit rows instead
    python benchmarks/bench_filter_margin.py --no-rates       # margins only

Fast mode filters on a cheaper product and rescores in float32 every pair whose filtered value
lies within the error margin of a decision (docs/metrics.md, precision modes). For row copies
r(a) = a - e_a the margin of a pair is |a.b - r(a).r(b)| <= |r(a)| |e_b| + |e_a| |b| (Cauchy-
Schwarz, the form of numerics.fast_error_bound): "global" takes the largest |e| of any row, as
the engine's single margin M does; "per pair" takes each pair's own rows. A row's top-k list
must rescore every column within 2M of its k-th best value. Copies: bf16 (what fast mode uses
on AVX-512 BF16), int8 (per-row scale, 8 bits both sides: the VNNI form), int7x8 (7 bits on one
side: what AVX2's vpmaddubsw can add in pairs without saturating int16). Rates: torch._int_mm
(oneDNN, int8 x int8 -> int32) against a float32 matmul of the same shape, 2 threads, the median
of 5 calls, in child processes natively and with ONEDNN_MAX_CPU_ISA=AVX2 /
ATEN_CPU_CAPABILITY=avx2. Prints only; never run the rates while anything else loads the
machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

RATE_SHAPE = (4096, 4096, 384)


def unit_rows(args) -> np.ndarray:
    if args.random:
        x = np.random.default_rng(0).standard_normal((args.random, 384))
    else:
        from compare import load

        x = load("minilm").astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rounded(x: np.ndarray, kind: str | int) -> np.ndarray:
    """The float64 values of the rows' bf16 copy, or of a symmetric per-row int copy with
    `kind` levels each side of zero (127: 8 bits, 63: 7 bits)."""
    if kind == "bf16":
        import torch

        return torch.from_numpy(x).float().to(torch.bfloat16).double().numpy()
    scale = np.abs(x).max(1, keepdims=True) / kind
    scale[scale == 0] = 1.0
    return np.round(x / scale) * scale


COPIES = (("bf16", "bf16", "bf16"), ("int8", 127, 127), ("int7x8", 63, 127))


def pair_margins(x: np.ndarray, side_a, side_b, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Bounds on |x_i . x_j - r_a(x_i) . r_b(x_j)| for i in rows, every j (unit rows): per pair
    (len(rows), n), and one for all pairs from the largest rounding of any row."""
    ra, rb = rounded(x, side_a), rounded(x, side_b)
    ea, eb = np.linalg.norm(ra - x, axis=1), np.linalg.norm(rb - x, axis=1)
    na = np.linalg.norm(ra, axis=1)
    return na[rows, None] * eb[None, :] + ea[rows, None], float(na.max() * eb.max() + ea.max())


def margins(x: np.ndarray, k: int, rows: int) -> list[dict]:
    rng = np.random.default_rng(1)
    idx = rng.choice(len(x), min(rows, len(x)), replace=False)
    s = x[idx] @ x.T
    s[np.arange(len(idx)), idx] = -np.inf  # a row's own pair is not a neighbour
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    out = []
    for name, side_a, side_b in COPIES:
        per_pair, whole = pair_margins(x, side_a, side_b, idx)
        for how, m in (("global", whole), ("per pair", per_pair)):
            c = (s >= kth[:, None] - 2 * m).sum(1)
            out.append({"copy": name, "margin": how, "M": float(np.median(m)), "median": float(np.median(c)),
                        "mean": float(c.mean()), "p90": float(np.quantile(c, 0.9)), "max": int(c.max())})
    return out


def rate_child() -> dict:
    import torch

    from common import timeit

    torch.set_num_threads(2)
    n, m, d = RATE_SHAPE
    g = torch.Generator().manual_seed(0)
    a8 = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g)
    b8 = torch.randint(-127, 128, (d, m), dtype=torch.int8, generator=g)
    af, bf = torch.randn(n, d, generator=g), torch.randn(d, m, generator=g)
    ops = 2.0 * n * m * d / 1e9
    calls = (("int8", lambda: torch._int_mm(a8, b8)), ("fp32", lambda: af @ bf))
    ms = {name: timeit(f, repeats=5)["median_ms"] for name, f in calls}
    return {name: ops / (t / 1e3) for name, t in ms.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=11, help="list length (semantic_search(top_k=11) of every row)")
    ap.add_argument("--rows", type=int, default=400, help="sampled rows whose candidates are counted")
    ap.add_argument("--random", type=int, default=0, help="this many random unit rows instead of the vocabulary")
    ap.add_argument("--no-rates", action="store_true")
    ap.add_argument("--rate-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rate_child:
        print(json.dumps(rate_child()))
        return 0
    x = unit_rows(args)
    print(f"{x.shape[0]:,} x {x.shape[1]} unit rows, top-{args.k}, {min(args.rows, len(x))} rows sampled")
    print(f"{'copy':7s} {'margin':9s} {'M (median)':>10s}  candidates per row: median / mean / p90 / max")
    for r in margins(x, args.k, args.rows):
        print(f"{r['copy']:7s} {r['margin']:9s} {r['M']:10.4f}  {r['median']:.0f} / {r['mean']:.0f} / {r['p90']:.0f} / {r['max']}")
    if args.no_rates:
        return 0
    n, m, d = RATE_SHAPE
    print(f"\noneDNN products {n} x {m} x {d}, 2 threads (GOP/s)")
    for label, env in (("native", {}), ("AVX2 cap", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})):
        proc = subprocess.run([sys.executable, __file__, "--rate-child"], capture_output=True, text=True,
                              env=dict(os.environ, **env), check=False)
        if proc.returncode != 0:
            print(f"  {label}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(proc.stdout)
        print(f"  {label:9s} int8 {r['int8']:6.1f}   fp32 {r['fp32']:6.1f}   int8 / fp32 {r['int8'] / r['fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
