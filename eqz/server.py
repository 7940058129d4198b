"""``eqz serve``: an OpenAI-compatible HTTP server with per-request sliders, and the web equalizer at ``/``.

A thin client of the library: every request becomes ``EqzModel.request(...)`` on one ``EqzModel.server()`` decode
loop, so concurrent requests share each decode whatever their moods. The eqz settings ride in an extra body field
that OpenAI clients pass through (``extra_body={"eqz": {...}}`` in the ``openai`` library):

    {"sliders": {"joy": 0.8}, "preset": "curious", "clamp": {"fear": 0}, "ablate": ["anger"], "meter": true}

Errors are in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, one line each: HTTP 4xx for what
a request got wrong (an OpenAI field asking for what eqz cannot do included), 503 once the decode loop has stopped
or the server is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api import EqzModel
from .bands import MAX_GAIN, SAFE_GAIN, band_key, check_gain, keyed_by_band
from .engine import utf8
from .errors import EqzError
from .meter import metered_bands
from .presets import discover, get_preset, is_preset_name
from .serving import DecodeLoopStopped, PromptTooLong, ServerBusy, loop_stopped

KEPT_RECORDS = 256  # finished replies kept for GET /v1/eqz/streams/{id}
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "seed": "seed", "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                   "repeat_penalty": "repeat_penalty"}
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
# JSON integers among them, and their top where sampling sets none (llama.cpp keeps them in 32 bits)
WHOLE_FIELDS = {"top_k": 2**31 - 1, "seed": 2**32 - 1, "max_tokens": 2**31 - 1, "max_completion_tokens": 2**31 - 1}
# A slot's 2048 tokens of text are ~10 KB, ~60 KB spelt out in JSON escapes: a bigger body is never a prompt that
# fits, and reading and tokenizing it would only keep the server busy.
MAX_BODY = 2**20
DRAINED_AT_MOST = 64 * MAX_BODY  # read and dropped before a 413, so that a client still sending sees the answer
# OpenAI fields eqz cannot honour: (the values that ask for nothing, which client libraries send as defaults, why not)
UNSUPPORTED = {
    "logprobs": ((None, False), "eqz returns no log-probabilities"),
    "top_logprobs": ((None, 0), "eqz returns no log-probabilities"),
    "response_format": ((None, {"type": "text"}), "eqz cannot hold a reply to a format"),
    "tools": ((None, []), "eqz calls no tools"),
    "tool_choice": ((None, "none", "auto"), "eqz calls no tools"),
    "functions": ((None, []), "eqz calls no functions"),
    "function_call": ((None, "none", "auto"), "eqz calls no functions"),
    "presence_penalty": ((None, 0), "eqz has repeat_penalty instead"),
    "frequency_penalty": ((None, 0), "eqz has repeat_penalty instead"),
    "logit_bias": ((None, {}), "eqz biases no tokens"),
}
UNSUPPORTED_IN_COMPLETIONS = {
    "echo": ((None, False), "eqz returns only the completion"),
    "suffix": ((None, ""), "eqz completes only after the prompt"),
    "best_of": ((None, 1), "eqz makes one candidate per request"),
}


class BadRequest(EqzError):
    """What was wrong with a request body, in one line, and where: ``param`` is the field as OpenAI's errors name
    it (``messages[1].role``, ``temperature``, ``eqz.sliders.joy``), which client libraries show as ``error.param``."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BodyTooLarge(EqzError):
    """A body over MAX_BODY: HTTP 413, refused without keeping it."""

    def __init__(self):
        super().__init__(f"the body is over {MAX_BODY // 2**20} MiB, far more than a reply's context can hold")


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
           code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def check_api_key(key: str | None) -> None:
    """A key a client can send: HTTP carries a header in ASCII and trims the spaces at its ends, so a key with
    spaces or other characters would lock every client out."""
    if key and not all("!" <= character <= "~" for character in key):
        raise EqzError("an API key must be printable ASCII without spaces (a client could never send this one); "
                       "choose another, such as the output of `openssl rand -hex 16`")


def check_origins(origins) -> list[str]:
    """``--cors``'s origins as the browser sends them (scheme://host[:port], no path; an extension's
    chrome-extension://ID; null, a local file's page), or "*"; one line otherwise."""
    origins = [origins] if isinstance(origins, str) else list(origins or ())
    for origin in origins:
        if not isinstance(origin, str) or (origin not in ("*", "null")
                                           and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", origin)):
            raise EqzError(f"--cors takes a web page's origin, such as http://localhost:3000 (scheme, host and "
                           f"port, no path), or *; got {origin!r}")
    return origins


def check_exposure(host: str, key: str | None) -> None:
    """A key clients can send, and one at all wherever others than this machine can connect."""
    check_api_key(key)
    if not is_loopback(host) and not key:
        raise EqzError(f"--host {host} would let anyone on the network use this machine; add --api-key KEY "
                       "(api_key in the library), or leave the host at 127.0.0.1")


class EqzServer:
    """The app's state: the model, its decode loop, and the replies running or recently finished."""

    def __init__(self, model: EqzModel, parallel: int = 4, per_sequence: int = 2048, max_waiting: int = 64,
                 api_key: str | None = None, preset: str | None = None, cors=()):
        check_api_key(api_key)
        origins = check_origins(cors)
        self.model = model
        self.name = Path(model.info.path).stem
        self.api_key = api_key
        bank = model.bank_if_any()
        self.bands = bank.names if bank else ()
        # for requests that choose no mood (front-ends that cannot send an "eqz" field), read once: a misspelt
        # preset fails here, not on every request, and an edit to its file does not change a running server (its
        # config would show one mood while requests got another). Clients may name it (the web page starts from
        # it), a file too, which they could not name themselves
        self.default = get_preset(preset, model.bank.names) if preset else None
        # the warning `eqz generate --set BAND=1` prints, per band that has one: the web page shows it too
        self.doubts = {band: lines[0] for band in self.bands if (lines := bank.doubtful({band: 1.0}))}
        self.metered = bool(bank and metered_bands(bank))
        self.loop = model.server(parallel, per_sequence, max_waiting)
        self.stopping = False  # set as uvicorn begins to exit: a request that comes then is told so
        self.records: OrderedDict[str, dict] = OrderedDict()
        self.app = Starlette(routes=[
            Route("/", self.page),
            Route("/v1/models", self.models),
            Route("/v1/models/{id:path}", self.model_info),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/eqz/config", self.config),
            Route("/v1/eqz/streams/{id}", self.stream_state, methods=["GET", "POST"]),
        ], exception_handlers={
            404: lambda request, exc: _error(404, f"no such path: {request.url.path}", "not_found"),
            405: lambda request, exc: _error(405, f"{request.method} is not allowed on {request.url.path}",
                                             "invalid_request_error"),
            BodyTooLarge: lambda request, exc: _error(413, str(exc)),
            ServerBusy: lambda request, exc: _error(429, str(exc), "rate_limit_error", {"Retry-After": "1"}),
            DecodeLoopStopped: lambda request, exc: _error(503, str(exc), "server_error"),
            # OpenAI's code for it: a chat client (the web page too) drops its oldest turns and asks again
            PromptTooLong: lambda request, exc: _error(400, str(exc), code="context_length_exceeded",
                                                       param="messages" if "chat" in request.url.path else "prompt"),
            BadRequest: lambda request, exc: _error(400, str(exc), param=exc.param),
            EqzError: lambda request, exc: _error(400, str(exc)),  # one line; the server never dies of a request
        })
        if api_key:
            self.app.add_middleware(_KeyCheck, key=api_key)
        else:  # only this machine can connect (check_exposure): so only its own requests, not a web page's
            self.app.add_middleware(_ThisMachineOnly, origins=origins)
        if origins:  # added last, so outermost: a browser's preflight carries no key, and is answered before the check
            self.app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                    allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Eqz-Stream"])

    def close(self) -> None:
        self.loop.close()

    async def stop(self) -> None:
        """End every reply while the event loop still runs (as uvicorn begins to exit): each stream gets its last
        chunk and [DONE], each plain request a 503, and no decode-thread event is left for a closed loop."""
        self.stopping = True
        await run_in_threadpool(self.close)

    # -- routes

    async def page(self, request: HttpRequest) -> Response:
        return HTMLResponse(resources.files("eqz.data").joinpath("web.html").read_text(encoding="utf-8"))

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_entry()]})

    async def model_info(self, request: HttpRequest) -> Response:
        """One model (``client.models.retrieve``): this server's only one."""
        if request.path_params["id"] != self.name:
            return _error(404, f"no model '{request.path_params['id']}'; this server has '{self.name}'",
                          code="model_not_found")
        return JSONResponse(self._model_entry())

    def _model_entry(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "eqz"}

    async def config(self, request: HttpRequest) -> Response:
        """What the web page needs: the bands and their warnings, the presets' sliders, whether the meter can run."""
        shown = {name: entry.preset for name, entry in sorted(discover(self.bands).items()) if entry.preset is not None}
        if self.default is not None:
            shown[self.default.name] = self.default
        presets = {name: {"description": preset.description, "sliders": preset.sliders} for name, preset in shown.items()}
        return JSONResponse({"model": self.name, "bands": list(self.bands), "doubts": self.doubts, "presets": presets,
                             "preset": self.default.name if self.default else None, "gain_limit": MAX_GAIN,
                             "calibrated_gain": SAFE_GAIN, "metered": self.metered})

    async def chat_completions(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
        messages = [_message(index, message) for index, message in enumerate(messages)]
        return await self._respond(request, body, chat=True, messages=messages)

    async def completions(self, request: HttpRequest) -> Response:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        return await self._respond(request, body, chat=False, prompt=_text(prompt, "prompt"))

    async def stream_state(self, request: HttpRequest) -> Response:
        """GET: a reply's record (running or recently finished); POST {"sliders": {...}}: re-steer a running one
        from its next token on, the sliders not named keeping their latest setting. A running reply's record shows
        the sliders its next token gets."""
        stream_id = request.path_params["id"]
        if request.method == "GET":
            record = self.records.get(stream_id)
            if record is None:
                return _error(404, f"no stream '{stream_id}' (finished ones are kept for the last {KEPT_RECORDS})",
                              "not_found")
            return JSONResponse(record)
        body = await _json_body(request)
        sliders = _sliders(body.get("sliders"), self.bands, "sliders")
        record = self.records.get(stream_id)
        if record is None or record.get("finish_reason"):
            return _error(404, f"no running stream '{stream_id}'", "not_found")
        try:
            steering = self.loop.resteer(stream_id, sliders)
        except KeyError:
            return _error(404, f"stream '{stream_id}' has finished", "not_found")
        state = steering.to_dict(self.bands)
        record.update(state)
        return JSONResponse({"id": stream_id, **state})

    # -- the work

    def _prepare(self, body: dict, chat: bool, **text):
        """The request to submit, or one line saying what is wrong with ``body``. Run in a worker thread: it
        tokenizes the prompt, which takes a while for a long one and would stall every other client."""
        n = body.get("n")
        if n is not None and (type(n) is not int or n != 1):  # true would pass as 1
            raise BadRequest("'n' must be 1: eqz returns one choice per request (send more requests, or use "
                             "eqz batch --samples N)", "n")
        for field, (harmless, why) in (UNSUPPORTED | ({} if chat else UNSUPPORTED_IN_COMPLETIONS)).items():
            if body.get(field) not in harmless:
                raise BadRequest(f"'{field}' is not supported as sent ({why}); leave it out", field)
        settings = body.get("eqz") or {}
        if not isinstance(settings, dict):
            raise BadRequest("'eqz' must be an object: {\"sliders\", \"preset\", \"clamp\", \"ablate\", \"meter\"}",
                             "eqz")
        unknown = set(settings) - {"sliders", "preset", "clamp", "ablate", "meter"}
        if unknown:
            raise BadRequest(f"unknown eqz field '{sorted(unknown)[0]}'; known: sliders, preset, clamp, ablate, meter",
                             f"eqz.{sorted(unknown)[0]}")
        sampling = {name: _number(field, body[field], field) for field, name in SAMPLING_FIELDS.items()
                    if body.get(field) is not None}
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of strings", "stop")
        clamp = settings.get("clamp") or {}
        ablate = settings.get("ablate") or []
        if not isinstance(clamp, dict) or not isinstance(ablate, list):
            raise BadRequest("eqz 'clamp' is {band: level} and 'ablate' a list of bands",
                             "eqz.clamp" if not isinstance(clamp, dict) else "eqz.ablate")
        for band, level in clamp.items():
            _number(f"level for {band}", level, f"eqz.clamp.{band}")
        meter = _flag("eqz 'meter'", settings.get("meter"), "eqz.meter")
        preset = settings.get("preset")
        if preset is not None and not (isinstance(preset, str) and is_preset_name(preset)):
            # a client names a preset, never a file: a path would read the server's files
            raise BadRequest("eqz 'preset' must be a preset's name (see GET /v1/eqz/config)", "eqz.preset")
        if preset is None and settings.get("sliders") is None:
            preset = self.default  # the request chose no mood (meter or filters alone are no choice): the server's
        elif self.default is not None and preset is not None and preset.strip().lower() == self.default.name:
            preset = self.default  # the server's own preset, a file perhaps
        sliders = _sliders(settings.get("sliders"), self.bands or None, "eqz.sliders")  # no bank: the library says so
        return self.model.request(**text, preset=preset, sliders=sliders,
                                  sampling=sampling, stop=stop, clamp=clamp, ablate=ablate, meter=meter)

    async def _respond(self, request: HttpRequest, body: dict, chat: bool, **text) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        streaming = _flag("'stream'", body.get("stream"), "stream")  # "false" would stream
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object {\"include_usage\": true}", "stream_options")
        usage = _flag("stream_options 'include_usage'", options.get("include_usage"), "stream_options.include_usage")
        job = await run_in_threadpool(self._prepare, body, chat, **text)

        def on_event(kind: str, data) -> None:
            """From the decode thread. A reply that is not streamed needs only its end, so it wakes this loop once,
            not once per token and row."""
            if streaming or kind in ("done", "error"):
                try:
                    loop.call_soon_threadsafe(self._deliver, job, events, kind, data)
                except RuntimeError:  # the event loop has closed (the server stopped): no one is left to tell
                    pass

        job.on_event = on_event
        if self.stopping:  # the decode loop is closing: "start another (EqzModel.server)" is for the library
            return _error(503, STOPPING, "server_error")
        self.loop.submit(job)
        created = int(time.time())
        # a running reply's record: its changes are those a token has taken so far (the decode thread adds them)
        self._remember(job.id, {"id": job.id, **job.steering.to_dict(self.bands), "changes": job.changes,
                                "finish_reason": None})
        if streaming:
            return StreamingResponse(self._chunks(job, events, created, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Eqz-Stream": job.id})
        answer = asyncio.ensure_future(events.get())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answer.cancel()  # no-op once done
            self.loop.cancel(job)  # no-op once done; frees the slot or queue place of a client that left
        if not answer.done():  # the client has gone: no one reads an answer (499: nginx's "client closed request")
            return Response(status_code=499)
        kind, data = answer.result()
        if kind == "error":
            return _error(503, loop_stopped(data), "server_error")
        if data["finish_reason"] == "cancelled":  # only the server's stop cancels a reply whose client is there
            return _error(503, STOPPING, "server_error")
        choice = {"index": 0, "finish_reason": FINISH_REASONS[data["finish_reason"]]}
        text = data["output"]
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
        return JSONResponse({
            "id": job.id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": self.name, "choices": [choice],
            "usage": _usage(data), "eqz": _without_output(data),
        })

    async def _chunks(self, job, events: asyncio.Queue, created: int, chat: bool, usage: bool):
        """Server-sent events in OpenAI's chunk shape; the last chunk carries eqz's record of the reply, and
        (``usage``: stream_options include_usage) one more with no choices the token counts, as OpenAI sends."""
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **fields) -> str:
            payload = {"id": job.id, "object": kind_name, "created": created, "model": self.name, "choices": choices,
                       **fields}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: str | None, finish: str | None = None, extra: dict | None = None, role: bool = False) -> str:
            if chat:
                content = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return event([choice], **({"eqz": extra} if extra else {}), **({"usage": None} if usage else {}))

        finished = False
        try:
            if chat:
                yield chunk(None, role=True)
            meter = None
            while True:
                kind, data = await events.get()
                if kind == "meter":
                    meter = data
                elif kind == "piece":
                    yield chunk(data, extra={"meter": {b: round(v, 3) for b, v in meter.items()}} if meter else None)
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': loop_stopped(data), 'type': 'server_error'}})}\n\n"
                    break
                elif kind == "done":
                    finished = True
                    yield chunk(None, FINISH_REASONS[data["finish_reason"]], _without_output(data))
                    if usage:
                        yield event([], usage=_usage(data))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                self.loop.cancel(job)

    def _deliver(self, job, events: asyncio.Queue, kind: str, data) -> None:
        """On the event loop: pass a decode-thread event to the response; a finished reply's record is kept for
        GET /v1/eqz/streams/{id} even when its client has gone (the response no longer reads events)."""
        if kind == "done":
            data = {"id": job.id, **data}
            self._remember(job.id, data)
        events.put_nowait((kind, data))

    def _remember(self, stream_id: str, record: dict) -> None:
        self.records[stream_id] = record
        self.records.move_to_end(stream_id)
        finished = [key for key, kept in self.records.items() if kept.get("finish_reason")]
        for key in finished[:max(0, len(self.records) - KEPT_RECORDS)]:  # a running reply's record always stays
            del self.records[key]


class _Gate:
    """ASGI middleware that answers an HTTP request itself where ``refusal`` gives a response, else passes it on."""

    def __init__(self, app):
        self.app = app

    def refusal(self, scope) -> Response | None:
        raise NotImplementedError

    async def __call__(self, scope, receive, send):
        response = self.refusal(scope) if scope["type"] == "http" else None
        if response is not None:
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _KeyCheck(_Gate):
    """Every /v1/ path needs ``Authorization: Bearer KEY`` (the page itself is public; the scheme's case is free, as
    HTTP has it)."""

    def __init__(self, app, key: str):
        super().__init__(app)
        self.expected = key.encode()

    def refusal(self, scope) -> Response | None:
        if scope["path"].startswith("/v1/"):
            scheme, _, sent = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if not (scheme.lower() == b"bearer" and secrets.compare_digest(sent.strip(), self.expected)):
                return _error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        return None


class _ThisMachineOnly(_Gate):
    """The gate of a server without a key, which listens on loopback only: a web page elsewhere could still
    use it. Its script may send requests with no CORS preflight (a text/plain POST starts a reply), and a site whose
    name it points at 127.0.0.1 (DNS rebinding) is the page's own origin and reads the replies. So a request must name
    this machine as its Host, and one a page sent (Origin) must come from this server's own page or a --cors origin.
    Clients outside a browser send no Origin; the key is the way to serve other names."""

    def __init__(self, app, origins: list[str]):
        super().__init__(app)
        self.origins = origins

    def refusal(self, scope) -> Response | None:
        headers = {name: value.decode("latin-1") for name, value in scope["headers"]}
        host, origin = headers.get(b"host", ""), headers.get(b"origin")
        here = _host_and_port(host, "http")
        if host and (here is None or not _names_this_machine(here[0])):  # no Host at all: HTTP/1.0, no browser
            address, port = scope.get("server") or ("127.0.0.1", "PORT")
            return _error(403, f"Host {host!r} is not this machine: a server without --api-key answers only to "
                          "localhost and loopback addresses, as a page on another site could otherwise reach it "
                          f"under its own name; use http://{url_host(address)}:{port}/ or give the server a key",
                          "permission_error")
        scheme, _, named = (origin or "").partition("://")
        if origin is not None and "*" not in self.origins and origin not in self.origins \
                and (here is None or _host_and_port(named, scheme) != here):  # not the server's own page
            return _error(403, f"a web page from {origin} may not use this server, or any site's page could; start "
                          f"eqz serve with --cors {origin} to let that origin's pages call it (or with --api-key KEY, "
                          "which its requests must then send)", "permission_error")
        return None


def _names_this_machine(name: str) -> bool:
    """A Host name that is this machine: localhost and *.localhost (loopback by RFC 6761, in browsers too) and
    loopback addresses; a trailing dot is the same name."""
    name = name.rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def _host_and_port(host: str, scheme: str) -> tuple[str, int] | None:
    """A Host header's (or an origin's) name and port, the scheme's default port where none is written; None where
    it names no host (``[::1`` ...)."""
    if any(character in host for character in "@/?#\\ "):  # a URL's other parts: no browser's Host has them
        return None
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname, parts.port or {"https": 443}.get(scheme, 80)) if parts.hostname else None
    except ValueError:
        return None


STOPPING = "the server is stopping; send the request again once it is back"


def _usage(record: dict) -> dict:
    """OpenAI's token counts of a reply."""
    return {"prompt_tokens": record["n_prompt_tokens"], "completion_tokens": record["n_tokens"],
            "total_tokens": record["n_prompt_tokens"] + record["n_tokens"]}


def _without_output(record: dict) -> dict:
    """A reply's record as the response's "eqz" field carries it: the text is in the choice already."""
    return {key: value for key, value in record.items() if key != "output"}


async def _disconnected(request: HttpRequest) -> None:
    """Returns once the client has gone (its body read, the next message ASGI has for a request is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _drain(chunks, read: int = 0) -> None:
    """Refuses a body over MAX_BODY once the client has sent it, dropping the rest of ``chunks`` (the request's one
    stream) as it comes: answered while it was still sending, a client met a broken pipe instead of the 413. One
    beyond DRAINED_AT_MOST is cut off."""
    async for piece in chunks:
        read += len(piece)
        if read > DRAINED_AT_MOST:
            break
    raise BodyTooLarge()


async def _json_body(request: HttpRequest) -> dict:
    declared = request.headers.get("content-length", "")
    chunks = request.stream()  # once: asked again after its last piece, Starlette raises "Stream consumed"
    if declared.isdigit() and int(declared) > MAX_BODY:
        await _drain(chunks)
    data = bytearray()
    async for piece in chunks:  # a body sent without its length is counted as it comes
        data += piece
        if len(data) > MAX_BODY:
            await _drain(chunks, len(data))
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"the body is not valid JSON ({error})") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply to read") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


ROLES = ("system", "user", "assistant", "developer")


def _message(index: int, message) -> dict:
    """The message as the chat template takes it, {"role", "content": its text (a string, or the text parts of a
    list of content parts)}; or one line naming the message, or its part, and what is wrong with it."""
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{index}] must be an object {{\"role\", \"content\"}}", f"messages[{index}]")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise BadRequest(f"messages[{index}]: role {json.dumps(role)} is not one of {', '.join(ROLES)}",
                         f"messages[{index}].role")
    if isinstance(content, str):
        return {"role": role, "content": _text(content, f"messages[{index}].content")}
    if not isinstance(content, list):
        raise BadRequest(f"messages[{index}]: 'content' must be a string or a list of text parts",
                         f"messages[{index}].content")
    return {"role": role, "content": "".join(_text(part.get("text"), f"messages[{index}].content[{number}].text")
                                             for number, part in enumerate(content)
                                             if isinstance(part, dict) and part.get("type") == "text")}


def _number(field: str, value, param: str) -> int | float:
    """``value`` if JSON gave it as a number (a whole one within WHOLE_FIELDS' top for those), else one line naming
    ``field``: sampling would read "0.5" as a command line's text, and ctypes would cut 1e20 to 32 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field} must be a number, got {json.dumps(value)}", param)
    top = WHOLE_FIELDS.get(field)
    if top is not None and (isinstance(value, float) and not value.is_integer() or value > top):
        raise BadRequest(f"{field} must be a whole number up to {top}, got {json.dumps(value)}", param)
    return value


def _flag(field: str, value, param: str) -> bool:
    """``value`` if JSON gave a boolean (or null: false), else one line naming ``field``: "false" is true in Python."""
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false, got {json.dumps(value)}", param)
    return bool(value)


def _text(value, param: str) -> str:
    """``value`` if it is text the model can read (a string that has a UTF-8 form: JSON can spell out a lone
    surrogate, which has none), else one line naming the field."""
    if not isinstance(value, str):
        raise BadRequest(f"{param} must be text", param)
    try:
        utf8(value)
    except EqzError as error:
        raise BadRequest(f"{param}: {error}", param) from None
    return value


def _sliders(sliders, valid: tuple[str, ...] | None, param: str) -> dict[str, float]:
    """{band: gain} checked for shape and range, and the bands against ``valid`` (None: the bank checks later)."""
    if sliders is None:
        return {}
    if not isinstance(sliders, dict):
        raise BadRequest("eqz 'sliders' must be an object {band: gain}", param)
    for band, gain in sliders.items():
        _number(f"gain for {band}", gain, f"{param}.{band}")
    try:
        keyed_by_band(sliders, "sliders")
    except EqzError as error:  # one band named twice
        raise BadRequest(str(error), param) from None
    checked = {}
    for sent, gain in sliders.items():  # the param names the key as the client sent it
        band = band_key(sent)
        try:
            checked[band] = check_gain(band, gain, valid)
        except EqzError as error:  # an unknown band, or a gain out of range
            raise BadRequest(str(error), f"{param}.{sent}") from None
    return checked


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port). The CLI binds before the model loads, so a busy port
    or an unknown host is one line at once (uvicorn logs those and exits on its own)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
    except (socket.gaierror, UnicodeError) as error:
        raise EqzError(f"cannot listen on {host}: {getattr(error, 'strerror', None) or error}; give an address "
                       "such as 127.0.0.1") from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
        listening.listen(2048)  # only listening holds the port (SO_REUSEADDR lets a bound-only one be shared)
    except OSError as error:
        listening.close()
        raise EqzError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another port "
                       "(0: any free one)") from None
    return listening


def serve(model: EqzModel, host: str = "127.0.0.1", port: int = 8000, parallel: int = 4,
          api_key: str | None = None, max_waiting: int = 64, preset: str | None = None, on_ready=None,
          listening: socket.socket | None = None, cors=(), access_log: bool = True) -> None:
    """Run the server until interrupted. A host other than loopback needs ``api_key``. ``listening``: a socket
    from ``listen_socket(host, port)`` already bound. ``cors``: the web origins whose pages may call the API (none by
    default: a page elsewhere could otherwise read replies from a server that needs no key). ``access_log``: a line
    per request on stderr, as uvicorn writes them."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    check_exposure(host, api_key)
    listening = listening or listen_socket(host, port)
    try:
        server = EqzServer(model, parallel=parallel, api_key=api_key, max_waiting=max_waiting, preset=preset,
                           cors=cors)
    except BaseException:
        listening.close()
        raise
    logging_setup = copy.deepcopy(LOGGING_CONFIG)
    logging_setup["loggers"]["uvicorn.error"]["level"] = "WARNING"  # eqz says where it listens, in its own words
    logging_setup["handlers"]["access"]["stream"] = "ext://sys.stderr"  # with eqz's lines, out of a piped stdout
    for formatter in logging_setup["formatters"].values():  # uvicorn would colour them by whether stdout is a tty
        formatter["use_colors"] = sys.stderr.isatty()
    config = uvicorn.Config(server.app, host=host, port=port, log_config=logging_setup, access_log=access_log,
                            timeout_graceful_shutdown=2)
    runner = uvicorn.Server(config)
    stop_connections = runner.shutdown

    async def shutdown(sockets=None):
        await server.stop()  # first: uvicorn's graceful wait would otherwise end running replies by cancelling them
        await stop_connections(sockets)

    runner.shutdown = shutdown
    capture_signals = runner.capture_signals

    @contextlib.contextmanager
    def with_hangup():
        """SIGHUP (the terminal it runs in closed) ends it as Ctrl-C and SIGTERM do, each running reply with its last
        chunk, then dies of it as before (it cut streams off mid-reply); not where it was ignored (nohup)."""
        with capture_signals():
            hangup = (threading.current_thread() is threading.main_thread()
                      and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)
            if hangup:
                signal.signal(signal.SIGHUP, runner.handle_exit)
            try:
                yield
            finally:
                if hangup:
                    signal.signal(signal.SIGHUP, signal.SIG_DFL)

    runner.capture_signals = with_hangup
    if on_ready:
        original = runner.startup

        async def startup(sockets=None):
            await original(sockets)
            on_ready(runner.servers[0].sockets[0].getsockname()[1] if runner.servers else port)

        runner.startup = startup
    try:
        runner.run(sockets=[listening])
    finally:
        server.close()
        listening.close()
