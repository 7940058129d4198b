"""``eqz train``: stimulus set -> hidden states -> band directions -> calibrated gains -> a bank on disk.

Extraction reads the residual stream through the engine's taps (no torch): mean over each text's tokens,
mean difference of every band's texts against their matched neutral twins, centred on the mean over all
emotions, with the leading principal components of neutral text projected out, unit length per layer and
scaled by that layer's typical token norm. The read layer and steered layers are chosen by held-out
separability among the first two thirds of the layers (the last layers carry outlier dimensions that steering
breaks). Calibration then generates replies to neutral prompts at growing strengths and keeps, as gain +1,
the strongest one whose replies stay fluent under the unsteered model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from . import __version__
from . import directions as D
from .bands import AXES, BANDS, PRIMARIES
from .bank import Band, Bank, new_manifest
from .engine import Job, Model, TextGroup, generate_parallel, read_texts
from .sampling import Sampling
from .scoring import lexicon_scores, perplexity, repeated_trigrams
from .stimuli import SPLIT_RULE, STIMULUS_SET_VERSION, load_stimuli, neutral_prompts

# Strength c: each steered layer gets c / (number of steered layers) of its typical token norm along the band.
STRENGTHS = (0.06, 0.1, 0.15, 0.22, 0.33, 0.5)
MAX_PPL_RATIO = 2.0
MAX_REPEATED_TRIGRAMS = 0.2


@dataclass
class TrainSettings:
    bands: tuple[str, ...] = BANDS
    quick: bool = False
    orthogonalize: bool = False
    neutral_components: int = 2
    train_pairs: int = 48  # of the 48 training pairs per band
    neutral_passages: int = 64
    calibration_prompts: int = 6
    reply_tokens: int = 32
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.quick:
            self.train_pairs, self.neutral_passages = 20, 24
            self.calibration_prompts, self.reply_tokens = 4, 24


Progress = Callable[[str, int], Callable[[int], None]]  # progress(stage, total) -> advance(n)


def _no_progress(_stage: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


# ------------------------------------------------------------------------------------------------ extraction


@dataclass
class Extraction:
    layers: list[int]  # layer index of each column below
    emotional: dict[str, np.ndarray]  # band -> (pairs, layers, embd)
    neutral: dict[str, np.ndarray]  # band -> matched neutral twins
    heldout: dict[str, np.ndarray]  # band -> held-out emotional texts
    passages: np.ndarray  # neutral passages
    token_norm: np.ndarray  # (layers,)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def all_neutral(self) -> np.ndarray:
        return np.concatenate([self.neutral[b] for b in PRIMARIES] + [self.passages])


def _pair_group(model: Model, neutral: str, emotional: str) -> TextGroup:
    """Both sides of a matched pair, their common token prefix computed once."""
    a, b = model.tokenize(neutral), model.tokenize(emotional)
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return TextGroup(a[:common], [a[common:], b[common:]], pool_from=1)


def extract(model: Model, settings: TrainSettings, progress: Progress = _no_progress) -> Extraction:
    stimuli = load_stimuli()
    top = max(2, (2 * model.info.n_layer) // 3)
    layers = list(range(top))
    groups: list[TextGroup] = []
    spans: dict[str, tuple[str, int, int]] = {}
    for band in PRIMARIES:
        start = len(groups)
        groups += [_pair_group(model, p.neutral, p.emotional) for p in stimuli.train[band][: settings.train_pairs]]
        spans[f"pairs:{band}"] = ("pairs", start, len(groups))
    for band in PRIMARIES:
        start = len(groups)
        groups += [TextGroup([], [model.tokenize(p.emotional)], pool_from=1) for p in stimuli.heldout[band]]
        spans[f"heldout:{band}"] = ("single", start, len(groups))
    start = len(groups)
    groups += [TextGroup([], [model.tokenize(t)], pool_from=1) for t in stimuli.neutral[: settings.neutral_passages]]
    spans["passages"] = ("single", start, len(groups))

    n_texts = sum(len(g.tails) for g in groups)
    tokens = sum(len(g.prefix) + sum(len(t) for t in g.tails) for g in groups)
    advance = progress("reading stimuli", n_texts)
    started = time.perf_counter()
    with model.context(n_ctx=1024, n_seq=64, n_batch=1024, taps=True) as context:
        reading = read_texts(context, groups, layers, progress=advance)
    seconds = time.perf_counter() - started

    rows = np.cumsum([0] + [len(g.tails) for g in groups])

    def take(key: str, side: int | None = None) -> np.ndarray:
        kind, first, last = spans[key]
        if kind == "pairs":
            return reading.pooled[[rows[i] + side for i in range(first, last)]]
        return reading.pooled[[rows[i] for i in range(first, last)]]

    return Extraction(
        layers=layers,
        emotional={b: take(f"pairs:{b}", 1) for b in PRIMARIES},
        neutral={b: take(f"pairs:{b}", 0) for b in PRIMARIES},
        heldout={b: take(f"heldout:{b}") for b in PRIMARIES},
        passages=take("passages"),
        token_norm=reading.token_norm,
        seconds=seconds,
        tokens=tokens,
    )


# ------------------------------------------------------------------------------------------------ directions


@dataclass
class Directions:
    units: dict[str, np.ndarray]  # band -> (layers, embd), unit rows
    accuracies: np.ndarray  # held-out 8-way accuracy per layer
    read: int
    steered: list[int]
    confusion: np.ndarray  # (8, 8) at the read layer: rows true band, columns predicted
    axis_check: dict[str, dict[str, float]]  # mean held-out readout of valence/arousal per primary


def find_directions(extraction: Extraction, settings: TrainSettings) -> Directions:
    differences = D.centre(D.mean_differences(extraction.emotional, extraction.neutral))
    differences.update(D.circumplex_axes(differences))
    components = D.top_components(extraction.all_neutral, settings.neutral_components)
    units = {band: D.unit(D.remove_components(vector, components)) for band, vector in differences.items()}
    if settings.orthogonalize:
        units = D.orthogonalize(units, PRIMARIES)
    accuracies = D.layer_accuracies(extraction.emotional, extraction.all_neutral, extraction.heldout, units)
    candidates = range(1, len(extraction.layers))
    read, steered = D.choose_layers(accuracies, candidates)
    readouts = heldout_readouts(extraction, units, read)
    labels = np.concatenate([np.full(len(extraction.heldout[b]), i) for i, b in enumerate(PRIMARIES)])
    predicted = D.classify(readouts[:, : len(PRIMARIES)])
    confusion = np.zeros((len(PRIMARIES), len(PRIMARIES)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    axis_check = {
        axis: {
            band: round(float(readouts[labels == i, len(PRIMARIES) + k].mean()), 3)
            for i, band in enumerate(PRIMARIES)
        }
        for k, axis in enumerate(AXES)
    }
    return Directions(units, accuracies, read, steered, confusion, axis_check)


def _levels(extraction: Extraction, units: dict[str, np.ndarray], layer: int) -> dict[str, tuple[float, float]]:
    return D.readout_levels(
        extraction.all_neutral[:, layer],
        {b: extraction.emotional[b][:, layer] for b in PRIMARIES},
        {b: units[b][layer] for b in BANDS},
    )


def heldout_readouts(extraction: Extraction, units: dict[str, np.ndarray], layer: int) -> np.ndarray:
    """Calibrated readouts (all ten bands, BANDS order) of every held-out text at ``layer``."""
    levels = _levels(extraction, units, layer)
    matrix = np.stack([units[b][layer] for b in BANDS])
    states = np.concatenate([extraction.heldout[b][:, layer] for b in PRIMARIES])
    neutral = np.array([levels[b][0] for b in BANDS])
    unit_level = np.array([levels[b][1] for b in BANDS])
    return D.calibrated(D.project(states, matrix), neutral, unit_level)


# ------------------------------------------------------------------------------------------------ calibration


@dataclass
class ReplySet:
    """Replies generated under one steering setting, and how they score."""

    texts: list[str]
    ppl: float = math.nan
    nll: float = math.nan
    repeat: float = 0.0
    lexicon: dict[str, float] = field(default_factory=dict)
    readout: dict[str, float] = field(default_factory=dict)

    def summary(self, band: str, strength: float, baseline: "ReplySet") -> dict:
        return {
            "strength": strength,
            "ppl_ratio": round(math.exp(self.nll - baseline.nll), 3),
            "repeated_3grams": round(self.repeat, 3),
            "lexicon": round(self.lexicon.get(band, 0.0), 3),
            "readout": round(self.readout.get(band, 0.0), 3),
        }


class Calibrator:
    """Generates replies to neutral prompts under given control vectors and scores them with the unsteered model."""

    def __init__(self, model: Model, readout_units: dict[str, np.ndarray], read: int, levels, settings: TrainSettings):
        self.model = model
        self.settings = settings
        self.read = read
        self.matrix = np.stack([readout_units[b] for b in BANDS])
        self.neutral = np.array([levels[b][0] for b in BANDS])
        self.unit_level = np.array([levels[b][1] for b in BANDS])
        self.prompts = []
        for prompt in neutral_prompts()[: settings.calibration_prompts]:
            text, _ = model.chat_prompt([{"role": "user", "content": prompt}])
            self.prompts.append(model.tokenize(text, parse_special=True))
        self.sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=settings.reply_tokens)

    def run(self, settings: list[tuple[object, np.ndarray | None]], progress: Progress) -> dict[object, ReplySet]:
        """Replies for each (key, control vector), all prompts each, scored. Same seeds for every setting."""
        n = len(self.prompts)
        jobs = [
            Job(prompt, self.sampling, self.settings.seed + i, vector=vector, vector_key=key, tag=(key, i))
            for key, vector in settings
            for i, prompt in enumerate(self.prompts)
        ]
        advance = progress("generating calibration replies", len(jobs))
        replies: dict[object, list[list[int]]] = {key: [None] * n for key, _ in settings}  # type: ignore[list-item]
        texts: dict[object, list[str]] = {key: [""] * n for key, _ in settings}
        with self.model.context(n_ctx=n * (self.settings.reply_tokens + 160), n_seq=n, unified=False) as context:
            for finished in generate_parallel(context, jobs):
                key, i = finished.job.tag
                replies[key][i] = finished.tokens
                texts[key][i] = finished.text
                advance(1)
        return self.score(replies, texts, progress)

    def score(self, replies: dict, texts: dict, progress: Progress) -> dict[object, ReplySet]:
        keys = list(replies)
        per_group = max(1, 900 // (self.settings.reply_tokens + 1))
        groups, owners = [], []
        for i, prompt in enumerate(self.prompts):
            tails = [(key, replies[key][i]) for key in keys if replies[key][i]]
            for start in range(0, len(tails), per_group):
                chunk = tails[start : start + per_group]
                groups.append(TextGroup(prompt, [t for _, t in chunk], pool_from=len(prompt)))
                owners += [(key, i) for key, _ in chunk]
        advance = progress("scoring replies with the unsteered model", len(owners))
        with self.model.context(n_ctx=1024, n_seq=64, n_batch=1024, taps=True) as context:
            reading = read_texts(context, groups, [self.read], logprobs=True, progress=advance)
        readouts = D.calibrated(D.project(reading.pooled[:, 0], self.matrix), self.neutral, self.unit_level)
        results = {}
        for key in keys:
            rows = [k for k, (owner, _) in enumerate(owners) if owner == key]
            logprobs = np.concatenate([reading.logprobs[k] for k in rows]) if rows else np.zeros(0)
            joined = " ".join(texts[key])
            results[key] = ReplySet(
                texts=texts[key],
                ppl=perplexity(logprobs),
                nll=-float(np.mean(logprobs)) if len(logprobs) else math.nan,
                repeat=float(np.mean([repeated_trigrams(t) for t in texts[key]])),
                lexicon=lexicon_scores(joined),
                readout={b: float(readouts[rows, j].mean()) if rows else 0.0 for j, b in enumerate(BANDS)},
            )
        return results


def _fluent(replies: ReplySet, baseline: ReplySet) -> bool:
    ratio = math.exp(replies.nll - baseline.nll)
    return ratio <= MAX_PPL_RATIO and replies.repeat <= MAX_REPEATED_TRIGRAMS


def _vector(units: np.ndarray, norms: np.ndarray, steered: list[int], strength: float, n_layer: int) -> np.ndarray:
    matrix = np.zeros((n_layer, units.shape[-1]), dtype=np.float32)
    for layer in steered:
        matrix[layer] = strength / len(steered) * norms[layer] * units[layer]
    return matrix


# ------------------------------------------------------------------------------------------------ the whole run


def train_bank(model: Model, settings: TrainSettings, progress: Progress = _no_progress) -> Bank:
    """Train a bank for ``model``; returns it unsaved (``bank.save(directory)`` writes it)."""
    started = time.perf_counter()
    info = model.info
    extraction = extract(model, settings, progress)
    found = find_directions(extraction, settings)
    levels_at_read = _levels(extraction, found.units, found.read)
    readout_units = {b: found.units[b][found.read] for b in BANDS}
    calibrator = Calibrator(model, readout_units, found.read, levels_at_read, settings)
    n_layer = info.n_layer
    vector = {
        band: (lambda strength, band=band: _vector(found.units[band], extraction.token_norm, found.steered, strength, n_layer))
        for band in settings.bands
    }

    # search each band's strength upwards or downwards from the middle of the grid, all bands at once
    index = {band: STRENGTHS.index(0.15) for band in settings.bands}
    passed: dict[str, int | None] = {band: None for band in settings.bands}
    tried: dict[str, dict[float, ReplySet]] = {band: {} for band in settings.bands}
    baseline = calibrator.run([("baseline", None)], progress)["baseline"]
    pending = set(settings.bands)
    while pending:
        batch = [((band, STRENGTHS[index[band]]), vector[band](STRENGTHS[index[band]])) for band in sorted(pending)]
        results = calibrator.run(batch, progress)
        for (band, strength), replies in results.items():
            tried[band][strength] = replies
            i = index[band]
            if _fluent(replies, baseline):
                passed[band] = i if passed[band] is None else max(passed[band], i)
                going_up = i + 1 < len(STRENGTHS) and STRENGTHS[i + 1] not in tried[band]
                index[band] = i + 1
                done = not going_up
            else:
                lower = i - 1
                index[band] = lower
                done = lower < 0 or passed[band] is not None or STRENGTHS[lower] in tried[band]
            if done:
                pending.discard(band)
    chosen = {band: STRENGTHS[passed[band] if passed[band] is not None else 0] for band in settings.bands}

    # the negative side: full strength if fluent, else half
    negative = calibrator.run([((band, -chosen[band]), vector[band](-chosen[band])) for band in settings.bands], progress)
    ratios = {}
    for band in settings.bands:
        replies = negative[(band, -chosen[band])]
        tried[band][-chosen[band]] = replies
        ratios[band] = 1.0 if _fluent(replies, baseline) else 0.5

    # crosstalk: the readout change of every band when one band is at +1
    crosstalk = {
        band: {other: round(tried[band][chosen[band]].readout[other] - baseline.readout[other], 3) for other in BANDS}
        for band in settings.bands
    }

    manifest = new_manifest(info)
    manifest["layers"] = {
        "read": found.read,
        "steered": found.steered,
        "candidates": [1, len(extraction.layers) - 1],
        "token_norm": {layer: round(float(extraction.token_norm[layer]), 2) for layer in found.steered},
    }
    manifest["method"] = {
        "extraction": "mean over tokens; band texts minus matched neutral twins; centred on the mean over the "
        "eight primaries; top neutral principal components removed; unit per layer",
        "neutral_components": settings.neutral_components,
        "axes": "valence and arousal = circumplex-weighted sums of the primaries' centred differences",
        "orthogonalized": settings.orthogonalize,
        "strength_unit": "c: every steered layer gets c/len(steered) of its typical token norm",
        "calibration": f"largest c in {list(STRENGTHS)} with perplexity under the unsteered model <= "
        f"{MAX_PPL_RATIO}x and repeated 3-grams <= {MAX_REPEATED_TRIGRAMS:.0%}; negative side: same c if fluent, else half",
        "stimulus_set": STIMULUS_SET_VERSION,
        "split": SPLIT_RULE,
        "train_pairs_per_band": settings.train_pairs,
        "neutral_passages": settings.neutral_passages,
        "calibration_prompts": settings.calibration_prompts,
        "reply_tokens": settings.reply_tokens,
        "quick": settings.quick,
    }
    bank = Bank(directory=None, manifest=manifest)  # type: ignore[arg-type]
    for band in settings.bands:
        levels = [_levels(extraction, found.units, layer)[band] for layer in found.steered]
        bank.bands[band] = Band(
            band,
            vector[band](chosen[band]),
            ratios[band],
            {
                "neutral": [round(n, 4) for n, _ in levels],
                "unit": [round(u, 4) for _, u in levels],
            },
        )
        manifest["bands"][band] = {
            "strength": chosen[band],
            "negative_strength": chosen[band] * ratios[band],
            "calibration": [
                tried[band][s].summary(band, s, baseline) for s in sorted(tried[band])
            ],
        }
    heldout_accuracy = float(np.trace(found.confusion) / found.confusion.sum())
    manifest["quality"] = {
        "heldout_accuracy": round(heldout_accuracy, 3),
        "heldout_texts": int(found.confusion.sum()),
        "chance": round(1 / len(PRIMARIES), 3),
        "confusion": {band: dict(zip(PRIMARIES, map(int, row))) for band, row in zip(PRIMARIES, found.confusion)},
        "accuracy_by_layer": {layer: round(float(a), 3) for layer, a in zip(extraction.layers, found.accuracies)},
        "axes_on_heldout": found.axis_check,
        "baseline": {"ppl": round(baseline.ppl, 3), "repeated_3grams": round(baseline.repeat, 3)},
        "crosstalk": crosstalk,
    }
    manifest["trained"] = {
        "eqz_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "extraction_seconds": round(extraction.seconds, 1),
        "extraction_tokens": extraction.tokens,
        "threads": model.threads,
    }
    return bank
