"""Principle files: the constitution schema, its validation and template rendering.
(Importers of the public formats live in ``constitution_import.py``.)

A constitution is plain data that users edit: a name, a description, principles (each a
critique request, a revision request and a judge question) and optional few-shot examples.
``load_constitution`` validates the whole file before anything runs and turns every problem
into a ``ConstitutionError`` naming the file, the line (YAML) and the key path.

Templates use ``{prompt}``-style placeholders, but only ``{identifier}`` is one: any other
brace is plain text, so JSON or code in a principle stays literal, and ``{{``/``}}`` write a
literal brace on purpose. Rendering is one regex pass; nothing is ever formatted or evaluated.
"""

from __future__ import annotations

import difflib
import random
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.inputs import (LONE_SURROGATE, YAML_KINDS, DuplicateKey, ParseError, decode, duplicate_keys, kind,
                            load_json, load_yaml, read_bytes, valid_unicode, yaml_line)
from factory.records import Strict, error_text, got, key_path

ID = re.compile(r"[a-z0-9][a-z0-9_-]*")
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "critique": frozenset({"prompt", "response"}),
    "revision": frozenset({"prompt", "response", "critique"}),
    "judge": frozenset({"prompt"}),
}
DECLARED = frozenset().union(*PLACEHOLDERS.values())
# One match per token: an escaped brace, or a placeholder. A brace in any other position is text.
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConstitutionError(ValueError):
    """A principle file is malformed, or a template cannot be rendered; the message says where and what was expected."""


def _braced(names) -> str:
    return ", ".join("{" + n + "}" for n in sorted(names))


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses (escaped braces and other brace text excluded)."""
    return {m.group(1) for m in _TOKEN.finditer(template) if m.group(1)}


def render(template: str, **values: str) -> str:
    """Fill ``{name}`` placeholders in one pass: inserted values are never scanned again.

    Only the declared names (``PLACEHOLDERS``) can be filled: a principle's other ``{name}``
    is never looked up anywhere (environment, attributes, format specs)."""
    undeclared = values.keys() - DECLARED
    if undeclared:
        raise ConstitutionError(f"cannot fill {_braced(undeclared)}: templates may only use {_braced(DECLARED)}")
    missing = placeholders(template) - values.keys()
    if missing:
        raise ConstitutionError(f"template uses {_braced(missing)} but no value was given (given: {_braced(values) or 'none'})")

    def token(m: re.Match) -> str:
        return {"{{": "{", "}}": "}"}.get(m.group(0)) or values[m.group(1)]

    return _TOKEN.sub(token, template)


# -- schema -------------------------------------------------------------------------------------


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    if not valid_unicode(v):  # a "\ud800"-style escape: no prompt or record could hold it
        raise ValueError(f"holds {LONE_SURROGATE}")
    return v


Text = Annotated[str, AfterValidator(_not_blank)]


class Exact(Strict):
    # strict types: a file that says `weight: true` or `critique: 3` is wrong, not converted
    model_config = ConfigDict(strict=True)


class Example(Exact):
    """A worked critique -> revision round, shown to the model as earlier chat turns. Literal text, not templates."""

    prompt: Text
    response: Text = Field(description="a first answer that falls short of the principle")
    critique: Text = Field(description="the critique the model should have written of it")
    revision: Text = Field(description="the rewritten answer")
    principle: str | None = Field(None, description="id of the principle whose requests frame this example")


class Principle(Exact):
    """One rule, in the three forms the pipeline asks for it."""

    id: str = Field(description="unique; lowercase letters, digits, '-' and '_'")
    critique: Text = Field(description="user turn asking the assistant to critique its previous response")
    revision: Text = Field(description="user turn asking the assistant to rewrite its response given the critique")
    judge: Text = Field(description="question for an AI judge choosing between responses (A) and (B)")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="relative chance of being drawn")
    tags: list[Text] = Field(default_factory=list, description="free labels, for reading and filtering")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID.fullmatch(v):
            raise ValueError(f"must be lowercase letters, digits, '-' or '_', starting with a letter or digit, got {v!r}")
        return v

    @field_validator("critique", "revision", "judge")
    @classmethod
    def _declared(cls, v: str, info) -> str:
        allowed = PLACEHOLDERS[info.field_name]
        unknown = placeholders(v) - allowed
        if unknown:
            raise ValueError(f"unknown placeholder {_braced(unknown)}; {info.field_name} may use {_braced(allowed)} "
                             "(write {{ and }} for literal braces)")
        return v


class _Problems(ValueError):
    """Errors that span fields, each with its own location, so a loader can point at the right line."""

    def __init__(self, problems: list[tuple[tuple, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{_where(loc, None)}: {msg}" for loc, msg in problems))


class Constitution(Exact):
    """A named set of principles, with optional few-shot examples."""

    name: Text
    description: Text
    principles: list[Principle]
    examples: list[Example] = Field(default_factory=list)

    @field_validator("principles")
    @classmethod
    def _some(cls, v: list[Principle]) -> list[Principle]:
        if not v:
            raise ValueError("a constitution needs at least one principle")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Constitution":
        problems, first = [], {}
        for i, p in enumerate(self.principles):
            if p.id in first:
                problems.append((("principles", i, "id"), f"duplicate id {p.id!r} (already used by principles[{first[p.id]}])"))
            first.setdefault(p.id, i)
        for i, ex in enumerate(self.examples):
            if ex.principle is not None and ex.principle not in first:
                problems.append((("examples", i, "principle"), f"unknown principle {ex.principle!r}; ids are {', '.join(first)}"))
        if problems:
            raise _Problems(problems)
        return self

    def get(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"no principle {principle_id!r} in {self.name!r}; ids are {', '.join(p.id for p in self.principles)}")

    def sample(self, rng: random.Random, k: int = 1) -> list[Principle]:
        """``k`` independent draws, each principle with probability weight / total weight."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return rng.choices(self.principles, weights=[p.weight for p in self.principles], k=k)


# -- reading files and reporting where they are wrong -------------------------------------------


def _where(loc: tuple, data: Any) -> str:
    """``principles[3] (id 'no-slurs').weight`` for the pydantic location ``("principles", 3, "weight")``."""
    out = key_path(loc)
    if len(loc) > 1 and loc[0] == "principles" and isinstance(loc[1], int) and isinstance(data, dict):
        items, head = data.get("principles"), f"principles[{loc[1]}]"
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            out = f"{head} (id {item['id']!r})" + out[len(head):]
    return out or "(top level)"


def _read(path: Path) -> tuple[Any, yaml.Node | None]:
    """The file's data and, for YAML, its node tree (for line numbers). JSON if ``.json``, else YAML."""
    text = decode(path, read_bytes(path, ConstitutionError), ConstitutionError)
    if path.suffix.lower() == ".json":
        try:
            return load_json(text, unique_keys=True), None
        except DuplicateKey as e:
            raise ConstitutionError(f"{path}: {e}") from None
        except ParseError as e:
            raise ConstitutionError(f"{path}{f':{e.line}' if e.line else ''}: invalid JSON: {e}") from None
    try:
        data, root = load_yaml(text)
    except ParseError as e:
        raise ConstitutionError(f"{path}{f':{e.line}' if e.line else ''}: invalid YAML: {e}") from None
    if root is not None:
        for line, loc, first in duplicate_keys(root):
            raise ConstitutionError(f"{path}:{line}: {_where(loc, data)}: duplicate key (first at line {first})")
    return data, root


def _message(err: dict) -> str:
    loc, typ = err["loc"], err["type"]
    if typ == "extra_forbidden":
        model = {"principles": Principle, "examples": Example}.get(loc[0]) if len(loc) == 3 else Constitution
        keys = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key; expected one of {', '.join(keys)}"
    if typ == "missing":
        return "missing required key"
    return error_text(err) if typ == "value_error" else error_text(err) + got(err.get("input"))


def _validate(data: dict, source: Path, root: yaml.Node | None = None) -> Constitution:
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        found = []
        for err in e.errors():
            problems = getattr(err.get("ctx", {}).get("error"), "problems", None)
            for loc, msg in problems or [(err["loc"], _message(err))]:
                found.append((yaml_line(root, loc) or 0, f"{_where(loc, data)}: {msg}"))
        found.sort(key=lambda f: f[0])  # stable: file order where lines are known, pydantic's order otherwise
        raise ConstitutionError("\n".join(f"{source}{f':{n}' if n else ''}: {m}" for n, m in found)) from None


def load_constitution(path: Path) -> Constitution:
    """Read and validate a principle file; every problem is a ``ConstitutionError`` naming the file and line or key."""
    path = Path(path)
    data, root = _read(path)
    if not isinstance(data, dict):
        where = f"{path}:1" if root is not None or data is None else str(path)
        raise ConstitutionError(f"{where}: expected a mapping with keys name, description, principles, got {kind(data, YAML_KINDS)}")
    return _validate(data, path, root)


# -- writing and summarising --------------------------------------------------------------------

_ODD_BREAKS = frozenset("\r\x85\u2028\u2029")  # YAML would read these back as plain newlines


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key, as people write them


def _represent_str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    style = '"' if _ODD_BREAKS & set(s) else "|" if "\n" in s else ">" if len(s) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.SequenceNode:
    short = all(isinstance(t, str) and len(t) <= 30 for t in items)  # tags: [safety, care]
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=short)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)
_PRINCIPLE_ORDER = ("id", "weight", "tags", "critique", "revision", "judge")


def to_yaml(c: Constitution) -> str:
    """A principle file for ``c``: defaults left out, long text in block scalars. Loads back equal to ``c``."""
    principles = []
    for p in c.principles:
        d = p.model_dump(exclude_defaults=True)
        if "weight" in d and d["weight"].is_integer():
            d["weight"] = int(d["weight"])  # `weight: 2`, as people write it; loads back as 2.0
        principles.append({k: d[k] for k in _PRINCIPLE_ORDER if k in d})
    data: dict[str, Any] = {"name": c.name, "description": c.description, "principles": principles}
    if c.examples:
        data["examples"] = [ex.model_dump(exclude_defaults=True) for ex in c.examples]
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_summary(c: Constitution, path: Path) -> str:
    """What ``factory principles check`` prints for a valid file."""
    total = sum(p.weight for p in c.principles)
    width = max(len(p.id) for p in c.principles)
    lines = [f"{path}: ok: '{c.name}', {_count(len(c.principles), 'principle')}, {_count(len(c.examples), 'example')}",
             "  principles (weight, chance per draw):"]
    lines += [f"    {p.id:<{width}}  {p.weight:>4g}  {p.weight / total:6.1%}" for p in c.principles]
    shown = Counter(ex.principle or "(none)" for ex in c.examples)
    if shown:
        lines.append("  examples: " + ", ".join(f"{pid} {n}" for pid, n in shown.items()))
    tags = Counter(t for p in c.principles for t in p.tags)
    lines.append("  tags: " + (", ".join(f"{t} {n}" for t, n in sorted(tags.items())) or "none"))
    return "\n".join(lines)
