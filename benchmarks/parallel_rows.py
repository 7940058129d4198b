"""Does a reply depend on how many other replies share its decode steps? Generates the same seeded jobs at
``--parallel`` 1 and at wider batches and counts the replies that come out token for token the same.

eqz lays every sequence out as if it ran alone (generation.generate_parallel), so what is left is llama.cpp's CPU
kernels: where a weight type is multiplied row by row the answer is "all", where a kernel takes several rows at once
(repacked K-quants from 4 rows) it can round differently and a sampled token can change.

    python benchmarks/parallel_rows.py [MODEL.gguf ...] [--replies 8] [--max-tokens 48]
"""

from __future__ import annotations

from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.engine import Model
from eqz.eval import prompt_sets
from eqz.generation import Job, generate_parallel
from eqz.models import resolve_model_path
from eqz.sampling import Sampling
from eqz.voice import persona_tokens

WIDTHS = (1, 2, 4, 8)


def replies(model: Model, parallel: int, count: int, max_tokens: int) -> list[list[int]]:
    """``count`` seeded replies to the training prompts, decoded ``parallel`` at a time (fixed length)."""
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=max_tokens)
    jobs = []
    for index, prompt in enumerate(prompt_sets()["train"][:count]):
        tokens, stops = persona_tokens(model, None, prompt)
        jobs.append(Job(tokens, sampling, 100 + index, stop=stops, ignore_eos=True))
    with model.parallel_context(jobs, parallel) as context:
        return [finished.tokens for finished in generate_parallel(context, jobs)]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--replies", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    print(f"| model | {' | '.join(f'--parallel {width}' for width in WIDTHS[1:])} |")
    print(f"|---|{'---|' * (len(WIDTHS) - 1)}")
    for path in args.models or [resolve_model_path(None)]:
        with Model(path) as model:
            alone = replies(model, 1, args.replies, args.max_tokens)
            cells = []
            for width in WIDTHS[1:]:
                wide = replies(model, width, args.replies, args.max_tokens)
                cells.append(f"{sum(a == b for a, b in zip(alone, wide))}/{len(alone)} as alone")
        print(f"| {path.name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
