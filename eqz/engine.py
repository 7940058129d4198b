"""eqz's one door to llama.cpp: models, contexts, batches, sampling, control vectors and hidden-state taps.

Nothing else in eqz imports ``llama_cpp``. Everything here speaks numpy and plain Python to the rest of the
package, so the math on vectors can be tested without a model and the CLI stays thin.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.machinery
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

import llama_cpp as L
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import EqzError
from .models import ModelInfo
from .sampling import Sampling

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


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (``--debug``)."""
    _log.verbose = verbose


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
    raise EqzError("eqz's compiled tap filter is missing; reinstall eqz (make clean && make test)", exit_code=1)


_tap_filter_lib = _load_tap_filter()
_tap_filter_eval = L.ggml_backend_sched_eval_callback(("eqz_tap_filter_eval", _tap_filter_lib))


def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp decodes fastest with one thread per core."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


# --------------------------------------------------------------------------------------------------------------
# Models


FALLBACK_STOPS = ("\nUser:", "\nAssistant:")


def _check_gguf_header(path: Path) -> None:
    if not path.exists():
        raise EqzError(f"model file not found: {path} (pass --model PATH or set EQZ_MODEL)")
    if not path.is_file():
        raise EqzError(f"model path is not a file: {path} (pass the .gguf file itself)")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise EqzError(f"{path} is not a GGUF file (llama.cpp models are .gguf files that start with 'GGUF')")


def _explain_load_failure(path: Path, errors: list[str]) -> EqzError:
    """Turn llama.cpp's log lines about a failed load into one actionable line."""
    joined = " ".join(errors)
    cause = next((line for line in errors if "failed to load model" not in line), "no reason given")
    cause = cause.split("error loading model: ", 1)[-1]
    if "unknown model architecture" in joined:
        arch = joined.split("unknown model architecture:", 1)[1].strip().split()[0].strip("'")
        if arch == "controlvector":
            return EqzError(f"{path} is a control vector, not a model; pass it with --vector FILE[:SCALE]")
        return EqzError(
            f"{path}: architecture '{arch}' is not supported by the llama.cpp in this eqz "
            f"(llama-cpp-python {L.__version__}); use a model of a supported architecture"
        )
    if "not within the file bounds" in joined or "gguf_init" in joined:
        return EqzError(f"{path} is truncated or corrupt ({cause}); download or copy the file again")
    return EqzError(f"llama.cpp could not load {path}: {cause}")


class Model:
    """A GGUF model loaded by llama.cpp (weights and vocabulary), shared by the contexts made from it."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        _check_gguf_header(self.path)
        self.threads = threads or physical_cores()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        _log.take_errors()
        self._model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise _explain_load_failure(self.path, _log.take_errors())
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
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata and vocabulary

    def meta(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(4096)
        size = L.llama_model_meta_val_str(self._model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8", "replace") if size >= 0 else None

    @property
    def bos(self) -> int:
        return L.llama_vocab_bos(self._vocab)

    @property
    def eos(self) -> int:
        return L.llama_vocab_eos(self._vocab)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return L.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokens of ``text``; ``add_special`` adds BOS where the model wants one (never twice)."""
        if add_special and self.bos >= 0 and text.startswith(self._token_text(self.bos)):
            add_special = False
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (L.llama_token * capacity)()
        count = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            buffer = (L.llama_token * capacity)()
            count = L.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as empty)."""
        buffer = ctypes.create_string_buffer(64)
        size = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = L.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(token) for token in tokens).decode("utf-8", "replace")

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
                lines.append(f"{'User' if role == 'user' else 'Assistant'}: {content}")
        return "\n".join(lines) + "\nAssistant:", FALLBACK_STOPS

    def parallel_context(self, jobs: Sequence["Job"], parallel: int, taps: bool = True) -> "Context":
        """A context for generate_parallel: up to ``parallel`` sequences, each with its own KV cells, room for the
        longest prompt plus the most tokens any job may generate (rounded up to 256)."""
        longest = max(len(job.prompt) + job.sampling.max_tokens for job in jobs)
        per_sequence = (longest + 8 + 255) // 256 * 256
        parallel = max(1, min(parallel, len(jobs)))
        return self.context(n_ctx=per_sequence * parallel, n_seq=parallel, unified=False, taps=taps)

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
            n_vocab = model.info.n_vocab
            add(L.llama_sampler_init_penalties(n_vocab, settings.repeat_last_n, settings.repeat_penalty, 0.0, 0.0))
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
        return L.llama_sampler_sample(self._chain, context._ctx, row)

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


@dataclass
class Step:
    """One generated token and the text it completes (possibly empty while a UTF-8 sequence is open).

    A last Step with ``token`` None may flush text held back while it could have begun a stop string.
    """

    token: int | None
    text: str


class Context:
    """A llama.cpp context: KV cache, control vector and taps. Sequence 0 is the single-stream "session"."""

    def __init__(self, model: Model, n_ctx: int, n_seq: int, n_batch: int, taps: bool, unified: bool):
        self.model = model
        self.n_seq = n_seq
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
            self._answer = L.ggml_backend_sched_eval_callback(self._on_tap)
            self._filter = _TapFilterState(self._answer, _GgmlTensor.name.offset)
            params.cb_eval = _tap_filter_eval
            params.cb_eval_user_data = ctypes.addressof(self._filter)
        self._tap: Tap | None = None
        self._stop_after: int | None = None
        self._tap_error: BaseException | None = None
        _log.take_errors()
        self._ctx = L.llama_init_from_model(model._model, params)
        if not self._ctx:
            detail = "; ".join(_log.take_errors()) or "out of memory?"
            raise EqzError(f"llama.cpp could not create a context of {n_ctx} tokens: {detail}", exit_code=1)
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self.n_batch = n_batch
        self._batch = L.llama_batch_init(n_batch, 0, max(1, n_seq))
        self._memory = L.llama_get_memory(self._ctx)
        self.session_tokens: list[int] = []  # what the KV cache holds for sequence 0
        self.control_vector: np.ndarray | None = None

    @property
    def has_taps(self) -> bool:
        return self._filter is not None

    def close(self) -> None:
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- control vectors

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

    def decode(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence, logits: Sequence[bool]):
        """One llama_decode of up to ``n_batch`` tokens; ``seqs[i]`` is token i's sequence, or a tuple of
        sequences that share it (a common prefix computed once)."""
        count = len(tokens)
        if count > self.n_batch:
            raise ValueError(f"{count} tokens exceed the batch size {self.n_batch}")
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
        status = L.llama_decode(self._ctx, batch)
        if self._tap_error is not None:
            error, self._tap_error = self._tap_error, None
            raise error
        if status == 1:
            raise EqzError("the context is full; raise --ctx or shorten the conversation", exit_code=1)
        if status != 0:
            raise EqzError(f"llama.cpp failed to decode (status {status})", exit_code=1)

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row ``row`` of the last decode (a copy)."""
        pointer = L.llama_get_logits_ith(self._ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.model.info.n_vocab,)).copy()

    def clear(self) -> None:
        L.llama_memory_clear(self._memory, True)
        self.session_tokens = []

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop sequence ``seq`` from position ``start`` on."""
        L.llama_memory_seq_rm(self._memory, seq, start, -1)

    def share(self, source: int, target: int) -> None:
        """Let sequence ``target`` reuse every cached token of ``source`` (a shared prompt prefix, no compute)."""
        L.llama_memory_seq_cp(self._memory, source, target, -1, -1)

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
                "shorten it or raise --ctx"
            )
        keep = 0
        for cached, new in zip(self.session_tokens, tokens):
            if cached != new:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # always decode the last token again to get its logits
        self.forget(0, keep)
        self.session_tokens = tokens[:keep]
        for start in range(keep, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            self.decode(
                chunk,
                range(start, start + len(chunk)),
                [0] * len(chunk),
                [last and i == len(chunk) - 1 for i in range(len(chunk))],
            )
            self.session_tokens.extend(chunk)

    def stream(
        self, sampler: Sampler, max_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False
    ) -> "Stream":
        """Generate after ``prefill``: iterate the returned Stream for tokens as they come.

        ``ignore_eos`` keeps going past end-of-turn tokens (fixed-length runs for benchmarks and tests).
        """
        return Stream(self, sampler, max_tokens, stop, ignore_eos)


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
        tail = self.held + self.decoder.decode(b"", final=True)
        self.held = ""
        self.text += tail
        return tail


class Stream:
    """Tokens of one reply on sequence 0, sampled and decoded one at a time.

    Each Step is yielded *before* its token is decoded, so a control vector set while handling step k
    steers the logits of step k+1: a slider moved mid-reply changes the very next token.
    ``finish_reason`` ends as "stop" (end of turn or stop string), "length" (max_tokens) or "context" (full).
    """

    def __init__(self, context: Context, sampler: Sampler, max_tokens: int, stop: Sequence[str], ignore_eos: bool):
        self.context = context
        self.ignore_eos = ignore_eos
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._assembler = _TextAssembler(context.model, stop)

    @property
    def text(self) -> str:
        return self._assembler.text

    def __iter__(self) -> Iterator[Step]:
        context, model = self.context, self.context.model
        while True:
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
                break
            if len(context.session_tokens) >= context.n_ctx:
                self.finish_reason = "context"
                break
            token = self.sampler.sample(context, -1)
            if model.is_eog(token) and not self.ignore_eos:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            emit, stopped = self._assembler.push(token)
            yield Step(token, emit)
            if stopped:
                self.finish_reason = "stop"
                return
            position = len(context.session_tokens)
            context.decode([token], [position], [0], [True])
            context.session_tokens.append(token)
        tail = self._assembler.flush()
        if tail:
            yield Step(None, tail)


def _split_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split ``text`` into (safe to show, held back, stopped): hold back a possible start of a stop string."""
    for stop in stops:
        index = text.find(stop)
        if index >= 0:
            return text[:index], "", True
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


# --------------------------------------------------------------------------------------------------------------
# Many sequences at once: hidden states of many texts, and parallel generation


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


@dataclass
class Finished:
    job: Job
    tokens: list[int]
    text: str
    finish_reason: str


class _Slot:
    def __init__(self, context: Context, seq: int, job: Job):
        self.seq = seq
        self.job = job
        self.sampler = Sampler(context.model, job.sampling, job.seed)
        self.assembler = _TextAssembler(context.model, job.stop)
        self.tokens: list[int] = []
        self.position = len(job.prompt)
        self.next_token: int | None = None
        self.finish_reason: str | None = None

    def take(self, context: Context, row: int) -> int | None:
        """Sample from batch row ``row``; returns the token to decode next, or None when the job is done."""
        job, model = self.job, context.model
        token = self.sampler.sample(context, row)
        if model.is_eog(token) and not job.ignore_eos:
            self.finish_reason = "stop"
            return None
        self.tokens.append(token)
        _, stopped = self.assembler.push(token)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= job.sampling.max_tokens:
            self.finish_reason = "length"
        elif self.position >= context.n_ctx // context.n_seq:
            self.finish_reason = "context"
        return None if self.finish_reason else token

    def result(self) -> Finished:
        self.assembler.flush()
        self.sampler.close()
        return Finished(self.job, self.tokens, self.assembler.text, self.finish_reason or "length")


class _RowSteering:
    """Per-sequence control vectors: adds each batch row's own vector to the residual stream after each layer.

    llama.cpp's control vector is one per context; writing ``l_out-N + v`` back through a tap is the same float
    addition its ``ggml_add`` does, so a row steered here gets exactly the tokens the context vector would give,
    while rows with different settings share one batch.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = frozenset(layers)
        self.rows: list[np.ndarray | None] = []

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        changed = False
        for row, vector in enumerate(self.rows[: len(hidden)]):
            if vector is not None and np.any(vector[layer]):
                hidden[row] += vector[layer]
                changed = True
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
    and flash attention skips other sequences' cells), so outputs do not depend on the parallelism.
    Jobs are read lazily; at most ``window`` finished results wait for an earlier, slower job.
    """
    window = window or 4 * context.n_seq
    steering = _RowSteering(row_steering) if row_steering is not None else None
    if steering is not None:
        context.set_tap(steering)
        context.set_control_vector(None)

    def announce(rows: list[Job], reply: bool) -> None:
        """Before a decode: whose rows these are (for the row steering and the meter)."""
        if steering is not None:
            steering.rows = [job.vector for job in rows]
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
        while upcoming is not None or active or done:
            # start jobs while there is room, the vector matches, and results are not piling up
            while (
                upcoming is not None
                and len(active) < context.n_seq
                and started - emitted < window
                and (steering is not None or not active or upcoming.vector_key == current_key)
            ):
                if steering is None and upcoming.vector_key != current_key:
                    context.set_control_vector(upcoming.vector)
                    current_key = upcoming.vector_key
                seq = next(s for s in range(context.n_seq) if s not in active)
                slot = _Slot(context, seq, upcoming)
                prompt = list(upcoming.prompt)
                if len(prompt) >= context.n_ctx // context.n_seq:
                    raise EqzError(
                        f"a prompt of {len(prompt)} tokens does not fit the {context.n_ctx // context.n_seq} "
                        "tokens each parallel sequence has; shorten it, lower --parallel or raise --ctx"
                    )
                for start in range(0, len(prompt), context.n_batch):
                    chunk = prompt[start : start + context.n_batch]
                    last = start + len(chunk) == len(prompt)
                    announce([upcoming] * len(chunk), reply=False)
                    context.decode(chunk, range(start, start + len(chunk)), [seq] * len(chunk),
                                   [last and i == len(chunk) - 1 for i in range(len(chunk))])
                slot.next_token = slot.take(context, -1)
                active[seq] = (started, slot)
                started += 1
                upcoming = next(queue, None)
            # finish slots that are done, then decode one token for every running slot
            for seq in [s for s, (_, slot) in active.items() if slot.finish_reason]:
                number, slot = active.pop(seq)
                context.forget(seq)
                done[number] = slot.result()
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
            running = sorted(active.items())
            if not running:
                continue
            announce([slot.job for _, (_, slot) in running], reply=True)
            context.decode(
                [slot.next_token for _, (_, slot) in running],
                [slot.position for _, (_, slot) in running],
                [seq for seq, _ in running],
                [True] * len(running),
            )
            for row, (_, (_, slot)) in enumerate(running):
                slot.position += 1
                slot.next_token = slot.take(context, row)
    finally:
        if steering is not None:
            context.set_tap(None)


