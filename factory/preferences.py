"""Preference pairs in the formats people already have, and in the formats trainers read.

The importers turn HH-RLHF dialogues and community votes into the ``Preference`` records the
AI judge writes, so a reward model can learn from either or both; the exporters write TRL's
standard and conversational formats. A malformed line is refused with its file, 1-based line
and what was expected, or with ``skip_bad`` left out and counted by reason: nothing vanishes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from factory.atomic import atomic_file
from factory.inputs import JSON_KINDS, LONE_SURROGATE, ParseError, kind, load_json, read_bytes, valid_unicode
from factory.records import Preference, work_key


class PreferenceFormatError(ValueError):
    """A line of a preference file is malformed: ``path:line: what is wrong, what was expected``."""

    def __init__(self, path: Path, line: int, reason: str, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path, self.line, self.reason = path, line, reason


class _Bad(Exception):
    """A bad line: a short reason to count it by, and a message for the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def prompt_text(messages: list[dict[str, str]]) -> str:
    """The conversation as one text, for trainers and reports that take a string prompt.

    A lone user message is its own text; anything longer becomes a ``Human:``/``Assistant:``
    transcript, the form HH-RLHF uses, so no turn is lost when a format has room for one string.
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    for m in messages:
        if m["role"] not in _NAMES:
            raise ValueError(f"unknown role {m['role']!r}; expected one of {', '.join(_NAMES)}")
    return "\n\n".join(f"{_NAMES[m['role']]}: {m['content']}" for m in messages)


_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_dialogue(text: str) -> list[dict[str, str]]:
    """Chat messages from an HH-RLHF dialogue: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    Only a blank line followed by ``Human:`` or ``Assistant:`` starts a turn, so a reply that
    contains blank lines stays whole. Each content loses its surrounding whitespace (the
    format puts a space after the colon) and keeps its inner text exactly. An empty final
    Assistant turn parses; whether it is usable is the importer's call.
    """
    parts = _TURN.split("\n\n" + text.lstrip())
    if len(parts) == 1:
        raise ValueError("no turns; expected turns starting with '\\n\\nHuman: ' and '\\n\\nAssistant: '")
    if parts[0]:
        raise ValueError(f"text before the first turn ({parts[0][:40]!r}...); expected it to start with 'Human: '")
    messages = []
    for i, (name, content) in enumerate(zip(parts[1::2], parts[2::2])):
        want = ("Human", "Assistant")[i % 2]
        if name != want:
            raise ValueError(f"turn {i + 1} is {name}, expected {want} (turns alternate, starting with Human)")
        messages.append({"role": "user" if name == "Human" else "assistant", "content": content.strip()})
    if messages[-1]["role"] != "assistant":
        raise ValueError("the dialogue ends with a Human turn; expected it to end with an Assistant turn")
    return messages


def _lines(path: Path, skip_bad: bool, parse: Callable[[Any, str], list[Preference]]) -> tuple[list[Preference], Counter]:
    """Run ``parse`` on the JSON object of every non-blank line; return the records and what was left out.

    UTF-8 is decoded line by line, so an undecodable byte names its line (and with
    ``skip_bad`` costs only that line). A repeated pair is dropped as ``duplicate_pair``:
    a record key must be unique in a file. A valid line that makes no pair counts as ``no_pairs``.
    """
    data = read_bytes(path)  # BOM dropped; decoded line by line below
    records: list[Preference] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            made = parse(_json_line(raw), f"{Path(path).name}:{lineno}")
        except _Bad as e:
            if not skip_bad:
                raise PreferenceFormatError(path, lineno, e.reason, str(e)) from None
            skipped[e.reason] += 1
            continue
        if not made:
            skipped["no_pairs"] += 1
        for rec in made:
            if rec.key in seen:
                skipped["duplicate_pair"] += 1
            else:
                seen.add(rec.key)
                records.append(rec)
    return records, skipped


def _json_line(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("invalid_utf8", f"invalid UTF-8 at byte {e.start + 1} of the line; expected UTF-8 text") from None
    try:
        return load_json(line)
    except ParseError as e:
        at = f" at column {e.column}" if e.column else ""
        raise _Bad("invalid_json", f"invalid JSON ({e.detail}{at}); expected one object per line") from None


_KINDS = {**JSON_KINDS, list: "a list"}  # "answers is a list", as these formats' docs say


def _text(obj: Any, key: str, expected: str) -> str:
    """``obj[key]`` as a string that can be written back as UTF-8."""
    if not isinstance(obj, dict):
        raise _Bad("not_an_object", f"expected {expected}, got {kind(obj, _KINDS)}")
    if key not in obj:
        raise _Bad("missing_key", f"{key!r} is missing; expected {expected}")
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad("not_a_string", f"{key!r} is {kind(value, _KINDS)}; expected a string")
    if not valid_unicode(value):
        raise _Bad("invalid_unicode", f"{key!r} holds {LONE_SURROGATE}")
    return value


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond any float: no vote count, and vote_probability could not use it
        return False


def import_hh(path: Path, *, skip_bad: bool = False) -> tuple[list[Preference], Counter[str]]:
    """Human-labelled pairs from an HH-RLHF JSONL file (``{"chosen": ..., "rejected": ...}`` per line).

    Both dialogues must share every turn but the last Assistant reply: the shared turns are
    the prompt, the two replies the pair. Returns the records and what was left out, by reason.
    """
    expected = 'an object with string keys "chosen" and "rejected"'

    def parse(obj: Any, source: str) -> list[Preference]:
        dialogues = []
        for key in ("chosen", "rejected"):
            try:
                dialogues.append(parse_dialogue(_text(obj, key, expected)))
            except ValueError as e:
                raise _Bad("bad_dialogue", f"{key!r}: {e}") from None
        (*msgs, last_c), (*msgs_r, last_r) = dialogues
        if msgs != msgs_r:
            raise _Bad("prompts_differ", "'chosen' and 'rejected' differ before their last Assistant turn; "
                       "expected the same conversation with two different final replies")
        c, r = last_c["content"], last_r["content"]
        if not c or not r:
            raise _Bad("blank_response", f"the last Assistant turn of {'chosen' if not c else 'rejected'!r} is empty; "
                       "expected a reply")
        if c == r:
            raise _Bad("identical_responses", "'chosen' and 'rejected' end with the same reply; expected two different")
        key = work_key({"messages": msgs, "chosen": c, "rejected": r}, "human")
        return [Preference(key=key, prompt=prompt_text(msgs), messages=msgs, chosen=c, rejected=r, p_chosen=1.0,
                           margin=1.0, judge_model="human", source=source)]

    return _lines(path, skip_bad, parse)


def vote_probability(score_chosen: float, score_rejected: float) -> float:
    """P(chosen is better) from two community vote scores: ``sigmoid(f(a) - f(b))``,
    with ``f(s) = sign(s) * log2(1 + |s|)``.

    Votes measure attention as much as quality: a popular thread's answers collect
    hundreds of votes whatever their merit, so a 1000-vs-900 gap says less about which
    answer is better than 10-vs-0 does. Taking log2 of the score compresses popularity
    so that what counts is the ratio of scores, not their difference; the sign keeps
    downvoted answers below unvoted ones. The idea follows Askell et al. (2021), "A
    General Language Assistant as a Laboratory for Alignment", whose preference-model
    pre-training scored Stack Exchange answers by log2(1 + upvotes). Examples: (10, 0)
    gives sigmoid(log2 11) = 0.97; (1000, 900) gives sigmoid(0.15) = 0.54.
    """
    def f(s: float) -> float:
        return math.copysign(math.log2(1 + abs(s)), s)

    x = f(score_chosen) - f(score_rejected)
    # the two branches are the same function, written so that exp never overflows
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def import_votes(path: Path, *, min_gap: float = 1.0, skip_bad: bool = False) -> tuple[list[Preference], Counter[str]]:
    """Pairs from scored answers: ``{"prompt": str, "answers": [{"text": str, "score": number}, ...]}`` per line.

    Every ordered pair of answers whose scores differ by at least ``min_gap`` becomes a
    record with the soft label ``vote_probability``; answers that are blank or repeat
    another's text make no pair. A line that makes no pair is counted as ``no_pairs``.
    Outer whitespace of the prompt and answers is dropped, as ``parse_dialogue`` does.
    """
    if not min_gap > 0:  # at a gap of 0, a tie would make a pair in both directions
        raise ValueError(f"min_gap must be > 0, got {min_gap}")
    expected = 'an object with a string "prompt" and a list "answers" of {"text": string, "score": number}'

    def parse(obj: Any, source: str) -> list[Preference]:
        prompt = _text(obj, "prompt", expected).strip()
        if not prompt:
            raise _Bad("blank_prompt", "'prompt' is blank; expected the question the answers reply to")
        if "answers" not in obj:
            raise _Bad("missing_key", f"'answers' is missing; expected {expected}")
        answers = obj["answers"]
        if not isinstance(answers, list):
            raise _Bad("not_a_list", f"'answers' is {kind(answers, _KINDS)}; expected {expected}")
        if len(answers) < 2:
            raise _Bad("too_few_answers", f"'answers' has {len(answers)}; expected at least two answers")
        scored = []
        for i, answer in enumerate(answers):
            text = _text(answer, "text", f"answers[{i}] to be an object with \"text\" and \"score\"")
            score = answer.get("score")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not _finite(score):
                raise _Bad("bad_score", f"answers[{i}].score is {score!r}; expected a finite number")
            scored.append((text.strip(), score))
        msgs = [{"role": "user", "content": prompt}]
        pairs = []
        for c, sc in scored:
            for r, sr in scored:
                if sc - sr >= min_gap and c and r and c != r:
                    p = vote_probability(sc, sr)
                    key = work_key({"prompt": prompt, "chosen": c, "rejected": r}, "votes")
                    pairs.append(Preference(key=key, prompt=prompt, messages=msgs, chosen=c, rejected=r, p_chosen=p,
                                            margin=2 * p - 1, judge_model="votes", source=source))
        return pairs

    return _lines(path, skip_bad, parse)


def export_standard(records: Iterable[Preference]) -> list[dict]:
    """TRL's standard preference format: ``{"prompt": str, "chosen": str, "rejected": str}``.

    For trainers that take text; a multi-turn prompt is the Human/Assistant transcript.
    """
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in records]


def export_conversational(records: Iterable[Preference]) -> list[dict]:
    """TRL's conversational preference format: the prompt as chat messages, each response
    as a one-message assistant turn, so the trainer applies the model's own chat template."""
    return [{"prompt": r.messages, "chosen": [{"role": "assistant", "content": r.chosen}],
             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in records]


FORMATS: dict[str, Callable[[Iterable[Preference]], list[dict]]] = {
    "standard": export_standard, "conversational": export_conversational}


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` as UTF-8 JSONL, all at once: readers see the old file or the new, never half.

    Export files are derived, so they are rewritten whole (temp file in the same folder,
    fsync, rename) rather than appended like a stage's store.
    """
    with atomic_file(Path(path)) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
