"""Are the own-voice directions held back by how few replies make them? The voice source made as `eqz train` makes
it (16 prompts x 1 reply x 32 tokens per persona) and with a budget training cannot afford on a CPU (24 prompts x
--samples replies x --voice-tokens tokens), pushed beside the stimulus source at the same strengths.

DEVELOPERS.md measured that training's voice directions are mostly sampling noise (two seeds: cosine 0.21). This
prints the large budget's split-half cosine (replies of samples 0..S/2-1 against the rest) and scores all three
sources as calibration does (NRC lexicon, the unsteered model as judge, perplexity under the model asked for the
band) on the eval prompts by default (the development split; never the test split).

    python benchmarks/voice_budget.py [--samples 12] [--voice-tokens 24] [--strengths 0.35,0.5]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path: it holds the script being run
from report import (QUIET, first_replies, layer_cosine, print_clear_counts, print_source_rows, pushed_rows,
                    pushed_settings, script_parser, training_sources)

from eqz.bands import PRIMARIES
from eqz.directions import unit
from eqz.engine import Model
from eqz.eval import ReplyBench, prompt_sets
from eqz.models import resolve_model_path
from eqz.train import TrainSettings, layer_rows, voice_differences, voice_directions


def split_half_cosines(states: dict[str, np.ndarray], prompts: int) -> dict[str, float]:
    """Per primary, the cosine between the voice directions made from the first half of the samples and from the
    second: how much of a direction one half of the replies reproduces. Row i of a persona's states is prompt
    i % prompts, sample i // prompts."""
    sample_of = np.arange(len(states["neutral"])) // prompts
    half = (sample_of.max() + 1) // 2
    halves = [voice_differences({key: replies[rows] for key, replies in states.items()})[0]
              for rows in (sample_of < half, sample_of >= half)]
    return {band: layer_cosine(unit(halves[0][band]), unit(halves[1][band])) for band in PRIMARIES}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--voice-tokens", type=int, default=24)
    parser.add_argument("--strengths", default="0.35,0.5")
    parser.add_argument("--prompts", choices=("eval", "calibration"), default="eval")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="voice_budget.json")
    args = parser.parse_args()
    strengths = [float(s) for s in args.strengths.split(",")]
    started = time.perf_counter()
    with Model(resolve_model_path(None)) as file_model, file_model.unpacked() as model:
        extraction, found, small = training_sources(model)
        steered = found.steered
        large_settings = TrainSettings(voice_prompts=len(prompt_sets()["train"]), voice_tokens=args.voice_tokens,
                                       voice_samples=args.samples)
        voice_started = time.perf_counter()
        large, capture, _ = voice_directions(model, large_settings, steered, QUIET)
        voice_seconds = round(time.perf_counter() - voice_started)
        halves = split_half_cosines(capture.states, large_settings.voice_prompts)
        agreement = {band: layer_cosine(small[band], large[band]) for band in PRIMARIES}
        print(f"large voice capture: {capture.tokens} reply tokens in {voice_seconds} s")
        print("split-half cosine of the large capture:", halves)
        print("training's voice . large voice:", agreement)
        shape = (model.info.n_layer, model.info.n_embd)
        sources = {"stimulus": {b: found.units[b][steered] for b in PRIMARIES}, "voice": small, "voice-large": large}
        pushes = [(source, band, layer_rows(units[band], steered, shape))
                  for source, units in sources.items() for band in PRIMARIES]
        settings = pushed_settings(model, pushes, extraction.token_norm, steered, strengths)
        bench = ReplyBench(model, prompt_sets()[args.prompts], args.max_tokens, args.seed, steered,
                           samples=args.eval_samples, labels=True)
        results = bench.run(settings)
    rows = pushed_rows(settings, results, args.eval_samples, "source")
    Path(args.out).write_text(json.dumps({
        "prompts": args.prompts, "seed": args.seed, "samples": args.eval_samples, "max_tokens": args.max_tokens,
        "voice_replies_per_persona": len(capture.states["neutral"]), "voice_tokens": args.voice_tokens,
        "voice_seconds": voice_seconds, "split_half_cosines": halves, "small_large_cosines": agreement,
        "steered": steered, "rows": rows, "seconds": round(time.perf_counter() - started),
        "replies": first_replies(settings, results, args.eval_samples)}, indent=1))
    print_source_rows(sorted(rows, key=lambda row: (row["band"], row["gain"], row["source"])))
    print_clear_counts(rows, "source")
    print(f"{round(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
