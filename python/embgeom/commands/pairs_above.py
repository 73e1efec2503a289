"""`embgeom pairs-above X --threshold T --out DIR`: every pair i < j of X at or above a
similarity (at or below a distance for l2), the dedup step of a pipeline (embgeom.pairs_above).

DIR gets pairs-*.npy shards (fields i, j, similarity; read them back with
`embgeom.read_pairs(DIR)`), manifest.json (the input's fingerprint, the rows done, the count) and
provenance.json. Memory does not grow with the number of pairs; an interrupted run continues
from its last finished rows when the same command runs again, and a finished one returns at once.
"""
from __future__ import annotations

from ..pair_shards import PAIR_METRICS
from .model_options import add_quiet_option, device_option, progress_for


def add_arguments(p) -> None:
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D)")
    p.add_argument("--threshold", type=float, required=True, metavar="T",
                   help="cosine / dot: pairs with similarity >= T; l2: pairs at distance <= T")
    p.add_argument("--metric", default="cosine", choices=[*PAIR_METRICS, "euclidean"],
                   help="similarity of a pair: cosine, dot product, or Euclidean distance (l2, also "
                   "spelled euclidean) (default %(default)s)")
    p.add_argument("--device", type=device_option, help="torch device of the scan (default: cpu)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the shards and manifest (created; "
                   "the folder of an unfinished run of the same X and threshold continues it)")
    add_quiet_option(p)


def main(args) -> int:
    import os
    import sys

    from ..formatting import counted, fmt, seconds
    from ..index import pairs_above
    from ..interrupts import output_complete
    from ..io import check_complete, load_matrix
    from ..pair_shards import saved_manifest
    from ..provenance import Provenance
    from ..report import write_json
    from ..validation import renamed
    from . import flags_of

    prov = Provenance(args, inputs={"X": args.x})
    check_complete(args.x, "X")
    prog = progress_for(args, "embgeom pairs-above")  # (--progress beside --quiet: refused before X loads)
    x = load_matrix(args.x, "X")
    if x.dim() != 2:
        raise ValueError(f"X: expected a matrix (N, D), got shape {tuple(x.shape)}")
    if args.device:
        x = x.to(args.device)
    args.continues_in = args.out  # an interrupted run's line says the folder keeps its rows
    before = saved_manifest(args.out)  # (the last line says what an earlier run had kept)
    kept = before["rows_done"] if before else 0
    with renamed(**flags_of(args, positional=("x",))):
        manifest = pairs_above(x, args.threshold, args.out, metric=args.metric, progress=prog)
    write_json(os.path.join(args.out, "provenance.json"), prov.record())
    output_complete()
    relation = "at distance <=" if manifest["metric"] == "l2" else f"with {manifest['metric']} >="
    earlier = f", the pairs of {counted(kept, 'row')} from an earlier run" if kept else ""
    # the folder's size: a threshold most pairs pass writes 20 bytes a pair, N^2 / 2 of them
    size = sum(s["bytes"] for s in manifest["shards"]) / 2**20
    print(f"embgeom pairs-above: {counted(manifest['count'], 'pair')} {relation} {args.threshold:g} among "
          f"{counted(manifest['n'], 'row')} in {seconds(prov.seconds())}{earlier} -> {args.out} "
          f"({fmt(size, 3)} MiB in {counted(len(manifest['shards']), 'shard')}; embgeom.read_pairs)", file=sys.stderr)
    return 0
