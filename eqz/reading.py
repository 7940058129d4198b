"""Hidden states and log-probabilities of many texts at once: the stimuli training reads, the replies the bench
reads back. Texts sharing a prefix compute it once; packs of them fill each decode."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

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


def shared_head_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``prompts`` share (a chat template, a system prompt): the head a parallel
    run computes once and restores for the others (generation.Job.shared); 0 for a single prompt."""
    return min((common_prefix_length(prompts[0], other) for other in prompts[1:]), default=0)


@dataclass
class TextGroup:
    """Texts that share a prefix: each text is ``prefix + tail``; the prefix is computed once for all."""

    prefix: list[int]
    tails: list[list[int]]
    pool_from: int = 0  # first position pooled and scored (e.g. len(prompt) to read only a reply)


def group_tails(prefix: list[int], tails: Sequence[list[int]], n_batch: int, pool_from: int = 0,
                max_texts: int = 63) -> list[TextGroup]:
    """``tails`` after one ``prefix``, in order, as few groups as fit one decode each (prefix and tails within
    ``n_batch`` tokens, at most ``max_texts`` texts)."""
    groups: list[TextGroup] = []
    size = 0
    for tail in tails:
        if not groups or size + len(tail) > n_batch or len(groups[-1].tails) == max_texts:
            groups.append(TextGroup(prefix, [], pool_from=pool_from))
            size = len(prefix)
        groups[-1].tails.append(list(tail))
        size += len(tail)
    return groups


@dataclass
class Reading:
    """What read_texts measured, one row per text in group order."""

    pooled: np.ndarray  # (n_texts, n_layers, n_embd): mean residual stream over the pooled positions
    token_norm: np.ndarray  # (n_layers,): mean L2 norm of one pooled token's residual stream
    logprobs: list[np.ndarray]  # per text: log p of each token at positions >= max(pool_from, 1)
    next_logprobs: np.ndarray | None = None  # (n_texts, len(next_tokens)): log p of each after the text's end


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


class PrefixCache:
    """Saved KV caches of prefixes, kept between decodes so a prefix computed once is restored (a memcpy) wherever
    it comes again: reading, the heads calibration reads replies after under every strength it tries (a persona
    and a prompt: ~60% of each read); generation, the chat template and system prompt every job starts with.
    Each entry may keep the logits after its last token (a read scores the next token with them). Least recently used dropped beyond
    ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[bytes, np.ndarray | None]] = OrderedDict()  # state, next logits
        self._bytes = 0

    def get(self, key: Hashable) -> tuple[bytes, np.ndarray | None] | None:
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key: Hashable, state: bytes, next_logits: np.ndarray | None = None) -> None:
        if key in self._entries:
            self._bytes -= _size(*self._entries.pop(key))
        self._entries[key] = (state, next_logits)
        self._bytes += _size(state, next_logits)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._bytes -= _size(*self._entries.popitem(last=False)[1])


def _size(state: bytes, next_logits: np.ndarray | None) -> int:
    return len(state) + (0 if next_logits is None else next_logits.nbytes)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def read_texts(
    context: Context,
    groups: Sequence[TextGroup],
    layers: Sequence[int] = (),
    logprobs: bool = False,
    progress=None,
    cache: PrefixCache | None = None,
    next_tokens: Sequence[int] = (),
) -> Reading:
    """Run texts through the model without generating: pooled hidden states at ``layers`` and/or the
    log-probability of every token, under the context's current steering.

    Groups are packed many to a decode, one sequence per text; a group's prefix rows are shared by its texts.
    Without ``logprobs`` the graph stops after the deepest layer read, skipping the rest of the model.
    With a ``cache`` (unsteered reads with ``logprobs`` only: the key is the tokens), prefixes that are not pooled
    are decoded in a decode of their own and kept; a prefix read before is restored instead of computed.
    ``next_tokens``: also the log-probability of each of these tokens coming right after every text (a judge's
    answer to a question the text ends with).
    ``progress(n)`` is called with the number of texts finished after each decode.
    """
    layers = list(layers)
    if layers and max(layers) >= context.n_layer - 1:
        raise ValueError("the last layer only has rows for tokens with logits; it cannot be pooled")
    if cache is not None and (not logprobs or context.control_vector is not None):
        raise ValueError("a prefix cache holds unsteered full-graph states: read with logprobs and no steering")
    n_texts = sum(len(group.tails) for group in groups)
    tap = _PoolingTap(layers, n_texts, context.n_embd) if layers else None
    counts = np.zeros(n_texts)
    scores: list[np.ndarray] = [np.zeros(0, np.float32)] * n_texts
    next_tokens = list(next_tokens)
    if next_tokens and any(not tail for group in groups for tail in group.tails):
        raise ValueError("next_tokens reads after every text's last token: no tail may be empty")
    following = np.zeros((n_texts, len(next_tokens)), np.float32) if next_tokens else None
    last_rows: list[tuple[int, int]] = []  # (text, batch row of its last token) in the current decode
    firsts = np.cumsum([0] + [len(group.tails) for group in groups])
    context.clear()
    context.set_tap(tap, stop_after=max(layers) if layers and not (logprobs or next_tokens) else None)
    try:
        sizes = [len(g.prefix) + sum(len(t) for t in g.tails) for g in groups]
        for pack in _packs(sizes, context.n_batch, context.n_seq, [len(g.tails) for g in groups]):
            if tap is not None:
                tap.segments = []  # held prefixes are never pooled
            packed = [groups[i] for i in pack]
            sequences = _sequences(packed)
            held = _hold_prefixes(context, packed, sequences, cache)
            tokens, positions, seqs, wanted, segments, targets = [], [], [], [], [], []
            for position, (index, owners) in enumerate(zip(pack, sequences)):
                group, first_text = groups[index], int(firsts[index])
                base = len(group.prefix)
                first_scored = max(group.pool_from, 1)  # the first position whose token gets a log-probability
                prefix_row = len(tokens)
                if position not in held:
                    tokens += group.prefix
                    positions += range(base)
                    seqs += [owners] * base
                    wanted += [logprobs and i >= first_scored - 1 for i in range(base)]
                for k, tail in enumerate(group.tails):
                    text = first_text + k
                    start = max(group.pool_from, 0)
                    if position not in held:
                        segments.append((text, prefix_row + min(start, base), prefix_row + base))
                    tail_row = len(tokens)
                    segments.append((text, tail_row + max(start - base, 0), tail_row + len(tail)))
                    counts[text] = base + len(tail) - start
                    # where the logits predicting positions >= first_scored come from: a batch row, or
                    # (position base, after a held prefix) the prefix's stored ones
                    full = list(group.prefix) + list(tail)
                    rows = [(prefix_row + p - 1 if position not in held else -1) if p - 1 < base
                            else tail_row + p - 1 - base for p in range(first_scored, len(full))]
                    targets.append((text, rows, full[first_scored:], held.get(position)))
                    tokens += tail
                    positions += range(base, base + len(tail))
                    seqs += [owners[k]] * len(tail)
                    wanted += [logprobs and base + i >= first_scored - 1 and i < len(tail) - 1
                               or (bool(next_tokens) and i == len(tail) - 1) for i in range(len(tail))]
                    if next_tokens:
                        last_rows.append((text, len(tokens) - 1))
            if not any(wanted):
                wanted[-1] = True  # llama.cpp wants at least one output
            if tap is not None:
                tap.segments = segments
            context.decode(tokens, positions, seqs, wanted)
            if logprobs:
                for text, rows, goal, prefix_logits in targets:
                    if rows:
                        scored = _log_softmax(np.stack([prefix_logits if row < 0 else context.logits(row)
                                                        for row in rows]))
                        scores[text] = scored[np.arange(len(rows)), goal].astype(np.float32)
            for text, row in last_rows:
                following[text] = _log_softmax(context.logits(row))[next_tokens]
            last_rows.clear()
            context.clear()
            if progress:
                progress(sum(len(groups[i].tails) for i in pack))
    finally:
        context.set_tap(None)
        context.clear()
    if tap is None:
        return Reading(np.zeros((n_texts, 0, context.n_embd), np.float32), np.zeros(0), scores, following)
    pooled = (tap.sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    return Reading(pooled, tap.norm_sums / max(tap.norm_rows, 1), scores, following)


def _sequences(pack: list[TextGroup]) -> list[tuple[int, ...]]:
    """The sequence of every text of each group in one decode, numbered in order."""
    ends = np.cumsum([len(group.tails) for group in pack])
    return [tuple(range(end - len(group.tails), end)) for group, end in zip(pack, map(int, ends))]


def _hold_prefixes(context: Context, pack: list[TextGroup], sequences: list[tuple[int, ...]],
                   cache: PrefixCache | None) -> dict[int, np.ndarray]:
    """Put the prefixes of ``pack`` (one decode's groups on their ``sequences``) that ``cache`` may hold into those
    sequences: restored where cached, else decoded alone and cached. Returns pack position -> the logits after that
    prefix; the positions not in it are decoded with their tails."""
    if cache is None:
        return {}
    held: dict[int, np.ndarray] = {}
    missing: list[tuple[int, tuple[int, ...]]] = []
    for position, (group, owners) in enumerate(zip(pack, sequences)):
        if not group.prefix or group.pool_from < len(group.prefix):
            continue
        stored = cache.get(tuple(group.prefix))
        if stored is None:
            missing.append((position, owners))
            continue
        context.restore_sequence(stored[0], owners[0])
        for owner in owners[1:]:
            context.share(owners[0], owner)
        held[position] = stored[1]
    if missing:
        tokens, positions, seqs, wanted = [], [], [], []
        for position, owners in missing:
            prefix = pack[position].prefix
            tokens += prefix
            positions += range(len(prefix))
            seqs += [owners] * len(prefix)
            wanted += [i == len(prefix) - 1 for i in range(len(prefix))]
        context.decode(tokens, positions, seqs, wanted)
        last_row = np.cumsum([len(pack[position].prefix) for position, _ in missing]) - 1
        for (position, owners), row in zip(missing, last_row):
            held[position] = context.logits(int(row))
            cache.put(tuple(pack[position].prefix), context.save_sequence(owners[0]), held[position])
    return held
