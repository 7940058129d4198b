"""``eqz train``: stimulus set -> hidden states -> band directions -> calibrated gains -> a bank on disk.

Extraction reads the residual stream through the engine's taps (no torch): mean over each text's tokens,
mean difference of every band's texts against their matched neutral twins, centred on the mean over all
emotions, with the leading principal components of neutral text projected out, unit length per layer and
scaled by that layer's typical token norm. The read layer and steered layers are chosen by held-out
separability among the first two thirds of the layers (the last layers carry outlier dimensions that steering
breaks). Calibration then generates replies to neutral prompts at growing strengths and keeps, as gain +1, of
the strengths whose replies stay fluent under the unsteered model the one whose replies read highest on the
band; the negative side keeps that strength if its replies stay fluent and the readout goes down, else half.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from . import __version__
from . import directions as D
from .bands import AXES, BANDS, PRIMARIES
from .bank import Band, Bank, new_manifest
from .engine import Model, TextGroup, read_texts
from .eval import MAX_PPL_RATIO, MAX_REPEATED_TRIGRAMS, ReplyBench, ReplySet, prompt_sets
from .meter import LayerGeometry
from .stimuli import SPLIT_RULE, STIMULUS_SET_VERSION, load_stimuli

# Strength c: each steered layer gets c / (number of steered layers) of its typical token norm along the band.
STRENGTHS = (0.03, 0.05, 0.07, 0.1, 0.15, 0.22, 0.33, 0.5, 0.75)
# Calibration sees 5 prompts x 32 tokens; it keeps this share of the fluency bounds in hand so that gain +1
# stays inside them on the larger sample `eqz eval` measures (perplexity ratio <= 1 + 0.75 * (2 - 1) = 1.75).
CALIBRATION_MARGIN = 0.75
ZERO_REPLY_TOKENS = 24


@dataclass
class TrainSettings:
    bands: tuple[str, ...] = BANDS
    quick: bool = False
    orthogonalize: bool = False
    component_choices: tuple[int, ...] = (32, 64, 96)
    train_pairs: int = 48  # of the 48 training pairs per band
    neutral_passages: int = 80
    calibration_prompts: int = 5
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


def stimulus_groups(model: Model, settings: TrainSettings) -> tuple[list[TextGroup], dict[str, tuple[str, int, int]]]:
    """Every text training reads, as token groups (matched pairs share their common prefix), and where each
    kind of text sits among them."""
    stimuli = load_stimuli()
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
    return groups, spans


def capture_layers(model: Model) -> list[int]:
    """The layers hidden states are read from: the first two thirds, where read and steered layers are chosen."""
    return list(range(max(2, (2 * model.info.n_layer) // 3)))


def capture_context(model: Model, taps: bool = True):
    """The context extraction reads stimuli in: 64 texts per decode of up to 1024 tokens."""
    return model.context(n_ctx=1024, n_seq=64, n_batch=1024, taps=taps)


def extract(model: Model, settings: TrainSettings, progress: Progress = _no_progress) -> Extraction:
    groups, spans = stimulus_groups(model, settings)
    layers = capture_layers(model)

    n_texts = sum(len(g.tails) for g in groups)
    tokens = sum(len(g.prefix) + sum(len(t) for t in g.tails) for g in groups)
    advance = progress("reading stimuli", n_texts)
    started = time.perf_counter()
    with capture_context(model) as context:
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
    components: int  # neutral principal components removed
    validation_accuracy: float


def _unit_directions(emotional: dict, neutral: dict, components: np.ndarray, orthogonal: bool) -> dict:
    """Unit band directions per layer: centred mean differences with ``components`` (layers, k, embd) removed."""
    differences = D.centre(D.mean_differences(emotional, neutral))
    differences.update(D.circumplex_axes(differences))
    units = {band: D.unit(D.remove_components(vector, components)) for band, vector in differences.items()}
    return D.orthogonalize(units, PRIMARIES) if orthogonal else units


def find_directions(extraction: Extraction, settings: TrainSettings) -> Directions:
    """Directions per band. How many neutral components to remove and which layers to use are chosen by 4-fold
    cross-validation on the training pairs, so the held-out split only ever measures."""
    candidates = range(1, len(extraction.layers))
    most = max(settings.component_choices)
    scores = {k: [] for k in settings.component_choices}
    pairs = len(extraction.emotional[PRIMARIES[0]])
    for fold in range(4):
        fit = [i for i in range(pairs) if i % 4 != fold]
        check = [i for i in range(pairs) if i % 4 == fold]
        fit_emotional = {b: extraction.emotional[b][fit] for b in PRIMARIES}
        fit_neutral = {b: extraction.neutral[b][fit] for b in PRIMARIES}
        fit_texts = np.concatenate([fit_neutral[b] for b in PRIMARIES] + [extraction.passages])
        components = D.top_components(fit_texts, most)
        for k in settings.component_choices:
            units = _unit_directions(fit_emotional, fit_neutral, components[:, :k], settings.orthogonalize)
            held = {b: extraction.emotional[b][check] for b in PRIMARIES}
            scores[k].append(D.layer_accuracies(fit_emotional, fit_texts, held, units))
    best = None
    for k, runs in scores.items():
        accuracies = np.mean(runs, axis=0)
        read, steered = D.choose_layers(accuracies, candidates)
        if best is None or accuracies[read] > best[0]:
            best = (float(accuracies[read]), k, read, steered, accuracies)
    validation_accuracy, components_removed, read, steered, accuracies = best
    components = D.top_components(extraction.all_neutral, components_removed)
    units = _unit_directions(extraction.emotional, extraction.neutral, components, settings.orthogonalize)
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
    return Directions(units, accuracies, read, steered, confusion, axis_check, components_removed, validation_accuracy)


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


def _fluent_steps(tried: dict[float, ReplySet], baseline: ReplySet) -> tuple[set[int], set[int]]:
    """Ladder steps tried so far whose replies stay inside the (margined) fluency bounds, and those that do not."""
    fluent, failed = set(), set()
    for strength, replies in tried.items():
        if strength > 0:
            (fluent if replies.fluent(baseline, margin=CALIBRATION_MARGIN) else failed).add(STRENGTHS.index(strength))
    return fluent, failed


def _strongest_effect(tried: dict[float, ReplySet], baseline: ReplySet, band: str) -> float:
    """Of the fluent strengths tried, the one whose replies read highest on the band: past its peak a direction
    only costs fluency (anticipation on SmolLM2 reads lower at c = 0.33 than at 0.22)."""
    fluent, _ = _fluent_steps(tried, baseline)
    if not fluent:
        return STRENGTHS[0]
    return max((STRENGTHS[step] for step in fluent), key=lambda c: tried[c].readout.get(band, -math.inf))


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
    # The meter's zero is the model's own level when it answers neutral prompts unsteered (stimulus text sits
    # elsewhere on some bands), measured on prompts of its own (all the rest of the built-in set: a few replies
    # vary too much); its unit stays the stimulus contrast: band texts minus neutral texts.
    prompts = prompt_sets()
    zero_prompts = prompts["zero"]
    zero_bench = ReplyBench(model, zero_prompts, ZERO_REPLY_TOKENS, settings.seed, found.read, None, found.steered,
                            parallel=len(zero_prompts), layers=found.steered, perplexity=False)
    zero_states = zero_bench.run([("zero", None)], progress)["zero"].states
    reply_level = {
        layer: {band: float(zero_states[zero_bench.layers.index(layer)] @ found.units[band][layer]) for band in BANDS}
        for layer in found.steered
    }
    text_levels = {layer: _levels(extraction, found.units, layer) for layer in found.steered}  # (neutral, unit)
    reader = LayerGeometry(
        BANDS,
        np.stack([found.units[b][found.read] for b in BANDS]).astype(np.float32),
        np.array([reply_level[found.read][b] for b in BANDS], dtype=np.float32),
        np.array([text_levels[found.read][b][1] for b in BANDS], dtype=np.float32),
    )
    calibration_prompts = prompts["calibration"][: settings.calibration_prompts]
    calibrator = ReplyBench(model, calibration_prompts, settings.reply_tokens, settings.seed, found.read, reader,
                            found.steered)
    n_layer = info.n_layer
    vector = {
        band: (lambda strength, band=band: _vector(found.units[band], extraction.token_norm, found.steered, strength, n_layer))
        for band in settings.bands
    }

    # Search each band's strength on the ladder, all bands in one batch per round: first the pair around the usual
    # answer, then one step further up or down where needed. A band whose strength is pinned has its negative side
    # checked in the next round: the same strength if its replies stay fluent and its readout goes down, else half.
    tried: dict[str, dict[float, ReplySet]] = {band: {} for band in settings.bands}
    chosen: dict[str, float] = {}
    ratios: dict[str, float] = {}
    start = STRENGTHS.index(0.22)
    wanted = {band: [STRENGTHS[start], STRENGTHS[start + 1]] for band in settings.bands}
    baseline: ReplySet | None = None  # the unsteered replies, generated with the first round
    while wanted:
        batch = [((band, c), vector[band](c)) for band, strengths in wanted.items() for c in strengths]
        results = calibrator.run(([("baseline", None)] if baseline is None else []) + batch, progress)
        baseline = results.pop("baseline", baseline)
        for (band, strength), replies in results.items():
            tried[band][strength] = replies
            if strength < 0:
                lowers = replies.readout.get(band, 0.0) < baseline.readout.get(band, 0.0)
                ratios[band] = 1.0 if replies.fluent(baseline, margin=CALIBRATION_MARGIN) and lowers else 0.5
        wanted = {}
        for band in settings.bands:
            if band in chosen:
                continue
            fluent, failed = _fluent_steps(tried[band], baseline)
            best, worst = max(fluent, default=-1), min(failed, default=len(STRENGTHS))
            step = best + 1 if best >= 0 else min(fluent | failed) - 1
            if best + 1 < worst and 0 <= step < len(STRENGTHS) and STRENGTHS[step] not in tried[band]:
                wanted[band] = [STRENGTHS[step]]  # not pinned yet: one step beyond what was tried
            else:
                chosen[band] = _strongest_effect(tried[band], baseline, band)
                wanted[band] = [-chosen[band]]

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
        "neutral_components": found.components,
        "selection": "components and layers chosen by 4-fold cross-validated accuracy on the training pairs",
        "axes": "valence and arousal = circumplex-weighted sums of the primaries' centred differences",
        "orthogonalized": settings.orthogonalize,
        "strength_unit": "c: every steered layer gets c/len(steered) of its typical token norm",
        "readout": "unit = the stimulus contrast (band texts minus neutral texts); zero = the model's level on its "
        f"own unsteered replies to {len(zero_prompts)} neutral prompts of their own (meter, filters) or on neutral "
        "prose (analyze, classification)",
        "calibration": f"of the c in {list(STRENGTHS)} whose replies to {len(calibration_prompts)} neutral prompts "
        f"keep perplexity under the unsteered model <= {1 + CALIBRATION_MARGIN * (MAX_PPL_RATIO - 1):g}x and repeated "
        f"3-grams <= {CALIBRATION_MARGIN * MAX_REPEATED_TRIGRAMS:.0%} (bounds {MAX_PPL_RATIO}x / "
        f"{MAX_REPEATED_TRIGRAMS:.0%} with a margin for the small sample), the one whose replies read highest on "
        "the band; negative side: same c if fluent and the readout goes down, else half",
        "stimulus_set": STIMULUS_SET_VERSION,
        "split": SPLIT_RULE,
        "train_pairs_per_band": settings.train_pairs,
        "neutral_passages": settings.neutral_passages,
        "calibration_prompts": len(calibration_prompts),
        "reply_tokens": settings.reply_tokens,
        "quick": settings.quick,
    }
    bank = Bank(directory=None, manifest=manifest)  # type: ignore[arg-type]
    for band in settings.bands:
        bank.bands[band] = Band(
            band,
            vector[band](chosen[band]),
            ratios[band],
            {
                "neutral": [round(reply_level[layer][band], 4) for layer in found.steered],
                "neutral_text": [round(text_levels[layer][band][0], 4) for layer in found.steered],
                "unit": [round(text_levels[layer][band][1], 4) for layer in found.steered],
            },
        )
        manifest["bands"][band] = {
            "strength": chosen[band],
            "negative_strength": chosen[band] * ratios[band],
            "fluent_at_gain_1": tried[band][chosen[band]].fluent(baseline, margin=CALIBRATION_MARGIN),
            "calibration": [
                tried[band][s].summary(band, s, baseline) for s in sorted(tried[band])
            ],
        }
    heldout_accuracy = float(np.trace(found.confusion) / found.confusion.sum())

    manifest["quality"] = {
        "heldout_accuracy": round(heldout_accuracy, 3),
        "heldout_texts": int(found.confusion.sum()),
        "cross_validated_accuracy": round(float(found.validation_accuracy), 3),
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
