"""Checkpoints of a run: the state of finished tiles, tied to its input and settings.

Format 3 (docs/architecture.md, engine state), no pickle anywhere:

    EMBGEOM-CKPT3\\n
    {"fingerprint": ..., "identity": ..., "meta_bytes": A, "arrays_bytes": B, "sha256": ...}\\n   one JSON line
    A bytes of JSON: the payload's scalars (EngineState.to_record) and plain extras, or a
                     tree of accumulators (TreeState: `embgeom text --checkpoint`)
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
import math
import re
import os
import zipfile
from typing import Any

import numpy as np
import torch

from .. import validation
from ..formatting import first_line
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
                numerics: dict | None = None, distributed: dict | None = None) -> Fingerprint:
    """Identifies input + settings + numerics (registry.numerics: the product kernel and its
    pass) and, for a rank of a distributed run, its place (world_size, row_groups, rank): a
    checkpoint from anything else is refused."""
    identity: dict = {"settings": cfg.describe(), "backend": backend, "tiles": num_tiles,
                      "numerics": numerics or {}}
    if distributed is not None:
        identity["distributed"] = distributed
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


def checkpoint_seconds(default: float) -> float:
    """The time between checkpoint saves: EMBGEOM_CHECKPOINT_SECONDS (seconds >= 0; 0: after
    every chunk or batch; inf: only at the end and on an interrupt), else default; a ValueError
    naming the variable for anything else (one rule for `pairs` and `text`)."""
    text = os.environ.get("EMBGEOM_CHECKPOINT_SECONDS")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0.0:  # (NaN fails too)
        raise ValueError(f"EMBGEOM_CHECKPOINT_SECONDS: expected seconds >= 0 (inf: save at the end and on "
                         f"an interrupt only), got {text!r}")
    return value


def differences(saved, now) -> list[str]:
    """What differs between a checkpoint's identity (read from its file: any JSON) and this
    run's, one phrase each: settings and numerics field by field, the inputs by shape or values."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return []
    # (this run's identity as its file holds it: a tuple is then a list, and equal to it)
    now = json.loads(json.dumps(now, default=str))
    if run_kind(saved) != run_kind(now):   # another command's checkpoint: that alone, not every field of both
        return [f"the checkpoint of {run_kind(saved)}, this is {run_kind(now)}"]
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key in ("settings", "numerics", "distributed") and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{_name(k)} {_short(a.get(k))} then, {_short(b.get(k))} now"
                    for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        elif key in ("inputs", "model") and isinstance(a, dict) and isinstance(b, dict):
            # contents by their digests: name the part that differs (texts, labels, weights, ...)
            out += [f"{key}: {_name(k)} differs" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        elif key in ("x", "y"):
            shape = lambda v: v.get("shape") if isinstance(v, dict) else None  # noqa: E731
            if a is None or b is None or shape(a) != shape(b):
                out.append(f"{_name(key)}: shape {_short(shape(a))} then, {_short(shape(b))} now")
            else:
                out.append(f"{_name(key)}: other values (same shape)")
        else:
            out.append(f"{_name(key)} {_short(a)} then, {_short(b)} now")
    return list(dict.fromkeys(out))  # (a field in both settings and numerics, e.g. the backend: once)


def run_kind(identity: dict) -> str:
    """Which kind of run an identity is of (all-pairs identities name no command)."""
    command = identity.get("command")
    if command is None:
        return "an all-pairs run (pairwise_stats)"
    # a command and its options as written ("text --pairs"); anything else read from a file quoted
    text = str(command)
    plain = re.fullmatch(r"[a-z][a-z0-9-]*( --[a-z][a-z0-9-]*)*", text) is not None
    return f"an `embgeom {text if plain else _short(text)}` run"


def _name(key) -> str:
    """A key read from a file, printable on one line: plain names as the caller calls them (a
    command's flag: validation.caller_name), others quoted."""
    key = str(key)
    return validation.caller_name(key) if key.isidentifier() and key.isascii() else _short(key)


class Resumable:
    """Mixin of an accumulator a checkpoint can keep: every attribute except those named in
    `not_saved` (references to the model, tokenizer, hooks, scratch buffers: the resumed run
    builds them again). restore_state puts a saved state back into an object built with the
    same settings: only attributes the object has, each of the kind it holds (a tensor of the
    same shape and dtype, a dict, a number, ...), the `fixed` ones (its settings) equal to its
    own. `count`: the attribute counting the texts it has seen, checked against the run's."""

    not_saved: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    count: str | None = None

    def checkpoint_state(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in self.not_saved}

    def restore_state(self, saved: dict) -> None:
        live = self.checkpoint_state()
        name = type(self).__name__
        for key, value in saved.items():
            if key not in live:   # only data attributes this object has: never a method or a new name
                raise ValueError(f"field {_short(key)} of {name} is not saved by embgeom")
            if key in self.fixed and not _same(value, live[key]):
                raise ValueError(f"{name}.{key} {_short(_plain(value))} saved, this run has {_short(_plain(live[key]))}")
        missing = sorted(set(live) - set(saved))
        if missing:
            raise ValueError(f"{name}: fields {', '.join(missing)} missing")
        for key, value in saved.items():
            setattr(self, key, restore_value(live[key], value, f"{name}.{key}"))
        self.check_restored()

    def check_restored(self) -> None:
        """ValueError when the restored fields do not fit together (a subclass checks what its
        free-form fields must hold: lists of samples, their ids)."""


def _plain(v):
    return sorted(v) if isinstance(v, (set, frozenset)) else list(v) if isinstance(v, tuple) else v


def _same(a, b) -> bool:
    try:
        return bool(_plain(a) == _plain(b)) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - arrays and other values without a plain ==: not settings
        return False


def _kind(v) -> str:
    """The kind a restored value must share with the live one."""
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return "number"
    for t in (torch.Tensor, np.ndarray, str, dict, list, tuple, set, Resumable, SavedObject):
        if isinstance(v, t):
            return "object" if t in (Resumable, SavedObject) else t.__name__
    return type(v).__name__


def check_samples(samples, limit: int, seen: int, text_ids: list[int] | None, name: str,
                  keys: tuple[str, ...]) -> None:
    """ValueError unless `samples` (kept maps of some texts) are at most `limit` dicts with the
    keys `keys`, each of a text id "text" of the `seen` texts traced (their corpus ids text_ids
    where a selection was traced), ids in increasing order (a crafted file's ids reached
    report.html and file names)."""
    seen = seen if text_ids is None else max(text_ids, default=-1) + 1
    if not isinstance(samples, list) or len(samples) > limit:
        raise ValueError(f"{name}: {len(samples) if isinstance(samples, list) else 'no list of'} samples, "
                         f"this run keeps at most {limit}")
    last = -1
    for sm in samples:
        if not isinstance(sm, dict) or set(sm) != set(keys) or not _is_int(sm["text"]) \
                or not last < sm["text"] < seen:
            what = f"text {_short(sm.get('text'))}" if isinstance(sm, dict) else type(sm).__name__
            raise ValueError(f"{name}: a sample is not the map of a text seen ({what}, {seen} texts seen)")
        last = sm["text"]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class SavedObject:
    """A Resumable's fields as read from a checkpoint (restore_value puts them into a live object)."""

    def __init__(self, kind: str, fields: dict):
        self.kind, self.fields = kind, fields


class TreeState:
    """A checkpoint payload of plain values, tensors, arrays and Resumable objects, nested in
    dicts, lists and tuples (encode_tree lists what it takes)."""

    def __init__(self, value: Any):
        self.value = value


def encode_tree(value: Any) -> tuple[Any, dict]:
    """(a JSON value, {name: array}): tensors and numpy arrays / scalars become references to
    arrays; tuples, sets and dicts with keys other than plain strings become tagged lists;
    Resumable objects their class name and checkpoint_state(). TypeError on anything else."""
    arrays: dict = {}

    def array(tag: str, a: np.ndarray) -> dict:
        name = f"a{len(arrays)}"
        arrays[name] = a
        return {tag: name}

    def enc(v, where):
        if isinstance(v, np.generic):   # before float: numpy's float64 is a float
            return array("$scalar", np.asarray(v))
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            if v.dtype not in _TENSOR_DTYPES:
                raise TypeError(f"checkpoint: cannot save the {v.dtype} tensor at {where}")
            return array("$tensor", v.detach().cpu().numpy())
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise TypeError(f"checkpoint: cannot save the object array at {where}")
            return array("$array", v)
        if isinstance(v, tuple):
            return {"$tuple": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, (set, frozenset)):
            return {"$set": [enc(x, where) for x in sorted(v, key=repr)]}
        if isinstance(v, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: enc(x, f"{where}.{k}") for k, x in v.items()}
            return {"$dict": [[enc(k, where), enc(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if isinstance(v, Resumable):
            return {"$object": type(v).__name__, "fields": enc(v.checkpoint_state(), type(v).__name__)}
        raise TypeError(f"checkpoint: cannot save the {type(v).__name__} at {where}")

    return enc(value, "state"), arrays


_TENSOR_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.float32, torch.float64)
_TAGS = {"$tensor", "$array", "$scalar", "$tuple", "$set", "$dict", "$object"}


def decode_tree(value: Any, arrays: dict) -> Any:
    """The inverse of encode_tree (Resumable objects come back as SavedObject); ValueError on
    anything it does not write. Builds plain values only: nothing in the file names code."""
    used: set = set()

    def ref(name):
        if not isinstance(name, str) or name not in arrays or name in used:
            raise ValueError(f"bad array reference {name!r}")
        used.add(name)
        return arrays[name]

    def dec(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            raise ValueError(f"unexpected {type(v).__name__}")
        tags = _TAGS & set(v)
        if not tags:
            return {k: dec(x) for k, x in v.items()}
        tag = tags.pop()
        if set(v) != ({tag, "fields"} if tag == "$object" else {tag}):
            raise ValueError(f"unexpected keys beside {tag}")
        body = v[tag]
        if tag == "$tensor":
            return torch.from_numpy(ref(body))
        if tag == "$array":
            return ref(body)
        if tag == "$scalar":
            a = ref(body)
            if a.ndim:
                raise ValueError("a scalar with dimensions")
            return a[()]
        if tag == "$object":
            fields = dec(v["fields"])
            if not isinstance(body, str) or not isinstance(fields, dict):
                raise ValueError("bad saved object")
            return SavedObject(body, fields)
        if not isinstance(body, list):
            raise ValueError(f"{tag} of a {type(body).__name__}")
        if tag == "$tuple":
            return tuple(dec(x) for x in body)
        if tag == "$set":
            return set(dec(x) for x in body)
        if not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise ValueError("$dict entries are not pairs")
        return {dec(k): dec(x) for k, x in body}

    out = dec(value)
    if used != set(arrays):
        raise ValueError("arrays no value refers to")
    return out


def restore_value(live: Any, saved: Any, where: str) -> Any:
    """`saved` (decode_tree's) put in the place of `live`: a SavedObject into the live Resumable
    of its class (in place), a tensor onto the live tensor's device (same shape and dtype),
    dicts key by key (the same keys); anything else as saved, if of the live value's kind."""
    if isinstance(saved, SavedObject):
        if not isinstance(live, Resumable) or type(live).__name__ != saved.kind:
            raise ValueError(f"{where} holds a {saved.kind}, this run has {type(live).__name__}")
        live.restore_state(saved.fields)
        return live
    if live is not None and saved is not None and _kind(live) != _kind(saved):
        raise ValueError(f"{where}: a {_kind(saved)} saved, this run has a {_kind(live)}")
    if saved is None and live is not None and not isinstance(live, (dict, list)):
        raise ValueError(f"{where}: nothing saved, this run has a {_kind(live)}")
    if _is_int(live) and not _is_int(saved) and saved is not None:
        raise ValueError(f"{where}: {_short(saved)} saved, this run counts in integers")
    if _is_int(live) and live >= 0 and saved < 0:
        # (a fresh object's counts start at 0 and only grow)
        raise ValueError(f"{where}: {saved} saved, a count is never negative")
    if isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor):
        if saved.shape != live.shape or saved.dtype != live.dtype:
            raise ValueError(f"{where}: {saved.dtype} {list(saved.shape)} saved, this run has "
                             f"{live.dtype} {list(live.shape)}")
        return saved.to(live.device)
    if isinstance(saved, dict) and isinstance(live, dict):
        if live and set(saved) != set(live):   # (an empty live dict fills as the run goes: class maps)
            raise ValueError(f"{where}: keys {_short(sorted(map(str, saved)))} saved, this run has "
                             f"{_short(sorted(map(str, live)))}")
        return {k: restore_value(live.get(k), v, f"{where}[{k!r}]") for k, v in saved.items()}
    if isinstance(saved, list) and isinstance(live, list) and len(saved) == len(live):
        return [restore_value(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(live, saved))]
    return saved


def encode_payload(payload: Any) -> tuple[bytes, bytes]:
    """(JSON bytes, .npz bytes) of an EngineState, of {"state": EngineState, **plain JSON values}
    or of a TreeState."""
    if isinstance(payload, TreeState):
        tree, arrays = encode_tree(payload.value)
        text = json.dumps({"payload": "tree", "tree": tree}, allow_nan=True)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return text.encode(), buf.getvalue()
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
    if isinstance(meta, dict) and meta.get("payload") == "tree":
        if set(meta) != {"payload", "tree"}:
            raise ValueError("unexpected payload description")
        return TreeState(decode_tree(meta["tree"], _read_arrays(arrays_bytes)))
    if not isinstance(meta, dict) or set(meta) != {"payload", "state", "extra"} \
            or meta["payload"] not in ("state", "dict") or not isinstance(meta["extra"], dict):
        raise ValueError("unexpected payload description")
    if meta["payload"] == "state" and meta["extra"]:
        raise ValueError("extras beside a bare state")
    state = EngineState.from_record(meta["state"], _read_arrays(arrays_bytes))
    return state if meta["payload"] == "state" else {"state": state, **meta["extra"]}


def _read_arrays(arrays_bytes: bytes) -> dict:
    arrays: dict = {}
    with zipfile.ZipFile(io.BytesIO(arrays_bytes)) as zf:
        for info in zf.infolist():
            # np.savez stores members uncompressed: their sizes are bounded by the file's
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                raise ValueError(f"unexpected array member {info.filename!r}")
            name = info.filename[:-len(".npy")]
            if name in arrays:
                raise ValueError(f"array {name!r} twice")
            with zf.open(info) as f:
                # the header's shape against the member's size before anything is allocated (a
                # crafted header had numpy allocate what it claims, GBs, before failing)
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"array {name!r}: .npy format version {version}, not one np.savez writes")
                shape, fortran, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError(f"array {name!r} holds Python objects")
                size = math.prod(shape) * dtype.itemsize
                if f.tell() + size != info.file_size:
                    raise ValueError(f"array {name!r} claims {tuple(shape)} {dtype} in a member of "
                                     f"{info.file_size} bytes")
                data = np.frombuffer(f.read(size), dtype=dtype) if size else np.empty(0, dtype)
                arrays[name] = data.reshape(shape, order="F" if fortran else "C").copy()
    return arrays


def save_checkpoint(path: str, fp: str, payload: Any) -> None:
    """payload: an EngineState, a dict holding one under "state" plus plain JSON values, or a
    TreeState."""
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
    validation.not_special_file(path, "checkpoint")
    try:
        with open(path, "rb") as f:
            magic = f.readline(len(MAGIC) + 1)
            if magic.rstrip(b"\n") in OLD_MAGICS:
                raise ValueError(f"checkpoint: {path} is in an old embgeom format (pickled), which is unsafe "
                                 "to load and is refused; delete it and rerun")
            if magic != MAGIC + b"\n":
                if not (MAGIC + b"\n").startswith(magic) and not magic.startswith(b"EMBGEOM-"):
                    # somebody's file, not a torn one of ours: never suggest deleting it
                    raise ValueError(f"checkpoint: {path} is not an embgeom checkpoint (it does not begin with "
                                     "embgeom's header); it is left as it is: pass another path")
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
            # the size compared with what the file holds and the checksum taken piece by piece
            # before the body is read: a forged size, or a 64 GiB sparse file, allocates nothing
            start = f.tell()
            if os.fstat(f.fileno()).st_size - start != size or _sha256_from(f) != header["sha256"]:
                raise _invalid(path, "truncated or corrupt: size or checksum does not match")
            f.seek(start)
            body = f.read(size)
    except OSError as exc:
        raise ValueError(f"checkpoint: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except MemoryError:
        raise ValueError(f"checkpoint: {path} holds {size:,} bytes, more than this machine can read into "
                         "memory; pass another path") from None
    if len(body) != size or hashlib.sha256(body).hexdigest() != header["sha256"]:  # (changed meanwhile)
        raise _invalid(path, "truncated or corrupt: size or checksum does not match")
    try:
        return decode_payload(body[:header["meta_bytes"]], body[header["meta_bytes"]:])
    except Exception as exc:  # noqa: BLE001 - anything in a payload we did not write: one line
        raise _invalid(path, f"payload: {first_line(exc, typed=True)}") from None


def _sha256_from(f) -> str:
    """The sha256 of the rest of the open file f, read in 8 MB pieces."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(8 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


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
