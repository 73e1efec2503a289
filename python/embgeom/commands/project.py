"""`embgeom project X.npy --out DIR`: a 2-D projection (UMAP, t-SNE, PCA) on the exact graph.

DIR gets projection.npy (N, 2) float32, knn.npz (indices (N, k) int64, similarities (N, k) float64,
or distances with --metric euclidean; graph methods), report.json (method, metric, n, d, k,
seconds, knn_seconds; silhouette with labels;
explained variance for PCA), projection.png and a self-contained interactive projection.html.
"""
from __future__ import annotations

import os
import sys

from ..analysis.clouds.projection import DEFAULT_K, DEFAULT_PERPLEXITY
from .. import validation
from ..report.interactive import require_page_packages
from ..report.projection_page import write_outputs
from .model_options import add_quiet_option, progress_for
from . import flags_of, say_notes


def check_method_options(args) -> None:
    """--k is UMAP's, --perplexity t-SNE's, --seed and --backend (the graph's) theirs: given to
    another method they would be ignored, so they are refused; the defaults are filled in."""
    for option, value, methods in (("--k", args.k, ("umap",)), ("--perplexity", args.perplexity, ("tsne",)),
                                   ("--seed", args.seed, ("umap", "tsne")), ("--backend", args.backend, ("umap", "tsne"))):
        if value is not None and args.method not in methods:
            raise ValueError(f"{option}: only for --method {' or '.join(methods)}, got --method {args.method}")
    if args.seed is not None:
        validation.seed(args.seed, "--seed")
    args.k = DEFAULT_K if args.k is None else args.k
    args.perplexity = DEFAULT_PERPLEXITY if args.perplexity is None else args.perplexity
    args.seed = 0 if args.seed is None else args.seed


def add_arguments(p) -> None:
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D), or "
                   "(N, L+1, D) such as `embgeom text --keep cls`'s cls.npy (see --depth)")
    p.add_argument("--depth", type=int, default=None, help="for an (N, L+1, D) input: the depth to "
                   "project (0 = embedding output, l = output of layer l; default: the last)")
    p.add_argument("--labels", metavar="FILE", help="one label per line, aligned with the rows")
    p.add_argument("--texts", metavar="FILE", help="one text/token per line, shown on hover in the HTML")
    p.add_argument("--method", default="umap", choices=["umap", "tsne", "pca"], help="default umap")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean", "l2"],
                   help="the neighbour graph's geometry (and the original silhouette's): cosine for "
                   "embeddings (default), euclidean (or l2) for point clouds whose positions matter (a Hopf link)")
    p.add_argument("--k", type=int, default=None, help="UMAP neighbours besides the point itself "
                   f"(default {DEFAULT_K})")
    p.add_argument("--perplexity", type=float, default=None, help="t-SNE perplexity (k = 3 x perplexity; "
                   f"default {DEFAULT_PERPLEXITY:g})")
    p.add_argument("--seed", type=int, default=None, help="seed of the UMAP / t-SNE layout, 0..2^32-1 (default 0)")
    p.add_argument("--backend", default=None, help="all-pairs backend for the graph: cpp, torch, triton, cuda "
                   "or reference (default: auto, or EMBGEOM_BACKEND)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    add_quiet_option(p)


def main(args) -> int:
    from ..analysis.clouds.projection import project
    from ..analysis.text.inputs import read_labels
    from ..formatting import fmt, seconds
    from ..io import check_complete, check_output_folder, load_matrix, output_folder
    from ..provenance import Provenance
    from ..validation import renamed

    check_method_options(args)
    require_page_packages()
    prov = Provenance(args, inputs={"X": args.x, "--labels": args.labels, "--texts": args.texts}, seed=args.seed)
    prog = progress_for(args, "embgeom project")
    check_output_folder(args.out, command="project",
                        inputs=[("X", args.x), ("--labels", args.labels), ("--texts", args.texts)])
    check_complete(args.x, "X")
    x = load_matrix(args.x, "X")
    prov.extra["input"] = {"file": os.path.abspath(args.x), "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if x.dim() == 3:
        want = -1 if args.depth is None else args.depth
        if not -x.shape[1] <= want < x.shape[1]:
            raise ValueError(f"--depth: expected -{x.shape[1]} .. {x.shape[1] - 1}, got {args.depth}")
        depth = want % x.shape[1]
        prov.extra["depth"] = depth
        prov.extra["depth_rule"] = (f"depth {depth} of {x.shape[1] - 1}: 0 = embedding output, l = output of "
                                    "layer l (the input's second axis)")
        x = x[:, depth].contiguous()
    else:
        if args.depth is not None:
            raise ValueError(f"--depth: X is {tuple(x.shape)}, not (N, L+1, D): it has no depths to pick")
        prov.extra["depth"] = None
    if x.dim() != 2:
        raise ValueError(f"X: expected (N, D) or (N, L+1, D), got {tuple(x.shape)}")
    n = x.shape[0]
    labels = read_labels(args.labels, n) if args.labels else None
    texts = read_labels(args.texts, n, texts=True) if args.texts else None
    flags = flags_of(args, positional=("x",))
    with renamed(**flags):  # (project's checks name its arguments: said here as this command's flags)
        proj = project(x, method=args.method, labels=labels, k=args.k, perplexity=args.perplexity,
                       seed=args.seed, metric=args.metric, backend=args.backend, progress=prog)
    say_notes("project", proj.notes, flags)
    with output_folder(args.out, command="project") as out, prog.phase("plots and page"):
        report = write_outputs(out, proj, texts=texts, provenance=prov)
    # (PCA builds no graph: its time is the projection's)
    parts = f"projection {seconds(report['seconds'])}" if args.method == "pca" else \
        f"graph {seconds(report['knn_seconds'])}, layout {seconds(report['seconds'] - report['knn_seconds'])}"
    print(f"embgeom project: {args.method} of {fmt(n)} x {fmt(x.shape[1])} in {seconds(prov.seconds())} "
          f"({parts}) -> {os.path.join(args.out, 'projection.html')}", file=sys.stderr)
    return 0
