"""Hidden states and log-probabilities of many texts at once: the stimuli training reads, the replies the bench
reads back. Texts sharing a prefix compute it once; packs of them fill each decode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .engine import Context
from .errors import EqzError


def _packs(lengths: Sequence[int], n_batch: int, n_slots: int, slots: Sequence[int]) -> Iterator[list[int]]:
    """Group item indices so each pack fits one decode: at most ``n_batch`` tokens and ``n_slots`` sequences
    (item i needs ``slots[i]`` sequences)."""
    pack: list[int] = []
    size = used = 0
    for index, length in enumerate(lengths):
        if length > n_batch or slots[index] > n_slots:
            raise EqzError(f"text group {index} ({length} tokens) does not fit one batch of {n_batch}")
        if pack and (size + length > n_batch or used + slots[index] > n_slots):
            yield pack
            pack, size, used = [], 0, 0
        pack.append(index)
        size += length
        used += slots[index]
    if pack:
        yield pack


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


@dataclass
class TextGroup:
    """Texts that share a prefix: each text is ``prefix + tail``; the prefix is computed once for all."""

    prefix: list[int]
    tails: list[list[int]]
    pool_from: int = 0  # first position pooled and scored (e.g. len(prompt) to read only a reply)


@dataclass
class Reading:
    """What read_texts measured, one row per text in group order."""

    pooled: np.ndarray  # (n_texts, n_layers, n_embd): mean residual stream over the pooled positions
    token_norm: np.ndarray  # (n_layers,): mean L2 norm of one pooled token's residual stream
    logprobs: list[np.ndarray]  # per text: log p of each token at positions >= max(pool_from, 1)


class _PoolingTap:
    """Sums rows into per-text totals while read_texts decodes packed groups."""

    def __init__(self, layers: Sequence[int], n_texts: int, n_embd: int):
        self.layers = frozenset(layers)
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.sums = np.zeros((n_texts, len(layers), n_embd), dtype=np.float64)
        self.norm_sums = np.zeros(len(layers), dtype=np.float64)
        self.norm_rows = 0
        self.segments: list[tuple[int, int, int]] = []  # (text, first row, end row) in the current batch

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        column = self.column[layer]
        for text, start, end in self.segments:
            if end > start:
                rows = hidden[start:end]
                self.sums[text, column] += rows.sum(axis=0)
                self.norm_sums[column] += np.linalg.norm(rows, axis=1).sum()
                if column == 0:
                    self.norm_rows += end - start
        return False


def read_texts(
    context: Context,
    groups: Sequence[TextGroup],
    layers: Sequence[int] = (),
    logprobs: bool = False,
    progress=None,
) -> Reading:
    """Run texts through the model without generating: pooled hidden states at ``layers`` and/or the
    log-probability of every token, under the context's current steering.

    Groups are packed many to a decode, one sequence per text; a group's prefix rows are shared by its texts.
    Without ``logprobs`` the graph stops after the deepest layer read, skipping the rest of the model.
    ``progress(n)`` is called with the number of texts finished after each decode.
    """
    layers = list(layers)
    if layers and max(layers) >= context.n_layer - 1:
        raise ValueError("the last layer only has rows for tokens with logits; it cannot be pooled")
    n_texts = sum(len(group.tails) for group in groups)
    tap = _PoolingTap(layers, n_texts, context.n_embd) if layers else None
    counts = np.zeros(n_texts)
    scores: list[np.ndarray] = [np.zeros(0, np.float32)] * n_texts
    firsts = np.cumsum([0] + [len(group.tails) for group in groups])
    context.clear()
    context.set_tap(tap, stop_after=max(layers) if layers and not logprobs else None)
    try:
        sizes = [len(g.prefix) + sum(len(t) for t in g.tails) for g in groups]
        for pack in _packs(sizes, context.n_batch, context.n_seq, [len(g.tails) for g in groups]):
            tokens, positions, seqs, wanted, segments, targets = [], [], [], [], [], []
            slot = 0
            for index in pack:
                group, first_text = groups[index], int(firsts[index])
                owners = tuple(range(slot, slot + len(group.tails)))
                prefix_row = len(tokens)
                base = len(group.prefix)
                tokens += group.prefix
                positions += range(base)
                seqs += [owners] * base
                first_scored = max(group.pool_from, 1)  # the first position whose token gets a log-probability
                wanted += [logprobs and i >= first_scored - 1 for i in range(base)]
                for k, tail in enumerate(group.tails):
                    text = first_text + k
                    start = max(group.pool_from, 0)
                    segments.append((text, prefix_row + min(start, base), prefix_row + base))
                    tail_row = len(tokens)
                    segments.append((text, tail_row + max(start - base, 0), tail_row + len(tail)))
                    counts[text] = base + len(tail) - start
                    # logits rows predicting tokens at positions >= max(start, 1)
                    full = list(group.prefix) + list(tail)
                    rows = [prefix_row + p - 1 if p - 1 < base else tail_row + p - 1 - base for p in range(first_scored, len(full))]
                    targets.append((text, rows, full[first_scored:]))
                    tokens += tail
                    positions += range(base, base + len(tail))
                    seqs += [owners[k]] * len(tail)
                    wanted += [logprobs and base + i >= first_scored - 1 and i < len(tail) - 1 for i in range(len(tail))]
                slot += len(group.tails)
            if not any(wanted):
                wanted[-1] = True  # llama.cpp wants at least one output
            if tap is not None:
                tap.segments = segments
            context.decode(tokens, positions, seqs, wanted)
            if logprobs:
                for text, rows, goal in targets:
                    if rows:
                        logits = np.stack([context.logits(row) for row in rows])
                        shifted = logits - logits.max(axis=1, keepdims=True)
                        log_norm = np.log(np.exp(shifted).sum(axis=1))
                        scores[text] = (shifted[np.arange(len(rows)), goal] - log_norm).astype(np.float32)
            context.clear()
            if progress:
                progress(sum(len(groups[i].tails) for i in pack))
    finally:
        context.set_tap(None)
        context.clear()
    if tap is None:
        return Reading(np.zeros((n_texts, 0, context.n_embd), np.float32), np.zeros(0), scores)
    pooled = (tap.sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    return Reading(pooled, tap.norm_sums / max(tap.norm_rows, 1), scores)
