"""Decode speed on the default model, measured side by side in one run.

Prints eqz's decode tokens/s unsteered and steered (a control vector on every layer), their ratio
(target >= 0.98), and what one control-vector change costs (set + the re-reserve of the next decode), in ms.
Rounds are interleaved and medians reported, because these machines are shared and noisy.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from eqz.engine import Model, Sampler
from eqz.models import default_model_path
from eqz.sampling import Sampling

PROMPT = "Write a long story about a lighthouse keeper."
TOKENS = 128
ROUNDS = 5
SAMPLING = Sampling(temperature=0.7, seed=11, max_tokens=TOKENS)


def steering_matrix(n_layer: int, n_embd: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((n_layer, n_embd)).astype(np.float32) * 0.05
    matrix[0] = 0
    return matrix


def decode_rate(model: Model, context, matrix, change_every_token: bool = False) -> float:
    """Tokens/s of eqz's own generation loop over TOKENS tokens (end-of-turn ignored)."""
    context.clear()
    context.set_control_vector(matrix)
    text, _ = model.chat_prompt([{"role": "user", "content": PROMPT}])
    context.prefill(model.tokenize(text, parse_special=True))
    sampler = Sampler(model, SAMPLING, SAMPLING.seed)
    flip = [matrix, matrix * 0.5] if change_every_token else None
    started = time.perf_counter()
    for index, _ in enumerate(context.stream(sampler, TOKENS, ignore_eos=True)):
        if change_every_token:
            context.set_control_vector(flip[index % 2])
    seconds = time.perf_counter() - started
    sampler.close()
    return TOKENS / seconds


def measure(model: Model, rounds: int = ROUNDS) -> dict:
    matrix = steering_matrix(model.info.n_layer, model.info.n_embd)
    rates: dict[str, list[float]] = {"unsteered": [], "steered": [], "changing": []}
    with model.context(n_ctx=1024) as context:
        decode_rate(model, context, None)  # warm-up
        for _ in range(rounds):
            rates["unsteered"].append(decode_rate(model, context, None))
            rates["steered"].append(decode_rate(model, context, matrix))
            rates["changing"].append(decode_rate(model, context, matrix, change_every_token=True))
    unsteered, steered, changing = (statistics.median(rates[k]) for k in ("unsteered", "steered", "changing"))
    return {
        "model": model.info.name,
        "threads": model.threads,
        "tokens": TOKENS,
        "rounds": rounds,
        "unsteered_tok_s": round(unsteered, 1),
        "steered_tok_s": round(steered, 1),
        "steered_ratio": round(steered / unsteered, 3),
        "vector_change_ms": round(1000 * (1 / changing - 1 / steered), 2),
    }


def main() -> dict:
    with Model(default_model_path()) as model:
        figures = measure(model)
    print(f"decode on {figures['model']} ({figures['threads']} threads, {TOKENS} tokens, median of {ROUNDS})")
    print(f"  unsteered        {figures['unsteered_tok_s']:8.1f} tok/s")
    print(f"  steered          {figures['steered_tok_s']:8.1f} tok/s   ratio {figures['steered_ratio']:.3f} (target >= 0.98)")
    print(f"  one vector change {figures['vector_change_ms']:7.2f} ms")
    return figures


if __name__ == "__main__":
    main()
