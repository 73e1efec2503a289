"""Plain result objects. Tensors stay on the input's device; `.to_dict()` is JSON-safe."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def _num(v: Any) -> Any:
    """Python scalar for JSON: NaN/Inf become None."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def as_list(t: torch.Tensor) -> list:
    """Nested lists with NaN -> None."""
    if t.dtype.is_floating_point:
        return [as_list(r) for r in t] if t.dim() > 1 else [_num(float(v)) for v in t.double().cpu().tolist()]
    return t.cpu().tolist()


@dataclass
class PairList:
    """Pairs (i, j) with their values, in report order. i, j: (K,) int64; values: (K,) float64."""

    i: torch.Tensor
    j: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        return int(self.i.numel())

    def to_list(self) -> list[list]:
        return [[int(a), int(b), _num(float(v))] for a, b, v in
                zip(self.i.tolist(), self.j.tolist(), self.values.double().tolist())]


@dataclass
class Histogram:
    """counts: (bins,) int64; bin b covers [lo + b*w, lo + (b+1)*w), hi falls in the last bin."""

    lo: float
    hi: float
    counts: torch.Tensor
    underflow: int
    overflow: int
    error_bound: float = 0.0

    @property
    def bins(self) -> int:
        return int(self.counts.numel())

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def to_dict(self) -> dict:
        out = {"lo": self.lo, "hi": self.hi, "bins": self.bins, "counts": self.counts.tolist(),
               "underflow": int(self.underflow), "overflow": int(self.overflow)}
        if self.error_bound:
            out["error_bound"] = self.error_bound
        return out


@dataclass
class RowTopK:
    """indices: (N, K) int64 (-1 = padding), values: (N, K) float (NaN = padding)."""

    indices: torch.Tensor
    values: torch.Tensor

    def to_dict(self) -> dict:
        return {"indices": self.indices.tolist(), "values": as_list(self.values)}


@dataclass
class Outside:
    """Pairs with value < a or > b: total count, per-row counts (N,), first `limit` pairs by (i, j)."""

    a: float
    b: float
    count: int
    row_counts: torch.Tensor
    pairs: PairList
    col_counts: torch.Tensor | None = None

    def to_dict(self) -> dict:
        out = {"a": self.a, "b": self.b, "count": int(self.count), "pairs": self.pairs.to_list(),
               "row_counts": self.row_counts.tolist()}
        if self.col_counts is not None:
            out["col_counts"] = self.col_counts.tolist()
        return out


@dataclass
class PairwiseStats:
    """Statistics over every pair: unique pairs i<j of x (self mode) or all of x times y (cross)."""

    n: int
    m: int
    d: int
    mode: str
    metric: str
    precision: str
    backend: str
    count: int
    mean: float
    std: float
    min: tuple[int, int, float] | None
    max: tuple[int, int, float] | None
    hist: Histogram | None
    top_pairs: PairList | None
    bottom_pairs: PairList | None
    near_pairs: PairList | None
    near: float | None
    row_topk: RowTopK | None
    row_bottomk: RowTopK | None
    outside: Outside | None
    excluded_rows: list[int]
    excluded_cols: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        def pair(p):
            return None if p is None else [int(p[0]), int(p[1]), _num(float(p[2]))]

        def plist(p):
            return [] if p is None else p.to_list()

        out: dict[str, Any] = {
            "n": self.n, "m": self.m, "d": self.d, "mode": self.mode, "metric": self.metric,
            "precision": self.precision, "backend": self.backend, "count": int(self.count),
            "mean": _num(self.mean), "std": _num(self.std), "min": pair(self.min),
            "max": pair(self.max),
            "hist": None if self.hist is None else self.hist.to_dict(),
            "top_pairs": plist(self.top_pairs), "bottom_pairs": plist(self.bottom_pairs),
            "near_pairs": plist(self.near_pairs),
        }
        if self.near is not None:
            out["near"] = self.near
        if self.row_topk is not None:
            out["row_topk"] = self.row_topk.to_dict()
        if self.row_bottomk is not None:
            out["row_bottomk"] = self.row_bottomk.to_dict()
        if self.outside is not None:
            out["outside"] = self.outside.to_dict()
        out["excluded_rows"] = [int(r) for r in self.excluded_rows]
        if self.mode == "cross":
            out["excluded_cols"] = [int(c) for c in self.excluded_cols]
        out["seconds"] = self.seconds
        return out


@dataclass
class ConeIndex:
    """index: cone index I = ||sum x_i/||x_i|| ||, normalized = I/n, n: vectors used; all (B,)
    (or (L+1, B) for a tuple of hidden states). zero_rows: excluded zero-norm rows per set."""

    index: torch.Tensor
    normalized: torch.Tensor
    n: torch.Tensor
    zero_rows: torch.Tensor
    backend: str

    def mean_cosine(self) -> torch.Tensor:
        """Mean off-diagonal cosine of each set, (I^2 - n) / (n (n - 1)); NaN for n < 2."""
        n = self.n.double()
        return (self.index.double() ** 2 - n) / (n * (n - 1))

    def to_dict(self) -> dict:
        return {"index": as_list(self.index), "normalized": as_list(self.normalized),
                "n": self.n.tolist(), "zero_rows": self.zero_rows.tolist(), "backend": self.backend}


@dataclass
class AttentionEntropy:
    """row_entropy: (B, H, T) nats, NaN on padded query rows. mean: (H,) over valid rows and
    sequences. uniform_baseline: (B,) ln(n_valid). head_mean_entropy: (H,) entropy of the head's
    mean attention distribution (broad vs focused), averaged over sequences."""

    row_entropy: torch.Tensor
    mean: torch.Tensor
    uniform_baseline: torch.Tensor
    n_rows: int
    smoothing: float
    backend: str

    def to_dict(self) -> dict:
        return {"mean": as_list(self.mean), "uniform_baseline": as_list(self.uniform_baseline),
                "n_rows": self.n_rows, "smoothing": self.smoothing, "backend": self.backend}
