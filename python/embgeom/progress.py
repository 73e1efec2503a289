"""Progress on stderr for every long phase of a command: tqdm bars for counted work (texts,
sentences, pairs) and a ticking clock for phases without a count (model load, UMAP, plots).

Shown when stderr is a terminal and the user did not ask for quiet (`--quiet`,
`--no-progress`); otherwise every call here does nothing, unless the user asked for it
(`--progress`): then, into a log, plain lines (log=True): a phase's start and end, and every
LOG_SECONDS a bar's count, the time so far and the time left, or a phase's time so far. Without tqdm a terminal
gets those lines too.

    prog = Progress(enabled=wanted(quiet=args.quiet), prefix="embgeom text")
    with prog.phase("loading the model"):
        ...
    with prog.bar(total=138, desc="texts", unit="text") as bar:
        bar.update(32)
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator

from .formatting import counted, seconds
from .interrupts import raise_swallowed


def wanted(quiet: bool = False, stream=None) -> bool:
    """Progress is shown: not quiet, and the stream (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return not quiet and bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced by an object without isatty
        return False


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


LOG_SECONDS = 60.0  # a log's lines of a long phase or bar: one this often


def _line(stream, text: str) -> None:
    """One line on stream; nothing where it cannot take it (None, closed, no flush): a caller's
    replaced stderr never ends a run (tqdm's bars had skipped such streams too)."""
    try:
        stream.write(text + "\n")
        flush = getattr(stream, "flush", None)
        if flush is not None:
            flush()
    except (AttributeError, OSError, ValueError):
        pass


class _Logged:
    """A bar as plain lines (a log, or a terminal without tqdm): where it starts, its count every
    LOG_SECONDS with the time so far and the time left, and where it ends."""

    def __init__(self, stream, label: str, total: int | None, unit: str, initial: int = 0):
        self.stream, self.label, self.total, self.unit = stream, label, total, unit
        self.n = self.initial = initial
        self.start = self.last = time.perf_counter()
        _line(stream, f"{label}: {self._count()}" + (" (resumed)" if initial else ""))

    def _count(self) -> str:
        plural = self.unit[:-1] + "ies" if self.unit.endswith("y") else None  # (query: queries)
        if not self.total:
            return counted(self.n, self.unit, plural)
        return f"{self.n:,}/{counted(self.total, self.unit, plural)} ({100 * self.n / self.total:.0f} %)"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_SECONDS:
            self.last = now
            spent, done = now - self.start, self.n - self.initial
            left = f", about {seconds((self.total - self.n) * spent / done)} left" \
                if self.total and done > 0 and self.n < self.total else ""
            _line(self.stream, f"{self.label}: {self._count()} after {seconds(spent)}{left}")

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        _line(self.stream, f"{self.label}: {self._count()} in {seconds(time.perf_counter() - self.start)}")


class Progress:
    """enabled False: every bar and phase is silent. prefix: the command, e.g. "embgeom text".
    log: plain lines (a log file) rather than tqdm's redrawn ones."""

    def __init__(self, enabled: bool = False, prefix: str = "embgeom", stream=None, log: bool = False):
        self.enabled = enabled
        self.prefix = prefix
        self.stream = sys.stderr if stream is None else stream
        self.log = log

    def _sizing(self) -> dict:
        # a terminal that reports no size (a bare pty) would hide the bar: 100 x 50 then
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            size = os.terminal_size((0, 0))
        return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 50}

    def _tqdm(self, **kwargs):
        if self.log:
            return None
        try:
            # tqdm.auto's notebook bar without ipywidgets warned "IProgress not found" and drew
            # text whose cursor moves a notebook ignores: widgets only where they exist
            if _notebook_widgets():
                from tqdm.notebook import tqdm

                sizing = {}  # (a width in columns becomes one in pixels: 100 px wide)
            else:
                from tqdm.std import tqdm

                sizing = self._sizing()
        except ImportError:
            return None
        return tqdm(file=self.stream, leave=True, **sizing, **kwargs)

    def tqdm_options(self, desc: str, unit: str) -> dict | None:
        """Keyword arguments for a library's own tqdm bar (umap-learn's `tqdm_kwds`), drawn like
        ours and gone when done (it runs under a phase's clock, whose line stays: left, it had
        been overwritten by the clock's last line); None when progress is off."""
        if not self.enabled or self.log:  # (a log has the phase's lines)
            return None
        return {"file": self.stream, "leave": False, "disable": False, "desc": f"{self.prefix}: {desc}",
                "unit": unit, "mininterval": 0.25, "bar_format": None, **self._sizing()}

    @contextlib.contextmanager
    def bar(self, total: int | None, desc: str, unit: str = "it", unit_scale: bool = False,
            initial: int = 0) -> Iterator:
        """A bar of `total` steps (None: a counter); yields an object with update(n).
        unit_scale: counts shown as 1.2M (pairs). initial: steps done before (a resumed run:
        counted in the position, not in the rate)."""
        raise_swallowed()  # (an interrupt a finalizer dropped stops the run here)
        if not self.enabled:
            yield _Null()
            return
        label = f"{self.prefix}: {desc}"
        bar = self._tqdm(total=total, desc=label, unit=unit, unit_scale=unit_scale,
                         mininterval=0.25, initial=initial) or _Logged(self.stream, label, total, unit, initial)
        try:
            yield bar
        finally:
            bar.close()

    @contextlib.contextmanager
    def phase(self, desc: str) -> Iterator[None]:
        """A phase without a count: its elapsed time ticks twice a second until it ends (a log:
        a line where it starts, one every LOG_SECONDS and one where it ends)."""
        raise_swallowed()
        if not self.enabled:
            yield
            return
        label = f"{self.prefix}: {desc}"
        bar = self._tqdm(total=None, desc=label, bar_format="{desc} {elapsed}")
        start = time.perf_counter()
        if bar is None:
            _line(self.stream, label + " ...")
        stop = threading.Event()

        def tick():
            if bar is None:  # plain lines: the time so far every LOG_SECONDS
                while not stop.wait(LOG_SECONDS):
                    _line(self.stream, f"{label}: {seconds(time.perf_counter() - start)} so far")
                return
            while not stop.wait(0.5):
                bar.refresh()

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        finished = False
        try:
            yield
            finished = True
        finally:
            stop.set()
            thread.join()
            if bar is None:
                _line(self.stream, f"{label}: {'done in' if finished else 'stopped after'} "
                                   f"{seconds(time.perf_counter() - start)}")
            else:
                bar.close()


def _notebook_widgets() -> bool:
    """Running in a Jupyter kernel that can show ipywidgets (tqdm.notebook's bars)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        if shell is None or "IPKernelApp" not in shell.config:
            return False
        import ipywidgets  # noqa: F401
    except Exception:  # noqa: BLE001 - no kernel, no widgets, or an IPython without these
        return False
    return True


def _redrawn(stream) -> bool:
    """Bars can be redrawn in place on `stream`: a terminal, or a notebook with widgets."""
    return wanted(stream=stream) or _notebook_widgets()


def as_progress(progress, prefix: str) -> Progress:
    """A function's `progress=` argument (a bool or a Progress) as a Progress: True shows it
    whatever stderr is (the caller asked): bars on a terminal or as a notebook's widgets, else
    plain lines (a log, a notebook without ipywidgets: a phase's start and end, a bar's count
    every LOG_SECONDS; redrawn bars had left hundreds of lines in a saved notebook). False (or
    None) is silent."""
    if isinstance(progress, Progress):
        return progress
    if progress is not None and not isinstance(progress, bool):
        from .validation import flag

        progress = flag(progress, "progress")  # ("no" had shown the bars)
    return Progress(enabled=bool(progress), prefix=prefix, log=bool(progress) and not _redrawn(sys.stderr))
