"""All-pairs statistics machinery shared by every backend.

A backend is an *engine* over a fixed, deterministic schedule of tiles:
`num_tiles()`, `tile_pairs(begin, end)`, `run(begin, end)`, `state()`, `load_state(state)`.
The state is a dict of plain numbers and numpy arrays in one canonical layout (below), so the
same code checkpoints, merges (threads, ranks) and finalizes the result for every backend.

Canonical state (indices are original row indices; lists are already in report order):
  tiles_done, count, sum, sumsq, min/max: (v, i, j) | None, hist: int64[bins + 2] | None
  (underflow, bins..., overflow), top/bottom/near/outside_pairs: (v f64[K], i i64[K], j i64[K]),
  row_top/row_bottom: (v f32[N, k], idx i64[N, k]) | None, outside_count,
  outside_rows: i64[N] | None, outside_cols: i64[M] | None, excluded_rows, excluded_cols,
  hist_error_bound.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .results import Histogram, Outside, PairList, PairwiseStats, RowTopK

METRICS = ("cosine", "dot", "euclidean")
PRECISIONS = ("exact", "fast")
LIST_KEYS = ("top", "bottom", "near", "outside_pairs")


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


# ---------------------------------------------------------------------------------------------
# ordering and merging of candidate lists
# ---------------------------------------------------------------------------------------------

def _order_key(kind: str, v: torch.Tensor, near: float | None) -> torch.Tensor:
    """Primary sort key (ascending) of a list kind; ties then go by (i, j)."""
    if kind == "top":
        return -v
    if kind == "bottom":
        return v
    if kind == "near":
        return (v - near).abs()
    return torch.zeros_like(v)  # outside_pairs: (i, j) order only


def sort_pairs(kind: str, v, i, j, near=None, limit=None):
    """Sort (v, i, j) by (key, i, j) and keep the first `limit`. Tensors of any device."""
    if v.numel() == 0:
        return v, i, j
    order = torch.argsort(j, stable=True)
    order = order[torch.argsort(i[order], stable=True)]
    order = order[torch.argsort(_order_key(kind, v[order].double(), near), stable=True)]
    if limit is not None:
        order = order[:limit]
    return v[order], i[order], j[order]


def merge_pairs(kind, a, b, k, near=None):
    v = torch.cat([torch.as_tensor(a[0], dtype=torch.float64), torch.as_tensor(b[0], dtype=torch.float64)])
    i = torch.cat([torch.as_tensor(a[1], dtype=torch.int64), torch.as_tensor(b[1], dtype=torch.int64)])
    j = torch.cat([torch.as_tensor(a[2], dtype=torch.int64), torch.as_tensor(b[2], dtype=torch.int64)])
    return sort_pairs(kind, v, i, j, near, k)


def sort_rows(values: torch.Tensor, idx: torch.Tensor, k: int, largest: bool):
    """Per row: order candidates by (value desc|asc, column asc), padding (-1) last; keep k."""
    big = torch.iinfo(torch.int64).max
    pad = idx < 0
    col_key = torch.where(pad, torch.full_like(idx, big), idx)
    order = torch.argsort(col_key, dim=1, stable=True)
    vals = torch.gather(values, 1, order).double()
    key = -vals if largest else vals
    key = torch.where(torch.gather(pad, 1, order), torch.full_like(key, math.inf), key)
    order2 = torch.argsort(key, dim=1, stable=True)
    order = torch.gather(order, 1, order2)[:, :k]
    return torch.gather(values, 1, order), torch.gather(idx, 1, order)


def merge_rows(a, b, k, largest):
    v = torch.cat([torch.as_tensor(a[0]), torch.as_tensor(b[0])], dim=1)
    i = torch.cat([torch.as_tensor(a[1]), torch.as_tensor(b[1])], dim=1)
    return sort_rows(v, i, k, largest)


def _better(kind, a, b):
    """Pick the min (kind='min') or max of two (v, i, j) triples; ties to the smaller (i, j)."""
    if a is None:
        return b
    if b is None:
        return a
    if a[0] != b[0]:
        return a if (a[0] < b[0]) == (kind == "min") else b
    return a if (a[1], a[2]) <= (b[1], b[2]) else b


def empty_state(cfg: PairwiseConfig, n: int, m: int | None) -> dict:
    """m is None in self mode."""
    def empty_list():
        return (np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def rows(k):
        if not k:
            return None
        return (np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64))

    return {
        "tiles_done": 0, "count": 0, "sum": 0.0, "sumsq": 0.0, "min": None, "max": None,
        "hist": np.zeros(cfg.bins + 2, np.int64) if cfg.bins else None,
        "top": empty_list(), "bottom": empty_list(), "near": empty_list(),
        "row_top": rows(cfg.row_topk), "row_bottom": rows(cfg.row_bottomk),
        "outside_count": 0,
        "outside_rows": np.zeros(n, np.int64) if cfg.outside else None,
        "outside_cols": np.zeros(m, np.int64) if (cfg.outside and m is not None) else None,
        "outside_pairs": empty_list(),
        "excluded_rows": np.zeros(0, np.int64), "excluded_cols": np.zeros(0, np.int64),
        "hist_error_bound": 0.0,
    }


def _np(t):
    return t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def merge_states(a: dict, b: dict, cfg: PairwiseConfig) -> dict:
    """Combine the reductions of two disjoint sets of tiles (associative, order-independent
    for everything but float rounding of the sums)."""
    out = dict(a)
    out["tiles_done"] = a["tiles_done"] + b["tiles_done"]
    out["count"] = int(a["count"]) + int(b["count"])
    out["sum"] = float(a["sum"]) + float(b["sum"])
    out["sumsq"] = float(a["sumsq"]) + float(b["sumsq"])
    out["min"] = _better("min", a["min"], b["min"])
    out["max"] = _better("max", a["max"], b["max"])
    if a["hist"] is not None:
        out["hist"] = np.asarray(a["hist"]) + np.asarray(b["hist"])
    limits = {"top": cfg.topk, "bottom": cfg.bottomk, "near": cfg.near_k,
              "outside_pairs": cfg.outside_limit}
    for kind in LIST_KEYS:
        out[kind] = tuple(_np(t) for t in merge_pairs(kind, a[kind], b[kind], limits[kind], cfg.near))
    for key, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
        if a[key] is not None:
            out[key] = tuple(_np(t) for t in merge_rows(a[key], b[key], k, largest))
    out["outside_count"] = int(a["outside_count"]) + int(b["outside_count"])
    for key in ("outside_rows", "outside_cols"):
        if a[key] is not None:
            out[key] = np.asarray(a[key]) + np.asarray(b[key])
    out["hist_error_bound"] = max(float(a["hist_error_bound"]), float(b["hist_error_bound"]))
    return out


# ---------------------------------------------------------------------------------------------
# exact selection inside one tile (torch, any device)
# ---------------------------------------------------------------------------------------------

def select_smallest(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of key (R, C), the k smallest entries ordered by (key, column); +inf = invalid.

    Returns positions (R, k') and keys (R, k'), k' = min(k, C). torch.topk breaks ties
    arbitrarily, so the boundary value is re-selected by column order to stay deterministic.
    """
    R, C = key.shape
    k = min(k, C)
    if k == 0:
        return key.new_zeros((R, 0), dtype=torch.int64), key.new_zeros((R, 0))
    kth = torch.topk(key, k, dim=1, largest=False).values[:, -1:]
    less = key < kth
    equal = key == kth
    need = k - less.sum(dim=1, keepdim=True)
    take = less | (equal & (torch.cumsum(equal, dim=1) <= need))
    pos = take.nonzero()[:, 1].reshape(R, k)
    keys = torch.gather(key, 1, pos)
    order = torch.argsort(keys, dim=1, stable=True)
    return torch.gather(pos, 1, order), torch.gather(keys, 1, order)


class TorchEngine:
    """Chunked PyTorch on any device: tiles of `block` x `block`, never N x N.

    The baseline every compiled kernel must beat, and the fallback on devices without one.
    """

    name = "torch"

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig):
        self.cfg = cfg
        self.self_mode = y is None
        compute = torch.float32  # exact mode is defined as fp32 products of fp32-normalised rows
        self.x, self.x_valid, excluded_x = self._prepare(x.to(compute))
        if self.self_mode:
            self.y, self.y_valid, excluded_y = self.x, self.x_valid, None
        else:
            self.y, self.y_valid, excluded_y = self._prepare(y.to(compute))
        if cfg.metric == "euclidean":
            self.x_sq = (self.x * self.x).sum(1)
            self.y_sq = self.x_sq if self.self_mode else (self.y * self.y).sum(1)
        self.n, self.m = self.x.shape[0], self.y.shape[0]
        b = max(1, cfg.block)
        self.row_blocks = [(s, min(s + b, self.n)) for s in range(0, self.n, b)]
        self.col_blocks = [(s, min(s + b, self.m)) for s in range(0, self.m, b)]
        if self.self_mode:
            self.tiles = [(r, c) for r in range(len(self.row_blocks)) for c in range(r, len(self.col_blocks))]
        else:
            self.tiles = [(r, c) for r in range(len(self.row_blocks)) for c in range(len(self.col_blocks))]
        self._state = empty_state(cfg, self.n, None if self.self_mode else self.m)
        self._state["excluded_rows"] = excluded_x
        if excluded_y is not None:
            self._state["excluded_cols"] = excluded_y

    def _prepare(self, v: torch.Tensor):
        v = v.contiguous()
        if self.cfg.metric != "cosine":
            return v, None, np.zeros(0, np.int64)
        norms = torch.linalg.vector_norm(v, dim=1)
        valid = norms > 0
        v = v / torch.where(valid, norms, torch.ones_like(norms)).unsqueeze(1)
        return v, valid, _np(torch.nonzero(~valid).flatten()).astype(np.int64)

    # engine protocol -----------------------------------------------------------------------
    def num_tiles(self) -> int:
        return len(self.tiles)

    def tile_pairs(self, begin: int, end: int) -> int:
        total = 0
        for r, c in self.tiles[begin:end]:
            (r0, r1), (c0, c1) = self.row_blocks[r], self.col_blocks[c]
            h, w = r1 - r0, c1 - c0
            total += h * (h - 1) // 2 if (self.self_mode and r == c) else h * w
        return total

    def state(self) -> dict:
        return dict(self._state)

    def load_state(self, state: dict) -> None:
        self._state = dict(state)

    def run(self, begin: int, end: int) -> None:
        if begin != self._state["tiles_done"]:
            raise ValueError(f"tiles must run in order: expected begin={self._state['tiles_done']}, got {begin}")
        cfg = self.cfg
        state = self._state
        for t in range(begin, end):
            part = self._tile(*self.tiles[t])
            # row-local outputs are merged in place, only on the rows this tile touched
            for key, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
                for row0, pv, pi in part.pop(key + "_segments", []):
                    rows = slice(row0, row0 + pv.shape[0])
                    sv, si = state[key][0], state[key][1]
                    mv, mi = merge_rows((sv[rows], si[rows]), (pv, pi), k, largest)
                    sv[rows], si[rows] = _np(mv), _np(mi)
            for key in ("outside_rows", "outside_cols"):
                for row0, counts in part.pop(key + "_segments", []):
                    state[key][row0:row0 + counts.shape[0]] += counts
            state["tiles_done"] += 1
            state["count"] += part["count"]
            state["sum"] += part["sum"]
            state["sumsq"] += part["sumsq"]
            state["min"] = _better("min", state["min"], part["min"])
            state["max"] = _better("max", state["max"], part["max"])
            if part["hist"] is not None:
                state["hist"] = state["hist"] + part["hist"]
            limits = {"top": cfg.topk, "bottom": cfg.bottomk, "near": cfg.near_k,
                      "outside_pairs": cfg.outside_limit}
            for kind in LIST_KEYS:
                if len(part[kind][0]):
                    state[kind] = tuple(_np(v) for v in merge_pairs(kind, state[kind], part[kind], limits[kind], cfg.near))
            state["outside_count"] += part["outside_count"]

    # one tile --------------------------------------------------------------------------------
    def _values(self, r0, r1, c0, c1):
        a, b = self.x[r0:r1], self.y[c0:c1]
        v = a @ b.T
        if self.cfg.metric == "cosine":
            v = v.clamp_(-1.0, 1.0)
        elif self.cfg.metric == "euclidean":
            scale = self.x_sq[r0:r1, None] + self.y_sq[None, c0:c1]
            d2 = (scale - 2 * v).clamp_(min=0)
            # |a|^2 + |b|^2 - 2ab cancels catastrophically for near-duplicate rows; recompute
            # those few distances directly from the difference
            close = (d2 < 1e-3 * scale).nonzero()
            if close.numel():
                diff = a[close[:, 0]] - b[close[:, 1]]
                d2[close[:, 0], close[:, 1]] = (diff * diff).sum(1)
            v = d2.sqrt_()
        return v

    def _tile(self, r, c) -> dict:
        cfg = self.cfg
        (r0, r1), (c0, c1) = self.row_blocks[r], self.col_blocks[c]
        vals = self._values(r0, r1, c0, c1)
        dev = vals.device
        valid = torch.ones_like(vals, dtype=torch.bool)
        if self.x_valid is not None:
            valid &= self.x_valid[r0:r1, None] & self.y_valid[None, c0:c1]
        diagonal = self.self_mode and r == c
        if diagonal:
            valid &= torch.ones_like(valid).triu(diagonal=1)
        part = {"count": 0, "sum": 0.0, "sumsq": 0.0, "min": None, "max": None, "hist": None,
                "outside_count": 0}
        for kind in LIST_KEYS:
            part[kind] = (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        sel = vals[valid]
        count = int(sel.numel())
        part["count"] = count
        if count == 0:
            return part
        sel64 = sel.double()
        part["sum"] = float(sel64.sum())
        part["sumsq"] = float((sel64 * sel64).sum())
        width = c1 - c0
        inf = torch.tensor(math.inf, device=dev, dtype=vals.dtype)

        def at(flat):
            f = int(flat)
            return (float(vals.view(-1)[f]), r0 + f // width, c0 + f % width)

        part["min"] = at(torch.argmin(torch.where(valid, vals, inf)))
        part["max"] = at(torch.argmax(torch.where(valid, vals, -inf)))
        if cfg.bins:
            scale = cfg.bins / (cfg.hi - cfg.lo)
            # values in [lo, hi] whose scaled position rounds up to `bins` belong to the last bin
            pos = torch.floor((sel64 - cfg.lo) * scale).clamp_(max=cfg.bins - 1)
            slot = torch.where(sel64 < cfg.lo, torch.full_like(pos, -1), pos)
            slot = torch.where(sel64 > cfg.hi, torch.full_like(pos, cfg.bins), slot).long() + 1
            part["hist"] = _np(torch.bincount(slot, minlength=cfg.bins + 2))
        flat_vals = vals.reshape(1, -1)
        flat_valid = valid.reshape(1, -1)
        for kind, k in (("top", cfg.topk), ("bottom", cfg.bottomk), ("near", cfg.near_k if cfg.near is not None else 0)):
            if not k:
                continue
            key = _order_key(kind, flat_vals.double(), cfg.near)
            key = torch.where(flat_valid, key, torch.full_like(key, math.inf))
            pos, keys = select_smallest(key, min(k, count))
            pos = pos[0]
            part[kind] = (_np(flat_vals[0, pos].double()), _np(r0 + pos // width), _np(c0 + pos % width))
        for key_name, k, largest in (("row_top", cfg.row_topk, True), ("row_bottom", cfg.row_bottomk, False)):
            if k:
                part[key_name + "_segments"] = self._row_lists(vals, valid, r0, c0, k, largest)
        if cfg.outside:
            a, b = cfg.outside
            out_mask = valid & ((vals < a) | (vals > b))
            part["outside_count"] = int(out_mask.sum())
            part["outside_rows_segments"] = [(r0, _np(out_mask.sum(1)))]
            if self.self_mode:
                part["outside_rows_segments"].append((c0, _np(out_mask.sum(0))))
            else:
                part["outside_cols_segments"] = [(c0, _np(out_mask.sum(0)))]
            hits = out_mask.nonzero()[: cfg.outside_limit]
            if hits.numel():
                part["outside_pairs"] = (_np(vals[hits[:, 0], hits[:, 1]].double()),
                                         _np(hits[:, 0] + r0), _np(hits[:, 1] + c0))
        return part

    def _row_lists(self, vals, valid, r0, c0, k, largest):
        """Per-row candidates of this tile: [(first_row, values (h, k), columns (h, k))] for rows
        r0.. and, in self mode, for rows c0.. from the transposed tile (row i's neighbours j < i;
        the diagonal tile's lower triangle is the transpose of its upper one)."""
        sources = [(vals, valid, r0, c0)]
        if self.self_mode:
            sources.append((vals.T, valid.T, c0, r0))
        segments = []
        for v, ok, row0, col0 in sources:
            key = -v.double() if largest else v.double()
            key = torch.where(ok, key, torch.full_like(key, math.inf))
            pos, keys = select_smallest(key, k)
            got_v = torch.gather(v, 1, pos).float()
            got_i = pos + col0
            bad = torch.isinf(keys)
            got_v = torch.where(bad, torch.full_like(got_v, math.nan), got_v)
            got_i = torch.where(bad, torch.full_like(got_i, -1), got_i)
            segments.append((row0, _np(got_v), _np(got_i)))
        return segments


# ---------------------------------------------------------------------------------------------
# running an engine: progress, checkpoints, interruption
# ---------------------------------------------------------------------------------------------

def fingerprint(x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, backend: str, num_tiles: int) -> str:
    """Identifies input + settings: a checkpoint from anything else is refused."""
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.describe(), "backend": backend, "tiles": num_tiles}, sort_keys=True).encode())
    for t in (x, y):
        if t is None:
            h.update(b"none")
            continue
        c = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(c.shape)).encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()


def _state_to_payload(state: dict) -> dict:
    out = {}
    for key, val in state.items():
        if isinstance(val, tuple) and any(isinstance(p, np.ndarray) for p in val):
            out[key] = ("tuple", [np.asarray(p) for p in val])
        else:
            out[key] = val
    return out


def _payload_to_state(payload: dict) -> dict:
    out = {}
    for key, val in payload.items():
        if isinstance(val, tuple) and len(val) == 2 and val[0] == "tuple":
            out[key] = tuple(val[1])
        else:
            out[key] = val
    return out


def save_checkpoint(path: str, fp: str, state: dict) -> None:
    """Atomic: write a temp file, fsync, rename; a checksum guards against torn files."""
    import pickle

    body = pickle.dumps({"fingerprint": fp, "state": _state_to_payload(state)}, protocol=4)
    digest = hashlib.sha256(body).hexdigest().encode()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(b"EMBGEOM-CKPT1\n" + digest + b"\n" + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def load_checkpoint(path: str, fp: str) -> dict | None:
    import pickle

    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    magic, _, rest = raw.partition(b"\n")
    digest, _, body = rest.partition(b"\n")
    if magic != b"EMBGEOM-CKPT1" or hashlib.sha256(body).hexdigest().encode() != digest:
        raise ValueError(f"checkpoint: {path} is not a valid embgeom checkpoint (bad header or checksum)")
    payload = pickle.loads(body)
    if payload["fingerprint"] != fp:
        raise ValueError(f"checkpoint: {path} was written for another input or other settings; "
                         "delete it or pass another path")
    return _payload_to_state(payload["state"])


class _Progress:
    def __init__(self, total_pairs: int, enabled: bool):
        self.total = max(total_pairs, 1)
        self.enabled = enabled
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done_pairs: int, resumed_pairs: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (done_pairs - resumed_pairs) / elapsed
        eta = (self.total - done_pairs) / rate if rate > 0 else float("inf")
        msg = (f"\rembgeom pairs: {100.0 * done_pairs / self.total:5.1f}%  "
               f"{rate / 1e6:8.1f} Mpairs/s  ETA {eta:6.1f}s")
        sys.stderr.write(msg + ("\n" if final else ""))
        sys.stderr.flush()


def run_engine(engine, *, fp: str | None = None, checkpoint: str | None = None,
               progress: bool = False, chunk_seconds: float = 2.0, should_stop=None) -> dict:
    """Run all tiles of `engine` in chunks; save after each chunk if `checkpoint` is set.

    Ctrl-C stops after the tile range in flight: the checkpoint then holds every finished
    chunk, so the next call with the same path resumes where this one stopped.
    """
    total_tiles = engine.num_tiles()
    if checkpoint:
        chunk_seconds = float(os.environ.get("EMBGEOM_CHECKPOINT_SECONDS", chunk_seconds))
        saved = load_checkpoint(checkpoint, fp)
        if saved is not None:
            engine.load_state(saved)
    done = int(engine.state()["tiles_done"])
    if done and progress:
        sys.stderr.write(f"embgeom pairs: resuming from {checkpoint}: {done} of {total_tiles} tiles done\n")
    total_pairs = engine.tile_pairs(0, total_tiles)
    resumed_pairs = engine.tile_pairs(0, done)
    bar = _Progress(total_pairs, progress)
    chunk = 1
    pairs_done = resumed_pairs
    while done < total_tiles:
        begin, end = done, min(total_tiles, done + chunk)
        t0 = time.perf_counter()
        engine.run(begin, end)
        per_tile = (time.perf_counter() - t0) / (end - begin)
        pairs_done += engine.tile_pairs(begin, end)
        done = end
        if checkpoint:
            save_checkpoint(checkpoint, fp, engine.state())
        bar.update(pairs_done, resumed_pairs)
        # size chunks to ~chunk_seconds so progress and checkpoints stay frequent but cheap
        chunk = max(1, min(total_tiles, int(chunk_seconds / max(per_tile, 1e-6))))
        if should_stop is not None and should_stop():
            break
    bar.update(pairs_done, resumed_pairs, final=True)
    return engine.state()


def finalize(state: dict, cfg: PairwiseConfig, *, n: int, m: int | None, d: int, backend: str,
             device: torch.device, seconds: float) -> PairwiseStats:
    def t(a, dtype=None):
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

    def plist(key, enabled):
        if not enabled:
            return None
        v, i, j = state[key]
        return PairList(t(i, torch.int64), t(j, torch.int64), t(v, torch.float64))

    count = int(state["count"])
    mean = state["sum"] / count if count else math.nan
    var = max(state["sumsq"] / count - mean * mean, 0.0) if count else math.nan
    hist = None
    if cfg.bins:
        h = np.asarray(state["hist"])
        hist = Histogram(cfg.lo, cfg.hi, t(h[1:-1], torch.int64), int(h[0]), int(h[-1]),
                         float(state["hist_error_bound"]))
    rows = {}
    for key, k in (("row_top", cfg.row_topk), ("row_bottom", cfg.row_bottomk)):
        rows[key] = None if not k else RowTopK(t(state[key][1], torch.int64), t(state[key][0], torch.float32))
    outside = None
    if cfg.outside:
        outside = Outside(cfg.outside[0], cfg.outside[1], int(state["outside_count"]),
                          t(state["outside_rows"], torch.int64), plist("outside_pairs", True),
                          None if state["outside_cols"] is None else t(state["outside_cols"], torch.int64))

    def extreme(p):
        return None if p is None else (int(p[1]), int(p[2]), float(p[0]))

    return PairwiseStats(
        n=n, m=n if m is None else m, d=d, mode="self" if m is None else "cross",
        metric=cfg.metric, precision=cfg.precision, backend=backend, count=count,
        mean=mean, std=math.sqrt(var) if count else math.nan,
        min=extreme(state["min"]), max=extreme(state["max"]), hist=hist,
        top_pairs=plist("top", cfg.topk > 0), bottom_pairs=plist("bottom", cfg.bottomk > 0),
        near_pairs=plist("near", cfg.near is not None and cfg.near_k > 0), near=cfg.near,
        row_topk=rows["row_top"], row_bottomk=rows["row_bottom"], outside=outside,
        excluded_rows=[int(r) for r in np.asarray(state["excluded_rows"])],
        excluded_cols=[int(c) for c in np.asarray(state["excluded_cols"])],
        seconds=seconds,
    )
