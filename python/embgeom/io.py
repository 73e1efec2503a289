"""Reading (N, D) matrices from .npy, .pt and .safetensors files, and writing single files
atomically (a unique temporary name in the target folder, renamed into place), with clear errors."""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import tempfile
from typing import IO, Iterator

import numpy as np
import torch

SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _new_file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no getter elsewhere: read it by setting it, and put it back
    os.umask(mask)
    return 0o666 & ~mask


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


def _write_error(name: str, path: str, exc: OSError) -> ValueError:
    folder = os.path.dirname(os.path.abspath(path))
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"the folder {folder} is not writable"
    elif exc.errno == errno.EISDIR:
        why = "it is a directory"
    else:
        why = exc.strerror or type(exc).__name__
    return ValueError(f"{name}: cannot write {path}: {why}")


def check_output_path(path: str, name: str = "output") -> str:
    """The folder of an output file about to be written; ValueError (one line) when the folder is
    missing or `path` is a directory. Commands call it before their work, atomic_write again."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{name}: cannot write {path}: it is a directory")
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: cannot write {path}: no such folder {folder}")
    return folder


@contextlib.contextmanager
def atomic_write(path: str, *, binary: bool = False, name: str = "output") -> Iterator[IO]:
    """Open a unique temporary file beside `path` for writing; on a clean exit flush, fsync,
    rename it onto `path` and fsync the folder, so readers see the old file or the whole new
    one, never a partial one, and concurrent writers never share a temporary name. On any
    exception the temporary file is removed and nothing at `path` changes.

        with atomic_write("out.json") as f:
            f.write(text)

    ValueError (one line, naming `path`) when the folder is missing or not writable, or `path`
    is a directory; OSErrors while writing (disk full) become the same ValueError.
    """
    path = os.fspath(path)
    folder = check_output_path(path, name)
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _write_error(name, path, exc) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            os.fchmod(f.fileno(), _new_file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(name, path, exc) from None
        raise
    _fsync_dir(folder)


def load_matrix(path: str, name: str = "X") -> torch.Tensor:
    """Load the (first) tensor of a file; .npy files are memory-mapped (no copy until used)."""
    if not os.path.exists(path):
        raise ValueError(f"{name}: file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{name}: expected a file, got a directory: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{name}: unsupported file type {suffix!r} for {path} (expected one of {', '.join(SUFFIXES)})")
    try:
        if suffix == ".npy":
            obj = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests weights_only=False, i.e. running the file: never quote it
        if "unsupported global" not in str(exc).lower():
            raise ValueError(f"{name}: cannot read {path}: not a tensor file torch can read safely "
                             "(corrupt, or not a .pt file)") from None
        raise ValueError(f"{name}: {path} holds pickled objects beyond plain tensors; refused for safety "
                         "(save a tensor or a dict of tensors, or use .npy / .safetensors)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{name}: cannot read {path}: {_first_line(exc)}") from None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise ValueError(f"{name}: expected a float array in {path}, got dtype {obj.dtype}")
        # memory-mapped arrays are read-only and torch needs a writable buffer in native byte
        # order: one copy does both (a big-endian file is converted, values unchanged)
        return torch.from_numpy(np.array(obj, dtype=obj.dtype.newbyteorder("=")))
    return _first_tensor(obj, name, path)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _first_tensor(obj, name, path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, torch.Tensor):
                return value
    raise ValueError(f"{name}: no tensor found in {path}")
