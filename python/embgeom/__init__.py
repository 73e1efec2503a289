"""embgeom: a metric engine for the geometry of transformer embeddings."""
import time as _time
from typing import TYPE_CHECKING, Any

# when this package began importing (time.perf_counter): a command's total wall time counts from
# here, the interpreter's start being a few milliseconds earlier (cli.main, provenance)
IMPORTED_AT = _time.perf_counter()


def _source_kernels() -> None:
    """embgeom.kernels is the top-level kernels/ folder under every way of running: installs map
    it there (setup.py package_dir); a source checkout on PYTHONPATH=python (gpu_check.sh, this
    tree's tests beside another editable install) gets the same folder here, not a link or a
    second import name. The folder has no __init__.py: as a regular package it was importable as
    `kernels` from the repository root and hid the PyPI package of that name (which transformers
    >= 5.25 imports)."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parents[1] / "kernels"
    if "embgeom.kernels" in sys.modules or (here / "kernels").exists() or not (src / "triton").is_dir():
        return
    spec = importlib.machinery.ModuleSpec("embgeom.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(src)]
    sys.modules["embgeom.kernels"] = importlib.util.module_from_spec(spec)


_source_kernels()


def _torch_threads_in_forked_children() -> None:
    """From `import embgeom` on, a child forked after the parent's threads started runs torch (the
    OpenMP runtime the core shares) on one thread: registered at the first call into the core
    before, a parent whose pool torch alone had started (a forward pass) forked children that hung
    in their first call. torch is not imported for it: the child sets it only where it is loaded."""
    import sys

    from .threads import one_thread_in_forked_children

    def set_threads(n: int) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(n)

    one_thread_in_forked_children("torch", set_threads)


_torch_threads_in_forked_children()
# Every public name loads its module on first use (PEP 562): `embgeom --help` and a Ctrl-C at
# a command's start answer before torch has loaded (cli.main), and `import embgeom` stays cheap.
_EXPORTS = {
    "knn": ".neighbours",
    "ConeAccumulator": ".api", "attention_entropy": ".api", "cone_index": ".api",
    "cone_index_stream": ".api", "pairwise_stats": ".api",
    "load_model": ".models",
    "Index": ".index", "pairs_above": ".index",
    "read_pairs": ".pair_shards",
    "communities": ".community_detection",
    "AttentionEntropy": ".results", "ConeIndex": ".results", "Histogram": ".results",
    "PairList": ".results", "PairwiseStats": ".results", "RowTopK": ".results",
    "trace": ".analysis.text.trace", "TraceResult": ".analysis.text.trace",
    "project": ".analysis.clouds.projection", "Projection": ".analysis.clouds.projection",
    "KnnResult": ".neighbours",
}
# drop-ins: submodules whose library loads on first use
_DROP_INS = ("compat", "sklearn", "faiss")

if TYPE_CHECKING:  # what type checkers see of the lazy names above (tests/test_typing.py keeps them equal)
    from . import compat as compat, faiss as faiss, sklearn as sklearn
    from .analysis.clouds.projection import Projection as Projection, project as project
    from .analysis.text.trace import TraceResult as TraceResult, trace as trace
    from .api import (ConeAccumulator as ConeAccumulator, attention_entropy as attention_entropy,
                      cone_index as cone_index, cone_index_stream as cone_index_stream,
                      pairwise_stats as pairwise_stats)
    from .community_detection import communities as communities
    from .index import Index as Index, pairs_above as pairs_above
    from .models import load_model as load_model
    from .neighbours import KnnResult as KnnResult, knn as knn
    from .pair_shards import read_pairs as read_pairs
    from .results import (AttentionEntropy as AttentionEntropy, ConeIndex as ConeIndex, Histogram as Histogram,
                          PairList as PairList, PairwiseStats as PairwiseStats, RowTopK as RowTopK)

__version__ = "0.1.0"

__all__ = [
    "__version__", "pairwise_stats", "cone_index", "cone_index_stream", "ConeAccumulator",
    "attention_entropy", "load_model", "trace", "knn", "project",
    "Index", "pairs_above", "read_pairs", "communities",
    "PairwiseStats", "PairList", "Histogram", "RowTopK", "ConeIndex", "AttentionEntropy",
    "TraceResult", "Projection", "KnnResult",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _DROP_INS:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'embgeom' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_DROP_INS))
