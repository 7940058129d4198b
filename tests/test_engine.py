"""The engine on the real default model: control vectors, live changes, taps, templates, the context window."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from eqz.engine import Model, Sampler
from eqz.generation import Job, Stream, _TextAssembler, generate_parallel
from eqz.reading import PrefixCache, TextGroup, read_texts
from eqz.errors import EqzError
from eqz.sampling import Sampling
from eqz.session import ChatSession
from eqz.steering import Steering

from .conftest import random_direction_matrix, run_eqz

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # runs the real model (the fast tier: pytest -m 'not slow')

PROMPT = "Describe your walk to the bus stop this morning."
SAMPLING = Sampling(temperature=0.8, seed=7, max_tokens=40)


def reply_tokens(context, model, prompt=PROMPT, sampling=SAMPLING, on_step=None) -> list[int]:
    text, stops = model.chat_prompt([{"role": "user", "content": prompt}])
    context.prefill(model.tokenize(text, parse_special=True))
    sampler = Sampler(model, sampling, sampling.seed)
    stream = Stream(context, sampler, sampling.max_tokens, stops)
    for index, _step in enumerate(stream):
        if on_step:
            on_step(index)
    return stream.tokens


@pytest.fixture
def context(model):
    with model.context(n_ctx=1024) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def steer_matrix(model):
    return random_direction_matrix(model.info.n_layer, model.info.n_embd, range(3, 20), norm=40.0)


def test_control_vector_changes_output_and_clearing_restores_it(model, context, steer_matrix):
    plain = reply_tokens(context, model)
    context.clear()
    context.set_control_vector(steer_matrix)
    steered = reply_tokens(context, model)
    context.clear()
    context.set_control_vector(None)
    restored = reply_tokens(context, model)
    assert steered != plain
    assert restored == plain


def test_all_zero_vector_is_the_unsteered_graph(model, context):
    plain = reply_tokens(context, model)
    context.clear()
    context.set_control_vector(np.zeros((model.info.n_layer, model.info.n_embd), np.float32))
    assert context.control_vector is None
    assert reply_tokens(context, model) == plain


@pytest.mark.parametrize("layer", ["first", "last"])
def test_a_vector_on_one_layer_steers_the_first_and_the_last_steerable_layer(model, context, layer):
    """Row N of a control vector is added after layer N (llama.cpp's buffer starts at layer 1): both ends steer."""
    plain = reply_tokens(context, model)
    context.clear()
    row = 1 if layer == "first" else model.info.n_layer - 1
    context.set_control_vector(random_direction_matrix(model.info.n_layer, model.info.n_embd, range(row, row + 1),
                                                       norm=40.0))
    assert reply_tokens(context, model) != plain


def test_vector_changed_mid_reply_steers_only_what_follows(model, context, steer_matrix):
    plain = reply_tokens(context, model)
    context.clear()
    switch_after = 10

    def switch(index):
        if index == switch_after - 1:
            context.set_control_vector(steer_matrix)

    live = reply_tokens(context, model, on_step=switch)
    context.set_control_vector(None)
    assert live[:switch_after] == plain[:switch_after]
    assert live[switch_after:] != plain[switch_after:]


def test_greedy_is_deterministic_and_seed_changes_sampling(model, context):
    greedy = Sampling(temperature=0, max_tokens=20)
    first = reply_tokens(context, model, sampling=greedy)
    context.clear()
    assert reply_tokens(context, model, sampling=greedy) == first
    context.clear()
    outputs = set()
    for seed in (1, 2, 3):
        context.clear()
        outputs.add(tuple(reply_tokens(context, model, sampling=Sampling(temperature=1.0, seed=seed, max_tokens=20))))
    assert len(outputs) > 1


def test_vector_with_wrong_shape_or_layer_zero_is_refused(model, context):
    info = model.info
    with pytest.raises(EqzError, match="shape"):
        context.set_control_vector(np.ones((info.n_layer, info.n_embd + 1), np.float32))
    layer_zero = np.zeros((info.n_layer, info.n_embd), np.float32)
    layer_zero[0] = 1
    with pytest.raises(EqzError, match="layer 0"):
        context.set_control_vector(layer_zero)


class Recorder:
    def __init__(self, layers, write=None):
        self.layers = frozenset(layers)
        self.seen: list[tuple[int, np.ndarray]] = []
        self.write = write

    def __call__(self, layer, hidden):
        self.seen.append((layer, hidden.copy()))
        if self.write is None:
            return False
        self.write(layer, hidden)
        return True


def test_taps_read_the_residual_stream_of_the_chosen_layers(model):
    with model.context(n_ctx=512, taps=True) as ctx:
        recorder = Recorder([2, 15])
        ctx.set_tap(recorder)
        tokens = model.tokenize("The cat sat on the mat.")
        ctx.prefill(tokens)
    assert [layer for layer, _ in recorder.seen] == [2, 15]
    for _, hidden in recorder.seen:
        assert hidden.shape == (len(tokens), model.info.n_embd)
    # the residual stream grows with depth
    assert np.linalg.norm(recorder.seen[1][1]) > np.linalg.norm(recorder.seen[0][1])


def test_tap_rows_follow_batch_order_across_sequences(model):
    texts = ["Rain fell on the quiet town.", "Numbers add up.", "A dog barked twice at the postman."]
    token_lists = [model.tokenize(t) for t in texts]
    alone = []
    with model.context(n_ctx=512, n_seq=3, taps=True) as ctx:
        for tokens in token_lists:
            recorder = Recorder([10])
            ctx.set_tap(recorder)
            ctx.clear()
            ctx.decode(tokens, range(len(tokens)), [0] * len(tokens), [False] * (len(tokens) - 1) + [True])
            alone.append(recorder.seen[0][1])
        recorder = Recorder([10])
        ctx.set_tap(recorder)
        ctx.clear()
        flat = [(t, pos, seq) for seq, tokens in enumerate(token_lists) for pos, t in enumerate(tokens)]
        ctx.decode([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], [True] * len(flat))
    together = recorder.seen[0][1]
    np.testing.assert_array_equal(together, np.concatenate(alone))


def test_row_steering_reaches_its_own_rows_when_sequences_in_between_are_done(model, steer_matrix):
    # Sequence 1's job ends after 2 tokens, leaving sequences 0 and 2 running: llama.cpp computes such a batch
    # in two micro-batches, and the steered job on sequence 2 must still get its own vector, not sequence 0's.
    text, stops = model.chat_prompt([{"role": "user", "content": PROMPT}])
    prompt = model.tokenize(text, parse_special=True)
    long, short = (Sampling(temperature=0.8, max_tokens=n) for n in (24, 2))
    jobs = [Job(prompt, long, 1, stops, ignore_eos=True), Job(prompt, short, 2, stops, ignore_eos=True),
            Job(prompt, long, 3, stops, steer_matrix, "steered", ignore_eos=True)]
    steered = range(model.info.n_layer)

    def tokens(batch: list[Job]) -> list[list[int]]:
        with model.parallel_context(batch, parallel=len(batch)) as ctx:
            return [finished.tokens for finished in generate_parallel(ctx, batch, row_steering=steered)]

    together = tokens(jobs)
    assert len(together[1]) == 2
    assert together[0] == tokens(jobs[:1])[0]
    assert together[2] == tokens(jobs[2:])[0]
    assert together[2] != tokens([Job(prompt, long, 3, stops, ignore_eos=True)])[0]  # the vector matters


def test_a_batch_llama_cpp_would_split_is_refused_where_taps_read_rows(model):
    hello = model.tokenize("Hello there")
    with model.parallel_context([Job(hello, SAMPLING, 1)] * 3, parallel=3) as ctx:
        for seq in range(3):
            ctx.decode_prompt(hello, seq)
        end = [len(hello)] * 2
        with pytest.raises(ValueError, match="consecutive sequences"):
            ctx.decode([13, 13], end, [0, 2], [True, True])
        ctx.decode([13, 13], end, [1, 2], [True, True])


def test_writing_the_hidden_state_back_changes_what_follows(model):
    def write_back_unchanged(_layer, _hidden):
        pass

    def push(_layer, hidden):
        hidden += 30.0 * np.sign(hidden.mean(axis=0))

    outputs = []
    with model.context(n_ctx=512, taps=True) as ctx:
        for writer in (None, write_back_unchanged, push):
            ctx.clear()
            ctx.set_tap(Recorder([8], writer))
            outputs.append(reply_tokens(ctx, model, sampling=Sampling(temperature=0, max_tokens=20)))
    plain, rewritten_same, pushed = outputs
    assert rewritten_same == plain
    assert pushed != plain


def test_tap_errors_surface_after_the_decode(model):
    def broken(_layer, _hidden):
        raise ValueError("boom")

    with model.context(n_ctx=512, taps=True) as ctx:
        ctx.set_tap(Recorder([4], broken))
        with pytest.raises(ValueError, match="boom"):
            ctx.prefill(model.tokenize("hello there"))


def test_chat_template_from_gguf_and_plain_fallback(model, gemma_path):
    prompt, stops = model.chat_prompt([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert stops == ()
    with Model(gemma_path) as gemma:
        assert not gemma.info.has_chat_template
        prompt, stops = gemma.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert prompt == "Be brief.\n\nUser: hi\nAssistant:"
    assert [stop.find(text) for stop in stops for text in ("hi\nUser: x", "a\nDoctor: b", "a\nAt 5: b", "a: b\nc")] == \
        [2, 1, -1, -1]


def test_a_speaker_line_ends_a_streamed_reply_and_only_its_start_is_held_back():
    """A base model in the plain transcript went on as "Doctor:", "Master:" or the system prompt's "You are
    joyful:"; the text before such a line streams as it comes, a new line held back only while it may be one."""
    from eqz.engine import FALLBACK_STOPS
    from eqz.generation import _split_at_stop

    assert _split_at_stop(" I am up.\nDoc", FALLBACK_STOPS) == (" I am up.", "\nDoc", False)
    assert _split_at_stop(" I am up.\nDoctor: go", FALLBACK_STOPS) == (" I am up.", "", True)
    assert _split_at_stop(" I am up.\n\nYou are joyful: happy", FALLBACK_STOPS) == (" I am up.\n", "", True)
    line = "\nThen I went to the kitchen to make"  # longer than a label: shown
    assert _split_at_stop(" Up." + line, FALLBACK_STOPS) == (" Up." + line, "", False)
    assert _split_at_stop(" Up.\nI ate.\nTh", FALLBACK_STOPS) == (" Up.\nI ate.", "\nTh", False)
    assert _split_at_stop(" Up.\nDoctor: ", FALLBACK_STOPS) == (" Up.", "\nDoctor: ", False)  # a name and a colon
    # lists, headings, times and addresses are text (the first rule cut at any short line with a colon)
    for text in (" Tips:\n1. Sleep: early.", " x\n- Flour: 2 cups", " x\nIngredients:\n- a", " x\n10:30 the train",
                 " x\nhttps://example.com"):
        assert _split_at_stop(text, FALLBACK_STOPS) == (text, "", False)


def test_stop_strings_end_a_fallback_reply(gemma_path):
    with Model(gemma_path) as gemma:
        session = ChatSession(gemma, Sampling(temperature=0.7, seed=3, max_tokens=120), n_ctx=1024)
        turn = session.reply("Tell me about cats.")
        text = "".join(turn)
        session.close()
    assert "User:" not in text and "Assistant:" not in text
    assert text == turn.text


def test_a_base_models_steered_reply_ends_before_a_speaker_it_makes_up(gemma_path):
    """`eqz generate "Describe your morning." --set fear=1 --seed 3` on Gemma went on as "Doctor: You are being
    watched." and "Master: Do not go,"."""
    ran = run_eqz("generate", "Describe your morning.", "-m", str(gemma_path), "-n", "25", "--seed", "3", "--set",
                  "fear=1", "--json", env={"EQZ_VECTORS": str(ROOT / "docs" / "banks")})
    assert ran.returncode == 0, ran.stderr
    record = json.loads(ran.stdout)
    assert record["output"].strip() and not re.search(r"\n[^\n:]{1,30}:", record["output"])
    assert record["finish_reason"] == "stop" and record["n_tokens"] < 25


def test_a_character_cut_by_the_replys_end_is_dropped_not_shown_as_a_replacement_mark(model):
    """A reply ending at max_tokens between an emoji's first bytes and its last ended in U+FFFD in every record."""
    tokens = model.tokenize("Hi \N{GRINNING FACE} there", add_special=False)
    assert len(model.piece(tokens[1])) < len(" \N{GRINNING FACE}".encode())  # the emoji takes two tokens here
    cut = _TextAssembler(model, ())
    assert "".join(cut.push(token)[0] for token in tokens[:2]) + cut.flush() == "Hi "
    whole = _TextAssembler(model, ())
    assert "".join(whole.push(token)[0] for token in tokens) + whole.flush() == "Hi \N{GRINNING FACE} there"


def test_prompt_longer_than_context_is_refused_and_the_conversation_stays(model):
    """The turns dropped to make room for a message that could never fit were lost with it: the chat emptied."""
    session = ChatSession(model, Sampling(seed=1, max_tokens=8), n_ctx=256)
    "".join(session.reply("Hi!"))
    kept = list(session.history)
    with pytest.raises(EqzError, match=r"prompt is \d+ tokens but the context holds 256"):
        session.reply("word " * 400)
    assert session.history == kept and len(kept) == 2
    assert "".join(session.reply("And you?")) and len(session.history) == 4
    session.close()


def test_full_context_drops_oldest_turns_and_keeps_system(model):
    session = ChatSession(model, Sampling(seed=1, max_tokens=48), system="You are terse.", n_ctx=256)
    dropped = 0
    for i in range(8):
        turn = session.reply(f"Question {i}: tell me a fact about the number {i}.")
        "".join(turn)
        dropped += turn.record.dropped_messages
        assert turn.record.finish_reason in ("stop", "length", "context")
    assert dropped > 0
    assert session.messages()[0] == {"role": "system", "content": "You are terse."}
    assert session.history[0]["role"] == "user"
    session.close()


def test_steering_requested_during_a_reply_is_logged_with_its_token(model, tmp_path, random_vector_file):
    session = ChatSession(model, Sampling(seed=5, max_tokens=30), n_ctx=1024)
    turn = session.reply(PROMPT)
    for index, _ in enumerate(turn):
        if index == 4:
            session.request_steering(Steering(vectors=((str(random_vector_file), 1.0),)))
    change = turn.record.changes[0]
    assert change["at_token"] == 5
    assert change["vectors"][0]["scale"] == 1.0
    assert session.history[-1]["reply"]["changes"] == [change]
    session.close()


def test_a_prefix_read_before_is_restored_not_recomputed_and_reads_the_same(model):
    """The bench reads every strength's replies after the same persona and prompt heads: a cached head is put back
    from its saved KV cache, and what is read after it does not change."""
    heads = [model.tokenize(model.chat_prompt([{"role": "system", "content": persona},
                                               {"role": "user", "content": PROMPT}])[0], parse_special=True)
             for persona in ("You are calm.", "You are joyful: happy, delighted and cheerful.")]
    replies = [model.tokenize(text, add_special=False) for text in
               (" I walked past the bakery and the air smelled of bread.", " It rained, so I ran.")]
    groups = [TextGroup(heads[0], replies, pool_from=len(heads[0])),
              TextGroup(heads[1], replies[:1], pool_from=len(heads[1]))]
    cache = PrefixCache()
    with model.context(n_ctx=1024, n_seq=8, n_batch=1024, taps=True) as context:
        decoded: list[int] = []
        plain_decode = context.decode
        context.decode = lambda tokens, *rest: (decoded.append(len(tokens)), plain_decode(tokens, *rest))[1]
        first = read_texts(context, groups, [15], logprobs=True, cache=cache)
        assert decoded == [sum(map(len, heads)), 2 * len(replies[0]) + len(replies[1])]  # heads alone, then tails
        decoded.clear()
        again = read_texts(context, groups, [15], logprobs=True, cache=cache)
        assert decoded == [2 * len(replies[0]) + len(replies[1])]  # only the tails are computed
        inline = read_texts(context, groups, [15], logprobs=True)  # no cache: each head in its tails' decode
    for cached, restored, computed in zip(first.logprobs, again.logprobs, inline.logprobs):
        assert len(cached) == len(computed) and np.array_equal(cached, restored)
        assert abs(cached.mean() - computed.mean()) < 0.05 * abs(computed.mean())  # batch-size rounding only
    assert np.array_equal(first.pooled, again.pooled)
    drift = np.linalg.norm(first.pooled - inline.pooled, axis=-1) / np.linalg.norm(inline.pooled, axis=-1)
    assert drift.max() < 0.05, drift


def test_the_next_token_after_each_text_is_read_as_if_it_were_appended(model):
    """A judge reads the answer right after a text (read_texts' next_tokens): the log-probability of reading that
    token as the text's last one, for every text of a group that shares a head (values 0.8 to 14 nats apart)."""
    head = model.tokenize(model.chat_prompt([{"role": "user", "content": PROMPT}])[0], parse_special=True)
    tails = [model.tokenize(text, add_special=False) for text in (" I feel so happy today,", " The bus was late and")]
    answers = [model.tokenize(word, add_special=False)[0] for word in (" and", " I")]
    with model.context(n_ctx=1024, n_seq=8, n_batch=1024) as context:
        following = read_texts(context, [TextGroup(head, tails, pool_from=len(head))], next_tokens=answers).next_logprobs
        appended = read_texts(context, [TextGroup(head, [tail + [answer]], pool_from=len(head) + len(tail))
                                        for tail in tails for answer in answers], logprobs=True)
    assert following.shape == (2, 2)
    # the same up to llama.cpp's batch-size rounding (~0.1 nats here): the two reads batch differently
    assert np.allclose(following.ravel(), [scores[-1] for scores in appended.logprobs], atol=0.25)


def test_training_reads_an_f16_copy_that_reads_as_the_model_does_and_is_removed_after(model, gemma_path):
    """`eqz train` works on ``Model.unpacked()``: for Q4_1 an f16 copy of the weights (batches about twice as fast).
    The emotional contrast read through it must be the model's own, and the copy must not outlive training."""
    texts = ["I finally got the job and I can't stop smiling!", "I miss her every day and the house feels empty.",
             "The bus leaves at nine and stops at the station."]
    layers = [5, 15, 20]

    def contrasts(source):
        groups = [TextGroup([], [source.tokenize(text) for text in texts])]
        with source.context(n_ctx=256, n_seq=4, n_batch=256, taps=True) as context:
            pooled = read_texts(context, groups, layers).pooled
        return pooled[:2] - pooled[2]  # (2 emotional texts, layers, n_embd): each against the neutral one

    with model.unpacked() as copy:
        assert copy is not model and copy.file_type == 1  # LLAMA_FTYPE_MOSTLY_F16
        assert copy.info == model.info  # a bank trained on it is the model's bank
        copy_path = copy.path
        assert not copy_path.exists()  # gone once loaded: a kill -9 mid-training left 259 MB in the temp folder
        original, unpacked = contrasts(model), contrasts(copy)
    assert not copy_path.parent.exists()
    cosine = (original * unpacked).sum(-1) / np.linalg.norm(original, axis=-1) / np.linalg.norm(unpacked, axis=-1)
    assert cosine.min() > 0.99, cosine  # measured 0.997 or more on 95 stimulus texts at every capture layer
    with Model(gemma_path) as gemma, gemma.unpacked() as same:
        assert same is gemma  # Q4_K_M batches as fast as f16: no copy


LOADS = """
import sys, time
from eqz.engine import Model
print("ready", flush=True)
model = Model(sys.argv[1])
print("loaded", flush=True)
time.sleep(30)
"""


def test_ctrl_c_while_a_model_loads_is_raised_after_the_load(model_path):
    """llama.cpp logs through a Python callback while it loads: Ctrl-C there was raised inside the ctypes callback,
    printed as "Exception ignored" and dropped, and the load went on (`eqz chat` started as if nothing was pressed).
    Pressed later and later after the imports, until the load is over."""
    import subprocess
    import sys
    import time

    for step in range(60):
        child = subprocess.Popen([sys.executable, "-c", LOADS, str(model_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(step * 0.02)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
        assert "Exception ignored" not in err and child.returncode != 0, err
        if "loaded" in out:  # pressed after the load: raised in the sleep
            break
        assert err.rstrip().endswith("KeyboardInterrupt")
    assert step > 0  # some came while it loaded
