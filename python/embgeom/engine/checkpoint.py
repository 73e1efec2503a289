"""Checkpoints of a run: the state of finished tiles, tied to its input and settings.

Format 3 (docs/architecture.md, checkpoints), no pickle anywhere:

    EMBGEOM-CKPT3\\n
    {"fingerprint": ..., "identity": ..., "meta_bytes": A, "arrays_bytes": B, "sha256": ...}\\n   one JSON line
    A bytes of JSON: the payload's scalars (EngineState.to_record) and plain extras
    B bytes of .npz: the payload's arrays, stored uncompressed, read with allow_pickle=False

The header line is read and the fingerprint compared before a byte of the payload is parsed;
the sha256 covers the payload and finds a torn or truncated file (it is no defence against a
crafted one: that is what the absence of pickle is). Written with io.atomic_write (a unique
temporary name beside the file, fsync, rename, folder fsync), so a killed run leaves the
previous checkpoint or the new one, never a torn file. Older formats (pickled) are refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from typing import Any

import numpy as np
import torch

from ..io import atomic_write
from .config import PairwiseConfig
from .state import EngineState

MAGIC = b"EMBGEOM-CKPT3"
OLD_MAGICS = (b"EMBGEOM-CKPT1", b"EMBGEOM-CKPT2")
HEADER_KEYS = {"fingerprint", "meta_bytes", "arrays_bytes", "sha256"}
OPTIONAL_HEADER_KEYS = {"identity"}  # what the fingerprint hashes, readable (none in older files)
MAX_HEADER_BYTES = 16384


class Fingerprint(str):
    """The hex digest identifying a run (input, settings, the arithmetic that decides its floats),
    carrying the readable `identity` it hashes: the header keeps it, so a refusal names what
    differs."""

    identity: dict | None = None


def fingerprint(x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, backend: str, num_tiles: int,
                numerics: dict | None = None) -> Fingerprint:
    """Identifies input + settings + numerics (registry.numerics: the product kernel and its
    pass): a checkpoint from anything else is refused."""
    identity: dict = {"settings": cfg.describe(), "backend": backend, "tiles": num_tiles,
                      "numerics": numerics or {}}
    for name, t in (("x", x), ("y", y)):
        if t is None:
            identity[name] = None
            continue
        c = t.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(str(tuple(c.shape)).encode() + c.numpy().tobytes()).hexdigest()
        identity[name] = {"shape": list(c.shape), "sha256": digest}
    fp = Fingerprint(hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest())
    fp.identity = identity
    return fp


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(saved, now) -> list[str]:
    """What differs between a checkpoint's identity (read from its file: any JSON) and this
    run's, one phrase each: settings and numerics field by field, the inputs by shape or values."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key in ("settings", "numerics") and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{_name(k)} {_short(a.get(k))} then, {_short(b.get(k))} now"
                    for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        elif key in ("x", "y"):
            shape = lambda v: v.get("shape") if isinstance(v, dict) else None  # noqa: E731
            if a is None or b is None or shape(a) != shape(b):
                out.append(f"{key}: shape {_short(shape(a))} then, {_short(shape(b))} now")
            else:
                out.append(f"{key}: other values (same shape)")
        else:
            out.append(f"{_name(key)} {_short(a)} then, {_short(b)} now")
    return out


def _name(key) -> str:
    """A key read from a file, printable on one line: plain names as they are, others quoted."""
    key = str(key)
    return key if key.isidentifier() and key.isascii() else _short(key)


def encode_payload(payload: Any) -> tuple[bytes, bytes]:
    """(JSON bytes, .npz bytes) of an EngineState or of {"state": EngineState, **plain JSON values}."""
    if isinstance(payload, EngineState):
        state, extra, kind = payload, {}, "state"
    elif isinstance(payload, dict) and isinstance(payload.get("state"), EngineState):
        state, extra, kind = payload["state"], {k: v for k, v in payload.items() if k != "state"}, "dict"
    else:
        raise TypeError(f"checkpoint: payload must be an EngineState or a dict with one under 'state', "
                        f"got {type(payload).__name__}")
    meta, arrays = state.to_record()
    try:
        text = json.dumps({"payload": kind, "state": meta, "extra": extra}, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"checkpoint: payload extras must be plain JSON values ({exc})") from None
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return text.encode(), buf.getvalue()


def decode_payload(meta_bytes: bytes, arrays_bytes: bytes) -> Any:
    """The inverse of encode_payload; ValueError on anything it did not write."""
    meta = json.loads(meta_bytes.decode("utf-8"))
    if not isinstance(meta, dict) or set(meta) != {"payload", "state", "extra"} \
            or meta["payload"] not in ("state", "dict") or not isinstance(meta["extra"], dict):
        raise ValueError("unexpected payload description")
    if meta["payload"] == "state" and meta["extra"]:
        raise ValueError("extras beside a bare state")
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(arrays_bytes)) as zf:
        for info in zf.infolist():
            # np.savez stores members uncompressed: their sizes are bounded by the file's
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"unexpected array member {info.filename!r}")
            name = info.filename[:-len(".npy")]
            if name in arrays:
                raise ValueError(f"array {name!r} twice")
            with zf.open(info) as f:
                arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    state = EngineState.from_record(meta["state"], arrays)
    return state if meta["payload"] == "state" else {"state": state, **meta["extra"]}


def save_checkpoint(path: str, fp: str, payload: Any) -> None:
    """payload: an EngineState, or a dict holding one under "state" plus plain JSON values."""
    meta, arrays = encode_payload(payload)
    header = {"fingerprint": str(fp), "meta_bytes": len(meta), "arrays_bytes": len(arrays),
              "sha256": hashlib.sha256(meta + arrays).hexdigest()}
    if getattr(fp, "identity", None) is not None:
        header["identity"] = fp.identity
    header = json.dumps(header, sort_keys=True).encode()
    with atomic_write(path, binary=True, name="checkpoint") as f:
        f.write(MAGIC + b"\n" + header + b"\n")
        f.write(meta)
        f.write(arrays)


def _invalid(path: str, why: str) -> ValueError:
    return ValueError(f"checkpoint: {path} is not a valid embgeom checkpoint ({why}); delete it or pass another path")


def load_checkpoint(path: str, fp: str) -> Any | None:
    """The saved payload, None if there is no file; ValueError (one line) if it is not ours,
    of an old format, torn, or for another input or other settings."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint: {path} is a directory; pass a file path")
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            magic = f.readline(len(MAGIC) + 1)
            if magic.rstrip(b"\n") in OLD_MAGICS:
                raise ValueError(f"checkpoint: {path} is in an old embgeom format (pickled), which is unsafe "
                                 "to load and is refused; delete it and rerun")
            if magic != MAGIC + b"\n":
                raise _invalid(path, "bad header or checksum")
            line = f.readline(MAX_HEADER_BYTES + 1)
            header = _header(line)
            if header is None:
                raise _invalid(path, "bad header or checksum")
            if header["fingerprint"] != fp:
                if "identity" not in header:
                    raise ValueError(f"checkpoint: {path} was written by an older embgeom, which did not record "
                                     "the arithmetic its numbers came from, so it cannot be resumed; delete it "
                                     "and rerun")
                diff = differences(header["identity"], getattr(fp, "identity", None))
                what = f" ({'; '.join(diff)})" if diff else ""
                raise ValueError(f"checkpoint: {path} was written for another input or other settings{what}; "
                                 "delete it or pass another path")
            size = header["meta_bytes"] + header["arrays_bytes"]
            # compare with what the file holds before reading: a forged size allocates nothing
            body = f.read(size) if os.fstat(f.fileno()).st_size - f.tell() == size else b""
    except OSError as exc:
        raise ValueError(f"checkpoint: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(body) != size or hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise _invalid(path, "truncated or corrupt: size or checksum does not match")
    try:
        return decode_payload(body[:header["meta_bytes"]], body[header["meta_bytes"]:])
    except Exception as exc:  # noqa: BLE001 - anything in a payload we did not write: one line
        why = (str(exc).strip().splitlines() or [""])[0]
        raise _invalid(path, f"payload: {type(exc).__name__}: {why}") from None


def _header(line: bytes) -> dict | None:
    """The header line's JSON if it has exactly the expected keys and types, else None."""
    if not line.endswith(b"\n"):
        return None
    try:
        h = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # (a header nested past the parser's depth)
        return None
    if not isinstance(h, dict) or not HEADER_KEYS <= set(h) <= HEADER_KEYS | OPTIONAL_HEADER_KEYS \
            or not isinstance(h["fingerprint"], str) or not isinstance(h["sha256"], str) \
            or not isinstance(h.get("identity", {}), dict):
        return None
    for key in ("meta_bytes", "arrays_bytes"):
        if isinstance(h[key], bool) or not isinstance(h[key], int) or h[key] < 0:
            return None
    return h
