"""The `instances` stage: inputs and outputs for each new instruction (Self-Instruct, step 2).

First the model says whether an instruction is a classification task, through
``option_logprobs`` over Yes/No after a few worked examples; the probability is
kept, not only the decision. Classification tasks are then written output-first
(a class label, then an input of that class), so that the labels are not all the
same one; other tasks input-first (an input, possibly none, then its output).
Worked examples in both prompts are seed tasks of the same kind.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from factory.llm.base import Backend, Messages
from factory.records import Instance, Instruction, SeedTask, Task, file_sha256, work_key
from factory.seeds import check_seeds, load_seeds
from factory.stage import Context, Need, Stage
from factory.stageloop import StageLoop
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.layout import RunLayout

# -- is it a classification task? ---------------------------------------------------------------

CLASSIFY_ASK = (
    "Is the task below a classification task, one whose answer is a label from a small, fixed set "
    "(such as positive/negative, yes/no, or one of a few categories)? Answer Yes or No.\n\nTask: {instruction}"
)
CLASSIFY_EXAMPLES = [  # written for this project; balanced, and not about the seed tasks
    ("Tell whether the sentence is sarcastic or sincere.", "Yes"),
    ("Write a limerick about a forgetful cat.", "No"),
    ("Rate the product review as positive, neutral or negative.", "Yes"),
    ("Explain how a refrigerator keeps food cold.", "No"),
    ("Decide if the number given in the input is prime.", "Yes"),
    ("Suggest a name for a bakery that sells only bread.", "No"),
    ("Which planet in the list is the largest? Answer with its name.", "Yes"),
    ("Translate the recipe's steps into a shopping list.", "No"),
]


def p_classification(backend: Backend, instructions: list[str]) -> list[float]:
    scores = backend.option_logprobs([classify_prompt(i) for i in instructions], ["Yes", "No"])
    return [math.exp(s["Yes"]) for s in scores]


def best_cut(p_pos: list[float], p_neg: list[float]) -> float:
    """The threshold on p(Yes) that best separates known classification tasks (``p_pos``)
    from others (``p_neg``): the highest balanced accuracy, placed midway between the two
    scores it falls between so that a small shift in p does not flip a decision."""
    values = sorted(set(p_pos + p_neg))
    best, best_acc = 0.5, -1.0
    for lo, hi in zip([0.0] + values, values + [1.0]):
        cut = (lo + hi) / 2
        acc = (sum(p >= cut for p in p_pos) / len(p_pos) + sum(p < cut for p in p_neg) / len(p_neg)) / 2
        if acc > best_acc:
            best, best_acc = cut, acc
    return best


def classify_prompt(instruction: str) -> Messages:
    messages: Messages = []
    for example, answer in CLASSIFY_EXAMPLES:
        messages += [
            {"role": "user", "content": CLASSIFY_ASK.format(instruction=example)},
            {"role": "assistant", "content": answer},
        ]
    return messages + [{"role": "user", "content": CLASSIFY_ASK.format(instruction=instruction)}]


# -- writing instances --------------------------------------------------------------------------

INPUT_FIRST_ASK = (
    "Write examples for the task below. For each example, give the input after 'Input:' and the "
    "correct output after 'Output:'. If the task needs no input, write 'Input: <none>'.\n\nTask: {instruction}"
)
OUTPUT_FIRST_ASK = (
    "The task below is a classification task. List its possible class labels and, for each label, "
    "write an input that belongs to it: 'Class label:' followed by the label, then 'Input:' followed "
    "by the input.\n\nTask: {instruction}"
)
NO_INPUT = "<none>"


def instance_prompt(instruction: str, is_classification: bool, examples: list[SeedTask]) -> Messages:
    """Worked examples (seed tasks of the same kind) as earlier turns, then the task, with the
    answer's first label already written so the model keeps to the format."""
    ask = OUTPUT_FIRST_ASK if is_classification else INPUT_FIRST_ASK
    messages: Messages = []
    for task in examples:
        shown = "\n\n".join(_render(inst, i, is_classification) for i, inst in enumerate(task.instances, start=1))
        messages += [
            {"role": "user", "content": ask.format(instruction=task.instruction)},
            {"role": "assistant", "content": shown},
        ]
    prefill = "Class label:" if is_classification else "Example 1\nInput:"
    return messages + [
        {"role": "user", "content": ask.format(instruction=instruction)},
        {"role": "assistant", "content": prefill},
    ]


def _render(inst: Instance, number: int, is_classification: bool) -> str:
    if is_classification:
        return f"Class label: {inst.output}\nInput: {inst.input}"
    return f"Example {number}\nInput: {inst.input or NO_INPUT}\nOutput: {inst.output}"


FIELD = re.compile(r"^\s*(input|output|class label)\s*:\s?(.*)$", re.IGNORECASE)
# Each run of spaces can match only one way ("\s*:?\s*" could split it anywhere: quadratic on long runs).
HEADER = re.compile(r"^\s*example\s*\d+\s*(?::\s*)?$", re.IGNORECASE)


def parse_pairs(text: str, first: str, second: str, cut_off: bool) -> list[tuple[str | None, str | None]]:
    """(first, second) field pairs from labelled lines such as ``Input: ...`` / ``Output: ...``.

    A field runs until the next label or ``Example N`` header, so values may span lines.
    A pair ends when its first label comes round again. A reply cut off by the token limit
    loses its last pair, which is likely unfinished.
    """
    pairs: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] | None = None
    field: str | None = None
    for line in text.split("\n"):
        if HEADER.match(line):
            current, field = None, None
            continue
        match = FIELD.match(line)
        if match:
            field = match.group(1).lower()
            if field not in (first, second):
                field = None
                continue
            if current is None or field in current:
                current = {}
                pairs.append(current)
            current[field] = [match.group(2)]
        elif current is not None and field is not None:
            current[field].append(line)
    if cut_off and pairs:
        pairs.pop()
    join = lambda lines: "\n".join(lines).strip() if lines is not None else None  # noqa: E731
    return [(join(p.get(first)), join(p.get(second))) for p in pairs]


def parse_instances(reply: str, is_classification: bool, cut_off: bool) -> tuple[list[Instance], Counter[str]]:
    """Instances from a reply (which continues the prefilled label), and the pairs refused, by reason."""
    rejected: Counter[str] = Counter()
    instances = []
    if is_classification:
        pairs = parse_pairs("Class label:" + reply, "class label", "input", cut_off)
        for label, inp in pairs:
            if inp is None:
                rejected["missing_input"] += 1
                continue
            instances.append(Instance(input=inp, output=label or ""))
    else:
        pairs = parse_pairs("Input:" + reply, "input", "output", cut_off)
        for inp, out in pairs:
            if out is None:
                rejected["missing_output"] += 1
                continue
            instances.append(Instance(input="" if (inp or "").lower() == NO_INPUT else inp or "", output=out))
    return instances, rejected


def filter_instances(instances: list[Instance], limit: int) -> tuple[list[Instance], Counter[str], str | None]:
    """Kept instances, refusals by reason, and a reason to drop the whole task (or None)."""
    rejected: Counter[str] = Counter()
    kept: list[Instance] = []
    outputs_by_input: dict[str, set[str]] = {}
    for inst in instances:
        inp, out = inst.input.strip(), inst.output.strip()
        if not out:
            rejected["empty_output"] += 1
        elif inp == out:
            rejected["input_equals_output"] += 1
        elif inp.endswith(":") or out.endswith(":"):
            rejected["ends_with_colon"] += 1
        elif any(k.input.strip() == inp and k.output.strip() == out for k in kept):
            rejected["duplicate_instance"] += 1
        else:
            kept.append(Instance(input=inp, output=out))
            if inp:  # no input is not a shared input: open tasks ("write a poem") have many right answers
                outputs_by_input.setdefault(inp, set()).add(out)
    if any(len(outs) > 1 for outs in outputs_by_input.values()):
        return [], rejected, "conflicting_outputs"  # the same input with two answers: the task is ill-posed
    if len(kept) > limit:
        rejected["over_limit"] += len(kept) - limit
        kept = kept[:limit]
    return kept, rejected, None if kept else "no_instances"


# -- the stage ----------------------------------------------------------------------------------


def run_instances(cfg: "RunConfig", backend: Backend, layout: "RunLayout") -> StageSummary:
    ic = cfg.instances
    seeds = [t for path in cfg.bootstrap.seeds for t in load_seeds(path)]
    by_kind = {kind: [t for t in seeds if t.is_classification == kind and t.instances] for kind in (True, False)}
    settings = {
        "model": backend.model_id,
        "config": ic.model_dump(mode="json", exclude={"max_instances"}),
        "seeds": [file_sha256(p) for p in cfg.bootstrap.seeds],
    }
    source = layout.instructions
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no instructions to write instances for; run the bootstrap stage first")
    instructions = Store(source, Instruction).records()
    store = Store(layout.tasks, Task)
    items = [(work_key({"instruction": r.instruction}, settings), r) for r in instructions]
    loop = StageLoop("instances", layout, items, key=lambda it: it[0], store=store, batch_size=cfg.backend.batch_size,
                     unit="task")
    threshold = ic.classification_threshold
    if threshold == "auto" and loop.skipped < len(items):
        # Calibrate on seed tasks whose kind is known: a small model's p(Yes) is informative
        # but rarely near 0.5, so a fixed cut would call nothing (or everything) classification.
        rng = random.Random(f"{ic.seed}:calibration")
        pos = [t.instruction for t in rng.sample(by_kind[True], min(ic.calibration_size, len(by_kind[True])))]
        neg = [t.instruction for t in rng.sample(by_kind[False], min(ic.calibration_size, len(by_kind[False])))]
        threshold = 0.5
        if pos and neg:
            ps = p_classification(backend, pos + neg)
            threshold = best_cut(ps[: len(pos)], ps[len(pos) :])
    params = ic.params.model_copy(update={"n": 1})
    for start, batch in loop.batches():
        # 1. Classification or not: a soft label from the Yes/No log-probabilities. An item whose
        #    request failed for good drops out here (and at step 2); the next run does it again.
        scored = loop.ask(backend.option_logprobs, batch, [classify_prompt(r.instruction) for _, r in batch],
                          ["Yes", "No"])
        batch, p_yes = [it for it, _ in scored], [math.exp(s["Yes"]) for _, s in scored]
        kinds = [p >= threshold for p in p_yes]
        # 2. Instances, output-first for classification tasks, input-first otherwise.
        prompts = []
        for (_, r), kind in zip(batch, kinds):
            rng = random.Random(f"{ic.seed}:{r.instruction}")
            examples = rng.sample(by_kind[kind], min(ic.few_shot, len(by_kind[kind])))
            prompts.append(instance_prompt(r.instruction, kind, examples))
        replies = loop.ask(backend.generate, list(zip(batch, p_yes, kinds)), prompts,
                           params.model_copy(update={"seed": ic.seed + start}), keys=[k for k, _ in batch])
        # 3. Parse and filter each reply's instances; a task keeps its reply and what was refused.
        records = []
        for ((key, r), p, kind), (reply,) in replies:
            parsed, rejected = parse_instances(reply.text, kind, reply.finish_reason == "length")
            kept, more, dropped = filter_instances(parsed, ic.max_instances)
            records.append(
                Task(
                    key=key,
                    instruction_key=r.key,
                    instruction=r.instruction,
                    is_classification=kind,
                    p_classification=p,
                    threshold=threshold,
                    instances=kept,
                    reply=reply.text,
                    finish_reason=reply.finish_reason,
                    rejected=dict(rejected + more),
                    dropped=dropped,
                    model=backend.model_id,
                    parse_error=None if parsed else "no instances could be parsed from the reply",
                )
            )
        loop.append(records)
    tasks = store.records()
    keys = {k for k, _ in items}
    mine = [t for t in tasks if t.key in keys]
    rejected: Counter[str] = Counter()
    for t in mine:
        rejected.update(t.rejected)
        if t.dropped:
            rejected[f"task_{t.dropped}"] += 1
    kept = sum(len(t.instances) for t in mine)
    clf = sum(t.is_classification for t in mine)
    note = f"{kept} instances for {sum(1 for t in mine if t.instances)} tasks; {clf} of {len(mine)} tasks classification"
    cuts = sorted({round(t.threshold, 3) for t in mine})
    if cuts:
        how = ", calibrated on the seeds" if ic.classification_threshold == "auto" else ""
        note += f" (p(Yes) >= {', '.join(map(str, cuts))}{how})"
    return loop.summary(rejected, note)


class Instances(Stage):
    name = section = "instances"
    first_round_only = True

    def roles(self, cfg):
        return ("generator",)

    def user_files(self, cfg) -> list[Path]:
        return list(cfg.bootstrap.seeds)  # the worked examples come from the seed tasks

    def needs(self, cfg, layout) -> list[Need]:
        return [Need(layout.instructions, "no instructions to write instances for", "run the bootstrap stage first")]

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.tasks]

    def check(self, cfg) -> None:
        check_seeds(cfg.bootstrap.seeds)

    def run(self, ctx: Context) -> StageSummary:
        return run_instances(ctx.cfg, ctx.model("generator"), ctx.layout)


STAGE = Instances()
