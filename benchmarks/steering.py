"""How clearly each slider moves the text, against asking for the emotion in the prompt: the bank v2 figures.

Runs `eqz eval`'s measurement (eqz.eval.evaluate) on the test prompts (16 that neither training, calibration nor
any design choice used; `--prompts eval` for the development split), scored by the NRC Emotion Lexicon, and
writes docs/steering-<model>.md: a table per model with the acceptance criteria, and three real replies per band
at 0 / +1 / +2 so a reader can judge fluency.

    python benchmarks/steering.py [--model PATH] [--samples 2] [--max-tokens 64] [--bank DIR] [--prompts test]
    python benchmarks/steering.py --bank DIR --report docs/eval-<bank>/eval.json   # the page again, no generating

The test split's page is docs/steering-<bank>.md (outputs in docs/eval-<bank>/); the eval split's, the development
set, docs/steering-<bank>-eval.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import BANDS, PRIMARIES
from eqz.bank import Bank, require_bank
from eqz.engine import Model
from eqz.eval import (CLEAR_AXIS_RISE, CLEAR_LIFT, MAX_PPL_RATIO, TEXT_BOUNDS, EvalResult, evaluate, prompt_sets,
                      record, write_outputs)
from eqz.models import resolve_model_path
from eqz.scoring import LIFT_PRIOR

DOCS = Path(__file__).resolve().parent.parent / "docs"


def verdicts(result) -> dict[str, dict]:
    """Per band: what the acceptance asks of it, measured."""
    out = {}
    for band in result.bands:
        rows = {row["gain"]: row for row in result.table(band)}
        zero, up, down = rows[0.0], rows.get(1.0), rows.get(-1.0)
        prompted = result.prompting(band)
        both = result.asked_and_steered(band)
        entry = {
            "effect_at_1": up["effect"],
            "effect_at_2": rows[2.0]["effect"] if 2.0 in rows else None,
            "fluent_at_2": rows[2.0]["fluent"] if 2.0 in rows else None,
            "most_lifted_at_1": up["most_lifted"],
            "clear_at_1": up["clear"],
            "clear_share_at_1": up.get("clear_share"),
            "lowered_at_-1": None if down is None else down["words_per_100"] < zero["words_per_100"]
            if band in PRIMARIES else down["effect"] < 0,
            "readout_rises": down["readout"] < zero["readout"] < up["readout"]
            if down is not None and all("readout" in row for row in (down, zero, up)) else None,  # unmetered: -
            "repeated_3grams_at_1": up["repeated_3grams"],
            "distinct_ratio_at_1": round(up["distinct_2"] / zero["distinct_2"], 3) if zero["distinct_2"] else None,
            "ppl_ratio_at_1": up.get("ppl_ratio"),
            "within_bounds_at_1": up["fluent"],  # every bound, perplexity under the model asked for the band too
            "prompt_only_effect": prompted["effect"] if prompted else None,
            "prompt_only_clear": prompted["clear"] if prompted else None,
            "prompt_only_clear_share": prompted.get("clear_share") if prompted else None,
            "asked_at_1_effect": both["effect"] if both else None,
            "asked_at_1_clear": both["clear"] if both else None,
            "asked_at_1_clear_share": both.get("clear_share") if both else None,
            "asked_at_1_fluent": both["fluent"] if both else None,
            "asked_at_1_ppl_ratio": both.get("ppl_ratio") if both else None,
        }
        if "judged_effect" in up:  # the unsteered model as judge (primaries)
            entry.update({
                "judged_effect_at_1": up["judged_effect"], "judged_most_lifted_at_1": up["judged_most_lifted"],
                "judged_clear_at_1": up["judged_clear"], "judged_clear_share_at_1": up["judged_clear_share"],
                "judged_effect_at_-1": down["judged_effect"] if down else None,
                "judged_effect_at_2": rows[2.0]["judged_effect"] if 2.0 in rows else None,
                "judged_share_at_0": zero.get("judged_share"),
                "prompt_only_judged_effect": prompted["judged_effect"] if prompted else None,
                "prompt_only_judged_clear": prompted["judged_clear"] if prompted else None,
                "prompt_only_judged_clear_share": prompted["judged_clear_share"] if prompted else None,
                "asked_at_1_judged_effect": both["judged_effect"] if both else None,
                "asked_at_1_judged_clear": both["judged_clear"] if both else None,
                "asked_at_1_judged_clear_share": both["judged_clear_share"] if both else None,
            })
        out[band] = entry
    return out


def _yes_no(verdict: bool | None) -> str:
    return "-" if verdict is None else "yes" if verdict else "no"


def _asked_counts(figures: dict, bands: list[str], clear_key: str, share_key: str) -> tuple[str, str]:
    """The prompt-and-+1 parts of a headline (how many clear, of them within the fluency bounds, how many expected),
    empty for a run without them."""
    if all(figures[b][clear_key] is None for b in bands):
        return "", ""
    expected = sum(figures[b][share_key] or 0 for b in bands)
    return (f"; prompt and +1: {_clear_of(figures, bands, clear_key, 'asked_at_1_fluent')}",
            f", {expected:.1f}/{len(bands)} prompt and +1")


def _clear_of(figures: dict, bands: list[str], clear_key: str, fluent_key: str) -> str:
    """'k/n' clear, and how many of those replies stay within every fluency bound (older runs: not said)."""
    clear = [b for b in bands if figures[b][clear_key]]
    if any(figures[b].get(fluent_key) is None for b in clear):
        return f"{len(clear)}/{len(bands)}"
    return f"{len(clear)}/{len(bands)} ({sum(bool(figures[b][fluent_key]) for b in clear)} of them fluent)"


def _marked(effect: float | None, clear: bool | None) -> str:
    """An effect in a table cell, * where it is clear; - where it was not measured."""
    return "-" if effect is None else f"{effect:.2f}" + (" *" if clear else "")


def _asked_cell(f: dict, effect_key: str, clear_key: str) -> str:
    """The prompt-and-+1 effect, with its perplexity ratio where the replies leave the fluency bounds."""
    cell = _marked(f[effect_key], f[clear_key])
    if f.get("asked_at_1_fluent") is False:
        ppl = f.get("asked_at_1_ppl_ratio")
        cell += f" (not fluent{f': ppl {ppl:.1f}x' if ppl is not None else ''})"
    return cell


def _at_two(effect: float | None, fluent: bool | None) -> str:
    """An effect at +2, marked where those replies leave the fluency bounds (+2 is past calibration's choice)."""
    return "-" if effect is None else f"{effect:.2f}" + (" (not fluent)" if fluent is False else "")


def _prompts_said(result) -> str:
    """Which prompts the replies answer, and what that split has and has not been used for."""
    if result.prompt_set == "test":
        return (f"{result.prompts} test prompts (written after every design choice was made: neither training, "
                "calibration nor any choice saw them)")
    return (f"{result.prompts} held-out prompts of the eval split (neither training nor calibration saw them; "
            "changes to eqz were kept or dropped on their figures, so they are a development set)")


def markdown(model_name: str, bank: Bank, result, figures: dict) -> str:
    primaries = [b for b in PRIMARIES if b in figures]
    clear = _clear_of(figures, primaries, "clear_at_1", "within_bounds_at_1")
    lifted = sum(figures[b]["effect_at_1"] >= CLEAR_LIFT for b in primaries)
    prompt_clear = sum(bool(figures[b]["prompt_only_clear"]) for b in primaries)
    expected = sum(figures[b]["clear_share_at_1"] or 0 for b in primaries)
    prompt_expected = sum(figures[b]["prompt_only_clear_share"] or 0 for b in primaries)
    asked = _asked_counts(figures, primaries, "asked_at_1_clear", "asked_at_1_clear_share")
    lines = [
        f"# Steering figures: {model_name}",
        "",
        f"Written by `python benchmarks/steering.py`: {_prompts_said(result)} x {result.samples} samples x "
        f"{result.reply_tokens} tokens, temperature 0.7, "
        f"scored by the {result.scorer} lexicon (shares nothing with the bank). Effect = the band's own emotion "
        f"words over the unsteered replies' (x; smoothed by {LIFT_PRIOR:g} words/100); for valence, the rise in "
        "positive-minus-negative words per 100; for arousal, the rise in the eight primaries' rates weighted by "
        "their circumplex arousal (NRC has no arousal words). *Clear* = effect >= 2x and the most lifted of the "
        f"eight (valence and arousal: a rise of at least {CLEAR_AXIS_RISE:g} word per 100). +2 is past "
        "calibration's choice: its cells say where those replies leave the fluency bounds. Prompt only = no vector, "
        "the emotion asked for in the system prompt; prompt and +1 = asked for and the slider at +1 (does the "
        "slider add to asking?). *Fluent* = inside every bound calibration keeps to: "
        f"{TEXT_BOUNDS}, perplexity under the model asked for the band <= {MAX_PPL_RATIO:g}x theirs. *Holds* = how "
        f"often the band is clear when the {result.prompts} prompts are drawn again with replacement (each with its "
        "samples, the same draw for steered and unsteered replies): how far a verdict is from this prompt set's "
        "noise." + (" *Held L* (source column): gain g holds the band's component at g x L (meter units) at every "
                    "steered layer instead of adding its vector (`eqz vectors hold`; docs/steering-limits.md "
                    "section 10); its bank check is the level's, on the calibration prompts."
                    if bank.holds_any else ""),
        "",
        f"**Primaries clear at +1: {clear}**; lifted >= 2x: {lifted}/{len(primaries)}; "
        f"prompting only: {prompt_clear}/{len(primaries)} clear{asked[0]}. "
        f"Expected over redrawn prompt sets (the sum of *holds*): {expected:.1f}/{len(primaries)} at +1, "
        f"{prompt_expected:.1f}/{len(primaries)} prompting only{asked[1]}.",
        "",
        "| band | source | effect +1 | most lifted +1 | clear +1 | holds +1 | effect +2 | -1 lowers | readout rises | "
        "rep3 +1 | distinct-2 +1 (x unsteered) | ppl +1 (asked) | prompt only | prompt and +1 | bank check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for band in result.bands:
        f = figures[band]
        entry = bank.bands[band]
        two = _at_two(f["effect_at_2"], f.get("fluent_at_2"))
        prompted = f"{f['prompt_only_effect']:.2f}" if f["prompt_only_effect"] is not None else "-"
        both = _asked_cell(f, "asked_at_1_effect", "asked_at_1_clear")
        ppl = f"{f['ppl_ratio_at_1']:.2f}" if f["ppl_ratio_at_1"] is not None else "-"
        share = f"{f['clear_share_at_1']:.0%}" if f["clear_share_at_1"] is not None else "-"
        check = ", ".join(bank.trained_problems(band)) or ("ok" if entry.direction_ok is not None else "-")
        source = (entry.source or "-") + (f", held {entry.hold:g}" if entry.hold is not None else "")
        lines.append(
            f"| {band} | {source} | {f['effect_at_1']:.2f} | {f['most_lifted_at_1']} | "
            f"{'yes' if f['clear_at_1'] else 'no'} | {share} | {two} | {_yes_no(f['lowered_at_-1'])} | "
            f"{_yes_no(f['readout_rises'])} | {f['repeated_3grams_at_1']:.1%} | "
            f"{f['distinct_ratio_at_1']:.2f} | {ppl} | {prompted} | {both} | {check} |"
        )
    lines += gained_table(result, primaries)
    lines += judge_table(figures, primaries, result.prompts)
    lines += ["", "## Crosstalk", "",
              "Readout change of every band (the unsteered model reading the replies) when one band is at +1:", "",
              "| +1 on / readout of | " + " | ".join(b[:5] for b in result.bands) + " |",
              "|---|" + "---|" * len(result.bands)]
    for band in result.bands:
        rows = {row["gain"]: row for row in result.table(band)}
        own = rows[1.0].get("readout", 0.0) - rows[0.0].get("readout", 0.0)
        cells = [f"{own:+.2f}" if other == band else f"{rows[1.0]['crosstalk'].get(other, 0.0):+.2f}"
                 for other in result.bands]
        lines.append(f"| {band} | " + " | ".join(cells) + " |")
    lines += ["", "## Replies (the first three held-out prompts)", ""]
    for band in result.bands:
        rows = {row["gain"]: row for row in result.table(band)}
        lines.append(f"### {band}")
        lines.append("")
        for gain in (0.0, 1.0, 2.0):
            if gain not in rows:
                continue
            for text in rows[gain]["examples"]:
                lines.append(f"- **{gain:+g}**: {' '.join(text.split())}")
        for label, row in (("prompt only", result.prompting(band)), ("prompt and +1", result.asked_and_steered(band))):
            if row:
                lines.append(f"- **{label}**: {' '.join(row['examples'][0].split())}")
        lines.append("")
    return "\n".join(lines) + "\n"


def gained_table(result, primaries: list[str]) -> list[str]:
    """Words gained at +1: why a band that adds the most words of its own emotion can still miss *clear*."""
    gained = {band: result.words_gained(band) for band in primaries}
    if not primaries or any(g is None for g in gained.values()):
        return []
    unsteered = result.unsteered_rates()
    own_most = [b for b in primaries if max(gained[b], key=gained[b].get) == b]
    lines = [
        "", "## Words gained at +1", "",
        "The same replies counted in words rather than ratios: words per 100 of each emotion that +1 adds to the "
        "unsteered replies. *Clear* asks for a ratio (>= 2x, the largest of the eight), so an emotion the unsteered "
        "replies rarely use can out-lift the band's own on fewer words, and one they use often needs many more "
        f"words to double (2x needs its unsteered rate again, plus the {LIFT_PRIOR:g} smoothing).",
        "",
        f"**The band's own emotion gains the most words at +1: {len(own_most)}/{len(primaries)}** "
        f"({', '.join(own_most) or 'none'}).",
        "",
        "| band | unsteered words/100 | gained at +1 | 2x needs | gained most words | its gain | lifted most (ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for band in primaries:
        row = next(r for r in result.table(band) if r["gain"] == 1.0)
        top = max(gained[band], key=gained[band].get)
        lines.append(f"| {band} | {unsteered[band]:.2f} | {gained[band][band]:+.2f} | "
                     f"+{unsteered[band] + LIFT_PRIOR:.2f} | {top} | {gained[band][top]:+.2f} | {row['most_lifted']} |")
    return lines


def judge_table(figures: dict, primaries: list[str], prompts: int) -> list[str]:
    """The same replies judged by the unsteered model (eqz.judge): how many times likelier it names the band."""
    judged = [b for b in primaries if "judged_effect_at_1" in figures[b]]
    if not judged:
        return []
    clear = _clear_of(figures, judged, "judged_clear_at_1", "within_bounds_at_1")
    prompt_clear = sum(bool(figures[b]["prompt_only_judged_clear"]) for b in judged)
    expected = sum(figures[b]["judged_clear_share_at_1"] for b in judged)
    prompt_expected = sum(figures[b]["prompt_only_judged_clear_share"] or 0 for b in judged)
    asked = _asked_counts(figures, judged, "asked_at_1_judged_clear", "asked_at_1_judged_clear_share")
    lines = [
        "", "## The unsteered model as judge", "",
        "The same replies, each put to the unsteered model as \"Text: ... Name the emotion in one word.\" and its "
        "answer read for the eight primaries' names (eqz/judge.py; no persona, no stimulus: it shares nothing with "
        "the directions). Effect = how many times likelier it names the band than for the unsteered replies to the "
        "same prompts (geometric mean over paired replies); *clear* = >= 2x and the most lifted of the eight; "
        f"*holds* = the same redraw of the {prompts} prompts as above. *Unsteered p* = how likely the judge names "
        "the band for the unsteered replies (geometric mean over them, the eight names' probabilities summing to 1): "
        "no setting can lift the band more than 1/p times, so where p is above 0.5, 2x cannot be reached.",
        "",
        f"**Primaries clear at +1 by the judge: {clear}**; prompting only: {prompt_clear}/{len(judged)}"
        f"{asked[0]}. Expected over redrawn prompt sets: {expected:.1f}/{len(judged)} at +1, "
        f"{prompt_expected:.1f}/{len(judged)} prompting only{asked[1]}.",
        "",
        "| band | unsteered p (lift at most) | judge +1 | names most +1 | clear +1 | holds +1 | judge -1 | judge +2 | "
        "prompt only | prompt only clear | prompt and +1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for band in judged:
        f = figures[band]
        cells = [f"{f[key]:.2f}" if f[key] is not None else "-"
                 for key in ("judged_effect_at_-1", "prompt_only_judged_effect")]
        share = f.get("judged_share_at_0")
        ceiling = "-" if share is None else f"{share:.2f} ({1 / share:.1f}x)" if share >= 0.01 else "< 0.01 (> 100x)"
        lines.append(f"| {band} | {ceiling} | {f['judged_effect_at_1']:.2f} | {f['judged_most_lifted_at_1']} | "
                     f"{'yes' if f['judged_clear_at_1'] else 'no'} | {f['judged_clear_share_at_1']:.0%} | "
                     f"{cells[0]} | {_at_two(f['judged_effect_at_2'], f.get('fluent_at_2'))} | {cells[1]} | "
                     f"{_yes_no(f['prompt_only_judged_clear'])} | "
                     f"{_asked_cell(f, 'asked_at_1_judged_effect', 'asked_at_1_judged_clear')} |")
    return lines


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--bank", help="bank directory [default: the model's bank]")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gains", default="-1,0,1,2", help="0 and 1 at least")
    parser.add_argument("--prompts", choices=("test", "eval"), default="test",
                        help="test: never used for a choice (the pages); eval: the development split")
    parser.add_argument("--record", action="store_true", help="store the figures in the bank's bank.yaml")
    parser.add_argument("--report", metavar="EVAL_JSON", help="write the page again from a run's eval.json "
                        "(with --bank, the bank it measured) instead of generating")
    args = parser.parse_args()
    if args.report:
        if not args.bank:
            parser.error("--report needs --bank: the page shows each band's source and check from bank.yaml")
        bank = Bank.load(Path(args.bank))
        result = EvalResult.from_dict(json.loads(Path(args.report).read_text()))
        if result.model and result.model != bank.model.fingerprint:
            parser.error(f"{args.report} measured a bank for another model ({result.model}; the bank in {args.bank} "
                         f"is for {bank.model.fingerprint}): give the bank the run was made with")
        if missing := [band for band in result.bands if band not in bank.bands]:
            parser.error(f"{args.report} has bands the bank in {args.bank} lacks ({', '.join(missing)}): "
                         "give the bank the run was made with")
        if not {0.0, 1.0} <= set(result.gains):
            parser.error(f"{args.report} has no gain 0 or +1: every verdict compares +1 with the unsteered replies")
        name = bank.model.name
    else:
        with Model(resolve_model_path(args.model)) as model:
            bank = Bank.load(Path(args.bank)) if args.bank else require_bank(model.info)
            gains = tuple(float(g) for g in args.gains.split(","))
            if not {0.0, 1.0} <= set(gains):
                parser.error("--gains needs 0 and 1: every verdict compares +1 with the unsteered replies")
            result = evaluate(model, bank, BANDS if set(BANDS) <= set(bank.names) else bank.names, gains,
                              prompt_sets()[args.prompts], reply_tokens=args.max_tokens, samples=args.samples)
            result = dataclasses.replace(result, prompt_set=args.prompts)
            name = model.info.name
    slug = bank.directory.name + ("" if result.prompt_set == "test" else "-eval")  # the pages are the test split's
    DOCS.mkdir(exist_ok=True)
    if not args.report:
        write_outputs(result, DOCS / f"eval-{slug}", plot=True)  # first: the replies are kept whatever follows
    figures = verdicts(result)
    (DOCS / f"steering-{slug}.md").write_text(markdown(name, bank, result, figures))
    if args.record:
        record(result, bank, steering=figures)
    json.dump(figures, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
