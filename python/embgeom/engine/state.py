"""The typed state of an all-pairs run: what every backend's engine produces and consumes.

One `EngineState` holds the reductions of a set of finished tiles, in original row indices,
lists already in report order. States of disjoint tile sets `merge` (threads, chunks, ranks);
a job's state on a block of rows is `shift`ed into the indices of the whole matrix; `finalize`
turns a state into the public `PairwiseStats`. Moments are (count, mean, M2) and merge with
Chan et al.'s parallel formula, so the variance never cancels (docs/metrics.md, moments).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from ..numerics import LIST_KINDS
from ..results import Histogram, Outside, PairList, PairwiseStats, RowTopK
from .config import PairwiseConfig
from .lists import better_extreme, merge_pairs, merge_rows

STATE_VERSION = 4  # 3: to_record / from_record (checkpoint format 3); 4: the exact shifted sums


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def empty_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, np.int64)


def chan_merge(na: int, mean_a: float, m2_a: float, nb: int, mean_b: float, m2_b: float):
    """(count, mean, M2) of the union of two disjoint sets (Chan, Golub, LeVeque 1979)."""
    n = na + nb
    if nb == 0:
        return na, mean_a, m2_a
    if na == 0:
        return nb, mean_b, m2_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / n)
    m2 = m2_a + m2_b + delta * delta * (na / n) * nb
    return n, mean, m2


def moments_from_shifted(count: int, shift: float, s1: float, s2: float) -> tuple[int, float, float]:
    """(count, mean, M2) from the sums s1 = sum(v - shift) and s2 = sum((v - shift)^2) that the
    engines accumulate (docs/metrics.md, moments); csrc/pairwise state export does the same."""
    if count == 0:
        return 0, 0.0, 0.0
    dev = s1 / count
    return count, shift + dev, max(s2 - s1 * dev, 0.0)


def shifted_from_moments(count: int, mean: float, m2: float, shift: float) -> tuple[float, float]:
    """The inverse of moments_from_shifted: (s1, s2) around `shift` (resuming a checkpoint)."""
    s1 = count * (mean - shift)
    return s1, (m2 + s1 * s1 / count) if count else 0.0


def moments_of(values: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, M2) of a set of values, two-pass in float64."""
    v = values.double()
    n = int(v.numel())
    if n == 0:
        return 0, 0.0, 0.0
    mean = float(v.mean())
    return n, mean, float(((v - mean) ** 2).sum())


@dataclass
class EngineState:
    """Reductions of finished tiles. n rows; m columns in cross mode, None in self mode.

    min/max: (v, i, j) or None. hist: int64[bins + 2] (underflow, bins..., overflow) or None.
    top/bottom/near/outside_pairs: (v f64[K], i i64[K], j i64[K]) in report order.
    row_top/row_bottom: (values f32[n, k], columns i64[n, k]) padded with (NaN, -1), or None.
    outside_rows: i64[n] (self mode: counts of both ends of a pair), outside_cols: i64[m].
    """

    n: int
    m: int | None
    tiles_done: int = 0
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    # The sums (count, mean, m2) came from, around moment_shift, where the engine keeps them
    # (NaN otherwise): a resumed run continues from these exactly, where converting back from
    # (mean, m2) would round (set_shifted / shifted_sums)
    moment_shift: float = math.nan
    shifted_sum: float = math.nan
    shifted_sumsq: float = math.nan
    min: tuple | None = None
    max: tuple | None = None
    hist: np.ndarray | None = None
    hist_error_bound: float = 0.0
    top: tuple = field(default_factory=empty_pairs)
    bottom: tuple = field(default_factory=empty_pairs)
    near: tuple = field(default_factory=empty_pairs)
    outside_pairs: tuple = field(default_factory=empty_pairs)
    row_top: tuple | None = None
    row_bottom: tuple | None = None
    outside_count: int = 0
    outside_rows: np.ndarray | None = None
    outside_cols: np.ndarray | None = None
    excluded_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    excluded_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    # construction ----------------------------------------------------------------------------
    @classmethod
    def empty(cls, cfg: PairwiseConfig, n: int, m: int | None) -> "EngineState":
        def rows(k):
            return None if not k else (np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64))

        return cls(n=n, m=m, hist=np.zeros(cfg.bins + 2, np.int64) if cfg.bins else None,
                   row_top=rows(cfg.row_topk), row_bottom=rows(cfg.row_bottomk),
                   outside_rows=np.zeros(n, np.int64) if cfg.outside else None,
                   outside_cols=np.zeros(m, np.int64) if (cfg.outside and m is not None) else None)

    @classmethod
    def from_fields(cls, n: int, m: int | None, values: dict) -> "EngineState":
        """From a plain dict with the field names (the C++ engine's export)."""
        names = {f.name for f in fields(cls)} - {"n", "m"}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"state: unknown fields {sorted(unknown)}")
        out = cls(n=n, m=m, **{k: v for k, v in values.items()})
        for kind in LIST_KINDS:
            v, i, j = getattr(out, kind)
            setattr(out, kind, (np.asarray(v, np.float64), np.asarray(i, np.int64), np.asarray(j, np.int64)))
        return out

    def to_fields(self) -> dict:
        """Plain dict of every field but n and m (what the C++ engine's load_state takes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("n", "m")}

    def set_shifted(self, count: int, shift: float, s1: float, s2: float) -> None:
        """count, mean and m2 from an engine's shifted sums, which are kept as well."""
        self.count, self.mean, self.m2 = moments_from_shifted(int(count), shift, s1, s2)
        self.moment_shift, self.shifted_sum, self.shifted_sumsq = float(shift), float(s1), float(s2)

    def shifted_sums(self, shift: float) -> tuple[float, float]:
        """(s1, s2) around `shift`: the kept sums where they are around that shift, else
        converted from (count, mean, m2)."""
        if self.moment_shift == shift and math.isfinite(self.shifted_sum) and math.isfinite(self.shifted_sumsq):
            return self.shifted_sum, self.shifted_sumsq
        return shifted_from_moments(self.count, self.mean, self.m2, shift)

    # checkpoints: arrays of fixed dtypes + JSON, no pickle ----------------------------------------
    def to_record(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(scalars as a JSON-able dict, arrays by name), the inverse of `from_record`.

        Scalars: n, m, tiles_done, count, mean, m2, hist_error_bound, outside_count, min/max as
        [v, i, j] or null, and which optional arrays are present. Arrays (dtypes of ARRAYS):
        hist, <kind>.v/.i/.j for each ranked list, row_top/row_bottom .values/.columns,
        outside_rows, outside_cols, excluded_rows, excluded_cols.
        """
        meta = {"version": STATE_VERSION, "n": int(self.n), "m": None if self.m is None else int(self.m)}
        for key in INT_SCALARS:
            meta[key] = int(getattr(self, key))
        for key in FLOAT_SCALARS:
            meta[key] = float(getattr(self, key))
        for key in ("min", "max"):
            p = getattr(self, key)
            meta[key] = None if p is None else [float(p[0]), int(p[1]), int(p[2])]
        arrays = {}
        for name, part in self._array_parts():
            if part is not None:
                arrays[name] = _fixed(to_numpy(part), ARRAYS[name], name)
        meta["arrays"] = sorted(arrays)
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "EngineState":
        """A state from `to_record`'s output; ValueError on an unknown or missing key, a dtype
        other than the fixed one (object arrays never), or shapes that do not fit n and m."""
        if not isinstance(meta, dict):
            raise ValueError("state: expected a JSON object")
        want = {"version", "n", "m", "min", "max", "arrays", *INT_SCALARS, *FLOAT_SCALARS}
        if set(meta) != want:
            extra, missing = sorted(set(meta) - want), sorted(want - set(meta))
            raise ValueError(f"state: unexpected keys {extra}, missing keys {missing}")
        if meta["version"] != STATE_VERSION:
            raise ValueError(f"state: version {meta['version']!r}, expected {STATE_VERSION}")
        n, m = _json_int(meta["n"], "n"), None if meta["m"] is None else _json_int(meta["m"], "m")
        listed = meta["arrays"]
        if not isinstance(listed, list) or sorted(arrays) != sorted(listed):
            raise ValueError(f"state: arrays {sorted(arrays)} do not match the listed {listed!r}")
        unknown = set(arrays) - set(ARRAYS)
        if unknown:
            raise ValueError(f"state: unknown arrays {sorted(unknown)}")
        got = {name: _checked(arrays[name], ARRAYS[name], name) for name in arrays}
        out = cls(n=n, m=m)
        for key in INT_SCALARS:
            setattr(out, key, _json_int(meta[key], key))
        for key in FLOAT_SCALARS:
            setattr(out, key, _json_float(meta[key], key))
        for key in ("min", "max"):
            p = meta[key]
            if p is not None:
                if not isinstance(p, list) or len(p) != 3:
                    raise ValueError(f"state: '{key}' must be [v, i, j] or null")
                p = (_json_float(p[0], key), _json_int(p[1], key), _json_int(p[2], key))
            setattr(out, key, p)

        def need(name):
            if name not in got:
                raise ValueError(f"state: missing array '{name}'")
            return got[name]

        for kind in LIST_KINDS:
            v, i, j = (need(f"{kind}.{p}") for p in "vij")
            if not (v.ndim == i.ndim == j.ndim == 1 and len(v) == len(i) == len(j)):
                raise ValueError(f"state: '{kind}' must be three 1-d arrays of one length")
            setattr(out, kind, (v, i, j))
        for key in ("row_top", "row_bottom"):  # both arrays or neither (None: not asked for)
            if f"{key}.values" in got or f"{key}.columns" in got:
                v, c = need(f"{key}.values"), need(f"{key}.columns")
                if v.ndim != 2 or v.shape != c.shape or v.shape[0] != n:
                    raise ValueError(f"state: '{key}' must be two ({n}, k) arrays")
                setattr(out, key, (v, c))
        for key in ("excluded_rows", "excluded_cols"):
            need(key)
        for key, length in (("hist", None), ("outside_rows", n), ("outside_cols", m),
                            ("excluded_rows", None), ("excluded_cols", None)):
            a = got.get(key)  # hist and outside counts are optional (None when not asked for)
            if a is not None and (a.ndim != 1 or (length is not None and len(a) != length)):
                raise ValueError(f"state: '{key}' must be a 1-d array" + (f" of length {length}" if length else ""))
            setattr(out, key, a)
        if out.outside_cols is not None and m is None:
            raise ValueError("state: 'outside_cols' in a self-mode state")
        return out

    def _array_parts(self):
        for kind in LIST_KINDS:
            yield from zip((f"{kind}.{p}" for p in "vij"), getattr(self, kind))
        for key in ("row_top", "row_bottom"):
            part = getattr(self, key)
            yield from zip((f"{key}.values", f"{key}.columns"), part if part is not None else (None, None))
        for key in ("hist", "outside_rows", "outside_cols", "excluded_rows", "excluded_cols"):
            yield key, getattr(self, key)

    def copy(self) -> "EngineState":
        def dup(v):
            if isinstance(v, np.ndarray):
                return v.copy()
            if isinstance(v, tuple):
                return tuple(dup(p) for p in v)
            return v

        return replace(self, **{f.name: dup(getattr(self, f.name)) for f in fields(self)})

    # reductions -------------------------------------------------------------------------------
    def add_moments(self, count: int, mean: float, m2: float) -> None:
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2, int(count), float(mean), float(m2))
        self.moment_shift = self.shifted_sum = self.shifted_sumsq = math.nan  # no longer these sums

    def merge_moments(self, other: "EngineState") -> None:
        """other's moments into these: where both states summed around the same shift, the sums
        are added, as one engine adds its tiles' (Chan's formula on (count, mean, M2) takes the
        difference of two rounded means: the distributed std of cosines near 1 had kept 4e-8 of
        it where one process keeps 1e-11); an empty side takes the other's as they are."""
        if int(other.count) == 0:
            return
        if int(self.count) == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            self.moment_shift, self.shifted_sum, self.shifted_sumsq = \
                other.moment_shift, other.shifted_sum, other.shifted_sumsq
            return
        sums = (self.shifted_sum, self.shifted_sumsq, other.shifted_sum, other.shifted_sumsq)
        if self.moment_shift == other.moment_shift and all(math.isfinite(v) for v in sums):
            self.set_shifted(int(self.count) + int(other.count), self.moment_shift,
                             self.shifted_sum + other.shifted_sum, self.shifted_sumsq + other.shifted_sumsq)
        else:
            self.add_moments(other.count, other.mean, other.m2)

    def merge(self, other: "EngineState", cfg: PairwiseConfig) -> "EngineState":
        """The reductions of two disjoint tile sets of the same matrix (a new state)."""
        if (self.n, self.m) != (other.n, other.m):
            raise ValueError(f"state: cannot merge a {other.n} x {other.m} state into {self.n} x {self.m}")
        out = self.copy()
        out.tiles_done = self.tiles_done + other.tiles_done
        out.merge_moments(other)
        out.min = better_extreme("min", self.min, other.min)
        out.max = better_extreme("max", self.max, other.max)
        if self.hist is not None:
            out.hist = np.asarray(self.hist) + np.asarray(other.hist)
        for kind, limit in list_limits(cfg).items():
            out_list = merge_pairs(kind, getattr(self, kind), getattr(other, kind), limit, cfg.near)
            setattr(out, kind, tuple(to_numpy(t) for t in out_list))
        for key, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
            if getattr(self, key) is not None:
                setattr(out, key, tuple(to_numpy(t) for t in merge_rows(getattr(self, key), getattr(other, key), k, largest)))
        out.outside_count = int(self.outside_count) + int(other.outside_count)
        for key in ("outside_rows", "outside_cols"):
            if getattr(self, key) is not None:
                setattr(out, key, np.asarray(getattr(self, key)) + np.asarray(getattr(other, key)))
        out.hist_error_bound = max(float(self.hist_error_bound), float(other.hist_error_bound))
        out.excluded_rows = np.union1d(self.excluded_rows, other.excluded_rows).astype(np.int64)
        out.excluded_cols = np.union1d(self.excluded_cols, other.excluded_cols).astype(np.int64)
        return out

    def shift(self, cfg: PairwiseConfig, n_total: int, row_off: int, col_off: int, *,
              row_lists_only: bool = False) -> "EngineState":
        """This state of a job on rows [row_off, row_off + n) against rows [col_off, ...) of one
        matrix of n_total rows (self job: col_off == row_off, self.m None), as a self-mode state
        of that matrix. row_lists_only keeps only the per-row lists (the transposed cross job)."""
        out = EngineState.empty(cfg, n_total, None)
        out.tiles_done = self.tiles_done
        for key in ("row_top", "row_bottom"):
            part = getattr(self, key)
            if part is None:
                continue
            v, idx = (np.asarray(a) for a in part)
            getattr(out, key)[0][row_off:row_off + len(v)] = v
            getattr(out, key)[1][row_off:row_off + len(v)] = np.where(idx >= 0, idx + col_off, -1)
        if row_lists_only:
            return out
        out.count, out.mean, out.m2 = self.count, self.mean, self.m2
        out.moment_shift, out.shifted_sum, out.shifted_sumsq = self.moment_shift, self.shifted_sum, self.shifted_sumsq
        out.hist = None if self.hist is None else np.asarray(self.hist).copy()
        out.hist_error_bound = self.hist_error_bound
        out.outside_count = self.outside_count
        for key in ("min", "max"):
            p = getattr(self, key)
            setattr(out, key, None if p is None else (p[0], int(p[1]) + row_off, int(p[2]) + col_off))
        for kind in LIST_KINDS:
            v, i, j = getattr(self, kind)
            setattr(out, kind, (np.asarray(v), np.asarray(i) + row_off, np.asarray(j) + col_off))
        if self.outside_rows is not None:
            out.outside_rows[row_off:row_off + len(self.outside_rows)] += self.outside_rows
            if self.outside_cols is not None:
                out.outside_rows[col_off:col_off + len(self.outside_cols)] += self.outside_cols
        out.excluded_rows = np.union1d(np.asarray(self.excluded_rows) + row_off,
                                       np.asarray(self.excluded_cols) + col_off).astype(np.int64)
        return out

    # the public result ------------------------------------------------------------------------
    def finalize(self, cfg: PairwiseConfig, *, d: int, backend: str, device: torch.device,
                 seconds: float) -> PairwiseStats:
        def t(a, dtype=None):
            return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

        def plist(kind, enabled):
            if not enabled:
                return None
            v, i, j = getattr(self, kind)
            return PairList(t(i, torch.int64), t(j, torch.int64), t(v, torch.float64))

        count = int(self.count)
        hist = None
        if cfg.bins:
            h = np.asarray(self.hist)
            hist = Histogram(cfg.lo, cfg.hi, t(h[1:-1], torch.int64), int(h[0]), int(h[-1]),
                             float(self.hist_error_bound))
        rows = {}
        for key, k in (("row_top", cfg.row_topk), ("row_bottom", cfg.row_bottomk)):
            part = getattr(self, key)
            rows[key] = None if not k else RowTopK(t(part[1], torch.int64), t(part[0], torch.float32))
        outside = None
        if cfg.outside:
            outside = Outside(cfg.outside[0], cfg.outside[1], int(self.outside_count),
                              t(self.outside_rows, torch.int64), plist("outside_pairs", True),
                              None if self.outside_cols is None else t(self.outside_cols, torch.int64))

        def extreme(p):
            return None if p is None else (int(p[1]), int(p[2]), float(p[0]))

        return PairwiseStats(
            n=self.n, m=self.n if self.m is None else self.m, d=d,
            mode="self" if self.m is None else "cross", metric=cfg.metric,
            precision=cfg.precision, backend=backend, count=count,
            mean=self.mean if count else math.nan,
            std=math.sqrt(max(self.m2, 0.0) / count) if count else math.nan,
            min=extreme(self.min), max=extreme(self.max), hist=hist,
            top_pairs=plist("top", cfg.topk > 0), bottom_pairs=plist("bottom", cfg.bottomk > 0),
            near_pairs=plist("near", cfg.near is not None and cfg.near_k > 0), near=cfg.near,
            row_topk=rows["row_top"], row_bottomk=rows["row_bottom"], outside=outside,
            excluded_rows=[int(r) for r in np.asarray(self.excluded_rows)],
            excluded_cols=[int(c) for c in np.asarray(self.excluded_cols)],
            error_bound=float(self.hist_error_bound) if cfg.precision == "fast" else 0.0,
            seconds=seconds,
        )


INT_SCALARS = ("tiles_done", "count", "outside_count")
FLOAT_SCALARS = ("mean", "m2", "hist_error_bound", "moment_shift", "shifted_sum", "shifted_sumsq")
# every array a state may hold, with its one dtype (to_record casts to it, from_record requires it)
ARRAYS = {
    **{f"{kind}.{p}": np.dtype(np.float64 if p == "v" else np.int64) for kind in LIST_KINDS for p in "vij"},
    **{f"{key}.{p}": np.dtype(np.float32 if p == "values" else np.int64)
       for key in ("row_top", "row_bottom") for p in ("values", "columns")},
    **{key: np.dtype(np.int64) for key in ("hist", "outside_rows", "outside_cols", "excluded_rows", "excluded_cols")},
}


def _fixed(a: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """a as `dtype`, refusing a lossy change of kind (floats into an index array, objects anywhere)."""
    if a.size and a.dtype.kind not in ("fiub" if dtype.kind == "f" else "iub"):
        raise ValueError(f"state: '{name}' has dtype {a.dtype}, expected {dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _checked(a, dtype: np.dtype, name: str) -> np.ndarray:
    """A loaded array: exactly `dtype` (either byte order), returned in native order."""
    if not isinstance(a, np.ndarray) or a.dtype.kind != dtype.kind or a.dtype.itemsize != dtype.itemsize:
        raise ValueError(f"state: '{name}' has dtype {getattr(a, 'dtype', type(a).__name__)}, expected {dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _json_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"state: '{name}' must be an integer, got {v!r}")
    return v


def _json_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"state: '{name}' must be a number, got {v!r}")
    return float(v)


def list_limits(cfg: PairwiseConfig) -> dict[str, int]:
    """Length of each global ranked list."""
    return {"top": cfg.topk, "bottom": cfg.bottomk, "near": cfg.near_k, "outside_pairs": cfg.outside_limit}


def check_fits(saved: EngineState, fresh: EngineState, cfg: PairwiseConfig, num_tiles: int | None,
               tile_pairs) -> None:
    """ValueError (one line, "does not fit this run: ...") unless a state read from a checkpoint
    can be this run's: the shapes of a fresh engine's empty state `fresh`, tiles_done within the
    run's tiles (num_tiles; None: a merged state, not checked), a pair count the finished tiles
    can hold (tile_pairs(0, tiles_done)), histogram counts >= 0 summing to it, every listed pair
    and row column an index of this run (i < j in self mode), counts >= 0. The C++ engine checks the same in its import; the torch and Triton
    engines copy a state as it is, so a crafted one (its sha256 recomputed) had come back as a
    3-bin histogram of a 2,000-bin run or a neighbour 10^9."""
    def refuse(why: str):
        raise ValueError(f"state does not fit this run: {why}")

    n, m = fresh.n, fresh.m
    cols = n if m is None else m
    if (saved.n, saved.m) != (n, m):
        refuse(f"it is of {saved.n} x {saved.m} rows, this run {n} x {m}")
    for name in ("tiles_done", "count", "outside_count"):
        v = getattr(saved, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            refuse(f"{name} must be an integer >= 0, got {v!r}")
    if num_tiles is not None and saved.tiles_done > num_tiles:
        refuse(f"tiles_done {saved.tiles_done} of a run of {num_tiles} tiles")
    held = tile_pairs(0, int(saved.tiles_done))
    if saved.count > held:
        refuse(f"count {saved.count} is more than its {saved.tiles_done} finished tiles hold")
    # fewer only by pairs of rows a cosine leaves out (zero rows): a crafted count of 0 beside
    # finished tiles had given a count and moments of part of the pairs (a merged state's
    # jobs, num_tiles None: distributed._check_done_pairs)
    left_out = max(np.asarray(fresh.excluded_rows).size, np.asarray(saved.excluded_rows).size) \
        + max(np.asarray(fresh.excluded_cols).size, np.asarray(saved.excluded_cols).size)
    if num_tiles is not None and saved.count < held - left_out * max(n, cols):
        refuse(f"count {saved.count} is less than its {saved.tiles_done} finished tiles hold ({held})")
    shifted = (saved.moment_shift, saved.shifted_sum, saved.shifted_sumsq)
    if any(math.isfinite(float(v)) for v in shifted):
        # the engines resume from these sums, not from (mean, m2): they must be the same moments
        # (a crafted shifted_sumsq of -1e6 had given a std of 0 beside a valid m2)
        if not all(math.isfinite(float(v)) for v in shifted) or saved.shifted_sumsq < 0:
            refuse("the shifted sums must be finite, their squares' sum >= 0")
        _, mean, m2 = moments_from_shifted(int(saved.count), *map(float, shifted))
        scale = abs(float(saved.mean)) + abs(float(saved.moment_shift)) + 1.0
        if abs(mean - saved.mean) > 1e-9 * scale or abs(m2 - saved.m2) > 1e-9 * (abs(float(saved.m2)) + scale ** 2):
            refuse("the shifted sums are not those of mean and m2")
    if saved.count and not (math.isfinite(saved.mean) and math.isfinite(saved.m2) and saved.m2 >= 0):
        refuse("the moments must be finite, m2 >= 0")
    if saved.outside_count > held:
        refuse(f"outside_count {saved.outside_count} is more than its {saved.tiles_done} finished tiles hold")
    if not (math.isfinite(float(saved.hist_error_bound)) and float(saved.hist_error_bound) >= 0):
        refuse(f"hist_error_bound must be finite and >= 0, got {saved.hist_error_bound!r}")
    # a cosine is within [-1, 1] (its float32 rounding a little past): a crafted 5.0 had been reported
    bound = 1.0 + 1e-3 if cfg.metric == "cosine" else math.inf

    def in_range(v) -> bool:
        v = np.asarray(v, dtype=np.float64)
        return bool(np.all(np.abs(v[np.isfinite(v)]) <= bound))

    def same_shape(name):
        a, b = getattr(saved, name), getattr(fresh, name)
        if (a is None) != (b is None) or (a is not None and np.shape(a) != np.shape(b)):
            refuse(f"{name} must be {'absent' if b is None else np.shape(b)}, got "
                   f"{'absent' if a is None else np.shape(a)}")

    for name in ("hist", "outside_rows", "outside_cols"):
        same_shape(name)
        a = getattr(saved, name)
        if a is not None and np.asarray(a).size and np.asarray(a).min() < 0:
            refuse(f"{name} must hold counts >= 0")
    def total(counts):  # summed as Python ints: in int64, bins of 2^62 had wrapped around to the count
        return None if counts is None else sum(np.asarray(counts).ravel().tolist())

    hist_total = total(saved.hist)
    if hist_total is not None and hist_total != saved.count:
        refuse(f"the histogram's counts sum to {hist_total}, not count {saved.count}")
    # each outside pair counts once for its row and once for its column (self mode: both ends
    # in outside_rows): a crafted outside_rows + 10^12 had been reported beside its count
    for name, per_pair in (("outside_rows", 2 if m is None else 1), ("outside_cols", 1)):
        got = total(getattr(saved, name))
        if got is not None and got != per_pair * saved.outside_count:
            refuse(f"{name} sums to {got}, not {'twice ' if per_pair == 2 else ''}outside_count "
                   f"{saved.outside_count}")

    def pair_ok(i, j):  # (arrays or numbers: every pair an (i, j) of this run)
        i, j = np.asarray(i), np.asarray(j)
        return bool(np.all((0 <= i) & (i < n) & (0 <= j) & (j < cols) & ((m is not None) | (i < j))))

    limits = list_limits(cfg)
    for kind in LIST_KINDS:
        v, i, j = (np.asarray(a) for a in getattr(saved, kind))
        if not (v.shape == i.shape == j.shape and v.ndim == 1):
            refuse(f"{kind}: values, rows and columns must be three lists of one length")
        if v.size > max(0, limits.get(kind, 0)):
            refuse(f"{kind}: {v.size} pairs, this run lists at most {max(0, limits.get(kind, 0))}")
        if v.size and not (np.isfinite(v).all() and pair_ok(i, j) and in_range(v)):
            refuse(f"{kind}: a pair outside this run's rows and columns (or a value not finite or out of range)")
        if v.size and np.unique(np.stack([i, j]), axis=1).shape[1] != v.size:
            refuse(f"{kind}: a pair listed twice")
    for name in ("min", "max"):
        e = getattr(saved, name)
        if e is not None and not (len(e) == 3 and math.isfinite(float(e[0])) and in_range(e[0])
                                  and pair_ok(int(e[1]), int(e[2]))):
            refuse(f"{name}: not a pair of this run")
    for name in ("row_top", "row_bottom"):
        a, b = getattr(saved, name), getattr(fresh, name)
        if (a is None) != (b is None):
            refuse(f"{name} must be {'absent' if b is None else 'present'}")
        if a is None:
            continue
        vals, idx = np.asarray(a[0]), np.asarray(a[1])
        if vals.shape != b[0].shape or idx.shape != b[1].shape:
            refuse(f"{name} must be {b[0].shape} arrays, got {vals.shape} and {idx.shape}")
        if idx.size and (idx.min() < -1 or idx.max() >= cols or not np.isfinite(vals[idx >= 0]).all()
                         or not in_range(vals[idx >= 0])):
            refuse(f"{name}: a column outside this run's {cols} (or a value not finite or out of range)")
        if idx.ndim == 2 and idx.size:
            if m is None and bool((idx == np.arange(idx.shape[0])[:, None]).any()):
                refuse(f"{name}: a row listed as its own neighbour")
            ordered = np.sort(np.where(idx >= 0, idx, -1 - np.arange(idx.shape[1])[None, :]), axis=1)
            if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                refuse(f"{name}: a column listed twice in one row")
    for name, size in (("excluded_rows", n), ("excluded_cols", cols)):
        e = np.asarray(getattr(saved, name))
        if e.size and (e.min() < 0 or e.max() >= size):
            refuse(f"{name}: an index outside 0..{size - 1}")
        if np.unique(e).size != e.size:
            refuse(f"{name}: an index listed twice")
        known = np.asarray(getattr(fresh, name))
        if known.size and not np.array_equal(np.sort(e), np.sort(known)):
            refuse(f"{name}: {e.size} saved, this run's input has {known.size}")
    _check_values_agree(saved, cfg, refuse)


def _check_values_agree(saved: EngineState, cfg: PairwiseConfig, refuse) -> None:
    """Values of a saved state that cannot sit together: the mean between the extremes, m2 within
    what values between them allow (Popoviciu: m2 <= count (max - min)^2 / 4) and at least what
    the two extremes give ((max - min)^2 / 2), every listed value between the extremes and the
    top and bottom lists led by them, the outside pairs outside (a, b) and no more of them listed
    than counted. Fast mode's moments are of values within the error bound M of the exact ones
    the extremes are. A crafted mean of 5.0 under cosine, an m2 of 1e9, a max above every listed
    value and an outside pair inside the band (their checksum made anew) had been resumed."""
    M = float(saved.hist_error_bound)
    if cfg.outside and saved.outside_pairs is not None:
        a, b = cfg.outside
        v = np.asarray(saved.outside_pairs[0], dtype=np.float64)
        if v.size > int(saved.outside_count):
            refuse(f"outside_pairs: {v.size} listed, outside_count {saved.outside_count}")
        slack = 1e-6 * (abs(a) + abs(b) + 1.0)
        if v.size and bool(((v > a + slack) & (v < b - slack)).any()):
            refuse(f"outside_pairs: a value inside ({a}, {b})")
    lo_e, hi_e = saved.min, saved.max
    if not saved.count or lo_e is None or hi_e is None:
        return
    lo, hi = float(lo_e[0]), float(hi_e[0])
    tol = 1e-6 * (abs(lo) + abs(hi) + 1.0)
    if hi < lo - tol:
        refuse("min is more than max")
    if not lo - M - tol <= float(saved.mean) <= hi + M + tol:
        refuse("the mean must lie between min and max")
    count, m2 = int(saved.count), float(saved.m2)
    wide, narrow = hi - lo + 2 * M, max(hi - lo - 2 * M, 0.0)
    if m2 > count * wide * wide / 4 * (1 + 1e-6) + count * tol:
        refuse("m2 is more than values between min and max allow")
    if count >= 2 and m2 < narrow * narrow / 2 * (1 - 1e-6) - tol:
        refuse("m2 is less than min and max give together")
    for kind in LIST_KINDS:
        v = np.asarray(getattr(saved, kind)[0], dtype=np.float64)
        if v.size and bool(((v < lo - tol) | (v > hi + tol)).any()):
            refuse(f"{kind}: a value outside [min, max]")
    for kind, end, lead in (("top", hi, max), ("bottom", lo, min)):
        v = np.asarray(getattr(saved, kind)[0], dtype=np.float64)
        if v.size and abs(lead(v.tolist()) - end) > tol:
            refuse(f"{kind}: its first value is not the {'max' if kind == 'top' else 'min'}")
    for name in ("row_top", "row_bottom"):
        rows = getattr(saved, name)
        if rows is None:
            continue
        vals, idx = np.asarray(rows[0], dtype=np.float64), np.asarray(rows[1])
        listed = vals[idx >= 0]
        if listed.size and bool(((listed < lo - tol) | (listed > hi + tol)).any()):
            refuse(f"{name}: a value outside [min, max]")
