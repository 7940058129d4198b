"""llama.cpp control-vector GGUF files: read, check against a model, write.

The format is llama.cpp's (and repeng's): one 1-D F32 tensor ``direction.N`` per steered layer N >= 1,
``general.architecture = controlvector``, ``controlvector.model_hint`` and ``controlvector.layer_count``.
A file eqz writes is what ``llama-cli --control-vector-scaled FILE 1.0`` applies, and the other way round.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import EqzError
from .files import replacing
from .sampling import is_whole, whole_number

ARCHITECTURE = "controlvector"


@dataclass
class ControlVectorFile:
    path: Path
    directions: dict[int, np.ndarray]  # layer N -> (n_embd,) float32
    model_hint: str | None

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    def matrix(self, n_layer: int, n_embd: int, model_name: str = "the model") -> np.ndarray:
        """The file as an (n_layer, n_embd) matrix for a model of that shape, or a one-line error."""
        if self.n_embd != n_embd:
            raise EqzError(
                f"{self.path} has n_embd {self.n_embd} but {model_name} has {n_embd}: "
                f"it was made for another model{self._hint()}; use a vector trained for this model"
            )
        top = max(self.directions)
        if top >= n_layer:
            raise EqzError(
                f"{self.path} steers layer {top} but {model_name} has layers 0-{n_layer - 1}: "
                f"it was made for another model{self._hint()}; use a vector trained for this model"
            )
        matrix = np.zeros((n_layer, n_embd), dtype=np.float32)
        for layer, direction in self.directions.items():
            matrix[layer] = direction
        return matrix

    def _hint(self) -> str:
        return f" ({self.model_hint})" if self.model_hint else ""


def read_control_vector(path: str | Path) -> ControlVectorFile:
    path = Path(path).expanduser()
    if path.is_dir():
        raise EqzError(f"{path} is a folder; give a control vector's .gguf file")
    if not path.is_file():
        raise EqzError(f"control vector not found: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise EqzError(f"{path} is not a GGUF control vector (the file does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:
        raise EqzError(f"{path} is truncated or corrupt ({error}); write or copy it again") from None
    architecture = _string_field(reader, "general.architecture")
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        layer = whole_number(index)
        if prefix != "direction" or layer is None:
            continue
        if layer == 0:
            raise EqzError(f"{path}: direction.0 is invalid (llama.cpp control vectors start at layer 1)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise EqzError(f"{path}: {tensor.name} is {tensor.tensor_type.name}, control vectors are F32")
        directions[layer] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not directions:
        if architecture and architecture != ARCHITECTURE:
            raise EqzError(f"{path} is a '{architecture}' model, not a control vector; load it as the model (--model; "
                           "eqz.load(FILE) in the library)")
        raise EqzError(f"{path} has no direction.N tensors; it is not a llama.cpp control vector")
    sizes = {len(direction) for direction in directions.values()}
    if len(sizes) != 1:
        raise EqzError(f"{path}: its directions have different lengths {sorted(sizes)}; the file is broken")
    if any(not np.all(np.isfinite(direction)) for direction in directions.values()):
        raise EqzError(f"{path} contains NaN or infinite values; the file is broken")
    return ControlVectorFile(path, directions, _string_field(reader, "controlvector.model_hint"))


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


NOT_FINITE = "the control vector is not finite (a scale too large for float32, or NaN); use smaller scales"


def write_control_vector(path: str | Path, matrix: np.ndarray, model_hint: str) -> Path:
    """Write the non-zero rows of ``matrix`` (n_layer, n_embd) as ``direction.N`` tensors."""
    if str(path) == "-":
        raise EqzError("a control vector is a binary .gguf file, not text for stdout; give a file name, such as "
                       "mix.gguf")
    named = str(path)
    path = Path(path).expanduser()
    if path.is_dir() or named.endswith(("/", os.sep)):  # "out/" wrote a file named out
        raise EqzError(f"{path} is a folder; give a file name, such as {path / 'mix.gguf'}")
    if not np.isfinite(matrix).all():
        raise EqzError(NOT_FINITE)
    layers = [layer for layer in range(1, len(matrix)) if np.any(matrix[layer])]
    if not layers:
        raise EqzError(f"the control vector is zero on every layer: it steers nothing, and a file of it has no "
                       f"directions to read; {path} not written")
    if np.any(matrix[0]):
        raise EqzError("layer 0 cannot be steered; a control vector starts at layer 1")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as temporary:
            writer = gguf.GGUFWriter(str(temporary), ARCHITECTURE)
            writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
            writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(layers))
            for layer in layers:
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(matrix[layer], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            _check_written(temporary, path, matrix)
    except OSError as error:
        if writer is not None:
            writer.close()
        raise EqzError(f"cannot write {path}: {error.strerror or error}; choose another file") from None
    return path


def _check_written(temporary: Path, path: Path, matrix: np.ndarray) -> None:
    """The file just written reads back as ``matrix``, before it replaces ``path``: on a full disk the GGUF writer's
    numpy writes came out short without an error, and the cut-off file replaced a bank's good one."""
    try:
        written = read_control_vector(temporary).matrix(*matrix.shape)
    except EqzError:
        written = None
    if written is None or not np.array_equal(written, matrix.astype(np.float32)):
        raise EqzError(f"cannot write {path}: the file came out short or wrong (is the disk full?); "
                       f"{'the earlier file is kept' if path.exists() else 'nothing was written'}")


@dataclass(frozen=True, eq=False)
class ControlVector:
    """A control vector as a value: an (n_layer, n_embd) matrix (row N is added to layer N's output) that adds,
    subtracts and scales like one, and saves as the llama.cpp control-vector GGUF that ``--vector`` and
    ``llama-cli --control-vector`` read."""

    matrix: np.ndarray
    model_hint: str = "llama"

    def __post_init__(self) -> None:
        """Any array-like of numbers becomes the float32 matrix llama.cpp adds; anything else is one line."""
        try:
            matrix = np.asarray(self.matrix, dtype=np.float32)
        except (TypeError, ValueError):
            matrix = None
        if matrix is None or matrix.ndim != 2:
            got = type(self.matrix).__name__ if matrix is None else f"shape {matrix.shape}"
            raise EqzError(f"a control vector is an (n_layer, n_embd) matrix of numbers, such as np.zeros((30, 576)); "
                           f"got {got}")
        object.__setattr__(self, "matrix", matrix)

    def __add__(self, other: "ControlVector") -> "ControlVector":
        if not isinstance(other, ControlVector):
            raise EqzError(f"a control vector adds up only with another control vector, not {type(other).__name__}; "
                           "scale it with * instead")
        if other.matrix.shape[1] != self.matrix.shape[1] or (
                len(other.matrix) != len(self.matrix) and other.model_hint != self.model_hint):
            raise EqzError(f"control vectors of shapes {self.matrix.shape} and {other.matrix.shape} do not add up; "
                           "they were made for different models")
        # fewer rows: the layers past them are not steered (a file read without the model's n_layer ends at its
        # last direction), as llama.cpp reads them
        rows = max(len(self.matrix), len(other.matrix))
        total = np.zeros((rows, self.matrix.shape[1]), dtype=np.float32)
        total[: len(self.matrix)] += self.matrix
        total[: len(other.matrix)] += other.matrix
        return ControlVector(total, self.model_hint)

    def __radd__(self, other: int) -> "ControlVector":
        """``0 + vector`` is the vector, so that ``sum(vectors)`` adds them up."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return self + other  # __add__'s one line

    def __sub__(self, other: "ControlVector") -> "ControlVector":
        return self + (-other if isinstance(other, ControlVector) else other)  # anything else: __add__'s one line

    def __mul__(self, scale: float) -> "ControlVector":
        with np.errstate(over="ignore", invalid="ignore"):  # too large: saving or applying it says so, in one line
            return ControlVector(self.matrix * self._scale(scale), self.model_hint)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "ControlVector":
        self._scale(scale)  # a real number (a tiny one is 0 as float32, but not here: saving says "too large")
        if scale == 0:
            raise EqzError("a control vector cannot be divided by 0; multiply it by 0 for one that steers nothing")
        return self * (1.0 / scale)

    def __neg__(self) -> "ControlVector":
        return self * -1.0

    @staticmethod
    def _scale(scale) -> np.float32:
        """A real number to scale by, as float32 (a bool or a string is none)."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise EqzError(f"a control vector is scaled by a number, such as 0.5, not by a {type(scale).__name__}")
        return np.float32(scale)

    def save(self, path: str | Path) -> Path:
        return write_control_vector(path, self.matrix, self.model_hint)

    @classmethod
    def load(cls, path: str | Path, n_layer: int | None = None, n_embd: int | None = None) -> "ControlVector":
        """A control-vector GGUF as a value; give the model's ``n_layer``/``n_embd`` to check it fits (default:
        just enough layers for the file)."""
        if any(size is not None and not is_whole(size, 1) for size in (n_layer, n_embd)):
            raise EqzError(f"n_layer and n_embd are the model's sizes, whole numbers such as model.info.n_layer; got "
                           f"{n_layer!r} and {n_embd!r}")
        vector_file = read_control_vector(path)
        matrix = vector_file.matrix(n_layer or max(vector_file.directions) + 1, n_embd or vector_file.n_embd)
        return cls(matrix, vector_file.model_hint or "llama")


def parse_scaled_path(spec: str, option: str = "--vector") -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, scale). The scale must be a finite number."""
    if ":" in spec and not Path(spec).expanduser().exists():
        name, _, scale_text = spec.rpartition(":")
    else:
        name, scale_text = spec, "1"
    try:
        scale = float(scale_text)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise EqzError(f"invalid scale '{scale_text}' in {option} {spec}; write FILE:SCALE with a finite number, "
                       "e.g. joy.gguf:0.8")
    return Path(name).expanduser(), scale

