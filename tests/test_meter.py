"""The meter and the filters on the real default model: analyze, clamp, ablate, and their records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from eqz.analyze import analyze
from eqz.bands import PRIMARIES
from eqz.bank import find_bank
from eqz.errors import EqzError
from eqz.generation import Job, generate_parallel
from eqz.meter import Filters, Instruments, geometry, metered_bands
from eqz.reading import TextGroup, read_texts
from eqz.sampling import Sampling
from eqz.session import ChatSession
from eqz.steering import Steering
from eqz.stimuli import load_stimuli

from .conftest import run_eqz

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

NEUTRAL_PROMPT = "Describe your walk to the bus stop this morning."
GRIEF_PROMPT = "My mother died last week and I cannot stop crying. Tell me how you feel about it."


@pytest.fixture(scope="module")
def bank(model):
    return find_bank(model.info)


def test_analyze_ranks_the_true_band_first_on_the_heldout_split(model, bank):
    stimuli = load_stimuli()
    hits = total = 0
    for band in PRIMARIES:
        for pair in stimuli.heldout[band]:
            result = analyze(model, bank, pair.emotional)
            hits += result.top_band(PRIMARIES) == band
            total += 1
    assert total == 128
    assert hits / total >= 0.90, f"{hits}/{total}"  # measured 97.7% (bank v1: 85.2%)


@pytest.mark.parametrize("name, measured", [("short_sentences", 0.912), ("fresh_sentences", 0.896)])
def test_analyze_ranks_short_sentences_it_never_saw_with_units_of_one_order(model, bank, name, measured):
    """Short sentences written apart from the stimuli (tests/data): 80 used while choosing the meter's method
    (bank v1 65%), 96 written afterwards by someone who saw neither set and measured once (bank v1 74%). The true
    band first on ``measured`` with the shipped bank; no readout of a whole sentence beyond 2.4 (v1: 6.72)."""
    sentences = yaml.safe_load((Path(__file__).parent / "data" / f"{name}.yaml").read_text())
    hits = total = 0
    largest = 0.0
    for band, texts in sentences.items():
        for text in texts:
            result = analyze(model, bank, text)
            hits += result.top_band(PRIMARIES) == band
            total += 1
            largest = max(largest, max(abs(value) for value in result.overall.values()))
    assert hits / total >= 0.85, f"{hits}/{total} (measured {measured:.1%})"
    assert largest < 3.0, largest


def test_analyze_by_sentence_and_token_and_json():
    text = "The bus was on time 🚌. I won the lottery and danced in the street! Then my dog died."
    table = run_eqz("analyze", text)
    assert table.returncode == 0 and "whole text" in table.stdout and "danced" in table.stdout
    by_sentence = json.loads(run_eqz("analyze", text, "--json").stdout)
    sentences = [segment["text"] for segment in by_sentence["segments"]]
    assert len(sentences) == 3 and sentences[1].startswith("I won the lottery")
    scores = [segment["readouts"] for segment in by_sentence["segments"]]
    assert scores[1]["joy"] > scores[2]["joy"] and scores[2]["sadness"] > scores[1]["sadness"]
    by_token = json.loads(run_eqz("analyze", text, "--by", "token", "--json").stdout)
    assert len(by_token["segments"]) > 15
    # the first token too, unread; the emoji's bytes span tokens (each was a "\ufffd")
    assert "".join(segment["text"] for segment in by_token["segments"]) == text
    assert by_token["segments"][0]["readouts"] is None and by_token["segments"][1]["readouts"]
    shown = run_eqz("analyze", "I am happy today.", "--by", "token").stdout
    rows = [line.split() for line in shown.splitlines() if line.strip()]  # header, rule, then the tokens
    assert rows[2] == ["I"] + ["·"] * 10 and "· = not read" in shown
    assert "(part of the next)" in run_eqz("analyze", "On time 🚌.", "--by", "token").stdout  # was a "\ufffd" row
    # a sentence's first token is its own, not the last sentence's: " I" of "Hi. I am sad." starts at the space
    parts = json.loads(run_eqz("analyze", "Hi. I am sad.", "--json").stdout)["segments"]
    pieces = json.loads(run_eqz("analyze", "Hi. I am sad.", "--by", "token", "--json").stdout)["segments"]
    assert [piece["text"] for piece in pieces[:3]] == ["Hi", ".", " I"]
    assert parts[0]["readouts"] == pieces[1]["readouts"]
    blank = run_eqz("analyze", " \n\t \n")  # read as valence -2 from a file or argument; stdin said "empty"
    assert blank.returncode == 2 and "the text is blank" in blank.stderr
    bad = run_eqz("analyze", text, "--by", "word")
    assert bad.returncode != 0 and "--by (by in the library) must be" in bad.stderr
    too_long = run_eqz("analyze", "I am glad. " * 2100)  # 8,401 tokens, past the 8,192 the model was trained on
    assert too_long.returncode == 2 and "more than the 8192" in too_long.stderr


def test_a_reply_whose_tokens_were_never_read_back_has_no_meter_reading(model, bank):
    """A one-token reply's meter was {} (its token is sampled, never read), which row["meter"]["joy"] met as a
    KeyError; the server's records said null."""
    turn, _ = reply_with(model, bank, "Hi", None, seed=1, tokens=1)
    assert turn.record.n_tokens == 1 and turn.record.meter is None and turn.record.to_dict()["meter"] is None
    turn, _ = reply_with(model, bank, "Hi", None, seed=1, tokens=2)
    assert set(turn.record.meter) == set(metered_bands(bank))


def reply_with(model, bank, prompt, filters, seed, tokens=100):
    session = ChatSession(model, Sampling(seed=seed, max_tokens=tokens), bank=bank, meter=True, filters=filters)
    turn = session.reply(prompt)
    trace = []
    for _ in turn:
        trace.append(dict(zip(session.instruments.metered, map(float, session.instruments.latest))))
    session.close()
    return turn, trace


def perplexity_unsteered(model, prompt: str, reply: str) -> float:
    text, _ = model.chat_prompt([{"role": "user", "content": prompt}])
    prompt_tokens = model.tokenize(text, parse_special=True)
    with model.context(n_ctx=1024, n_seq=2, n_batch=1024) as context:
        reading = read_texts(context, [TextGroup(prompt_tokens, [model.tokenize(reply, add_special=False)],
                                                 pool_from=len(prompt_tokens))], logprobs=True)
    return float(np.exp(-reading.logprobs[0].mean()))


def test_clamp_holds_joy_at_one_over_a_long_reply(model, bank):
    plain, _ = reply_with(model, bank, NEUTRAL_PROMPT, None, seed=1)
    turn, trace = reply_with(model, bank, NEUTRAL_PROMPT, {"clamp": {"joy": 1.0}}, seed=1)
    assert turn.record.n_tokens >= 40  # up to 100: where the reply ends depends on the sampled path
    joy = np.array([step["joy"] for step in trace])
    assert np.all(np.abs(joy - 1.0) <= 0.2), joy.round(2)
    assert abs(turn.record.meter["joy"] - 1.0) <= 0.2
    assert abs(plain.record.meter["joy"] - 1.0) > 0.2  # unfiltered, the model is elsewhere
    assert turn.text != plain.text  # the write reached the graph
    assert turn.record.filters == {"clamp": {"joy": 1.0}, "ablate": []}


def test_ablate_keeps_a_grieving_reply_at_the_neutral_sadness_level(model, bank):
    plain, _ = reply_with(model, bank, GRIEF_PROMPT, None, seed=2)
    ablated, trace = reply_with(model, bank, GRIEF_PROMPT, {"ablate": ["sadness"]}, seed=2)
    assert plain.record.meter["sadness"] > 0.2  # the prompt does move the model
    assert abs(ablated.record.meter["sadness"]) <= 0.2
    assert max(abs(step["sadness"]) for step in trace) <= 0.2
    assert perplexity_unsteered(model, GRIEF_PROMPT, ablated.text) <= 2 * perplexity_unsteered(model, GRIEF_PROMPT, plain.text)


def test_filters_and_meter_through_the_cli(tmp_path):
    result = run_eqz("generate", GRIEF_PROMPT, "--ablate", "sadness", "--clamp", "joy=0.5", "--set", "trust=0.5",
                     "--seed", "3", "-n", "40", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["filters"] == {"clamp": {"joy": 0.5}, "ablate": ["sadness"]}
    assert abs(record["meter"]["sadness"]) <= 0.2 and abs(record["meter"]["joy"] - 0.5) <= 0.2
    assert record["sliders"]["trust"] == 0.5
    bad = run_eqz("generate", "hi", "--clamp", "joy=lots")
    assert bad.returncode != 0 and "must be a number" in bad.stderr
    unknown = run_eqz("generate", "hi", "--ablate", "zest")
    assert unknown.returncode != 0 and "unknown band 'zest'" in unknown.stderr


def test_batch_meter_adds_the_mean_readout_per_row(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{NEUTRAL_PROMPT}\n{GRIEF_PROMPT}\n")
    out = tmp_path / "out.jsonl"
    result = run_eqz("batch", str(prompts), "-o", str(out), "--meter", "--ablate", "anger", "-n", "24", "--parallel", "2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(row["meter"]) >= {"joy", "sadness"} for row in rows)
    assert all(abs(row["meter"]["anger"]) <= 0.2 and row["filters"]["ablate"] == ["anger"] for row in rows)
    assert rows[1]["meter"]["sadness"] > rows[0]["meter"]["sadness"]


def test_batch_meter_reads_each_reply_as_if_it_ran_alone(model, bank):
    # The middle job ends after 2 tokens, leaving sequences 0 and 2 running (two micro-batches in llama.cpp):
    # the grief reply's rows must still be metered as its own, not as the neutral reply's.
    asked = [model.chat_prompt([{"role": "user", "content": text}]) for text in (NEUTRAL_PROMPT, NEUTRAL_PROMPT,
                                                                                  GRIEF_PROMPT)]
    jobs = [Job(model.tokenize(text, parse_special=True), Sampling(temperature=0.7, max_tokens=n), seed, stops,
                ignore_eos=True) for (text, stops), n, seed in zip(asked, (24, 2, 24), (1, 2, 3))]

    def means(batch: list[Job]) -> list[dict[str, float]]:
        instruments = Instruments(bank, meter=True)
        with model.parallel_context(batch, parallel=len(batch)) as ctx:
            ctx.set_tap(instruments)
            done = list(generate_parallel(ctx, batch, on_decode=instruments.owners))
        return [instruments.mean(finished.job) for finished in done]

    together = means(jobs)
    for job, metered in ((jobs[0], together[0]), (jobs[2], together[2])):
        alone = means([job])[0]
        assert alone.keys() == metered.keys()
        assert all(abs(alone[band] - metered[band]) < 1e-3 for band in alone), (alone, metered)


def test_a_jobs_filters_clamp_its_own_rows_as_a_chat_does(model, bank):
    # eval's ReplyBench (and benchmarks/clamp_steering.py) filter per row in a shared batch: the clamped job must
    # get the reply a chat with the same clamp gets, and the job beside it the reply it gets alone.
    clamped, _ = reply_with(model, bank, NEUTRAL_PROMPT, {"clamp": {"joy": 2.0}}, seed=4, tokens=32)
    plain, _ = reply_with(model, bank, NEUTRAL_PROMPT, None, seed=4, tokens=32)
    assert clamped.text != plain.text
    text, stops = model.chat_prompt([{"role": "user", "content": NEUTRAL_PROMPT}])
    prompt = model.tokenize(text, parse_special=True)
    sampling = Sampling(seed=4, max_tokens=32)
    jobs = [Job(prompt, sampling, 4, stops, vector_key="plain"),
            Job(prompt, sampling, 4, stops, vector_key="clamped", filters=Filters(bank, {"joy": 2.0}, []))]
    with model.parallel_context(jobs, parallel=2) as ctx:
        done = list(generate_parallel(ctx, jobs, row_steering=bank.steered_layers))
    assert [finished.text for finished in done] == [plain.text, clamped.text]
    with model.parallel_context(jobs, parallel=2) as ctx, pytest.raises(ValueError, match="row_steering"):
        list(generate_parallel(ctx, jobs))  # without the row tap the clamp would be dropped silently


def test_every_band_notched_at_once_reads_neutral_and_levels_that_conflict_are_refused(bank):
    """The bank's ten directions span 7 dimensions (LDA over 8 primaries; valence and arousal are made of them).
    Inverting their near-zero singular values made ten notches read up to +-2, and five held sliders beside three
    notches read +-40 and broke the text; the notches now hold, and levels the tied directions cannot all reach are
    one line."""
    bands = metered_bands(bank)
    every = Filters(bank, {}, list(bands))
    hidden = np.random.default_rng(0).standard_normal((4, bank.model.n_embd)).astype(np.float32) * 20
    for layer in every.layers:
        filtered = hidden.copy()
        assert every.apply(layer, filtered)
        assert np.abs(geometry(bank, layer, bands).readouts(filtered)).max() < 0.01, layer
    with pytest.raises(EqzError, match="too many bands filtered at once"):
        Filters(bank, {band: 1.0 for band in PRIMARIES}, [])
    refused = run_eqz("generate", "Describe a chair.", "-n", "8", "--set", "joy=1", "--set", "surprise=1",
                      "--set", "sadness=1", "--set", "disgust=1", "--set", "anticipation=1", "--ablate", "trust",
                      "--ablate", "fear", "--ablate", "anger")  # five held sliders and three notches
    errors = [line for line in refused.stderr.splitlines() if line.startswith("eqz: error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "too many bands filtered" in errors[0]


def test_preset_filters_apply(tmp_path):
    config = tmp_path / "config"
    (config / "eqz" / "presets").mkdir(parents=True)
    (config / "eqz" / "presets" / "numb.yaml").write_text(
        "name: numb\ndescription: no sadness at all\nsliders: {joy: 0.2}\nfilters: {ablate: [sadness]}\n"
    )
    result = run_eqz("generate", GRIEF_PROMPT, "--preset", "numb", "-n", "24", "--seed", "1", "--json",
                     env={"XDG_CONFIG_HOME": str(config)})
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["preset"] == "numb" and record["filters"]["ablate"] == ["sadness"]
    assert abs(record["meter"]["sadness"]) <= 0.2  # ablated, not only named


def test_a_held_slider_clamps_its_band_where_it_would_add_its_vector(tmp_path):
    """The shipped bank holds joy at 4: --set joy=1 gives what --clamp joy=4 gives. `eqz vectors hold joy 3` moves
    the level (generate and batch then give what --clamp joy=3 gives), the record shows a slider, and 'off' adds
    the vector again, which is what an exported file adds."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}

    def reply(*args: str, own: bool = True) -> dict:
        result = run_eqz("generate", NEUTRAL_PROMPT, "-n", "24", "--seed", "3", "--json", *args, env=env if own else None)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    shipped = reply("--set", "joy=1", own=False)
    assert shipped["output"] == reply("--clamp", "joy=4", own=False)["output"]
    held = run_eqz("vectors", "hold", "joy", "3", env=env)
    assert held.returncode == 0 and "joy +1 now holds level 3" in held.stdout, held.stderr
    assert "held 3" in run_eqz("vectors", "show", env=env).stdout
    by_slider, by_clamp = reply("--set", "joy=1"), reply("--clamp", "joy=3")
    assert by_slider["output"] == by_clamp["output"] != shipped["output"]
    assert by_slider["sliders"]["joy"] == 1.0 and "filters" not in by_slider and by_clamp["filters"]["clamp"] == {"joy": 3.0}

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(NEUTRAL_PROMPT + "\n" + GRIEF_PROMPT + "\n")
    outputs = []
    for option in ("--set", "--clamp"):
        out = tmp_path / f"{option[2:]}.jsonl"
        result = run_eqz("batch", str(prompts), "-o", str(out), "-n", "16", "--seed", "2", option,
                         "joy=1" if option == "--set" else "joy=3", env=env)
        assert result.returncode == 0, result.stderr
        outputs.append([json.loads(line)["output"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]

    assert run_eqz("vectors", "hold", "joy", "off", env=env).returncode == 0
    added = reply("--set", "joy=1")
    exported = run_eqz("vectors", "export", "--set", "joy=1", "-o", str(tmp_path / "joy.gguf"), env=env)
    assert exported.returncode == 0 and "warning" not in exported.stderr, exported.stderr
    assert reply("--vector", str(tmp_path / "joy.gguf"))["output"] == added["output"] not in (shipped["output"],
                                                                                             by_slider["output"])


def test_a_held_slider_moved_in_a_chat_clamps_from_the_next_token(model, bank):
    held_bank = copy.deepcopy(bank)
    held_bank.hold("joy", 3)
    sampling = Sampling(seed=6, max_tokens=40)
    clamped, _ = reply_with(model, bank, NEUTRAL_PROMPT, {"clamp": {"joy": 3.0}}, seed=6, tokens=40)
    session = ChatSession(model, sampling, bank=held_bank, steering=Steering().with_gain("joy", 1.0))
    assert "".join(session.reply(NEUTRAL_PROMPT)) == clamped.text
    session.close()

    plain, _ = reply_with(model, bank, NEUTRAL_PROMPT, None, seed=6, tokens=40)
    session = ChatSession(model, sampling, bank=held_bank)
    turn = session.reply(NEUTRAL_PROMPT)
    for index, _ in enumerate(turn):
        if index == 3:
            session.request_steering(Steering().with_gain("joy", 1.0))  # as the chat's slider keys do
    (change,) = turn.record.changes
    assert session.filters.targets == {"joy": 3.0} and not session.filters.asked
    assert turn.text[: change["text_offset"]] == plain.text[: change["text_offset"]] and turn.text != plain.text
    session.close()


def test_a_refused_filter_leaves_the_filters_before_and_moves_after_it_work(model, bank):
    """`/ablate nosuch` was refused but kept: every later move of a held slider failed on it ("cannot filter
    'nosuch'") while half applying; and slider moves that cancel out mid-reply were marked as a change."""
    held_bank = copy.deepcopy(bank)
    held_bank.hold("joy", 3)
    session = ChatSession(model, Sampling(seed=6, max_tokens=12), bank=held_bank, meter=True)
    session.set_filters(ablate=["anger"])
    with pytest.raises(EqzError, match="nosuch"):
        session.set_filters(ablate=["anger", "nosuch"])
    session.set_steering(Steering().with_gain("joy", 1.0))  # held: the filters are made again
    assert session.filters.describe() == {"clamp": {}, "ablate": ["anger"]}  # the user's filters, as before
    turn = session.reply(NEUTRAL_PROMPT)
    for index, _ in enumerate(turn):
        if index == 2:  # up then down between two tokens, as two key presses
            session.request_steering(Steering().with_gain("joy", 1.1))
            session.request_steering(Steering().with_gain("joy", 1.0))
    assert turn.record.changes == []
    session.close()


def test_a_slider_key_pressed_after_a_reply_and_a_set_command_both_count(model, bank):
    """A key press after the last token waits for the next reply; a `/set` typed meanwhile built on the sliders
    without it, and the waiting press then undid the `/set` when the next reply began."""
    from eqz.chat import ChatCommands

    session = ChatSession(model, Sampling(seed=6, max_tokens=4), bank=bank)
    session.request_steering(Steering().with_gain("joy", 1.0))  # as the chat's slider keys do
    ChatCommands(session).handle("/set fear 0.5")
    "".join(session.reply(NEUTRAL_PROMPT))
    assert dict(session.steering.gains) == {"joy": 1.0, "fear": 0.5}
    session.close()


def test_without_a_bank_a_reply_dropped_unread_takes_its_message_and_a_reset_keeps_a_half_read_one_out(model):
    """Without a meter nothing holds a reply the caller dropped, so the next one found none to end and two
    questions followed each other; a half-read reply ended after a reset was added to the new conversation."""
    session = ChatSession(model, Sampling(seed=1, max_tokens=4))
    session.reply("First question?")  # dropped unread
    "".join(session.reply("Second question?"))
    assert [(m["role"], m["content"]) for m in session.history][0] == ("user", "Second question?")
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    half = session.reply("Tell me a story.")
    next(iter(half))
    session.reset()
    "".join(session.reply("Hi"))
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    session.close()
