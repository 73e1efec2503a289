"""Shared benchmark plumbing: timing, versions, the results CSV, machine roofline."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ["metric", "provider", "n", "m", "d", "dtype", "device", "threads", "median_ms", "p20_ms",
          "p80_ms", "pairs_per_s", "tflops", "roofline_pct", "peak_mb", "versions", "git_sha", "date"]


def timeit(fn, repeats: int = 3, warmup: int = 1) -> dict:
    """Run fn warmup + repeats times; median / p20 / p80 wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return {"median_ms": statistics.median(times), "p20_ms": pct(0.2), "p80_ms": pct(0.8)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far in MiB (2^20 bytes; Linux reports KiB): the
    CSV column peak_mb and the scripts' "MiB" hold this."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_sha() -> str:
    """The commit, "+dirty" after it when tracked files differ from it: a row measured on
    uncommitted code says so."""
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here).stdout.strip()
        if not sha:
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here).stdout.strip()
        return sha + "+dirty" if changed else sha
    except OSError:
        return "unknown"


def versions() -> str:
    import numpy
    import torch

    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}", f"numpy={numpy.__version__}"]
    for mod in ("embgeom", "faiss", "sklearn", "triton", "pykeops"):
        try:
            m = __import__(mod)
            parts.append(f"{mod}={getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - absent is fine
            pass
    # the projection and text baselines by their distributions' metadata: importing them (numba,
    # transformers) costs seconds and memory that every later row's peak RSS would then hold
    for dist in ("openTSNE", "umap-learn", "sentence-transformers", "transformers"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " ".join(parts)


def cpu_name() -> str:
    """The CPU's model name, with its x86 family and model numbers where /proc/cpuinfo has them:
    a virtual machine's name ("AMD EPYC") does not tell a Zen 4 host from a Zen 5 one."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "cpu"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_device() -> str:
    """The CSV rows' `device` for a CPU run: the model and its instruction set ("model [features]",
    from the C++ core; the model alone without it): which host class a number comes from."""
    try:
        from embgeom import _C

        return f"{cpu_name()} [{_C.cpu_info()['cpu_features']}]"
    except ImportError:
        return cpu_name()


def cpu_level() -> str:
    """The vector level embgeom's C++ core runs in this process (avx512, avx2, generic):
    EMBGEOM_CPU only caps it, so a host without AVX-512 runs avx2 under EMBGEOM_CPU=avx512."""
    from embgeom import _C

    return _C.cpu_info()["isa"]


def provenance(device="cpu", threads: int | None = None) -> dict:
    """The CSV columns that say where a number comes from: device ("cpu <model> [<instruction
    set>]", or "cuda:0 <GPU name>"), threads (torch's, what the run used, unless given),
    versions (with "cpu_path=<level>", the C++ core's level actually run, for CPU rows),
    git_sha ("+dirty" on uncommitted code) and date."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        where, tail = f"{dev} {torch.cuda.get_device_name(dev)}", ""
    else:
        where, tail = f"cpu {cpu_device()}", f" cpu_path={cpu_level()}"
    return {"device": where, "threads": torch.get_num_threads() if threads is None else threads,
            "versions": versions() + tail, "git_sha": git_sha(), "date": today()}


def say_missing(module: str) -> None:
    """In a benchmark's child process: the optional library a provider needs is not installed
    (the parent, missing_module, then says so and goes on instead of failing)."""
    print(f"MISSING {module}", flush=True)


def missing_module(stdout: str) -> str | None:
    """The module a child said was missing (say_missing), or None."""
    return next((ln[len("MISSING "):] for ln in stdout.splitlines() if ln.startswith("MISSING ")), None)


def cpu_fp32_peak_gflops(threads: int) -> float:
    """Dense fp32 FMA peak: cores x GHz x flops/cycle (32 with two 256-bit or one 512-bit FMA
    pipe pair, AVX-512/AVX2 FMA; 16 otherwise). A ceiling for the roofline column."""
    ghz = 0.0
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                ghz = float(line.split(":")[1]) / 1000
                break
    except OSError:
        pass
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    per_cycle = 32 if (" avx512f" in flags or " fma" in flags) else 16
    return threads * (ghz or 2.5) * per_cycle


def append_rows(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in HEADER})
    return path


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
