"""Resumable corpus runs: `trace(..., checkpoint=PATH)` and `embgeom text --checkpoint PATH`.

After a finished batch (at most every EMBGEOM_CHECKPOINT_SECONDS, default 60 s; on Ctrl-C; at
the end of the corpus) PATH holds the running sums of the trace and of every observer, and how
many texts they cover, in the checkpoint format of engine/checkpoint.py (no pickle; atomic
write; sha256; a fingerprint of the texts, the model's weights and tokenizer, the settings and
the arithmetic). A rerun of the same command skips the finished texts and continues with the
same batches, so its report equals an uninterrupted run's. Kept [CLS] rows are too large for
the state file: they go to PATH.cls.npy, flushed before each save.

Ctrl-C (or SIGTERM, a scheduler's stop) that arrives while a batch is being added to the sums
waits for the batch to finish (the sums are then whole and are saved); any other error inside
an update saves nothing, and the rerun starts from the last save; SIGKILL loses what came after
the last save.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from typing import Any, Iterator

from ...engine.checkpoint import checkpoint_seconds, restore_value
from ...formatting import first_line
from ..run_checkpoint import RunCheckpoint, model_digest, numerics
from .inputs import read_lines

DEFAULT_SECONDS = 60.0


def texts_digest(texts: Any) -> dict:
    """{"texts": count, "sha256": ...} over the texts trace() reads (a file's non-blank lines, a
    list's non-blank strings); an iterator cannot be read twice and is refused."""
    if isinstance(texts, (str, os.PathLike)):
        items: Any = read_lines(os.fspath(texts))
    elif isinstance(texts, (list, tuple)):
        items = (t for t in texts if isinstance(t, str) and t.strip())
    else:
        raise TypeError(f"checkpoint: needs texts as a list or a file path, got {type(texts).__name__} "
                        "(an iterator cannot be read again to resume)")
    h, n = hashlib.sha256(), 0
    for t in items:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
        n += 1
    return {"texts": n, "sha256": h.hexdigest()}


class BatchCheckpoint(RunCheckpoint):
    """A checkpoint saved after whole batches: `due` at most EMBGEOM_CHECKPOINT_SECONDS after the
    last save (the caller also saves on Ctrl-C and at the end); restoring into the run's live
    accumulators under `fitting`, whose failures are one line."""

    def __init__(self, path: str, identity: dict):
        super().__init__(path, identity)
        self.every = checkpoint_seconds(DEFAULT_SECONDS)
        self._last = time.monotonic()

    def save_value(self, value: Any) -> None:
        super().save_value(value)
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        """Anything a file can make a restore raise, as one line naming PATH."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - anything a file can make restore do: one line
            raise ValueError(f"checkpoint: {self.path} does not fit this run ({first_line(exc)}); delete it or "
                             "pass another path") from None

    @contextlib.contextmanager
    def blamed(self, resumed: bool) -> Iterator[None]:
        """Around the results of a run resumed from PATH: an error no state the run saved can
        cause (a division by a count of 0, an index past a list: sums of a crafted file that
        do not fit together) as one line naming PATH."""
        try:
            yield
        except (ArithmeticError, LookupError, AttributeError, TypeError, RuntimeError) as exc:
            if not resumed:
                raise
            raise ValueError(f"checkpoint: {self.path}: the run resumed from it failed "
                             f"({first_line(exc, typed=True)}); the sums it held do not fit together: delete it and rerun") from None


class TraceCheckpoint(BatchCheckpoint):
    """The checkpoint of one corpus run. identity: what the fingerprint hashes (for_trace builds
    it); extra: plain JSON values the command keeps beside the sums (e.g. --correct-only's
    selection), saved with them."""

    def __init__(self, path: str, identity: dict):
        super().__init__(path, identity)
        self.extra: dict = {}
        self.seconds_before = 0.0   # forward-pass seconds of the runs before this one
        self.resumed_texts = 0      # texts the saved sums covered when this run started
        self._saved: dict | None = None
        self._loaded = False

    @classmethod
    def for_trace(cls, path: str, model, tokenizer, texts, device, settings: dict) -> "TraceCheckpoint":
        identity = {"command": "text", "inputs": texts_digest(texts), "model": model_digest(model, tokenizer),
                    "settings": settings, "numerics": numerics(device)}
        return cls(path, identity)

    def load(self) -> dict | None:
        """The saved {"texts_done", "seconds", "objects", "extra"}, or None when there is none
        (read once; ValueError as load_checkpoint's for anything else)."""
        if not self._loaded:
            # one run at a time on PATH: a second (a requeued job while the first still runs)
            # would rewrite the [CLS] rows under the first one's feet
            value = self.load_value()
            self._loaded = True
            if value is not None:
                if not isinstance(value, dict) or set(value) != {"texts_done", "seconds", "objects", "extra"} \
                        or type(value["texts_done"]) is not int or value["texts_done"] < 0 \
                        or not isinstance(value["seconds"], (int, float)) or not 0 <= value["seconds"] < 1e12 \
                        or not isinstance(value["objects"], list) or not isinstance(value["extra"], dict):
                    self.not_ours()
                self._saved = value
                self.extra = dict(value["extra"])
                self.seconds_before = float(value["seconds"])
        return self._saved

    def restore(self, objects: list) -> int:
        """Put the saved sums into `objects` (built with this run's settings, in the same order);
        the number of texts they cover (0 when nothing was saved)."""
        saved = self.load()
        if saved is None:
            return 0
        if len(saved["objects"]) != len(objects):
            raise ValueError(f"checkpoint: {self.path} holds {len(saved['objects'])} accumulators, this run "
                             f"has {len(objects)}; delete it or pass another path")
        done = saved["texts_done"]
        with self.fitting():
            for i, (live, state) in enumerate(zip(objects, saved["objects"])):
                restore_value(live, state, f"accumulator {i}")
                if live.count is not None and getattr(live, live.count) != done:
                    raise ValueError(f"{type(live).__name__} counts {getattr(live, live.count)} texts, the "
                                     f"checkpoint {done}")
        self.resumed_texts = done
        return self.resumed_texts

    def save(self, texts_done: int, objects: list, seconds: float) -> None:
        self.save_value({"texts_done": int(texts_done), "seconds": self.seconds_before + seconds,
                         "objects": list(objects), "extra": self.extra})


class PairsCheckpoint(BatchCheckpoint):
    """`embgeom text --pairs` beside a corpus checkpoint PATH: PATH.pairs keeps the [CLS]
    differences of the finished pairs (trace.PairDiffs), saved like the corpus sums. Its own file
    and fingerprint (the pairs file's content, the model, --batch-size and --max-length, the
    arithmetic): the corpus sums do not depend on --pairs, so another pairs file reuses them."""

    def __init__(self, path: str, identity: dict):
        super().__init__(path, identity)
        self.resumed_pairs = 0   # pairs the saved sums covered when this run started

    def restore(self, acc) -> int:
        """Put the saved sums into `acc` (a PairDiffs of this run); the pairs they cover."""
        value = self.load_value()
        if value is None:
            return 0
        if not isinstance(value, dict) or set(value) != {"pairs"}:
            self.not_ours()
        with self.fitting():
            restore_value(acc, value["pairs"], "pairs")
            if type(acc.done) is not int or not 0 <= acc.done <= acc.n_pairs:
                raise ValueError(f"{acc.done!r} pairs done of {acc.n_pairs}")
        self.resumed_pairs = acc.done
        return acc.done

    def save(self, acc) -> None:
        self.save_value({"pairs": acc})
