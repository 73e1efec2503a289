"""Interrupts that keep finished work: SIGTERM (a scheduler's stop, `kill`) taken as Ctrl-C
while a run can save, and Ctrl-C held back until a block of work is whole. Used by the runs
that checkpoint (the text trace, `pairs_above`)."""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time
from typing import Iterator


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


# A signal's KeyboardInterrupt raised while Python runs a finalizer or a weakref callback is
# printed as "Exception ignored" and dropped: a SIGTERM there had let a run finish with status 0.
# While terminate_as_interrupt is active such a drop is noted and the signal delivered again to
# the main thread, whose handler raises it once the finalizer is over (one that lands in the next
# finalizer is dropped and delivered again); raise_swallowed raises it at the next safe point if
# it is still pending. Noted only, a stop in `vocab`'s plots had waited 6 s for the phase's end.
_swallowed = False


def _note_swallowed(previous):
    def hook(unraisable) -> None:
        global _swallowed
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _swallowed = True
            _thread.start_new_thread(_deliver_again, ())
            return
        previous(unraisable)
    return hook


def _deliver_again() -> None:
    """(Another thread) SIGTERM's handler again, terminate_as_interrupt's or an interrupt_after
    block's (none once it is SIG_DFL or SIG_IGN), a moment after the hook returned: tripped
    inside the hook, the handler ran there, where its raise was lost too. One that lands in a
    finalizer again is noted and delivered again; the flag stays set until a stop is raised, so
    raise_swallowed still catches one lost any other way."""
    time.sleep(0.001)
    if _swallowed and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        _thread.interrupt_main(signal.SIGTERM)


def raise_swallowed() -> None:
    """KeyboardInterrupt when a Ctrl-C or SIGTERM was dropped inside a finalizer since the last
    call (see _swallowed); called where a run can stop cleanly: the start of an interrupt_after
    block, of a progress phase or bar, and the end of terminate_as_interrupt. Not while an
    exception is being handled (a save after an interrupt runs to its end)."""
    global _swallowed
    if _swallowed and sys.exc_info()[0] is None:
        _swallowed = False
        raise KeyboardInterrupt


# A command-line command runs (cli, command_run): once its output is whole (output_complete), a
# Ctrl-C or SIGTERM can stop nothing, and ending with status 130 and "interrupted ... resumes"
# had misreported a finished run (a scheduler would count it failed and run it again).
_in_command = False


@contextlib.contextmanager
def command_run() -> Iterator[None]:
    """The body is one command-line command: output_complete takes effect in it, and the
    Ctrl-C handler it replaced is put back after (a command run by cli.main in a notebook)."""
    global _in_command
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before, _in_command = signal.getsignal(signal.SIGINT), True
    try:
        yield
    finally:
        _in_command = False
        with contextlib.suppress(TypeError, ValueError):   # (None: a handler set outside Python)
            signal.signal(signal.SIGINT, before)


def output_complete() -> None:
    """A command's output is whole and in place: from here to the command's end Ctrl-C and SIGTERM
    are ignored (command-line runs only, command_run; elsewhere nothing changes)."""
    if _in_command and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def terminate_as_interrupt(active: bool = True) -> Iterator[None]:
    """While a checkpoint can keep the finished work: SIGTERM (a scheduler's stop, `kill`) ends
    the run the way Ctrl-C does, so the sums are saved first. Main thread, default handler only."""
    if not active or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    global _swallowed
    _swallowed = False
    signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _note_swallowed(previous_hook)
    try:
        yield
    except BaseException:
        _swallowed = False  # (the run is ending anyway)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.unraisablehook = previous_hook
    raise_swallowed()


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C (SIGINT), and SIGTERM under terminate_as_interrupt, during the block raise
    KeyboardInterrupt when the block ends, so running sums are never left half-updated. Only in
    the main thread and for those handlers (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raise_swallowed()
    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_interrupt}
    held = {sig: h for sig, h in ours.items() if signal.getsignal(sig) is h}
    got: list = []
    for sig in held:
        signal.signal(sig, lambda *_: got.append(True))
    try:
        yield
    finally:
        for sig, h in held.items():
            signal.signal(sig, h)
    if got:
        global _swallowed
        _swallowed = False   # (raised now)
        raise KeyboardInterrupt
