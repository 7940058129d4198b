"""Training speed on the default model, measured in one run.

1. Hidden-state capture against plain prompt processing of the same tokens: a third of the stimulus set read
   with the taps pooling every capture layer (what `eqz train` does) and through a context without taps
   (llama.cpp's own prompt processing, full depth, same batches), each on the model file's weights and on the
   f16 copy `eqz train` reads a Q4_1 model through (`Model.unpacked`). Rounds interleaved, medians reported.
2. The full bank for the default model, `eqz train` as a user runs it (into a temporary directory), wall seconds
   against the target of 120 s.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from report import EQZ, print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.engine import Model
from eqz.reading import read_texts
from eqz.models import resolve_model_path
from eqz.train import TrainSettings, capture_context, capture_layers, stimulus_groups

ROUNDS = 3
TARGET_SECONDS = 120


def capture_rates(model: Model, rounds: int = ROUNDS) -> dict:
    groups = stimulus_groups(model, TrainSettings())[0][::3]  # a third of the set, every kind of text in it
    tokens = sum(len(g.prefix) + sum(len(t) for t in g.tails) for g in groups)
    layers = capture_layers(model)
    rates: dict[str, list[float]] = {"capture": [], "plain": [], "capture_unpacked": [], "plain_unpacked": []}
    with model.unpacked() as unpacked, \
            capture_context(model, taps=True) as tapped, capture_context(model, taps=False) as plain, \
            capture_context(unpacked, taps=True) as tapped_f16, capture_context(unpacked, taps=False) as plain_f16:
        for _ in range(rounds):
            for key, context, read in (("capture", tapped, layers), ("plain", plain, []),
                                       ("capture_unpacked", tapped_f16, layers), ("plain_unpacked", plain_f16, [])):
                started = time.perf_counter()
                read_texts(context, groups, read)
                rates[key].append(tokens / (time.perf_counter() - started))
    rate = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "stimulus_tokens": tokens,
        "capture_layers": len(layers),
        "capture_tok_s": round(rate["capture"], 1),
        "plain_prompt_tok_s": round(rate["plain"], 1),
        "capture_ratio": round(rate["capture"] / rate["plain"], 3),
        "unpacked": unpacked is not model,
        "capture_unpacked_tok_s": round(rate["capture_unpacked"], 1),
        "plain_unpacked_tok_s": round(rate["plain_unpacked"], 1),
        "capture_unpacked_ratio": round(rate["capture_unpacked"] / rate["plain"], 3),
    }


def full_bank_seconds() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bank"
        started = time.perf_counter()
        subprocess.run([EQZ, "train", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        quality = yaml.safe_load((out / "bank.yaml").read_text())["quality"]
    return {"train_wall_s": round(wall, 1), "train_target_s": TARGET_SECONDS,
            "heldout_accuracy": quality["heldout_accuracy"]}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    return [
        ("training, plain prompt processing", f"{figures['plain_prompt_tok_s']:.1f} tok/s", "baseline"),
        (f"training, capture ({figures['capture_layers']} layers)", f"{figures['capture_tok_s']:.1f} tok/s",
         f"x{figures['capture_ratio']:.3f} of plain (the graph stops after the last layer read)"),
        ("training, plain prompt processing, f16 copy", f"{figures['plain_unpacked_tok_s']:.1f} tok/s",
         "llama.cpp on the weights unpacked to f16" if figures["unpacked"] else "no copy: the file batches as fast"),
        ("training, capture through the f16 copy", f"{figures['capture_unpacked_tok_s']:.1f} tok/s",
         f"x{figures['capture_unpacked_ratio']:.3f} of plain on the file's weights (what eqz train reads)"),
        ("training, full bank (eqz train)", f"{figures['train_wall_s']:.1f} s",
         f"target <= {figures['train_target_s']} s; held-out accuracy {figures['heldout_accuracy']:.1%}"),
    ]


def main() -> dict:
    with Model(resolve_model_path(None)) as model:
        figures = capture_rates(model)
    figures.update(full_bank_seconds())
    print_figures(f"training on the default model ({figures['stimulus_tokens']} stimulus tokens, median of {ROUNDS})",
                  rows(figures))
    return figures


if __name__ == "__main__":
    main()
