"""Sampling settings: one validated record shared by generate, chat, batch, presets and saved transcripts."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

from .errors import EqzError

MIN_CONTEXT = 64  # the fewest tokens a context holds (`--ctx`): a chat template head and a short reply
EVAL_MIN_TOKENS = 8  # the fewest tokens per reply an eval measures (`eqz eval -n`): fewer carry no emotion words

# (low, high, integer?) for every setting; None on a side means unbounded.
_LIMITS: dict[str, tuple[float | None, float | None, bool]] = {
    "temperature": (0.0, 5.0, False),
    "top_k": (0, None, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, 5.0, False),
    "repeat_last_n": (-1, None, True),
    "max_tokens": (1, None, True),
}
# Settings whose low bound is itself refused: llama.cpp divides a repeated token's logit by repeat_penalty.
_ABOVE_LOW = {"repeat_penalty"}


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. ``temperature`` 0 means greedy; ``seed`` None means a fresh random seed."""

    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    max_tokens: int = 256
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def reply_room(self, context_tokens: int) -> int:
        """The tokens a prompt must leave free in a context of ``context_tokens`` for its reply: ``max_tokens``, but
        at most half the context (a long conversation keeps its latest turns, not a reply of that length)."""
        return min(self.max_tokens, context_tokens // 2)


SETTING_NAMES = tuple(f.name for f in fields(Sampling))


def check_setting(name: str, value) -> float | int:
    """Return ``value`` as the right number type for setting ``name``, or raise a one-line EqzError."""
    if name == "seed":
        return _as_int(name, value, 0, 2**32 - 1)
    if name not in _LIMITS:
        raise EqzError(f"unknown sampling setting '{name}'; known: {', '.join(SETTING_NAMES)}")
    low, high, integer = _LIMITS[name]
    if integer:
        return _as_int(name, value, low, high)
    number = as_number(value)
    if number is None:
        raise EqzError(f"{name} must be a number, got {value!r}")
    above_low = name in _ABOVE_LOW
    if not math.isfinite(number) or (low is not None and (number <= low if above_low else number < low)) \
            or (high is not None and number > high):
        raise EqzError(f"{name} must be a finite number in {'(' if above_low else '['}{low}, {high}], got {value!r}")
    return number


def as_number(value) -> float | None:
    """``value`` as a float (a command line's string too), or None where it is no number: true and false included,
    which YAML and JSON would otherwise make 1 and 0."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def whole_number(text: str) -> int | None:
    """``text`` of ASCII digits as an int, else None: str.isdigit also takes "²", which int() refuses."""
    return int(text) if text.isascii() and text.isdigit() else None


def is_whole(value, least: int) -> bool:
    """Whether a library argument such as a count is an int (a numpy one too) of at least ``least``; a bool, a float or
    a string is not."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def _as_int(name: str, value, low, high) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise EqzError(f"{name} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EqzError(f"{name} must be a whole number, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise EqzError(f"{name} must be {bounds}, got {value!r}")
    return number


def make_sampling(base: Sampling | None = None, **changes) -> Sampling:
    """``base`` (or the defaults) with every non-None value of ``changes`` validated and applied."""
    checked = {name: check_setting(name, value) for name, value in changes.items() if value is not None}
    return replace(base or Sampling(), **checked)
