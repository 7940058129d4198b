"""Many conversations at once: one decode loop on one llama.cpp context, every running reply a row of each batch
with its own control vector, filters and meter, and sliders that can change while it streams.

llama.cpp's control vector is one per context, so rows are steered through the context's tap instead (the same
float addition, see generation.RowSteering): replies with different moods share every decode. This is what
``eqz serve`` stands on; it knows nothing of HTTP.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .bank import Bank
from .engine import Context, Model
from .errors import EqzError
from .generation import Decoding, PromptHeads, RowSteering, decode_step
from .meter import Filters, geometry, metered_bands
from .sampling import Sampling
from .steering import Steerer, Steering

log = logging.getLogger(__name__)


class ServerBusy(EqzError):
    """Every slot is taken and the waiting line is full; try again shortly."""


class PromptTooLong(EqzError):
    """The prompt leaves no room for a reply in a sequence: a chat client drops its oldest turns and asks again."""


class DecodeLoopStopped(EqzError):
    """The decode thread died of an error: the server's fault, not the request's; no request can run until a
    restart."""


def loop_stopped(error) -> str:
    """What a request caught by the decode loop's failure is told (the log has the traceback)."""
    return f"the server's decode loop stopped ({error}); it needs a restart"


@dataclass(eq=False)
class Request:
    """One reply to generate. ``on_event(kind, data)`` is called from the decode thread: ("piece", text) as
    the reply grows, ("meter", readouts) after each token when metered, then once ("done", record), or
    ("error", message) instead if the decode loop fails."""

    prompt: list[int]
    sampling: Sampling
    steering: Steering
    stops: tuple[str, ...] = ()
    filters: dict = field(default_factory=dict)  # {"clamp": {band: level}, "ablate": [band]}
    meter: bool = False
    on_event: Callable[[str, object], None] = lambda kind, data: None
    id: str = ""
    seed: int = 0
    shared: int = 0  # leading prompt tokens other requests share (chat template, system prompt, earlier turns)
    changes: list[dict] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # its steering's control vector and filters, made when it is submitted or re-steered while waiting (a refusal
    # reaches the caller, and the decode thread only takes them)
    prepared: tuple[np.ndarray | None, Filters | None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Stop after the current token and free the slot (a client that went away)."""
        self.cancelled.set()


class _Row(Decoding):
    """A request running on one sequence: besides its reply (generation.Decoding), its vector, filters, prompt head
    and meter sums."""

    def __init__(self, server: "BatchServer", request: Request, seq: int, head: tuple):
        super().__init__(server.model, seq, len(request.prompt), request.sampling, request.seed, request.stops)
        self.request = request
        self.head = head
        self.vector, self.filters = request.prepared
        self.meter_sum: np.ndarray | None = None
        self.meter_count = 0
        # new sliders (their vector, held sliders' filters and steering), applied at the next decode
        self.pending: tuple[np.ndarray | None, Filters | None, Steering] | None = None

    def apply_pending(self, bands: tuple[str, ...]) -> None:
        """Take new sliders between two decodes (never in the middle of one), and log the change."""
        if self.pending is None:
            return
        before = self.request.steering
        self.vector, self.filters, self.request.steering = self.pending
        self.pending = None
        if self.request.steering.same_as(before):  # a reset with every slider at 0 already: nothing changed
            return
        self.request.changes.append({"at_token": len(self.reply.tokens), "text_offset": len(self.reply.assembler.text),
                                     **self.request.steering.to_dict(bands)})

    def take(self, context: Context, row: int) -> str | None:
        """Sample the next token and tell the client what it added."""
        piece = super().take(context, row)
        if piece:
            self.request.on_event("piece", piece)
        return piece


class _RowTap:
    """The context's tap: per row, add its control vector (generation.RowSteering), apply its filters, read its
    meter, in that order (as a chat does: the control vector is part of l_out, which the filters rewrite and the
    meter reads)."""

    def __init__(self, bank: Bank | None, layers: list[int]):
        self.metered = metered_bands(bank) if bank is not None else ()
        self.read_layer = bank.read_layer if self.metered else None
        self._geometry = geometry(bank, self.read_layer, self.metered) if self.metered else None
        self.layers = frozenset(layers)
        self._steering = RowSteering(layers)
        self.rows: list[_Row] = []  # who each row of the next decode belongs to
        self.reply_rows = False  # whether the next decode's rows are reply tokens (the meter reads only those)

    def announce(self, rows: list[_Row], reply: bool) -> None:
        """Before a decode: whose rows these are, and whether they are reply tokens."""
        self.rows, self.reply_rows = rows, reply
        self._steering.rows = [(row.vector, row.filters) for row in rows]

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        changed = self._steering(layer, hidden)
        if self._geometry is not None and layer == self.read_layer and self.reply_rows:
            readouts = self._geometry.readouts(hidden)
            for index, row in enumerate(self.rows[: len(hidden)]):
                if row.request.meter:
                    row.meter_sum = readouts[index] if row.meter_sum is None else row.meter_sum + readouts[index]
                    row.meter_count += 1
                    row.request.on_event("meter", dict(zip(self.metered, map(float, readouts[index]))))
        return changed


class BatchServer:
    """Runs requests ``parallel`` at a time on one context, in a thread of its own. ``submit`` queues a request
    (at most ``max_waiting`` wait for a slot, then ServerBusy); ``resteer`` changes a running request's sliders
    from its next token on; ``cancel`` ends one (a client that left); ``close`` cancels everything and stops the
    thread."""

    def __init__(self, model: Model, bank: Bank | None, parallel: int = 4, per_sequence: int = 2048,
                 max_waiting: int = 64):
        self.model = model
        self.bank = bank
        self.steerer = Steerer(model.info, bank)
        self.parallel = parallel
        self.per_sequence = per_sequence
        self.max_waiting = max_waiting
        layers = bank.steered_layers if bank is not None else list(range(1, model.info.n_layer))
        self.tap = _RowTap(bank, layers)
        self.context = model.context(n_ctx=per_sequence * parallel, n_seq=parallel, n_batch=512, taps=True,
                                     unified=False)
        self.context.set_tap(self.tap)
        self._heads = PromptHeads(self.context)  # used by the decode thread only
        self._waiting: deque[Request] = deque()
        self._running: dict[str, _Row] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eqz-decode", daemon=True)
        self._thread.start()

    # -- called from other threads

    def submit(self, request: Request) -> Request:
        reserve = request.sampling.reply_room(self.per_sequence)  # as a chat keeps room for its reply
        if len(request.prompt) + reserve > self.per_sequence:
            raise PromptTooLong(f"the prompt has {len(request.prompt)} tokens and its reply needs room for {reserve}; "
                                f"each reply has {self.per_sequence} tokens in all (prompt and reply)")
        request.prepared = self._prepare(request.steering, request.filters)  # refused here, not in the decode loop
        with self._wake:
            if self.error is not None:
                raise DecodeLoopStopped(loop_stopped(self.error))
            if self._closed:
                raise DecodeLoopStopped("the server was closed; start another (EqzModel.server)")
            if len(self._waiting) + len(self._running) >= self.parallel + self.max_waiting:
                slots = "the one slot is" if self.parallel == 1 else f"all {self.parallel} slots are"
                waiting = "1 request waits" if self.max_waiting == 1 else f"{self.max_waiting} requests wait"
                raise ServerBusy(f"{slots} busy and {waiting}; retry in a moment")
            request.id = request.id or f"eqz-{next(self._ids)}-{random.randrange(16**8):08x}"
            self._waiting.append(request)
            self._wake.notify()
        return request

    def resteer(self, request_id: str, gains: dict[str, float]) -> Steering:
        """Move some sliders of a running request from its next token on (the decode thread picks them up); the
        others keep their latest setting, a change not yet applied included, so moves made one at a time add up.
        Returns the steering the next token gets."""
        with self._wake:
            row = self._running.get(request_id)
            if row is None:
                waiting = next((request for request in self._waiting if request.id == request_id), None)
                if waiting is None:
                    raise KeyError(request_id)
                steering = waiting.steering.with_gains(gains)
                # it starts under these sliders: no change to log
                waiting.prepared, waiting.steering = self._prepare(steering, waiting.filters), steering
                return steering
            steering = (row.pending[2] if row.pending else row.request.steering).with_gains(gains)
            row.pending = (*self._prepare(steering, row.request.filters), steering)
        return steering

    def cancel(self, request: Request) -> None:
        """End a request: a running one after its current token, a waiting one at once, so that its place in the
        line is free for the next client (it gets its "done" now). A no-op once it is done."""
        request.cancel()
        with self._wake:
            if request not in self._waiting:
                return
            self._waiting.remove(request)
        request.on_event("done", self._record(None, request, "cancelled"))

    def _prepare(self, steering: Steering, filters: dict) -> tuple[np.ndarray | None, Filters | None]:
        """The control vector and filters a row under ``steering`` is decoded with; an EqzError where a filter
        names a band the meter cannot read."""
        return self.steerer.matrix(steering), self.steerer.filters(steering, filters)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._wake:
            return len(self._running), len(self._waiting)

    def close(self) -> None:
        """Cancel every request (each still gets its "done") and free the context once the decode thread is out."""
        with self._wake:
            self._closed = True
            for request in [*self._waiting, *(row.request for row in self._running.values())]:
                request.cancel()
            self._wake.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # still inside a decode: closing its context would wait for it
            self.context.close()

    # -- the decode thread

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._closed:
                        break
                    starting = []
                    busy = {row.seq for row in self._running.values()}
                    free = [seq for seq in range(self.parallel) if seq not in busy]
                    while self._waiting and free:
                        request = self._waiting.popleft()
                        if request.cancelled.is_set():
                            request.on_event("done", self._record(None, request, "cancelled"))
                            continue
                        head = PromptHeads.head(request.prompt, request.shared,
                                                (request.steering, json.dumps(request.filters, sort_keys=True)))
                        seq = self._heads.pick(free, head)
                        free.remove(seq)
                        row = _Row(self, request, seq, head)
                        self._running[request.id] = row
                        starting.append(row)
                for row in starting:
                    self._start(row)
                self._step()
        except BaseException as error:  # a failure here must reach every waiting client, not vanish
            # and the log: it is the server's fault, and every request from now on gets only its one line (unless
            # the server was closing: the model's close() then ends a decode that outlived close()'s wait)
            if not self._closed:
                log.error("the decode loop stopped; no request can run until a restart", exc_info=error)
            with self._wake:
                self.error = error
                rows = list(self._running.values())
                self._running.clear()
                waiting = list(self._waiting)
                self._waiting.clear()
            for row in rows:
                row.request.on_event("error", str(error))
            for request in waiting:
                request.on_event("error", str(error))
        finally:
            with self._wake:
                rows = list(self._running.values())
                self._running.clear()
                waiting = list(self._waiting)
                self._waiting.clear()
            for row in rows:
                self._finish(row, "cancelled")
            for request in waiting:
                request.on_event("done", self._record(None, request, "cancelled"))

    def _start(self, row: _Row) -> None:
        """Decode the prompt into the row's sequence (steered and filtered like its reply; a head the sequence
        kept from the last request under the same settings is skipped) and sample token one."""
        self._heads.decode(row.seq, row.request.prompt, row.head,
                           before_chunk=lambda size: self.tap.announce([row] * size, reply=False))
        row.take(self.context, -1)

    def _step(self) -> None:
        """Finish rows that are done or cancelled, then decode one token for every running row."""
        with self._wake:
            rows = sorted(self._running.values(), key=lambda r: r.seq)
        for row in rows:
            reason = "cancelled" if row.request.cancelled.is_set() else row.reply.finish_reason
            if reason or row.next_token is None:
                self._finish(row, reason or "length")
        with self._wake:
            rows = sorted(self._running.values(), key=lambda r: r.seq)
            for row in rows:
                row.apply_pending(self.steerer.bands)
        decode_step(self.context, rows, lambda run: self.tap.announce(run, reply=True))

    def _finish(self, row: _Row, reason: str) -> None:
        with self._wake:
            self._running.pop(row.request.id, None)
        self._heads.release(row.seq)
        tail = row.reply.assembler.flush()
        if tail:
            row.request.on_event("piece", tail)
        row.sampler.close()
        row.request.on_event("done", self._record(row, row.request, reason))

    def _record(self, row: _Row | None, request: Request, reason: str) -> dict:
        """How the reply came about (the record shape of generate --json, less what HTTP adds)."""
        meter = None
        if row is not None and row.meter_count:
            meter = {band: round(float(value), 4)
                     for band, value in zip(self.tap.metered, row.meter_sum / row.meter_count)}
        return {
            **request.steering.to_dict(self.steerer.bands),
            "sampling": request.sampling.to_dict(),
            "seed": request.seed,
            "changes": request.changes,
            "n_prompt_tokens": len(request.prompt),
            "n_tokens": len(row.reply.tokens) if row else 0,
            "finish_reason": reason,
            "output": row.reply.assembler.text if row else "",
            **({"meter": meter} if request.meter else {}),  # null: no token was read back (a one-token reply)
            **({"filters": request.filters} if request.filters else {}),
        }
