"""Do the two sources steer better together? Each primary pushed along its stimulus direction, its own-voice
direction, and their sum (renormalised per layer), at the same strengths.

Issue 11 lets training "choose per band which source steers best (or combine them)"; calibration only chooses.
This makes both sources as `eqz train` does (through the f16 copy), prints how far apart they point, and scores the
replies as calibration does (NRC lexicon, the unsteered model as judge, perplexity under the model asked for the
band). It screens on calibration's prompts by default (a seed of its own); `--prompts eval` checks on held-out ones.

    python benchmarks/combined_sources.py [--prompts calibration] [--seed 777] [--samples 4] [--max-tokens 40]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import (layer_cosine, print_clear_counts, print_source_rows, pushed_rows, pushed_settings, script_parser,
                    training_sources)

from eqz.bands import PRIMARIES
from eqz.directions import unit
from eqz.engine import Model
from eqz.eval import ReplyBench, prompt_sets
from eqz.models import resolve_model_path
from eqz.train import layer_rows


SOURCES = ("stimulus", "voice", "combined")


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--strengths", default="0.35,0.5")
    parser.add_argument("--prompts", choices=("eval", "calibration"), default="calibration")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--out", default="combined_sources.json")
    args = parser.parse_args()
    strengths = [float(s) for s in args.strengths.split(",")]
    started = time.perf_counter()
    with Model(resolve_model_path(None)) as file_model, file_model.unpacked() as model:
        extraction, found, voice = training_sources(model)
        steered = found.steered
        shape = (model.info.n_layer, model.info.n_embd)
        pairs = {band: (found.units[band][steered], voice[band]) for band in PRIMARIES}  # (stimulus, voice) per layer
        cosines = {band: layer_cosine(stimulus, own) for band, (stimulus, own) in pairs.items()}
        print("stimulus . voice, mean over steered layers:", cosines)
        # full (n_layer, n_embd) unit matrices, zero off the steered layers, as training's candidates hold them
        pushes = [(source, band, layer_rows(units, steered, shape))
                  for band, (stimulus, own) in pairs.items()
                  for source, units in zip(SOURCES, (stimulus, own, unit(stimulus + own)))]
        settings = pushed_settings(model, pushes, extraction.token_norm, steered, strengths)
        bench = ReplyBench(model, prompt_sets()[args.prompts], args.max_tokens, args.seed, steered,
                           samples=args.samples, labels=True)
        results = bench.run(settings)
    rows = pushed_rows(settings, results, args.samples, "source")
    Path(args.out).write_text(json.dumps({"prompts": args.prompts, "seed": args.seed, "samples": args.samples,
                                          "max_tokens": args.max_tokens, "steered": steered, "cosines": cosines,
                                          "rows": rows, "seconds": round(time.perf_counter() - started)}, indent=1))
    print_source_rows(rows)
    print_clear_counts(sorted(rows, key=lambda row: (SOURCES.index(row["source"]), row["gain"])), "source")
    print(f"{round(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
