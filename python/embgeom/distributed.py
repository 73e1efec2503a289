"""All-pairs statistics split over torch.distributed ranks (launch with torchrun).

The N rows are cut into G equal row groups. The unique pairs are the G "self" jobs (pairs
inside a group) and the G(G-1)/2 "cross" jobs (group g against group h > g). Jobs are handed
to ranks by a deterministic longest-first balance on their pair counts, and a rank reads only
the row groups of its own jobs (slices of a memory-mapped .npy stay on disk until used). Each
job runs the local backend (cpp on CPU, triton/cuda on GPU), its state is shifted to global
indices and merged; rank 0 then gathers every rank's state and merges with the same
tie-breaking as one process, so the result equals a single-process run.

A rank checkpoints after every finished job (PATH.rank<r>); a restarted job skips finished
work. Collective calls have a timeout, so a dead rank fails the job with a message instead
of hanging it.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any

import numpy as np
import torch

from . import _backends, _validate
from ._pairwise import PairwiseConfig, empty_state, finalize, fingerprint, load_checkpoint, merge_states, save_checkpoint
from .api import make_config, pairwise_stats as _local_pairwise_stats
from .results import PairwiseStats


def plan_jobs(n: int, groups: int) -> list[tuple[int, int, int]]:
    """Jobs (g, h, pairs) over `groups` row groups of n rows, g <= h (g == h: pairs inside g)."""
    bounds = group_bounds(n, groups)
    jobs = []
    for g in range(len(bounds)):
        for h in range(g, len(bounds)):
            ng = bounds[g][1] - bounds[g][0]
            nh = bounds[h][1] - bounds[h][0]
            jobs.append((g, h, ng * (ng - 1) // 2 if g == h else ng * nh))
    return jobs


def group_bounds(n: int, groups: int) -> list[tuple[int, int]]:
    groups = max(1, min(groups, n))
    size = math.ceil(n / groups)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def assign_jobs(jobs, world: int) -> list[list[int]]:
    """Longest job first onto the least-loaded rank (ties: lower rank, lower job index)."""
    load = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for idx in sorted(range(len(jobs)), key=lambda j: (-jobs[j][2], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owned[rank].append(idx)
        load[rank] += jobs[idx][2]
    return [sorted(o) for o in owned]


def _shift_state(part: dict, cfg: PairwiseConfig, n: int, row_off: int, col_off: int, *,
                 rows_only_for: str | None = None) -> dict:
    """A job's state in global row indices, with full-length (n) per-row arrays."""
    out = empty_state(cfg, n, None)
    if rows_only_for is None:
        for key in ("count", "sum", "sumsq", "hist", "outside_count", "hist_error_bound"):
            out[key] = part[key]
        for key in ("min", "max"):
            p = part[key]
            out[key] = None if p is None else (p[0], int(p[1]) + row_off, int(p[2]) + col_off)
        for key in ("top", "bottom", "near", "outside_pairs"):
            v, i, j = part[key]
            out[key] = (np.asarray(v), np.asarray(i) + row_off, np.asarray(j) + col_off)
        if part["outside_rows"] is not None:
            rows = out["outside_rows"]
            rows[row_off:row_off + len(part["outside_rows"])] += part["outside_rows"]
            if part.get("outside_cols") is not None:
                rows[col_off:col_off + len(part["outside_cols"])] += part["outside_cols"]
    for key in ("row_top", "row_bottom"):
        if part[key] is None or (rows_only_for is not None and key not in rows_only_for):
            continue
        v, idx = (np.asarray(a) for a in part[key])
        idx = np.where(idx >= 0, idx + col_off, -1)
        out[key][0][row_off:row_off + len(v)] = v
        out[key][1][row_off:row_off + len(v)] = idx
    out["tiles_done"] = 1
    return out


def _run_job(rows, g, h, bounds, cfg: PairwiseConfig, backend, n) -> dict:
    (g0, g1), (h0, h1) = bounds[g], bounds[h]
    xg = rows(g0, g1)
    opts = dict(metric=cfg.metric, bins=cfg.bins, range=(cfg.lo, cfg.hi) if cfg.bins else None,
                topk=cfg.topk, bottomk=cfg.bottomk, near=cfg.near, near_k=cfg.near_k,
                row_topk=cfg.row_topk, row_bottomk=cfg.row_bottomk, outside=cfg.outside,
                outside_limit=cfg.outside_limit, precision=cfg.precision, block=cfg.block, backend=backend)
    state = _stats_to_state(_local_pairwise_stats(xg, None if g == h else rows(h0, h1), **opts), cfg)
    shifted = _shift_state(state, cfg, n, g0, g0 if g == h else h0)
    if g == h:
        shifted["excluded_rows"] = np.asarray(state["excluded_rows"]) + g0
        return shifted
    if cfg.row_topk or cfg.row_bottomk:
        # rows of group h need their neighbours in group g too: the transposed cross job,
        # asked for row lists only
        back = dict(opts, bins=0, topk=0, bottomk=0, near=None, outside=None, range=None)
        rev = _stats_to_state(_local_pairwise_stats(rows(h0, h1), xg, **back), cfg)
        shifted = merge_states(shifted, _shift_state(rev, cfg, n, h0, g0, rows_only_for=("row_top", "row_bottom")), cfg)
        shifted["tiles_done"] = 1
    return shifted


def _stats_to_state(r: PairwiseStats, cfg: PairwiseConfig) -> dict:
    """PairwiseStats (local indices) -> canonical state (see _pairwise)."""
    def triple(p):
        if p is None:
            return (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return (p.values.cpu().double().numpy(), p.i.cpu().numpy(), p.j.cpu().numpy())

    def extreme(p):
        return None if p is None else (p[2], p[0], p[1])

    def rows(rt):
        return None if rt is None else (rt.values.cpu().float().numpy(), rt.indices.cpu().numpy())

    count = r.count
    h = r.hist
    return {
        "tiles_done": 1, "count": count,
        "sum": r.mean * count if count else 0.0,
        "sumsq": (r.std ** 2 + r.mean ** 2) * count if count else 0.0,
        "min": extreme(r.min), "max": extreme(r.max),
        "hist": None if h is None else np.concatenate([[h.underflow], h.counts.cpu().numpy(), [h.overflow]]).astype(np.int64),
        "top": triple(r.top_pairs), "bottom": triple(r.bottom_pairs), "near": triple(r.near_pairs),
        "row_top": rows(r.row_topk), "row_bottom": rows(r.row_bottomk),
        "outside_count": 0 if r.outside is None else r.outside.count,
        "outside_rows": None if r.outside is None else r.outside.row_counts.cpu().numpy(),
        "outside_cols": None if r.outside is None or r.outside.col_counts is None else r.outside.col_counts.cpu().numpy(),
        "outside_pairs": triple(None if r.outside is None else r.outside.pairs),
        "excluded_rows": np.asarray(r.excluded_rows, np.int64),
        "excluded_cols": np.asarray(r.excluded_cols, np.int64),
        "hist_error_bound": 0.0 if h is None else h.error_bound,
    }


def _init_process_group(timeout_s: float):
    import torch.distributed as dist

    if dist.is_initialized():
        return dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("distributed: not launched by torchrun (RANK/WORLD_SIZE unset); "
                         "run `torchrun --nproc_per_node N -m embgeom pairs ... --distributed`")
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("EMBGEOM_DIST_BACKEND") != "gloo" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist


def pairwise_stats(x: Any, y: Any = None, *, groups: int | None = None, timeout_s: float = 600.0,
                   checkpoint: str | None = None, progress: bool = False, backend: str | None = None,
                   **kwargs) -> PairwiseStats | None:
    """Self-mode all-pairs statistics over all ranks; rank 0 returns the result, others None.

    x: (N, D) on every rank (a memory-mapped array is read only where needed). Other keyword
    arguments are those of `embgeom.pairwise_stats`. groups: number of row groups (default
    2 * world size, so every rank gets several balanced jobs).
    """
    if y is not None:
        raise ValueError("y: distributed cross mode is not supported; shard the rows of x instead")
    import torch.distributed as tdist

    owns_group = not tdist.is_initialized()
    dist = _init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    x = _validate.as_tensor(x, "x")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected (N, D) float with N >= 1, got {tuple(x.shape)}")
    cfg = make_config(**kwargs)
    n = x.shape[0]
    device = x.device
    if device.type == "cpu" and torch.cuda.is_available() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    groups = groups or 2 * world
    bounds = group_bounds(n, groups)
    jobs = plan_jobs(n, groups)
    mine = assign_jobs(jobs, world)[rank]

    def rows(a, b):
        part = _validate.embeddings(x[a:b], "x")
        return part.to(device)

    start = time.perf_counter()
    name, _ = _backends.pick("pairwise_stats", rows(0, 1), backend, precision=cfg.precision)
    state = empty_state(cfg, n, None)
    state["tiles_done"] = 0
    done: list[int] = []
    ckpt = None if checkpoint is None else f"{checkpoint}.rank{rank}"
    fp = None
    if ckpt:
        fp = fingerprint(x, None, cfg, f"{name}/dist{world}/g{groups}/r{rank}", len(jobs))
        saved = load_checkpoint(ckpt, fp)
        if saved is not None:
            state, done = saved["state"], list(saved["done"])
            if progress:
                print(f"embgeom pairs [rank {rank}]: resuming from {ckpt}: {len(done)} of {len(mine)} jobs done", flush=True)
    for job in mine:
        if job in done:
            continue
        g, h, _ = jobs[job]
        part = _run_job(rows, g, h, bounds, cfg, name, n)
        if g == h:
            state["excluded_rows"] = np.union1d(state["excluded_rows"], part["excluded_rows"]).astype(np.int64)
        part["excluded_rows"] = state["excluded_rows"]
        state = merge_states(state, part, cfg)
        done.append(job)
        if ckpt:
            save_checkpoint(ckpt, fp, {"state": state, "done": done})
        if progress:
            print(f"embgeom pairs [rank {rank}]: job {len(done)}/{len(mine)} done", flush=True)
    try:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(state, gathered, dst=0)
        # leave together: a rank that exits while a peer still talks to it aborts the peer
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - a dead peer surfaces here; say so plainly
        raise RuntimeError(f"distributed: rank {rank}: gathering results failed ({exc}); "
                           "a rank probably died; restart the job, finished jobs are checkpointed") from None
    finally:
        if owns_group:
            dist.destroy_process_group()
    if rank != 0:
        return None
    total = gathered[0]
    excluded = set(np.asarray(total["excluded_rows"]).tolist())
    for other in gathered[1:]:
        excluded |= set(np.asarray(other["excluded_rows"]).tolist())
        total = merge_states(total, other, cfg)
    total["excluded_rows"] = np.array(sorted(excluded), np.int64)
    return finalize(total, cfg, n=n, m=None, d=x.shape[1], backend=f"{name} x {world} ranks",
                    device=x.device, seconds=time.perf_counter() - start)
