"""report.json: results as plain JSON (NaN/Inf as null, tensors as lists)."""
from __future__ import annotations

import json
import sys
from typing import Any

from ..results import jsonable


STDOUT = "-"  # a --json path that means standard output


def write_json(path: str, data: Any, *, indent: int | None = 1, name: str = "output") -> None:
    """data as JSON at path, atomically (io.atomic_write): readers and concurrent writers see
    one whole file; ValueError (one line, naming `name`: the caller's option) for a missing or
    read-only folder, a directory, a full disk. indent None: compact (large row lists)."""
    from ..io import atomic_write

    text = json.dumps(jsonable(data), indent=indent)  # before the file opens: a bad value writes nothing
    if path == STDOUT:  # a command's `--json -`: the pipe it feeds (progress and the last line are on stderr)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    with atomic_write(path, name=name) as f:
        f.write(text)
