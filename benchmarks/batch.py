"""Batch generation speed on the default model: --parallel 1 vs --parallel 8, against llama.cpp itself.

eqz: its own batch machinery (run_batch, the same code as `eqz batch`) on 24 neutral prompts x up to 64 tokens,
writing to a temporary JSONL. llama.cpp alone, straight through its low-level API, in the same run: (1) the same
work, every prompt decoded in full (8 prompts in one batch), then 64 tokens per sequence, one decode per token for
all sequences, greedy sampling in C; (2) its batched decode alone, the ceiling: one step with 8 sequences vs 1.
Both sides run twice, interleaved, and report their better round.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from report import print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.batch import Output, PromptFile, build_grid, plan, run_batch
from eqz.engine import Model
from eqz.models import resolve_model_path
from eqz.steering import Steerer
from eqz.stimuli import neutral_prompts

PROMPTS = 24
TOKENS = 64
ROUNDS = 2


def eqz_rate(model: Model, prompts: Path, parallel: int, folder: Path) -> float:
    source = PromptFile(str(prompts))
    grid = build_grid((), None, [], {}, [], {"max_tokens": TOKENS}, None)
    count, longest = plan(source, model, grid)
    out = folder / f"p{parallel}.jsonl"
    out.unlink(missing_ok=True)
    sink = Output(str(out), resume=False)
    stats = run_batch(model, Steerer(model.info), source, grid, sink, 1, 0, parallel, longest)
    sink.close()
    return stats.tokens_per_second


def llama_cpp_rate(model: Model, prompts: list[list[int]], parallel: int) -> tuple[float, float]:
    """Tokens/s of llama.cpp generating TOKENS tokens for every prompt, ``parallel`` sequences per decode; and of
    its decode steps alone (no prompts, no sampling)."""
    import llama_cpp as L  # the baseline is llama.cpp itself, so this benchmark talks to it directly

    per_sequence = 512
    params = L.llama_context_default_params()
    params.n_ctx = per_sequence * parallel
    params.n_batch = params.n_ubatch = per_sequence
    params.n_seq_max = parallel
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = model.threads
    params.no_perf = True
    context = L.llama_init_from_model(model._model, params)
    memory = L.llama_get_memory(context)
    batch = L.llama_batch_init(per_sequence, 0, 1)
    samplers = [L.llama_sampler_init_greedy() for _ in range(parallel)]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(items)
        for i, (token, position, sequence, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        assert L.llama_decode(context, batch) == 0

    generated = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), parallel):
        wave = prompts[first : first + parallel]
        L.llama_memory_clear(memory, True)
        decode([(token, position, seq, position == len(tokens) - 1)
                for seq, tokens in enumerate(wave) for position, token in enumerate(tokens)])
        rows = {seq: sum(len(t) for t in wave[: seq + 1]) - 1 for seq in range(len(wave))}
        for step in range(TOKENS):
            nexts = [L.llama_sampler_sample(samplers[seq], context, rows[seq]) for seq in range(len(wave))]
            generated += len(wave)
            decode([(token, len(wave[seq]) + step, seq, True) for seq, token in enumerate(nexts)])
            rows = {seq: seq for seq in range(len(wave))}
    seconds = time.perf_counter() - started
    steps_started = time.perf_counter()  # the ceiling: decode steps alone, every sequence well into its reply
    for step in range(TOKENS):
        decode([(0, len(wave[seq]) + TOKENS + step, seq, True) for seq in range(len(wave))])
    step_rate = len(wave) * TOKENS / (time.perf_counter() - steps_started)
    for sampler in samplers:
        L.llama_sampler_free(sampler)
    L.llama_batch_free(batch)
    L.llama_free(context)
    return generated / seconds, step_rate


def measure(model: Model) -> dict:
    texts = neutral_prompts()[:PROMPTS]
    tokens = [model.tokenize(model.chat_prompt([{"role": "user", "content": text}])[0], parse_special=True)
              for text in texts]
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("\n".join(texts) + "\n")
        for _ in range(ROUNDS):
            for parallel in (1, 8):
                keep(f"eqz_{parallel}", eqz_rate(model, prompts, parallel, folder))
                whole, steps = llama_cpp_rate(model, tokens, parallel)
                keep(f"llama_cpp_{parallel}", whole)
                keep(f"steps_{parallel}", steps)
    eqz_ratio = best["eqz_8"] / best["eqz_1"]
    ceiling = best["steps_8"] / best["steps_1"]
    return {"prompts": PROMPTS, "max_tokens": TOKENS,
            "parallel_1_tok_s": round(best["eqz_1"], 1), "parallel_8_tok_s": round(best["eqz_8"], 1),
            "ratio": round(eqz_ratio, 2),
            "llama_cpp_1_tok_s": round(best["llama_cpp_1"], 1), "llama_cpp_8_tok_s": round(best["llama_cpp_8"], 1),
            "llama_cpp_ratio": round(best["llama_cpp_8"] / best["llama_cpp_1"], 2),
            "steps_1_tok_s": round(best["steps_1"], 1), "steps_8_tok_s": round(best["steps_8"], 1),
            "ceiling_ratio": round(ceiling, 2), "share_of_ceiling": round(eqz_ratio / ceiling, 3),
            "eqz_8_over_llama_cpp_8": round(best["eqz_8"] / best["llama_cpp_8"], 2)}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    return [
        ("batch, --parallel 1", f"{figures['parallel_1_tok_s']:.1f} tok/s", "baseline"),
        ("batch, --parallel 8", f"{figures['parallel_8_tok_s']:.1f} tok/s",
         f"x{figures['ratio']:.2f}; x{figures['eqz_8_over_llama_cpp_8']:.2f} of llama.cpp alone, same work"),
        ("llama.cpp alone, same work", f"{figures['llama_cpp_8_tok_s']:.1f} tok/s",
         f"8 sequences; x{figures['llama_cpp_ratio']:.2f} over 1 ({figures['llama_cpp_1_tok_s']:.1f} tok/s)"),
        ("llama.cpp decode steps, 8 vs 1", f"x{figures['ceiling_ratio']:.2f}",
         f"the ceiling; eqz's ratio is {figures['share_of_ceiling']:.2f} of it (target >= 0.9)"),
    ]


def main() -> dict:
    with Model(resolve_model_path(None)) as model:
        figures = measure(model)
    print_figures(f"batch on the default model ({PROMPTS} prompts x {TOKENS} tokens)", rows(figures))
    return figures


if __name__ == "__main__":
    main()
