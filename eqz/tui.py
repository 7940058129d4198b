"""The chat screen: a line editor between replies; while a reply streams, an equalizer panel and hotkeys.

The panel (rich Live) shows one bar per band, the active preset, the sampling settings and tokens/s. Keys are
read on a thread in cbreak mode, so a key press never waits for a token; the gain it sets is applied by the
decode loop before the very next token. The terminal is restored on exit, Ctrl-C or any error.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import sys
import termios
import threading
import time
import tty
from contextlib import nullcontext, suppress
from typing import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from .bands import SHORT_NAMES
from .bank import train_hint
from .chat import KEY_HELP, ChatCommands, vectors_in_use
from .display import reading
from .errors import EqzError
from .presets import describe_filters
from .threads import crowding_hint
from .session import ChatSession, Turn
from .signals import undone_if_killed

STEP = 0.1
LIMIT = 2.0
_UP_BLOCKS = " ▁▂▃▄▅▆▇█"

# -------------------------------------------------------------------------------------------------- state


class Equalizer:
    """What the panel shows and the hotkeys change."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.selected = 0
        self.tokens_per_second = 0.0
        self.levels: dict[str, float] | None = {} if session.meter_on else None  # smoothed meter readouts
        self.refused: str | None = None  # why the last key's move was refused, shown until the next key
        self.noted: str | None = None  # a move made that does nothing (a filter overrides the held slider), as refused
        self.typed = ""  # the next message, typed while a reply streams: it waits at the prompt
        self.lock = threading.Lock()

    def update_meter(self, smoothing: float = 0.3) -> None:
        """Fold the latest readout into the shown levels (exponential smoothing over the last few tokens)."""
        instruments = self.session.instruments
        if self.levels is None or instruments is None or instruments.latest is None:
            return
        with self.lock:
            for band, value in zip(instruments.metered, instruments.latest):
                previous = self.levels.get(band)
                self.levels[band] = float(value) if previous is None else previous + smoothing * (float(value) - previous)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.session.steerer.bands

    def press(self, key: str) -> None:
        """Apply a hotkey; a gain change is handed to the session for the next token (one the filters cannot hold
        is not made, and the panel says why until the next key). Text that is not a hotkey starts the next message,
        and from then on letters and digits are its text ("tell me more" reset every slider at its "r")."""
        with self.lock:
            if key in ("backspace", "enter") or (len(key) == 1 and (self.typed or key not in HOTKEYS or not self.bands)):
                self._type(key)
                return
            if not self.bands:
                return
            self.refused = self.noted = None
            try:
                self._apply(key)
            except EqzError as error:
                self.refused = str(error)

    def type_only(self, key: str) -> None:
        """A key pressed while a reply streams without the panel (no hotkeys there): text of the next message, as
        under the panel. It was echoed into the reply's text, and readline took arrows for history."""
        if key in ("backspace", "enter") or len(key) == 1:
            with self.lock:
                self._type(key)

    def _type(self, key: str) -> None:
        if key == "backspace":
            self.typed = self.typed[:-1]
        elif key == "enter":  # does not send (the reply is not over); a pasted line break joins the lines with a space
            if self.typed and not self.typed.endswith(" "):
                self.typed += " "
        else:
            self.typed += key

    def _apply(self, key: str) -> None:
        band = self.bands[self.selected]
        steering = self.session.pending_or_current_steering()
        gain = steering.gain(band)
        if key == "left":
            self.selected = (self.selected - 1) % len(self.bands)
        elif key == "right":
            self.selected = (self.selected + 1) % len(self.bands)
        elif key.isdigit():
            index = (int(key) - 1) % 10
            if index < len(self.bands):
                self.selected = index
        elif key in ("up", "down"):
            step = STEP if key == "up" else -STEP
            moved = round(max(-LIMIT, min(LIMIT, gain + step)), 2)
            self.session.request_steering(steering.with_gain(band, moved))
            self.noted = next(iter(self.session.overridden({band: moved})), None)  # as /set says it
        elif key == "z":
            self.session.request_steering(steering.with_gain(band, 0.0))
        elif key == "r":
            self.session.request_steering(steering.with_gains({b: 0.0 for b in self.bands}))


# -------------------------------------------------------------------------------------------------- drawing


def shown_gain(gain: float) -> str:
    """A gain as the panel and the summaries show it, in at most 4 characters (a narrow panel's column): to 0.1,
    unless that would hide it (a held band at +0.04 is clamped, though "+0.0" said it was off): "+.04"."""
    if gain != 0 and round(gain, 1) == 0:
        return f"{gain:+.2f}".replace("0.", ".", 1)
    return f"{gain:+.1f}"


def _bar_cells(gain: float) -> tuple[str, str, str, str]:
    """Four cells, top to bottom: two above the zero line (1.0 each), two below."""
    up = [min(max(gain - offset, 0.0), 1.0) for offset in (1.0, 0.0)]
    down = [min(max(-gain - offset, 0.0), 1.0) for offset in (0.0, 1.0)]
    cells = [_UP_BLOCKS[round(f * 8)] for f in up]
    cells += ["█" if f >= 0.875 else "▀" if f >= 0.375 else "▔" if f > 0 else " " for f in down]
    return tuple(cells)  # type: ignore[return-value]


COMPACT_BELOW_ROWS = 24  # shorter terminals get the panel without bars (6 rows instead of 12)


MIN_COLUMN = 5  # a band's column at its narrowest: a value such as +0.4, and a space


def _bands_in_view(count: int, selected: int, width: int) -> tuple[int, range]:
    """The bands a panel ``width`` wide has columns for, as (first, indices), the selected one among them: below 60
    columns ten bands did not fit, and the rows of values wrapped into two."""
    fit = max(1, (width - 10) // MIN_COLUMN)  # 10: the borders, the padding and the row names
    if fit >= count:
        return 0, range(count)
    first = min(max(0, selected - fit // 2), count - fit)
    return first, range(first, first + fit)


def render_panel(equalizer: Equalizer, width: int, compact: bool = False) -> Panel:
    """The equalizer: per band the gain set (green/red bar) and, with the meter on, the level the model is at
    (cyan/magenta bar), side by side; then the sampling settings, tokens/s and the key map. ``compact``: the
    numbers only, for small terminals, so the reply keeps most of the screen."""
    session = equalizer.session
    bands = equalizer.bands
    steering = session.pending_or_current_steering()
    levels = equalizer.levels
    lines: list[Text] = []
    if bands:
        bar = 2 if levels is None else 1
        first, in_view = _bands_in_view(len(bands), equalizer.selected, width)
        column = max(MIN_COLUMN, min(7, (width - 10) // len(in_view)))
        label = Text()  # a narrow panel names the bands it shows by their keys, with arrows where more are
        if len(in_view) < len(bands):
            before, after = "‹" if first else " ", "›" if first + len(in_view) < len(bands) else ""
            heading = f"{before}{first + 1}-{first + len(in_view)}{after}"
            heading = heading if len(heading) <= 5 else f"{before}   {after or ' '}"  # bands 11 on: the arrows only
            label.append(heading.ljust(5) + " ", style="dim")
        else:
            label.append("      ")
        for index in in_view:
            style = "reverse bold" if index == equalizer.selected else "bold"
            label.append(SHORT_NAMES.get(bands[index], bands[index][:5]).center(column - 1)[: column - 1], style=style)
            label.append(" ")
        lines.append(label)
        gains = [steering.gain(bands[index]) for index in in_view]
        metered = [levels.get(bands[index]) if levels else None for index in in_view]
        for row, axis in enumerate(() if compact else ("  +2 ", "  +1 ", "  -1 ", "  -2 ")):
            line = Text(axis + " ", style="dim")
            for gain, level in zip(gains, metered):
                cell = Text()
                cell.append(_bar_cells(gain)[row] * bar, style="green" if gain > 0 else "red")
                if levels is not None:
                    shown = 0.0 if level is None else max(-LIMIT, min(LIMIT, level))
                    cell.append(_bar_cells(shown)[row], style="cyan" if shown > 0 else "magenta")
                pad = column - 1 - cell.cell_len
                line.append(" " * (pad // 2))
                line.append_text(cell)
                line.append(" " * (pad - pad // 2 + 1))
            lines.append(line)
            if row == 1:
                lines.append(Text("   0 " + "─" * (column * len(in_view) + 1), style="dim"))
        values = Text(" set  ", style="green")  # the row names in their bars' colours: the legend
        for gain in gains:
            values.append(shown_gain(gain).center(column - 1), style="green" if gain > 0 else "red" if gain < 0 else "dim")
            values.append(" ")
        lines.append(values)
        if levels is not None:
            meter = Text(" now  ", style="cyan")
            for level in metered:
                shown = "  ·" if level is None else f"{level:+.1f}"
                meter.append(shown.center(column - 1), style="cyan")
                meter.append(" ")
            lines.append(meter)
    else:
        lines.append(Text(f"no emotion bank for this model: {train_hint(session.model.info)}", style="yellow"))
    s = session.sampling
    filters = session.filters.describe() if session.filters else None
    status = (
        f"temp {s.temperature:.2f} · top-p {s.top_p:.2f} · top-k {s.top_k} · min-p {s.min_p:.2f} · "
        f"repeat {s.repeat_penalty:.2f} · {equalizer.tokens_per_second:.0f} tok/s"
    )
    if compact:
        status = f"temp {s.temperature:.2f} · {equalizer.tokens_per_second:.0f} tok/s · /help for keys"
    lines.append(Text(status, style="dim"))
    if filters and (filters["clamp"] or filters["ablate"]):
        lines.append(Text("filters: " + describe_filters(filters), style="yellow"))
    if steering.vectors:  # they steer beside the sliders, which do not show them
        lines.append(Text(vectors_in_use(steering), style="yellow", overflow="ellipsis", no_wrap=True))
    if equalizer.refused:
        lines.append(Text(f"not moved: {equalizer.refused}", style="red", overflow="ellipsis", no_wrap=True))
    elif equalizer.noted:
        lines.append(Text(f"note: {equalizer.noted}", style="yellow", overflow="ellipsis", no_wrap=True))
    if equalizer.typed:  # what is typed while the reply streams: the next message, at the prompt after it
        lines.append(Text(f"you> {equalizer.typed[-max(8, width - 12):]}▏", style="bold", no_wrap=True))
    elif not compact:
        lines.append(Text(KEY_HELP, style="dim"))
    title = f"eqz · {session.model.info.name}" + (f" · preset {session.preset}" if session.preset else "")
    return Panel(Group(*lines), title=Text(title), title_align="left", border_style="blue", width=width)


def reply_text(text: str, changes: list[dict], start: dict[str, float]) -> Text:
    """The reply with a dim marker where each live slider change took effect, naming only the bands that moved
    (from the ``start`` sliders the reply began with)."""
    rendered = Text()
    cursor = 0
    previous = start
    for change in changes:
        offset = change["text_offset"]
        rendered.append(text[cursor:offset])
        gains = change["sliders"]
        moved = [f"{b} {shown_gain(g)}" for b, g in gains.items() if previous.get(b, 0.0) != g] or ["vectors"]
        rendered.append(f"⟨{', '.join(moved)}⟩", style="dim italic")
        previous = gains
        cursor = offset
    rendered.append(text[cursor:])
    return rendered


# -------------------------------------------------------------------------------------------------- keys


KEY_SEQUENCES = {
    b"\x1b[A": "up", b"\x1b[B": "down", b"\x1b[C": "right", b"\x1b[D": "left",
    b"\x1bOA": "up", b"\x1bOB": "down", b"\x1bOC": "right", b"\x1bOD": "left",
}


HOTKEYS = "1234567890zr"


def parse_keys(buffer: bytes) -> tuple[list[str], bytes]:
    """Key names (arrows, "backspace") and typed characters found in ``buffer``, and the bytes of an unfinished
    escape sequence or UTF-8 character to keep for later."""
    keys = []
    while buffer:
        if buffer.startswith(b"\x1b"):
            match = next((seq for seq in KEY_SEQUENCES if buffer.startswith(seq)), None)
            if match:
                keys.append(KEY_SEQUENCES[match])
                buffer = buffer[len(match):]
                continue
            if len(buffer) < 3 and any(seq.startswith(buffer) for seq in KEY_SEQUENCES):
                break  # wait for the rest of the sequence
            other = _OTHER_KEY.match(buffer)  # another key (Home, F5, a mouse report) or Alt+key: no text, no hotkey
            if other is None and _OTHER_KEY_BEGUN.fullmatch(buffer):
                break
            buffer = buffer[other.end() if other else 1:]
            continue
        size = next((n for n in range(1, 5) if _decodes(buffer[:n])), None)
        if size is None:
            if len(buffer) < 4 and _begins_a_character(buffer):
                break  # the rest of a character typed in UTF-8
            buffer = buffer[1:]  # not UTF-8: dropped
            continue
        char, buffer = buffer[:size].decode(), buffer[size:]
        if char in ("\x7f", "\b"):
            keys.append("backspace")
        elif char in ("\r", "\n"):
            keys.append("enter")
        elif char.isprintable():  # Tab and other controls are not text of the message
            keys.append(char)
    return keys, buffer


# CSI and SS3 sequences (parameters, intermediates, a final byte), or ESC and one more key (Alt+key)
_OTHER_KEY = re.compile(rb"\x1b(?:[\[O][\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]|[^\[O\x1b])")
_OTHER_KEY_BEGUN = re.compile(rb"\x1b[\[O][\x30-\x3f]*[\x20-\x2f]*")


def _decodes(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def _begins_a_character(data: bytes) -> bool:
    """Whether ``data`` is the start of a UTF-8 character still to be completed."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data)
        return True
    except UnicodeDecodeError:
        return False


class KeyReader:
    """Reads hotkeys on a thread while a reply streams; the terminal mode is always restored."""

    def __init__(self, on_key: Callable[[str], None]):
        self.on_key = on_key
        self.fd = sys.stdin.fileno()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.saved = None
        self._guard = None  # restores the terminal if SIGTERM, SIGHUP or Ctrl-\ ends the chat mid-reply

    def __enter__(self) -> "KeyReader":
        self.saved = termios.tcgetattr(self.fd)
        # keys arrive at once, no echo; Ctrl-C still raises SIGINT. TCSANOW keeps keys pressed since Enter, which
        # the default (TCSAFLUSH) threw away: Up pressed at once after a message did not move its slider
        tty.setcbreak(self.fd, termios.TCSANOW)
        # `kill` or a closed window mid-reply left the terminal without echo, the cursor hidden by the live panel
        self._guard = undone_if_killed(self._restore)
        self._guard.__enter__()
        self._suspend_default = signal.signal(signal.SIGTSTP, self._suspend)
        self.thread.start()
        return self

    def _suspend(self, number: int, _frame) -> None:
        """Ctrl-Z mid-reply: the shell gets the terminal back as it was (echo, the cursor the panel hides), and the
        reply goes on in cbreak mode after `fg` (the shell's prompt had no cursor)."""
        self._restore()
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)  # stopped here until SIGCONT
        signal.signal(number, self._suspend)
        tty.setcbreak(self.fd, termios.TCSANOW)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=1)
        self._guard.__exit__(None, None, None)
        signal.signal(signal.SIGTSTP, self._suspend_default)
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def _restore(self) -> None:
        termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        sys.stdout.write("\x1b[?25h\n")  # the cursor back, below the last line
        sys.stdout.flush()

    def _run(self) -> None:
        pending = b""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 64)
            except OSError:
                return
            keys, pending = parse_keys(pending + chunk)
            for key in keys:
                self.on_key(key)


# -------------------------------------------------------------------------------------------------- the loop


def _read_line(console: Console, typed: str = "") -> str | None:
    """One line of input, begun with ``typed`` (typed while the last reply streamed); None on Ctrl-D. Ctrl-C at the
    prompt only clears the line."""
    try:
        import readline  # line editing and history for input()
    except ImportError:
        readline = None
    if readline:  # a pasted text of several lines is one message (CPython turns bracketed paste off: each line was
        readline.parse_and_bind("set enable-bracketed-paste on")  # sent alone, the rest left as typed-ahead text)
    if readline and typed:
        readline.set_startup_hook(lambda: readline.insert_text(typed))
    while True:
        try:
            try:
                line = input("you> ")
            finally:  # once: Ctrl-C at the prompt clears the typed text too
                if readline:
                    readline.set_startup_hook(None)
            if not (sys.stdin.isatty() and console.is_terminal):  # piped in or out (`| tee log`): the output never
                console.print(line, markup=False, highlight=False)  # held the line, so a transcript would lack it
            return line
        except EOFError:
            console.print()
            return None
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /quit to leave)[/dim]")


def run_chat(session: ChatSession, panel: bool = True, console: Console | None = None, debug: bool = False,
             keep: bool = True) -> None:
    """The chat loop. No error ends it: the conversation so far stays, for the next line or for /save. Leaving,
    however it happens (Ctrl-D, /quit, `kill`, a closed window), ``keep`` writes a conversation not yet saved to
    the chats folder."""
    console = console or Console(highlight=False)
    console.soft_wrap = not console.is_terminal  # a file or a pipe gets lines whole, not cut at 80 columns
    commands = ChatCommands(session)
    with undone_if_killed(lambda: _keep(commands, _written_raw)) if keep else nullcontext():
        try:
            _converse(session, commands, console, panel and console.is_terminal and sys.stdin.isatty(), debug)
        finally:
            if keep:
                _keep(commands, lambda line: console.print(line, style="dim", markup=False))


def _keep(commands: ChatCommands, say: Callable[[str], None]) -> None:
    """Keep the conversation on leaving, and say where (the terminal may be gone: a closed window)."""
    try:
        kept = commands.keep()
    except EqzError as error:
        message = f"error: {error}; the conversation was not kept"
    else:
        if kept is None:
            return
        message = f"kept this conversation in {kept}; eqz chat --resume FILE goes on with it"
    with suppress(OSError):
        say(message)


def _written_raw(line: str) -> None:
    """A line straight to the terminal, from a signal handler: rich's console waits for the live panel's lock, whose
    refresh thread may wait for the equalizer's lock, which the interrupted main thread may hold; on a line of its
    own (a plain reply's text ran on into it)."""
    os.write(sys.stdout.fileno(), f"\n{line}\n".encode())


def _converse(session: ChatSession, commands: ChatCommands, console: Console, panel: bool, debug: bool) -> None:
    equalizer = Equalizer(session)
    info = session.model.info
    console.print(f"[bold]eqz chat[/bold] · {escape(info.name)} · /help for commands, Ctrl-C stops a reply, "
                  "Ctrl-D leaves")
    if session.history:  # resumed: where it left off
        console.print(f"[dim](going on with {len(session.history)} messages; the last:)[/dim]")
        for message in session.history[-2:]:
            console.print(("you> " if message["role"] == "user" else "") + message["content"], markup=False)
        if (session.history[-1].get("reply") or {}).get("finish_reason") == "interrupted":
            console.print("[dim]\\[stopped][/dim]")  # as it ended on the screen
    if panel and equalizer.bands:
        console.print(_panel(equalizer, console))
    equalizer.typed = session.unanswered or ""  # at the prompt again, to send with Enter
    while True:
        with equalizer.lock:
            typed, equalizer.typed = equalizer.typed, ""
        line = _read_line(console, typed)
        if line is None:
            return
        if not line.strip():
            continue
        with equalizer.lock:  # said of the last reply's key presses; a command or a new message makes it stale
            equalizer.refused = equalizer.noted = None
        try:
            if line.lstrip().startswith("/"):
                result = commands.handle(line)
                if result.show_panel and panel:
                    console.print(_panel(equalizer, console))
                if result.message and not (result.show_panel and panel and result.panel_says_it):
                    console.print(result.message, markup=False)
                if result.quit:
                    return
                continue
            turn = _start_reply(session, line, console)
            if turn is None:  # stopped while it was read in: the message waits at the prompt again
                equalizer.typed = line
                continue
            if panel:
                _stream_with_panel(turn, equalizer, console)
            else:
                _stream_plain(turn, equalizer)
                _report_end(turn, console)
        except EqzError as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
        except KeyboardInterrupt:  # a second Ctrl-C after a reply stopped, or one during a command: the chat goes on
            session.forget_unanswered()
            console.print("\n[dim]\\[stopped] (Ctrl-D or /quit to leave)[/dim]")
        except Exception as error:  # an eqz bug, which must not cost the user the conversation
            if debug:
                console.print_exception()
            console.print(f"[red]error:[/red] unexpected {type(error).__name__}: {escape(str(error))} (an eqz bug; "
                          "the chat goes on, and /save keeps it)")


def _panel(equalizer: Equalizer, console: Console) -> Panel:
    """The panel sized for the terminal as it is now (it may have been resized since the last token)."""
    return render_panel(equalizer, min(console.width, 100), compact=console.height < COMPACT_BELOW_ROWS)


def _start_reply(session: ChatSession, text: str, console: Console) -> Turn | None:
    try:
        with reading(text, console):
            turn = session.reply(text)
    except KeyboardInterrupt:  # Ctrl-C while the prompt was being read in: nothing was said yet
        console.print("\n[dim]\\[stopped before the reply: your message is back at the prompt][/dim]")
        return None
    if turn.record.dropped_messages:
        console.print(f"[dim](dropped the {turn.record.dropped_messages} oldest messages to fit the context)[/dim]")
    return turn


def _stream_plain(turn: Turn, equalizer: Equalizer) -> None:
    out = sys.stdout
    with turn.ctrl_c_stops(), KeyReader(equalizer.type_only) if sys.stdin.isatty() else nullcontext():
        for piece in turn:
            out.write(piece)
            out.flush()
    out.write("\n")


def _stream_with_panel(turn: Turn, equalizer: Equalizer, console: Console) -> None:
    """Stream under the live panel, then print the reply with its change markers, how it ended and a summary."""
    started = time.perf_counter()
    count = 0
    start = turn.record.steering["sliders"]

    def screen():
        width = min(console.width, 100)
        with equalizer.lock:
            board = _panel(equalizer, console)
        board_height = len(console.render_lines(board, console.options.update(width=width)))
        room = max(3, console.height - board_height - 2)
        body = reply_text(turn.text, list(turn.record.changes), start)
        lines = body.wrap(console, width)
        tail = Text("\n").join(lines[-room:]) if len(lines) else Text("")
        return Group(tail, board)

    with turn.ctrl_c_stops(), KeyReader(equalizer.press), Live(
        get_renderable=screen, console=console, transient=True, refresh_per_second=15, redirect_stdout=False
    ):
        for _ in turn:
            count += 1
            equalizer.tokens_per_second = count / max(time.perf_counter() - started, 1e-6)
            equalizer.update_meter()
    console.print(reply_text(turn.text, turn.record.changes, start))
    _report_end(turn, console)
    steering = turn.session.steering
    summary = "  ".join([f"{b} {shown_gain(g)}" for b, g in steering.gains]
                        + [vectors_in_use(steering)] * bool(steering.vectors)) or "all sliders at 0"
    console.print(f"[dim]{summary} · {turn.record.n_tokens} tokens · {equalizer.tokens_per_second:.0f} tok/s[/dim]")
    hint = crowding_hint(turn.session.model.threads, turn.record.n_tokens)
    if hint:
        console.print(f"[yellow]{hint}[/yellow]")


def _report_end(turn: Turn, console: Console) -> None:
    if turn.record.finish_reason == "interrupted":
        console.print("[dim]\\[stopped][/dim]")
    elif turn.record.finish_reason == "length":
        console.print(f"[dim]\\[cut at {turn.record.n_tokens} tokens: /max-tokens N for longer replies][/dim]")
    elif turn.record.finish_reason == "context":
        console.print("[dim]\\[the context is full: the oldest turns will be dropped next time][/dim]")
