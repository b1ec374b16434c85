"""How every trainer ends: whether it has finished already, and its final save.

A trainer's folder (``factory.layout.TrainerFolder``) holds its final model and its summary once
training is done. The final save writes the summary (and any other report of the trainer's, such
as the reward model's eval.json), each file whole, and then the model folder, last and whole
(``factory.atomic.atomic_folder``): a model folder means the trainer finished, and a rerun of a
finished trainer returns its summary without loading a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from factory.atomic import atomic_folder, write_atomic
from factory.layout import TrainerFolder
from factory.train.distributed import SOLO, Dist
from factory.train.models import CONFIG_FILE


def write_json(path: Path, value: Any) -> None:
    """A report of a trainer's (summary.json, eval.json), written whole."""
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def finished(folder: TrainerFolder, marker: str = CONFIG_FILE,
             legacy: Callable[[], dict] | None = None) -> dict | None:
    """The summary of the trainer that finished in ``folder``; None while its model is not there
    (``marker``: the file a finished model folder holds). A run that finished before trainers
    wrote summary.json gives ``legacy()``, or just where its model is."""
    if not (folder.model / marker).is_file():
        return None
    if folder.summary.is_file():
        return json.loads(folder.summary.read_text(encoding="utf-8"))
    return legacy() if legacy is not None else {"model": str(folder.model)}


def save_final(folder: TrainerFolder, summary: dict, write_model: Callable[[Path], None], dist: Dist = SOLO,
               reports: dict[Path, Any] | None = None) -> None:
    """The trainer's last act: rank 0 writes ``reports`` (path: JSON value) and ``folder.summary``,
    then the model: ``write_model(tmp)`` fills a temporary folder that becomes ``folder.model``.
    Every process calls it; the others wait until the model is whole, so none returns before."""
    if dist.is_main:
        with atomic_folder(folder.model) as tmp:
            write_model(tmp)
            for path, value in (reports or {}).items():
                write_json(path, value)
            write_json(folder.summary, summary)
    dist.barrier()
