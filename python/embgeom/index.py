"""A prepared corpus for repeated queries: `Index(corpus).search(queries, k)` (docs/metrics.md,
prepared index).

The corpus is validated and prepared once (float32 rows, their float64 norms, and the rows the
scan multiplies: the float32 rows or a bfloat16 copy). A search scans the prepared rows with one
matrix product per block (no copy of the corpus, no tile set-up), keeps per query more candidates
than asked for, and rescores them exactly in float64 from the stored float32 rows. Candidates are
taken within a sound bound of the scan's rounding error, and a query whose bound is not met by the
kept candidates is scanned again, so the ids equal float64 brute force on the stored rows, ties
(equal float64 values) broken by the smaller id, whatever the scan precision.

Reads are thread safe: a search works on one immutable snapshot of the stored arrays; `add`
writes rows past every snapshot's end (or into new buffers) and then swaps the snapshot.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import threading
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import validation
from .api_types import Count, DeviceArg, PathArg, ProgressArg, Scalar
from .engine.lists import sort_rows
from .io import atomic_write, check_output_path
from .numerics import correct_sqrt, saturated
from .interrupts import interrupt_after, terminate_as_interrupt
from .pair_shards import PAIR_METRICS as METRICS
from .pair_shards import ShardWriter
from .progress import as_progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAGIC = b"EMBGEOM-INDEX2"
FORMAT = 2  # 2: the sha256 covers what the header says of the arrays (metric, dtype, shape) too


def _file_digest(header: dict):
    """The sha256 an index file records, started: the header's description of the rows
    (format, metric, dtype, n, d) as canonical JSON, the arrays' bytes to follow (a file whose
    metric was edited from cosine to dot had loaded and answered under dot)."""
    about = {k: header[k] for k in ("format", "metric", "dtype", "n", "d")}
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode())
MAX_HEADER_BYTES = 1 << 16
DATA_ALIGN = 4096
# A score block (queries x corpus rows, float32) stays within this many bytes: big enough that
# one product per block dominates, small enough to stay near the caches.
SCORE_BLOCK_BYTES = 32 << 20
# (query, row) pairs a block of a search whose candidates came from the engine rescores at once:
# the vocabulary's semantic_search rescored in 112 blocks of 274 queries, 0.5 ms of Python each
RESCORE_PAIRS = 1 << 20
U32 = 2.0 ** -24
# Up to this many queries, a scan block is computed by the C++ core (rows_dot) and its best
# values selected by it (scores_topk; numpy without the core): see _score and _largest
SMALL_BATCH = 4
# From this many queries, a float32 cosine / dot search on the CPU takes its candidates from the
# C++ engine's per-row lists in cross mode against the corpus prepared once for it (packed
# panels, _engine_columns): product near the sgemm rate, lists filtered inside the product's
# pass, no queries x corpus score matrix. Over 100,000 x 384 (2 threads, Zen 5): 7.9 ms against
# 13.9 ms at 2 queries, 11 against 33 at 32, 206 against 723 at 1,024. Up to SMALL_BATCH
# queries stay on the memory-bound scan (_score: the core's rows_dot_f32, each row read once for
# all of them, and scores_topk): on Zen 4, 5.4-5.8 ms at 2 and 4 queries against the engine's
# 7.3-7.8 (the engine took 2 queries on until the scan's selection moved into the core).
ENGINE_BATCH = SMALL_BATCH + 1
# The engine's prepared copy of the corpus costs about one pass of packing over it (0.29 s for
# 100,000 x 384 on the AVX2 Zen 3 host, where a scan of 32 queries takes 20-45 ms): a search
# prepares it when the index has been searched before (a pipeline's repeated calls) or brings
# at least this many queries (the engine then gains more than the packing costs); a first
# search with fewer scans, so a one-shot search (the drop-ins' semantic_search) never pays it.
ENGINE_PREPARE_QUERIES = 256
# rows of queries prepared at a time (_queries): their float64 copies stay in the caches
QUERY_PREP_ROWS = 2048
# A bf16 CPU index: up to this many queries a search scans its bf16 rows with the C++ core's
# rows_dot_bf16 (float32 queries' products summed in float32, each row read once for all
# queries: half the bytes of the float32 rows, where a few queries are bound by memory), on
# every CPU path. 100,000 x 384, 2 threads: Zen 3 AVX2 7.8 ms a query against 15.6 for numpy's
# float32 product; Zen 4 (bf16 dot) 2.6-2.8 ms against the engine's bf16 product 5.2-5.4 at one
# query, 4.1-4.2 against 5.5 at four. Beyond it: the engine's bf16 product where it has one
# (native_bf16: AMX tiles, or a bf16 dot faster than float32), else the float32 rows (the engine;
# torch would emulate bf16).
BF16_ROWS_SCAN = SMALL_BATCH
# A bf16 scan (an engine with a bf16 product) takes the engine past the rows scan: its bf16
# product over the prepared columns beats torch's bf16 matrix product there (100,000 x 384, 2
# threads, Zen 5, one query: 5.5 ms against 6.4, when the engine took one query on).
ENGINE_BATCH_BF16 = BF16_ROWS_SCAN + 1
EXACT_STEP_PAIRS = 4096  # candidate rows rescored per step (_exact)
PREP_ROWS = 1 << 15  # rows per float64 step when preparing a corpus
BF16_OUT = 2.0 ** -8  # relative rounding of a bf16 product's output (unit roundoff 2^-9, doubled)
# pairs_above on the CPU (cosine, dot): bands of PAIR_BAND rows take their candidates from the C++
# engine's outside-pairs list, in cross mode against PAIR_CHUNK corpus rows at a time (the
# engine's packed copy of a chunk: 50 MB at D = 384, so memory stays the corpus plus a chunk);
# a chunk whose candidates overflow PAIR_LIST falls back to the score blocks. 30,000 x 384 unit
# rows at 0.9 (2 threads, Zen 5): 1.0 s (bf16 engine) / 1.5 s (fp32 engine) against 2.9 s.
# With a bf16 product the bands are 4x longer (pair_band): on AMX tiles (Emerald Rapids) preparing
# a chunk's columns (70 ms) took as long as a 2,048-row band's run against them (106 ms), and
# 100,000 x 384 at 0.9 took 5.7-6.0 s in bands of 8,192 rows against 8.2-10.1 s (alternating
# runs); the fp32 engine was no faster with them (35.6-45.7 against 33.4-41.5 s, AVX2 forced).
PAIR_BAND = 2048
PAIR_BAND_BF16 = 8192
PAIR_CHUNK = 1 << 15
PAIR_LIST = 1 << 16  # per PAIR_BAND rows of a band

# search_stored takes the engine's bf16 filter for lists up to this long (vocabulary, Zen 4, 2
# threads, engine runs, medians of 3-5 interleaved, fast against exact, since fast mode's
# compactions are branch-free: row top-117 2.48 / 2.90 s, 200 3.49 / 3.67, 400 5.08 / 4.47)
FAST_STORED_K = 200
# candidates listed beyond k before the float64 rescoring (float32 and bf16 scans): rows whose
# list is too short for the scan margin are scanned again (_best_of_scan). search_stored(11) on the
# vocabulary (Zen 4, fast mode): 16 extra 2.00-2.11 s, 8: 2.25 s, 4: 1.73 s (no row
# rescanned), 2: 1.74 s (14 rows rescanned), 1: 2.43 s (602 rows); AVX2 Zen 3, exact mode:
# 16 2.78 s, 4 2.67 s. Identical rows tie in every list holding one of them, so a search with
# many queries lists past the largest group of them (_tie_group) up to TIE_GROUP_MAX: 30,400
# rows in groups of 19 took 12.4 s at 4 extra (every row rescanned) against 1.8 s at 16.
EXTRA_F32, EXTRA_BF16 = 4, 64
# queries from which a search groups the stored rows first (a pass over them, kept per snapshot)
TIE_GROUP_QUERIES = 256
TIE_GROUP_MAX = 64


def _raw_bytes(a: np.ndarray) -> memoryview:
    """The bytes of a contiguous array, empty ones too (memoryview.cast refuses zero shapes)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    if value in (torch.float32, torch.bfloat16):
        return value
    raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16 (or 'float32', 'bfloat16'), got {value!r}")


def _rows(x: Any, name: str, d: int | None = None, *, queries: bool = False) -> torch.Tensor:
    """(N, D) float, N may be 0 (an empty corpus or query set); finite values. queries: rows
    that are normalised (cosine) or checked against the stored rows, not stored themselves."""
    t = validation.as_tensor(x, name)
    if t.dim() != 2 or t.shape[1] == 0 or not t.dtype.is_floating_point or t.dtype not in validation.FLOAT_DTYPES:
        got = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        if t.dim() == 2 and t.shape[1] == 0:
            raise ValueError(f"{name}: expected (N, D) float with D >= 1, got {got}")
        raise (TypeError if t.dim() == 2 else ValueError)(f"{name}: expected (N, D) float, got {got}")
    if d is not None and t.shape[1] != d:
        raise ValueError(f"{name}: expected D = {d} to match the index, got {tuple(t.shape)}")
    validation.check_finite(t, name)
    # queries are normalised (cosine) or checked against the rows (dot, l2) in float64
    validation.fits_float32(t, name, small_rows=not queries)
    return t


# Under cosine a float32 index scans its rows times 1/|c| in float32: rows whose norms lie outside
# this range would make subnormal products (below) or scales (above, past 1 / float32's smallest
# normal 8.5e37), whose rounding the scan margin does not cover, or infinite ones.
COSINE_NORMS = (1e-30, 1e36)


def _check_magnitudes(metric: str, norms: torch.Tensor, other_max: float, names: tuple[str, str]) -> None:
    """ValueError for rows the float32 scan cannot take: under dot / l2 products beyond float32
    or below its normal range (validation.norm_range) with rows of norms up to other_max, under
    cosine nonzero norms outside COSINE_NORMS."""
    if norms.numel() == 0:
        return
    norms = _host(norms)
    if metric != "cosine":
        validation.norm_range(float(norms.max()), other_max, metric, names)
        return
    lo, hi = COSINE_NORMS
    bad = ((norms > 0) & (norms < lo)) | (norms > hi)
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        more = f" (and {len(rows) - 10} more)" if len(rows) > 10 else ""
        raise ValueError(f"{names[0]}: {len(rows)} row(s) with norms outside [{lo:g}, {hi:g}] "
                         f"(norms {float(norms[bad].min()):.3g} to {float(norms[bad].max()):.3g}), "
                         f"which a float32 scan cannot take: {rows[:10]}{more}; scale them")


def _host(t: torch.Tensor) -> np.ndarray:
    """A row quantity (norms, biases) as numpy, for the checks and summaries of an add or a
    query batch: numpy's operations on a few values cost a microsecond, torch's 5-15 (an add of
    one row took 240 us against FAISS's 5)."""
    return t.detach().cpu().numpy()


@dataclass(frozen=True)
class _Store:
    """One snapshot of the stored rows: arrays are buffers of `capacity` rows, valid up to n."""

    rows: torch.Tensor          # (cap, D) float32, the stored rows (rescoring reads these)
    norms: torch.Tensor         # (cap,) float64 L2 norms of the float32 rows
    scan: torch.Tensor          # (cap, D) what the scan multiplies: rows, or bf16 (unit) rows
    scale: torch.Tensor | None  # (cap,) float32 1/norm (cosine on float32 rows; 0 for zero rows)
    bias: torch.Tensor | None   # (cap,) float32 -|c|^2 / 2 (l2)
    n: int
    zero_rows: int              # rows with norm 0 (cosine: never returned)
    cmax: float                 # max norm of the scanned rows (1 for cosine)
    bias_max: float             # max |bias|
    scan_delta: float           # max |bf16 row - row| of the scanned rows (0 for float32)


def _each_buffer(st: _Store, fn) -> dict:
    """{field: fn(field, array)} over the store's row arrays (None stays None), fn called once per
    distinct array: a float32 index's scan is its rows (grown apart by an add, they had held
    every row twice)."""
    done: dict[int, Any] = {}
    out = {}
    for name in ("rows", "norms", "scan", "scale", "bias"):
        t = getattr(st, name)
        if t is not None and id(t) not in done:
            done[id(t)] = fn(name, t)
        out[name] = None if t is None else done[id(t)]
    return out


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float32 (numpy's conversion on the CPU, as in _host; the same rounding)."""
    if t.device.type == "cpu":
        return torch.from_numpy(t.numpy().astype(np.float32))
    return t.float()


def _write_rows(buf: torch.Tensor, at: int, rows: torch.Tensor) -> None:
    """buf[at:at + len(rows)] = rows; numpy's copy for CPU buffers numpy has a type for (0.7 us
    for a row, torch's 4.5)."""
    if buf.device.type == "cpu" and buf.dtype != torch.bfloat16 and rows.device.type == "cpu":
        buf.numpy()[at:at + rows.shape[0]] = rows.numpy()
    else:
        buf[at:at + rows.shape[0]] = rows


def _inverse_norms64(norms: torch.Tensor) -> torch.Tensor:
    """1 / |x| of float64 norms, 0 for zero rows (what a cosine index scales its rows by; numpy
    on the CPU, as in _host)."""
    if norms.device.type == "cpu":
        n = norms.numpy()
        return torch.from_numpy(np.divide(1.0, n, out=np.zeros_like(n), where=n > 0))
    return torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))


def _inverse_norms(st: "_Store", c0: int, c1: int) -> np.ndarray:
    """float32 1/|c| of stored rows [c0, c1) (0 for zero rows), for scanning a bf16 index's
    float32 rows under cosine; in numpy: a torch op over a whole block would wake its thread
    pool (see _largest)."""
    norms = st.norms[c0:c1].numpy()
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)


# a float64 cosine query row whose largest magnitude lies outside [2^-100, 2^100] is scaled
# (_exact_queries): its squared sum, and that times a stored row's, stay far from under- and
# overflow
EXACT_QUERY_RANGE = (2.0 ** -100, 2.0 ** 100)


def _exact_queries(q: torch.Tensor, metric: str) -> torch.Tensor:
    """The queries of the exact values (_exact_pairs): float32 or float64 as given (others as
    float64). Under cosine a float64 row of very small or large magnitude (EXACT_QUERY_RANGE) is
    multiplied by a power of two near its largest magnitude: exact, so its cosines keep their
    bits, where its squared sum had underflowed (rows of 1e-200 scored 1 against everything)."""
    qexact = q if q.dtype in (torch.float32, torch.float64) else q.double()
    if metric != "cosine" or qexact.dtype != torch.float64 or qexact.numel() == 0:
        return qexact
    lo, hi = EXACT_QUERY_RANGE
    if qexact.device.type == "cpu":  # (numpy: a few queries' latency, see _search_few)
        x = qexact.numpy()
        top = np.abs(x).max(axis=1)
        odd = ((top < lo) | (top > hi)) & (top > 0)
        if not odd.any():
            return qexact
        x = x.copy()
        x[odd] = np.ldexp(x[odd], -np.frexp(top[odd])[1][:, None])
        return torch.from_numpy(x)
    top = qexact.abs().amax(dim=1)
    odd = ((top < lo) | (top > hi)) & (top > 0)
    e = torch.where(odd, torch.frexp(top)[1], torch.zeros_like(top, dtype=torch.int32))
    return torch.ldexp(qexact, -e[:, None].double())


def _norms64(rows: torch.Tensor) -> torch.Tensor:
    """float64 L2 norms (M,) of rows (M, D): for CPU float32 rows the C++ core's float64 sums of
    the float32 products (row_pair_sums, no float64 copy: 100,000 x 384 in about 0.03 s against
    0.2 s; float32 squares cannot underflow in float64), else torch's of the float64 values
    divided by each row's largest magnitude (float64 rows of 1e-300 would square to 0),
    PREP_ROWS rows at a time."""
    from .backends.registry import cpp_kernel

    sums = cpp_kernel("row_pair_sums", rows) if rows.shape[0] else None
    if sums is not None:
        x = rows.detach().contiguous().numpy()
        return torch.from_numpy(np.sqrt(sums(x, x)[:, 0]))

    def block(r: torch.Tensor) -> torch.Tensor:
        # scaled by a power of two near each row's largest magnitude: exact, so the norm has the
        # bits of the unscaled one wherever that neither underflows nor overflows
        r = r.double()
        # (a float64 exponent: torch < 2.5 takes 2^e of an int32 e in float32, inf or 0 past 2^127)
        e = torch.frexp(r.abs().amax(dim=1, keepdim=True))[1].double()
        return torch.linalg.vector_norm(torch.ldexp(r, -e), dim=1) * torch.ldexp(torch.ones_like(r[:, 0]), e[:, 0])

    return torch.cat([block(rows[a:a + PREP_ROWS]) for a in range(0, rows.shape[0], PREP_ROWS)]
                     or [rows.new_zeros(0, dtype=torch.float64)])


def _bf16_scan(rows: torch.Tensor, norms: torch.Tensor | None, inv: torch.Tensor | None,
               scan: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """A bf16 index's scan rows and their rounding, the largest float64 norm over rows of scan -
    rows / norms (norms None: scan - rows). scan None: made, bf16(float32(rows * inv)) (inv None:
    bf16(rows)); given (a loaded index): only read. CPU rows take the C++ core's bf16_scan_rows
    (the same bits: 0.06 s for 100,000 x 384 where torch's float64 arithmetic took 1.3 s on 2
    cores), others torch, PREP_ROWS rows at a time."""
    from .backends.registry import cpp_kernel

    fill = scan is None
    if fill:
        scan = torch.empty(rows.shape, dtype=torch.bfloat16, device=rows.device)
    if rows.shape[0] == 0:
        return scan, 0.0
    kernel = cpp_kernel("bf16_scan_rows", rows)
    if kernel is not None and scan.device.type == "cpu" and scan.is_contiguous():
        as_np = (lambda t: None if t is None else t.contiguous().numpy())  # noqa: E731
        delta = kernel(rows.detach().contiguous().numpy(), as_np(inv), as_np(norms), scan.view(torch.int16).numpy(),
                       fill)
        return scan, float(delta)
    delta = 0.0
    for a in range(0, rows.shape[0], PREP_ROWS):
        r = rows[a:a + PREP_ROWS].double()
        if fill:
            scan[a:a + PREP_ROWS] = r if inv is None else r * inv[a:a + PREP_ROWS, None]
        ref = r if norms is None else r / norms[a:a + PREP_ROWS].clamp(min=1e-300)[:, None]
        delta = max(delta, float(torch.linalg.vector_norm(scan[a:a + PREP_ROWS].double() - ref, dim=1).max()))
    return scan, delta


def _rows_dot(dtype: torch.dtype):
    """The C++ core's scan of a few queries over float32 or bf16 rows (rows_dot_f32,
    rows_dot_bf16), or None where the core is not built."""
    from .backends.registry import cpp_kernel

    return cpp_kernel("rows_dot_bf16" if dtype == torch.bfloat16 else "rows_dot_f32")


def pair_band() -> int:
    """Rows per band of pairs_above's engine path (PAIR_BAND_BF16 where the engine has a bf16
    product, else PAIR_BAND)."""
    return PAIR_BAND_BF16 if native_bf16() else PAIR_BAND


def _bf16_filter(kk: int) -> bool:
    """Whether an engine run for float32 per-row lists of kk takes fast mode's bf16 filter: where
    the engine has a bf16 product, up to FAST_STORED_K. Its lists are exact mode's, bit for bit
    (exact fp32 values; benchmarks/compare.py checks it), and faster: row top-10 0.78 s against
    1.13 s on the vocabulary (Zen 5), 32 / 1,024 queries over 100,000 x 384 in 13-15 / 135-194 ms
    against 29-42 / 434-485 (AMX, Emerald Rapids)."""
    return native_bf16() and kk <= FAST_STORED_K


def native_bf16() -> bool:
    """Whether the C++ engine has a bf16 product on this CPU path now (AMX tiles, or a bf16 dot
    that outruns float32: the core's dispatch, which reads EMBGEOM_CPU and EMBGEOM_GEMM on every
    call, as a new engine does); True when the core is not built (torch then decides alone)."""
    from .backends.registry import cpp

    core = cpp()
    return True if core is None or not hasattr(core, "fast_product") else bool(core.fast_product()["bf16"])


def _true_at(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (int64) of mask's True entries, in order. On the CPU numpy's flatnonzero:
    torch's nonzero and boolean indexing took 180 ms to select 4 million entries, numpy 15."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.flatten().nonzero().squeeze(1)


def _take(at: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 1-D tensor's entries at positions `at` (numpy's gather on the CPU, as in _true_at)."""
    if at.device.type == "cpu":
        where = at.numpy()
        return tuple(torch.from_numpy(t.numpy()[where]) for t in tensors)
    return tuple(t[at] for t in tensors)


def _stable_order(keys: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts a 1-D tensor, equal keys kept in order. On the CPU numpy's
    timsort, which merges the sorted runs that score blocks give (torch's stable argsort took
    380 ms for 4 million query offsets already in order)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def _hits(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of a 2-D bool tensor's True entries in row-major order (2-D nonzero took
    76 ms for 2,048 x 4,096 in torch and numpy; flat positions and a division 16 ms)."""
    if hit.device.type != "cpu":
        return hit.nonzero(as_tuple=True)
    at = np.flatnonzero(hit.numpy())
    rows = at // hit.shape[1]
    at -= rows * hit.shape[1]
    return torch.from_numpy(rows), torch.from_numpy(at)


def _pad_lists(values: torch.Tensor, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query (values, ids) lists (Q, w) widened to `width` columns: value NaN, id -1 (none)."""
    pad = (0, width - values.shape[1])
    return torch.nn.functional.pad(values, pad, value=math.nan), torch.nn.functional.pad(ids, pad, value=-1)


def _largest(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of s and their columns, largest first. A few CPU rows
    go through the C++ core's scores_topk (one pass against the running k-th best: 0.05 ms for
    100,000 scores where numpy's argpartition took 1 ms), or numpy's argpartition without the
    core: torch.topk's parallel region leaves its threads spinning while the next scan wants the
    same cores (measured: 8 ms a query instead of 3.6); for more rows torch.topk's threads pay
    for themselves."""
    if s.shape[0] > SMALL_BATCH or s.device.type != "cpu" or s.dtype != torch.float32:
        return torch.topk(s, k, dim=1)
    from .backends.registry import cpp_kernel

    select = cpp_kernel("scores_topk", s)
    if select is not None:
        vals, cols = select(s.contiguous().numpy(), k)
        return torch.from_numpy(vals), torch.from_numpy(cols)
    a = s.numpy()
    cols = np.argpartition(a, a.shape[1] - k, axis=1)[:, a.shape[1] - k:]
    vals = np.take_along_axis(a, cols, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return (torch.from_numpy(np.take_along_axis(vals, order, 1)),
            torch.from_numpy(np.take_along_axis(cols, order, 1).astype(np.int64)))


class Index:
    """A corpus prepared once for repeated nearest-neighbour queries.

    corpus: (N, D) float (N may be 0). metric: "cosine" (zero rows are never returned), "dot"
    or "l2" (Euclidean distance, smaller is nearer). dtype: the precision of the scan,
    torch.float32 or torch.bfloat16 (half the bytes read per query; results stay exact, as
    candidates are rescored in float64). device: where the rows live ("cpu", "cuda"), default
    the corpus's device. copy=False: use the corpus's memory when it is float32, contiguous and
    on that device (no second copy of a large corpus; the caller must not change it meanwhile).
    """

    def __init__(self, corpus, metric: str = "cosine", dtype: torch.dtype | str = torch.float32,
                 device: DeviceArg = None, *, copy: bool = True):
        self.metric = validation.metric(metric, "metric", METRICS)
        copy = validation.flag(copy, "copy")
        self.dtype = _dtype(dtype)
        x = _rows(corpus, "corpus")
        self.device = validation.device(device) if device is not None else x.device
        self.d = int(x.shape[1])
        self._lock = threading.Lock()
        self._columns = None  # (snapshot, precision, the C++ engine's prepared rows): _engine_columns
        self._ties = None  # (snapshot, _tie_group)
        self._searched = None  # the snapshot the last engine-eligible search ran on (ENGINE_PREPARE_QUERIES)
        # by default the index keeps its own copy: a caller's later writes cannot reach it
        rows = x.detach().to(self.device, torch.float32, copy=copy).contiguous()
        self._store = self._prepare(rows, None, 0)

    # -- preparing rows ---------------------------------------------------------------------

    def _derived(self, rows: torch.Tensor, name: str, stored_max: float | None):
        """(norms, scan rows, scale, bias, scan rounding) of float32 rows (M, D), refused
        (ValueError naming `name`) where the scan cannot take their magnitudes
        (_check_magnitudes; stored_max: the largest norm already stored). float64 work goes in
        the C++ core or PREP_ROWS rows at a time: a float64 copy of a whole 1M x 384 corpus
        would be 3 GB."""
        norms = _norms64(rows)
        # stored rows meet each other (pairs_above) and the queries meet them all
        own = float(_host(norms).max()) if norms.numel() else 0.0
        _check_magnitudes(self.metric, norms, max(own, stored_max or 0.0), (name, "corpus"))
        scale = bias = inv = None
        if self.metric == "cosine":
            inv = _inverse_norms64(norms)
            if self.dtype == torch.float32:
                scale = _as_float32(inv)
        elif self.metric == "l2":
            bias = _as_float32(-0.5 * norms * norms)
        if self.dtype == torch.float32:
            return norms, rows, scale, bias, 0.0
        scan, delta = _bf16_scan(rows, norms if self.metric == "cosine" else None, inv)
        return norms, scan, scale, bias, delta

    def _summary(self, norms, bias) -> tuple[int, float, float]:
        if norms.shape[0] == 0:
            return 0, 0.0, 0.0
        norms = _host(norms)
        zero = int(np.count_nonzero(norms == 0))
        cmax = 1.0 if self.metric == "cosine" else float(norms.max())
        bias_max = float(np.abs(_host(bias)).max()) if bias is not None else 0.0
        return zero, cmax, bias_max

    def _prepare(self, rows: torch.Tensor, old: _Store | None, spare: int, name: str = "corpus") -> _Store:
        # the index's buffers are ordinary tensors whatever the caller's grad mode: buffers made
        # under torch.inference_mode are inference tensors, which no later add outside it could
        # write into
        with torch.inference_mode(False):
            return self._prepared(rows, old, spare, name)

    def _prepared(self, rows: torch.Tensor, old: _Store | None, spare: int, name: str) -> _Store:
        norms, scan, scale, bias, delta = self._derived(rows, name, None if old is None or not old.n else old.cmax)
        zero, cmax, bias_max = self._summary(norms, bias)
        if old is None:
            return _Store(rows, norms, scan, scale, bias, rows.shape[0], zero, cmax, bias_max, delta)
        n, m = old.n, rows.shape[0]
        if old.rows.shape[0] >= n + m and spare:
            bufs = old  # room past every reader's end: write in place
        else:
            cap = max(n + m, int(old.rows.shape[0] * 1.5))

            def grow(_, t):
                out = torch.empty((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                out[:n] = t[:n]
                return out

            bufs = dataclasses.replace(old, **_each_buffer(old, grow))
        new = {"rows": rows, "norms": norms, "scan": scan, "scale": scale, "bias": bias}

        def append(name: str, mine: torch.Tensor) -> torch.Tensor:
            _write_rows(mine, n, new[name])
            return mine

        _each_buffer(bufs, append)
        return _Store(bufs.rows, bufs.norms, bufs.scan, bufs.scale, bufs.bias, n + m,
                      old.zero_rows + zero, max(old.cmax, cmax), max(old.bias_max, bias_max),
                      max(old.scan_delta, delta))

    def add(self, more) -> None:
        """Append rows (M, D) float; their ids continue from ntotal. Searches running meanwhile
        see the index before or after the call, never a part of it."""
        x = _rows(more, "more", self.d).detach().to(self.device, torch.float32).contiguous()
        if x.shape[0] == 0:
            return
        with self._lock:
            old = self._store
            # a loaded index's arrays are file mappings: new rows go to fresh buffers
            own = getattr(self, "_owns_buffers", True)
            self._store = self._prepare(x, old, spare=int(own), name="more")
            self._owns_buffers = True
            # what was kept for the old snapshot (the engine's packed rows, its tie groups, a
            # loaded file's mappings) serves no later search: let it go now, not at the next
            # search that takes the engine (few-query searches never replaced it)
            self._columns = self._searched = self._ties = None

    @property
    def ntotal(self) -> int:
        """The number of rows in the index (FAISS's name; len(index) is the same)."""
        return self._store.n

    def __len__(self) -> int:
        """The number of rows in the index."""
        return self._store.n

    def __repr__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"Index(n={self.ntotal}, d={self.d}, metric={self.metric!r}, dtype={dt}, device={self.device})"

    def _shared_state(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_columns"] = state["_searched"] = None  # the engine's prepared copy is made again where needed
        # a copy shares the buffers with this index: the copy's add() takes fresh ones, so the
        # two never write the same spare rows (a copy's added row had been overwritten)
        state["_owns_buffers"] = False
        return state

    def __copy__(self) -> "Index":
        new = object.__new__(type(self))
        new.__setstate__(self._shared_state())
        return new

    def __getstate__(self):  # picklable in memory (scikit-learn clones and pickles estimators)
        state = self._shared_state()
        st = self._store
        if st.rows.shape[0] > st.n:  # the rows in use, not the spare capacity of the last add
            state["_store"] = dataclasses.replace(st, **_each_buffer(st, lambda _, t: t[:st.n].clone()))
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def vectors(self, start: Count = 0, stop: Count | None = None) -> torch.Tensor:
        """The stored float32 rows [start, stop) (a view, do not modify); Python's slicing
        (negative from the end, None for the end)."""
        for name, v in (("start", start), ("stop", stop)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise TypeError(f"{name}: expected an int (or None), got {type(v).__name__}")
        st = self._store
        start, stop, _ = slice(start, stop).indices(st.n)  # Python's slicing, within ntotal
        return st.rows[start:max(start, stop)]

    # -- queries ------------------------------------------------------------------------------

    def _scan_dtype(self, queries: int | None = None) -> torch.dtype:
        """The precision a search scans in: the index's dtype, except that a bf16 index on a CPU
        path whose engine has no bf16 product (native_bf16) scans its float32 rows (torch would
        emulate bf16), unless a search or range search brings at most BF16_ROWS_SCAN queries
        (`queries`) and the C++ core has rows_dot_bf16 (_score)."""
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and not native_bf16():
            return torch.bfloat16 if queries is not None and self._bf16_rows_scan(queries) else torch.float32
        return self.dtype

    def _bf16_rows_scan(self, queries: int) -> bool:
        """Whether `queries` queries of this index scan its bf16 rows with the C++ core's
        rows_dot_bf16 (BF16_ROWS_SCAN): a bf16 CPU index, a few queries, the core built."""
        return (self.dtype == torch.bfloat16 and self.device.type == "cpu" and queries <= BF16_ROWS_SCAN
                and _rows_dot(torch.bfloat16) is not None)

    def _queries(self, queries, st: _Store, *, search: bool = False):
        """-> (qexact (Q, D), qscan (Q, D) scan dtype, qvalid (Q,) bool, margin (Q,) float64,
        qsq (Q,) float64 squared norms). qexact: the queries for the exact values (_exact_pairs,
        _exact_queries), float32 or float64 as given (others as float64): the same values as a float64 copy, and
        a float32 copy's rows are half the bytes to read (rescoring the vocabulary's 117
        neighbours a row: 117 against 172 ns a pair, bound by memory, before pair_values' AVX2
        path for float32 queries; 80-97 against 108-131 ns with it). The scan query is the
        unit query (cosine) or the query.
        search: the queries of one search or range search (their count may pick the scan,
        _scan_dtype)."""
        q = _rows(queries, "queries", self.d, queries=True).detach().to(self.device).contiguous()
        qn = _norms64(q)  # (the stored rows' norms are taken the same way: a stored row as a query, the same norm)
        if self.metric != "cosine" and st.n:  # (a cosine query is scanned as a unit row)
            _check_magnitudes(self.metric, qn, st.cmax, ("queries", "corpus"))
        qvalid = qn > 0 if self.metric == "cosine" else torch.ones_like(qn, dtype=torch.bool)
        scan_dtype = self._scan_dtype(q.shape[0] if search else None)
        qscan = torch.empty(q.shape, dtype=scan_dtype, device=q.device)
        qnorm, qr, dq = (torch.empty_like(qn) for _ in range(3))
        # in blocks of rows, so that the float64 copies stay in the caches (all 30,522 rows of
        # the vocabulary at once: 0.13 s, two thirds of it widening to float64 and back)
        for r0 in range(0, q.shape[0], QUERY_PREP_ROWS):
            r1 = min(q.shape[0], r0 + QUERY_PREP_ROWS)
            qs = q[r0:r1].double()  # (float64 queries: the caller's own rows, not to be changed)
            if self.metric == "cosine":
                qs = qs / qn[r0:r1].clamp(min=1e-300)[:, None]
            qscan[r0:r1] = saturated(qs, scan_dtype)
            qnorm[r0:r1] = torch.linalg.vector_norm(qs, dim=1)
            scanned = qscan[r0:r1].double()
            # Sound bound on |scan value - exact value| (docs/metrics.md, prepared index):
            # rounding of the scan's inputs, fp32 accumulation over d terms, the scale / bias
            # step. A bf16 product's output is rounded to bf16 as well: relative to the value
            # for cosine and dot (see `_threshold`), absolute for l2 (the bias is added after
            # the rounding).
            if scan_dtype == torch.float32:
                dq[r0:r1] = U32 * qnorm[r0:r1]
            else:
                dq[r0:r1] = torch.linalg.vector_norm(scanned - qs, dim=1)
            qr[r0:r1] = torch.maximum(qnorm[r0:r1], torch.linalg.vector_norm(scanned, dim=1))
        return _exact_queries(q, self.metric), qscan, qvalid, self._margin(st, qr, dq, scan_dtype), qn * qn

    def _margin(self, st: _Store, qr, dq, scan_dtype: torch.dtype):
        """The scan margin (see _queries) of queries whose scanned norm is at most qr and whose
        scan rounding is dq: increasing in both."""
        d = self.d
        gam = (d + 4) * U32 / (1 - (d + 4) * U32)
        delta = st.scan_delta if scan_dtype == torch.bfloat16 else 0.0  # float32 rows are the rows
        cr = st.cmax + delta
        margin = qr * delta + dq * st.cmax + gam * qr * cr + 4 * U32 * (qr * cr + st.bias_max)
        if scan_dtype == torch.bfloat16 and self.metric == "l2":
            margin = margin + BF16_OUT * qr * cr
        return margin * 1.01 + 1e-30

    def _threshold(self, v: torch.Tensor, margin: torch.Tensor, scan_dtype: torch.dtype) -> torch.Tensor:
        """A scan value every candidate scans at or above (float32): for the k-th best scan value
        v, every row of the exact top k (docs/metrics.md, prepared index); for a threshold v,
        every row whose exact value reaches v. v - 2 margin, and for a bf16 product (cosine,
        dot) the output's relative rounding r widens it by 2.1 r (|v| + 2 margin) (rows_dot_bf16's
        float32 output is not rounded so: a wider cut than it needs). scan_dtype: the queries'."""
        t = v.double() - 2 * margin
        if scan_dtype == torch.bfloat16 and self.metric != "l2":
            t = t - 2.1 * BF16_OUT * (v.double().abs() + 2 * margin)
        # rounded down, never up; at least float32's lowest value, which every scan value reaches
        # (a threshold of -1e39 had become -inf, a bound the engine refuses)
        t = t.clamp(min=-float(torch.finfo(torch.float32).max))
        tf = t.float()
        return torch.where(tf.double() > t, torch.nextafter(tf, torch.full_like(tf, -math.inf)), tf)

    def _few_scan_rows(self, st: _Store, qscan: torch.Tensor, c0: int, c1: int):
        """What the C++ core's scan of a few CPU queries reads (_score, _search_few), as numpy
        arrays: (rows [c0, c1): a bf16 query set's bf16 rows as int16 bit patterns (BF16_ROWS_SCAN),
        else float32 rows (a bf16 index on a CPU path without a bf16 product scans its float32
        rows, _scan_dtype); the float32 scale the values are multiplied by, or None; the float32
        bias then added (l2), or None)."""
        bias = st.bias[c0:c1].numpy() if st.bias is not None else None
        if qscan.dtype == torch.bfloat16:
            return st.scan[c0:c1].view(torch.int16).numpy(), None, bias
        rows = st.scan if st.scan.dtype == torch.float32 else st.rows
        scale = (st.scale[c0:c1].numpy() if st.scale is not None
                 else _inverse_norms(st, c0, c1) if rows is st.rows and self.metric == "cosine" else None)
        return rows[c0:c1].numpy(), scale, bias

    def _score(self, st: _Store, qscan: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Scan values (Qb, c1 - c0) float32, larger = nearer; excluded rows -inf."""
        if ((qscan.dtype == torch.bfloat16 and self._bf16_rows_scan(qscan.shape[0]))
                or (qscan.device.type == "cpu" and qscan.dtype == torch.float32 and qscan.shape[0] <= SMALL_BATCH)):
            # A few queries: the C++ core's rows_dot_f32 / rows_dot_bf16 (each row read once for
            # all of them, on the core's own threads), else numpy's BLAS (torch's q @ C.T ran as a
            # gemv 3x slower, 100,000 x 384). numpy's BLAS threads spinning beside an OpenMP pool
            # on the same cores made calls 2x slower at random (measured at 1 and 32 queries).
            rows, scale, bias = self._few_scan_rows(st, qscan, c0, c1)
            dot = _rows_dot(torch.bfloat16 if rows.dtype == np.int16 else torch.float32)
            q_np = qscan.float().numpy()
            s_np = dot(q_np, rows) if dot is not None else q_np @ rows.T  # (bf16 rows: the core's only)
            if scale is not None:
                s_np *= scale
            if bias is not None:
                s_np += bias
            s = torch.from_numpy(s_np)
        else:
            rows = st.scan if st.scan.dtype == qscan.dtype else st.rows
            s = qscan @ rows[c0:c1].T
            if rows is st.rows and st.scale is None and self.metric == "cosine":
                s.mul_(torch.from_numpy(_inverse_norms(st, c0, c1)))
            if s.dtype != torch.float32 and (st.scale is not None or st.bias is not None):
                s = s.float()  # a bare bf16 product is ranked as it is (no conversion pass)
            if st.scale is not None:
                s.mul_(st.scale[c0:c1])
            if st.bias is not None:
                s.add_(st.bias[c0:c1])
        if self.metric == "cosine" and st.zero_rows:
            s.masked_fill_(st.norms[c0:c1] == 0, -math.inf)
        return s

    def _exact(self, st: _Store, qexact: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact float64 values (Q, m) of candidate ids (Q, m) (-1 = none: NaN)."""
        Q, m = ids.shape
        qi = torch.arange(Q, device=ids.device).repeat_interleave(m)
        return self._exact_pairs(st, qexact, qi, ids.flatten()).view(Q, m)

    def _exact_pairs(self, st: _Store, qexact: torch.Tensor, qi: torch.Tensor, ci: torch.Tensor,
                     padded: bool = True) -> torch.Tensor:
        """Exact float64 values (P,) of (query qi, stored row ci) pairs (ci = -1: NaN; padded=False:
        the caller has no -1, and the passes that look for them are skipped); qexact:
        the queries, float64 or float32 (Q, D), a cosine index's float64 ones as _exact_queries
        scales them. l2: the distance from the rows' difference; dot: the sum; cosine: the sum
        over the root of the product of both squared sums, each in the same fixed order in one
        pass (pair_cosines: a row searched for itself scores exactly 1, and (i, j) as (j, i)),
        clamped to [-1, 1], NaN for a zero row."""
        from .backends.registry import cpp_kernel

        if self.metric != "cosine":
            v = self._pair_sums(st, qexact, qi, ci, padded)
            v = correct_sqrt(v) if self.metric == "l2" else v
            return v.masked_fill(ci < 0, math.nan) if padded else v
        safe = ci.clamp(min=0) if padded else ci
        cosines = cpp_kernel("pair_cosines", st.rows)  # (the stored rows are float32)
        if cosines is not None:
            v = torch.from_numpy(cosines(st.rows[:st.n].numpy(), qexact.contiguous().numpy(),
                                         qi.contiguous().numpy(), safe.contiguous().numpy()))
        else:
            qc, qq, cc = self._torch_pair_sums(st, qexact, qi, safe, cosine=True)
            v = (qc / correct_sqrt(qq * cc).clamp(min=1e-300)).clamp(-1.0, 1.0).masked_fill(cc == 0, math.nan)
        return v.masked_fill(ci < 0, math.nan) if padded else v

    def _pair_sums(self, st: _Store, qexact: torch.Tensor, qi: torch.Tensor, ci: torch.Tensor,
                   padded: bool = True) -> torch.Tensor:
        """The float64 sums (P,) behind _exact_pairs for dot and l2: sum of q * row (squared
        differences for l2) over the dimensions (a float32 query's products are exact in float64).
        The C++ core's fixed-order float64 sums on the CPU (_C.pair_values: a pair's value never
        depends on its batch; 2M pairs in about 0.3 s where gathering float64 copies took 2-4 s),
        torch's elementwise sums in steps elsewhere. With the stored rows as the queries a sum
        is the same for (i, j) and (j, i): the same products in the same order."""
        from .backends.registry import cpp_kernel

        safe = ci.clamp(min=0) if padded else ci
        l2 = self.metric == "l2"
        pair_values = cpp_kernel("pair_values", st.rows)  # (the stored rows are float32)
        if pair_values is not None:
            return torch.from_numpy(pair_values(st.rows[:st.n].numpy(), qexact.contiguous().numpy(),
                                                qi.contiguous().numpy(), safe.contiguous().numpy(), l2))
        return self._torch_pair_sums(st, qexact, qi, safe)[0]

    def _torch_pair_sums(self, st: _Store, qexact: torch.Tensor, qi: torch.Tensor, safe: torch.Tensor,
                         cosine: bool = False) -> tuple[torch.Tensor, ...]:
        """_pair_sums without the C++ core (a GPU index, or no core): (sums,) of q * row (l2:
        squared differences), or with cosine (sums of q * row, q * q, row * row): for a query of
        a row's own values the three are the same sums of the same products."""
        parts = 3 if cosine else 1
        out = tuple(torch.empty(qi.shape, dtype=torch.float64, device=qi.device) for _ in range(parts))
        l2 = self.metric == "l2"
        for p0 in range(0, qi.numel(), EXACT_STEP_PAIRS):
            # index_select, not rows[safe]: advanced indexing of a few rows still woke torch's
            # thread pool, whose spinning then halved the next numpy scan's speed (_largest)
            c = st.rows.index_select(0, safe[p0:p0 + EXACT_STEP_PAIRS]).double()
            q = qexact.index_select(0, qi[p0:p0 + EXACT_STEP_PAIRS]).double()
            out[0][p0:p0 + EXACT_STEP_PAIRS] = ((c - q) ** 2 if l2 else c * q).sum(-1)
            if cosine:
                out[1][p0:p0 + EXACT_STEP_PAIRS] = (q * q).sum(-1)
                out[2][p0:p0 + EXACT_STEP_PAIRS] = (c * c).sum(-1)
        return out

    def _blocks(self, Q: int, n: int) -> tuple[int, int]:
        """(queries per block, corpus rows per block) for a score block within SCORE_BLOCK_BYTES."""
        cells = SCORE_BLOCK_BYTES // 4
        nc = max(1, min(max(n, 1), max(4096, cells // max(1, min(Q, 256)))))
        return max(1, min(Q, cells // nc)), nc

    def search(self, queries, k: Count, *, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The k nearest stored rows of every query.

        queries: (Q, D) float. Returns (scores (Q, k) float32, ids (Q, k) int64) on the index's
        device, each row ordered by (score desc, id asc) for cosine / dot and (distance asc, id
        asc) for l2; scores are the exact float64 values of the stored rows, rounded to float32
        (kept in float64 with float64=True). Fewer than k results (k > N, zero rows, a zero
        query under cosine) pad with id -1 and score NaN.
        """
        float64 = validation.flag(float64, "float64")
        few = self._search_few(queries, k, float64)
        if few is not None:
            return few
        return self._search(queries, k, float64, self._engine_candidates)

    def _search_few(self, queries, k, float64):
        """search for up to SMALL_BATCH queries of a CPU index with the C++ core: _queries' steps
        on numpy arrays (a small torch operation costs 3-9 us, a numpy one about 1), then the
        scan, the selection, the threshold, the float64 values and their order in one call of the
        core (few_search: _search_block's steps with the same float operations; after a scan of
        154 MB each of some forty numpy operations took 15-100 us, the first touch of its code and
        data). The same results as _search. None where it does not apply (then _search), and
        where a query's list is too short for its margin (rare: _search scans such a query
        again)."""
        from .backends.registry import cpp_kernel

        st = self._store
        if (self.device.type != "cpu" or not isinstance(queries, (torch.Tensor, np.ndarray))
                or queries.ndim != 2 or not 0 < queries.shape[0] <= SMALL_BATCH or st.n == 0):
            return None
        few_search = cpp_kernel("few_search", st.rows)
        scan_dtype = self._scan_dtype(queries.shape[0])
        bf16 = scan_dtype == torch.bfloat16
        if (few_search is None or _rows_dot(scan_dtype) is None
                or (bf16 and not self._bf16_rows_scan(queries.shape[0]))
                or queries.shape[0] >= (ENGINE_BATCH_BF16 if bf16 else ENGINE_BATCH)):  # (the engine's, from there)
            return None
        k = validation.positive_int(k, "k", allow_zero=False)
        q = _rows(queries, "queries", self.d, queries=True).detach()
        Q, n = q.shape[0], st.n
        if q.device.type != "cpu" or self._blocks(Q, n)[1] < n:
            return None
        self._check_result_size(Q, k, n)
        qn_t = _norms64(q)
        if self.metric != "cosine":
            _check_magnitudes(self.metric, qn_t, st.cmax, ("queries", "corpus"))
        qn = qn_t.numpy()
        # (float16 and bfloat16 queries as float64, as _queries takes them: numpy has no bfloat16)
        qx = (q if q.dtype in (torch.float32, torch.float64) else q.double()).contiguous().numpy()
        qexact, qs = _exact_queries(q, self.metric).contiguous().numpy(), qx.astype(np.float64)
        if self.metric == "cosine":
            qs /= np.maximum(qn, 1e-300)[:, None]
        qscan = saturated(torch.from_numpy(qs), scan_dtype).to(scan_dtype)
        scanned = qscan.double().numpy()
        qnorm = np.sqrt(np.einsum("ij,ij->i", qs, qs))
        dq = np.sqrt(np.einsum("ij,ij->i", scanned - qs, scanned - qs)) if bf16 else U32 * qnorm
        margin = self._margin(st, np.maximum(qnorm, np.sqrt(np.einsum("ij,ij->i", scanned, scanned))), dq, scan_dtype)
        # the scan's kk best of every query (as _search_block takes them), the threshold, the
        # float64 values and the order in one call of the core (few_search)
        kk = min(n, k + (EXTRA_BF16 if bf16 else EXTRA_F32))
        rows, scale, bias = self._few_scan_rows(st, qscan, 0, n)
        norms = st.norms[:n].numpy()
        found = few_search(qscan.float().numpy(), rows, scale, bias,
                           norms if self.metric == "cosine" and st.zero_rows else None, kk, k,
                           np.ascontiguousarray(margin, dtype=np.float64),
                           2.1 * BF16_OUT if bf16 and self.metric != "l2" else 0.0,  # (_threshold's widening)
                           st.rows[:n].numpy(), qexact, qn, self.metric)
        if found is None:
            return None
        vals, ids = found
        return torch.from_numpy(vals if float64 else vals.astype(np.float32)), torch.from_numpy(ids)

    def search_stored(self, k: Count, *, float64: bool = False,
                      floor: Scalar | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """search(self.vectors(), k): the k nearest stored rows of every stored row, the row
        itself included as a search for it finds it. Where the C++ engine runs (CPU, cosine or
        dot, float32 scan) its candidates come from one self-mode run (half the products of a
        search with every row as a query): each row's best other rows, and the row itself at
        its exact value. The same results as search.

        floor (cosine, dot): only scores >= floor, each row's k best of those (fewer where it
        has fewer: id -1, score NaN past them), decided on the exact values (a float32 floor: on
        the values rounded to float32, as in range_search); the engine's lists
        then hold values above the floor only, far fewer offers where most rows have few such
        neighbours (paraphrase mining)."""
        float64 = validation.flag(float64, "float64")
        if floor is not None:
            floor = validation.score_threshold(floor, "floor")
            if self.metric == "l2":
                raise ValueError("floor: expected metric 'cosine' or 'dot' (a floor on scores), got metric 'l2'")
        cand = self._stored_candidates if floor is None else functools.partial(self._stored_candidates, floor=floor)
        st = self._store  # one snapshot for the queries and the rows searched: an add() meanwhile had mixed them
        v, i = self._search(st.rows[:st.n], k, True, cand, st)
        if floor is not None:
            # the scores below the floor end each row's list (score desc, then the NaN padding)
            below = ~(v >= floor)
            v, i = v.masked_fill(below, math.nan), i.masked_fill(below, -1)
        return (v if float64 else v.float()), i

    def _search(self, queries, k, float64, candidates, st: "_Store | None" = None):
        """search, with candidates(st, qscan, kk) -> (values, ids) or None (the scan); st: the
        snapshot to search (default: the current one)."""
        k = validation.positive_int(k, "k", allow_zero=False)
        st = self._store if st is None else st
        qexact, qscan, qvalid, margin, _ = self._queries(queries, st, search=True)
        Q, n = qexact.shape[0], st.n
        self._check_result_size(Q, k, n)
        out_v = torch.full((Q, k), math.nan, dtype=torch.float64, device=self.device)
        out_i = torch.full((Q, k), -1, dtype=torch.int64, device=self.device)
        if Q and n:
            qb, nc = self._blocks(Q, n)
            ties = min(self._tie_group(st), k + TIE_GROUP_MAX) if Q >= TIE_GROUP_QUERIES else 1
            kk = min(n, max(k, ties) + (EXTRA_F32 if qscan.dtype == torch.float32 else EXTRA_BF16))
            cand = candidates(st, qscan, kk)
            if cand is not None:  # only rescoring left: blocks of RESCORE_PAIRS (fewer Python rounds)
                qb = max(qb, RESCORE_PAIRS // kk)
            for q0 in range(0, Q, qb):
                q1 = min(Q, q0 + qb)
                part = None if cand is None else (cand[0][q0:q1], cand[1][q0:q1])
                v, i = self._search_block(st, qexact[q0:q1], qscan[q0:q1], margin[q0:q1], k, kk, nc, part)
                w = v.shape[1]
                out_v[q0:q1, :w], out_i[q0:q1, :w] = v, i
            out_v[~qvalid] = math.nan
            out_i[~qvalid] = -1
        return (out_v if float64 else out_v.float()), out_i

    def _check_result_size(self, Q: int, k: int, n: int) -> None:
        """ValueError naming k when a search's memory would pass what the device has free,
        instead of an allocator's failure (or, in the C++ engine's threads, an abort): the (Q, k)
        results (float64 scores and int64 ids while they are built) and, on the CPU, the
        engine's candidate lists of up to min(k, N) a query (the state's, one reservoir of 1.5
        times that a thread, the values and ids taken from them, their float64 rescoring and
        order): 500 queries x k = 100,000 had been checked at 0.75 GiB and peaked at 4.5."""
        from .engine.limits import refuse_past_memory

        need = Q * k * 16
        if self.device.type != "cuda":
            need += Q * min(k, n) * (12 * (1.5 * max(1, torch.get_num_threads()) + 1) + 48)
        past = f"; the index holds {n:,} rows, so columns past {n:,} are padding" if k > n else ""
        queries = f"{Q:,} {'query' if Q == 1 else 'queries'}"
        refuse_past_memory(need, lambda need, free: f"k: {queries} x k = {k:,} results need about {need}, {free}{past}",
                           self.device)

    # bytes per candidate of a query block while it is rescored and ordered (ids, float64 values,
    # sort keys and orders), and per result kept until the blocks are joined (value and id, twice)
    RANGE_CANDIDATE_BYTES = 64
    RANGE_RESULT_BYTES = 32

    def _check_range_results(self, hits: int, kept: int, Q: int, n: int, threshold: float) -> None:
        """ValueError naming threshold when range_search's matches (hits of this query block
        found so far, kept of the blocks before) would need more memory than is free: a
        threshold every pair passes had run minutes and then failed in the allocator."""
        from .engine.limits import refuse_past_memory

        need = hits * self.RANGE_CANDIDATE_BYTES + (kept + hits) * self.RANGE_RESULT_BYTES
        refuse_past_memory(need, lambda need, free: (
            f"threshold: {threshold} matches {kept + hits:,} or more of the {Q:,} x {n:,} (query, row) pairs; "
            f"holding them needs {need}, {free}: raise the threshold or search fewer queries a call (every "
            "pair of the rows: pairs_above, which streams them to disk)"), self.device)

    def _tie_group(self, st) -> int:
        """The size of the largest group of nonzero stored rows sharing one float32 projection
        (kept per snapshot): identical rows share it where the product computes every row
        alike, and distinct rows that collide make it larger. Only the lists' width depends
        on it: rows whose list is too short are scanned again (_search_block)."""
        cached = self._ties
        if cached is None or cached[0] is not st:
            g = torch.Generator().manual_seed(0)
            proj = st.rows[:st.n] @ torch.randn(self.d, generator=g).to(st.rows.device)
            proj = proj[st.norms[:st.n] > 0]  # (a copy of the projections, not of the rows)
            cached = (st, int(torch.unique(proj, return_counts=True)[1].max()) if proj.numel() else 1)
            self._ties = cached
        return cached[1]

    def _stored_candidates(self, st, qscan, kk, floor: float | None = None):
        """The kk best scan values and ids of every stored row among the stored rows, itself
        included (search_stored): the engine's self-mode per-row lists of the other rows (the
        same fp32 products as _engine_candidates) and the row itself at its exact value, 1 for
        cosine (none for a zero row) and |x|^2 for dot, within the scan margin like any engine
        value. None where the engine does not apply, or for a few rows (the scan is cheaper).
        floor: the kk best of the values whose exact value may reach it (the engine's lists start
        at its scan threshold, as _engine_self_pairs' do), fewer where a row has fewer."""
        n = st.n
        if n < 2 or self._scan_dtype() != torch.float32 or not self._pairs_engine_applies():
            return None
        from .backends.cpp import CppEngine
        from .engine.config import make_config

        fast = _bf16_filter(kk)
        cfg = make_config(metric=self.metric, bins=0, topk=0, bottomk=0, near=None, row_topk=min(kk, n - 1),
                          row_bottomk=0, outside=None, precision="fast" if fast else "exact")
        engine = CppEngine(st.rows[:n], None, cfg)
        engine.keep_lists_only()
        if floor is not None:
            engine.set_row_top_floor(self._stored_scan_threshold(st, floor))
        engine.run(0, engine.num_tiles())
        values, ids = (torch.from_numpy(np.asarray(a)) for a in engine.state().row_top)
        if self.metric == "cosine":
            own = torch.where(st.norms[:n] > 0, 1.0, math.nan)
        else:
            own = st.norms[:n] * st.norms[:n]
        v = torch.cat([own.float()[:, None], values.float()], 1)
        i = torch.cat([torch.arange(n)[:, None], ids.to(torch.int64)], 1)
        key = torch.where(torch.isnan(v), torch.full_like(v, -math.inf), v)
        order = torch.argsort(key, dim=1, descending=True, stable=True)[:, :kk]
        v, i = torch.gather(v, 1, order), torch.gather(i, 1, order)
        return v.masked_fill(i < 0, math.nan), i

    def _engine_candidates(self, st, qscan, kk):
        """The kk best scan values and ids of every query from the C++ engine (ENGINE_BATCH,
        ENGINE_BATCH_BF16), as
        (values (Q, kk) float32, ids (Q, kk) int64), NaN / -1 past a query's count; None where
        that path does not apply. The engine's values are fp32 products of the float32 rows
        (unit rows for cosine, rounded once more than the scan's) and the scan query: within
        the scan's margin of the exact value (docs/metrics.md, prepared index). A bf16 scan
        runs the engine's bf16 product (`fast`), whose lists hold the same fp32 values."""
        first = ENGINE_BATCH_BF16 if qscan.dtype == torch.bfloat16 else ENGINE_BATCH
        if qscan.dtype == torch.bfloat16 and not native_bf16():
            return None  # a few queries of a bf16 index scan its bf16 rows (_scan_dtype)
        if (qscan.shape[0] < first or qscan.device.type != "cpu"
                or qscan.dtype not in (torch.float32, torch.bfloat16) or self.metric not in ("cosine", "dot")):
            return None
        from .backends.cpp import CppEngine
        from .backends.registry import cpp
        from .engine.config import make_config

        if not hasattr(cpp(), "prepare_columns"):
            return None
        fast = qscan.dtype == torch.bfloat16 or _bf16_filter(kk)  # (a float32 scan too)
        precision = "fast" if fast else "exact"
        cached = self._columns
        prepared = cached is not None and cached[0] is st and cached[1] == precision
        searched_before, self._searched = getattr(self, "_searched", None) is st, st
        if not prepared and not searched_before and qscan.shape[0] < ENGINE_PREPARE_QUERIES:
            return None  # a first search with few queries: the scan (ENGINE_PREPARE_QUERIES)
        cfg = make_config(metric=self.metric, bins=0, topk=0, bottomk=0, near=None, row_topk=kk,
                          row_bottomk=0, outside=None, precision=precision)
        corpus, q = st.rows[:st.n], qscan.float()
        try:
            engine = CppEngine(q, corpus, cfg, columns=self._engine_columns(st, precision))
        except ValueError:  # prepared for another product kernel (EMBGEOM_CPU changed): again
            self._columns = None
            engine = CppEngine(q, corpus, cfg, columns=self._engine_columns(st, precision))
        engine.keep_lists_only()
        engine.run(0, engine.num_tiles())
        values, ids = engine.state().row_top
        return torch.from_numpy(values), torch.from_numpy(ids)

    def _engine_columns(self, st: _Store, precision: str):
        """The engine's prepared copy of this snapshot's rows (packed panels: as many bytes as
        the float32 rows again, half for bf16), made by the first search that takes the engine
        path (ENGINE_PREPARE_QUERIES) and kept until the rows change."""
        from .backends.cpp import prepare_columns

        cached = self._columns
        if cached is None or cached[0] is not st or cached[1] != precision:
            cached = (st, precision, prepare_columns(st.rows[:st.n], self.metric, precision))
            self._columns = cached  # (a concurrent search may prepare its own: either is right)
        return cached[2]

    def _scan_candidates(self, st, qscan, kk, nc):
        """The kk best scan values and ids of each query, one score block of nc rows at a time."""
        best_v = best_i = None
        for c0 in range(0, st.n, nc):
            c1 = min(st.n, c0 + nc)
            s = self._score(st, qscan, c0, c1)
            v, i = _largest(s, min(kk, c1 - c0))
            i += c0
            if best_v is not None:
                v, pos = torch.topk(torch.cat([best_v, v], 1), min(kk, best_v.shape[1] + v.shape[1]), dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
            best_v, best_i = v, i
        return best_v, best_i

    def _search_block(self, st, qexact, qscan, margin, k, kk, nc, cand=None):
        """cand: the block's (values, ids) from _engine_candidates, else scanned here."""
        n = st.n
        best_v, best_i = self._scan_candidates(st, qscan, kk, nc) if cand is None else cand
        # the engine pads a list past its count with NaN, the scan with -inf: as -inf, a query
        # with fewer than k candidates keeps every one (a NaN k-th value kept none)
        best_v = best_v.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        # Every candidate that could be in the exact top k scans at or above
        # (k-th best scan value) - 2 * margin; anything dropped scanned at or below the kept
        # list's last value. Where that last value reaches the threshold, scan again.
        kth = best_v[:, min(k, best_v.shape[1]) - 1]
        thresh = self._threshold(kth, margin, qscan.dtype)
        short = (best_v.shape[1] < n) & (best_v[:, -1] >= thresh) & torch.isfinite(kth)
        # topk lists values in descending order: the candidates at or above the threshold are
        # a prefix of each row; only those are rescored
        extra = short.nonzero().flatten()
        keep = torch.isfinite(best_v) & (best_v >= thresh[:, None])
        keep[extra] = False  # (their rows come from the full scan below)
        width = max(1, int(keep.sum(1).max()))
        ids = torch.where(keep, best_i, torch.full_like(best_i, -1))[:, :width]
        largest = self.metric != "l2"
        v, i = self._exact_best(st, qexact, ids, k, largest)
        if extra.numel():
            ev, ei = self._best_of_scan(st, qexact[extra], qscan[extra], thresh[extra], k, nc, largest)
            width = max(v.shape[1], ev.shape[1])
            v, i = _pad_lists(v, i, width)
            v[extra], i[extra] = _pad_lists(ev, ei, width)
        v = torch.where(i < 0, torch.full_like(v, math.nan), v)
        return v, i

    def _exact_best(self, st, qexact, ids, k, largest, best=None):
        """The k best (exact float64 value, id) of each query's candidate ids (-1: none), ordered
        by value, then id; best: a running (values, ids) the candidates join."""
        exact = self._exact(st, qexact, ids)
        key = torch.where(torch.isnan(exact), torch.full_like(exact, -math.inf if largest else math.inf), exact)
        ids = torch.where(torch.isnan(exact), torch.full_like(ids, -1), ids)
        if best is not None:
            key, ids = torch.cat([best[0], key], 1), torch.cat([best[1], ids], 1)
        return sort_rows(key, ids, k, largest)

    def _best_of_scan(self, st, qexact, qscan, thresh, k, nc, largest):
        """The exact k best of each query among every row scanning at or above thresh[q] (a
        query whose kept list ended at or above it), rescored one score block at a time into a
        running list: memory ~ queries x (k + block). Gathering all of them first had held every
        row per query where the rows tie (200,000 identical rows: 6.8 GB and 71 s for 512 queries
        of k = 10; torch's topk 0.5 GB and 1.2 s)."""
        step = max(1, SCORE_BLOCK_BYTES // 4 // nc)  # queries a score block holds
        if qscan.shape[0] > step:
            parts = [self._best_of_scan(st, qexact[a:a + step], qscan[a:a + step], thresh[a:a + step], k, nc,
                                        largest) for a in range(0, qscan.shape[0], step)]
            width = max(p[0].shape[1] for p in parts)
            padded = [_pad_lists(v, i, width) for v, i in parts]
            return torch.cat([v for v, _ in padded]), torch.cat([i for _, i in padded])
        Q = qscan.shape[0]
        best = (torch.zeros((Q, 0), dtype=torch.float64, device=qscan.device),
                torch.zeros((Q, 0), dtype=torch.int64, device=qscan.device))
        for c0 in range(0, st.n, nc):
            c1 = min(st.n, c0 + nc)
            hit = self._score(st, qscan, c0, c1) >= thresh[:, None]
            width = int(hit.sum(1).max())
            if width == 0:
                continue
            # each query's hits first, in column order (a stable sort puts the misses after them)
            order = torch.argsort((~hit).to(torch.uint8), dim=1, stable=True)[:, :width]
            ids = torch.where(torch.gather(hit, 1, order), order + c0, torch.full_like(order, -1))
            best = self._exact_best(st, qexact, ids, k, largest, best)
        return best

    def range_search(self, queries, threshold: Scalar, *,
                     float64: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored row within `threshold` of each query: similarity >= threshold (cosine,
        dot) or distance <= threshold (l2), decided on the exact float64 values; a float32
        threshold (numpy.float32, or a one-element float32 array or tensor, such as a score
        `search` returned) is compared with the values rounded to float32, as they are returned,
        so a row whose returned score is the threshold is listed.

        queries: (Q, D) float. Returns (lims (Q + 1,) int64, scores (R,) float32, ids (R,) int64):
        query q's results are [lims[q], lims[q + 1]), ordered as in `search`.
        """
        return self._range(queries, threshold, float64=float64, by_score=True)

    def _range(self, queries, threshold: Scalar, *, float64: bool, by_score: bool):
        """range_search; by_score=False: each query's results by id (the drop-ins' order: the
        score sorts had been most of a range search where most rows qualify)."""
        float64 = validation.flag(float64, "float64")
        # (a float32 score fed back had lost its own row about half the time)
        threshold = validation.score_threshold(threshold, "threshold", below=self.metric == "l2")
        st = self._store
        qexact, qscan, qvalid, margin, qsq = self._queries(queries, st, search=True)
        Q, n = qexact.shape[0], st.n
        if self.metric == "l2":
            if threshold < 0:
                raise ValueError(f"threshold: expected a distance >= 0 for metric='l2', got {threshold}")
            scan_t = (qsq - threshold * threshold) / 2  # q.c - |c|^2/2 >= (|q|^2 - r^2) / 2
        else:
            scan_t = torch.full_like(qsq, threshold)
        scan_t = self._threshold(scan_t, margin, qscan.dtype)
        counts, vals, idss = [], [], []
        kept = 0   # results of the finished query blocks
        qb, nc = self._blocks(Q, n) if Q and n else (1, 1)
        for q0 in range(0, Q if n else 0, qb):
            q1 = min(Q, q0 + qb)
            qi_all, ci_all = [], []
            hits = 0
            for c0 in range(0, n, nc):
                s = self._score(st, qscan[q0:q1], c0, min(n, c0 + nc))
                qi, ci = _hits(s >= scan_t[q0:q1, None])
                hits += qi.numel()
                self._check_range_results(hits, kept, Q, n, threshold)
                qi_all.append(qi)
                ci_all.append(ci + c0)
            qi, ci = (qi_all[0], ci_all[0]) if len(qi_all) == 1 else (torch.cat(qi_all), torch.cat(ci_all))
            v = self._exact_pairs(st, qexact[q0:q1], qi, ci, padded=False)
            keep = v <= threshold if self.metric == "l2" else v >= threshold  # (NaN fails both)
            keep &= qvalid[q0:q1][qi]
            qi, ci, v = _take(_true_at(keep), qi, ci, v)
            # the hits come by column block, each block's by (query, id): every query's own in id
            # order already, so stable sorts by score (by_score) and then by query finish the order
            if by_score:
                order = _stable_order(v if self.metric == "l2" else -v)
                order = _take(_stable_order(_take(order, qi)[0]), order)[0]
            else:
                order = _stable_order(qi)
            counts.append(torch.bincount(qi, minlength=q1 - q0))
            v, ci = _take(order, v, ci)
            vals.append(v)
            idss.append(ci)
            kept += int(qi.numel())
        lims = torch.zeros(Q + 1, dtype=torch.int64, device=self.device)
        if counts:
            lims[1:] = torch.cumsum(torch.cat(counts), 0)
        v = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64, device=self.device)
        i = torch.cat(idss) if idss else torch.zeros(0, dtype=torch.int64, device=self.device)
        return lims, (v if float64 else v.float()), i

    # -- all pairs above a threshold -------------------------------------------------------

    def pairs_above(self, threshold: Scalar, out: PathArg, *, progress: ProgressArg = False) -> dict:
        """Every pair i < j of the stored rows with similarity >= threshold (cosine, dot) or
        distance <= threshold (l2), streamed to .npy shards in the folder `out` with a manifest;
        see `embgeom.pairs_above`. progress: a bar of the pairs compared on stderr (True, or
        the caller's Progress). Returns the finished manifest (a dict)."""
        threshold = validation.score_threshold(threshold, "threshold", below=self.metric == "l2")
        if self.metric == "l2" and threshold < 0:
            raise ValueError(f"threshold: expected a distance >= 0 for metric='l2', got {threshold}")
        st = self._store
        writer = ShardWriter(out, fingerprint=self._fingerprint(st), n=st.n, d=self.d,
                             metric=self.metric, threshold=threshold)
        start = writer.rows_done
        try:
            # Ctrl-C or SIGTERM: the pairs of the finished bands are saved before the run ends
            with terminate_as_interrupt():
                if not writer.complete:
                    engine = self._pairs_engine_applies()
                    rb, nc = self._blocks(256, st.n)
                    rb = pair_band() if engine else min(256, rb)
                    # counted in pairs, as the work goes: row i meets the n - 1 - i rows after it
                    # (counted in rows, the first rows' share had put the ETA at several times the run)
                    before = lambda r: r * (st.n - 1) - r * (r - 1) // 2  # noqa: E731 (pairs of rows < r)
                    with as_progress(progress, "embgeom.pairs_above").bar(
                            before(st.n), "pairs", unit="pair", unit_scale=True, initial=before(start)) as bar:
                        try:
                            for r0 in range(start, st.n, rb):
                                r1 = min(st.n, r0 + rb)
                                writer.add_rows(r1, self._pairs_of_rows(st, r0, r1, threshold, nc, engine))
                                bar.update(before(r1) - before(r0))
                        except KeyboardInterrupt as exc:
                            with interrupt_after():
                                writer.save_progress()
                            exc.args = (f"interrupted: the pairs of the first {writer.rows_done:,} of {st.n:,} "
                                        f"rows are saved in {out}; the same call continues from them",)
                            raise
                # every row is done: the last shard and the manifest are written whole before
                # a signal ends the run (one during them had lost every row since the last save)
                with interrupt_after():
                    writer.finish()
        finally:
            writer.close()
        return writer.manifest

    def _pairs_engine_applies(self) -> bool:
        """Whether pairs_above takes its candidates from the C++ engine (CPU, cosine or dot)."""
        if self.device.type != "cpu" or self.metric not in ("cosine", "dot"):
            return False
        from .backends.registry import cpp

        return hasattr(cpp(), "PairwiseEngine")

    def _pairs_of_rows(self, st, r0, r1, threshold, nc, engine=False, exact64=False):
        """Yield (i, j, value) arrays of the pairs i in [r0, r1), j > i, passing the threshold
        (values float32 as written to shards, or the exact float64 ones with exact64)."""
        q = st.rows[r0:r1]
        qexact, qscan, qvalid, margin, qsq = self._queries(q, st)
        if self.metric == "l2":
            scan_t = (qsq - threshold * threshold) / 2
        else:
            scan_t = torch.full_like(qsq, threshold)
        scan_t = self._threshold(scan_t, margin, qscan.dtype)
        every_query = bool(qvalid.all())
        step = PAIR_CHUNK if engine else nc
        for c0 in range(r0, st.n, step):
            c1 = min(st.n, c0 + step)
            got = self._engine_pair_candidates(st, qscan, c0, c1, scan_t) if engine else None
            for qi, ci in [got] if got is not None else self._scan_pair_candidates(st, qscan, c0, c1, scan_t, nc):
                if c0 < r1:  # the diagonal block: only j > i
                    qi, ci = _take(_true_at(ci > qi + r0), qi, ci)
                if qi.numel() == 0:
                    continue
                v = self._exact_pairs(st, qexact, qi, ci, padded=False)
                keep = v <= threshold if self.metric == "l2" else v >= threshold  # (NaN fails both)
                if not every_query:
                    keep &= qvalid[qi]
                at = _true_at(keep)
                if at.numel():
                    qi, ci, v = _take(at, qi, ci, v)
                    yield ((qi + r0).cpu().numpy(), ci.cpu().numpy(), (v if exact64 else v.float()).cpu().numpy())

    def _scan_pair_candidates(self, st, qscan, c0, c1, scan_t, nc):
        """Yield (query offsets, corpus rows) whose scan value reaches scan_t, columns [c0, c1),
        one score block of at most nc rows at a time (a chunk's hits held together, where most
        pairs pass a low threshold, had taken 3 GB for 9,000 rows)."""
        by_column = st.scale is not None  # cosine on float32 rows: no scaling pass over the block
        if by_column:
            low = scan_t.double().min() if scan_t.numel() else 0.0
        # a band of thousands of rows: fewer columns per block (nc is sized for 256 queries), and a
        # quarter of the score block: where most pairs pass, a block's hits are rescored together
        nc = max(1, min(nc, SCORE_BLOCK_BYTES // 16 // max(1, qscan.shape[0])))
        for b0 in range(c0, c1, nc):
            b1 = min(c1, b0 + nc)
            if by_column:
                # s * (1/|c|) >= t  <=  s >= t |c| (rounded down); zero rows never pass
                s = qscan @ st.scan[b0:b1].T
                tcol = (low * st.norms[b0:b1]).float()
                tcol = torch.where(tcol.double() > low * st.norms[b0:b1],
                                   torch.nextafter(tcol, torch.full_like(tcol, -math.inf)), tcol)
                tcol.masked_fill_(st.norms[b0:b1] == 0, math.inf)
                hit = s >= tcol[None, :]
            else:
                s = self._score(st, qscan, b0, b1)
                hit = s >= scan_t[:, None]
            qi, ci = _hits(hit)
            if qi.numel():
                yield qi, ci + b0

    def _engine_pair_candidates(self, st, qscan, c0, c1, scan_t):
        """(query offsets, corpus rows) of columns [c0, c1) whose engine value reaches the
        smallest scan threshold of the band: the engine's outside-pairs list of values above
        (just below) it, in cross mode. Its values are fp32 products within the scan's margin of
        the exact value, as in _engine_candidates. None when the list overflowed (the caller
        scans that chunk instead)."""
        if scan_t.numel() == 0:
            return None
        limit = PAIR_LIST * max(1, qscan.shape[0] // PAIR_BAND)  # (a band's list grows with its rows)
        got = self._engine_pairs_reaching(qscan.float(), st.rows[c0:c1], float(scan_t.min()), limit)
        if got is None:
            return None
        v, i, j = got
        keep = v >= scan_t[i].double()
        return i[keep], j[keep] + c0

    def _stored_margin(self, st) -> float:
        """The largest scan margin of the stored rows as queries (_queries). A float32 scan of
        the stored rows scans them as stored (dot, l2: their norms are the stored norms) or as
        unit rows rounded to float32 (cosine: norm <= (1 + u32) (1 + tiny)): the margin at those
        norms bounds every row's, without a float64 pass over the corpus. A bf16 scan's rounding
        differs per row: PREP_ROWS rows at a time."""
        if self._scan_dtype() == torch.float32:
            qnorm = 1.0 + 1e-12 if self.metric == "cosine" else float(st.norms[:st.n].max()) * (1 + 1e-12)
            qr = qnorm * (1 + 2 * U32) if self.metric == "cosine" else qnorm
            return float(self._margin(st, qr, U32 * qnorm, torch.float32))
        return max(float(self._queries(st.rows[a:a + PREP_ROWS], st)[3].max()) for a in range(0, st.n, PREP_ROWS))

    def _stored_scan_threshold(self, st, value: float) -> float:
        """The scan value every stored-row pair whose exact value reaches `value` scans at or
        above, with the stored rows as queries (_threshold at _stored_margin)."""
        margin = torch.tensor([self._stored_margin(st)], dtype=torch.float64)
        return float(self._threshold(torch.tensor([value], dtype=torch.float64), margin, self._scan_dtype())[0])

    def _engine_self_pairs(self, st, threshold: float, limit: int):
        """(i, j) int64 of every pair i < j of the stored rows whose exact value may reach
        threshold (cosine, dot): one self-mode engine run (half the products, no band of
        queries packed again per run) listing the pairs whose engine value reaches the lowest
        scan threshold of any row (values within the scan margin, as in _engine_pair_candidates).
        None when more than `limit` pairs are listed (the caller takes the bands) or the engine
        does not apply."""
        if st.n < 2 or not self._pairs_engine_applies():
            return None
        got = self._engine_pairs_reaching(st.rows[:st.n], None, self._stored_scan_threshold(st, threshold), limit)
        return None if got is None else got[1:]

    def _engine_pairs_reaching(self, x, y, t: float, limit: int):
        """The C++ engine's outside-pairs list of the rows x against y (self mode: y None, pairs
        i < j) holding every pair whose engine value is >= t (the bf16 product where the CPU
        has it, the listed values exact fp32): (values float64, i int64, j int64) tensors in
        (i, j) order, or None when more than `limit` pairs qualify."""
        from .backends.cpp import CppEngine
        from .engine.config import make_config

        b = math.nextafter(t, -math.inf)  # "above b" is ">= t"
        lo = min(b, -float(torch.finfo(torch.float32).max))  # nothing is listed below
        cfg = make_config(metric=self.metric, bins=0, topk=0, bottomk=0, near=None, row_topk=0, row_bottomk=0,
                          outside=(lo, b), outside_limit=limit, precision="fast" if native_bf16() else "exact")
        engine = CppEngine(x, y, cfg)
        engine.keep_lists_only()
        engine.run(0, engine.num_tiles())
        state = engine.state()
        v, i, j = state.outside_pairs
        if state.outside_count > len(v):
            return None
        return tuple(torch.from_numpy(np.asarray(a)) for a in (v, i, j))

    def fingerprint(self) -> str:
        """sha256 over the metric, shape and stored float32 rows: names this corpus."""
        return self._fingerprint(self._store)

    def _fingerprint(self, st: "_Store") -> str:
        h = hashlib.sha256(json.dumps({"metric": self.metric, "n": st.n, "d": self.d}).encode())
        step = 1 << 16
        for r0 in range(0, st.n, step):
            # (rows past n are add()'s spare room: unwritten, never part of the corpus)
            h.update(st.rows[r0:min(r0 + step, st.n)].cpu().contiguous().numpy())  # the buffer, not a copy
        return h.hexdigest()

    # -- files --------------------------------------------------------------------------------

    def save(self, path: PathArg) -> None:
        """Write the index to one file (docs/architecture.md, index files): a magic line, one
        JSON header line, then the arrays at page-aligned offsets; written atomically."""
        path = validation.path(path, "path")
        # (a dangling link, a sealed report or pairs folder: refused as the CLI refuses them)
        check_output_path(path, "path")
        st = self._store
        arrays = {"rows": st.rows[:st.n], "norms": st.norms[:st.n]}
        if st.scan.dtype == torch.bfloat16:
            arrays["scan"] = st.scan[:st.n]
        blobs, specs, offset = {}, {}, 0
        for name, t in arrays.items():
            a = t.detach().cpu().contiguous()
            if a.dtype == torch.bfloat16:
                a = a.view(torch.int16)
            a = a.numpy()
            blobs[name] = a
            specs[name] = {"offset": offset, "shape": list(a.shape), "dtype": a.dtype.str}
            offset += -(-a.nbytes // DATA_ALIGN) * DATA_ALIGN
        header = {"format": FORMAT, "metric": self.metric, "dtype": str(self.dtype).replace("torch.", ""),
                  "n": st.n, "d": self.d, "arrays": specs}
        h = _file_digest(header)
        for a in blobs.values():
            h.update(_raw_bytes(a))
        header["sha256"] = h.hexdigest()
        line = json.dumps(header).encode()
        if len(line) > MAX_HEADER_BYTES - len(MAGIC) - 2:
            raise ValueError("path: index header too long")  # cannot happen with these fields
        with atomic_write(path, binary=True, name="path") as f:
            head = MAGIC + b"\n" + line + b"\n"
            f.write(head + b"\0" * (-len(head) % DATA_ALIGN))
            base = len(head) + (-len(head) % DATA_ALIGN)
            for name, a in blobs.items():
                assert f.tell() == base + specs[name]["offset"]
                f.write(_raw_bytes(a))
                f.write(b"\0" * (-a.nbytes % DATA_ALIGN))

    @classmethod
    def load(cls, path: PathArg, *, device: DeviceArg = None, verify: bool = True) -> "Index":
        """Open an index file written by `save`, memory-mapped (rows are read from the page
        cache as searches need them). verify=True checks the sha256 of the arrays (one read
        of the file) and that the rows are finite and the stored norms and bf16 scan rows theirs
        (a file crafted with its hash recomputed). ValueError (one line) on anything that is not
        a complete index file of this format; verify=False trusts the file."""
        path = validation.path(path, "path")
        verify = validation.flag(verify, "verify")
        if os.path.isdir(path):
            raise ValueError(f"path: {path} is a folder, not an index file")
        if os.path.islink(path) and not os.path.isfile(path):
            raise ValueError(f"path: {path} is a link that leads nowhere (or in a loop)")
        if not os.path.isfile(path):
            raise ValueError(f"path: no index file at {path}")
        # one open file for the header, the size and the maps: a save renaming a new file over
        # path meanwhile had given the header of one file and the arrays of the other
        with open(path, "rb") as f:
            return cls._load_open(f, path, device, verify)

    @classmethod
    def _load_open(cls, f, path: str, device: Any, verify: bool) -> "Index":
        size = os.fstat(f.fileno()).st_size
        magic = f.readline(len(MAGIC) + 2)
        if magic.rstrip(b"\n") != MAGIC:
            if magic.rstrip(b"\r\n") == MAGIC:  # (a text tool's CRLF: not another version)
                raise ValueError(f"path: {path} is an index file whose line ends were changed (CRLF): "
                                 "the bytes are no longer the ones saved; save it again")
            if magic.startswith(b"EMBGEOM-INDEX"):
                raise ValueError(f"path: {path} is an index file of another format version "
                                 f"({magic.strip().decode(errors='replace')}; this version reads "
                                 f"{MAGIC.decode()}): rebuild it")
            raise ValueError(f"path: {path} is not an embgeom index file (no {MAGIC.decode()} line)")
        line = f.readline(MAX_HEADER_BYTES)
        head_len = f.tell()
        try:
            header = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # (ValueError: also an int of 4,300+ digits)
            raise ValueError(f"path: {path} has a damaged header line") from None
        want = {"format", "metric", "dtype", "n", "d", "arrays", "sha256"}
        if not isinstance(header, dict) or set(header) != want or header["format"] != FORMAT \
                or header["metric"] not in METRICS or header["dtype"] not in DTYPES \
                or not isinstance(header["n"], int) or not isinstance(header["d"], int) \
                or header["n"] < 0 or header["d"] < 1 or not isinstance(header["arrays"], dict):
            raise ValueError(f"path: {path} has a header this version does not understand")
        n, d = header["n"], header["d"]
        names = {"rows": ((n, d), "<f4"), "norms": ((n,), "<f8")}
        if header["dtype"] == "bfloat16" and header["metric"] in METRICS:
            names["scan"] = ((n, d), "<i2")
        if set(header["arrays"]) != set(names):
            raise ValueError(f"path: {path} lists arrays {sorted(header['arrays'])}, expected {sorted(names)}")
        base = head_len + (-head_len % DATA_ALIGN)
        end = base
        for name, (shape, dt) in names.items():
            spec = header["arrays"][name]
            if isinstance(spec, dict) and isinstance(spec.get("offset"), int):
                nbytes = math.prod(shape) * np.dtype(dt).itemsize
                end = max(end, base + spec["offset"] + -(-nbytes // DATA_ALIGN) * DATA_ALIGN)
        if size < end:
            raise ValueError(f"path: {path} is truncated ({size} bytes, its header says {end})")
        if size > end:
            raise ValueError(f"path: {path} is damaged ({size} bytes, its header says {end})")
        maps = {}
        mapped = None  # one copy-on-write mapping of the file for every array (one fd an index)
        h = _file_digest(header)
        for name, (shape, dt) in names.items():
            spec = header["arrays"][name]
            if not isinstance(spec, dict) or spec.get("dtype") != dt or spec.get("shape") != list(shape) \
                    or not isinstance(spec.get("offset"), int) or spec["offset"] < 0:
                raise ValueError(f"path: {path}: array {name!r} is not the {dt} array of shape {shape} expected")
            nbytes = math.prod(shape) * np.dtype(dt).itemsize
            if base + spec["offset"] + nbytes > size:
                raise ValueError(f"path: {path} is truncated ({size} bytes; array {name!r} needs "
                                 f"{base + spec['offset'] + nbytes})")
            if nbytes == 0:
                maps[name] = np.zeros(shape, dt)
            else:  # copy-on-write: writable for torch, the file never changes
                if mapped is None:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                maps[name] = np.frombuffer(mapped, dtype=dt, count=math.prod(shape),
                                           offset=base + spec["offset"]).reshape(shape)
            if verify:
                h.update(_raw_bytes(np.ascontiguousarray(maps[name])))
        if verify and h.hexdigest() != header["sha256"]:
            raise ValueError(f"path: {path} is damaged (the header's metric, dtype and shape and the arrays do "
                             "not match its sha256)")
        scan_delta = None  # (the bf16 scan rows' rounding, when verify has measured it)
        if verify and n:
            # the sha256 finds damage, not a file crafted with its hash recomputed: rows with NaN or
            # norms that are not the rows' own would give wrong lists without an error
            rows_in = torch.from_numpy(maps["rows"])
            validation.check_finite(rows_in, f"path: {path}: rows")
            norms_in = torch.from_numpy(maps["norms"])
            own = _norms64(rows_in)
            if not bool(((own - norms_in).abs() <= 1e-12 * own).all()):
                raise ValueError(f"path: {path}: the stored norms are not the rows' norms (not a file `save` "
                                 "wrote)")
            _check_magnitudes(header["metric"], own, float(own.max()), ("path", "corpus"))
            if "scan" in maps:
                # a bf16 index's scan rows are made from its rows: NaN or foreign values there had
                # dropped rows from searches (their rounding bound NaN) without an error
                cosine = header["metric"] == "cosine"
                made, scan_delta = _bf16_scan(rows_in, norms_in if cosine else None,
                                              _inverse_norms64(norms_in) if cosine else None)
                if not torch.equal(made.view(torch.int16), torch.from_numpy(maps["scan"])):
                    raise ValueError(f"path: {path}: the stored bfloat16 scan rows are not the rows' own (not a "
                                     "file `save` wrote)")
        self = cls.__new__(cls)
        self.metric, self.dtype, self.d = header["metric"], DTYPES[header["dtype"]], d
        self.device = validation.device(device) if device is not None else torch.device("cpu")
        self._lock = threading.Lock()
        self._columns = self._searched = self._ties = None
        rows = torch.from_numpy(maps["rows"]).to(self.device)
        norms = torch.from_numpy(maps["norms"]).to(self.device)
        if "scan" in maps:
            scan = torch.from_numpy(maps["scan"]).view(torch.bfloat16).to(self.device)
        else:
            scan = rows
        scale = bias = None
        if self.metric == "cosine" and self.dtype == torch.float32:
            scale = _inverse_norms64(norms).float()
        if self.metric == "l2":
            bias = (-0.5 * norms * norms).float()
        zero, cmax, bias_max = self._summary(norms, bias)
        delta = 0.0
        if scan.dtype == torch.bfloat16:  # (verify made the same scan rows: their rounding is known)
            delta = scan_delta if scan_delta is not None else \
                _bf16_scan(rows, norms if self.metric == "cosine" else None, None, scan)[1]
        self._store = _Store(rows, norms, scan, scale, bias, n, zero, cmax, bias_max, delta)
        self._owns_buffers = self.device.type != "cpu"
        return self


def pairs_above(x, threshold: Scalar, out: PathArg, *, metric: str | None = None,
                dtype: torch.dtype | str | None = None, progress: ProgressArg = False) -> dict:
    """Every pair i < j of x (N, D) with similarity >= threshold (cosine, dot; distance <=
    threshold for l2), decided on exact float64 values, streamed to .npy shards in the folder
    `out` with a manifest; memory does not grow with the number of pairs. A rerun on the same
    input and threshold continues an unfinished folder (finished rows are not recomputed) or
    returns at once; another input is refused. Read the pairs back with `embgeom.read_pairs`
    (the value of each pair rounded to float32: the similarity, or the distance for l2).
    metric (default "cosine") and dtype (default torch.float32) are x's own when x is an Index.
    A float32 threshold (a score a search returned) is compared with the values rounded to
    float32, as in Index.range_search.
    Returns the manifest (dict: count, shards, n, metric, threshold, complete, ...)."""
    validation.finite_float(threshold, "threshold")   # (before a temporary index is built)
    validation.path(out, "out")
    if isinstance(x, Index):
        if metric is not None and validation.metric(metric, "metric", METRICS) != x.metric:
            raise ValueError(f"metric: x is an Index of metric {x.metric!r}, which applies; got {metric!r}")
        if dtype is not None and _dtype(dtype) != x.dtype:
            raise ValueError(f"dtype: x is an Index of dtype {x.dtype}, which applies; got {dtype!r}")
        return x.pairs_above(threshold, out, progress=progress)
    # a temporary index reads x where it lies (memory stays ~ the input plus one score block or
    # one engine chunk: 1,895 MiB peak for a 1,536 MB input of 1,000,000 x 384)
    with validation.renamed(corpus="x"):
        index = Index(x, metric=metric or "cosine", dtype=torch.float32 if dtype is None else dtype, copy=False)
    return index.pairs_above(threshold, out, progress=progress)
