"""A conversation with a model: history, system prompt, sampling, steering, and the context window.

Used by ``eqz chat`` (many turns) and ``eqz generate`` (one turn). The CLI only reads input and shows
output; everything that decides what the model sees lives here.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__
from .engine import Model, Sampler
from .generation import Stream
from .models import fingerprint
from .presets import Preset
from .sampling import Sampling, check_setting, make_sampling
from .bank import Bank, train_hint
from .errors import EqzError
from .files import replacing
from .meter import Filters, Instruments, metered_bands
from .steering import Steerer, Steering


def model_record(model: Model) -> dict:
    """How records and transcripts name the model: path, name, fingerprint (the same for every quantization of it,
    so that one bank serves them all) and llama.cpp's file type (which quantization made the reply)."""
    info = model.info
    return {
        "name": info.name,
        "path": info.path,
        "fingerprint": fingerprint(info.architecture, info.n_layer, info.n_embd, info.n_vocab, info.name),
        "file_type": model.file_type,
    }


def context_length(model: Model, wanted: int) -> int:
    """``wanted`` tokens of context, but no more than the model was trained on: beyond that it only costs memory."""
    return min(wanted, model.info.n_ctx_train)


def reply_record(prompt: str, system: str | None, preset: str | None, output: str, model: dict, details: dict) -> dict:
    """The one shape of a reply's record, for ``generate --json`` and batch rows alike (README: "Records"):
    what was asked, the reply, how it was made (``details``: sliders, vectors, sampling, seed, ...), by which model
    and eqz."""
    return {"prompt": prompt, "system": system, "preset": preset, "output": output, **details, "model": model,
            "eqz_version": __version__}


@dataclass
class ReplyRecord:
    """Everything needed to know how one reply came about."""

    seed: int
    sampling: dict
    steering: dict  # Steering.to_dict: sliders, vectors
    changes: list[dict] = field(default_factory=list)  # live changes: at_token, text_offset, sliders, vectors
    n_tokens: int = 0
    finish_reason: str | None = None
    seconds: float = 0.0
    dropped_messages: int = 0
    meter: dict[str, float] | None = None  # mean readout per band over the reply (None: no token was read back)
    metered: bool = False  # the meter was on: the record says "meter", null where nothing was read
    filters: dict | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            **self.steering,
            "sampling": self.sampling,
            "seed": self.seed,
            "changes": self.changes,
            "n_tokens": self.n_tokens,
            "finish_reason": self.finish_reason,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "dropped_messages": self.dropped_messages,
            **({"meter": self.meter} if self.metered else {}),
            **({"filters": self.filters} if self.filters else {}),
        }


class ChatSession:
    """Holds the conversation and one llama.cpp context whose KV cache follows it turn by turn."""

    def __init__(
        self,
        model: Model,
        sampling: Sampling,
        system: str | None = None,
        steering: Steering | None = None,
        n_ctx: int = 4096,
        bank: Bank | None = None,
        meter: bool = False,
        filters: dict | None = None,
    ):
        self.model = model
        # taps (the meter, the filters, held sliders) need the eval callback, which can only be set when the context
        # is made
        taps = bank is not None and bool(metered_bands(bank)) and (meter or bool(filters) or bank.holds_any)
        self.context = model.context(n_ctx=context_length(model, n_ctx), taps=taps)
        self.steerer = Steerer(model.info, bank)
        self.instruments: Instruments | None = None
        self.filters: Filters | None = None  # the user's filters and the held sliders' levels together
        self._asked_filters: dict = {}  # the user's clamp and ablate
        self.meter_on = meter and taps
        self.sampling = sampling
        self.system = system
        self.history: list[dict] = []  # user and assistant messages; assistant ones carry a "reply" record
        self.dropped: list[dict] = []  # the oldest ones, dropped to fit the context: a transcript keeps them
        self._dropped_before_last = 0  # len(dropped) before the last prompt was fitted (forget_unanswered)
        self.preset: str | None = None
        # the seed and reply length the user chose (flags, /seed, /max-tokens): a preset applied later keeps them
        self.own_sampling: dict = {}
        self.unanswered: str | None = None  # a resumed file's last message, which got no reply (eqz chat types it)
        self.steering = Steering()
        self._pending: tuple[Steering, np.ndarray | None] | None = None
        self._pending_lock = threading.Lock()
        self._turn: weakref.ref[Turn] | None = None  # the latest reply, which may be unfinished
        self.set_steering(steering or Steering())
        if taps:
            self.set_filters(**(filters or {}))

    def close(self) -> None:
        self.context.close()

    # -- settings

    def set_steering(self, steering: Steering) -> None:
        """Apply ``steering`` now (between replies). Raises EqzError if a vector does not fit the model. A move
        requested but not yet applied is dropped (it would undo this one at the next reply); build on
        ``pending_or_current_steering`` to keep it."""
        matrix = self._checked_matrix(steering)
        with self._pending_lock:
            self._pending = None
        self._steer(steering, matrix)

    def _checked_matrix(self, steering: Steering) -> np.ndarray | None:
        """``steering``'s added vector, once its held sliders are known to filter (raises EqzError before anything
        changes, not halfway through applying it, or between two tokens of a reply; ``_steer`` makes the filters
        again then, with the user's filters of that moment)."""
        if self.steerer.held(steering) != self.steerer.held(self.steering):
            self._filters_for(steering, self._asked_filters)
        return self.steerer.matrix(steering)

    def _steer(self, steering: Steering, matrix: np.ndarray | None) -> None:
        """Apply ``steering`` (whose added vector is ``matrix``) from the next decode on: the control vector, and
        the filters again where it moves a held slider."""
        held_before = self.steerer.held(self.steering)
        self.context.set_control_vector(matrix)
        self.steering = steering
        if self.steerer.held(steering) != held_before:
            self._refilter()

    def set_filters(self, clamp: dict[str, float] | None = None, ablate: list[str] | None = None) -> None:
        """Clamp bands to levels / notch them to neutral inside the forward pass (empty: no filters). Filters
        refused leave the ones before in place (kept, a bad band failed every later change of the sliders)."""
        kept, self._asked_filters = self._asked_filters, {"clamp": dict(clamp or {}), "ablate": list(ablate or [])}
        try:
            self._refilter()
        except EqzError:
            self._asked_filters = kept
            raise

    def overridden(self, gains: dict[str, float]) -> list[str]:
        """A line for each held slider among ``gains`` that the user's clamp or notch overrides (``Bank.overridden``):
        said where sliders move, as the panel and the record go on showing the gain."""
        bank = self.steerer.bank
        return bank.overridden(gains, self._asked_filters) if bank else []

    def _filters_for(self, steering: Steering, asked: dict) -> Filters:
        """The filters for ``steering``'s held sliders and the user's ``asked`` clamps and notches; EqzError where
        they cannot be made."""
        if self.steerer.bank is None:
            raise EqzError(f"filters act on the bands of an emotion bank, and none fits this model; "
                           f"{train_hint(self.model.info)}")
        if not metered_bands(self.steerer.bank):
            raise EqzError("filters work on metered bands, and this bank has none (imported or described bands only)")
        if not self.context.has_taps:
            raise EqzError("filters need the meter's taps: start eqz chat with --meter")
        return self.steerer.filters(steering, asked)

    def _refilter(self) -> None:
        """Filter with the user's filters and the levels of the held sliders moved now."""
        self.filters = self._filters_for(self.steering, self._asked_filters)
        if self.instruments is None:
            self.instruments = Instruments(self.steerer.bank, meter=self.meter_on, filters=self.filters)
        else:
            self.instruments.set_filters(self.filters)
        self.context.set_tap(self.instruments if self.instruments.layers else None)

    def request_steering(self, steering: Steering) -> None:
        """Ask for ``steering`` from any thread; a streaming reply applies it before its next token."""
        matrix = self._checked_matrix(steering)
        with self._pending_lock:
            self._pending = (steering, matrix)

    def pending_or_current_steering(self) -> Steering:
        """The steering the next token will get: a requested one not yet applied, else the current one."""
        with self._pending_lock:
            return self._pending[0] if self._pending else self.steering

    def _take_pending(self) -> tuple[Steering, np.ndarray | None] | None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        return pending

    def apply_preset(self, preset: Preset) -> None:
        """The preset's sliders, sampling, system prompt and filters replace the session's, as if the chat had
        started with it (the user's own seed and reply length, ``own_sampling``, are kept unless the preset names
        them: they are not a mood's): a previous preset's settings do not linger."""
        steering = Steering(vectors=self.pending_or_current_steering().vectors).with_gains(preset.sliders)
        if preset.filters or self.filters:  # refused before anything changes, not after the sliders moved
            self._filters_for(steering, preset.filters)
        self.set_steering(steering)
        if preset.filters or self.filters:
            self.set_filters(**preset.filters)
        self.sampling = make_sampling(Sampling(**self.own_sampling), **preset.sampling)
        self.system = preset.system
        self.preset = preset.name

    def steering_record(self, steering: Steering | None = None) -> dict:
        """``steering`` (default: the current one) with every band of the bank listed."""
        return (steering or self.steering).to_dict(self.steerer.bands)

    def forget_unanswered(self) -> None:
        """Drop a last user message that got no reply (its reply was stopped before it started); the messages
        dropped to fit it in come back, since the model never read it."""
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()
            self.history[:0] = self.dropped[self._dropped_before_last:]
            del self.dropped[self._dropped_before_last:]

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.history, self.dropped, self._dropped_before_last = [], [], 0

    @property
    def transcribed(self) -> list[dict]:
        """Every message of the conversation: the ones dropped to fit the context, then the ones the model reads."""
        return self.dropped + self.history

    def messages(self, start: int = 0) -> list[dict]:
        """The system prompt and the messages from ``history[start]`` on, as a chat template takes them."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": m["role"], "content": m["content"]} for m in self.history[start:]]

    # -- replies

    def reply(self, user_text: str) -> "Turn":
        """Start the assistant's reply to ``user_text``; iterate the Turn for its text as it streams."""
        unfinished = self._turn() if self._turn else None
        if unfinished is not None:  # a reply left half-read: it ends here, before this one decodes
            unfinished.close()
        else:  # one dropped unread is gone (nothing held it): its message goes too
            self.forget_unanswered()
        pending = self._take_pending()  # a slider moved after the last token of the previous reply
        if pending is not None:
            self._steer(*pending)
        turn = Turn(self, user_text)
        self._turn = weakref.ref(turn)
        return turn

    def _fit_prompt(self) -> tuple[list[int], tuple[str, ...], int]:
        """Tokens of the conversation, dropping the oldest turns until a reply has room; with the stop strings and
        the count of messages dropped."""
        self._dropped_before_last = len(self.dropped)
        room = self.context.n_ctx - self.sampling.reply_room(self.context.n_ctx)
        prompts: dict[int, tuple[list[int], tuple[str, ...]]] = {}

        def fits(start: int) -> bool:  # the prompt of the messages from history[start] on
            text, stops = self.model.chat_prompt(self.messages(start))
            prompts[start] = self.model.tokenize(text, add_special=True, parse_special=True), stops
            return len(prompts[start][0]) <= room

        if fits(0):
            return *prompts[0], 0
        # the fewest whole turns dropped, oldest first, that leave room (all but the last message at most), found by
        # bisection: dropping a turn at a time read a long resumed conversation again for every turn
        history = self.history
        starts = [i for i in range(1, len(history)) if history[i]["role"] == "user"] or [len(history) - 1]
        low, high = 0, len(starts) - 1
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(starts[middle]) else (middle + 1, high)
        start = starts[low]
        if start not in prompts:
            fits(start)
        self.dropped += self.history[:start]
        del self.history[:start]
        return *prompts[start], start

    def transcript(self) -> dict:
        """The whole conversation with every setting, as ``/save`` writes it; a reply streaming now as it is so far."""
        turn = self._turn() if self._turn else None
        streaming = turn.message_so_far() if turn else None
        pending = self._pending  # a move the next token would take (chat.set between replies); read without the
        # lock, which a kill's handler would wait on for ever if it interrupted its holder
        return {
            "eqz_version": __version__,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model_record(self.model),
            "system": self.system,
            "preset": self.preset,
            "sampling": self.sampling.to_dict(),
            "own_sampling": dict(self.own_sampling),  # the user's seed and reply length, which a later preset keeps
            **self.steering_record(pending[0] if pending else None),
            "filters": {"clamp": dict(self._asked_filters.get("clamp", {})),
                        "ablate": list(self._asked_filters.get("ablate", []))},
            "messages": self.transcribed + ([streaming] if streaming else []),
        }

    def transcript_text(self) -> str:
        """``transcript()`` as the JSON ``/save`` writes."""
        return json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: Path) -> None:
        """Write ``transcript()`` to ``path`` as JSON, whole or not at all (a full disk kept half a transcript)."""
        text = self.transcript_text()
        try:
            with replacing(path) as temporary:
                temporary.write_text(text)
        except OSError as error:
            raise EqzError(f"could not write {path}: {error.strerror}") from None


@dataclass(frozen=True)
class SavedConversation:
    """A conversation as ``/save`` (or leaving ``eqz chat``) wrote it, to go on with: its settings as a preset (the
    sliders, sampling, system prompt and filters it had last), its control-vector files, messages and model."""

    settings: Preset
    vectors: list[tuple[str, float]]
    messages: list[dict]
    model: dict
    own_sampling: dict  # the seed and reply length its user chose, which a preset does not replace


def read_conversation(path: Path) -> SavedConversation:
    """The conversation in ``path``; EqzError in one line where it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EqzError(f"{path} does not exist; give a file that /save wrote, or one eqz chat kept on leaving") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EqzError(f"could not read {path} as a saved conversation: {error}") from None
    try:
        messages = data["messages"]
        for message in messages:
            if message["role"] not in ("user", "assistant") or not isinstance(message["content"], str):
                raise ValueError
        sliders = {band: gain for band, gain in dict(data.get("sliders") or {}).items() if gain != 0}  # all listed
        sampling = {key: value for key, value in dict(data.get("sampling") or {}).items() if value is not None}
        vectors = [(entry["path"], entry["scale"]) for entry in data.get("vectors") or []]
        filters = dict(data.get("filters") or {})
        filters = {"clamp": dict(filters.get("clamp") or {}), "ablate": list(filters.get("ablate") or [])}
        if not isinstance(data.get("system"), (str, type(None))):
            raise ValueError
        settings = Preset(data.get("preset"), "", sliders, sampling, data.get("system"), filters, path)
        model = dict(data.get("model") or {})
        own = {key: check_setting(key, value) for key, value in dict(data.get("own_sampling") or {}).items()
               if key in ("seed", "max_tokens") and value is not None}
    except EqzError as error:  # a setting of a hand-edited file
        raise EqzError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise EqzError(f"{path} is not a conversation eqz chat saved (it needs messages with a role and content, "
                       "as /save writes them)") from None
    return SavedConversation(settings, vectors, [dict(message) for message in messages], model, own)


class Turn:
    """One assistant reply, streamed. Iterating yields text pieces; ``record`` says how it was made.

    Steering requested while it streams is applied between two tokens and logged in ``record.changes``
    with the index of the first token it steered. Stopping the iteration early (Ctrl-C) keeps the text so far,
    with what was held back as a possible stop string's start: ``stop()`` yields it last, and a loop left early
    finds it in ``text`` and the history.
    """

    def __init__(self, session: ChatSession, user_text: str):
        self.session = session
        self._asked = {"role": "user", "content": user_text}
        session.history.append(self._asked)
        instruments = session.instruments
        try:
            tokens, stops, dropped = session._fit_prompt()
            if instruments:
                instruments.owners(None)  # the prompt is not part of the reply's readout
            session.context.prefill(tokens)
        except BaseException:  # including Ctrl-C during a long prefill: the message was not answered, and the
            session.forget_unanswered()  # turns dropped for it come back (one too long for the context emptied it)
            raise
        sampling = session.sampling
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        self.record = ReplyRecord(
            seed=seed,
            sampling=replace(sampling, seed=seed).to_dict(),
            steering=session.steering_record(),
            dropped_messages=dropped,
        )
        self._sampler = Sampler(session.model, sampling, seed)
        self._stream = Stream(session.context, self._sampler, sampling.max_tokens, stops)
        self._stop_requested = threading.Event()
        self._steps: Iterator[str] | None = None
        self._started = self._finished = False
        if instruments:
            instruments.owners([self])  # every following decode is one token of this reply

    def __repr__(self) -> str:
        state = self.record.finish_reason or ("streaming" if self._started else "not started")
        return f"<Turn {state}, {len(self._stream.tokens)} tokens: {self.text[:60]!r}>"

    def stop(self) -> None:
        """Ask the reply to end after the current token (safe from a signal handler or another thread)."""
        self._stop_requested.set()

    @contextmanager
    def ctrl_c_stops(self) -> Iterator[None]:
        """While inside, Ctrl-C ends the reply between two tokens instead of raising KeyboardInterrupt, so what was
        written so far is kept and recorded (finish_reason "interrupted")."""
        previous = signal.signal(signal.SIGINT, lambda *_: self.stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @property
    def text(self) -> str:
        return self._stream.text

    def __iter__(self) -> Iterator[str]:
        """The reply's pieces; iterating again goes on where the last iteration stopped (a finished reply yields
        nothing more)."""
        if self._steps is None:
            self._steps = self._generate()
        return self._steps

    def close(self) -> None:
        """End the reply where it is (the session's next reply does this to one left unfinished): recorded as
        interrupted with its text so far, or, not started, with its message forgotten, as if never sent. From the
        thread that iterates it (another thread asks it to end with ``stop``)."""
        if self._finished:
            return
        if self._started:
            self._steps.close()  # runs the generator's finally: recorded and added to the history
            return
        self._finished = True
        self.record.finish_reason = "interrupted"
        self._forget_asked()
        self._sampler.close()
        self._release_instruments()

    def _forget_asked(self) -> None:
        history = self.session.history
        if history and history[-1] is self._asked:
            self.session.forget_unanswered()

    def _release_instruments(self) -> None:
        if self.session.instruments is not None:
            self.session.instruments.owners(None)  # and the meter no longer holds this turn

    def _generate(self) -> Iterator[str]:
        if self._finished:  # closed before it started
            return
        self._started = True
        started = time.perf_counter()
        try:
            for step in self._stream:
                yield step.text
                if self._stop_requested.is_set():
                    if tail := self._stream.release():  # what was held back as a possible stop: shown, and kept
                        yield tail
                    break
                pending = self.session._take_pending()
                if pending is not None and not pending[0].same_as(self.session.steering):  # moves that cancel out
                    self._apply(*pending)
        finally:
            self._stream.release()  # a reply closed early keeps the text it held back too
            self.record.seconds = time.perf_counter() - started
            self.record.n_tokens = len(self._stream.tokens)
            self.record.finish_reason = self._stream.finish_reason or "interrupted"
            if self.session.instruments is not None:  # on for the meter, or for filters alone (held sliders)
                meter = self.session.instruments.mean(self)
                self.record.meter = meter if self.session.meter_on else None
                self.record.metered = self.session.meter_on
                self.record.filters = self.session.filters.describe() if self.session.filters else None
            history = self.session.history
            if history and history[-1] is self._asked:  # not after its question was forgotten (reset, Ctrl-C)
                history.append(self._message(self.record))
            self._finished = True
            self._sampler.close()
            self._release_instruments()

    def _message(self, record: ReplyRecord) -> dict:
        return {"role": "assistant", "content": self._stream.text, "reply": record.to_dict()}

    def message_so_far(self) -> dict | None:
        """The reply as the history will hold it, for a transcript written while it streams (a chat killed
        mid-reply); None once it is in the history, or before it started."""
        if not self._started or self._finished:
            return None
        message = self._message(replace(self.record, n_tokens=len(self._stream.tokens), finish_reason="interrupted"))
        message["content"] += self._stream.held
        return message

    def _apply(self, steering: Steering, matrix: np.ndarray | None) -> None:
        self.session._steer(steering, matrix)
        self.record.changes.append(
            {
                "at_token": len(self._stream.tokens),
                "text_offset": len(self._stream.text),
                **self.session.steering_record(steering),
            }
        )
