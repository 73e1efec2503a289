"""Limits of one all-pairs run, checked against the input's shape before any work starts.

`fit_to_input` lowers what cannot be filled (a row has at most N - 1 neighbours in self mode, M
in cross mode) and says so in a note; `check_memory` estimates the bytes the options need and
refuses, with both numbers, a run the machine cannot hold (a histogram of 2e9 bins, row lists
of 1e5 per row) instead of letting the kernel kill it an hour later.
"""
from __future__ import annotations

import os
from dataclasses import replace

from .config import PairwiseConfig

# Bins finer than float32's spacing near 1 (2**-24) hold nothing more: over the default cosine
# range (-1, 1) that is 2**25 bins; wider ranges of dot/euclidean get the same number.
MAX_BINS = 1 << 25
_PAIR_ENTRY = 24   # bytes per listed pair: value (8) + i (8) + j (8)
_ROW_ENTRY = 12    # bytes per row-list entry: value (4) + column (8)


def fit_to_input(cfg: PairwiseConfig, n: int, m: int | None) -> tuple[PairwiseConfig, list[str]]:
    """(cfg with the per-row lists lowered to the candidates a row has, the notes saying so, and
    the whole-matrix lists to the pair count); ValueError for bins over MAX_BINS."""
    if cfg.bins > MAX_BINS:
        raise ValueError(f"bins: at most {MAX_BINS:,} (finer than float32 resolves), got {cfg.bins:,}")
    # never to 0: a list asked for stays in the result (empty or padded), only shorter
    candidates = n - 1 if m is None else m
    per_row = max(candidates, 1)
    notes, lowered = [], {}
    for name in ("row_topk", "row_bottomk"):
        asked = getattr(cfg, name)
        if asked > per_row:
            lowered[name] = per_row
            what = "N - 1 (self mode)" if m is None else "M (cross mode: the second matrix's rows)"
            if n == 0:  # no rows, no lists to hold anything: nothing to say
                continue
            if candidates >= 1:
                notes.append(f"{name} {asked:,} lowered to {what} = {per_row:,}: a row has no more neighbours")
            else:
                notes.append(f"{name} {asked:,} lowered to 1: {what} = {candidates:,}, so the list holds "
                             "one padded slot (-1)")
    # whole-matrix lists hold at most every pair: lowering them changes no result, so no note
    pairs = max(n * (n - 1) // 2 if m is None else n * m, 1)
    for name in ("topk", "bottomk", "near_k", "outside_limit"):
        if getattr(cfg, name) > pairs:
            lowered[name] = pairs
    return (replace(cfg, **lowered) if lowered else cfg), notes


def _state_bytes(cfg: PairwiseConfig, n: int) -> dict[str, int]:
    """Bytes of one partial state, per option that sizes it."""
    return {"bins": (cfg.bins + 2) * 8 if cfg.bins else 0,
            "row_topk": n * cfg.row_topk * _ROW_ENTRY, "row_bottomk": n * cfg.row_bottomk * _ROW_ENTRY,
            "topk": cfg.topk * _PAIR_ENTRY, "bottomk": cfg.bottomk * _PAIR_ENTRY,
            "near_k": cfg.near_k * _PAIR_ENTRY,
            "outside_limit": cfg.outside_limit * _PAIR_ENTRY if cfg.outside else 0}


def estimate_bytes(cfg: PairwiseConfig, n: int, m: int | None, d: int, threads: int) -> int:
    """Bytes an all-pairs run holds at its peak, from its options and shape: one partial state
    per thread plus the merged one, the copy a checkpoint or the result makes, and the prepared
    input (compacted rows and packed panels)."""
    rows = n + (m or 0)
    state = sum(_state_bytes(cfg, n).values()) + (rows * 8 if cfg.outside else 0)  # + outside counts
    return (max(threads, 1) + 2) * state + 2 * rows * d * 4


def available_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: PairwiseConfig, n: int, m: int | None, d: int, threads: int | None = None) -> int:
    """The estimate of estimate_bytes; ValueError naming the largest option and both numbers when
    it exceeds the memory available now."""
    threads = threads or os.cpu_count() or 1
    need = estimate_bytes(cfg, n, m, d, threads)
    have = available_bytes()
    if have is not None and need > have:
        parts = _state_bytes(cfg, n)
        biggest = max(parts, key=parts.get)
        raise ValueError(f"{biggest}: this run needs about {need / 2**30:.1f} GiB ({threads} threads), "
                         f"the machine has {have / 2**30:.1f} GiB available; lower it")
    return need
