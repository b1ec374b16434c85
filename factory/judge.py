"""The `judge` stage: an AI judge compares responses under principles and yields soft-labelled
preference pairs (RLAIF, as in Constitutional AI's RL stage, Bai et al. 2022).

The judge sees the conversation, the responses labelled (A), (B), ... and a principle's judge
question. Its answer is never parsed from free text: the reply is prefilled up to the letter and
``option_logprobs`` over the letters gives a soft label p(A).

Small judges prefer whatever is shown first, so every comparison is made in every order (both
orders of a pair; every rotation of the letters in a K-way choice) and the probabilities are
averaged; how often the orders disagree is recorded as the position-flip rate. Each prompt may be
judged under several principles drawn by weight, averaged too. With chain of thought the judge
writes its reasoning first and the letter after it is scored; such labels are overconfident
(Bai et al. 2022, section 4.1), so they are clamped into a band, 0.4-0.6 by default.

``judgments.jsonl`` keeps every comparison of a prompt's responses (the source of truth);
``preferences.jsonl`` holds the pairs derived from it, and ``pairs_standard.jsonl`` /
``pairs_conversational.jsonl`` the same pairs in TRL's two preference formats. With sampled
candidates, ``judge_samples.jsonl`` keeps each prompt's samples, all drawn before the first is
judged: the model that samples (in a later round, the previous round's policy) and the judge
are never needed at once.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from factory.constitution import load_constitution
from factory.failures import Failures
from factory.inputs import load_prompts, load_responses
from factory.llm.base import Backend, Messages
from factory.preferences import FORMATS, prompt_text, write_jsonl
from factory.records import Comparison, Judgment, Preference, Record, Revision, file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.comparisons import Group, draw_principles, judge_groups
from factory.stageloop import StageLoop
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import JudgeConfig, RunConfig
    from factory.layout import RunLayout

def preferences(judgment: Judgment, min_confidence: float) -> list[Preference]:
    """One pair per judged (i, j): the label averaged over principles, the winner as chosen."""
    by_pair: dict[tuple[int, int], list[Comparison]] = {}
    for c in judgment.comparisons:
        by_pair.setdefault((c.i, c.j), []).append(c)
    out = []
    for (i, j), comps in by_pair.items():
        p = sum(c.p for c in comps) / len(comps)
        orders = [sum(vals) / len(vals) for vals in zip(*(c.p_orders for c in comps))]
        chosen, rejected = (i, j) if p >= 0.5 else (j, i)
        if chosen != i:
            p, orders = 1 - p, [1 - v for v in orders]
        out.append(Preference(
            key=f"{judgment.key}:{chosen}>{rejected}", prompt=judgment.prompt, messages=judgment.messages,
            chosen=judgment.responses[chosen], rejected=judgment.responses[rejected], p_chosen=p, margin=2 * p - 1,
            principles=sorted({c.principle_id for c in comps}), judge_model=judgment.judge_model, p_orders=orders,
            consistent=all(v > 0.5 for v in orders), low_confidence=p < min_confidence, source=judgment.key,
        ))
    return out


# -- candidates ---------------------------------------------------------------------------------


@dataclass
class Item:
    key: str
    source: str
    messages: Messages
    responses: list[str] | None
    """None for ``samples``: drawn in the stage's first step"""


def load_items(cfg: "RunConfig", layout: "RunLayout", settings: dict) -> list[Item]:
    jc = cfg.judge
    raw: list[tuple[str, Messages, list[str] | None]] = []
    if jc.candidates == "critique":
        path = layout.revisions
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to judge; run the critique stage first")
        raw = [(r.key, [{"role": "user", "content": r.prompt}], [r.initial, r.final])
               for r in Store(path, Revision).records()]
    elif jc.candidates == "file":
        raw = load_responses(jc.responses)
    else:
        raw = [(pid, [{"role": "user", "content": text}], None) for pid, text in load_prompts(jc.prompts, None, layout.tasks)]
    items, seen = [], set()
    for source, messages, responses in raw[: jc.limit] if jc.limit else raw:
        key = work_key({"messages": messages, "responses": responses}, settings)
        if key not in seen:  # the same prompt and responses twice are one item
            seen.add(key)
            items.append(Item(key, source, messages, responses))
    return items


def _distinct(responses: list[str]) -> list[str]:
    # Identical responses cannot be preferred to each other; keep the first of each.
    out: list[str] = []
    seen: set[str] = set()
    for r in responses:
        if r.strip() and r.strip() not in seen:
            seen.add(r.strip())
            out.append(r)
    return out


# -- the stage ----------------------------------------------------------------------------------


class Sampled(Record):
    """One item's sampled responses (``judge_samples.jsonl``), written before any of them is judged."""

    responses: list[str]


def sample_all(generator: Backend, items: list[Item], per_batch: int, jc: "JudgeConfig", layout: "RunLayout",
               judged: Store[Judgment], failures: Failures) -> dict[str, list[str]]:
    """Step 1 with candidates = samples: the n responses of every item not judged yet, by key.

    The batches and their seeds are the judging's (fixed batches over all items), so an item's
    responses do not depend on which run drew them. Each batch is appended before the next is
    drawn: a resumed run samples only what is not written. All are drawn before the first is
    judged, so the generator can be let go before the judge loads (one engine at a time).
    """
    samples = Store(layout.judge_samples, Sampled)
    loop = StageLoop("judge", layout, items, key=lambda it: it.key, store=samples, batch_size=per_batch,
                     unit="prompt", desc="judge: sample", done=lambda it: it.key in judged or it.key in samples,
                     failures=failures)
    for start, batch in loop.batches():
        params = jc.params.model_copy(update={"n": jc.n, "seed": jc.seed + start})
        # An item whose request failed for good is not written; the next run samples it again.
        sampled = loop.ask(generator.generate, batch, [it.messages for it in batch], params)
        loop.append([Sampled(key=it.key, responses=[c.text for c in completions]) for it, completions in sampled])
    return {s.key: s.responses for s in samples.records()}


def run_judge(cfg: "RunConfig", backend: Backend, layout: "RunLayout", generator: Backend | None = None) -> StageSummary:
    """Judge with ``backend``; with candidates = samples, ``generator`` (default: the judge itself)
    writes the responses: in a later RLAIF round it is the previous round's policy.

    The generator is asked only in step 1 and the judge only from step 2 on, so a caller can hand
    in backends that load on their first call (the pipeline does): the generator's engine is let go
    before the judge's loads. Only their ``model_id`` is read before that (it is in the keys).
    """
    jc = cfg.judge
    generator = generator or backend
    constitution = load_constitution(jc.constitution)
    settings = {
        "model": backend.model_id,
        **({"generator": generator.model_id} if generator is not backend and jc.candidates == "samples" else {}),
        "constitution": file_sha256(jc.constitution),
        # (judge.backend is named by the model id above: a run that sets it to the run's own model keeps its keys)
        "config": jc.model_dump(mode="json", exclude={"constitution", "responses", "prompts", "limit", "min_confidence",
                                                      "backend"}),
    }
    items = load_items(cfg, layout, settings)
    store = Store(layout.judgments, Judgment)
    pairs = Store(layout.preferences, Preference)
    keys = {it.key for it in items}
    done = [j for j in store.records() if j.key in keys]
    made = [p for j in done for p in preferences(j, jc.min_confidence)]
    pairs.append([p for p in made if p.key not in pairs])  # pairs lost in a crash after their judgment
    # A batch holds about batch_size judge requests: n responses make n(n-1) ordered pairs each.
    k = jc.n if jc.candidates == "samples" else 2
    per_batch = max(1, cfg.backend.batch_size // (k * (k - 1)))
    loop = StageLoop("judge", layout, items, key=lambda it: it.key, store=store, batch_size=per_batch, unit="prompt")
    if jc.candidates == "samples":
        # 1. Sample the candidates (n per prompt), every batch of them before the first is judged.
        drawn = sample_all(generator, items, per_batch, jc, layout, store, loop.failures)
        for it in items:
            it.responses = drawn.get(it.key)
    for _, batch in loop.batches():
        batch = [it for it in batch if it.responses is not None]  # not sampled: failed in step 1
        # 2. Principles for each prompt, drawn by weight; identical responses are dropped.
        groups = [Group(it.messages, _distinct(it.responses),
                        draw_principles(constitution, random.Random(f"{jc.seed}:{it.key}"), jc.principles))
                  for it in batch]
        judged = [(it, g) for it, g in zip(batch, groups) if len(g.responses) >= 2]
        # 3. Judge every comparison in every order (one batched scoring call); an item one of whose
        #    requests failed for good is left out, and logged.
        mode = "choice" if jc.kway == "choice" else "pairwise"
        results = iter(judge_groups(backend, [g for _, g in judged], mode, jc.cot, jc.cot_band, jc.cot_max_tokens,
                                    loop.failures, [it.key for it, _ in judged]))
        records = []
        for it, g in zip(batch, groups):
            ok = len(g.responses) >= 2
            comparisons = next(results) if ok else []
            if it.key in loop.failures:
                continue
            records.append(Judgment(
                key=it.key, prompt=prompt_text(it.messages), messages=it.messages, responses=g.responses,
                candidates=jc.candidates, source=it.source, principles=[p.id for p in g.principles],
                mode="choice" if ok and len(g.responses) > 2 and jc.kway == "choice" else "pairwise",
                comparisons=comparisons, dropped=None if ok else "identical_responses",
                judge_model=backend.model_id,
            ))
        # 4. The judgments first (the source of truth), then the pairs derived from them.
        loop.append(records)
        new = [p for j in records for p in preferences(j, jc.min_confidence)]
        pairs.append(new)
        made += new
        done += records
    exports = {style: layout.pairs(style) for style in FORMATS}
    for style, path in exports.items():
        write_jsonl(path, FORMATS[style](made))
    flips = sum(not p.consistent for p in made)
    note = (f"{len(made)} pairs under '{constitution.name}' -> {layout.preferences.name}, "
            f"{', '.join(p.name for p in exports.values())}; "
            f"position flips {flips}/{len(made)}; flagged low-confidence {sum(p.low_confidence for p in made)}")
    if made:
        note += f"; mean p_chosen {sum(p.p_chosen for p in made) / len(made):.3f}"
    return loop.summary(Counter(j.dropped for j in done if j.dropped), note)


class Judge(Stage):
    name = section = "judge"

    def roles(self, cfg):
        return ("generator", "judge") if cfg.judge.candidates == "samples" else ("judge",)

    def user_files(self, cfg) -> list[Path]:
        jc = cfg.judge
        return [jc.constitution] + [f for f in (jc.responses, jc.prompts) if f is not None]

    def needs(self, cfg, layout) -> list[Need]:
        jc = cfg.judge
        if jc.candidates == "critique":
            return [Need(layout.revisions, "nothing to judge", "run the critique stage first, or set judge.candidates "
                         "to samples or file")]
        if jc.candidates == "samples" and jc.prompts is None:
            return [Need(layout.tasks, "no prompts to sample responses for", "run instances first, or set judge.prompts")]
        return []

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.judgments, layout.preferences] + [layout.pairs(style) for style in FORMATS] + (
            [layout.judge_samples] if cfg.judge.candidates == "samples" else [])

    def check(self, cfg) -> None:
        jc = cfg.judge
        load_constitution(jc.constitution)
        if jc.candidates == "file":
            load_responses(jc.responses)
        elif jc.candidates == "samples" and jc.prompts is not None:
            load_prompts(jc.prompts, None, Path())

    def run(self, ctx: Context) -> StageSummary:
        # With sampled candidates the generator samples every prompt first, then the judge loads
        # (letting the generator go, when they differ) and judges: one engine at a time.
        if ctx.cfg.judge.candidates == "samples":
            generator, judge = ctx.model("generator", lazy=True), ctx.model("judge", lazy=True)
            if generator is not judge:  # the same model (spec) samples and judges: one engine, loaded now
                return run_judge(ctx.cfg, judge, ctx.layout, generator=generator)
        return run_judge(ctx.cfg, ctx.model("judge"), ctx.layout)


STAGE = Judge()
