"""Interrupts that keep finished work: SIGTERM (a scheduler's stop, `kill`) taken as Ctrl-C
while a run can save, and Ctrl-C held back until a block of work is whole. Used by the runs
that checkpoint (the text trace, `pairs_above`)."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


def _raise_interrupt(signum=None, frame=None) -> None:
    """SIGTERM's handler under terminate_as_interrupt (and SIGINT's where it was Python's own):
    KeyboardInterrupt, unless the handler runs inside the unraisable hook, where a raise is lost
    without a trace (a second signal right after a first one dropped in a finalizer had let a
    run end with status 0): there the stop is noted for raise_swallowed."""
    global _swallowed
    if _inside_hook(frame):
        _swallowed = True
        return
    _swallowed = False   # (a stop noted before is this one)
    raise KeyboardInterrupt


# A signal's KeyboardInterrupt raised while Python runs a finalizer or a weakref callback is
# printed as "Exception ignored" and dropped: a SIGTERM there had let a run finish with status 0.
# While terminate_as_interrupt is active such a drop is noted and raised again at the next safe
# point (raise_swallowed: a progress phase or bar, an interrupt_after block, a figure saved).
# (Delivering it again at once from another thread raced with signals still arriving: a second
# stop raised inside the first's clean-up, cutting short the restoring of the handlers.)
_swallowed = False


def _note_swallowed(previous):
    def hook(unraisable) -> None:
        global _swallowed
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _swallowed = True
            return
        previous(unraisable)
    return hook


_HOOK_CODE = _note_swallowed(None).__code__


def _inside_hook(frame) -> bool:
    """Whether `frame` (a signal handler's) is the unraisable hook's or one it called."""
    while frame is not None:
        if frame.f_code is _HOOK_CODE:
            return True
        frame = frame.f_back
    return False


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
    # Ctrl-C too, where Python's own handler has it: the same raise, hook-aware (_raise_interrupt)
    own_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own_int:
        signal.signal(signal.SIGINT, _raise_interrupt)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _note_swallowed(previous_hook)
    try:
        yield
    except BaseException:
        _swallowed = False  # (the run is ending anyway)
        raise
    finally:
        # every step taken even when one raises: a signal left pending by a handler that raised
        # runs at the next explicit check, which signal.signal makes before it sets anything
        # (Ctrl-C and SIGTERM together had left SIGINT or SIGTERM on this module's handler)
        stopped = False
        for restore in (lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
                        lambda: own_int and signal.getsignal(signal.SIGINT) is _raise_interrupt
                        and signal.signal(signal.SIGINT, signal.default_int_handler)):
            for _ in range(3):   # (the pending handler runs once: the next try restores)
                try:
                    restore()
                    break
                except KeyboardInterrupt:
                    stopped = True
        sys.unraisablehook = previous_hook
        if stopped and sys.exc_info()[0] is None:
            _swallowed = True   # (raised just below)
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
    ours = {signal.SIGINT: (signal.default_int_handler, _raise_interrupt), signal.SIGTERM: (_raise_interrupt,)}
    held = {sig: signal.getsignal(sig) for sig, hs in ours.items() if signal.getsignal(sig) in hs}
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
