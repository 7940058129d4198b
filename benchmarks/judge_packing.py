"""Does the judge's reading of a text depend on what shares its decode? (docs/steering-limits.md section 20)

The same replies (a steering page's examples) are judged three ways: packed in order, packed in reverse order, and
one text per decode (the first 40). For each pair: how far each name's log-probability moves per text, and how far
the geometric mean over the texts moves per name (the figure a page's judge cells are made of). The same again
through the f16 copy of the weights where the model has one (Model.unpacked: Q4_1), whose activations are not
rounded to 8 bits.

    python benchmarks/judge_packing.py [--model PATH] [--page docs/eval-.../eval.json] [-o OUT.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.engine import Model
from eqz.judge import LabelJudge
from eqz.models import resolve_model_path

ALONE = 40


def moved(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two readings of the same texts (texts x names, log-probabilities) lie apart."""
    step = np.abs(a - b)
    return {"texts": len(a), "mean_logp_moved": round(float(step.mean()), 4),
            "max_logp_moved": round(float(step.max()), 4),
            "texts_moved_over_0.01": round(float((step.max(axis=1) > 0.01).mean()), 3),
            "geometric_mean_moved_up_to": round(float(np.abs(np.exp(a.mean(axis=0) - b.mean(axis=0)) - 1).max()), 4)}


def packings(model: Model, texts: list[list[int]]) -> dict:
    judge = LabelJudge.for_model(model)
    packed = judge.scores(model, texts)
    reversed_order = judge.scores(model, texts[::-1])[::-1]
    alone = np.stack([judge.scores(model, [text])[0] for text in texts[:ALONE]])
    return {"reversed order": moved(packed, reversed_order), "one per decode": moved(packed[:ALONE], alone)}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model")
    parser.add_argument("--page", default="docs/eval-smollm2-135m-instruct/eval.json",
                        help="a steering page's eval.json, whose example replies are judged")
    parser.add_argument("-o", "--out")
    args = parser.parse_args()
    rows = json.loads(Path(args.page).read_text())["rows"]
    replies = list(dict.fromkeys(text for row in rows for text in row["examples"]))[:120]
    with Model(resolve_model_path(args.model)) as model:
        texts = [model.tokenize(text, add_special=False) for text in replies]
        figures = {"model": model.info.name, "page": args.page, "weights": {"file": packings(model, texts)}}
        with model.unpacked() as copy:
            if copy is not model:
                figures["weights"]["f16 copy"] = packings(copy, texts)
    text = json.dumps(figures, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
