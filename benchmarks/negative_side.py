"""What does -1 do to a band's own words, and which words move? For held sliders, three ways of going below zero.

A held slider's gain g clamps its band at g x its level L (4-6), so -1 holds it at -L, further below neutral than
any typical text reads; its -1 side was never calibrated (a vector band's is: `negative_ratio`). This scores
`eqz batch` files of the eval prompts (the development split) by the NRC lexicon as `eqz eval` does (pooled words per
100, lift over the unsteered rows smoothed by LIFT_PRIOR), with how often -1 lowers the band over redrawn prompts,
the fluency measures, and the band's words that -1 adds most. Files are named <tag>_<band>_<way>.jsonl:

    python -c "from eqz.eval import prompt_sets; print('\\n'.join(prompt_sets()['eval']))" > eval_prompts.txt
    common="eval_prompts.txt -k 4 --seed 11 -n 64 --temperature 0.7 -j 8"
    eqz batch $common -o s_base.jsonl
    eqz batch $common --set sadness=-1 -o s_sadness_held.jsonl     # the hold at -L, as shipped
    eqz batch $common --clamp sadness=-1 -o s_sadness_clamp1.jsonl # a clamp at one unit below neutral
    eqz vectors hold sadness off && eqz batch $common --set sadness=-1 -o s_sadness_vector.jsonl
    python benchmarks/negative_side.py s_base.jsonl s_*_*.jsonl --out docs/negative-side/smollm2-135m-instruct.json

(Gemma: the same with `-m gemma-3-270m-q4_k_m.gguf` and its bank copied from docs/banks into your data dir:
`vectors hold` changes the bank it holds in, so it needs a copy of its own, where rival_pull.py reads
EQZ_VECTORS=docs/banks as it is.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path: it holds the script being run
from lexicon_overlap import words_of
from report import batch_files_args

from eqz.bands import PRIMARIES
from eqz.eval import BOOTSTRAP_DRAWS, redrawn_prompts
from eqz.scoring import distinct2, emotion_scorer, lift, repeated_trigrams

scorer = emotion_scorer()


def replies_by_prompt(path: Path) -> dict[str, list[str]]:
    replies: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        replies.setdefault(row["id"], []).append(row["output"])
    return replies


def main() -> None:
    args = batch_files_args(__doc__, "<tag>_<band>_<way>.jsonl files, one setting each")
    unsteered = replies_by_prompt(args.unsteered)
    prompts = sorted(unsteered)
    base_counts = np.array([sum(scorer.word_counts(text) for text in unsteered[p]) for p in prompts])
    base_texts = [text for p in prompts for text in unsteered[p]]
    base_distinct = np.mean([distinct2(text) for text in base_texts])
    picks = redrawn_prompts(len(prompts), BOOTSTRAP_DRAWS)
    rows = []
    for path in args.steered:
        parts = path.stem.split("_")
        if path == args.unsteered or len(parts) != 3 or parts[1] not in PRIMARIES:
            continue
        band, way = parts[1:]
        own = PRIMARIES.index(band)
        steered = replies_by_prompt(path)
        if sorted(steered) != prompts or any(len(steered[p]) != len(unsteered[p]) for p in prompts):
            raise SystemExit(f"{path} does not hold the unsteered file's prompts and samples (a batch cut short?)")
        counts = np.array([sum(scorer.word_counts(text) for text in steered[p]) for p in prompts])
        texts = [text for p in prompts for text in steered[p]]
        rate, base = (scorer.rates_of(c.sum(axis=0))[own] for c in (counts, base_counts))
        redrawn = lift(scorer.rates_of(counts[picks].sum(axis=1))[:, own],
                       scorer.rates_of(base_counts[picks].sum(axis=1))[:, own])
        gained = words_of(texts, band) - words_of(base_texts, band)
        rows.append({"band": band, "way": way, "lift": round(lift(rate, base), 2),
                     "lowers_share": round(float(np.mean(redrawn < 1)), 2),
                     "words_per_100": [round(float(base), 2), round(float(rate), 2)],
                     "repeated_3grams": round(float(np.mean([repeated_trigrams(t) for t in texts])), 3),
                     "distinct_2_ratio": round(float(np.mean([distinct2(t) for t in texts]) / base_distinct), 2),
                     "words_gained": dict(gained.most_common(5)), "first_replies": texts[:2]})
    for row in sorted(rows, key=lambda r: (r["band"], r["way"])):
        print(f"{row['band']:13s} {row['way']:7s} lift {row['lift']:.2f}, lowers on {row['lowers_share']:.0%} of "
              f"redraws; words/100 {row['words_per_100'][0]:.2f} -> {row['words_per_100'][1]:.2f}; rep3 "
              f"{row['repeated_3grams']:.1%}; distinct-2 x{row['distinct_2_ratio']:.2f}; gains {row['words_gained']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"prompts": len(prompts), "replies_per_setting": len(base_texts),
                                        "settings": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
