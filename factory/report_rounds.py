"""The report's view of a run: each round's folder, read once through its layout, and the few
statistics every part of the page takes from it.

A round folder (the run folder itself for a single-round run) is opened as the report finds it on
disk: its trainer folders are where its manifest's config put them (``factory.run_folder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.layout import TrainerFolder
from factory.records import Preference
from factory.run_folder import read_manifest, recorded_layout
from factory.store import read_jsonl

DATA_FILES: dict[str, tuple[str, ...]] = {
    "generate": ("generations",),
    "bootstrap": ("instructions", "bootstrap_requests"),
    "instances": ("tasks",),
    "critique": ("revisions",),
    "judge": ("judgments", "preferences"),
    "rerank": ("rerank",),
}
"""data stage -> the RunLayout files it writes (any of them there: the stage ran)"""
TRAINERS = {"sft": "sft", "rm": "rm", "ppo": "policy"}
"""trainer stage -> its RunLayout trainer folder (a metrics.jsonl there: the trainer ran)"""


class RoundData:
    """One round's folder (the run folder itself for a single-round run), its files read once."""

    def __init__(self, folder: Path, name: str, index: int):
        self.folder, self.name, self.index = folder, name, index  # name: "round-2", or "" for a single round
        self._records: dict[Path, list] = {}
        # None if missing or unreadable: the data can still be shown; the seed section says the manifest is unreadable
        self.manifest = read_manifest(folder)
        self.layout = recorded_layout(folder, self.manifest)

    @property
    def config(self) -> dict[str, Any]:
        return (self.manifest or {}).get("config", {})

    def trainer(self, stage: str) -> TrainerFolder:
        return getattr(self.layout, TRAINERS[stage])

    def ran(self, stage: str) -> bool:
        if stage in TRAINERS:
            return self.trainer(stage).metrics.is_file()
        return any(getattr(self.layout, f).is_file() for f in DATA_FILES[stage])

    def read(self, path: Path, model) -> list:
        """The records of one of the round's JSONL files (``self.layout``'s; none if it is missing)."""
        if path not in self._records:
            self._records[path] = read_jsonl(path, model)
        return self._records[path]

    @property
    def copied_tasks(self) -> bool:
        """Rounds after the first get round 1's tasks.jsonl as a copy; its rejections are round 1's."""
        return self.index > 1 and "instances" not in self.config.get("stages", ["instances"])

    def heldout(self) -> dict | None:
        """The heldout stage's summary.json (None when the stage has not run)."""
        path = self.layout.heldout / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def metrics(self, stage: str) -> list[dict]:
        return json_rows(self.trainer(stage).metrics)


def json_rows(path: Path) -> list[dict]:
    """A trainer's JSONL (metrics.jsonl, samples.jsonl); none if missing."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed trainer
    return rows


def last(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def first(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in rows if isinstance(r.get(key), (int, float))), None)


def flip_rate(prefs: list[Preference]) -> float | None:
    """Share of judged pairs whose presentation orders disagree (imported pairs have no orders)."""
    judged = [p for p in prefs if p.consistent is not None]
    return sum(not p.consistent for p in judged) / len(judged) if judged else None
