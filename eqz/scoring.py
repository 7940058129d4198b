"""Scores for generated text that do not use the vector bank: an emotion word list and fluency measures.

The word list (``data/lexicon.yaml``) is our own, written for eqz. Its scores are the independent check that a
slider does what its name says; the model's own readout (meter) is the second opinion.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from importlib.resources import files

import numpy as np
import yaml

from .bands import BANDS, CIRCUMPLEX, PRIMARIES

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def lexicon() -> dict[str, str]:
    """word -> band, for the eight primaries."""
    data = yaml.safe_load(files("eqz").joinpath("data/lexicon.yaml").read_text(encoding="utf-8"))
    return {word: band for band in PRIMARIES for word in data[band]}


def lexicon_scores(text: str) -> dict[str, float]:
    """Band words per 100 words for each primary, and the circumplex-weighted valence and arousal."""
    tokens = words(text)
    table = lexicon()
    counts = Counter(table[w] for w in tokens if w in table)
    per100 = {band: 100.0 * counts[band] / max(1, len(tokens)) for band in PRIMARIES}
    per100["valence"] = sum(CIRCUMPLEX[b][0] * per100[b] for b in PRIMARIES)
    per100["arousal"] = sum(CIRCUMPLEX[b][1] * per100[b] for b in PRIMARIES)
    return {band: per100[band] for band in BANDS}


def repeated_trigrams(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one (0 = none, 1 = all): degenerate loops score high."""
    tokens = words(text)
    grams = list(zip(tokens, tokens[1:], tokens[2:]))
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct2(text: str) -> float:
    """Distinct word bigrams over all bigrams (1 = no bigram repeats)."""
    tokens = words(text)
    grams = list(zip(tokens, tokens[1:]))
    return len(set(grams)) / len(grams) if grams else 1.0


def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-probability of a reply's tokens."""
    return math.exp(-float(np.mean(logprobs))) if len(logprobs) else float("nan")
