"""What the process undoes when SIGTERM or SIGHUP ends it (`kill`, a closed terminal): Ctrl-C unwinds through
``with`` and ``finally``, and these two do not."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def undone_if_killed(undo: Callable[[], None]) -> Iterator[None]:
    """Run ``undo`` if SIGTERM or SIGHUP ends the process meanwhile, then die of that signal as before. Main thread
    only, and only over default handlers (an outer one stays in charge)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [number for number in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(number) == signal.SIG_DFL]

    def undo_and_die(number: int, _frame) -> None:
        undo()
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)

    for number in signals:
        signal.signal(number, undo_and_die)
    try:
        yield
    finally:
        for number in signals:
            signal.signal(number, signal.SIG_DFL)
