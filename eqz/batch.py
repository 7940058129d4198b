"""``eqz batch``: prompts x slider settings x samples -> JSONL, reproducibly and without ever losing a row.

- Input is streamed twice: once to validate every line before any generation, once per setting to generate.
  Standard input is spooled to a temporary file first. Only ids are remembered (to refuse duplicates).
- Rows are generated setting by setting (a control vector is per context), up to ``--parallel`` at a time in
  one llama.cpp batch, and written in a fixed order, each flushed as soon as it is done.
- Seeds come from (--seed, prompt id, sample index), so a command gives the same file at any --parallel and
  the same prompt gets the same seed under every mood (paired comparisons).
- ``--resume`` keeps the rows already in OUT (dropping a half-written last line) and writes only the rest; it
  refuses a file eqz did not write (before touching it) and one written with other settings.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .bands import band_key, check_gain
from .engine import Model, utf8
from .generation import Job, generate_parallel, template_head
from .reading import common_prefix_length
from .meter import Instruments
from .errors import EqzError
from .files import try_lock
from .presets import Preset, Resolved, resolve
from .session import model_record, reply_record
from .sampling import is_whole
from .steering import Steerer, Steering


# -------------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class PromptRow:
    line: int
    id: str
    prompt: str
    system: str | None
    meta: dict | None = None  # a .jsonl line's other fields (labels, conditions), carried into its rows as "meta"


LINE_KEYS = ("prompt", "id", "system")


class PromptFile:
    """A .txt (one prompt per non-empty line) or .jsonl ({"prompt", "id"?, "system"?}) file, '-' (stdin), or (from
    the library) a list of prompts: strings, or dicts as a .jsonl line holds them, read as that file's lines would be
    (every check, and ids: a string's is its place in the list from 1)."""

    def __init__(self, spec: str | list, skip_bad: bool | None = False):
        self.skip_bad = skip_bad  # None: no --skip-bad to offer (eval's prompts): a bad line is only to be fixed
        self._spool: Path | None = None
        self._listed: bytes | None = None
        self.path: Path | None = None  # a list's lines are _listed
        if isinstance(spec, list):
            self._listed = "".join(_jsonl_line(item) for item in spec).encode()
            self.jsonl = True
        elif spec == "-":
            handle, name = tempfile.mkstemp(prefix="eqz-stdin-", suffix=".txt")
            with os.fdopen(handle, "wb") as spool:
                shutil.copyfileobj(sys.stdin.buffer, spool)
            self._spool = self.path = Path(name)
            self.jsonl = _looks_like_jsonl(self.path)
        else:
            self.path = Path(spec).expanduser()
            if self.path.is_dir():
                raise EqzError(f"{self.path} is a folder; give a prompt file (.txt, one per line, or .jsonl)")
            if not self.path.is_file():
                raise EqzError(f"prompt file not found: {self.path}")
            suffix = self.path.suffix.lower()  # PROMPTS.TXT as well
            if suffix not in (".txt", ".jsonl"):
                raise EqzError(f"{self.path}: prompt files are .txt (one per line) or .jsonl ({{\"prompt\": ...}})")
            self.jsonl = suffix == ".jsonl"
        self.skipped: list[str] = []
        self.unfit: set[int] = set()  # lines found bad after parsing (plan: too long for the model), left out

    def close(self) -> None:
        if self._spool:
            self._spool.unlink(missing_ok=True)

    def rows(self) -> Iterator[PromptRow]:
        """Valid rows in file order (bad lines raise, or are skipped with --skip-bad)."""
        seen: set[str] = set()
        with self._lines() as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    row = self._parse(number, raw)
                    if row is not None and row.id in seen:
                        raise EqzError(f"{self.where(number)}: duplicate id '{row.id}' (ids must be unique for "
                                       "--resume to work)")
                except EqzError as error:
                    self.bad(number, str(error))
                    continue
                if row is not None and number not in self.unfit:
                    seen.add(row.id)
                    yield row

    def bad(self, number: int, error: str) -> None:
        """Line ``number`` cannot be a row (``error`` says why): the run stops, or with --skip-bad it is left out."""
        if self.skip_bad is None:
            raise EqzError(f"{error}; fix the line")
        if not self.skip_bad:
            raise EqzError(f"{error}; fix the line or pass --skip-bad (skip_bad=True in the library)")
        self.skipped.append(error)
        self.unfit.add(number)

    @property
    def name(self) -> str:
        """The prompts as messages name them."""
        return "the prompts list" if self._listed is not None else "stdin" if self._spool else str(self.path)

    def where(self, number: int) -> str:
        if self._listed is not None:
            return f"prompts item {number}"
        return f"{self.path.name if not self._spool else 'stdin'} line {number}"

    def _lines(self):
        return io.BytesIO(self._listed) if self._listed is not None else self.path.open("rb")

    def _parse(self, number: int, raw: bytes) -> PromptRow | None:
        where = self.where(number)
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a file may start with a byte order mark
        except UnicodeDecodeError:
            raise EqzError(f"{where}: not valid UTF-8") from None
        text = text.rstrip("\r\n")
        if not text.strip():
            return None
        if not self.jsonl:
            return PromptRow(number, str(number), text, None)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise EqzError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise EqzError(f"{where}: missing \"prompt\" (a non-empty string)")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise EqzError(f"{where}: \"system\" must be a string")
        row_id = data.get("id", number)
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise EqzError(f"{where}: \"id\" must be a string or a whole number")
        meta = {key: value for key, value in data.items() if key not in LINE_KEYS}
        if misspelt := next((key for key in meta if key.strip().lower() in LINE_KEYS), None):
            raise EqzError(f"{where}: \"{misspelt}\" is not a key eqz reads (did you mean "
                           f"\"{misspelt.strip().lower()}\"?); other keys are carried into the rows as \"meta\"")
        try:  # a lone surrogate spelt out in JSON would stop the run when its row is written
            json.dumps(meta, ensure_ascii=False).encode()
        except UnicodeEncodeError as error:
            raise EqzError(f"{where}: a field other than prompt, id and system holds text with no UTF-8 form "
                           f"({error.reason})") from None
        for key in ("prompt", "system", "id"):  # JSON can spell out a lone surrogate, which no file or model takes
            if isinstance(data.get(key), str):
                try:
                    utf8(data[key])
                except EqzError as error:
                    raise EqzError(f"{where}: \"{key}\": {error}") from None
        return PromptRow(number, str(row_id), data["prompt"], system, meta or None)


def _jsonl_line(item) -> str:
    """A list's prompt as a .jsonl line: a string is the prompt, a dict the line's fields."""
    if not isinstance(item, (str, dict)):
        raise EqzError(f"prompts takes strings, or dicts such as {{'prompt': 'Hi', 'id': 'a'}}; got {item!r}")
    try:
        return json.dumps({"prompt": item} if isinstance(item, str) else item) + "\n"
    except (TypeError, ValueError) as error:
        raise EqzError(f"prompts: {item!r} is not JSON ({error})") from None


def _looks_like_jsonl(path: Path) -> bool:
    """Whether stdin holds .jsonl: its first line with text opens a JSON object ('{"' or '{}'). A prompt such as
    "{Write} a haiku" starts with a brace and is text; a JSON line with a typo is .jsonl, and its error is told."""
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return re.match(r'\s*\{\s*["}]', line) is not None
    return False


# -------------------------------------------------------------------------------------------------- the grid


MAX_SWEEP_STEPS = 1000  # a step of 0.002 from -1 to 1: finer than any difference a reply shows
MAX_SETTINGS = 100_000  # settings per grid; each row of each is a reply, so a bigger grid is a typo, not a plan


def parse_sweep(spec: str, bands: tuple[str, ...] | None) -> tuple[str, list[float]]:
    """``BAND=START:STOP:N`` -> (band, N evenly spaced gains from START to STOP)."""
    band, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or len(parts) != 3:
        raise EqzError(f"--sweep takes BAND=START:STOP:N, e.g. joy=-1:1:5; got '{spec}'")
    try:
        count = int(parts[2])
    except ValueError:
        raise EqzError(f"--sweep {spec}: N must be a whole number") from None
    band = band_key(band)
    start = check_gain(band, parts[0], bands)
    stop = check_gain(band, parts[1], bands)
    if count < 1 or (count == 1 and start != stop):
        raise EqzError(f"--sweep {spec}: N is how many gains from START to STOP, so at least 2 (or 1 with START = "
                       "STOP); use --set for one value")
    if count > MAX_SWEEP_STEPS:
        raise EqzError(f"--sweep {spec}: at most {MAX_SWEEP_STEPS} gains per sweep; choose a smaller N")
    return band, [round(float(g), 6) for g in np.linspace(start, stop, count)]


def build_grid(
    bands: tuple[str, ...],
    base_preset: Preset | None,
    presets: list[Preset],
    sets: dict[str, float],
    sweeps: list[tuple[str, list[float]]],
    sampling_flags: dict,
    system: str | None,
    clamp: dict[str, float] | None = None,
    ablate: list[str] = (),
) -> list[Resolved]:
    """Settings = (presets, or the one --preset) x the cartesian product of sweeps; --set and sweeps win, and
    --clamp/--ablate add to each preset's filters (presets.resolve, as for generate and chat)."""
    swept = [band for band, _ in sweeps]
    if twice := next((band for band in swept if swept.count(band) > 1), None):
        raise EqzError(f"--sweep {twice} (sweeps in the library) is given twice, and the later would override the "
                       "earlier; sweep each band once")
    chosen: list[Preset | None] = presets or [base_preset]
    size = len(chosen) * math.prod(len(gains) for _, gains in sweeps)
    if size > MAX_SETTINGS:
        raise EqzError(f"the grid has {size} settings (presets x sweeps); at most {MAX_SETTINGS}: sweep fewer gains or "
                       "split the run")
    settings = {}  # keyed as their rows are (row_key): a setting the grid repeats (joy=0.5:0.5:3) runs once
    for preset in chosen:
        for combo in itertools.product(*[[(band, g) for g in gains] for band, gains in sweeps]):
            resolved = resolve(preset, bands, {**sets, **dict(combo)}, sampling_flags, system, clamp, ablate)
            gains = {band: 0.0 for band in bands}
            gains.update(resolved.gains)
            setting = replace(resolved, gains=gains)
            if settings.setdefault(row_key("", resolved.preset, gains, 0, 0), setting) != setting:
                raise EqzError(f"two presets named {resolved.preset} differ, and rows name a preset by its name; "
                               "give each its own name")
    return list(settings.values())


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def row_key(prompt_id: str, preset: str | None, gains: dict, sample: int, seed: int) -> str:
    """How --resume finds a row: a gain of -0 is 0, as the row's sliders write it."""
    return json.dumps([prompt_id, preset, sorted((band, gain + 0.0) for band, gain in gains.items()), sample, seed])


# -------------------------------------------------------------------------------------------------- output


_OUTPUTS: dict[tuple[int, int], weakref.ref] = {}  # this process's outputs, by file: a plan made again takes over


class Output:
    """The JSONL file: rows are appended and flushed one by one; resume reads what is already there."""

    def __init__(self, path: str, resume: bool):
        self.stdout = path == "-"  # as input "-" is stdin: a stream, never resumed (it may be a pipe, or >> a file)
        self.path = Path("/dev/stdout" if self.stdout else path).expanduser()
        self.done: dict[str, dict] = {}  # row_key -> what the row was made with (made_with)
        self.first: dict | None = None
        self.writing = False  # a run is using it (BatchPlan), so a later plan of this process may not take it over
        self.taken_over = False
        self.predecessor: Output | None = None  # an earlier plan's output whose lock this one shares (take_over)
        if self.stdout and resume:
            raise EqzError("--resume (resume=True in the library) continues a file; give -o a file name, not -")
        if self.path.is_dir() or path.endswith(("/", os.sep)):  # "new/" wrote a file named new
            raise EqzError(f"{self.path} is a folder; -o takes a file name, such as {self.path / 'out.jsonl'}")
        self.created = not self.stdout and not self.path.exists()  # removed again if the run stops before its first row
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("a", encoding="utf-8")
        except OSError as error:
            raise EqzError(f"cannot write {self.path}: {error.strerror or error}; choose another -o") from None
        if self.stdout or not stat.S_ISREG(os.fstat(self.handle.fileno()).st_mode):  # streams: -, /dev/null, a pipe
            return  # (stdout redirected with >> is a regular file, and still a stream)
        try:  # a refusal closes the file (and drops its lock) at once, not when a kept traceback lets it go
            self._lock()
            if self.path.stat().st_size > 0:
                if not resume:
                    raise EqzError(f"{self.path} already has rows; pass --resume (resume=True in the library) to "
                                   "continue it or choose another -o")
                self._load_existing()
        except BaseException:
            self.handle.close()
            raise

    def _lock(self) -> None:
        """One batch writes a file at a time: two resuming one file would each write the rows it lacks, twice over.
        A plan of this process that has not run shares its lock with a later one for the file (a notebook cell run
        again makes its plan before the name holding the first lets go of it), which ends it once made (take_over):
        a later plan refused on its own settings leaves the earlier one as it was."""
        file = os.fstat(self.handle.fileno())
        self.key = (file.st_dev, file.st_ino)
        earlier = _OUTPUTS[self.key]() if self.key in _OUTPUTS else None
        if earlier is not None and not earlier.writing and not earlier.handle.closed:
            self.handle.close()  # the same open file as the earlier plan's instead: a flock belongs to it
            self.handle = os.fdopen(os.dup(earlier.handle.fileno()), "a", encoding="utf-8")
            self.predecessor = earlier
            return
        if not try_lock(self.handle):
            raise EqzError(f"{self.path} is being written by another eqz batch; let it finish (or stop it) and "
                           "resume then, or choose another -o")
        _OUTPUTS[self.key] = weakref.ref(self)

    def take_over(self) -> None:
        """End the earlier plan whose lock this one shares (see ``_lock``), now that this one is made."""
        earlier, self.predecessor = self.predecessor, None
        if earlier is None:
            return
        self.created, earlier.created = self.created or earlier.created, False  # removed if left empty: by this one
        earlier.close()  # the lock stays: this handle holds the same open file
        earlier.taken_over = True
        _OUTPUTS[self.key] = weakref.ref(self)

    def _load_existing(self) -> None:
        """Remember the rows already there. Only a last line that starts a row but is not JSON is taken for one cut
        off by a kill mid-write and dropped; any other line that is not a row (blank lines aside) means the file is
        not eqz's, and it is refused before anything in it changes. A last row without its newline is kept, and the
        newline added."""
        keep = 0
        raw = b""
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():  # a blank line holds nothing to keep or to refuse
                    keep += len(raw)
                    continue
                try:
                    row = json.loads(raw)
                except ValueError:  # not JSON, or not UTF-8
                    if not raw.endswith(b"\n") and raw.startswith(b"{"):
                        break  # the start of a row, cut off by a kill mid-write (the first row's too)
                    row = None
                if not _is_row(row):
                    raise EqzError(f"{self.path} line {number} is not a row eqz batch wrote, so --resume will not add "
                                   "to it; choose another -o")
                self.first = self.first or row
                self.done[row_key(row["id"], row["preset"], row["sliders"], row["sample"], row["seed"])] = \
                    made_with(row)
                keep += len(raw)
        if keep < self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(keep)
        elif not raw.endswith(b"\n"):
            with self.path.open("ab") as handle:
                handle.write(b"\n")

    def check_model(self, model: dict) -> None:
        """Refuse to resume a file another model wrote (another quantization of this one: check_same_rows)."""
        if self.first is None:
            return
        if self.first["model"]["fingerprint"] != model["fingerprint"]:
            raise EqzError(f"{self.path} was written by another model ({self.first['model']['name']}); "
                           "resume with that model or choose another -o")

    def check_same_rows(self, planned: Iterator[tuple[RowTask, str | None, dict]], seed: int) -> None:
        """Refuse to resume where a row already written differs from the one this run would write in its place
        (rows are matched by id, preset, sliders, sample and seed alone), which would leave one file mixing two runs:
        another --seed (no row would match), or for any row another prompt under its id (a line added above it in a
        .txt), system prompt, sampling (a preset's changed), filters, --meter, bank (a band it moves retrained or
        held at another level), quantization or other fields on its .jsonl line (``meta``). ``planned``: every row
        of this run with what it is made with."""
        first = self.first
        if first is None:
            return
        if first["seed"] != row_seed(seed, first["id"], first["sample"]):
            raise EqzError(f"{self.path} was written with another --seed (its rows' seeds do not come from --seed "
                           f"{seed}); resume with the same --seed or choose another -o")
        for task, preset, ours in planned:
            theirs = self.done.get(task.key)
            if theirs is None:
                continue
            differ = [what for what in ours if theirs[what] != ours[what] and theirs[what] != UNRECORDED]
            if differ:
                what = differ[0]
                row = f"{self.path}: row id {task.row.id} (sample {task.sample}{f', preset {preset}' if preset else ''})"
                raise EqzError(f"{row} was made with {_DIFFERENT[what](theirs[what], ours[what])}; --resume adds "
                               "only rows made as the others were: resume as the file was begun, or choose another -o")

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.handle.closed:
            return
        self.handle.flush()
        try:
            os.fsync(self.handle.fileno())
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # a pipe or a terminal: nothing to sync
                raise
        self.handle.close()
        if self.created and self.path.stat().st_size == 0:  # a run that stopped on bad input leaves no empty file
            self.path.unlink()

    def __del__(self) -> None:
        """A plan dropped without running (a notebook's name rebound) closes its output, leaving no empty file."""
        if not getattr(self, "handle", None) or self.handle.closed:  # refused in __init__, or closed already
            return
        try:
            self.close()
        except OSError:  # the file gone or its disk full: nothing is left to keep
            pass


UNRECORDED = "unrecorded"  # made_with's value for what a row of an earlier eqz does not say: not compared


def made_with(row: dict) -> dict:
    """What a written row was made with, beyond what its key (row_key) says: what --resume compares with the row this
    run would write in its place."""
    return {"prompt": row["prompt"], "system": row["system"], "sampling": _unseeded(row["sampling"]),
            "filters": _filter_bands(row.get("filters") or {}), "meter": "meter" in row,
            "bank": row.get("bank", UNRECORDED), "file_type": row["model"].get("file_type", UNRECORDED),
            "meta": row.get("meta")}


def _unseeded(sampling: dict) -> dict:
    """A row's sampling without the row's own seed."""
    return {key: value for key, value in sampling.items() if key != "seed"}


# how a row's check_same_rows field differs, in words: (there, now) -> "..."
_DIFFERENT = {
    "prompt": lambda there, now: f"another prompt under its id ({_quoted(there)} there, {_quoted(now)} now: a "
                                 ".txt's ids are line numbers, so a line added or removed above moves them)",
    "system": lambda there, now: f"another system prompt ({_quoted(there)} there, {_quoted(now)} now: --system, the "
                                 "preset's or the line's own)",
    "sampling": lambda there, now: "other sampling (" + "; ".join(
        f"{key} {there.get(key)} there, {now.get(key)} now" for key in sorted(set(there) | set(now))
        if there.get(key) != now.get(key)) + ")",
    "filters": lambda there, now: f"other filters ({_describe_filters(*there)} there, {_describe_filters(*now)} now)",
    "meter": lambda there, now: f"{'--meter' if there else 'no --meter'} ({'--meter' if now else 'none'} now)",
    "bank": lambda there, now: "another version of the bank (a band it moves was retrained, held at another level "
                               "or replaced since)",
    "file_type": lambda there, now: f"another quantization of the model (llama.cpp file type {there} there, {now} "
                                    "now)",
    "meta": lambda there, now: f"other fields on its line ({_fields(there)} there, {_fields(now)} now: a .jsonl "
                               "line's other fields are carried into its rows as \"meta\")",
}


def _fields(meta: dict | None) -> str:
    return _quoted(json.dumps(meta, ensure_ascii=False)) if meta else "none"


def _quoted(text: str | None) -> str:
    return "none" if text is None else repr(text[:60])


ROW_TYPES = {"id": str, "prompt": str, "output": str, "sliders": dict, "sampling": dict, "seed": int, "sample": int,
             "model": dict}


def _is_row(data) -> bool:
    """Whether ``data`` looks like a row eqz batch wrote: the keys --resume reads, of the types it writes."""
    return (isinstance(data, dict) and all(isinstance(data.get(key), kind) for key, kind in ROW_TYPES.items())
            and "preset" in data and "system" in data and {"name", "fingerprint"} <= data["model"].keys())


def _filter_bands(filters: dict) -> tuple[dict, list[str]]:
    """(clamps, notched bands) as a row records them (meter.Filters.describe): a clamped band is not also notched."""
    clamp = filters.get("clamp", {})
    return clamp, sorted(set(filters.get("ablate", [])) - set(clamp))


def _describe_filters(clamp: dict, ablate: list[str]) -> str:
    parts = [f"--clamp {band}={level}" for band, level in clamp.items()] + [f"--ablate {band}" for band in ablate]
    return " ".join(parts) or "none"


# -------------------------------------------------------------------------------------------------- running


@dataclass
class BatchStats:
    total: int = 0
    skipped_existing: int = 0
    written: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: dict) -> None:
        self.written += 1
        self.tokens += record["n_tokens"]


def plan(prompts: PromptFile, model: Model, settings: Iterable[Resolved] = ()) -> tuple[int, int]:
    """Validate every line before any generation; returns (valid prompts, longest prompt in tokens). A prompt
    without a system prompt of its own is counted with the longest of the ``settings``' (--system, a preset's)."""
    count = longest = 0
    settings_system = max((len(model.tokenize(setting.system or "")) for setting in settings), default=0)
    for row in prompts.rows():
        system = len(model.tokenize(row.system)) if row.system is not None else settings_system
        size = len(model.tokenize(row.prompt)) + 64 + system
        if size >= model.info.n_ctx_train:  # each sequence's context stops at the trained length (Model.sequence_room)
            prompts.bad(row.line, f"{prompts.where(row.line)}: the prompt is about {size} tokens with its chat "
                                  f"template and system prompt, and {model.info.name} reads {model.info.n_ctx_train} "
                                  "at most")
            continue
        count += 1
        longest = max(longest, size)
    if count == 0:
        raise EqzError(f"{prompts.name}: no prompts found")
    return count, longest


@dataclass(frozen=True)
class RowTask:
    """One row to generate: the ``setting``-th setting of the grid on one prompt, one sample and its seed.
    ``number`` is the row's place among the rows to generate, the order they are written in."""

    number: int
    setting: int
    row: PromptRow
    sample: int
    seed: int
    key: str = ""  # row_key: how --resume finds the row in a file


def every_row(prompts: PromptFile, settings: list[Resolved], samples: int, seed: int) -> Iterator[RowTask]:
    """Every row of the batch, in its fixed order (setting, prompt, sample); ``number`` is left 0."""
    for index, setting in enumerate(settings):
        for row in prompts.rows():
            for sample in range(samples):
                row_seed_value = row_seed(seed, row.id, sample)
                yield RowTask(0, index, row, sample, row_seed_value,
                              row_key(row.id, setting.preset, setting.gains, sample, row_seed_value))


def missing_rows(prompts: PromptFile, settings: list[Resolved], samples: int, seed: int, output: Output,
                 stats: BatchStats) -> Iterator[RowTask]:
    """The rows not yet in ``output``, numbered in the order they are written; counts the others."""
    number = 0
    for task in every_row(prompts, settings, samples, seed):
        if task.key in output.done:
            stats.skipped_existing += 1
            continue
        yield replace(task, number=number)
        number += 1


def bank_used(steerer: Steerer, setting: Resolved) -> str | None:
    """The digest (Bank.digest) of the bands a setting moves or filters, as its rows record it ("bank"); None where
    it uses none."""
    bands = {band for band, gain in setting.gains.items() if gain} | set(setting.filters.get("clamp", {})) | \
        set(setting.filters.get("ablate", []))
    return steerer.bank.digest(bands) if bands and steerer.bank is not None else None


def planned_rows(prompts: PromptFile, settings: list[Resolved], samples: int, seed: int, steerer: Steerer,
                 meter: bool, file_type: int) -> Iterator[tuple[RowTask, str | None, dict]]:
    """Every row of the batch with its preset and what it is made with (made_with's fields), for --resume's check."""
    banks = [bank_used(steerer, setting) for setting in settings]
    metered = meter and steerer.bank is not None
    for task in every_row(prompts, settings, samples, seed):
        setting = settings[task.setting]
        yield task, setting.preset, {
            "prompt": task.row.prompt, "system": task.row.system if task.row.system is not None else setting.system,
            "sampling": _unseeded(setting.sampling.to_dict()), "filters": _filter_bands(setting.filters),
            "meter": metered, "bank": banks[task.setting], "file_type": file_type, "meta": task.row.meta}


def _chat_messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def generate_rows(model: Model, steerer: Steerer, settings: list[Resolved], tasks: Iterable[RowTask],
                  parallel: int, longest: int, meter: bool = False) -> Iterator[dict]:
    """The record of every task, in task order; tasks of one setting that follow each other are decoded up to
    ``parallel`` at a time in one llama.cpp batch. What a local run and a Ray worker both do."""
    bands = steerer.bands
    record_model = model_record(model)
    per_sequence = model.sequence_room(longest + max(s.sampling.max_tokens for s in settings))
    filtered = any(setting.filters for setting in settings) or \
        any(steerer.held(Steering().with_gains(setting.gains)) for setting in settings)
    taps = (meter or filtered) and steerer.bank is not None
    heads: dict[str | None, list[int]] = {}  # system prompt -> the tokens every prompt with it starts with
    with model.context(n_ctx=per_sequence * parallel, n_seq=parallel, n_batch=max(512, per_sequence), unified=False,
                       taps=taps) as context:
        for index, group in itertools.groupby(tasks, key=lambda task: task.setting):
            setting = settings[index]
            steering = Steering().with_gains(setting.gains)
            matrix = steerer.matrix(steering)
            bank = bank_used(steerer, setting)
            instruments = None
            if taps:
                instruments = Instruments(steerer.bank, meter=meter, filters=steerer.filters(steering, setting.filters))
                context.set_tap(instruments)

            def jobs() -> Iterator[Job]:
                for task in group:
                    system = task.row.system if task.row.system is not None else setting.system
                    messages = _chat_messages(system, task.row.prompt)
                    text, stops = model.chat_prompt(messages)
                    tokens = model.tokenize(text, parse_special=True)
                    if system not in heads:
                        heads[system] = template_head(model, messages)
                    yield Job(tokens, setting.sampling, task.seed, stops, matrix, index, tag=(task, system),
                              shared=common_prefix_length(tokens, heads[system]))

            on_decode = instruments.owners if instruments else None
            for finished in generate_parallel(context, jobs(), on_decode=on_decode):
                task, system = finished.job.tag
                record = {"id": task.row.id, **reply_record(task.row.prompt, system, setting.preset, finished.text,
                                                            record_model, {
                    **steering.to_dict(bands),
                    "sampling": {**setting.sampling.to_dict(), "seed": finished.job.seed},
                    "seed": finished.job.seed,
                    "n_tokens": len(finished.tokens),
                    "finish_reason": finished.finish_reason,
                    "bank": bank,
                }), "sample": task.sample, **({"meta": task.row.meta} if task.row.meta else {})}
                if instruments is not None:
                    if instruments.filters and instruments.filters.asked:
                        record["filters"] = instruments.filters.describe()
                    if meter:
                        record["meter"] = instruments.mean(finished.job)
                yield record


def run_batch(
    model: Model,
    steerer: Steerer,
    prompts: PromptFile,
    settings: list[Resolved],
    output: Output,
    samples: int,
    seed: int,
    parallel: int,
    longest: int,
    on_row: Callable[[dict, BatchStats], None] = lambda row, stats: None,
    stats: BatchStats | None = None,
    meter: bool = False,
) -> BatchStats:
    """Generate every missing row; returns the counts. Interrupting loses only rows not yet finished."""
    stats = stats or BatchStats()
    tasks = missing_rows(prompts, settings, samples, seed, output, stats)
    for record in generate_rows(model, steerer, settings, tasks, parallel, longest, meter):
        output.write(record)
        stats.add(record)
        on_row(record, stats)
    return stats


@dataclass
class BatchPlan:
    """A checked batch, ready to run: every prompt line validated, the grid of settings resolved, the output
    found compatible for ``--resume``. ``total`` rows in all (rows already in the output are skipped)."""

    model: Model
    steerer: Steerer
    prompts: PromptFile
    settings: list[Resolved]
    output: Output
    prompt_count: int
    longest: int
    samples: int = 1
    seed: int = 0
    parallel: int = 4
    meter: bool = False
    on_warning: Callable[[str], None] = lambda message: None
    closes_output: bool = False  # the output was opened for this plan (from a path): closed when a run ends

    def __post_init__(self) -> None:
        try:
            planned = planned_rows(self.prompts, self.settings, self.samples, self.seed, self.steerer, self.meter,
                                   self.model.file_type)
            self.output.check_same_rows(planned, self.seed)
        except BaseException:
            if self.closes_output:
                self.output.close()
            raise

    @property
    def total(self) -> int:
        return self.prompt_count * len(self.settings) * self.samples

    def run(self, on_row: Callable[[dict, BatchStats], None] = lambda row, stats: None,
            stats: BatchStats | None = None) -> BatchStats:
        """Generate every row not yet in the output; ``on_row(row, stats)`` after each is written."""
        with self._closing():
            return run_batch(self.model, self.steerer, self.prompts, self.settings, self.output, self.samples,
                             self.seed, self.parallel, self.longest, on_row, stats or BatchStats(total=self.total),
                             meter=self.meter)

    def run_on_ray(self, address: str = "auto", workers: int | None = None, threads: int | None = None,
                   on_row: Callable[[dict, BatchStats], None] = lambda row, stats: None,
                   stats: BatchStats | None = None) -> BatchStats:
        """As ``run``, with the rows generated by ``workers`` Ray actors (``threads`` each, default 1; default workers:
        as many as the free CPUs hold) on the cluster at ``address`` ("auto": $RAY_ADDRESS, a cluster running here,
        else a new local one)."""
        from .ray_batch import run_on_ray

        if not isinstance(address, str):
            raise EqzError(f"address must be 'auto' or a cluster's 'HOST:PORT', got {address!r}")
        for name, value in (("workers", workers), ("threads", threads)):
            if value is not None and not is_whole(value, 1):
                raise EqzError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")

        with self._closing():
            return run_on_ray(self, address, workers, threads, on_row, stats or BatchStats(total=self.total),
                              self.on_warning)

    @contextmanager
    def _closing(self) -> Iterator[None]:
        if self.output.taken_over:
            raise EqzError(f"a later plan writes {self.output.path} now (this one was made again); run that one")
        if self.output.handle.closed:
            raise EqzError("this plan ran already and closed its output; to go on, make it again with "
                           "model.batch(..., resume=True)")
        self.output.writing = True
        try:
            yield
        finally:
            self.output.writing = False
            if self.closes_output:
                self.output.close()
