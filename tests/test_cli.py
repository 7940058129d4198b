"""The real ``eqz`` command: help, version, generate, models, and one clear line for every kind of bad input."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import typer
import yaml

from eqz import cli
from eqz.vector_files import write_control_vector

from .conftest import BEFORE_TRAINING, EQZ, run_eqz

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("eqz: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_version_and_help_with_examples():
    version = run_eqz("--version")
    assert version.returncode == 0 and version.stdout.startswith("eqz 0.")
    top = run_eqz("--help", env={"COLUMNS": "80"})
    assert top.returncode == 0 and "eqz chat" in top.stdout
    lines = [line.strip() for line in top.stdout.splitlines()]  # "Examples:" ran into the line above; a line wrapped
    assert "Examples:" in lines and "eqz models                             the model eqz loads: shape, template" in lines


def test_every_command_says_what_it_does():
    """Each command's --help says the first sentence of its docstring."""
    from eqz.cli import app

    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        first = " ".join(command.callback.__doc__.split(".")[0].split())
        assert first, name
        page = run_eqz(name, "--help", env={"COLUMNS": "400"})
        assert page.returncode == 0 and first in " ".join(page.stdout.split()), (name, first)


def test_models_shows_the_default_model(model_path):
    result = run_eqz("models", "--json")
    info = json.loads(result.stdout)
    assert info["path"] == str(model_path)
    assert (info["architecture"], info["n_layer"], info["n_embd"]) == ("llama", 30, 576)
    assert info["chat_template"] is True and info["n_ctx_train"] == 8192


def test_models_shows_the_backend_and_the_memory_at_a_context(model_path):
    info = json.loads(run_eqz("models", "--json", "--ctx", "8192").stdout)
    assert info["llama_cpp"]["backends"][-1] == "CPU" and info["llama_cpp"]["gpu_offload"] is False
    memory = info["memory"]
    assert memory["weights"] == model_path.stat().st_size and memory["context"] == 8192
    # SmolLM2-135M: 30 layers x 8192 tokens x 3 KV heads x (64 + 64) x 2 bytes (f16)
    assert memory["kv_cache"] == 30 * 8192 * 3 * 128 * 2
    table = run_eqz("models", "--ctx", "1024").stdout
    assert "KV cache at 1024 tokens" in table and "llama.cpp built for" in table


def test_gpu_layers_on_a_cpu_build_warn_once_and_a_bad_count_is_one_line():
    """CI's llama.cpp is built for the CPU: asking for GPU layers still generates, with a one-line hint."""
    result = run_eqz("generate", "Hi", "-n", "4", "--seed", "1", "-ngl", "all")
    assert result.returncode == 0 and result.stderr.count("built for the CPU only") == 1
    assert "make setup GPU=cuda" in result.stderr
    from_env = run_eqz("generate", "Hi", "-n", "4", "--seed", "1", env={"EQZ_GPU_LAYERS": "8"})
    assert from_env.returncode == 0 and "built for the CPU only" in from_env.stderr
    assert "built for the CPU only" not in run_eqz("generate", "Hi", "-n", "4", "--seed", "1", "-ngl", "0").stderr
    assert_one_line_error(run_eqz("generate", "Hi", "--gpu-layers", "many"), "--gpu-layers takes a number", "'many'")


# The one record shape of a reply (README "Records"), shared by generate --json and batch rows.
RECORD_KEYS = {"prompt", "system", "preset", "output", "sliders", "vectors", "sampling", "seed", "n_tokens",
               "finish_reason", "model", "eqz_version"}


def test_generate_json_and_batch_rows_share_one_record_schema(tmp_path):
    record = json.loads(run_eqz("generate", "Hi", "-n", "8", "--set", "joy=0.5", "--json", "--seed", "1").stdout)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    run_eqz("batch", str(prompts), "-o", str(tmp_path / "rows.jsonl"), "--set", "joy=0.5", "-n", "8")
    row = json.loads((tmp_path / "rows.jsonl").read_text())
    assert RECORD_KEYS <= set(record) and RECORD_KEYS <= set(row)
    assert set(row) - RECORD_KEYS == {"id", "sample", "bank"}  # bank: what --resume checks a row's sliders by
    assert record["model"] == row["model"] and set(row["model"]) == {"name", "path", "fingerprint", "file_type"}
    assert set(record) - RECORD_KEYS == {"changes", "seconds", "tokens_per_second", "dropped_messages", "meter"}
    assert record["sliders"] == row["sliders"] and record["vectors"] == row["vectors"] == []


def test_generate_streams_and_json_record_is_complete():
    plain = run_eqz("generate", "Say hello.", "--seed", "3", "-n", "16")
    assert plain.returncode == 0 and plain.stdout.strip()
    record = json.loads(run_eqz("generate", "Say hello.", "--seed", "3", "-n", "16", "--json").stdout)
    assert record["output"].strip() == plain.stdout.strip()
    assert RECORD_KEYS <= set(record) and {"changes", "seconds", "tokens_per_second"} <= set(record)
    assert record["eqz_version"] and set(record["sliders"]) >= {"joy", "valence"}
    assert record["sampling"]["seed"] == 3 and record["sampling"]["max_tokens"] == 16
    assert 0 < record["n_tokens"] <= 16 and record["tokens_per_second"] > 0


def test_generate_with_vector_file_steers_and_scale_zero_does_not(random_vector_file):
    args = ("generate", "Describe a rainy day.", "--seed", "2", "-n", "24", "--json")
    plain = json.loads(run_eqz(*args).stdout)["output"]
    steered = json.loads(run_eqz(*args, "--vector", f"{random_vector_file}:1.0").stdout)
    zero = json.loads(run_eqz(*args, "--vector", f"{random_vector_file}:0").stdout)["output"]
    assert steered["output"] != plain
    assert steered["vectors"] == [{"path": str(random_vector_file), "scale": 1.0}]
    assert zero == plain
    halves = json.loads(run_eqz(*args, *["--vector", f"{random_vector_file}:0.5"] * 2).stdout)  # summed, as llama.cpp
    assert (halves["output"], halves["vectors"]) == (steered["output"], steered["vectors"])  # the second replaced


def test_missing_model_path():
    assert_one_line_error(run_eqz("generate", "hi", "--model", "/no/such/model.gguf"), "not found", "/no/such/model.gguf")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text\n")
    assert_one_line_error(run_eqz("generate", "hi", "-m", str(path)), "not a GGUF file")


def test_truncated_gguf(tmp_path, model_path):
    path = tmp_path / "half.gguf"
    path.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    assert_one_line_error(run_eqz("generate", "hi", "-m", str(path)), "truncated or corrupt")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "madeup.gguf"
    writer = gguf.GGUFWriter(str(path), "madeup")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(run_eqz("generate", "hi", "-m", str(path)), "architecture 'madeup' is not supported")


def test_control_vector_of_another_width(tmp_path):
    path = write_control_vector(tmp_path / "wide.gguf", np.ones((18, 640), np.float32) * (np.arange(18) > 0)[:, None], "gemma3")
    assert_one_line_error(run_eqz("generate", "hi", "--vector", str(path)), "n_embd 640", "576", "another model")


def test_control_vector_with_more_layers_than_the_model(tmp_path):
    matrix = np.zeros((40, 576), np.float32)
    matrix[35] = 1.0
    path = write_control_vector(tmp_path / "deep.gguf", matrix, "llama")
    assert_one_line_error(run_eqz("generate", "hi", "--vector", str(path)), "layer 35", "0-29")


@pytest.mark.parametrize("scale", ["abc", "nan", "inf", "-inf"])
def test_bad_vector_scale(random_vector_file, scale):
    assert_one_line_error(run_eqz("generate", "hi", "--vector", f"{random_vector_file}:{scale}"), "invalid scale")


def test_a_vector_scale_past_float32_is_named_as_such(random_vector_file):
    """A finite scale whose product overflows float32 (inf x 0 put NaN on layer 0, blamed on the file)."""
    ran = run_eqz("generate", "hi", "--vector", f"{random_vector_file}:1e39")
    assert_one_line_error(ran, "not finite (a scale too large for float32")
    assert "RuntimeWarning" not in ran.stderr


@pytest.mark.parametrize("flag,value,fragment", [
    ("--temperature", "warm", "'--temperature' / '-t'"), ("--temperature", "nan", "'--temperature' / '-t': must be a"),
    ("--top-p", "2", "'--top-p': must be a finite number in [0.0, 1.0], got 2.0"),
    ("-n", "0", "'--max-tokens' / '-n': must be >= 1, got 0"),  # was "max_tokens must be", a name no flag has
    ("--repeat-penalty", "0", "'--repeat-penalty': must be a finite number in (0.0, 5.0]"),  # was run: logits / 0
])
def test_bad_sampling_values_name_the_flag(flag, value, fragment):
    assert_one_line_error(run_eqz("generate", "hi", flag, value), fragment)


def test_a_slider_on_a_filtered_band_warns_that_it_does_nothing():
    ran = run_eqz("generate", "Hi", "--set", "joy=1", "--clamp", "joy=2", "-n", "2")
    assert ran.returncode == 0 and "the joy slider (+1.00) does nothing while a clamp holds joy at +2.00" in ran.stderr


def test_eval_prompts_drop_a_byte_order_mark(tmp_path):
    """A file saved with a byte-order mark sent it to the model in the first prompt (batch dropped it)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffDescribe your morning.\n".encode())
    ran = run_eqz("eval", "--bands", "joy", "--gains", "0", "-n", "8", "--prompts", str(prompts), "-o", str(tmp_path / "e"))
    assert ran.returncode == 0, ran.stderr
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["run"]["prompts"] == ["Describe your morning."]


def test_a_bad_training_seed_is_refused_before_training(tmp_path):
    assert_one_line_error(run_eqz("train", "--seed", "-3", "-o", str(tmp_path / "bank"), timeout=BEFORE_TRAINING),
                          "seed must be in [0, ")
    assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("args,fragment", [
    (("train", "--bands", ""), "--bands '' has an empty name"),  # was: train all ten bands
    (("eval", "--bands", "joy,,fear"), "has an empty name"),  # was: unknown band ''
    (("batch", "prompts.txt", "--presets", "calm,"), "--presets 'calm,' has an empty name"),
    (("vectors", "export", "-o", "-", "--set", "joy=1"), "binary .gguf file"),  # was: a file named '-'
    (("eval", "--bands", "nosuch"), "unknown band 'nosuch'"),  # was: a blank line from the progress bars first
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else "")
def test_odd_lists_and_outputs_are_refused_in_one_line(tmp_path, args, fragment):
    ran = run_eqz(*args, "-o", str(tmp_path / "out")) if args[0] != "vectors" else run_eqz(*args)
    assert_one_line_error(ran, fragment)
    assert ran.stderr.startswith("eqz: error: ") and not (tmp_path / "out").exists()


def test_prompt_longer_than_the_context_and_a_context_longer_than_the_model_knows():
    assert_one_line_error(run_eqz("generate", "word " * 600, "--ctx", "256"), "context holds 256", "--ctx")
    capped = run_eqz("generate", "Hi", "-n", "2", "--ctx", "100000")  # was cut to 8192 without a word
    assert capped.returncode == 0 and "100000 tokens is more than" in capped.stderr and "it holds 8192" in capped.stderr


def test_model_given_as_a_control_vector(random_vector_file):
    assert_one_line_error(run_eqz("generate", "hi", "-m", str(random_vector_file)), "control vector, not a model")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("x")
    result = run_eqz("--debug", "generate", "hi", "-m", str(path))
    assert result.returncode != 0 and "Traceback" in result.stderr


# -- a new user's first hour (issue 16)


@pytest.mark.parametrize("args", [(), ("presets",), ("vectors",)])
def test_a_bare_command_prints_its_help_and_succeeds(args):
    result = run_eqz(*args)
    assert result.returncode == 0 and "Usage" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("args", [(), ("presets",), ("vectors",)])
def test_the_command_list_gives_each_command_one_line(args):
    """Each entry is its help's first sentence, whole: typer kept a docstring's line breaks there, so `eqz --help`
    broke `models` after "llama.cpp" and listed `vectors hold` in four lines."""
    page = run_eqz(*args, "--help", env={"COLUMNS": "240"}).stdout
    panel = page[page.index("Commands"):].splitlines()[1:-1]
    continued = [row for row in panel if row.startswith("│   ")]  # no name in the first column
    assert panel and not continued, page


def test_debug_is_accepted_after_the_command_and_analyze_says_what_is_missing():
    assert run_eqz("presets", "list", "--debug").returncode == 0
    assert_one_line_error(run_eqz("analyze"), "nothing to analyze", "--file")


def test_models_takes_model_like_every_other_command(model_path):
    shown = json.loads(run_eqz("models", "--model", str(model_path), "--json").stdout)
    assert shown["path"] == str(model_path)


def test_preset_and_band_names_are_case_insensitive_and_records_carry_the_version():
    record = json.loads(run_eqz("generate", "Hi", "--preset", "Serene", "--set", "Joy=0.2", "-n", "4", "--json").stdout)
    assert record["preset"] == "serene" and record["sliders"]["joy"] == 0.2
    assert record["eqz_version"].startswith("0.")


def test_a_one_value_sweep_between_two_gains_is_refused(tmp_path):
    (tmp_path / "p.txt").write_text("Hi\n")
    assert_one_line_error(run_eqz("batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o.jsonl"), "--sweep",
                                  "joy=-1:1:1"), "at least 2", "--set")


def test_batch_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path):
    (tmp_path / "p.txt").write_text("Hi\n")
    (tmp_path / "file").write_text("")
    result = run_eqz("batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "file" / "out.jsonl"))
    assert_one_line_error(result, "cannot write", "choose another -o")
    assert "prompts x" not in result.stderr  # no plan printed: nothing was started


def test_preset_bars_keep_their_sign_without_colour():
    shown = run_eqz("presets", "show", "melancholy", env={"NO_COLOR": "1"}).stdout
    joy = next(line for line in shown.splitlines() if line.strip().startswith("joy"))
    sadness = next(line for line in shown.splitlines() if line.strip().startswith("sadness"))
    assert joy.rstrip().endswith("█│") and "│█" in sadness  # below zero left of the axis, above it right


def test_importing_onto_a_band_refuses_without_replace_and_reset_restores_the_shipped_bank(tmp_path, random_vector_file):
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    refused = run_eqz("vectors", "import", str(random_vector_file), "--band", "joy", env=env)
    assert_one_line_error(refused, "already has a band 'joy'", "--replace")
    assert_one_line_error(run_eqz("vectors", "hold", "nosuch", "5", env=env), "no band 'nosuch'")
    for level in ("7", "0"):  # 7 was told [-6, 6], and 0 then "above 0"
        assert_one_line_error(run_eqz("vectors", "hold", "fear", level, env=env), "must be a number above 0 and at most 6")
    assert not list((tmp_path / "data").glob("eqz/vectors/*"))  # no copy of the bank left to shadow the shipped one
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "extra", env=env).returncode == 0
    assert "extra" in json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)["bands"]
    failed = run_eqz("vectors", "remove", "extra", "nosuch", env=env)  # a bad name removes nothing
    assert_one_line_error(failed, "no band 'nosuch'")
    assert run_eqz("generate", "hi", "--set", "extra=0.5", "-n", "2", env=env).returncode == 0  # its file still there
    assert run_eqz("vectors", "remove", "extra", "extra", env=env).returncode == 0
    assert "extra" not in json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)["bands"]
    assert not list((tmp_path / "data").glob("eqz/vectors/*/extra.gguf"))
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "joy", "--replace", env=env).returncode == 0
    assert json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)["bands"]["joy"]["source"] == str(random_vector_file)
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "extra", env=env).returncode == 0
    removed = run_eqz("vectors", "remove", "Joy", env=env)
    assert removed.returncode == 0 and "presets that move joy will not load" in removed.stdout
    assert "`eqz vectors reset` brings the shipped bank back, and drops extra, which you added" in removed.stdout
    without = run_eqz("generate", "hi", "-p", "melancholy", "-n", "2", env=env)  # melancholy moves joy
    assert_one_line_error(without, "this bank has no band 'joy'", "`eqz vectors reset` restores a shipped bank")
    reset = run_eqz("vectors", "reset", env=env)
    assert reset.returncode == 0 and "vectors/smollm2-135m-instruct is in use again" in reset.stdout
    shown = json.loads(run_eqz("vectors", "show", "--json", env=env).stdout)
    assert shown["bands"]["joy"]["source"] in ("stimulus", "voice")  # the trained joy is back


def test_a_training_that_could_not_be_saved_is_refused_before_it_starts(tmp_path, random_vector_file):
    """Minutes of training were lost at the end to an -o that named a file, and another model's bank or the bands
    of the user's own (imported ones, the ones --bands leaves out) were overwritten without a word."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    (tmp_path / "afile").write_text("")
    assert_one_line_error(run_eqz("train", "-o", str(tmp_path / "afile"), env=env, timeout=BEFORE_TRAINING),
                          "is a file")
    shutil.copytree(ROOT / "docs" / "banks" / "gemma-3-270m", tmp_path / "gemma")
    assert_one_line_error(run_eqz("train", "-o", str(tmp_path / "gemma"), env=env, timeout=BEFORE_TRAINING),
                          "holds the bank of Gemma 3")
    assert run_eqz("vectors", "import", str(random_vector_file), "--band", "extra", env=env).returncode == 0
    for args in ((), ("--bands", "joy")):
        assert_one_line_error(run_eqz("train", *args, env=env, timeout=BEFORE_TRAINING), "holds this model's bank with",
                              "extra", "--out", "`eqz vectors reset` first, which deletes them")
    own = next((tmp_path / "data" / "eqz" / "vectors").iterdir())
    shutil.copytree(own, tmp_path / "mine")  # a folder given with -o: reset would not empty it, so it is not offered
    refused = run_eqz("train", "--bands", "joy", "-o", str(tmp_path / "mine"), env=env, timeout=BEFORE_TRAINING)
    assert_one_line_error(refused, "which the new bank would drop; give --out a directory of its own")
    assert "vectors reset" not in refused.stderr


def test_eval_records_into_the_users_copy_of_the_bank_and_some_bands_where_measured_alike(tmp_path,
                                                                                         random_vector_file):
    """--record wrote into eqz's own shipped files; recording some bands wiped the others' figures; an -o naming a file
    failed after the whole eval, its tables unwritten. Then recording a band again (one added, say) meant measuring
    every band again: now a band measured as the others were replaces only its own figures. A record too light to
    revise verdicts put over one that did undid them, saying they stood."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    (tmp_path / "afile").write_text("")
    assert_one_line_error(run_eqz("eval", "-o", str(tmp_path / "afile"), env=env), "is a file; --output takes")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Hi"}\n{"text": "no prompt"}\n')
    bad = run_eqz("eval", "--prompts", str(tmp_path / "bad.jsonl"), env=env)
    assert_one_line_error(bad, "bad.jsonl line 2: missing \"prompt\"", "fix the line")
    assert "--skip-bad" not in bad.stderr  # eval has no such flag
    assert_one_line_error(run_eqz("eval", "--bands", "joy", "--record", env=env), "trust, fear",
                          "would lose their recorded figures", "measured with 16 prompts x 2 samples x 64 tokens at "
                          "-1, 0, +1, +2, scored by the nrc lexicon, this run with 16 prompts x 1 sample")
    shipped = (ROOT / "vectors" / "smollm2-135m-instruct" / "bank.yaml").read_bytes()
    (tmp_path / "one.txt").write_text("Describe your morning.\n")
    alike = ("--prompts", str(tmp_path / "one.txt"), "-n", "8", "--gains", "1", "--record")
    assert_one_line_error(run_eqz("eval", *alike, env=env), "(16 prompts x 2 samples x 64 tokens at -1, 0, +1, +2, "
                          "scored by the nrc lexicon) revise its bands' verdicts", "(1 prompt x 1 sample x 8 tokens",
                          "would undo those verdicts")
    for step in (("import", str(random_vector_file), "--band", "scratch"), ("remove", "scratch")):  # own copy...
        assert run_eqz("vectors", *step, env=env).returncode == 0
    (own,) = (tmp_path / "data").glob("eqz/vectors/*/bank.yaml")
    data = yaml.safe_load(own.read_text())
    for key in ("dose_response", "dose_response_setup"):  # ...with no record yet, as a bank just trained
        del data["quality"][key]
    own.write_text(yaml.safe_dump(data, sort_keys=False))
    ran = run_eqz("eval", *alike, "-o", str(tmp_path / "eval"), env=env)
    assert ran.returncode == 0, ran.stderr
    assert "recorded the figures of joy, trust" in ran.stdout and "so its verdicts and warnings stand" in ran.stdout
    first = {path.name: path.read_bytes() for path in (tmp_path / "eval").iterdir()}
    cut = run_eqz("eval", "--bands", "joy", *alike[:-1], "-o", str(tmp_path / "eval"), "--replace", env=env,
                  file_size_limit=1000)  # a full disk: the earlier run's replies were deleted first, its json cut
    said = cut.stderr.strip().splitlines()[-1]  # after the progress bars
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    assert said.startswith("eqz: error: cannot write ") and "eval.json: File too large" in said
    assert {path.name: path.read_bytes() for path in (tmp_path / "eval").iterdir()} == first
    assert (ROOT / "vectors" / "smollm2-135m-instruct" / "bank.yaml").read_bytes() == shipped
    data = yaml.safe_load(own.read_text())
    assert data["quality"]["dose_response_setup"]["prompts"] == 1 and len(data["quality"]["dose_response"]) == 10
    data["quality"]["dose_response"]["joy"] = data["quality"]["dose_response"]["trust"] = {"marked": True}
    own.write_text(yaml.safe_dump(data, sort_keys=False))
    # the same prompt from a .jsonl, as batch reads it: its JSON went to the model as the prompt
    (tmp_path / "one.jsonl").write_text('{"prompt": "Describe your morning.", "id": "m", "label": "routine"}\n')
    by_jsonl = [alike[0], str(tmp_path / "one.jsonl"), *alike[2:]]
    assert run_eqz("eval", "--bands", "joy", *by_jsonl, "-o", str(tmp_path / "joy"), env=env).returncode == 0
    recorded = yaml.safe_load(own.read_text())["quality"]["dose_response"]
    assert "1.0" in recorded["joy"] and recorded["trust"] == {"marked": True} and len(recorded) == 10
    assert_one_line_error(run_eqz("eval", "--bands", "joy", *alike, "--samples", "2", env=env),
                          "measured with 1 prompt x 1 sample x 8 tokens at +1, scored by the nrc lexicon, this run with 1 "
                          "prompt x 2 samples")


def test_eval_plot_without_matplotlib_is_refused_before_any_reply(tmp_path):
    """--plot without matplotlib failed after the whole eval (minutes to hours), its record made, no "wrote" said."""
    without = "import sys; sys.modules['matplotlib'] = None; from eqz.cli import main; sys.argv[0] = 'eqz'; main()"
    ran = subprocess.run([sys.executable, "-c", without, "eval", "--plot", "--record", "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    assert_one_line_error(ran, "--plot needs matplotlib: pip install 'eqz[plot]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "eqz").exists()


def _written_defaults() -> list[tuple[tuple[str, ...], list[str]]]:
    """(command path, the help of each option that writes its own "[default: ...]") for every command with one."""
    found = [(path, [param.help for param in command.params if "[default:" in (getattr(param, "help", None) or "")])
             for path, command in cli._command_tree(typer.main.get_command(cli.app))]
    return [(path, written) for path, written in found if written]


WRITTEN_DEFAULTS = _written_defaults()


@pytest.mark.parametrize("path,written", WRITTEN_DEFAULTS, ids=[" ".join(path) for path, _ in WRITTEN_DEFAULTS])
def test_every_default_written_in_a_help_is_shown(path, written):
    """rich reads an unescaped "[default: ...]" as markup and prints nothing of it."""
    wide = run_eqz(*path, "--help", env={"COLUMNS": "400"}).stdout  # one line per option: no wrapping
    for help_text in written:
        assert "[default:" + help_text.split("[default:")[1] in wide, help_text


@pytest.mark.parametrize("command", ["generate", "chat", "batch", "train", "eval"])
def test_help_pages_show_value_names_and_every_default(command):
    page = run_eqz(command, "--help", env={"COLUMNS": "120"}).stdout
    options = [line for line in page.splitlines() if "--" in line]  # -h/--help too (eqz.cli._bare_help_flag)
    assert not [line for line in options if "<list[" in line or "<bool>" in line or "<int" in line], page
    if command in ("generate", "chat"):
        assert "[default: 256]" in page and "[default: $EQZ_THREADS, else the idle cores]" in page


def test_a_warning_on_a_narrow_terminal_breaks_between_words():
    """A warning is one line (scripts, logs); a 60-column terminal broke it mid-word ("redr/aws")."""
    import pexpect

    args = ["generate", "Hi", "--set", "joy=1", "-n", "2", "--threads", "1"]
    terminal = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}  # its own size
    child = pexpect.spawn(EQZ, args, encoding="utf-8", timeout=60, dimensions=(24, 60), env=terminal)
    child.expect(pexpect.EOF)
    lines = child.before.replace("\r\n", "\n").split("\n")
    start = next(index for index, line in enumerate(lines) if line.startswith("eqz: warning: joy may not move"))
    wrapped = [lines[start]] + list(itertools.takewhile(lambda line: line.startswith(" " * 14), lines[start + 1:]))
    assert len(wrapped) > 1 and all(len(line) <= 60 for line in wrapped), wrapped
    piped = run_eqz(*args).stderr  # off a terminal: one line, as before
    (whole,) = [line for line in piped.splitlines() if line.startswith("eqz: warning: joy may not move")]
    assert " ".join(line.strip() for line in wrapped) == whole


def test_a_terminal_width_that_int_refuses_breaks_nothing(monkeypatch):
    """COLUMNS="²" is a digit to str.isdigit, and int() raised inside the error printer itself."""
    monkeypatch.setenv("COLUMNS", "²")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    said = cli._for_stderr("eqz: error: ", "word " * 40 + "\nsecond line")
    assert said.endswith("second line\n") and max(map(len, said.splitlines())) <= 80, said


def test_ctrl_c_ends_a_held_reply_at_once_and_keeps_the_text():
    """A held band runs Python inside llama_decode (the tap); Ctrl-C there used to be printed as "Exception ignored"
    and dropped, so the reply ran to the end and exited 0 (half the time, hence three tries)."""
    import pexpect

    for _ in range(3):
        child = pexpect.spawn(EQZ, ["generate", "Write a long essay about the history of Rome.", "-n", "400",
                                    "--set", "sadness=0.5"], encoding="utf-8", timeout=60)
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130, child.before
        assert "Exception ignored" not in child.before and len(child.before.split()) < 150, child.before


def test_ctrl_c_in_generate_json_still_prints_the_record():
    process = subprocess.Popen([EQZ, "generate", "Write a long essay about the history of Rome.", "-n", "2000",
                                "--seed", "1", "--set", "joy=0.5", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert "warning: joy" in process.stderr.readline()  # printed once the sliders are set, just before the reply
        time.sleep(1.0)  # into a reply of hundreds of tokens (434 with this seed, ~9 s, on the 2-core VM)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    record = json.loads(stdout)
    assert record["finish_reason"] == "interrupted" and 0 < record["n_tokens"] < 2000
    assert record["output"] and "Exception ignored" not in stderr


def test_a_bank_folder_that_does_not_exist_is_one_line(tmp_path):
    """$EQZ_VECTORS with a typo fell back to another bank without a word."""
    assert_one_line_error(run_eqz("vectors", "list", env={"EQZ_VECTORS": str(tmp_path / "nope")}), "EQZ_VECTORS=",
                          "is not a folder")


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_a_training_killed_leaves_no_copy_of_the_weights_behind(tmp_path, number):
    """Training works on a temporary f16 copy of the weights (270 MB for the default model): SIGTERM or SIGHUP left
    it in the temp folder; it still ends the run as that signal would."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "XDG_DATA_HOME": str(tmp_path / "data")}
    (tmp_path / "tmp").mkdir()
    training = subprocess.Popen([EQZ, "train", "--quick", "--bands", "joy"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "tmp").glob("eqz-unpacked-*/f16.gguf")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list((tmp_path / "tmp").glob("eqz-unpacked-*/f16.gguf")), "no copy was made: nothing to test"
    time.sleep(3)  # the copy is written and loaded: training has begun
    training.send_signal(number)
    assert training.wait(timeout=60) == -number
    assert not list((tmp_path / "tmp").iterdir())


def test_a_bank_in_training_refuses_other_changes_and_ctrl_c_says_nothing_was_saved(tmp_path):
    """A change to a bank while `train` makes it was undone by the training's save (it saves the bank it read, whole);
    it is now refused in one line until the training ends. Ctrl-C ended `train` (and `eval`) with exit 130 and not a
    word about what was kept."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "XDG_DATA_HOME": str(tmp_path / "data")}
    (tmp_path / "tmp").mkdir()
    training = subprocess.Popen([EQZ, "train", "--quick", "--bands", "joy"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "tmp").glob("eqz-unpacked-*/f16.gguf")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # training has begun
    meanwhile = run_eqz("vectors", "hold", "joy", "5", env=env)
    assert_one_line_error(meanwhile, "being changed by another eqz (eqz train, process", "try again when")
    training.send_signal(signal.SIGINT)
    assert training.wait(timeout=60) == 130
    said = training.stderr.read()
    assert "eqz train: interrupted; nothing of this run was saved" in said and "Traceback" not in said
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("bank.yaml"))
    afterwards = run_eqz("vectors", "hold", "joy", "5", env=env)  # the lock ends with the process that held it
    assert afterwards.returncode == 0, afterwards.stderr


def test_a_dash_reads_the_prompt_or_the_text_from_stdin():
    """`echo ... | eqz generate -` took "-" itself for the prompt, `analyze -f -` looked for a file named "-", and
    `analyze -` read the text "-"."""
    piped = run_eqz("generate", "-", "-n", "4", "--seed", "1", "--json", input="Say hello.\n")
    assert json.loads(piped.stdout)["prompt"] == "Say hello.", piped.stderr
    direct = json.loads(run_eqz("analyze", "What a day!", "--json").stdout)
    assert json.loads(run_eqz("analyze", "-f", "-", "--json", input="What a day!").stdout) == direct
    assert json.loads(run_eqz("analyze", "-", "--json", input="What a day!").stdout) == direct
    assert_one_line_error(run_eqz("generate", "-", input=""), "standard input was empty")
    assert_one_line_error(run_eqz("generate", " "), "PROMPT is empty")  # replied to nothing
