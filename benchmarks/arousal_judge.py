"""Which scorer can read arousal, and do the axis sliders move it? Sentences of known arousal first.

NRC has no arousal words, so eqz's arousal score is the eight emotions' words weighted by their circumplex arousal
(scoring.on_axes), and its -1 "rose" on every SmolLM2 bank. Is that the slider or the scorer? Each sentence of
benchmarks/data/arousal_sentences.yaml (16 per quadrant: high/low arousal x positive/negative valence) is scored
three ways: the lexicon's weighting; the emotion judge's eight names (eqz.judge) weighted the same way; and the
unsteered model asked "Is the writer calm or excited?", log p(excited) - log p(calm) (AROUSAL_*). Figure: AUC of
high against low arousal (0.5 = chance), over all 64 and within each valence (a scorer that reads only valence
cannot pass there).

With --bank, the bank's valence and arousal sliders (or --sliders: a band of one's own is read on arousal; a/b
moves a up and b down together) at -1 and +1 against unsteered replies (the test split, 16 x 2 x 64, seed 9999):
the lexicon's rise (words per 100, as the pages) beside the emotion judge's, the eight names' probabilities
weighted by their circumplex valence or arousal, and the direct question's, each with the share of redrawn prompt
sets on which it keeps its sign; and, in the JSON, how far the judge's names moved on the other axis.
--prompts eval steers on the development split, to choose between constructions before the test split reads them.

    python benchmarks/arousal_judge.py [--model PATH] [--bank DIR [--sliders A,B] [--prompts eval]] [--out FILE.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import AXES, BANDS
from eqz.bank import Bank
from eqz.engine import Model
from eqz.eval import BOOTSTRAP_DRAWS, ReplyBench, Setting, prompt_sets, redrawn_prompts, slider_setting
from eqz.judge import LabelJudge
from eqz.models import resolve_model_path
from eqz.scoring import emotion_scorer, on_axes

SENTENCES = Path(__file__).resolve().parent / "data" / "arousal_sentences.yaml"
QUADRANTS = ("high_positive", "high_negative", "low_positive", "low_negative")
# the direct question, fixed before any figure was read
AROUSAL_QUESTION = "Text: {text}\n\nIs the writer calm or excited? Answer in one word."
AROUSAL_ANSWER = "The writer is"
AROUSAL_NAMES = ("calm", "excited")


def auc(high: np.ndarray, low: np.ndarray) -> float:
    """P(a high sentence scores above a low one), ties counting half."""
    above = (high[:, None] > low[None, :]).mean() + 0.5 * (high[:, None] == low[None, :]).mean()
    return round(float(above), 3)


def scores(model: Model, texts: list[str]) -> dict[str, np.ndarray]:
    tokens = [model.tokenize(text, add_special=False) for text in texts]
    arousal = LabelJudge.for_model(model, AROUSAL_QUESTION, AROUSAL_ANSWER, AROUSAL_NAMES).scores(model, tokens)
    names = LabelJudge.for_model(model).scores(model, tokens)
    scorer = emotion_scorer()
    lexicon = scorer.rates_of(np.array([scorer.word_counts(text) for text in texts]))[:, -1]
    return {"arousal judge": arousal[:, 1] - arousal[:, 0], "emotion judge, circumplex": on_axes(np.exp(names))[:, 1],
            f"{scorer.name} lexicon, circumplex": lexicon}


def _gains(slider: str, gain: float) -> dict[str, float]:
    """A slider's gains: "a/b" moves a up and b down together (a bipolar pair of one's own bands)."""
    up, _, down = slider.partition("/")
    return {up: gain, **({down: -gain} if down else {})}


def steer_axes(model: Model, bank: Bank, sliders: list[str], samples: int = 2, tokens: int = 64,
               seed: int = 9999, prompts: str = "test") -> dict:
    """Each slider at -1 and +1 against the unsteered replies, read on the axis it names (a band of one's own: on
    arousal): the lexicon's and the judge's rise, and how often each keeps its sign when the prompts are drawn
    again."""
    settings = [Setting("unsteered")] + [slider_setting((slider, gain), bank, _gains(slider, gain))
                                         for slider in sliders for gain in (-1.0, 1.0)]
    bench = ReplyBench(model, prompt_sets()[prompts], tokens, seed, bank.steered_layers, samples=samples, labels=True)
    results = bench.run(settings)
    base = results.pop("unsteered")
    rows = {"unsteered": {"examples": [text[:200] for text in base.texts[::samples][:3]]}}
    direct = LabelJudge.for_model(model, AROUSAL_QUESTION, AROUSAL_ANSWER, AROUSAL_NAMES)
    calm_or_excited = {key: direct.scores(model, replies.tokens) @ np.array([-1.0, 1.0])
                       for key, replies in [("unsteered", base), *results.items()]}
    scorer = emotion_scorer()
    picks = redrawn_prompts(len(bench.prompts), BOOTSTRAP_DRAWS)
    for (slider, gain), replies in results.items():
        axis = slider if slider in AXES else "arousal"
        other = AXES[1 - AXES.index(axis)]
        judged, crosstalk = (replies.judged_axis(a).reshape(-1, samples).mean(axis=1)
                             - base.judged_axis(a).reshape(-1, samples).mean(axis=1) for a in (axis, other))
        asked = (calm_or_excited[(slider, gain)] - calm_or_excited["unsteered"]).reshape(-1, samples).mean(axis=1)
        words = [scorer.rates_of(r.counts.reshape(-1, samples, r.counts.shape[1]).sum(axis=1)[picks].sum(axis=1))
                 [:, BANDS.index(axis)] for r in (replies, base)]
        sign = np.sign(gain)
        rows[f"{slider} {gain:+g}"] = {
            "lexicon_rise": round(replies.rates[axis] - base.rates[axis], 2),
            "lexicon_sign_holds": round(float(np.mean(sign * (words[0] - words[1]) > 0)), 2),
            "judge_rise": round(float(judged.mean()), 3),
            "judge_sign_holds": round(float(np.mean(sign * judged[picks].mean(axis=1) > 0)), 2),
            "arousal_judge_rise": round(float(asked.mean()), 3),
            "arousal_judge_sign_holds": round(float(np.mean(sign * asked[picks].mean(axis=1) > 0)), 2),
            f"judge_{other}_rise": round(float(crosstalk.mean()), 3),  # what it moves on the other axis
            "examples": [text[:200] for text in replies.texts[::samples][:3]]}  # the first three prompts' first replies
    return rows


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--bank", type=Path, help="also steer this bank's valence and arousal (see above)")
    parser.add_argument("--sliders", default=",".join(AXES),
                        help="the bank's sliders to steer; a band of your own is read on arousal, and a/b moves a up "
                        "and b down together")
    parser.add_argument("--prompts", default="test", choices=("eval", "test"),
                        help="the split steered on: test for figures, eval to choose between constructions")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    sentences = yaml.safe_load(SENTENCES.read_text())
    texts = [text for quadrant in QUADRANTS for text in sentences[quadrant]]
    quadrant_of = np.repeat(np.arange(len(QUADRANTS)), [len(sentences[q]) for q in QUADRANTS])
    with Model(resolve_model_path(args.model)) as model:
        figures = {"model": model.info.name, "sentences": len(texts), "scorers": {}}
        for name, values in scores(model, texts).items():
            by = {q: values[quadrant_of == i] for i, q in enumerate(QUADRANTS)}
            figures["scorers"][name] = {
                "all": auc(np.concatenate([by["high_positive"], by["high_negative"]]),
                           np.concatenate([by["low_positive"], by["low_negative"]])),
                "positive": auc(by["high_positive"], by["low_positive"]),
                "negative": auc(by["high_negative"], by["low_negative"]),
                "means": {q: round(float(v.mean()), 3) for q, v in by.items()}}
        if args.bank:
            figures["steered"] = steer_axes(model, Bank.load(args.bank), args.sliders.split(","),
                                             prompts=args.prompts)
    print(f"{figures['model']}: AUC of high against low arousal, {figures['sentences']} sentences")
    print("| scorer | all | within positive | within negative |")
    print("|---|---|---|---|")
    for name, row in figures["scorers"].items():
        print(f"| {name} | {row['all']:.3f} | {row['positive']:.3f} | {row['negative']:.3f} |")
    if "steered" in figures:
        print("| slider | lexicon rise (words/100) | sign holds | emotion judge rise (circumplex units) | sign holds "
              "| arousal judge rise (log-odds excited) | sign holds |")
        print("|---|---|---|---|---|---|---|")
        for name, row in figures["steered"].items():
            if name == "unsteered":  # its replies only, to read beside the steered ones
                continue
            print(f"| {name} | {row['lexicon_rise']:+.2f} | {row['lexicon_sign_holds']:.0%} | "
                  f"{row['judge_rise']:+.3f} | {row['judge_sign_holds']:.0%} | {row['arousal_judge_rise']:+.3f} | "
                  f"{row['arousal_judge_sign_holds']:.0%} |")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
