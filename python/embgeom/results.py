"""Plain result objects. Tensors stay on the input's device; `.to_dict()` is JSON-safe,
`_repr_html_` shows a summary in a notebook, `to_pandas()` gives ranked lists and tables as
DataFrames (pandas is optional: imported only there)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .api_types import DataFrame
from .formatting import fmt
from .tables import table_html


def _namer(tokens, size: int, name: str):
    """ids (a pandas Series of row numbers) -> their strings: tokens is a tokenizer or a
    sequence of `size` strings; None: no names (the column is left as None)."""
    if tokens is None:
        return lambda ids: [None] * len(ids)
    if hasattr(tokens, "convert_ids_to_tokens"):
        return lambda ids: tokens.convert_ids_to_tokens([int(i) for i in ids])
    tokens = list(tokens)
    if len(tokens) != size:
        raise ValueError(f"{name}: expected {size} strings (one per row), got {len(tokens)}")
    return lambda ids: [tokens[int(i)] if int(i) >= 0 else None for i in ids]


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install pandas") from None
    return pandas


def _num(v: Any) -> Any:
    """Python scalar for JSON: NaN/Inf become None."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def jsonable(obj: Any) -> Any:
    """Tensors/arrays -> lists, NaN/Inf -> None, tuples -> lists (what report.json holds)."""
    import numpy as np

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def as_list(t: torch.Tensor) -> list:
    """Nested lists with NaN -> None (one conversion of the whole tensor: row by row took 0.3 s
    for the vocabulary's 29,523 neighbour rows)."""
    import numpy as np

    if not t.dtype.is_floating_point:
        return t.cpu().tolist()
    a = t.detach().double().cpu().numpy()
    out = a.tolist()
    if a.ndim == 0:
        return _num(out)
    if np.isfinite(a).all():
        return out

    def clean(v):
        return [clean(x) for x in v] if isinstance(v, list) else _num(v)

    return clean(out)


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class PairList:
    """Pairs (i, j) with their values, in report order. i, j: (K,) int64; values: (K,) float64."""

    i: torch.Tensor
    j: torch.Tensor
    values: torch.Tensor

    def __len__(self) -> int:
        """The number of pairs listed."""
        return int(self.i.numel())

    def to_list(self) -> list[list]:
        """[[i, j, value], ...] as Python ints and floats (NaN -> None), in report order."""
        return [[int(a), int(b), _num(float(v))] for a, b, v in
                zip(self.i.tolist(), self.j.tolist(), self.values.double().tolist())]

    def to_pandas(self) -> DataFrame:
        """DataFrame with columns i, j, value, one row per pair in report order."""
        return _pandas().DataFrame({"i": self.i.cpu().numpy(), "j": self.j.cpu().numpy(),
                                    "value": self.values.double().cpu().numpy()})

    def _repr_html_(self) -> str:
        return table_html(["i", "j", "value"], self.to_list()[:50])


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
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
        """The number of bins (under- and overflow not included)."""
        return int(self.counts.numel())

    def edges(self) -> torch.Tensor:
        """(bins + 1,) float64 bin edges, lo to hi (the bin rule: docs/metrics.md, histogram)."""
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def to_pandas(self) -> DataFrame:
        """DataFrame with columns lo, hi, count, one row per bin (under/overflow not included)."""
        e = self.edges().numpy()
        return _pandas().DataFrame({"lo": e[:-1], "hi": e[1:], "count": self.counts.cpu().numpy()})

    def to_dict(self) -> dict:
        """JSON-safe: lo, hi, bins, counts, underflow, overflow (and error_bound in fast mode)."""
        out = {"lo": self.lo, "hi": self.hi, "bins": self.bins, "counts": self.counts.tolist(),
               "underflow": int(self.underflow), "overflow": int(self.overflow)}
        if self.error_bound:
            out["error_bound"] = self.error_bound
        return out


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class RowTopK:
    """indices: (N, K) int64 (-1 = padding), values: (N, K) float32 (NaN = padding); each row's
    columns by value (descending for top lists, ascending for bottom lists), then by column."""

    indices: torch.Tensor
    values: torch.Tensor

    def to_dict(self) -> dict:
        """JSON-safe nested lists: indices (-1 padding) and values (null padding)."""
        return {"indices": self.indices.tolist(), "values": as_list(self.values)}

    def to_pandas(self) -> DataFrame:
        """Long format: columns row, rank, column, value; padding (-1) left out."""
        idx, val = self.indices.cpu(), self.values.double().cpu()
        keep = idx >= 0
        rows, ranks = keep.nonzero(as_tuple=True)
        return _pandas().DataFrame({"row": rows.numpy(), "rank": ranks.numpy(),
                                    "column": idx[keep].numpy(), "value": val[keep].numpy()})


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class Outside:
    """Pairs with value < a or > b: total count, per-row counts (N,), first `limit` pairs by (i, j).
    `truncated`: the list holds fewer pairs than `count` (every pair, streamed to disk:
    embgeom.pairs_above)."""

    a: float
    b: float
    count: int
    row_counts: torch.Tensor
    pairs: PairList
    col_counts: torch.Tensor | None = None

    @property
    def truncated(self) -> bool:
        return len(self.pairs) < int(self.count)

    def to_dict(self) -> dict:
        """JSON-safe: a, b, the true count, truncated, the listed pairs, per-row (and per-column)
        counts."""
        out = {"a": self.a, "b": self.b, "count": int(self.count), "truncated": self.truncated,
               "pairs": self.pairs.to_list(), "row_counts": self.row_counts.tolist()}
        if self.col_counts is not None:
            out["col_counts"] = self.col_counts.tolist()
        return out

    def to_pandas(self) -> DataFrame:
        """The first listed pairs outside [a, b] (columns i, j, value); df.attrs["count"] is the
        true number of pairs outside and df.attrs["truncated"] says whether the list is cut."""
        df = self.pairs.to_pandas()
        df.attrs["count"] = int(self.count)
        df.attrs["truncated"] = self.truncated
        return df


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class PairwiseStats:
    """Statistics over every pair: unique pairs i<j of x (self mode) or all of x times y (cross).

    n, m, d: rows of x, of y (n in self mode), columns; mode 'self' | 'cross'; metric,
    precision, backend: what ran. count: pairs counted (zero rows excluded under cosine); mean,
    std: float, NaN without pairs (None in to_dict()); min, max: (i, j, value) or None. hist:
    Histogram or None (bins=0). top_pairs, bottom_pairs, near_pairs: PairList (float64 values)
    or None where switched off; near: the value near_pairs are near. row_topk, row_bottomk:
    RowTopK (float32 values, -1 / NaN padding) or None. outside: Outside or None.
    excluded_rows, excluded_cols: zero rows of x / y, left out under cosine. seconds: the run's
    wall time. notes: options lowered to fit the input, and why (and a fast run that ran the
    exact product). error_bound: precision='fast''s bound on |value - exact value| of the values
    the moments, extremes and histogram count (0 in exact mode; the lists are rescored exactly).
    to_dict() (JSON-safe), to_pandas(which), summary() (one row), repr and _repr_html_ show it."""

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
    notes: list[str] = field(default_factory=list)  # options lowered to fit the input, and why; a fast run on the exact product
    # precision="fast": the bound on |value - the exact mode's value| of every pair's value that the
    # moments, the extremes and the histogram count (the lists are rescored exactly); 0 in exact
    # mode. The histogram carries it too, but this one is there without a histogram (bins=0)
    error_bound: float = 0.0

    def to_dict(self) -> dict:
        """Every field as JSON-safe values (NaN -> None; min / max as [i, j, value]; lists as
        [[i, j, value], ...]); `embgeom pairs --json` writes it."""
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
        if self.error_bound:
            out["error_bound"] = self.error_bound
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
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def to_pandas(self, which: str = "top_pairs", *, tokens=None, col_tokens=None) -> DataFrame:
        """One ranked list or table as a DataFrame: which = top_pairs, bottom_pairs, near_pairs,
        outside, row_topk, row_bottomk or hist.

        tokens: names of x's rows joined onto the pair ids: a tokenizer (its
        convert_ids_to_tokens, row r = token id r) or a sequence of N strings (row r = tokens[r]);
        adds token_i / token_j to pair lists, token / neighbour to row lists. col_tokens: the
        same for y's rows in cross mode (default: tokens in self mode)."""
        tables = {"top_pairs": self.top_pairs, "bottom_pairs": self.bottom_pairs,
                  "near_pairs": self.near_pairs, "outside": self.outside, "row_topk": self.row_topk,
                  "row_bottomk": self.row_bottomk, "hist": self.hist}
        if which not in tables:
            raise ValueError(f"which: expected one of {', '.join(tables)}, got {which!r}")
        if tables[which] is None:
            raise ValueError(f"which: {which!r} was not computed in this run (switched off)")
        df = tables[which].to_pandas()
        if tokens is None and col_tokens is None or which == "hist":
            return df
        rows = _namer(tokens, self.n, "tokens")
        cols = _namer(col_tokens if col_tokens is not None or self.mode == "cross" else tokens,
                      self.m if self.mode == "cross" else self.n, "col_tokens")
        if which in ("row_topk", "row_bottomk"):
            df.insert(1, "token", rows(df["row"]))
            df.insert(df.columns.get_loc("column") + 1, "neighbour", cols(df["column"]))
        else:
            df.insert(1, "token_i", rows(df["i"]))
            df.insert(3, "token_j", cols(df["j"]))
        return df

    def summary(self) -> DataFrame:
        """Every scalar of the run as a one-row DataFrame (concatenate the summaries of several
        runs to compare them): sizes, options, count, mean, std, min / max with their pair,
        excluded rows, pairs outside, histogram bins, seconds."""
        row = {"mode": self.mode, "n": self.n, "m": self.m, "d": self.d, "metric": self.metric,
               "precision": self.precision, "backend": self.backend, "count": int(self.count),
               "mean": _num(self.mean), "std": _num(self.std)}
        for name in ("min", "max"):
            p = getattr(self, name)
            row.update({name: None if p is None else _num(float(p[2])),
                        f"{name}_i": None if p is None else int(p[0]),
                        f"{name}_j": None if p is None else int(p[1])})
        row["excluded_rows"] = len(self.excluded_rows)
        if self.mode == "cross":
            row["excluded_cols"] = len(self.excluded_cols)
        row["outside"] = None if self.outside is None else int(self.outside.count)
        row["hist_bins"] = None if self.hist is None else self.hist.bins
        row["seconds"] = self.seconds
        return _pandas().DataFrame([row])

    def __repr__(self) -> str:
        """One line per group of scalars and the size of each list (never a whole tensor)."""
        def pair(p):
            return "None" if p is None else f"({int(p[0])}, {int(p[1])}, {fmt(float(p[2]), 6)})"

        lists = ", ".join(f"{name}={len(getattr(self, name))}" for name in ("top_pairs", "bottom_pairs", "near_pairs")
                          if getattr(self, name) is not None)
        rows = ", ".join(f"{name}={tuple(getattr(self, name).indices.shape)}" for name in ("row_topk", "row_bottomk")
                         if getattr(self, name) is not None)
        lines = [f"PairwiseStats({self.mode}, n={fmt(self.n)}, m={fmt(self.m)}, d={fmt(self.d)}, "
                 f"{self.metric}, {self.precision}, backend={self.backend}, {fmt(self.seconds, 3)} s",
                 f"  count={fmt(int(self.count))}, mean={fmt(_num(self.mean), 6)}, std={fmt(_num(self.std), 6)}, "
                 f"min={pair(self.min)}, max={pair(self.max)}",
                 f"  hist={'None' if self.hist is None else f'{self.hist.bins} bins over [{self.hist.lo:g}, {self.hist.hi:g}]'}"
                 + (f", {lists}" if lists else "") + (f", {rows}" if rows else "")
                 + ("" if self.outside is None else
                    f", outside [{self.outside.a:g}, {self.outside.b:g}]={fmt(int(self.outside.count))}")
                 + f", excluded_rows={len(self.excluded_rows)})"]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def pair(p):
            return "" if p is None else f"({p[0]}, {p[1]}) {p[2]:.6g}"

        summary = [("pairs", f"{self.count:,} ({self.mode}, n={self.n}, m={self.m}, d={self.d})"),
                   ("metric / precision / backend", f"{self.metric} / {self.precision} / {self.backend}"),
                   ("mean", self.mean), ("std", self.std), ("min", pair(self.min)), ("max", pair(self.max)),
                   ("excluded rows", len(self.excluded_rows)), ("seconds", self.seconds)]
        if self.outside is not None:
            summary.append((f"outside [{self.outside.a}, {self.outside.b}]", f"{self.outside.count:,}"))
        parts = ["<b>PairwiseStats</b>", table_html(None, summary)]
        for name in ("top_pairs", "bottom_pairs", "near_pairs"):
            lst = getattr(self, name)
            if lst is not None and len(lst):
                parts.append(f"<b>{name}</b>" + lst._repr_html_())
        return "".join(parts)


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class ConeIndex:
    """index: cone index I = ||sum x_i/||x_i|| ||, normalized = I/n (NaN for a set with n = 0),
    n: vectors used; all (B,) (or (L+1, B) for a tuple of hidden states). zero_rows: excluded
    zero-norm rows per set."""

    index: torch.Tensor
    normalized: torch.Tensor
    n: torch.Tensor
    zero_rows: torch.Tensor
    backend: str

    def mean_cosine(self) -> torch.Tensor:
        """Mean off-diagonal cosine of each set, (I^2 - n) / (n (n - 1)); NaN for n < 2."""
        n = self.n.double()
        mean = (self.index.double() ** 2 - n) / (n * (n - 1))
        # n = 1: the index's rounding (1 - 2^-53) made the numerator nonzero, -inf not NaN
        return torch.where(n >= 2, mean, torch.full_like(mean, math.nan))

    def to_dict(self) -> dict:
        """JSON-safe lists (NaN -> None) and the backend."""
        return {"index": as_list(self.index), "normalized": as_list(self.normalized),
                "n": self.n.tolist(), "zero_rows": self.zero_rows.tolist(), "backend": self.backend}

    def to_pandas(self) -> DataFrame:
        """One row per set: columns set, index, normalized, n, zero_rows (depth first for (L+1, B))."""
        cols = {k: getattr(self, k).detach().cpu() for k in ("index", "normalized", "n", "zero_rows")}
        if self.index.dim() == 2:
            depth, seq = torch.meshgrid(torch.arange(self.index.shape[0]), torch.arange(self.index.shape[1]),
                                        indexing="ij")
            data = {"depth": depth.flatten().numpy(), "set": seq.flatten().numpy()}
        else:
            data = {"set": torch.arange(self.index.numel()).numpy()}
        data.update({k: v.flatten().numpy() for k, v in cols.items()})
        return _pandas().DataFrame(data)

    def _repr_html_(self) -> str:
        flat = [getattr(self, k).detach().double().cpu().flatten().tolist()
                for k in ("index", "normalized", "n", "zero_rows")]
        rows = [[s, a, b, int(c), int(z)] for s, (a, b, c, z) in enumerate(zip(*flat))][:50]
        shape = "x".join(str(v) for v in self.index.shape)
        return (f"<b>ConeIndex</b> ({shape} sets, {self.backend})"
                + table_html(["set", "I", "I / n", "n", "zero rows"], rows))


@dataclass(eq=False)  # (== compared tensors field by field: a RuntimeError, not a bool)
class AttentionEntropy:
    """row_entropy: (B, H, T) nats, NaN on padded query rows. mean: (H,) over valid rows and
    sequences. uniform_baseline: (B,) ln(n_valid). n_rows: the valid rows counted; smoothing: as
    asked. (The entropy of each head's mean attention row, broad vs focused heads, is
    `embgeom text`'s head_mean_entropy: analysis.text.attention.)"""

    row_entropy: torch.Tensor
    mean: torch.Tensor
    uniform_baseline: torch.Tensor
    n_rows: int
    smoothing: float
    backend: str

    def to_dict(self) -> dict:
        """JSON-safe: the means, baselines, row count, smoothing and backend (not the (B, H, T)
        row entropies)."""
        return {"mean": as_list(self.mean), "uniform_baseline": as_list(self.uniform_baseline),
                "n_rows": self.n_rows, "smoothing": self.smoothing, "backend": self.backend}

    def to_pandas(self) -> DataFrame:
        """One row per head: columns head, mean_entropy."""
        return _pandas().DataFrame({"head": range(self.mean.numel()),
                                    "mean_entropy": self.mean.detach().double().cpu().numpy()})

    def _repr_html_(self) -> str:
        rows = [[h, float(v)] for h, v in enumerate(self.mean.double().cpu().tolist())]
        return (f"<b>AttentionEntropy</b> ({self.n_rows} rows, smoothing {self.smoothing}, {self.backend})"
                + table_html(["head", "mean entropy (nats)"], rows))

