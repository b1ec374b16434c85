"""Seed task files in the Self-Instruct schema, one JSON object a line:
``{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}``.

A malformed line stops loading with a ``SeedError`` naming the file, the line and the
field. What real seed files in the wild carry without being wrong (duplicate names,
instructions too short for the bootstrap filter, extra keys) loads with a ``SeedWarning``
naming the lines instead, so a user can use the file as it is and still hear about it.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from factory.inputs import LONE_SURROGATE, ParseError, decode, kind, load_json, numbered_lines, read_bytes, valid_unicode
from factory.records import Instance, SeedTask, key_path

LISTED = 10
"""How many names (and how many lines of one name) a warning lists before it says "and N more"."""

_TASK_KEYS = frozenset(SeedTask.model_fields)
_INSTANCE_KEYS = frozenset(Instance.model_fields)


class SeedError(ValueError):
    """A seed file is malformed; the message names the file, the line and the field."""


class SeedWarning(UserWarning):
    """A seed file loads, but something in it deserves a look; the message names the lines."""


def check_seeds(paths: Iterable[Path]) -> None:
    """Read every seed file once (a file named twice, once): a malformed one stops the run with file:line."""
    for path in dict.fromkeys(paths):
        load_seeds(path)


def load_seeds(path: Path, *, min_words: int = 4) -> list[SeedTask]:
    """Every task of a seed file, in file order; warns (never fails) on duplicate names or
    ids, on instructions of fewer than ``min_words`` words and on unknown keys, which are dropped."""
    path = Path(path)
    tasks: list[tuple[int, SeedTask]] = []
    extra_keys: dict[str, list[int]] = defaultdict(list)
    for number, line in _lines(path):
        obj = _parse(path, number, line)
        for key in _drop_unknown_keys(obj):
            extra_keys[key].append(number)
        try:
            tasks.append((number, SeedTask.model_validate(obj)))
        except ValidationError as e:
            raise SeedError(f"{path}:{number}: {_describe(e)}") from None
    if not tasks:
        raise SeedError(f"{path}: no seed tasks in the file")

    problems = []
    if extra_keys:
        problems.append(f"{path}: unknown keys ignored: {_listing(extra_keys)}")
    names, ids = defaultdict(list), defaultdict(list)
    for number, task in tasks:
        names[task.name].append(number)
        ids[task.id].append(number)
    problems += [_duplicates(path, "ids", ids), _duplicates(path, "names", names)]
    short = [number for number, task in tasks if len(task.instruction.split()) < min_words]
    if short:
        problems.append(
            f"{path}: {len(short)} instruction(s) shorter than {min_words} words "
            f"(the bootstrap filter drops them) on {_lines_text(short)}"
        )
    for message in filter(None, problems):
        warnings.warn(message, SeedWarning, stacklevel=2)  # point at the caller, who named the file
    return [task for _, task in tasks]


def _lines(path: Path) -> list[tuple[int, str]]:
    """The file's non-blank lines with their 1-based numbers."""
    raw = read_bytes(path, SeedError, missing=None, cannot="cannot read seed file")
    return list(numbered_lines(decode(path, raw, SeedError)))


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        obj = load_json(line)
    except ParseError as e:
        raise SeedError(f"{path}:{number}: invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SeedError(f"{path}:{number}: expected a JSON object (a seed task), got {kind(obj)}")
    if not valid_unicode(obj):  # no record holding it could be written
        raise SeedError(f"{path}:{number}: {LONE_SURROGATE}")
    return obj


def _drop_unknown_keys(obj: dict[str, Any]) -> list[str]:
    """Remove keys the schema does not know, in place (``SeedTask`` forbids them); return their names."""
    dropped = [key for key in obj if key not in _TASK_KEYS]
    for key in dropped:
        del obj[key]
    instances = obj.get("instances")
    if isinstance(instances, list):  # a wrong type is left for validation to name
        for item in instances:
            if isinstance(item, dict):
                for key in [k for k in item if k not in _INSTANCE_KEYS]:
                    del item[key]
                    dropped.append(f"instances[].{key}")
    return list(dict.fromkeys(dropped))


def _describe(e: ValidationError) -> str:
    """The first problem of a failed validation, as "field 'instances[0].output': Field required"."""
    errors = e.errors()
    err = errors[0]
    field = key_path(err["loc"])
    text = f"field {field!r}: {err['msg']}" if field else err["msg"]
    if err["type"] != "missing":
        text += f" (got {kind(err['input'])} {_short_repr(err['input'])})"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem(s) on this line)"
    return text


def _short_repr(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duplicates(path: Path, what: str, lines_of: dict[str, list[int]]) -> str | None:
    duplicated = {value: lines for value, lines in lines_of.items() if len(lines) > 1}
    return f"{path}: duplicate {what}: {_listing(duplicated)}" if duplicated else None


def _listing(lines_of: dict[str, list[int]]) -> str:
    """Values with their lines, as ``'a' on lines 3, 17; 'b' on line 5``, at most ``LISTED`` of them."""
    items = [f"{value!r} on {_lines_text(lines)}" for value, lines in list(lines_of.items())[:LISTED]]
    if len(lines_of) > LISTED:
        items.append(f"and {len(lines_of) - LISTED} more")
    return "; ".join(items)


def _lines_text(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:LISTED])
    more = f" and {len(numbers) - LISTED} more" if len(numbers) > LISTED else ""
    return f"{'line' if len(numbers) == 1 else 'lines'} {shown}{more}"


def task_prompt(task: SeedTask) -> str:
    """The user turn for a task: its instruction, and its first instance's input if any."""
    first = task.instances[0].input.strip() if task.instances else ""
    return f"{task.instruction.strip()}\n\n{first}" if first else task.instruction.strip()
