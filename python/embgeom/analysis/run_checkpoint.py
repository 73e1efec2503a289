"""What the resumable commands share (`embgeom text --checkpoint`, `embgeom vocab --checkpoint`):
one file per run in the checkpoint format of engine/checkpoint.py (no pickle; atomic write;
sha256), identified by a fingerprint of the model (weights and tokenizer), the inputs, the
settings and the arithmetic (numerics), and held by one run at a time (PATH.lock)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..engine.checkpoint import Fingerprint, TreeState, load_checkpoint, run_kind, save_checkpoint
from ..io import check_output_path, lock_checkpoint
from ..validation import optional_path


def file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model, tokenizer) -> dict:
    """The model's class, every parameter and buffer (name, dtype, shape, bytes), its
    configuration and the tokenizer's vocabulary and special tokens: contents, never the path it
    was loaded from (`--model DIR/` or a moved copy of DIR had been refused as another model)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        c = t.detach().to("cpu").contiguous()
        h.update(f"{name} {c.dtype} {tuple(c.shape)}".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    tok = hashlib.sha256(f"{type(tokenizer).__name__}\n{vocab}\n{special}".encode()).hexdigest()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
    config = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return {"weights_sha256": h.hexdigest(), "config_sha256": config, "tokenizer_sha256": tok}


def numerics(device: torch.device) -> dict:
    """What decides the floats of a run besides its inputs: torch and its CPU kernels, with its
    thread count (a CPU forward pass splits its sums by threads: the same batch on 1 and 2
    threads differs in the last bits), the C++ core's kernels (EMBGEOM_CPU), the GPU."""
    from ..backends import registry

    out: dict = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cpu":
        out["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
        out["torch_threads"] = torch.get_num_threads()
        core = registry.cpp()
        if core is not None and hasattr(core, "cpu_info"):
            out.update({k: v for k, v in dict(core.cpu_info()).items()
                        if k not in ("cpu_features", "isa_supported", "cap")})
    elif device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def plain_settings(settings: dict) -> dict:
    """Command-line settings as JSON values (anything else by its str)."""
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)
            for k, v in sorted(settings.items())}


class RunCheckpoint:
    """One command run's checkpoint file. identity: what the fingerprint hashes (its "command"
    names the kind of run); the saved value is a tree of plain values and arrays (TreeState).
    load_value takes PATH.lock first: a second run on PATH is refused while this one lives."""

    def __init__(self, path: str, identity: dict):
        self.path = optional_path(path, "checkpoint")
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint: {self.path} is a directory; pass a file path")
        check_output_path(self.path, "checkpoint", beside=(".lock",))
        self._lock: int | None = None
        self.fp = Fingerprint(hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest())
        self.fp.identity = identity

    def side_path(self, name: str) -> str:
        """A file kept beside the state (PATH.<name>), for data too large to rewrite at each save."""
        return f"{self.path}.{name}"

    def load_value(self) -> Any | None:
        """The saved tree, None when PATH does not exist (ValueError as load_checkpoint's)."""
        if self._lock is None:
            self._lock = lock_checkpoint(self.path)
        saved = load_checkpoint(self.path, self.fp)
        if saved is None:
            return None
        return saved.value if isinstance(saved, TreeState) else self.not_ours()

    def not_ours(self):
        raise ValueError(f"checkpoint: {self.path} is not the checkpoint of {run_kind(self.fp.identity)}; "
                         "delete it or pass another path")

    def save_value(self, value: Any) -> None:
        save_checkpoint(self.path, self.fp, TreeState(value))

    def close(self) -> None:
        """Let another run use PATH (the process's end does it too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
