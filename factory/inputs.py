"""Users' files, read once and hardened once: prompt files, seed files, preference files and
principle files. Every reader here names the file and line of the first thing wrong and what was
expected there; stages and trainers call these readers and never parse a user's file themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from factory.records import Task
from factory.store import Store, StoreError


def task_prompt_text(task: Task) -> str:
    """The prompt the factory's stages make of a task: its instruction, then its first input."""
    first = task.instances[0].input if task.instances else ""
    return f"{task.instruction}\n\n{first}" if first else task.instruction


def load_prompts(path: Path | None, limit: int | None, tasks: Path) -> list[tuple[str, str]]:
    """(id, prompt) pairs: from a JSONL file of {"prompt": ...} (``path``), else from the run's
    tasks file (``tasks``, the layout's ``tasks.jsonl``)."""
    out: list[tuple[str, str]] = []
    if path is not None:
        expected = "an object with a non-empty string 'prompt'"
        for number, obj in input_objects(path, expected):
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise StoreError(f"{path}:{number}: expected {expected}")
            out.append((str(obj.get("id", f"line-{number}")), obj["prompt"]))
    else:
        if not tasks.is_file():
            raise FileNotFoundError(f"{tasks}: no prompts; run bootstrap and instances first, or name a prompts file")
        for t in Store(tasks, Task).records():
            out.append((t.key, task_prompt_text(t)))
    return out[:limit] if limit else out


def input_objects(path: Path, expected: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, JSON value) of every non-blank line of a user's JSONL input file.

    A line that is not JSON is an error naming the file and line. The value is whatever the
    line holds; the caller checks its shape (``expected`` says what it should be, for the message
    on a line that holds no object at all).
    """
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM, as some Windows editors write
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise StoreError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # no record could hold a lone surrogate
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}:{number}: not a JSON object: {e.msg}") from None
        except UnicodeEncodeError:
            raise StoreError(f"{path}:{number}: a lone surrogate escape (such as \\ud800); expected valid Unicode "
                             "text") from None
        except ValueError:  # a number past Python's 4300-digit limit for reading integers
            raise StoreError(f"{path}:{number}: not a JSON object: a number with too many digits") from None
        except RecursionError:
            raise StoreError(f"{path}:{number}: not a JSON object: nested too deeply") from None
        if not isinstance(obj, dict):
            raise StoreError(f"{path}:{number}: expected {expected}")
        yield number, obj
