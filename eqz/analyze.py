"""``eqz analyze``: how the model itself reads a text, band by band, per sentence or per token."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import numpy as np

from .bank import Bank
from .engine import Model
from .errors import EqzError
from .meter import geometry, metered_bands

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass
class Segment:
    text: str
    readouts: dict[str, float] | None  # calibrated, mean over the segment's tokens; None: the unread first token


@dataclass
class Analysis:
    bands: tuple[str, ...]
    segments: list[Segment]
    overall: dict[str, float]

    def top_band(self, among: tuple[str, ...]) -> str:
        return max(among, key=lambda band: self.overall[band])

    def to_dict(self) -> dict:
        return {
            "bands": list(self.bands),
            "overall": self.overall,
            "segments": [{"text": s.text, "readouts": s.readouts} for s in self.segments],
        }


class _Recorder:
    def __init__(self, layer: int):
        self.layers = frozenset([layer])
        self.rows: list[np.ndarray] = []

    def __call__(self, _layer: int, hidden: np.ndarray) -> bool:
        self.rows.append(hidden)
        return False


def analyze(model: Model, bank: Bank, text: str, by: str = "sentence") -> Analysis:
    """Per-token readouts at the bank's read layer, grouped by sentence or token.

    The first token is left out of every mean: it is an attention sink whose state says nothing about the text.
    By token it is still listed, unread, so the segments spell the whole text.
    """
    if by not in ("sentence", "token"):
        raise EqzError(f"--by (by in the library) must be 'sentence' or 'token', got {by!r}")
    bands = metered_bands(bank)
    if not bands:
        raise EqzError("this bank has no calibrated bands to read (imported vectors only)")
    if not text.strip():  # blank text still reads as something (valence -2), which would mean nothing
        raise EqzError("the text is blank: give some words to analyze")
    tokens = model.tokenize(text)
    if len(tokens) < 2:
        raise EqzError("the text is too short to analyze (it needs at least two tokens)")
    if len(tokens) > model.info.n_ctx_train:  # past its trained length a model's states are not what the meter knows
        raise EqzError(f"the text is {len(tokens)} tokens, more than the {model.info.n_ctx_train} {model.info.name} "
                       "reads at once; analyze it in parts")
    shape = geometry(bank, bank.read_layer, bands, zero="neutral_text")
    recorder = _Recorder(bank.read_layer)
    with model.context(n_ctx=max(512, len(tokens) + 8), n_batch=min(2048, max(512, len(tokens))), taps=True) as ctx:
        ctx.set_tap(recorder)
        ctx.prefill(tokens)
    readouts = shape.readouts(np.concatenate(recorder.rows))
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character split over tokens goes to its last
    pieces = [decoder.decode(model.piece(token)) for token in tokens]
    starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    if by == "token":
        groups = [(pieces[i], [i]) for i in range(1, len(tokens))]
    else:
        rendered = "".join(pieces)
        bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(rendered)] + [len(rendered)]
        # a token belongs to the sentence its first letter is in: " I" of "Hi. I am sad." starts at the space
        anchors = [start + len(piece) - len(piece.lstrip()) if piece.strip() else start
                   for start, piece in zip(starts, pieces)]
        groups = []
        for left, right in zip(bounds, bounds[1:]):
            members = [i for i in range(1, len(tokens)) if left <= anchors[i] < right]
            if members and rendered[left:right].strip():
                groups.append((rendered[left:right].strip(), members))
    segments = [Segment(pieces[0], None)] if by == "token" and tokens[0] != model.bos else []
    segments += [
        Segment(label, {b: round(float(v), 3) for b, v in zip(bands, readouts[members].mean(axis=0))})
        for label, members in groups
    ]
    overall = {b: round(float(v), 3) for b, v in zip(bands, readouts[1:].mean(axis=0))}
    return Analysis(bands, segments, overall)
