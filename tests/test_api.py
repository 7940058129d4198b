"""eqz as a library: the README's example as written, the same replies as the CLI, vectors as values, and an
import that does not start llama.cpp."""

from __future__ import annotations

import gc
import json
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest

import eqz
from eqz.chat import ChatCommands, chats_dir
from eqz.presets import Preset, get_preset
from eqz.vector_files import read_control_vector

from .conftest import run_eqz

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_BANK = ROOT / "vectors" / "smollm2-135m-instruct"


def test_readme_library_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"<!-- library example -->\n```python\n(.*?)```", readme, re.S).group(1)
    ran = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.strip().splitlines()
    assert len(lines) >= 4 and "joy" in lines[-1] and "sadness" in lines[-1]  # the analysis dict comes last
    assert read_control_vector(tmp_path / "mix.gguf").model_hint == "llama"


@pytest.fixture(scope="module")
def library():
    with eqz.load() as model:
        yield model


def test_the_library_gives_the_cli_reply_for_the_same_seed_and_settings(library):
    cli = json.loads(run_eqz("generate", "Describe your morning.", "--set", "joy=1", "--seed", "3", "-n", "24",
                             "--json").stdout)
    assert library.generate("Describe your morning.", sliders={"joy": 1}, seed=3, max_tokens=24) == cli["output"]
    preset = json.loads(run_eqz("generate", "Hi", "--preset", "melancholy", "--seed", "5", "-n", "16",
                                "--json").stdout)
    assert library.generate("Hi", preset="melancholy", seed=5, max_tokens=16) == preset["output"]


def test_a_slider_set_mid_reply_steers_from_the_next_token(library):
    with library.chat(seed=2, max_tokens=24, temperature=0) as chat:
        turn = chat.send("Tell me about the sea.")
        for i, _piece in enumerate(turn):
            if i == 5:
                chat.set(joy=1)
        assert [change["at_token"] for change in turn.record.changes] == [6]  # six pieces seen: token 6 is steered
        assert turn.record.changes[0]["sliders"]["joy"] == 1.0
    with library.chat(seed=2, max_tokens=24, temperature=0) as plain:
        assert "".join(plain.send("Tell me about the sea.")) != turn.text


def test_a_server_skips_a_kept_prompt_head_only_under_the_same_settings(library):
    """On one sequence every request finds the last one's chat-template head in the cache; it may skip it only
    when the same sliders computed it (a head steered otherwise changes the reply)."""
    prompt = "Describe your evening."
    alone = library.generate(prompt, sliders={"joy": 1}, seed=4, max_tokens=24)
    loop = library.server(parallel=1)
    prompt_tokens: list[int] = []  # decoded for each request's prompt (a head kept or restored is not decoded)
    decode_prompt = loop.context.decode_prompt
    loop.context.decode_prompt = lambda tokens, *args, **kw: (prompt_tokens.append(len(tokens)),
                                                              decode_prompt(tokens, *args, **kw))[1]

    def reply(sliders: dict) -> tuple[str, int]:
        finished: dict = {}
        done = threading.Event()
        request = library.request([{"role": "user", "content": prompt}], sliders=sliders,
                                  sampling={"seed": 4, "max_tokens": 24})
        request.on_event = lambda kind, data: kind == "done" and (finished.update(data), done.set())
        before = sum(prompt_tokens)
        loop.submit(request)
        assert done.wait(120)
        return finished["output"], sum(prompt_tokens) - before

    try:
        texts, decoded = zip(*[reply(sliders) for sliders in ({}, {"joy": 1}, {"joy": 1}, {})])
    finally:
        loop.close()
    assert texts[1] == texts[2] == alone
    assert texts[0] == texts[3] != alone
    # the second joy request finds its head kept; the last finds the unsteered one saved: neither decodes it again
    assert decoded[0] == decoded[1] > decoded[2] == decoded[3] > 0, decoded


def test_a_server_closed_answers_every_request_and_takes_no_more(library):
    loop = library.server(parallel=1)
    finished: dict[str, dict] = {}
    done = {name: threading.Event() for name in ("running", "waiting")}
    for name, max_tokens in (("running", 2000), ("waiting", 4)):
        request = library.request(prompt="Once upon a time", sampling={"max_tokens": max_tokens, "seed": 1})
        request.on_event = lambda kind, data, name=name: kind == "done" and (finished.update({name: data}),
                                                                            done[name].set())
        loop.submit(request)
    loop.close()
    assert all(event.wait(30) for event in done.values())  # the waiting one was never told before
    assert finished["running"]["finish_reason"] == finished["waiting"]["finish_reason"] == "cancelled"
    with pytest.raises(eqz.EqzError, match="was closed"):  # it queued for ever
        loop.submit(library.request(prompt="Hi"))


def test_a_notebooks_habits_leave_the_model_and_its_chats_sound(library):
    """Cells run again, replies left unread or half-read, a context smaller than a prompt's batch."""
    # llama.cpp caps a context's batch at the size asked for and rounds the context up: this aborted the process
    assert isinstance(library.generate("word " * 200, n_ctx=64, max_tokens=2), str)
    with library.chat(seed=1, max_tokens=8) as chat:
        chat.send("First question?")  # never read: forgotten, as if never sent (it was answered with the next)
        second = chat.send("Second question?")
        assert "".join(second) + "".join(second) == second.text  # read twice: one reply (it was added twice)
        half = chat.send("Tell me a story.")
        pieces = iter(half)
        next(pieces)
        after = "".join(chat.send("What is 2+2?"))  # the half-read reply ends first (its text came after this one)
        assert list(pieces) == []
        assert [message["role"] for message in chat.history] == ["user", "assistant"] * 3
        assert chat.history[0]["content"] == "Second question?" and chat.history[5]["content"] == after
        assert chat.history[3]["reply"]["finish_reason"] == "interrupted" and chat.history[3]["content"] == half.text
        assert "meter" not in chat.history[1]["reply"]  # was {}: held sliders tap the model, the meter was off
    gc.disable()  # freed as soon as dropped, not at the next collection (a model and its chats were never freed)
    try:
        dropped = eqz.load()
        chat = dropped.chat(meter=True)
        "".join(chat.send("Hi"))
        released = (dropped.model._release, chat.session.context._release)
        del dropped, chat
        assert not any(release.alive for release in released)
    finally:
        gc.enable()
    with pytest.warns(eqz.EqzWarning, match="beyond the calibrated") as warned:  # Chat.set warned of nothing
        with library.chat() as chat:
            chat.set(joy=1.5)
    assert {warning.filename for warning in warned} == {__file__}
    assert library.generate("Hi", sampling=None, seed=3, max_tokens=2) == library.generate("Hi", seed=3, max_tokens=2)


def test_a_saved_chat_goes_on_where_it_left_off_in_its_settings(library, tmp_path):
    with library.chat(seed=2, max_tokens=6, sliders={"joy": 0.5}, clamp={"fear": 0}, system="Be brief.") as chat:
        first = "".join(chat.send("Hello"))
        saved = chat.save(tmp_path / "chat.json")
    with library.chat(resume=saved, sliders={"trust": 0.3}) as chat:  # options given win over the file's
        assert [m["content"] for m in chat.history] == ["Hello", first]
        "".join(chat.send("And then?"))
        record = chat.history[-1]["reply"]
        assert record["sliders"]["joy"] == 0.5 and record["sliders"]["trust"] == 0.3
        assert record["filters"]["clamp"] == {"fear": 0.0} and record["sampling"]["max_tokens"] == 6
        assert chat.session.system == "Be brief."
        chat.session.apply_preset(get_preset("serene"))  # a mood keeps the user's seed and reply length: the
        assert (chat.session.sampling.seed, chat.session.sampling.max_tokens) == (2, 6)  # file's were dropped
    with pytest.raises(eqz.EqzError, match="give it or a preset, not both"):
        library.chat(resume=saved, preset="calm")


def test_a_saved_chat_goes_on_with_a_model_that_lacks_its_bands(library, gemma_path, tmp_path):
    """A conversation with a model without a bank could never be resumed ("no emotion bank fits"), nor one whose
    file moves a band this bank lacks ("unknown band", which no option could override)."""
    with eqz.load(gemma_path) as plain:
        with plain.chat(max_tokens=4, seed=1) as chat:
            "".join(chat.send("Good morning"))
            saved = chat.save(tmp_path / "plain.json")
        with plain.chat(resume=saved) as chat:  # nothing moved: nothing said
            assert len(chat.history) == 2
        with pytest.warns(eqz.EqzWarning, match="moves joy, fear, which need an emotion bank, which this model has "
                                                "not; it goes on without them"):
            plain.chat(resume=_edited(saved, "moved", sliders={"joy": 0.5}, filters={"clamp": {"fear": 0}, "ablate": []}))
    with pytest.warns(eqz.EqzWarning, match="moves nostalgia, which this model's bank lacks"):
        chat = library.chat(resume=_edited(saved, "nostalgic", sliders={"joy": 0.5, "nostalgia": 1}))
    assert dict(chat.session.steering.gains) == {"joy": 0.5}
    chat.close()


def test_a_reply_cut_short_keeps_the_line_it_was_holding_back(gemma_path):
    """A base model's reply holds a line's start back ("\\nThe", which may open an invented "\\nThe man:") until it
    knows; stopping the reply there (Ctrl-C) dropped those characters from the screen and the conversation."""
    settings = dict(max_tokens=48, system="You write poems.")
    poem = "Write a poem of four lines about the sea."
    with eqz.load(gemma_path) as plain:
        for seed in range(1, 13):  # the first seed whose reply holds a line back and then shows it
            with plain.chat(seed=seed, **settings) as chat:
                whole = list(chat.send(poem))  # a piece per token, "" while it holds text back
            opening = [k for k in range(1, len(whole)) if whole[k - 1] and not whole[k]
                       and next((piece for piece in whole[k:] if piece), "").startswith("\n")]
            if opening:
                break
        assert opening, whole  # (four of the first eight seeds here)
        shown = "".join(whole[: opening[0] + 1])
        with plain.chat(seed=seed, **settings) as chat:
            reply, cut = chat.send(poem), []
            for piece in reply:
                cut.append(piece)
                if len(cut) == opening[0] + 1:
                    reply.stop()
            text = "".join(cut)
            assert text.startswith(shown + "\n") and chat.history[-1]["content"] == text == reply.text


def test_a_saved_chat_keeps_what_the_model_was_not_given(library, tmp_path):
    """A transcript lost the oldest messages, dropped to fit the context (a larger one could not bring them back),
    and a slider moved since the last reply; a conversation kept while the model read a message ended with it, and
    resuming dropped it at the next reply without a word."""
    questions = ["Tell me about the moon.", "Tell me about the sun.", "And the stars?", "And the sea?", "The wind?"]
    with library.chat(n_ctx=256, max_tokens=40, seed=1) as chat:
        for question in questions:
            "".join(chat.send(question))
        assert chat.history[0]["content"] != questions[0]  # dropped from what the model reads
        read = list(chat.history)
        chat.send("Say it again. " * 30).close()  # never read in: the model forgets nothing for it
        assert chat.history == read
        chat.set(sadness=1)
        saved = chat.save(tmp_path / "chat.json")
    transcript = json.loads(saved.read_text())
    assert [message["content"] for message in transcript["messages"][::2]] == questions
    assert transcript["sliders"]["sadness"] == 1
    unanswered = _edited(saved, "unanswered", messages=[*transcript["messages"], {"role": "user", "content": "Bye"}])
    with pytest.warns(eqz.EqzWarning, match="ends with a message that got no reply .*; send it again for one"):
        chat = library.chat(resume=unanswered)
    assert chat.session.unanswered == "Bye" and chat.history[-1]["role"] == "assistant"  # eqz chat types it again
    chat.close()


def test_a_resumed_chats_vector_files_give_way_to_the_ones_given_and_a_lost_one_is_left_out(library, tmp_path,
                                                                                          random_vector_file):
    """A vector given beside the file's added to its scale (options given win), and a file gone since, or made for
    another model, could not be resumed at all: only editing the JSON went on."""
    vector = tmp_path / "mix.gguf"
    shutil.copy(random_vector_file, vector)
    with library.chat(vectors=[(vector, 1.0)], max_tokens=4, seed=1) as chat:
        "".join(chat.send("Hi"))
        saved = chat.save(tmp_path / "chat.json")
    for given, steering in ([(vector, 0.5)], ((str(vector), 0.5),)), ([(vector, 0)], ()):
        with library.chat(resume=saved, vectors=given) as chat:
            assert chat.session.steering.vectors == steering
    vector.unlink()
    with pytest.warns(eqz.EqzWarning, match="control vector not found: .*; it goes on without that vector"):
        chat = library.chat(resume=saved)
    assert chat.session.steering.vectors == ()
    chat.close()


def test_kept_conversations_are_the_users_alone_and_never_share_a_file(library, tmp_path, monkeypatch):
    """Kept chats were readable by everyone (644, in a 755 folder); a relative $XDG_STATE_HOME made a folder named ~
    where eqz ran. (Two chats left in one second could both be given one name, checked and then written: a race
    this test cannot time; three in a row get three names either way.)"""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with library.chat(max_tokens=2, seed=1) as chat:
        leaving = [ChatCommands(chat.session) for _ in range(3)]  # three chats' screens, as it were
        "".join(chat.send("Hi"))
        kept = [commands.keep() for commands in leaving]
    assert len(set(kept)) == 3 and {stat.S_IMODE(path.stat().st_mode) for path in kept} == {0o600}
    assert stat.S_IMODE(kept[0].parent.stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_STATE_HOME", "~/state")  # the spec: ignore a relative one
    assert chats_dir() == Path.home() / ".local" / "state" / "eqz" / "chats"


def _edited(path: Path, name: str, **changes) -> Path:
    """A copy of the saved conversation in ``path`` named ``name``, with ``changes`` to its top-level keys."""
    edited = path.with_name(f"{name}.json")
    edited.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edited


USED_AFTER_CLOSE = """
import eqz
def said(use):
    try:
        use()
    except eqz.EqzError as error:
        print(error)
model = eqz.load()
stream = model.stream("Hello", max_tokens=8, seed=1)
next(stream)
model.close()
said(lambda: "".join(stream))
said(lambda: model.model_record)
model = eqz.load()
chat = model.chat(max_tokens=30, seed=1)
reply = chat.send("Hello")
next(iter(reply))
chat.close()
said(lambda: "".join(reply))
said(lambda: chat.send("Again"))
"""


def test_a_model_or_chat_used_after_close_says_so_instead_of_crashing_python():
    """Python died of a segmentation fault: a stream or a half-read reply read on after its model or chat was closed,
    a closed chat sent to, a closed model's record read. Run apart, so that a crash fails this test alone."""
    done = subprocess.run([sys.executable, "-c", USED_AFTER_CLOSE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["this model was closed; load it again (eqz.load) to use it"] * 2 + [
        "this chat or reply was closed; start another to go on"] * 2


def test_a_model_without_a_bank_says_how_to_make_one_when_a_chat_moves_a_slider(gemma_path):
    """It was told to restore a removed band with `vectors reset`, and listed the bands it has: none."""
    with eqz.load(gemma_path) as plain, plain.chat(max_tokens=4) as chat:
        with pytest.raises(eqz.EqzError, match="no emotion bank fits Gemma.*run `eqz train"):
            chat.set(joy=1)
        chat.set()  # moving nothing needs no bank
        "".join(chat.send("Hi"))  # and the chat goes on
        # a filter asked for "a bank and --meter" (the meter was on), and `eqz train` without --model trains another
        with pytest.raises(eqz.EqzError, match=rf"none fits this model; run `eqz train --model {gemma_path}`"):
            chat.session.set_filters(clamp={"joy": 1.0})
        # hold and remove listed "its bands: " and nothing
        with pytest.raises(eqz.EqzError, match="no emotion bank fits Gemma 3 270m yet, so it has no band 'joy'"):
            plain.hold("joy", 3)


def test_a_library_batch_resumes_closes_its_file_and_counts_its_rows(library, tmp_path):
    """A notebook cell run again met "pass --resume", which the library did not take; the file stayed open."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("Say hi.\nName a colour.\n")
    plan = library.batch(prompts, out, sampling={"max_tokens": 4})
    stats = plan.run()
    assert plan.output.handle.closed and stats.total == stats.written == 2  # total was 0
    with pytest.raises(eqz.EqzError, match="ran already"):  # not a ValueError on the closed file
        plan.run()
    with pytest.raises(eqz.EqzError, match="resume=True in the library"):
        library.batch(prompts, out, sampling={"max_tokens": 4})
    again = library.batch(prompts, out, sampling={"max_tokens": 4}, resume=True)
    assert again.run().written == 0 and len(out.read_text().splitlines()) == 2
    # a cell run again makes its plan while the first, never run, still holds the file: it was "being written by
    # another eqz batch"; and a Preset, as generate takes one, was an AttributeError
    fresh = tmp_path / "fresh.jsonl"
    first = library.batch(prompts, fresh, preset=eqz.read_preset("serene"), sampling={"max_tokens": 4})
    second = library.batch(prompts, fresh, preset=eqz.read_preset("serene"), sampling={"max_tokens": 4})
    with pytest.raises(eqz.EqzError, match="a later plan writes"):
        first.run()
    assert second.run().written == 2 and {json.loads(row)["preset"] for row in fresh.read_text().splitlines()} == {
        "serene"}
    unrun = library.batch(prompts, tmp_path / "unrun.jsonl")
    del unrun  # a plan dropped without running: its empty file stayed on disk for good
    assert not (tmp_path / "unrun.jsonl").exists()


def test_repeat_last_n_of_minus_one_is_the_whole_context_as_in_llama_cpp(library):
    """llama.cpp's sampler reads -1 as 0 (no penalty); its tools, and now eqz, make it the whole context."""
    def reply(last_n: int) -> str:
        return library.generate("List the numbers one to twenty.", temperature=0, repeat_penalty=2.0,
                                repeat_last_n=last_n, max_tokens=30)

    assert reply(-1) == reply(4096) != reply(0)


def test_library_errors_are_one_line_and_name_no_flags(library, tmp_path):
    with pytest.raises(eqz.EqzError) as unknown:
        library.generate("Hi", sliders={"glee": 1})
    assert "valid bands" in str(unknown.value) and "--" not in str(unknown.value)
    with pytest.warns(eqz.EqzWarning, match="beyond the calibrated") as warned:
        library.generate("Hi", sliders={"joy": 1.5}, max_tokens=2)
    assert {warning.filename for warning in warned} == {__file__}  # the caller's line, not eqz's
    with pytest.warns(eqz.EqzWarning) as warned:
        library.chat(sliders={"joy": 1.5})
    assert {warning.filename for warning in warned} == {__file__}
    with pytest.raises(eqz.EqzError) as missing:
        eqz.load("/no/such/model.gguf")
    assert "not found" in str(missing.value) and "--" not in str(missing.value)
    duplicated, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    duplicated.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(eqz.EqzError, match="duplicate id"):
        library.batch(duplicated, out)
    assert not out.exists()  # the file it opened is closed and, empty, removed
    misuses = {"prompt must be a string": lambda: library.generate(None),  # each was a raw TypeError/AttributeError
               "text must be a string": lambda: library.analyze(None),
               "sliders must be a dict": lambda: library.generate("Hi", sliders=["joy"]),
               "vectors takes \\(path, scale\\) pairs": lambda: library.generate("Hi", vectors="joy.gguf"),
               "save the ControlVector first": lambda: library.generate("Hi",
                                                                        vectors=[(library.bank.vector(joy=1), 1)]),
               "ablate takes a list": lambda: library.chat(ablate="joy"),
               "the scale of joy.gguf must be a finite number": lambda: library.chat(vectors=[("joy.gguf", "x")]),
               "sampling must be a dict": lambda: library.generate("Hi", sampling=[0.7]),
               "threads must be a whole number": lambda: eqz.load(threads=-3),
               # a bank of another model: was a numpy broadcast error at the first slider
               "was made for Gemma 3 270m, not for": lambda: eqz.load(bank=ROOT / "docs" / "banks" / "gemma-3-270m"),
               "parallel must be a whole number of at least 1": lambda: library.server(parallel=0),  # never replied
               "max_waiting must be a whole number of at least 0": lambda: library.server(max_waiting=-1),
               "per_sequence must be a whole number of at least 64": lambda: library.server(per_sequence=8),
               # batch: parallel=0 spun for ever, samples="2" made 22 rows of a TypeError
               "parallel must be a whole number of at least 1, got 0.5": lambda: library.batch(duplicated, out,
                                                                                               parallel=0.5),
               "samples must be a whole number of at least 1": lambda: library.batch(duplicated, out, samples="2"),
               "seed must be a whole number": lambda: library.batch(duplicated, out, seed=1.5),
               "n_ctx must be a whole number of at least 64": lambda: library.chat(n_ctx=0),  # llama.cpp: 0 = the model's
               # a message the CLI shares names the library's way too (it said only "pass it with --vector")
               "vectors=\\[\\(FILE, SCALE\\)\\] in the library": lambda: eqz.load(SHIPPED_BANK / "joy.gguf"),
               # evaluate: a lone string was iterated letter by letter, no tokens or a bool gain were measured
               "bands takes a list of band names, such as \\['joy'\\]": lambda: library.evaluate("joy"),
               "prompts takes a list of strings": lambda: library.evaluate(["joy"], [0], "Hi there", max_tokens=8),
               "max_tokens must be a whole number of at least 8": lambda: library.evaluate(["joy"], [0], ["Hi"], 0),
               "samples must be a whole number": lambda: library.evaluate(["joy"], [0], ["Hi"], 8, samples=1.5),
               "gains takes a list of numbers": lambda: library.evaluate(["joy"], None),
               "gain for every band must be a number, got True": lambda: library.evaluate(["joy"], [True], ["Hi"], 8),
               # train: refused before the f16 unpacking (and the CLI's checks on described bands)
               "unknown band 'nosuch'": lambda: library.train(["nosuch"]),
               "described must be a dict": lambda: library.train(described="nostalgia"),
               "'joy' is a built-in band": lambda: library.train(described={"joy": "plain happiness"}),
               "band name '../x' must be lowercase": lambda: library.train(described={"../x": "a file elsewhere"}),
               "the description of nost is empty": lambda: library.train(described={"nost": " "}),
               # each was a raw TypeError, ValueError or AttributeError, or iterated a string letter by letter
               "presets takes a list of preset names": lambda: library.batch(duplicated, out, presets="melancholy"),
               # sampling's seed was dropped in silence, None wrote a file named "None", no gains failed at run()
               "give seed=5, not sampling": lambda: library.batch(duplicated, out, sampling={"seed": 5}),
               "output takes a file's path": lambda: library.batch(duplicated, None),
               # unreachable; and its hint said reply.record['meter'], a TypeError on the record's dataclass
               "give the text alone.*then reply.record.meter once": lambda: library.generate("Hi", meter=True),
               "sweeps: joy has no gains": lambda: library.batch(duplicated, out, sweeps=[("joy", [])]),
               "sweeps takes \\(band, gains\\) pairs": lambda: library.batch(duplicated, out, sweeps={"joy": [-1, 1]}),
               "sampling must be a dict, such as {.temperature.: 0.7}; got list": lambda: library.batch(
                   duplicated, out, sampling=[1]),
               "preset must be a preset's name or file": lambda: library.generate("Hi", preset=123),
               "system must be a string": lambda: library.generate("Hi", system=5),
               "a preset's system prompt must be text": lambda: Preset("made", "", {}, {}, system=5),  # it failed
               # at the first message, in the template (with model.chat(preset=...) or session.apply_preset)
               "messages must be a list of dicts": lambda: library.request("Hi"),
               "ablate takes a list of band names": lambda: library.request([{"role": "user", "content": "Hi"}],
                                                                            ablate="joy"),
               "by \\(by in the library\\) must be": lambda: library.analyze("I am glad.", by="word"),
               "unknown setting 'temprature'; the settings are: seed": lambda: library.generate("Hi", temprature=0.5),
               # a generator that checked nothing until its first piece
               "unknown band 'jyo'": lambda: library.stream("Hi", sliders={"jyo": 1})}
    for message, misuse in misuses.items():
        with pytest.raises(eqz.EqzError, match=message):
            misuse()
    with pytest.raises(eqz.EqzError, match="finite number in"):  # was a vector of NaN
        library.bank.vector(joy=float("nan"))
    for use in (lambda: library.generate("caf\udce9", max_tokens=2), lambda: library.analyze("I am glad \ud800.")):
        with pytest.raises(eqz.EqzError, match="not valid UTF-8"):  # not a raw UnicodeEncodeError
            use()
    closed = eqz.load()
    closed.close()
    for use in (lambda: closed.generate("Hi", max_tokens=2), lambda: closed.analyze("I am glad.")):
        with pytest.raises(eqz.EqzError, match="this model was closed"):  # not llama.cpp reading freed memory
            use()


def test_control_vectors_are_values_that_round_trip_through_gguf(tmp_path):
    rng = np.random.default_rng(0)
    a = eqz.ControlVector(np.vstack([np.zeros((1, 8)), rng.standard_normal((3, 8))]).astype(np.float32))
    b = eqz.ControlVector(np.vstack([np.zeros((1, 8)), rng.standard_normal((3, 8))]).astype(np.float32))
    mixed = 2 * a - b / 4 + (-a)
    assert np.allclose(mixed.matrix, a.matrix - b.matrix / 4)
    loaded = eqz.ControlVector.load(mixed.save(tmp_path / "mix.gguf"))
    assert np.allclose(loaded.matrix, mixed.matrix) and loaded.model_hint == "llama"
    two_layers = eqz.ControlVector(np.ones((2, 8), dtype=np.float32))  # as ControlVector.load reads a short file
    assert np.allclose((a + two_layers).matrix, np.vstack([a.matrix[:2] + 1, a.matrix[2:]]))  # was "different models"
    with pytest.raises(eqz.EqzError, match="different models"):
        a + eqz.ControlVector(np.zeros((4, 9), dtype=np.float32))
    with pytest.raises(eqz.EqzError, match="zero on every layer"):  # a file llama.cpp and eqz could not read back
        (a * 0).save(tmp_path / "zero.gguf")
    with pytest.raises(eqz.EqzError, match="not finite"):
        (a * 1e39).save(tmp_path / "huge.gguf")
    assert not (tmp_path / "zero.gguf").exists() and not (tmp_path / "huge.gguf").exists()
    assert np.array_equal(sum([a, b]).matrix, (a + b).matrix)  # sum starts at 0 + a
    assert eqz.ControlVector([[0, 1], [1, 1]]).matrix.dtype == np.float32  # any array-like
    misuses = {"scaled by a number, such as 0.5, not by a NoneType": lambda: a * None,  # was an all-NaN vector
               "not by a str": lambda: a * "2", "not by a bool": lambda: True * a,  # were 2 and 1
               "not by a ControlVector": lambda: a * a, "divided by 0": lambda: a / 0,
               "whole numbers such as model.info.n_layer": lambda: eqz.ControlVector.load(tmp_path / "mix.gguf", "4")}
    for message, misuse in misuses.items():
        with pytest.raises(eqz.EqzError, match=message):
            misuse()


def test_importing_eqz_and_its_numpy_modules_does_not_start_llama_cpp():
    code = ("import sys, eqz, eqz.bank, eqz.meter, eqz.directions, eqz.presets, eqz.steering, eqz.scoring; "
            "print('llama_cpp' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_second_preset_replaces_the_first_ones_sampling_and_system(library):
    """`/preset melancholy` after `/preset serene` kept serene's system prompt and top-p (and the reply's record
    said melancholy); a preset now replaces what a preset sets, as if the chat had started with it. The seed and
    the reply length stay (`-n 60` went back to 256 at every /preset)."""
    from eqz.sampling import Sampling

    with library.chat(preset="serene", seed=5, max_tokens=60) as chat:
        session = chat.session
        assert session.system and session.sampling.top_p == 0.9
        session.apply_preset(get_preset("melancholy", session.steerer.bands))
        assert session.system is None and session.preset == "melancholy"
        assert (session.sampling.temperature, session.sampling.top_p, session.sampling.seed,
                session.sampling.max_tokens) == (0.7, Sampling().top_p, 5, 60)
    long_replies = Preset("long", "", {}, {"max_tokens": 500, "seed": 9})  # a preset's own length and seed
    with library.chat(preset=long_replies) as chat:  # do not stay after another preset
        chat.session.apply_preset(get_preset("melancholy", chat.session.steerer.bands))
        assert chat.session.sampling.max_tokens == Sampling().max_tokens and chat.session.sampling.seed is None


def test_band_names_take_any_case_in_the_library_as_on_the_command_line(library):
    """The CLI, chat and server always took `Joy`; the library's sliders, filters and `set` took only `joy`."""
    steered = library.generate("Hi", sliders={"disgust": 1}, ablate=["anger"], seed=4, max_tokens=12)
    assert library.generate("Hi", sliders={" Disgust": 1}, ablate=["ANGER"], seed=4, max_tokens=12) == steered
    with pytest.raises(eqz.EqzError, match="names the band joy twice"):
        library.generate("Hi", sliders={"joy": 1, "JOY": 0.5})
    with library.chat(clamp={"Fear": 0}) as chat:
        assert chat.session.filters.describe()["clamp"] == {"fear": 0.0}
        chat.set(Trust=0.5)
        assert dict(chat.session.pending_or_current_steering().gains)["trust"] == 0.5
    assert np.array_equal(library.bank.vector(JOY=0.8).matrix, library.bank.vector(joy=0.8).matrix)  # was unknown


def test_moving_a_held_slider_under_a_clamp_says_it_does_nothing(library, monkeypatch):
    """A held slider is itself a clamp and the user's clamp on the band wins: chat's /set said so, the library's
    ``Chat.set`` moved it in silence. A slider that adds its vector still steers under a clamp and is not named."""
    assert library.bank.bands["joy"].hold is not None and library.bank.bands["trust"].hold is None  # the shipped bank
    said = []
    monkeypatch.setattr(library, "on_warning", said.append)
    with library.chat(clamp={"joy": 2, "trust": 0}) as chat:
        chat.set(joy=1, trust=1)
    assert "the joy slider (+1.00) does nothing while a clamp holds joy at +2.00" in said
    assert not any("trust slider" in line for line in said), said


def test_the_bank_commands_are_library_calls_on_the_users_own_copy(tmp_path, monkeypatch, random_vector_file):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with eqz.load() as model:
        shipped_fear = model.bank.bands["fear"].hold
        assert np.array_equal(model.control_vector({"Trust": 0.8}).matrix, model.bank.vector(trust=0.8).matrix)
        with pytest.warns(eqz.EqzWarning, match="joy, anticipation hold a level in eqz"):
            model.control_vector(preset="euphoric")
        with pytest.raises(eqz.EqzError, match="nothing to export"):
            model.control_vector({"trust": 0})
        assert model.hold("fear", None) is None and not (tmp_path / "eqz" / "vectors").exists()  # no copy for nothing
        own = model.hold("Fear", 3)
        assert own.is_relative_to(tmp_path) and model.bank.bands["fear"].hold == 3  # steers with it at once
        assert eqz.read_bank(own).bands["fear"].hold == 3 and own in [found.directory for found in eqz.list_banks()]
        shipped_joy = model.bank.bands["joy"]
        model.hold("joy", shipped_joy.hold + 1)
        assert not model.bank.bands["joy"].hold_check  # a level nothing measured
        model.hold("joy", shipped_joy.hold)  # set back: the shipped figures come back (it read "uncalibrated")
        assert model.bank.bands["joy"].hold_check == shipped_joy.hold_check and shipped_joy.hold_check
        model.import_vector(random_vector_file, "Mine")
        assert model.bank.bands["mine"].source == str(random_vector_file)
        with pytest.raises(eqz.EqzError, match=r"replace=True in the library"):
            model.import_vector(random_vector_file, "mine")
        with pytest.raises(eqz.EqzError, match="import_vector takes a control vector file's path"):
            model.import_vector(123, "mine")
        with pytest.raises(eqz.EqzError, match="replace takes True or False, got 'no'"):  # "no" was true: replaced
            model.import_vector(random_vector_file, "mine", replace="no")
        with pytest.raises(eqz.EqzError, match="replace=True in the library"):  # before any work
            model.train(described={"Mine": "wistful, longing for the past"})
        with pytest.raises(eqz.EqzError, match="hold=True, orthogonalize=True in the library"):
            model.train(described={"calm": "calm and at ease"}, hold=True)
        with pytest.raises(eqz.EqzError, match="remove_bands takes band names"):
            model.remove_bands(["mine"])
        model.remove_bands("MINE")
        assert "mine" not in eqz.read_bank(own).bands
        assert model.reset_bank() == own and not own.exists()
        assert model.bank.bands["fear"].hold == shipped_fear  # the shipped bank again
        assert model.reset_bank() is None
    # a model loaded with a bank of the user's choosing: an edit went into the user's own copy of the model's bank,
    # and the model steered with that copy from then on, without a word
    chosen = tmp_path / "chosen"
    shutil.copytree(ROOT / "vectors" / "smollm2-135m-instruct", chosen)
    with eqz.load(bank=chosen) as model:
        with pytest.raises(eqz.EqzError, match=r"steers with the bank in .*chosen \(load\(bank=...\)\)"):
            model.hold("sadness", 5)
        with pytest.raises(eqz.EqzError, match="load the model without bank="):
            model.import_vector(random_vector_file, "mine")
        assert model.bank.directory == chosen and not own.exists()
    # a band's file gone: every command stopped on "control vector not found", with no word on how to go on
    (chosen / "joy.gguf").unlink()
    with pytest.raises(eqz.EqzError, match=r"cannot read its band 'joy': control vector not found.*delete the folder"):
        eqz.read_bank(chosen)
    # a vector zero on every layer: its save failed, naming the bank's own file, and left a bank with no bank.yaml
    zeros = tmp_path / "zeros.gguf"  # as a tool other than eqz may write one (eqz refuses to)
    writer = gguf.GGUFWriter(str(zeros), "controlvector")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.5", np.zeros(576, dtype=np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    with eqz.load() as model, pytest.raises(eqz.EqzError, match="zeros.gguf is zero on every layer"):
        model.import_vector(zeros, "flat")
    assert not own.exists()
    with eqz.load() as first, eqz.load() as second:  # "already so" while this model steered with the old level
        assert first.bank.bands["joy"].hold != 5
        second.hold("joy", 5)
        assert first.hold("joy", 5) is None and first.bank.bands["joy"].hold == 5


def test_presets_are_listed_read_and_saved_by_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = eqz.save_preset("sunny", based_on="melancholy", sliders={"Joy": 0.5}, sampling={"top_p": 0.8},
                           clamp={"Fear": 0}, ablate=["Anger"])
    saved = eqz.read_preset("sunny")
    assert saved.path == path and saved.description == "based on melancholy"
    assert saved.sliders == {**eqz.read_preset("melancholy").sliders, "joy": 0.5}
    assert saved.sampling == {"temperature": 0.7, "top_p": 0.8}  # only what was asked for, not every default
    assert saved.filters == {"clamp": {"fear": 0.0}, "ablate": ["anger"]}
    assert eqz.read_preset(path) == saved and "sunny" in [entry.name for entry in eqz.list_presets()]
    with pytest.raises(eqz.EqzError, match="already saved"):
        eqz.save_preset("sunny", sliders={"joy": 0.1})
    eqz.save_preset("sunny", sliders={"joy": 0.1}, replace=True)
    assert eqz.read_preset("sunny").sliders == {"joy": 0.1}
    written = tmp_path / "Mood.yaml"
    written.write_text("name: mood\nsliders: {Joy: 0.5}\nfilters: {ablate: [Anger]}\n")
    assert eqz.read_preset(written).sliders == {"joy": 0.5} and eqz.read_preset(written).filters == {"ablate": ["anger"]}


def test_a_library_batch_takes_its_prompts_as_a_list_checked_as_a_files_lines(library, tmp_path):
    """A notebook had to write its prompts to a file first."""
    listed, from_file = tmp_path / "listed.jsonl", tmp_path / "file.jsonl"
    (tmp_path / "p.txt").write_text("Say hi.\nName a colour.\n")
    library.batch(tmp_path / "p.txt", from_file, sampling={"max_tokens": 4}, seed=3).run()
    library.batch(("Say hi.", "Name a colour."), listed, sampling={"max_tokens": 4}, seed=3).run()
    assert listed.read_text() == from_file.read_text()  # the same ids, replies and records
    rows = [{"prompt": "Say hi.", "id": "a", "system": "Answer in French."}, "Name a colour."]
    assert library.batch(rows, tmp_path / "rows.jsonl", sampling={"max_tokens": 4}).run().written == 2
    assert [json.loads(line)["id"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == ["a", "2"]
    with pytest.raises(eqz.EqzError, match="prompts item 2: missing \"prompt\""):
        library.batch(["Say hi.", ""], tmp_path / "bad.jsonl")
    with pytest.raises(eqz.EqzError, match="prompts takes strings, or dicts"):
        library.batch(["Say hi.", 3], tmp_path / "bad.jsonl")
    skipped = library.batch(["Say hi.", ""], tmp_path / "skip.jsonl", sampling={"max_tokens": 4}, skip_bad=True)
    assert skipped.run().written == 1
    # a sweep's gains as the CLI's BAND=-1:1:4 makes them: np.linspace's unrounded ones resumed a CLI file twice over
    swept = library.batch(["Say hi."], tmp_path / "swept.jsonl", sweeps=[("trust", list(np.linspace(-1, 1, 4)))])
    assert [setting.gains["trust"] for setting in swept.settings] == [-1.0, -0.333333, 0.333333, 1.0]


def test_a_bank_change_that_eqz_will_not_find_first_says_so(tmp_path, monkeypatch):
    """With $EQZ_VECTORS holding the model's bank, `vectors hold/import/remove` and `train --band` saved the user's
    copy where it is never found, and the change seemed to do nothing. $EQZ_VECTORS may also name one bank (the
    DIR of `train -o DIR`), where it was silently passed over."""
    team = tmp_path / "team-bank"
    shutil.copytree(SHIPPED_BANK, team)
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "EQZ_VECTORS": str(team)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert eqz.list_banks()[0].directory == team
    listed = run_eqz("vectors", "list", env=env)
    assert "team-bank ($EQZ_VECTORS, in use)" in listed.stdout.replace("\n", " "), listed.stdout  # was "user"
    with eqz.load() as model:
        assert model.bank.directory == team
        with pytest.warns(eqz.EqzWarning, match=r"eqz finds the bank in .*team-bank first \(\$EQZ_VECTORS\)"):
            model.hold("fear", 3)
    again = run_eqz("vectors", "hold", "fear", "3", env=env)  # the user's copy holds it: said, and why unused
    assert "fear already holds level 3; nothing changed" in again.stdout and "team-bank first" in again.stderr
    assert "deleted" in run_eqz("vectors", "reset", env=env).stdout
    monkeypatch.delenv("EQZ_VECTORS")
    with eqz.load(bank=team) as model:
        assert model.reset_bank() is None and model.bank.directory == team  # deleted nothing: kept what it was given
    monkeypatch.setenv("EQZ_VECTORS", str(SHIPPED_BANK))  # a bank that is also in another search dir: listed once
    directories = [found.directory.resolve() for found in eqz.list_banks()]
    assert len(directories) == len(set(directories))


def test_eval_reads_bands_in_the_banks_order_and_each_gain_once(library):
    """The judge's and the perplexity's figures move with the batch mix, so `--bands fear,trust` and `trust,fear`
    gave different verdicts for the same replies (fear's +1 perplexity ratio 4.05 and 4.11, either side of 4)."""
    result = library.evaluate(["fear", "Trust"], [1, -1, 1.0], prompts=["Describe your morning."], max_tokens=16)
    assert result.bands == ("trust", "fear") and result.gains == (-1.0, 1.0)
