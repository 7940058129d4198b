"""Where the bank and presets that ship with eqz live.

In the repo they are the top-level ``vectors/`` and ``presets/``; setuptools packages them as
``eqz.shipped_vectors`` and ``eqz.shipped_presets`` (pyproject.toml), so a wheel, ``pipx install`` and the
editable install all find them the same way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shipped_dir(kind: str) -> Path:
    """The folder of the shipped ``vectors`` or ``presets``."""
    spec = importlib.util.find_spec(f"eqz.shipped_{kind}")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / kind  # a source checkout on PYTHONPATH, not installed
