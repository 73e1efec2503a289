"""Settings of one all-pairs run: what to compute and how (validated by api.make_config)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

METRICS = ("cosine", "dot", "euclidean")
PRECISIONS = ("exact", "fast")


# Tile edge (rows and columns per tile). 512 x 512 tiles measured 5-8 % faster than 256 in the
# C++ engine on the 30,522 x 384 default vocabulary, exact and fast; a tile's buffers stay ~1 MB.
DEFAULT_BLOCK = 512


@dataclass(frozen=True)
class PairwiseConfig:
    metric: str = "cosine"
    bins: int = 2000
    lo: float = -1.0
    hi: float = 1.0
    topk: int = 10
    bottomk: int = 10
    near: float | None = None
    near_k: int = 10
    row_topk: int = 0
    row_bottomk: int = 0
    outside: tuple[float, float] | None = None
    outside_limit: int = 1000
    precision: str = "exact"
    block: int = DEFAULT_BLOCK

    def describe(self) -> dict:
        return asdict(self)
