"""Where the all-pairs statistics' time goes: A/B runs of the C++ engine with one stage at a time.

    python benchmarks/bench_stages.py                      # default vocabulary, 2 threads, both paths
    python benchmarks/bench_stages.py --threads 1 --n 15000 --repeats 7 --paths avx512

Each configuration runs the engine's whole schedule on the default model's word embeddings
(30,522 x 384, cosine): `bare` is the same schedule's products with the statistics discarded
(PairwiseEngine.discard_statistics), `moments` adds the fused pass with moments and extremes
only, each `+stage` adds one output to `moments`, and `full` is every output of compare.py's
M1 set (2000-bin histogram, top/bottom-10, per-row top-10, counts outside [-0.2, 0.2]). Times are
the best of --repeats runs of the engine alone (construction excluded): wall seconds, or CPU
seconds with --threads 1 (steadier where other tenants share the host). Each path
(EMBGEOM_CPU) runs in its own process; a column is labelled by the level the C++ core reports it
ran, and a path this host does not have is skipped with a note (EMBGEOM_CPU only caps the level:
avx512 on an AVX2 host runs avx2). Exit status 1 when a path failed or none ran. The table in
docs/architecture.md ("Cost of the statistics") comes from this script. Never run it while
anything else loads the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare import CPU_LEVELS, FULL, MOMENTS, cpp_engine, load  # noqa: E402

CONFIGS = {
    "bare": MOMENTS,
    "moments": MOMENTS,
    "+histogram": dict(MOMENTS, bins=2000),
    "+row top-10": dict(MOMENTS, row_topk=10),
    "+top/bottom-10": dict(MOMENTS, topk=10, bottomk=10),
    "+outside counts": dict(MOMENTS, outside=(-0.2, 0.2)),
    "full": FULL,
}


def worker(args) -> dict:
    """{"isa": the level the C++ core runs, "times": {configuration: seconds}}; no times when
    that is not the level asked for (the host lacks it)."""
    import torch

    from embgeom import _C

    isa = _C.cpu_info()["isa"]
    if isa in CPU_LEVELS and isa != os.environ["EMBGEOM_CPU"]:
        return {"isa": isa, "times": {}}
    torch.set_num_threads(args.threads)
    x = torch.from_numpy(load("minilm")[: args.n].copy())
    clock = time.process_time if args.threads == 1 else time.perf_counter
    out = {}
    for name, opts in CONFIGS.items():
        best = float("inf")
        for _ in range(args.repeats):
            engine = cpp_engine(x, opts, args.precision, args.threads, bare=name == "bare")
            t0 = clock()
            engine.run(0, engine.num_tiles())
            best = min(best, clock() - t0)
        out[name] = best
    return {"isa": isa, "times": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30522, help="rows of the vocabulary to use")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="exact", choices=("exact", "fast"))
    ap.add_argument("--paths", default="avx512,avx2", help="EMBGEOM_CPU levels, each in its own process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    requested = [p for p in args.paths.split(",") if p]
    unknown = [p for p in requested if p not in CPU_LEVELS]
    if unknown or not requested:
        ap.error(f"--paths: expected levels from {', '.join(CPU_LEVELS)}, got {args.paths!r}")
    unit = "CPU s" if args.threads == 1 else "wall s"
    results = {}
    failed = []
    for path in requested:
        env = dict(os.environ, EMBGEOM_CPU=path)
        cmd = [sys.executable, __file__, "--worker", "--n", str(args.n), "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{path}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            failed.append(path)
            continue
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        # (a column labelled avx512 would hold avx2's times; generic is "neon" on ARM)
        if got["isa"] != path and not (path == "generic" and got["isa"] not in CPU_LEVELS):
            print(f"{path}: skipped, this host has no {path} path (EMBGEOM_CPU={path} runs {got['isa']})")
            continue
        results[got["isa"]] = got["times"]
    if not results:
        print(f"bench_stages: no path ran ({', '.join(requested)}: "
              f"{'failed' if failed else 'not on this host'}); no table", file=sys.stderr)
        return 1
    paths = list(results)
    print(f"N = {args.n}, {args.threads} thread(s), {args.precision}, best of {args.repeats} ({unit}); "
          "cost = over the stage it adds to (bare for moments, moments for +stage, bare for full)")
    print("| configuration | " + " | ".join(f"{p} {unit} | {p} cost" for p in paths) + " |")
    print("| --- | " + " | ".join("---: | ---:" for _ in paths) + " |")
    for name in CONFIGS:
        cells = []
        for p in paths:
            r = results[p]
            base = None if name == "bare" else r["bare"] if name in ("moments", "full") else r["moments"]
            cost = "" if base is None else f"{r[name] - base:+.3f} ({100 * (r[name] / base - 1):+.0f} %)"
            cells.append(f"{r[name]:.3f} | {cost}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
