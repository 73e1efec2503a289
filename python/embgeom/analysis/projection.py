"""`embgeom project X.npy --out DIR`: a 2-D projection (UMAP, t-SNE, PCA) on the exact graph.

DIR gets projection.npy (N, 2) float32, knn.npz (indices (N, k) int64, similarities (N, k);
graph methods), report.json (method, n, d, k, seconds, knn_seconds; silhouette with labels;
explained variance for PCA), projection.png and a self-contained interactive projection.html.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D), or "
                   "(N, L+1, D) such as `embgeom text --keep cls`'s cls.npy (see --depth)")
    p.add_argument("--depth", type=int, default=-1, help="for an (N, L+1, D) input: the depth to "
                   "project (default: the last)")
    p.add_argument("--labels", metavar="FILE", help="one label per line, aligned with the rows")
    p.add_argument("--texts", metavar="FILE", help="one text/token per line, shown on hover in the HTML")
    p.add_argument("--method", default="umap", choices=["umap", "tsne", "pca"])
    p.add_argument("--k", type=int, default=15, help="UMAP neighbours besides the point itself")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (k = 3 x perplexity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="all-pairs backend for the graph (default: auto)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")


def write_outputs(out_dir: str, proj, *, texts=None, title: str = "") -> dict:
    """Write every DIR file for a clouds.Projection; returns the report dict."""
    from ..report import explained_variance_png, write_json
    from ..report.interactive import scatter_png, write_scatter_html

    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "projection.npy"), proj.embedding.astype(np.float32))
    if proj.indices is not None:
        np.savez(os.path.join(out_dir, "knn.npz"), indices=proj.indices.astype(np.int64),
                 similarities=proj.similarities)
    report = proj.to_dict()
    write_json(os.path.join(out_dir, "report.json"), report)
    axis = "PC" if proj.method == "pca" else proj.method.upper()
    name = title or f"{proj.method} of {proj.n} x {proj.d}"
    scatter_png(out_dir, "projection", proj.embedding, proj.labels, title=name,
                xlabel=f"{axis} 1", ylabel=f"{axis} 2")
    if proj.pca_curves is not None:
        explained_variance_png(out_dir, "explained_variance", proj.pca_curves)
    sil = report.get("silhouette")
    note = f"{proj.method}, n={proj.n}, d={proj.d}" + (f", k={proj.k}" if proj.k else "") + \
        (f"; silhouette original {sil['original']}, projection {sil['projection']}" if sil else "")
    write_scatter_html(os.path.join(out_dir, "projection.html"), proj.embedding, proj.labels, texts,
                       title=name, note=note)
    return report


def main(args) -> int:
    from .clouds import project, read_labels
    from ..io import load_matrix

    x = load_matrix(args.x, "X")
    if x.dim() == 3:
        if not -x.shape[1] <= args.depth < x.shape[1]:
            raise ValueError(f"--depth: expected -{x.shape[1]} .. {x.shape[1] - 1}, got {args.depth}")
        x = x[:, args.depth].contiguous()
    if x.dim() != 2:
        raise ValueError(f"X: expected (N, D) or (N, L+1, D), got {tuple(x.shape)}")
    n = x.shape[0]
    labels = read_labels(args.labels, n) if args.labels else None
    texts = read_labels(args.texts, n, "--texts") if args.texts else None
    proj = project(x, method=args.method, labels=labels, k=args.k, perplexity=args.perplexity,
                   seed=args.seed, backend=args.backend)
    report = write_outputs(args.out, proj, texts=texts)
    print(f"embgeom project: {args.method} of {n} x {x.shape[1]} in {report['seconds']:.1f}s "
          f"(graph {report['knn_seconds']:.1f}s) -> {os.path.join(args.out, 'projection.html')}",
          file=sys.stderr)
    return 0
