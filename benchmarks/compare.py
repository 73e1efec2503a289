"""CPU all-pairs benchmark: embgeom against the baselines of issue 3, in one run.

    python benchmarks/compare.py                       # all datasets, all providers
    python benchmarks/compare.py --data minilm --repeats 3
    python benchmarks/compare.py --data minilm --providers embgeom-exact,numpy-matmul
    python benchmarks/compare.py --data minilm --cpu-paths avx512,avx2   # the README CPU table

CPU paths: every embgeom provider runs once per vector level of the C++ core that the host
supports (EMBGEOM_CPU=avx512|avx2|generic, see `python -m embgeom.info`), each in its own
subprocess. Each path is held against baselines on that path's own OpenBLAS kernel family, as a
host of that class runs them: numpy and sklearn (OpenBLAS sgemm) on the native AVX-512 path with
both OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset together (OpenBLAS's own AVX-512 kernels), on
the AVX2 path with OPENBLAS_CORETYPE=Haswell, on the generic path with Prescott ("numpy-matmul@generic";
OpenBLAS loads its Katmai kernels for that pin, which the sgemm probe's row records).
FAISS runs once with the environment's pins kept (its bundled OpenBLAS misdetects newer CPUs
without them). --keep-coretype keeps the environment's pins for every run. Ratios, the `fast`
/ exact ratio, the statistics' cost over the bare product of the same schedule
(`embgeom-bare`: PairwiseEngine.discard_statistics) and the moments-only fraction of the path's
sgemm are printed per path. All providers and baselines are measured in one run of the script
(median of --repeats timed calls after a warm-up; 1 for the minutes-long ones).
Every CSV row records the CPU model and its instruction set in `device` ("model [features]"),
and the path in `provider` ("embgeom-exact@avx2").

Each provider runs in its own subprocess so its peak memory (ru_maxrss) is its own. Results are
checked before they are timed (embgeom's top pairs against a brute-force float64 recomputation
of the candidates), then printed as a ratio table and appended to benchmarks/results/cpu.csv.
Never run this while anything else loads the machine.

Two rooflines: the CSV's roofline_pct is GFLOP/s over the nominal FMA peak (cores x reported
clock x 32; this VM reports its 2.6 GHz TSC while the cores boost higher and Zen 5 retires two
512-bit FMAs a cycle, so it passes 100%); the printed "% of the path's sgemm" is against the best
rate of a 4096^3 OpenBLAS sgemm in the same run on the kernel family of that path's baselines.
Both count the 2*d FLOPs of each unique pair for embgeom.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

DATASETS = {
    "minilm": "default model word embeddings (30522 x 384)",
    "random768": "random normal 30522 x 768 (bert-base sized)",
    "random200k": "random normal 200000 x 384",
}
NUMPY_BLOCK = 8192
CPU_LEVELS = ("avx512", "avx2", "generic")
# OpenBLAS kernel family per level (OPENBLAS_CORETYPE); None: both pins unset, OpenBLAS's own
# choice, which on an AVX-512 host is its AVX-512 kernels
CORETYPE = {"avx512": None, "avx2": "Haswell", "generic": "Prescott"}
OPENBLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
OURS = ("embgeom-exact", "embgeom-fast", "embgeom-moments", "embgeom-bare", "embgeom-bare-fast",
        "embgeom-rowtopk", "embgeom-rowtopk-fast")
# Baselines on numpy's OpenBLAS sgemm: run once per path with that path's kernel family
# ("numpy-matmul@avx2"); FAISS (its own OpenBLAS copy) runs once with the environment's pins
BLAS_BASELINES = ("numpy-matmul", "sklearn-cosine")


def blas_env(env: dict, level: str | None, keep: bool) -> dict:
    """env with the OpenBLAS pins of a path's kernel family (level None or keep: unchanged)."""
    env = dict(env)
    if level is None or keep:
        return env
    if CORETYPE[level] is None:
        for k in OPENBLAS_PINS:
            env.pop(k, None)
    else:
        env["OPENBLAS_CORETYPE"] = CORETYPE[level]
    return env


def supported_levels() -> list[str]:
    """Vector levels of the C++ core this host supports, best first."""
    from embgeom import _C

    best = _C.cpu_info()["isa_supported"]
    return list(CPU_LEVELS[CPU_LEVELS.index(best):]) if best in CPU_LEVELS else ["generic"]
SINGLE_RUN = ("embgeom-torch", "keops-argkmin", "random200k")
FULL = dict(bins=2000, topk=10, bottomk=10, row_topk=10, outside=(-0.2, 0.2))
MOMENTS = dict(bins=0, topk=0, bottomk=0, row_topk=0, outside=None)  # moments and extremes only


def cpp_engine(x, opts: dict, precision: str = "exact", threads: int = 0, bare: bool = False):
    """The C++ engine over x (self mode) with these pairwise_stats options, not run yet; bare:
    its runs compute the schedule's products and discard the statistics (the bare product)."""
    from embgeom.backends.cpp import CppEngine
    from embgeom.engine.config import make_config

    engine = CppEngine(x, None, make_config(**opts, precision=precision), threads=threads)
    if bare:
        engine._engine.discard_statistics()
    return engine
PROVIDERS = {
    # name: (what it computes, datasets it runs on)
    "embgeom-exact": ("full M1 output, cpp exact", ("minilm", "random768", "random200k")),
    "embgeom-fast": ("full M1 output, cpp fast (bf16)", ("minilm", "random768", "random200k")),
    "embgeom-moments": ("moments and extremes only, cpp exact", ("minilm", "random768")),
    "embgeom-bare": ("the engine's unique-pair product alone (statistics discarded)", ("minilm", "random768")),
    "embgeom-bare-fast": ("the engine's bf16 unique-pair product alone", ("minilm", "random768")),
    "embgeom-rowtopk": ("per-row top-10 only, cpp exact", ("minilm", "random768")),
    "embgeom-rowtopk-fast": ("per-row top-10 only, cpp fast: bf16 filter, exact values", ("minilm", "random768")),
    "embgeom-torch": ("full M1 output, torch backend (chunked)", ("minilm",)),
    "numpy-matmul": ("normalised E @ E.T only (materialised N x N, row blocks)", ("minilm", "random768")),
    "sklearn-cosine": ("sklearn cosine_similarity (materialised N x N)", ("minilm",)),
    "faiss-flat-10nn": ("FAISS IndexFlatIP exact 10-NN of all rows", ("minilm", "random768")),
    "keops-argkmin": ("pykeops LazyTensor argKmin 10-NN", ("minilm",)),
}


def load(name: str):
    import numpy as np

    if name == "minilm":
        from safetensors import safe_open

        from embgeom.models import default_model_path

        with safe_open(os.path.join(default_model_path(), "model.safetensors"), "np") as f:
            return np.ascontiguousarray(f.get_tensor("embeddings.word_embeddings.weight"), dtype=np.float32)
    rng = np.random.default_rng(0)
    n, d = {"random768": (30522, 768), "random200k": (200000, 384)}[name]
    return rng.standard_normal((n, d), dtype=np.float32)


GEMM_PEAK_N = 4096


def gemm_peak_worker() -> dict:
    """Runs in a subprocess: best fp32 GFLOP/s of numpy's sgemm on a square product that fits."""
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_PEAK_N, GEMM_PEAK_N), dtype=np.float32)
    out = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t)
    # what numpy's OpenBLAS ran, as it reports it (a pin can load another kernel than it names:
    # Prescott loads Katmai), and its threads
    from threadpoolctl import threadpool_info

    blas = next((i for i in threadpool_info() if i.get("internal_api") == "openblas"), {})
    return {"gflops": 2.0 * GEMM_PEAK_N ** 3 / best / 1e9,
            "coretype": blas.get("architecture") or os.environ.get("OPENBLAS_CORETYPE", "autodetected"),
            "threads": int(blas.get("num_threads") or os.cpu_count() or 1)}


def pins_text(env: dict) -> str:
    return ",".join(f"{k}={env.get(k, 'unset')}" for k in OPENBLAS_PINS)


def measured_gemm_peak(env: dict, level: str, rows: list) -> float | None:
    """GFLOP/s of a 4096^3 OpenBLAS sgemm on both cores under env's OpenBLAS pins, in its own
    process; its row (provider numpy-sgemm-probe@level) joins `rows`, the CSV's, since every
    "% of the path's sgemm" is against it."""
    proc = subprocess.run([sys.executable, __file__, "--worker", "gemm-peak"], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  fp32 GEMM peak probe: {r['gflops']:.0f} GFLOP/s (OpenBLAS sgemm {GEMM_PEAK_N}^3, "
          f"kernel {r['coretype']})")
    seconds = 2.0 * GEMM_PEAK_N ** 3 / r["gflops"] / 1e9
    rows.append({"metric": "sgemm_peak_probe", "provider": f"numpy-sgemm-probe@{level}", "n": GEMM_PEAK_N,
                 "m": GEMM_PEAK_N, "d": GEMM_PEAK_N, "dtype": "float32", "device": common.cpu_device(),
                 "threads": r["threads"], "median_ms": seconds * 1e3, "tflops": r["gflops"] / 1e3,
                 "versions": f"{common.versions()} {pins_text(env)}", "git_sha": common.git_sha(),
                 "date": common.today()})
    return r["gflops"]


def row_pins(level: str, keep: bool) -> str:
    """How a path's BLAS baselines ran, in words."""
    if keep:
        return "the environment's OpenBLAS pins"
    if CORETYPE[level] is None:
        return "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset: OpenBLAS's own kernels"
    return f"OPENBLAS_CORETYPE={CORETYPE[level]}"


def worker(provider: str, data: str, repeats: int) -> dict:
    """Runs in a subprocess: check, time, report one provider on one dataset."""
    import numpy as np
    import torch

    import embgeom

    x = load(data)
    n, d = x.shape
    threads = torch.get_num_threads()
    pairs = n * (n - 1) // 2
    flops = 2.0 * pairs * d  # unique pairs: what the answer needs
    xt = torch.from_numpy(x)

    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)

    if provider.startswith("embgeom"):
        opts = dict(FULL)
        kw = {"backend": "cpp"}
        if provider in ("embgeom-fast", "embgeom-rowtopk-fast", "embgeom-bare-fast"):
            kw["precision"] = "fast"
        if provider == "embgeom-torch":
            kw = {"backend": "torch"}
        if provider.startswith("embgeom-rowtopk"):
            opts = dict(bins=0, topk=0, bottomk=0, row_topk=10)
        if provider in ("embgeom-moments", "embgeom-bare", "embgeom-bare-fast"):
            opts = dict(MOMENTS)
        result = embgeom.pairwise_stats(xt, **opts, **kw)
        if provider == "embgeom-rowtopk-fast":  # the same lists as exact mode, bit for bit
            exact = embgeom.pairwise_stats(xt, **opts, backend="cpp").row_topk
            assert torch.equal(exact.indices, result.row_topk.indices)
            assert torch.equal(exact.values, result.row_topk.values)
        if not provider.startswith("embgeom-bare"):
            # float64: the count and histogram total, every listed pair's value, and 32 rows'
            # lists against those rows' exact values over every column (missing a neighbour fails)
            from verify import recheck

            check = recheck(result, xt, tol=1e-4, sample_rows=32)
            assert check["ok"], f"{provider}: {'; '.join(check['failures'])}"
        run = lambda: embgeom.pairwise_stats(xt, **opts, **kw)  # noqa: E731
        if provider.startswith("embgeom-bare"):
            def run():
                engine = cpp_engine(xt, opts, kw.get("precision", "exact"), bare=True)
                engine.run(0, engine.num_tiles())
    elif provider == "numpy-matmul":
        u = unit(x)
        # One `u @ u.T` call segfaults inside OpenBLAS 0.3.31's SkylakeX sgemm on this AMD CPU when
        # the output passes 2^31 bytes (unless OPENBLAS_CORETYPE picks another kernel). Row blocks
        # written into one preallocated N x N matrix run the same fast kernel on the same work.
        def run():
            out = np.empty((n, n), np.float32)
            for i in range(0, n, NUMPY_BLOCK):
                np.matmul(u[i:i + NUMPY_BLOCK], u.T, out=out[i:i + NUMPY_BLOCK])
            return out
        flops = 2.0 * n * n * d
    elif provider == "sklearn-cosine":
        from sklearn.metrics.pairwise import cosine_similarity

        run = lambda: cosine_similarity(x)  # noqa: E731
        flops = 2.0 * n * n * d
    elif provider == "faiss-flat-10nn":
        import faiss

        u = np.ascontiguousarray(unit(x))
        index = faiss.IndexFlatIP(d)
        index.add(u)
        run = lambda: index.search(u, 11)  # noqa: E731  (11: the row itself comes back first)
        flops = 2.0 * n * n * d
    elif provider == "keops-argkmin":
        from pykeops.torch import LazyTensor

        u = torch.from_numpy(unit(x))
        xi, xj = LazyTensor(u[:, None, :]), LazyTensor(u[None, :, :])
        run = lambda: (-(xi * xj).sum(-1)).argKmin(11, dim=1)  # noqa: E731
        flops = 2.0 * n * n * d
    else:
        raise ValueError(f"unknown provider {provider}")
    if provider in SINGLE_RUN or data in SINGLE_RUN:
        repeats = 1  # minutes per run: one timed run (after the checked run for embgeom)
    timing = common.timeit(run, repeats=repeats, warmup=0 if repeats == 1 else 1)
    seconds = timing["median_ms"] / 1e3
    peak = common.cpu_fp32_peak_gflops(threads)
    gflops = flops / seconds / 1e9
    from embgeom import _C

    info = _C.cpu_info()
    path = os.environ.get("EMBGEOM_CPU")
    name = f"{provider}@{path}" if path else provider
    if provider in OURS:  # (the engine's own kernels: a baseline's line would describe embgeom)
        print(f"  [{name}] level {info['isa']}, product {info['gemm_fast' if 'fast' in provider else 'gemm_exact']}, "
              f"fused pass {info['fused_pass']}, blas {info['blas']}", file=sys.stderr)
    return {"metric": "pairwise_cosine", "provider": name, "n": n, "m": n, "d": d, "dtype": "float32",
            "device": common.cpu_device(), "threads": threads, **timing,
            "pairs_per_s": pairs / seconds, "tflops": gflops / 1e3,
            "roofline_pct": 100.0 * gflops / peak, "peak_mb": common.peak_rss_mb(),
            "versions": common.versions(), "git_sha": common.git_sha(), "date": common.today()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=",".join(DATASETS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per provider run")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--cpu-paths", default="all",
                        help="comma list of EMBGEOM_CPU levels for the embgeom providers "
                             "(avx512,avx2,generic), or 'all' = every level this host supports")
    parser.add_argument("--keep-coretype", action="store_true",
                        help="keep the environment's OpenBLAS pins for every run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(gemm_peak_worker() if args.worker == "gemm-peak" else worker(args.worker, args.data, args.repeats)))
        return 0
    rows = []
    for data in args.data.split(","):
        if data not in DATASETS:
            parser.error(f"--data: expected names from {', '.join(DATASETS)}, got {data!r}")
    levels = supported_levels() if args.cpu_paths == "all" else args.cpu_paths.split(",")
    for lv in levels:
        if lv not in CPU_LEVELS:
            parser.error(f"--cpu-paths: expected levels from {', '.join(CPU_LEVELS)}, got {lv!r}")
        if lv not in supported_levels():
            # EMBGEOM_CPU only caps the level: the row would say avx512 for what ran avx2
            parser.error(f"--cpu-paths: this host has no {lv} path (it has {', '.join(supported_levels())})")
    # per path, the sgemm of the kernel family that path's baselines use
    path_peak = {lv: measured_gemm_peak(blas_env(os.environ, lv, args.keep_coretype), lv, rows) for lv in levels}
    pins = {k: os.environ.get(k, "unset") for k in OPENBLAS_PINS}
    print(f"CPU paths: {', '.join(levels)}; environment pins {pins} (kept for FAISS)")
    for data in args.data.split(","):
        print(f"\n== {data}: {DATASETS[data]}")
        results = {}
        jobs = []
        for provider in args.providers.split(","):
            if provider not in PROVIDERS:
                parser.error(f"--providers: unknown provider {provider!r}")
            if data not in PROVIDERS[provider][1]:
                continue
            if provider in OURS or provider in BLAS_BASELINES:
                jobs += [(provider, lv) for lv in levels]
            else:
                jobs.append((provider, None))
        for provider, level in jobs:
            cmd = [sys.executable, __file__, "--worker", provider, "--data", data, "--repeats", str(args.repeats)]
            env = dict(os.environ)
            key = provider if level is None else f"{provider}@{level}"
            if level is not None:
                env["EMBGEOM_CPU"] = level  # (names the row "provider@level" for baselines)
                if provider in BLAS_BASELINES:
                    env = blas_env(env, level, args.keep_coretype)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                print(f"  {key:28} timed out after {args.timeout}s")
                continue
            if proc.returncode < 0 and provider == "sklearn-cosine":
                # one N x N GEMM call: OpenBLAS 0.3.31's own AVX-512 kernel crashed past 2^31
                # output bytes on an AMD Zen 4 (numpy-matmul splits the call); an Intel host ran it
                print(f"  {key:28} crashed (signal {-proc.returncode}): OpenBLAS's one N x N call")
                continue
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                print(f"  {key:28} skipped: {last[:160]}")
                continue
            for line in proc.stderr.splitlines():
                if line.startswith("  ["):
                    print(line)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["versions"] += " " + pins_text(env)  # the CSV's column for the environment
            results[key] = row
            rows.append(row)
            print(f"  {key:28} {row['median_ms'] / 1e3:8.2f} s  {row['pairs_per_s'] / 1e6:9.1f} Mpairs/s  "
                  f"{row['tflops'] * 1e3:7.1f} GFLOP/s  peak {row['peak_mb']:7.0f} MiB  ({PROVIDERS[provider][0]})")
        for lv in levels:
            print(f"  -- path {lv} (baselines: {row_pins(lv, args.keep_coretype)})")
            seconds = {p: results[f"{p}@{lv}"]["median_ms"] / 1e3 for p in OURS + BLAS_BASELINES
                       if f"{p}@{lv}" in results}
            for p in ("embgeom-moments", "embgeom-exact"):
                if p in seconds and path_peak.get(lv):
                    gflops = results[f"{p}@{lv}"]["tflops"] * 1e3
                    print(f"  {p}@{lv}: {100 * gflops / path_peak[lv]:.0f}% of the path's sgemm "
                          f"({path_peak[lv]:.0f} GFLOP/s; unique pairs counted)")
            pairs = [("embgeom-exact", "embgeom-bare", "full statistics / bare product"),
                     ("embgeom-moments", "embgeom-bare", "moments only / bare product"),
                     ("embgeom-fast", "embgeom-exact", "fast / exact"),
                     ("embgeom-fast", "embgeom-bare-fast", "fast / its bare bf16 product"),
                     ("embgeom-bare-fast", "embgeom-bare", "bare bf16 product / bare fp32 product"),
                     ("embgeom-exact", "numpy-matmul", "exact / numpy E @ E.T"),
                     ("embgeom-exact", "sklearn-cosine", "exact / sklearn")]
            for a, b, what in pairs:
                if a in seconds and b in seconds:
                    print(f"  ratio {what}: {seconds[a] / seconds[b]:.3f}")
            for a in ("embgeom-rowtopk", "embgeom-rowtopk-fast"):
                for b in ("faiss-flat-10nn", "keops-argkmin"):  # (the same row top-10 work)
                    if a in seconds and b in results:
                        t = results[b]["median_ms"] / 1e3
                        print(f"  ratio {b} / {a}@{lv}: {t / seconds[a]:.2f}x (embgeom that many times faster)")
            if "embgeom-exact" in seconds and "embgeom-torch" in results:
                print(f"  ratio exact / torch backend: {seconds['embgeom-exact'] / (results['embgeom-torch']['median_ms'] / 1e3):.3f}")
    if rows and not args.no_csv:
        path = common.append_rows("cpu.csv", rows)
        print(f"\nappended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
