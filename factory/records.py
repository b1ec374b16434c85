"""Pydantic models of every record on disk, and the work-item key that makes resume work.

Seed tasks are inputs a user writes by hand; every other model here is a stage's
output, one JSON object per line, and derives from ``Record``: it carries the key of
the work item that produced it, so a resumed stage can skip what is already done.
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

KEY_HEX_CHARS = 24
"""96 bits: collisions stay negligible for billions of items, and keys stay readable."""


def work_key(inputs: Any, settings: Any) -> str:
    """The key of one work item: a hash of its inputs and of the stage settings that affect it.

    Canonical JSON (sorted keys, no whitespace, UTF-8) makes the key independent of dict
    order and of the process that computes it; Python's ``hash()`` is salted per process.
    """
    blob = json.dumps(
        {"inputs": inputs, "settings": settings},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,  # NaN is not JSON; a key that other tools cannot reproduce is no key
        default=_jsonable,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def _jsonable(obj: Any) -> Any:
    # json.dumps calls this only for what it cannot encode itself, nested models included.
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"work_key: cannot hash a {type(obj).__name__} ({obj!r}); pass JSON data or pydantic models")


# --- settings models, and what a failed validation says ---


class Strict(BaseModel):
    """The base of every settings model (run config, backend, trainers) and of principle files:
    an unknown key is an error, not ignored, and defaults are checked like given values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


_SHORT = reprlib.Repr()  # a value quoted back in a message: a huge or deeply nested one is cut short
_SHORT.maxstring = 80


def key_path(loc: tuple) -> str:
    """``instances[0].output`` for the pydantic location ``("instances", 0, "output")``; "" for none."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def error_text(err: dict) -> str:
    """A pydantic error's message, without the "Value error, " our own validators' messages get."""
    return err["msg"].removeprefix("Value error, ")


def got(value: Any) -> str:
    """`` (got 'heavy')``: the value a message quotes back, cut short when it is long."""
    return f" (got {_SHORT.repr(value)})"


def describe_errors(e: ValidationError) -> str:
    """Every problem of a failed validation on one line, without the input echoed back (a line may
    hold kilobytes): ``instances[0].output: Field required; score: Input should be ...``."""
    return "; ".join(f"{key_path(err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                     for err in e.errors(include_url=False))


# --- inputs: the Self-Instruct seed schema (https://github.com/yizhongw/self-instruct) ---


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str
    output: str


class SeedTask(BaseModel):
    """One line of a seed file, e.g. ``seed_tasks.jsonl`` from the Self-Instruct repository."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    instruction: str
    instances: list[Instance]
    is_classification: bool


# --- stage outputs ---


class Record(BaseModel):
    """What every stage writes: the key of its work item, and any parse failure.

    A reply that cannot be parsed is kept with its raw text and ``parse_error`` set, so
    it is counted and reported instead of silently vanishing (or being asked again).
    """

    model_config = ConfigDict(extra="forbid")

    key: str
    parse_error: str | None = None


class Generation(Record):
    """The ``generate`` stage: one reply of the model to one seed task's instruction."""

    task_id: str
    messages: list[dict[str, str]]
    """the chat request exactly as sent"""
    text: str
    finish_reason: Literal["stop", "length"]
    model: str
    """the backend's ``model_id``"""
    params: dict[str, Any]
    """the sampling settings used (``GenParams`` dumped)"""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (model files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- bootstrap ---------------------------------------------------------------------------------


class Similar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: str
    score: float
    """ROUGE-L F1"""


class Candidate(BaseModel):
    """One item parsed from a bootstrap reply, and what the filters made of it."""

    model_config = ConfigDict(extra="forbid")

    text: str
    verdict: str
    """``accepted``, or the reason it was refused (``too_short``, ``near_duplicate``, ...)"""
    duplicate_of: str | None = None
    """for ``near_duplicate``: the pool instruction it is too close to"""
    score: float | None = None
    """for ``near_duplicate``: the ROUGE-L F1 with ``duplicate_of``"""
    most_similar: list[Similar] = []
    """for ``accepted``: the ten closest pool instructions at the time"""
    avg_similarity: float | None = None
    """for ``accepted``: mean ROUGE-L F1 against the whole pool at the time"""


class BootstrapRequest(Record):
    """One model request of the bootstrap loop: the source of truth the pool is rebuilt from."""

    index: int
    messages: list[dict[str, str]]
    shown: list[str]
    """the pool instructions shown in the prompt, in their numbered order"""
    reply: str
    finish_reason: Literal["stop", "length"]
    candidates: list[Candidate]
    model: str
    failed: str | None = None
    """why the backend gave no reply (its retries spent), if so; the loop asks again in a new request"""


class Instruction(Record):
    """An accepted machine-made instruction (``instructions.jsonl``)."""

    instruction: str
    request_id: str
    """key of the ``BootstrapRequest`` whose reply held it"""
    reply: str
    """that request's raw reply"""
    most_similar: list[Similar]
    avg_similarity: float
    model: str


class Task(Record):
    """An instruction with the instances written for it (``tasks.jsonl``)."""

    instruction_key: str
    instruction: str
    is_classification: bool
    p_classification: float
    """the model's probability that this is a classification task (Yes vs No)"""
    threshold: float
    """the p_classification from which the task counted as classification"""
    instances: list[Instance]
    reply: str
    finish_reason: Literal["stop", "length"]
    rejected: dict[str, int] = {}
    """instances parsed but refused, by reason"""
    dropped: str | None = None
    """why the task has no instances (``conflicting_outputs``, ``no_instances``), if it has none"""
    model: str


# -- critique -> revise ------------------------------------------------------------------------


class Round(BaseModel):
    """One critique -> revision round, with the exact requests the model saw."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    critique_request: str
    critique: str
    p_change: float | None = None
    """with ``skip_unchanged``: the model's p(Yes) that its critique asks for a change"""
    revision_request: str | None = None
    """None when the revision was skipped"""
    revision: str
    """the response after this round (the previous one, when skipped)"""
    skipped: bool = False


class Revision(Record):
    """A prompt's initial response and every round after it (``revisions.jsonl``)."""

    prompt_id: str
    prompt: str
    constitution: str
    """name of the constitution, and below the sha256 of its file"""
    constitution_sha256: str
    initial: str
    rounds: list[Round]
    final: str
    model: str


class ChatExample(Record):
    """An SFT example as chat messages (``sft.jsonl``): the user prompt, the final revision."""

    messages: list[dict[str, str]]
    source: str
    """key of the record it was made from"""
    constitution: str
    principles: list[str]


class PreferencePair(Record):
    """A preference pair (``critique_pairs.jsonl`` here; the judge writes richer ones)."""

    prompt: str
    chosen: str
    rejected: str
    source: str


# -- judge: AI preferences (RLAIF) --------------------------------------------------------------


class Comparison(BaseModel):
    """One judged comparison of responses ``i`` and ``j`` of a group under one principle."""

    model_config = ConfigDict(extra="forbid")

    i: int
    j: int
    principle_id: str
    p_orders: list[float]
    """P(response i is better) under each presentation order: pairwise, [i shown as (A), i shown as (B)];
    K-way choice, one per rotation of the letters (p_i / (p_i + p_j) within it)"""
    p: float
    """their mean (clamped to the chain-of-thought band, if reasoning was asked for)"""
    reasoning: list[str] = []
    """chain-of-thought mode: the judge's reasoning for each order"""


class Judgment(Record):
    """Every comparison the judge made for one prompt's responses (``judgments.jsonl``, the source of truth)."""

    prompt: str
    """the conversation as text: the user's message, or a Human/Assistant transcript for several turns"""
    messages: list[dict[str, str]]
    """the conversation before the responses, as chat messages"""
    responses: list[str]
    candidates: str
    """where the responses came from: samples, critique or file"""
    source: str
    """the id or key of what the prompt came from"""
    principles: list[str]
    """ids of the principles the responses were judged under"""
    mode: Literal["pairwise", "choice"]
    comparisons: list[Comparison]
    dropped: str | None = None
    """why nothing was judged (``identical_responses``), if so"""
    judge_model: str


class Preference(Record):
    """A preference pair with a soft label (``preferences.jsonl``; also imported human pairs)."""

    prompt: str
    """the conversation as text (see ``Judgment.prompt``)"""
    messages: list[dict[str, str]]
    """the conversation before the responses, as chat messages"""
    chosen: str
    rejected: str
    p_chosen: float
    """P(chosen is better): the judge's soft label, 1.0 for a human label, from the score gap for votes"""
    margin: float
    """p_chosen - (1 - p_chosen), in [0, 1]"""
    principles: list[str] = []
    judge_model: str
    """the judge's model id, or ``human`` / ``votes`` for imported pairs"""
    p_orders: list[float] = []
    """P(chosen is better) under each presentation order, averaged over principles"""
    consistent: bool | None = None
    """whether every presentation order preferred the chosen response (None for imported pairs)"""
    low_confidence: bool = False
    """p_chosen below the judge's ``min_confidence``: kept, but flagged"""
    source: str
    """key of the ``Judgment`` (or the file and line) it came from"""


# -- failures ----------------------------------------------------------------------------------


class Failure(Record):
    """A work item a stage gave up on (``failures.jsonl``): the backend failed for good on one of its
    requests. The item is not in the stage's output, so the next run does it again."""

    stage: str
    item: str
    """the work item's key"""
    reason: str
    """the backend's last error, the API key redacted"""
    time: str
    """when, in UTC (ISO 8601)"""


class Reranked(Record):
    """One prompt's n sampled responses, their rewards, and the best as an SFT conversation."""

    source: str
    """the id or key of what the prompt came from"""
    prompt: str
    messages: list[dict[str, str]]
    """[user prompt, assistant: the chosen response]: what SFT reads"""
    responses: list[str]
    scores: list[float]
    """the reward model's score of each response (after its normalising bias)"""
    chosen: int
    """index of the best-scoring response (the first, on a tie)"""
    reward_model: str
    """the reward-model folder"""
    model: str
    """the generator's ``model_id``"""
