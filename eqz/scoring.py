"""Scores for generated text that do not use the vector bank: emotion word rates and fluency measures.

The emotion scorer is the NRC Emotion Lexicon (Mohammad & Turney 2013; 6,468 words x Plutchik's eight emotions
+ positive/negative), read from the NRCLex package when it is installed (``pip install 'eqz[lexicon]'``; the
lexicon is free for research, see its terms). It was written by neither the bank nor us, so calibration and
``eqz eval`` judge steering by something the directions never saw. Without it, eqz's own word list
(``data/lexicon.yaml``) stands in, and bank.yaml records which scorer was used.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
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


def _own_counts(tokens: list[str]) -> Counter[str]:
    table = lexicon()
    return Counter(table[token] for token in tokens if token in table)


# Inflections only, each with the stems it may come from (hated -> hate before hat; scared -> scare, not scar).
# Derivations are not undone: NRC rates words, and "really" is not "real" (trust), nor "usually" "usual".
_INFLECTIONS = (("'s", ("",)), ("s", ("",)), ("es", ("",)), ("d", ("",)), ("ed", ("e", "")), ("ing", ("e", "")))


@lru_cache(maxsize=1)
def nrc_lexicon() -> dict[str, frozenset[str]] | None:
    """word -> NRC categories (the eight emotions, positive, negative), or None when NRCLex is not installed.

    Read straight from the package's data file: importing nrclex itself would pull in TextBlob and NLTK.
    """
    try:
        path = metadata.distribution("NRCLex").locate_file("nrclex/data/nrc_en.json")
        data = json.loads(open(path, encoding="utf-8").read())
    except (metadata.PackageNotFoundError, OSError, ValueError):
        return None
    return {word.lower(): frozenset(categories) for word, categories in data.items()}


def nrc_categories(word: str, table: dict[str, frozenset[str]]) -> frozenset[str]:
    """The categories of ``word`` or, for an inflected form the lexicon lacks (smiled, fears), of its stem."""
    if word in table:
        return table[word]
    for suffix, endings in _INFLECTIONS:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            for ending in endings:
                if (stem := word[: -len(suffix)] + ending) in table:
                    return table[stem]
    return frozenset()


# What EmotionScorer.word_counts counts, in order, before the number of words (positive and negative: NRC only).
COUNTED = (*PRIMARIES, "positive", "negative")
_CIRCUMPLEX_WEIGHTS = np.array([CIRCUMPLEX[band] for band in PRIMARIES])  # (primaries, valence/arousal)


def on_axes(primaries: np.ndarray) -> np.ndarray:
    """(..., 8) an amount per primary (words, or the judge's probabilities) -> (..., 2) valence and arousal, each
    primary weighted by its place on the circumplex."""
    return primaries @ _CIRCUMPLEX_WEIGHTS


@dataclass(frozen=True)
class EmotionScorer:
    """Emotion words per 100 words, per band: the independent judge of what a slider does to text."""

    name: str

    def word_counts(self, text: str) -> np.ndarray:
        """The words of each of COUNTED in ``text``, then the number of words: what rates are made of, kept per
        reply so that a verdict can be re-drawn over the prompts (eval.clear_share)."""
        tokens = words(text)
        counts = self._counts(tokens)
        return np.array([counts[key] for key in COUNTED] + [len(tokens)], dtype=np.int64)

    def rates_of(self, counts: np.ndarray) -> np.ndarray:
        """(..., COUNTED + words) counts -> (..., BANDS) words per 100 words: the primaries, valence and arousal
        as ``rates`` defines them."""
        per100 = 100.0 * counts[..., :-1] / np.maximum(1, counts[..., -1:])
        primaries = per100[..., : len(PRIMARIES)]
        axes = on_axes(primaries)
        if self._nrc_table() is not None:
            axes[..., 0] = per100[..., COUNTED.index("positive")] - per100[..., COUNTED.index("negative")]
        return np.concatenate([primaries, axes], axis=-1)

    def _nrc_table(self) -> dict[str, frozenset[str]] | None:
        """NRC's word table where this scorer is NRC and NRCLex is installed; None: eqz's own word list counts."""
        return nrc_lexicon() if self.name == "nrc" else None

    def _counts(self, tokens: list[str]) -> Counter[str]:
        table = self._nrc_table()
        if table is None:
            return _own_counts(tokens)
        counts: Counter[str] = Counter()
        for token in tokens:
            counts.update(nrc_categories(token, table))
        return counts

    def rates(self, text: str) -> dict[str, float]:
        """Per 100 words: each primary's words; valence = positive minus negative words (with eqz's own list, which
        has no such words: the primaries' rates weighted by their circumplex valence); arousal = the primaries'
        rates weighted by their circumplex arousal (high-arousal words minus low-arousal words)."""
        return dict(zip(BANDS, self.rates_of(self.word_counts(text)).tolist()))


def emotion_scorer() -> EmotionScorer:
    """The NRC lexicon when installed, else eqz's own word list."""
    return EmotionScorer("nrc" if nrc_lexicon() is not None else "eqz-words")


def lexicon_missing() -> str | None:
    """A warning where the NRC lexicon is not installed: eqz's own word list scores instead, which changes every
    lexicon figure (and which records can be merged with which); None where it is."""
    if nrc_lexicon() is not None:
        return None
    return ("the NRC Emotion Lexicon is not installed, so eqz's own word list scores the replies and the lexicon "
            "figures differ from the README's; pip install 'eqz[lexicon]' (make setup installs it)")


# Rates are per 100 words; this prior keeps lifts finite where the unsteered replies have no such word.
LIFT_PRIOR = 0.25


def lift(rate: float, baseline: float) -> float:
    """How many times more of an emotion's words steered text has than the unsteered text (smoothed)."""
    return (rate + LIFT_PRIOR) / (baseline + LIFT_PRIOR)


def latin_share(text: str) -> float:
    """Share of letters that are ASCII: replies that drift into another script or language score low."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def words_per_token(word_counts: Sequence[int], tokens: Sequence[Sequence[int]]) -> float:
    """Words per model token over all replies (``word_counts``: each reply's number of ``words``): text that decays
    into punctuation runs, glued-together words or letter soup scores low, which the word-level bounds cannot see
    (they find no words to count). No tokens at all is 1.0: nothing to judge. A stop string's tokens count though
    its text is held back, alike in every setting."""
    total = sum(len(reply) for reply in tokens)
    return int(sum(word_counts)) / total if total else 1.0


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

