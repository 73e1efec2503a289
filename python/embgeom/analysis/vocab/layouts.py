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
import math

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

    def get(self, key: str, rows: int, dims: int, seed: int) -> Projection | None:
        """The saved layout `key` of `rows` points of `dims` dimensions drawn with `seed`, None
        when it is not saved yet."""
        pr = self.layouts.get(key)
        if pr is not None and (pr.n, pr.d, pr.seed) != (rows, dims, seed):
            raise ValueError(f"checkpoint: {self.path} does not fit this run (layout {key!r} has {pr.n} points of "
                             f"{pr.d} dimensions, seed {pr.seed}; this run {rows}, {dims}, {seed}); delete it or "
                             "pass another path")
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
    if f["d"] < 1 or f["k"] < 1 or f["metric"] not in ("cosine", "euclidean"):
        raise ValueError(f"d {f['d']!r}, k {f['k']!r}, metric {f['metric']!r}")
    emb = f["embedding"]
    if not isinstance(emb, np.ndarray) or emb.dtype != np.float32 or emb.shape != (n, 2) \
            or not np.isfinite(emb).all():
        raise ValueError(f"embedding: expected finite float32 ({n}, 2)")
    # the exact graph: k neighbours of each point, ids of the other points, finite values
    idx, sims = f["indices"], f["similarities"]
    if not isinstance(idx, np.ndarray) or idx.dtype.kind != "i" or idx.shape != (n, f["k"]) \
            or (idx.size and (idx.min() < 0 or idx.max() >= n or (idx == np.arange(n)[:, None]).any())):
        raise ValueError(f"indices: expected the ids of other points, ({n}, {f['k']}) integers")
    if not isinstance(sims, np.ndarray) or sims.dtype.kind != "f" or sims.shape != idx.shape \
            or not np.isfinite(sims).all():
        raise ValueError(f"similarities: expected finite ({n}, {f['k']}) values")
    # cosines, each point's from its nearest on (a crafted 5.0 had been drawn in the neighbour lists)
    if f["metric"] == "cosine" and sims.size and (np.abs(sims).max() > 1.0 + 1e-3 or (np.diff(sims, axis=1) > 0).any()):
        raise ValueError("similarities: expected cosines within [-1, 1], each point's in decreasing order")
    if f["distances"] is not None and (not isinstance(f["distances"], np.ndarray) or f["distances"].shape != idx.shape):
        raise ValueError("distances: expected None or the graph's shape")
    if f["explained_variance"] is not None and not isinstance(f["explained_variance"], np.ndarray):
        raise ValueError("explained_variance: expected None or an array")
    if f["pca_curves"] is not None and not isinstance(f["pca_curves"], dict):
        raise ValueError("pca_curves: expected None or a dict")
    p = f["perplexity"]
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0):
        raise ValueError(f"perplexity {p!r}")
    for name in ("seconds", "knn_seconds"):
        if isinstance(f[name], bool) or not isinstance(f[name], (int, float)) or not 0 <= f[name] < 1e9:
            raise ValueError(f"{name}: expected seconds")
    if not isinstance(f["notes"], list) or not all(isinstance(s, str) for s in f["notes"]):
        raise ValueError("notes: expected strings")
    if f["labels"] is not None and (not isinstance(f["labels"], list) or len(f["labels"]) != n
                                    or not all(isinstance(s, str) for s in f["labels"])):
        raise ValueError(f"labels: expected {n} strings")
    s = f["silhouette"]
    if s is not None and (not isinstance(s, dict) or not all(
            isinstance(k, str) and (v is None or (isinstance(v, float) and (math.isnan(v) or -1 <= v <= 1)))
            for k, v in s.items())):
        raise ValueError("silhouette: expected {name: a value in [-1, 1]}")
    return Projection(**fields)
