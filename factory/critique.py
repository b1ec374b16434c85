"""The `critique` stage: answer, critique under a principle, revise (Constitutional AI, SL stage).

For each prompt the model first answers on its own. Then, for each of R rounds, a
principle is drawn from the constitution by weight (independently each round), the
model is asked to critique its latest response under it, and then to revise the
response given the critique. The constitution's few-shot examples go in front as
earlier chat turns. Optionally the revision is skipped when the model itself says,
as p(Yes) over Yes/No, that its critique asks for no change.

Every round is kept in ``revisions.jsonl`` with the exact requests the model saw;
``sft.jsonl`` holds the (prompt, final revision) chats for fine-tuning, and
``critique_pairs.jsonl`` (optional) prefers the final revision over the first answer.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from factory.constitution import Constitution, Principle, load_constitution, render
from factory.inputs import load_prompts
from factory.llm.base import Backend, Messages
from factory.records import ChatExample, PreferencePair, Revision, Round, file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.stageloop import StageLoop
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.layout import RunLayout

CHANGE_QUESTION = "Does your critique say that the response should be changed? Answer Yes or No."


# -- prompts (pure) -----------------------------------------------------------------------------


def few_shot_turns(constitution: Constitution, count: int, fallback: Principle) -> Messages:
    """The constitution's first ``count`` examples as whole critique -> revision conversations."""
    turns: Messages = []
    for ex in constitution.examples[:count]:
        p = constitution.get(ex.principle) if ex.principle else fallback
        turns += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": render(p.critique, prompt=ex.prompt, response=ex.response)},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": render(p.revision, prompt=ex.prompt, response=ex.response, critique=ex.critique)},
            {"role": "assistant", "content": ex.revision},
        ]
    return turns


def critique_messages(few_shot: Messages, prompt: str, response: str, principle: Principle) -> Messages:
    return few_shot + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
        {"role": "user", "content": render(principle.critique, prompt=prompt, response=response)},
    ]


def revision_messages(critique_msgs: Messages, critique: str, prompt: str, response: str, principle: Principle) -> Messages:
    return critique_msgs + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": render(principle.revision, prompt=prompt, response=response, critique=critique)},
    ]


def change_messages(critique_msgs: Messages, critique: str) -> Messages:
    return critique_msgs + [{"role": "assistant", "content": critique}, {"role": "user", "content": CHANGE_QUESTION}]


# -- the stage ----------------------------------------------------------------------------------


def run_critique(cfg: "RunConfig", backend: Backend, layout: "RunLayout") -> StageSummary:
    cc = cfg.critique
    constitution = load_constitution(cc.constitution)
    digest = file_sha256(cc.constitution)
    prompts = load_prompts(cc.prompts, cc.limit, layout.tasks)
    settings = {
        "model": backend.model_id,
        "constitution": digest,
        "config": cc.model_dump(mode="json", exclude={"constitution", "prompts", "limit", "pairs"}),
    }
    items: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for pid, text in prompts:
        key = work_key({"prompt": text}, settings)
        if key not in seen:  # a prompt given twice is one item; its first id names it
            seen.add(key)
            items.append((key, pid, text))
    store = Store(layout.revisions, Revision)
    sft = Store(layout.sft_data, ChatExample)
    pairs = Store(layout.critique_pairs, PreferencePair) if cc.pairs else None
    # A crash between the appends of one batch: complete the derived files from the revisions.
    keys = {k for k, _, _ in items}
    done = [r for r in store.records() if r.key in keys]
    _derive(done, sft, pairs, constitution.name)
    loop = StageLoop("critique", layout, items, key=lambda it: it[0], store=store, batch_size=cfg.backend.batch_size,
                     unit="prompt")
    params = cc.params.model_copy(update={"n": 1})
    failures = loop.failures
    for start, todo_batch in loop.batches():
        batch = [_Work(*it) for it in todo_batch]
        seed = cc.seed + start
        # An item whose request fails for good leaves the batch at that step; the next run redoes it.
        ask = loop.ask
        # 1. The model's own first answer.
        firsts = ask(backend.generate, batch, [[{"role": "user", "content": w.text}] for w in batch],
                     params.model_copy(update={"seed": seed}), keys=[w.key for w in batch])
        batch = [w for w, _ in firsts]
        for w, c in firsts:
            w.initial = w.latest = c[0].text
        for r in range(cc.rounds):
            # 2. A principle per prompt, drawn independently each round.
            drawn = {w.key: constitution.sample(random.Random(f"{cc.seed}:{w.key}:{r}"))[0] for w in batch}
            asks = {w.key: critique_messages(few_shot_turns(constitution, cc.few_shot, drawn[w.key]), w.text,
                                             w.latest, drawn[w.key]) for w in batch}
            # 3. Critique the latest response under it.
            got = ask(backend.generate, batch, [asks[w.key] for w in batch],
                      params.model_copy(update={"seed": seed + 1 + 2 * r}), keys=[w.key for w in batch])
            batch = [w for w, _ in got]
            critiques = {w.key: c[0].text for w, c in got}
            # 4. Optionally ask whether the critique wants a change at all: a soft Yes/No, not parsed text.
            p_change: dict[str, float | None] = dict.fromkeys(critiques)
            if cc.skip_unchanged:
                scored = ask(backend.option_logprobs, batch,
                             [change_messages(asks[w.key], critiques[w.key]) for w in batch], ["Yes", "No"],
                             keys=[w.key for w in batch])
                batch = [w for w, _ in scored]
                p_change = {w.key: math.exp(sc["Yes"]) for w, sc in scored}
            revise = [w for w in batch if p_change[w.key] is None or p_change[w.key] >= cc.skip_threshold]
            # 5. Revise, given the critique.
            revision_asks = {w.key: revision_messages(asks[w.key], critiques[w.key], w.text, w.latest,
                                                      drawn[w.key]) for w in revise}
            revised = ask(backend.generate, revise, [revision_asks[w.key] for w in revise],
                          params.model_copy(update={"seed": seed + 2 + 2 * r}), keys=[w.key for w in revise])
            new_text = {w.key: c[0].text for w, c in revised}
            batch = [w for w in batch if w.key not in failures]
            for w in batch:
                w.rounds.append(Round(
                    principle_id=drawn[w.key].id,
                    critique_request=asks[w.key][-1]["content"],
                    critique=critiques[w.key],
                    p_change=p_change[w.key],
                    revision_request=revision_asks[w.key][-1]["content"] if w.key in new_text else None,
                    revision=new_text.get(w.key, w.latest),
                    skipped=w.key not in new_text,
                ))
                w.latest = new_text.get(w.key, w.latest)
        # 6. The revisions first (the source of truth), then the files derived from them.
        records = [
            Revision(key=w.key, prompt_id=w.pid, prompt=w.text, constitution=constitution.name,
                     constitution_sha256=digest, initial=w.initial, rounds=w.rounds, final=w.latest,
                     model=backend.model_id)
            for w in batch
        ]
        loop.append(records)
        _derive(records, sft, pairs, constitution.name)
        done += records
    used = Counter(rd.principle_id for r in done for rd in r.rounds)
    skipped = sum(rd.skipped for r in done for rd in r.rounds)
    note = f"{cc.rounds} round(s) under '{constitution.name}'; principles used: " + ", ".join(
        f"{pid} {n}" for pid, n in used.most_common())
    if cc.skip_unchanged:
        note += f"; {skipped} revisions skipped as unchanged"
    return loop.summary(note=note)


@dataclass
class _Work:
    """One prompt on its way through a batch."""

    key: str
    pid: str
    text: str
    initial: str = ""
    latest: str = ""
    rounds: list[Round] = field(default_factory=list)


def _derive(records: list[Revision], sft: Store, pairs: Store | None, constitution: str) -> None:
    sft.append([
        ChatExample(key=r.key, source=r.key, constitution=constitution, principles=[rd.principle_id for rd in r.rounds],
                    messages=[{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.final}])
        for r in records if r.key not in sft
    ])
    if pairs is not None:
        pairs.append([
            PreferencePair(key=r.key, prompt=r.prompt, chosen=r.final, rejected=r.initial, source=r.key)
            for r in records if r.key not in pairs and r.final.strip() != r.initial.strip()
        ])


class Critique(Stage):
    name = section = "critique"

    def roles(self, cfg):
        return ("generator",)

    def user_files(self, cfg) -> list[Path]:
        cc = cfg.critique
        return [cc.constitution] + ([cc.prompts] if cc.prompts is not None else [])

    def needs(self, cfg, layout) -> list[Need]:
        if cfg.critique.prompts is not None:
            return []
        return [Need(layout.tasks, "no prompts to critique", "run instances first, or set critique.prompts")]

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.revisions, layout.sft_data] + ([layout.critique_pairs] if cfg.critique.pairs else [])

    def check(self, cfg) -> None:
        load_constitution(cfg.critique.constitution)  # nothing runs on a half-valid constitution
        if cfg.critique.prompts is not None:
            load_prompts(cfg.critique.prompts, None, Path())

    def run(self, ctx: Context) -> StageSummary:
        return run_critique(ctx.cfg, ctx.model("generator"), ctx.layout)


STAGE = Critique()
