"""Imports only run downward (docs/architecture.md), read from the source, so that they stay so.

- ``records``, ``store``, ``layout``, ``atomic`` and every module of ``llm/`` never import the run
  config (``factory.config``), not even for type checking;
- ``layout`` and ``atomic`` import nothing of the package;
- no stage module (``pipeline.STAGES``) imports another stage module, anywhere in the file;
- trainers import the run config for type annotations only (``if TYPE_CHECKING:``): they are
  handed their own settings;
- the report and the export read a run folder through the layout, never through the pipeline or
  a stage module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from factory.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "factory"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(name: str, typing_too: bool = True) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file (function-level imports included);
    without ``typing_too``, those imported only for type checking are left out."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    skip = set() if typing_too else type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "factory")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "factory":
            found.add(node.module)
            # ``from factory.train import ppo`` imports the module factory.train.ppo
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name}


def test_the_import_reader_sees_what_a_module_imports():
    # pipeline imports the layout at the top and names every stage module only by string
    assert "factory.layout" in imports("factory.pipeline")
    assert "factory.config" in imports("factory.pipeline")
    assert "factory.stage" in imports("factory.judge")
    assert "factory.config" not in imports("factory.judge", typing_too=False)
    assert "factory.config" in imports("factory.judge")  # its annotations name the run config


LOW = ["factory.records", "factory.store", "factory.layout", "factory.atomic"] + sorted(
    m for m in MODULES if m.startswith("factory.llm"))


@pytest.mark.parametrize("name", LOW)
def test_low_layers_never_import_the_run_config(name):
    assert "factory.config" not in imports(name)


@pytest.mark.parametrize("name", ["factory.layout", "factory.atomic"])
def test_layout_and_atomic_import_nothing_of_the_package(name):
    assert imports(name) == set()


@pytest.mark.parametrize("name", sorted(STAGES.values()))
def test_no_stage_module_imports_another(name):
    others = set(STAGES.values()) - {name}
    assert imports(name) & others == set()


@pytest.mark.parametrize("name", ["factory.train.sft", "factory.train.reward", "factory.train.ppo"])
def test_trainers_take_their_own_settings(name):
    assert "factory.config" not in imports(name, typing_too=False)


READERS = sorted(m for m in MODULES if m.count(".") == 1 and m.split(".")[1].startswith(("report", "export")))


@pytest.mark.parametrize("name", READERS)
def test_report_and_export_read_the_run_folder_through_the_layout(name):
    assert imports(name) & ({"factory.pipeline"} | set(STAGES.values())) == set()
