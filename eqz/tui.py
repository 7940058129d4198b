"""The chat screen: read a line, run slash commands, stream replies, stop a reply on Ctrl-C."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

from .chat import ChatCommands
from .errors import EqzError
from .session import ChatSession, Turn


@contextmanager
def ctrl_c_stops(turn: Turn) -> Iterator[None]:
    """While inside, Ctrl-C ends the reply between two tokens instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda *_: turn.stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_line(console: Console) -> str | None:
    """One line of input; None on Ctrl-D. Ctrl-C at the prompt only clears the line."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            return input("you> ")
        except EOFError:
            console.print()
            return None
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /quit to leave)[/dim]")


def run_chat(session: ChatSession, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    commands = ChatCommands(session)
    info = session.model.info
    console.print(f"[bold]eqz chat[/bold] · {info.name} · /help for commands, Ctrl-C stops a reply, Ctrl-D leaves")
    while True:
        line = _read_line(console)
        if line is None:
            return
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                result = commands.handle(line)
                if result.message:
                    console.print(result.message, markup=False, highlight=False)
                if result.quit:
                    return
                continue
            _stream_reply(session, line, console)
        except EqzError as error:
            console.print(f"[red]error:[/red] {error}", highlight=False)


def _stream_reply(session: ChatSession, text: str, console: Console) -> None:
    try:
        turn = session.reply(text)
    except KeyboardInterrupt:  # Ctrl-C while the prompt was being read in: nothing was said yet
        console.print("\n[dim]\\[stopped][/dim]")
        return
    if turn.record.dropped_messages:
        console.print(f"[dim](dropped the {turn.record.dropped_messages} oldest messages to fit the context)[/dim]")
    out = sys.stdout
    with ctrl_c_stops(turn):
        for piece in turn:
            out.write(piece)
            out.flush()
    out.write("\n")
    if turn.record.finish_reason == "interrupted":
        console.print("[dim]\\[stopped][/dim]")
    elif turn.record.finish_reason == "context":
        console.print("[dim]\\[the context is full: the oldest turns will be dropped next time][/dim]")
