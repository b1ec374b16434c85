"""The judge inside the optimisers: AI feedback on a policy's own samples, as training runs.

Online DPO (Guo et al. 2024, "online AI feedback") labels every pair of a prompt's fresh samples,
and PPO can take the judge's verdict as its reward with no reward model (Lee et al. 2023, "direct
RLAIF"). Both ask the judge stage's own code (``comparisons.judge_groups``): the same prompt, principles
drawn by weight, every pair shown in both orders and the letter probabilities averaged, so a
label is a soft P(i is better than j) with the judge's position bias cancelled.

``Labeller`` holds the judge backend (a fixed model: ``judge.backend``, by default the run's
backend, so the labeller does not change while the policy does), the constitution and how many
principles each prompt is judged under. Two reads:

- ``compare``: for each prompt, the matrix P[i][j] = P(reply i is better than reply j) over its
  replies (all pairs, both orders, averaged over the drawn principles); P[j][i] = 1 - P[i][j].
- ``rate``: a pointwise 1-10 rating per reply, the expected value of the rating read from the
  judge's option log-probabilities over "1/10" ... "10/10" (no position to be biased by).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

from factory.constitution import Constitution, Principle, load_constitution, render
from factory.comparisons import JUDGE_SYSTEM, Group, draw_principles, judge_groups
from factory.llm.base import Backend, Messages
from factory.preferences import prompt_text

RATINGS = [f"{n}/10" for n in range(1, 11)]
"""the options a rating is read over: "N/10" keeps "1" from being a prefix of "10" (each option is
a distinct token sequence, so its probability is its own)"""
RATING_PREFILL = "Rating: "


def rating_messages(conversation: str, question: str, reply: str) -> Messages:
    """The judge's request for a pointwise rating, prefilled up to the number."""
    ask = (f"User message: {conversation}\n\nResponse: {reply}\n\nQuestion: {question}\n"
           "Rate the response by this question from 1 (the worst possible response) to 10 (the best), "
           "in the form N/10.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": ask},
            {"role": "assistant", "content": RATING_PREFILL}]


def expected_rating(logprobs: dict[str, float]) -> float:
    """The expected 1-10 rating under the judge's distribution over ``RATINGS`` (renormalised)."""
    probs = [math.exp(logprobs[option]) for option in RATINGS]
    total = sum(probs)
    if total <= 0:
        return 5.5
    return sum((n + 1) * p for n, p in enumerate(probs)) / total


def rating_reward(rating: float) -> float:
    """A 1-10 rating mapped onto [-1, 1], the range of a pairwise reward 2p - 1 (5.5 -> 0)."""
    return (rating - 5.5) / 4.5


def win_rates(matrix: list[list[float]]) -> list[float]:
    """Each reply's mean P(better) against every other reply of its group (0.5 for a group of one)."""
    k = len(matrix)
    if k < 2:
        return [0.5] * k
    return [sum(matrix[i][j] for j in range(k) if j != i) / (k - 1) for i in range(k)]


@dataclass
class Labeller:
    """The judge as a labeller: ``compare`` a prompt's replies pairwise, or ``rate`` each one."""

    backend: Backend
    constitution: Constitution
    principles: int | Literal["all"] = 1
    seed: int = 0
    cot: bool = False
    """``compare``: the judge reasons first, and its labels are clamped into ``band`` (judge.cot)"""
    band: tuple[float, float] = (0.4, 0.6)
    cot_max_tokens: int = 128
    calls: int = field(default=0, init=False)
    """judge requests made so far (both orders of a pair are two; with ``cot``, its reasoning one more)"""

    @classmethod
    def of(cls, backend: Backend, judge_settings, seed: int | None = None) -> "Labeller":
        """A labeller from the run config's ``[judge]`` section: its constitution, principles per prompt and
        chain-of-thought settings, as the judge stage uses them."""
        js = judge_settings
        return cls(backend, load_constitution(js.constitution), js.principles, js.seed if seed is None else seed,
                   js.cot, tuple(js.cot_band), js.cot_max_tokens)

    def settings(self) -> dict:
        """What the labels depend on besides the model: for the fingerprints of what is made from them."""
        return {"constitution": self.constitution.model_dump(mode="json"), "principles": self.principles,
                "seed": self.seed, "cot": [self.cot, list(self.band), self.cot_max_tokens]}

    def draw(self, draw_key: str) -> list[Principle]:
        """The principles one prompt is judged under, drawn by weight from a seed of its own."""
        return draw_principles(self.constitution, random.Random(f"{self.seed}:{draw_key}"), self.principles)

    def compare(self, prompts: Sequence[Messages], groups: Sequence[Sequence[str]],
                draw_keys: Sequence[str]) -> list[list[list[float]]]:
        """For each prompt, P[i][j] = P(reply i beats reply j) over its replies, from one batched
        judge call: every pair in both orders under the principles drawn for ``draw_keys[g]``."""
        jobs = [Group(list(m), list(replies), self.draw(key)) for m, replies, key in zip(prompts, groups, draw_keys)]
        asks = sum(len(g.principles) * len(g.responses) * (len(g.responses) - 1) for g in jobs)
        self.calls += asks * (2 if self.cot else 1)
        out = []
        for g, comparisons in zip(jobs, judge_groups(self.backend, jobs, "pairwise", self.cot, self.band,
                                                      self.cot_max_tokens)):
            k = len(g.responses)
            sums = [[0.0] * k for _ in range(k)]
            counts = [[0] * k for _ in range(k)]
            for c in comparisons:
                sums[c.i][c.j] += c.p
                counts[c.i][c.j] += 1
            matrix = [[0.5] * k for _ in range(k)]
            for i in range(k):
                for j in range(i + 1, k):
                    if counts[i][j]:
                        matrix[i][j] = sums[i][j] / counts[i][j]
                        matrix[j][i] = 1 - matrix[i][j]
            out.append(matrix)
        return out

    def rate(self, prompts: Sequence[Messages], replies: Sequence[str], draw_keys: Sequence[str]) -> list[float]:
        """The expected 1-10 rating of each reply to its prompt, averaged over its drawn principles
        (read straight from the number's probabilities: ``cot`` applies to ``compare`` only)."""
        asks, owner = [], []
        for n, (messages, reply, key) in enumerate(zip(prompts, replies, draw_keys)):
            conversation = prompt_text(list(messages))
            for principle in self.draw(key):
                asks.append(rating_messages(conversation, render(principle.judge, prompt=conversation), reply))
                owner.append(n)
        self.calls += len(asks)
        sums, counts = [0.0] * len(replies), [0] * len(replies)
        for n, lp in zip(owner, self.backend.option_logprobs(asks, RATINGS) if asks else []):
            sums[n] += expected_rating(lp)
            counts[n] += 1
        return [s / c if c else 5.5 for s, c in zip(sums, counts)]
