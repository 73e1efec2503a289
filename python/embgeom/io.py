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
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype.kind != "f":
                raise ValueError(f"{name}: expected a float array in {path}, got dtype {arr.dtype}")
            return torch.from_numpy(np.array(arr, copy=False) if arr.flags.writeable else np.asarray(arr).copy())
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return _first_tensor(obj, name, path)
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _first_tensor(load_file(path), name, path)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{name}: cannot read {path}: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"{name}: unsupported file type {suffix!r} for {path} (expected one of {', '.join(SUFFIXES)})")


def _first_tensor(obj, name, path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, torch.Tensor):
                return value
    raise ValueError(f"{name}: no tensor found in {path}")
