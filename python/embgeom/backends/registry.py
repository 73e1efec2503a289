"""Backend registry and dispatch.

Order: `backend=` argument > `EMBGEOM_BACKEND` > auto (triton > cuda on CUDA tensors > cpp on
CPU > torch; auto passes over an op that failed its check on a real GPU, FAILED_ON_DEVICE). Each
backend answers `reasons(op, x) -> list[str]`: why it cannot run this call; the first with none
wins. Compiled modules and optional packages load lazily, so importing
embgeom never fails; an ImportError becomes a reason that says how to fix it.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch


log = logging.getLogger("embgeom")

# triton before cuda: the cuda engine is triton's with a CUDA top-k merge, not yet measured faster
AUTO_ORDER = ("triton", "cuda", "cpp", "torch")
ALL_BACKENDS = AUTO_ORDER + ("reference",)
# (backend, op) -> what failed when it last ran on a real GPU. Auto-dispatch passes over these on
# CUDA tensors (results must be right before they are fast); backend= by name still runs them,
# for the next `make gpu-check` and for benchmarks. An entry goes when that check passes.
GPU_CHECK_LOG = "benchmarks/results/gpu_check_2026-12-04_h200.log"
FAILED_ON_DEVICE = {
    (name, "pairwise_stats"): (
        f"failed on an NVIDIA H200 (2026-12-04, Triton 3.6.0; the source repository's {GPU_CHECK_LOG}): "
        "its cross-mode tests failed and a fast-precision test did not finish in its 120 s; auto-dispatch uses 'torch' on "
        "CUDA tensors until `make gpu-check` passes (asked for by name, backend=, it still runs)")
    for name in ("triton", "cuda")
}
# backend= name -> its module in this package (a new backend is added here too)
MODULES = {"cpp": "cpp", "torch": "torch", "reference": "float64", "triton": "triton", "cuda": "cuda"}

import_errors: dict[str, str] = {}  # module -> why it did not import (shown by embgeom.info)
_modules: dict[str, object] = {}


def load(module: str, fix: str):
    """Import once; on failure remember a readable reason (returned as None)."""
    if module in _modules:
        return _modules[module]
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason, never a crash
        import_errors[module] = f"{module} not importable ({type(exc).__name__}: {exc}); {fix}"
        mod = None
    _modules[module] = mod
    return mod


def import_reason(module: str) -> str:
    return import_errors.get(module, f"{module} not importable")


def cpp():
    # (forked children run it on one thread: registered at `import embgeom`, for torch's runtime)
    return load("embgeom._C", "rebuild with `pip install -e .` (needs cmake and a C++ compiler)")


def cpp_kernel(name: str, *tensors: torch.Tensor):
    """The C++ core's function `name` where every tensor given is a CPU float32 one and the built
    module has it (the text kernels of `embgeom text`; no tensors: the built module alone decides),
    else None: the caller's torch path."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return getattr(cpp(), name, None)


def numerics(backend: str, device: torch.device, precision: str) -> dict:
    """What decides a run's float results besides its input and settings: the product kernel and
    the pass over its values (the C++ core's vector level; OpenBLAS's build and core type where
    the product is its sgemm), torch / Triton versions, the GPU. A checkpoint records it, so a
    run is never resumed on other arithmetic (its numbers would mix two runs' roundings)."""
    out: dict = {"backend": backend}
    if backend == "cpp" and cpp() is not None and hasattr(cpp(), "cpu_info"):
        info = dict(cpp().cpu_info())
        product = info["gemm_fast" if precision == "fast" else "gemm_exact"]
        out.update(product=product, fused_pass=info["fused_pass"])
        if "blas" in product:
            out["blas"] = info["blas"]
    else:
        out["torch"] = torch.__version__
        if backend == "triton":
            out["triton"] = getattr(importlib.import_module("triton"), "__version__", None)
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
    return out


def cuda_ext():
    return load("embgeom._cuda", "rebuild with nvcc on PATH and EMBGEOM_CUDA=auto|on")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Backend:
    name: str
    base_reasons: Callable[[torch.Tensor], list[str]]
    ops: dict[str, tuple[Callable, Callable | None]] = field(default_factory=dict)

    def reasons(self, op: str, x: torch.Tensor, **kw) -> list[str]:
        if op not in self.ops:
            return [f"{self.name} has no {op} kernel"]
        out = self.base_reasons(x)
        if out:
            return out
        extra = self.ops[op][1]
        return extra(x, **kw) if extra else []


def _cpp_reasons(x: torch.Tensor) -> list[str]:
    out = []
    if x.device.type != "cpu":
        out.append(f"cpp runs on CPU tensors, got {x.device}")
    if cpp() is None:
        out.append(import_reason("embgeom._C"))
    return out


def _cuda_device_reasons(x: torch.Tensor) -> list[str]:
    if torch.version.cuda is None and not torch.cuda.is_available():
        # (a GPU would not help: this torch has no CUDA at all)
        return [f"this torch is a CPU-only build ({torch.__version__}); a CUDA build of torch is needed"]
    if not torch.cuda.is_available():
        return ["no usable CUDA device (torch.cuda.is_available() is False)"]
    if x.device.type != "cuda":
        return [f"needs CUDA tensors, got {x.device}"]
    return []


def _cuda_reasons(x: torch.Tensor) -> list[str]:
    out = _cuda_device_reasons(x)
    if not out and cuda_ext() is None:
        out.append(import_reason("embgeom._cuda"))
    return out


def _triton_reasons(x: torch.Tensor) -> list[str]:
    if load("triton", "pip install triton") is None:
        return [import_reason("triton")]
    if triton_interpreting() and x.device.type == "cpu":
        return []
    return _cuda_device_reasons(x)


BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", _cuda_reasons),
    "triton": Backend("triton", _triton_reasons),
    "cpp": Backend("cpp", _cpp_reasons),
    "torch": Backend("torch", lambda x: []),
    "reference": Backend("reference", lambda x: []),
}


def register(backend: str, op: str, run: Callable, reasons: Callable | None = None) -> None:
    """reasons(x, **call_options) -> list[str] adds op-specific limits (e.g. precision)."""
    BACKENDS[backend].ops[op] = (run, reasons)


def pick(op: str, x: torch.Tensor, backend: str | None = None, **kw) -> tuple[str, Callable]:
    """Return (name, run) of the backend for this call; raise ValueError listing why not."""
    ensure_registered()
    requested = backend if backend is not None else os.environ.get("EMBGEOM_BACKEND") or None
    if requested == "auto":  # (the name the help gives the default)
        requested = None
    if requested is not None:
        given = "backend" if backend is not None else "EMBGEOM_BACKEND (the environment)"
        if requested not in BACKENDS:
            raise ValueError(f"{given}: expected one of {', '.join(ALL_BACKENDS)}, got {requested!r}")
        why = BACKENDS[requested].reasons(op, x, **kw)
        if why:
            raise ValueError(f"{given}: {requested!r} cannot run {op}: " + "; ".join(why))
        return requested, BACKENDS[requested].ops[op][0]
    skipped = []
    for name in AUTO_ORDER:
        if name == "triton" and x.device.type == "cpu":  # (before its reasons, which import triton: 0.3 s)
            why = ["the Triton interpreter runs on CPU tensors only when backend='triton' is asked for"]
        else:
            why = BACKENDS[name].reasons(op, x, **kw)
        if not why and x.device.type == "cuda" and (name, op) in FAILED_ON_DEVICE:
            why = [FAILED_ON_DEVICE[(name, op)]]
        if not why:
            return name, BACKENDS[name].ops[op][0]
        skipped.append(f"{name}: {'; '.join(why)}")
        log.debug("embgeom %s: skipping %s: %s", op, name, "; ".join(why))
    raise ValueError(f"no backend can run {op}: " + " | ".join(skipped))


_registered = False
_registering = threading.RLock()
_registering_here = threading.local()   # .active: this thread is importing the backends


def ensure_registered() -> None:
    """Backends register their ops on first use (keeps `import embgeom` light). Marked done only
    once every module has registered, under a lock: threads making their first call at once had
    found the flag set while the imports ran, and no backend ("no backend can run
    pairwise_stats"). (Re-entrant: a backend's import may ask again.)"""
    global _registered
    if _registered:
        return
    with _registering:
        if _registered or getattr(_registering_here, "active", False):   # (asked again by an import in flight)
            return
        _registering_here.active = True
        try:
            for module in MODULES.values():
                # each backend's module registers its ops on import
                importlib.import_module(f"{__package__}.{module}")
        finally:
            _registering_here.active = False
        _registered = True


def usable_report() -> list[dict]:
    """For `python -m embgeom.info`: per backend and op, built/usable and why not."""
    ensure_registered()
    probe_cpu = torch.zeros(1, 1)
    probe = torch.zeros(1, 1, device="cuda") if torch.cuda.is_available() else probe_cpu
    rows = []
    for name in ALL_BACKENDS:
        b = BACKENDS[name]
        for op in sorted(b.ops):
            why_cpu = b.reasons(op, probe_cpu)
            why_gpu = b.reasons(op, probe) if probe is not probe_cpu else ["no usable CUDA device"]
            rows.append({"backend": name, "op": op, "cpu": not why_cpu, "cuda": not why_gpu,
                         "why_not_cpu": "; ".join(why_cpu), "why_not_cuda": "; ".join(why_gpu),
                         "auto_passes_over_on_cuda": FAILED_ON_DEVICE.get((name, op), "")})
    return rows
