"""What steers a model: band gains (the sliders, read through a bank) and raw control-vector files.

``Steering`` is a plain value that goes into records and transcripts; ``Steerer`` turns it into the
(n_layer, n_embd) matrix the engine applies, loading each file once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .bank import Bank, require_bank
from .meter import Filters
from .models import ModelInfo
from .vector_files import ControlVectorFile, read_control_vector


def absolute_path(path: str | Path) -> str:
    """A vector file's name in a steering: absolute, so that a record names the file whatever folder reads it."""
    return os.path.abspath(Path(path).expanduser())


@dataclass(frozen=True)
class Steering:
    """Slider gains as (band, gain) pairs and raw vectors as (path, scale) pairs; all are summed."""

    gains: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    vectors: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def with_gain(self, band: str, gain: float) -> "Steering":
        kept = tuple((b, g) for b, g in self.gains if b != band)
        return replace(self, gains=kept + (((band, gain),) if gain != 0 else ()))

    def with_gains(self, gains: dict[str, float]) -> "Steering":
        steering = self
        for band, gain in gains.items():
            steering = steering.with_gain(band, gain)
        return steering

    def with_vector(self, path: str | Path, scale: float) -> "Steering":
        """Set one file's scale (0 removes it), keeping the others. Paths are absolute: a record names the file
        whatever folder it is read in."""
        path = absolute_path(path)
        kept = tuple((p, s) for p, s in self.vectors if p != path)
        return replace(self, vectors=kept + (((path, scale),) if scale != 0 else ()))

    def plus_vector(self, path: str | Path, scale: float) -> "Steering":
        """Add ``scale`` to one file's scale: a file given twice adds up, as llama.cpp's --control-vector does."""
        current = dict(self.vectors).get(absolute_path(path), 0.0)
        return self.with_vector(path, round(current + float(scale), 6))  # 0.1 + 0.2 is recorded as 0.3

    def same_as(self, other: "Steering") -> bool:
        """The same sliders and vectors, whatever order they were set in (up then down is no change)."""
        return dict(self.gains) == dict(other.gains) and dict(self.vectors) == dict(other.vectors)

    def gain(self, band: str) -> float:
        return dict(self.gains).get(band, 0.0)

    def to_dict(self, bands: tuple[str, ...] = ()) -> dict:
        """As records hold it: ``sliders`` lists every band of ``bands`` (zeros included) plus any other non-zero
        one; ``vectors`` the control-vector files with their scales."""
        sliders = {band: 0.0 for band in bands}
        sliders.update(dict(self.gains))
        return {"sliders": sliders, "vectors": [{"path": path, "scale": scale} for path, scale in self.vectors]}

    @property
    def is_neutral(self) -> bool:
        return not self.gains and not self.vectors


class Steerer:
    """Builds control-vector matrices for one model; checks each file fits it the first time it is seen."""

    def __init__(self, info: ModelInfo, bank: Bank | None = None):
        self.info = info
        self.bank = bank
        self._files: dict[str, tuple[tuple | None, ControlVectorFile]] = {}  # path -> (its stat when read, file)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.bank.names if self.bank else ()

    def load(self, path: str | Path) -> ControlVectorFile:
        """The control vector in ``path``, read again where the file has changed since (a chat's `/vector` after
        `eqz vectors export --replace` steered with the old one); one that has gone since is used as it was read."""
        key = absolute_path(path)
        try:
            found = os.stat(key)
            stamp = (found.st_mtime_ns, found.st_size, found.st_ino)
        except OSError:  # not there: read_control_vector says so, unless it was read before
            stamp = None
        cached = self._files.get(key)
        if cached is None or (stamp is not None and cached[0] != stamp):
            vector_file = read_control_vector(key)
            vector_file.matrix(self.info.n_layer, self.info.n_embd, self.info.name)  # fits, or a clear error
            self._files[key] = (stamp, vector_file)
        return self._files[key][1]

    def _bank(self) -> Bank:
        """The bank, found for the model the first time sliders need it (an EqzError when it has none)."""
        if self.bank is None:
            self.bank = require_bank(self.info)
        return self.bank

    def held(self, steering: Steering) -> dict[str, float]:
        """The levels held sliders clamp their bands at (``Bank.held``): they steer through the filters, not
        ``matrix``."""
        return self._bank().held(dict(steering.gains)) if steering.gains else {}

    def filters(self, steering: Steering, asked: dict | None = None) -> Filters | None:
        """What a reply under ``steering`` is filtered with: the user's ``asked`` ({"clamp": ..., "ablate": ...})
        and the held sliders' levels together; None when there is neither."""
        asked = asked or {}
        held = self.held(steering)
        if not (held or asked.get("clamp") or asked.get("ablate")):
            return None
        return Filters(self._bank(), asked.get("clamp", {}), asked.get("ablate", []), held=held)

    def matrix(self, steering: Steering) -> np.ndarray | None:
        """The summed control vector of the sliders that add one and the files, or None when nothing steers (the
        exact unsteered graph)."""
        if steering.is_neutral:
            return None
        total = np.zeros((self.info.n_layer, self.info.n_embd), dtype=np.float32)
        if steering.gains:
            mix = self._bank().added(dict(steering.gains))
            if mix is not None:
                total += mix
        with np.errstate(over="ignore", invalid="ignore"):  # a huge scale: Context.set_control_vector says so
            for path, scale in steering.vectors:
                total += np.float32(scale) * self.load(path).matrix(self.info.n_layer, self.info.n_embd)
        return total
