"""Two or more banks for one model, each primary at +1 as a chat applies it (held levels through the filters, other
bands' vectors added), on the same prompts and seeds in one run, scored as calibration scores them (NRC lexicon,
the unsteered model as judge, perplexity under the model asked for the band). Made to ask whether a bank `eqz train
--hold` made on its own steers as well as the shipped one, on prompts neither saw.

    python benchmarks/compare_banks.py --bank vectors/smollm2-135m-instruct --bank /tmp/retrained \
        --prompts-file benchmarks/data/third_prompts.txt --samples 4 --seed 9999
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import first_replies, print_clear_counts, print_source_rows, pushed_rows, script_parser

from eqz.bands import PRIMARIES
from eqz.bank import Bank
from eqz.engine import Model
from eqz.eval import ReplyBench, Setting, bank_persona, prompt_sets, slider_setting
from eqz.models import resolve_model_path


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", help="GGUF file [default: $EQZ_MODEL, else the default model]")
    parser.add_argument("--bank", type=Path, action="append", required=True, help="a bank directory (repeat: 2 or more)")
    parser.add_argument("--prompts", choices=("eval", "calibration", "test"), default="eval")
    parser.add_argument("--prompts-file", type=Path, default=None, help="one prompt per line instead of a built-in set")
    parser.add_argument("--seed", type=int, default=9999)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--bands", default=",".join(PRIMARIES),
                        help="primaries to compare (banks that differ in a few bands need run only those)")
    parser.add_argument("--out", default="compare_banks.json")
    args = parser.parse_args()
    if len(args.bank) < 2:
        raise SystemExit("give two or more --bank directories to compare")
    bands = args.bands.split(",")
    if not set(bands) <= set(PRIMARIES):
        raise SystemExit(f"--bands takes primaries: {', '.join(PRIMARIES)}")
    prompts = args.prompts_file.read_text().splitlines() if args.prompts_file else prompt_sets()[args.prompts]
    prompts = [prompt for prompt in prompts if prompt.strip()]
    started = time.perf_counter()
    with Model(resolve_model_path(args.model)) as file_model, file_model.unpacked() as model:
        banks = {str(directory): Bank.load(directory) for directory in args.bank}
        # one bench taps one set of layers: every bank's (a bank's vectors are zero and its filters idle elsewhere)
        steered = sorted({layer for bank in banks.values() for layer in bank.steered_layers})
        settings = [Setting("unsteered")] + [
            slider_setting((name, band, 1.0), bank, {band: 1.0}, judge=bank_persona(bank, band))
            for name, bank in banks.items() for band in PRIMARIES if band in bands]
        bench = ReplyBench(model, prompts, args.max_tokens, args.seed, steered, samples=args.samples, labels=True)
        results = bench.run(settings)
    rows = pushed_rows(settings, results, args.samples, "bank")
    for row, setting in zip(rows, settings[1:]):
        held = banks[setting.key[0]].bands[setting.key[1]].hold
        row["way"] = f"held {held:g}" if held is not None else "vector"
    Path(args.out).write_text(json.dumps({
        "model": model.info.name, "prompts": str(args.prompts_file) if args.prompts_file else args.prompts,
        "prompt_count": len(prompts), "seed": args.seed, "samples": args.samples, "max_tokens": args.max_tokens,
        "banks": list(banks), "rows": rows, "seconds": round(time.perf_counter() - started),
        "replies": first_replies(settings, results, args.samples)}, indent=1))
    print_source_rows(rows, "bank")
    print_clear_counts(rows, "bank")
    print(f"{round(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
