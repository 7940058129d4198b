"""Can a filter steer more cleanly than a slider? The shipped bank's primaries pushed three ways on the same prompts:
the slider at +1 (a fixed vector added at every steered layer), the slider at +1 with the other seven primaries
notched to their neutral level (crosstalk removed inside the forward pass, whatever the prompt), and a clamp that
holds the band's component at a level (the push adapts to each token: it adds only what is missing).

Scored as calibration scores them (NRC lexicon, the unsteered model as judge, perplexity under the model asked for
the band) on the eval prompts by default (the development split; `--prompts test` only for the final check of levels
chosen elsewhere, as in the last example). A clamp's "c" in the table is its level in the meter's units (0 = the
model's neutral level, 1 = typical emotional text), held at every steered layer; the slider at +1 reads about 1-3 on
its band at the read layer while it writes.

    python benchmarks/clamp_steering.py [--levels 2,3,5] [--bands joy,fear] [--ways slider,notched,clamp]
    python benchmarks/clamp_steering.py --prompts calibration --ways clamp --levels 1,2,3,4,5,6 --out screen.json
    python benchmarks/clamp_steering.py --chosen-from screen.json --ways slider,clamp --seed 9999 --samples 4
    python benchmarks/clamp_steering.py --chosen-from screen.json --ways slider,clamp --prompts test --samples 4 --negative
    python benchmarks/clamp_steering.py --chosen-from screen.json --hold-in vectors/smollm2-135m-instruct \
        --bands joy,surprise,sadness,disgust,anticipation  # ship them: these hold, the other screened bands add
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import (first_replies, print_clear_counts, print_lowered_counts, print_source_rows, pushed_rows,
                    script_parser)

from eqz.bands import PRIMARIES
from eqz.bank import Bank, require_bank
from eqz.engine import Model
from eqz.eval import ReplyBench, Setting, bank_persona, prompt_sets
from eqz.meter import Filters
from eqz.models import resolve_model_path
from eqz.train import CALIBRATION_HOLDS, hold_check


def settings_for(bank, bands: list[str], levels: dict[str, list[float]], ways: list[str],
                 negative: bool = False) -> list[Setting]:
    """Unsteered first, then per band: slider +1, slider +1 with the other primaries notched, each of the band's
    clamp levels, and each level clamped together with the other primaries held at neutral ("isolated"; those of
    ``ways``); with ``negative`` also the slider at -1 and each clamp at minus its level
    (perplexity under the plain prompt, as `eqz eval` measures -1). Keyed (way, band, strength or level) for
    report.pushed_rows."""
    settings = [Setting("unsteered")]
    for band in bands:
        judge = bank_persona(bank, band)
        others = [other for other in PRIMARIES if other != band]
        if "slider" in ways:
            settings.append(Setting(("slider", band, 1.0), bank.mix({band: 1.0}), judge=judge))
            if negative:
                settings.append(Setting(("slider", band, -1.0), bank.mix({band: -1.0})))
        if "notched" in ways:
            settings.append(Setting(("notched", band, 1.0), bank.mix({band: 1.0}), judge=judge,
                                    filters=Filters(bank, {}, others)))
        if "clamp" in ways:
            settings += [Setting(("clamp", band, level), judge=judge, filters=Filters(bank, {band: level}, []))
                         for level in levels[band]]
            if negative:
                settings += [Setting(("clamp", band, -level), filters=Filters(bank, {band: -level}, []))
                             for level in levels[band]]
        if "isolated" in ways:
            settings += [Setting(("isolated", band, level), judge=judge, filters=Filters(bank, {band: level}, others))
                         for level in levels[band]]
    return settings


def chosen_rows(screen: Path) -> dict[str, dict]:
    """Per band, the clamp row whose level `eqz train` would call +1 in a screen (calibration's rule,
    train.Candidate): the smallest fluent level clear by the lexicon whose judge verdict holds on CALIBRATION_HOLDS
    (80%) of redraws, else the fluent level with the largest judge lift (the lowest level when none is fluent)."""
    rows = [row for row in json.loads(screen.read_text())["rows"] if row["way"] == "clamp"]
    chosen = {}
    for band in dict.fromkeys(row["band"] for row in rows):
        tried = sorted((row for row in rows if row["band"] == band), key=lambda row: row["gain"])
        fluent = [row for row in tried if row["fluent"]] or tried[:1]
        holding = [row for row in fluent if passes_calibration(row)]
        chosen[band] = holding[0] if holding else max(fluent, key=lambda row: row["judged_effect"])
    return chosen


def passes_calibration(row: dict) -> bool:
    return row["fluent"] and row["clear"] and row["judged_clear_share"] >= CALIBRATION_HOLDS


def hold_chosen(bank_dir: Path, screen: Path, bands: list[str]) -> None:
    """Make each of ``bands`` hold its chosen level in the bank at ``bank_dir``, with the screen's figures for that
    level as its check (``eqz vectors show`` prints them; a level that fails calibration's rule is weak); the other
    bands screened add their vectors again, so the bank ends as the command says whatever it held before."""
    bank = Bank.load(bank_dir)
    chosen = chosen_rows(screen)
    if unscreened := [band for band in bands if band not in chosen]:
        raise SystemExit(f"{screen} screened no level for {', '.join(unscreened)}; its bands: {', '.join(chosen)}")
    for band, row in chosen.items():
        if band not in bands:
            bank.hold(band, None)
            print(f"{band}: adds its vector")
            continue
        weak = not passes_calibration(row)
        bank.hold(band, row["gain"], hold_check(row, weak, screen.name))
        print(f"{band}: holds {row['gain']:g}{' (weak)' if weak else ''}")
    bank.save()


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", help="GGUF file [default: $EQZ_MODEL, else the default model]")
    parser.add_argument("--bank", type=Path, help="bank directory [default: the model's bank]")
    parser.add_argument("--levels", default="2,3,5", help="clamp levels tried on every band")
    parser.add_argument("--chosen-from", type=Path, default=None,
                        help="a screen's JSON: clamp each band at the level calibration's rule picks there instead")
    parser.add_argument("--hold-in", type=Path, default=None, metavar="BANK_DIR",
                        help="with --chosen-from: make that bank's sliders in --bands hold the chosen levels (the other "
                             "bands screened add their vectors), and exit")
    parser.add_argument("--ways", default="slider,notched,clamp")
    parser.add_argument("--bands", default=",".join(PRIMARIES))
    parser.add_argument("--negative", action="store_true", help="also the slider at -1 and each clamp at minus its level")
    parser.add_argument("--prompts", choices=("eval", "calibration", "test"), default="eval")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="one prompt per line instead of a built-in set (benchmarks/data/fresh_prompts.txt: 16 "
                             "written after the test split was spent)")
    parser.add_argument("--prompt-count", type=int, default=None, help="the first N prompts only (a quick look)")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="clamp_steering.json")
    args = parser.parse_args()
    bands = args.bands.split(",")
    if args.hold_in:
        hold_chosen(args.hold_in, args.chosen_from, bands)
        return
    if args.chosen_from:
        levels = {band: [row["gain"]] for band, row in chosen_rows(args.chosen_from).items()}
    else:
        levels = {band: [float(level) for level in args.levels.split(",")] for band in bands}
    prompts = (args.prompts_file.read_text().splitlines() if args.prompts_file else prompt_sets()[args.prompts])
    prompts = [prompt for prompt in prompts if prompt.strip()][: args.prompt_count]
    started = time.perf_counter()
    with Model(resolve_model_path(args.model)) as file_model, file_model.unpacked() as model:
        bank = Bank.load(args.bank) if args.bank else require_bank(model.info)
        settings = settings_for(bank, bands, levels, args.ways.split(","), args.negative)
        bench = ReplyBench(model, prompts, args.max_tokens, args.seed, bank.steered_layers, samples=args.samples,
                           labels=True)
        results = bench.run(settings)
    rows = pushed_rows(settings, results, args.samples, "way")
    Path(args.out).write_text(json.dumps({
        "model": model.info.name, "prompts": str(args.prompts_file) if args.prompts_file else args.prompts,
        "prompt_count": len(prompts), "seed": args.seed,
        "samples": args.samples, "max_tokens": args.max_tokens, "levels": levels, "rows": rows,
        "seconds": round(time.perf_counter() - started),
        "replies": first_replies(settings, results, args.samples)}, indent=1))
    raised = [row for row in rows if row["gain"] > 0]
    print_source_rows(raised, "way")
    print_clear_counts(raised, "way")
    print_lowered_counts([row for row in rows if row["gain"] < 0], "way")
    print(f"{round(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
