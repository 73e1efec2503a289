"""Running an engine over its tile schedule: chunks, progress, checkpoints, interruption.

The engine protocol (every backend): `num_tiles()`, `tile_pairs(begin, end)`, `tiles_done`,
`run(begin, end)` (tiles in order), `state() -> EngineState`, `load_state(EngineState)`.
"""
from __future__ import annotations

import os
import sys
import time

from .checkpoint import load_checkpoint, save_checkpoint
from .state import EngineState


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
               progress: bool = False, chunk_seconds: float = 2.0, should_stop=None) -> EngineState:
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
    done = int(engine.tiles_done)
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

