"""eqz as a library: load a model, steer it with sliders, presets and control vectors, generate or chat with live
changes, read what it feels, train bands. The CLI is a client of this module; so are notebooks and scripts.

    import eqz
    model = eqz.load()
    print(model.generate("Describe your morning.", sliders={"joy": 1}, seed=3))
    with model.chat(preset="curious") as chat:
        for piece in chat.send("Tell me about the sea."):
            chat.set(joy=0.5)  # from the next token on, also mid-reply

Errors are ``EqzError``s with one-line messages; warnings (a slider past its calibrated range, a band that
failed its direction check) go to ``model.on_warning``, by default Python's ``warnings``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .analyze import Analysis, analyze
from .bands import band_key, check_described, check_gain, gain_warnings, keyed_by_band
from .bank import (CALIBRATION_REPLY_TOKENS, MANIFEST, SHIPPED_DIR, Bank, FoundBank, adopt_vector, describe_setup,
                   editing, find_bank, known_band_names, own_bank_directory, require_bank, reset_user_bank, resolve_bank, shadowed,
                   shipped_bank, weighs_as_calibration, writable_bank)
from .bank import list_banks as found_banks
from .engine import Model, backends, gpu_offload
from .errors import EqzError
from .generation import template_head
from .models import ModelInfo, resolve_model_path
from .presets import Preset, PresetEntry, check_name, discover, get_preset, load_preset_file, resolve
from .presets import save_preset as write_preset
from .reading import common_prefix_length
from .scoring import lexicon_missing
from .sampling import EVAL_MIN_TOKENS, MIN_CONTEXT, SETTING_NAMES, as_number, check_setting, is_whole
from .session import ChatSession, Turn, model_record, read_conversation
from .steering import Steerer, Steering, absolute_path
from .vector_files import ControlVector

if TYPE_CHECKING:
    from .batch import BatchPlan
    from .eval import EvalResult
    from .serving import BatchServer, Request


def _flags_checked(function):
    """Refuse anything but True or False for a parameter annotated ``bool``: ``replace="no"`` is true in Python, and
    did what it did not say."""
    signature = inspect.signature(function)
    flags = [name for name, parameter in signature.parameters.items()
             if parameter.annotation in ("bool", "bool | None")]

    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            given = signature.bind(*args, **kwargs).arguments
        except TypeError:  # a missing or unknown argument: Python's own error says it best
            return function(*args, **kwargs)
        for name in flags:
            value = given.get(name, False)
            optional = signature.parameters[name].annotation != "bool"
            if not isinstance(value, (bool, np.bool_)) and not (value is None and optional):
                raise EqzError(f"{name} takes True or False, got {value!r}")
        return function(*args, **kwargs)

    return checked



class EqzWarning(UserWarning):
    """Something the user should hear about that does not stop the run."""


def _python_warning(message: str) -> None:
    """Warn at the first caller outside eqz, whichever API function led here (Python 3.11 has no
    ``skip_file_prefixes``)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, EqzWarning, stacklevel=level)


class EqzModel:
    """A loaded GGUF model and the emotion bank that fits it (found by fingerprint when first needed)."""

    def __init__(self, model: Model, bank: Bank | None = None):
        self.model = model
        self._bank = bank
        self._chosen = bank  # load(bank=...): the bank edits, which change the user's own copy, leave it be
        self.on_warning: Callable[[str], None] = _python_warning

    def __repr__(self) -> str:
        bank = f"bank {self._bank.directory}" if self._bank is not None else "bank found when first used"
        return f"<EqzModel {self.info.name} ({self.model.path.name}); threads={self.threads}; {bank}>"

    @property
    def info(self) -> ModelInfo:
        """What the GGUF file says of the model: name, architecture, layers, width, trained context, chat template."""
        return self.model.info

    @property
    def threads(self) -> int:
        """The CPU threads llama.cpp decodes with."""
        return self.model.threads

    @property
    def model_record(self) -> dict:
        """How records name this model: name, path and fingerprint."""
        return model_record(self.model)

    @property
    def bank(self) -> Bank:
        """The bank of sliders for this model; an EqzError says how to train one if there is none."""
        if self._bank is None:
            self._bank = require_bank(self.info)
        return self._bank

    def bank_if_any(self, required: bool = False) -> Bank | None:
        """The model's bank, or None when it has none; ``required``: an EqzError instead, as ``bank`` gives (the
        settings asked for need sliders)."""
        if required:
            return self.bank
        if self._bank is None:
            self._bank = find_bank(self.info)
        return self._bank

    def close(self) -> None:
        """Free the weights now (``with eqz.load() as model:`` does it at the block's end)."""
        self.model.close()

    def __enter__(self) -> "EqzModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the one place presets, sliders, vectors, sampling and filters are merged

    @_flags_checked
    def session(
        self,
        *,
        preset: str | Path | Preset | None = None,
        sliders: dict[str, float] | None = None,
        vectors: Iterable[tuple[str | Path, float]] = (),
        system: str | None = None,
        sampling: dict | None = None,
        clamp: dict[str, float] | None = None,
        ablate: Iterable[str] = (),
        meter: bool = False,
        n_ctx: int = 4096,
        resume: str | Path | None = None,
    ) -> ChatSession:
        """A conversation set up from a preset, then the explicit settings on top of it (they win). ``resume``: a
        file ``/save`` wrote (or ``eqz chat`` kept on leaving), whose messages it goes on with and whose last
        settings stand in for a preset."""
        return self._session_maker(preset=preset, sliders=sliders, vectors=vectors, system=system, sampling=sampling,
                                   clamp=clamp, ablate=ablate, meter=meter, n_ctx=n_ctx, resume=resume)()

    def _session_maker(self, preset=None, sliders=None, vectors=(), system=None, sampling=None, clamp=None, ablate=(),
                       meter=False, n_ctx=4096, resume=None) -> Callable[[], ChatSession]:
        """``session``'s settings checked and merged now (bad ones raise, warnings are given); the session, with its
        context (a KV cache of ``n_ctx`` tokens), is made when the returned function is called."""
        messages, own_sampling, file_vectors, unanswered = [], {}, [], None
        if resume is not None:
            if preset is not None:
                raise EqzError("a resumed conversation brings its own settings, so give it or a preset, not both (a "
                               "preset can follow: /preset in chat, session.apply_preset in Python)")
            if not isinstance(resume, (str, Path)):
                raise EqzError(f"resume takes a saved conversation's path, such as 'chat.json'; got {resume!r}")
            saved = read_conversation(Path(resume).expanduser())
            if saved.model.get("fingerprint") != model_record(self.model)["fingerprint"]:
                self._warn(f"{resume} was a conversation with {saved.model.get('name') or 'another model'}; it goes "
                           f"on with {self.info.name}")
            messages, file_vectors = saved.messages, saved.vectors
            if messages and messages[-1]["role"] == "user":  # the next reply dropped it in silence
                unanswered, messages = messages[-1]["content"], messages[:-1]
                self._warn(f"{resume} ends with a message that got no reply (the chat ended while the model read "
                           "it); send it again for one")
            own_sampling = saved.own_sampling  # the seed and reply length its user chose, kept under a later preset
        sliders, clamp, ablate = _band_settings(sliders, clamp, ablate)
        n_ctx = _whole(n_ctx, "n_ctx", MIN_CONTEXT)
        if n_ctx > self.info.n_ctx_train:  # it was cut to that in silence
            self._warn(f"a context of {n_ctx} tokens is more than {self.info.name} was trained on; it holds "
                       f"{self.info.n_ctx_train}")
        if system is not None:
            _text(system, "system")
        sampling, vectors = _mapping(sampling, "sampling", "{'temperature': 0.7}"), _vector_pairs(vectors)
        bank = self.bank_if_any(required=bool(sliders or preset or clamp or ablate))  # a resumed file asks for none:
        valid = bank.names if bank else ()  # its bands this model lacks are left out, and said
        if resume is not None:
            preset = _within_bank(saved.settings, valid, resume, self._warn)
            try:  # the file's own settings, apart from the options given beside it
                resolve(preset, valid)
            except EqzError as error:  # a hand-edited file: say which
                raise EqzError(f"{resume}: {error}") from None
        resolved = resolve(_preset_of(preset, valid), valid, sliders, sampling, system, clamp, ablate)
        steering = Steering().with_gains(resolved.gains)
        for path, scale in vectors:
            steering = steering.plus_vector(path, scale)
        steering = self._under(steering, {absolute_path(path) for path, _ in vectors}, file_vectors, resume)
        _warn_of(self.on_warning, {band: resolved.gains[band] for band in sliders or {}}, bank, dict(steering.gains))
        for line in bank.overridden(dict(steering.gains), resolved.filters) if bank else []:
            self.on_warning(line)

        def make() -> ChatSession:
            session = ChatSession(self.model, resolved.sampling, system=resolved.system, steering=steering,
                                  n_ctx=n_ctx, bank=bank, meter=meter, filters=resolved.filters)
            session.preset = resolved.preset
            session.history, session.unanswered = list(messages), unanswered
            session.own_sampling = {**own_sampling, **{key: getattr(resolved.sampling, key) for key in
                                                       ("seed", "max_tokens") if (sampling or {}).get(key) is not None}}
            return session

        return make

    def _under(self, steering: Steering, given: set[str], file_vectors: list[tuple[str, float]], resume) -> Steering:
        """``steering`` with a resumed file's vector files other than the ``given`` ones (a file given again takes
        the given scale; 0 leaves it out). One that is gone or made for another model is left out, and said:
        refusing it left no way to go on but editing the file."""
        steerer = Steerer(self.info)
        for path, scale in _vector_pairs(file_vectors):
            if absolute_path(path) in given:
                continue
            try:
                steerer.load(path)
            except EqzError as error:
                self._warn(f"{resume}: {error}; it goes on without that vector")
                continue
            steering = steering.plus_vector(path, scale)
        return steering

    # -- the user's own copy of the model's bank, as `eqz vectors` changes it

    def slider_mix(self, sliders: dict[str, float] | None = None,
                   preset: str | Path | Preset | None = None) -> dict[str, float]:
        """What a preset's sliders with ``sliders`` on top come to, band by band (``sliders`` win)."""
        sliders = _band_settings(sliders, None, ())[0]
        valid = self.bank.names
        return resolve(_preset_of(preset, valid), valid, sliders).gains

    def control_vector(self, sliders: dict[str, float] | None = None,
                       preset: str | Path | Preset | None = None) -> ControlVector:
        """One llama.cpp control vector for a slider mix, on top of a preset's sliders (``sliders`` win);
        ``.save(path)`` writes it for ``llama-cli --control-vector``. A preset's filters and sampling do not travel,
        and a held band goes in as its vector (warned): a control vector can only add."""
        bank, gains = self.bank, self.slider_mix(sliders, preset)
        if not any(gains.values()):
            raise EqzError("nothing to export: the mix moves no slider; give at least one non-zero --set BAND=GAIN "
                           "(sliders in the library), or a --preset NAME (preset) that moves one")
        if held := bank.held(gains):
            one = len(held) == 1
            self._warn(f"{', '.join(held)} {'holds' if one else 'hold'} a level in eqz, which a control vector cannot "
                       f"do: the file adds {'its vector' if one else 'their vectors'} instead, which steer"
                       f"{'s' if one else ''} less clearly on held-out prompts")
        return bank.vector(gains)

    @_flags_checked
    def import_vector(self, path: str | Path, band: str, replace: bool = False) -> Path:
        """Adopt a repeng or llama.cpp control-vector file as slider ``band`` (gain 1 = the file as it is; unmetered:
        the meter, analyze and filters do not read it). Returns the bank's directory."""
        name = band_key(_text(band, "band"))
        if not isinstance(path, (str, Path)):  # a number or bytes was a raw TypeError
            raise EqzError(f"import_vector takes a control vector file's path, such as 'joy.gguf'; got {path!r}")
        with self._editing("importing a vector"):
            bank = writable_bank(self.info)
            if name in bank.bands and not replace:
                raise EqzError(f"the bank already has a band '{name}'; pass --replace (replace=True in the library) "
                               "to replace it (`eqz vectors reset` restores the shipped bank), or choose another band "
                               "name")
            adopt_vector(bank, path, name, self.info)
            return self._keep(bank)

    def hold(self, band: str, level: float | None) -> Path | None:
        """Make slider ``band`` hold its band at ``level`` (meter units, up to 6) instead of adding its vector: gain g
        holds g x level at every steered layer. None: add the vector again. Returns the bank's directory, or None
        where the band was so already (nothing is saved: a copy of the shipped bank would hide its updates)."""
        with self._editing("holding a level"):
            bank, name = writable_bank(self.info), band_key(_text(band, "band"))
            if bank.hold(name, level):
                if (shipped := shipped_bank(self.info)) is not None:  # set back to its level: measured there
                    bank.measured_as_in(name, shipped)
                return self._keep(bank)
        if (Path(bank.directory) / MANIFEST).exists():
            self._bank = bank  # as it is on disk: another eqz may have set the level this model had not yet read
            if warning := shadowed(bank.directory, self.info):
                self._warn(warning)  # as it is in the user's own copy, which eqz does not use
        return None

    def remove_bands(self, *bands: str) -> Path:
        """Remove bands (imported or described ones, say); returns the bank's directory."""
        if not bands or not all(isinstance(band, str) for band in bands):
            raise EqzError("remove_bands takes band names, such as remove_bands('nostalgia', 'awe')")
        names = list(dict.fromkeys(_names(bands, "bands")))
        with self._editing("removing bands"):
            bank = writable_bank(self.info)
            bank.remove(*names)
            return self._keep(bank)

    def reset_bank(self) -> Path | None:
        """Delete the user's own copy of this model's bank, so the shipped one is used again; returns what was
        deleted (None: there was none)."""
        with self._editing("resetting it", steering=False):
            removed = reset_user_bank(self.info)
        if removed is not None and not self._steers_with_another():  # a bank chosen at load stays
            self._bank = self._chosen = None  # found again when next used
        return removed

    def _steers_with_another(self) -> bool:
        """Whether this model was loaded with a bank (load(bank=...)) other than the user's own copy."""
        chosen = self._chosen.directory if self._chosen is not None else None
        return chosen is not None and Path(chosen).resolve() != own_bank_directory(self.info).resolve()

    def _editing(self, what: str, steering: bool = True):
        """The edit lock of the user's own copy of this model's bank (bank.editing). An edit the model would then
        ``steer`` with is refused where it was loaded with another bank (load(bank=...)): the edit would go into that
        copy, and the model would steer with it from then on without a word (it did)."""
        own = own_bank_directory(self.info)
        if steering and self._steers_with_another():
            chosen = self._chosen.directory
            raise EqzError(f"this model steers with the bank in {chosen} (load(bank=...)), and {what} would change "
                           f"your own copy of its model's bank ({own}) instead; load the model without bank= to change "
                           "that one, or change this one through eqz.read_bank(...) and its save()")
        return editing(own, what)

    def _keep(self, bank: Bank) -> Path:
        """Save the user's own copy of the bank and steer with it from now on."""
        directory = bank.save()
        self._bank = bank
        if warning := shadowed(directory, self.info):
            self._warn(warning)
        return directory

    def _warn(self, message: str) -> None:
        """``on_warning`` as it is when a warning comes (a chat made before it was changed follows it too)."""
        self.on_warning(message)

    # -- what users call

    def stream(self, prompt: str, **settings) -> Iterator[str]:
        """One reply to ``prompt``, piece by piece. ``settings``: those of ``session``, plus ``seed``,
        ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``
        (-1: the whole context); not ``meter`` (a reply's readings come with ``chat(meter=True)``)."""
        _text(prompt, "prompt")
        if settings.get("meter"):  # it was taken, and its readings could not be reached
            raise EqzError("generate and stream give the text alone; a reply's meter readings come with a chat: "
                           "reply = model.chat(meter=True).send(prompt), then reply.record.meter once read")
        make = self._session_maker(**_split_sampling(settings))  # bad settings raise here, not at the first piece

        def pieces() -> Iterator[str]:  # the context is made when the first piece is asked for
            with Chat(make(), self._warn) as chat:
                yield from chat.send(prompt)

        return pieces()

    def generate(self, prompt: str, **settings) -> str:
        """One reply to ``prompt`` as a string (see ``stream`` for the settings)."""
        return "".join(self.stream(prompt, **settings))

    def chat(self, **settings) -> "Chat":
        """A conversation whose sliders can change at any time (see ``stream`` for the settings)."""
        return Chat(self.session(**_split_sampling(settings)), self._warn)

    @_flags_checked
    def batch(self, prompts, output, *, preset: str | Path | Preset | None = None,
              presets: Iterable[str | Path | Preset] = (),
              sliders: dict[str, float] | None = None, sweeps: Iterable[tuple[str, list[float]]] = (),
              sampling: dict | None = None, system: str | None = None, clamp: dict[str, float] | None = None,
              ablate: Iterable[str] = (), samples: int = 1, seed: int = 0, parallel: int = 4,
              meter: bool = False, resume: bool = False, skip_bad: bool = False) -> "BatchPlan":
        """Rows for every prompt x setting x sample, checked and ready: ``.run(on_row)`` writes them into
        ``output``. ``prompts``: a list (strings, or dicts as a .jsonl line holds them, ``{"prompt", "id",
        "system"}``, other keys coming back in the rows as ``meta``; a string's id is its place from 1), a prompt
        file's path or a ``batch.PromptFile`` (bad prompts stop the batch before any reply, or with ``skip_bad`` are
        left out); ``output``: a ``batch.Output`` or a path (a file with rows needs ``resume``, which writes only the
        missing ones, each checked to be made as the rows there were; one opened here is closed when the run ends).
        Settings are (``presets``, or the one ``preset``) x every combination of ``sweeps`` (band, gains)."""
        from .batch import BatchPlan, Output, PromptFile, build_grid, plan
        from .steering import Steerer

        sliders, clamp, ablate = _band_settings(sliders, clamp, ablate)
        sampling = _mapping(sampling, "sampling", "{'temperature': 0.7}")
        presets = _listed(presets, "presets", "preset names", ["calm"])
        sweeps = _sweeps(sweeps)
        samples, parallel = _whole(samples, "samples", 1), _whole(parallel, "parallel", 1)  # 0 spun for ever
        if not is_whole(seed, -2**63):  # any whole number: each row's seed is hashed from it
            raise EqzError(f"seed must be a whole number, got {seed!r}")
        if preset is not None and presets:
            raise EqzError("give either preset= (one mood for every row) or presets= (a setting per mood), not both")
        if "seed" in (sampling or {}):  # it would be dropped: each row's seed is hashed from seed=, id and sample
            raise EqzError("a batch seeds each row from seed= (with the prompt's id and the sample); give "
                           f"seed={sampling['seed']!r}, not sampling={{'seed': ...}}")
        if not isinstance(output, (str, Path, Output)):  # None became a file named "None"
            raise EqzError(f"output takes a file's path (or '-' for stdout), got {output!r}")
        if isinstance(prompts, dict):
            raise EqzError(f"prompts takes a list of prompts; one given as a dict goes in a list: [{prompts!r}]")
        if isinstance(prompts, str) and Path(prompts).suffix.lower() not in (".txt", ".jsonl") and \
                not Path(prompts).expanduser().exists():
            raise EqzError(f"no prompt file {prompts!r}; prompts themselves go in a list, such as [{prompts!r}]")
        if not isinstance(prompts, (str, Path, PromptFile)):  # a tuple, a generator: the prompts themselves
            prompts = _listed(prompts, "prompts", "prompts", ["Describe your morning."])
        source = prompts if isinstance(prompts, PromptFile) else PromptFile(
            prompts if isinstance(prompts, list) else str(prompts), skip_bad=bool(skip_bad))
        sink = output if isinstance(output, Output) else Output(str(output), resume=bool(resume))
        try:
            bank = self.bank_if_any(required=bool(sliders or sweeps or preset or presets or meter or clamp or ablate))
            valid = bank.names if bank else ()
            grid = build_grid(valid, _preset_of(preset, valid), [_preset_of(each, valid) for each in presets],
                              sliders or {}, sweeps, sampling or {}, system, clamp, ablate)
            count, longest = plan(source, self.model, grid)
            sink.check_model(self.model_record)
            moved = {band: 1.0 for setting in grid for band, gain in setting.gains.items() if gain}
            # inside: a warning turned into an error closes the output too
            _warn_of(self.on_warning, {band: as_number(gain) for band, gain in (sliders or {}).items()}, bank, moved)
            for line in dict.fromkeys(line for setting in grid if bank  # a sweep repeats a setting's filters
                                      for line in bank.overridden(setting.gains, setting.filters)):
                self.on_warning(line)
            for name, ignored in {setting.preset: setting.sampling.seed for setting in grid
                                  if setting.sampling.seed is not None}.items():  # it did nothing, without a word
                self.on_warning(f"preset {name} sets seed {ignored}, which a batch does not use: each row's seed comes "
                                "from --seed (seed=), the prompt's id and the sample")
        except BaseException:
            if sink is not output:  # made here from a path: closed again (and removed if still empty)
                sink.close()
            raise
        made = BatchPlan(self.model, Steerer(self.info, bank), source, grid, sink, count, longest, samples, seed,
                         parallel, meter, self.on_warning, closes_output=sink is not output)
        sink.take_over()  # an earlier plan of this file that never ran ends only now that this one is made
        return made

    @_flags_checked
    def request(self, messages: list[dict] | None = None, *, prompt: str | None = None,
                preset: str | Path | Preset | None = None, sliders: dict[str, float] | None = None,
                sampling: dict | None = None, stop: Iterable[str] = (), clamp: dict[str, float] | None = None,
                ablate: Iterable[str] = (),
                meter: bool = False) -> "Request":
        """A reply to generate on a ``server()``: to chat ``messages`` (OpenAI-style roles; a preset's system
        prompt is used when they have none) or, with ``prompt``, a plain completion of that text. Settings merge
        as in ``session`` (the preset first, then the explicit ones)."""
        from .serving import Request

        sliders, clamp, ablate = _band_settings(sliders, clamp, ablate)
        sampling = _mapping(sampling, "sampling", "{'temperature': 0.7}")
        stop = [stop] if isinstance(stop, str) else _listed(stop, "stop", "strings", ["END"])  # OpenAI's one string too
        if any(not isinstance(text, str) for text in stop):
            raise EqzError(f"stop takes a list of strings, such as ['END']; got {stop!r}")
        if prompt is not None:
            _text(prompt, "prompt")
        elif not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
            raise EqzError("messages must be a list of dicts, such as [{'role': 'user', 'content': 'Hi'}]")
        bank = self.bank_if_any(required=bool(sliders or preset or clamp or ablate or meter))
        valid = bank.names if bank else ()
        resolved = resolve(_preset_of(preset, valid), valid, sliders, sampling, None, clamp, ablate)
        if prompt is not None:
            tokens, stops, shared = self.model.tokenize(prompt), (), 0
        else:
            if resolved.system and not any(message.get("role") == "system" for message in messages or []):
                messages = [{"role": "system", "content": resolved.system}, *messages]
            text, stops = self.model.chat_prompt(messages or [])
            tokens = self.model.tokenize(text, parse_special=True)
            shared = common_prefix_length(tokens, template_head(self.model, messages)) if messages else 0
        seed = resolved.sampling.seed if resolved.sampling.seed is not None else random.randrange(2**32)
        return Request(tokens, dataclasses.replace(resolved.sampling, seed=seed), Steering().with_gains(resolved.gains), (*stops, *stop),
                       resolved.filters, bool(meter), seed=seed, shared=shared)

    def server(self, parallel: int = 4, per_sequence: int = 2048, max_waiting: int = 64) -> "BatchServer":
        """A decode loop serving ``request()``s ``parallel`` at a time, each with its own sliders (see
        eqz.serving); ``close()`` it when done."""
        from .serving import BatchServer

        parallel, max_waiting = _whole(parallel, "parallel", 1), _whole(max_waiting, "max_waiting", 0)
        per_sequence = _whole(per_sequence, "per_sequence", MIN_CONTEXT)
        return BatchServer(self.model, self.bank_if_any(), parallel, per_sequence, max_waiting)

    @_flags_checked
    def evaluate(self, bands: Iterable[str] | None = None, gains: Iterable[float] = (-1, 0, 1, 2),
                 prompts: list[str] | None = None, max_tokens: int = 64, samples: int = 1, progress=None,
                 record: bool = False) -> "EvalResult":
        """What each slider does to held-out replies against asking for the emotion in the system prompt (lexicon
        or judge effect, readout, fluency). ``record`` stores the figures in the bank's bank.yaml (the shipped bank's
        in the user's own copy of it, used from then on; bands not measured keep their recorded figures only where
        they were measured alike: eval.recorded_alike)."""
        from .eval import evaluate, prompt_sets, record as record_figures, recording_setup

        bank = self.bank
        given = _names(bands, "bands") if bands is not None else []
        bank.check_gains({band: 0.0 for band in given})
        # in the bank's order, each once: replies are read back in batches, whose mix moves a log-probability by
        # llama.cpp's rounding (~0.02 nats a token), so one set of bands gives one set of figures
        chosen = tuple(band for band in bank.names if band in given) or bank.names
        gains = _listed(gains, "gains", "numbers", [-1, 0, 1, 2])
        # every band takes the same gains ("gain for joy" named a band the caller may not have asked for); -0 is 0
        gain_list = tuple(sorted({check_gain("every band", gain, None) + 0.0 for gain in gains}))
        if prompts is not None:
            prompts = _listed(prompts, "prompts", "strings", ["Describe your morning."])
            prompts = [_text(prompt, "each prompt") for prompt in prompts]
        max_tokens = _whole(max_tokens, "max_tokens", EVAL_MIN_TOKENS)
        samples = _whole(samples, "samples", 1)
        into = self._record_into(bank, chosen, recording_setup(prompts or prompt_sets()["eval"], max_tokens, samples,
                                                                gain_list)) if record else None
        if missing := lexicon_missing():
            self._warn(missing)
        extra = {"progress": progress} if progress else {}
        with editing(into, "recording eval figures") if record and into else nullcontext():
            if record and bank.changed_on_disk():
                raise EqzError(f"the bank in {bank.seen[0].parent} was changed by another eqz after this one loaded "
                               "it, and recording would undo that change; load the model again to record")
            result = evaluate(self.model, bank, chosen, gain_list, prompts, max_tokens, samples, **extra)
            if record:
                bank.directory = into
                record_figures(result, bank)
        return result

    def _record_into(self, bank: Bank, bands: tuple[str, ...], setup: dict) -> Path:
        """Where ``evaluate(record=True)`` saves ``bank`` with its figures, checked before any reply: the user's own
        copy of a shipped bank (eqz's files stay as shipped), and only where the bands not measured again were
        measured as this run measures (one record holds figures measured alike: eval.recorded_alike)."""
        from .eval import recorded_alike

        recorded = bank.quality.get("dose_response", {})
        recorded_setup = bank.quality.get("dose_response_setup", {})
        if recorded and weighs_as_calibration(recorded_setup) and not weighs_as_calibration(setup):
            raise EqzError(f"the figures recorded in this bank ({describe_setup(recorded_setup)}) revise its bands' "
                           f"verdicts, and this run's ({describe_setup(setup)}) are too few reply tokens to: recording "
                           f"them would undo those verdicts; measure at least {CALIBRATION_REPLY_TOKENS} reply tokens "
                           "per setting (prompts x samples x tokens), or do not record")
        unmeasured = [band for band in recorded if band in bank.bands and band not in bands]
        if unmeasured and not recorded_alike(bank, setup):
            raise EqzError(f"{', '.join(unmeasured)} would lose their recorded figures, which a record keeps only "
                           f"where measured alike: they were measured with "
                           f"{describe_setup(recorded_setup)}, this run with "
                           f"{describe_setup(setup)}; measure every band, or as they were, or do not record")
        if bank.directory is None or Path(bank.directory).parent != SHIPPED_DIR:
            return bank.directory
        own = own_bank_directory(self.info)
        if (own / MANIFEST).exists():  # the library's load(bank=...) can pick the shipped bank over the user's
            raise EqzError(f"these figures would be the shipped bank's, and {own} holds your own bank for "
                           f"{self.info.name}: record with that one (load the model without bank=), or delete it first")
        return own

    def analyze(self, text: str, by: str = "sentence") -> Analysis:
        """How the model reads ``text``, band by band (``.overall``, and ``.segments`` per sentence or token; by token,
        for a model that starts without a BOS token, the first segment's ``readouts`` is None: the first token is not
        read)."""
        return analyze(self.model, self.bank, _text(text, "text"), by)

    @_flags_checked
    def train(self, bands: Iterable[str] | None = None, described: dict[str, str] | None = None, quick: bool = False,
              orthogonalize: bool = False, into: Path | None = None, progress=None, hold: bool | None = None,
              seed: int | None = None, replace: bool = False) -> Bank:
        """A new bank for this model, unsaved (``bank.save(directory)``). With only ``described`` bands (name ->
        description) and a bank to add them to, they are added: with ``into`` (the directory the bank will be saved
        to, `eqz train -o DIR`), to the bank already there, else the model's; without it, to the user's own copy of
        the model's bank, which ``bank.save()`` writes back. ``hold``: screen held levels for the primaries and
        hold those that steer better held (train.screen_holds; ~140 s of a 430 s SmolLM2 training on 2 cores, as
        long with ``quick``); by default unless ``quick``. Described bands are unmetered, so adding them screens
        nothing. ``seed``: the sampling seed of every reply training makes (default TrainSettings.seed); on
        one machine the same seed gives the same bank byte for byte, at any thread count. A described band the
        bank already has is retrained only with ``replace``."""
        from .bands import BANDS, unknown_band
        from .bank import bank_to_extend
        from .train import TrainSettings, add_described_bands, train_bank

        bands = list(dict.fromkeys(_names(bands, "bands"))) if bands is not None else []  # each band once
        for band in bands:
            if band not in BANDS:
                raise unknown_band(band, BANDS)
        described = _described(described)
        settings = TrainSettings(bands=tuple(bands or BANDS), quick=quick, orthogonalize=orthogonalize,
                                 described=described, hold=hold,
                                 **({"seed": check_setting("seed", seed)} if seed is not None else {}))
        extra = {"progress": progress} if progress else {}
        base = None
        if described and not bands:
            if into is not None:
                base = bank_to_extend(Path(into), self.info)
            elif self.bank_if_any() is not None:
                base = writable_bank(self.info)
        if base is not None:
            _check_extending(base, described, replace, hold, orthogonalize)
        if missing := lexicon_missing():  # calibration scores with it
            self._warn(missing)
        with self.model.unpacked() as model:  # training works in batches, which f16 runs ~2x faster than Q4_1
            if base is not None:
                return add_described_bands(model, base, settings, **extra)
            return train_bank(model, settings, **extra)


def _within_bank(settings: Preset, valid: tuple[str, ...], where, warn: Callable[[str], None]) -> Preset:
    """A resumed conversation's settings without the bands this model's bank lacks (another model's, one removed
    since, or every band where the model has no bank), said in one warning: the file cannot be changed from the
    command line, so refusing it would leave no way to go on."""
    clamps = {band: level for band, level in settings.filters.get("clamp", {}).items() if band_key(band) in valid}
    ablates = [band for band in settings.filters.get("ablate", []) if band_key(band) in valid]
    sliders = {band: gain for band, gain in settings.sliders.items() if band_key(band) in valid}
    dropped = [band for band in dict.fromkeys([*settings.sliders, *settings.filters.get("clamp", {}),
                                               *settings.filters.get("ablate", [])])
               if band not in sliders and band not in clamps and band not in ablates]
    if dropped:
        lacking = "this model's bank lacks" if valid else "need an emotion bank, which this model has not"
        warn(f"{where} moves {', '.join(dropped)}, which {lacking}; it goes on without them")
    filters = {key: value for key, value in (("clamp", clamps), ("ablate", ablates)) if value}
    return dataclasses.replace(settings, sliders=sliders, filters=filters)


def _check_extending(bank: Bank, described: dict[str, str], replace: bool, hold: bool | None,
                     orthogonalize: bool) -> None:
    """Described bands added to ``bank``: what would be lost or ignored is one line, before any work."""
    if hold or orthogonalize:
        raise EqzError("--hold and --orthogonalize (hold=True, orthogonalize=True in the library) shape a whole "
                       "bank's training; described bands alone are added to the bank as it is (name built-in bands "
                       "to train too)")
    if kept := [name for name in described if name in bank.bands and not replace]:
        raise EqzError(f"the bank already has a band '{kept[0]}'; pass --replace (replace=True in the library) to "
                       "retrain it, or choose another name")


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise EqzError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _mapping(value, name: str, example: str = "{'joy': 0.5}") -> dict | None:
    """A dict argument; one line where a list or a string was passed."""
    if value is not None and not isinstance(value, dict):
        raise EqzError(f"{name} must be a dict, such as {example}; got {type(value).__name__}")
    return value


def _listed(value, name: str, what: str, example: list) -> list:
    """A list argument from any iterable but a string (iterating one would give its letters); one line otherwise."""
    if isinstance(value, str):
        raise EqzError(f"{name} takes a list of {what}, such as {[value]!r}")
    if not isinstance(value, Iterable):
        raise EqzError(f"{name} takes a list of {what}, such as {example!r}; got {type(value).__name__}")
    return list(value)


def _names(value, name: str) -> list[str]:
    """Band names, keyed as everywhere in eqz (any case)."""
    return [band_key(band) for band in _listed(value, name, "band names", ["joy"])]


def _band_settings(sliders, clamp, ablate) -> tuple[dict | None, dict | None, list[str]]:
    """``sliders``, ``clamp`` and ``ablate`` checked for their shape, with band names keyed as everywhere in eqz."""
    sliders, clamp = _mapping(sliders, "sliders"), _mapping(clamp, "clamp")
    return (None if sliders is None else keyed_by_band(sliders, "sliders"),
            None if clamp is None else keyed_by_band(clamp, "clamp"), _names(ablate, "ablate"))


def _preset_of(preset: str | Path | Preset | None, valid: tuple[str, ...]) -> Preset | None:
    """``preset`` as a ``Preset``: by name or file (a ``Path`` is always a file), or as given."""
    if isinstance(preset, Path):
        return load_preset_file(preset.expanduser(), valid)
    if isinstance(preset, str):
        return get_preset(preset, valid)
    if preset is not None and not isinstance(preset, Preset):
        raise EqzError(f"preset must be a preset's name or file (or an eqz.presets.Preset), got {preset!r}")
    return preset


def _sweeps(value) -> list[tuple[str, list[float]]]:
    """``batch``'s sweeps: (band, gains) pairs, as ``batch.parse_sweep`` makes them from the CLI's BAND=START:STOP:N."""
    pairs = _listed(value, "sweeps", "(band, gains) pairs", [("joy", [-1, 0, 1])])
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], Iterable) and not isinstance(pair[1], str)):
            raise EqzError(f"sweeps takes (band, gains) pairs, such as [('joy', [-1, 0, 1])]; got {pair!r}")
    # rounded as the CLI's are: a row's key holds its gains, so np.linspace's -0.33333333333333337 beside the CLI's
    # -0.333333 wrote each row again under --resume (a bad gain is left for the grid to name)
    swept = [(band_key(band), [round(number, 6) if (number := as_number(gain)) is not None and math.isfinite(number)
                               else gain for gain in gains]) for band, gains in pairs]
    if (empty := next((band for band, gains in swept if not gains), None)) is not None:  # 0 settings, failing at run
        raise EqzError(f"sweeps: {empty} has no gains; give at least one, such as ('joy', [-1, 0, 1])")
    return swept


def _whole(value, name: str, least: int, note: str = "") -> int:
    """A count such as ``samples``: an int (a numpy one too), not a bool, a float or a string; ``note`` adds to the
    error (what None means, where it is allowed)."""
    if not is_whole(value, least):
        raise EqzError(f"{name} must be a whole number of at least {least}{note}, got {value!r}")
    return int(value)


def _vector_pairs(value) -> list[tuple[str | Path, float]]:
    """``vectors``: (path, scale) pairs; one line for a lone path (it would be unpacked letter by letter)."""
    pairs = [value] if isinstance(value, (str, Path)) else list(value)
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise EqzError("vectors takes (path, scale) pairs, such as [('joy.gguf', 0.8)]")
    for path, scale in pairs:
        if isinstance(path, ControlVector):  # a value steers through the sliders' bank or a file
            raise EqzError("vectors takes files; save the ControlVector first, e.g. [(vector.save('mix.gguf'), 1.0)]")
        if not isinstance(path, (str, Path)):
            raise EqzError(f"vectors takes (path, scale) pairs, such as [('joy.gguf', 0.8)]; got a "
                           f"{type(path).__name__}")
        if (number := as_number(scale)) is None or not math.isfinite(number):
            raise EqzError(f"the scale of {path} must be a finite number, got {scale!r}")
    return pairs


def _described(value) -> dict[str, str]:
    """``train``'s described bands (name -> description), checked as `eqz train --band` checks them, before any
    work: a name that is no file name (such as '../x') or is a built-in band's, an empty description."""
    described = _mapping(value, "described", "{'nostalgia': 'wistful longing for the past'}") or {}
    for name, description in described.items():
        check_described(band_key(_text(name, "a described band's name")),
                        _text(description, f"the description of {name}"))
    return keyed_by_band(described, "described")


# the Sampling fields, the two most often given first; then what else generate, stream and chat take (session's)
_SAMPLING_KEYS = ("seed", "max_tokens", *(name for name in SETTING_NAMES if name not in ("seed", "max_tokens")))
_SETTINGS = (*_SAMPLING_KEYS, *(name for name in inspect.signature(EqzModel.session).parameters if name != "self"))


def _warn_of(on_warning: Callable[[str], None], gains: dict[str, float], bank: Bank | None,
             moved: dict[str, float]) -> None:
    """What moving sliders warns of: ``gains`` past the calibrated range, and each band ``moved`` that may not steer
    as named in ``bank``."""
    for line in [*gain_warnings(gains.items()), *(bank.doubtful(moved) if bank else [])]:
        on_warning(line)


def _split_sampling(settings: dict) -> dict:
    """Sampling settings given by name, gathered into the ``sampling`` dict ``session`` takes."""
    for name in settings:
        if name not in _SETTINGS:
            raise EqzError(f"unknown setting {name!r}; the settings are: {', '.join(_SETTINGS)}")
    _mapping(settings.get("sampling"), "sampling", "{'temperature': 0.7}")
    sampling = {key: settings.pop(key) for key in _SAMPLING_KEYS if key in settings}
    if sampling:
        settings["sampling"] = {**(settings.get("sampling") or {}), **sampling}
    return settings


class Chat:
    """A conversation: ``send`` streams a reply; ``set`` moves sliders from the next token on, even mid-reply."""

    def __init__(self, session: ChatSession, on_warning: Callable[[str], None] = _python_warning):
        self.session = session
        self.on_warning = on_warning

    def send(self, text: str) -> Turn:
        """The reply to ``text``: iterate it for pieces; ``.text`` and ``.record`` once done."""
        return self.session.reply(_text(text, "text"))

    def set(self, **gains: float) -> None:
        """Move sliders (``joy=0.8``, any case) from the next token on, mid-reply too; the others keep their gains.
        Warns past the calibrated ±1, of a band that may not move the text, and where a clamp or notch overrides a
        held slider."""
        # a model without a bank: how to train one, as generate says (it was told a band had been removed)
        bank = self.session.steerer.bank or (require_bank(self.session.model.info) if gains else None)
        valid = bank.names if bank else ()
        checked = {band: check_gain(band, gain, valid) for band, gain in keyed_by_band(gains, "set").items()}
        _warn_of(self.on_warning, checked, bank, checked)
        for line in self.session.overridden(checked):  # a held slider under the user's clamp or notch
            self.on_warning(line)
        self.session.request_steering(self.session.pending_or_current_steering().with_gains(checked))

    @property
    def history(self) -> list[dict]:
        """The conversation so far: user and assistant messages ({"role": ..., "content": ...}), each assistant
        message with its reply's record under "reply"; the system prompt is not among them."""
        return self.session.history

    def save(self, path: str | Path) -> Path:
        """Write the conversation with every setting as JSON (as `eqz chat`'s /save does), to go on with later:
        ``model.chat(resume=path)``."""
        if not isinstance(path, (str, Path)):
            raise EqzError(f"save takes a file's path, such as 'chat.json'; got {path!r}")
        self.session.save(Path(path).expanduser())
        return Path(path).expanduser()

    def close(self) -> None:
        """Free the conversation's context (its KV cache); the model stays loaded."""
        self.session.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- banks and presets, without a model loaded (presets name bands, so one fits every model with a bank)


def list_banks() -> list[FoundBank]:
    """Every bank eqz finds (shipped, the user's, $EQZ_VECTORS), read as far as listing needs (``.load()`` reads
    one's vectors)."""
    return found_banks()


def read_bank(name: str | Path) -> Bank:
    """A bank by its directory or its folder's name (as ``list_banks()`` lists them), to inspect without its model."""
    return resolve_bank(str(name), None)


def list_presets() -> list[PresetEntry]:
    """Every preset eqz finds (bundled, and the user's, which stand in for bundled ones of the same name); a file
    that does not load is listed with its ``error`` instead of its ``preset``."""
    return list(discover(known_band_names()).values())


def read_preset(name: str | Path) -> Preset:
    """A preset by name, or a preset file (a ``Path``, or a string ending in .yaml/.yml or holding a /), checked
    against the bands eqz knows; an EqzError says what is wrong with it."""
    return _preset_of(name if isinstance(name, Path) else _text(name, "name"), known_band_names())


@_flags_checked
def save_preset(name: str, *, sliders: dict[str, float] | None = None, based_on: str | Path | Preset | None = None,
                description: str | None = None, system: str | None = None, sampling: dict | None = None,
                clamp: dict[str, float] | None = None, ablate: Iterable[str] = (), replace: bool = False) -> Path:
    """Save a user preset (in the user config dir, where it stands in for a bundled one of its name): ``based_on``
    a preset, with the sliders, system prompt, sampling and filters given on top (its description where none is
    given and the name is its own, else "based on BASE"). Only the sampling asked for is kept, not every default.
    A saved one of that name is replaced only with ``replace``."""
    sliders, clamp, ablate = _band_settings(sliders, clamp, ablate)
    sampling = _mapping(sampling, "sampling", "{'temperature': 0.7}") or {}
    known = known_band_names()
    base = _preset_of(based_on, known)
    resolved = resolve(base, known, sliders, None, None if system is None else _text(system, "system"), clamp, ablate)
    kept = {**(base.sampling if base else {}), **{key: check_setting(key, value) for key, value in sampling.items()}}
    name = check_name(_text(name, "name"))
    if description is not None:
        description = _text(description, "description")
    elif base is None or base.name == name:  # a preset tweaked in place keeps its description, as every other field
        description = base.description if base else ""
    else:  # not the base's words about itself, which may no longer hold
        description = f"based on {base.name}"
    saved = Preset(name, description,
                   {band: gain for band, gain in resolved.gains.items() if gain != 0}, kept, resolved.system,
                   resolved.filters)
    return write_preset(saved, replace)


@_flags_checked
def show_backend_log(on: bool = True) -> None:
    """Let llama.cpp's own log through to stderr (it is kept out of the way otherwise)."""
    from .engine import set_verbose

    set_verbose(on)


def llama_build() -> dict:
    """What the installed llama.cpp was built for: its compute backends (GPU ones first, ["CPU"] for a CPU-only
    build) and whether it can offload layers to a GPU."""
    return {"backends": backends(), "gpu_offload": gpu_offload()}


def load(model: str | Path | None = None, *, bank: str | Path | None = None, threads: int | None = None,
         gpu_layers: int | None = None) -> EqzModel:
    """Load a GGUF model (default: $EQZ_MODEL, else eqz's default model) and, if given, a bank by directory or name.
    ``gpu_layers``: layers offloaded to the GPU, -1 for all (default: all on a GPU build of llama.cpp, else 0)."""
    if threads is not None:
        _whole(threads, "threads", 1, " (None: eqz chooses)")
    loaded = Model(resolve_model_path(None if model is None else str(model)), threads=threads, gpu_layers=gpu_layers)
    try:
        return EqzModel(loaded, resolve_bank(str(bank), loaded.info) if bank is not None else None)
    except BaseException:
        loaded.close()
        raise


__all__ = ["Chat", "ControlVector", "EqzError", "EqzModel", "EqzWarning", "list_banks", "list_presets", "load",
           "read_bank", "read_preset", "save_preset"]
