"""Preference pairs as the trainers read them: tokenised, held out by prompt, batched by length.

The reward model and DPO read the same pairs the same way: each side is the prompt's ids and the
reply's ids through its end-of-turn token (``scoring.reply_ids``), cut to ``max_length`` with the
prompt's end and the reply's start kept (``scoring.cut``); whole prompts are held out; batches keep a
prompt's pairs side by side (one packed row serves them all) and similar sizes together.
"""

from __future__ import annotations

import json
import random
from typing import NamedTuple

from factory.records import Preference
from factory.train.models import end_ids
from factory.train.scoring import Seq, cut, reply_ids

MEGABATCH = 50
"""Batches per length-sorted window: transformers' length-grouped sampler uses the same 50."""

class Pair(NamedTuple):
    chosen: Seq
    rejected: Seq
    p: float
    """the label: P(chosen is better), 1.0 without soft labels"""
    prompt: int
    """index of its prompt: pairs of one prompt are held out together and batched side by side"""


# -- data (pure) ----------------------------------------------------------------------------------


def make_pairs(tok, prefs: list[Preference], max_length: int, soft_labels: bool) -> tuple[list[Pair], int]:
    """(tokenised pairs, how many had a side cut to max_length)."""
    prompts: dict[str, int] = {}
    pairs, truncated = [], 0
    ends = set(end_ids(tok))
    for rec in prefs:
        key = json.dumps(rec.messages, sort_keys=True)
        group = prompts.setdefault(key, len(prompts))
        sides = []
        for reply in (rec.chosen, rec.rejected):
            prompt, ids = reply_ids(tok, rec.messages, reply, ends)
            truncated += len(prompt) + len(ids) > max_length
            sides.append(cut(prompt, ids, max_length, ends))
        pairs.append(Pair(sides[0], sides[1], rec.p_chosen if soft_labels else 1.0, group))
    return pairs, truncated


def split_by_prompt(pairs: list[Pair], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) pair indices. Whole prompts are held out, so no held-out reply shares a
    prompt with a training one (a K-way group on both sides would leak its prompt's ranking)."""
    groups = sorted({x.prompt for x in pairs})
    random.Random(f"rm-split:{seed}").shuffle(groups)
    k = 0  # one prompt alone is trained on, never held out
    if held_out > 0 and len(groups) >= 2:
        k = min(max(round(len(groups) * held_out), 1), len(groups) - 1)
    held = set(groups[:k])
    return ([i for i, x in enumerate(pairs) if x.prompt not in held],
            [i for i, x in enumerate(pairs) if x.prompt in held])


def pair_cost(x: Pair, share_prompt: bool) -> int:
    """Tokens the model runs for the pair: prompt once and both replies, or two whole rows."""
    (pc, rc), (pr, rr) = x.chosen, x.rejected
    if share_prompt and pc == pr:
        return len(pc) + len(rc) + len(rr)
    return len(pc) + len(rc) + len(pr) + len(rr)


def epoch_batches(pairs: list[Pair], batch_size: int, share_prompt: bool, seed: int, epoch: int) -> list[list[int]]:
    """The indices of ``pairs``, batch by batch, for one epoch.

    Prompts are shuffled (seeded by seed and epoch: a resumed run rebuilds the same order); then,
    within windows of ``MEGABATCH`` batches, pairs are sorted by the size of their prompt's group,
    keeping a prompt's pairs side by side (one row serves them all) and similar sizes together
    (little padding); then the batches are shuffled so that sizes do not come in order.
    """
    rng = random.Random(f"rm-batches:{seed}:{epoch}")
    members: dict[int, list[int]] = {}
    for i, x in enumerate(pairs):
        members.setdefault(x.prompt, []).append(i)
    size = {g: sum(pair_cost(pairs[i], share_prompt) for i in idx) for g, idx in members.items()}
    if share_prompt:  # a reply shared by several pairs of the group is run once
        for g, idx in members.items():
            replies = {s for i in idx for s in (pairs[i].chosen, pairs[i].rejected)}
            size[g] = len(pairs[idx[0]].chosen[0]) + sum(len(r) for _, r in replies)
    groups = list(members)
    rng.shuffle(groups)
    order = [i for g in groups for i in members[g]]
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: (size[pairs[i].prompt], pairs[i].prompt))
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
