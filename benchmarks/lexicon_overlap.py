"""How much of a band's rival is the lexicon counting one word twice? NRC tags many words with several emotions
(29% of its joy words are surprise words too, 45% of fear words sadness words), so a band that adds its own words
also lifts the rivals that share them, and the rival with the smaller unsteered rate can out-lift it by ratio.

Generates the shipped bank's replies at +1 and unsteered on the held-out eval prompts (eval's seed and sizes) and
gives, per band, the verdict as the issue defines it beside one where the rivals are counted only on words the
lexicon does not also tag with the band's own emotion, and which words carry the rival's count. An explanation of
the acceptance figure, not a replacement for it.

    python benchmarks/lexicon_overlap.py [--samples 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
from collections import Counter

from eqz.bands import PRIMARIES
from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import CLEAR_LIFT, ReplyBench, Setting, prompt_sets
from eqz.models import default_model_path
from eqz.scoring import lift, nrc_categories, nrc_lexicon, words


def rates(texts: list[str], own: str | None = None) -> tuple[dict[str, float], dict[str, Counter]]:
    """Words per 100 of each primary and the words counted; with ``own``, a word tagged ``own`` counts for it
    alone."""
    table = nrc_lexicon()
    counted = {band: Counter() for band in PRIMARIES}
    total = 0
    for text in texts:
        for word in words(text):
            total += 1
            categories = nrc_categories(word, table)
            if own in categories:
                categories = frozenset({own})
            for band in PRIMARIES:
                if band in categories:
                    counted[band][word] += 1
    return {band: 100 * sum(counted[band].values()) / max(1, total) for band in PRIMARIES}, counted


def verdict(lifts: dict[str, float], band: str) -> tuple[str, bool]:
    rival = max((other for other in PRIMARIES if other != band), key=lifts.get)
    return rival, lifts[band] >= CLEAR_LIFT and lifts[band] > lifts[rival]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if nrc_lexicon() is None:
        parser.error("this measures the NRC lexicon: install it with  pip install 'eqz[lexicon]'")
    with Model(default_model_path()) as model:
        bank = require_bank(model.info)
        bench = ReplyBench(model, prompt_sets()["eval"], args.max_tokens, 4321, bank.steered_layers,
                           samples=args.samples)
        settings = [Setting("unsteered")] + [Setting(band, bank.mix({band: 1.0})) for band in PRIMARIES]
        texts = {key: replies.texts for key, replies in bench.run(settings, perplexity=False).items()}
    print("| band | own lift | top rival, all words | clear | top rival, words not tagged own | clear | "
          "the rival's words that are also the band's |")
    print("|---|---|---|---|---|---|---|")
    clear = {"all": 0, "apart": 0}
    for band in PRIMARIES:
        base, _ = rates(texts["unsteered"])
        steered, counted = rates(texts[band])
        lifts = {other: lift(steered[other], base[other]) for other in PRIMARIES}
        base_apart, _ = rates(texts["unsteered"], band)
        steered_apart, _ = rates(texts[band], band)
        lifts_apart = {other: lift(steered_apart[other], base_apart[other]) for other in PRIMARIES}
        rival, is_clear = verdict(lifts, band)
        rival_apart, is_clear_apart = verdict(lifts_apart, band)
        clear["all"] += is_clear
        clear["apart"] += is_clear_apart
        table = nrc_lexicon()
        shared = sum(n for word, n in counted[rival].items() if band in nrc_categories(word, table))
        common = ", ".join(word for word, _ in counted[rival].most_common(5))
        print(f"| {band} | {lifts[band]:.2f}x | {rival} {lifts[rival]:.2f}x | {'yes' if is_clear else 'no'} | "
              f"{rival_apart} {lifts_apart[rival_apart]:.2f}x | {'yes' if is_clear_apart else 'no'} | "
              f"{shared} of {sum(counted[rival].values())} ({common}) |")
    print(f"\nclear: {clear['all']}/8 as the issue counts; {clear['apart']}/8 with rivals counted on words not "
          "tagged with the band's own emotion")


if __name__ == "__main__":
    main()
