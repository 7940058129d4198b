"""``eqz eval``: what each slider does, measured. Also the reply bench that ``eqz train`` calibrates with.

Replies are generated to neutral prompts under each band and gain (through the parallel generator, the same
machinery as ``eqz batch``), and beside them replies where the emotion is only asked for in the system prompt
(the obvious alternative to steering). They are scored by what the bank never saw: the emotion lexicon
(``scoring.emotion_scorer``: how many times more of each emotion's words than the unsteered replies), fluency
measures that do not charge emotional wording (repeated 3-grams, distinct-2, the share of Latin letters, words
per token, perplexity under the model *asked* for that emotion), and, as a second opinion, the model's own readout
of the replies at the bank's read layer.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .bands import AXES, BANDS, DESCRIPTIONS, NEUTRAL_PERSONA, PRIMARIES, persona_prompt, primary_personas
from .bank import Bank, record_date
from .engine import Model
from .errors import EqzError
from .files import replacing
from .generation import Job, generate_parallel
from .judge import LabelJudge
from .reading import PrefixCache, group_tails, read_texts, shared_head_length
from .meter import Filters, LayerGeometry, geometry, metered_bands
from .sampling import Sampling
from .scoring import (LIFT_PRIOR, distinct2, emotion_scorer, latin_share, lift, on_axes, repeated_trigrams,
                      words_per_token)
from .voice import persona_tokens

# Fluency bounds (README "How the bank is made"): none of them charges a reply for being emotional.
MAX_REPEATED_TRIGRAMS = 0.05
MIN_DISTINCT_RATIO = 0.9  # distinct-2 at least 0.9x the unsteered replies'
MIN_LATIN_RATIO = 0.9  # replies stay in the prompt's script
# Replies stay made of words: words per model token at least 0.7x the unsteered replies'. Without it a reply of
# curly quotes and glued words ("‘‘‘‘crackcrackchop") passed every bound: no words to repeat, all letters Latin, and
# a loop is easy to predict (Gemma 3 270M's anger at +1: 0.03 words per token against 0.73, perplexity 2.6x).
# On calibration prompts sets at +1 that read as text sit at 0.89-1.10x on both models, degenerate ones at
# 0.05-0.58x (docs/steering-limits.md, section 6).
MIN_WORDS_PER_TOKEN_RATIO = 0.7
# Perplexity under the model asked for the emotion <= 4x the unsteered replies' own. A small model barely follows
# the request, so the asked model still charges some emotional wording: on SmolLM2-135M replies that read
# fluently sat at 1.2-3.4x, replies drifting into odd content at 6-20x (README, "How the bank is made").
MAX_PPL_RATIO = 4.0
# The bounds every reply set keeps to, in words, for bank.yaml and the steering pages (one wording for both)
TEXT_BOUNDS = (f"repeated 3-grams <= {MAX_REPEATED_TRIGRAMS:.0%}, distinct-2 >= {MIN_DISTINCT_RATIO:g}x, Latin-letter "
               f"share >= {MIN_LATIN_RATIO:g}x and words per token >= {MIN_WORDS_PER_TOKEN_RATIO:g}x the unsteered "
               "replies'")
# "Clearly more of it": the band's own emotion words at least twice the unsteered rate and the most lifted of the
# eight; for the axes (no words of their own) a rise of one positive-minus-negative (or high-minus-low arousal)
# word per 100 words.
CLEAR_LIFT = 2.0
CLEAR_AXIS_RISE = 1.0
# A band trained from a description has no lexicon words: the unsteered model judges it. Its preference for the
# replies when asked for the band, over its mean preference when asked for each of the eight primaries (what any
# feeling-laden persona shares goes), must rise by 0.05 nats per token and most for the band's own persona. On
# SmolLM2-135M (10 calibration prompts x 40 tokens) the shipped primaries at +1 rose 0.02-0.12 this way, asking for
# the feeling in the system prompt 0.01-0.05 (docs/custom-bands.md).
CLEAR_PREFERENCE_RISE = 0.05
# How a verdict's noise is measured: the prompts drawn again this many times (see ReplySet.clear_share)
BOOTSTRAP_DRAWS = 2000
EVAL_SEED = 4321  # held-out replies' sampling seed: every held-out run draws the same replies unless told
DEFAULT_GAINS = (-1.0, 0.0, 1.0, 2.0)
CALIBRATION_PROMPTS = 5  # the first prompts of the neutral set (and the first of the zero prompts, see below)
EVAL_PROMPTS = 16
EXTRA_CALIBRATION_PROMPTS = 5
READ_BATCH = 1024  # tokens per read decode: a prompt head and the replies read after it

Progress = Callable[[str, int], Callable[[int], None]]


def prompt_sets() -> dict[str, list[str]]:
    """The built-in prompts, split so that training, calibration, the meter's zero, eval and test never share one.
    Eval is the development split (changes to eqz were kept or dropped on its figures); test is read only by the
    steering pages, for figures no choice was tuned on."""
    from .stimuli import neutral_prompts, test_prompts, training_prompts

    prompts = neutral_prompts()
    end_of_eval = CALIBRATION_PROMPTS + EVAL_PROMPTS
    extra = end_of_eval + EXTRA_CALIBRATION_PROMPTS
    return {"calibration": prompts[:CALIBRATION_PROMPTS] + prompts[end_of_eval:extra],
            "eval": prompts[CALIBRATION_PROMPTS:end_of_eval], "zero": prompts[extra:], "train": training_prompts(),
            "test": test_prompts()}


def _no_progress(_stage: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass(frozen=True)
class Setting:
    """One way of making replies: a control vector, and/or a persona asked for in the system prompt.

    ``judge``: the persona under which the replies' perplexity is measured (the emotion they were meant to
    have), None for the plain prompt. ``filters``: clamps or notches applied after the vector, as in a chat.
    """

    key: object
    vector: np.ndarray | None = field(default=None, compare=False)
    persona: str | None = None
    judge: str | None = None
    filters: Filters | None = field(default=None, compare=False)


def slider_setting(key, bank: Bank, gains: dict[str, float], **named) -> Setting:
    """The replies these sliders make, as a chat makes them: the added vector, and the levels of held sliders
    (``Bank.held``) as filters."""
    held = bank.held(gains)
    return Setting(key, bank.added(gains), filters=Filters(bank, {}, [], held=held) if held else None, **named)


def redrawn_prompts(prompts: int, draws: int) -> np.ndarray:
    """(draws, prompts) indices: the prompt set drawn again with replacement, the same draws for every verdict (and
    for steered and unsteered replies alike), so verdicts on one set of replies are tested on the same redraws."""
    return np.random.default_rng(0).integers(0, prompts, size=(draws, prompts))


@dataclass
class ReplySet:
    """Replies generated under one setting, and how they score."""

    texts: list[str]
    tokens: list[list[int]] = field(default_factory=list, repr=False)  # per reply, aligned with texts
    n_tokens: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)  # emotion words per 100 words, per band
    repeat: float = 0.0
    distinct: float = 1.0
    latin: float = 1.0
    words_per_token: float = 1.0
    nll: float = math.nan  # mean negative log-probability under the judging prompt (nan: not measured)
    # per prompt: the summed negative log-probability of its replies' tokens and their number (ppl_share)
    nll_by_prompt: np.ndarray | None = field(default=None, repr=False)
    counts: np.ndarray | None = field(default=None, repr=False)  # per reply: scoring.EmotionScorer.word_counts
    readout: dict[str, float] = field(default_factory=dict)
    # per band judged by the model (no words of its own): how much likelier the replies are when the model is
    # asked for the band than when asked to be neutral, mean nats per token (see CLEAR_PREFERENCE_RISE)
    preference: dict[str, float] = field(default_factory=dict)
    states: np.ndarray | None = None  # per layer read: the mean over replies of each reply's mean residual stream
    # per reply: the unsteered model's log-probability of naming each primary as its emotion (judge.LabelJudge)
    labels: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def scored(cls, replies: list[tuple[list[int], str]]) -> "ReplySet":
        """Replies (tokens, text) scored on their text: words per emotion, repetition, distinct-2, script, words per
        token."""
        texts = [text for _, text in replies]
        tokens = [reply_tokens for reply_tokens, _ in replies]
        scorer = emotion_scorer()
        counts = np.array([scorer.word_counts(text) for text in texts])
        return cls(
            texts=texts,
            counts=counts,
            tokens=tokens,
            n_tokens=float(np.mean([len(reply_tokens) for reply_tokens in tokens])),
            rates=dict(zip(BANDS, scorer.rates_of(counts.sum(axis=0)).tolist())),  # all replies' words together
            repeat=float(np.mean([repeated_trigrams(t) for t in texts])),
            distinct=float(np.mean([distinct2(t) for t in texts])),
            latin=float(np.mean([latin_share(t) for t in texts])),
            words_per_token=words_per_token(counts[:, -1], tokens),  # word_counts ends with the number of words
        )

    def samples_only(self, samples: int, kept: range) -> "ReplySet":
        """Only samples ``kept`` of every prompt (the replies run prompt by prompt, ``samples`` each, as ReplyBench.run
        orders them), scored as a set of their own: what a run drawing fewer samples would have seen, so that one run
        shows how far a verdict moves with the sampling alone. Only the text's scores and the judge's names carry
        over; perplexity, readout, states and preferences are read per setting, not per reply, and are left out."""
        if len(self.texts) % samples:
            raise ValueError(f"{len(self.texts)} replies are not whole prompts of {samples} samples")
        picked = [i for i in range(len(self.texts)) if i % samples in kept]
        subset = ReplySet.scored([(self.tokens[i], self.texts[i]) for i in picked])
        subset.labels = None if self.labels is None else self.labels[picked]
        return subset

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if math.isfinite(self.nll) else math.nan

    def ppl_ratio(self, baseline: "ReplySet") -> float:
        return math.exp(self.nll - baseline.nll) if math.isfinite(self.nll) else math.nan

    def ppl_share(self, baseline: "ReplySet", draws: int = BOOTSTRAP_DRAWS) -> float | None:
        """How often the perplexity bound would hold on another prompt set of this size (the prompts drawn again,
        the same draw for these replies and the baseline's, as in clear_share). A mean over a few short replies
        moves a lot with one reply that drifts: Gemma 3 270M's anger at +1 read 3.8x in calibration and 5.6x on
        the same prompts with a few tokens sampled differently. None where it was not measured."""
        if self.nll_by_prompt is None or baseline.nll_by_prompt is None:
            return None
        picks = redrawn_prompts(len(self.nll_by_prompt), draws)
        steered, unsteered = (parts[picks].sum(axis=1) for parts in (self.nll_by_prompt, baseline.nll_by_prompt))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = steered[:, 0] / steered[:, 1] - unsteered[:, 0] / unsteered[:, 1]
        return float(np.mean(log_ratio <= math.log(MAX_PPL_RATIO)))

    def lifts(self, baseline: "ReplySet") -> dict[str, float]:
        return {band: lift(self.rates[band], baseline.rates[band]) for band in PRIMARIES}

    def clear(self, band: str, baseline: "ReplySet") -> bool:
        """The band's own emotion is clearly lifted (see CLEAR_LIFT) and, for a primary, the most lifted; for a
        band judged by preference, see CLEAR_PREFERENCE_RISE."""
        if band in AXES:
            return self.effect(band, baseline) >= CLEAR_AXIS_RISE
        if band not in PRIMARIES:
            return self.effect(band, baseline) >= CLEAR_PREFERENCE_RISE and self.most_lifted(band, baseline) == band
        lifts = self.lifts(baseline)
        return lifts[band] >= CLEAR_LIFT and max(lifts, key=lifts.get) == band

    def most_lifted(self, band: str, baseline: "ReplySet") -> str:
        """The primary whose words rose most; for a band judged by preference, the persona (its own or a
        primary's) the unsteered model's preference rose most for."""
        if band in PRIMARIES or band in AXES:
            lifts = self.lifts(baseline)
        else:
            lifts = {b: self.preference[b] - baseline.preference[b] for b in (band, *PRIMARIES)}
        return max(lifts, key=lifts.get)

    def clear_share(self, band: str, baseline: "ReplySet", samples: int, draws: int = BOOTSTRAP_DRAWS) -> float | None:
        """How often ``band`` would be called clear on another prompt set of this size: the prompts drawn again
        with replacement (each with all its ``samples``; the same draw for these replies and the baseline's).
        1.0: no such draw overturns the verdict; near 0.5: a coin toss. None for bands without words (described
        bands)."""
        if band not in BANDS or self.counts is None or baseline.counts is None:
            return None
        steered, unsteered = (c.reshape(-1, samples, c.shape[1]).sum(axis=1) for c in (self.counts, baseline.counts))
        picks = redrawn_prompts(len(steered), draws)
        scorer = emotion_scorer()
        rates, base = (scorer.rates_of(counts[picks].sum(axis=1)) for counts in (steered, unsteered))
        own = BANDS.index(band)
        if band in AXES:
            return float(np.mean(rates[:, own] - base[:, own] >= CLEAR_AXIS_RISE))
        lifts = lift(rates[:, : len(PRIMARIES)], base[:, : len(PRIMARIES)])
        return float(np.mean((lifts[:, own] >= CLEAR_LIFT) & (lifts.argmax(axis=1) == own)))

    def judged_lifts(self, baseline: "ReplySet") -> dict[str, float]:
        """Per primary, how many times likelier the judge names it for these replies than for the baseline's
        (the geometric mean over replies paired by prompt and sample)."""
        return dict(zip(PRIMARIES, np.exp((self.labels - baseline.labels).mean(axis=0)).tolist()))

    def judged_clear(self, band: str, baseline: "ReplySet") -> bool:
        """The judge names ``band`` at least CLEAR_LIFT times as often as for the baseline, and its lift is the
        largest of the eight's."""
        lifts = self.judged_lifts(baseline)
        return lifts[band] >= CLEAR_LIFT and max(lifts, key=lifts.get) == band

    def judged_axis(self, axis: str) -> np.ndarray:
        """Per reply, the judge's names weighted by their circumplex valence or arousal (scoring.on_axes): the axes'
        dense reading, as the lift is the primaries'. On sentences of known arousal it ranks high above low better
        than the lexicon's weighting (AUC 0.98-0.99 against 0.93 on both models; benchmarks/arousal_judge.py)."""
        return on_axes(np.exp(self.labels))[:, AXES.index(axis)]

    def judged_rise(self, axis: str, baseline: "ReplySet") -> float:
        """How far judged_axis moved from the baseline's replies, over all replies."""
        return float(self.judged_axis(axis).mean() - baseline.judged_axis(axis).mean())

    def judged_clear_share(self, band: str, baseline: "ReplySet", samples: int,
                           draws: int = BOOTSTRAP_DRAWS) -> float:
        """clear_share for the judge's verdict: the prompts drawn again (paired, with all their samples)."""
        differences = (self.labels - baseline.labels).reshape(-1, samples, len(PRIMARIES)).mean(axis=1)
        picks = redrawn_prompts(len(differences), draws)
        lifts = differences[picks].mean(axis=1)
        own = PRIMARIES.index(band)
        return float(np.mean((lifts[:, own] >= math.log(CLEAR_LIFT)) & (lifts.argmax(axis=1) == own)))

    def effect(self, band: str, baseline: "ReplySet") -> float:
        """The size of the band's own effect: lift for a primary, rise in words per 100 for an axis, rise in
        specific preference (nats per token) for a band judged by the model."""
        if band in AXES:
            return self.rates[band] - baseline.rates[band]
        if band not in PRIMARIES:
            return self.specific_preference(band) - baseline.specific_preference(band)
        return lift(self.rates[band], baseline.rates[band])

    def specific_preference(self, band: str) -> float:
        """Preference for ``band``'s persona over the mean preference for the eight primaries' personas."""
        return self.preference[band] - float(np.mean([self.preference[b] for b in PRIMARIES]))

    def fluent(self, baseline: "ReplySet") -> bool:
        """Inside every fluency bound (perplexity only where it was measured)."""
        ratio = self.ppl_ratio(baseline)
        return (
            self.repeat <= MAX_REPEATED_TRIGRAMS
            and self.distinct >= MIN_DISTINCT_RATIO * baseline.distinct
            and self.latin >= MIN_LATIN_RATIO * baseline.latin
            and self.words_per_token >= MIN_WORDS_PER_TOKEN_RATIO * baseline.words_per_token
            and not ratio > MAX_PPL_RATIO
        )

    def text_measures(self) -> dict:
        """The fluency bounds' measures of the text alone, as bank.yaml and eval records keep them."""
        return {"repeated_3grams": round(self.repeat, 3), "distinct_2": round(self.distinct, 3),
                "latin": round(self.latin, 3), "words_per_token": round(self.words_per_token, 3)}

    def summary(self, band: str, baseline: "ReplySet") -> dict:
        ratio = self.ppl_ratio(baseline)
        judged = self.labels is not None and baseline.labels is not None
        return {
            **({"words_per_100": round(self.rates[band], 3)} if band in self.rates else {}),
            # only a band judged by preference: the primaries have preferences too, as its contrast, and every row
            # of theirs carried one, so a plot took their lexicon effect for the judge's (in a run with a custom band)
            **({"preference": round(self.specific_preference(band), 4)}
               if band in self.preference and band not in PRIMARIES else {}),
            "effect": round(self.effect(band, baseline), 3),
            "most_lifted": self.most_lifted(band, baseline),
            "clear": self.clear(band, baseline),
            **self.text_measures(),
            **({"ppl_ratio": round(ratio, 3)} if math.isfinite(ratio) else {}),
            **({"readout": round(self.readout[band], 3)} if band in self.readout else {}),
            **(self._judged(band, baseline) if band in PRIMARIES and judged else {}),
            **({"judged_rise": round(self.judged_rise(band, baseline), 3)} if band in AXES and judged else {}),
            "fluent": self.fluent(baseline),
        }

    def _judged(self, band: str, baseline: "ReplySet") -> dict:
        lifts = self.judged_lifts(baseline)
        return {"judged_effect": round(lifts[band], 3), "judged_most_lifted": max(lifts, key=lifts.get),
                "judged_clear": self.judged_clear(band, baseline)}


class ReplyBench:
    """Generates replies to a prompt set under given settings, then scores them."""

    def __init__(self, model: Model, prompts: list[str], reply_tokens: int, seed: int, steered: list[int],
                 read_layer: int | None = None, reader: LayerGeometry | None = None, layers: list[int] | None = None,
                 samples: int = 1, parallel: int | None = None, preferences: dict[str, str] | None = None,
                 labels: bool = False):
        self.model = model
        self.judge = LabelJudge.for_model(model) if labels else None  # names each reply's emotion (ReplySet.labels)
        self.preferences = dict(preferences or {})  # band -> persona: bands judged by preference (see ReplySet)
        self.prompts = list(prompts)
        self.steered = steered
        self.read_layer = read_layer
        self.reader = reader  # reads the readout at read_layer
        self.layers = list(layers or [])  # more layers whose mean state is kept (after the read layer)
        self.reply_tokens = reply_tokens
        self.seed = seed
        self.samples = samples
        self.parallel = parallel
        self.sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=reply_tokens)
        self._tokens: dict[tuple[str | None, int], tuple[list[int], tuple[str, ...]]] = {}
        self._read_prefixes = PrefixCache()  # every run reads replies after the same persona and prompt heads

    @property
    def slots(self) -> int:
        """How many replies one decode step generates: a run of fewer settings' replies leaves the rest idle."""
        return self.parallel or self.model.reply_rows

    def prompt(self, persona: str | None, index: int) -> tuple[list[int], tuple[str, ...]]:
        key = (persona, index)
        if key not in self._tokens:
            self._tokens[key] = persona_tokens(self.model, persona, self.prompts[index])
        return self._tokens[key]

    def run(self, settings: list[Setting], progress: Progress = _no_progress, states: bool = False,
            perplexity: bool = True) -> dict:
        """Replies for each setting to every prompt (``samples`` each), scored on their text and (``perplexity``)
        their perplexity; ``states`` also reads their hidden states (readout). Prompt i, sample s has the same seed
        under every setting (paired comparisons).

        Settings are mixed in one batch by steering each row with its own vector (bit-identical to llama.cpp's
        context control vector, see generation.RowSteering), which keeps every slot busy.
        """
        jobs = []
        for setting in settings:
            head = shared_head_length([self.prompt(setting.persona, i)[0] for i in range(len(self.prompts))])
            for i in range(len(self.prompts)):
                tokens, stops = self.prompt(setting.persona, i)
                for sample in range(self.samples):
                    jobs.append(Job(tokens, self.sampling, self.seed + i + 1000 * sample, stop=stops,
                                    vector=setting.vector, vector_key=setting.key, tag=(setting.key, i, sample),
                                    shared=head, filters=setting.filters))
        advance = progress("generating replies", len(jobs))
        replies: dict = {setting.key: {} for setting in settings}
        with self.model.parallel_context(jobs, self.slots) as context:
            for finished in generate_parallel(context, jobs, row_steering=self.steered):
                key, i, sample = finished.job.tag
                replies[key][(i, sample)] = (finished.tokens, finished.text)
                advance(1)
        results = {
            setting.key: ReplySet.scored([replies[setting.key][slot] for slot in sorted(replies[setting.key])])
            for setting in settings
        }
        self.read_back(settings, results, progress, states, perplexity)
        if self.judge is not None:
            self._name_emotions(settings, results, progress)
        return results

    def _name_emotions(self, settings: list[Setting], results: dict, progress: Progress) -> None:
        """Every reply's ReplySet.labels: the unsteered model asked which emotion it expresses. Each setting's
        replies are read in decodes of their own: on quantized weights a text's reading moves with what shares its
        decode (SmolLM2's Q4_1: 0.07 nats per name on average), and a setting's figures should not depend on which
        other settings were measured beside it."""
        advance = progress("asking the unsteered model which emotion each reply shows",
                           sum(len(results[setting.key].tokens) for setting in settings))
        for setting in settings:
            results[setting.key].labels = self.judge.scores(self.model, results[setting.key].tokens, progress=advance)

    def read_back(self, settings: list[Setting], results: dict, progress: Progress = _no_progress,
                  states: bool = True, perplexity: bool = True) -> None:
        """Read replies with the unsteered model: with ``perplexity``, log-probabilities after each setting's
        judging prompt (the plain prompt where it has none) and, for the bands judged by preference, after their
        persona and the neutral one; with ``states``, the hidden states and readout after the plain prompt.
        Two passes at most: the plain one, and one for every persona prompt (mixed prompts)."""
        layers = ([self.read_layer] if self.reader else []) + [l for l in self.layers if l != self.read_layer]
        layers = layers if states else []
        contrast = [NEUTRAL_PERSONA, *self.preferences.values()] if self.preferences else []
        plain, judged = [], []
        for setting in settings:
            if layers or (perplexity and setting.judge is None):
                plain.append((setting.key, None))
            if perplexity:
                personas = dict.fromkeys(([setting.judge] if setting.judge else []) + contrast)
                judged += [(setting.key, persona) for persona in personas]
        parts: dict[tuple[object, str | None], np.ndarray] = {}
        for reads, read_layers in ((plain, layers), (judged, [])):
            if reads:
                parts.update(self._read(reads, results, read_layers, perplexity, progress))
        if not perplexity:
            return
        nll = {read: float(by_prompt[:, 0].sum() / by_prompt[:, 1].sum()) for read, by_prompt in parts.items()}
        for setting in settings:
            result = results[setting.key]
            if (setting.key, setting.judge) in nll:
                result.nll = nll[(setting.key, setting.judge)]
                result.nll_by_prompt = parts[(setting.key, setting.judge)]
            for band, persona in self.preferences.items():
                result.preference[band] = nll[(setting.key, NEUTRAL_PERSONA)] - nll[(setting.key, persona)]

    def _read(self, reads: list[tuple[object, str | None]], results: dict, layers: list[int], logprobs: bool,
              progress: Progress) -> dict[tuple[object, str | None], np.ndarray]:
        """One read pass over the replies of (setting key, prompt persona) ``reads``: per read (with ``logprobs``),
        each prompt's summed negative log-probability and number of tokens, shape (prompts, 2); with ``layers``,
        also each setting's states and readout. Replies to the same prompt under the same persona share that
        prefix, computed once."""
        tails: dict[tuple[str | None, int], list[tuple[tuple[object, str | None], list[int]]]] = {}
        for key, persona in reads:
            for i in range(len(self.prompts)):
                for reply in results[key].tokens[i * self.samples : (i + 1) * self.samples]:
                    if reply:
                        tails.setdefault((persona, i), []).append(((key, persona), reply))
        groups, owners, prompt_of = [], [], []
        for (persona, i), replies in tails.items():
            prefix, _ = self.prompt(persona, i)
            groups += group_tails(prefix, [reply for _, reply in replies], READ_BATCH, len(prefix))
            owners += [owner for owner, _ in replies]
            prompt_of += [i] * len(replies)
        advance = progress("reading replies with the unsteered model", len(owners))
        with self.model.context(n_ctx=READ_BATCH, n_seq=64, n_batch=READ_BATCH, taps=bool(layers)) as context:
            reading = read_texts(context, groups, layers, logprobs=logprobs, progress=advance,
                                 cache=self._read_prefixes if logprobs else None)
        rows_of: dict[tuple[object, str | None], list[int]] = {}
        for k, owner in enumerate(owners):
            rows_of.setdefault(owner, []).append(k)
        parts = {}
        for read, rows in rows_of.items():
            if logprobs:
                by_prompt = parts[read] = np.zeros((len(self.prompts), 2))
                for k in rows:
                    by_prompt[prompt_of[k]] += (-float(np.sum(reading.logprobs[k])), len(reading.logprobs[k]))
            if layers:
                result = results[read[0]]
                pooled = reading.pooled[rows]
                result.states = pooled.mean(axis=0)
                if self.reader:
                    values = self.reader.readouts(pooled[:, 0]).mean(axis=0)
                    result.readout = {b: float(v) for b, v in zip(self.reader.bands, values)}
        return parts


@dataclass
class EvalResult:
    bands: tuple[str, ...]
    gains: tuple[float, ...]
    # one per (band, gain); per band asked for in the system prompt, one with no vector (gain None) and one at +1
    # (gain 1.0, "asked": True)
    rows: list[dict]
    prompts: int
    reply_tokens: int
    samples: int
    scorer: str
    model: str = ""  # the fingerprint of the model the bank was trained for ("": a run from before it was kept)
    prompt_set: str = ""  # which of prompt_sets() the replies answer ("": not recorded, the eval split or given prompts)
    # how the replies were made, to repeat or cite the run: eqz's version, date, bank, seed, sampling, the prompts,
    # and the personas the slider was compared with ({}: a run from before it was kept)
    run: dict = field(default_factory=dict)
    # every reply in full, one record each: band (None for the unsteered replies), gain, "asked" as in rows, the
    # prompt, the sample and the text (replies.jsonl; eval.json keeps three excerpts a row). [] when read back
    # from eval.json
    replies: list[dict] = field(default_factory=list, repr=False)

    def table(self, band: str) -> list[dict]:
        """The band's slider rows, by gain."""
        return [row for row in self.rows if row["band"] == band and row["gain"] is not None and not row.get("asked")]

    def prompting(self, band: str) -> dict | None:
        """The band only asked for in the system prompt, no vector."""
        return next((row for row in self.rows if row["band"] == band and row["gain"] is None), None)

    def asked_and_steered(self, band: str) -> dict | None:
        """The band asked for in the system prompt and its slider at +1: does the slider add to asking?"""
        return next((row for row in self.rows if row["band"] == band and row.get("asked")), None)

    def prompt_rows(self, band: str) -> list[dict]:
        """The band's rows that ask for it in the system prompt (alone, then with the slider), those measured."""
        return [row for row in (self.prompting(band), self.asked_and_steered(band)) if row]

    def unsteered_rates(self) -> dict[str, float]:
        """Each evaluated primary's words per 100 in the unsteered replies (its gain-0 row)."""
        return {row["band"]: row["words_per_100"] for row in self.rows if row["gain"] == 0 and row["band"] in PRIMARIES}

    def words_gained(self, band: str, gain: float = 1.0) -> dict[str, float] | None:
        """Per primary, the words per 100 that ``band`` at ``gain`` added to the unsteered replies: the absolute side
        of its lifts. A lift is a ratio, so an emotion the unsteered replies rarely use (sadness, ~0.4 words/100)
        out-lifts one they use often (joy, ~4.6) on fewer words. None unless all eight primaries were evaluated
        (their unsteered rates are the gain-0 rows)."""
        unsteered = self.unsteered_rates()
        steered = next((row for row in self.table(band) if row["gain"] == gain), None)
        if steered is None or "lifts" not in steered or not set(PRIMARIES) <= set(unsteered):
            return None
        return {other: (steered["lifts"][other] - 1) * (unsteered[other] + LIFT_PRIOR) for other in PRIMARIES}

    def to_dict(self) -> dict:
        return {"bands": list(self.bands), "gains": list(self.gains), "prompts": self.prompts,
                "reply_tokens": self.reply_tokens, "samples": self.samples, "scorer": self.scorer, "model": self.model,
                "prompt_set": self.prompt_set, "run": self.run, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        """A result written by ``write_outputs`` (eval.json), to report again without generating again."""
        return cls(tuple(data["bands"]), tuple(data["gains"]), data["rows"], data["prompts"], data["reply_tokens"],
                   data["samples"], data["scorer"], data.get("model", ""), data.get("prompt_set", ""),
                   data.get("run", {}))

    def dose_response(self) -> dict:
        """Compact per-band figures for bank.yaml."""
        keep = ("effect", "words_per_100", "most_lifted", "clear", "clear_share", "judged_effect",
                "judged_most_lifted", "judged_clear", "judged_clear_share", "judged_rise", "readout", "ppl_ratio",
                "repeated_3grams", "fluent")
        return {
            band: {_setting_name(row): {k: row[k] for k in keep if k in row}
                   for row in self.table(band) + self.prompt_rows(band)}
            for band in self.bands
        }


def _setting_name(row: dict) -> str:
    """How a row's setting is keyed in bank.yaml's dose_response: the gain, "prompt" (asked, no vector), "prompt+1"."""
    if row["gain"] is None:
        return "prompt"
    return f"prompt{row['gain']:+g}" if row.get("asked") else str(row["gain"])


def result_row(band: str, gain: float | None, replies: ReplySet, baseline: ReplySet, samples: int,
               asked: bool = False) -> dict:
    """One row of an EvalResult: the band's verdicts on ``replies`` against the unsteered ``baseline``."""
    share = replies.clear_share(band, baseline, samples) if gain != 0 else None
    judged = band in PRIMARIES and gain != 0 and replies.labels is not None and baseline.labels is not None
    summary = replies.summary(band, baseline)
    if gain == 0:  # the unsteered replies against themselves lift nothing: max() named whichever came first ("joy")
        summary.update({key: None for key in ("most_lifted", "judged_most_lifted") if key in summary})
    return {
        "band": band,
        "gain": gain,
        **({"asked": True} if asked else {}),
        **summary,
        **({"clear_share": round(share, 3)} if share is not None else {}),
        **({"judged_clear_share": round(replies.judged_clear_share(band, baseline, samples), 3)} if judged else {}),
        # how likely the judge names the band for the unsteered replies (geometric mean): its lift cannot pass 1 / this
        **({"judged_share": round(float(np.exp(replies.labels[:, PRIMARIES.index(band)].mean())), 4)}
           if gain == 0 and band in PRIMARIES and replies.labels is not None else {}),
        "lifts": {other: round(value, 3) for other, value in replies.lifts(baseline).items()},
        "crosstalk": {other: round(value - baseline.readout.get(other, 0.0), 3)
                      for other, value in replies.readout.items() if other != band},
        "length": round(replies.n_tokens, 1),
        "examples": [text[:240] for text in replies.texts[::samples][:3]],  # the first three prompts, first sample
    }


def evaluate(
    model: Model,
    bank: Bank,
    bands: tuple[str, ...],
    gains: tuple[float, ...] = DEFAULT_GAINS,
    prompts: list[str] | None = None,
    reply_tokens: int = 64,
    samples: int = 1,
    seed: int = EVAL_SEED,
    progress: Progress = _no_progress,
) -> EvalResult:
    """Generate under every band x gain, with each band only asked for in the system prompt, and asked for with
    its slider at +1; score all.

    Gain 0 is generated once and shared by all bands. Bands trained from a description (or imported ones
    without one) have no prompt rows when eqz has no words to ask for them.
    """
    prompts = prompts or prompt_sets()["eval"]
    metered = metered_bands(bank)
    reader = geometry(bank, bank.read_layer, metered) if metered else None
    personas = {band: bank_persona(bank, band) for band in bands}
    described = {band: persona for band, persona in personas.items() if persona and band not in DESCRIPTIONS}
    bench = ReplyBench(model, prompts, reply_tokens, seed, bank.steered_layers, bank.read_layer, reader,
                       samples=samples, preferences=preference_personas(described), labels=True)
    settings = [Setting("baseline")]
    settings += [slider_setting((band, gain), bank, {band: gain}, judge=personas[band] if gain > 0 else None)
                 for band in bands for gain in gains if gain != 0]
    asked = [band for band in bands if personas[band]]
    settings += [Setting((band, None), persona=personas[band], judge=personas[band]) for band in asked]
    settings += [slider_setting((band, "asked"), bank, {band: 1.0}, persona=personas[band], judge=personas[band])
                 for band in asked]
    results = bench.run(settings, progress, states=True)
    baseline = results["baseline"]
    rows = []
    for band in bands:
        for gain in gains:
            rows.append(result_row(band, gain, baseline if gain == 0 else results[(band, gain)], baseline, samples))
        if personas[band]:
            rows.append(result_row(band, None, results[(band, None)], baseline, samples))
            rows.append(result_row(band, 1.0, results[(band, "asked")], baseline, samples, asked=True))
    replies = _reply_records(results, bands, gains, [band for band in bands if personas[band]], prompts, samples)
    run = {"eqz": __version__, "date": record_date(), "model": model.info.name,
           "bank": str(bank.directory) if bank.directory else None, "seed": seed, "sampling": bench.sampling.to_dict(),
           "prompts": list(prompts), "personas": {band: persona for band, persona in personas.items() if persona}}
    return EvalResult(bands, gains, rows, len(prompts), reply_tokens, samples, emotion_scorer().name,
                      bank.model.fingerprint, run=run, replies=replies)


def _reply_records(results: dict, bands: tuple[str, ...], gains: tuple[float, ...], asked: list[str],
                   prompts: list[str], samples: int) -> list[dict]:
    """Every reply of an eval run in full, keyed as its row is: the unsteered ones once (band None), then each band's
    by gain, asked alone and asked at +1."""
    keyed = [(None, 0.0, False, results["baseline"])]
    for band in bands:
        keyed += [(band, gain, False, results[(band, gain)]) for gain in gains if gain != 0]
        if band in asked:
            keyed += [(band, None, False, results[(band, None)]), (band, 1.0, True, results[(band, "asked")])]
    return [{"band": band, "gain": gain, **({"asked": True} if is_asked else {}), "prompt": prompts[index // samples],
             "sample": index % samples, "text": text}
            for band, gain, is_asked, replies in keyed for index, text in enumerate(replies.texts)]


def preference_personas(described: dict[str, str]) -> dict[str, str]:
    """band -> persona for the judge (see CLEAR_PREFERENCE_RISE): the ``described`` bands' own personas and, for
    contrast, the eight primaries'; none when no band is judged this way."""
    if not described:
        return {}
    return {**primary_personas(), **described}


def bank_persona(bank: Bank, band: str) -> str | None:
    """The persona prompt that asks for ``band``: eqz's own words for the primaries, the description a custom
    band was trained from, none for the axes or imported vectors."""
    description = (bank.bands[band].description if band in bank.bands else None) or DESCRIPTIONS.get(band)
    return persona_prompt(description) if description else None


def recording_setup(prompts: list[str] | int, reply_tokens: int, samples: int, gains: tuple[float, ...],
                    scorer: str | None = None) -> dict:
    """How recorded figures were measured. Bands measured alike can share one record: a band measured again (a
    custom band added, say) replaces its own figures and keeps the others'. ``prompts``: their texts, or only their
    count where the texts are unknown (an eval.json from before they were kept), which no run can match."""
    digest = {} if isinstance(prompts, int) else {
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]}
    return {"prompts": prompts if isinstance(prompts, int) else len(prompts), **digest, "reply_tokens": reply_tokens,
            "samples": samples, "scorer": scorer or emotion_scorer().name, "gains": [float(gain) for gain in gains]}


def recorded_alike(bank: Bank, setup: dict) -> bool:
    """Whether the figures recorded in ``bank`` were measured as ``setup`` measures (its date aside). Records
    from before stop 62 keep no prompt digest or gains, so they match no run."""
    recorded = dict(bank.quality.get("dose_response_setup", {}))
    recorded.pop("date", None)
    return recorded == setup


def record(result: EvalResult, bank: Bank, **extra) -> None:
    """Store the dose-response figures (and ``extra`` quality entries) in the bank's bank.yaml, dated: a band
    remade later (its ``trained`` date after this one) has figures that measured another vector. The other bands'
    figures stay where they were measured alike (``recorded_alike``), else they go: one record, one setup."""
    quality = bank.quality
    setup = recording_setup(result.run.get("prompts") or result.prompts, result.reply_tokens, result.samples,
                            result.gains, result.scorer)
    measured = result.dose_response()
    kept = quality.get("dose_response", {}) if recorded_alike(bank, setup) else {}
    quality["dose_response"] = {band: measured.get(band, kept.get(band)) for band in bank.names
                                if band in measured or band in kept}
    quality["dose_response_setup"] = {**setup, "date": record_date()}
    quality.update(extra)
    bank.save()


def non_fluent_gains(result: EvalResult) -> dict[str, dict[float, list[str]]]:
    """Per band, the gains whose replies left the fluency bounds, each with the bounds it left in words (the table
    shows neither the Latin share nor words per token, and "not fluent" beside columns in bounds said nothing)."""
    flagged = {}
    for band in result.bands:
        rows = result.table(band)
        unsteered = next((row for row in rows if row["gain"] == 0), None)
        flagged[band] = {row["gain"]: broken_bounds(row, unsteered) for row in rows if not row["fluent"]}
    return flagged


def broken_bounds(row: dict, unsteered: dict | None) -> list[str]:
    """The fluency bounds (``ReplySet.fluent``) a table row is outside, as "words per token 0.56 < 0.7 x 0.81"."""
    broken = []
    if row["repeated_3grams"] > MAX_REPEATED_TRIGRAMS:
        broken.append(f"repeated 3-grams {row['repeated_3grams']:.0%} > {MAX_REPEATED_TRIGRAMS:.0%}")
    for name, key, least in (("distinct-2", "distinct_2", MIN_DISTINCT_RATIO), ("Latin letters", "latin", MIN_LATIN_RATIO),
                             ("words per token", "words_per_token", MIN_WORDS_PER_TOKEN_RATIO)):
        if unsteered is not None and row[key] < least * unsteered[key]:
            broken.append(f"{name} {row[key]:.2f} < {least:g} x {unsteered[key]:.2f}")
    if (ratio := row.get("ppl_ratio")) is not None and ratio > MAX_PPL_RATIO:
        broken.append(f"perplexity {ratio:.2f}x > {MAX_PPL_RATIO:g}x")
    return broken


OUTPUT_NAMES = ("eval.json", "eval.csv", "dose_response.png", "replies.jsonl")


def write_outputs(result: EvalResult, directory: Path, plot: bool = False) -> list[Path]:
    """The figures as JSON and CSV, every reply as JSONL (and the plot) in ``directory``, replacing an earlier run's:
    a plot or replies file left from one is removed, so what is there is one run's. Each file replaces the earlier
    one whole, and the earlier run's other files go only once this run's are written: a file cut short (a full disk)
    had already destroyed the earlier run."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = ["band", "gain", "asked", "effect", "words_per_100", "most_lifted", "clear", "clear_share",
               "judged_effect", "judged_most_lifted", "judged_clear", "judged_clear_share", "readout", "ppl_ratio",
               "repeated_3grams", "distinct_2", "latin", "words_per_token", "length", "fluent"]
    written = []
    try:
        for name in OUTPUT_NAMES[:2] + (OUTPUT_NAMES[3:] if result.replies else ()):
            written.append(directory / name)
            with replacing(written[-1]) as temporary, temporary.open("w", encoding="utf-8", newline="") as handle:
                if name == "eval.json":
                    handle.write(json.dumps(result.to_dict(), indent=2) + "\n")
                elif name == "eval.csv":
                    table = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                    table.writeheader()
                    table.writerows(result.rows)
                else:
                    handle.writelines(json.dumps(reply, ensure_ascii=False) + "\n" for reply in result.replies)
    except OSError as error:
        raise EqzError(f"cannot write {written[-1]}: {error.strerror or error}; the table above has this run's "
                       "figures, and files of an earlier run there are as they were") from None
    for name in OUTPUT_NAMES[2:]:  # an earlier run's plot or replies: not this run's
        if directory / name not in written:
            (directory / name).unlink(missing_ok=True)
    if plot:
        written.append(plot_dose_response(result, directory / OUTPUT_NAMES[2]))
    return written


def pyplot():
    """matplotlib's pyplot, drawing into files; one line naming the pip command where it is not installed (eval asks
    before its replies, not after minutes of them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EqzError("--plot needs matplotlib: pip install 'eqz[plot]' (or pip install matplotlib)") from None
    return plt


def plot_dose_response(result: EvalResult, path: Path) -> Path:
    """One panel per band: the lexicon effect and the readout against gain, the prompt-only effect as a
    dotted line and asked-and-steered as a triangle at +1, perplexity ratio on a second axis."""
    plt = pyplot()
    columns = 5
    rows = math.ceil(len(result.bands) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for index, band in enumerate(result.bands):
        axis = axes[index // columns][index % columns]
        table = result.table(band)
        gains = [row["gain"] for row in table]
        judged = any("preference" in row for row in table)  # a described band: the judge's effect, no readout
        axis.plot(gains, [row["effect"] for row in table], "s-", color="tab:green",
                  label="judge effect" if judged else "lexicon effect")
        readouts = [row.get("readout", math.nan) for row in table]
        if any(math.isfinite(value) for value in readouts):
            axis.plot(gains, readouts, "o--", color="tab:blue", label="readout")
        prompted = result.prompting(band)
        if prompted:
            axis.axhline(prompted["effect"], color="tab:green", linewidth=0.8, linestyle=":", label="prompt only")
        both = result.asked_and_steered(band)
        if both:
            axis.plot([both["gain"]], [both["effect"]], "^", color="tab:olive", label="prompt and +1")
        axis.set_title(f"{band} (judge, nats/token)" if judged else band)
        axis.axhline(0, color="grey", linewidth=0.5)
        fluency = axis.twinx()
        ratios = [row.get("ppl_ratio", math.nan) for row in table]
        fluency.plot(gains, ratios, ":", color="tab:red", label="ppl ratio")
        fluency.axhline(MAX_PPL_RATIO, color="tab:red", linewidth=0.5, linestyle="--")
        fluency.set_ylim(0, max([3.0] + [r * 1.1 for r in ratios if math.isfinite(r)]))
        if index == 0:
            axis.legend(fontsize=7, loc="upper left")
            fluency.legend(fontsize=7, loc="lower right")
    for index in range(len(result.bands), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(f"eqz dose-response: gain vs lexicon effect ({result.scorer}; x unsteered for the primaries, "
                    "+words/100 for the axes; green), readout (blue), perplexity ratio (red, right)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
