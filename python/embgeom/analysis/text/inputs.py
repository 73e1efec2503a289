"""Reading the text inputs of the commands: corpora (one text per line), labels and sentence pairs.

Every reader checks the whole file (UTF-8, not empty) before a model loads.
"""
from __future__ import annotations

import os
from typing import Iterator



# ----------------------------------------------------------------------------------- inputs
def read_lines(path: str) -> Iterator[str]:
    """Non-blank lines of a UTF-8 file, stripped of the line break (a clear error otherwise)."""
    if not os.path.isfile(path):
        raise ValueError(f"texts: no such file: {path}")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"texts: {path} line {number} is not UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})") from None
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


# ---------------------------------------------------------------------- [CLS] differences
def read_pairs(path: str) -> list[dict]:
    """JSONL of {"group": g, "a": text, "b": text}; clear errors for anything else."""
    import json

    if not os.path.isfile(path):
        raise ValueError(f"--pairs: no such file: {path}")
    pairs = []
    for number, line in enumerate(read_lines(path), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--pairs: {path} entry {number} is not JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("group", "a", "b")):
            raise ValueError(f'--pairs: {path} entry {number}: expected {{"group": str, "a": str, "b": str}}')
        pairs.append(obj)
    if not pairs:
        raise ValueError(f"--pairs: {path} has no pairs")
    return pairs


def read_labels(path: str, n: int | None = None, what: str = "--labels") -> list[str]:
    """One label per non-blank line (UTF-8); with n, exactly n of them."""
    import os


    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file: {path}")
    labels = [line.strip() for line in read_lines(path)]
    if n is not None and len(labels) != n:
        raise ValueError(f"{what}: {path} has {len(labels)} labels, expected {n} (one per row/text)")
    return labels
