"""A trainer's JSONL logs (metrics.jsonl, PPO's samples.jsonl): one row per logged step, each
step once, even across a kill and a resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from factory.atomic import write_atomic


class Metrics:
    """metrics.jsonl: one line per logged step. On resume, lines past the checkpoint's step
    are dropped (they will be logged again), so the file never holds a step twice. With
    ``write=False`` (every process but rank 0) the file is left alone."""

    def __init__(self, path: Path, resume_step: int | None, write: bool = True):
        self.path, self.write = path, write
        self.start = time.time()
        if not write:  # not rank 0: the row is computed, rank 0 writes it
            return
        keep_steps(path, resume_step)

    def log(self, step: int, **values: Any) -> dict:
        row = {"step": step, "elapsed_s": round(time.time() - self.start, 3), **values}
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row


def keep_steps(path: Path, upto: int | None) -> None:
    """Rewrite the step log ``path`` (whole: ``write_atomic``) with the rows of steps up to ``upto``
    alone: a run resumed from the checkpoint of step ``upto`` logs the later ones again. ``upto``
    None (a fresh start) keeps none. A line that does not parse (a kill's torn last line) goes."""
    kept = []
    if upto is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= upto:
                kept.append(line + "\n")
    write_atomic(path, "".join(kept))
