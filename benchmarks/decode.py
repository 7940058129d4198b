"""Decode speed on the default model, measured side by side in one run.

Prints llama.cpp's own decode loop on the same prompt, tokens and sampler chain (the baseline for eqz's
unsteered loop), then eqz's decode tokens/s for: unsteered; steered (every band's vector added); every band as the shipped bank's
sliders apply it (held bands clamped through the filters' tap, the others added); steered with the meter on;
steered with the meter and two filters (clamp joy, ablate sadness) on. Each ratio is taken against the condition it
adds to (steered vs unsteered, target >= 0.98; sliders vs unsteered; meter vs steered, target >= 0.95; filters vs
steered).
Also the cost of one slider change (a new control vector set between two tokens + the re-reserve of the next
decode), in ms. Rounds are interleaved and medians reported, because these machines are shared and noisy.
"""

from __future__ import annotations

import statistics
import time


from report import print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.bank import require_bank
from eqz.bands import BANDS
from eqz.engine import Model, Sampler
from eqz.generation import Stream
from eqz.meter import Filters, Instruments
from eqz.models import resolve_model_path
from eqz.sampling import Sampling

PROMPT = "Write a long story about a lighthouse keeper."
TOKENS = 128
ROUNDS = 5
SAMPLING = Sampling(temperature=0.7, seed=11, max_tokens=TOKENS)
# every band moved, alternating up and down, at half gain so the mix stays fluent
ALL_BANDS = {band: 0.5 if index % 2 == 0 else -0.5 for index, band in enumerate(BANDS)}


def decode_rate(model: Model, context, matrix, tap=None, change_every_token: bool = False) -> float:
    """Tokens/s of eqz's own generation loop over TOKENS tokens (end-of-turn ignored)."""
    context.clear()
    context.set_control_vector(matrix)
    text, _ = model.chat_prompt([{"role": "user", "content": PROMPT}])
    context.prefill(model.tokenize(text, parse_special=True))
    if tap is not None:
        context.set_tap(tap)
    sampler = Sampler(model, SAMPLING, SAMPLING.seed)
    flip = [matrix, matrix * 0.5] if change_every_token else None
    started = time.perf_counter()
    for index, _ in enumerate(Stream(context, sampler, TOKENS, ignore_eos=True)):
        if change_every_token:
            context.set_control_vector(flip[index % 2])
    seconds = time.perf_counter() - started
    sampler.close()
    if tap is not None:
        context.set_tap(None)
    return TOKENS / seconds


def llama_cpp_rate(model: Model) -> float:
    """Tokens/s of llama.cpp alone doing decode_rate's work: the same prompt, then TOKENS steps of its sampler chain
    (eqz's settings) and a one-token decode, through llama-cpp-python's low-level calls."""
    import llama_cpp as L  # the baseline is llama.cpp itself, so this benchmark talks to it directly

    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch = 1024, 512
    params.n_threads = params.n_threads_batch = model.threads
    params.no_perf = True
    context = L.llama_init_from_model(model._model, params)
    text, _ = model.chat_prompt([{"role": "user", "content": PROMPT}])
    prompt = model.tokenize(text, parse_special=True)
    tokens = (L.llama_token * len(prompt))(*prompt)  # kept alive: the batch only points at it
    assert L.llama_decode(context, L.llama_batch_get_one(tokens, len(prompt))) == 0
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for sampler in (L.llama_sampler_init_penalties(model.info.n_vocab, SAMPLING.repeat_last_n, SAMPLING.repeat_penalty,
                                                   0.0, 0.0),
                    L.llama_sampler_init_top_k(SAMPLING.top_k), L.llama_sampler_init_top_p(SAMPLING.top_p, 1),
                    L.llama_sampler_init_min_p(SAMPLING.min_p, 1), L.llama_sampler_init_temp(SAMPLING.temperature),
                    L.llama_sampler_init_dist(SAMPLING.seed)):
        L.llama_sampler_chain_add(chain, sampler)
    token = (L.llama_token * 1)()
    started = time.perf_counter()
    for _ in range(TOKENS):
        token[0] = L.llama_sampler_sample(chain, context, -1)
        assert L.llama_decode(context, L.llama_batch_get_one(token, 1)) == 0
    seconds = time.perf_counter() - started
    L.llama_sampler_free(chain)
    L.llama_free(context)
    return TOKENS / seconds


def measure(model: Model, rounds: int = ROUNDS) -> dict:
    bank = require_bank(model.info)
    matrix = bank.mix(ALL_BANDS)
    meter = Instruments(bank, meter=True)
    filters = Instruments(bank, meter=True, filters=Filters(bank, {"joy": 1.0}, ["sadness"]))
    added, levels = bank.added(ALL_BANDS), bank.held(ALL_BANDS)  # the sliders add one; the held go through the tap
    held = Instruments(bank, meter=False, filters=Filters(bank, {}, [], held=levels))
    rates: dict[str, list[float]] = {k: [] for k in ("llama.cpp", "unsteered", "steered", "sliders", "meter", "filters",
                                                     "changing")}
    # the meter and filters need a context made with the eval callback; the plain conditions get a plain one
    with model.context(n_ctx=1024) as plain, model.context(n_ctx=1024, taps=True) as tapped:
        decode_rate(model, plain, None)  # warm-up
        decode_rate(model, tapped, matrix, filters)
        llama_cpp_rate(model)
        for _ in range(rounds):
            rates["llama.cpp"].append(llama_cpp_rate(model))
            rates["unsteered"].append(decode_rate(model, plain, None))
            rates["steered"].append(decode_rate(model, plain, matrix))
            rates["sliders"].append(decode_rate(model, tapped, added, held))
            rates["meter"].append(decode_rate(model, tapped, matrix, meter))
            rates["filters"].append(decode_rate(model, tapped, matrix, filters))
            rates["changing"].append(decode_rate(model, plain, matrix, change_every_token=True))
    median = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "model": model.info.name,
        "threads": model.threads,
        "tokens": TOKENS,
        "rounds": rounds,
        "llama_cpp_tok_s": round(median["llama.cpp"], 1),
        "unsteered_llama_cpp_ratio": round(median["unsteered"] / median["llama.cpp"], 3),
        "unsteered_tok_s": round(median["unsteered"], 1),
        "steered_tok_s": round(median["steered"], 1),
        "meter_tok_s": round(median["meter"], 1),
        "filters_tok_s": round(median["filters"], 1),
        "sliders_tok_s": round(median["sliders"], 1),
        "steered_ratio": round(median["steered"] / median["unsteered"], 3),
        "sliders_ratio": round(median["sliders"] / median["unsteered"], 3),
        "held_bands": len(levels),
        "meter_ratio": round(median["meter"] / median["steered"], 3),
        "filters_ratio": round(median["filters"] / median["steered"], 3),
        "vector_change_ms": round(1000 * (1 / median["changing"] - 1 / median["steered"]), 2),
    }


def rows(figures: dict) -> list[tuple[str, str, str]]:
    llama_cpp = [("decode, llama.cpp alone", f"{figures['llama_cpp_tok_s']:.1f} tok/s",
                  "baseline: same prompt, tokens and sampler chain")] if "llama_cpp_tok_s" in figures else []
    unsteered = (f"x{figures['unsteered_llama_cpp_ratio']:.3f} of llama.cpp alone"
                 if "llama_cpp_tok_s" in figures else "baseline")
    return [
        *llama_cpp,
        ("decode, unsteered", f"{figures['unsteered_tok_s']:.1f} tok/s", unsteered),
        (f"decode, all {len(BANDS)} bands steered", f"{figures['steered_tok_s']:.1f} tok/s",
         f"x{figures['steered_ratio']:.3f} of unsteered (target >= 0.98)"),
        (f"decode, all bands as sliders ({figures['held_bands']} held)", f"{figures['sliders_tok_s']:.1f} tok/s",
         f"x{figures['sliders_ratio']:.3f} of unsteered"),
        ("decode, + meter", f"{figures['meter_tok_s']:.1f} tok/s",
         f"x{figures['meter_ratio']:.3f} of steered (target >= 0.95)"),
        ("decode, + meter + 2 filters", f"{figures['filters_tok_s']:.1f} tok/s", f"x{figures['filters_ratio']:.3f} of steered"),
        ("one slider change", f"{figures['vector_change_ms']:.2f} ms", "set + re-reserve of the next decode"),
    ]


def main() -> dict:
    with Model(resolve_model_path(None)) as model:
        figures = measure(model)
    print_figures(f"decode on {figures['model']} ({figures['threads']} threads, {TOKENS} tokens, median of {ROUNDS})",
                  rows(figures))
    return figures


if __name__ == "__main__":
    main()
