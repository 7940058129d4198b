"""Generating replies: one streamed reply on a context (chat, generate), and many replies at once in one
batch (batch, eval, training), both ending by the same rule (ReplyText)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .engine import Context, Model, Sampler, SpeakerLine, consecutive_runs
from .errors import EqzError
from .reading import PrefixCache, common_prefix_length
from .sampling import Sampling


@dataclass
class Step:
    """One generated token and the text it completes (possibly empty while a UTF-8 sequence is open).

    A last Step with ``token`` None may flush text held back while it could have begun a stop string.
    """

    token: int | None
    text: str


class _TextAssembler:
    """Token bytes -> text: completes UTF-8 sequences across tokens and holds back a possible stop string."""

    def __init__(self, model: Model, stops: Sequence[str]):
        self.model = model
        self.stops = tuple(stops)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.held = ""
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text that is safe to show, whether a stop string was reached)."""
        self.held += self.decoder.decode(self.model.piece(token))
        emit, self.held, stopped = _split_at_stop(self.held, self.stops)
        self.text += emit
        return emit, stopped

    def flush(self) -> str:
        """The text held back; a character cut off by the reply's end is dropped, not shown as U+FFFD."""
        tail = self.held
        self.decoder.reset()
        self.held = ""
        self.text += tail
        return tail


class ReplyText:
    """One reply's tokens and text, and the one rule for when it ends (a Stream and every parallel slot use it):
    an end-of-turn token ends it unseen ("stop"), a stop string ends it ("stop"), then ``max_tokens`` ("length"),
    then a full context: no position left to decode the token just taken ("context")."""

    def __init__(self, model: Model, stops: Sequence[str], max_tokens: int, ignore_eos: bool):
        self.model = model
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.assembler = _TextAssembler(model, stops)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def add(self, token: int, room: bool) -> str | None:
        """Take a sampled token (``room``: a position is left to decode it); returns the text it makes safe to
        show, or None for an end-of-turn token (not part of the reply), and sets ``finish_reason`` when the reply
        is over."""
        if self.model.is_eog(token) and not self.ignore_eos:
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        emit, stopped = self.assembler.push(token)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        elif not room:
            self.finish_reason = "context"
        return emit


class Stream:
    """Tokens of one reply on sequence 0 after ``context.prefill``, sampled and decoded one at a time.

    Each Step is yielded *before* its token is decoded, so a control vector set while handling step k
    steers the logits of step k+1: a slider moved mid-reply changes the very next token.
    ``finish_reason`` ends as "stop", "length" or "context" (see ReplyText). ``ignore_eos`` keeps going past
    end-of-turn tokens (fixed-length runs for benchmarks and tests).
    """

    def __init__(self, context: Context, sampler: Sampler, max_tokens: int, stop: Sequence[str] = (),
                 ignore_eos: bool = False):
        self.context = context
        self.sampler = sampler
        self._reply = ReplyText(context.model, stop, max_tokens, ignore_eos)

    @property
    def text(self) -> str:
        return self._reply.assembler.text

    @property
    def tokens(self) -> list[int]:
        return self._reply.tokens

    @property
    def finish_reason(self) -> str | None:
        return self._reply.finish_reason

    @property
    def held(self) -> str:
        """Text not yet shown because it may begin a stop string ("\nThe" may open a base model's "\nThe man:")."""
        return self._reply.assembler.held

    def release(self) -> str:
        """The held text, which is the reply's own once the reply ends here (its end, or cut short by the user)."""
        return self._reply.assembler.flush()

    def __iter__(self) -> Iterator[Step]:
        context, reply = self.context, self._reply
        while reply.finish_reason is None:
            position = len(context.session_tokens)
            token = self.sampler.sample(context, -1)
            emit = reply.add(token, room=position < context.n_ctx)
            if emit is None:
                break
            yield Step(token, emit)
            if reply.finish_reason is None:
                context.decode([token], [position], [0], [True])
                context.session_tokens.append(token)
        if tail := self.release():
            yield Step(None, tail)


def _split_at_stop(text: str, stops: Sequence[str | SpeakerLine]) -> tuple[str, str, bool]:
    """Split ``text`` into (safe to show, held back, stopped): hold back a possible start of a stop string."""
    for stop in stops:
        index = stop.find(text) if isinstance(stop, SpeakerLine) else text.find(stop)
        if index >= 0:
            return text[:index], "", True
    hold = 0
    for stop in stops:
        if isinstance(stop, SpeakerLine):
            hold = max(hold, stop.pending(text))
            continue
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


@dataclass(eq=False)  # jobs are told apart by identity (the meter accumulates per job)
class Job:
    """One reply to generate in parallel with others. Jobs with the same ``vector_key`` share a control vector."""

    prompt: Sequence[int]
    sampling: Sampling
    seed: int
    stop: tuple[str, ...] = ()
    vector: np.ndarray | None = None
    vector_key: object = None
    tag: object = None
    ignore_eos: bool = False
    shared: int = 0  # leading prompt tokens other jobs with this vector_key share (a chat template, a system prompt)
    filters: object = None  # meter.Filters for this job's rows (row steering only); vector_key must tell them apart


@dataclass
class Finished:
    job: Job
    tokens: list[int]
    text: str
    finish_reason: str


class Decoding:
    """A reply being decoded on sequence ``seq`` of a parallel context: its sampler, its text so far and where its
    next token goes. Parallel generation and the server run their rows as these (``decode_step``)."""

    def __init__(self, model: Model, seq: int, prompt_length: int, sampling: Sampling, seed: int,
                 stops: Sequence[str], ignore_eos: bool = False):
        self.seq = seq
        self.sampler = Sampler(model, sampling, seed)
        self.reply = ReplyText(model, stops, sampling.max_tokens, ignore_eos)
        self.position = prompt_length
        self.next_token: int | None = None  # None once the reply is over

    @property
    def finish_reason(self) -> str | None:
        return self.reply.finish_reason

    def take(self, context: Context, row: int) -> str | None:
        """Sample the next token from batch row ``row``; returns the text it makes safe to show (see ReplyText)."""
        token = self.sampler.sample(context, row)
        piece = self.reply.add(token, room=self.position < context.n_ctx // context.n_seq)
        self.next_token = None if self.reply.finish_reason else token
        return piece


def decode_step(context: Context, rows: Sequence[Decoding], announce: Callable[[Sequence[Decoding]], None]) -> None:
    """Decode every row's next token (``rows`` sorted by sequence) and sample the one after: one decode per run of
    consecutive sequences (see consecutive_runs), each ``announce``d first, so tap rows are the rows in order."""
    for span in consecutive_runs([row.seq for row in rows]):
        run = rows[span]
        announce(run)
        context.decode([row.next_token for row in run], [row.position for row in run], [row.seq for row in run],
                       [True] * len(run))
        for index, row in enumerate(run):
            row.position += 1
            row.take(context, index)


class _Slot(Decoding):
    """One job running on a sequence of a parallel batch."""

    def __init__(self, context: Context, job: Job, seq: int):
        super().__init__(context.model, seq, len(job.prompt), job.sampling, job.seed, job.stop, job.ignore_eos)
        self.job = job

    def result(self) -> Finished:
        self.reply.assembler.flush()
        self.sampler.close()
        return Finished(self.job, self.reply.tokens, self.reply.assembler.text, self.reply.finish_reason or "length")


def template_head(model: Model, messages: Sequence[dict]) -> list[int]:
    """The tokens every conversation that differs from ``messages`` only in its last message's text starts with
    (chat template, system prompt, earlier turns): what a prompt cache can keep between such prompts."""
    first, second = (model.tokenize(model.chat_prompt([*messages[:-1], {**messages[-1], "content": text}])[0],
                                    parse_special=True) for text in ("A", "B"))
    return first[: common_prefix_length(first, second)]


class PromptHeads:
    """The prompt head each sequence's cache keeps from position 0, so the next prompt there that starts with
    the same tokens under the same steering skips them.

    A head is (leading tokens, steering key): the key says what steered and filtered the tokens' cache entries.
    Every prompt is decoded in the same two pieces, head then rest, whether its head was cached or not, so a
    reply does not depend on which sequence ran it or what ran there before. A head computed on one sequence is
    saved and restored on the others (bit-identical to decoding it there alone).
    """

    def __init__(self, context: Context):
        self.context = context
        self._kept: dict[int, tuple] = {}
        self._saved = PrefixCache(max_bytes=128 * 2**20)

    @staticmethod
    def head(prompt: Sequence[int], shared: int, key: object) -> tuple:
        """The head of ``prompt`` whose first ``shared`` tokens others share (it keeps a token of its own)."""
        return tuple(prompt[: min(shared, len(prompt) - 1)]), key

    def pick(self, free: Sequence[int], head: tuple) -> int:
        """A free sequence that already holds ``head``, else the first free one."""
        return next((seq for seq in free if self._kept.get(seq) == head), free[0])

    def decode(self, seq: int, prompt: Sequence[int], head: tuple,
               before_chunk: Callable[[int], None] | None = None) -> None:
        """Decode ``prompt`` into ``seq``: its head unless the sequence holds it already, then the rest."""
        tokens = head[0]
        if self._kept.get(seq) != head:
            self.context.forget(seq)
            self._kept.pop(seq, None)
            if tokens:
                saved = self._saved.get(head)
                if saved is not None:
                    self.context.restore_sequence(saved[0], seq)
                else:
                    self.context.decode_prompt(list(tokens), seq, before_chunk=before_chunk)
                    self._saved.put(head, self.context.save_sequence(seq))
                self._kept[seq] = head
        self.context.decode_prompt(list(prompt[len(tokens):]), seq, len(tokens), before_chunk=before_chunk)

    def release(self, seq: int) -> None:
        """A reply on ``seq`` is over: drop all but its head."""
        self.context.forget(seq, len(self._kept[seq][0]) if seq in self._kept else 0)


class RowSteering:
    """Per-sequence control vectors and filters: adds each batch row's own vector to the residual stream after
    each layer, then applies the row's filters (meter.Filters) to the result, as a chat's tap does.

    llama.cpp's control vector is one per context; writing ``l_out-N + v`` back through a tap is the same float
    addition its ``ggml_add`` does, so a row steered here gets exactly the tokens the context vector would give,
    while rows with different settings share one batch.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = frozenset(layers)
        self.rows: list[tuple[np.ndarray | None, object]] = []  # (vector, filters) per batch row

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        changed = False
        for row, (vector, filters) in enumerate(self.rows[: len(hidden)]):
            if vector is not None and np.any(vector[layer]):
                hidden[row] += vector[layer]
                changed = True
            if filters is not None:
                changed = filters.apply(layer, hidden[row : row + 1]) or changed
        return changed


def generate_parallel(
    context: Context,
    jobs: Iterable[Job],
    window: int | None = None,
    on_decode: Callable[[list | None], None] | None = None,
    row_steering: Sequence[int] | None = None,
) -> Iterator[Finished]:
    """Generate many jobs, up to ``context.n_seq`` at a time in one batch, yielding results in job order.

    ``on_decode(rows)`` is told, before each decode, which job each batch row is a reply token of (None for a
    decode of prompt tokens): how a meter on the context's tap attributes its readings.
    ``row_steering`` (the steered layers) applies each job's ``vector`` to its own rows through a tap instead of
    the context's control vector, so jobs with different vectors run together (the context needs taps).

    Every sequence's logits are computed exactly as if it ran alone (llama.cpp's CPU kernels work row by row
    and flash attention skips other sequences' cells), so outputs do not depend on the parallelism. Except on
    F16 weights (the unpacked copy training decodes through): there a micro-batch of one row takes llama.cpp's
    vector kernel instead of its matrix one (which needs two rows) and rounds differently, so a reply can
    change with whether its sequence ran alone in some step. And except on K-quants (Q4_K_M, Q6_K): llama.cpp
    multiplies a step of 4 or more rows with kernels that round differently from its one-row one
    (benchmarks/parallel_rows.py).
    A job's first ``shared`` prompt tokens are its head (see PromptHeads): computed once per sequence for every
    job under the same vector that starts with them.
    Jobs are read lazily; at most ``window`` finished results wait for an earlier, slower job.
    """
    window = window or 4 * context.n_seq
    steering = RowSteering(row_steering) if row_steering is not None else None
    if steering is not None:
        context.set_tap(steering)
        context.set_control_vector(None)

    def announce(rows: list[Job], reply: bool) -> None:
        """Before a decode: whose rows these are (for the row steering and the meter)."""
        if steering is not None:
            steering.rows = [(job.vector, job.filters) for job in rows]
        if on_decode:
            on_decode(rows if reply else None)

    try:
        queue = iter(jobs)
        upcoming: Job | None = next(queue, None)
        active: dict[int, tuple[int, _Slot]] = {}  # seq -> (job number, slot)
        done: dict[int, Finished] = {}
        started = emitted = 0
        current_key: object = object()
        context.clear()
        heads = PromptHeads(context)
        while upcoming is not None or active or done:
            # finish slots that are done first, so their sequences take new jobs in this very step: a hole in the
            # batch would cost a step its full width and split it in two micro-batches (see consecutive_runs)
            for seq in [s for s, (_, slot) in active.items() if slot.finish_reason]:
                number, slot = active.pop(seq)
                heads.release(seq)
                done[number] = slot.result()
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
            # start jobs while there is room, the vector matches, and results are not piling up
            while (
                upcoming is not None
                and len(active) < context.n_seq
                and started - emitted < window
                and (steering is not None or not active or upcoming.vector_key == current_key)
            ):
                if steering is None and upcoming.filters:
                    # only the row tap applies a job's filters: without it the job would run unfiltered, unseen
                    raise ValueError("a job with filters needs row_steering (the steered layers)")
                if steering is None and upcoming.vector_key != current_key:
                    context.set_control_vector(upcoming.vector)
                    current_key = upcoming.vector_key
                prompt = list(upcoming.prompt)
                head = PromptHeads.head(prompt, upcoming.shared, upcoming.vector_key)
                seq = heads.pick([s for s in range(context.n_seq) if s not in active], head)
                slot = _Slot(context, upcoming, seq)
                if len(prompt) >= context.n_ctx // context.n_seq:
                    raise EqzError(
                        f"a prompt of {len(prompt)} tokens does not fit the {context.n_ctx // context.n_seq} "
                        "tokens each parallel sequence has; shorten it"
                    )
                prompt_rows = lambda size: announce([slot.job] * size, reply=False)  # noqa: E731
                heads.decode(seq, prompt, head, before_chunk=prompt_rows)
                slot.take(context, -1)
                active[seq] = (started, slot)
                started += 1
                upcoming = next(queue, None)
            # decode one token for every running slot (a job can be done at its first token)
            running = sorted((slot for _, slot in active.values() if not slot.finish_reason), key=lambda s: s.seq)
            decode_step(context, running, lambda run: announce([slot.job for slot in run], reply=True))
    finally:
        if steering is not None:
            context.set_tap(None)
