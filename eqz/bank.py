"""A bank of band vectors for one model: one llama.cpp control-vector GGUF per band plus ``bank.yaml``.

Each band's GGUF holds exactly what gain +1 applies, so ``llama-cli --control-vector-scaled joy.gguf 1.0``
steers like ``eqz --set joy=1``. ``bank.yaml`` holds the model fingerprint, the read layer and steered layers,
each band's negative-side ratio and meter calibration, how the bank was made and how well it works.
``meter.npz`` holds the directions the meter and the filters read along (format 2): the best separating
direction need not be the one that steers best, so a band's steering vector may come from another source.
``voice-centre.npy`` holds what every own-voice persona shares (the eight primaries' mean difference from the neutral
persona, one row per steered layer): bands described later are centred on it without replying as every primary again.
Banks ship in ``vectors/`` (the default model's) and are trained into the user data dir; both are found by
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from .bands import AXES, BANDS, MAX_LEVEL, check_band_name, check_gain, keyed_by_band
from .errors import REINSTALL, EqzError
from .models import ModelInfo, fingerprint
from .sampling import as_number
from .shipped import shipped_dir
from .files import replacing, try_lock, xdg_home
from .vector_files import ControlVector, read_control_vector, write_control_vector

MANIFEST = "bank.yaml"
METER_FILE = "meter.npz"
VOICE_CENTRE_FILE = "voice-centre.npy"
BANK_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 banks read along their steering vectors
SHIPPED_DIR = shipped_dir("vectors")
# What a band's direction check can find (bank.yaml stores the key; messages and `vectors show` use the words).
PROBLEMS = {
    "weak": "at +1 it does not clearly lift its emotion on most redraws of the calibration prompts",
    "uncalibrated": "it holds a level set by hand (`eqz vectors hold`), which nothing has measured",
    "lexicon": "its emotion words do not rise from -1 to +1",
    "judge": "the unsteered model does not judge its replies closer to the band from -1 to +1",
    "readout": "the model's readout does not rise from -1 to +1",
    "fluency": "replies at +1 leave the fluency bounds",
    "fluency (eval)": "replies at +1 left the fluency bounds on the held-out prompts of `eqz eval --record`",
}
AXIS_JUDGE = "the unsteered model does not judge its replies higher on the axis from -1 to +1"  # valence, arousal


def record_date() -> str:
    """When a bank.yaml record is made (a training, a remake, an `eqz eval --record`): UTC, ISO to the second, one
    format for all, so that two dates compare as strings (a band remade after the figures were recorded)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def user_data_dir() -> Path:
    return xdg_home("XDG_DATA_HOME", ".local/share") / "eqz" / "vectors"


_EDITING: set[str] = set()  # the banks this process holds the edit lock of: an edit inside another is not refused


@contextmanager
def editing(directory: Path, what: str) -> Iterator[None]:
    """Hold the edit lock of the bank in ``directory`` (``what``: the change, as another eqz is told) while it is
    read, changed and saved. Each change loads the bank, edits it and saves it whole, so two at once (a
    `vectors remove` during a `train --band`) would have the later save undo the other's change. A bank another eqz
    is changing is one line, before anything is done. An advisory lock (flock): released when its process ends,
    however it ends; where the system has none (Windows) or the lock file cannot be made, edits go unlocked."""
    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:24]
    path = user_data_dir().parent / "locks" / f"{key}.lock"  # eqz's own folder: none left in the user's -o DIR
    if str(path) in _EDITING:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError:
        yield
        return
    with handle:
        if not try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "another eqz"
            raise EqzError(f"the bank in {directory} is being changed by {holder}; try again when that has finished")
        handle.seek(0)
        handle.truncate()
        handle.write(f"another eqz ({what}, process {os.getpid()})")
        handle.flush()
        _EDITING.add(str(path))
        try:
            yield
        finally:
            _EDITING.discard(str(path))


def search_dirs() -> list[Path]:
    """Where banks are looked for, first match wins: $EQZ_VECTORS, the user data dir, the shipped vectors/."""
    extra = [Path(os.environ["EQZ_VECTORS"]).expanduser()] if os.environ.get("EQZ_VECTORS") else []
    if extra and not extra[0].is_dir():  # a typo would silently fall back to another bank
        raise EqzError(f"EQZ_VECTORS={os.environ['EQZ_VECTORS']} is not a folder; point it at a folder of banks (or "
                       "one bank) or unset it")
    return extra + [user_data_dir(), SHIPPED_DIR]


def model_fingerprint(info: ModelInfo) -> str:
    return fingerprint(info.architecture, info.n_layer, info.n_embd, info.n_vocab, info.name)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


@dataclass
class ModelRecord:
    """bank.yaml's ``model``: the model a bank was trained for; banks are found by ``fingerprint``."""

    name: str
    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    fingerprint: str

    @classmethod
    def of(cls, info: ModelInfo) -> "ModelRecord":
        return cls(info.name, info.architecture, info.n_layer, info.n_embd, info.n_vocab, model_fingerprint(info))


@dataclass
class Layers:
    """bank.yaml's ``layers``: where the meter reads, which layers the vectors steer, the layer range searched,
    and each steered layer's typical token norm (what a strength is measured in)."""

    read: int | None = None
    steered: list[int] = field(default_factory=list)
    candidates: list[int] | None = None
    token_norm: dict[int, float] = field(default_factory=dict)


@dataclass
class Band:
    """One slider: its gain-+1 vector, how the meter reads it, and how it was made and checked (bank.yaml)."""

    name: str
    matrix: np.ndarray  # (n_layer, n_embd): added at gain +1
    negative_ratio: float = 1.0  # gain -1 adds -negative_ratio * matrix (the negative side is calibrated apart)
    readout: dict | None = None  # {"neutral", "neutral_text", "unit", ...}: a list per steered layer; None: unmetered
    read_directions: np.ndarray | None = None  # (steered layers, n_embd) unit rows the meter reads along
    source: str | None = None  # "stimulus" or "voice"; for an imported vector, the file it came from
    description: str | None = None  # the user's words for a described band
    strength: float | None = None  # c at gain +1 (see method.strength_unit); None: imported as it was
    negative_strength: float | None = None
    clear: bool | None = None  # a fluent strength clearly lifts the band's emotion
    direction_ok: bool | None = None  # None: never checked (imported)
    problems: list[str] = field(default_factory=list)  # keys of PROBLEMS
    check: dict = field(default_factory=dict)  # figures at +1 and -1 on the calibration prompts
    calibration: list[dict] = field(default_factory=list)  # every strength and source tried
    trained: dict | None = None  # when and how fast a band added to an existing bank was made
    # the level (meter units) gain +1 holds the band at, at every steered layer, instead of adding its vector (a clamp
    # adds only what a token lacks: docs/steering-limits.md section 9); None: the slider adds its vector
    hold: float | None = None
    hold_check: dict = field(default_factory=dict)  # the held level's figures on the calibration prompts

    @property
    def imported(self) -> bool:
        return self.strength is None

    def unit_direction(self, layer: int, steered: list[int] | None = None) -> np.ndarray:
        """The unit direction the meter reads this band along at ``layer`` (one of ``steered``)."""
        if self.read_directions is not None and steered is not None:
            return self.read_directions[steered.index(layer)]
        row = self.matrix[layer]
        norm = float(np.linalg.norm(row))
        return row / norm if norm > 0 else row

    def entry(self) -> dict:
        """This band as bank.yaml writes it (unset fields left out)."""
        written = {"description": self.description, "source": self.source, "strength": self.strength,
                   "negative_strength": self.negative_strength, "clear": self.clear,
                   "direction_ok": self.direction_ok, "problems": self.problems, "check": self.check,
                   "calibration": self.calibration, "file": f"{self.name}.gguf",
                   "negative_ratio": round(float(self.negative_ratio), 4), "readout": self.readout,
                   "trained": self.trained, "hold": self.hold, "hold_check": self.hold_check}
        return {key: value for key, value in written.items() if value is not None and value != [] and value != {}}


_BAND_ENTRY_FIELDS = ("source", "description", "strength", "negative_strength", "clear", "direction_ok", "problems",
                      "check", "calibration", "trained", "hold", "hold_check")


@dataclass
class Bank:
    """A model's sliders. ``method`` (how it was made, in words and settings) and ``quality`` (figures measured on
    held-out data) are free-form records for people; everything eqz acts on is typed."""

    directory: Path | None
    model: ModelRecord
    layers: Layers = field(default_factory=Layers)
    bands: dict[str, Band] = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)
    voice_centre: np.ndarray | None = None  # (len(steered), n_embd); see VOICE_CENTRE_FILE
    dropped: set[str] = field(default_factory=set, repr=False)  # removed bands whose files save() deletes
    # the bank.yaml this bank was read from or last saved as: (its path, its stat stamp), for changed_on_disk
    seen: tuple[Path, tuple] | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        """Short, for a notebook: the full dataclass repr runs to tens of thousands of characters of arrays."""
        steered = self.steered_layers
        layers = f"layers {steered[0]}-{steered[-1]}" if steered else "no layers"
        return f"<Bank of {self.model.name}: {', '.join(self.bands) or 'no bands'}; {layers}; {self.directory}>"

    @classmethod
    def empty(cls, info: ModelInfo, directory: Path | None = None) -> "Bank":
        return cls(directory, ModelRecord.of(info))

    @property
    def read_layer(self) -> int:
        return int(self.layers.read)

    @property
    def steered_layers(self) -> list[int]:
        return self.layers.steered

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.bands)

    @property
    def holds_any(self) -> bool:
        """Some slider holds a level (see ``Band.hold``): moving it needs the filters' tap."""
        return any(band.hold is not None for band in self.bands.values())

    def check_gains(self, gains: dict[str, float]) -> None:
        """Names this bank has, gains in the sliders' range: the library's ``bank.vector(joy=nan)`` included."""
        for band, gain in gains.items():
            check_gain(band, gain, self.names)

    def trained_problems(self, name: str) -> list[str]:
        """The band's problems (PROBLEMS keys) as calibration found them: a slider's from training; a held band's
        from its level's check (``Band.hold_check``: weak, and the -1 direction check where `eqz train` ran it),
        since the vector's figures say nothing of a clamp."""
        band = self.bands[name]
        if band.hold is None:
            return band.problems
        if not band.hold_check:
            return ["uncalibrated"]
        return (["weak"] if band.hold_check.get("weak") else []) + band.hold_check.get("problems", [])

    def open_problems(self, name: str) -> list[str]:
        """``trained_problems`` as the held-out figures recorded for this bank (`eqz eval --record`) revise them,
        where they rest on at least calibration's reply tokens (``weighs_as_calibration``): less "weak" where they
        found the band clear at +1, plus "fluency (eval)" where its +1 replies left the fluency bounds there."""
        if not weighs_as_calibration(self.quality.get("dose_response_setup", {})):
            return self.trained_problems(name)
        held_out = self.quality.get("dose_response", {}).get(name, {}).get("1.0", {})
        problems = [p for p in self.trained_problems(name) if not (p == "weak" and held_out.get("clear"))]
        if held_out.get("fluent") is False and "fluency" not in problems:
            problems.append("fluency (eval)")
        return problems

    def doubtful(self, gains: dict[str, float]) -> list[str]:
        """A warning per band moved in ``gains`` with an open problem (see ``open_problems``): such a slider may not
        move the text the way it is named, and users should hear so rather than see nothing."""
        lines = []
        for name, gain in gains.items():
            problems = self.open_problems(name) if gain != 0 and name in self.bands else []
            if problems:
                why = "; ".join(AXIS_JUDGE if p == "judge" and name in AXES else PROBLEMS.get(p, p) for p in problems)
                lines.append(f"{name} may not move the text as named in this bank ({why}); see `eqz vectors show`")
        return lines

    def held(self, gains: dict[str, float]) -> dict[str, float]:
        """The levels the held bands among ``gains`` are clamped at (gain x the band's hold level; 0 gains omitted)."""
        self.check_gains(gains)
        return {band: round(gain * self.bands[band].hold, 4) for band, gain in gains.items()
                if gain != 0 and self.bands[band].hold is not None}

    def overridden(self, gains: dict[str, float], filters: dict | None) -> list[str]:
        """A line for each held slider among ``gains`` that a filter ({"clamp": {band: level}, "ablate": [band]})
        overrides: a held slider is itself a clamp at its level and the user's filter on the band wins, so it does
        nothing while the panel shows its gain. A slider that adds its vector is not named: a clamp fixes only the
        band's meter direction, and the rest of the vector still steers."""
        clamp, ablate = (filters or {}).get("clamp") or {}, (filters or {}).get("ablate") or []
        return [f"the {band} slider ({gain:+.2f}) does nothing while " +
                (f"a clamp holds {band} at {clamp[band]:+.2f}" if band in clamp else f"{band} is notched")
                for band, gain in gains.items() if gain and (band in clamp or band in ablate)
                and band in self.bands and self.bands[band].hold is not None]

    def added(self, gains: dict[str, float]) -> np.ndarray | None:
        """The control vector the sliders add: ``mix`` of the bands that are not held (see ``held``)."""
        self.check_gains(gains)
        return self.mix({band: gain for band, gain in gains.items() if self.bands[band].hold is None})

    def mix(self, gains: dict[str, float]) -> np.ndarray | None:
        """The sum of these bands' vectors at these gains, held bands' too (None when every gain is 0); what a
        slider applies is ``added`` plus ``held``."""
        self.check_gains(gains)
        active = {band: gain for band, gain in gains.items() if gain != 0}
        if not active:
            return None
        total = np.zeros((self.model.n_layer, self.model.n_embd), dtype=np.float32)
        for band, gain in active.items():
            entry = self.bands[band]
            side = 1.0 if gain > 0 else entry.negative_ratio
            total += np.float32(gain * side) * entry.matrix
        return total

    def vector(self, gains: dict[str, float] | None = None, **named: float) -> ControlVector:
        """The control vector for these slider gains as a value (``bank.vector(joy=0.8)``). A control vector can
        only add, so a held band (``held``) gives its vector: it steers as that slider did before it was held."""
        mix = self.mix(keyed_by_band({**(gains or {}), **named}, "gains"))  # JOY=0.8 as everywhere in eqz
        if mix is None:
            mix = np.zeros((self.model.n_layer, self.model.n_embd), dtype=np.float32)
        return ControlVector(mix, self.model.architecture)

    def _no_band(self, name: str) -> EqzError:
        if not self.bands:  # an empty bank stands in where none fits the model: "its bands: " and nothing
            return EqzError(f"no emotion bank fits {self.model.name} yet, so it has no band '{name}'; run "
                            "`eqz train --model MODEL` (this model's file) to make one")
        return EqzError(f"no band '{name}' in this bank; its bands: {', '.join(self.names)}")

    def hold(self, name: str, level: float | None, check: dict | None = None) -> bool:
        """Make band ``name``'s +1 hold its component at ``level`` (meter units) instead of adding its vector;
        None: add the vector again. ``check``: the level's figures on the calibration prompts, if measured. The
        level it already holds keeps its recorded figures, and its check unless given a new one. Returns whether
        the level changed."""
        band = self.bands.get(name)
        if band is None:
            raise self._no_band(name)
        if level is not None:
            if not band.readout:
                raise EqzError(f"'{name}' is unmetered ({'described' if band.description else 'imported'}), so it "
                               "has no level to hold; it can only add its vector")
            number = as_number(level)
            if number is None or not math.isfinite(number) or not 0 < number <= MAX_LEVEL:  # one range, said once
                raise EqzError(f"hold level for {name} must be a number above 0 and at most {MAX_LEVEL:g} (its +1; "
                               f"-1 holds minus the level), got {level!r}")
            level = number
        changed = level != band.hold
        if changed:
            self.forget_recorded(name)
            band.hold, band.hold_check = level, {}
        if level is not None and check is not None:
            band.hold_check = dict(check)
        return changed

    def measured_as_in(self, name: str, other: "Bank") -> None:
        """Take ``other``'s figures for band ``name`` where the band steers exactly as there (the same digest: vector,
        held level, meter): a level set back by hand to the shipped one read "uncalibrated" until `vectors reset`,
        which also deletes the user's own bands."""
        if name not in other.bands or other.digest([name]) != self.digest([name]):
            return
        self.bands[name].hold_check = dict(other.bands[name].hold_check)
        for figures in ("dose_response", "steering"):
            if name in other.quality.get(figures, {}):
                self.quality.setdefault(figures, {})[name] = other.quality[figures][name]

    def forget_recorded(self, name: str) -> None:
        """Drop the figures `eqz eval --record` stored for band ``name``: it now steers another way (a new held
        level, a remade vector), which they did not measure."""
        for figures in ("dose_response", "steering"):
            self.quality.get(figures, {}).pop(name, None)

    def remove(self, *names: str) -> None:
        """Drop these bands; their files go when the bank is saved. All are checked first, so a bad name leaves the
        bank as it was."""
        for name in names:
            if name not in self.bands:
                raise self._no_band(name)
        for name in names:
            del self.bands[name]
            self.forget_recorded(name)
        self.dropped.update(names)

    def digest(self, names: Iterable[str]) -> str:
        """A short digest of how bands ``names`` steer and are read (vectors, -1 ratio, held level, meter directions and
        units, layers): rows made before and after one of them changed (a retraining, `vectors hold`) tell apart."""
        digest = hashlib.sha256(json.dumps([self.layers.read, self.layers.steered,
                                            sorted(self.layers.token_norm.items())]).encode())
        for name in sorted(names):
            band = self.bands[name]
            digest.update(json.dumps([name, band.negative_ratio, band.hold, band.readout], sort_keys=True).encode())
            for rows in (band.matrix, band.read_directions):
                if rows is not None:
                    digest.update(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        return digest.hexdigest()[:16]

    # -- files

    def manifest(self) -> dict:
        """The bank as bank.yaml holds it."""
        layers = {"read": self.layers.read, "steered": self.layers.steered}
        if self.layers.candidates is not None:
            layers["candidates"] = self.layers.candidates
        if self.layers.token_norm:
            layers["token_norm"] = self.layers.token_norm
        written = {"format": BANK_FORMAT, "model": asdict(self.model), "layers": layers,
                   "bands": {name: band.entry() for name, band in self.bands.items()},
                   "method": self.method, "quality": self.quality, "trained": self.trained}
        return {key: value for key, value in written.items() if value != {} or key == "bands"}

    @classmethod
    def load(cls, directory: Path, manifest: dict | None = None) -> "Bank":
        """The bank in ``directory``; pass its ``manifest`` if it was already read."""
        directory = Path(directory)
        seen = _seen(directory)  # before reading: a save between the two then shows as a change
        if manifest is None:
            manifest = _read_manifest(directory / MANIFEST)
        _require_manifest(directory / MANIFEST, manifest)
        with _broken_manifest(directory / MANIFEST):
            model = ModelRecord(**manifest["model"])
            layers = manifest["layers"]
            bank = cls(directory, model,
                       Layers(layers["read"], [int(layer) for layer in layers["steered"]], layers.get("candidates"),
                              {int(layer): float(norm) for layer, norm in (layers.get("token_norm") or {}).items()}),
                       method=manifest.get("method", {}), quality=manifest.get("quality", {}),
                       trained=manifest.get("trained", {}))
            bands = manifest["bands"].items()
        bank.seen = seen
        bank.voice_centre = _voice_centre(directory / VOICE_CENTRE_FILE, (len(bank.steered_layers), model.n_embd))
        read_directions = _meter_directions(directory / METER_FILE)
        for name, entry in bands:
            _check_entry(directory / MANIFEST, name, entry)
            try:  # a band's file gone or broken stopped every command with no word on how to get going again
                matrix = read_control_vector(directory / entry["file"]).matrix(model.n_layer, model.n_embd, model.name)
            except EqzError as error:
                raise EqzError(f"the bank {directory} cannot read its band '{name}': {error}; "
                               f"{_mend(directory / MANIFEST)}") from None
            with _broken_manifest(directory / MANIFEST):  # a field of the wrong type, such as negative_ratio: abc
                bank.bands[name] = Band(name, matrix, float(entry.get("negative_ratio", 1.0)), entry.get("readout"),
                                        read_directions.get(name),
                                        **{key: entry[key] for key in _BAND_ENTRY_FIELDS if key in entry})
        return bank

    def save(self, directory: Path | None = None) -> Path:
        """Write the band GGUFs, the meter's directions, the voice centre and, last, bank.yaml, each file replaced
        whole (a save stopped midway leaves every file readable; a retrained band's vector may then sit beside its
        old figures until the next save)."""
        directory = Path(directory or self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, band in self.bands.items():
            write_control_vector(directory / f"{name}.gguf", band.matrix, self.model.architecture)
        read_directions = {name: band.read_directions for name, band in self.bands.items()
                           if band.read_directions is not None}
        if read_directions:
            with replacing(directory / METER_FILE) as temporary, open(temporary, "wb") as handle:
                np.savez(handle, **{name: rows.astype(np.float32) for name, rows in read_directions.items()})
        if self.voice_centre is not None:
            with replacing(directory / VOICE_CENTRE_FILE) as temporary, open(temporary, "wb") as handle:
                np.save(handle, self.voice_centre.astype(np.float32))
        else:
            (directory / VOICE_CENTRE_FILE).unlink(missing_ok=True)
        with replacing(directory / MANIFEST) as temporary:  # last: it names what the bank is
            temporary.write_text(yaml.safe_dump(self.manifest(), sort_keys=False, width=120))
        for name in self.dropped - set(self.bands):  # removed bands' vectors, once bank.yaml no longer names them
            (directory / f"{name}.gguf").unlink(missing_ok=True)
        self.dropped.clear()
        self.directory = directory
        self.seen = _seen(directory)
        return directory

    def changed_on_disk(self) -> bool:
        """Whether the bank.yaml this bank was read from (or last saved) has changed since: another eqz saved that
        bank, and saving this one there would undo its change."""
        return self.seen is not None and _seen(self.seen[0].parent) != self.seen


# Reply tokens per setting calibration reads (TrainSettings: 10 prompts x 40 tokens, one sample): a record of
# `eqz eval` revises calibration's verdicts only where it rests on at least as many (three prompts of 24 tokens,
# say, erased a "weak" and changed the warnings).
CALIBRATION_REPLY_TOKENS = 10 * 40


def weighs_as_calibration(setup: dict) -> bool:
    """Whether a recording's setup rests on at least calibration's reply tokens per setting."""
    return setup.get("prompts", 0) * setup.get("samples", 1) * setup.get("reply_tokens", 0) >= CALIBRATION_REPLY_TOKENS


def describe_setup(setup: dict) -> str:
    """A recording's setup in a phrase, as a refusal to mix two names them (what an old record left out, said so)."""
    if not setup:
        return "an unrecorded setup"

    def counted(key: str, name: str) -> str:
        count = setup.get(key)
        return f"unrecorded {name}s" if count is None else f"{count} {name}{'s' if count != 1 else ''}"

    gains = ", ".join("0" if gain == 0 else f"{gain:+g}" for gain in setup["gains"]) if "gains" in setup else \
        "unrecorded gains"
    which = "" if "prompts_sha256" in setup else ", which ones unrecorded"
    scorer = f", scored by the {setup['scorer']} lexicon" if "scorer" in setup else ""
    return f"{counted('prompts', 'prompt')}{which} x {counted('samples', 'sample')} x " \
           f"{counted('reply_tokens', 'token')} at {gains}{scorer}"


def _seen(directory: Path) -> tuple[Path, tuple]:
    """Bank.seen for the bank.yaml in ``directory`` now (a save replaces the file: a new inode)."""
    path = (Path(directory) / MANIFEST).resolve()
    try:
        status = path.stat()
    except OSError:
        return path, ()
    return path, (status.st_ino, status.st_mtime_ns, status.st_size)


def _meter_directions(path: Path) -> dict[str, np.ndarray]:
    """The meter's directions by band ({} for a bank without them: format 1 reads along its steering vectors)."""
    if not path.exists():
        return {}
    try:
        return dict(np.load(path))
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else "damaged, or not a numpy archive"
        raise EqzError(f"cannot read the meter's directions in {path} ({why}); reinstall eqz for the shipped "
                       "bank, or train this one again with `eqz train`") from None


def _voice_centre(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The bank's voice centre, or None where it has none or an unreadable one (only a described band needs it, and
    one that finds none measures it again)."""
    try:
        centre = np.load(path)
    except (OSError, ValueError):
        return None
    return centre if centre.shape == shape else None


def _read_manifest(path: Path) -> dict:
    """bank.yaml through libyaml when PyYAML has it: the pure-Python parser costs ~0.15 s of every start-up."""
    with _broken_manifest(path):
        return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@contextmanager
def _broken_manifest(path: Path) -> Iterator[None]:
    """A bank.yaml that cannot be read, or lacks what a bank has, is one line saying how to get going again: it is
    never skipped in silence (its bands would vanish without a word)."""
    try:
        yield
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as error:
        what = (f"no {error} entry" if isinstance(error, KeyError)
                else " ".join(f"{type(error).__name__}: {error}".split()))
        raise EqzError(f"cannot read the bank {path} ({what}); {_mend(path)}") from None


def _require_manifest(path: Path, manifest) -> None:
    if not _is_manifest(manifest):
        raise EqzError(f"{path} is not an eqz bank (format {BANK_FORMAT}); {_mend(path)}")


def _mend(manifest_path: Path) -> str:
    """What to do about a broken bank.yaml: any bank's folder can go; `eqz vectors reset` removes only the model's
    own (it cannot tell whose a broken bank is otherwise)."""
    if manifest_path.parent.parent == SHIPPED_DIR:
        return REINSTALL
    reset = (" (`eqz vectors reset` does that, if it is the bank of the model you use)"
             if manifest_path.parent.parent == user_data_dir() else "")
    return f"mend it, or delete the folder {manifest_path.parent}{reset}"


def _check_entry(manifest_path: Path, name, entry) -> None:
    """A band's name reaches file names, YAML keys and the web page, and its file must lie in the bank's folder: a
    bank.yaml edited by hand or shared is checked as a new band's name is."""
    try:
        check_band_name(str(name))
    except EqzError as error:
        raise EqzError(f"{manifest_path}: {error}") from None
    file = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(file, str) or Path(file).name != file or not file.endswith(".gguf"):
        raise EqzError(f"{manifest_path}: band '{name}' needs a file: a .gguf in the bank's folder, such as "
                       f"{name}.gguf")


def _is_manifest(manifest) -> bool:
    return isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS


@dataclass
class FoundBank:
    """A bank on disk, read as far as listing and finding need; ``load`` reads its vectors."""

    directory: Path
    model: ModelRecord
    band_names: tuple[str, ...]
    heldout_accuracy: float | None
    _manifest: dict = field(repr=False)

    def load(self) -> Bank:
        return Bank.load(self.directory, self._manifest)


def list_banks() -> list[FoundBank]:
    """Every bank in the search dirs (shadowed ones included)."""
    found, seen = [], set()
    for root in search_dirs():  # $EQZ_VECTORS may name a bank itself (`train -o DIR`'s DIR) rather than its folder
        manifests = [root / MANIFEST] if (root / MANIFEST).is_file() else sorted(root.glob(f"*/{MANIFEST}"))
        for manifest_path in manifests if root.is_dir() else []:
            if manifest_path.resolve() in seen:  # $EQZ_VECTORS naming a bank in another search dir
                continue
            seen.add(manifest_path.resolve())
            manifest = _read_manifest(manifest_path)
            _require_manifest(manifest_path, manifest)
            with _broken_manifest(manifest_path):
                found.append(FoundBank(manifest_path.parent, ModelRecord(**manifest["model"]), tuple(manifest["bands"]),
                                       manifest.get("quality", {}).get("heldout_accuracy"), manifest))
    return found


def known_band_names() -> tuple[str, ...]:
    """The ten built-in bands and every band a bank here adds (imported or described): what a preset may name with
    no model loaded (presets save, validate, list). The model's bank checks it again when the preset is used, so a
    bank that cannot be read (or $EQZ_VECTORS naming no folder) leaves the ten here: preset commands need no bank."""
    try:
        banks = list_banks()
    except EqzError:
        banks = []
    return tuple(dict.fromkeys([*BANDS, *(name for found in banks for name in found.band_names)]))


def _banks_for(info: ModelInfo) -> list[FoundBank]:
    """Every bank trained for this model (by fingerprint), in the order eqz looks: the first is the one it uses."""
    wanted = model_fingerprint(info)
    return [found for found in list_banks() if found.model.fingerprint == wanted]


def find_bank(info: ModelInfo) -> Bank | None:
    """The bank trained for this model (by fingerprint), or None."""
    return next((found.load() for found in _banks_for(info)), None)


def shipped_bank(info: ModelInfo) -> Bank | None:
    """The bank eqz ships for this model (by fingerprint), or None, whatever bank of the user's own is in use."""
    return next((found.load() for found in _banks_for(info) if SHIPPED_DIR in found.directory.parents), None)


def require_bank(info: ModelInfo) -> Bank:
    bank = find_bank(info)
    if bank is None:
        raise EqzError(f"no emotion bank fits {info.name} ({model_fingerprint(info)}); {train_hint(info)}")
    return bank


def train_hint(info: ModelInfo) -> str:
    """What makes a bank for this model, with its file named: `eqz train` alone trains the default model."""
    return f"run `eqz train --model {info.path}` to make one"


def resolve_bank(spec: str | None, info: ModelInfo | None) -> Bank:
    """A bank named by directory, by its folder name, or (spec None) the one for ``info``'s model. Given ``info``, a
    named bank must be that model's: another's vectors do not fit its layers."""
    if spec is None:
        assert info is not None
        return require_bank(info)
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists():
        bank = Bank.load(path)
    else:
        bank = next((found.load() for found in list_banks() if found.directory.name == spec), None)
        if bank is None:
            raise EqzError(f"no bank named '{spec}'; `eqz vectors list` shows the banks found")
    if info is not None and bank.model.fingerprint != model_fingerprint(info):
        raise EqzError(f"the bank {spec} was made for {bank.model.name}, not for {info.name}; load {bank.model.name} "
                       f"to use it, or leave bank out to use the bank of {info.name}")
    return bank


def bank_to_extend(directory: Path, info: ModelInfo) -> Bank | None:
    """The bank that `eqz train --band ... -o DIR` adds to: the one already in ``directory`` where it is this model's,
    so a second described band does not drop the first; else the model's own (None: it has none). A bank in
    ``directory`` for another model is refused, not overwritten."""
    if not (directory / MANIFEST).exists():
        return find_bank(info)
    return _this_models_bank(directory, info)


def _this_models_bank(directory: Path, info: ModelInfo) -> Bank:
    """The bank in ``directory``, refused if it is another model's (a training must not overwrite it)."""
    bank = Bank.load(directory)
    if bank.model.fingerprint != model_fingerprint(info):
        raise EqzError(f"{directory} holds the bank of {bank.model.name}, not of {info.name}; "
                       "give --out a directory of its own")
    return bank


def writable_directory(directory: Path, option: str) -> None:
    """Make ``directory`` (given as ``option``) and try writing in it, so that a long run (a training, an eval) cannot
    fail at its end for want of a place to put what it made."""
    if directory.exists() and not directory.is_dir():
        raise EqzError(f"{directory} is a file; {option} takes a directory")
    made = [path for path in (directory, *directory.parents) if not path.exists()]
    probe = directory / ".eqz-write-test"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise EqzError(f"cannot write into {directory}: {error.strerror or error}; give {option} another directory") \
            from None
    finally:
        for path in made:  # the run makes them when it writes; a run refused or stopped before then leaves none
            if path.is_dir():
                path.rmdir()


def check_training_target(directory: Path, info: ModelInfo, bands: tuple[str, ...] | None) -> None:
    """Before a training starts (minutes of work), what would fail or destroy something when it saves: ``directory``
    a file or not writable, another model's bank in it, or this model's with bands the new bank (``bands``; None:
    it extends the one there) would drop: imported, described, or left out of --bands."""
    writable_directory(directory, "--out")
    if (directory / MANIFEST).exists():
        kept = _this_models_bank(directory, info).names
        dropped = [name for name in kept if name not in bands] if bands is not None else []
        if dropped:  # reset empties only the user's own copy: no help for a folder given with --out
            own = directory.resolve() in {path.resolve() for path in _own_bank_dirs(info)}
            raise EqzError(f"{directory} holds this model's bank with {', '.join(dropped)}, which the new bank would "
                           "drop; give --out a directory of its own" +
                           (" (or `eqz vectors reset` first, which deletes them)" if own else ""))


def _own_bank_dirs(info: ModelInfo) -> list[Path]:
    """Where the user's own bank for this model may live (by name; by name and fingerprint if names clash)."""
    return [user_data_dir() / slug(info.name), user_data_dir() / f"{slug(info.name)}-{model_fingerprint(info)[-10:]}"]


def reset_user_bank(info: ModelInfo) -> Path | None:
    """Delete the user's own bank for this model; returns where it was, or None if there was none."""
    for directory in _own_bank_dirs(info):
        if (directory / MANIFEST).exists() and _bank_fingerprint(directory) in (model_fingerprint(info), None):
            shutil.rmtree(directory)
            return directory
    return None


def _bank_fingerprint(directory: Path) -> str | None:
    """The fingerprint of the model a bank was made for; None where its bank.yaml cannot say (broken: a reset
    removes it, since the folder is named for this model)."""
    try:
        return _read_manifest(directory / MANIFEST)["model"]["fingerprint"]
    except (EqzError, KeyError, TypeError):
        return None


def shadowed(directory: Path, info: ModelInfo) -> str | None:
    """Why a bank just saved in ``directory`` will not be used (a bank for the model that eqz finds first, in
    $EQZ_VECTORS), else None: without it, a change seems to do nothing."""
    first = next((found.directory for found in _banks_for(info)), None)
    if first is None or first.resolve() == Path(directory).resolve():
        return None
    extra = os.environ.get("EQZ_VECTORS")
    if extra and Path(extra).expanduser().resolve() in (first.resolve(), *first.resolve().parents):
        return f"saved in {directory}, but eqz finds the bank in {first} first ($EQZ_VECTORS): unset it to use this one"
    return f"saved in {directory}, but eqz finds the bank in {first} first: move that one away to use this one"


def own_bank_directory(info: ModelInfo) -> Path:
    """Where the user's own bank for this model is or will be: by the model's name, or by name and fingerprint where
    another model of that name has the first."""
    own, other = _own_bank_dirs(info)
    return other if (own / MANIFEST).exists() and _bank_fingerprint(own) != model_fingerprint(info) else own


def writable_bank(info: ModelInfo) -> Bank:
    """The user's own bank for this model; on first use the one it would use otherwise (the shipped one), or an empty
    one, to be written there by its first ``save()``: a change that fails first leaves no copy behind to shadow it."""
    directory = own_bank_directory(info)
    if (directory / MANIFEST).exists():
        return Bank.load(directory)
    existing = find_bank(info)
    if existing is not None:
        existing.directory = directory
        return existing
    return Bank.empty(info, directory)


def adopt_vector(bank: Bank, path: str | Path, name: str, info: ModelInfo) -> Band:
    """Add a repeng / llama.cpp control vector to ``bank`` as band ``name`` (gain 1 = the file as it is)."""
    check_band_name(name)
    vector_file = read_control_vector(path)
    matrix = vector_file.matrix(info.n_layer, info.n_embd, info.name)
    if not np.any(matrix):  # refused before anything is written (its save failed, leaving a bank with no bank.yaml)
        raise EqzError(f"{path} is zero on every layer: as a slider it would steer nothing; give a control vector "
                       "that moves some layer")
    band = Band(name, matrix, source=os.path.abspath(Path(path).expanduser()))  # which file, whatever the folder
    bank.bands[name] = band
    bank.forget_recorded(name)  # figures of a band it replaces measured another vector
    if bank.layers.read is None:
        steered = [layer for layer in range(info.n_layer) if np.any(matrix[layer])]
        bank.layers.steered = steered
        bank.layers.read = steered[len(steered) // 2]
    return band
