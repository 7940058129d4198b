"""Preset moods: YAML files naming slider gains by band, sampling settings, an optional system prompt and filters.

Bundled presets live in ``presets/``; user presets in ``$XDG_CONFIG_HOME/eqz/presets`` override bundled ones of
the same name. Every problem is reported as one line naming the file, the field and what is allowed. Because
moods are named by bands, a preset works on every model that has a bank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from .bands import BANDS, band_key, check_gain, keyed_by_band, unknown_band
from .errors import EqzError
from .files import xdg_home
from .sampling import SETTING_NAMES, Sampling, check_setting, make_sampling
from .shipped import shipped_dir

BUNDLED_DIR = shipped_dir("presets")
KEYS = ("name", "description", "sliders", "sampling", "system", "filters")
FILTER_KEYS = ("clamp", "ablate")
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")  # whole names only: fullmatch
_NAME_RULE = "a lowercase letter, then lowercase letters, digits, - or _, 40 at most"


def user_dir() -> Path:
    return xdg_home("XDG_CONFIG_HOME", ".config") / "eqz" / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    sliders: dict[str, float]
    sampling: dict[str, float | int]
    system: str | None = None
    filters: dict = field(default_factory=dict)  # {"clamp": {band: level}, "ablate": [band, ...]}
    path: Path | None = None

    def __post_init__(self):
        """A file's settings are checked as it is read and everyone's sliders, sampling and filters where they are
        used; a system prompt made in Python that was not text failed at the first message, in the template."""
        if self.system is not None and not isinstance(self.system, str):
            raise EqzError(f"a preset's system prompt must be text, got {type(self.system).__name__}")

    def to_yaml(self) -> str:
        data: dict = {"name": self.name, "description": self.description, "sliders": self.sliders}
        if self.sampling:
            data["sampling"] = self.sampling
        if self.system:
            data["system"] = self.system
        if self.filters:
            data["filters"] = self.filters
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def describe_filters(filters: dict) -> str:
    """``{"clamp": {band: level}, "ablate": [band]}`` in words: "clamp fear +0.0, ablate anger"."""
    return ", ".join([f"clamp {band} {level:+.1f}" for band, level in (filters.get("clamp") or {}).items()]
                     + [f"ablate {band}" for band in filters.get("ablate") or []])


def parse_preset(data, where: str, bands: tuple[str, ...] = BANDS) -> Preset:
    """Validate a loaded YAML mapping; ``where`` names the file in error messages."""
    if not isinstance(data, dict):
        raise EqzError(f"{where}: a preset is a YAML mapping with keys {', '.join(KEYS)}")
    unknown = [key for key in data if key not in KEYS]
    if unknown:
        raise EqzError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise EqzError(f"{where}: name must be {_NAME_RULE} (got {name!r})")
    description = data.get("description")
    description = "" if description is None else description  # "description:" left empty, as system: may be
    if not isinstance(description, str):
        raise EqzError(f"{where}: description must be text")
    sliders = data.get("sliders") or {}
    if not isinstance(sliders, dict):
        raise EqzError(f"{where}: sliders must map band names to gains, e.g. joy: 0.5")
    checked_sliders = {}
    for band, gain in _keyed(sliders, where, "sliders").items():
        try:
            checked_sliders[band] = check_gain(band, gain, bands)
        except EqzError as error:
            raise EqzError(f"{where}: sliders.{band}: {error}") from None
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise EqzError(f"{where}: sampling must be a mapping; allowed settings: {', '.join(SETTING_NAMES)}")
    checked_sampling = {}
    for key, value in sampling.items():
        if key not in SETTING_NAMES:
            raise EqzError(f"{where}: sampling.{key} is not a setting; allowed: {', '.join(SETTING_NAMES)}")
        try:
            checked_sampling[key] = check_setting(key, value)
        except EqzError as error:
            raise EqzError(f"{where}: sampling.{key}: {error}") from None
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise EqzError(f"{where}: system must be text")
    filters = _parse_filters(data.get("filters") or {}, where, bands)
    return Preset(name, description, checked_sliders, checked_sampling, system, filters)


def _keyed(mapping: dict, where: str, what: str) -> dict:
    try:
        return keyed_by_band(mapping, what)
    except EqzError as error:
        raise EqzError(f"{where}: {error}") from None


def _parse_filters(filters, where: str, bands: tuple[str, ...]) -> dict:
    if not isinstance(filters, dict):
        raise EqzError(f"{where}: filters must be a mapping with keys {', '.join(FILTER_KEYS)}")
    unknown = [key for key in filters if key not in FILTER_KEYS]
    if unknown:
        raise EqzError(f"{where}: filters.{unknown[0]} is not a filter; allowed: {', '.join(FILTER_KEYS)}")
    result: dict = {}
    clamp = filters.get("clamp") or {}
    if not isinstance(clamp, dict):
        raise EqzError(f"{where}: filters.clamp must map bands to levels, e.g. fear: 0")
    if clamp:
        result["clamp"] = {}
        for band, level in _keyed(clamp, where, "filters.clamp").items():
            try:
                result["clamp"][band] = check_gain(band, level, bands, "level")
            except EqzError as error:
                raise EqzError(f"{where}: filters.clamp.{band}: {error}") from None
    ablate = filters.get("ablate") or []
    if not isinstance(ablate, list) or any(band_key(band) not in bands for band in ablate):
        raise EqzError(f"{where}: filters.ablate must list bands among: {', '.join(bands)}")
    ablate = [band_key(band) for band in ablate]
    both = [band for band in ablate if band in result.get("clamp", {})]
    if both:
        raise EqzError(f"{where}: filters clamp and ablate {both[0]}; a filter holds a band at one level, choose one")
    if ablate:
        result["ablate"] = list(dict.fromkeys(ablate))
    return result


class _OneOfEachKey(yaml.SafeLoader):
    """yaml.safe_load keeps the last of a repeated key: `sliders: {joy: 0.5, joy: -0.5}` was read as -0.5."""


def _mapping_once(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *base, whose keys this mapping may write again
            continue
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(problem="found unhashable key",
                                                    problem_mark=key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(problem=f"the key {key!r} comes twice in one mapping",
                                                    problem_mark=key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_OneOfEachKey.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_once)


def load_preset_file(path: Path, bands: tuple[str, ...] = BANDS) -> Preset:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_OneOfEachKey)
    except OSError as error:
        raise EqzError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise EqzError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
                       "save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line, as every error is
        raise EqzError(f"{path}: not valid YAML{at}: {problem}") from None
    if isinstance(data, dict) and "name" not in data:  # a file names its preset: mood.yaml holds "mood"
        if not _NAME.fullmatch(path.stem):
            raise EqzError(f"{path}: no name: given, and the file's name '{path.stem}' is not a preset name "
                           f"({_NAME_RULE}); add name: to the file")
        data = {"name": path.stem, **data}
    preset = parse_preset(data, str(path), bands)
    return Preset(**{**preset.__dict__, "path": path})


@dataclass
class PresetEntry:
    """A preset file found on disk: loaded, or the reason it could not be."""

    name: str
    path: Path
    source: str  # "bundled" or "user"
    preset: Preset | None
    error: str | None


def discover(bands: tuple[str, ...] = BANDS) -> dict[str, PresetEntry]:
    """Every preset by name, user ones overriding bundled ones; broken files are listed with their error. A user
    file that does not load still stands in for the bundled preset of its name, so using that name says what is wrong
    with the user's file instead of quietly taking eqz's. Where two files of one folder name one preset, the file
    named for it wins (a copy kept as glow.bak.yaml does not hide the glow.yaml being edited); the other is listed
    as broken."""
    entries: dict[str, PresetEntry] = {}
    for source, directory in (("bundled", BUNDLED_DIR), ("user", user_dir())):
        paths = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]) if directory.is_dir() else []
        loaded: list[tuple[Path, Preset | None, str | None]] = []
        for path in paths:
            try:
                loaded.append((path, load_preset_file(path, bands), None))
            except EqzError as error:
                loaded.append((path, None, str(error)))
        # files named for their preset first, then broken ones (taken to be named for theirs, as names are looked up:
        # in lower case), so they win the name over a copy naming itself so; then those naming another preset
        loaded.sort(key=lambda item: (1 if item[1] is None else 0 if item[1].name == item[0].stem.lower() else 2,
                                      item[0]))
        here: dict[str, PresetEntry] = {}
        for path, preset, error in loaded:
            if preset is not None and preset.name in here:  # two files of one folder, one name: say so
                error = (f"{path} names itself '{preset.name}', as {here[preset.name].path.name} does; give each "
                         "preset a name of its own")
                preset = None
            key = preset.name if preset is not None else path.stem.lower()
            key = key if key not in here else path.name
            here[key] = entries[key] = PresetEntry(key, path, source, preset, error)
    return entries


def get_preset(name: str, bands: tuple[str, ...] = BANDS) -> Preset:
    """A preset by name (case-insensitive, like band names), or a preset file by its path (a .yaml file someone
    shared, used without saving it)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return load_preset_file(Path(name).expanduser(), bands)
    name = name.strip().lower()
    entries = discover(bands)
    entry = entries.get(name)
    if entry is None:
        valid = ", ".join(sorted(n for n, e in entries.items() if e.preset)) or "none"
        raise EqzError(f"no preset named '{name}'; available: {valid}")
    if entry.preset is None:
        raise EqzError(entry.error or f"preset {name} is invalid")
    return entry.preset


def save_preset(preset: Preset, replace: bool = False) -> Path:
    """Write a user preset (standing in for a bundled one of the same name). A saved one of the same name is
    replaced only when asked: it may hold a system prompt and sampling the new one does not. It is replaced in its
    own file where that is named for it (mood.yml); else mood.yaml is written, which wins the name (``discover``)."""
    directory = user_dir()
    saved = discover().get(preset.name)
    saved = saved if saved is not None and saved.source == "user" else None
    path = (saved.path if saved is not None and saved.path.stem.lower() == preset.name
            else directory / f"{preset.name}.yaml")
    if not replace:
        if saved is not None:
            raise EqzError(f"a preset '{preset.name}' is already saved ({saved.path}); pass --replace (replace=True "
                           "in the library) to overwrite it, or choose another name")
        if path.exists():  # a file of that name holding another preset, or none
            raise EqzError(f"{path} is there already, holding another preset or none; pass --replace (replace=True "
                           "in the library) to overwrite it, or choose another name")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(preset.to_yaml(), encoding="utf-8")
    except OSError as error:
        raise EqzError(f"cannot save {path}: {error.strerror or error}; check the folder {directory}") from None
    return path


def is_preset_name(name: str) -> bool:
    """A preset's name (case-insensitive), not a file's path."""
    return bool(_NAME.fullmatch(name.strip().lower()))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise EqzError(f"preset name {name!r} must be {_NAME_RULE}")
    return name



# -------------------------------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class Resolved:
    """What a preset with explicit settings on top of it comes to (the explicit ones win)."""

    preset: str | None
    gains: dict[str, float]
    sampling: Sampling
    system: str | None
    filters: dict  # {"clamp": {band: level}, "ablate": [band, ...]}, or {} for none


def resolve(preset: Preset | None, valid: tuple[str, ...], sliders: dict[str, float] | None = None,
            sampling: dict | None = None, system: str | None = None, clamp: dict[str, float] | None = None,
            ablate: Iterable[str] = ()) -> Resolved:
    """The one merge of a preset and explicit sliders, sampling, system prompt and filters: generate, chat and
    batch all go through it. Bands are checked against ``valid``."""
    # a preset's gains are numbers in range: a file's were checked as it was read, not one made in Python or saved
    # with a conversation (its bands are the caller's to check: a resumed file's are left out where the bank lacks them)
    preset_sliders = keyed_by_band(preset.sliders, "the preset's sliders") if preset else {}
    gains = {band: check_gain(band, gain, None) for band, gain in preset_sliders.items()}
    gains.update({band: check_gain(band, gain, valid) for band, gain in (sliders or {}).items()})
    base = make_sampling(None, **preset.sampling) if preset else None
    return Resolved(preset.name if preset else None, gains, make_sampling(base, **(sampling or {})),
                    (preset.system if preset else None) if system is None else (system or None),  # "" clears it
                    merge_filters(preset.filters if preset else {}, clamp or {}, ablate, valid))


def merge_filters(preset_filters: dict, clamp: dict[str, float], ablate: Iterable[str], valid: tuple[str, ...]) -> dict:
    """A preset's filters with explicit clamps and notches on top: an explicit one replaces the preset's on its band,
    and a band cannot be both clamped and notched. Every band and level is checked, the preset's too (one made in
    Python skips the file's checks)."""
    notched = list(dict.fromkeys(ablate))
    clamped = {band: check_gain(band, level, valid, "level") for band, level in clamp.items()}
    preset_clamps = keyed_by_band(preset_filters.get("clamp", {}), "the preset's clamps")
    clamps = {**{band: check_gain(band, level, valid, "level") for band, level in preset_clamps.items()
                 if band not in notched}, **clamped}
    preset_notches = [band_key(band) for band in preset_filters.get("ablate", [])]
    ablates = list(dict.fromkeys([band for band in preset_notches if band not in clamped] + notched))
    for band in ablates:
        if band not in valid:
            raise unknown_band(band, valid, " to ablate")
        if band in clamps:
            raise EqzError(f"{band} is both clamped and notched; a filter holds a band at one level, so choose one")
    return {"clamp": clamps, "ablate": ablates} if clamps or ablates else {}
