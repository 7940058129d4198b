"""The model's own voice: hidden states of its replies when it is asked to feel an emotion, and when it is not.

Persona-vector style (arXiv 2507.21509): the model answers the same prompts once per persona (a system prompt,
or the first line of a plain transcript on a model without a chat template); the residual stream is pooled over
the reply tokens only, read by a tap while the replies are generated, so no second pass is needed. The mean
difference between a band's persona and the neutral persona is that band's "voice" direction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .engine import Model
from .generation import Job, generate_parallel
from .reading import shared_head_length
from .sampling import Sampling

Progress = Callable[[str, int], Callable[[int], None]]


class _ReplyPooling:
    """Sums each job's reply-token rows per layer while generate_parallel decodes (prompt rows are skipped)."""

    def __init__(self, layers: Sequence[int], n_embd: int):
        self.layers = frozenset(layers)
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.shape = (len(layers), n_embd)
        self.sums: dict[object, np.ndarray] = {}
        self.counts: dict[object, int] = {}
        self.norm_sums = np.zeros(len(layers))
        self.rows: list[Job] | None = None

    def on_decode(self, rows: list[Job] | None) -> None:
        self.rows = rows

    def __call__(self, layer: int, hidden: np.ndarray) -> bool:
        if self.rows is None:
            return False
        column = self.column[layer]
        for row, job in enumerate(self.rows[: len(hidden)]):
            if job.tag not in self.sums:
                self.sums[job.tag] = np.zeros(self.shape)
                self.counts[job.tag] = 0
            self.sums[job.tag][column] += hidden[row]
            self.norm_sums[column] += float(np.linalg.norm(hidden[row]))
            if column == 0:
                self.counts[job.tag] += 1
        return False

    def mean(self, tag: object) -> np.ndarray:
        return self.sums[tag] / max(self.counts[tag], 1) if tag in self.sums else np.zeros(self.shape)


@dataclass
class VoiceCapture:
    """Per persona key: (prompts, layers, n_embd) mean states over each reply's tokens, and the replies."""

    layers: list[int]
    states: dict[str, np.ndarray]
    token_norm: np.ndarray  # (layers,): mean L2 norm of one reply token's residual stream
    texts: dict[str, list[str]]
    seconds: float
    tokens: int


def persona_tokens(model: Model, persona: str | None, prompt: str) -> tuple[list[int], tuple[str, ...]]:
    """The prompt tokens (and stop strings) of ``prompt`` asked under ``persona`` (None: no system line)."""
    messages = ([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": prompt}]
    text, stops = model.chat_prompt(messages)
    return model.tokenize(text, parse_special=True), stops


def capture_voice(
    model: Model,
    personas: dict[str, str],
    prompts: Sequence[str],
    layers: Sequence[int],
    reply_tokens: int,
    seed: int,
    parallel: int | None = None,
    progress: Progress | None = None,
) -> VoiceCapture:
    """Generate a reply to every prompt under every persona and pool its hidden states at ``layers``."""
    sampling = Sampling(temperature=0.7, top_p=0.95, max_tokens=reply_tokens)
    jobs = []
    for key, persona in personas.items():
        asked = [persona_tokens(model, persona, prompt) for prompt in prompts]
        head = shared_head_length([tokens for tokens, _ in asked])
        jobs += [Job(tokens, sampling, seed + index, stop=stops, tag=(key, index), shared=head)
                 for index, (tokens, stops) in enumerate(asked)]
    advance = progress("generating persona replies", len(jobs)) if progress else (lambda _n: None)
    pooling = _ReplyPooling(layers, model.info.n_embd)
    texts = {key: [""] * len(prompts) for key in personas}
    generated = 0
    started = time.perf_counter()
    with model.parallel_context(jobs, parallel) as context:
        context.set_tap(pooling)
        try:
            for finished in generate_parallel(context, jobs, on_decode=pooling.on_decode):
                key, index = finished.job.tag
                texts[key][index] = finished.text
                generated += len(finished.tokens)
                advance(1)
        finally:
            context.set_tap(None)
    states = {key: np.stack([pooling.mean((key, i)) for i in range(len(prompts))]) for key in personas}
    rows = max(sum(pooling.counts.values()), 1)
    return VoiceCapture(list(layers), states, pooling.norm_sums / rows, texts, time.perf_counter() - started,
                        generated)
