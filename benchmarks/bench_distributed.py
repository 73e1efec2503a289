"""1 process vs 2 torchrun ranks (gloo) on this machine, same input, same answer.

    .venv/bin/python benchmarks/bench_distributed.py [--n 20000] [--d 384] [--backend cpp]

One process uses every core (OMP_NUM_THREADS = cores); each of the R ranks uses cores / R, so
the comparison shows the cost of the split and the merge, not extra hardware. Appends rows
(provider `embgeom-<backend>-1rank` / `-2rank`) to benchmarks/results/cpu.csv; a row's threads
are all its ranks' OpenMP threads together (threads_per_rank in its versions column), its device
the CPU model and instruction set, with embgeom's CPU path.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--backend", default="cpp")
    p.add_argument("--row-topk", type=int, default=10, help="0: without per-row lists (a cross job "
                   "then runs its product once instead of once per direction)")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp())
    np.save(tmp / "x.npy", np.random.default_rng(0).standard_normal((args.n, args.d), dtype=np.float32))
    opts = ["pairs", str(tmp / "x.npy"), "--row-topk", str(args.row_topk), "--outside", "-0.2", "0.2", "--backend", args.backend]
    runs = {}
    per_rank = {}  # OpenMP threads of each rank
    for ranks in (1, 2):
        out = tmp / f"r{ranks}.json"
        per_rank[ranks] = max(1, cores // ranks)
        if ranks == 1:
            cmd = [sys.executable, "-m", "embgeom", *opts, "--json", str(out)]
            env = dict(os.environ, OMP_NUM_THREADS=str(per_rank[ranks]))
        else:
            torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
            cmd = [torchrun, "--standalone", f"--nproc_per_node={ranks}", "-m", "embgeom", *opts, "--distributed",
                   "--json", str(out)]
            env = dict(os.environ, OMP_NUM_THREADS=str(per_rank[ranks]), EMBGEOM_DIST_BACKEND="gloo")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-2000:])
            return 1
        runs[ranks] = (wall, json.loads(out.read_text()))
    a, b = runs[1][1], runs[2][1]
    same = all(a.get(k) == b.get(k) for k in ("count", "hist", "top_pairs", "bottom_pairs", "row_topk", "outside"))
    pairs = args.n * (args.n - 1) // 2
    rows = []
    for ranks, (wall, res) in runs.items():
        print(f"{ranks} rank(s): wall {wall:7.2f} s (incl. start-up), kernel {res['seconds']:7.2f} s, "
              f"{pairs / res['seconds'] / 1e6:8.1f} Mpairs/s  backend {res['backend']}, "
              f"threads {ranks} x {per_rank[ranks]}")
        # (the ranks run in this environment: this process's CPU path is theirs)
        where = common.provenance(threads=ranks * per_rank[ranks])
        rows.append({"metric": "pairwise_cosine_distributed", "provider": f"embgeom-{args.backend}-{ranks}rank" + ("" if args.row_topk else "-no-rowtopk"),
                     "n": args.n, "m": args.n, "d": args.d, "dtype": "float32", **where,
                     "median_ms": res["seconds"] * 1e3, "p20_ms": "", "p80_ms": "",
                     "pairs_per_s": pairs / res["seconds"], "tflops": 2 * pairs * args.d / res["seconds"] / 1e12,
                     "roofline_pct": "", "peak_mb": "",
                     "versions": where["versions"] + f" threads_per_rank={per_rank[ranks]}"})
    print(f"2 ranks / 1 rank kernel time: {runs[2][1]['seconds'] / runs[1][1]['seconds']:.2f}; "
          f"identical answer: {same}")
    if not args.no_csv:
        common.append_rows("cpu.csv", rows)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
