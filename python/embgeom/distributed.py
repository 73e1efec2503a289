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
import sys
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from . import validation
from .formatting import first_line
from .backends import registry
from .results import PairwiseStats
from .engine.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from .engine import limits
from .engine.config import PairwiseConfig, make_config
from .engine.runner import run_engine
from .interrupts import interrupt_after
from .io import checkpoint_lock
from .numerics import LIST_KINDS, MOMENT_SAMPLE_ROWS, moment_shift, spread_rows
from .engine.state import EngineState, check_fits


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
    if n == 0:  # no rows: no groups, no jobs (a run over no pairs)
        return []
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


def _run_job(rows, g, h, bounds, cfg: PairwiseConfig, make_engine, n) -> EngineState:
    """One job's raw engine state, shifted into the indices of the whole matrix."""
    (g0, g1), (h0, h1) = bounds[g], bounds[h]
    xg = rows(g0, g1)
    # (the products' range was checked on the whole matrix's largest norm, as one process checks
    # it: a job of tiny rows had been refused where the matrix is fine)
    if g == h:
        return run_engine(make_engine(xg, None, cfg)).shift(cfg, n, g0, g0)
    xh = rows(h0, h1)
    state = run_engine(make_engine(xg, xh, cfg)).shift(cfg, n, g0, h0)
    if cfg.row_topk or cfg.row_bottomk:
        # rows of group h need their neighbours in group g too: the transposed cross job,
        # asked for row lists only
        back = replace(cfg, bins=0, topk=0, bottomk=0, near=None, outside=None)
        rev = run_engine(make_engine(xh, xg, back)).shift(cfg, n, h0, g0, row_lists_only=True)
        state = state.merge(rev, cfg)
    state.tiles_done = 1
    return state


def _checked_rank_state(saved, ckpt: str, cfg: PairwiseConfig, n: int, mine: list[int]):
    """(state, done jobs) of a rank's checkpoint, or a one-line ValueError when it is not one this
    rank writes: the jobs distinct and this rank's, the state of this run's shape
    (engine.state.check_fits)."""
    state = saved.get("state") if isinstance(saved, dict) else None
    done = saved.get("done") if isinstance(saved, dict) else None
    try:
        if not isinstance(state, EngineState) or not isinstance(done, list) or set(saved) != {"state", "done"}:
            raise ValueError("not a rank's state and finished jobs")
        if not all(type(j) is int for j in done) or len(set(done)) != len(done) or not set(done) <= set(mine):
            raise ValueError(f"its finished jobs {done[:8]} are not this rank's ({mine[:8]}), each once")
        check_fits(state, EngineState.empty(cfg, n, None), cfg, None, lambda a, b: n * (n - 1) // 2)
    except ValueError as exc:
        raise ValueError(f"checkpoint: {ckpt}: {exc}; delete it or pass another path") from None
    return state, list(done)


def _check_done_pairs(state, done: list[int], jobs, bounds, rows, cfg: PairwiseConfig, ckpt: str) -> None:
    """ValueError unless the state's pair count is that of its finished jobs: the pairs of their
    row groups less those of rows a cosine leaves out (zero rows). A crafted list of finished jobs
    (its sha256 recomputed) had counted a job twice or skipped jobs whose pairs were missing."""
    valid = {}

    def valid_rows(g: int) -> int:
        if g not in valid:
            a, b = bounds[g]
            part = rows(a, b)
            valid[g] = int((part.double().norm(dim=1) > 0).sum()) if cfg.metric == "cosine" else b - a
        return valid[g]

    want = 0
    for job in done:
        g, h, _ = jobs[job]
        vg = valid_rows(g)
        want += vg * (vg - 1) // 2 if g == h else vg * valid_rows(h)
    if state.count != want:
        raise ValueError(f"checkpoint: {ckpt}: its state counts {state.count:,} pairs, its {len(done)} finished "
                         f"jobs hold {want:,}; delete it or pass another path")
    _check_listed_pairs(state, done, jobs, bounds, ckpt)


def _check_listed_pairs(state, done: list[int], jobs, bounds, ckpt: str) -> None:
    """ValueError unless every pair the state lists (ranked and outside lists, extremes, per-row
    lists) lies in the row groups of a finished job: a finished-jobs list relabelled to another
    job of the same size (its sha256 recomputed) had been resumed, its pairs merged with the
    real job's (a row's neighbour listed twice, outside pairs twice)."""
    starts = np.array([a for a, _ in bounds])
    finished = {(min(g, h), max(g, h)) for g, h, _ in (jobs[j] for j in done)}

    def outside_jobs(i, j) -> bool:
        gi = np.searchsorted(starts, np.asarray(i), side="right") - 1
        gj = np.searchsorted(starts, np.asarray(j), side="right") - 1
        keys = set(zip(np.minimum(gi, gj).ravel().tolist(), np.maximum(gi, gj).ravel().tolist()))
        return not keys <= finished

    listed = [getattr(state, kind)[1:] for kind in LIST_KINDS]
    listed += [(e[1], e[2]) for e in (state.min, state.max) if e is not None]
    for name in ("row_top", "row_bottom"):
        rows = getattr(state, name)
        if rows is not None:
            idx = np.asarray(rows[1])
            r, c = np.nonzero(idx >= 0)
            listed.append((r, idx[r, c]))
    if any(np.asarray(i).size and outside_jobs(i, j) for i, j in listed):
        raise ValueError(f"checkpoint: {ckpt}: its state lists pairs of jobs it does not count as finished; "
                         "delete it or pass another path")


def _init_process_group(timeout_s: float):
    import torch.distributed as dist

    if dist.is_initialized():
        return dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("distributed: not launched by torchrun (RANK/WORLD_SIZE unset); "
                         "run `torchrun --nproc_per_node N -m embgeom pairs ... --distributed`")
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("EMBGEOM_DIST_BACKEND") != "gloo" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError, ValueError) as exc:  # DistNetworkError, DistStoreError: a port, a peer
        raise ValueError(f"distributed: the ranks could not join ({first_line(exc)}); check MASTER_ADDR / "
                         "MASTER_PORT and that every rank was started") from None
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist


AGREE_SAMPLE_ROWS = 64
HASH_BLOCK_BYTES = 64 << 20


def _rows_sha256(x: torch.Tensor, a: int, b: int) -> str:
    """sha256 of rows a..b-1 of x as stored (64 MB at a time: a memory-mapped file is read once)."""
    import hashlib

    h = hashlib.sha256()
    step = max(1, HASH_BLOCK_BYTES // max(1, math.prod(x.shape[1:]) * x.element_size()))
    for r in range(a, b, step):
        block = x[r:min(b, r + step)].detach().cpu().contiguous()
        h.update(block.view(torch.uint8).numpy().data if block.numel() else b"")
    return h.hexdigest()[:16]


def _check_ranks_agree(dist, rank: int, world: int, x: torch.Tensor, cfg, groups: int,
                       backend: str | None) -> None:
    """ValueError on every rank unless all ranks run the same settings on the same input: the
    shape, dtype, every option, the sha256 of AGREE_SAMPLE_ROWS rows spread over x, and the
    sha256 of every row group a rank reads for its jobs, compared wherever two ranks read the
    same group (each rank hashes only the rows it reads anyway). Ranks given different files or
    options had each computed their part and merged them, silently. The same pass checks the
    values of those groups and takes their largest row norm: every rank then refuses in the
    same words the first group's bad values (its peers had waited for it, then said a rank
    died), and the products' range on the whole matrix's largest norm, as one process does."""
    n = x.shape[0]
    picks = spread_rows(n, AGREE_SAMPLE_ROWS).tolist()
    sample = torch.stack([x[i] for i in picks]).detach().cpu().contiguous() if n else x[:0]
    mine = {"shape": list(x.shape), "dtype": str(x.dtype), **{k: repr(v) for k, v in asdict(cfg).items()},
            "groups": groups, "backend": backend, "x rows": _rows_sha256(sample, 0, len(sample))}
    read: dict[str, str] = {}
    problem, norm = None, 0.0
    if n:
        bounds, jobs = group_bounds(n, groups), plan_jobs(n, groups)
        try:
            for g in sorted({g for job in assign_jobs(jobs, world)[rank] for g in jobs[job][:2]}):
                a, b = bounds[g]
                if world > 1:
                    read[f"{a}-{b - 1}"] = _rows_sha256(x, a, b)
                part = validation.embeddings(x[a:b], "x", first_row=a, rows_may_be_empty=a == b)
                norm = max(norm, validation.max_row_norm(part))
        except ValueError as exc:
            problem = str(exc)
    everyone = [None] * world
    try:
        dist.all_gather_object(everyone, {**mine, "row groups": read, "problem": problem, "norm": norm})
    except Exception as exc:  # noqa: BLE001 - a dead peer surfaces here
        raise PeerLost(f"distributed: rank {rank}: comparing settings with the other ranks failed "
                       f"({first_line(exc)}); a rank probably died") from None
    for theirs in everyone:
        if theirs["problem"]:
            raise ValueError(theirs["problem"])
    for r, theirs in enumerate(everyone):
        differ = [k for k in mine if theirs[k] != everyone[0][k]]
        if differ:
            k = differ[0]
            raise ValueError(f"distributed: rank {r} runs another input or options than rank 0 ({', '.join(differ)} "
                             f"differ; {k}: {everyone[0][k]!r} on rank 0, {theirs[k]!r} on rank {r}); run the "
                             "same command on the same file on every rank")
    first_seen: dict[str, tuple[int, str]] = {}
    for r, theirs in enumerate(everyone):
        for span, digest in theirs["row groups"].items():
            s, seen = first_seen.setdefault(span, (r, digest))
            if seen != digest:
                raise ValueError(f"distributed: rank {r} runs another input than rank {s} (rows {span} of x "
                                 f"differ: sha256 {seen} on rank {s}, {digest} on rank {r}); run the same "
                                 "command on the same file on every rank")
    if cfg.metric != "cosine":
        largest = max(theirs["norm"] for theirs in everyone)
        validation.norm_range(largest, largest, cfg.metric, ("x", "x"))


class PeerLost(RuntimeError):
    """A rank could not gather the others' results (one died): the CLI prints it in one line."""


def pairwise_stats(x: Any, y: Any = None, *, groups: int | None = None, timeout_s: float = 600.0,
                   checkpoint: str | None = None, progress: bool = False, backend: str | None = None,
                   **kwargs) -> PairwiseStats | None:
    """Self-mode all-pairs statistics over all ranks; rank 0 returns the result, others None.

    x: (N, D) on every rank (a memory-mapped array is read only where needed). Other keyword
    arguments are those of `embgeom.pairwise_stats`. groups: number of row groups (default
    2 * world size, so every rank gets several balanced jobs).
    """
    if y is not None:
        raise ValueError("y: distributed cross mode is not supported; shard the first matrix's rows instead")
    import torch.distributed as tdist

    owns_group = not tdist.is_initialized()
    dist = _init_process_group(timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    # values are checked per row group, where a rank reads them; no rows: a run over no pairs,
    # as pairwise_stats takes it
    x = validation.matrix(x, "x", rows_may_be_empty=True)
    cfg = make_config(**kwargs)
    n = x.shape[0]
    asked = cfg  # (the checkpoint's identity: what was asked, as pairwise_stats keeps it)
    cfg, notes = limits.fit_to_input(cfg, n, None)
    limits.check_memory(cfg, n, None, x.shape[1])
    device = x.device
    if device.type == "cpu" and torch.cuda.is_available() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    groups = groups or 2 * world
    bounds = group_bounds(n, groups)
    jobs = plan_jobs(n, groups)
    mine = assign_jobs(jobs, world)[rank]

    def rows(a, b):
        part = validation.embeddings(x[a:b], "x", first_row=a, rows_may_be_empty=a == b)
        return part.to(device)

    _check_ranks_agree(dist, rank, world, x, cfg, groups, backend)

    start = time.perf_counter()
    name, pick_engine = registry.pick("pairwise_stats", rows(0, min(1, n)), backend, precision=cfg.precision)
    # one moment shift for every job (from the matrix's first rows, as one process takes it),
    # so the jobs' shifted sums add as one engine's tiles do (EngineState.merge_moments)
    shift = moment_shift(rows(0, min(MOMENT_SAMPLE_ROWS, n)), None, cfg.metric)

    def make_engine(a, b, c):
        return pick_engine(a, b, c, shift=shift)

    state = EngineState.empty(cfg, n, None)
    done: list[int] = []
    ckpt = None if checkpoint is None else f"{checkpoint}.rank{rank}"
    fp = None
    # one run at a time on a rank's file, as pairwise_stats(checkpoint=) keeps its own: a second
    # job on the same --checkpoint had run in full beside the first, each saving over the other
    with checkpoint_lock(ckpt):
        if ckpt:
            fp = fingerprint(x, None, asked, name, len(jobs), registry.numerics(name, device, cfg.precision),
                             distributed={"world_size": world, "row_groups": groups, "rank": rank})
            saved = load_checkpoint(ckpt, fp)
            if saved is not None:
                state, done = _checked_rank_state(saved, ckpt, cfg, n, mine)
                _check_done_pairs(state, done, jobs, bounds, rows, cfg, ckpt)
                if progress:
                    print(f"embgeom pairs [rank {rank}]: resuming from {ckpt}: {len(done)} of {len(mine)} jobs done", file=sys.stderr, flush=True)
        for job in mine:
            if job in done:
                continue
            g, h, _ = jobs[job]
            finished = _run_job(rows, g, h, bounds, cfg, make_engine, n)
            with interrupt_after():  # (a finished job is saved before a signal's KeyboardInterrupt)
                state = state.merge(finished, cfg)
                done.append(job)
                if ckpt:
                    save_checkpoint(ckpt, fp, {"state": state, "done": done})
            if progress:
                print(f"embgeom pairs [rank {rank}]: job {len(done)}/{len(mine)} done", file=sys.stderr, flush=True)
    try:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(state, gathered, dst=0)
        # leave together: a rank that exits while a peer still talks to it aborts the peer
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - a dead peer surfaces here; say so plainly
        kept = "finished jobs are checkpointed" if ckpt else "--checkpoint PATH would keep finished jobs"
        raise PeerLost(f"distributed: rank {rank}: gathering results failed ({first_line(exc)}); "
                       f"a rank probably died; restart the job ({kept})") from None
    finally:
        if owns_group:
            dist.destroy_process_group()
    if rank != 0:
        return None
    total = gathered[0]
    for other in gathered[1:]:
        total = total.merge(other, cfg)
    result = total.finalize(cfg, d=x.shape[1], backend=f"{name} x {world} ranks", device=x.device,
                            seconds=time.perf_counter() - start)
    result.notes = notes
    return result
