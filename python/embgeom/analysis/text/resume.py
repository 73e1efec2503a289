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
import json
import os
import signal
import threading
import time
from typing import Any, Iterator

import torch

from ...engine.checkpoint import Fingerprint, TreeState, load_checkpoint, restore_value, save_checkpoint
from ...io import check_output_path, exclusive_lock
from ...validation import optional_path
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


def file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model, tokenizer) -> dict:
    """The model's class, every parameter and buffer (name, dtype, shape, bytes) and the
    tokenizer's vocabulary and special tokens."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        c = t.detach().to("cpu").contiguous()
        h.update(f"{name} {c.dtype} {tuple(c.shape)}".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    tok = hashlib.sha256(f"{type(tokenizer).__name__}\n{vocab}\n{special}".encode()).hexdigest()
    return {"name": str(getattr(model.config, "_name_or_path", "")), "weights_sha256": h.hexdigest(),
            "tokenizer_sha256": tok}


def numerics(device: torch.device) -> dict:
    """What decides the floats of a run besides its inputs: torch and its CPU kernels, the C++
    core's kernels (EMBGEOM_CPU), the GPU."""
    from ...backends import registry

    out: dict = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cpu":
        out["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
        core = registry.cpp()
        if core is not None and hasattr(core, "cpu_info"):
            out.update({k: v for k, v in dict(core.cpu_info()).items()
                        if k not in ("cpu_features", "isa_supported", "cap")})
    elif device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


class TraceCheckpoint:
    """The checkpoint of one corpus run. identity: what the fingerprint hashes (for_trace builds
    it); extra: plain JSON values the command keeps beside the sums (e.g. --correct-only's
    selection), saved with them."""

    def __init__(self, path: str, identity: dict):
        self.path = optional_path(path, "checkpoint")
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint: {self.path} is a directory; pass a file path")
        check_output_path(self.path, "checkpoint")
        self._lock: int | None = None
        self.fp = Fingerprint(hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest())
        self.fp.identity = identity
        self.extra: dict = {}
        self.seconds_before = 0.0   # forward-pass seconds of the runs before this one
        self.resumed_texts = 0      # texts the saved sums covered when this run started
        self.every = _seconds_between_saves()
        self._last = time.monotonic()
        self._saved: dict | None = None
        self._loaded = False

    @classmethod
    def for_trace(cls, path: str, model, tokenizer, texts, device, settings: dict) -> "TraceCheckpoint":
        identity = {"command": "text", "inputs": texts_digest(texts), "model": model_digest(model, tokenizer),
                    "settings": settings, "numerics": numerics(device)}
        return cls(path, identity)

    def side_path(self, name: str) -> str:
        """A file kept beside the state (PATH.<name>), for data too large to rewrite at each save."""
        return f"{self.path}.{name}"

    def load(self) -> dict | None:
        """The saved {"texts_done", "seconds", "objects", "extra"}, or None when there is none
        (read once; ValueError as load_checkpoint's for anything else)."""
        if not self._loaded:
            # one run at a time on PATH: a second (a requeued job while the first still runs)
            # would rewrite the [CLS] rows under the first one's feet
            self._lock = exclusive_lock(f"{self.path}.lock", f"checkpoint: {self.path} is in use by another "
                                        "run; wait for it to finish, or pass another path")
            self._loaded = True
            saved = load_checkpoint(self.path, self.fp)
            if saved is not None:
                value = saved.value if isinstance(saved, TreeState) else None
                if not isinstance(value, dict) or set(value) != {"texts_done", "seconds", "objects", "extra"} \
                        or type(value["texts_done"]) is not int or value["texts_done"] < 0 \
                        or not isinstance(value["seconds"], (int, float)) or not 0 <= value["seconds"] < 1e12 \
                        or not isinstance(value["objects"], list) or not isinstance(value["extra"], dict):
                    raise ValueError(f"checkpoint: {self.path} is not the checkpoint of a corpus run; "
                                     "delete it or pass another path")
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
        try:
            for i, (live, state) in enumerate(zip(objects, saved["objects"])):
                restore_value(live, state, f"accumulator {i}")
                if live.count is not None and getattr(live, live.count) != done:
                    raise ValueError(f"{type(live).__name__} counts {getattr(live, live.count)} texts, the "
                                     f"checkpoint {done}")
        except Exception as exc:  # noqa: BLE001 - anything a file can make restore do: one line
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"checkpoint: {self.path} does not fit this run ({why}); delete it or "
                             "pass another path") from None
        self.resumed_texts = done
        return self.resumed_texts

    def save(self, texts_done: int, objects: list, seconds: float) -> None:
        save_checkpoint(self.path, self.fp, TreeState({
            "texts_done": int(texts_done), "seconds": self.seconds_before + seconds,
            "objects": list(objects), "extra": self.extra}))
        self._last = time.monotonic()

    def close(self) -> None:
        """Let another run use PATH (the process's end does it too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every


def _seconds_between_saves() -> float:
    text = os.environ.get("EMBGEOM_CHECKPOINT_SECONDS")
    if text is None:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"EMBGEOM_CHECKPOINT_SECONDS: expected seconds >= 0, got {text!r}")
    return value


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt(active: bool = True) -> Iterator[None]:
    """While a checkpoint can keep the finished work: SIGTERM (a scheduler's stop, `kill`) ends
    the run the way Ctrl-C does, so the sums are saved first. Main thread, default handler only."""
    if not active or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C (SIGINT), and SIGTERM under terminate_as_interrupt, during the block raise
    KeyboardInterrupt when the block ends, so running sums are never left half-updated. Only in
    the main thread and for those handlers (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupt}
    held = {sig: h for sig, h in ours.items() if signal.getsignal(sig) is h}
    got: list = []
    for sig in held:
        signal.signal(sig, lambda *_: got.append(True))
    try:
        yield
    finally:
        for sig, h in held.items():
            signal.signal(sig, h)
    if got:
        raise KeyboardInterrupt
