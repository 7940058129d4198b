"""Batch generation speed on the default model: --parallel 1 vs --parallel 8, measured in one run.

Runs eqz's own batch machinery (run_batch, the same code as `eqz batch`) on 24 neutral prompts x 64 tokens,
writing to a temporary JSONL, and prints tokens/s of both and their ratio (target >= 2.5x on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from report import print_figures  # benchmarks/ is on sys.path: it holds the script being run

from eqz.batch import Output, PromptFile, build_grid, plan, run_batch
from eqz.engine import Model
from eqz.models import default_model_path
from eqz.steering import Steerer
from eqz.stimuli import neutral_prompts

PROMPTS = 24
TOKENS = 64


def tokens_per_second(model: Model, prompts: Path, parallel: int, folder: Path) -> float:
    source = PromptFile(str(prompts))
    count, longest = plan(source, model)
    grid = build_grid((), None, [], {}, [], {"max_tokens": TOKENS}, None)
    sink = Output(str(folder / f"p{parallel}.jsonl"), resume=False)
    stats = run_batch(model, Steerer(model.info), source, grid, sink, 1, 0, parallel, longest)
    sink.close()
    return stats.tokens_per_second


def measure(model: Model) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("\n".join(neutral_prompts()[:PROMPTS]) + "\n")
        one = tokens_per_second(model, prompts, 1, folder)
        eight = tokens_per_second(model, prompts, 8, folder)
    return {"prompts": PROMPTS, "max_tokens": TOKENS, "parallel_1_tok_s": round(one, 1),
            "parallel_8_tok_s": round(eight, 1), "ratio": round(eight / one, 2)}


def rows(figures: dict) -> list[tuple[str, str, str]]:
    return [
        ("batch, --parallel 1", f"{figures['parallel_1_tok_s']:.1f} tok/s", "baseline"),
        ("batch, --parallel 8", f"{figures['parallel_8_tok_s']:.1f} tok/s", f"x{figures['ratio']:.2f} (target >= 2.5)"),
    ]


def main() -> dict:
    with Model(default_model_path()) as model:
        figures = measure(model)
    print_figures(f"batch on the default model ({PROMPTS} prompts x {TOKENS} tokens)", rows(figures))
    return figures


if __name__ == "__main__":
    main()
