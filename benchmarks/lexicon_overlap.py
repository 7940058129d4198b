"""How much of a band's rival is the lexicon counting one word twice? NRC tags many words with several emotions
(29% of its joy words are surprise words too, 45% of fear words sadness words), so a band that adds its own words
also lifts the rivals that share them, and the rival with the smaller unsteered rate can out-lift it by ratio.

Prints the lexicon's shared tags. Then it generates the shipped bank's replies at +1 (as the sliders apply it: held
bands hold their level) and unsteered on the held-out eval prompts (or the test prompts; eval's seed and sizes) and
gives, per band, the verdict as the issue defines it beside one where the rivals are counted only on words the
lexicon does not also tag with the band's own emotion, and which words carry the rival's count. With ``--minus``
also -1, and which of the band's own words its -1 replies carry: a band whose -1 reads as "not lowered" on a few
words per hundred. An explanation of the acceptance figures, not a replacement for them.

    python benchmarks/lexicon_overlap.py [--samples 2] [--max-tokens 64] [--prompts test] [--minus]
"""

from __future__ import annotations

from collections import Counter

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import PRIMARIES
from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import EVAL_SEED, ReplyBench, ReplySet, Setting, prompt_sets, slider_setting
from eqz.models import resolve_model_path
from eqz.scoring import nrc_categories, nrc_lexicon, words


def rates_apart(texts: list[str], own: str) -> dict[str, float]:
    """Words per 100 of each primary, where a word the lexicon tags ``own`` counts for ``own`` alone."""
    table = nrc_lexicon()
    counts, total = Counter(), 0
    for text in texts:
        for word in words(text):
            total += 1
            categories = nrc_categories(word, table)
            counts.update({own} if own in categories else categories)
    return {band: 100 * counts[band] / max(1, total) for band in PRIMARIES}


def words_of(texts: list[str], band: str) -> Counter:
    """How often each word the lexicon tags ``band`` occurs in ``texts``."""
    table = nrc_lexicon()
    return Counter(word for text in texts for word in words(text) if band in nrc_categories(word, table))


def shared_tags() -> list[str]:
    """Markdown rows: the share of each primary's lexicon words that also carry another primary's tag."""
    tags = list(nrc_lexicon().values())
    rows = ["| words of / also tagged | " + " | ".join(PRIMARIES) + " |", "|---|" + "---|" * len(PRIMARIES)]
    for band in PRIMARIES:
        own = [categories for categories in tags if band in categories]
        shares = ["" if other == band else f"{sum(other in c for c in own) / len(own):.0%}" for other in PRIMARIES]
        rows.append(f"| {band} ({len(own)}) | " + " | ".join(shares) + " |")
    return rows


def rival(lifts: dict[str, float], band: str) -> str:
    return max((other for other in PRIMARIES if other != band), key=lifts.get)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", choices=("eval", "test"), default="eval")
    parser.add_argument("--minus", action="store_true",
                        help="also -1, and which of the band's own words its -1 replies still carry")
    args = parser.parse_args()
    if nrc_lexicon() is None:
        parser.error("this measures the NRC lexicon: install it with  pip install 'eqz[lexicon]'")
    print("\n".join(shared_tags()) + "\n")
    with Model(resolve_model_path(None)) as model:
        bank = require_bank(model.info)
        bench = ReplyBench(model, prompt_sets()[args.prompts], args.max_tokens, EVAL_SEED, bank.steered_layers,
                           samples=args.samples)
        gains = (1.0, -1.0) if args.minus else (1.0,)
        settings = [Setting("unsteered")] + [slider_setting((band, gain), bank, {band: gain})
                                             for band in PRIMARIES for gain in gains]
        results = bench.run(settings, perplexity=False)
    baseline = results["unsteered"]
    table = nrc_lexicon()
    print("| band | own lift | top rival, all words | clear | top rival, words not tagged own | clear | "
          "the rival's words that are also the band's |")
    print("|---|---|---|---|---|---|---|")
    clear = {"all": 0, "apart": 0}
    for band in PRIMARIES:
        replies = results[(band, 1.0)]
        apart = ReplySet([], rates=rates_apart(replies.texts, band))
        baseline_apart = ReplySet([], rates=rates_apart(baseline.texts, band))
        lifts, lifts_apart = replies.lifts(baseline), apart.lifts(baseline_apart)
        top, top_apart = rival(lifts, band), rival(lifts_apart, band)
        is_clear, is_clear_apart = replies.clear(band, baseline), apart.clear(band, baseline_apart)
        clear["all"] += is_clear
        clear["apart"] += is_clear_apart
        counted = words_of(replies.texts, top)
        shared = sum(n for word, n in counted.items() if band in nrc_categories(word, table))
        common = ", ".join(word for word, _ in counted.most_common(5))
        print(f"| {band} | {lifts[band]:.2f}x | {top} {lifts[top]:.2f}x | {'yes' if is_clear else 'no'} | "
              f"{top_apart} {lifts_apart[top_apart]:.2f}x | {'yes' if is_clear_apart else 'no'} | "
              f"{shared} of {sum(counted.values())} ({common}) |")
    print(f"\nclear: {clear['all']}/8 as the issue counts; {clear['apart']}/8 with rivals counted on words not "
          "tagged with the band's own emotion")
    if args.minus:
        print("\n" + "\n".join(minus_rows(results)))


def minus_rows(results: dict) -> list[str]:
    """Markdown rows: per band, its own words unsteered and at -1, and the words that carry each count."""
    baseline = results["unsteered"]
    rows = ["| band | own words/100 unsteered | at -1 | lowered | words at -1 | words unsteered |", "|---|" + "---|" * 5]
    for band in PRIMARIES:
        minus = results[(band, -1.0)]
        top = {name: ", ".join(f"{word} {n}" for word, n in words_of(replies.texts, band).most_common(5))
               for name, replies in (("minus", minus), ("unsteered", baseline))}
        lowered = minus.rates[band] < baseline.rates[band]  # as the steering pages' "-1 lowers"
        rows.append(f"| {band} | {baseline.rates[band]:.2f} | {minus.rates[band]:.2f} | {'yes' if lowered else 'no'} | "
                    f"{top['minus']} | {top['unsteered']} |")
    return rows


if __name__ == "__main__":
    main()
