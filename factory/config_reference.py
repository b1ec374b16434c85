"""Every config key with its default and description, as a commented TOML file.

``configs/reference.toml`` is this text (a test keeps the two equal), so the documentation of a
key is its ``Field(description=...)`` and cannot drift from the code.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from factory.config import RunConfig

HEADER = """\
# Every key of a run config, with its default. Copy the tables you need into your own config:
# every key is optional, and unknown keys are refused. Generated from factory/config.py by
# `factory config --reference`; keys with no default are shown commented out.
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Path, Enum)):
        return json.dumps(str(value.value if isinstance(value, Enum) else value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # str, int, float: TOML writes them as JSON does


def _table(model: BaseModel, name: str, lines: list[str]) -> None:
    nested: list[tuple[str, BaseModel]] = []
    cls = type(model)
    for key, field in cls.model_fields.items():
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            nested.append((key, value))
            continue
        about = f"   # {field.description}" if field.description else ""
        if value is None:  # TOML has no null: the key is left out, which means None
            lines.append(f"# {key} = ...{about} (default: none)")
        else:
            lines.append(f"{key} = {toml_value(value)}{about}")
    for key, child in nested:
        title = f"{name}.{key}" if name else key
        doc = (type(child).__doc__ or "").strip().splitlines()
        lines += ["", f"[{title}]" + (f"   # {doc[0]}" if doc else "")]
        _table(child, title, lines)


def reference_toml() -> str:
    lines = [HEADER.rstrip("\n"), ""]
    _table(RunConfig(), "", lines)
    return "\n".join(lines) + "\n"
