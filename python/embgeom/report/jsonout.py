"""report.json: results as plain JSON (NaN/Inf as null, tensors as lists)."""
from __future__ import annotations

import json
import math
import os
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


def write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(data), f, indent=1)
    os.replace(tmp, path)
