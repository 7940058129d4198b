"""Should the slider steer the prompt too, or only the reply? Both, measured on held-out prompts.

eqz steers every token it decodes: the chat template, the system prompt and the user's message as well as the
reply. The alternative keeps the prompt unsteered, so the model reads the question as it would without a slider,
and adds the vector to reply tokens only. Here both ways run side by side at the same gains and seeds (the bank's
+1 scaled by each gain): 16 held-out prompts x ``--samples`` x 64 tokens, through the f16 copy where training uses
one, scored by the NRC lexicon and by the unsteered model as judge, with perplexity under the model asked for the
band. Steering less of the sequence is gentler per unit of gain, so the fair comparison is at the same fluency: for
each band, the reply-only effect at the perplexity whole-sequence +1 reaches (interpolated between gains in log
perplexity).

    python benchmarks/reply_only.py [--model GGUF] [--samples 2] [--gains 1,1.5,2] [--out reply_only.json]
    python benchmarks/reply_only.py --report reply_only.json   # the tables again, no generating

The bank is the model's, found as eqz finds it ($EQZ_VECTORS first).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz import generation
from eqz.bands import PRIMARIES
from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import EVAL_SEED, ReplyBench, Setting, bank_persona, prompt_sets, result_row
from eqz.models import resolve_model_path

WAYS = ("whole", "reply")


class ReplyOnlyVector(np.ndarray):
    """A control vector that the tap leaves out of prompt decodes."""


class ReplyOnlySteering(generation.RowSteering):
    """RowSteering that skips a prompt decode whose job's vector is a ReplyOnlyVector (a prompt decode announces
    one job's rows)."""

    in_prompt = False  # True while PromptHeads.decode runs

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        if self.in_prompt and self.rows and isinstance(self.rows[0][0], ReplyOnlyVector):  # (vector, filters)
            return False
        return super().__call__(layer, hidden)


def _marking_prompts(decode):
    """PromptHeads.decode, telling ReplyOnlySteering while it runs."""
    def marked(heads, *args, **kwargs):
        ReplyOnlySteering.in_prompt = True
        try:
            return decode(heads, *args, **kwargs)
        finally:
            ReplyOnlySteering.in_prompt = False
    return marked


def measure(model_path: str | None, samples: int, gains: tuple[float, ...]) -> dict:
    generation.PromptHeads.decode = _marking_prompts(generation.PromptHeads.decode)
    generation.RowSteering = ReplyOnlySteering
    started = time.perf_counter()
    with Model(resolve_model_path(model_path)) as file_model, file_model.unpacked() as model:
        bank = require_bank(model.info)
        settings = [Setting("unsteered")]
        for band in PRIMARIES:
            persona = bank_persona(bank, band)
            for gain in gains:
                vector = np.asarray(bank.mix({band: gain}))
                settings.append(Setting(("whole", band, gain), vector, judge=persona))
                settings.append(Setting(("reply", band, gain), vector.view(ReplyOnlyVector), judge=persona))
        bench = ReplyBench(model, prompt_sets()["eval"], 64, EVAL_SEED, bank.steered_layers, samples=samples,
                           labels=True)
        results = bench.run(settings)
    baseline = results.pop("unsteered")
    rows = {" ".join(map(str, key)): result_row(key[1], key[2], replies, baseline, samples)
            for key, replies in results.items()}
    return {"model": model.info.name, "bank": str(bank.directory), "threads": model.threads, "samples": samples,
            "gains": list(gains), "seed": EVAL_SEED, "rows": rows, "baseline_examples": baseline.texts[::samples][:3],
            "seconds": round(time.perf_counter() - started)}


def at_perplexity(curve: list[tuple[float, float]], target: float) -> float | None:
    """The effect where a gain curve of (perplexity ratio, effect) reaches ``target``, linear in log perplexity;
    None where the curve does not span it."""
    for (p0, e0), (p1, e1) in zip(curve, curve[1:]):
        if p0 <= target <= p1 and p1 > p0:
            return e0 + (math.log(target) - math.log(p0)) / (math.log(p1) - math.log(p0)) * (e1 - e0)
    return None


def report(run: dict) -> str:
    rows, gains = run["rows"], run["gains"]
    lines = [f"{run['model']}: {run['samples']} samples x 64 tokens per held-out prompt, {run['threads']} threads, "
             f"{run['seconds']} s", "", "| way | gain | lexicon clear (expected) | judge clear (expected) | fluent |",
             "|---|---|---|---|---|"]
    for way in WAYS:
        for gain in gains:
            r = [rows[f"{way} {band} {gain}"] for band in PRIMARIES]
            lines.append(f"| {way} | {gain:g} | {sum(x['clear'] for x in r)}/8 ({sum(x['clear_share'] for x in r):.1f}) "
                         f"| {sum(x['judged_clear'] for x in r)}/8 ({sum(x['judged_clear_share'] for x in r):.1f}) "
                         f"| {sum(x['fluent'] for x in r)}/8 |")
    lines += ["", "| band | whole +1: ppl (asked) | lexicon / judge | reply-only at that ppl: lexicon / judge |",
              "|---|---|---|---|"]
    for band in PRIMARIES:
        whole = rows[f"whole {band} {gains[0]}"]
        cells = []
        for key in ("effect", "judged_effect"):
            curve = [(rows[f"reply {band} {g}"]["ppl_ratio"], rows[f"reply {band} {g}"][key]) for g in gains]
            value = at_perplexity(curve, whole["ppl_ratio"])
            cells.append("-" if value is None else f"{value:.2f}x")
        lines.append(f"| {band} | {whole['ppl_ratio']:.2f}x | {whole['effect']:.2f}x / {whole['judged_effect']:.2f}x "
                     f"| {cells[0]} / {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", help="GGUF file [default: $EQZ_MODEL, else the default model]")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--gains", default="1,1.5,2", help="ascending, the first the one to match (1)")
    parser.add_argument("--out", default="reply_only.json")
    parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier run")
    args = parser.parse_args()
    if args.report:
        run = json.loads(Path(args.report).read_text())
    else:
        run = measure(args.model, args.samples, tuple(float(g) for g in args.gains.split(",")))
        Path(args.out).write_text(json.dumps(run, indent=1))
    print(report(run))


if __name__ == "__main__":
    main()
