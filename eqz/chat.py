"""Chat slash commands: parse a line, act on the session, say what happened. No terminal I/O here."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from functools import partial
from typing import Callable

from .bands import BANDS, band_key, gain_warning, parse_set
from .bank import train_hint
from .errors import EqzError
from .files import write_new, xdg_home
from .presets import get_preset
from .sampling import as_number, make_sampling
from .session import ChatSession
from .steering import Steering

def chats_dir() -> Path:
    """Where eqz chat keeps a conversation left unsaved (``$XDG_STATE_HOME/eqz/chats``)."""
    return xdg_home("XDG_STATE_HOME", ".local/state") / "eqz" / "chats"


def vectors_in_use(steering: Steering, whole_paths: bool = False) -> str:
    """The control-vector files steering beside the sliders: "vectors: sad.gguf x1.5" (the panel has room for the
    file's name; /sliders gives the path)."""
    return "vectors: " + ", ".join(f"{path if whole_paths else Path(path).name} x{scale:g}"
                                   for path, scale in steering.vectors)


KEY_HELP = "←→/1-0 band  ↑↓ ±0.1  z zero  r all to 0  Ctrl-C stop"  # while a reply streams under the panel


@dataclass
class CommandResult:
    message: str = ""
    quit: bool = False
    show_panel: bool = False  # the screen should draw the equalizer
    panel_says_it: bool = False  # and then the message repeats what the panel shows (the sliders)


@dataclass(frozen=True)
class Command:
    usage: str
    summary: str
    run: Callable[["ChatCommands", list[str], str], CommandResult]
    text: bool = False  # takes the rest of the line as written (quotes and apostrophes are text, not shell syntax)


class ChatCommands:
    """The ``/command`` language of ``eqz chat``."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.saved_to: set[Path] = set()  # files this conversation was saved to, which /save may write again
        self._written = session.transcribed  # the messages as last written (a resumed file's): leaving keeps newer

    def handle(self, line: str) -> CommandResult:
        """Run one slash command line; raises EqzError with a one-line message for bad input."""
        name, _, rest = line.strip()[1:].partition(" ")
        command = COMMANDS.get(name.lower())
        if command is None:
            raise EqzError(f"unknown command /{name}; type /help for the list")
        if " " not in command.usage and rest.strip():  # "/quit now" quit, "/reset all" went unread
            raise EqzError(f"/{name.lower()} takes nothing after it; usage: {command.usage}")
        try:
            args = [] if command.text else shlex.split(rest)
        except ValueError as error:
            raise EqzError(f"could not parse /{name} arguments ({error}); usage: {command.usage}") from None
        return command.run(self, args, rest.strip())

    # -- the commands

    def help(self, _args: list[str], _rest: str) -> CommandResult:
        width = max(len(command.usage) for command in COMMANDS.values())
        lines = [f"  {command.usage:<{width}}  {command.summary}" for command in COMMANDS.values()]
        return CommandResult("\n".join([*lines, f"keys while a reply streams under the panel: {KEY_HELP}; other "
                                             "text starts your next message, which waits at the prompt"]))

    def system(self, _args: list[str], rest: str) -> CommandResult:
        self.session.system = rest or None
        return CommandResult(f"system prompt {'set' if rest else 'cleared (the model default applies)'}")

    def vector(self, args: list[str], _rest: str) -> CommandResult:
        if len(args) != 2:
            raise EqzError(f"usage: {COMMANDS['vector'].usage}")
        path, scale = Path(args[0]).expanduser(), as_number(args[1])
        if scale is None or not math.isfinite(scale):  # said as /vector takes it, not as --vector FILE:SCALE does
            raise EqzError(f"invalid scale '{args[1]}': {COMMANDS['vector'].usage} takes a finite number, e.g. "
                           "/vector joy.gguf 0.8")
        steering = self.session.pending_or_current_steering()
        if scale == 0 and str(path) not in dict(steering.vectors):
            return CommandResult(f"vector {path} was not in use: nothing to remove")
        self.session.set_steering(steering.with_vector(path, scale))
        return CommandResult(f"vector {path} {'removed' if scale == 0 else f'at scale {scale:g}'}")

    def set(self, args: list[str], _rest: str) -> CommandResult:
        if len(args) != 2:
            raise EqzError(f"usage: {COMMANDS['set'].usage}")
        band, gain = parse_set(f"{args[0]}={args[1]}", self.session.steerer.bands or BANDS)
        self.session.set_steering(self.session.pending_or_current_steering().with_gain(band, gain))
        doubts = self.session.steerer.bank.doubtful({band: gain}) if self.session.steerer.bank else []
        return CommandResult("\n".join([f"{band} = {gain:+.2f}{gain_warning(band, gain)}"] + doubts +
                                       self._overridden(band)))

    def sliders(self, _args: list[str], _rest: str) -> CommandResult:
        bands = self.session.steerer.bands
        if not bands:
            return CommandResult(f"no emotion bank for this model; {train_hint(self.session.model.info)}")
        steering = self.session.pending_or_current_steering()
        listing = "  ".join(f"{band} {steering.gain(band):+.2f}" for band in bands)
        vectors = "\n" + vectors_in_use(steering, whole_paths=True) if steering.vectors else ""
        return CommandResult(listing + vectors, show_panel=True, panel_says_it=True)

    def preset(self, args: list[str], _rest: str) -> CommandResult:
        if len(args) != 1:
            raise EqzError(f"usage: {COMMANDS['preset'].usage}")
        preset = get_preset(args[0], self.session.steerer.bands or BANDS)
        self.session.apply_preset(preset)
        described = f": {preset.description}" if preset.description else ""
        return CommandResult("\n".join([f"preset {preset.name}{described}"] + self._overridden()), show_panel=True)

    def sampling(self, args: list[str], _rest: str, setting: str = "") -> CommandResult:
        command = next(name for name, each in SAMPLING_COMMANDS.items() if each == setting)
        if len(args) != 1:
            raise EqzError(f"usage: /{command} VALUE")  # was /temperature for /temp
        if setting == "seed" and args[0].lower() == "random":  # a seed once set could not be let go
            self.session.sampling = replace(self.session.sampling, seed=None)
            self.session.own_sampling.pop("seed", None)
            return CommandResult("seed = random (each reply draws its own, recorded in /save)")
        try:
            self.session.sampling = make_sampling(self.session.sampling, **{setting: args[0]})
        except EqzError as error:  # named as typed: "/max-tokens must be >= 1", not max_tokens
            raise EqzError(f"/{command} {str(error).removeprefix(f'{setting} ')}") from None
        if setting in ("seed", "max_tokens"):  # the user's own: a /preset after it keeps it
            self.session.own_sampling[setting] = getattr(self.session.sampling, setting)
        return CommandResult(f"{command} = {getattr(self.session.sampling, setting)}")

    def clamp(self, args: list[str], _rest: str) -> CommandResult:
        if len(args) != 2:
            raise EqzError(f"usage: {COMMANDS['clamp'].usage}")
        if args[1].lower() == "off":
            return self._unfilter(band_key(args[0]), "clamp")
        band, level = parse_set(f"{args[0]}={args[1]}", self.session.steerer.bands or BANDS, "/clamp")
        current = self._filters()
        current["clamp"][band] = level
        notched = band in current["ablate"]
        current["ablate"] = [b for b in current["ablate"] if b != band]
        self.session.set_filters(**current)
        return CommandResult("\n".join([f"{band} clamped at {level:+.2f}" + (" (no longer notched)" if notched else "")]
                                       + self._overridden(band)))

    def ablate(self, args: list[str], _rest: str) -> CommandResult:
        if len(args) == 2 and args[1].lower() == "off":
            return self._unfilter(band_key(args[0]), "ablate")
        if len(args) != 1:
            raise EqzError(f"usage: {COMMANDS['ablate'].usage}")
        band = band_key(args[0])
        current = self._filters()
        clamped = current["clamp"].pop(band, None)
        current["ablate"] = [b for b in current["ablate"] if b != band] + [band]
        self.session.set_filters(**current)
        unclamped = f" (its clamp at {clamped:+.2f} is off)" if clamped is not None else ""
        return CommandResult("\n".join([f"{band} notched to the neutral level{unclamped}"] + self._overridden(band)))

    def filters(self, args: list[str], _rest: str) -> CommandResult:
        if args == ["off"]:
            self.session.set_filters()
            return CommandResult("filters off")
        if args:
            raise EqzError(f"usage: {COMMANDS['filters'].usage}")
        current = self._filters()
        parts = [f"clamp {b} {level:+.2f}" for b, level in current["clamp"].items()]
        parts += [f"ablate {b}" for b in current["ablate"]]
        return CommandResult(", ".join(parts) or "no filters")

    def _unfilter(self, band: str, kind: str) -> CommandResult:
        """One band's clamp or notch off, the other filters kept (only /filters off took any off, all of them)."""
        current = self._filters()
        if band not in current[kind]:
            raise EqzError(f"{band} is not {'clamped' if kind == 'clamp' else 'notched'}; /filters lists the filters")
        if kind == "clamp":
            del current["clamp"][band]
        else:
            current["ablate"].remove(band)
        self.session.set_filters(**current)
        return CommandResult(f"{band} {'clamp' if kind == 'clamp' else 'notch'} off")

    def _overridden(self, band: str | None = None) -> list[str]:
        """Whether ``band``'s slider (default: any) now does nothing, a filter overriding it (``Bank.overridden``):
        said, as the panel goes on showing its gain."""
        steering = self.session.pending_or_current_steering()
        return self.session.overridden(dict(steering.gains) if band is None else {band: steering.gain(band)})

    def _filters(self) -> dict:
        filters = self.session.filters
        return {"clamp": dict(filters.clamp), "ablate": list(filters.ablate)} if filters else {"clamp": {}, "ablate": []}

    def reset(self, _args: list[str], _rest: str) -> CommandResult:
        kept = self.keep()
        self.session.reset()
        self.saved_to.clear()  # another conversation now: saving it over the last one's file needs --replace
        return CommandResult(f"history cleared (the conversation is kept in {kept})" if kept else "history cleared")

    def save(self, args: list[str], _rest: str) -> CommandResult:
        replace = "--replace" in args
        names = [arg for arg in args if arg != "--replace"]
        if len(names) != 1:
            raise EqzError(f"usage: {COMMANDS['save'].usage}")
        path = Path(names[0]).expanduser()
        if path.is_dir():
            raise EqzError(f"{path} is a folder; give a file name, such as {path / 'chat.json'}")
        if path.is_file() and not replace and path.resolve() not in self.saved_to:  # another conversation's, maybe
            raise EqzError(f"{path} exists; /save {names[0]} --replace writes over it, or choose another name")
        self._write(path)
        self.saved_to.add(path.resolve())
        return CommandResult(f"saved {len(self.session.transcribed)} messages to {path}")

    def keep(self) -> Path | None:
        """Write the conversation to a new file in ``chats_dir()`` unless /save wrote it since its last message
        (eqz chat does this on leaving, however it ends); the file, or None when there was nothing to keep."""
        messages = self.session.transcribed
        if not messages or messages == self._written:
            return None
        folder = chats_dir()
        stamp = datetime.now().strftime("%Y-%m-%d-%H%M%S")
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # conversations are the user's alone
            path = write_new(folder, lambda count: f"{stamp}.json" if count == 1 else f"{stamp}-{count}.json",
                             self.session.transcript_text())
        except OSError as error:
            raise EqzError(f"could not keep the conversation in {folder}: {error.strerror}") from None
        self._written = messages
        return path

    def _write(self, path: Path) -> None:
        self.session.save(path)
        self._written = self.session.transcribed

    def quit(self, _args: list[str], _rest: str) -> CommandResult:
        return CommandResult(quit=True)


SAMPLING_COMMANDS = {
    "temp": "temperature",
    "top-p": "top_p",
    "top-k": "top_k",
    "min-p": "min_p",
    "repeat-penalty": "repeat_penalty",
    "max-tokens": "max_tokens",
    "seed": "seed",
}

COMMANDS: dict[str, Command] = {
    "help": Command("/help", "show these commands", ChatCommands.help),
    "system": Command("/system TEXT", "set the system prompt (empty: model default)", ChatCommands.system, text=True),
    "vector": Command("/vector FILE SCALE", "steer with a llama.cpp control vector (0 removes it)", ChatCommands.vector),
    "set": Command("/set BAND GAIN", "move a slider (gain -2..2; 1 = calibrated strength)", ChatCommands.set),
    "sliders": Command("/sliders", "show every band's gain", ChatCommands.sliders),
    "preset": Command("/preset NAME", "switch to a preset mood: its sliders, sampling, system prompt, filters", ChatCommands.preset),
    **{
        alias: Command(f"/{alias} VALUE", f"set {setting}" + " (random: each reply its own)" * (setting == "seed"),
                       partial(ChatCommands.sampling, setting=setting))
        for alias, setting in SAMPLING_COMMANDS.items()
    },
    "clamp": Command("/clamp BAND LEVEL", "hold a band at a level inside the model (LEVEL off: let it go)",
                     ChatCommands.clamp),
    "ablate": Command("/ablate BAND", "notch a band to the model's neutral level (/ablate BAND off: let it go)",
                      ChatCommands.ablate),
    "filters": Command("/filters [off]", "show the filters, or turn them all off", ChatCommands.filters),
    "reset": Command("/reset", "forget the conversation", ChatCommands.reset),
    "save": Command("/save FILE [--replace]", "write the transcript with every setting as JSON (--replace: over a "
                    "file this chat did not save)", ChatCommands.save),
    "quit": Command("/quit", "leave (Ctrl-D too); what /save did not write is kept for --resume, unless --no-keep",
                    ChatCommands.quit),
}
