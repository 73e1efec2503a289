"""The `embgeom` subcommands: one module each, with `add_arguments(parser)` and `main(args)`.

cli.py imports a command's module only when that command runs (or its --help is asked for), so
`embgeom pairs` never loads transformers or matplotlib.
"""
# name -> (module, one-line help); `info` is embgeom.info, also run as `python -m embgeom.info`
COMMANDS = {
    "info": ("embgeom.info", "what is built and what is usable, and why not"),
    "pairs": ("embgeom.commands.pairs", "all-pairs statistics of X (self) or X against Y (cross)"),
    "pairs-above": ("embgeom.commands.pairs_above", "every pair at or above a similarity (l2: at or below a "
                    "distance), streamed to disk (resumable)"),
    "knn": ("embgeom.commands.knn", "nearest neighbours with FAISS"),
    "vocab": ("embgeom.commands.vocab", "analysis of a model's input embeddings (word, position, type)"),
    "text": ("embgeom.commands.text", "per-layer / per-head analysis of a corpus run through a model"),
    "project": ("embgeom.commands.project", "2-D projection (UMAP, t-SNE, PCA) on the exact neighbour graph"),
    "syntax": ("embgeom.commands.syntax", "syntax heads: word-level attention against a CoNLL-U treebank"),
    "coref": ("embgeom.commands.coref", "coreference heads: antecedent selection accuracy against mention clusters"),
}


def say_notes(command: str, notes: list[str], flags: dict[str, str]) -> None:
    """A result's notes on stderr. A note starts with the API option it lowered (`row_topk 5
    lowered to ...`): said as the command's flag (`--row-topk 5 lowered to ...`)."""
    import sys

    for note in notes:
        option, space, rest = note.partition(" ")
        print(f"embgeom {command}: note: {flags.get(option, option)}{space}{rest}", file=sys.stderr)


def flags_of(args, positional: tuple[str, ...] = ()) -> dict[str, str]:
    """The command line's names of its arguments (argparse dests): `batch_size` -> `--batch-size`,
    a positional `corpus` -> `CORPUS`; for validation.renamed, so messages name what was typed."""
    names = {dest: "--" + dest.replace("_", "-") for dest in vars(args) if dest not in ("command", "func")}
    names.update({dest: dest.upper() for dest in positional})
    return names


def shown_path(path: str) -> str:
    """An output path as a command's last line names it: `--json -` is standard output."""
    return "standard output" if path == "-" else path
