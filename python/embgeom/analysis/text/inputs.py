"""Reading the text inputs of the commands: corpora (one text per line), labels and sentence pairs.

Every reader checks the whole file (UTF-8, not empty) before a model loads.
"""
from __future__ import annotations

import os
from typing import Iterator



# ----------------------------------------------------------------------------------- inputs
def require_file(path: str, what: str) -> None:
    """ValueError naming `what` unless path is a file (a folder is said to be one)."""
    if os.path.isdir(path):
        raise ValueError(f"{what}: {path} is a folder, expected a file")
    if not os.path.isfile(path):
        if os.path.exists(path):  # (a named pipe or a device had been called missing)
            raise ValueError(f"{what}: {path} is not a regular file (a named pipe or a device): save "
                             "it to a file first")
        raise ValueError(f"{what}: no such file: {path}")


def all_lines(path: str, what: str) -> Iterator[tuple[int, str]]:
    """(number, line) of every line of a UTF-8 file, without its line break and without a
    leading byte-order mark (editors on Windows write one; it is not part of the first line)."""
    require_file(path, what)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{what}: {path} line {number} is not UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})") from None
            if "\x00" in line:  # (UTF-16 text of ASCII letters is valid UTF-8, with a NUL after each)
                raise ValueError(f"{what}: {path} line {number} holds NUL bytes: is the file UTF-16? Save it "
                                 "as UTF-8")
            yield number, line.rstrip("\r\n")


def numbered_lines(path: str, what: str = "texts") -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 file, stripped of the line break (a
    clear error, naming the argument `what`, otherwise)."""
    for number, line in all_lines(path, what):
        if line.strip():
            yield number, line


def read_lines(path: str, what: str = "texts") -> Iterator[str]:
    """Non-blank lines of a UTF-8 file, stripped of the line break (numbered_lines)."""
    for _, line in numbered_lines(path, what):
        yield line


# ---------------------------------------------------------------------- [CLS] differences
def read_pairs(path: str) -> list[dict]:
    """JSONL of {"group": g, "a": text, "b": text}; clear errors, naming the line, for anything
    else. A text with a TAB is a sentence pair, as a corpus line is (checked here, before the
    model loads: a second TAB or an empty side had ended the run after the corpus's passes)."""
    from ...io import json_line
    from .trace import split_pair

    require_file(path, "--pairs")
    pairs = []
    for number, line in all_lines(path, "--pairs"):
        if not line.strip():
            continue
        where = f"--pairs: {path} line {number}"
        obj = json_line(line, where)
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("group", "a", "b")):
            raise ValueError(f'{where}: expected {{"group": str, "a": str, "b": str}}')
        for k in ("a", "b"):
            if not obj[k].strip():  # (a blank text has no [CLS] state: the model never sees it)
                raise ValueError(f"{where}: text {k!r} is empty")
            split_pair(obj[k], f"{where}: text {k!r}")
        pairs.append(obj)
    if not pairs:
        raise ValueError(f"--pairs: {path} has no pairs")
    return pairs


def read_labels(path: str, n: int | None = None, *, texts: bool = False) -> list[str]:
    """One value per line (UTF-8), aligned with the rows or texts; blank lines at the end of the
    file are not values. --labels: stripped, and a blank line before the last label is an error
    (skipping it would shift every later label onto the wrong row); --texts: the non-blank lines,
    as the corpus reader counts texts (a corpus is its own --texts file for `embgeom text
    --keep cls`'s rows; texts=True). With n, exactly n of them."""
    what = "--texts" if texts else "--labels"
    if texts:
        lines = list(read_lines(path, what))
    else:
        lines = [line for _, line in all_lines(path, what)]
        while lines and not lines[-1].strip():
            lines.pop()
        # (a byte-order mark starting a later line: files joined by cat; '\ufeffa' had been a
        # label of its own beside 'a', drawn alike)
        lines = [line.strip().lstrip("\ufeff").strip() for line in lines]
        blank = [number for number, line in enumerate(lines, 1) if not line]
        if blank:
            raise ValueError(f"{what}: {path} line {blank[0]} is blank: one label per line, aligned with "
                             f"the rows/texts ({len(blank)} blank line(s) before the last label)")
    if n is not None and len(lines) != n:
        kind = "non-blank lines" if texts else "labels"
        raise ValueError(f"{what}: {path} has {len(lines)} {kind}, expected {n} (one per row/text)")
    return lines
