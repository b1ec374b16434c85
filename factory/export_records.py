"""What an export reads: a run's usable records, over all its rounds or one, each with its round.

Every format is built from these records (``read_run``), never from another export. Records with
``parse_error`` or ``dropped`` set are left out and counted by file and reason. Files are found
through the run folder's layout (``factory.layout``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from factory.layout import RunLayout
from factory.records import ChatExample, Instruction, Preference, PreferencePair, Record, Reranked, Task
from factory.store import read_jsonl


class ExportError(ValueError):
    """An export that cannot be made as asked: the message names the run, file or option."""


SOURCES: dict[str, tuple[str, type[Record]]] = {
    "instructions": ("instructions", Instruction),
    "tasks": ("tasks", Task),
    "sft": ("sft_data", ChatExample),
    "critique_pairs": ("critique_pairs", PreferencePair),
    "preferences": ("preferences", Preference),
    "rerank": ("rerank", Reranked),
}
"""what an export reads, by the name of its split: (the RunLayout file, its record type)"""


def source_path(layout: RunLayout, split: str) -> Path:
    """The file of ``layout``'s folder that ``split`` is read from."""
    return getattr(layout, SOURCES[split][0])


@dataclass
class Records:
    """The usable records of one file over the chosen rounds, each with its round number."""

    file: str
    records: list[tuple[int, Record]] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    """(file, reason) -> count"""


@dataclass
class Run:
    path: Path
    rounds: list[tuple[int, Path]]
    """(round number, folder) of the rounds read"""
    multi_round: bool
    data: dict[str, Records]


def run_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(number, folder) of a run's rounds: round-1, round-2, ... or the run folder itself as round 1."""
    return RunLayout(Path(run_dir)).numbered_rounds()


def read_run(run_dir: Path, round_number: int | None = None) -> Run:
    """Every exportable record of the run (or of one round), left-out records counted by reason."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (expected e.g. outputs/<name>)")
    rounds = run_rounds(run_dir)
    multi = len(rounds) > 1 or rounds[0][1] != run_dir
    if round_number is not None:
        picked = [(n, d) for n, d in rounds if n == round_number]
        if not picked:
            have = ", ".join(str(n) for n, _ in rounds)
            raise ExportError(f"{run_dir}: no round {round_number}; its rounds are {have}")
        rounds = picked
    data = {}
    for name, (_, model) in SOURCES.items():
        got = Records(source_path(RunLayout(run_dir), name).name)
        file = got.file
        seen: set[str] = set()
        for n, folder in rounds:
            for rec in read_jsonl(source_path(RunLayout(folder), name), model):
                # Rounds >= 2 hold a copy of round 1's tasks: the same records, kept once (with round 1).
                if rec.key in seen:
                    continue
                seen.add(rec.key)
                if rec.parse_error is not None:
                    got.left_out[file, "parse_error"] += 1
                elif getattr(rec, "dropped", None):
                    got.left_out[file, f"dropped ({rec.dropped})"] += 1
                else:
                    got.records.append((n, rec))
        data[name] = got
    return Run(run_dir, rounds, multi, data)
