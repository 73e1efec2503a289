"""Fork safety of the OpenMP runtimes embgeom runs on: the C++ core's (GNU OpenMP, shared with
torch) and FAISS's own copy. GNU OpenMP cannot run a parallel region in a child forked after its
threads started: the child waits forever for threads the fork did not copy (os.fork, a fork
multiprocessing.Pool, a fork ProcessPoolExecutor). A child forked while its parent had more than
one thread therefore runs each runtime embgeom has loaded on one thread, as torch's DataLoader
workers do; spawn or forkserver children keep every core."""
from __future__ import annotations

import os
from typing import Callable

_registered: set[str] = set()
_parent_threads: list[int] = []


def _count_threads() -> None:
    try:
        _parent_threads[:] = [len(os.listdir("/proc/self/task"))]
    except OSError:  # (no /proc: assume the pools started)
        _parent_threads[:] = [2]


def one_thread_in_forked_children(runtime: str, set_threads: Callable[[int], None]) -> None:
    """Once per runtime name: a child forked while the parent had more than one thread calls
    set_threads(1) before anything else runs in it."""
    if runtime in _registered or not hasattr(os, "register_at_fork"):
        return
    if not _registered:
        os.register_at_fork(before=_count_threads)
    _registered.add(runtime)

    def in_child() -> None:
        if _parent_threads and _parent_threads[0] > 1:
            set_threads(1)

    os.register_at_fork(after_in_child=in_child)
