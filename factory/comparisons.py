"""How the AI judge compares replies: the request it is shown, the orders they are shown in,
principles drawn by weight, and batched scoring into soft labels.

The judge sees the conversation, the responses labelled (A), (B), ... and a principle's judge
question. Its answer is never parsed from free text: the reply is prefilled up to the letter and
``option_logprobs`` over the letters gives a soft label. Every comparison is made in every order
(both orders of a pair; every rotation in a K-way choice) and the probabilities are averaged, which
cancels the judge's position bias. The judge stage (``factory.judge``) writes what this computes;
the trainers' labeller (``factory.feedback``) asks it about a policy's samples while training.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Literal, Sequence

from factory.constitution import Constitution, Principle, render
from factory.failures import Failures
from factory.llm.base import Backend, GenParams, Messages
from factory.preferences import prompt_text
from factory.records import Comparison

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
JUDGE_SYSTEM = "You are a fair judge of AI assistant replies. You answer with one letter."
COT_SYSTEM = "You are a fair judge of AI assistant replies. You think before you answer."
ANSWER_PREFILL = "Answer: ("
COT_ANSWER = "\n\nAnswer: ("


# -- prompts (pure) -----------------------------------------------------------------------------


def _letters(k: int) -> str:
    shown = LETTERS[:k]
    return f"{', '.join(shown[:-1])} or {shown[-1]}"


def judge_messages(conversation: str, question: str, responses: Sequence[str], cot: bool = False) -> Messages:
    """The judge's request: the conversation, the responses as (A), (B), ..., and the question.

    Without reasoning the reply is prefilled up to the letter, whose probability is then read;
    with it, the judge is asked to think first (see ``answer_messages``). Of five wordings tried
    on tests/fixtures/human_pairs.jsonl this one agreed with the human labels most often (README).
    """
    shown = "\n\n".join(f"Response ({letter}): {text}" for letter, text in zip(LETTERS, responses))
    ask = f"User message: {conversation}\n\n{shown}\n\nQuestion: {question}"
    if cot:
        return [{"role": "system", "content": COT_SYSTEM},
                {"role": "user", "content": f"{ask}\nThink it through step by step, then name the better response: "
                                            f"{_letters(len(responses))}."}]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": ask},
            {"role": "assistant", "content": ANSWER_PREFILL}]


def answer_messages(request: Messages, reasoning: str) -> Messages:
    """After chain-of-thought: the judge's reasoning, prefilled up to its letter."""
    return request + [{"role": "assistant", "content": reasoning.strip() + COT_ANSWER}]


# -- judging (batched) --------------------------------------------------------------------------


@dataclass
class Group:
    """One prompt's responses, to be compared under the given principles."""

    messages: Messages
    responses: list[str]
    principles: list[Principle]


def presentations(k: int, mode: Literal["pairwise", "choice"]) -> list[tuple[int, ...]]:
    """The orders responses are shown in: both orders of every pair, or every rotation of all k."""
    if mode == "pairwise":
        return [order for i, j in itertools.combinations(range(k), 2) for order in ((i, j), (j, i))]
    return [tuple((start + t) % k for t in range(k)) for start in range(k)]


def draw_principles(constitution: Constitution, rng: random.Random, count: int | Literal["all"]) -> list[Principle]:
    """``count`` distinct principles drawn by weight (a repeat would be the same judgment again)."""
    if count == "all":
        return list(constitution.principles)
    pool, out = list(constitution.principles), []
    for _ in range(min(count, len(pool))):
        pick = rng.choices(pool, weights=[p.weight for p in pool])[0]
        pool.remove(pick)
        out.append(pick)
    return out


def judge_groups(backend: Backend, groups: Sequence[Group], mode: Literal["pairwise", "choice"] = "pairwise",
                 cot: bool = False, band: tuple[float, float] = (0.4, 0.6), cot_max_tokens: int = 128,
                 failures: Failures | None = None, keys: Sequence[str] = ()) -> list[list[Comparison]]:
    """Every comparison of every group, made in every presentation order, in as few batched calls as possible.

    With ``failures`` (the stage's) and each group's item key in ``keys``, a group one of whose
    requests failed for good is left out (its list stays empty; the item is in ``failures`` with
    why); without it such a failure is raised.
    """

    def call(fn, idx: list[int], requests: list[Messages], *args) -> list:
        # idx: which asks the requests are; a failed one fails its group, whose other asks are skipped.
        live = [(n, r) for n, r in zip(idx, requests) if not lost(shown[n][0])]
        if failures is None:
            results = fn([r for _, r in live], *args) if live else []
        else:
            results = failures.call(fn, [r for _, r in live], [keys[shown[n][0]] for n, _ in live], *args) \
                if live else []
        got = dict(zip((n for n, _ in live), results))
        return [got.get(n) if not lost(shown[n][0]) else None for n in idx]

    def lost(g: int) -> bool:
        return failures is not None and keys[g] in failures

    asks: list[Messages] = []
    shown: list[tuple[int, Principle, tuple[int, ...]]] = []  # (group, principle, order) of each request
    for g, group in enumerate(groups):
        conversation = prompt_text(group.messages)
        for principle in group.principles:
            question = render(principle.judge, prompt=conversation)
            for order in presentations(len(group.responses), mode):
                asks.append(judge_messages(conversation, question, [group.responses[i] for i in order], cot))
                shown.append((g, principle, order))
    reasoning = [""] * len(asks)
    if cot and asks:
        greedy = GenParams(temperature=0.0, max_tokens=cot_max_tokens)
        reasoning = [c[0].text if c else "" for c in call(backend.generate, list(range(len(asks))), asks, greedy)]
        asks = [answer_messages(a, r) for a, r in zip(asks, reasoning)]
    # Requests are grouped by option count: one call per pool of letters.
    scores: list[dict[str, float]] = [{} for _ in asks]
    for width in sorted({len(order) for _, _, order in shown}):
        idx = [n for n, (_, _, order) in enumerate(shown) if len(order) == width]
        for n, s in zip(idx, call(backend.option_logprobs, idx, [asks[n] for n in idx], list(LETTERS[:width]))):
            scores[n] = s
    # P(response i is better than j) in each order that shows both: p_i / (p_i + p_j) there.
    seen: dict[tuple[int, str, int, int], tuple[list[float], list[str]]] = {}
    for n, (g, principle, order) in enumerate(shown):
        if lost(g):
            continue
        prob = {resp: math.exp(scores[n][LETTERS[pos]]) for pos, resp in enumerate(order)}
        for i, j in itertools.combinations(sorted(order), 2):
            p_orders, why = seen.setdefault((g, principle.id, i, j), ([], []))
            total = prob[i] + prob[j]
            p_orders.append(prob[i] / total if total > 0 else 0.5)
            if cot:
                why.append(reasoning[n])
    out: list[list[Comparison]] = [[] for _ in groups]
    for (g, pid, i, j), (p_orders, why) in seen.items():
        p = sum(p_orders) / len(p_orders)
        if cot:
            p = min(max(p, band[0]), band[1])
        out[g].append(Comparison(i=i, j=j, principle_id=pid, p_orders=p_orders, p=p, reasoning=why))
    return out
