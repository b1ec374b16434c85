"""The `bootstrap` stage: grow a pool of new instructions from the seeds (Self-Instruct).

Each request shows the model a numbered list of instructions sampled from the pool
(by default 6 seeds and 2 machine-made ones) as the start of its own answer, and
lets it continue the list. The continuation is parsed into candidates; each passes
cheap filters (length, blacklisted words, bad starts) and then the ROUGE-L
near-duplicate filter against the whole pool, seeds included. Survivors join the
pool at once, so later requests see them and later candidates are checked
against them.

Resume: ``bootstrap_requests.jsonl`` holds every request with every candidate's
verdict and is the source of truth. On restart the pool is rebuilt from it, in
request order, and ``instructions.jsonl`` is completed from it if a crash fell
between the two appends. Prompts are sampled with a seed derived from the request
number, so a resumed run asks exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from factory.dedup import RougeIndex
from factory.failures import Failures
from factory.llm.base import Backend, Messages
from factory.records import BootstrapRequest, Candidate, Instruction, Similar, file_sha256, work_key
from factory.seeds import check_seeds, load_seeds
from factory.stage import Context, Stage
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import BootstrapConfig, RunConfig
    from factory.layout import RunLayout

NO_ITEMS = "no_items_in_reply"

ASK = (
    "Come up with a list of tasks that someone could ask a text-based AI assistant to do. "
    "Make every task different from the others: vary the topic, the kind of task (writing, rewriting, "
    "explaining, classifying, extracting, solving, coding, advising) and the wording. "
    "Write one task per line, numbered."
)


def render_prompt(shown: list[str]) -> Messages:
    """The request: the ask, and the shown instructions as the start of the model's own numbered list."""
    listing = "".join(f"{i}. {text}\n" for i, text in enumerate(shown, start=1))
    return [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": f"{listing}{len(shown) + 1}."},
    ]


ITEM = re.compile(r"^\s*(\d{1,4})\s*[.)]\s?(.*)$")


def parse_reply(reply: str, next_number: int, cut_off: bool) -> list[str]:
    """The instructions in a continuation of a numbered list.

    The reply starts inside item ``next_number`` (its number was part of the prompt).
    An item runs until the next numbered line or a blank line; lines that follow an
    item directly are part of it. Unnumbered text after a blank line is the model
    talking about its list, not an item, and ends the list. A reply cut off by the
    token limit loses its last item, which is likely unfinished. Empty items are dropped.
    """
    items: list[str] = []
    current: str | None = None
    epilogue = False
    for line in f"{next_number}.{reply}".split("\n"):
        match = ITEM.match(line)
        if match:
            if current is not None:
                items.append(current)
            current = match.group(2).strip()
        elif not line.strip():
            if current is not None:
                items.append(current)
            current = None
        elif current is not None:
            current = f"{current} {line.strip()}"
        else:
            epilogue = True
            break
    if current is not None:
        items.append(current)
    if cut_off and not epilogue and items:
        items.pop()
    return [item for item in items if item]  # a bare number is no candidate; the raw reply keeps it


def blacklist_pattern(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def check_instruction(text: str, cfg: BootstrapConfig, blacklist: re.Pattern[str] | None) -> str | None:
    """The reason to refuse an instruction before the (costlier) near-duplicate check, or None."""
    if not text:
        return "empty"
    words = len(text.split())
    if words < cfg.min_words:
        return "too_short"
    if words > cfg.max_words:
        return "too_long"
    if not text[0].isascii():
        return "starts_non_ascii"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if re.match(r"write a program\b", text, re.IGNORECASE):
        return "write_a_program"
    if blacklist is not None and blacklist.search(text):
        return "blacklisted_word"
    return None


def sample_shown(rng: random.Random, human: list[str], machine: list[str], cfg: "BootstrapConfig") -> list[str]:
    """The instructions a prompt shows: seeds fill the machine slots while there are too few machine ones."""
    n_machine = min(cfg.machine_examples, len(machine))
    n_human = min(cfg.human_examples + cfg.machine_examples - n_machine, len(human))
    shown = rng.sample(human, n_human) + rng.sample(machine, n_machine)
    rng.shuffle(shown)
    return shown


def run_bootstrap(cfg: "RunConfig", backend: Backend, layout: "RunLayout") -> StageSummary:
    bc = cfg.bootstrap
    human = list(dict.fromkeys(t.instruction.strip() for path in bc.seeds for t in load_seeds(path)))
    settings = {
        "model": backend.model_id,
        "config": bc.model_dump(mode="json", exclude={"target", "max_requests", "requests_per_batch", "seeds"}),
        "seeds": [file_sha256(p) for p in bc.seeds],
    }

    def request_key(index: int) -> str:
        return work_key({"request": index}, settings)

    requests = Store(layout.bootstrap_requests, BootstrapRequest)
    instructions = Store(layout.instructions, Instruction)
    index = RougeIndex(bc.rouge_threshold)
    for text in human:
        index.add(text)
    machine: list[str] = []
    rejected: Counter[str] = Counter()
    unused = 0

    def take(c: Candidate) -> None:
        """Count a candidate's verdict; an accepted one joins the pool."""
        nonlocal unused
        if c.verdict == "accepted":
            index.add(c.text)
            machine.append(c.text)
        elif c.verdict == "over_target":
            unused += 1
        else:
            rejected[c.verdict] += 1

    # 1. Replay the requests already made, in order: the pool is what they accepted.
    done = {r.key: r for r in requests.records()}
    n = 0
    missing: list[Instruction] = []
    while (key := request_key(n)) in done:
        req = done[key]
        for c in req.candidates:
            take(c)
            if c.verdict == "accepted" and work_key(c.text, settings) not in instructions:
                missing.append(_instruction(c, req, settings))
        if req.parse_error:
            rejected[NO_ITEMS] += 1
        n += 1
    instructions.append(missing)  # a crash between the two appends of a batch left these out
    before, requests_before = len(machine), n

    # 2. Ask for more until the target is reached.
    max_requests = bc.max_requests or 20 * bc.target
    blacklist = blacklist_pattern(bc.blacklist)
    failures = Failures(layout.failures, "bootstrap")  # not the stage loop's: the pool grows between batches
    with tqdm(total=bc.target, initial=min(before, bc.target), desc="bootstrap", unit="instr") as bar:
        while len(machine) < bc.target and n < max_requests:
            batch = range(n, min(n + bc.requests_per_batch, max_requests))
            shown = [sample_shown(random.Random(f"{bc.seed}:{i}"), human, machine, bc) for i in batch]
            prompts = [render_prompt(s) for s in shown]
            params = bc.params.model_copy(update={"n": 1, "seed": bc.seed + n})
            replies = failures.call(backend.generate, prompts, [request_key(i) for i in batch], params)
            new_requests, new_instructions = [], []
            for i, s, messages, completions in zip(batch, shown, prompts, replies):
                if completions is None:  # kept, so the replay stays in step; the loop asks again instead
                    new_requests.append(BootstrapRequest(
                        key=request_key(i), index=i, messages=messages, shown=s, reply="", finish_reason="stop",
                        candidates=[], model=backend.model_id, failed=failures.reasons[request_key(i)]))
                    continue
                reply = completions[0]
                items = parse_reply(reply.text, len(s) + 1, reply.finish_reason == "length")
                candidates = []
                for text in items:
                    c = _judge(text, bc, blacklist, index, done_already=len(machine) >= bc.target)
                    take(c)  # at once: the next candidate is checked against this one too
                    candidates.append(c)
                req = BootstrapRequest(
                    key=request_key(i),
                    index=i,
                    messages=messages,
                    shown=s,
                    reply=reply.text,
                    finish_reason=reply.finish_reason,
                    candidates=candidates,
                    model=backend.model_id,
                    parse_error=None if items else "no numbered items in the reply",
                )
                if req.parse_error:
                    rejected[NO_ITEMS] += 1
                new_requests.append(req)
                new_instructions += [_instruction(c, req, settings) for c in candidates if c.verdict == "accepted"]
            requests.append(new_requests)  # the source of truth first
            instructions.append(new_instructions)
            failures.flush()
            n = batch.stop
            bar.update(min(len(machine), bc.target) - bar.n)
            bar.set_postfix(accepted=len(machine), rejected=sum(rejected.values()), requests=n)

    note = f"{n} requests ({n - requests_before} this run)"
    if unused:
        note += f"; {unused} candidates left unchecked once the target was reached"
    if len(machine) < bc.target:
        note += f"; STOPPED at max_requests={max_requests} with {len(machine)} of the target {bc.target}"
    if failures.reasons:
        # Not failed items: the pool is whatever the other requests made; nothing is left to retry.
        note += f"; {len(failures.reasons)} requests failed for good (see {layout.failures.name}), made up by new ones"
    return StageSummary("bootstrap", len(machine), before, len(machine) - before, instructions.path, rejected, note)


def _judge(text: str, cfg: "BootstrapConfig", blacklist, index: RougeIndex, done_already: bool) -> Candidate:
    if done_already:
        return Candidate(text=text, verdict="over_target")
    reason = check_instruction(text, cfg, blacklist)
    if reason:
        return Candidate(text=text, verdict=reason)
    dup = index.near_duplicate(text)
    if dup is not None:
        return Candidate(text=text, verdict="near_duplicate", duplicate_of=index.texts[dup[0]], score=dup[1])
    top, mean = index.most_similar(text, 10)
    similar = [Similar(instruction=index.texts[i], score=score) for i, score in top]
    return Candidate(text=text, verdict="accepted", most_similar=similar, avg_similarity=mean)


def _instruction(c: Candidate, req: BootstrapRequest, settings: dict) -> Instruction:
    return Instruction(
        key=work_key(c.text, settings),
        instruction=c.text,
        request_id=req.key,
        reply=req.reply,
        most_similar=c.most_similar,
        avg_similarity=c.avg_similarity or 0.0,
        model=req.model,
    )


class Bootstrap(Stage):
    name = section = "bootstrap"
    first_round_only = True

    def roles(self, cfg):
        return ("generator",)

    def user_files(self, cfg) -> list[Path]:
        return list(cfg.bootstrap.seeds)

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.bootstrap_requests, layout.instructions]

    def check(self, cfg) -> None:
        check_seeds(cfg.bootstrap.seeds)

    def run(self, ctx: Context) -> StageSummary:
        return run_bootstrap(ctx.cfg, ctx.model("generator"), ctx.layout)


STAGE = Bootstrap()
