"""The `reference` backend: the float64 specification (embgeom.reference) behind the engine
protocol, so `backend="reference"` runs through the same result path as every other backend.
Builds N x N matrices; never picked by auto dispatch."""
from __future__ import annotations

import numpy as np

from .. import reference
from ..engine.config import PairwiseConfig
from ..engine.state import EngineState, moments_of
from .registry import register
from .torch import exact_only


class ReferenceEngine:
    """The float64 spec wrapped as a one-tile engine, so `backend="reference"` runs through the
    same result path as every other backend."""

    name = "reference"

    def __init__(self, x, y, cfg: PairwiseConfig, shift: float | None = None):
        """shift: also keep the values' sums around it (the distributed jobs of one matrix
        share one, so their sums add); the moments themselves are two-pass either way."""
        self.x, self.y, self.cfg, self.shift = x, y, cfg, shift
        self._state = EngineState.empty(cfg, x.shape[0], None if y is None else y.shape[0])

    def num_tiles(self):
        return 1

    def tile_pairs(self, begin, end):
        n = self.x.shape[0]
        full = n * (n - 1) // 2 if self.y is None else n * self.y.shape[0]
        return full if begin < 1 <= end else 0

    @property
    def tiles_done(self) -> int:
        return self._state.tiles_done

    def state(self) -> EngineState:
        return self._state.copy()

    def load_state(self, state: EngineState) -> None:
        self._state = state.copy()

    def run(self, begin, end):
        if begin >= 1 or end < 1:
            return
        c = self.cfg
        r = reference.pairwise_stats(self.x, self.y, c)
        s = self._state

        def triples(pairs):
            return (np.array([p[2] for p in pairs], np.float64), np.array([p[0] for p in pairs], np.int64),
                    np.array([p[1] for p in pairs], np.int64))

        s.tiles_done = 1
        values = r["values"][r["mask"]]
        s.count, s.mean, s.m2 = moments_of(values)
        if self.shift is not None:
            dev = values.double() - self.shift
            s.moment_shift, s.shifted_sum, s.shifted_sumsq = float(self.shift), float(dev.sum()), float((dev * dev).sum())
        s.min = None if r["min"] is None else (r["min"][2], r["min"][0], r["min"][1])
        s.max = None if r["max"] is None else (r["max"][2], r["max"][0], r["max"][1])
        if c.bins:
            h = r["hist"]
            s.hist = np.concatenate([[h["underflow"]], h["counts"].numpy(), [h["overflow"]]]).astype(np.int64)
        s.top, s.bottom, s.near = (triples(r[k]) for k in ("top_pairs", "bottom_pairs", "near_pairs"))
        for key, name in (("row_top", "row_topk"), ("row_bottom", "row_bottomk")):
            if name in r:
                setattr(s, key, (r[name]["values"].float().numpy(), r[name]["indices"].numpy()))
        if c.outside:
            o = r["outside"]
            s.outside_count = o["count"]
            s.outside_rows = o["row_counts"].numpy().astype(np.int64)
            if "col_counts" in o:
                s.outside_cols = o["col_counts"].numpy().astype(np.int64)
            s.outside_pairs = triples(o["pairs"])
        s.excluded_rows = np.array(r["excluded_rows"], np.int64)
        s.excluded_cols = np.array(r["excluded_cols"], np.int64)


def _reference_cone(x, mask):
    r = reference.cone_index(x.cpu(), None if mask is None else mask.cpu())
    # the sums of unit rows themselves: a stream adds them as vectors (their norms, as (I, 0, ...,
    # 0), had added up to the sum of the chunks' indexes, not the union's)
    return r["sums"].to(x.device), r["n"].to(x.device), r["zero_rows"].to(x.device)


def _reference_entropy(attn, mask, smoothing=0.0):
    r = reference.attention_entropy(attn.cpu(), None if mask is None else mask.cpu(), smoothing)
    return r["row_entropy"].float().to(attn.device)

register("reference", "pairwise_stats", ReferenceEngine, exact_only)
register("reference", "cone_index", _reference_cone)
register("reference", "attention_entropy", _reference_entropy)
