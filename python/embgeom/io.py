"""Reading (N, D) matrices from .npy, .pt and .safetensors files, with clear errors."""
from __future__ import annotations

import os

import numpy as np
import torch

SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


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
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{name}: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise ValueError(f"{name}: expected a float array in {path}, got dtype {obj.dtype}")
        # memory-mapped arrays are read-only; torch needs a writable buffer, so copy once
        return torch.from_numpy(np.array(obj))
    return _first_tensor(obj, name, path)


def _first_tensor(obj, name, path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, torch.Tensor):
                return value
    raise ValueError(f"{name}: no tensor found in {path}")
