"""`eqz serve` for real: the server process on a loopback port, the official `openai` client, raw HTTP for what
clients get wrong, and Debian's chromium driving the web page. Request counts and durations are bounded."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

import eqz
from eqz.errors import EqzError
from eqz.server import listen_socket

from .conftest import EQZ, run_eqz

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parent.parent / "docs"
MOODS = [{}, {"joy": 1}, {"sadness": 1}, {"fear": 0.8}, {"anger": 1}, {"trust": 1}, {"surprise": 1},
         {"joy": -1, "anticipation": 0.5}]
TOPICS = ["rain", "a cat", "bread", "a train", "snow", "music", "a city", "the moon"]


class Served:
    """An `eqz serve` process on a free loopback port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.process = subprocess.Popen([EQZ, "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        said = []
        for _ in range(5):  # warnings may come first (a model without a chat template)
            said.append(self.process.stderr.readline())
            if (found := re.search(r"http://127\.0\.0\.1:(\d+)/", said[-1])) or not said[-1]:  # or it stopped
                break
        assert found, "".join(said)
        self.url = f"http://127.0.0.1:{found.group(1)}"
        self.log = said  # what it says on stderr, read as it comes (which keeps the pipe drained)
        self.reading = threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True)
        self.reading.start()

    def post(self, path: str, body, key: str | None = None, timeout: float = 120,
             scheme: str = "Bearer") -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"{scheme} {key}"} if key else {})}
        request = urllib.request.Request(self.url + path, data, headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, {**json.loads(error.read()), "headers": {k.lower(): v for k, v in error.headers.items()}}

    def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether a line holding ``text`` reaches stderr within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        return any(text in line for line in self.log)

    def get(self, path: str, key: str | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stream(self, path: str, body: dict):
        """A streamed request's response, open: read its events as they come, close it to leave."""
        request = urllib.request.Request(self.url + path, json.dumps({**body, "stream": True}).encode(),
                                         {"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=60)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    served = Served("--parallel", "8")
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, prompt: str, sliders: dict, seed: int = 3, max_tokens: int = 24, **eqz) -> str:
    reply = client.chat.completions.create(model="eqz", messages=[{"role": "user", "content": prompt}], seed=seed,
                                           max_tokens=max_tokens, extra_body={"eqz": {"sliders": sliders, **eqz}})
    return reply.choices[0].message.content


def test_chat_with_sliders_gives_what_eqz_generate_gives(client):
    cli = json.loads(run_eqz("generate", "Describe your morning.", "--set", "joy=1", "--seed", "3", "-n", "24",
                             "--json").stdout)
    reply = client.chat.completions.create(model="eqz", messages=[{"role": "user", "content": "Describe your morning."}],
                                           seed=3, max_tokens=24, extra_body={"eqz": {"sliders": {"joy": 1}, "meter": True}})
    assert reply.choices[0].message.content == cli["output"]
    assert reply.model_extra["eqz"]["sliders"]["joy"] == 1.0
    assert reply.model_extra["eqz"]["meter"]["joy"] == pytest.approx(cli["meter"]["joy"], abs=1e-3)
    assert reply.usage.completion_tokens == cli["n_tokens"]
    assert [model.id for model in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_filters_per_request_give_what_eqz_generate_gives(client):
    cli = json.loads(run_eqz("generate", "Hi there", "-n", "20", "--seed", "7", "--set", "fear=1", "--clamp",
                             "fear=0.5", "--ablate", "anger", "--json").stdout)
    reply = client.chat.completions.create(model="eqz", messages=[{"role": "user", "content": "Hi there"}], seed=7,
                                           max_tokens=20, extra_body={"eqz": {"sliders": {"fear": 1}, "meter": True,
                                                                              "clamp": {"fear": 0.5}, "ablate": ["anger"]}})
    record = reply.model_extra["eqz"]
    assert reply.choices[0].message.content == cli["output"]
    assert record["filters"] == {"clamp": {"fear": 0.5}, "ablate": ["anger"]}
    assert record["meter"]["fear"] == pytest.approx(0.5, abs=1e-3) and record["meter"]["anger"] == pytest.approx(0, abs=1e-3)


def test_streaming_gives_the_same_text_in_pieces_and_the_record_last(client):
    whole = chat(client, "Tell me about the sea.", {"sadness": 1}, seed=9, max_tokens=32)
    stream = client.chat.completions.create(model="eqz", messages=[{"role": "user", "content": "Tell me about the sea."}],
                                            seed=9, max_tokens=32, stream=True,
                                            extra_body={"eqz": {"sliders": {"sadness": 1}, "meter": True}})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 5 and "".join(pieces) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["eqz"]["sliders"]["sadness"] == 1.0
    assert any(c.model_extra.get("eqz", {}).get("meter") for c in chunks[1:-1])  # the live meter rides along


def test_eight_concurrent_moods_each_get_the_reply_they_get_alone(client):
    def ask(i: int) -> str:
        return chat(client, f"Write about {TOPICS[i]}.", MOODS[i], seed=11 + i)

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    moved = [i for i in range(8) if MOODS[i]]  # each mood steered its own reply
    assert all(alone[i] != chat(client, f"Write about {TOPICS[i]}.", {}, seed=11 + i) for i in moved)


def test_a_reply_keeps_its_own_sliders_when_a_request_in_between_is_done(client):
    # Sent in this order, the three requests take sequences 0, 1 and 2 (sliders no earlier request used, so no
    # sequence holds their prompt head); the middle one ends first (24 tokens, after the third has come), leaving
    # 0 and 2 running, which llama.cpp computes as two micro-batches: the third reply must keep its own sliders.
    requests = [("Write about rain.", {"trust": 0.2}, 64, 1), ("Write about bread.", {"fear": 0.7}, 24, 2),
                ("Write about snow.", {"joy": 1.5}, 64, 3)]

    def ask(index: int) -> str:
        time.sleep(0.15 * index)
        prompt, sliders, max_tokens, seed = requests[index]
        return chat(client, prompt, sliders, seed=seed, max_tokens=max_tokens)

    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, range(3)))
    assert together[2] == ask(2) != chat(client, "Write about snow.", {}, seed=3, max_tokens=64)


def resteered_stream(server: Served, max_tokens: int, *moves: dict, start: dict | None = None,
                     meter: bool = False) -> tuple[dict, str, list[dict]]:
    """Stream a lighthouse story (unsteered, or under ``start``), make each move of the sliders after six more pieces
    and check the running record shows it at once; the stream's record, the text that came after the last move and
    (``meter``) the meter's readings that came with it, token by token."""
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "seed": 4,
            "max_tokens": max_tokens, "stream": True, "eqz": {"sliders": start or {}, "meter": meter}}
    request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        stream_id = response.headers["X-Eqz-Stream"]
        for made, sliders in enumerate(moves, 1):
            for _ in range(6):
                response.readline(), response.readline()  # "data: ..." and the blank line after it
            status, changed = server.post(f"/v1/eqz/streams/{stream_id}", {"sliders": sliders})
            assert status == 200 and all(changed["sliders"][band] == gain for band, gain in sliders.items())
            running = server.get(f"/v1/eqz/streams/{stream_id}")[1]
            assert running["sliders"] == changed["sliders"]
            deadline = time.time() + 30  # the move is taken by the next token: the running record shows it then
            while running["finish_reason"] is None and len(running["changes"]) < made and time.time() < deadline:
                running = server.get(f"/v1/eqz/streams/{stream_id}")[1]
            assert running["finish_reason"] is not None or running["changes"][-1]["sliders"] == changed["sliders"]
        chunks = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: {")]
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    status, record = server.get(f"/v1/eqz/streams/{stream_id}")
    assert status == 200
    return record, text, [chunk["eqz"]["meter"] for chunk in chunks  # the last chunk's is the reply's mean
                          if "meter" in chunk.get("eqz", {}) and not chunk["choices"][0].get("finish_reason")]


def test_a_stream_is_resteered_from_its_next_token(server, client):
    record, text, _ = resteered_stream(server, 80, {"joy": 1.5})
    assert record["finish_reason"] == "length"
    (change,) = record["changes"]
    assert 0 < change["at_token"] < record["n_tokens"] and change["sliders"]["joy"] == 1.5
    plain = chat(client, "Write a long story about a lighthouse.", {}, seed=4, max_tokens=80)
    assert record["output"] != plain and record["output"][:change["text_offset"]] == plain[:change["text_offset"]]
    assert text and record["output"].endswith(text)


def test_moves_of_one_slider_at_a_time_add_up(server):
    record, _, _ = resteered_stream(server, 80, {"joy": 1}, {"fear": 0.5}, start={"trust": 0.3})
    moved = [{band: gain for band, gain in state["sliders"].items() if gain} for state in (*record["changes"], record)]
    both = {"trust": 0.3, "joy": 1, "fear": 0.5}
    assert moved == [{"trust": 0.3, "joy": 1}, both, both]  # the two changes, then the record of the whole reply


def test_sliders_posted_as_they_already_are_log_no_change(server):
    """The web page's reset with every slider at 0 wrote a change ('all 0') into the reply's record and its text."""
    body = {"prompt": "Once upon a time", "max_tokens": 120, "stream": True, "eqz": {"sliders": {"joy": 0.5}}}
    request = urllib.request.Request(server.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        stream_id = response.headers["X-Eqz-Stream"]
        for _ in range(6):
            response.readline(), response.readline()
        assert server.post(f"/v1/eqz/streams/{stream_id}", {"sliders": {"joy": 0.5, "fear": 0}})[0] == 200
        response.read()  # the pieces after it: the move was taken by the next decode
    status, record = server.get(f"/v1/eqz/streams/{stream_id}")
    assert status == 200 and record["n_tokens"] > 7 and record["changes"] == []


def test_a_held_slider_clamps_per_request_and_when_a_stream_is_resteered(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path)}
    assert run_eqz("vectors", "hold", "joy", "3", env=env).returncode == 0
    clamped = json.loads(run_eqz("generate", "Describe your morning.", "--clamp", "joy=3", "--seed", "3", "-n", "24",
                                 "--json").stdout)
    served = Served("--parallel", "2", env=env)
    try:
        client = OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert chat(client, "Describe your morning.", {"joy": 1}) == clamped["output"]
        record, _, meters = resteered_stream(served, 60, {"joy": 1}, meter=True)
        plain = chat(client, "Write a long story about a lighthouse.", {}, seed=4, max_tokens=60)
        (change,) = record["changes"]
        assert record["output"][:change["text_offset"]] == plain[:change["text_offset"]] and record["output"] != plain
        # held, not added: from the change on, the meter reads joy at its level 3 on every token
        assert len(meters) >= 10 and all(reading["joy"] == pytest.approx(3.0, abs=0.01) for reading in meters[-10:])
    finally:
        served.close()


HI = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body,fragment,param", [
    (b"{bad", "not valid JSON", None),
    ({"messages": []}, "'messages' must be a non-empty list", "messages"),
    ({**HI, "eqz": {"sliders": {"glee": 1}}}, "unknown band 'glee'", "eqz.sliders.glee"),
    ({**HI, "eqz": {"sliders": {"JOY": 9}}}, "gain for joy", "eqz.sliders.JOY"),  # the key as sent
    ({**HI, "eqz": {"volume": 1}}, "unknown eqz field 'volume'", "eqz.volume"),
    ({**HI, "temperature": "hot"}, "temperature must be a number", "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "the prompt has", "messages"),
    ({**HI, "eqz": {"preset": "gloomy"}}, "gloomy", None),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}]},
     "messages[1]: role \"wizard\" is not one of", "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0]: 'content' must be", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text must be text", "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": None}]}]},
     "messages[0].content[1].text must be text", "messages[0].content[1].text"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content: the text is not valid UTF-8",
     "messages[0].content"),
    (b"[" * 100000, "nested too deeply", None),
    ({**HI, "n": 2}, "'n' must be 1", "n"),
    ({**HI, "stream": "false"}, "'stream' must be true or false", "stream"),
    ({**HI, "temperature": False}, "temperature must be a number", "temperature"),
    ({**HI, "eqz": {"sliders": {"joy": True}}}, "gain for joy must be a number", "eqz.sliders.joy"),
    ({**HI, "eqz": {"preset": "/etc/hostname"}}, "must be a preset's name", "eqz.preset"),
    # loose types were taken: "false" turned the meter on, numbers in strings passed, true was 1, 1e20 cut to 32 bits
    ({**HI, "eqz": {"meter": "false"}}, "eqz 'meter' must be true or false", "eqz.meter"),
    ({**HI, "max_tokens": " 3 "}, "max_tokens must be a number", "max_tokens"),
    ({**HI, "temperature": "0.5"}, "temperature must be a number", "temperature"),
    ({**HI, "eqz": {"sliders": {"joy": "1"}}}, "gain for joy must be a number", "eqz.sliders.joy"),
    ({**HI, "eqz": {"clamp": {"fear": "0"}}}, "level for fear must be a number", "eqz.clamp.fear"),
    ({**HI, "n": True}, "'n' must be 1", "n"),
    ({**HI, "stream": 1}, "'stream' must be true or false", "stream"),
    ({**HI, "top_k": 1e20}, "top_k must be a whole number up to", "top_k"),
    # OpenAI fields asking for what eqz cannot do were ignored in silence
    ({**HI, "logprobs": True, "top_logprobs": 2}, "'logprobs' is not supported", "logprobs"),
    ({**HI, "response_format": {"type": "json_object"}},
     "'response_format' is not supported", "response_format"),
    ({**HI, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "'tools' is not supported", "tools"),
    ({**HI, "frequency_penalty": 0.5}, "'frequency_penalty' is not supported", "frequency_penalty"),
    ({**HI, "logit_bias": {"50256": -100}}, "'logit_bias' is not supported", "logit_bias"),
])
def test_bad_requests_get_a_one_line_400_and_the_server_lives_on(server, body, fragment, param):
    """``param`` names the field as OpenAI's errors do (client libraries show it as error.param); it was always null."""
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 400 and fragment in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert server.get("/v1/models")[0] == 200


def test_openai_defaults_pass_what_eqz_cannot_do_is_refused_and_a_stream_can_end_with_its_usage(server, client):
    """Fields asking for what eqz cannot do were ignored in silence, include_usage too; a large body was
    tokenized (on the event loop, stalling every client) before its length was checked, and then answered while the
    client was still sending it, which met a broken pipe instead of the 413 (CI, stop 59). There was no access log."""
    defaults = {"prompt": "Hi", "max_tokens": 2, "logprobs": False, "top_logprobs": 0, "tools": [], "logit_bias": {},
                "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"},
                "echo": False, "best_of": 1, "suffix": None}  # as client libraries send them
    assert server.post("/v1/completions", defaults)[0] == 200
    for field, value in (("echo", True), ("suffix", "!"), ("best_of", 2)):
        status, answer = server.post("/v1/completions", {"prompt": "Hi", field: value})
        assert status == 400 and f"'{field}' is not supported" in answer["error"]["message"]
        assert answer["error"]["param"] == field
    status, answer = server.post("/v1/completions", {"prompt": "word " * 3000})
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "context_length_exceeded", "prompt")
    status, answer = server.post("/v1/eqz/streams/none", {"sliders": {"glee": 1}})
    assert (status, answer["error"]["param"]) == (400, "sliders.glee")
    status, answer = server.post("/v1/completions", b'{"prompt": "' + b"a" * 2**23 + b'"}')
    assert status == 413 and answer["error"]["type"] == "invalid_request_error", answer
    just_over = http.client.HTTPConnection(*server.url[len("http://"):].split(":"), timeout=60)
    just_over.request("POST", "/v1/completions", iter([b'{"prompt": "' + b"a" * (2**20 + 1000) + b'"}']),
                      {"Content-Type": "application/json"}, encode_chunked=True)  # no length: counted as it comes
    assert just_over.getresponse().status == 413  # was a 500: the stream was asked for twice
    for status in (200, 400, 413):  # the access log: a line per request, as uvicorn writes it
        assert server.logged(f'"POST /v1/completions HTTP/1.1" {status}'), "".join(server.log)
    chunks = list(client.completions.create(model="eqz", prompt="Hi", max_tokens=3, seed=1, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens > 0


def test_a_decode_loop_that_dies_says_why_in_the_log(caplog):
    """It kept its error in silence: every request then got a 503 whose cause no log held."""
    with eqz.load() as model:
        loop = model.server(parallel=1)
        try:
            request = model.request(prompt="Hi", sampling={"max_tokens": 4})
            failed = threading.Event()

            def on_event(kind: str, data) -> None:  # a library user's callback with a bug
                if kind == "piece":
                    raise ValueError("a bug in on_event")
                failed.set()  # the "error" every request gets

            request.on_event = on_event
            loop.submit(request)
            assert failed.wait(60)
        finally:
            loop.close()
    (logged,) = [record for record in caplog.records if record.name == "eqz.serving"]
    assert "decode loop stopped" in logged.getMessage() and "a bug in on_event" in str(logged.exc_info[1])


def test_band_names_take_any_case_in_sliders_clamp_and_ablate(server):
    status, reply = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "eqz": {"sliders": {"JOY": 1}, "clamp": {"Fear": 0.5}, "ablate": ["ANGER"]}})
    assert status == 200, reply
    assert reply["eqz"]["sliders"]["joy"] == 1 and reply["eqz"]["filters"] == {"clamp": {"fear": 0.5}, "ablate": ["anger"]}


def test_a_busy_port_or_a_foreign_address_is_one_line_before_the_model_loads(server):
    port = server.url.rsplit(":", 1)[1]
    busy = run_eqz("serve", "--port", port, "--model", "/nonexistent.gguf", timeout=30)  # the port is checked first
    assert busy.returncode == 2 and busy.stderr == f"eqz: error: cannot listen on 127.0.0.1:{port}: Address already " \
                                                   "in use; choose another port (0: any free one)\n"
    foreign = run_eqz("serve", "--host", "192.0.2.1", "--api-key", "k", "--port", "0", timeout=30)  # TEST-NET-1
    assert foreign.returncode == 2 and foreign.stderr.startswith("eqz: error: cannot listen on 192.0.2.1:0: ")
    assert len(foreign.stderr.splitlines()) == 1
    status, answer = server.get("/v1/chat/completions")
    assert status == 405 and answer["error"]["type"] == "invalid_request_error"


def test_a_port_is_held_from_the_moment_eqz_serve_checks_it():
    """Bound without listening, a port with SO_REUSEADDR can be bound again: two servers starting together would
    both pass the check made before the model loads."""
    first = listen_socket("127.0.0.1", 0)
    try:
        with pytest.raises(EqzError, match="Address already in use"):
            listen_socket("127.0.0.1", first.getsockname()[1]).close()
    finally:
        first.close()


def test_a_client_that_leaves_frees_its_slot_or_its_place_and_a_full_queue_answers_429():
    """A plain (not streamed) request whose client left kept its slot until max_tokens (a 4-token request after it
    took 57 s), and one that left while waiting kept its place in the line."""
    served = Served("--parallel", "1", "--queue", "1")
    # runs to max_tokens: greedy counting without the repeat penalty (with it, this Intel Xeon's llama.cpp stopped
    # counting after 48 tokens and ended the reply in under a second)
    counting = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0, "repeat_penalty": 1.0}
    short = {"prompt": "Hello", "max_tokens": 4}
    try:
        with pytest.raises(OSError):  # a client that gives up (timed out) while its reply runs
            served.post("/v1/completions", counting, timeout=1)
        status, reply = served.post("/v1/completions", short, timeout=20)  # the slot was freed within a token
        assert status == 200 and reply["choices"][0]["text"]
        running = served.stream("/v1/completions", counting)
        stream_id = running.headers["X-Eqz-Stream"]
        running.readline()  # it holds the only slot
        with pytest.raises(OSError):  # a client that gives up while it waits for the slot
            served.post("/v1/completions", short, timeout=1)
        waiting = served.stream("/v1/completions", short)  # the place it left is free
        status, busy = served.post("/v1/completions", short)
        assert status == 429 and busy["headers"]["retry-after"] == "1" and "retry" in busy["error"]["message"]
        waiting.close()
        running.close()  # the client goes away mid-stream
        deadline = time.time() + 30
        while time.time() < deadline and served.get(f"/v1/eqz/streams/{stream_id}")[1].get("finish_reason") is None:
            time.sleep(0.05)
        record = served.get(f"/v1/eqz/streams/{stream_id}")[1]
        assert record["finish_reason"] == "cancelled" and record["n_tokens"] < 2000
        status, reply = served.post("/v1/completions", short)
        assert status == 200 and reply["choices"][0]["text"]
    finally:
        served.close()


@pytest.mark.parametrize("stop,code", [(signal.SIGINT, 130), (signal.SIGHUP, -signal.SIGHUP)])
def test_ctrl_c_ends_running_replies_with_their_last_chunk_or_a_503_and_no_traceback(stop, code):
    """uvicorn's graceful wait cancelled running replies after 2 s: a plain client got a text/plain 500, a stream
    ended without its last chunk or [DONE], and the log held tracebacks (the decode thread's "Event loop is closed"
    too). SIGHUP (the server's terminal closed) cut every reply off at once; now it ends them as Ctrl-C does."""
    served = Served("--parallel", "2", "--no-access-log")
    counting = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0, "repeat_penalty": 1.0}
    with ThreadPoolExecutor(1) as pool:
        stream = served.stream("/v1/completions", {**counting, "stream_options": {"include_usage": True}})
        stream.readline()
        plain = pool.submit(served.post, "/v1/completions", counting)
        time.sleep(1)  # the plain request reaches the other slot
        served.process.send_signal(stop)
        rest = stream.read().decode()
        status, answer = plain.result(timeout=30)
    assert served.process.wait(timeout=30) == code
    served.reading.join(timeout=10)
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-2]["eqz"]["finish_reason"] == "cancelled"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == events[-2]["eqz"]["n_tokens"]
    assert rest.endswith("data: [DONE]\n\n")
    assert status == 503 and "stopping" in answer["error"]["message"] and answer["error"]["type"] == "server_error"
    assert "Traceback" not in "".join(served.log) and "Error" not in "".join(served.log), "".join(served.log)
    assert "POST" not in "".join(served.log)  # --no-access-log


def test_a_server_without_a_key_answers_only_requests_from_this_machine(server):
    """A web page on another site could use a keyless local server: its script may POST text/plain with no CORS
    preflight (a reply starts), and a name of its own pointed at 127.0.0.1 (DNS rebinding) reads the replies."""
    address, port = server.url.removeprefix("http://").split(":")

    def ask(headers: dict, body: dict | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(address, int(port), timeout=60)
        try:  # http.client sends the Host given here instead of its own
            connection.request("GET" if body is None else "POST", "/v1/models" if body is None else "/v1/completions",
                               None if body is None else json.dumps(body), headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    status, refused = ask({"Host": f"rebound.example:{port}"})
    assert status == 403 and refused["error"]["message"].startswith(f"Host 'rebound.example:{port}' is not this machine")
    assert f"use http://127.0.0.1:{port}/" in refused["error"]["message"]
    assert ask({"Host": f"rebound.example@localhost:{port}"})[0] == 403  # a URL's user part, not a Host's
    for own in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}", f"LocalHost.:{port}",
                f"[::ffff:127.0.0.1]:{port}", f"app.localhost:{port}"):
        assert ask({"Host": own})[0] == 200, own
    with socket.create_connection((address, int(port)), timeout=30) as bare:  # HTTP/1.0 needs no Host; no browser
        bare.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        assert bare.makefile("rb").readline().split()[1] == b"200"
    completion = {"prompt": "Hi", "max_tokens": 2}
    status, refused = ask({"Host": f"127.0.0.1:{port}", "Origin": "http://elsewhere.example",
                           "Content-Type": "text/plain"}, completion)
    assert status == 403 and "start eqz serve with --cors http://elsewhere.example" in refused["error"]["message"]
    status, refused = ask({"Host": f"127.0.0.1:{port}", "Origin": "null"}, completion)  # a page opened from a file
    assert status == 403 and "--cors null" in refused["error"]["message"]
    status, reply = ask({"Host": f"127.0.0.1:{port}", "Origin": server.url, "Content-Type": "application/json"},
                        completion)  # the server's own page
    assert status == 200 and reply["object"] == "text_completion"


def test_other_hosts_need_a_key_the_key_is_checked_and_a_default_preset_serves_plain_clients(tmp_path):
    refused = run_eqz("serve", "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "--api-key" in refused.stderr and "Traceback" not in refused.stderr
    for unsendable in (" ", "café"):  # HTTP trims a header's spaces and carries ASCII: no client could get in
        blank = run_eqz("serve", "--host", "0.0.0.0", "--api-key", unsendable, "--port", "0", timeout=60)
        assert blank.returncode == 2 and "printable ASCII without spaces" in blank.stderr
    misspelt = run_eqz("serve", "--preset", "gloomy", "--port", "0")
    assert misspelt.returncode == 2 and "gloomy" in misspelt.stderr
    pathed = run_eqz("serve", "--cors", "http://localhost:3000/app", "--port", "0")
    assert pathed.returncode == 2 and "--cors takes a web page's origin" in pathed.stderr
    mood = tmp_path / "melancholy.yaml"  # a file, read once: edited later, it changed the replies, not the config
    mood.write_bytes((DOCS.parent / "presets" / "melancholy.yaml").read_bytes())
    served = Served("--api-key", "sesame", "--preset", str(mood), "--cors", "http://localhost:3000",
                    "--cors", "null", "--cors", "chrome-extension://abcdefgh")  # what the 403s tell, taken
    try:
        assert served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 401
        status, reply = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, key="sesame")
        assert status == 200 and reply["object"] == "text_completion"
        assert reply["eqz"]["sliders"]["sadness"] == 0.8  # no "eqz" field: the server's preset
        mood.write_text("name: melancholy\nsliders: {joy: 1}\n")
        # the server's preset holds unless a request chooses a preset or sliders (it was dropped by any "eqz" field)
        for settings, sadness in (({}, 0.8), (None, 0.8), ({"meter": True, "clamp": {"fear": 0}}, 0.8),
                                  ({"sliders": {}}, 0), ({"sliders": {"joy": 1}}, 0), ({"preset": "serene"}, 0)):
            status, reply = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "eqz": settings},
                                        key="sesame", scheme="bearer")  # the scheme's case is free
            assert status == 200 and reply["eqz"]["sliders"]["sadness"] == sadness, (settings, reply)
        status, config = served.get("/v1/eqz/config", key="sesame")
        assert status == 200 and config["preset"] == "melancholy"  # the web page starts from it
        client = OpenAI(base_url=served.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").owned_by == "eqz"  # was a 404
        # a page of the --cors origin may call the API from a browser: its preflight (no key) is answered
        for origin, allowed in (("http://localhost:3000", True), ("http://elsewhere.example", False)):
            preflight = urllib.request.Request(served.url + "/v1/chat/completions", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            try:
                with urllib.request.urlopen(preflight, timeout=30) as response:
                    status, headers = response.status, response.headers
            except urllib.error.HTTPError as error:
                status, headers = error.code, error.headers
            assert (status == 200) == allowed and (headers.get("Access-Control-Allow-Origin") == origin) == allowed
    finally:
        served.close()


def chromium():
    """Debian's chromium, headless, driven by selenium; ``quit()`` it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,760"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_the_web_page_streams_and_its_joy_slider_resteers_the_reply(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        browser.find_element(By.ID, "text").send_keys("Write a long story about a lighthouse keeper.", Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
                   and len(b.find_element(By.CSS_SELECTOR, ".msg.assistant").text) > 40)
        # the bands that warn when moved in the CLI carry that warning here (the shipped bank: joy is weak)
        status, config = server.get("/v1/eqz/config")
        assert status == 200 and "joy" in config["doubts"] and "sadness" not in config["doubts"], config
        flag = browser.find_element(By.CSS_SELECTOR, "label[for=s-joy] .doubt")
        assert flag.get_attribute("title") == config["doubts"]["joy"] and "may not move" in config["doubts"]["joy"]
        assert not browser.find_elements(By.CSS_SELECTOR, "label[for=s-sadness] .doubt")
        assert browser.find_element(By.ID, "doubts").text == ""  # no band moved yet
        cut = browser.execute_script("return [...document.querySelectorAll('#eq .name')].filter("
                                     "name => name.scrollWidth > name.clientWidth).map(name => name.textContent)")
        assert cut == []  # a wide window shows every band's name whole ("anticipa…" was cut at 58 px)
        joy = browser.find_element(By.ID, "s-joy")
        joy.send_keys(Keys.ARROW_UP * 8)  # the user moves the slider while the reply streams
        assert browser.find_element(By.ID, "doubts").text == "warning: " + config["doubts"]["joy"]  # while moved
        joy.send_keys(Keys.ARROW_UP * 4)  # past the calibrated +1: said, as the CLI and the chat say it
        assert browser.find_element(By.ID, "doubts").text.startswith(
            "warning: joy at +1.2 is beyond the calibrated ±1: expect less fluent text\nwarning: ")
        joy.send_keys(Keys.ARROW_DOWN * 4)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        stream_id = browser.find_element(By.TAG_NAME, "body").get_attribute("data-stream")
        if os.environ.get("EQZ_RECORD_SCREENSHOT"):
            browser.save_screenshot(str(DOCS / "web.png"))
        browser.set_window_size(390, 844)  # a phone: everything reachable without sideways scrolling
        browser.get(server.url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        # the reload kept this tab's conversation and sliders (a reload lost them)
        assert browser.find_element(By.ID, "v-joy").text == "+0.8"
        # a screen reader says the band and its signed gain, not a bare "0.8"
        assert browser.find_element(By.ID, "s-joy").get_attribute("aria-valuetext") == "joy +0.8"
        shown = browser.find_elements(By.CSS_SELECTOR, "#log .msg")
        assert [m.get_attribute("class") for m in shown] == ["msg user", "msg assistant"] and shown[1].text
        assert browser.execute_script("return state.history.length") == 2
        width = browser.execute_script("return window.innerWidth")
        assert width <= 400 and browser.execute_script("return document.documentElement.scrollWidth") <= width
        sliders = browser.find_elements(By.CSS_SELECTOR, "input[type=range]")
        assert len(sliders) == 10
        for element in (*sliders, browser.find_element(By.ID, "text")):
            box = element.rect
            assert element.is_displayed() and box["x"] >= 0 and box["x"] + box["width"] <= width, box
        if os.environ.get("EQZ_RECORD_SCREENSHOT"):
            browser.save_screenshot(str(DOCS / "web-phone.png"))
        # the warning flag is not cut off with a long band name on a phone
        flag, label = (browser.find_element(By.CSS_SELECTOR, selector) for selector in
                       ("label[for=s-surprise] .doubt", "label[for=s-surprise]"))
        assert flag.rect["x"] + flag.rect["width"] <= label.rect["x"] + label.rect["width"] + 1
        # a slider moved in the moment between Send and the server's answer steers that reply (there was no stream
        # to re-steer yet, and the move was lost while the slider showed it)
        browser.execute_script("$('text').value = 'Write a long story about a lighthouse.'; $('ask').requestSubmit(); "
                               "setSlider('joy', 0.5, true)")  # a long reply: still running when the move lands
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        early_id = browser.find_element(By.TAG_NAME, "body").get_attribute("data-stream")
        browser.set_window_size(390, 430)  # a phone's keyboard up: the conversation keeps room to be read (0 px
        assert browser.find_element(By.ID, "log").size["height"] >= 80  # before; the page scrolls to the rest)
    finally:
        browser.quit()
    status, early = server.get(f"/v1/eqz/streams/{early_id}")
    assert status == 200 and early["sliders"]["joy"] == 0.5, early
    status, record = server.get(f"/v1/eqz/streams/{stream_id}")
    assert status == 200 and record["changes"], record
    last = record["changes"][-1]
    assert last["sliders"]["joy"] == pytest.approx(0.8) and 0 < record["changes"][0]["at_token"] < record["n_tokens"]


def test_the_web_page_goes_on_after_a_refused_message_drops_old_turns_and_sends_its_preset(server):
    """A message the server refused stayed in the page's history and every later one was refused with it (so did a
    conversation grown past the context); a preset picked on the page sent only its sliders, not its sampling."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def say(text: str) -> None:
        """Send ``text`` (set, not typed: thousands of keys are slow) and stop the reply at its first words."""
        box, shown = browser.find_element(By.ID, "text"), len(browser.find_elements(By.CSS_SELECTOR, ".msg"))
        replies = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        browser.execute_script("arguments[0].value = arguments[1]", box, text)
        box.send_keys(Keys.ENTER)  # the page is streaming from here until the reply (or the error) is in
        idle = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"  # noqa: E731

        def replying(b) -> bool:  # this message's reply has words (the last one's had them all along)
            shown_replies = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            return len(shown_replies) > replies and bool(shown_replies[-1].text)

        wait.until(lambda b: idle(b) or replying(b))
        if not idle(browser):
            browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: idle(b) and len(b.find_elements(By.CSS_SELECTOR, ".msg")) >= shown + 2)

    browser = chromium()
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(server.url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        say("word " * 2100)  # longer than a reply's context on its own
        (refused,) = browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert "tokens" in refused.text
        assert browser.find_element(By.ID, "text").get_attribute("value") == ("word " * 2100).strip()  # not lost
        Select(browser.find_element(By.ID, "preset")).select_by_value("serene")
        say("Hi")
        (answered,) = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert answered.text
        stream = browser.find_element(By.TAG_NAME, "body").get_attribute("data-stream")
        deadline = time.time() + 30  # the page is idle once it stops reading; the server ends the reply a moment later
        status, record = server.get(f"/v1/eqz/streams/{stream}")
        while record.get("finish_reason") is None and time.time() < deadline:
            time.sleep(0.05)
            status, record = server.get(f"/v1/eqz/streams/{stream}")
        assert status == 200 and record["sampling"]["temperature"] == 0.6 and record["sliders"]["trust"] == 0.5
        say("word " * 2100)  # too long even with the earlier exchange dropped: nothing was dropped in the end
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.error")) == 2
        assert "dropped" not in browser.find_element(By.ID, "log").text  # the note stayed, though nothing was
        # an earlier long exchange, as the page keeps one (set directly: the model's reply to "word word ..." is
        # sometimes empty, and the page keeps no exchange without a reply), then a message that fits only alone:
        # the oldest turns go, as in the terminal chat
        browser.execute_script("state.history.push({role: 'user', content: arguments[0]}, "
                               "{role: 'assistant', content: 'Noted.'})", "word " * 1200)
        say("word " * 1200)
        assert "dropped" in browser.find_element(By.ID, "log").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")[2:]  # the refused messages were the only ones
        browser.find_element(By.ID, "clear").click()  # a new conversation: "word word ..." may get no reply at all
        box = browser.find_element(By.ID, "text")
        browser.execute_script("arguments[0].value = arguments[1]", box, "Write a very long story about the sea.")
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
                   and len(b.find_element(By.CSS_SELECTOR, ".msg.assistant").text) > 20)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text.endswith("⟨stopped⟩")  # read as done
        assert browser.execute_script("return document.activeElement.id") == "text"  # it fell to nothing after Stop
    finally:
        browser.quit()


def test_a_band_named_like_an_object_property_is_just_a_band_on_the_web_page(tmp_path, random_vector_file):
    """The page looks bands up in the server's maps: a band named 'constructor' found Object's own there (a
    warning flag holding a function, and a preset set its slider to NaN)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    env = {"XDG_DATA_HOME": str(tmp_path)}
    imported = run_eqz("vectors", "import", str(random_vector_file), "--band", "constructor", env=env)
    assert imported.returncode == 0, imported.stderr
    served = Served(env=env)
    browser = chromium()
    try:
        browser.get(served.url + "/")
        idle = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"  # noqa: E731
        WebDriverWait(browser, 60).until(idle)
        doubts = served.get("/v1/eqz/config")[1]["doubts"]
        flags = browser.find_elements(By.CSS_SELECTOR, "label[for=s-constructor] .doubt")
        assert [flag.get_attribute("title") for flag in flags] == ([doubts["constructor"]] if "constructor" in doubts
                                                                   else [])
        Select(browser.find_element(By.ID, "preset")).select_by_value("melancholy")  # leaves constructor alone
        assert browser.find_element(By.ID, "v-sadness").text != "+0.0"
        assert browser.find_element(By.ID, "v-constructor").text == "+0.0"
    finally:
        browser.quit()
        served.close()


def test_a_filter_on_an_unmetered_band_is_a_400_and_a_waiting_stream_takes_new_sliders(tmp_path, random_vector_file):
    """A clamp on an imported band used to be refused inside the decode loop, which then died for every client; and
    a stream waiting for a slot was answered 'has finished' when its sliders moved."""
    env = {"XDG_DATA_HOME": str(tmp_path)}
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "mine", env=env).returncode == 0
    served = Served("--parallel", "1", env=env)
    try:
        status, answer = served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2, "eqz": {"clamp": {"mine": 0}}})
        assert status == 400 and "cannot filter 'mine'" in answer["error"]["message"]

        def stream(prompt: str, max_tokens: int):
            body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
            return urllib.request.urlopen(urllib.request.Request(
                served.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}),
                timeout=60)

        running = stream("Once upon a time", 2000)
        running.readline()  # its first piece: it holds the only slot
        waiting = stream("Hello", 4)
        waiting_id = waiting.headers["X-Eqz-Stream"]
        status, moved = served.post(f"/v1/eqz/streams/{waiting_id}", {"sliders": {"joy": 1}})
        assert status == 200 and moved["sliders"]["joy"] == 1
        running.close()  # frees the slot
        waiting.read()
        status, record = served.get(f"/v1/eqz/streams/{waiting_id}")
        assert status == 200 and record["sliders"]["joy"] == 1 and record["changes"] == []  # it began under them
        assert record["finish_reason"] == "length" and record["n_tokens"] == 4
    finally:
        served.close()


def test_the_web_page_chats_with_a_model_that_has_no_bank(tmp_path, gemma_path):
    """The page asked every reply for the meter, which needs a bank: with a model that had none (Gemma before
    `eqz train`), every message was refused while the API answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    served = Served("--model", str(gemma_path), env={"XDG_DATA_HOME": str(tmp_path), "EQZ_VECTORS": str(tmp_path)})
    browser = chromium()
    try:
        status, config = served.get("/v1/eqz/config")
        assert status == 200 and config["bands"] == [] and not config["metered"]
        browser.get(served.url + "/")
        idle = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"  # noqa: E731
        wait = WebDriverWait(browser, 60)
        wait.until(idle)
        assert "no emotion bank" in browser.find_element(By.ID, "legend").text
        browser.find_element(By.ID, "text").send_keys("The weather today is", Keys.ENTER)
        wait.until(lambda b: idle(b) and b.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    finally:
        browser.quit()
        served.close()
