"""report.json: results as plain JSON (NaN/Inf as null, tensors as lists)."""
from __future__ import annotations

import json
import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """Tensors/arrays -> lists, NaN/Inf -> None, tuples -> lists."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str, data: Any, *, indent: int | None = 1) -> None:
    """data as JSON at path, atomically (io.atomic_write): readers and concurrent writers see
    one whole file; ValueError (one line) for a missing or read-only folder or a directory.
    indent None: compact (large row lists)."""
    from ..io import atomic_write

    text = json.dumps(jsonable(data), indent=indent)  # before the file opens: a bad value writes nothing
    with atomic_write(path, name="output") as f:
        f.write(text)
