"""embgeom: a metric engine for the geometry of transformer embeddings."""
# knn is imported eagerly (faiss itself loads on first call)
from .neighbours import knn
from .api import ConeAccumulator, attention_entropy, cone_index, cone_index_stream, pairwise_stats
from .models import load_model
from .index import Index, pairs_above
from .pair_shards import read_pairs
from .communities import communities
from .results import AttentionEntropy, ConeIndex, Histogram, PairList, PairwiseStats, RowTopK

__version__ = "0.1.0"

__all__ = [
    "__version__", "pairwise_stats", "cone_index", "cone_index_stream", "ConeAccumulator",
    "attention_entropy", "load_model", "trace", "knn", "project",
    "Index", "pairs_above", "read_pairs", "communities",
    "PairwiseStats", "PairList", "Histogram", "RowTopK", "ConeIndex", "AttentionEntropy",
]


def __getattr__(name):
    # heavy optional parts (transformers, faiss) load on first use
    if name == "trace":
        from .analysis.text.trace import trace

        return trace
    if name == "project":
        from .analysis.clouds.projection import project

        return project
    if name in ("compat", "sklearn", "faiss"):  # drop-ins: their library loads on first use
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'embgeom' has no attribute {name!r}")
