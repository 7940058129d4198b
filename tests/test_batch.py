"""``eqz batch`` end to end: determinism across --parallel, resume after SIGINT, bad input, the grid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import EQZ, run_eqz

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

PROMPTS = [
    "Describe your walk to the bus stop this morning.",
    "Write a short note to a neighbour about the new recycling bins.",
    "What do you think of rainy Mondays?",
    "Tell me about the last meal you cooked.",
    "Explain how a kettle works.",
    "Describe the view from your window.",
]


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:4]) + "\n")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_file_whatever_the_parallelism(tmp_path, prompt_file):
    outputs = []
    for parallel in (1, 4):
        out = tmp_path / f"p{parallel}.jsonl"
        result = run_eqz("batch", str(prompt_file), "-o", str(out), "--samples", "2", "--seed", "9",
                         "-n", "24", "--parallel", str(parallel))
        assert result.returncode == 0, result.stderr
        assert "4 prompts x 1 settings x 2 samples = 8 rows" in result.stderr
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    table = rows(tmp_path / "p1.jsonl")
    assert [(r["id"], r["sample"]) for r in table] == [(str(i), s) for i in range(1, 5) for s in (0, 1)]
    record = table[0]
    for key in ("id", "prompt", "system", "preset", "sliders", "sampling", "seed", "sample", "output", "n_tokens",
                "finish_reason", "model", "eqz_version"):
        assert key in record
    assert record["finish_reason"] in ("stop", "length") and record["model"]["fingerprint"].startswith("llama-")
    assert len({r["seed"] for r in table}) == 8  # every (id, sample) has its own seed
    assert all(r["sampling"]["seed"] == r["seed"] for r in table)  # as in generate --json: the seed it used


@pytest.mark.parametrize("sliders", [(), ("--set", "sadness=0.5")], ids=["unsteered", "held"])
def test_resume_after_sigint_gives_exactly_the_uninterrupted_rows(tmp_path, sliders):
    """With a held slider every row also goes through the tap, which runs Python inside llama_decode: a Ctrl-C still
    stops the batch, with no "Exception ignored", and resuming gives the same rows."""
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(PROMPTS * 3) + "\n")
    args = ["batch", str(prompts), "--seed", "3", "-n", "32", "--parallel", "2", *sliders]
    whole = tmp_path / "whole.jsonl"
    assert run_eqz(*args, "-o", str(whole)).returncode == 0
    cut = tmp_path / "cut.jsonl"
    process = subprocess.Popen([EQZ, *args, "-o", str(cut)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not cut.exists() or len(cut.read_text().splitlines()) < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Exception ignored" not in stderr
    partial = rows(cut)
    assert 4 <= len(partial) < 18
    with cut.open("a") as handle:  # a half-written line, as a kill mid-write would leave
        handle.write('{"id": "7", "prompt": "Des')
    resumed = run_eqz(*args, "-o", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(partial)} already there)" in resumed.stderr
    assert cut.read_text() == whole.read_text()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_batch_killed_before_its_first_row_leaves_no_file_and_no_prompts_behind(tmp_path, stop):
    """`kill` or a closed terminal before the first row left an empty -o file, and the
    prompts read from stdin in the temp folder: only Ctrl-C cleaned up."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    out = tmp_path / "new" / "out.jsonl"
    process = subprocess.Popen([EQZ, "batch", "-", "-o", str(out), "-n", "2000", "--temperature", "0"],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(spool)})
    process.stdin.write("Count from one to a thousand, one number per line.\n")
    process.stdin.close()
    assert "= 1 rows" in process.stderr.readline()  # planned: the model is loaded and the file open
    process.send_signal(stop)
    process.wait(timeout=60)
    assert process.returncode == -stop and not out.exists() and not list(spool.iterdir())


def test_existing_output_needs_resume(tmp_path, prompt_file):
    out = tmp_path / "out.jsonl"
    out.write_text('{"x": 1}\n')
    result = run_eqz("batch", str(prompt_file), "-o", str(out))
    assert result.returncode != 0 and "--resume" in result.stderr
    assert out.read_text() == '{"x": 1}\n'


def test_resume_refuses_other_settings(tmp_path, prompt_file):
    out = tmp_path / "out.jsonl"
    assert run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "8").returncode == 0
    before = out.read_text()
    result = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "8", "--temperature", "0.2", "--resume")
    assert result.returncode != 0 and "was made with other sampling (temperature 0.7 there, 0.2 now)" in result.stderr
    assert "{" not in result.stderr
    assert out.read_text() == before
    others = [("--seed", "2", "--seed"), ("--system", "Be terse.", "system prompt"),
              ("--clamp", "joy=0.5", "--clamp joy=0.5 now"), ("--ablate", "anger", "--ablate anger now")]
    for flag, value, named in others:
        other = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "8", flag, value, "--resume")
        assert other.returncode == 2 and other.stderr.count("\n") == 1 and named in other.stderr, other.stderr
        assert out.read_text() == before


def test_resume_checks_each_row_against_the_one_it_would_write(tmp_path, prompt_file):
    """--resume matched rows by id, preset, sliders, sample and seed, and checked the rest on the first row only: a
    line added above the others in a .txt, a preset's changed temperature, --meter, a changed bank or another
    quantization all passed, and the file mixed two runs."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    out = tmp_path / "out.jsonl"
    assert run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "4", "--set", "joy=1", env=env).returncode == 0
    before = out.read_text()
    moved = tmp_path / "moved.txt"
    moved.write_text("A brand new first prompt.\n" + prompt_file.read_text())
    for args, named in [((str(moved),), "another prompt under its id ('Describe your walk"),
                        ((str(prompt_file), "--meter"), "no --meter (--meter now)")]:
        refused = run_eqz("batch", *args, "-o", str(out), "-n", "4", "--set", "joy=1", "--resume", env=env)
        (error,) = [line for line in refused.stderr.splitlines() if line.startswith("eqz: error: ")]  # joy warns too
        assert refused.returncode == 2 and named in error and "row id 1 (sample 0)" in error, refused.stderr
        assert out.read_text() == before
    assert run_eqz("vectors", "hold", "joy", "6", env=env).returncode == 0  # the slider now steers otherwise
    refused = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "4", "--set", "joy=1", "--resume", env=env)
    assert refused.returncode == 2 and "another version of the bank" in refused.stderr and out.read_text() == before
    written = rows(out)
    assert len({row["bank"] for row in written}) == 1 and written[0]["model"]["file_type"] == 3  # Q4_1
    unsteered = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "plain.jsonl"), "-n", "4", env=env)
    assert unsteered.returncode == 0 and rows(tmp_path / "plain.jsonl")[0]["bank"] is None  # it uses no band
    (tmp_path / "config" / "eqz" / "presets").mkdir(parents=True)
    for name, sampling in (("cool", "temperature: 0.5, seed: 7"), ("hot", "temperature: 0.9")):
        (tmp_path / "config" / "eqz" / "presets" / f"{name}.yaml").write_text(
            f"name: {name}\nsliders:\n  trust: 0.5\nsampling: {{{sampling}}}\n")
    grid = tmp_path / "grid.jsonl"
    ran = run_eqz("batch", str(prompt_file), "-o", str(grid), "-n", "4", "--presets", "cool,hot", env=env)
    assert ran.returncode == 0 and "preset cool sets seed 7, which a batch does not use" in ran.stderr, ran.stderr
    assert "preset hot" not in ran.stderr
    (tmp_path / "config" / "eqz" / "presets" / "hot.yaml").write_text(
        "name: hot\nsliders:\n  trust: 0.5\nsampling:\n  temperature: 1.5\n")
    refused = run_eqz("batch", str(prompt_file), "-o", str(grid), "-n", "4", "--presets", "cool,hot", "--resume",
                      env=env)
    assert refused.returncode == 2 and "(sample 0, preset hot) was made with other sampling (temperature 0.9 there, " \
        "1.5 now)" in refused.stderr, refused.stderr
    other = [{**row, "model": {**row["model"], "file_type": 7}} for row in rows(grid)]  # as a Q8_0 file writes them
    grid.write_text("".join(json.dumps(row) + "\n" for row in other))
    refused = run_eqz("batch", str(prompt_file), "-o", str(grid), "-n", "4", "--presets", "cool,hot", "--resume",
                      env=env)
    assert refused.returncode == 2 and "another quantization" in refused.stderr and "type 7 there, 3 now" in refused.stderr


def test_one_batch_writes_a_file_at_a_time_and_a_grid_has_each_setting_once(tmp_path, prompt_file):
    """Two batches resuming one file would each write the rows it lacks; a sweep of one value N times wrote N
    identical rows per prompt, and two sweeps of one band kept only the later."""
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen([EQZ, "batch", str(prompt_file), "-o", str(out), "-n", "64", "-j", "1", "--samples", "8"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.1)
        second = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "64", "-j", "1", "--samples", "8", "--resume")
        assert second.returncode == 2 and "being written by another eqz batch" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    repeated = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "r.jsonl"), "-n", "4", "--sweep", "joy=0.5:0.5:3")
    assert repeated.returncode == 0 and "x 1 settings" in repeated.stderr and len(rows(tmp_path / "r.jsonl")) == 4
    twice = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "t.jsonl"), "-n", "4", "--sweep", "joy=-1:1:3",
                    "--sweep", "JOY=0:1:2")
    assert twice.returncode == 2 and "--sweep joy (sweeps in the library) is given twice" in twice.stderr
    for _ in range(2):  # a gain of -0 is 0: the rows (sliders 0.0) were not found again, and written twice
        zero = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "z.jsonl"), "-n", "4", "--set", "joy=-0",
                       "--resume")
        assert zero.returncode == 0, zero.stderr
    assert "(4 already there)" in zero.stderr and len(rows(tmp_path / "z.jsonl")) == 4


def test_only_a_regular_file_is_locked_or_read_back_and_a_refusal_lets_go_of_it(tmp_path):
    """Two batches writing to /dev/null (or one terminal's /dev/stdout) at once were refused as if one file. A file
    refused for resuming stayed open and locked while its traceback was kept (a notebook keeps the last one), so the
    next try said another batch was writing it."""
    from eqz.batch import Output
    from eqz.errors import EqzError

    first, second = Output("/dev/null", False), Output("/dev/null", False)
    first.close()
    second.close()
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    with pytest.raises(EqzError, match="not a row eqz batch wrote") as refused:
        Output(str(notes), True)
    notes.write_text("")  # the user empties it and tries again, the exception still at hand
    Output(str(notes), True).close()
    assert refused.value is not None


ROW = {"id": "1", "prompt": "hi", "system": None, "preset": None, "output": "Hello", "sliders": {}, "vectors": [],
       "sampling": {}, "seed": 1, "n_tokens": 1, "finish_reason": "stop", "eqz_version": "0.1.0", "sample": 0,
       "model": {"name": "m", "path": "m.gguf", "fingerprint": "llama-1x1-0"}}


def test_resume_refuses_a_file_eqz_did_not_write(tmp_path, prompt_file):
    """Only a last line that is not JSON, after rows, reads as cut off by a kill; anything else is someone's file."""
    without_model = {key: value for key, value in ROW.items() if key != "model"}
    for content in ["my notes, not jsonl", '{"a": 1}\n', "[1,2]\n", json.dumps(without_model) + "\n",
                    json.dumps(ROW) + '\n{"a": 1}']:
        out = tmp_path / "notes.txt"
        out.write_text(content)
        result = run_eqz("batch", str(prompt_file), "-o", str(out), "--resume", "-n", "4")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"eqz: error: {out} line ") and "choose another -o" in result.stderr
        assert out.read_text() == content


def test_resume_keeps_a_last_row_without_its_newline(tmp_path, prompt_file):
    first = tmp_path / "first.txt"
    first.write_text(PROMPTS[0] + "\n")
    out, whole = tmp_path / "out.jsonl", tmp_path / "whole.jsonl"
    assert run_eqz("batch", str(prompt_file), "-o", str(whole), "-n", "4").returncode == 0
    assert run_eqz("batch", str(first), "-o", str(out), "-n", "4").returncode == 0
    out.write_text(out.read_text().rstrip("\n"))
    resumed = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "4", "--resume")
    assert resumed.returncode == 0 and "(1 already there)" in resumed.stderr, resumed.stderr
    assert out.read_text() == whole.read_text()
    out.write_text(whole.read_text()[:40])  # a kill while the first row was written: the run starts again
    assert run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "4", "--resume").returncode == 0
    assert out.read_text() == whole.read_text()
    out.write_text(whole.read_text().split("\n")[0] + "\n\n")  # a blank line (an editor's) is no one else's file
    resumed = run_eqz("batch", str(prompt_file), "-o", str(out), "-n", "4", "--resume")
    assert resumed.returncode == 0 and "(1 already there)" in resumed.stderr, resumed.stderr


@pytest.mark.parametrize("output", ["/dev/stdout", "-"])
def test_output_to_a_pipe(prompt_file, output, tmp_path, monkeypatch):
    """-o - (or /dev/stdout) | ...: a pipe cannot be fsynced, and that is no reason to fail the run; "-" wrote a file
    named "-". A prompt file's suffix is read in any case."""
    monkeypatch.chdir(tmp_path)
    source = prompt_file.rename(tmp_path / "PROMPTS.TXT") if output == "-" else prompt_file  # upper case: refused
    result = run_eqz("batch", str(source), "-o", output, "-n", "4")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["1", "2", "3", "4"]
    assert not (tmp_path / "-").exists()
    if output == "-":  # stdout is a stream, never resumed: `>> rows.jsonl` twice adds to the file
        (tmp_path / "rows.jsonl").write_text(result.stdout)
        with open(tmp_path / "rows.jsonl", "a") as rows_file:  # as the shell's >> opens it
            appended = subprocess.run([EQZ, "batch", str(source), "-o", "-", "-n", "4"], stdout=rows_file,
                                      stderr=subprocess.PIPE, text=True, timeout=300)
        assert appended.returncode == 0, appended.stderr
        assert len(rows(tmp_path / "rows.jsonl")) == 8


def test_a_prompt_past_the_trained_context_is_one_line_naming_it(tmp_path):
    """Each sequence's context stops at the trained length, so a prompt that cannot fit in it is bad input."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello.\n" + "I am glad. " * 2100 + "\n")
    result = run_eqz("batch", str(prompts), "-o", str(tmp_path / "o.jsonl"), "-n", "4")
    assert result.returncode == 2 and "p.txt line 2: the prompt is about" in result.stderr
    assert "reads 8192 at most; fix the line or pass --skip-bad" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()
    skipped = run_eqz("batch", str(prompts), "-o", str(tmp_path / "o.jsonl"), "-n", "4", "--skip-bad")
    assert skipped.returncode == 0 and "skipped p.txt line 2" in skipped.stderr
    assert [row["id"] for row in rows(tmp_path / "o.jsonl")] == ["1"]


def test_huge_max_tokens_stays_within_the_trained_context(tmp_path):
    """-n sizes each sequence's KV cache, but never past the model's trained length (as generate and chat)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Reply with only the word yes.\n")
    result = run_eqz("--debug", "batch", str(prompts), "-o", str(tmp_path / "o.jsonl"), "-n", "200000", "-j", "1",
                     "--temperature", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    trained = int(re.search(r"n_ctx_train\s+=\s+(\d+)", result.stderr).group(1))
    assert int(re.search(r"n_ctx_seq\s+=\s+(\d+)", result.stderr).group(1)) <= trained


BAD_LINES = [
    (b'{"prompt": "fine"}\n{"prompt": "broken\n', "line 2", "invalid JSON"),
    (b'{"prompt": "fine"}\n{"id": 4}\n', "line 2", "missing \\\"prompt\\\""),
    (b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n', "line 2", "not valid UTF-8"),
    (b'{"prompt": "fine"}\n{"prompt": "\\ud800 hi"}\n', "line 2", "lone surrogate"),
    (b'{"prompt": "fine"}\n{"prompt": "yo", "id": "\\ud800"}\n', "line 2", "lone surrogate"),
    (b'{"prompt": "fine"}\n{"prompt": "yo", "id": null}\n', "line 2", "must be a string or a whole number"),
    (b'{"prompt": "fine"}\n{"prompt": "yo", "id": {"a": 1}}\n', "line 2", "must be a string or a whole number"),
    (b'{"prompt": "fine"}\n{"prompt": "yo", "ID": 3}\n', "line 2", '"ID" is not a key eqz reads (did you mean "id"?)'),
    (b'{"prompt": "fine"}\n{"prompt": "yo", "note": "\\ud800"}\n', "line 2", "holds text with no UTF-8 form"),
]


@pytest.mark.parametrize("content,where,what", BAD_LINES,
                         ids=["json", "prompt", "utf8", "surrogate", "surrogate-id", "null-id", "object-id", "ID",
                              "surrogate-meta"])
def test_bad_prompt_line_stops_before_any_generation(tmp_path, content, where, what):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content)
    out = tmp_path / "out.jsonl"
    result = run_eqz("batch", str(prompts), "-o", str(out), "-n", "8")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and what.replace("\\", "") in lines[0], result.stderr
    assert not out.exists() or out.read_text() == ""
    skipped = run_eqz("batch", str(prompts), "-o", str(out), "-n", "8", "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped" in skipped.stderr and "pass --skip-bad" not in skipped.stderr and len(rows(out)) == 1


def test_prompts_from_stdin_and_jsonl_ids_and_system(tmp_path):
    def run(system_of_b: dict) -> list[dict]:
        out = tmp_path / f"out{len(system_of_b)}.jsonl"
        lines = [json.dumps({"id": "a", "prompt": "Say hi.", "label": "greeting", "arm": {"n": 1}}),
                 json.dumps({"id": "b", "prompt": "Say bye.", **system_of_b})]
        result = subprocess.run([EQZ, "batch", "-", "-o", str(out), "-n", "8"], input="\n".join(lines) + "\n",
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return rows(out)

    braced = subprocess.run([EQZ, "batch", "-", "-o", "-", "-n", "4"], input="{Write} a haiku.\nWhat is JSON?\n",
                            capture_output=True, text=True, timeout=300)  # text, though its first line has a brace
    assert braced.returncode == 0 and json.loads(braced.stdout.splitlines()[0])["prompt"] == "{Write} a haiku."
    typo = subprocess.run([EQZ, "batch", "-", "-o", "-", "-n", "4"], input='{"prompt": "Say hi.",}\n',
                          capture_output=True, text=True, timeout=300)  # .jsonl with a typo: its error, not text
    assert typo.returncode == 2 and "stdin line 1: invalid JSON" in typo.stderr and not typo.stdout
    table = run({"system": "Answer only in French."})
    assert [r["id"] for r in table] == ["a", "b"] and table[1]["system"] == "Answer only in French."
    # a line's other fields come with its rows (they were dropped: the id was the only link to a study's labels)
    assert table[0]["meta"] == {"label": "greeting", "arm": {"n": 1}} and "meta" not in table[1]
    plain = run({})  # the row's own system reaches the model: b's reply changes, a's does not (seeds go by id)
    assert plain[0]["output"] == table[0]["output"] and plain[1]["output"] != table[1]["output"]
    # --resume with a row's labels changed would mix two studies' labels in one file (meta was not compared)
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text(json.dumps({"id": "a", "prompt": "Say hi.", "label": "farewell", "arm": {"n": 1}}) + "\n")
    before = (tmp_path / "out0.jsonl").read_text()
    refused = run_eqz("batch", str(relabelled), "-o", str(tmp_path / "out0.jsonl"), "-n", "8", "--resume")
    assert refused.returncode == 2 and "row id a (sample 0) was made with other fields on its line" in refused.stderr
    assert "'{\"label\": \"greeting\", \"arm\": {\"n\": 1}}' there" in refused.stderr, refused.stderr
    assert (tmp_path / "out0.jsonl").read_text() == before


def test_a_long_system_prompt_is_counted_in_each_sequences_room(tmp_path):
    """Each sequence's room was sized by the prompts alone: a --system of ~400 tokens did not fit beside them."""
    out = tmp_path / "out.jsonl"
    long_system = "Be brief and kind. " * 80
    result = subprocess.run([EQZ, "batch", "-", "-o", str(out), "-n", "8", "--system", long_system],
                            input="Say hi.\nName a colour.\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [(row["system"], row["finish_reason"]) for row in rows(out)] == [(long_system, "length")] * 2


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_bytes(b"\xef\xbb\xbfSay hi.\n")
    assert run_eqz("batch", str(text), "-o", str(tmp_path / "t.jsonl"), "-n", "4").returncode == 0
    assert rows(tmp_path / "t.jsonl")[0]["prompt"] == "Say hi."
    out = tmp_path / "j.jsonl"
    line = json.dumps({"id": "a", "prompt": "Say hi."})
    result = run_eqz("batch", "-", "-o", str(out), "-n", "4", input="\ufeff" + line)
    assert result.returncode == 0, result.stderr
    assert [row["id"] for row in rows(out)] == ["a"]


def test_sweep_with_absurdly_many_steps_is_one_line(tmp_path, prompt_file):
    result = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "o.jsonl"), "--sweep", "joy=-1:1:1000000000000")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "at most 1000 gains" in result.stderr, \
        result.stderr
    sweeps = [arg for band in ("joy", "trust") for arg in ("--sweep", f"{band}=-1:1:1000")]  # a million settings
    result = run_eqz("batch", str(prompt_file), "-o", str(tmp_path / "o.jsonl"), *sweeps)
    assert result.returncode == 2 and "the grid has 1000000 settings" in result.stderr, result.stderr


def test_duplicate_ids_are_refused(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    result = run_eqz("batch", str(prompts), "-o", str(tmp_path / "o.jsonl"))
    assert result.returncode != 0 and "p.jsonl line 2: duplicate id '1'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()  # a run that stopped before its first row leaves no empty file
    skipped = run_eqz("batch", str(prompts), "-o", str(tmp_path / "o.jsonl"), "-n", "4", "--skip-bad")
    assert skipped.returncode == 0 and "skipped p.jsonl line 2" in skipped.stderr, skipped.stderr
    assert [row["prompt"] for row in rows(tmp_path / "o.jsonl")] == ["a"]


def test_an_output_that_is_a_folder_is_one_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    batch = run_eqz("batch", str(prompts), "-o", str(tmp_path))
    assert batch.returncode == 2 and batch.stderr == f"eqz: error: {tmp_path} is a folder; -o takes a file name, " \
                                                     f"such as {tmp_path / 'out.jsonl'}\n"
    export = run_eqz("vectors", "export", "--set", "joy=0.5", "-o", str(tmp_path))
    assert export.returncode == 2 and export.stderr.startswith(f"eqz: error: {tmp_path} is a folder")
    for command in (("batch", str(prompts)), ("vectors", "export", "--set", "joy=0.5")):  # one still to make
        named = run_eqz(*command, "-o", f"{tmp_path / 'new'}/")  # wrote a file named "new"
        assert named.returncode == 2 and "new is a folder" in named.stderr and not (tmp_path / "new").exists()
