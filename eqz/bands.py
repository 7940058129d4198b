"""The equalizer's bands: Plutchik's eight primaries and the two circumplex axes built from them."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .errors import EqzError
from .sampling import as_number

PRIMARIES = ("joy", "trust", "fear", "surprise", "sadness", "disgust", "anger", "anticipation")
AXES = ("valence", "arousal")
BANDS = PRIMARIES + AXES

# Where each primary sits on Russell's circumplex (valence, arousal), from the usual placements of these
# emotion words in circumplex studies, on a -1..1 scale. The axes are these weighted sums of the primaries'
# directions: no separate stimuli, and exactly the contrast "pleasant vs unpleasant" / "activated vs calm"
# that the primaries already carry. See README "How the bank is built".
CIRCUMPLEX = {
    #               valence  arousal
    "joy":          (0.9,     0.5),
    "trust":        (0.6,    -0.3),
    "fear":         (-0.7,    0.7),
    "surprise":     (0.1,     0.8),
    "sadness":      (-0.8,   -0.5),
    "disgust":      (-0.7,    0.2),
    "anger":        (-0.7,    0.8),
    "anticipation": (0.4,     0.4),
}

# What each band means, in words a model can be asked to feel: the persona prompts that make the bank's
# "own voice" directions (eqz train), and the prompt-only baseline that `eqz eval` sets beside every slider.
DESCRIPTIONS = {
    "joy": "joyful: happy, delighted and cheerful",
    "trust": "trusting and warm: you feel safe, grateful and sure of the people around you",
    "fear": "afraid: anxious, worried and full of dread",
    "surprise": "astonished: amazed, startled and full of disbelief",
    "sadness": "sad: sorrowful, lonely and full of grief",
    "disgust": "disgusted: revolted, repelled and full of distaste",
    "anger": "angry: furious, irritated and indignant",
    "anticipation": "full of anticipation: eager, expectant and impatient for what comes next",
}
NEUTRAL_PERSONA = "You are calm and matter-of-fact. Reply plainly, without showing any feeling."


def persona_prompt(description: str) -> str:
    """The system prompt (or, on a model without a chat template, the first line) that asks for a feeling."""
    return f"You are {description}. Let this feeling show in every sentence of your reply."


def primary_personas() -> dict[str, str]:
    """band -> the persona prompt asking for it, for the eight primaries."""
    return {band: persona_prompt(DESCRIPTIONS[band]) for band in PRIMARIES}


# column labels where a band's name does not fit (the chat panel, eqz analyze)
SHORT_NAMES = {
    "joy": "joy", "trust": "trust", "fear": "fear", "surprise": "surpr", "sadness": "sad", "disgust": "disg",
    "anger": "anger", "anticipation": "antic", "valence": "val", "arousal": "arous",
}

MAX_GAIN = 2.0
SAFE_GAIN = 1.0
# Clamp levels are in the meter's units (1 = typical emotional text). Held at every steered layer, levels 2-6 steer
# clearly and stay fluent on the default model's held-out prompts and 12 is no longer text
# (benchmarks/clamp_steering.py, docs/steering-limits.md section 9).
MAX_LEVEL = 6.0


def unknown_band(band: str, valid: tuple[str, ...], what: str = "") -> EqzError:
    """The error for a band not in ``valid``. A built-in band missing from a bank was removed from the user's copy
    or never trained (``train --bands``): a preset naming it fails, and the line says why and what brings it back
    (no flag: the library and the server give the same line)."""
    if band in BANDS:
        return EqzError(f"this bank has no band '{band}'{what} (removed from your copy of the bank, or never trained: "
                        "`eqz vectors reset` restores a shipped bank, `eqz train --bands` trains one for other "
                        f"models); it has {', '.join(valid)}")
    return EqzError(f"unknown band '{band}'{what}; valid bands: {', '.join(valid)}")


def band_key(band) -> str:
    """A band name as eqz keys it, wherever it comes from (flags, the library, preset files, the server): any case,
    spaces around it ignored."""
    return str(band).strip().lower()


def keyed_by_band(mapping: dict, what: str) -> dict:
    """``mapping`` (band -> value) keyed by ``band_key``; one line where two of its keys name one band."""
    keyed: dict = {}
    for band, value in mapping.items():
        key = band_key(band)
        if key in keyed:
            raise EqzError(f"{what} names the band {key} twice; give each band once")
        keyed[key] = value
    return keyed


def check_gain(band: str, value, valid: tuple[str, ...] | None = BANDS, what: str = "gain") -> float:
    """A gain (or, ``what`` "level", a clamp level) for ``band`` as a float, or a one-line EqzError naming the valid
    bands / range. ``valid`` None: any band name (the bank checks it later)."""
    if valid is not None and band not in valid:
        raise unknown_band(band, valid)
    gain = as_number(value)
    if gain is None:
        raise EqzError(f"{what} for {band} must be a number, got {value!r}")
    limit = MAX_LEVEL if what == "level" else MAX_GAIN
    if not math.isfinite(gain) or abs(gain) > limit:
        raise EqzError(f"{what} for {band} must be a finite number in [-{limit:g}, {limit:g}], got {value!r}")
    return gain


def parse_set(spec: str, valid: tuple[str, ...] | None = BANDS, option: str = "--set") -> tuple[str, float]:
    """``BAND=GAIN`` (as given to --set or --clamp) -> (band, gain)."""
    band, sep, value = spec.partition("=")
    if not sep:
        raise EqzError(f"{option} takes BAND=VALUE, got '{spec}'" + (f"; valid bands: {', '.join(valid)}" if valid else ""))
    return band_key(band), check_gain(band_key(band), value.strip(), valid,
                                      "level" if option in ("--clamp", "/clamp") else "gain")


def gain_warning(band: str, gain: float) -> str:
    """A short warning suffix for gains past the calibrated range, else ''."""
    if abs(gain) > SAFE_GAIN:
        return f" (beyond the calibrated ±{SAFE_GAIN:g} for {band}: expect less fluent text)"
    return ""


def gain_warnings(gains: Iterable[tuple[str, float]]) -> list[str]:
    """A line for each (band, gain) past the calibrated range: allowed, and said (the CLI's and the library's)."""
    return [f"{band}={gain:g}{warning}" for band, gain in gains if (warning := gain_warning(band, gain))]


MAX_DESCRIPTION = 200  # characters of a described band's description: a phrase, not a text

_BAND_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # whole names only: fullmatch


def check_band_name(name: str) -> None:
    """A new band's name must work as a --set key, a YAML key and a file name."""
    if not _BAND_NAME.fullmatch(name):
        raise EqzError(f"band name {name!r} must be lowercase letters, digits or _, starting with a letter, at most "
                       "32 characters")


def parse_described(spec: str) -> tuple[str, str]:
    """``NAME=DESCRIPTION`` (as given to ``eqz train --band``) -> (name, description)."""
    name, sep, description = spec.partition("=")
    name, description = band_key(name), description.strip()
    if not sep or not description:
        raise EqzError(f"--band takes NAME=\"what the feeling is\", e.g. nostalgia=\"wistful longing for the past\"; "
                       f"got '{spec}'")
    check_described(name, description)
    return name, description


def check_described(name: str, description: str) -> None:
    """A described band (``eqz train --band``, the library's ``train(described=...)``): a name of its own that works
    as a file name, and a description that says something."""
    check_band_name(name)
    if name in BANDS:
        raise EqzError(f"'{name}' is a built-in band; give the described band a name of its own")
    if not description.strip():
        raise EqzError(f"the description of {name} is empty; say what the feeling is, such as 'wistful longing for "
                       "the past'")
    if len(description) > MAX_DESCRIPTION:  # it is read into every persona prompt: past a batch, training stopped
        raise EqzError(f"the description of {name} has {len(description)} characters; say what the feeling is in at "
                       f"most {MAX_DESCRIPTION}, such as 'wistful longing for the past'")
