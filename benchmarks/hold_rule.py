"""Would `eqz train --hold`'s rule have chosen well? Reads stored runs, runs nothing.

The rule (train.held_level) sees only the calibration prompts: per primary, the level calibration's rule picks in a
clamp screen (clamp_steering.chosen_rows) is held where its expected verdicts (the lexicon's share of redrawn prompts
plus the judge's) beat the slider's at +1 on the same prompts. This prints its choice, then the figures of that mix,
of a hand choice and of either way everywhere on held-out runs that measured both ways per band (each band's row is
measured alone, so a mix takes each band's row from the way it names).

    python benchmarks/hold_rule.py --screen docs/clamp-steering/smollm2-screen.json \
        --slider docs/clamp-steering/smollm2-screen-slider.json --hand joy,surprise,sadness,disgust,anticipation \
        docs/clamp-steering/smollm2-heldout.json docs/clamp-steering/smollm2-third.json
"""

from __future__ import annotations

import json
from pathlib import Path

from clamp_steering import chosen_rows  # benchmarks/ is on sys.path: it holds the script being run

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import PRIMARIES


def expected_clear(row: dict) -> float:
    return row["clear_share"] + row["judged_clear_share"]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--screen", type=Path, required=True, help="clamp levels on the calibration prompts")
    parser.add_argument("--slider", type=Path, required=True, help="the slider at +1 on the same prompts and seed")
    parser.add_argument("--hand", default="", help="a hand-chosen set of held bands to compare with")
    parser.add_argument("heldout", type=Path, nargs="+", help="runs with both ways per band (--ways slider,clamp)")
    args = parser.parse_args()
    clamp = chosen_rows(args.screen)
    slider = {row["band"]: row for row in json.loads(args.slider.read_text())["rows"] if row["gain"] > 0}
    rule = {band for band in PRIMARIES if expected_clear(clamp[band]) > expected_clear(slider[band])}
    for band in PRIMARIES:
        print(f"{band:>12}: held {clamp[band]['gain']:g} expects {expected_clear(clamp[band]):.2f}, the vector "
              f"{expected_clear(slider[band]):.2f} -> {'hold' if band in rule else 'vector'}")
    mixes = {"vector everywhere": set(), "held everywhere": set(PRIMARIES), "by hand": set(filter(None, args.hand.split(","))),
             "by the rule": rule}
    for run in args.heldout:
        data = json.loads(run.read_text())
        rows = {(row["way"], row["band"]): row for row in data["rows"] if row["gain"] > 0}
        print(f"{run.name} ({data['prompts']}, {data['prompt_count']} x {data['samples']} x {data['max_tokens']})")
        for name, held in mixes.items():
            mix = [rows[("clamp" if band in held else "slider", band)] for band in PRIMARIES]
            print(f"  {name:>17}: lexicon {sum(r['clear'] for r in mix)}/8 ({sum(r['clear_share'] for r in mix):.1f}), "
                  f"judge {sum(r['judged_clear'] for r in mix)}/8 ({sum(r['judged_clear_share'] for r in mix):.1f}), "
                  f"fluent {sum(r['fluent'] for r in mix)}/8")


if __name__ == "__main__":
    main()
