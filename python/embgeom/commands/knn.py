"""`embgeom knn X --k K --json OUT`: nearest neighbours with FAISS (embgeom.neighbours).
"""
from __future__ import annotations

import sys

from ..formatting import counted, fmt, seconds
from ..neighbours import INDEXES, knn
from .model_options import add_quiet_option, device_option, progress_for


def add_arguments(p) -> None:
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D)")
    p.add_argument("--k", type=int, required=True, help="neighbours per query")
    p.add_argument("--index", default="flat", choices=list(INDEXES),
                   help="flat: exact search; ivf, hnsw: approximate, with recall@k against exact (default flat)")
    p.add_argument("--queries", metavar="Q", help="(Q, D) query matrix; default: every row of X "
                   "queries (itself excluded)")
    p.add_argument("--device", type=device_option,
                   help="cpu, cuda or cuda:i (default: GPU when faiss-gpu and CUDA are usable)")
    p.add_argument("--nlist", type=int, help="--index ivf: lists (default ~4 sqrt(N), at most N / 39)")
    p.add_argument("--nprobe", type=int, help="--index ivf: lists probed (default nlist / 8)")
    p.add_argument("--hnsw-m", type=int, help="--index hnsw: links per node (default 32)")
    p.add_argument("--ef-search", type=int, help="--index hnsw: search breadth (default max(64, 2 k))")
    p.add_argument("--json", required=True, metavar="OUT", help="the neighbours as JSON (written atomically; - for standard output)")
    add_quiet_option(p)


def main(args) -> int:
    from ..report import write_json
    from ..interrupts import output_complete
    from ..io import check_output_path, load_matrix
    from ..validation import renamed
    from ..provenance import Provenance
    from . import flags_of, shown_path

    prov = Provenance(args, inputs={"X": args.x, "--queries": args.queries})
    check_output_path(args.json, "--json", inputs=[("X", args.x), ("--queries", args.queries)], stdout=True)  # before any work
    prog = progress_for(args, "embgeom knn")  # (--progress beside --quiet: refused before X loads)
    x = load_matrix(args.x, "X")
    q = load_matrix(args.queries, "--queries") if args.queries else None
    # (knn's checks name its arguments: said here as this command's flags)
    with renamed(**flags_of(args, positional=("x",))):
        res = knn(x, args.k, queries=q, index=args.index, device=args.device, nlist=args.nlist,
                  nprobe=args.nprobe, hnsw_m=args.hnsw_m, ef_search=args.ef_search,
                  progress=prog)
    data = res.to_dict()
    data.update({"n": int(x.shape[0]), "d": int(x.shape[1]), "provenance": prov.record()})
    write_json(args.json, data, name="--json")
    output_complete()
    rec = "" if res.recall is None else f", recall@{res.k} {fmt(res.recall)}"
    print(f"embgeom knn: {counted(res.indices.shape[0], 'query', 'queries')} x {res.k} ({res.index}, {res.device}{rec}) "
          f"in {seconds(prov.seconds())} (index and search {seconds(res.seconds)}) -> {shown_path(args.json)}", file=sys.stderr)
    return 0
