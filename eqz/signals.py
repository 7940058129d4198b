"""What the process undoes when SIGTERM, SIGHUP or SIGQUIT ends it (`kill`, a closed terminal, Ctrl-\\): Ctrl-C
unwinds through ``with`` and ``finally``, and these do not."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

KILLING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextmanager
def undone_if_killed(undo: Callable[[], None]) -> Iterator[None]:
    """Run ``undo`` if a signal of ``KILLING`` ends the process meanwhile, then die of it as before; nested, the
    inner undo runs first. Main thread only, and only over default handlers or its own (a handler of another's,
    such as the server's, stays in charge).

    Undone in the handler, not by raising there: an exception raised in a ctypes callback (the meter's taps run
    inside llama_decode) or in a ``__del__`` is printed and dropped, and the process went on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = {number: handler for number in KILLING
             if (handler := signal.getsignal(number)) == signal.SIG_DFL or getattr(handler, "undoes", False)}

    def undo_and_die(number: int, frame) -> None:
        try:
            undo()
        finally:
            if outer[number] != signal.SIG_DFL:
                outer[number](number, frame)
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    undo_and_die.undoes = True
    for number in outer:
        signal.signal(number, undo_and_die)
    try:
        yield
    finally:
        for number, handler in outer.items():
            signal.signal(number, handler)
