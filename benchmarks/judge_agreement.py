"""A second opinion on the steering verdicts: does the unsteered model, as a judge, agree with the NRC lexicon on
which shipped bands move their own emotion at +1?

Held-out eval prompts (16 that neither training nor calibration used) x 1 sample x 48 tokens, every primary at +1
beside the unsteered replies (same seeds). Lexicon: the band's words per 100 words over the unsteered rate, and the
primary that rose most. Judge: each reply's mean log-probability when the unsteered model is asked for a primary
(its persona prompt) minus when asked to be neutral, in nats/token, lifted over the unsteered replies'; the primary
whose lift is largest. Caveat: the personas are the prompts the own-voice directions were made under, so for bands
whose source is "voice" the judge is not fully independent of the direction.

    python benchmarks/judge_agreement.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from eqz.bands import NEUTRAL_PERSONA, PRIMARIES, primary_personas
from eqz.bank import find_bank
from eqz.engine import Model
from eqz.eval import ReplyBench, Setting, prompt_sets
from eqz.models import default_model_path

SEED = 7
REPLY_TOKENS = 48


def agreement(model: Model) -> dict[str, dict]:
    bank = find_bank(model.info)
    bench = ReplyBench(model, prompt_sets()["eval"], REPLY_TOKENS, SEED, bank.steered_layers,
                       preferences=primary_personas())
    # judged under the neutral persona, which the preference reads anyway: no extra pass
    settings = [Setting("unsteered", judge=NEUTRAL_PERSONA)] + [
        Setting(band, bank.mix({band: 1.0}), judge=NEUTRAL_PERSONA) for band in PRIMARIES]
    results = bench.run(settings)
    plain = results.pop("unsteered")
    rows = {}
    for band, replies in results.items():
        lexicon = replies.lifts(plain)
        judge = {other: replies.preference[other] - plain.preference[other] for other in PRIMARIES}
        rows[band] = {
            "source": bank.bands[band].source,
            "lexicon_own": round(lexicon[band], 2), "lexicon_most_lifted": max(lexicon, key=lexicon.get),
            "judge_own": round(judge[band], 3), "judge_most_lifted": max(judge, key=judge.get),
            "judge_own_over_mean": round(judge[band] - float(np.mean(list(judge.values()))), 3),
            "example": replies.texts[0][:200],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()
    with Model(default_model_path()) as model:
        rows = agreement(model)
    print("| band | source | lexicon own | lexicon most lifted | judge own (nats/token) | judge most lifted |")
    print("|---|---|---|---|---|---|")
    for band, row in rows.items():
        print(f"| {band} | {row['source']} | {row['lexicon_own']:.2f}x | {row['lexicon_most_lifted']} | "
              f"{row['judge_own']:+.3f} | {row['judge_most_lifted']} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
