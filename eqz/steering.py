"""What steers a model: raw control-vector files with scales, and (with a bank) named band gains.

``Steering`` is a plain value that goes into records and transcripts; ``Steerer`` turns it into the
(n_layer, n_embd) matrix the engine applies, loading each file once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .engine import ModelInfo
from .vector_files import ControlVectorFile, read_control_vector


@dataclass(frozen=True)
class Steering:
    """Raw vectors as (path, scale) pairs, summed as llama.cpp does."""

    vectors: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def with_vector(self, path: str | Path, scale: float) -> "Steering":
        """Set one file's scale (0 removes it), keeping the others."""
        path = str(Path(path).expanduser())
        kept = tuple((p, s) for p, s in self.vectors if p != path)
        return replace(self, vectors=kept + (((path, scale),) if scale != 0 else ()))

    def to_dict(self) -> dict:
        return {"vectors": [{"path": path, "scale": scale} for path, scale in self.vectors]}

    @property
    def is_neutral(self) -> bool:
        return not self.vectors


class Steerer:
    """Builds control-vector matrices for one model; checks each file fits it the first time it is seen."""

    def __init__(self, info: ModelInfo):
        self.info = info
        self._files: dict[str, ControlVectorFile] = {}

    def load(self, path: str | Path) -> ControlVectorFile:
        key = str(Path(path).expanduser())
        if key not in self._files:
            vector_file = read_control_vector(key)
            vector_file.matrix(self.info.n_layer, self.info.n_embd, self.info.name)  # fits, or a clear error
            self._files[key] = vector_file
        return self._files[key]

    def matrix(self, steering: Steering) -> np.ndarray | None:
        """The summed control vector, or None when nothing steers (the exact unsteered graph)."""
        if steering.is_neutral:
            return None
        total = np.zeros((self.info.n_layer, self.info.n_embd), dtype=np.float32)
        for path, scale in steering.vectors:
            total += np.float32(scale) * self.load(path).matrix(self.info.n_layer, self.info.n_embd)
        return total
