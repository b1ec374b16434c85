"""Whole-or-nothing writes: a reader (or the next run after a kill) sees the old file or folder or
the new one, never half of one.

Every file or folder that is replaced rather than appended to (the manifest, exports, trainer
summaries, checkpoints, final models, copied tasks) is written here: into a temporary sibling with
a fixed name (one writer per run folder, so a kill's leftover is simply overwritten by the next
run), flushed and fsynced, then renamed over the target: ``.<name>.tmp`` for a file, ``<name>.tmp``
for a folder (``atomic_folder``, which also parks the folder it replaces at ``<name>.old`` between
its two renames). Appended JSONL files are the store's. This module imports nothing of the package.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temporary(path: Path) -> Path:
    """The fixed temporary sibling ``path`` is written to first."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_file(path: Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = "\n") -> Iterator[IO]:
    """Open ``path``'s temporary sibling for writing; on leaving without an error, fsync it and
    rename it over ``path``. On an error (a full disk, a kill's KeyboardInterrupt) the temporary
    file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    binary = "b" in mode
    try:
        with open(tmp, mode, **({} if binary else {"encoding": encoding, "newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` whole (text is written as UTF-8 with ``\\n`` newlines)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` whole: a copy interrupted half-way is never seen."""
    with atomic_file(target, "wb") as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def folder_temporary(path: Path) -> Path:
    """The fixed sibling a folder is written into before ``atomic_folder`` swaps it in: ``<name>.tmp``."""
    return path.with_name(f"{path.name}.tmp")


def folder_replaced(path: Path) -> Path:
    """Where ``atomic_folder`` moves the folder it replaces, until the new one is in place:
    ``<name>.old``. A kill between its two renames leaves the old folder whole there (and no
    ``<name>``): a reader that finds no ``<name>`` may read it (a trainer's checkpoint does)."""
    return path.with_name(f"{path.name}.old")


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Fill a folder whole, then put it in ``path``'s place: yields an empty temporary sibling
    (``folder_temporary``); on leaving without an error, every file in it is fsynced and it is
    renamed to ``path``. An existing ``path`` is first moved aside to ``folder_replaced(path)`` and
    removed once the new folder is in place. On an error the temporary folder is removed and
    ``path`` is left as it was. (Checkpoints and trainers' final models are written here.)"""
    path = Path(path)
    tmp, old = folder_temporary(path), folder_replaced(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a kill's leftover
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
