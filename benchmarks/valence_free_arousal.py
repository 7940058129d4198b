"""Remake a bank's arousal slider as `eqz train` makes it since 2026-12-06 (stop 50), without retraining the rest.

The circumplex sum of the primaries leans on valence (cosine -0.24 to -0.37 per steered layer in the shipped
SmolLM2 bank), so training now removes arousal's valence component (train._valence_free_arousal). A bank's
arousal and valence rows are its unit directions scaled per layer, so rejecting one from the other gives exactly
the direction training makes now from the same differences. That direction is then calibrated and checked as
training does (the calibration prompts and seed, the lexicon's ladder rule, the judge's direction check, the
readout), and the bank saved with every other band, the meter and the voice centre as they were.
docs/steering-limits.md section 19 has the figures.

    python benchmarks/valence_free_arousal.py --bank DIR [--model PATH] [-o OUT_DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz import directions as D
from eqz.bank import Bank
from eqz.engine import Model
from eqz.errors import EqzError
from eqz.meter import geometry, metered_bands
from eqz.models import resolve_model_path
from eqz.train import (AXES_METHOD, STRENGTHS, Candidate, TrainSettings, bank_token_norm, calibrate_and_check,
                       crosstalk, layer_rows, store_bands, training_record)


def remake_arousal(model: Model, bank: Bank, settings: TrainSettings) -> None:
    started = time.perf_counter()
    steered, shape = bank.steered_layers, (model.info.n_layer, model.info.n_embd)
    old = bank.bands["arousal"]
    units = D.reject(old.matrix[steered], bank.bands["valence"].matrix[steered])
    metered = metered_bands(bank)
    reader = geometry(bank, bank.read_layer, metered)
    candidate = Candidate("arousal", old.source, layer_rows(units, steered, shape))
    calibration = calibrate_and_check(model, settings, [candidate], steered, bank_token_norm(bank, model.info.n_layer),
                                      print_stage, bank.read_layer, reader)
    store_bands(bank, calibration, {"arousal": (old.readout, old.read_directions)}, {})
    bank.quality.setdefault("crosstalk", {}).update(crosstalk(calibration, list(metered)))
    bank.forget_recorded("arousal")
    bank.bands["arousal"].trained = {
        **training_record(model, settings, started),
        "remade": "the bank's arousal with its valence component removed, calibrated again "
                  "(benchmarks/valence_free_arousal.py)",
        "ladder": list(STRENGTHS),
        "direction_check": "the judge's names weighted by circumplex arousal, and the readout"}
    bank.method["axes"] = AXES_METHOD


def print_stage(stage: str, total: int):
    print(f"{stage} ({total})", flush=True)
    return lambda _done: None


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--bank", type=Path, required=True)
    parser.add_argument("--model")
    parser.add_argument("-o", "--out", type=Path, help="where to save the bank (default: over --bank)")
    args = parser.parse_args()
    try:
        bank = Bank.load(args.bank)
    except EqzError as error:
        parser.error(str(error))
    if not {"arousal", "valence"} <= set(bank.bands):
        parser.error(f"the bank in {args.bank} has no arousal or no valence band to remake arousal from")
    settings = TrainSettings(**({"seed": bank.trained["seed"]} if "seed" in bank.trained else {}))
    with Model(resolve_model_path(args.model)) as file_model, file_model.unpacked() as model:
        remake_arousal(model, bank, settings)
    bank.save(args.out or args.bank)
    arousal = bank.bands["arousal"]
    print(f"arousal: strength {arousal.strength}, clear {arousal.clear}, direction_ok {arousal.direction_ok} "
          f"{arousal.problems}; +1 {arousal.check['+1']}; -1 {arousal.check['-1']}")


if __name__ == "__main__":
    main()
