"""The stimulus set shipped with eqz: matched emotional/neutral pairs per band, neutral passages, prompts.

Split rule (fixed, so every bank is measured on the same held-out text): pairs come in blocks of four kinds
(first person, second person, persona, story); every fourth block, ``(index // 4) % 4 == 3``, is held out.
That is 16 of 64 pairs per band, four of each kind. Training never sees them.
Version 2 adds short sentences (20 per band, all for training): the meter learns from them what separates the
feelings in a line of chat as well as in a passage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

import yaml

from .bands import PRIMARIES

STIMULUS_SET_VERSION = 2
SPLIT_RULE = "(pair index // 4) % 4 == 3 is held out"


@dataclass(frozen=True)
class Pair:
    band: str
    kind: str
    neutral: str
    emotional: str


@dataclass(frozen=True)
class StimulusSet:
    train: dict[str, list[Pair]]
    heldout: dict[str, list[Pair]]
    neutral: list[str]
    sentences: dict[str, list[str]]  # short emotional sentences per band (training only)


def _read(name: str) -> str:
    return files("eqz").joinpath(f"data/{name}").read_text(encoding="utf-8")


def _prompts(name: str) -> list[str]:
    """The prompts of ``data/prompts/<name>.txt``, one a line."""
    return [line.strip() for line in _read(f"prompts/{name}.txt").splitlines() if line.strip()]


def is_heldout(index: int) -> bool:
    return (index // 4) % 4 == 3


@lru_cache(maxsize=1)
def load_stimuli() -> StimulusSet:
    train: dict[str, list[Pair]] = {}
    heldout: dict[str, list[Pair]] = {}
    for band in PRIMARIES:
        data = yaml.safe_load(_read(f"stimuli/{band}.yaml"))
        pairs = [Pair(band, p["kind"], p["neutral"], p["emotional"]) for p in data["pairs"]]
        train[band] = [p for i, p in enumerate(pairs) if not is_heldout(i)]
        heldout[band] = [p for i, p in enumerate(pairs) if is_heldout(i)]
    neutral = yaml.safe_load(_read("stimuli/neutral.yaml"))["texts"]
    sentences = yaml.safe_load(_read("stimuli/sentences.yaml"))
    return StimulusSet(train, heldout, neutral, {band: sentences[band] for band in PRIMARIES})


@lru_cache(maxsize=1)
def neutral_prompts() -> list[str]:
    """Emotionally neutral chat prompts: the default prompt set of calibration and ``eqz eval``."""
    return _prompts("neutral")


@lru_cache(maxsize=1)
def test_prompts() -> list[str]:
    """Neutral chat prompts written after every design choice was made: only the steering pages
    (benchmarks/steering.py) read them, so no choice was ever tuned on them (the eval split has been)."""
    return _prompts("test")


@lru_cache(maxsize=1)
def training_prompts() -> list[str]:
    """Neutral chat prompts the persona replies of ``eqz train`` answer; no other set shares one."""
    return _prompts("train")
