"""A finished run folder opened from disk, as the report and the export open one: its manifest, and
the layout that manifest implies.

A run (or round) folder holds no config of its own; its ``manifest.json`` records the resolved
config that made it. The trainers' folders are where that config's ``sft.output``, ``rm.output``
and ``ppo.output`` put them, and the layout's defaults where the manifest is missing, unreadable or
silent about them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.layout import RunLayout

TRAINER_SECTIONS = {"sft": "sft_output", "rm": "rm_output", "ppo": "ppo_output", "dpo": "dpo_output"}
"""the config section of each trainer -> the RunLayout field that names its folder"""


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a run or round folder; None when it is missing or is not a JSON object."""
    path = RunLayout(Path(root)).manifest
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # torn or not UTF-8: the folder's data can still be read
        return None
    return manifest if isinstance(manifest, dict) else None


def recorded_layout(root: Path, manifest: dict[str, Any] | None) -> RunLayout:
    """The layout of a run or round folder, its trainer folders named as ``manifest`` records them."""
    config = (manifest or {}).get("config")
    config = config if isinstance(config, dict) else {}
    default = RunLayout(Path(root))
    outputs = {}
    for section, field in TRAINER_SECTIONS.items():
        recorded = config.get(section)
        name = recorded.get("output") if isinstance(recorded, dict) else None
        outputs[field] = name if isinstance(name, str) and name else getattr(default, field)
    return RunLayout(Path(root), **outputs)
