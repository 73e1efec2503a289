"""Running an engine over its tile schedule: chunks, progress, checkpoints, interruption.

The engine protocol (every backend): `num_tiles()`, `tile_pairs(begin, end)`, `tiles_done`,
`run(begin, end)` (tiles in order), `state() -> EngineState`, `load_state(EngineState)`.
"""
from __future__ import annotations

import time

from ..interrupts import interrupt_after
from ..io import checkpoint_lock
from ..progress import as_progress
from .checkpoint import checkpoint_seconds, load_checkpoint, save_checkpoint
from .state import EngineState, check_fits


def run_engine(engine, *, fp: str | None = None, checkpoint: str | None = None,
               progress=False, chunk_seconds: float = 2.0, should_stop=None) -> EngineState:
    """Run all tiles of `engine` in chunks; save after each chunk if `checkpoint` is set.

    Ctrl-C stops after the tile range in flight: the checkpoint then holds every finished
    chunk, so the next call with the same path resumes where this one stopped.
    """
    # one run at a time on PATH (PATH.lock, as `text` and `pairs-above` keep theirs): two had
    # both run in full, each saving over the other's progress
    with checkpoint_lock(checkpoint):
        return _run(engine, fp, checkpoint, progress, chunk_seconds, should_stop)


def _run(engine, fp, checkpoint, progress, chunk_seconds, should_stop) -> EngineState:
    total_tiles = engine.num_tiles()
    if checkpoint:
        chunk_seconds = checkpoint_seconds(chunk_seconds)
        saved = load_checkpoint(checkpoint, fp)
        if saved is not None:
            try:  # (the C++ engine's own import checks name no file: the path goes on here too)
                check_fits(saved, engine.state(), engine.cfg, total_tiles, engine.tile_pairs)
                engine.load_state(saved)
            except ValueError as exc:
                raise ValueError(f"checkpoint: {checkpoint}: {exc}; delete it or pass another path") from None
    done = int(engine.tiles_done)
    prog = as_progress(progress, "embgeom pairs")
    if done and prog.enabled:
        prog.stream.write(f"{prog.prefix}: {checkpoint} holds the finished run ({total_tiles:,} tiles)\n"
                          if done == total_tiles else
                          f"{prog.prefix}: resuming from {checkpoint}: {done:,} of {total_tiles:,} tiles done\n")
    total_pairs = engine.tile_pairs(0, total_tiles)
    resumed_pairs = engine.tile_pairs(0, done)
    try:
        with prog.bar(total_pairs, "pairs", unit="pair", unit_scale=True, initial=resumed_pairs) as bar:
            return _run_chunks(engine, fp, checkpoint, chunk_seconds, should_stop, bar, done, total_tiles)
    except KeyboardInterrupt as exc:
        if checkpoint:  # (what a caller's traceback ends with: what was kept, how to go on)
            exc.args = (f"interrupted: {int(engine.tiles_done):,} of {total_tiles:,} tiles are saved in "
                        f"{checkpoint}; the same call resumes from them",)
        raise


def _run_chunks(engine, fp, checkpoint, chunk_seconds, should_stop, bar, done, total_tiles) -> EngineState:
    chunk = 1
    calls = []  # (tiles, seconds) of the engine calls so far
    while done < total_tiles:
        begin, end = done, min(total_tiles, done + chunk)
        t0 = time.perf_counter()
        # a signal during the run (the C++ engine holds no GIL: Python sees it only when the call
        # returns) is raised once the finished range is saved; raised between the two, it had
        # lost that range, with EMBGEOM_CHECKPOINT_SECONDS=inf the whole run
        with interrupt_after():
            engine.run(begin, end)
            calls.append((end - begin, time.perf_counter() - t0))
            done = end
            if checkpoint:
                save_checkpoint(checkpoint, fp, engine.state())
        bar.update(engine.tile_pairs(begin, end))
        chunk = next_chunk(calls, chunk_seconds, total_tiles)
        if should_stop is not None and should_stop():
            break
    return engine.state()


def next_chunk(calls: list[tuple[int, float]], chunk_seconds: float, total_tiles: int) -> int:
    """Tiles for the next engine call, from the calls so far ((tiles, seconds), at least one):
    about chunk_seconds of work so progress and checkpoints stay frequent, and at least three
    times a call's fixed cost (its lists' set-up and merge), which the two latest calls of
    different sizes tell apart from the per-tile cost: taken as all per-tile, a fixed 1.4 s had
    held row top-2000 runs at a few tiles a call, mostly merging (over 100 s against 5 s)."""
    if chunk_seconds <= 0:  # (EMBGEOM_CHECKPOINT_SECONDS=0: one tile a call, each saved)
        return 1
    tiles, seconds = calls[-1]
    fixed, per_tile = 0.0, seconds / tiles
    sizes = [c for c, _ in calls]
    if len(set(sizes)) >= 2:
        (c1, t1), (c2, t2) = calls[-1], next(call for call in reversed(calls) if call[0] != tiles)
        slope = (t1 - t2) / (c1 - c2)
        if slope > 0:
            per_tile = slope
            fixed = max(0.0, t1 - slope * c1)
    want = max(chunk_seconds - fixed, 3 * fixed) / max(per_tile, 1e-6)   # (inf: all the rest)
    chunk = max(1, int(min(total_tiles, want)))
    if len(set(sizes)) < 2 and chunk <= tiles:  # a second size, to tell the fixed cost apart
        chunk = min(total_tiles, 2 * tiles)
    return chunk

