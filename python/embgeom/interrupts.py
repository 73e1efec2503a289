"""Interrupts that keep finished work: SIGTERM (a scheduler's stop, `kill`) taken as Ctrl-C
while a run can save, and Ctrl-C held back until a block of work is whole. Used by the runs
that checkpoint (the text trace, `pairs_above`)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt(active: bool = True) -> Iterator[None]:
    """While a checkpoint can keep the finished work: SIGTERM (a scheduler's stop, `kill`) ends
    the run the way Ctrl-C does, so the sums are saved first. Main thread, default handler only."""
    if not active or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C (SIGINT), and SIGTERM under terminate_as_interrupt, during the block raise
    KeyboardInterrupt when the block ends, so running sums are never left half-updated. Only in
    the main thread and for those handlers (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
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
        raise KeyboardInterrupt
