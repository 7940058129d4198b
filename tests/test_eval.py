"""eqz eval: the scorers on fixed texts with known answers, and a tiny eval run end to end on the real model."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from eqz.bands import BANDS, CIRCUMPLEX, PRIMARIES
import numpy as np

from eqz.eval import CLEAR_PREFERENCE_RISE, EvalResult, ReplyBench, ReplySet, Setting, prompt_sets, slider_setting
from eqz.judge import LabelJudge
from eqz.bank import SHIPPED_DIR, Bank
from eqz.models import ModelInfo
from eqz.train import HOLD_LEVELS, Calibration, Candidate, TrainSettings, held_level, screen_holds, store_bands
from eqz.scoring import (COUNTED, EmotionScorer, distinct2, emotion_scorer, latin_share, lift, nrc_categories,
                         nrc_lexicon, repeated_trigrams, words, words_per_token)

from .conftest import run_eqz


def test_words_keep_contractions_and_drop_punctuation():
    assert words("It's GREAT -- isn't it? 42 cats.") == ["it's", "great", "isn't", "it", "cats"]


def test_eqz_own_word_list_counts_band_words_per_hundred_words():
    scores = EmotionScorer("eqz-words").rates("I am so happy and afraid today, truly.")  # 8 words: 1 joy, 1 fear
    assert set(scores) == set(BANDS)
    assert scores["joy"] == pytest.approx(12.5)
    assert scores["fear"] == pytest.approx(12.5)
    assert all(scores[band] == 0 for band in ("trust", "surprise", "sadness", "disgust", "anger", "anticipation"))
    assert scores["valence"] == pytest.approx(12.5 * (CIRCUMPLEX["joy"][0] + CIRCUMPLEX["fear"][0]))
    assert scores["arousal"] == pytest.approx(12.5 * (CIRCUMPLEX["joy"][1] + CIRCUMPLEX["fear"][1]))


def test_eqz_own_word_list_scores_neutral_or_empty_text_zero():
    own_words = EmotionScorer("eqz-words")
    assert all(value == 0 for value in own_words.rates("The train leaves at nine from platform four.").values())
    assert all(value == 0 for value in own_words.rates("").values())


def test_the_nrc_lexicon_is_installed_and_scores_inflected_forms():
    assert nrc_lexicon() is not None, "NRCLex is missing: run `make setup`"
    rates = EmotionScorer("nrc").rates("She smiled, then screamed in terror at the rotten stench.")  # 10 words
    assert rates["joy"] > 0 and rates["fear"] > 0 and rates["disgust"] > 0  # smiled -> smile (inflection)
    assert rates["valence"] < 0  # more negative than positive words
    assert all(value == 0 for value in EmotionScorer("nrc").rates("The the of and.").values())


def test_the_nrc_fallback_undoes_inflections_only():
    table = nrc_lexicon()
    assert nrc_categories("scared", table) == table["scare"]  # scare-d, not scar-ed (sadness, disgust)
    assert nrc_categories("hated", table) == table["hate"]
    assert nrc_categories("friends", table) == table["friend"]
    for derived in ("really", "usually", "kindly", "assigned"):  # real, usual, kind: not the adverb's emotion
        assert not nrc_categories(derived, table) - {"positive", "negative"}, derived


def test_lift_is_smoothed_and_latin_share_spots_another_script():
    assert lift(1.0, 0.0) == pytest.approx((1.0 + 0.25) / 0.25)
    assert lift(0.0, 0.0) == 1.0
    assert latin_share("plain English words") == 1.0
    assert latin_share("Привет мир") == 0.0


def test_words_per_token_spots_replies_that_are_not_words():
    # Gemma 3 270M's anger at +1 (calibration prompts): every word-level bound passed it
    garbage = "‘‘t‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘‘“‘‘‘‘‘‘‘‘‘ ’‘‘‘‘‘‘crackcrackcrackchopchop"
    plain = "The kettle boils water quickly, so tea is ready in a few minutes."
    assert words(garbage) == ["t", "crackcrackcrackchopchop"]
    assert words_per_token([2, 0], [[0] * 40, []]) == pytest.approx(2 / 40)
    assert words_per_token([], []) == 1.0
    steered, unsteered = ReplySet.scored([([0] * 40, garbage)]), ReplySet.scored([([0] * 16, plain)])
    assert steered.repeat == 0.0 and steered.distinct == 1.0 and steered.latin == 1.0
    assert not steered.fluent(unsteered) and unsteered.fluent(unsteered)


def test_a_reply_set_is_clear_only_where_its_own_band_leads_and_doubles():
    baseline = ReplySet(texts=[""], rates={band: 1.0 for band in BANDS})
    steered = ReplySet(texts=[""], rates={**baseline.rates, "joy": 3.0, "fear": 1.5})
    assert steered.clear("joy", baseline) and not steered.clear("fear", baseline)
    crowded = ReplySet(texts=[""], rates={**baseline.rates, "joy": 3.0, "anger": 5.0})
    assert not crowded.clear("joy", baseline)  # anger is lifted more
    assert steered.clear("valence", ReplySet(texts=[""], rates={**baseline.rates, "valence": -0.5})) is True


def _counted(per_prompt: list[dict[str, int]], words: int = 100) -> ReplySet:
    """Replies (one per prompt) with these word counts (scoring.COUNTED keys) out of ``words`` words each."""
    counts = np.array([[row.get(key, 0) for key in COUNTED] + [words] for row in per_prompt])
    return ReplySet(texts=[""] * len(per_prompt), counts=counts,
                    rates=dict(zip(BANDS, emotion_scorer().rates_of(counts.sum(axis=0)).tolist())))


def test_clear_share_redraws_the_prompts_and_counts_how_often_the_verdict_holds():
    baseline = _counted([{"joy": 1, "fear": 1}] * 16)
    everywhere = _counted([{"joy": 4, "fear": 1}] * 16)  # every prompt's reply is joyful
    one_prompt = _counted([{"joy": 49, "fear": 1}] + [{"joy": 1, "fear": 1}] * 15)  # the same words, all in one reply
    assert everywhere.clear("joy", baseline) and one_prompt.clear("joy", baseline)  # same totals, same verdict
    assert everywhere.clear_share("joy", baseline, samples=1) == 1.0
    assert 0.2 < one_prompt.clear_share("joy", baseline, samples=1) < 0.8  # it rests on whether that prompt is drawn
    assert everywhere.clear_share("fear", baseline, samples=1) == 0.0
    # an axis holds where its rise (here positive minus negative words, NRC) reaches a word per 100 on most draws
    assert everywhere.clear_share("valence", baseline, samples=1) == 0.0  # joy words, none of them "positive"
    positive = _counted([{"positive": 2}] * 16)
    assert positive.clear_share("valence", baseline, samples=1) == 1.0
    chance = _counted([{"positive": 17}] + [{}] * 15)  # +1.06 per 100 overall, all from one reply
    assert chance.clear("valence", baseline) and 0.5 < chance.clear_share("valence", baseline, samples=1) < 0.8
    angry = _counted([{"anger": 2, "joy": 1, "fear": 1}] * 16)  # arousal: +2 anger words x 0.8 = +1.6 per 100
    assert angry.clear_share("arousal", baseline, samples=1) == 1.0
    # the first prompt's two samples carry the joy: drawn together (8 prompts x 2) it is missed more often than
    # either of two independent replies would be (16 x 1: 1 - (14/16)^16 = 0.88 against 1 - (7/8)^8 = 0.66)
    paired = _counted([{"joy": 25, "fear": 1}] * 2 + [{"joy": 1, "fear": 1}] * 14)
    assert paired.clear_share("joy", baseline, samples=2) < 0.75 < paired.clear_share("joy", baseline, samples=1)


def test_words_gained_counts_what_a_ratio_hides_and_a_result_reads_back_from_its_json():
    unsteered = {band: 1.0 for band in PRIMARIES} | {"joy": 4.75, "sadness": 0.25}
    rows = [{"band": band, "gain": 0.0, "words_per_100": rate, "lifts": dict.fromkeys(PRIMARIES, 1.0)}
            for band, rate in unsteered.items()]
    # joy at +1: 2.5 more joy words per 100 (x1.5) and 0.5 more sadness words (x2.0, the larger ratio)
    rows.append({"band": "joy", "gain": 1.0, "words_per_100": 7.25,
                 "lifts": dict.fromkeys(PRIMARIES, 1.0) | {"joy": 1.5, "sadness": 2.0}})
    result = EvalResult(PRIMARIES, (0.0, 1.0), rows, prompts=16, reply_tokens=64, samples=2, scorer="nrc")
    gained = result.words_gained("joy")
    assert gained["joy"] == pytest.approx(2.5) and gained["sadness"] == pytest.approx(0.5)
    assert gained["trust"] == 0 and result.words_gained("fear") is None  # fear has no +1 row
    only_joy = EvalResult(("joy",), (0.0, 1.0), [rows[0], rows[-1]], 16, 64, 2, "nrc")
    assert only_joy.words_gained("joy") is None  # the other primaries' unsteered rates are unknown
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    described = {"band": "nostalgia", "gain": 0.0, "effect": 0.0}  # judged by preference: no words of its own
    with_described = EvalResult((*PRIMARIES, "nostalgia"), (0.0, 1.0), rows + [described], 16, 64, 2, "nrc")
    assert with_described.words_gained("joy") == gained and with_described.words_gained("nostalgia") is None


def test_a_record_keeps_bands_measured_alike_and_one_that_cannot_say_how_matches_no_run(tmp_path):
    """`eval --record` of some bands kept the others' figures only by refusing: now where measured alike. An
    eval.json from before the prompts were kept (benchmarks/steering.py --report --record) recorded 0 prompts and
    the digest of none."""
    from eqz.bank import describe_setup
    from eqz.eval import record, recorded_alike, recording_setup

    shutil.copytree(SHIPPED_DIR / "smollm2-135m-instruct", tmp_path / "bank")
    bank = Bank.load(tmp_path / "bank")
    shipped = dict(bank.quality["dose_response"])
    alike = recording_setup(prompt_sets()["eval"], 64, 2, (-1.0, 0.0, 1.0, 2.0))
    assert recorded_alike(bank, alike) and not recorded_alike(bank, {**alike, "samples": 1})
    rows = [{"band": "joy", "gain": 1.0, "effect": 9.0}]
    result = EvalResult(("joy",), (1.0,), rows, 16, 64, 2, "nrc", run={"prompts": prompt_sets()["eval"]})
    record(result, bank)  # same prompts, samples and length, other gains: the others go
    assert list(bank.quality["dose_response"]) == ["joy"]
    bank.quality["dose_response"] = dict(shipped)
    bank.quality["dose_response_setup"] = {**alike, "date": "2026-12-06"}
    record(EvalResult(("joy",), (-1.0, 0.0, 1.0, 2.0), rows, 16, 64, 2, "nrc", run={"prompts": prompt_sets()["eval"]}),
           bank)
    recorded = bank.quality["dose_response"]
    assert recorded["joy"] == {"1.0": {"effect": 9.0}} and recorded["trust"] == shipped["trust"] and len(recorded) == 10
    record(EvalResult(("joy",), (1.0,), rows, 16, 64, 2, "nrc"), bank)  # read back from an old eval.json: no texts
    setup = bank.quality["dose_response_setup"]
    assert setup["prompts"] == 16 and "prompts_sha256" not in setup and not recorded_alike(bank, alike)
    # a record revises calibration's verdicts only where it rests on as many reply tokens: three prompts of 24
    # tokens erased joy's "weak" and its warning
    bank.quality["dose_response"]["joy"] = {"1.0": {"clear": True, "fluent": True}}
    assert "weak" in bank.trained_problems("joy")
    for prompts, tokens, weak in ((3, 24, True), (16, 64, False)):
        bank.quality["dose_response_setup"] = {**alike, "prompts": prompts, "samples": 1, "reply_tokens": tokens}
        assert ("weak" in bank.open_problems("joy")) == weak
    assert describe_setup({"prompts": 16, "reply_tokens": 64}) == (  # the first eval's records: a KeyError
        "16 prompts, which ones unrecorded x unrecorded samples x 64 tokens at unrecorded gains")


def test_not_fluent_names_the_bounds_a_setting_left():
    """"not fluent at gain +1" stood beside columns all in bounds: words per token and the Latin share are not shown."""
    from eqz.eval import broken_bounds

    unsteered = {"repeated_3grams": 0.0, "distinct_2": 1.0, "latin": 1.0, "words_per_token": 0.8, "ppl_ratio": 1.0}
    assert broken_bounds(unsteered, unsteered) == []
    row = {**unsteered, "words_per_token": 0.5, "ppl_ratio": 5.0, "repeated_3grams": 0.08}
    assert broken_bounds(row, unsteered) == ["repeated 3-grams 8% > 5%", "words per token 0.50 < 0.7 x 0.80",
                                             "perplexity 5.00x > 4x"]


def test_calibration_takes_the_smallest_strength_whose_clear_verdict_holds_over_redrawn_prompts():
    baseline = _counted([{"joy": 1, "fear": 1}] * 10)
    chance = _counted([{"joy": 31, "fear": 1}] + [{"joy": 1, "fear": 1}] * 9)  # 4x overall, all from one reply
    steady = _counted([{"joy": 4, "fear": 1}] * 10)
    candidate = Candidate("joy", "stimulus", np.zeros((1, 1)), tried={0.15: chance, 0.25: steady})
    for replies in (baseline, chance, steady):
        replies.repeat, replies.distinct, replies.latin = 0.0, 1.0, 1.0
    assert chance.clear("joy", baseline) and not candidate.holds(0.15, baseline)
    assert candidate.best(baseline) == (0.25, True)
    # the axes too: one reply's positive words made valence's point verdict at the lowest rung
    chance, steady = _counted([{"positive": 11}] + [{}] * 9), _counted([{"positive": 2}] * 10)
    for replies in (chance, steady):
        replies.repeat, replies.distinct, replies.latin = 0.0, 1.0, 1.0
    valence = Candidate("valence", "stimulus", np.zeros((1, 1)), tried={0.1: chance, 0.15: steady})
    assert chance.clear("valence", baseline) and not valence.holds(0.1, baseline)
    assert valence.best(baseline) == (0.15, True)


def _perplexed(per_prompt_nll: list[float], tokens: int = 40) -> ReplySet:
    """Replies (one per prompt, ``tokens`` each) with these mean negative log-probabilities, fluent by the text."""
    parts = np.array([[nll * tokens, tokens] for nll in per_prompt_nll])
    return ReplySet(texts=[""] * len(parts), repeat=0.0, distinct=1.0, latin=1.0, nll_by_prompt=parts,
                    nll=float(parts[:, 0].sum() / parts[:, 1].sum()),
                    counts=np.zeros((len(parts), len(COUNTED) + 1)), rates=dict.fromkeys(BANDS, 0.0))


def test_calibration_keeps_a_strength_whose_perplexity_bound_holds_over_redrawn_prompts():
    """Gemma 3 270M's bands sat at 3.5-3.8x in calibration and read 4.1-5.5x held out: a mean over ten short
    replies is moved by the one that drifts."""
    baseline = _perplexed([2.0] * 10)
    steady = _perplexed([2.0 + math.log(3.0)] * 10)  # 3x on every prompt
    drifting = _perplexed([2.0 + math.log(1.5)] * 9 + [2.0 + 10 * math.log(3.5) - 9 * math.log(1.5)])  # 3.5x, one reply
    assert steady.fluent(baseline) and drifting.fluent(baseline)  # same point verdict
    assert steady.ppl_share(baseline) == 1.0 and drifting.ppl_share(baseline) < 0.8
    candidate = Candidate("joy", "stimulus", np.zeros((1, 1)), tried={0.2: steady, 0.25: drifting})
    assert candidate.best(baseline) == (0.2, False) and candidate.next_strength(baseline) is None
    assert ReplySet(texts=[]).ppl_share(baseline) is None  # not measured: the point verdict alone


def test_calibration_jumps_down_the_ladder_as_far_as_the_perplexity_says():
    baseline = _perplexed([2.0] * 10)
    far_out = Candidate("fear", "stimulus", np.zeros((1, 1)), tried={0.35: _perplexed([2.0 + math.log(370)] * 10)})
    assert far_out.next_strength(baseline) == 0.07  # log 370 x 0.07 / 0.35 = 1.18 <= log 4; at 0.1, 1.69 is not
    just_over = Candidate("fear", "stimulus", np.zeros((1, 1)), tried={0.35: _perplexed([2.0 + math.log(5)] * 10)})
    assert just_over.next_strength(baseline) == 0.25  # the next step down
    unmeasured = Candidate("fear", "stimulus", np.zeros((1, 1)), tried={0.35: _counted([{}] * 10)})
    unmeasured.tried[0.35].repeat = 0.5  # not fluent by the text, perplexity not read: one step down
    assert unmeasured.next_strength(baseline) == 0.25


def test_the_label_judge_counts_a_band_clear_where_it_names_it_twice_as_often_and_most():
    """ReplySet.labels: per reply, the judge's log-probability of each primary's name; lifts are paired by reply."""
    baseline = ReplySet(texts=[""] * 4, labels=np.log(np.full((4, 8), 1 / 8)))
    named = np.log(np.full((4, 8), 1 / 8))
    named[:, PRIMARIES.index("fear")] += math.log(3)  # three times as likely on every reply
    named[:, PRIMARIES.index("sadness")] += math.log(1.5)
    steered = ReplySet(texts=[""] * 4, labels=named)
    lifts = steered.judged_lifts(baseline)
    assert lifts["fear"] == pytest.approx(3.0) and lifts["joy"] == pytest.approx(1.0)
    assert steered.judged_clear("fear", baseline) and not steered.judged_clear("sadness", baseline)
    assert steered.judged_clear_share("fear", baseline, samples=2) == 1.0
    one_reply = np.log(np.full((4, 8), 1 / 8))
    one_reply[0, PRIMARIES.index("fear")] += 4 * math.log(3)  # the same mean lift, all of it from one prompt
    lucky = ReplySet(texts=[""] * 4, labels=one_reply)
    assert lucky.judged_clear("fear", baseline) and 0.2 < lucky.judged_clear_share("fear", baseline, samples=1) < 0.8


def _named(joy_lift: list[float]) -> np.ndarray:
    """Judge log-probabilities, one reply per prompt: joy named exp(lift) times as often as an even eighth."""
    labels = np.log(np.full((len(joy_lift), 8), 1 / 8))
    labels[:, PRIMARIES.index("joy")] += joy_lift
    return labels


def test_calibration_asks_the_judge_to_confirm_a_lexicon_verdict_and_ranks_the_rest_by_its_lift():
    baseline = _counted([{"joy": 1, "fear": 1}] * 10)
    baseline.labels = _named([0.0] * 10)
    lexicon_only = _counted([{"joy": 4, "fear": 1}] * 10)  # clear words, but the judge does not hear joy
    lexicon_only.labels = _named([0.1] * 10)
    both = _counted([{"joy": 4, "fear": 1}] * 10)
    both.labels = _named([1.0] * 10)  # e^1 = 2.7x on every prompt
    judge_only = _counted([{"joy": 1, "fear": 1}] * 10)
    judge_only.labels = _named([1.5] * 10)
    for replies in (baseline, lexicon_only, both, judge_only):
        replies.repeat, replies.distinct, replies.latin = 0.0, 1.0, 1.0
    candidate = Candidate("joy", "stimulus", np.zeros((1, 1)), tried={0.15: lexicon_only, 0.25: both})
    assert lexicon_only.clear("joy", baseline) and not candidate.holds(0.15, baseline)
    assert candidate.clear_share(0.25, baseline) == 1.0 and candidate.best(baseline) == (0.25, True)
    unconfirmed = Candidate("joy", "stimulus", np.zeros((1, 1)), tried={0.15: lexicon_only, 0.25: judge_only})
    assert unconfirmed.best(baseline) == (0.25, False)  # neither holds; the judge's larger lift ranks first


def test_train_hold_holds_a_level_only_where_both_scorers_expect_more_of_it_than_of_the_vector():
    """`eqz train`'s held-level screen (screen_holds): calibration's rule picks the level, and the level is held only where the
    lexicon's and the judge's shares over redrawn prompts add up to more than the vector's at its +1."""
    baseline = _counted([{"joy": 1, "fear": 1}] * 10)
    baseline.labels = _named([0.0] * 10)
    lexicon_only = _counted([{"joy": 4, "fear": 1}] * 10)  # expected verdicts: lexicon 1, judge 0
    lexicon_only.labels = _named([0.1] * 10)
    both = _counted([{"joy": 4, "fear": 1}] * 10)  # lexicon 1, judge 1
    both.labels = _named([1.0] * 10)
    judge_only = _counted([{"joy": 1, "fear": 1}] * 10)  # lexicon 0, judge 1
    judge_only.labels = _named([1.5] * 10)
    for replies in (baseline, lexicon_only, both, judge_only):
        replies.repeat, replies.distinct, replies.latin = 0.0, 1.0, 1.0
    vector = Candidate("joy", "stimulus", np.zeros((1, 1)), tried={0.35: lexicon_only}, pinned=0.35)
    assert vector.expected_clear(0.35, baseline) == 1.0
    clamp = Candidate("joy", "held", np.zeros((1, 1)), tried={2.0: judge_only, 4.0: both})
    assert held_level(vector, clamp, baseline) == (4.0, True)  # 2.0 does not hold by both; 4.0 does and beats 1.0
    tied = Candidate("joy", "held", np.zeros((1, 1)), tried={3.0: judge_only})
    assert held_level(vector, tied, baseline) is None  # as good as the vector: keep the vector
    judge_only.repeat = 0.5  # out of the fluency bounds: nothing to hold
    assert held_level(vector, tied, baseline) is None and tied.best(baseline) is None


class _CannedBench:
    """A ReplyBench stand-in (10 prompts, 1 sample, 8 decode slots) that answers each (band, level) setting with
    canned replies and notes what each run asked for."""

    prompts, samples, slots = [""] * 10, 1, 8

    def __init__(self, replies: dict):
        self.replies, self.runs = replies, []

    def run(self, settings, _progress, **_reads):
        self.runs.append([setting.key for setting in settings])
        return {setting.key: self.replies[setting.key] for setting in settings}


def test_the_hold_screen_stops_a_band_at_its_first_level_that_holds_and_skips_a_vector_it_cannot_beat():
    """Levels go up (the rule picks the smallest fluent level that holds, whatever lies above it), so joy stops at 4
    while fear, which never holds, is tried at every level, two levels a run once it alone fills the 8 slots less
    than twice; trust's vector is clear on every redraw by both scorers, so no level could beat it and none is run. Only
    the screen's scheduling is canned here: its replies come from the real model in the Gemma training test."""
    baseline = _counted([{"joy": 1, "fear": 1, "trust": 1}] * 10)
    baseline.labels = _named([0.0] * 10)
    lexicon_only = _counted([{"joy": 4, "fear": 4, "trust": 1}] * 10)
    lexicon_only.labels = _named([0.1] * 10)
    judge_only = _counted([{"joy": 1, "fear": 1, "trust": 1}] * 10)
    judge_only.labels = _named([1.5] * 10)
    both = _counted([{"joy": 4, "fear": 1, "trust": 1}] * 10)
    both.labels = _named([1.0] * 10)
    trusting = _counted([{"joy": 1, "fear": 1, "trust": 8}] * 10)
    trusting.labels = np.log(np.full((10, 8), 1 / 8))
    trusting.labels[:, PRIMARIES.index("trust")] += 2.0
    for replies in (baseline, lexicon_only, judge_only, both, trusting):
        replies.repeat, replies.distinct, replies.latin = 0.0, 1.0, 1.0
    units = np.zeros((30, 576), np.float32)
    chosen = {band: Candidate(band, "stimulus", units, tried={0.35: replies}, pinned=0.35)
              for band, replies in (("joy", lexicon_only), ("fear", lexicon_only), ("trust", trusting))}
    assert chosen["trust"].expected_clear(0.35, baseline) == 2.0
    assert HOLD_LEVELS == (3.0, 4.0, 5.0, 6.0)
    less_joy = _counted([{"joy": 0, "fear": 1, "trust": 1}] * 10)
    less_joy.labels = _named([-1.0] * 10)
    less_joy.repeat, less_joy.distinct, less_joy.latin = 0.0, 1.0, 1.0
    canned = {("joy", level): judge_only if level < 4 else both for level in HOLD_LEVELS}
    canned |= {("fear", level): judge_only for level in HOLD_LEVELS} | {("joy", -4.0): less_joy}
    bench = _CannedBench(canned)
    calibration = Calibration(chosen, list(chosen.values()), baseline, {}, lambda _candidate, _strength: units,
                              bench=bench, prompts=10, seconds=0.0)
    bank = Bank.load(SHIPPED_DIR / "smollm2-135m-instruct")
    held = screen_holds(bank, calibration)
    assert bench.runs == [[("joy", 3.0), ("fear", 3.0)], [("joy", 4.0), ("fear", 4.0)], [("fear", 5.0), ("fear", 6.0)],
                          [("joy", -4.0)]]  # the held level's direction check: -level beside +level and 0
    assert set(held) == {"joy"} and held["joy"][0] == 4.0 and held["joy"][1]["weak"] is False
    assert held["joy"][1]["problems"] == []
    canned[("joy", -4.0)] = both  # joy named more at -1 than unsteered: the level fails its direction check
    joy = screen_holds(bank, calibration)["joy"]
    assert joy[1]["problems"] == ["judge"]
    bank.hold("joy", *joy)
    assert bank.trained_problems("joy") == ["judge"]  # shown in `eqz vectors show`; moving the slider warns


def test_a_quick_training_leaves_the_hold_screen_out_unless_asked():
    """The screen takes about as long in a --quick training as in a full one (132 s of 335 s on SmolLM2), so a quick
    first bank skips it unless --hold asks for it (the Gemma training test does)."""
    assert TrainSettings().hold and not TrainSettings(quick=True).hold
    assert TrainSettings(quick=True, hold=True).hold and not TrainSettings(hold=False).hold


def test_the_direction_check_of_a_primary_follows_the_judge_where_the_replies_were_judged():
    """-1 / 0 / +1 on the calibration prompts: a chance trust word at -1 (above the lexicon's one-word floor) no
    longer flags the band when the judge, reading every reply, names trust less at -1 and more at +1."""
    baseline = _counted([{"trust": 4}] * 10)
    up, down = _counted([{"trust": 10}] * 10), _counted([{"trust": 6}] * 10)
    for replies, named in ((baseline, 0.0), (up, 1.0), (down, -1.0)):
        replies.repeat, replies.distinct, replies.latin, replies.texts = 0.0, 1.0, 1.0, ["word " * 100] * 10
        replies.labels = np.log(np.full((10, 8), 1 / 8))
        replies.labels[:, PRIMARIES.index("trust")] += named
    candidate = Candidate("trust", "stimulus", np.zeros((2, 3)), tried={0.35: up}, pinned=0.35)
    calibration = Calibration({"trust": candidate}, [candidate], baseline, {("trust", 1): up, ("trust", -1): down},
                              lambda _candidate, _strength: np.zeros((2, 3), np.float32), bench=None, prompts=10,
                              seconds=0.0)
    bank = Bank.empty(ModelInfo("x.gguf", "tiny", "llama", 2, 3, 100, 512, True))
    store_bands(bank, calibration, {}, {})
    assert bank.bands["trust"].problems == []  # clear (judge holds, lexicon 2.5x) and rising by the judge
    down.labels[:, PRIMARIES.index("trust")] += 1.5  # the judge now names trust more at -1 than unsteered
    bank.quality["dose_response"] = {"trust": {"1.0": {"clear": True, "fluent": False}}}  # the last vector's record
    store_bands(bank, calibration, {}, {})
    assert bank.bands["trust"].problems == ["judge"]
    assert "trust" not in bank.quality["dose_response"]  # it measured the vector retraining replaced


def test_the_direction_check_of_an_axis_follows_the_judges_names_on_the_circumplex():
    """Arousal's words are the primaries' weighted by circumplex arousal, so joy words at -1 read as a rise. Where
    the replies were judged, the judge's names carry the check: calmer names (sadness, trust) at -1 and livelier
    (anger, surprise) at +1 pass it whatever the words did; the other way round flags "judge"."""
    baseline = _counted([{"trust": 2}] * 10)
    up, down = _counted([{"anger": 3}] * 10), _counted([{"joy": 6}] * 10)  # the words rise at -1 as well
    for replies, lively in ((baseline, 0.0), (up, 1.0), (down, -1.0)):
        replies.repeat, replies.distinct, replies.latin, replies.texts = 0.0, 1.0, 1.0, ["word " * 100] * 10
        replies.labels = np.log(np.full((10, 8), 1 / 8))
        for band in ("anger", "surprise"):
            replies.labels[:, PRIMARIES.index(band)] += lively
        for band in ("sadness", "trust"):
            replies.labels[:, PRIMARIES.index(band)] -= lively
        replies.labels -= np.logaddexp.reduce(replies.labels, axis=1, keepdims=True)
    assert down.judged_rise("arousal", baseline) < 0 < up.judged_rise("arousal", baseline)
    assert down.rates["arousal"] > baseline.rates["arousal"]
    candidate = Candidate("arousal", "voice", np.zeros((2, 3)), tried={0.35: up}, pinned=0.35)
    calibration = Calibration({"arousal": candidate}, [candidate], baseline,
                              {("arousal", 1): up, ("arousal", -1): down},
                              lambda _candidate, _strength: np.zeros((2, 3), np.float32), bench=None, prompts=10,
                              seconds=0.0)
    bank = Bank.empty(ModelInfo("x.gguf", "tiny", "llama", 2, 3, 100, 512, True))
    store_bands(bank, calibration, {}, {})
    assert not {"judge", "lexicon"} & set(bank.bands["arousal"].problems)
    assert bank.bands["arousal"].check["-1"]["judged_rise"] < 0
    down.labels, baseline.labels = baseline.labels, down.labels  # now the judge hears -1 as livelier than 0
    store_bands(bank, calibration, {}, {})
    assert "judge" in bank.bands["arousal"].problems


def test_a_described_band_is_clear_when_the_judge_prefers_its_persona_specifically():
    """Preference = nats per token likelier under the band's persona than the neutral one; what every persona gains
    (the primaries' mean) does not count, and the band's own persona must gain most."""
    base = ReplySet(texts=[""], preference={band: 0.0 for band in (*PRIMARIES, "nostalgia")})
    rise = ReplySet(texts=[""], preference={**base.preference, "nostalgia": 0.12, "sadness": 0.08})
    assert rise.effect("nostalgia", base) == pytest.approx(0.12 - 0.08 / 8)
    assert rise.clear("nostalgia", base) and rise.most_lifted("nostalgia", base) == "nostalgia"
    everything = ReplySet(texts=[""], preference={band: 0.12 for band in base.preference})
    assert everything.effect("nostalgia", base) == pytest.approx(0.0) and not everything.clear("nostalgia", base)
    outdone = ReplySet(texts=[""], preference={**base.preference, "nostalgia": 0.12, "sadness": 0.2})
    assert outdone.most_lifted("nostalgia", base) == "sadness" and not outdone.clear("nostalgia", base)
    small = ReplySet(texts=[""], preference={**base.preference, "nostalgia": CLEAR_PREFERENCE_RISE * 0.9})
    assert not small.clear("nostalgia", base)


def test_only_a_band_judged_by_preference_has_a_preference_in_its_rows():
    """In a run with a custom band the primaries have preferences too (its contrast): their rows carried one, and
    the plot labelled their lexicon effect as the judge's."""
    preference = {band: 0.0 for band in (*PRIMARIES, "nostalgia")}
    rates = {band: 1.0 for band in PRIMARIES}
    base = ReplySet(texts=["a b c d"], rates=rates, preference=preference)
    steered = ReplySet(texts=["a b c d"], rates={**rates, "joy": 3.0}, preference={**preference, "nostalgia": 0.2})
    assert "preference" not in steered.summary("joy", base) and "words_per_100" in steered.summary("joy", base)
    assert steered.summary("nostalgia", base)["preference"] == pytest.approx(0.2)


def test_repeated_trigrams_and_distinct_bigrams():
    assert repeated_trigrams("a b c a b c") == pytest.approx(0.25)  # abc bca cab abc: one of four repeats
    assert repeated_trigrams("one two three four") == 0
    assert repeated_trigrams("too short") == 0
    assert distinct2("a b a b") == pytest.approx(2 / 3)  # ab ba ab
    assert distinct2("word") == 1.0


def test_perplexity_is_exp_of_the_mean_negative_log_probability():
    assert ReplySet(texts=[""], nll=math.log(2.0)).ppl == pytest.approx(2.0)
    assert ReplySet(texts=[""], nll=math.log(6.0)).ppl_ratio(ReplySet(texts=[""], nll=math.log(2.0))) == pytest.approx(3.0)
    assert math.isnan(ReplySet(texts=[""]).ppl)


def test_fluency_bounds_repeats_distinct_bigrams_script_words_per_token_and_judged_perplexity():
    baseline = ReplySet(texts=[""], nll=1.0, distinct=1.0, latin=1.0, words_per_token=1.0)
    assert ReplySet(texts=[""], nll=1.0 + math.log(3.9), repeat=0.04).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0 + math.log(4.1)).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0, repeat=0.06).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0, distinct=0.85).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0, latin=0.5).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0, words_per_token=0.6).fluent(baseline)
    assert ReplySet(texts=[""], nll=1.0, words_per_token=0.75).fluent(baseline)
    assert ReplySet(texts=[""]).fluent(baseline)  # perplexity not measured: the other bounds decide


@pytest.mark.slow
def test_tiny_eval_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe a kitchen table.\nWhat is a bus timetable?\nExplain how to water a plant.\n")
    out = tmp_path / "out"
    result = run_eqz("eval", "--bands", "joy,sadness", "--gains", "-1,0,1", "-n", "32",  # 16: sadness -1 read 0 +-0.05
                     "--prompts", str(prompts), "-o", str(out), "--plot")
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "eval.json").read_text())
    assert data["prompts"] == 3 and data["reply_tokens"] == 32 and data["scorer"] == "nrc"
    (shipped,) = SHIPPED_DIR.glob("*/bank.yaml")
    assert data["model"] == Bank.load(shipped.parent).model.fingerprint  # what `steering.py --report` checks
    asked = {row["band"]: row for row in data["rows"] if row.get("asked")}
    rows = {(row["band"], row["gain"]): row for row in data["rows"] if not row.get("asked")}
    # every gain, and the prompt-only baseline (gain null) beside each band
    assert set(rows) == {(b, g) for b in ("joy", "sadness") for g in (-1.0, 0.0, 1.0, None)}
    # and the band asked for with its slider at +1: same prompts and seeds as prompt only, the vector on top
    assert set(asked) == {"joy", "sadness"} and all(row["gain"] == 1.0 for row in asked.values())
    # (both parts applied: its replies differ from asking alone's and from the slider alone's; the vector is the
    # same bank.mix as the +1 row, whose sign the readout checks below. Which of asking alone and asking with the
    # slider reads higher on 3 prompts x 32 tokens is noise: it flipped for sadness with the CPU llama.cpp ran on)
    for band, row in asked.items():
        assert row["examples"] != rows[(band, None)]["examples"] and row["examples"] != rows[(band, 1.0)]["examples"]
    # gain 0 is the shared unsteered baseline: effect exactly 1, perplexity ratio exactly 1
    zero = rows[("joy", 0.0)]
    assert zero["effect"] == 1.0 and zero["ppl_ratio"] == 1.0 and zero["examples"] == rows[("sadness", 0.0)]["examples"]
    # and lifts nothing: the first of eight equal lifts ("joy") was written down as the most lifted, every band's
    assert zero["most_lifted"] is None and zero["judged_most_lifted"] is None
    # the slider moves the model's own readout of its reply the way it is named
    for band in ("joy", "sadness"):
        assert rows[(band, -1.0)]["readout"] < rows[(band, 0.0)]["readout"] < rows[(band, 1.0)]["readout"]
        assert set(rows[(band, 1.0)]["lifts"]) == {"joy", "trust", "fear", "surprise", "sadness", "disgust", "anger",
                                                  "anticipation"}
        assert rows[(band, None)]["ppl_ratio"] > 0 and len(rows[(band, None)]["examples"]) == 3
        assert 0.0 <= rows[(band, 1.0)]["clear_share"] <= 1.0 and "clear_share" not in rows[(band, 0.0)]
        # the unsteered model as a second judge: how much likelier it names the band for the replies
        assert rows[(band, 0.0)]["judged_effect"] == 1.0
        # it reads the replies: +1 above the unsteered and above -1 (on 3 prompts x 32 tokens, whether -1 reads
        # below 1.0 is the CPU's noise: sadness read 1.09 on an Intel Xeon, below 1 on an AMD EPYC)
        assert rows[(band, -1.0)]["judged_effect"] < rows[(band, 1.0)]["judged_effect"]
        assert rows[(band, 1.0)]["judged_effect"] > 1.0
        assert rows[(band, 1.0)]["judged_most_lifted"] in PRIMARIES and 0.0 <= rows[(band, 1.0)]["judged_clear_share"] <= 1
    assert set(rows[("joy", 1.0)]["crosstalk"]) == set(BANDS) - {"joy"}
    with (out / "eval.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 10
    # every reply in full: the unsteered ones once, then per band its two steered gains, asked alone and asked at +1
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert len(replies) == 3 + 2 * 4 * 3 and [reply["prompt"] for reply in replies[:3]] == prompts.read_text().splitlines()
    for (band, gain), row in rows.items():
        keyed = (None, 0.0, False) if gain == 0 else (band, gain, False)
        texts = [reply["text"] for reply in replies if (reply["band"], reply["gain"], "asked" in reply) == keyed]
        assert [text[:240] for text in texts] == row["examples"] and all(texts)
    assert [reply["text"][:240] for reply in replies if reply.get("asked") and reply["band"] == "joy"] == \
        asked["joy"]["examples"]
    assert (out / "dose_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prompt only" in result.stdout and "prompt +1 " in result.stdout and "judge" in result.stdout
    # a pipe is 80 columns: every figure is printed in full, none cut to "0.…"
    assert "…" not in result.stdout
    assert all(f"{row['effect']:.2f}" in result.stdout and f"{row['distinct_2']:.2f}" in result.stdout
               for row in data["rows"])


@pytest.mark.slow
def test_the_unsteered_model_names_the_emotion_of_emotional_sentences(model):
    """The label judge on sentences of known emotion (the dev set, 3 per primary): against the set's mean it ranks
    the true primary first for most (87.5% of all 80 on the default model; chance 12.5%)."""
    sentences = yaml.safe_load((Path(__file__).parent / "data" / "short_sentences.yaml").read_text())
    judge = LabelJudge.for_model(model)
    texts = [model.tokenize(text, add_special=False) for band in PRIMARIES for text in sentences[band][:3]]
    scores = judge.scores(model, texts)
    assert scores.shape == (24, 8) and np.allclose(np.exp(scores).sum(axis=1), 1.0, atol=1e-4)
    named = (scores - scores.mean(axis=0)).argmax(axis=1)
    assert np.mean(named == np.repeat(np.arange(8), 3)) >= 0.6


@pytest.mark.slow
def test_a_settings_judged_names_do_not_depend_on_the_settings_measured_beside_it(model):
    """On quantized weights a text's reading moves with what shares its decode (on the default model's Q4_1, by
    0.07 nats per name on average; docs/steering-limits.md section 20), so each setting's replies are judged in
    decodes of their own: a page or a calibration round reads a setting the same whatever else it measures."""
    (shipped,) = SHIPPED_DIR.glob("*/bank.yaml")
    bank = Bank.load(shipped.parent)
    bench = ReplyBench(model, prompt_sets()["eval"][:3], 16, seed=5, steered=bank.steered_layers, labels=True)
    plain, joy = Setting("plain"), slider_setting("joy", bank, {"joy": 1.0})
    others = [slider_setting(band, bank, {band: 1.0}) for band in ("sadness", "anger")]
    alone = bench.run([plain, joy], perplexity=False)
    beside = bench.run([plain, *others, joy], perplexity=False)
    for key in ("plain", "joy"):
        assert alone[key].tokens == beside[key].tokens  # the same replies (sampling rarely feels the rounding)
        assert np.array_equal(alone[key].labels, beside[key].labels), key


@pytest.mark.slow
def test_eval_rejects_bad_gains_and_bands(tmp_path):
    result = run_eqz("eval", "--gains", "0,lots", "-o", str(tmp_path))
    assert result.returncode != 0 and "--gains" in result.stderr and "Traceback" not in result.stderr
    result = run_eqz("eval", "--bands", "glee", "-o", str(tmp_path))
    assert result.returncode != 0 and "glee" in result.stderr and "joy" in result.stderr


def test_a_reply_set_keeps_only_the_samples_asked_for_with_their_judged_names():
    # three prompts x two samples, run prompt by prompt: sample 0 of each is joyful, sample 1 plain
    texts = ["I am so happy and delighted today.", "The table is near the door.",
             "What a happy, joyful morning!", "The bus goes to town.",
             "I feel happy and glad.", "The box is on the shelf."]
    labels = np.arange(48, dtype=float).reshape(6, 8)
    replies = ReplySet.scored([([1, 2, 3], text) for text in texts])
    replies.labels = labels
    joyful, plain = replies.samples_only(2, range(0, 1)), replies.samples_only(2, range(1, 2))
    assert joyful.texts == texts[0::2] and plain.texts == texts[1::2]
    assert np.array_equal(joyful.labels, labels[0::2]) and np.array_equal(plain.labels, labels[1::2])
    assert joyful.rates["joy"] > replies.rates["joy"] > plain.rates["joy"] == 0.0
    assert replies.samples_only(2, range(2)).rates == replies.rates
    # read as two prompts x three samples, the later replica is the last two of each prompt's three
    assert replies.samples_only(3, range(1, 3)).texts == [texts[1], texts[2], texts[4], texts[5]]
    with pytest.raises(ValueError, match="not whole prompts"):
        replies.samples_only(4, range(2))


def test_the_prompt_splits_share_no_prompt():
    splits = prompt_sets()
    assert len(splits["eval"]) == len(splits["test"]) == 16 and len(splits["calibration"]) == 10
    seen: dict[str, str] = {}
    for name, prompts in splits.items():
        for prompt in prompts:
            assert prompt.lower() not in seen, f"{prompt!r} is in {seen.get(prompt.lower())} and {name}"
            seen[prompt.lower()] = name
