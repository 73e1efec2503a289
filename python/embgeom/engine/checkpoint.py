"""Checkpoints of a run: the state of finished tiles, tied to its input and settings.

Written atomically (temp file, fsync, rename, directory fsync) with a sha256 of the body, so a
killed run leaves either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from typing import Any

import torch

from .config import PairwiseConfig

MAGIC = b"EMBGEOM-CKPT2"


def fingerprint(x: torch.Tensor, y: torch.Tensor | None, cfg: PairwiseConfig, backend: str, num_tiles: int) -> str:
    """Identifies input + settings: a checkpoint from anything else is refused."""
    h = hashlib.sha256()
    h.update(json.dumps({"cfg": cfg.describe(), "backend": backend, "tiles": num_tiles}, sort_keys=True).encode())
    for t in (x, y):
        if t is None:
            h.update(b"none")
            continue
        c = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(c.shape)).encode())
        h.update(c.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str, fp: str, payload: Any) -> None:
    """payload: any picklable object (an EngineState, or a dict holding one)."""
    body = pickle.dumps({"fingerprint": fp, "payload": payload}, protocol=4)
    digest = hashlib.sha256(body).hexdigest().encode()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + b"\n" + digest + b"\n" + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def load_checkpoint(path: str, fp: str) -> Any | None:
    """The saved payload, None if there is no file; ValueError if it is not ours or not for this run."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    magic, _, rest = raw.partition(b"\n")
    digest, _, body = rest.partition(b"\n")
    if magic != MAGIC or hashlib.sha256(body).hexdigest().encode() != digest:
        raise ValueError(f"checkpoint: {path} is not a valid embgeom checkpoint (bad header or checksum)")
    saved = pickle.loads(body)
    if saved["fingerprint"] != fp:
        raise ValueError(f"checkpoint: {path} was written for another input or other settings; "
                         "delete it or pass another path")
    return saved["payload"]
