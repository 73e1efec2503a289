"""`embgeom.faiss.IndexFlatIP` / `IndexFlatL2`: the calls pipelines make on FAISS's flat
indexes (add, search, range_search, reset, ntotal, d, train, reconstruct, reconstruct_n) on an
embgeom Index, with FAISS's arguments and return values: float32 numpy arrays in, (distances
float32, labels int64) out, padding label -1 with distance -FLT_MAX (IP) / FLT_MAX (L2), L2 as
squared distance, range results (lims uint64, D, I) in label order with IP > radius and L2 <
radius, as FAISS does.
FAISS itself is not imported. Values are exact (float64 rescoring), equal scores ordered by
label.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import validation
from .api_types import Count, Scalar
from .index import Index

FLT_MAX = float(np.finfo(np.float32).max)
METRIC_INNER_PRODUCT = 0
METRIC_L2 = 1


class _IndexFlat:
    metric_type = -1
    is_trained = True

    def __init__(self, d: int, dtype: str = "float32"):
        self.d = validation.positive_int(d, "d", allow_zero=False)
        self._dtype = dtype
        self.reset()

    def _rows(self, x, name: str) -> np.ndarray:
        a = np.asarray(x)
        if a.ndim != 2 or a.shape[1] != self.d:
            raise ValueError(f"{name}: expected (n, {self.d}) float32, got {a.shape} {a.dtype}")
        if a.dtype.kind not in "fiub":  # FAISS converts any real numbers to float32
            raise TypeError(f"{name}: expected (n, {self.d}) float32, got {a.shape} {a.dtype}")
        if a.dtype.itemsize > 4 and a.size:
            with np.errstate(invalid="ignore"):
                big = np.abs(a).max()
            if big > FLT_MAX:  # (NaN and inf pass here: the Index names them)
                if np.isfinite(big):
                    raise ValueError(f"{name}: values up to {big:.3g}, beyond float32's range ({FLT_MAX:.3g})")
        return np.ascontiguousarray(a, dtype=np.float32)

    @property
    def ntotal(self) -> int:
        return self._index.ntotal

    def reset(self) -> None:
        self._index = Index(np.zeros((0, self.d), np.float32), metric=self._metric, dtype=self._dtype)

    def add(self, x) -> None:
        """Append rows (n, d); their labels continue from ntotal."""
        with validation.renamed(more="x"):
            self._index.add(self._rows(x, "x"))

    def train(self, x) -> None:
        """Nothing to learn for a flat index (is_trained is True): x is checked, as FAISS does."""
        self._rows(x, "x")

    def reconstruct(self, key: int) -> np.ndarray:
        """The stored row `key` as a (d,) float32 array (a copy)."""
        key = self._label(key, "key")
        return self._index.vectors(key, key + 1)[0].cpu().numpy().copy()

    def reconstruct_n(self, n0: int = 0, ni: int = -1) -> np.ndarray:
        """Stored rows n0 .. n0 + ni - 1 as an (ni, d) float32 array (a copy); ni = -1: to the end."""
        n0 = self._label(n0, "n0", end_ok=True)
        if isinstance(ni, bool) or not isinstance(ni, (int, np.integer)):
            raise TypeError(f"ni: expected an int, got {type(ni).__name__}")
        ni = self.ntotal - n0 if ni == -1 else int(ni)
        if not 0 <= ni <= self.ntotal - n0:
            raise ValueError(f"ni: expected 0 .. {self.ntotal - n0} rows from n0 = {n0} (ntotal {self.ntotal}), "
                             f"or -1, got {ni}")
        return self._index.vectors(n0, n0 + ni).cpu().numpy().copy()

    def _label(self, value, name: str, end_ok: bool = False) -> int:
        """A stored row's label checked (FAISS read past its rows for -1)."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not 0 <= int(value) < self.ntotal + int(end_ok):
            raise ValueError(f"{name}: expected 0 <= {name} {'<=' if end_ok else '<'} {self.ntotal} (ntotal), "
                             f"got {int(value)}")
        return int(value)

    def search(self, x, k: Count, *, params=None, D=None,
               I=None) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741 (FAISS's names)
        """-> (D (n, k) float32, I (n, k) int64); D and I given: filled and returned, as FAISS
        does. params: None (a flat index takes no search parameters)."""
        k = validation.positive_int(k, "k", allow_zero=False)
        if params is not None:
            raise ValueError(f"params: a flat index takes no search parameters, got {params!r}")
        q = validation.numpy_tensor(self._rows(x, "x"))
        for name, out, dtype in (("D", D, np.float32), ("I", I, np.int64)):
            if out is not None and (not isinstance(out, np.ndarray) or out.shape != (q.shape[0], k)
                                    or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable):
                raise ValueError(f"{name}: expected a writable C-contiguous ({q.shape[0]}, {k}) {np.dtype(dtype)} "
                                 f"array, got {getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}")
        with validation.renamed(queries="x"):
            s, ids = self._index.search(q, int(k), float64=True)
        s, ids = s.cpu().numpy(), ids.cpu().numpy()
        pad = ids < 0
        if self._metric == "l2":
            s = s * s
            s[pad] = FLT_MAX
        else:
            s[pad] = -FLT_MAX
        s = s.astype(np.float32)
        if D is not None:
            D[...] = s
            s = D
        if I is not None:
            I[...] = ids
            ids = I
        return s, ids

    def range_search(self, x, radius: Scalar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (lims (n + 1,) uint64, D float32, I int64); query q's results are
        [lims[q], lims[q + 1]), in label order. L2: squared distance < radius, decided on the
        float64 sum of the squared differences (the distance's square would round either way
        at the radius); IP: inner product > radius. An infinite radius is taken as FAISS
        takes it (L2 inf: every row; IP -inf: every row)."""
        q = validation.numpy_tensor(self._rows(x, "x"))
        r = validation.number(radius, "radius")
        if math.isnan(r):
            raise ValueError(f"radius: expected a number, got {radius!r}")
        r = float(np.float32(r))  # FAISS takes the radius as a float32
        # the Index's inclusive cut, a little wider than the radius (the exact test follows)
        if self._metric == "l2":
            cut = math.sqrt(max(r, 0.0)) * (1 + 1e-12) if r < math.inf else 1e300
        else:
            cut = max(r, -1e300) if r < math.inf else 1e300
        with validation.renamed(queries="x"):
            lims, s, ids = self._index._range(q, cut, float64=True, by_score=False)   # (label order)
        lims, s, ids = lims.cpu().numpy(), s.cpu().numpy(), ids.cpu().numpy()
        qid = np.repeat(np.arange(len(lims) - 1), np.diff(lims))
        if self._metric == "l2":  # the Index's own float64 sums of squared differences (the distances' squares)
            index = self._index
            s = index._pair_sums(index._store, q, torch.from_numpy(qid), torch.from_numpy(ids)).numpy()
        keep = s < r if self._metric == "l2" else s > r
        qid = qid[keep]
        counts = np.bincount(qid, minlength=len(lims) - 1)
        s, ids = s[keep], ids[keep]
        new_lims = np.zeros(len(lims), np.uint64)
        new_lims[1:] = np.cumsum(counts)
        return new_lims, s.astype(np.float32), ids


class IndexFlatIP(_IndexFlat):
    """Exact inner-product search (no normalisation: normalise rows for cosine)."""

    metric_type = METRIC_INNER_PRODUCT
    _metric = "dot"


class IndexFlatL2(_IndexFlat):
    """Exact squared-L2 search."""

    metric_type = METRIC_L2
    _metric = "l2"
