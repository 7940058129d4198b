"""eqz eval: the scorers on fixed texts with known answers, and a tiny eval run end to end on the real model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from eqz.bands import BANDS, CIRCUMPLEX
from eqz.eval import ReplySet
from eqz.scoring import distinct2, lexicon_scores, perplexity, repeated_trigrams, words

from .conftest import run_eqz


def test_words_keep_contractions_and_drop_punctuation():
    assert words("It's GREAT -- isn't it? 42 cats.") == ["it's", "great", "isn't", "it", "cats"]


def test_lexicon_scores_count_band_words_per_hundred_words():
    scores = lexicon_scores("I am so happy and afraid today, truly.")  # 8 words: one joy word, one fear word
    assert set(scores) == set(BANDS)
    assert scores["joy"] == pytest.approx(12.5)
    assert scores["fear"] == pytest.approx(12.5)
    assert all(scores[band] == 0 for band in ("trust", "surprise", "sadness", "disgust", "anger", "anticipation"))
    assert scores["valence"] == pytest.approx(12.5 * (CIRCUMPLEX["joy"][0] + CIRCUMPLEX["fear"][0]))
    assert scores["arousal"] == pytest.approx(12.5 * (CIRCUMPLEX["joy"][1] + CIRCUMPLEX["fear"][1]))


def test_lexicon_scores_of_neutral_or_empty_text_are_zero():
    assert all(value == 0 for value in lexicon_scores("The train leaves at nine from platform four.").values())
    assert all(value == 0 for value in lexicon_scores("").values())


def test_repeated_trigrams_and_distinct_bigrams():
    assert repeated_trigrams("a b c a b c") == pytest.approx(0.25)  # abc bca cab abc: one of four repeats
    assert repeated_trigrams("one two three four") == 0
    assert repeated_trigrams("too short") == 0
    assert distinct2("a b a b") == pytest.approx(2 / 3)  # ab ba ab
    assert distinct2("word") == 1.0


def test_perplexity_is_exp_of_mean_negative_log_probability():
    assert perplexity(np.log([0.5, 0.5, 0.5])) == pytest.approx(2.0)
    assert perplexity(np.log([1.0])) == pytest.approx(1.0)
    assert math.isnan(perplexity(np.zeros(0)))


def test_fluency_bounds_apply_to_perplexity_ratio_and_repeats():
    baseline = ReplySet(texts=[""], nll=1.0)
    assert ReplySet(texts=[""], nll=1.0 + math.log(1.9), repeat=0.1).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0 + math.log(2.1), repeat=0.1).fluent(baseline)
    assert not ReplySet(texts=[""], nll=1.0, repeat=0.25).fluent(baseline)
    # calibration's margin tightens both bounds: 1.9x is outside 1 + 0.75 * (2 - 1) = 1.75x
    assert not ReplySet(texts=[""], nll=1.0 + math.log(1.9)).fluent(baseline, margin=0.75)


def test_tiny_eval_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe a kitchen table.\nWhat is a bus timetable?\nExplain how to water a plant.\n")
    out = tmp_path / "out"
    result = run_eqz("eval", "--bands", "joy,sadness", "--gains", "0,1", "--tokens", "16",
                     "--prompts", str(prompts), "-o", str(out), "--plot")
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "eval.json").read_text())
    assert data["prompts"] == 3 and data["reply_tokens"] == 16
    rows = {(row["band"], row["gain"]): row for row in data["rows"]}
    assert set(rows) == {("joy", 0.0), ("joy", 1.0), ("sadness", 0.0), ("sadness", 1.0)}
    # gain 0 is the shared unsteered baseline: perplexity ratio exactly 1
    assert rows[("joy", 0.0)]["ppl_ratio"] == 1.0 and rows[("joy", 0.0)]["example"] == rows[("sadness", 0.0)]["example"]
    # the slider moves the model's own readout of its reply the way it is named
    assert rows[("joy", 1.0)]["readout"] > rows[("joy", 0.0)]["readout"]
    assert rows[("sadness", 1.0)]["readout"] > rows[("sadness", 0.0)]["readout"]
    assert set(rows[("joy", 1.0)]["crosstalk"]) == set(BANDS) - {"joy"}
    with (out / "eval.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (out / "dose_response.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "joy" in result.stdout and "sadness" in result.stdout


def test_eval_rejects_bad_gains_and_bands(tmp_path):
    result = run_eqz("eval", "--gains", "0,lots", "-o", str(tmp_path))
    assert result.returncode != 0 and "--gains" in result.stderr and "Traceback" not in result.stderr
    result = run_eqz("eval", "--bands", "glee", "-o", str(tmp_path))
    assert result.returncode != 0 and "glee" in result.stderr and "joy" in result.stderr
