"""The unsteered model as a judge: which of the eight primaries a text expresses, asked of the model itself.

A second scorer beside the lexicon that shares nothing with the directions (no persona prompt, no stimulus): each
text is put in a question, "Text: ... Name the emotion in one word.", and the answer's next token is read for the
eight primaries' names, renormalised over the eight. It is dense where the lexicon is sparse: every reply gets a
figure, not ~1 emotion word per 100. Alone the judge leans to a few names (SmolLM2-135M answers "joy" or "anger"
for 71% of 80 emotional sentences, a balanced set), so it is only read against a baseline, as a lift: replies
under a slider against the unsteered replies to the same prompts. Read against the mean of a balanced set, it
ranks the true emotion first on 88.5% of 96 fresh held-out sentences on SmolLM2-135M-Instruct and 82.3% on
Gemma 3 270M, a base model (benchmarks/judge_agreement.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .bands import PRIMARIES
from .engine import Model
from .reading import group_tails, read_texts

QUESTION = "Text: {text}\n\nName the emotion in one word."
ANSWER = "The emotion expressed in this text is"
_SLOT = "\x00"


@dataclass(frozen=True)
class LabelJudge:
    """The question's tokens around a text, and the first token of each name it reads (PRIMARIES by default)."""

    head: list[int]
    trailer: list[int]
    labels: list[int]

    @classmethod
    def for_model(cls, model: Model, question: str = QUESTION, answer: str = ANSWER,
                  names: Sequence[str] = PRIMARIES) -> "LabelJudge | None":
        """The judge in ``model``'s chat format (a plain transcript without one); None where two names start with
        the same token, so the answer could not tell them apart."""
        text, _ = model.chat_prompt([{"role": "user", "content": question.format(text=_SLOT)}])
        text += (" " if text.endswith(":") else "") + answer
        before, after = text.split(_SLOT)
        labels = [model.tokenize(" " + name, add_special=False)[0] for name in names]
        if len(set(labels)) < len(labels):
            return None
        return cls(model.tokenize(before, parse_special=True),
                   model.tokenize(after, add_special=False, parse_special=True), labels)

    def scores(self, model: Model, texts: Sequence[Sequence[int]], progress=None) -> np.ndarray:
        """(len(texts), names): log-probability of the judge giving each name for each text (tokens), over the
        names only."""
        longest = max((len(text) for text in texts), default=0) + len(self.head) + len(self.trailer)
        n_batch = max(1024, longest)
        groups = group_tails(self.head, [list(text) + self.trailer for text in texts], n_batch, len(self.head))
        with model.context(n_ctx=n_batch, n_seq=64, n_batch=n_batch) as context:
            answer = read_texts(context, groups, next_tokens=self.labels, progress=progress).next_logprobs
        return answer - np.logaddexp.reduce(answer, axis=1, keepdims=True)
