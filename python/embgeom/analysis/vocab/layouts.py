"""Resumable vocabulary projections: `embgeom vocab --projections --checkpoint PATH`.

The UMAP and t-SNE layouts of the words and positions take minutes on a 30k vocabulary; every
other section takes seconds. Each finished layout (with its exact neighbour graph and quality
numbers) is saved to PATH as soon as it is done; a rerun of the same command computes the other
sections again and takes the saved layouts, so its report equals an uninterrupted run's (the
layouts are seeded). PATH is refused for another model, other rows (--all-tokens, --positions),
another seed, other arithmetic (analysis/run_checkpoint.py) or other versions of the libraries
that draw the layouts (umap-learn, openTSNE, numba)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..clouds.projection import Projection
from ..run_checkpoint import RunCheckpoint, model_digest, numerics, plain_settings

LAYOUTS = tuple(f"{what}_{method}" for what in ("words", "positions") for method in ("umap", "tsne"))
FIELDS = tuple(f.name for f in dataclasses.fields(Projection))


class LayoutCheckpoint(RunCheckpoint):
    """The finished projection layouts of one `embgeom vocab --projections` run."""

    def __init__(self, path: str, model, tokenizer, settings: dict):
        device = next(model.parameters(), torch.empty(0)).device
        super().__init__(path, {"command": "vocab", "model": model_digest(model, tokenizer),
                                "settings": plain_settings(settings),
                                "numerics": {**numerics(device), **_layout_libraries()}})
        self.layouts: dict[str, Projection] = {}
        self.resumed: list[str] = []   # the layouts taken from PATH when this run started

    def load(self) -> None:
        value = self.load_value()
        if value is None:
            return
        if not isinstance(value, dict) or set(value) != {"layouts"} or not isinstance(value["layouts"], dict):
            self.not_ours()
        for key, fields in value["layouts"].items():
            try:
                self.layouts[key] = _projection(key, fields)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"checkpoint: {self.path} does not fit this run (layout {key!r}: {exc}); "
                                 "delete it or pass another path") from None
        self.resumed = [k for k in LAYOUTS if k in self.layouts]

    def get(self, key: str, rows: int) -> Projection | None:
        """The saved layout `key` of `rows` points, None when it is not saved yet."""
        pr = self.layouts.get(key)
        if pr is not None and pr.n != rows:
            raise ValueError(f"checkpoint: {self.path} does not fit this run (layout {key!r} has {pr.n} points, "
                             f"this run {rows}); delete it or pass another path")
        return pr

    def keep(self, key: str, pr: Projection) -> None:
        """Save `pr` (a finished layout) with the ones before it."""
        self.layouts[key] = pr
        self.save_value({"layouts": {k: {f: getattr(p, f) for f in FIELDS} for k, p in self.layouts.items()}})


def _layout_libraries() -> dict:
    """The versions of the libraries that draw the layouts (a kept layout is theirs)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("umap-learn", "openTSNE", "numba"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _projection(key, fields) -> Projection:
    """A Projection from saved fields, each checked for its kind (the file is not trusted)."""
    if key not in LAYOUTS:
        raise ValueError("not a layout of embgeom vocab")
    if not isinstance(fields, dict) or set(fields) != set(FIELDS):
        raise ValueError("not the fields of a projection")
    f = fields
    n = f["n"]
    if type(n) is not int or n < 1 or type(f["d"]) is not int or type(f["k"]) is not int or type(f["seed"]) is not int:
        raise ValueError("n, d, k and seed must be ints")
    if f["method"] != key.rsplit("_", 1)[1]:
        raise ValueError(f"method {f['method']!r}")
    emb = f["embedding"]
    if not isinstance(emb, np.ndarray) or emb.dtype != np.float32 or emb.shape != (n, 2):
        raise ValueError(f"embedding: expected float32 ({n}, 2)")
    for name in ("indices", "similarities"):
        a = f[name]
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[0] != n or a.dtype.kind not in "if":
            raise ValueError(f"{name}: expected a numeric ({n}, k) array")
    for name in ("seconds", "knn_seconds"):
        if isinstance(f[name], bool) or not isinstance(f[name], (int, float)):
            raise ValueError(f"{name}: expected seconds")
    if not isinstance(f["notes"], list) or not all(isinstance(s, str) for s in f["notes"]):
        raise ValueError("notes: expected strings")
    if f["labels"] is not None and (not isinstance(f["labels"], list) or len(f["labels"]) != n
                                    or not all(isinstance(s, str) for s in f["labels"])):
        raise ValueError(f"labels: expected {n} strings")
    if f["silhouette"] is not None and not isinstance(f["silhouette"], dict):
        raise ValueError("silhouette: expected a dict")
    return Projection(**fields)
