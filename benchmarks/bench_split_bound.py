"""Could an exact filter on fewer dimensions shorten the product of a row top-k run? The
candidates each split of the principal axes leaves, with the thresholds a run would hold.

    python benchmarks/bench_split_bound.py                    # default vocabulary, k = 11, 2000 rows
    python benchmarks/bench_split_bound.py --random 30522     # random unit rows instead
    python benchmarks/bench_split_bound.py --splits 192,288 --rows 500

The idea (not built): rotate the unit rows onto their principal axes (z = x V, V from the
eigenvectors of the rows' Gram matrix, an orthogonal map: z_i . z_j = x_i . x_j), compute the
product over the first p axes only, and bound the rest by Cauchy-Schwarz with each row's
residual norm r_i = |z_i[p:]|: x_i . x_j <= z_i[:p] . z_j[:p] + r_i r_j. A pair whose bound is
below its row's running k-th best value cannot enter the row's list; every other pair (a
candidate) needs its remaining d - p axes (or an exact rescoring). The product shrinks to p / d
of its length; the candidates cost a gathered dot product of d - p axes each.

Printed per split p: the median residual norm, candidates per row against the final k-th best
(the least any run could leave) and against running thresholds (columns visited in blocks of
--block in index order after a random sample of --prime columns, as the engine primes fast
mode's rows), and `cost` = p / d + (candidate share) x (d - p) / d x --gather, the product's
time relative to the full one if a gathered candidate axis costs --gather times a packed one.
Exact in float64 (no rounding margins: a built filter needs those too). Prints only.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bench_filter_margin import unit_rows  # the same rows: the vocabulary's, or --random N


def principal(x: np.ndarray) -> np.ndarray:
    """The rows on their principal axes, largest variance first (about the origin: the dot
    products are what the lists rank)."""
    w, v = np.linalg.eigh(x.T @ x)
    return x @ v[:, ::-1]


def kth_best(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k-th largest value (-inf while a row holds fewer than k)."""
    if values.shape[1] < k:
        return np.full(values.shape[0], -np.inf)
    return -np.partition(-values, k - 1, axis=1)[:, k - 1]


def candidates(z: np.ndarray, rows: np.ndarray, p: int, k: int, block: int, prime: int,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Per sampled row, the number of columns whose bound reaches the row's final k-th best
    ("final") and its running k-th best when the column's block is visited ("running")."""
    exact = z[rows] @ z.T
    resid = np.linalg.norm(z[:, p:], axis=1)
    bound = z[rows, :p] @ z[:, :p].T + resid[rows, None] * resid[None, :]
    final = (bound >= kth_best(exact, k)[:, None]).sum(1)
    n = len(z)
    sample = np.random.default_rng(seed).choice(n, min(prime, n), replace=False)
    best = -np.sort(-exact[:, sample], axis=1)[:, :k]  # the k best seen, primed by the sample
    primed = np.zeros(n, dtype=bool)
    primed[sample] = True
    running = np.zeros(len(rows), dtype=np.int64)
    for c0 in range(0, n, block):
        thr = best[:, k - 1] if best.shape[1] >= k else np.full(len(rows), -np.inf)
        running += (bound[:, c0:c0 + block] >= thr[:, None]).sum(1)
        # each column once: a sampled one is in `best` already (twice, the threshold could pass
        # the true k-th best)
        seen = exact[:, c0:c0 + block][:, ~primed[c0:c0 + block]]
        both = np.concatenate([best, seen], axis=1)
        best = -np.sort(-both, axis=1)[:, :k]
    return {"final": final, "running": running, "resid": resid}


def report(x: np.ndarray, splits: list[int], k: int, rows: int, block: int, prime: int,
           gather: float, seed: int = 0) -> list[dict]:
    n, d = x.shape
    z = principal(x)
    pick = np.random.default_rng(seed).choice(n, min(rows, n), replace=False)
    out = []
    for p in splits:
        c = candidates(z, pick, p, k, block, prime, seed)
        share = c["running"].mean() / n
        out.append({"p": p, "resid_median": float(np.median(c["resid"])),
                    "final_median": float(np.median(c["final"])), "final_mean": float(c["final"].mean()),
                    "running_median": float(np.median(c["running"])), "running_mean": float(c["running"].mean()),
                    "cost": p / d + share * (d - p) / d * gather})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=0, help="random unit rows of this count instead of the vocabulary")
    ap.add_argument("--splits", default="96,192,240,288,336", help="comma-separated p (axes in the product)")
    ap.add_argument("--k", type=int, default=11, help="list length (11: semantic_search(E, E, top_k=11))")
    ap.add_argument("--rows", type=int, default=2000, help="sampled rows")
    ap.add_argument("--block", type=int, default=256, help="columns a step of the running thresholds")
    ap.add_argument("--prime", type=int, default=256, help="columns sampled before the first step")
    ap.add_argument("--gather", type=float, default=5.0, help="cost of a gathered axis against a packed one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    x = unit_rows(args)
    splits = [int(s) for s in args.splits.split(",")]
    bad = [p for p in splits if not 0 < p < x.shape[1]]
    if bad:
        sys.exit(f"--splits: each p must lie in 1..{x.shape[1] - 1}, got {bad}")
    got = report(x, splits, args.k, args.rows, args.block, args.prime, args.gather)
    if args.json:
        print(json.dumps(got, indent=1))
        return
    print(f"{x.shape[0]} x {x.shape[1]} unit rows, k = {args.k}, {min(args.rows, x.shape[0])} rows sampled; "
          "candidates per row, median / mean")
    print(f"{'p':>4} {'resid':>6} {'final':>14} {'running':>16} {'cost':>6}")
    for r in got:
        print(f"{r['p']:>4} {r['resid_median']:6.3f} {r['final_median']:6.0f} / {r['final_mean']:6.0f} "
              f"{r['running_median']:7.0f} / {r['running_mean']:6.0f} {r['cost']:6.3f}")


if __name__ == "__main__":
    main()
