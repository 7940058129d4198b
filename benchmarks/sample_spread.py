"""How far the held-out verdicts move with the sampling alone: the shipped bank at +1, and asking, over more samples.

The steering page draws 2 replies per held-out prompt, and a second sampling seed moved its count by a band
(docs/steering-limits.md). *Holds* redraws the prompts but keeps each reply's words, so it cannot show this. Here
every setting draws ``--samples`` replies per prompt: sample s of prompt i has seed EVAL_SEED + i + 1000 s, so
samples 0-1 have the page's seeds (their words differ from the page's: the replies are made through the f16 copy
training uses, `Model.unpacked`, about twice as fast here). The run is cut into replicas of 2 samples, and each
replica is judged as a run of its own (lexicon and the unsteered model as judge); all samples pooled give the
firmer verdict. Asking for the emotion in the system prompt is measured the same way in the same run. Perplexity
is not read: fluency is the steering page's business.

    python benchmarks/sample_spread.py [--model GGUF] [--samples 6] [--max-tokens 64] [--out sample_spread.json]

The bank is the model's, found as eqz finds it ($EQZ_VECTORS first; banks are found as $EQZ_VECTORS/*/bank.yaml, so
for one made by `eqz train --out DIR` set it to the folder above DIR).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# benchmarks/ is on sys.path: it holds the script being run
from report import script_parser

from eqz.bands import PRIMARIES
from eqz.bank import require_bank
from eqz.engine import Model
from eqz.eval import EVAL_SEED, ReplyBench, Setting, bank_persona, prompt_sets, result_row
from eqz.models import resolve_model_path

REPLICA_SAMPLES = 2  # the steering page's samples per prompt
WAYS = {"steered +1": "steered", "asked": "asked"}


def replica_counts(results: dict, samples: int) -> list[dict]:
    """Per replica of REPLICA_SAMPLES samples and per way: the primaries clear by the lexicon and by the judge."""
    out = []
    for first in range(0, samples, REPLICA_SAMPLES):
        kept = range(first, first + REPLICA_SAMPLES)
        baseline = results["unsteered"].samples_only(samples, kept)
        entry = {"samples": [first, first + REPLICA_SAMPLES - 1]}
        for way in WAYS.values():
            replies = {band: results[(way, band)].samples_only(samples, kept) for band in PRIMARIES}
            entry[way] = {"lexicon": [b for b in PRIMARIES if replies[b].clear(b, baseline)],
                          "judge": [b for b in PRIMARIES if replies[b].judged_clear(b, baseline)]}
        out.append(entry)
    return out


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", help="GGUF file [default: $EQZ_MODEL, else the default model]")
    parser.add_argument("--samples", type=int, default=6, help=f"a multiple of {REPLICA_SAMPLES}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="sample_spread.json")
    args = parser.parse_args()
    if args.samples % REPLICA_SAMPLES or args.samples < 2 * REPLICA_SAMPLES:
        parser.error(f"--samples must be a multiple of {REPLICA_SAMPLES}, at least {2 * REPLICA_SAMPLES}")
    started = time.perf_counter()
    with Model(resolve_model_path(args.model)) as file_model, file_model.unpacked() as model:
        bank = require_bank(model.info)
        personas = {band: bank_persona(bank, band) for band in PRIMARIES}
        settings = [Setting("unsteered")]
        settings += [Setting(("steered", band), bank.mix({band: 1.0})) for band in PRIMARIES]
        settings += [Setting(("asked", band), persona=personas[band]) for band in PRIMARIES]
        bench = ReplyBench(model, prompt_sets()["eval"], args.max_tokens, EVAL_SEED, bank.steered_layers,
                           samples=args.samples, labels=True)
        results = bench.run(settings, perplexity=False)
    baseline = results["unsteered"]
    # asked only is recorded as eqz eval records its prompt-only rows: no gain
    pooled = {way: [result_row(band, 1.0 if way == "steered" else None, results[(way, band)], baseline, args.samples)
                    for band in PRIMARIES] for way in WAYS.values()}
    replicas = replica_counts(results, args.samples)
    Path(args.out).write_text(json.dumps({"model": model.info.name, "bank": str(bank.directory),
                                          "threads": model.threads, "samples": args.samples,
                                          "max_tokens": args.max_tokens, "seed": EVAL_SEED,
                                          "pooled": pooled, "replicas": replicas,
                                          "seconds": round(time.perf_counter() - started)}, indent=1))
    for label, way in WAYS.items():
        print(f"\n## {label}\n")
        print("| replica (samples) | lexicon clear | judge clear |\n|---|---|---|")
        for replica in replicas:
            cells = [f"{len(replica[way][s])}/8 ({', '.join(replica[way][s]) or 'none'})" for s in ("lexicon", "judge")]
            print(f"| {replica['samples'][0]}-{replica['samples'][1]} | {cells[0]} | {cells[1]} |")
        rows = pooled[way]
        print(f"| all {args.samples} pooled | {sum(r['clear'] for r in rows)}/8 "
              f"(expected {sum(r['clear_share'] for r in rows):.1f}) | {sum(r['judged_clear'] for r in rows)}/8 "
              f"(expected {sum(r['judged_clear_share'] for r in rows):.1f}) |")
        print("\n| band | lexicon lift (most lifted) | clear in replicas | holds pooled | judge lift | "
              "judge clear in replicas | judge holds pooled |\n|---|---|---|---|---|---|---|")
        for row in rows:
            band = row["band"]
            lexicon = sum(band in r[way]["lexicon"] for r in replicas)
            judge = sum(band in r[way]["judge"] for r in replicas)
            print(f"| {band} | {row['effect']:.2f}x ({row['most_lifted']}) | {lexicon}/{len(replicas)} | "
                  f"{row['clear_share']:.0%} | {row['judged_effect']:.2f}x | {judge}/{len(replicas)} | "
                  f"{row['judged_clear_share']:.0%} |")
    print(f"\n{round(time.perf_counter() - started)} s")


if __name__ == "__main__":
    main()
