"""How every benchmark prints its figures: a title, then one aligned line per figure."""

from __future__ import annotations

import sys
from pathlib import Path

EQZ = str(Path(sys.executable).with_name("eqz"))  # the console script of the venv running the benchmark


def print_figures(title: str, rows: list[tuple[str, str, str]]) -> None:
    """rows: (what, figure with its unit, note such as the ratio to the baseline)."""
    print(title)
    for what, figure, note in rows:
        print(f"  {what:<28} {figure:>12}   {note}".rstrip())
