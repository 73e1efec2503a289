"""Pairs on disk: the folder `pairs_above` writes and `read_pairs` reads (docs/architecture.md,
pair folders).

A folder holds `manifest.json` and shards `pairs-000000.npy`, ... Each shard is one .npy of the
structured dtype (i int64, j int64, similarity float32), read with allow_pickle=False. Every
file is written with io.atomic_write (unique temporary name, rename). The manifest names the
input (a fingerprint of the stored rows, the metric and the threshold), the rows finished so
far, the shards with their pair counts, sizes and sha256, and `complete`. A killed run leaves the
manifest of its last finished block: a rerun with the same input continues after it, a rerun
with another input is refused, and `read_pairs` refuses a folder that is not complete, a manifest
that is not one this module writes, a shard whose bytes changed (sha256) and pairs outside
0 <= i < j < n or on the wrong side of the threshold. Nothing is written through a link in the
folder (io.atomic_write(follow_link=False)).
Memory stays independent of the pair count: pairs are flushed to a shard every
SHARD_PAIRS pairs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from io import BytesIO

import numpy as np

from . import validation
from .api_types import PathArg
from .interrupts import interrupt_after
from .io import atomic_write, exclusive_lock, read_json_file, refuse_sealed_above, write_error

# the metrics of an Index and of pairs_above, which the manifest records (index.py reads them
# from here: it sits a layer above this module)
PAIR_METRICS = ("cosine", "dot", "l2")

MANIFEST = "manifest.json"
KIND = "embgeom-pairs"
VERSION = 2             # 2: shards carry their sha256
PAIR_DTYPE = np.dtype([("i", "<i8"), ("j", "<i8"), ("similarity", "<f4")])
SHARD_PAIRS = 1 << 22   # pairs held in memory before a shard is written (80 MB)
# the most pairs, and bytes, a listed shard may have: a reader allocates no more than this for
# one (a forged manifest had made it read a 64 GiB sparse file whole before its checksum)
SHARD_PAIRS_LIMIT = SHARD_PAIRS  # (the default: tests lower SHARD_PAIRS at run time, not this)
SHARD_BYTES_LIMIT = SHARD_PAIRS_LIMIT * PAIR_DTYPE.itemsize + 4096  # (4096: the .npy header, at most)
SAVE_SECONDS = 30.0     # the manifest is brought up to date at least this often


SHARD_FILE = re.compile(r"pairs-[0-9]{6,}\.npy")


# rows a pairs folder can hold: a pair's int64 key i n + j (pair_keys) must not overflow
MAX_ROWS = math.isqrt(2**63 - 1)


def _shard_name(k: int) -> str:
    return f"pairs-{k:06d}.npy"


def _read_manifest(folder: str, arg: str) -> dict | None:
    """The folder's manifest (None: it has none); ValueError naming `arg` (the caller's argument)
    when it is damaged."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        m = read_json_file(path)
    except ValueError:
        raise ValueError(f"{arg}: {path} is damaged (not the JSON manifest of an embgeom pairs folder)") from None
    want = {"kind", "version", "fingerprint", "n", "d", "metric", "threshold", "rows_done",
            "complete", "count", "shards"}
    if not isinstance(m, dict) or m.get("kind") != KIND or set(m) != want:
        raise ValueError(f"{arg}: {path} is not the manifest of an embgeom pairs folder")
    if m["version"] != VERSION:
        raise ValueError(f"{arg}: {path} was written by pairs folder version {m['version']!r}; "
                         f"this version reads {VERSION}: write the pairs again into an empty folder")
    problem = _manifest_problem(m)
    if problem:
        raise ValueError(f"{arg}: {path} is damaged: {problem}; write the pairs again into an empty folder")
    return m


def saved_manifest(folder: str) -> dict | None:
    """What an earlier run left in `folder`, for a command's last line: its manifest, or None
    where there is none or it cannot be read (the run itself refuses a damaged one)."""
    try:
        return _read_manifest(folder, "--out")
    except (OSError, ValueError):
        return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_number(v) -> bool:
    """An int or float that is finite as a float (an int of 400 digits is not: math.isfinite had
    raised OverflowError on it)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _manifest_problem(m: dict) -> str | None:
    """What makes a manifest other than one ShardWriter writes (None: nothing): the reader trusts
    its counts, names and sizes only after this."""
    if not isinstance(m["fingerprint"], str) or not isinstance(m["metric"], str):
        return "fingerprint and metric must be strings"
    for key in ("n", "d", "rows_done", "count"):
        if not _is_int(m[key]) or m[key] < 0:
            return f"{key} must be an integer >= 0, got {m[key]!r}"
    if m["metric"] not in PAIR_METRICS:
        return f"metric must be one of {', '.join(PAIR_METRICS)}, got {m['metric']!r}"
    if not _finite_number(m["threshold"]):
        return f"threshold must be a finite number, got {str(m['threshold'])[:40]}"
    if m["n"] > MAX_ROWS:
        return f"n must be at most {MAX_ROWS:,}, got {m['n']}"
    if m["rows_done"] > m["n"]:
        return f"rows_done {m['rows_done']} > n {m['n']}"
    if not isinstance(m["complete"], bool) or (m["complete"] and m["rows_done"] != m["n"]):
        return "complete must be true or false, and true only with every row done"
    if not isinstance(m["shards"], list):
        return "shards must be a list"
    for k, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or set(s) != {"file", "count", "bytes", "sha256"}:
            return f"shard entry {k} must hold exactly file, count, bytes and sha256"
        if s["file"] != _shard_name(k):  # in order, each once
            return f"shard entry {k} names {s['file']!r}, expected {_shard_name(k)!r}"
        if not (_is_int(s["count"]) and 0 <= s["count"] <= SHARD_PAIRS_LIMIT
                and _is_int(s["bytes"]) and 0 <= s["bytes"] <= SHARD_BYTES_LIMIT):
            return (f"shard {s['file']}: count and bytes must be integers >= 0, at most "
                    f"{SHARD_PAIRS_LIMIT:,} pairs and {SHARD_BYTES_LIMIT:,} bytes")
        if not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
            return f"shard {s['file']}: sha256 must be 64 hex digits"
    if m["count"] != sum(s["count"] for s in m["shards"]):
        return f"count {m['count']} is not the sum of the shards' counts"
    return None


class ShardWriter:
    """Writes the pairs of one input into a folder, row block by row block (used by
    Index.pairs_above). `rows_done` says where a resumed run starts; `complete` that there is
    nothing to do."""

    def __init__(self, out, *, fingerprint: str, n: int, d: int, metric: str, threshold: float,
                 shard_pairs: int | None = None):
        if n > MAX_ROWS:
            raise ValueError(f"x: {n:,} rows; a pairs folder holds the pairs of at most {MAX_ROWS:,} rows")
        folder = os.path.abspath(validation.path(out, "out"))
        parent = os.path.dirname(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"out: {folder} exists and is not a folder")
        if os.path.islink(folder) and not os.path.exists(folder):  # (makedirs had said only "File exists")
            raise ValueError(f"out: {folder} is a link to {os.path.realpath(folder)}, which is missing; "
                             "expected a folder")
        if not os.path.isdir(parent):
            raise ValueError(f"out: cannot create {folder}: no such folder {parent}")
        refuse_sealed_above(folder, "out")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise write_error("out", folder, exc) from None
        self._lock = None
        self.folder = folder
        self.shard_pairs = min(SHARD_PAIRS if shard_pairs is None else shard_pairs, SHARD_PAIRS_LIMIT)
        self._refuse_foreign(_read_manifest(folder, "out"))
        self._lock = _lock_folder(folder)
        try:
            self._open(fingerprint=fingerprint, n=n, d=d, metric=metric, threshold=threshold)
        except BaseException:
            self.close()
            raise
        self._buf: list[np.ndarray] = []
        self._held = 0
        self._pending: list[dict] = []  # shards written since the manifest was last saved
        self._saved = time.monotonic()
        # what holds only whole rows (below self._taken): the first _whole_buf pieces of the
        # buffer and the first _whole_pending shards (save_progress keeps just those)
        self._taken = self.rows_done
        self._whole_buf = self._whole_pending = 0

    def _refuse_foreign(self, manifest: dict | None) -> None:
        """ValueError for a folder with files but no pairs manifest (`manifest`, as read; checked
        before a lock file is made in the folder)."""
        if manifest is None and any(not name.startswith(".") for name in os.listdir(self.folder)):
            raise ValueError(f"out: {self.folder} is not empty and holds no embgeom pairs manifest; "
                             "refusing to write into it (use an empty or new folder)")

    def _open(self, **mine) -> None:
        """Under the lock: a new manifest, or the one on disk when it is for this input and its
        shards are intact."""
        folder = self.folder
        old = _read_manifest(folder, "out")
        self._refuse_foreign(old)  # again: another writer may have come and gone meanwhile
        if old is None:
            self.manifest = {"kind": KIND, "version": VERSION, **mine, "rows_done": 0,
                             "complete": False, "count": 0, "shards": []}
            self._save()
        else:
            differ = [k for k, v in mine.items() if old[k] != v]
            if differ:
                raise ValueError(f"out: {folder} holds pairs of another input or settings "
                                 f"({', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'}); use an empty folder, "
                                 "or delete this one")
            # a resumed (or repeated) run builds on the shards listed: they must be the ones written
            for shard in old["shards"]:
                rows = _read_shard(folder, shard, "out")
                if rows is None:
                    raise ValueError(f"out: {folder}: shard {shard['file']} is missing or changed since the "
                                     "manifest was written, so the pairs there cannot be built on; delete the "
                                     "folder and run again")
                problem = _shard_problem(rows, shard, old)
                if problem:
                    raise ValueError(f"out: {folder}: shard {shard['file']} {problem}: the manifest is not "
                                     "the one written with it; delete the folder and run again")
            self.manifest = old

    @property
    def rows_done(self) -> int:
        return int(self.manifest["rows_done"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def _save(self) -> None:
        with atomic_write(os.path.join(self.folder, MANIFEST), name="out", follow_link=False) as f:
            json.dump(self.manifest, f, indent=1)

    def _flush(self, parts: list | None = None) -> None:
        """Write the buffer (or its first pieces `parts`) as the next shard. The buffer is emptied
        only once the shard is written and listed: an interrupt during the write leaves the pairs
        in the buffer for save_progress (emptied first, a SIGTERM in the write had lost them
        while the manifest counted their rows as done)."""
        whole = parts is None
        parts = self._buf if whole else parts
        if not parts or not sum(len(p) for p in parts):
            if whole:
                self._buf, self._held = [], 0
            return
        arr = np.concatenate(parts)
        arr = arr[_pair_order(pair_keys(arr["i"], arr["j"], self.manifest["n"]))]
        name = _shard_name(len(self.manifest["shards"]) + len(self._pending))
        with atomic_write(os.path.join(self.folder, name), binary=True, name="out", follow_link=False) as f:
            hashed = _HashingWriter(f)   # the sha256 of the bytes as they are written, not read back
            np.save(hashed, arr, allow_pickle=False)
        with interrupt_after():  # listed and taken out of the buffer together, never one alone
            self._pending.append({"file": name, "count": int(arr.shape[0]), "bytes": hashed.size,
                                  "sha256": hashed.digest.hexdigest()})
            if whole:
                self._buf, self._held = [], 0

    def add_rows(self, rows_done: int, pieces) -> None:
        """Take the pairs (i, j, similarity arrays) of every row below `rows_done` not yet
        taken (`pieces` may be a generator doing the work); the manifest is brought up to date
        when shards were written or SAVE_SECONDS passed. A shard written while these rows are
        still coming in (the memory bound) first gets the whole rows' pairs of before, alone, so
        that save_progress can keep them."""
        self._whole_buf, self._whole_pending = len(self._buf), len(self._pending)
        for i, j, v in pieces:
            whole = np.empty(len(i), PAIR_DTYPE)
            whole["i"], whole["j"], whole["similarity"] = i, j, v
            # taken in slices that fill the buffer to shard_pairs at most: no shard is larger
            rest = whole
            while len(rest):
                room = self.shard_pairs - self._held
                part, rest = rest[:room], rest[room:]
                self._buf.append(part)
                self._held += len(part)
                if self._held >= self.shard_pairs:
                    if self._whole_buf:
                        self._flush(self._buf[:self._whole_buf])
                        with interrupt_after():  # (the buffer and what marks its whole rows move together)
                            self._buf = self._buf[self._whole_buf:]
                            self._whole_buf, self._whole_pending = 0, len(self._pending)
                    self._flush()
        with interrupt_after():
            self._taken = rows_done
            self._whole_buf, self._whole_pending = len(self._buf), len(self._pending)
        if self._pending or time.monotonic() - self._saved >= SAVE_SECONDS:
            self._flush()
            self._commit(rows_done)

    def save_progress(self) -> None:
        """On an interrupt: the pairs of every whole row taken so far to shards and the manifest
        (rows_done = the last add_rows' that returned); those of rows still coming in are
        dropped (their shard files, if any, are overwritten or removed by the next run)."""
        if self.complete:
            return
        self._buf = self._buf[:self._whole_buf]
        self._pending = self._pending[:self._whole_pending]
        self._flush()
        self._commit(self._taken)

    def _commit(self, rows_done: int) -> None:
        m = self.manifest
        m["shards"] = m["shards"] + self._pending
        m["count"] = sum(s["count"] for s in m["shards"])
        m["rows_done"] = rows_done
        self._pending = []
        self._save()
        self._saved = time.monotonic()

    def finish(self) -> None:
        if not self.manifest["complete"]:
            self._flush()
        # shards of a killed run past its last manifest go before the folder is marked
        # complete: a complete folder lists every shard in it (read_pairs holds it to that)
        listed = {s["file"] for s in self.manifest["shards"] + self._pending}
        for name in os.listdir(self.folder):
            if SHARD_FILE.fullmatch(name) and name not in listed:
                os.unlink(os.path.join(self.folder, name))
        if not self.manifest["complete"]:
            self.manifest["complete"] = True
            self._commit(self.manifest["n"])
        self.close()

    def close(self) -> None:
        """Let other writers in (finish calls it; a failed run's caller too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


LOCK = ".lock"


def _lock_folder(folder: str) -> int | None:
    """One writer's run holds the folder (two writers would commit shards under the same names
    at different points)."""
    return exclusive_lock(os.path.join(folder, LOCK), f"out: {folder} is being written by another pairs_above "
                          "run; wait for it to finish, or use another folder", "out")


class _HashingWriter:
    """A file's writer that keeps the sha256 and size of what passes through it."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _read_shard(folder: str, shard: dict, arg: str) -> np.ndarray | None:
    """A listed shard's array, read once: None when the file is missing or its size or sha256 is
    not the manifest's. A file with the right bytes but not a shard's layout (which only a forged
    manifest lists) comes back as whatever .npy it is, for the caller's dtype and count checks;
    bytes that are no .npy: ValueError naming `arg` (the caller's argument)."""
    path = os.path.join(folder, shard["file"])
    if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
        return None
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        return None
    try:  # the array over the bytes read (np.load of a BytesIO would copy them: twice a shard)
        f = BytesIO(data)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version}, not one np.save writes for a shard")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        count = math.prod(shape)
        if len(data) - f.tell() != count * dtype.itemsize:
            raise ValueError(f"{len(data) - f.tell()} data bytes for {count} entries of {dtype}")
        a = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
        return a.reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:
        raise ValueError(f"{arg}: cannot read shard {path}: {exc}") from None


def _shard_problem(a: np.ndarray, shard: dict, m: dict) -> str | None:
    """What makes a shard's array other than the pairs ShardWriter writes for the manifest m
    (None: nothing): its layout and count, pairs outside 0 <= i < j < n or of rows not yet done
    (a resumed run would write them twice), similarities not finite or on the wrong side of the
    threshold (compared in float32, as they are stored: rounding keeps the order)."""
    if a.dtype != PAIR_DTYPE or a.shape != (shard["count"],):
        return f"holds {a.shape} {a.dtype}, the manifest says {shard['count']} pairs of {PAIR_DTYPE}"
    if not a.shape[0]:
        return None
    if not (a["i"].min() >= 0 and a["j"].max() < m["n"] and np.all(a["i"] < a["j"])):
        return f"holds pairs outside 0 <= i < j < n = {m['n']}"
    if int(a["i"].max()) >= m["rows_done"]:
        return f"holds pairs of rows the manifest counts as not done (rows_done {m['rows_done']:,})"
    with np.errstate(over="ignore"):  # (a threshold past float32's range is -inf or inf there)
        sim, threshold = a["similarity"], np.float32(m["threshold"])
    kept = sim <= threshold if m["metric"] == "l2" else sim >= threshold
    if not np.all(kept):  # (NaN fails both tests)
        bad = sim[~kept][0]
        return (f"holds a {'distance' if m['metric'] == 'l2' else 'similarity'} of {bad} "
                f"{'above' if m['metric'] == 'l2' else 'below'} the threshold {m['threshold']}"
                if np.isfinite(bad) else f"holds a similarity of {bad}")
    return None


def read_pairs(folder: PathArg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of a finished `pairs_above` folder -> (i (P,) int64, j (P,) int64,
    value (P,) float32: the similarity, or for metric "l2" the distance; the shards' field is
    named "similarity" for both), ordered by (i, j). ValueError (one line) on a folder that is
    missing, unfinished, or whose shards do not match its manifest (size, sha256, dtype, count;
    pairs outside 0 <= i < j < n)."""
    folder = os.path.abspath(validation.path(folder, "folder"))
    if not os.path.isdir(folder):
        raise ValueError(f"folder: {'not a folder' if os.path.exists(folder) else 'no such folder'}: {folder}")
    m = _read_manifest(folder, "folder")
    if m is None:
        raise ValueError(f"folder: {folder} has no {MANIFEST} (not written by embgeom.pairs_above)")
    if not m["complete"]:
        raise ValueError(f"folder: {folder} is unfinished ({m['rows_done']:,} of {m['n']:,} rows done); "
                         "run pairs_above again with the same input and threshold to finish it")
    listed = {s["file"] for s in m["shards"]}
    unlisted = sorted(name for name in os.listdir(folder) if SHARD_FILE.fullmatch(name) and name not in listed)
    if unlisted:
        raise ValueError(f"folder: {folder} is damaged: it holds {unlisted[0]}"
                         f"{f' and {len(unlisted) - 1} more shards' if len(unlisted) > 1 else ''}, which its "
                         f"{MANIFEST} does not list (a finished folder lists all of its shards); write the pairs again")
    total = int(m["count"])
    _check_read_memory(folder, total)
    # one key a pair (i n + j: the (i, j) order) and the similarities, filled shard by shard: the
    # pairs once in memory, and one shard (a list of shards, their concatenation and the fields'
    # copies had peaked at 3.6 times the pairs: 3.39 GiB for 50 million). A band's pairs span
    # several shards (a shard is written when the buffer fills mid-band), so a large folder is
    # put in (i, j) order after.
    n = int(m["n"])
    key = np.empty(total, np.int64)
    sim = np.empty(total, np.float32)
    at = 0
    for s in m["shards"]:
        path = os.path.join(folder, s["file"])
        a = _read_shard(folder, s, "folder")
        if a is None:
            raise ValueError(f"folder: {folder} is stale: shard {s['file']} is missing or changed since "
                             "the manifest was written; write the pairs again")
        problem = _shard_problem(a, s, m)  # (0 <= i < j < n first: the keys are then one to one)
        if problem:
            raise ValueError(f"folder: {folder} is damaged: shard {path} {problem}; write the pairs again")
        key[at:at + a.shape[0]] = pair_keys(a["i"], a["j"], n)
        sim[at:at + a.shape[0]] = a["similarity"]
        at += a.shape[0]
        del a
    if not bool(np.all(key[1:] > key[:-1])):
        order = _pair_order(key)
        key, sim = key[order], sim[order]
        del order
        twice = np.flatnonzero(key[1:] == key[:-1])
        if twice.size:
            i, j = divmod(int(key[twice[0]]), n)
            raise ValueError(f"folder: {folder} is damaged: the pair ({i}, {j}) is in it "
                             f"{'twice' if twice.size == 1 else 'more than once'} "
                             f"({twice.size:,} repeated pairs); write the pairs again")
    key_i = key // n
    key -= key_i * n  # (now j, in place: no third int64 array)
    return key_i, key, sim


def pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """One int64 a pair that orders pairs as (i, j) does: i n + j (0 <= i, j < n <= MAX_ROWS)."""
    key = i.astype(np.int64)
    key *= n
    key += j
    return key


def _pair_order(key: np.ndarray) -> np.ndarray:
    """The permutation that sorts `key`: a stable sort (timsort), which merges the sorted runs
    that shards and a band's score blocks arrive in (lexsort of (j, i) took 7 s for 24 million
    pairs in 12 shards, this 1.7 s)."""
    return np.argsort(key, kind="stable")


# bytes per pair while read_pairs runs: the keys and similarities (12), and while they are put in
# (i, j) order the sort's permutation and one array's copy at a time (28 at the peak), then the
# arrays it returns (20) beside the keys
READ_BYTES_PER_PAIR = 48


def _check_read_memory(folder: str, count: int) -> None:
    """ValueError naming folder when its pairs outgrow the memory free, before any is read."""
    from .engine.limits import refuse_past_memory

    refuse_past_memory(count * READ_BYTES_PER_PAIR + SHARD_PAIRS * PAIR_DTYPE.itemsize, lambda need, free: (
        f"folder: {folder} holds {count:,} pairs; reading them needs about {need}, {free}: read its shards "
        f"one at a time (numpy.load of each pairs-NNNNNN.npy its {MANIFEST} lists) or raise the threshold"))
