"""`embgeom.distributed.pairwise_stats`: all-pairs statistics over torch.distributed ranks
(the implementation is embgeom.engine.distributed)."""
from .engine.distributed import pairwise_stats

__all__ = ["pairwise_stats"]
