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
from pathlib import Path

from tqdm import tqdm

from factory.config import RunConfig
from factory.constitution import Constitution, Principle, load_constitution, render
from factory.llm.base import Backend, Messages
from factory.records import ChatExample, PreferencePair, Revision, Round, Task, file_sha256, work_key
from factory.store import Store, StoreError, input_objects
from factory.summary import StageSummary

OUTPUT = "revisions.jsonl"
SFT = "sft.jsonl"
PAIRS = "critique_pairs.jsonl"
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


# -- prompts to work on -------------------------------------------------------------------------


def load_prompts(path: Path | None, limit: int | None, run_dir: Path) -> list[tuple[str, str]]:
    """(id, prompt) pairs: from a JSONL file of {"prompt": ...}, else from the run's tasks."""
    out: list[tuple[str, str]] = []
    if path is not None:
        expected = "an object with a non-empty string 'prompt'"
        for number, obj in input_objects(path, expected):
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise StoreError(f"{path}:{number}: expected {expected}")
            out.append((str(obj.get("id", f"line-{number}")), obj["prompt"]))
    else:
        tasks = run_dir / "tasks.jsonl"
        if not tasks.is_file():
            raise FileNotFoundError(f"{tasks}: no prompts; run bootstrap and instances first, or name a prompts file")
        for t in Store(tasks, Task).records():
            first = t.instances[0].input if t.instances else ""
            out.append((t.key, f"{t.instruction}\n\n{first}" if first else t.instruction))
    return out[:limit] if limit else out


# -- the stage ----------------------------------------------------------------------------------


def run_critique(cfg: RunConfig, backend: Backend, run_dir: Path) -> StageSummary:
    cc = cfg.critique
    constitution = load_constitution(cc.constitution)
    digest = file_sha256(cc.constitution)
    prompts = load_prompts(cc.prompts, cc.limit, run_dir)
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
    store = Store(run_dir / OUTPUT, Revision)
    sft = Store(run_dir / SFT, ChatExample)
    pairs = Store(run_dir / PAIRS, PreferencePair) if cc.pairs else None
    # A crash between the appends of one batch: complete the derived files from the revisions.
    keys = {k for k, _, _ in items}
    done = [r for r in store.records() if r.key in keys]
    _derive(done, sft, pairs, constitution.name)
    todo = [it for it in items if it[0] not in store]
    params = cc.params.model_copy(update={"n": 1})
    written = 0
    with tqdm(total=len(items), initial=len(items) - len(todo), desc="critique", unit="prompt") as bar:
        for start in range(0, len(todo), cfg.backend.batch_size):
            batch = todo[start : start + cfg.backend.batch_size]
            seed = cc.seed + start
            # 1. The model's own first answer.
            first = backend.generate([[{"role": "user", "content": text}] for _, _, text in batch],
                                     params.model_copy(update={"seed": seed}))
            latest = [c[0].text for c in first]
            rounds: list[list[Round]] = [[] for _ in batch]
            for r in range(cc.rounds):
                # 2. A principle per prompt, drawn independently each round.
                drawn = [constitution.sample(random.Random(f"{cc.seed}:{key}:{r}"))[0] for key, _, _ in batch]
                asks = [critique_messages(few_shot_turns(constitution, cc.few_shot, p), text, resp, p)
                        for (_, _, text), resp, p in zip(batch, latest, drawn)]
                # 3. Critique the latest response under it.
                critiques = [c[0].text for c in backend.generate(asks, params.model_copy(update={"seed": seed + 1 + 2 * r}))]
                # 4. Optionally ask whether the critique wants a change at all: a soft Yes/No, not parsed text.
                p_change: list[float | None] = [None] * len(batch)
                if cc.skip_unchanged:
                    scores = backend.option_logprobs([change_messages(a, c) for a, c in zip(asks, critiques)], ["Yes", "No"])
                    p_change = [math.exp(s["Yes"]) for s in scores]
                revise = [i for i, p in enumerate(p_change) if p is None or p >= cc.skip_threshold]
                # 5. Revise, given the critique.
                revision_asks = [revision_messages(asks[i], critiques[i], batch[i][2], latest[i], drawn[i]) for i in revise]
                revised = (backend.generate(revision_asks, params.model_copy(update={"seed": seed + 2 + 2 * r}))
                           if revision_asks else [])
                new_text = {i: c[0].text for i, c in zip(revise, revised)}
                asked = {i: a[-1]["content"] for i, a in zip(revise, revision_asks)}
                for i in range(len(batch)):
                    rounds[i].append(Round(
                        principle_id=drawn[i].id,
                        critique_request=asks[i][-1]["content"],
                        critique=critiques[i],
                        p_change=p_change[i],
                        revision_request=asked.get(i),
                        revision=new_text.get(i, latest[i]),
                        skipped=i not in new_text,
                    ))
                    latest[i] = new_text.get(i, latest[i])
            records = [
                Revision(key=key, prompt_id=pid, prompt=text, constitution=constitution.name, constitution_sha256=digest,
                         initial=c[0].text, rounds=rs, final=final, model=backend.model_id)
                for (key, pid, text), c, rs, final in zip(batch, first, rounds, latest)
            ]
            written += store.append(records)  # the source of truth first
            _derive(records, sft, pairs, constitution.name)
            done += records
            bar.update(len(batch))
    used = Counter(rd.principle_id for r in done for rd in r.rounds)
    skipped = sum(rd.skipped for r in done for rd in r.rounds)
    note = f"{cc.rounds} round(s) under '{constitution.name}'; principles used: " + ", ".join(
        f"{pid} {n}" for pid, n in used.most_common())
    if cc.skip_unchanged:
        note += f"; {skipped} revisions skipped as unchanged"
    return StageSummary("critique", len(items), len(items) - len(todo), written, store.path, Counter(), note)


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
