"""Which layers should a band be steered at? The stimulus directions pushed over several layer windows.

Training steers every band over the layers around the read layer (the best cross-validated 8-way accuracy), a
choice made by how well the directions *read*, not by how they steer. This measures the steering side: the
stimulus directions (made as `eqz train` makes them, through the f16 copy) at every window and strength, replies
scored by the NRC lexicon and the unsteered model as judge, with the fluency bounds calibration keeps to. On the
held-out eval prompts the shipped bank at +1 is generated in the same run for comparison; `--prompts calibration`
screens on calibration's prompts instead (with a seed of its own), so a window can be chosen there and checked
on held-out prompts. Writes every setting's row, as `eqz eval` records one, to a JSON file.

    python benchmarks/layer_windows.py [--windows 3-8,6-13,10-19] [--strengths 0.35,0.5,0.7] [--out FILE]
    python benchmarks/layer_windows.py --prompts calibration --seed 777 --samples 2 --max-tokens 40
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import print_clear_counts, pushed_rows, script_parser

from eqz.bands import PRIMARIES
from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import EVAL_SEED, ReplyBench, Setting, bank_persona, prompt_sets
from eqz.models import resolve_model_path
from eqz.train import TrainSettings, extract, find_directions, strength_matrix


def window(text: str) -> list[int]:
    first, last = (int(n) for n in text.split("-"))
    return list(range(first, last + 1))


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--windows", default="3-8,6-13,10-19", help="layer ranges, first-last")
    parser.add_argument("--strengths", default="0.35,0.5,0.7")
    parser.add_argument("--prompts", choices=("eval", "calibration"), default="eval")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="eval's seed by default")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="layer_windows.json")
    args = parser.parse_args()
    windows = {text: window(text) for text in args.windows.split(",")}
    strengths = [float(s) for s in args.strengths.split(",")]
    started = time.perf_counter()
    with Model(resolve_model_path(None)) as file_model, file_model.unpacked() as model:
        training = TrainSettings()
        extraction = extract(model, training)
        units = find_directions(extraction, training).units
        bank = require_bank(model.info)
        personas = {band: bank_persona(bank, band) for band in PRIMARIES}
        settings = [Setting("unsteered")]
        if args.prompts == "eval":
            settings += [Setting(("shipped +1", band, 1.0), bank.mix({band: 1.0}), judge=personas[band])
                         for band in PRIMARIES]
        settings += [Setting((name, band, strength), strength_matrix(units[band], extraction.token_norm, layers,
                                                                     strength, model.info.n_layer),
                             judge=personas[band])
                     for name, layers in windows.items() for band in PRIMARIES for strength in strengths]
        steered = sorted({layer for layers in windows.values() for layer in layers} | set(bank.steered_layers))
        bench = ReplyBench(model, prompt_sets()[args.prompts], args.max_tokens, args.seed, steered,
                           samples=args.samples, labels=True)
        results = bench.run(settings)
    # a row's gain is the strength c: a window's own scale (the shipped bank's +1 row: its calibrated +1)
    rows = pushed_rows(settings, results, args.samples, "window")
    Path(args.out).write_text(json.dumps({"prompts": args.prompts, "seed": args.seed, "samples": args.samples,
                                          "max_tokens": args.max_tokens, "rows": rows,
                                          "seconds": round(time.perf_counter() - started)}, indent=1))
    print_clear_counts(rows, "window")


if __name__ == "__main__":
    main()
