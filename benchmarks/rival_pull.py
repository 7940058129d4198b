"""Does pulling a band's lexicon rival down with a second slider make the band the most lifted of the eight?

The pages' misses are often a rival's words rising more than the band's own (joy +1: surprise's; fear +1:
sadness's). A user's way to fight that is a second slider below zero. This scores `eqz batch` files of the eval
prompts (the development split) by the NRC lexicon, as `eqz eval` does (pooled words per 100, lift over the
unsteered file's rows, smoothed by LIFT_PRIOR), with the fluency measures calibration bounds:

    python -c "from eqz.eval import prompt_sets; print('\\n'.join(prompt_sets()['eval']))" > eval_prompts.txt
    common="eval_prompts.txt -k 4 --seed 11 -n 64 --temperature 0.7 -j 8"
    eqz batch $common -o base.jsonl
    eqz batch $common --set joy=1 --sweep surprise=-1:0:3 -o joy.jsonl
    eqz batch $common --set fear=1 --sweep sadness=-1:0:3 -o fear.jsonl
    python benchmarks/rival_pull.py base.jsonl joy.jsonl fear.jsonl --out docs/rival-pull/smollm2-135m-instruct.json

(Gemma: the same with `-m gemma-3-270m-q4_k_m.gguf` and EQZ_VECTORS=docs/banks.)
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path: it holds the script being run
from report import batch_files_args

from eqz.bands import PRIMARIES
from eqz.scoring import distinct2, emotion_scorer, lift, repeated_trigrams

scorer = emotion_scorer()


def settings_in(path: Path) -> dict[str, list[str]]:
    """Replies per slider setting ("joy=1, surprise=-0.5"; "" unsteered), in the file's order."""
    replies = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        replies[", ".join(f"{band}={gain:g}" for band, gain in row["sliders"].items() if gain)].append(row["output"])
    return replies


def primary_rates(texts: list[str]) -> np.ndarray:
    return scorer.rates_of(sum(scorer.word_counts(text) for text in texts))[: len(PRIMARIES)]


def main() -> None:
    args = batch_files_args(__doc__, "`eqz batch` files of the settings to score")
    (unsteered,) = settings_in(args.unsteered).values()
    base = primary_rates(unsteered)
    base_distinct = np.mean([distinct2(text) for text in unsteered])
    rows = []
    for path in args.steered:
        for setting, texts in settings_in(path).items():
            lifts = {band: round(lift(rate, baseline), 2)
                     for band, rate, baseline in zip(PRIMARIES, primary_rates(texts), base)}
            rows.append({"setting": setting, "replies": len(texts), "lifts": lifts,
                         "most_lifted": max(lifts, key=lifts.get),
                         "repeated_3grams": round(float(np.mean([repeated_trigrams(t) for t in texts])), 3),
                         "distinct_2_ratio": round(float(np.mean([distinct2(t) for t in texts]) / base_distinct), 2),
                         "first_replies": texts[:2]})
    for row in rows:
        top = sorted(row["lifts"].items(), key=lambda item: -item[1])[:3]
        print(f"{row['setting']:28s} {', '.join(f'{band} {value:.2f}x' for band, value in top):45s} "
              f"rep3 {row['repeated_3grams']:.1%} distinct-2 x{row['distinct_2_ratio']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        words = {band: round(float(rate), 2) for band, rate in zip(PRIMARIES, base)}
        args.out.write_text(json.dumps({"unsteered_words_per_100": words, "settings": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
