"""`python -m embgeom.info`: versions, what is built, and what is usable here (and why not)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absence is information here
        return None
    return getattr(mod, "__version__", "installed")


# optional distributions -> what they enable (versions read from their metadata: importing
# umap-learn alone takes seconds)
OPTIONAL = (("plotly", "interactive pages"), ("tqdm", "progress bars"), ("ipywidgets", "progress bars in notebooks"),
            ("pandas", "to_pandas"),
            ("scikit-learn", "embgeom.sklearn, text --clark-js"), ("umap-learn", "project --method umap"),
            ("openTSNE", "project --method tsne"), ("scipy", "t-SNE, sparse graphs"),
            ("conllu", "syntax"), ("threadpoolctl", "text --matrices in parallel"))


def _distribution(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gemm_kernel(c) -> str | None:
    """The tile-GEMM micro-kernel the runtime CPU check picked (e.g. avx512-14x32)."""
    if c is None or not hasattr(c, "PairwiseEngine"):
        return None
    import torch

    from .backends.cpp import CppEngine
    from .engine.config import DEFAULTS

    return CppEngine(torch.ones(1, 1), None, DEFAULTS).kernel


def collect() -> dict:
    import torch

    from . import __version__
    from .backends import registry

    c = registry.cpp()
    built = {
        "_C": c is not None,
        "_C.openmp": bool(getattr(c, "openmp", False)),
        "_C.threads": c.max_threads() if c is not None else 0,
        "_C.pairwise_engine": hasattr(c, "PairwiseEngine"),
        "_C.gemm_kernel": _gemm_kernel(c),
        "_cuda": registry.cuda_ext() is not None,
    }
    cpu = dict(c.cpu_info()) if c is not None and hasattr(c, "cpu_info") else None
    return {
        "embgeom": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": {m: _version(m) for m in ("numpy", "triton", "faiss", "transformers", "safetensors", "matplotlib")},
        "optional": {name: {"version": _distribution(name), "for": use} for name, use in OPTIONAL},
        "env": {k: os.environ.get(k) for k in ("EMBGEOM_BACKEND", "EMBGEOM_CPU", "EMBGEOM_GEMM", "EMBGEOM_OPENBLAS",
                                               "OPENBLAS_CORETYPE", "TRITON_INTERPRET", "OMP_NUM_THREADS")},
        "built": built,
        "cpu": cpu,
        "import_errors": dict(registry.import_errors),
        "backends": registry.usable_report(),
    }


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(args) -> int:
    """`embgeom info` and `python -m embgeom.info`: what is built and usable, and why not."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the first thing an install check must say
        from . import __version__
        from .formatting import first_line

        raise ValueError(f"torch cannot be imported here ({first_line(exc, typed=True)}); embgeom {__version__} "
                         f"needs torch >= 2.4 (pip install torch); python {platform.python_version()} at "
                         f"{sys.executable}") from None
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"embgeom {info['embgeom']}  python {info['python']}  torch {info['torch']}")
    print(f"CUDA usable: {info['cuda_available']}" + (f" ({info['cuda_device']})" if info["cuda_device"] else ""))
    print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in info["packages"].items()))
    print("optional: " + ", ".join(f"{k} {v['version'] or '-'} ({v['for']})" for k, v in info["optional"].items()))
    print("built: " + ", ".join(f"{k}={v}" for k, v in info["built"].items()))
    cpu = info["cpu"]
    if cpu:
        cap = cpu["cap"] or "none (EMBGEOM_CPU=avx512|avx2|generic)"
        print(f"cpu: {cpu['cpu_features'] or '-'}; vector level {cpu['isa']} (supported {cpu['isa_supported']}, cap {cap})")
        print(f"  blas: {cpu['blas']}")
        print(f"  pairwise exact: product {cpu['gemm_exact']}, fused pass {cpu['fused_pass']}")
        print(f"  pairwise fast:  product {cpu['gemm_fast']}, fused pass {cpu['fused_pass']}")
        print(f"  attention_entropy: {cpu['entropy']}; cone_index: {cpu['cone_index']}")
        if "context_argmax" in cpu:  # the text kernels of `embgeom text` (context similarity, evolution)
            print(f"  text: context_argmax {cpu['context_argmax']}; row_pair_sums {cpu.get('row_pair_sums', 'n/a')}; "
                  f"attention_sums {cpu.get('attention_sums', 'n/a')}; js_pair_sums {cpu.get('js_pair_sums', 'n/a')}; "
                  f"--matrices: eigenvalues {cpu.get('eigvals', 'n/a')}, Gram counts "
                  f"{cpu.get('sym_tridiagonal', 'n/a')}")
        from .index import BF16_ROWS_SCAN, ENGINE_BATCH, ENGINE_BATCH_BF16, ENGINE_PREPARE_QUERIES, SMALL_BATCH

        scan = f"rows_dot {cpu.get('rows_dot', 'n/a')}"
        bf16 = cpu.get("gemm_fast_bf16", False)
        more = f"bf16 product from {ENGINE_BATCH_BF16}" if bf16 else "as float32 (no bf16 product here)"
        f32 = (f"{cpu['gemm_fast'].split()[0]} filter, exact fp32 lists," if bf16 else cpu["gemm_exact"])
        print(f"  Index search (cosine/dot): up to {SMALL_BATCH} queries one call of the core (few_search: a scan "
              f"of the rows, {scan}, the selection and the rescoring), more the "
              f"pairwise engine on rows prepared once; float32: {f32} from {ENGINE_BATCH} queries (a first "
              f"search of new rows from {ENGINE_PREPARE_QUERIES}); "
              f"bfloat16: up to {BF16_ROWS_SCAN} queries its bf16 rows, more {more}; "
              f"exact rescoring: pair_values {cpu.get('pair_values', 'n/a')}, "
              f"pair_cosines {cpu.get('pair_cosines', 'n/a')}")
    print(f"{'backend':10} {'op':18} {'CPU':4} {'CUDA':4}  why not")
    for row in info["backends"]:
        why = row["why_not_cpu"] or row["why_not_cuda"]
        if row["why_not_cpu"] and row["why_not_cuda"] and row["why_not_cpu"] != row["why_not_cuda"]:
            why = f"cpu: {row['why_not_cpu']}; cuda: {row['why_not_cuda']}"
        print(f"{row['backend']:10} {row['op']:18} {'yes' if row['cpu'] else 'no':4} {'yes' if row['cuda'] else 'no':4}  {why}")
    failed = {row["auto_passes_over_on_cuda"] for row in info["backends"] if row["auto_passes_over_on_cuda"]}
    for note in sorted(failed):
        names = [f"{r['backend']} {r['op']}" for r in info["backends"] if r["auto_passes_over_on_cuda"] == note]
        print(f"not picked automatically on CUDA ({', '.join(names)}): {note}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="python -m embgeom.info")
    add_arguments(_parser)
    try:
        raise SystemExit(main(_parser.parse_args()))
    except ValueError as exc:  # a bad EMBGEOM_CPU / EMBGEOM_GEMM: one line, as `embgeom info` says it
        print(f"embgeom: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # (`| head`: the reader left; nothing more to say to it)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
