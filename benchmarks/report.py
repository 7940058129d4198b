"""How every benchmark prints its figures: a title, then one aligned line per figure."""

from __future__ import annotations

import sys
from pathlib import Path

from eqz.eval import result_row

EQZ = str(Path(sys.executable).with_name("eqz"))  # the console script of the venv running the benchmark


def print_figures(title: str, rows: list[tuple[str, str, str]]) -> None:
    """rows: (what, figure with its unit, note such as the ratio to the baseline)."""
    print(title)
    for what, figure, note in rows:
        print(f"  {what:<28} {figure:>12}   {note}".rstrip())


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
