"""Reading (N, D) matrices from .npy, .pt and .safetensors files, and writing outputs so that no
reader ever sees a partial one: single files atomically (a unique temporary name in the target
folder, renamed into place), report folders staged in a fresh hidden folder, sealed with a
manifest and swapped in whole (`output_folder`); readers check the manifest (`check_complete`)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import stat
import tempfile
import warnings
from typing import IO, Iterable, Iterator

import numpy as np
import torch

from . import validation
from .formatting import counted, first_line
from .interrupts import output_complete

SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no getter elsewhere: read it by setting it, and put it back
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    return 0o666 & ~_umask()


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms where a folder cannot be opened: the rename is all we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(name: str, path: str, exc: OSError) -> ValueError:
    """The one-line ValueError for an OSError met writing `path` (the argument `name`'s output)."""
    folder = os.path.dirname(os.path.abspath(path))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder {folder} is not writable"
    elif exc.errno == errno.EISDIR:
        why = "it is a directory"
    else:
        why = exc.strerror or type(exc).__name__
    return ValueError(f"{name}: cannot write {path}: {why}")


def check_output_path(path: str, name: str = "output", *, inputs: Iterable[tuple[str, str | None]] = (),
                      own_folder: bool = False, stdout: bool = False, beside: Iterable[str] = ()) -> str:
    """The folder of an output file about to be written; ValueError (one line) when the folder is
    missing, `path` is a directory or something else that is no regular file (a device, a pipe,
    a dangling link: `--json /dev/null` had replaced the device; a link to a file is written
    through by atomic_write), it is one of the inputs ((argument name, path or None), ...:
    `pairs X.npy --json X.npy` had written over X), or (unless own_folder: the writer of that
    folder itself, as atomic_write is called) the folder is an embgeom output sealed by its
    manifest, or any folder above it is (`pairs --json DIR/manifest.json` had replaced a pairs
    folder's manifest; refuse_sealed_above). Commands call it before their work, atomic_write
    again. stdout: "-" is standard output (a --json that write_json writes there), checked no further.
    The folder must be writable (a read-only one had been found at the first save, after the model
    loaded). beside: suffixes of the files a run keeps next to `path` (a checkpoint's ".lock"): a
    name they would take past NAME_MAX is refused now (it had failed after the whole corpus)."""
    if stdout and path == "-":  # standard output (report.jsonout.write_json; `--json -`)
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{name}: cannot write {path}: it is a directory")
    if os.path.lexists(path) and not os.path.isfile(path):  # (a link to a regular file is written through)
        raise ValueError(f"{name}: cannot write {path}: it is not a regular file (a device, a pipe or a "
                         "dangling link is never replaced)")
    for what, given in inputs:
        if given and os.path.realpath(given) == os.path.realpath(path):
            raise ValueError(f"{name}: {path} is the {what} file this run reads; write elsewhere")
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: cannot write {path}: no such folder {folder}")
    # (own_folder: that folder is the writer's own; the folders above it are still checked)
    refuse_sealed_above(folder if own_folder else path, name)
    written = os.path.dirname(os.path.realpath(path)) if os.path.islink(path) else folder  # (a link's target)
    if not os.access(written, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {path}: the folder {written} is not writable")
    stem = os.fsencode(os.path.basename(path))
    longest = max((os.fsencode(s) for s in beside), key=len, default=b"")
    if len(stem) + len(longest) > NAME_MAX:
        raise ValueError(f"{name}: {path}: the name is too long for the file {os.fsdecode(longest)!r} kept beside it "
                         f"(at most {NAME_MAX - len(longest)} bytes, got {len(stem)})")
    return folder


def refuse_sealed_above(path: str, name: str) -> None:
    """ValueError (one line) when a folder above `path` (any level, `path` itself not counted) is
    an embgeom output sealed by its manifest: a file written there breaks its manifest, and a
    folder (a report, a pairs folder) written there went without a word when that output was
    written again (its swap replaces the folder whole)."""
    here = os.path.realpath(os.path.abspath(os.fspath(path)))
    folder = os.path.dirname(here)
    while folder != here:
        sealed = _sealed_folder(folder)
        if sealed:
            raise ValueError(f"{name}: {path} is inside {folder}, {sealed}, whose {MANIFEST} lists what it "
                             "holds (a run writing it again replaces it whole); write elsewhere")
        here, folder = folder, os.path.dirname(folder)


def json_line(line: str, where: str):
    """The JSON value of one line of a JSONL file; ValueError starting with `where` for anything
    json cannot read: a syntax error (its message and column), nesting past the parser's depth,
    or an integer of more digits than Python converts (4,300)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read") from None
    except ValueError as exc:
        raise ValueError(f"{where}: not readable JSON ({str(exc).split(';')[0]})") from None


# manifests and reports embgeom reads back are kilobytes to a few megabytes; a (sparse) file of
# gigabytes in their place had been read whole into memory before anything checked it
MAX_JSON_BYTES = 256 << 20


def read_json_file(path: str):
    """The JSON value of a file; ValueError when it cannot be read as JSON (also JSON nested past
    the parser's depth, a RecursionError there) or is larger than any embgeom writes."""
    validation.not_special_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= MAX_JSON_BYTES:
                return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    raise ValueError(f"{path}: {size:,} bytes, more than any JSON file embgeom writes ({MAX_JSON_BYTES:,}); "
                     "not read")


def _sealed_folder(folder: str) -> str | None:
    """What embgeom output `folder` is (a report folder, a pairs folder), by its manifest; None
    for any other folder."""
    path = os.path.join(folder, MANIFEST)
    try:
        m = read_json_file(path) if os.path.isfile(path) else None
    except ValueError:
        return None
    if not isinstance(m, dict):
        return None
    if m.get("format") == MANIFEST_FORMAT:
        return f"the report folder of `embgeom {m['command']}`" if m.get("command") else "an embgeom report folder"
    if m.get("kind") == "embgeom-pairs":  # (pair_shards.KIND: that module sits a layer above this one)
        return "a pairs_above folder"
    return None


def exclusive_lock(lock_path: str, busy: str, name: str) -> int | None:
    """An exclusive flock on lock_path (created) for one run, released when its fd is closed or
    the process ends, killed or not; ValueError(busy) when another run holds it, a ValueError
    naming the argument `name` when the file cannot be made; None where there is no flock
    (Windows: one run at a time is the user's to keep)."""
    try:
        import fcntl
    except ImportError:
        return None
    # O_NOFOLLOW: a lock file planted as a link would create or lock its target outside the folder
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise write_error(name, lock_path, exc) from None
        folder = os.path.dirname(os.path.abspath(lock_path))
        if exc.errno == errno.ENOENT and not os.path.isdir(folder):
            raise ValueError(f"{name}: no such folder {folder}") from None
        link = "; a link is never followed" if exc.errno == errno.ELOOP else ""
        raise ValueError(f"{name}: {lock_path} cannot be used as a lock file ({exc.strerror}{link})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(busy) from None
    return fd


def lock_checkpoint(checkpoint: str) -> int | None:
    """exclusive_lock on PATH.lock of a checkpoint PATH; a second run is refused naming the path."""
    return exclusive_lock(f"{checkpoint}.lock", f"checkpoint: {checkpoint} is in use by another run; wait for "
                          "it to finish, or pass another path", "checkpoint")


@contextlib.contextmanager
def checkpoint_lock(checkpoint: str | None) -> Iterator[None]:
    """One run at a time on a checkpoint PATH: exclusive_lock on PATH.lock for the body (nothing
    when checkpoint is None); a second run is refused naming the path."""
    fd = None if not checkpoint else lock_checkpoint(checkpoint)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, *, binary: bool = False, name: str = "output",
                 follow_link: bool = True) -> Iterator[IO]:
    """Open a unique temporary file beside `path` for writing; on a clean exit flush, fsync,
    rename it onto `path` and fsync the folder, so readers see the old file or the whole new
    one, never a partial one, and concurrent writers never share a temporary name. On any
    exception the temporary file is removed and nothing at `path` changes.

        with atomic_write("out.json") as f:
            f.write(text)

    ValueError (one line, naming `path`) when the folder is missing or not writable, or `path`
    is a directory; OSErrors while writing (disk full) become the same ValueError.
    A link at `path` has its target written (renamed over, the link had been replaced); with
    follow_link=False (files inside a folder embgeom owns, whose links only someone else can have
    planted there) it is refused, so that writing never reaches outside the folder.
    """
    path = os.fspath(path)
    if os.path.islink(path):
        if not follow_link:
            raise ValueError(f"{name}: {path} is a symbolic link, which embgeom never writes through in its "
                             "own folders; remove it (or use a new folder)")
        path = os.path.realpath(path)
    folder = check_output_path(path, name, own_folder=True)
    base = os.path.basename(path)
    _remove_orphans(folder, base, (".tmp",))
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(base), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise write_error(name, path, exc) from None
    try:
        # (a path the file system gave back undecoded, under a C locale, is written as its own bytes)
        text = {} if binary else {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, "wb" if binary else "w", **text) as f:
            os.fchmod(f.fileno(), _new_file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(name, path, exc) from None
        raise
    _fsync_dir(folder)


def savez_named(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """np.savez's file (uncompressed .npy members, np.load reads it) with the keys taken as
    given: np.savez(f, **arrays) takes a key "file" or "allow_pickle" as its own argument (a label
    named file had ended `text --class-maps` in an error after every forward pass; one named
    allow_pickle had been left out of the file)."""
    import zipfile

    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid: leave its files alone
    return True


# the longest name a folder entry may have (NAME_MAX on Linux and macOS), and what a temporary
# name adds to its stem: "." + "." + pid (at most 10 digits) + "-" + 6 (namespace) + "." + 8
# random + ".old.partial"
NAME_MAX = 255
_TEMP_NAME_EXTRA = 1 + 1 + 10 + 1 + 6 + 1 + 8 + len(".old.partial")


def _pid_namespace() -> str:
    """Six hex digits naming where this process's pid means something: the host and its pid
    namespace. A leftover of another (a container's writer on a shared folder, another host on
    a network file system) is never taken for a dead writer's: its pid is not visible here, and
    a live run's staging folder had been swept away as an orphan."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return hashlib.sha256(f"{socket.gethostname()}/{ns}".encode()).hexdigest()[:6]


def _temp_stem(base: str) -> str:
    """`base` as the stem of its temporary names (`.STEM.PID.RANDOM.tmp`): itself, or when that
    would pass NAME_MAX its start and a hash of it (a legal 240-byte name had been refused as
    "File name too long", blaming the user's name for the temporary one's length)."""
    raw = os.fsencode(base)
    if len(raw) + _TEMP_NAME_EXTRA <= NAME_MAX:
        return base
    keep = NAME_MAX - _TEMP_NAME_EXTRA - 9
    return os.fsdecode(raw[:keep]) + "~" + hashlib.sha256(raw).hexdigest()[:8]


def _temp_prefix(base: str) -> str:
    return f".{_temp_stem(base)}.{os.getpid()}-{_pid_namespace()}."


def _leftover_pid(entry: str, base: str, suffixes: tuple[str, ...]) -> int | None:
    """The writer's pid when `entry` is exactly a temporary name this module makes for `base`
    (`.BASE.PID-NS.RANDOM` + one of `suffixes`, RANDOM as tempfile draws it) and its writer ran
    where this process sees its pid (NS, _pid_namespace; names without one are of earlier
    versions), else None: the leftovers of `results` are never confused with those of
    `results.2`, nor a live writer's in another container or host with a dead one's."""
    pattern = (rf"\.{re.escape(_temp_stem(base))}\.(\d+)(?:-([0-9a-f]{{6}}))?\.[a-z0-9_]+"
               rf"(?:{'|'.join(re.escape(x) for x in suffixes)})")
    m = re.fullmatch(pattern, entry)
    if not m or (m.group(2) is not None and m.group(2) != _pid_namespace()):
        return None
    return int(m.group(1))


def _remove_orphans(folder: str, base: str, suffixes: tuple[str, ...]) -> None:
    """Remove `.BASE.PID.*SUFFIX` entries left in `folder` by killed writers (PID not running)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        pid = _leftover_pid(entry, base, suffixes)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            target = os.path.join(folder, entry)
            with contextlib.suppress(OSError):
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "embgeom-output-1"


def _sha256(path: str, *, fsync: bool = False) -> str:
    """The file's sha256; with fsync, also flushed to disk in the same pass (one open, one read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _read_manifest(folder: str) -> dict | None:
    """The folder's embgeom manifest; None when it has none; ValueError when it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = read_json_file(path)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict) \
            or not all(isinstance(e, dict) for e in manifest["files"].values()):
        raise ValueError(f"{path}: not a readable embgeom manifest")
    return manifest


def _unlisted(folder: str, manifest: dict) -> list[str]:
    """The entries of a sealed folder that its manifest does not list (relative paths, folders
    with a trailing /): files someone put there after the run, which a rerun's swap would delete."""
    listed = set(manifest["files"]) | {MANIFEST}
    parents = {p.rsplit("/", k)[0] for p in listed for k in range(1, p.count("/") + 1)}
    found = []
    for root, dirs, names in os.walk(folder):
        rel = os.path.relpath(root, folder).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        for d in list(dirs):
            if rel + d not in parents:
                found.append(rel + d + "/")
                dirs.remove(d)  # (its contents are that one entry)
        found += [rel + n for n in names if rel + n not in listed]
    return sorted(found)


def check_output_folder(out: str, name: str = "--out", *, command: str | None = None,
                        inputs: Iterable[tuple[str, str | None]] = ()) -> str:
    """The absolute path of a report folder about to be written; ValueError (one line) when it
    names a file, a folder holding files that no embgeom run sealed (they are never replaced),
    with command: a folder sealed by another command (`project` into a `text` report had replaced
    it whole), or with inputs ((argument name, path or None), ...): an input inside the folder,
    which the run's swap would delete (a corpus, `project DIR/cls.npy --out DIR`, a checkpoint).
    Commands call it before their work; output_folder calls it again."""
    if not str(os.fspath(out)).strip():
        raise ValueError(f"{name}: expected a folder path, got an empty one")
    path = os.path.normpath(os.path.abspath(os.fspath(out)))
    if os.path.islink(path):
        # a link to a folder: the run replaces the folder it names and the link stays (the
        # swap had renamed the link aside and put a folder in its place, the target unwritten)
        target = os.path.realpath(path)
        if not os.path.isdir(target):
            state = "a file" if os.path.exists(target) else "missing"
            raise ValueError(f"{name}: {out} is a link to {target}, which is {state}; expected a folder")
        path = target
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}: {out} is a file, expected a folder")
    with contextlib.suppress(OSError):  # (a working folder already deleted: nothing to keep)
        if _inside(os.getcwd(), path):
            raise ValueError(f"{name}: {out} holds the current folder, which the run's swap would leave "
                             "deleted under this shell; run from outside it or choose another folder")
    for what, given in inputs:
        if given and _inside(given, path):
            raise ValueError(f"{what}: {given} lies inside {name} {out}, which this run replaces whole; "
                             f"move it out or choose another {name}")
    refuse_sealed_above(path, name)
    if os.path.isdir(path) and os.listdir(path):
        try:
            manifest = _read_manifest(path)
        except ValueError:
            sealed = _sealed_folder(path)
            if sealed:  # (a pairs folder: its manifest is of another kind)
                what = f"`embgeom {command}`" if command else "a report"
                raise ValueError(f"{name}: {out} is {sealed}, which {what} would replace; choose another "
                                 "folder or remove it") from None
            raise ValueError(f"{name}: {out} holds files that no embgeom run wrote (its {MANIFEST} is not "
                             "one embgeom writes); choose a new or empty folder, or remove them") from None
        if manifest is None:
            raise ValueError(f"{name}: {out} holds files that no embgeom run wrote (no {MANIFEST}); "
                             "choose a new or empty folder, or remove them")
        extra = _unlisted(path, manifest)
        if extra:
            raise ValueError(f"{name}: {out} holds {counted(len(extra), 'entry', 'entries')} that the embgeom run "
                             f"which wrote it did not ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
                             "a run there would delete them: move them out, or choose another folder")
        if command is not None and manifest.get("command", command) != command:
            raise ValueError(f"{name}: {out} holds an `embgeom {manifest['command']}` report, which "
                             f"`embgeom {command}` would replace; choose another folder or remove it")
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise ValueError(f"{name}: cannot create {out}: {parent} is a file")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {out}: the folder {parent} is not writable")
    return path


def _inside(given: str, folder: str) -> bool:
    """Whether the path `given` is the folder `folder` or lies below it (links resolved)."""
    p, f = os.path.realpath(os.fspath(given)), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def output_folder(out: str, *, command: str, name: str = "--out") -> Iterator[str]:
    """Stage a report folder: yields a fresh hidden folder beside `out` to write every file into;
    on a clean exit seals it with manifest.json (each file's size and sha256) and swaps it in
    for `out` (a previous embgeom output there is replaced whole), so `out` holds one complete
    run or what it held before, never a mix or a partial run. On any exception (or a kill) the
    staged folder goes and `out` is untouched; folders this call created on the way are removed.

        with output_folder(args.out, command="text") as staging:
            write_json(os.path.join(staging, "report.json"), report)
    """
    path = check_output_folder(out, name, command=command)
    parent, base = os.path.split(path)
    created = []
    probe = parent
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    try:
        os.makedirs(parent, exist_ok=True)
        _restore_previous(parent, base)
        _remove_orphans(parent, base, (".partial", ".old.partial"))
        staging = tempfile.mkdtemp(prefix=_temp_prefix(base), suffix=".partial", dir=parent)
        os.chmod(staging, 0o777 & ~_umask())  # what mkdir gives; mkdtemp's is 0o700
    except OSError as exc:
        _remove_created(created)
        raise write_error(name, out, exc) from None
    try:
        yield staging
        _seal(staging, command)
        # again, just before the swap: what came there during the run (a pairs_above folder being
        # written, another command's report) is not replaced (it had been, both runs ending with 0)
        check_output_folder(out, name, command=command)
        if os.path.isdir(path):  # the folder keeps its permission bits
            os.chmod(staging, stat.S_IMODE(os.stat(path).st_mode))
        _swap_in(staging, path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        if isinstance(exc, OSError):
            raise write_error(name, out, exc) from None
        if isinstance(exc, ValueError):
            _name_the_folder(exc, staging, path, name)
        raise
    _fsync_dir(parent)
    output_complete()


def _name_the_folder(exc: ValueError, staging: str, path: str, name: str) -> None:
    """A writer's `NAME: cannot write FILE: why` about a file of the staging folder (a page
    writer's "output: cannot write .../.pr.9900.x.partial/projection.html") names the folder the
    user gave and its argument instead: the staging folder is gone by the time it is read."""
    message = str(exc.args[0]) if exc.args else ""
    m = re.fullmatch(r"[^:\n]*: cannot write (.*)", message, flags=re.S)
    if m and staging in m.group(1):
        exc.args = (f"{name}: cannot write {m.group(1).replace(staging, path)}",) + exc.args[1:]


def _remove_created(created: list[str]) -> None:
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _seal(staging: str, command: str) -> None:
    from .provenance import version

    files = {}
    for root, _dirs, names in os.walk(staging):
        for entry in sorted(names):
            full = os.path.join(root, entry)
            rel = os.path.relpath(full, staging).replace(os.sep, "/")
            files[rel] = {"bytes": os.path.getsize(full), "sha256": _sha256(full, fsync=True)}
    manifest = {"format": MANIFEST_FORMAT, "command": command, "embgeom": version(),
                "complete": True, "files": dict(sorted(files.items()))}
    with atomic_write(os.path.join(staging, MANIFEST)) as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


_RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two names in one step


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot (the caller then renames in two steps)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _restore_previous(parent: str, base: str) -> None:
    """When `base` is missing but a killed writer's aside folder (`.BASE.PID.*.old.partial`, PID
    not running) still holds the output it was replacing, put that output back: a kill between
    the two renames of a two-step swap must not lose it (the orphan sweep would delete it)."""
    path = os.path.join(parent, base)
    if os.path.lexists(path):
        return
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            pid = _leftover_pid(entry, base, (".old.partial",))
            previous = os.path.join(parent, entry, "previous")
            if pid is not None and not _pid_alive(pid) and os.path.isdir(previous):
                found.append((os.path.getmtime(previous), previous))
    for _, previous in sorted(found, reverse=True)[:1]:
        with contextlib.suppress(OSError):
            os.rename(previous, path)


def _swap_in(staging: str, path: str) -> None:
    """Put `staging` in place of `path`: where the system can, one atomic exchange of the two
    names (the old output then sits in `staging` and is removed); elsewhere an existing folder
    is first renamed aside, then removed (two writers racing each end with one whole run in
    place; a kill between the two renames is repaired by the next writer, _restore_previous)."""
    parent, base = os.path.split(path)
    if os.path.isdir(path) and not os.path.islink(path) and _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)
        return
    for _ in range(8):
        old = None
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=_temp_prefix(base), suffix=".old.partial", dir=parent)
            try:
                os.rename(path, os.path.join(old, "previous"))
            except FileNotFoundError:  # another writer moved it first
                pass
        try:
            os.rename(staging, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another writer swapped its run in meanwhile: move that one aside too
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, "other writers keep replacing it")


def check_complete(path: str, name: str) -> None:
    """ValueError (one line) when `path` is a file of an embgeom output that is partial (in a
    staging folder of a run that never finished) or stale (not the file the run's manifest
    sealed: changed, or left from another run). Files outside embgeom outputs pass."""
    folder = os.path.dirname(os.path.normpath(os.path.abspath(path)))
    here = os.path.basename(folder)
    if here.startswith(".") and here.endswith(".partial"):
        raise ValueError(f"{name}: {path} is in the staging folder of an embgeom run that did not "
                         "finish (partial output); rerun that command")
    manifest = _read_manifest(folder)
    if manifest is None:
        return
    entry = manifest["files"].get(os.path.basename(path))
    if entry is None:
        raise ValueError(f"{name}: {path} is not part of the embgeom run that wrote {MANIFEST} "
                         "beside it (stale or foreign file)")
    if os.path.getsize(path) != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
        raise ValueError(f"{name}: {path} changed after the embgeom run that wrote it finished "
                         f"(size or sha256 differs from {MANIFEST})")


def npy_header(path: str) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, bytes the file needs) of a .npy file's header; ValueError
    for a header numpy cannot read."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"an .npy version {version} header")
        shape, fortran, dtype = read_header[version](f)
        return tuple(shape), bool(fortran), dtype, f.tell() + math.prod(shape) * dtype.itemsize


def load_matrix(path: str, name: str = "X") -> torch.Tensor:
    """Load the tensor of a file (of several, the only (N, D) float one). A .npy file is read
    without pickles into one array of its own (native byte order, writable: a mapping of the
    file would fail later if the file were cut short under it)."""
    if not os.path.exists(path):
        raise ValueError(f"{name}: file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{name}: expected a file, got a directory: {path}")
    validation.not_special_file(path, name)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{name}: unsupported file type {suffix!r} for {path} (expected one of {', '.join(SUFFIXES)})")
    if suffix == ".npy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":  # else numpy calls any non-.npy bytes "pickled data"
                raise ValueError(f"{name}: {path} is not a .npy file (no NumPy header)")
        try:  # (what numpy's mapping says of these: "mmap length is greater than file size", ...)
            shape, _, dtype, need = npy_header(path)
        except ValueError as exc:
            raise ValueError(f"{name}: cannot read {path}: {first_line(exc)}") from None
        if dtype.kind != "f":
            raise ValueError(f"{name}: expected a float array in {path}, got dtype {dtype}")
        if os.path.getsize(path) < need:
            raise ValueError(f"{name}: {path} is cut short: its header says {shape} {dtype} ({need:,} bytes), "
                             f"the file has {os.path.getsize(path):,}")
    try:
        if suffix == ".npy":
            obj = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            with warnings.catch_warnings():  # (its pickle-protocol notes came before the one-line refusal)
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests weights_only=False, i.e. running the file: never quote it
        if "unsupported global" not in str(exc).lower():
            raise ValueError(f"{name}: cannot read {path}: not a tensor file torch can read safely "
                             "(corrupt, or not a .pt file)") from None
        raise ValueError(f"{name}: {path} holds pickled objects beyond plain tensors; refused for safety "
                         "(save a tensor or a dict of tensors, or use .npy / .safetensors)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{name}: cannot read {path}: {first_line(exc, typed=True)}") from None
    if isinstance(obj, np.ndarray):  # (a .npy file: its header's float dtype checked above)
        # the read-only mapping copied once, in native byte order (big-endian files converted):
        # a file cut short under the mapping would end the process, a copy fails at once
        return torch.from_numpy(obj.astype(obj.dtype.newbyteorder("="), copy=True))
    return _first_tensor(obj, name, path)


def _first_tensor(obj, name, path) -> torch.Tensor:
    """The file's tensor: the only one, or of several the only (N, D) float one. Several such
    are refused, naming them: the first by key order had been taken without a word (a
    .safetensors file's keys come sorted: its 20 queries analysed instead of its 200 rows)."""
    if isinstance(obj, torch.Tensor):
        found = obj
    else:
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
        if not tensors:
            raise ValueError(f"{name}: no tensor found in {path}")
        matrices = {k: v for k, v in tensors.items() if v.dim() == 2 and v.dtype.is_floating_point}
        if len(tensors) > 1 and len(matrices) != 1:
            shown = list((matrices or tensors).items())
            listed = ", ".join(f"{k!s} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in shown[:10])
            listed += f", ... {len(shown) - 10} more" if len(shown) > 10 else ""
            raise ValueError(f"{name}: {path} holds {len(tensors)} tensors, {len(matrices) or 'none'} of them "
                             f"(N, D) float ({listed}); save the one to analyse alone "
                             "(torch.save(tensor, ...) or numpy.save)")
        found = next(iter(matrices.values() if len(tensors) > 1 else tensors.values()))
    stored = found.untyped_storage().nbytes() // max(1, found.element_size())
    if found.numel() > stored:
        # an expanded view (stride 0) is saved as its few stored values: a 2 KB file read as a
        # 3,000,000-row matrix of one repeated row
        raise ValueError(f"{name}: {path} holds a {tuple(found.shape)} tensor stored as {stored:,} values (an "
                         "expanded view whose rows repeat); save tensor.contiguous() if those rows are meant")
    return found
