"""Seed task files in the Self-Instruct schema, one JSON object a line:
``{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from factory.records import SeedTask


class SeedError(ValueError):
    """A seed file is malformed; the message names the file, the line and the field."""


def load_seeds(path: Path) -> list[SeedTask]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SeedError(f"{path}: cannot read seed file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SeedError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    tasks = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedError(f"{path}:{number}: not a JSON object: {e.msg} (column {e.colno})") from None
        try:
            tasks.append(SeedTask.model_validate(obj))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(line)"
            raise SeedError(f"{path}:{number}: field {field!r}: {err['msg']}") from None
    if not tasks:
        raise SeedError(f"{path}: no seed tasks in the file")
    return tasks


def task_prompt(task: SeedTask) -> str:
    """The user turn for a task: its instruction, and its first instance's input if any."""
    first = task.instances[0].input.strip() if task.instances else ""
    return f"{task.instruction.strip()}\n\n{first}" if first else task.instruction.strip()
