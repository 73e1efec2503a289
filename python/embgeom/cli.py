"""`embgeom` command line: the dispatcher over embgeom.commands (one module per subcommand).

Every user error (bad file, bad shape, bad option) prints one line `embgeom: error: ...` and
exits with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
import warnings

from .commands import COMMANDS
from .formatting import first_line
from .interrupts import command_run, terminate_as_interrupt


class OneLineParser(argparse.ArgumentParser):
    """A refused command line is one line (with where to look), not the usage block. Options are
    taken as spelled (no prefixes: `--head-map` had run as --head-maps, and a script's prefix would
    change meaning once an option sharing it is added); an option no parser knows is named, with
    the nearest known one, even where a required option is missing too (`--jsn` had been refused
    as "the following arguments are required: --json")."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _unknown_option(self, a: str) -> bool:
        """An option-like string this parser does not know (a negative number is a value)."""
        return (a.startswith("-") and a not in ("-", "--") and not self._negative_number_matcher.match(a)
                and a.split("=", 1)[0] not in self._option_string_actions)

    def _named(self, items: list[str]) -> str:
        """'unrecognized arguments: ...', each unknown option with the known one it begins or is
        closest to."""
        import difflib

        names = {o.lstrip("-"): o for o in self._option_string_actions if o.startswith("--")}

        def hint(a):
            if not self._unknown_option(a):
                return a
            typed = a.split("=", 1)[0].lstrip("-")
            begun = [n for n in names if typed and n.startswith(typed)]
            near = begun if len(begun) == 1 else difflib.get_close_matches(typed, list(names), n=1, cutoff=0.7)
            return f"{a} (did you mean {names[near[0]]}?)" if near else a

        return "unrecognized arguments: " + " ".join(map(hint, items))

    def error(self, message):
        if message.startswith("the following arguments are required"):
            unknown = [a for a in getattr(self, "_given", []) if self._unknown_option(a)]
            if unknown:   # (the misspelling is what to say: the option it meant is the one missing)
                message = self._named(unknown)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but arguments no parser knows are refused by the command they follow
        (`embgeom text: error: ...`, see `embgeom text --help`), not by the top-level parser."""
        parsed, extra = self.parse_known_args(args, namespace)
        command = self.command_parsers.get(getattr(parsed, "command", None), self)
        if extra and not getattr(command, "unavailable", False):  # (an unavailable one says why instead)
            command.error(command._named(extra))
        return parsed


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in argv (if any) has its module imported."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = OneLineParser(prog="embgeom", description="Geometry of transformer embeddings")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.command_parsers = {}
    for name, (module, help_text) in COMMANDS.items():
        p = parser.command_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - torch missing or broken (a CUDA library it cannot open)
            p.unavailable = True   # its arguments are not known: the command says why it cannot run
            p.description = f"{help_text}. Unavailable here: {_why_unavailable(exc)}"   # (its --help)
            p.set_defaults(func=lambda a, n=name, e=exc: _unavailable(n, e))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    return parser


def _why_unavailable(exc: Exception) -> str:
    why = first_line(exc, typed=not isinstance(exc, ImportError))
    if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":
        why += " (embgeom needs torch >= 2.4: pip install torch)"
    return f"importing its modules failed: {why}"


def _unavailable(name: str, exc: Exception) -> int:
    raise ValueError(f"{name} is unavailable: {_why_unavailable(exc)}")


class _Diagnostics:
    """sys.stderr while a command runs: its notes, bars and errors are best-effort. A reader that
    left (`2>&1 | head`), a full disk (`2>/dev/full`) or a closed stderr (`2>&-`) loses them, never
    the run: a note had raised BrokenPipeError mid-run and the result was dropped, with status 0."""

    def __init__(self, stream):
        self.stream = stream if stream is not None else open(os.devnull, "w")  # noqa: SIM115
        self.lost = stream is None

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # EPIPE, ENOSPC, EBADF; a closed file
                self.lost = True
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.lost = True

    def isatty(self) -> bool:
        try:
            return not self.lost and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):  # encoding, errors, fileno, buffer: the stream's own
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    process = argv is None  # this process is the command: its signals are the command's to set
    stderr = sys.stderr
    sys.stderr = _Diagnostics(stderr)
    try:
        with warnings.catch_warnings():
            # matplotlib's notes on a picture (a label's glyph its font lacks: drawn as a box; a
            # layout it left as it was) are no notes on the command: 300-character or CJK labels
            # had put them between its lines
            for message in (r"Glyph \d+ .*missing from", "Tight layout not applied"):
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            return _main(argv, process)
    finally:
        sys.stderr = stderr
        if process:
            _ignore_interrupts()


def _ignore_interrupts() -> None:
    """The command has ended (finished, or its interrupt said what was kept): a Ctrl-C or SIGTERM
    during the interpreter's exit had turned its status into a death by signal, or added an
    atexit traceback under its one line."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # (not the main thread)
            signal.signal(sig, signal.SIG_IGN)


def _main(argv: list[str] | None, process: bool) -> int:
    started = time.perf_counter()
    if argv is None:  # the process is this command: its clock starts when embgeom began importing
        from . import IMPORTED_AT

        started = IMPORTED_AT
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # (a command's modules import torch: a second or more, and Ctrl-C or SIGTERM land there too)
        with terminate_as_interrupt():
            args = build_parser(argv).parse_args(argv)
    except KeyboardInterrupt:
        if process:
            _ignore_interrupts()
        print("embgeom: interrupted before the command started: nothing was written", file=sys.stderr)
        return 130
    args.argv, args.started = argv, started  # provenance: the command line and its total wall time
    # (an interrupted run's line says whether --out held an earlier report or was never made;
    # not an attribute of args, whose values make a checkpoint's settings)
    out_existed = bool(getattr(args, "out", None)) and os.path.lexists(args.out)
    try:
        # SIGTERM (a scheduler's stop, `kill`) ends a command as Ctrl-C does: its staging folder
        # is removed, its checkpoint saved where it keeps one, and it says what was kept
        with command_run(), terminate_as_interrupt():
            return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"embgeom: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(_out_of_memory(exc, args, out_existed), file=sys.stderr)
        return 2
    except BrokenPipeError:  # (`| head`: the reader left; nothing more to say to it)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine refused: permissions, a folder for a file, a full disk
        what = exc.strerror or str(exc) or type(exc).__name__
        print(f"embgeom: error: {what}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if process:
            _ignore_interrupts()  # (a second Ctrl-C had cut this line's work short: status -2)
        print(f"embgeom: interrupted ({_what_was_kept(args, out_existed)})", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOCATOR_FAILURES):
            print(_out_of_memory(exc, args, out_existed), file=sys.stderr)   # torch's allocators say it so
            return 2
        # (a lost peer can only come from distributed, if it was imported: importing it here, with
        # torch, had raised a second traceback over the first where torch cannot load)
        distributed = sys.modules.get(f"{__package__}.distributed")
        if distributed is None or not isinstance(exc, distributed.PeerLost):
            raise
        print(f"embgeom: error: {exc}", file=sys.stderr)
        return 1


# torch's RuntimeErrors for an allocation that failed (CPU allocator, CUDA caching allocator)
ALLOCATOR_FAILURES = ("can't allocate memory", "CUDA out of memory", "std::bad_alloc")


def _out_of_memory(exc: BaseException, args, out_existed: bool) -> str:
    """One line for a command that ran out of memory (the C++ core's std::bad_alloc, numpy's or
    torch's failed allocation) instead of a traceback."""
    detail = first_line(exc) if str(exc).strip() else "an allocation failed"
    return (f"embgeom: error: out of memory ({detail}): ask for less (shorter lists, fewer neighbours, a "
            f"smaller --batch-size or input) or run where more memory is free; {_what_was_kept(args, out_existed)}")


def _what_was_kept(args, out_existed: bool) -> str:
    """What an interrupted command leaves behind, for its one line."""
    if getattr(args, "continues_in", None):
        return _rows_kept(args.continues_in)
    if getattr(args, "checkpoint", None):
        # a distributed rank's own file: PATH.rank<r> (RANK set by torchrun)
        mine = f"{args.checkpoint}.rank{os.environ.get('RANK', '0')}" if getattr(args, "distributed", False) \
            else args.checkpoint
        if not os.path.exists(mine):
            return f"stopped before the first save to {mine}: nothing was kept"
        return f"finished work is kept in {mine}; the same command resumes from it"
    if hasattr(args, "checkpoint") and getattr(args, "projections", True):
        return "nothing was kept; --checkpoint PATH keeps finished work for a rerun"
    if getattr(args, "out", None):
        if not out_existed:
            return f"{args.out} was not created; no partial report is written"
        return f"{args.out} holds what it held before; no partial report is written"
    return "nothing was written"


def _rows_kept(folder: str) -> str:
    """What an interrupted pairs-above run's folder holds, from its manifest (it had said the
    finished rows' pairs are kept when none were)."""
    from .pair_shards import saved_manifest

    manifest = saved_manifest(folder)
    if manifest is None:
        return f"stopped before the first save to {folder}: nothing was kept"
    done, n = manifest["rows_done"], manifest["n"]
    if manifest["complete"]:
        return f"every row was done first: {folder} is complete"
    if done == 0:
        return f"stopped before the first row was saved to {folder}: nothing was kept"
    return f"the pairs of rows 0-{done - 1} of {n:,} are kept in {folder}; the same command continues from them"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
