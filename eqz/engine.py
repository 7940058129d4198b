"""eqz's one door to llama.cpp: models, contexts, batches, sampling, control vectors and hidden-state taps.

Nothing else in eqz imports ``llama_cpp``. Everything here speaks numpy and plain Python to the rest of the
package, so the math on vectors can be tested without a model and the CLI stays thin.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import shutil
import re
import signal
import tempfile
import threading
import weakref
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np

import llama_cpp as L
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import REINSTALL, EqzError
from .signals import undone_if_killed
from .threads import default_threads
from .models import ModelInfo
from .sampling import Sampling
from .vector_files import NOT_FINITE

if TYPE_CHECKING:
    from .generation import Job

# --------------------------------------------------------------------------------------------------------------
# Library-wide set-up: logging, the ggml functions llama_cpp does not bind, the C eval-callback filter.


class _LlamaLog:
    """llama.cpp's log, kept quiet: the last lines are kept to explain a failure; --debug prints them all."""

    ERROR_LEVEL = 4

    def __init__(self) -> None:
        self.verbose = False
        self.errors: deque[str] = deque(maxlen=20)
        self.callback = L.llama_log_callback(self._on_log)
        L.llama_log_set(self.callback, None)

    def _on_log(self, level: int, text: bytes, _user_data) -> None:
        line = text.decode("utf-8", "replace")
        if level == self.ERROR_LEVEL and line.strip():
            self.errors.append(line.strip())
        if self.verbose:
            os.write(2, text)

    def take_errors(self) -> list[str]:
        lines = list(self.errors)
        self.errors.clear()
        return lines


_log = _LlamaLog()
L.llama_backend_init()


@contextmanager
def ctrl_c_held(wanted: bool = True) -> Iterator[list]:
    """Hold Ctrl-C until a llama.cpp call that runs Python inside it returns (its log; a decode's taps): a
    KeyboardInterrupt raised in a ctypes callback is printed ("Exception ignored") and dropped, and the call went on
    (Ctrl-C while a model loaded printed a traceback, and the chat started). Yields a list that is non-empty once
    Ctrl-C was pressed, for the caller to raise after. A handler of the caller's own is left alone."""
    pressed: list = []
    if (not wanted or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (``--debug``)."""
    _log.verbose = verbose


ALL_LAYERS = -1  # --gpu-layers all
_LLAMA_ALL_LAYERS = 2**31 - 1  # what llama.cpp takes for "every layer"


def backends() -> list[str]:
    """The compute backends this llama.cpp build has, GPU ones first (e.g. ["CUDA", "CPU"]), from its system info."""
    info = L.llama_print_system_info().decode("utf-8", "replace")
    names = [part.split(" : ")[0].strip() for part in info.split("|") if " : " in part]
    return sorted(dict.fromkeys(names), key=lambda name: name == "CPU")


def gpu_offload() -> bool:
    """Whether this llama.cpp can put layers on a GPU (the one answer every GPU default and message follows; a
    backend name such as BLAS in the system info is not a GPU)."""
    return bool(L.llama_supports_gpu_offload())


def default_gpu_layers() -> int:
    """Every layer on the GPU when llama.cpp was built with a GPU backend, none otherwise."""
    return ALL_LAYERS if gpu_offload() else 0


_LIB_DIR = Path(L.__file__).parent / "lib"
_ggml = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_tensor_get.restype = None
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_set.restype = None
_ggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]


class _GgmlTensor(ctypes.Structure):
    """The head of ``struct ggml_tensor`` (ggml.h), enough to read a node's shape, type and name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


_GGML_TYPE_F32 = 0
_MAX_TAP_LAYERS = 1024


class _TapFilterState(ctypes.Structure):
    """Mirror of ``eqz_tap_filter`` in _tapfilter.c."""

    _fields_ = [
        ("answer", L.ggml_backend_sched_eval_callback),
        ("name_offset", ctypes.c_size_t),
        ("wanted", ctypes.c_ubyte * _MAX_TAP_LAYERS),
    ]


def _load_tap_filter() -> ctypes.CDLL:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_tapfilter{suffix}"
        if candidate.exists():
            return ctypes.CDLL(str(candidate))
    raise EqzError(f"eqz's compiled tap filter is missing; {REINSTALL}", exit_code=1)


_tap_filter_lib = _load_tap_filter()
_tap_filter_eval = L.ggml_backend_sched_eval_callback(("eqz_tap_filter_eval", _tap_filter_lib))


# --------------------------------------------------------------------------------------------------------------
# Models


class SpeakerLine:
    """A stop at a new line that opens like a speaker's turn: a name of letters (spaces, apostrophes, periods and
    hyphens within), a colon and text ("\nUser: hi", "\nDoctor: Do not go", "\nYou are joyful: happy"). In a plain
    'User:/Assistant:' transcript a base model goes on as speakers it makes up, or repeats the system prompt, and
    the chat fed those lines back to it (Gemma 3 270M: a fifth of eval's replies ran on so). A numbered or bulleted
    line ("1. Sleep: early"), a heading ("Tips:" and a line break), a time or an address ("https://") goes on."""

    LONGEST = 30  # characters of a name
    _NAME = r"[^\W\d_](?:[^\W\d_]|[ .'-]){0,%d}" % (LONGEST - 1)
    _LINE = re.compile(r"\n%s:[ \t]+\S" % _NAME)
    _OPENING = re.compile(r"\n(?:%s(?::[ \t]*)?)?\Z" % _NAME)  # what may still become such a line

    def find(self, text: str) -> int:
        """Where the first such line begins in ``text`` (its line break), or -1."""
        found = self._LINE.search(text)
        return found.start() if found else -1

    def pending(self, text: str) -> int:
        """How many characters at the end of ``text`` may still become such a line's start (held back, unshown)."""
        opening = self._OPENING.search(text)
        return len(text) - opening.start() if opening else 0

    def __repr__(self) -> str:
        return "SpeakerLine()"


FALLBACK_STOPS = (SpeakerLine(),)


def _check_gguf_header(path: Path) -> None:
    if not path.exists():
        raise EqzError(f"model file not found: {path}; give the path of a .gguf file")
    if not path.is_file():
        raise EqzError(f"model path is not a file: {path} (pass the .gguf file itself)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise EqzError(f"{path} is not a GGUF file (llama.cpp models are .gguf files that start with 'GGUF')")


def _write_f16(source: Path, target: Path, threads: int) -> bool:
    """llama.cpp's own quantizer writing ``source``'s weights as f16; False where it could not."""
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = threads
    return L.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0


def _explain_load_failure(path: Path, errors: list[str]) -> EqzError:
    """Turn llama.cpp's log lines about a failed load into one actionable line."""
    joined = " ".join(errors)
    cause = next((line for line in errors if "failed to load model" not in line), "no reason given")
    cause = cause.split("error loading model: ", 1)[-1]
    if "unknown model architecture" in joined:
        arch = joined.split("unknown model architecture:", 1)[1].strip().split()[0].strip("'")
        if arch == "controlvector":
            return EqzError(f"{path} is a control vector, not a model; steer with it instead (--vector FILE[:SCALE]; "
                            "vectors=[(FILE, SCALE)] in the library)")
        return EqzError(
            f"{path}: architecture '{arch}' is not supported by the llama.cpp in this eqz "
            f"(llama-cpp-python {L.__version__}); use a model of a supported architecture"
        )
    if "not within the file bounds" in joined or "gguf_init" in joined:
        return EqzError(f"{path} is truncated or corrupt ({cause}); download or copy the file again")
    return EqzError(f"llama.cpp could not load {path}: {cause}")


# File types whose batched matrix products llama.cpp's CPU backend has no fast kernel for, measured on
# SmolLM2-135M-Instruct Q4_1 (2 cores, 2026-12-03): 512-token prompts read at 127-174 tok/s and 16 sequences
# decoded at 103-138 tok/s, the same weights as f16 at 298-334 and 176-213 (one token at a time, f16 is the
# slower: 43 against 64). Gemma 3 270M's Q4_K_M gains little: f16 reads at 320-351 tok/s against the file's
# 281-350 and decodes 16 sequences no faster (111-124 against 119-131).
_SLOW_BATCH_FILE_TYPES = frozenset({L.LLAMA_FTYPE_MOSTLY_Q4_1})


def utf8(text: str) -> bytes:
    """``text`` as llama.cpp takes it. Bytes a terminal or file gave that are not UTF-8 reach Python as lone
    surrogates (and JSON can spell them out); they have no UTF-8 form, so the text is refused in one line."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise EqzError(f"the text is not valid UTF-8 ({what}); give it in UTF-8") from None


MODEL_CLOSED = "this model was closed; load it again (eqz.load) to use it"
CONTEXT_CLOSED = "this chat or reply was closed; start another to go on"


def _while_open(method):
    """``method`` of a Model or a Context, run holding its lock once it is known to be open: a close() from another
    thread waits for it, and a use after close() is an EqzError instead of a crash on freed memory."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._lock:
            self._require_open()
            return method(self, *args, **kwargs)
    return guarded


class Model:
    """A GGUF model loaded by llama.cpp (weights and vocabulary), shared by the contexts made from it."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, gpu_layers: int | None = None):
        self.path = Path(path)
        _check_gguf_header(self.path)
        self.threads = threads or default_threads()
        # layers llama.cpp is asked to offload (ALL_LAYERS: every one); a CPU-only build offloads none
        self.gpu_layers = default_gpu_layers() if gpu_layers is None else gpu_layers
        params = L.llama_model_default_params()
        params.n_gpu_layers = _LLAMA_ALL_LAYERS if self.gpu_layers == ALL_LAYERS else self.gpu_layers
        _log.take_errors()
        with ctrl_c_held() as pressed:  # llama.cpp logs through Python while it loads
            self._model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if pressed:
            if self._model:
                L.llama_model_free(self._model)
            raise KeyboardInterrupt
        if not self._model:
            raise _explain_load_failure(self.path, _log.take_errors())
        # freed when the model is dropped too (a notebook cell run again), not only by close(); the process's end
        # frees everything anyway
        self._release = weakref.finalize(self, L.llama_model_free, self._model)
        self._release.atexit = False
        self._contexts: weakref.WeakSet[Context] = weakref.WeakSet()  # closed before the model is freed
        self._lock = threading.RLock()  # held by every use of the model (_while_open), and by close()
        self._vocab = L.llama_model_get_vocab(self._model)
        template = L.llama_model_chat_template(self._model, None)
        self._template = template.decode("utf-8") if template else None
        self._formatter = (
            Jinja2ChatFormatter(self._template, self._token_text(self.eos), self._token_text(self.bos))
            if self._template
            else None
        )
        self.info = ModelInfo(
            path=str(self.path),
            name=self.meta("general.name") or self.path.stem,
            architecture=self.meta("general.architecture") or "unknown",
            n_layer=L.llama_model_n_layer(self._model),
            n_embd=L.llama_model_n_embd(self._model),
            n_vocab=L.llama_vocab_n_tokens(self._vocab),
            n_ctx_train=L.llama_model_n_ctx_train(self._model),
            has_chat_template=self._template is not None,
        )

    def close(self) -> None:
        """Free the model, and first every context made from it (a reply still being read from one ends with an
        EqzError, not a crash on freed memory)."""
        with self._lock:
            if self._model:
                for context in list(self._contexts):
                    context.close(MODEL_CLOSED)
                self._release()
                self._model = self._vocab = None

    def _require_open(self) -> None:
        """Every use of the model goes through tokens or a context; after close() both would read freed memory."""
        if not self._model:
            raise EqzError(MODEL_CLOSED)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def unpacked(self) -> Iterator["Model"]:
        """This model with its weights unpacked to f16 in a temporary file, where that reads and decodes batches
        about twice as fast (see ``_SLOW_BATCH_FILE_TYPES``); else this model. f16 holds every Q4_1 weight to 11
        bits, so what training learns on the copy fits the model; the copy keeps this model's ``info``."""
        self._require_open()
        unpacked_bytes = 2 * L.llama_model_n_params(self._model)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if (self.gpu_layers or self.file_type not in _SLOW_BATCH_FILE_TYPES or unpacked_bytes > memory // 4
                or unpacked_bytes > shutil.disk_usage(tempfile.gettempdir()).free // 2):
            yield self
            return
        with tempfile.TemporaryDirectory(prefix="eqz-unpacked-") as folder, \
                undone_if_killed(lambda: shutil.rmtree(folder, ignore_errors=True)):  # a model-sized copy
            path = Path(folder) / "f16.gguf"
            if not _write_f16(self.path, path, self.threads):
                yield self
                return
            with Model(path, threads=self.threads, gpu_layers=0) as copy:
                path.unlink()  # loaded (mapped): a kill -9 left a model-sized file in the temp folder for good
                copy.info = self.info
                yield copy

    # -- metadata and vocabulary

    @property
    def file_type(self) -> int:
        """llama.cpp's ``LLAMA_FTYPE_*`` of the weights (-1 where the file does not say)."""
        return int(self.meta("general.file_type") or -1)

    def memory_estimate(self, n_ctx: int) -> dict[str, int]:
        """Bytes for the weights (the file) and for an f16 KV cache of ``n_ctx`` tokens on every layer (an upper
        bound for models with sliding-window layers)."""
        arch = self.info.architecture
        heads = int(self.meta(f"{arch}.attention.head_count") or 1)
        kv_heads = int(self.meta(f"{arch}.attention.head_count_kv") or heads)
        key = int(self.meta(f"{arch}.attention.key_length") or self.info.n_embd // heads)
        value = int(self.meta(f"{arch}.attention.value_length") or key)
        kv = self.info.n_layer * n_ctx * kv_heads * (key + value) * 2
        return {"weights": self.path.stat().st_size, "kv_cache": kv, "context": n_ctx}

    @_while_open
    def meta(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(4096)
        size = L.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace") if size >= 0 else None

    @property
    @_while_open
    def bos(self) -> int:
        return L.llama_vocab_bos(self._vocab)

    @property
    @_while_open
    def eos(self) -> int:
        return L.llama_vocab_eos(self._vocab)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return L.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    @_while_open
    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self._vocab, token))

    @_while_open
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokens of ``text``; ``add_special`` adds BOS where the model wants one (never twice)."""
        if add_special and self.bos >= 0 and text.startswith(self._token_text(self.bos)):
            add_special = False
        data = utf8(text)
        capacity = len(data) + 8
        buffer = (L.llama_token * capacity)()
        count = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            buffer = (L.llama_token * capacity)()
            count = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    @_while_open
    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as empty)."""
        buffer = ctypes.create_string_buffer(64)
        size = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]

    # -- chat formatting

    def chat_prompt(self, messages: Sequence[dict]) -> tuple[str, tuple[str, ...]]:
        """The prompt text for ``messages`` ending where the assistant speaks, and the stop strings it needs.

        Uses the model's own chat template from the GGUF metadata; models without one (base models) get a
        plain "User:/Assistant:" transcript, which needs stop strings to end a reply.
        """
        if self._formatter is not None:
            try:
                return self._formatter(messages=list(messages)).prompt, ()
            except Exception as error:  # a template may reject e.g. a system message: say so plainly
                raise EqzError(f"the model's chat template rejected the conversation: {error}") from None
        lines = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                lines.append(f"{content}\n")
            else:
                lines.append(f"{'User' if role == 'user' else 'Assistant'}: {content.lstrip(' ')}")  # a reply's own
                # leading space (a base model's first token) made "Assistant:  I am" when fed back
        return "\n".join(lines) + "\nAssistant:", FALLBACK_STOPS

    @property
    def reply_rows(self) -> int:
        """How many replies training and eval decode at once: 16 on the CPU, where wider steps stop paying
        (benchmarks/batch.py measures the ceiling), 64 with layers on a GPU, which decodes a wide step in about the
        time of a narrow one."""
        return 64 if self.gpu_layers else 16

    def sequence_room(self, tokens: int) -> int:
        """KV cells for one sequence of ``tokens`` (prompt and reply) beside others: a small margin, rounded up to
        256, and no more than the model was trained on."""
        return min((tokens + 8 + 255) // 256 * 256, self.info.n_ctx_train)

    def parallel_context(self, jobs: Sequence["Job"], parallel: int | None = None, taps: bool = True) -> "Context":
        """A context for generate_parallel: up to ``parallel`` (default ``reply_rows``) sequences, each with its
        own KV cells, room for the longest prompt plus the most tokens any job may generate (rounded up to 256)."""
        parallel = parallel or self.reply_rows
        per_sequence = self.sequence_room(max(len(job.prompt) + job.sampling.max_tokens for job in jobs))
        parallel = max(1, min(parallel, len(jobs)))
        return self.context(n_ctx=per_sequence * parallel, n_seq=parallel, unified=False, taps=taps)

    @_while_open
    def context(
        self, n_ctx: int = 4096, n_seq: int = 1, n_batch: int = 512, taps: bool = False, unified: bool = True
    ) -> "Context":
        """A new context. ``unified`` shares one KV cache among sequences, keeping batch rows in order for
        taps and allowing shared prefixes; non-unified gives each sequence its own cache of n_ctx / n_seq
        cells laid out exactly as if it ran alone (what makes parallel generation reproducible)."""
        return Context(self, n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch, taps=taps, unified=unified)


# --------------------------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """A llama.cpp sampler chain: repeat penalty, top-k, top-p, min-p, temperature, then a seeded draw."""

    def __init__(self, model: Model, settings: Sampling, seed: int):
        self.settings = settings
        self.seed = seed
        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda sampler: L.llama_sampler_chain_add(self._chain, sampler)  # noqa: E731
        if settings.repeat_penalty != 1.0:
            # -1 is the whole context, as in llama.cpp's own tools; the sampler itself would read it as 0 (off)
            last_n = model.info.n_ctx_train if settings.repeat_last_n == -1 else settings.repeat_last_n
            add(L.llama_sampler_init_penalties(model.info.n_vocab, last_n, settings.repeat_penalty, 0.0, 0.0))
        if settings.temperature <= 0:
            add(L.llama_sampler_init_greedy())
            return
        if settings.top_k > 0:
            add(L.llama_sampler_init_top_k(settings.top_k))
        add(L.llama_sampler_init_top_p(settings.top_p, 1))
        add(L.llama_sampler_init_min_p(settings.min_p, 1))
        add(L.llama_sampler_init_temp(settings.temperature))
        add(L.llama_sampler_init_dist(seed))

    def sample(self, context: "Context", row: int) -> int:
        """Draw a token from the logits of batch row ``row`` (-1: the last row) and remember it."""
        return context.sample(self._chain, row)

    def close(self) -> None:
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Contexts: decoding, control vectors, taps


class Tap(Protocol):
    """Sees the residual stream after chosen layers while llama.cpp computes a batch.

    ``layers``: the layer indices N of the ``l_out-N`` tensors wanted. ``__call__(layer, hidden)`` gets a
    (tokens, n_embd) float32 copy, rows in batch order; return True to write ``hidden`` back into the graph,
    which changes everything downstream (the next layers, the K/V stored in the cache, the logits). The final
    layer only has rows for the tokens whose logits were requested.
    """

    layers: frozenset[int]

    def __call__(self, layer: int, hidden: np.ndarray) -> bool: ...


def consecutive_runs(seqs: Sequence[int]) -> list[slice]:
    """Sorted sequence ids ``seqs`` cut where they stop being consecutive, as slices of the list.

    llama.cpp computes a batch over separate KV streams in one micro-batch per run of consecutive sequence ids,
    and a tap sees one micro-batch at a time with its rows counted from 0. Decoding each run on its own keeps
    every tap row the job that was announced for it (a batch of sequences 0, 2 and 3 would otherwise show the
    row of sequence 2 as row 0, and it would be steered and metered as sequence 0).
    """
    runs, start = [], 0
    for index in range(1, len(seqs) + 1):
        if index == len(seqs) or seqs[index] != seqs[index - 1] + 1:
            runs.append(slice(start, index))
            start = index
    return runs


def _one_micro_batch(seqs: Sequence) -> bool:
    """Whether llama.cpp computes a batch over separate KV streams as one micro-batch with rows in batch order:
    tokens of a single sequence, or one token each for one run of consecutive sequences."""
    if any(not isinstance(owner, int) for owner in seqs):
        return False
    return len(set(seqs)) <= 1 or len(consecutive_runs(seqs)) == 1


def _free_context(ctx, batch, _model: Model) -> None:
    L.llama_batch_free(batch)
    L.llama_free(ctx)


class Context:
    """A llama.cpp context: KV cache, control vector and taps. Sequence 0 is the single-stream "session"."""

    def __init__(self, model: Model, n_ctx: int, n_seq: int, n_batch: int, taps: bool, unified: bool):
        self.model = model
        self.n_seq = n_seq
        self.unified = unified
        self.n_layer = model.info.n_layer
        self.n_embd = model.info.n_embd
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch  # one micro-batch per decode: taps see rows in batch order
        params.n_seq_max = n_seq
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = model.threads
        params.no_perf = True
        self._filter = None
        if taps:
            on_tap = weakref.WeakMethod(self._on_tap)  # not a cycle: a dropped context is freed at once, not by gc
            self._answer = L.ggml_backend_sched_eval_callback(lambda tensor, ask, data: on_tap()(tensor, ask, data))
            self._filter = _TapFilterState(self._answer, _GgmlTensor.name.offset)
            params.cb_eval = _tap_filter_eval
            params.cb_eval_user_data = ctypes.addressof(self._filter)
        self._tap: Tap | None = None
        self._stop_after: int | None = None
        self._tap_error: BaseException | None = None
        _log.take_errors()
        with ctrl_c_held() as pressed:
            self._ctx = L.llama_init_from_model(model._model, params)
        if pressed:
            if self._ctx:
                L.llama_free(self._ctx)
            raise KeyboardInterrupt
        if not self._ctx:
            detail = "; ".join(_log.take_errors()) or "out of memory?"
            raise EqzError(f"llama.cpp could not create a context of {n_ctx} tokens: {detail}", exit_code=1)
        self.n_ctx = L.llama_n_ctx(self._ctx)
        # llama.cpp caps the batch at the context asked for, then rounds the context up: a prompt that fits the
        # rounded context still has to go in pieces of the capped batch (one too big aborts the process)
        self.n_batch = min(n_batch, L.llama_n_batch(self._ctx), L.llama_n_ubatch(self._ctx))
        self._batch = L.llama_batch_init(self.n_batch, 0, max(1, n_seq))
        # freed when the context is dropped too (its KV cache is large); holding the model keeps it until then
        self._release = weakref.finalize(self, _free_context, self._ctx, self._batch, model)
        self._release.atexit = False
        self._memory = L.llama_get_memory(self._ctx)
        self._lock = threading.RLock()  # held by every use of the context, and by close()
        self._closed_because = ""
        model._contexts.add(self)
        self.session_tokens: list[int] = []  # what the KV cache holds for sequence 0
        self.control_vector: np.ndarray | None = None

    @property
    def has_taps(self) -> bool:
        return self._filter is not None

    def _require_open(self) -> None:
        if not self._ctx:
            raise EqzError(self._closed_because)

    def close(self, because: str = CONTEXT_CLOSED) -> None:
        """Free the context; ``because`` is what a later use of it is told. A decode running in another thread (a
        server's) finishes first."""
        with self._lock:
            if self._ctx:
                self._release()
                self._ctx = self._memory = None
                self._closed_because = because

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control vectors

    @_while_open
    def set_control_vector(self, vector: np.ndarray | None) -> None:
        """Steer every token decoded from now on by ``vector`` (n_layer, n_embd): row N is added after layer N.

        None, or all zeros, clears it: the graph is then exactly the unsteered one. Row 0 must be zero
        (llama.cpp cannot steer layer 0). Tokens already in the KV cache keep the activations they had.
        """
        if vector is None or not np.any(vector):
            L.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, -1, -1)
            self.control_vector = None
            return
        if vector.shape != (self.n_layer, self.n_embd):
            raise EqzError(
                f"control vector has shape {vector.shape}, the model needs ({self.n_layer}, {self.n_embd})"
            )
        if not np.isfinite(vector).all():  # else NaN (inf x 0) lands on row 0 and the line below blames layer 0
            raise EqzError(NOT_FINITE)
        if np.any(vector[0]):
            raise EqzError("a control vector cannot steer layer 0 (llama.cpp starts at layer 1)")
        rows = np.ascontiguousarray(vector[1:], dtype=np.float32)
        data = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if L.llama_set_adapter_cvec(self._ctx, data, rows.size, self.n_embd, 1, self.n_layer - 1) != 0:
            raise EqzError("llama.cpp refused the control vector", exit_code=1)
        self.control_vector = vector.copy()

    # -- taps

    def set_tap(self, tap: Tap | None, stop_after: int | None = None) -> None:
        """Route the residual stream of ``tap.layers`` to ``tap`` on every following decode (None: stop).

        ``stop_after``: skip the rest of the graph once that layer is read (hidden states only: the KV cache
        of later layers and the logits are left unset, so clear the context afterwards).
        """
        if tap is not None and self._filter is None:
            raise RuntimeError("this context was made without taps=True")
        if self._filter is not None:
            wanted = np.zeros(_MAX_TAP_LAYERS, dtype=np.uint8)
            if tap is not None:
                wanted[list(tap.layers)] = 1
            ctypes.memmove(self._filter.wanted, wanted.ctypes.data, _MAX_TAP_LAYERS)
        self._tap = tap
        self._stop_after = stop_after

    def _on_tap(self, tensor: int, ask: bool, _user_data) -> bool:
        # Called by llama.cpp (through the C filter) once a wanted l_out-N is computed, before its consumers.
        try:
            head = _GgmlTensor.from_address(tensor)
            if self._tap is None or head.type != _GGML_TYPE_F32:
                return True
            layer = int(head.name[6:])
            hidden = np.empty((head.ne[1], head.ne[0]), dtype=np.float32)
            _ggml.ggml_backend_tensor_get(tensor, hidden.ctypes.data, 0, hidden.nbytes)
            if self._tap(layer, hidden):
                _ggml.ggml_backend_tensor_set(tensor, np.ascontiguousarray(hidden).ctypes.data, 0, hidden.nbytes)
            return layer != self._stop_after  # False makes llama.cpp skip the rest of the graph
        except BaseException as error:  # never let an exception unwind through C; re-raised after decode
            self._tap_error = error
        return True

    # -- decoding

    @_while_open
    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence, logits: Sequence[bool]):
        """One llama_decode of up to ``n_batch`` tokens; ``seqs[i]`` is token i's sequence, or a tuple of
        sequences that share it (a common prefix computed once)."""
        count = len(tokens)
        if count > self.n_batch:
            raise ValueError(f"{count} tokens exceed the batch size {self.n_batch}")
        if self.has_taps and not self.unified and not _one_micro_batch(seqs):
            raise ValueError("with separate KV streams and taps, decode one sequence's tokens or one token each "
                             "for consecutive sequences (llama.cpp splits other batches; tap rows would not follow)")
        batch = self._batch
        batch.n_tokens = count
        for i in range(count):
            batch.token[i] = tokens[i]
            batch.pos[i] = positions[i]
            owners = seqs[i]
            if isinstance(owners, int):
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = owners
            else:
                batch.n_seq_id[i] = len(owners)
                for k, owner in enumerate(owners):
                    batch.seq_id[i][k] = owner
            batch.logits[i] = logits[i]
        with ctrl_c_held(self.has_taps) as pressed:
            status = L.llama_decode(self._ctx, batch)
        error, self._tap_error = self._tap_error, None
        if pressed:
            raise KeyboardInterrupt
        if error is not None:
            raise error
        if status == 1:
            raise EqzError("the context is full; raise --ctx (n_ctx in the library) or shorten the conversation",
                           exit_code=1)
        if status != 0:
            raise EqzError(f"llama.cpp failed to decode (status {status})", exit_code=1)

    @_while_open
    def sample(self, chain, row: int) -> int:
        """A token drawn by sampler ``chain`` from batch row ``row``'s logits (see ``Sampler``)."""
        return L.llama_sampler_sample(chain, self._ctx, row)

    @_while_open
    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row ``row`` of the last decode (a copy)."""
        pointer = L.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.model.info.n_vocab,)).copy()

    @_while_open
    def clear(self) -> None:
        L.llama_memory_clear(self._memory, True)
        self.session_tokens = []

    @_while_open
    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence ``seq`` from position ``start`` on."""
        L.llama_memory_seq_rm(self._memory, seq, start, -1)

    @_while_open
    def share(self, source: int, target: int) -> None:
        """Let sequence ``target`` reuse every cached token of ``source`` (a shared prompt prefix, no compute)."""
        L.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    @_while_open
    def save_sequence(self, seq: int) -> bytes:
        """The KV cache of sequence ``seq`` as bytes, for restore_sequence in this or another context of the model."""
        size = L.llama_state_seq_get_size(self._ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        if L.llama_state_seq_get_data(self._ctx, buffer, size, seq) != size:
            raise EqzError(f"llama.cpp could not copy sequence {seq} out of the KV cache", exit_code=1)
        return bytes(buffer)

    @_while_open
    def restore_sequence(self, state: bytes, seq: int) -> None:
        """Make sequence ``seq`` hold a saved KV cache (save_sequence), exactly as the decode that made it left it."""
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if L.llama_state_seq_set_data(self._ctx, buffer, len(state), seq) != len(state):
            raise EqzError(f"llama.cpp could not restore sequence {seq}: the KV cache has no room", exit_code=1)

    def prefill(self, tokens: Sequence[int]) -> None:
        """Make sequence 0 hold exactly ``tokens``, reusing the longest prefix already in the cache.

        Afterwards the logits of the last token are ready for sampling.
        """
        tokens = list(tokens)
        if not tokens:
            raise EqzError("nothing to decode: the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise EqzError(
                f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten it or raise --ctx (n_ctx in the library)"
            )
        keep = 0
        for cached, new in zip(self.session_tokens, tokens):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # always decode the last token again to get its logits
        self.forget(0, keep)
        self.session_tokens = tokens[:keep]
        self.decode_prompt(tokens[keep:], 0, keep)
        self.session_tokens = tokens

    def decode_prompt(self, tokens: Sequence[int], seq: int, start: int = 0,
                      before_chunk: Callable[[int], None] | None = None) -> None:
        """Decode ``tokens`` into sequence ``seq`` from position ``start`` in chunks of ``n_batch``, with logits
        for the last token only; ``before_chunk(size)`` is told before each decode."""
        tokens = list(tokens)
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            last = offset + len(chunk) == len(tokens)
            if before_chunk:
                before_chunk(len(chunk))
            self.decode(chunk, range(start + offset, start + offset + len(chunk)), [seq] * len(chunk),
                        [last and i == len(chunk) - 1 for i in range(len(chunk))])
