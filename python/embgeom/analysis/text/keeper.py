"""Keeping vectors while a corpus runs through a model (docs/metrics.md, kept vectors).

--keep cls writes DIR/cls.npy: (n_texts, L+1, D) float32, the [CLS] (first-token) hidden state at
every depth (depth 0 = embedding output), batch by batch into a memory-mapped .npy, so the corpus
is never in memory; --trajectories N keeps every real token's L+1 states for the first N texts
(DIR/trajectories.npz: states (n_tokens, L+1, D) float32, text, position, token).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil

import numpy as np
import torch

from ...engine.checkpoint import Resumable
from ...io import npy_header


class Keeper(Resumable):
    """Batch callback for trace(): writes [CLS] states to DIR/cls.npy and collects the token
    trajectories of the first `trajectories` texts. rows_path: where the [CLS] rows are written
    while the corpus runs (a checkpoint's PATH.cls.npy, which survives an interrupted run;
    default DIR/cls.npy); close() puts them in DIR/cls.npy."""

    not_saved = ("out_dir", "tokenizer", "cls", "rows_path", "rows_hash")
    fixed = ("n", "keep_cls", "shape", "max_traj")
    count = "done"

    def __init__(self, out_dir: str, n_texts: int, layers: int, hidden: int, *, keep_cls: bool,
                 trajectories: int, tokenizer, rows_path: str | None = None):
        self.out_dir, self.n, self.tokenizer = out_dir, n_texts, tokenizer
        self.keep_cls = keep_cls
        self.shape = (n_texts, layers + 1, hidden)
        self.rows_path = rows_path or os.path.join(out_dir, "cls.npy")
        self.cls = None   # the memory-mapped rows, opened at the first batch (or on restore)
        self.max_traj = trajectories
        self.traj: list[tuple[int, int, str, np.ndarray]] = []
        self.texts: list[str] = []
        self.done = 0
        # sha256 of the [CLS] rows written, in order: saved with the count, checked on resume
        # against the rows file (whose header alone had been checked: another run's rows, or
        # rows changed in place, had gone into cls.npy)
        self.rows_hash = hashlib.sha256()
        self.rows_sha256 = self.rows_hash.hexdigest()

    def update(self, batch) -> None:
        B = batch.mask.shape[0]
        if self.done + B > self.n:
            raise ValueError(f"texts: more texts than counted ({self.n})")
        if self.keep_cls:
            self._open()
            # (L+1, B, D) -> (B, L+1, D), one device->host copy per batch
            first = torch.stack([h[:, 0] for h in batch.hidden_states], 1).float().cpu().numpy()
            self.cls[self.done:self.done + B] = first
            self.rows_hash.update(np.ascontiguousarray(first).data)
        want = min(B, max(self.max_traj - self.done, 0))
        for i in range(want):
            m = batch.mask[i]
            states = torch.stack([h[i][m] for h in batch.hidden_states], 1).float().cpu().numpy()
            ids = batch.input_ids[i][m].tolist()
            toks = self.tokenizer.convert_ids_to_tokens(ids)
            for pos, (tok, s) in enumerate(zip(toks, states)):
                self.traj.append((self.done + i, pos, tok, s))
            self.texts.append(batch.texts[i])
        self.done += B

    def _open(self) -> None:
        """The rows file: a new one before the first row, the one a checkpoint's rows went to after."""
        if self.cls is not None:
            return
        if os.path.islink(self.rows_path):  # its target would be written, wherever it lies
            raise ValueError(f"checkpoint: {self.rows_path} is a link; the [CLS] rows are written only to a "
                             "file of their own: remove the link")
        if self.done == 0:
            cls = np.lib.format.open_memmap(self.rows_path, mode="w+", dtype=np.float32, shape=self.shape)
            self._reserve(cls, new=True)
            self.cls = cls
            return
        try:
            _check_rows_file(self.rows_path, self.shape)
            rows = np.lib.format.open_memmap(self.rows_path, mode="r+")
        except (OSError, ValueError) as exc:
            # (raised inside the checkpoint's restore, which names the checkpoint and what to do)
            raise ValueError(f"the [CLS] rows of the finished texts, {self.rows_path}, cannot be used "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
        self._reserve(rows, new=False)
        self.cls = rows

    def _reserve(self, rows: np.memmap, new: bool) -> None:
        """Allocate the rows file's blocks before any row is stored: the memory map's stores into
        a sparse file the disk cannot hold had ended the run with SIGBUS (no error, no message,
        exit 135). A disk too small is a ValueError naming the folder, at the first batch."""
        size = os.path.getsize(self.rows_path)
        try:
            with open(self.rows_path, "r+b") as f:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)   # (glibc emulates it where the file system cannot)
                elif new:  # (macOS: no fallocate; zeros written through the file, not the map)
                    f.seek(rows.offset)
                    zeros = bytes(1 << 20)
                    for at in range(rows.offset, size, len(zeros)):
                        f.write(zeros[:min(len(zeros), size - at)])
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            if new:
                with contextlib.suppress(OSError):
                    os.unlink(self.rows_path)
            where = "--checkpoint" if self.rows_path != os.path.join(self.out_dir, "cls.npy") else "--out"
            folder = os.path.dirname(os.path.abspath(self.rows_path))
            if where == "--out":  # (the run's hidden staging folder: its parent is the folder the user named)
                folder = os.path.dirname(folder)
            raise ValueError(f"{where}: the [CLS] rows ({size:,} bytes) cannot be written in {folder}: "
                             f"{exc.strerror or exc}") from None

    def checkpoint_state(self) -> dict:
        if self.cls is not None:
            self.cls.flush()   # the rows the saved count covers are on disk before the count is
        self.rows_sha256 = self.rows_hash.hexdigest()
        return super().checkpoint_state()

    def restore_state(self, saved: dict) -> None:
        super().restore_state(saved)
        if self.keep_cls and self.done:
            self._open()
            h = hashlib.sha256()
            for r0 in range(0, self.done, 1024):
                h.update(np.ascontiguousarray(self.cls[r0:min(self.done, r0 + 1024)]).data)
            if h.hexdigest() != self.rows_sha256:
                raise ValueError(f"the [CLS] rows of its {self.done:,} finished texts in {self.rows_path} are not "
                                 "the rows it saved (changed since, or another run's)")
            self.rows_hash = h

    def check_restored(self) -> None:
        # the trajectories of the first min(done, max_traj) texts, token by token: a crafted
        # file's extra texts or ids past them had gone into trajectories.npz and the report
        kept = min(self.done, self.max_traj)
        if not 0 <= self.done <= self.n or len(self.texts) != kept or not all(isinstance(t, str) for t in self.texts):
            raise ValueError(f"Keeper: {len(self.texts)} trajectory texts of {self.done} done, this run keeps {kept}")
        for t in self.traj:
            if not (isinstance(t, tuple) and len(t) == 4 and type(t[0]) is int and 0 <= t[0] < kept
                    and type(t[1]) is int and t[1] >= 0 and isinstance(t[2], str)
                    and isinstance(t[3], np.ndarray) and t[3].shape == self.shape[1:]):
                raise ValueError("Keeper: a trajectory step that is no token of the texts kept")

    def close(self) -> None:
        if self.keep_cls:
            if self.done != self.n:
                raise ValueError(f"texts: wrote {self.done} [CLS] rows, expected {self.n}")
            self._open()
            self.cls.flush()
            del self.cls
            self.cls = None
            out = os.path.join(self.out_dir, "cls.npy")
            if os.path.abspath(self.rows_path) != os.path.abspath(out):
                shutil.copyfile(self.rows_path, out)   # the checkpoint keeps its copy for a rerun
        if self.traj:
            np.savez(os.path.join(self.out_dir, "trajectories.npz"),
                     states=np.stack([t[3] for t in self.traj]).astype(np.float32),
                     text=np.array([t[0] for t in self.traj], dtype=np.int64),
                     position=np.array([t[1] for t in self.traj], dtype=np.int64),
                     token=np.array([t[2] for t in self.traj]), texts=np.array(self.texts))


def _check_rows_file(path: str, shape: tuple) -> None:
    """ValueError unless `path` is a float32 .npy of `shape` whose size covers every row (a
    memory map in r+ mode would grow a cut-short file with zeros)."""
    got_shape, fortran, dtype, need = npy_header(path)
    if tuple(got_shape) != tuple(shape) or dtype != np.float32 or fortran:
        raise ValueError(f"it holds {dtype} {tuple(got_shape)}, expected float32 {tuple(shape)}")
    if os.path.getsize(path) != need:
        raise ValueError(f"it has {os.path.getsize(path)} bytes, {need} expected (cut short?)")
