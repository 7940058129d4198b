"""The analyzer and the filters of the equalizer, in numpy: band readouts of the residual stream, and
clamping or notching band components inside the forward pass (through the engine's writable taps).

Units are the bank's calibrated ones: 0 is the model's neutral level on a band, 1 the typical level on
clearly emotional text of that band (measured per layer when the bank was trained).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .bank import Bank
from .directions import calibrated
from .errors import EqzError


@dataclass
class LayerGeometry:
    """The metered bands at one layer: unit directions (bands, n_embd), neutral levels and units."""

    bands: tuple[str, ...]
    directions: np.ndarray
    neutral: np.ndarray
    unit: np.ndarray
    negative_unit: np.ndarray  # the unit below neutral (directions.readout_levels)

    def readouts(self, hidden: np.ndarray) -> np.ndarray:
        """(rows, n_embd) -> (rows, bands) calibrated readouts."""
        return calibrated(hidden @ self.directions.T, self.neutral, self.unit, self.negative_unit)

    def levels(self, targets: np.ndarray) -> np.ndarray:
        """The projections at which the bands read ``targets`` (the inverse of readouts)."""
        return self.neutral + targets * np.where(targets >= 0, self.unit, self.negative_unit)


def metered_bands(bank: Bank) -> tuple[str, ...]:
    """Bands with a calibrated readout (imported bands have none)."""
    return tuple(name for name, band in bank.bands.items() if band.readout)


def geometry(bank: Bank, layer: int, bands: tuple[str, ...], zero: str = "neutral") -> LayerGeometry:
    """Directions and calibration of ``bands`` at ``layer`` (which must be a steered layer).

    ``zero`` picks the neutral level: "neutral" is the model's own level on its unsteered replies to neutral
    prompts (the meter and the filters, which watch the model write); "neutral_text" is its level on neutral
    prose (``eqz analyze``, which reads a given text). The unit is the same for both.
    """
    position = bank.steered_layers.index(layer)
    entries = [bank.bands[band] for band in bands]
    return LayerGeometry(
        bands,
        np.stack([entry.unit_direction(layer, bank.steered_layers) for entry in entries]).astype(np.float32),
        # banks trained before replies gave the zero have only the neutral-prose level
        np.array([entry.readout.get(zero, entry.readout["neutral"])[position] for entry in entries], dtype=np.float32),
        np.array([entry.readout["unit"][position] for entry in entries], dtype=np.float32),
        # banks before format 2 have one unit for both sides
        np.array([entry.readout.get("negative_unit", entry.readout["unit"])[position] for entry in entries],
                 dtype=np.float32),
    )


class Filters:
    """Hold band components at fixed levels (clamp) or at the neutral level (ablate) at every steered layer.

    Several bands are solved together: with U the bands' unit directions, h' = h + U^T a with a chosen so that
    U h' hits every target exactly, moving h as little as possible (directions need not be orthogonal).
    ``held``: the levels of held sliders (``Bank.held``); the user's own clamps and notches win over them, and
    ``describe`` names only the user's.
    """

    def __init__(self, bank: Bank, clamp: dict[str, float], ablate: list[str], held: dict[str, float] | None = None):
        targets = {**(held or {}), **{band: 0.0 for band in ablate}, **clamp}
        valid = metered_bands(bank)
        unknown = [band for band in targets if band not in valid]
        if unknown:
            raise EqzError(f"cannot filter '{unknown[0]}': filters work on metered bands (not imported or described "
                           f"ones): {', '.join(valid)}")
        self.clamp = dict(clamp)
        self.ablate = tuple(band for band in ablate if band not in clamp)
        self.targets = targets
        self.bands = tuple(targets)
        self.layers = list(bank.steered_layers) if targets else []
        self._solve = {}
        for layer in self.layers:
            shape = geometry(bank, layer, self.bands)
            wanted = shape.levels(np.array([targets[b] for b in self.bands], dtype=np.float32))
            gram = shape.directions @ shape.directions.T
            # the directions need not be independent: the eight primaries span 7 (LDA over 8 classes), and valence
            # and arousal are made of them. Only the real ones are inverted (the default cut-off inverted ~1e-8
            # noise: readouts of +-40 and broken text), and levels the tied directions cannot all reach are refused
            gram_inverse = np.linalg.pinv(gram, rcond=1e-4)
            if np.abs(wanted - gram @ gram_inverse @ wanted).max() > 1e-3 * (1 + np.abs(wanted).max()):
                raise EqzError(f"too many bands filtered at once to hold them all ({', '.join(self.bands)}): in this "
                               "bank the eight primaries' directions span only 7 dimensions (and valence and "
                               "arousal are made of them); clamp, notch or hold fewer (a moved held slider counts)")
            self._solve[layer] = (shape.directions, wanted, gram_inverse)

    def __bool__(self) -> bool:
        return bool(self.targets)

    @property
    def asked(self) -> bool:
        """The user asked for clamps or notches (beyond what held sliders hold)."""
        return bool(self.clamp or self.ablate)

    def describe(self) -> dict | None:
        """The user's clamps and notches as records hold them; None when only held sliders filter."""
        return {"clamp": self.clamp, "ablate": list(self.ablate)} if self.asked else None

    def apply(self, layer: int, hidden: np.ndarray) -> bool:
        """Rewrite ``hidden`` (rows, n_embd) in place; True if this layer is filtered."""
        solve = self._solve.get(layer)
        if solve is None:
            return False
        directions, wanted, gram_inverse = solve
        # einsum, not @: BLAS multiplies one row and many rows with different roundings, and a row must come out the
        # same whether it is filtered alone (the server, per request) or with others (a chat's prompt)
        missing = wanted[None, :] - np.einsum("re,ke->rk", hidden, directions)
        hidden += np.einsum("rk,ke->re", np.einsum("rk,kj->rj", missing, gram_inverse), directions)
        return True


class Instruments:
    """The engine tap for the meter and the filters together.

    The meter reads the residual stream at the read layer as the model carries it on, that is after that
    layer's filter has written it, so a clamped or notched band reads at its target there by construction.
    What the filters change downstream shows in the text (the tests compare it with the unfiltered reply).
    """

    def __init__(self, bank: Bank, meter: bool, filters: Filters | None = None):
        self.read_layer = bank.read_layer
        self.metered = metered_bands(bank) if meter else ()
        self._geometry = geometry(bank, self.read_layer, self.metered) if self.metered else None
        self.set_filters(filters)
        self.latest: np.ndarray | None = None  # readouts of the last row read
        self._owners: list | None = None  # who each row of the next decode belongs to (None: not metered)
        self._sums: dict = defaultdict(lambda: np.zeros(len(self.metered)))
        self._counts: dict = defaultdict(int)

    def set_filters(self, filters: Filters | None) -> None:
        """Filter with ``filters`` from the next decode on (the meter's sums are kept); set the tap again, since the
        layers it needs may change."""
        self.filters = filters if filters else None
        self.layers = frozenset(([self.read_layer] if self.metered else []) + (self.filters.layers if self.filters else []))

    def owners(self, rows: list | None) -> None:
        """Name the owner of each row of the next decode; rows owned by None are not accumulated."""
        self._owners = rows

    def mean(self, owner) -> dict[str, float] | None:
        """Mean readout per band over the rows accumulated for ``owner`` (and forget them); None where none was read
        (a one-token reply: a reply's last token is sampled, never read back), as the server's records have it."""
        total, count = self._sums.pop(owner, None), self._counts.pop(owner, 0)
        if total is None or count == 0:
            return None
        return {band: round(float(value), 4) for band, value in zip(self.metered, total / count)}

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        written = bool(self.filters) and self.filters.apply(layer, hidden)
        if self._geometry is not None and layer == self.read_layer:
            readouts = self._geometry.readouts(hidden)
            self.latest = readouts[-1]
            if self._owners is not None:
                for row, owner in enumerate(self._owners[: len(readouts)]):
                    if owner is not None:
                        self._sums[owner] += readouts[row]
                        self._counts[owner] += 1
        return written
