"""Users' files, read once and hardened once: prompt files, seed files, preference files,
principle files and run configs. Every reader names the file and line of the first thing wrong
and what was expected there; stages and trainers call these readers and never parse a user's
file themselves.

The hardening lives here once: a UTF-8 BOM is dropped, bytes that are not UTF-8 name their
line, JSON and YAML errors (numbers past Python's digit limit and deep nesting included) become
a ``ParseError`` with its line, lone surrogates are refused before any record could hold one,
and ``kind`` names a value's type in a message. The caller puts its own file-type wording
around these (``SeedError``, ``ConstitutionError``, ``ConfigError``...).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from factory.records import Preference, Task, key_path
from factory.store import Store, StoreError

BOM = b"\xef\xbb\xbf"  # a BOM, as some Windows editors write: not part of the first line
LONE_SURROGATE = "a lone surrogate escape (such as \\ud800); expected valid Unicode text"
TOO_MANY_DIGITS = "a number with too many digits"  # past Python's 4300-digit limit for reading integers
TOO_DEEP = "nested too deeply"

JSON_KINDS: dict[type, str] = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
                               int: "a number", float: "a number", type(None): "null"}
YAML_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}


def kind(value: Any, names: dict[type, str] = JSON_KINDS) -> str:
    """What ``value`` is, for a message ("got an array"), in the words of a file type (``names``)."""
    return names.get(type(value), type(value).__name__)


class ParseError(ValueError):
    """A text that does not parse as JSON or YAML: ``detail`` says why; ``line`` and ``column``
    say where, when the parser knows. ``syntax`` is false for what the parser could not hold
    (a number with too many digits, nesting too deep), which is not a typo."""

    def __init__(self, detail: str, line: int | None = None, column: int | None = None, syntax: bool = True):
        super().__init__(detail)
        self.detail, self.line, self.column, self.syntax = detail, line, column, syntax

    def __str__(self) -> str:
        return f"{self.detail} (column {self.column})" if self.column else self.detail


class DuplicateKey(ParseError):
    """A JSON object names a key twice (``load_json(..., unique_keys=True)``)."""


def read_bytes(path: Path, error: type[Exception] | None = None, *, missing: str | None = "no such file",
               cannot: str = "cannot read") -> bytes:
    """The bytes of a user's file, without a UTF-8 BOM.

    A file that cannot be read is ``error("{path}: {missing}")`` when it does not exist (with
    ``missing`` None, like any other) and ``error("{path}: {cannot}: {why}")`` otherwise; with no
    ``error``, the ``OSError`` itself.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        if error is None:
            raise
        if missing is not None:
            raise error(f"{path}: {missing}") from None
        raise error(f"{path}: {cannot}: No such file or directory") from None
    except OSError as e:
        if error is None:
            raise
        raise error(f"{path}: {cannot}: {e.strerror or e}") from None
    return raw.removeprefix(BOM)


def decode(path: Path, raw: bytes, error: type[Exception], hint: str = "") -> str:
    """``raw`` (a user's file, BOM dropped) as text; bytes that are not UTF-8 are ``error`` naming their line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}){hint}") from None


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line of a JSONL text.

    Split on a newline only: str.splitlines() also breaks at U+2028 and friends, which JSON strings
    may hold unescaped, and would cut a line in two and shift every number after it.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, line


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def load_json(text: str, *, unique_keys: bool = False) -> Any:
    """The JSON value of ``text``; anything wrong is a ``ParseError`` (a ``DuplicateKey`` with ``unique_keys``)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except json.JSONDecodeError as e:
        raise ParseError(e.msg, e.lineno, e.colno) from None
    except DuplicateKey:
        raise
    except ValueError:  # a number past Python's 4300-digit limit for reading integers
        raise ParseError(TOO_MANY_DIGITS, syntax=False) from None
    except RecursionError:
        raise ParseError(TOO_DEEP, syntax=False) from None


def valid_unicode(value: Any) -> bool:
    """Whether ``value`` (JSON data) can be written as UTF-8: JSON's \\ud800-style escapes can
    smuggle in lone surrogates, which no record, prompt or file could then hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The data of a YAML text (data only: never constructs Python objects) and its node tree,
    for line numbers (``yaml_line``) and repeated keys (``duplicate_keys``); anything wrong is a
    ``ParseError`` with the line where the parser knows it."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ParseError(f"{e.problem or e.context}{context}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise ParseError(str(e)) from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ParseError(TOO_DEEP, syntax=False) from None
    except ValueError:  # an integer past Python's 4300-digit limit for reading integers
        raise ParseError(TOO_MANY_DIGITS, syntax=False) from None
    return data, root


def yaml_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of what ``loc`` points at (a key's own line), or of the deepest part of it that exists."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def duplicate_keys(node: yaml.Node, loc: tuple = (), seen: set | None = None):
    """(line, key path, first line) for every key repeated within one mapping: YAML would keep the last silently."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # aliases can make the tree a graph
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key is not None and key in first:
                yield k.start_mark.line + 1, loc + (key,), first[key]
            if key is not None:
                first.setdefault(key, k.start_mark.line + 1)
            yield from duplicate_keys(v, loc + (key,), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield from duplicate_keys(v, loc + (i,), seen)


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
    """(1-based line number, JSON object) of every non-blank line of a user's JSONL input file.

    A line that is not JSON, or holds no object (``expected`` says what it should hold), is a
    ``StoreError`` naming the file and line; the caller checks the object's shape. A file that
    cannot be read raises its ``OSError``.
    """
    text = decode(path, read_bytes(path), StoreError)
    for number, line in numbered_lines(text):
        try:
            obj = load_json(line)
        except ParseError as e:
            raise StoreError(f"{path}:{number}: not a JSON object: {e.detail}") from None
        if not valid_unicode(obj):
            raise StoreError(f"{path}:{number}: {LONE_SURROGATE}")
        if not isinstance(obj, dict):
            raise StoreError(f"{path}:{number}: expected {expected}")
        yield number, obj


def load_responses(path: Path) -> list[tuple[str, list[dict[str, str]], list[str]]]:
    """The judge's candidates from a user's file: (id, messages, responses) from a JSONL of {"prompt": text or messages, "responses": [...], "id"?}."""
    out = []
    for number, obj in input_objects(path, "an object with 'prompt' and 'responses'"):
        where = f"{path}:{number}"
        prompt, responses = obj.get("prompt"), obj.get("responses")
        if isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": prompt}]
        elif (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                and isinstance(m["content"], str) for m in prompt) and prompt[-1]["role"] == "user"):
            messages = prompt
        else:
            raise StoreError(f"{where}: 'prompt' must be a non-empty string or a list of role/content messages "
                             "ending with the user's")
        if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
            raise StoreError(f"{where}: 'responses' must be a list of at least two strings")
        out.append((str(obj.get("id", f"line-{number}")), messages, responses))
    return out


def load_preferences(path: Path, error: type[Exception] = StoreError) -> list[Preference]:
    """The ``Preference`` records of a JSONL file (the judge's, or ``pairs import``'s); a bad line is
    ``error`` (the reward trainer's TrainError) naming file:line.

    A last line without its newline that does not parse is what a killed judge leaves behind:
    it is dropped with a warning, as ``factory.store`` does. A repeated key keeps the first record.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    lines = data.split(b"\n")
    out: dict[str, Preference] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = Preference.model_validate_json(raw)
        except ValidationError as e:
            if number == len(lines):  # no newline after it: an interrupted write
                warnings.warn(f"{path}:{number}: dropped a torn last line ({len(raw)} bytes)", stacklevel=2)
                continue
            what = "; ".join(f"{key_path(err['loc']) or 'line'}: {err['msg']}" for err in e.errors(include_url=False))
            raise error(f"{path}:{number}: not a preference pair ({what}); expected a JSON object with "
                             "messages, chosen, rejected and p_chosen, as the judge writes") from None
        if not 0.0 <= rec.p_chosen <= 1.0:
            raise error(f"{path}:{number}: p_chosen is {rec.p_chosen}; expected a probability in [0, 1]")
        out.setdefault(rec.key, rec)
    return list(out.values())
