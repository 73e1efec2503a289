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
# bytes per listed pair: a PairEntry (double value, float, int64 i, int64 j: 32) and the quarter
# more a long list stages its offers in (csrc/pairwise/lists.cpp); 24 had estimated about half
# of the peak measured for outside_limit=1e7
_PAIR_ENTRY = 40
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


_UNLIMITED = 1 << 60   # (cgroup v1 writes "no limit" as 2**63 less a page)


def memory_available() -> tuple[int | None, str]:
    """(bytes this process can still allocate, where that bound comes from): the least of the
    machine's MemAvailable, its cgroup's memory limit less the cgroup's usage (a container's, a
    scheduler's --mem: v2 memory.max, v1 memory.limit_in_bytes) and the address-space limit
    (ulimit -v) less this process's virtual size; (None, "") where none can be read. The
    machine's figure alone had let runs past a container's limit start, to be killed."""
    bounds: list[tuple[int, str]] = []
    meminfo = _read_keyed("/proc/meminfo")
    if "MemAvailable" in meminfo:
        bounds.append((meminfo["MemAvailable"], "the machine has"))
    else:
        try:
            bounds.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the machine has"))
        except (ValueError, OSError, AttributeError):
            pass
    room = _cgroup_room()
    if room is not None:
        bounds.append((room, "its memory limit (cgroup) leaves"))
    room = _address_space_room()
    if room is not None:
        bounds.append((room, "its address-space limit (ulimit -v) leaves"))
    if not bounds:
        return None, ""
    return min(bounds)


# answers smaller than this are not checked: reading /proc costs more than they risk
MEMORY_CHECK_FLOOR = 1 << 28


def free_memory(device=None) -> tuple[int | None, str]:
    """memory_available on the CPU; a CUDA device's free bytes (torch.cuda.mem_get_info)."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], f"{device} has"
    return memory_available()


def refuse_past_memory(need: float, message, device=None) -> None:
    """ValueError(message(need, free)) when `need` bytes pass what is free: need as "X GiB",
    free as "<where> Y GiB available" (memory_available's bound, or the device's); nothing
    below MEMORY_CHECK_FLOOR. One rule for the answers the arguments size (searches, knn,
    pair folders, text batches)."""
    if need < MEMORY_CHECK_FLOOR:
        return
    have, where = free_memory(device)
    if have is not None and need > have:
        raise ValueError(message(f"{need / 2**30:,.1f} GiB", f"{where} {have / 2**30:,.1f} GiB available"))


def _read_keyed(path: str) -> dict[str, int]:
    """'Key:  N kB' lines (/proc/meminfo, /proc/self/status) in bytes."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # ("max": no limit)


def _cgroup_room() -> int | None:
    """This process's cgroup memory limit less its usage, None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):   # v2
            names, roots = ("memory.max", "memory.current"), ["/sys/fs/cgroup" + path, "/sys/fs/cgroup"]
        elif "memory" in controllers.split(","):                                           # v1
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            roots = ["/sys/fs/cgroup/memory" + path, "/sys/fs/cgroup/memory"]
        else:
            continue
        for root in roots:   # (inside a container the cgroup's own folder is often the root)
            limit, used = (_read_int(os.path.join(root, name)) for name in names)
            if limit is not None and used is not None:
                return max(limit - used, 0) if limit < _UNLIMITED else None
    return None


def _address_space_room() -> int | None:
    """RLIMIT_AS less this process's virtual size, None without a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = _read_keyed("/proc/self/status").get("VmSize")
    return None if size is None else max(soft - size, 0)


def check_memory(cfg: PairwiseConfig, n: int, m: int | None, d: int, threads: int | None = None) -> int:
    """The estimate of estimate_bytes; ValueError naming the largest option and both numbers when
    it exceeds the memory available now."""
    threads = threads or os.cpu_count() or 1
    need = estimate_bytes(cfg, n, m, d, threads)
    if need < MEMORY_CHECK_FLOOR:  # (reading /proc and the cgroup was most of a tiny call's time)
        return need
    have, where = memory_available()
    if have is not None and need > have:
        parts = _state_bytes(cfg, n)
        biggest = max(parts, key=parts.get)
        raise ValueError(f"{biggest}: this run needs about {need / 2**30:.1f} GiB ({threads} threads), "
                         f"{where} {have / 2**30:.1f} GiB available; lower it")
    return need
