"""``eqz chat`` in a real pseudo-terminal: turns, slash commands, Ctrl-C mid-reply, Ctrl-D, /save."""

from __future__ import annotations


import json
import os
import re
import signal
import subprocess
import time

import pexpect
import pytest

from .conftest import EQZ, run_eqz, save_and_leave

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

PROMPT = "you> "
PASTE_MODE = re.compile(r"\x1b\[\?2004[hl]")  # readline asks the terminal to bracket pastes at each prompt


def spawn_chat(*args: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """Plain mode (no panel): what a chat looks like in a pipe or with --no-panel."""
    sized_by_terminal = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    child = pexpect.spawn(EQZ, ["chat", "--no-panel", *args], encoding="utf-8", timeout=60, dimensions=(rows, cols),
                          env=sized_by_terminal)  # pytest's COLUMNS=80 would win over the terminal's size
    child.expect_exact(PROMPT)
    return child


def test_chat_turns_commands_save_and_clean_exit(tmp_path, random_vector_file):
    child = spawn_chat("--seed", "4", "-n", "24")
    child.sendline("Hello! Who are you?")
    child.expect_exact(PROMPT)
    child.sendline("/system You are a pirate.")
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendline(f"/vector {random_vector_file} 0.5")
    child.expect(r"at scale\s+0\.5")  # the line wraps at 80 columns where pytest's temp path is long
    child.expect_exact(PROMPT)
    child.sendline("What do you like?")
    child.expect_exact(PROMPT)
    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(PROMPT)
    transcript = save_and_leave(child, tmp_path / "chat.json", "saved 4 messages", leave="ctrl-d")
    roles = [m["role"] for m in transcript["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert transcript["system"] == "You are a pirate."
    second = transcript["messages"][3]["reply"]
    assert second["vectors"] == [{"path": str(random_vector_file), "scale": 0.5}]
    assert second["sampling"]["seed"] == 4 and second["n_tokens"] > 0
    assert transcript["model"]["fingerprint"].startswith("llama-30x576")


def test_ctrl_c_stops_the_reply_and_keeps_the_chat(tmp_path):
    child = spawn_chat("--seed", "1", "-n", "2000", "--ctx", "4096")
    child.sendline("Write a very long story about a lighthouse keeper and his many adventures at sea.")
    child.expect_exact("at sea.\r\n")  # the echo of what we typed
    child.expect(r"\w+ \w+ \w+")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    reply = save_and_leave(child, tmp_path / "stopped.json", "saved 2 messages")["messages"][1]
    assert reply["reply"]["finish_reason"] == "interrupted"
    assert 0 < reply["reply"]["n_tokens"] < 2000


def test_keys_pressed_while_a_plain_reply_streams_wait_at_the_prompt_unechoed():
    """Without the panel, keys were echoed into the reply (^[[A) and readline took Up for history afterwards."""
    child = spawn_chat("--seed", "1", "-n", "2000", "--ctx", "4096")
    child.sendline("Write a very long story about a lighthouse keeper and his many adventures at sea.")
    child.expect_exact("at sea.\r\n")
    child.expect(r"\w+ \w+ \w+")  # the reply is streaming
    child.send("\x1b[Aok")
    time.sleep(0.5)  # read before the reply stops
    child.sendintr()
    child.expect_exact("[stopped]")
    streamed = child.before  # the reply as the terminal showed it: the echo was here
    child.expect_exact(PROMPT + "ok")
    assert "^[" not in streamed + child.before
    child.sendline(" then")
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_ctrl_c_outside_a_reply_and_the_prompt_keeps_the_chat(tmp_path):
    """A Ctrl-C between the two (a second tap just after a reply stopped, one while a command runs) ended the chat
    with exit 130 and the conversation unsaved. A /save into a FIFO waits for a reader: the Ctrl-C lands there."""
    fifo = tmp_path / "nobody-reads"
    os.mkfifo(fifo)
    child = spawn_chat("--seed", "2", "-n", "8")
    child.sendline("Hi")
    child.expect_exact(PROMPT)
    child.sendline(f"/save {fifo}")
    child.expect_exact(f"/save {fifo}\r\n")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    assert save_and_leave(child, tmp_path / "kept.json", "saved 2 messages")["messages"][0]["content"] == "Hi"


def test_ctrl_c_at_the_prompt_does_not_quit():
    child = spawn_chat()
    child.sendintr()
    child.expect_exact("Ctrl-D or /quit")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("command,fragment", [("/vector /no/such.gguf 1", "not found"), ("/vector x.gguf abc", "invalid scale 'abc': /vector FILE SCALE takes"),  # it taught FILE:SCALE
                                              ("/vector x.gguf 0", "x.gguf was not in use"),  # was "removed"
                                              ("/save", "usage"), ("/preset [/b]", "[/b]: cannot read"),  # not markup
                                              ("/temp", "usage: /temp VALUE"),  # was /temperature, no command
                                              ("/max-tokens 0", "/max-tokens must be >= 1"),  # was max_tokens
                                              ("/quit now", "/quit takes nothing after it"),  # it quit
                                              ("/reset all", "/reset takes nothing after it"),
                                              ("/clamp joy off", "joy is not clamped; /filters lists the filters")])
def test_bad_commands_give_one_line_and_keep_the_chat(command, fragment):
    child = spawn_chat(cols=200)  # wide enough that no message wraps
    child.sendline(command)
    child.expect_exact(PROMPT)
    said = [line for line in PASTE_MODE.sub("", child.before).splitlines() if line.strip()][1:]  # after the echo
    assert len(said) == 1 and fragment in said[0] and "Traceback" not in child.before, said
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_a_slider_a_filter_overrides_is_said_to_do_nothing():
    """A clamp or a notch sets its band's level whatever the slider adds: the slider went on showing its gain, and
    /ablate dropped a clamp on the band without a word."""
    child = spawn_chat("--set", "joy=1", cols=200)
    child.sendline("/clamp joy 2")
    child.expect_exact("the joy slider (+1.00) does nothing while a clamp holds joy at +2.00")
    child.sendline("/ablate joy")
    child.expect_exact("joy notched to the neutral level (its clamp at +2.00 is off)")
    child.expect_exact("the joy slider (+1.00) does nothing while joy is notched")
    child.sendline("/set joy 0")
    child.expect_exact("joy = +0.00")
    child.expect_exact(PROMPT)
    assert "does nothing" not in child.before
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_commands_take_text_as_written_and_let_one_setting_go(tmp_path, random_vector_file):
    """/system refused an apostrophe ("No closing quotation"); one clamp or notch could not be let go alone, nor a
    seed once set; /sliders did not show the vectors steering beside the sliders; a line piped out was cut at 80
    columns."""
    saved = tmp_path / "chat.json"
    lines = ["/system You're a pirate. Don't say \"arr\".", "/seed 5", "/seed random", "/clamp fear 0",
             "/ablate anger", "/clamp fear off", "/ablate anger off", "/filters", f"/vector {random_vector_file} 0.5",
             "/sliders", "/preset nosuch", f"/save {saved}", "/quit"]
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    ran = subprocess.run([EQZ, "chat", "--no-keep"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    transcript = json.loads(saved.read_text())
    assert transcript["system"] == "You're a pirate. Don't say \"arr\"."
    assert transcript["sampling"]["seed"] is None and transcript["filters"] == {"clamp": {}, "ablate": []}
    said = ran.stdout
    assert "seed = random" in said and "fear clamp off" in said and "anger notch off" in said
    assert "no filters" in said and f"vectors: {random_vector_file} x0.5" in said
    (error,) = [line for line in said.splitlines() if line.startswith("error: no preset named 'nosuch'")]
    assert error.rstrip().endswith("tender")  # one line, whole: it was cut at 80 columns


def test_a_pasted_text_of_several_lines_is_one_message(tmp_path):
    """Each pasted line was sent as a message of its own: CPython turns readline's bracketed paste off, so the
    terminal was never asked to mark a paste as one."""
    child = spawn_chat("--seed", "1", "-n", "4")
    assert "\x1b[?2004h" in child.before  # the terminal is asked to bracket pastes at the prompt
    child.send("\x1b[200~Summarize this:\rThe cat sat on the mat.\x1b[201~")  # and sends one so
    child.send("\r")
    child.expect_exact(PROMPT)
    messages = save_and_leave(child, tmp_path / "chat.json", "saved 2 messages")["messages"]
    assert messages[0]["content"] == "Summarize this:\nThe cat sat on the mat."


def test_piped_chat_echoes_what_the_user_said():
    ran = run_eqz("chat", "--seed", "1", "-n", "8", input="Hello there\n/quit\n")
    assert ran.returncode == 0, ran.stderr
    assert "you> Hello there\n" in ran.stdout  # the transcript on stdout reads as a conversation


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(tmp_path):
    """A terminal in another encoding sends bytes that are not UTF-8: that line gets one error, and the conversation
    (before and after it) is kept. It used to end the chat with "unexpected UnicodeEncodeError", unsaved."""
    saved = tmp_path / "chat.json"
    lines = b"Hello\ncaf\xe9 au lait\nHi again\n/save " + str(saved).encode() + b"\n/quit\n"
    ran = subprocess.run([EQZ, "chat", "--seed", "1", "-n", "6"], input=lines, capture_output=True, env=os.environ,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert b"not valid UTF-8 (byte 0xe9)" in ran.stdout
    assert [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"] == ["Hello", "Hi again"]


def test_save_writes_over_only_its_own_conversations_file(tmp_path):
    """/save wrote over any file: /reset, then /save to the same name, lost the first conversation."""
    saved = tmp_path / "chat.json"
    lines = f"Hello\n/save {saved}\nHi again\n/save {saved}\n/reset\n/save {saved}\n/quit\n"
    ran = run_eqz("chat", "--seed", "1", "-n", "6", input=lines, env={"COLUMNS": "300"})  # a message on one line
    assert ran.returncode == 0, ran.stderr
    assert "saved 2 messages" in ran.stdout and "saved 4 messages" in ran.stdout  # the same conversation, grown
    assert f"{saved} exists; /save {saved} --replace writes over it" in ran.stdout
    assert len(json.loads(saved.read_text())["messages"]) == 4
    again = run_eqz("chat", "-n", "6", input=f"/save {saved} --replace\n/quit\n")
    assert "saved 0 messages" in again.stdout and json.loads(saved.read_text())["messages"] == []


def test_leaving_keeps_a_conversation_not_saved(tmp_path):
    """Ctrl-D, /quit or /reset after replies nobody /saved lost them: they are kept in the chats folder now, once."""
    state = tmp_path / "state"
    chats = state / "eqz" / "chats"
    saved = tmp_path / "chat.json"
    lines = f"Hello\n/save {saved}\n/reset\nHi again\n/reset\nBye\n"  # then end of input: Ctrl-D
    ran = run_eqz("chat", "--seed", "1", "-n", "6", "--set", "joy=0.4", input=lines,
                  env={"XDG_STATE_HOME": str(state), "COLUMNS": "300"})
    assert ran.returncode == 0, ran.stderr
    kept = sorted(chats.glob("*.json"), key=lambda path: path.stat().st_mtime_ns)
    assert len(kept) == 2  # not the saved conversation, which the first /reset dropped
    assert f"history cleared (the conversation is kept in {kept[0]})" in ran.stdout
    assert f"kept this conversation in {kept[1]}" in ran.stdout
    contents = [[m["content"] for m in json.loads(path.read_text())["messages"] if m["role"] == "user"] for path in kept]
    assert contents == [["Hi again"], ["Bye"]]
    assert json.loads(kept[1].read_text())["messages"][1]["reply"]["n_tokens"] > 0
    unkept = run_eqz("chat", "--no-keep", "-n", "4", input="Hello\n", env={"XDG_STATE_HOME": str(state)})
    assert unkept.returncode == 0 and "kept" not in unkept.stdout and len(list(chats.iterdir())) == 2
    # --resume goes on with a kept conversation in its settings; what was only read back is not kept again
    resumed = run_eqz("chat", "--resume", str(kept[1]), "-n", "6", input="And more\n",
                      env={"XDG_STATE_HOME": str(state), "COLUMNS": "300"})
    assert resumed.returncode == 0, resumed.stderr
    assert "(going on with 2 messages; the last:)\nyou> Bye\n" in resumed.stdout
    (grown,) = set(chats.glob("*.json")) - set(kept)
    transcript = json.loads(grown.read_text())
    assert [m["content"] for m in transcript["messages"] if m["role"] == "user"] == ["Bye", "And more"]
    assert transcript["sliders"]["joy"] == 0.4 and transcript["messages"][3]["reply"]["sliders"]["joy"] == 0.4
    again = run_eqz("chat", "--resume", str(grown), input="", env={"XDG_STATE_HOME": str(state)})
    assert again.returncode == 0 and "kept" not in again.stdout and len(list(chats.iterdir())) == 3


def test_a_resumed_message_that_got_no_reply_waits_at_the_prompt(tmp_path):
    """A chat killed while the model read a message kept it without a reply; resuming showed it as the last line,
    and the next message dropped it without a word."""
    saved = tmp_path / "chat.json"
    assert run_eqz("chat", "-n", "4", "--seed", "1", "--no-keep", input=f"Hello\n/save {saved}\n").returncode == 0
    transcript = json.loads(saved.read_text())
    saved.write_text(json.dumps({**transcript, "messages": [*transcript["messages"],
                                                            {"role": "user", "content": "Tell me a joke."}]}))
    child = spawn_chat("--resume", str(saved), "-n", "4", "--no-keep")
    child.expect_exact("Tell me a joke.")  # typed again, for Enter to send
    child.sendline("")
    child.expect_exact(PROMPT)
    messages = save_and_leave(child, tmp_path / "after.json", "saved 4 messages")["messages"]
    assert [message["content"] for message in messages[::2]] == ["Hello", "Tell me a joke."]


def test_resume_refuses_what_it_cannot_go_on_with(tmp_path):
    """A hand-edited file's bad setting was named without the file, as if an option given were wrong."""
    not_chat, hot, sour = tmp_path / "rows.json", tmp_path / "hot.json", tmp_path / "sour.json"
    not_chat.write_text('{"messages": [{"role": "narrator", "content": "Once"}]}')
    hot.write_text('{"messages": [], "sampling": {"temperature": -3}}')
    sour.write_text('{"messages": [], "sliders": {"joy": "lots"}}')
    for args, message in [(["--resume", str(not_chat)], f"{not_chat} is not a conversation eqz chat saved"),
                          (["--resume", str(tmp_path / "none.json")], "does not exist; give a file that /save wrote"),
                          (["--resume", str(not_chat), "-p", "calm"], "give it or a preset, not both"),
                          (["--resume", str(hot)], f"{hot}: temperature must be a finite number"),
                          (["--resume", str(sour)], f"{sour}: gain for joy must be a number, got 'lots'")]:
        ran = run_eqz("chat", *args, input="")
        assert ran.returncode == 2 and message in ran.stderr and "Traceback" not in ran.stderr


def test_a_piped_chat_killed_mid_reply_keeps_it_and_says_so_on_a_line_of_its_own(tmp_path):
    """The line saying where the conversation was kept ran on from the reply's text ("You will bekept this...")."""
    chat = subprocess.Popen([EQZ, "chat", "--seed", "7", "-n", "400"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    chat.stdin.write(b"Tell me a very long story about a dragon.\n")
    chat.stdin.flush()
    said = b""
    while b"you> Tell me a very long story about a dragon.\n" not in said or len(said.split(b"dragon.\n", 1)[1]) < 40:
        chunk = os.read(chat.stdout.fileno(), 4096)  # the reply is streaming
        assert chunk, said  # (the chat ended before it did)
        said += chunk
    chat.terminate()
    said += chat.stdout.read()
    assert chat.wait(timeout=60) == -signal.SIGTERM
    (kept,) = (tmp_path / "eqz" / "chats").glob("*.json")
    assert f"\nkept this conversation in {kept}; eqz chat --resume FILE goes on with it\n" in said.decode()
    assert json.loads(kept.read_text())["messages"][1]["reply"]["finish_reason"] == "interrupted"
    resumed = run_eqz("chat", "--resume", str(kept), "--no-keep", input="", env={"COLUMNS": "300"})
    assert resumed.stdout.split("the last:)\n", 1)[1].endswith("\n[stopped]\nyou> \n")  # as it ended: cut short
