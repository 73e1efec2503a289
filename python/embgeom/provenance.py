"""Provenance of a report: the `provenance` object of every report.json and page footer.

    {"command": "embgeom text corpus.txt --out r", "version": "0.1.0", "git_sha": "6d7cf75..." | null,
     "model": {"name": ..., "path": ..., "revision": ... | null} | null, "seed": int | null,
     "inputs": [{"name": "CORPUS", "path": "/abs/corpus.txt", "bytes": 1234}], "started": ISO time,
     "python": "3.11.9", "torch": "2.x", ...extra (e.g. project's "depth" and "input")}

Nothing here fails a run: a value that cannot be found (no git tree, no revision) is null.
"""
from __future__ import annotations

import datetime
import os
import re
import shlex
import subprocess
import sys
import time

from .models import DEFAULT_MODEL

_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def command_line(args=None) -> str:
    """The command line as typed: `embgeom ` + the argv the dispatcher parsed (cli.main stores
    it on args as `argv`), else sys.argv."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return shlex.join(["embgeom", *[str(a) for a in argv]])


def version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("embgeom")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return None


def git_sha() -> str | None:
    """The commit of the source tree embgeom runs from, or None (installed wheel, no git, no
    repository, or a repository that is not embgeom's)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not (os.path.exists(os.path.join(root, ".git")) and os.path.isdir(os.path.join(root, "csrc"))):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and _HEX40.match(sha) else None


def model_record(name: str | None, model=None) -> dict:
    """{"name", "path", "revision"} of a loaded model: the revision is the Hub commit when
    transformers knows it (or the snapshot folder says it), else the version of the package the
    default model installs from, else None."""
    from .models import resolve_model

    shown = name or DEFAULT_MODEL
    try:
        path = resolve_model(name)
    except ValueError:
        path = name
    if path and os.path.isdir(path):
        path = os.path.abspath(path)
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    if not revision and path:
        parts = os.path.normpath(path).split(os.sep)
        if len(parts) >= 2 and parts[-2] == "snapshots" and _HEX40.match(parts[-1]):
            revision = parts[-1]
    if not revision and shown == DEFAULT_MODEL:
        from importlib import metadata

        try:
            revision = f"{DEFAULT_MODEL}=={metadata.version(DEFAULT_MODEL)}"
        except metadata.PackageNotFoundError:
            revision = None
    return {"name": shown, "path": path, "revision": revision}


def input_record(name: str, path: str) -> dict:
    """{"name": the argument, "path": absolute, "bytes": size or None}."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return {"name": name, "path": os.path.abspath(path), "bytes": size}


class Provenance:
    """Started when a command starts (the clock of its total wall time); `record()` is the
    JSON-safe object at the moment it is asked for."""

    def __init__(self, args=None, *, inputs: dict[str, str | None] | None = None, seed: int | None = None):
        self.command = command_line(args)
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        # cli.main stores the clock of the command's start on args (`started`); else now
        self.start = getattr(args, "started", None) or time.perf_counter()
        self.inputs = [input_record(k, v) for k, v in (inputs or {}).items() if v]
        self.seed = seed
        self.model = None
        self.extra: dict = {}

    def set_model(self, name: str | None, model=None) -> None:
        self.model = model_record(name, model)

    def seconds(self) -> float:
        """Wall time since the command started."""
        return time.perf_counter() - self.start

    def record(self) -> dict:
        import torch

        return {"command": self.command, "version": version(), "git_sha": git_sha(), "model": self.model,
                "seed": self.seed, "inputs": self.inputs, "started": self.started,
                "total_seconds": round(self.seconds(), 3),
                "python": sys.version.split()[0], "torch": torch.__version__, **self.extra}
