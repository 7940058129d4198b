"""How every benchmark prints its figures: a title, then one aligned line per figure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import Setting, bank_persona, result_row
from eqz.train import Directions, Extraction, TrainSettings, extract, find_directions, strength_matrix, voice_directions

EQZ = str(Path(sys.executable).with_name("eqz"))  # the console script of the venv running the benchmark
QUIET = lambda _stage, _total: lambda _n: None  # noqa: E731  (a Progress that shows nothing)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's command line, described by its docstring's first paragraph (its first line stops mid-sentence)."""
    return argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))


def batch_files_args(doc: str, steered_help: str) -> argparse.Namespace:
    """The command line of a script that scores `eqz batch` files: the unsteered file, the steered ones, --out."""
    parser = script_parser(doc)
    parser.add_argument("unsteered", type=Path, help="`eqz batch` file with no slider moved")
    parser.add_argument("steered", type=Path, nargs="+", help=steered_help)
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def first_replies(settings: list, results: dict, samples: int) -> dict[str, list[str]]:
    """The first sample's reply to the first two prompts under every setting, to store beside the figures and read."""
    return {" ".join(map(str, setting.key)) if isinstance(setting.key, tuple) else setting.key:
            results[setting.key].texts[::samples][:2] for setting in settings}


def print_figures(title: str, rows: list[tuple[str, str, str]]) -> None:
    """rows: (what, figure with its unit, note such as the ratio to the baseline)."""
    print(title)
    width = max((len(what) for what, _, _ in rows), default=0)
    for what, figure, note in rows:
        print(f"  {what:<{width}} {figure:>12}   {note}".rstrip())


def pushed_rows(settings: list, results: dict, samples: int, label: str) -> list[dict]:
    """Rows, as `eqz eval` records them, for settings keyed (name, band, strength) after the unsteered first one:
    ``label`` holds the name (a layer window, a source), ``gain`` the strength c."""
    baseline = results[settings[0].key]
    return [{label: name, **result_row(band, strength, results[(name, band, strength)], baseline, samples)}
            for name, band, strength in (setting.key for setting in settings[1:])]


def print_clear_counts(rows: list[dict], label: str) -> None:
    """Per name and strength: the primaries clear by the lexicon and by the judge (with the expected counts over
    redrawn prompts) and how many stay within every fluency bound."""
    for name, strength in dict.fromkeys((row[label], row["gain"]) for row in rows):
        cell = [row for row in rows if row[label] == name and row["gain"] == strength]
        print(f"{name:>10} c={strength:<4g} lexicon clear {sum(r['clear'] for r in cell)}/{len(cell)} "
              f"(expected {sum(r['clear_share'] for r in cell):.1f}), judge {sum(r['judged_clear'] for r in cell)}/"
              f"{len(cell)} (expected {sum(r['judged_clear_share'] for r in cell):.1f}), "
              f"fluent {sum(r['fluent'] for r in cell)}/{len(cell)}")


def print_lowered_counts(rows: list[dict], label: str) -> None:
    """Per name: the primaries whose own emotion falls below the unsteered rate when pushed down, by the lexicon and
    by the judge."""
    for name in dict.fromkeys(row[label] for row in rows):
        cell = [row for row in rows if row[label] == name]
        print(f"{name:>10} pushed down: lexicon lowers {sum(r['effect'] < 1 for r in cell)}/{len(cell)}, judge lowers "
              f"{sum(r['judged_effect'] < 1 for r in cell)}/{len(cell)}, fluent {sum(r['fluent'] for r in cell)}/"
              f"{len(cell)}")


def layer_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Two directions' cosine, layer by layer, averaged over the layers (rows of unit vectors)."""
    return round(float(np.mean(np.sum(a * b, axis=1))), 3)


def training_sources(model: Model) -> tuple[Extraction, Directions, dict[str, np.ndarray]]:
    """The stimulus directions (with where they are steered) and the own-voice ones, made as `eqz train` makes them."""
    settings = TrainSettings()
    extraction = extract(model, settings)
    found = find_directions(extraction, settings)
    voice, _, _ = voice_directions(model, settings, found.steered, QUIET)
    return extraction, found, voice


def pushed_settings(model: Model, pushes: list[tuple[str, str, np.ndarray]], token_norm: np.ndarray,
                    steered: list[int], strengths: list[float]) -> list[Setting]:
    """The unsteered setting, then every push (name, band, full (n_layer, n_embd) unit matrix) at every strength,
    keyed (name, band, strength) for pushed_rows and judged under the band's persona in the shipped bank."""
    bank = require_bank(model.info)
    return [Setting("unsteered")] + [
        Setting((name, band, strength), strength_matrix(units, token_norm, steered, strength, model.info.n_layer),
                judge=bank_persona(bank, band))
        for name, band, units in pushes for strength in strengths]


def print_source_rows(rows: list[dict], label: str = "source") -> None:
    """pushed_rows keyed by ``label`` as a markdown table."""
    print(f"| band | {label} | c | lexicon lift (most lifted) | holds | judge lift | judge holds | ppl (asked) | fluent |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['band']} | {row[label]} | {row['gain']:g} | {row['effect']:.2f}x ({row['most_lifted']}) | "
              f"{row['clear_share']:.0%} | {row['judged_effect']:.2f}x | {row['judged_clear_share']:.0%} | "
              f"{row.get('ppl_ratio', float('nan')):.1f}x | {'yes' if row['fluent'] else 'no'} |")
