"""`embgeom pairs X [--against Y] --json OUT`: all-pairs statistics of a matrix file.

Its options are built from the options of `pairwise_stats` (engine.config.user_options): the
same names with dashes, the same defaults and choices.
"""
from __future__ import annotations

import os
import re
import sys

from ..engine.config import user_options
from .model_options import add_quiet_option, device_option, progress_for


def add_arguments(p) -> None:
    p.add_argument("x", metavar="X", help=".npy, .pt or .safetensors file of shape (N, D)")
    p.add_argument("--against", metavar="Y", help="second matrix (M, D): cross mode")
    for name, spec in user_options().items():
        flag = "--" + name.replace("_", "-")
        default = spec["default"]
        if "pair" in spec:
            p.add_argument(flag, nargs=2, type=float, metavar=spec["pair"], help=spec["help"])
        elif "choices" in spec:
            p.add_argument(flag, default=default, choices=spec["choices"],
                           help=spec["help"] + " (default %(default)s)")
        elif default is None:
            p.add_argument(flag, type=float, metavar="V", help=spec["help"])
        elif "needs" in spec:  # None until given: given without its option it is refused
            p.add_argument(flag, type=type(default), default=None,
                           help=f"{spec['help']} (default {default}; with --{spec['needs']})")
        else:
            p.add_argument(flag, type=type(default), default=default,
                           help=spec["help"] + " (default %(default)s)")
    p.add_argument("--backend", help="cpp, torch, triton, cuda or reference (default: auto, or EMBGEOM_BACKEND)")
    p.add_argument("--device", type=device_option, help="run on this torch device (e.g. cuda)")
    p.add_argument("--checkpoint", metavar="PATH", help="save finished tiles here; a rerun resumes")
    add_quiet_option(p, progress_help=" (with --distributed: a line a finished job, per rank)")
    p.add_argument("--distributed", action="store_true", help="split the work over torchrun ranks")
    p.add_argument("--json", required=True, metavar="OUT", help="the statistics as JSON (written atomically; - for standard output)")


def main(args) -> int:
    from ..formatting import counted, seconds
    from ..interrupts import output_complete
    from ..io import check_output_path, load_matrix
    from ..provenance import Provenance
    from ..report import write_json
    from ..validation import renamed
    from . import say_notes, shown_path

    prov = Provenance(args, inputs={"X": args.x, "--against": args.against})
    ins = [("X", args.x), ("--against", args.against)]
    check_output_path(args.json, "--json", inputs=ins + [("--checkpoint", args.checkpoint)], stdout=True)  # before any work
    if args.checkpoint and args.distributed:  # each rank keeps PATH.rank<r>
        rank_file = re.fullmatch(re.escape(os.path.abspath(args.checkpoint)) + r"\.rank[0-9]+", os.path.abspath(args.json))
        if rank_file:
            raise ValueError(f"--json: {args.json} is a rank's --checkpoint file (PATH.rank<r>); write elsewhere")
    if args.checkpoint:
        check_output_path(args.checkpoint, "--checkpoint", inputs=ins, beside=(".lock",))
    prog = progress_for(args, "embgeom pairs")  # (--progress beside --quiet: refused before X loads)
    x = load_matrix(args.x, "X")
    y = load_matrix(args.against, "--against") if args.against else None
    if args.device:
        x = x.to(args.device)
        y = None if y is None else y.to(args.device)
    options = {}
    for name, spec in user_options().items():
        value = getattr(args, name)
        if "needs" in spec:
            if value is not None and getattr(args, spec["needs"]) is None:
                raise ValueError(f"--{name.replace('_', '-')}: only with --{spec['needs']}")
            value = spec["default"] if value is None else value
        options[name] = tuple(value) if "pair" in spec and value is not None else value
    kwargs = dict(options, backend=args.backend, checkpoint=args.checkpoint,
                  progress=prog.enabled if args.distributed else prog)
    # (a checkpoint there is resumed or refused: the last line says a run resumed, as text's does)
    resumed = bool(args.checkpoint) and not args.distributed and os.path.isfile(args.checkpoint)
    # the engine's checks name the API's arguments (y, bins, ...): said here as this command's
    names = {name: f"--{name.replace('_', '-')}" for name in [*options, "backend", "checkpoint"]}
    with renamed(x="X", y="--against", **names):
        if args.distributed:
            from .. import distributed

            result = distributed.pairwise_stats(x, y, **kwargs)
            if result is None:  # not rank 0
                return 0
        else:
            from ..api import pairwise_stats

            result = pairwise_stats(x, y, **kwargs)
    say_notes("pairs", result.notes, names)
    out = result.to_dict()
    out["provenance"] = prov.record()
    write_json(args.json, out, indent=None, name="--json")  # compact: row lists can be large
    output_complete()
    since = f", resumed from {args.checkpoint}" if resumed else ""
    print(f"embgeom pairs: {counted(result.count, 'pair')} in {seconds(prov.seconds())} (engine {seconds(result.seconds)}, "
          f"{result.backend}{since}) -> {shown_path(args.json)}", file=sys.stderr)
    return 0
