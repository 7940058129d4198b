"""``eqz eval``: what each slider does, measured. Also the reply bench that ``eqz train`` calibrates with.

Replies are generated to neutral prompts under each band and gain (through the parallel generator, the same
machinery as ``eqz batch``), then read back by the *unsteered* model: perplexity (fluency), the readout of every
band at the bank's read layer (the model's own opinion of the text), and our word list (an independent check).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bank import Bank
from .engine import Job, Model, TextGroup, generate_parallel, read_texts
from .meter import LayerGeometry, geometry, metered_bands
from .sampling import Sampling
from .scoring import distinct2, lexicon_scores, perplexity, repeated_trigrams

MAX_PPL_RATIO = 2.0
MAX_REPEATED_TRIGRAMS = 0.2
DEFAULT_GAINS = (-1.0, -0.5, 0.0, 0.5, 1.0)
CALIBRATION_PROMPTS = 5  # the first prompts of the neutral set; eval uses the ones after them
EVAL_PROMPTS = 16

Progress = Callable[[str, int], Callable[[int], None]]


def prompt_sets() -> dict[str, list[str]]:
    """The built-in neutral prompts, split so that calibration, the meter's zero and eval never share a prompt."""
    from .stimuli import neutral_prompts

    prompts = neutral_prompts()
    end_of_eval = CALIBRATION_PROMPTS + EVAL_PROMPTS
    return {"calibration": prompts[:CALIBRATION_PROMPTS], "eval": prompts[CALIBRATION_PROMPTS:end_of_eval],
            "zero": prompts[end_of_eval:]}


def _no_progress(_stage: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


@dataclass
class ReplySet:
    """Replies generated under one setting, and how the unsteered model and the word list score them."""

    texts: list[str]
    n_tokens: float = 0.0
    ppl: float = math.nan
    nll: float = math.nan
    repeat: float = 0.0
    distinct: float = 1.0
    lexicon: dict[str, float] = field(default_factory=dict)
    readout: dict[str, float] = field(default_factory=dict)
    states: np.ndarray | None = None  # per layer read: the mean over replies of each reply's mean residual stream

    def ppl_ratio(self, baseline: "ReplySet") -> float:
        return math.exp(self.nll - baseline.nll)

    def fluent(self, baseline: "ReplySet", margin: float = 1.0) -> bool:
        """Within the fluency bounds: perplexity <= 2x the unsteered replies', repeated 3-grams <= 20%.
        ``margin`` < 1 tightens both bounds by that share (calibration's guard against its small sample)."""
        ppl_limit = 1 + margin * (MAX_PPL_RATIO - 1)
        return self.ppl_ratio(baseline) <= ppl_limit and self.repeat <= margin * MAX_REPEATED_TRIGRAMS

    def summary(self, band: str, strength: float, baseline: "ReplySet") -> dict:
        return {
            "strength": strength,
            "ppl_ratio": round(self.ppl_ratio(baseline), 3),
            "repeated_3grams": round(self.repeat, 3),
            "lexicon": round(self.lexicon.get(band, 0.0), 3),
            "readout": round(self.readout.get(band, 0.0), 3),
        }


class ReplyBench:
    """Generates replies to a prompt set under given control vectors, then scores them unsteered."""

    def __init__(self, model: Model, prompts: list[str], reply_tokens: int, seed: int, read_layer: int,
                 reader: LayerGeometry | None, steered: list[int], parallel: int = 16, layers: list[int] | None = None,
                 perplexity: bool = True):
        self.model = model
        self.steered = steered
        # layers whose mean state is kept, the read layer first
        self.layers = [read_layer] + [layer for layer in layers or [] if layer != read_layer]
        self.reply_tokens = reply_tokens
        self.seed = seed
        self.read_layer = read_layer
        self.reader = reader
        self.parallel = parallel
        self.perplexity = perplexity  # score fluency (a full pass with log-probabilities), or only read states
        self.prompts = []
        for prompt in prompts:
            text, _ = model.chat_prompt([{"role": "user", "content": prompt}])
            self.prompts.append(model.tokenize(text, parse_special=True))
        self.sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=reply_tokens)

    def run(self, settings: list[tuple[object, np.ndarray | None]], progress: Progress = _no_progress) -> dict:
        """Replies for each (key, control vector) to every prompt, scored. Prompt i has the same seed everywhere.

        Settings are mixed in one batch by steering each row with its own vector (bit-identical to llama.cpp's
        context control vector, see engine._RowSteering), which keeps every slot busy.
        """
        jobs = [
            Job(prompt, self.sampling, self.seed + i, vector=vector, vector_key=key, tag=(key, i))
            for key, vector in settings
            for i, prompt in enumerate(self.prompts)
        ]
        advance = progress("generating replies", len(jobs))
        n = len(self.prompts)
        replies = {key: [[] for _ in range(n)] for key, _ in settings}
        texts = {key: [""] * n for key, _ in settings}
        longest = max(len(p) for p in self.prompts)
        per_sequence = (longest + self.reply_tokens + 8 + 255) // 256 * 256
        parallel = max(1, min(self.parallel, len(jobs)))
        with self.model.context(n_ctx=per_sequence * parallel, n_seq=parallel, unified=False, taps=True) as context:
            for finished in generate_parallel(context, jobs, row_steering=self.steered):
                key, i = finished.job.tag
                replies[key][i] = finished.tokens
                texts[key][i] = finished.text
                advance(1)
        return self.score(replies, texts, progress)

    def score(self, replies: dict, texts: dict, progress: Progress = _no_progress) -> dict:
        keys = list(replies)
        per_group = max(1, 900 // (self.reply_tokens + 1))
        groups, owners = [], []
        for i, prompt in enumerate(self.prompts):
            tails = [(key, replies[key][i]) for key in keys if replies[key][i]]
            for start in range(0, len(tails), per_group):
                chunk = tails[start : start + per_group]
                groups.append(TextGroup(prompt, [t for _, t in chunk], pool_from=len(prompt)))
                owners += [key for key, _ in chunk]
        advance = progress("reading replies with the unsteered model", len(owners))
        with self.model.context(n_ctx=1024, n_seq=64, n_batch=1024, taps=True) as context:
            reading = read_texts(context, groups, self.layers, logprobs=self.perplexity, progress=advance)
        readouts = self.reader.readouts(reading.pooled[:, 0]) if self.reader else None
        results = {}
        for key in keys:
            rows = [k for k, owner in enumerate(owners) if owner == key]
            logprobs = np.concatenate([reading.logprobs[k] for k in rows]) if rows else np.zeros(0)
            results[key] = ReplySet(
                texts=texts[key],
                n_tokens=float(np.mean([len(r) for r in replies[key]])),
                ppl=perplexity(logprobs),
                nll=-float(np.mean(logprobs)) if len(logprobs) else math.nan,
                repeat=float(np.mean([repeated_trigrams(t) for t in texts[key]])),
                distinct=float(np.mean([distinct2(t) for t in texts[key]])),
                lexicon=lexicon_scores(" ".join(texts[key])),
                readout={b: float(readouts[rows, j].mean()) for j, b in enumerate(self.reader.bands)}
                if readouts is not None and rows else {},
                states=reading.pooled[rows].mean(axis=0) if rows else None,
            )
        return results


@dataclass
class EvalResult:
    bands: tuple[str, ...]
    gains: tuple[float, ...]
    rows: list[dict]  # one per (band, gain): scores of the target band, fluency, crosstalk
    prompts: int
    reply_tokens: int

    def table(self, band: str) -> list[dict]:
        return [row for row in self.rows if row["band"] == band]

    def to_dict(self) -> dict:
        return {"bands": list(self.bands), "gains": list(self.gains), "prompts": self.prompts,
                "reply_tokens": self.reply_tokens, "rows": self.rows}

    def dose_response(self) -> dict:
        """Compact per-band figures for bank.yaml."""
        return {
            band: {
                str(row["gain"]): {k: row[k] for k in ("readout", "lexicon", "ppl_ratio", "repeated_3grams", "fluent")}
                for row in self.table(band)
            }
            for band in self.bands
        }


def evaluate(
    model: Model,
    bank: Bank,
    bands: tuple[str, ...],
    gains: tuple[float, ...] = DEFAULT_GAINS,
    prompts: list[str] | None = None,
    reply_tokens: int = 32,
    seed: int = 4321,
    progress: Progress = _no_progress,
) -> EvalResult:
    """Generate under every band x gain and score; gain 0 is generated once and shared by all bands."""
    prompts = prompts or prompt_sets()["eval"]
    metered = metered_bands(bank)
    reader = geometry(bank, bank.read_layer, metered) if metered else None
    bench = ReplyBench(model, prompts, reply_tokens, seed, bank.read_layer, reader, bank.steered_layers)
    settings = [((band, gain), bank.mix({band: gain})) for band in bands for gain in gains if gain != 0]
    results = bench.run([("baseline", None)] + settings, progress)
    baseline = results["baseline"]
    rows = []
    for band in bands:
        for gain in gains:
            replies = baseline if gain == 0 else results[(band, gain)]
            rows.append({
                "band": band,
                "gain": gain,
                "readout": round(replies.readout.get(band, math.nan), 3),
                "lexicon": round(replies.lexicon.get(band, 0.0), 3),
                "ppl": round(replies.ppl, 3),
                "ppl_ratio": round(replies.ppl_ratio(baseline), 3),
                "repeated_3grams": round(replies.repeat, 3),
                "distinct_2": round(replies.distinct, 3),
                "length": round(replies.n_tokens, 1),
                "fluent": replies.fluent(baseline),
                "crosstalk": {other: round(replies.readout.get(other, 0) - baseline.readout.get(other, 0), 3)
                              for other in metered if other != band},
                "example": replies.texts[0][:200],
            })
    return EvalResult(bands, gains, rows, len(prompts), reply_tokens)


def non_fluent_gains(result: EvalResult) -> dict[str, list[float]]:
    """Per band, the gains whose replies left the fluency bounds."""
    return {band: [row["gain"] for row in result.table(band) if not row["fluent"]] for band in result.bands}


def write_outputs(result: EvalResult, directory: Path, plot: bool = False) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "eval.json", directory / "eval.csv"]
    written[0].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with written[1].open("w", newline="") as handle:
        columns = ["band", "gain", "readout", "lexicon", "ppl", "ppl_ratio", "repeated_3grams", "distinct_2", "length",
                   "fluent"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    if plot:
        written.append(plot_dose_response(result, directory / "dose_response.png"))
    return written


def plot_dose_response(result: EvalResult, path: Path) -> Path:
    """One panel per band: readout and word-list score against gain, perplexity ratio on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import EqzError

        raise EqzError("--plot needs matplotlib: pip install 'eqz[plot]' (or pip install matplotlib)") from None
    columns = 5
    rows = math.ceil(len(result.bands) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for index, band in enumerate(result.bands):
        axis = axes[index // columns][index % columns]
        table = result.table(band)
        gains = [row["gain"] for row in table]
        axis.plot(gains, [row["readout"] for row in table], "o-", color="tab:blue", label="readout")
        axis.plot(gains, [row["lexicon"] for row in table], "s--", color="tab:green", label="words /100")
        axis.set_title(band)
        axis.axhline(0, color="grey", linewidth=0.5)
        fluency = axis.twinx()
        fluency.plot(gains, [row["ppl_ratio"] for row in table], ":", color="tab:red", label="ppl ratio")
        fluency.axhline(MAX_PPL_RATIO, color="tab:red", linewidth=0.5, linestyle="--")
        fluency.set_ylim(0, max(3.0, max(row["ppl_ratio"] for row in table) * 1.1))
        if index == 0:
            axis.legend(fontsize=7, loc="upper left")
            fluency.legend(fontsize=7, loc="lower right")
    for index in range(len(result.bands), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle("eqz dose-response: gain vs readout (blue), word list (green), perplexity ratio (red, right)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
