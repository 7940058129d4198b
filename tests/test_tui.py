"""The live equalizer in a real pseudo-terminal (80x24): hotkeys while a reply streams, the panel, /save's
record of every change, and the terminal restored afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest

from .conftest import EQZ, save_and_leave

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

PROMPT = "you> "
# tmux hands its sessions COLUMNS=80 LINES=24 when started from pytest, and rich obeys those over the real size
SIZED_BY_TERMINAL = "env -u COLUMNS -u LINES"
# a server of this run's own, without the user's tmux.conf: a running one (a user's, another run's) lends new sessions
# its environment and settings (and another run's tests would kill these sessions), and a user's status bar takes a row
TMUX = ["tmux", "-L", f"eqz-tests-{os.getpid()}", "-f", "/dev/null"]
STORY = "Write a very long story about a lighthouse keeper and his many adventures at sea."


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(EQZ, ["chat", *args], encoding="utf-8", timeout=90, dimensions=(24, 80))
    child.expect_exact(PROMPT)
    return child


def test_up_key_during_a_reply_steers_the_next_tokens_and_is_recorded(tmp_path):
    child = spawn("--seed", "3", "-n", "400")
    child.sendline(STORY)
    child.expect_exact("tok/s")  # the panel is up: the reply is streaming
    child.send("\x1b[A")  # Up: raise the selected band (joy) by 0.1
    screen = expect_on_screen(child, r"set\s+\+0\.1\s+\+0\.0")  # the panel shows the new gain at once
    marker = r"⟨joy\s+\+0\.1⟩"  # and the reply marks where the change took effect
    assert re.search(marker, screen) or expect_on_screen(child, marker)
    child.send("\x1b[A" * 7)  # on to +0.8: enough to change what is written
    child.expect_exact(PROMPT, timeout=120)
    reply = save_and_leave(child, tmp_path / "chat.json", "saved 2 messages", leave="ctrl-d")["messages"][1]
    record = reply["reply"]
    assert record["sliders"]["joy"] == 0.0  # the reply started unsteered
    change = record["changes"][0]
    assert 0 < change["at_token"] < record["n_tokens"]
    assert change["sliders"]["joy"] == pytest.approx(0.1)  # ...and tokens after the key press were not
    assert record["changes"][-1]["sliders"]["joy"] == pytest.approx(0.8)
    assert "⟨joy +0.1⟩" not in reply["content"]  # markers are display only, the transcript keeps clean text
    assert set(record["meter"]) >= {"joy", "sadness", "valence"}  # the meter was on
    # the same chat with no key pressed: the same text up to the first change, another one after it
    plain = spawn("--seed", "3", "-n", "400")
    plain.sendline(STORY)
    plain.expect_exact(PROMPT, timeout=120)
    unsteered = save_and_leave(plain, tmp_path / "plain.json", "saved 2 messages", leave="ctrl-d")["messages"][1]
    offset = change["text_offset"]
    assert unsteered["content"][:offset] == reply["content"][:offset] and unsteered["content"] != reply["content"]


def test_hotkeys_select_zero_and_reset(tmp_path):
    child = spawn("--seed", "3", "-n", "400", "--set", "fear=0.5", "--set", "anger=0.3")
    child.sendline(STORY)
    child.expect_exact("tok/s")
    child.send("3")  # select band 3 (fear)
    child.send("z")  # zero it
    child.send("\x1b[C")  # Right: surprise
    child.send("\x1b[A\x1b[A")  # +0.2
    expect_on_screen(child, r"⟨[^⟩]*surprise\s+\+0\.2")  # taken by the reply
    child.send("r")  # reset: every slider to 0
    child.expect_exact(PROMPT, timeout=120)
    changes = save_and_leave(child, tmp_path / "chat.json", "saved")["messages"][1]["reply"]["changes"]
    before_reset = changes[-2]["sliders"]
    assert before_reset["fear"] == 0.0 and before_reset["surprise"] == pytest.approx(0.2)
    assert before_reset["anger"] == 0.3 and not any(changes[-1]["sliders"].values())


def test_text_typed_while_a_reply_streams_waits_at_the_prompt_and_moves_no_slider(tmp_path):
    """"tell me more" typed mid-reply set every slider to 0 at its "r" and was lost; an Up pressed at once after
    Enter was thrown away with the rest of what the terminal held when the keys began to be read."""
    child = spawn("--seed", "3", "-n", "400")
    child.sendline(STORY)
    child.send("\x1b[A")  # before the panel is up
    child.expect_exact("tok/s")
    child.send("tell me\rmore")  # a line break pasted mid-reply joins the lines with a space (they ran together)
    expect_on_screen(child, r"you> tell me more▏")  # on the panel, as it is typed
    child.expect(r"\d+ tokens · \d+ tok/s", timeout=120)  # the reply's summary: the panel is gone
    child.expect_exact(PROMPT + "tell me more")  # waiting at the prompt
    child.send(" and more\r")
    child.expect_exact(PROMPT, timeout=120)
    messages = save_and_leave(child, tmp_path / "chat.json", "saved 4 messages")["messages"]
    record = messages[1]["reply"]
    steered = record["changes"][-1]["sliders"] if record["changes"] else record["sliders"]
    assert {band: gain for band, gain in steered.items() if gain} == {"joy": pytest.approx(0.1)}
    assert messages[2]["content"] == "tell me more and more"


def test_a_key_move_the_filters_cannot_hold_is_refused_on_the_panel(tmp_path):
    """Four held sliders and three notches filter seven primaries; holding an eighth cannot be met. The key is not
    applied (it broke the reply's text before) and the panel says why. A held slider under a clamp moves, and the
    panel says it does nothing."""
    child = spawn("--seed", "3", "-n", "400", "--set", "joy=1", "--set", "surprise=1", "--set", "sadness=1",
                  "--set", "disgust=1", "--ablate", "trust", "--ablate", "fear", "--ablate", "anger", "--clamp", "joy=0.5")
    child.sendline(STORY)
    child.expect_exact("tok/s")
    child.send("8")  # anticipation, a held slider
    child.send("\x1b[A")
    expect_on_screen(child, r"not moved: too many bands filtered")
    child.send("1")  # joy, held under the user's clamp: moved, and said to do nothing (/set said so, the panel not)
    child.send("\x1b[A")
    expect_on_screen(child, r"note: the joy slider \(\+1\.10\) does nothing while a clamp holds joy at \+0\.50")
    child.expect_exact(PROMPT, timeout=120)
    child.sendline("/sliders")  # the note was of that reply's key press: it stayed on every panel after, even one
    child.expect_exact(PROMPT)  # where no filter was left to override the slider
    assert "note:" not in ANSI.sub("", child.before) and "not moved:" not in ANSI.sub("", child.before)
    record = save_and_leave(child, tmp_path / "chat.json", "saved")["messages"][1]["reply"]
    (change,) = record["changes"]  # the joy move alone: anticipation's was not made
    assert change["sliders"]["anticipation"] == 0.0 and change["sliders"]["joy"] == pytest.approx(1.1)


def test_the_panel_shows_the_vectors_and_a_gain_under_0_05(random_vector_file):
    """A vector file steered with nothing on the panel ("all sliders at 0"); a held band at +0.04, clamped, read
    +0.0."""
    child = spawn("--vector", f"{random_vector_file}:1.5", "--set", "joy=0.04")
    screen = ANSI.sub("", child.before)
    assert f"vectors: {random_vector_file.name} x1.5" in screen and re.search(r"set\s+\+\.04\s+\+0\.0\s", screen)
    child.sendline("/quit")
    child.expect(pexpect.EOF)


@contextmanager
def chat_in_tmux(session: str, cols: int, rows: int, tokens: int = 400, then: str = "", state: Path | None = None):
    """`eqz chat` in a detached tmux session of ``cols`` x ``rows``, the long story asked for; ``then`` runs after
    the chat exits; ``state``: its XDG_STATE_HOME. The session is killed afterwards."""
    subprocess.run([*TMUX, "kill-session", "-t", session], capture_output=True)
    environment = f"{SIZED_BY_TERMINAL} XDG_STATE_HOME={state}" if state else SIZED_BY_TERMINAL
    subprocess.run([*TMUX, "new-session", "-d", "-s", session, "-x", str(cols), "-y", str(rows),
                    f"{environment} {EQZ} chat --seed 3 -n {tokens}; {then}sleep 30"], check=True)
    try:
        wait_for(session, "you>")  # capture-pane drops trailing spaces
        tmux(session, "send-keys", STORY, "Enter")
        yield session
    finally:
        subprocess.run([*TMUX, "kill-session", "-t", session], capture_output=True)


def cursor_shown(session: str) -> bool:
    return subprocess.run([*TMUX, "display", "-p", "-t", session, "#{cursor_flag}"], capture_output=True, text=True,
                          check=True).stdout.strip() == "1"


def tmux(session: str, command: str, *args: str) -> None:
    subprocess.run([*TMUX, command, "-t", session, *args], check=True)


def test_panel_fits_80x24_and_the_terminal_is_restored_after_ctrl_c(tmp_path):
    modes_file = tmp_path / "stty.txt"
    then = f"stty -a > {modes_file}.part; mv {modes_file}.part {modes_file}; "
    with chat_in_tmux("eqz-tui-test", 80, 24, then=then) as session:
        screen = wait_for(session, r"\b[1-9]\d* tok/s")  # streaming (the start-up panel shows 0 tok/s)
        panel = live_panel(screen)
        assert all(len(line) == 80 for line in panel), panel  # tmux cuts wider lines: a whole frame is 80 wide
        assert any("tok/s" in line for line in panel) and any(line.lstrip("│ ").startswith("set") for line in panel)
        assert re.search(r"joy\s+trust\s+fear\s+surpr\s+sad", "\n".join(panel))
        tmux(session, "send-keys", "C-c")
        screen = wait_for(session, r"\[stopped\][\s\S]* tokens · ")
        assert screen.index("[stopped]") < screen.rindex(" tokens · ")  # how it ended, then the summary
        tmux(session, "send-keys", "/quit", "Enter")
        deadline = time.time() + 30  # stty writes a side file, then renames it: a file here is a whole one
        while time.time() < deadline and not modes_file.exists():
            time.sleep(0.2)
        modes = modes_file.read_text()
        assert " icanon" in modes and " echo" in modes  # cbreak mode was undone


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_a_chat_killed_mid_reply_gives_the_terminal_back_and_keeps_the_conversation(tmp_path, number):
    """SIGTERM (`kill`), SIGHUP (a closed window) or SIGQUIT (Ctrl-\\) mid-reply left the terminal in cbreak mode
    without echo (and its cursor hidden), and the conversation was lost: Ctrl-C restored the one and kept the other,
    these signals did neither."""
    modes_file = tmp_path / "stty.txt"
    then = f"echo $? > {tmp_path}/status; stty -a > {modes_file}.part; mv {modes_file}.part {modes_file}; "
    with chat_in_tmux(f"eqz-tui-kill-{number}", 80, 24, then=then, state=tmp_path) as session:
        wait_for(session, r"\b[1-9]\d* tok/s")  # streaming: the keys are read in cbreak mode
        shell = subprocess.run([*TMUX, "display", "-p", "-t", session, "#{pane_pid}"], capture_output=True,
                               text=True, check=True).stdout.strip()
        (chat,) = subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True).stdout.split()
        os.kill(int(chat), number)
        deadline = time.time() + 30
        while time.time() < deadline and not modes_file.exists():
            time.sleep(0.2)
        modes = modes_file.read_text()
        assert " icanon" in modes and " echo" in modes
        assert cursor_shown(session)  # at the shell's prompt
        assert (tmp_path / "status").read_text().strip() == str(128 + number)  # it still died of the signal
        (kept,) = (tmp_path / "eqz" / "chats").glob("*.json")
        story, reply = json.loads(kept.read_text())["messages"]
        assert story["content"] == STORY and reply["reply"]["finish_reason"] == "interrupted"
        assert 0 < reply["reply"]["n_tokens"] < 400 and reply["content"]


def test_ctrl_z_mid_reply_gives_the_shell_its_terminal_and_fg_goes_on():
    """Ctrl-Z mid-reply left the shell's prompt without a cursor and without echo (cbreak mode, the panel's hidden
    cursor); `fg` must find the reply going on and the chat usable after it."""
    session = "eqz-tui-suspend"
    subprocess.run([*TMUX, "kill-session", "-t", session], capture_output=True)
    subprocess.run([*TMUX, "new-session", "-d", "-s", session, "-x", "80", "-y", "24", "bash --norc"], check=True)
    try:
        tmux(session, "send-keys", f"PS1='$ '; {SIZED_BY_TERMINAL} {EQZ} chat --no-keep --seed 3 -n 200", "Enter")
        wait_for(session, "you>")
        tmux(session, "send-keys", STORY, "Enter")
        wait_for(session, r"\b[1-9]\d* tok/s")
        tmux(session, "send-keys", "C-z")
        wait_for(session, r"Stopped")
        assert cursor_shown(session)  # at the shell's prompt
        tmux(session, "send-keys", "stty -a | grep -o ' -*echo ' | head -1", "Enter")
        echo = re.search(r"^ (-?)echo *$", wait_for(session, r"(?m)^ -?echo *$"), re.M)  # capture-pane drops the space
        assert echo.group(1) == ""  # and echoes what is typed
        tmux(session, "send-keys", "fg", "Enter")
        wait_for(session, r" 200 tokens · ", timeout=180)  # the reply went on to its end
        tmux(session, "send-keys", "/quit", "Enter")
        wait_for(session, r"you> /quit\n\$")  # the chat left, the shell prompt back
    finally:
        subprocess.run([*TMUX, "kill-session", "-t", session], capture_output=True)


def test_a_long_message_says_it_is_being_read():
    """A long paste was read in for seconds with nothing on the screen, which looked like a hang; Ctrl-C while it was
    read lost the message."""
    child = spawn("-n", "4")
    message = ("Tell me what you think of this sentence. " * 100).strip()  # ~1,000 tokens: seconds, even on CI
    child.sendline(message)
    child.expect_exact(f"reading {len(message):,} characters")
    child.sendintr()
    child.expect_exact("your message is back at the prompt")
    child.expect_exact(PROMPT + message[:40])  # waiting to be sent again
    child.send("\x15")  # Ctrl-U clears it
    child.sendline("Hi")  # a short one reads in under a second: no spinner flickers
    child.expect_exact(PROMPT)
    assert "reading" not in child.before
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_a_small_terminal_gets_the_compact_panel_and_most_rows_for_the_reply():
    with chat_in_tmux("eqz-tui-small", 60, 20) as session:
        screen = wait_for(session, r"\A(?:[^\n]*\n){12,}╭[\s\S]*\b[1-9]\d* tok/s")  # 12+ rows of reply above it
        lines = screen.splitlines()
        assert len(lines) <= 20 and all(len(line) <= 60 for line in lines)
        panel = lines[max(i for i, line in enumerate(lines) if line.startswith("╭")):]  # the live one, at the bottom
        assert len(panel) <= 8 and any(line.lstrip("│ ").startswith("set") for line in panel)


def test_resizing_mid_reply_leaves_one_clean_panel():
    with chat_in_tmux("eqz-tui-resize", 80, 24, tokens=600) as session:
        wait_for(session, r"\b[1-9]\d* tok/s")
        tmux(session, "resize-window", "-x", "60", "-y", "20")
        time.sleep(1.5)  # a few frames at the new size, the reply still streaming
        lines = wait_for(session, r"\b[1-9]\d* tok/s").splitlines()
        assert all(len(line) == 60 for line in live_panel("\n".join(lines)))  # redrawn whole at the new width
        assert sum(line.startswith("╭") for line in lines) == 1  # no second, broken panel from before
        assert sum("tok/s" in line for line in lines) == 1
        tmux(session, "resize-window", "-x", "40", "-y", "20")  # too narrow for ten bands: it shows those it can
        time.sleep(1.5)
        panel = live_panel(wait_for(session, r"\b[1-9]\d* tok/s"))
        assert all(len(line) == 40 for line in panel)
        assert panel[1].startswith("│  1-6› ") and panel[1].split()[2:4] == ["joy", "trus"], panel


def live_panel(screen: str) -> list[str]:
    """The panel at the bottom of a captured screen, from its top border to its bottom one, both whole."""
    lines = screen.splitlines()
    top = max(i for i, line in enumerate(lines) if line.startswith("╭"))
    bottom = next(i for i in range(top, len(lines)) if lines[i].startswith("╰"))
    panel = lines[top:bottom + 1]
    assert panel[0].endswith("╮") and panel[-1].endswith("╯"), panel
    assert all(line.startswith("│") and line.endswith("│") for line in panel[1:-1]), panel
    return panel


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def expect_on_screen(child: pexpect.spawn, pattern: str, timeout: float = 60) -> str:
    """Wait until ``pattern`` shows in the output with terminal escape codes removed."""
    seen = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            seen += child.read_nonblocking(4096, timeout=0.2)
        except pexpect.TIMEOUT:
            pass
        clean = ANSI.sub("", seen)
        if re.search(pattern, clean):
            return clean
    raise AssertionError(f"{pattern!r} never appeared in:\n{ANSI.sub('', seen)[-2000:]}")


def wait_for(session: str, pattern: str, timeout: float = 90) -> str:
    deadline = time.time() + timeout
    screen = ""
    while time.time() < deadline:
        screen = subprocess.run([*TMUX, "capture-pane", "-t", session, "-p"], capture_output=True, text=True).stdout
        if re.search(pattern, screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared; screen:\n{screen}")
