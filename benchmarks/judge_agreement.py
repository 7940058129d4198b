"""A second opinion on the steering verdicts: does the unsteered model, as a judge, agree with the NRC lexicon on
which shipped bands move their own emotion at +1?

Held-out eval prompts (16 that neither training nor calibration used) x 1 sample x 48 tokens, every primary at +1
beside the unsteered replies (same seeds). Lexicon: the band's words per 100 words over the unsteered rate, and the
primary that rose most. Judge: each reply's mean log-probability when the unsteered model is asked for a primary
(its persona prompt) minus when asked to be neutral, in nats/token, lifted over the unsteered replies'; the primary
whose lift is largest. Caveat: the personas are the prompts the own-voice directions were made under, so for bands
whose source is "voice" the judge is not fully independent of the direction. Label judge (eqz.judge, what calibration
could use): how many times likelier the unsteered model names the primary as the reply's emotion; it shares no
prompt with either source. First, the label judge itself is checked on sentences of known emotion (the fresh
held-out set, tests/data/fresh_sentences.yaml): how often it ranks the true primary first against the set's mean.

    python benchmarks/judge_agreement.py [--model PATH] [--out FILE.json] [--only-sentences]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import NEUTRAL_PERSONA, PRIMARIES, primary_personas
from eqz.bank import find_bank
from eqz.engine import Model
from eqz.eval import ReplyBench, Setting, prompt_sets
from eqz.judge import LabelJudge
from eqz.models import resolve_model_path

SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "data" / "fresh_sentences.yaml"

SEED = 7
REPLY_TOKENS = 48


def agreement(model: Model) -> dict[str, dict]:
    bank = find_bank(model.info)
    bench = ReplyBench(model, prompt_sets()["eval"], REPLY_TOKENS, SEED, bank.steered_layers,
                       preferences=primary_personas(), labels=True)
    # judged under the neutral persona, which the preference reads anyway: no extra pass
    settings = [Setting("unsteered", judge=NEUTRAL_PERSONA)] + [
        Setting(band, bank.mix({band: 1.0}), judge=NEUTRAL_PERSONA) for band in PRIMARIES]
    results = bench.run(settings)
    plain = results.pop("unsteered")
    rows = {}
    for band, replies in results.items():
        lexicon = replies.lifts(plain)
        judge = {other: replies.preference[other] - plain.preference[other] for other in PRIMARIES}
        named = replies.judged_lifts(plain)
        rows[band] = {
            "source": bank.bands[band].source,
            "lexicon_own": round(lexicon[band], 2), "lexicon_most_lifted": max(lexicon, key=lexicon.get),
            "judge_own": round(judge[band], 3), "judge_most_lifted": max(judge, key=judge.get),
            "judge_own_over_mean": round(judge[band] - float(np.mean(list(judge.values()))), 3),
            "label_own": round(named[band], 2), "label_most_lifted": max(named, key=named.get),
            "label_clear": replies.judged_clear(band, plain),
            "example": replies.texts[0][:200],
        }
    return rows


def names_sentences(model: Model) -> dict:
    """The label judge on sentences of known emotion: how often the true primary leads, raw and against the set's
    mean (how the judge is read in use: as a lift over a baseline)."""
    sentences = yaml.safe_load(SENTENCES.read_text())
    judge = LabelJudge.for_model(model)
    truth = np.repeat(np.arange(len(PRIMARIES)), [len(sentences[band]) for band in PRIMARIES])
    scores = judge.scores(model, [model.tokenize(text, add_special=False) for band in PRIMARIES
                                  for text in sentences[band]])
    lifted = (scores - scores.mean(axis=0)).argmax(axis=1)
    return {"sentences": len(truth), "raw": round(float(np.mean(scores.argmax(axis=1) == truth)), 3),
            "against_mean": round(float(np.mean(lifted == truth)), 3),
            "per_band": {band: round(float(np.mean(lifted[truth == i] == i)), 2) for i, band in enumerate(PRIMARIES)}}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--out", help="also write the figures as JSON")
    parser.add_argument("--only-sentences", action="store_true", help="only check the label judge on the sentences")
    args = parser.parse_args()
    with Model(resolve_model_path(args.model)) as model:
        figures = {"sentences": names_sentences(model)}
        print(f"label judge on {SENTENCES.name}: {figures['sentences']}")
        if not args.only_sentences:
            figures["agreement"] = agreement(model)
    if "agreement" in figures:
        print("| band | source | lexicon own | lexicon most lifted | persona judge own (nats/token) | persona judge "
              "most lifted | label judge own | label judge most lifted |")
        print("|---|---|---|---|---|---|---|---|")
        for band, row in figures["agreement"].items():
            print(f"| {band} | {row['source']} | {row['lexicon_own']:.2f}x | {row['lexicon_most_lifted']} | "
                  f"{row['judge_own']:+.3f} | {row['judge_most_lifted']} | {row['label_own']:.2f}x | "
                  f"{row['label_most_lifted']} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(figures, handle, indent=1)


if __name__ == "__main__":
    main()
