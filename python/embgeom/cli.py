"""`embgeom` command line: info, pairs, knn, vocab, text, project, syntax.

Every user error (bad file, bad shape, bad option) prints one line `embgeom: error: ...` and
exits with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .engine.config import DEFAULT_BLOCK


def _add_pairs(sub) -> None:
    p = sub.add_parser("pairs", help="all-pairs statistics of X (self) or X against Y (cross)")
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D)")
    p.add_argument("--against", metavar="Y", help="second matrix (M, D): cross mode")
    p.add_argument("--metric", default="cosine", choices=["cosine", "dot", "euclidean"])
    p.add_argument("--bins", type=int, default=2000)
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"))
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--bottomk", type=int, default=10)
    p.add_argument("--near", type=float, metavar="V")
    p.add_argument("--near-k", type=int, default=10)
    p.add_argument("--row-topk", type=int, default=0)
    p.add_argument("--row-bottomk", type=int, default=0)
    p.add_argument("--outside", nargs=2, type=float, metavar=("A", "B"))
    p.add_argument("--outside-limit", type=int, default=1000)
    p.add_argument("--precision", default="exact", choices=["exact", "fast"])
    p.add_argument("--backend")
    p.add_argument("--block", type=int, default=DEFAULT_BLOCK, help="tile edge (default %(default)s)")
    p.add_argument("--device", help="run on this torch device (e.g. cuda)")
    p.add_argument("--checkpoint", metavar="PATH")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--distributed", action="store_true", help="split the work over torchrun ranks")
    p.add_argument("--json", required=True, metavar="OUT")
    p.set_defaults(func=_run_pairs)


def _run_pairs(args) -> int:
    from .io import load_matrix

    x = load_matrix(args.x, "X")
    y = load_matrix(args.against, "Y") if args.against else None
    if args.device:
        x = x.to(args.device)
        y = None if y is None else y.to(args.device)
    kwargs = dict(metric=args.metric, bins=args.bins, range=tuple(args.range) if args.range else None,
                  topk=args.topk, bottomk=args.bottomk, near=args.near, near_k=args.near_k,
                  row_topk=args.row_topk, row_bottomk=args.row_bottomk,
                  outside=tuple(args.outside) if args.outside else None,
                  outside_limit=args.outside_limit, precision=args.precision, backend=args.backend,
                  checkpoint=args.checkpoint, progress=args.progress, block=args.block)
    if args.distributed:
        from .engine import distributed

        result = distributed.pairwise_stats(x, y, **kwargs)
        if result is None:  # not rank 0
            return 0
    else:
        from .api import pairwise_stats

        result = pairwise_stats(x, y, **kwargs)
    _write_json(args.json, result.to_dict())
    print(f"embgeom pairs: {result.count} pairs in {result.seconds:.2f}s ({result.backend}) -> {args.json}")
    return 0


def _write_json(path: str, data) -> None:
    from .report import jsonable

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--json: directory does not exist: {directory}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(data), f)
    os.replace(tmp, path)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what is built and what is usable, and why not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lambda a: __import__("embgeom.info", fromlist=["main"]).main(["--json"] if a.json else []))


def _add_lazy(sub, name: str, module: str, help_text: str) -> None:
    """Subcommands whose module imports heavy packages: add their arguments on demand."""
    import importlib

    try:
        mod = importlib.import_module(f"embgeom.{module}")
    except ImportError as exc:
        p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
        p.set_defaults(func=lambda a, e=exc: _fail(f"{name} is unavailable: {e}"))
        return
    p = sub.add_parser(name, help=help_text)
    mod.add_arguments(p)
    p.set_defaults(func=mod.main)


def _fail(msg: str) -> int:
    raise ValueError(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embgeom", description="Geometry of transformer embeddings")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    _add_pairs(sub)
    _add_lazy(sub, "knn", "knn", "nearest neighbours with FAISS")
    _add_lazy(sub, "vocab", "analysis.vocab", "analysis of a model's input embeddings (word, position, type)")
    _add_lazy(sub, "text", "analysis.text", "per-layer / per-head analysis of a corpus run through a model")
    _add_lazy(sub, "project", "analysis.projection", "2-D projection (UMAP, t-SNE, PCA) on the exact neighbour graph")
    _add_lazy(sub, "syntax", "analysis.syntax", "syntax heads: word-level attention against a CoNLL-U treebank")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"embgeom: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embgeom: interrupted (finished work is kept in the checkpoint, if one was given)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
