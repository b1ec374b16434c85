"""Where an export may write, and how it replaces what was there: whole or not at all.

An output must stay inside the output folder that holds the run, and must not be the run folder,
one of its rounds, or one of their own files (``protected``), even with --force. It is written
into a hidden temporary path next to it and swapped into place at the end (``replacing``).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from factory.export_records import ExportError, Run, run_rounds
from factory.layout import RunLayout
from factory.run_folder import read_manifest, recorded_layout


def protected(layout: RunLayout) -> set[str]:
    """Names in a run (or round) folder that an export must never replace, even with --force: the
    files an export reads, the stages' own records, the manifest, and the trainers' folders."""
    files = (layout.manifest, layout.generations, layout.bootstrap_requests, layout.instructions, layout.tasks,
             layout.revisions, layout.sft_data, layout.critique_pairs, layout.judge_samples, layout.judgments,
             layout.preferences, layout.rerank)
    return {p.name for p in files} | {t.root.name for t in (layout.sft, layout.rm, layout.policy)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def output_root(run_dir: Path) -> Path:
    """The folder that holds the run (its config's ``output_dir``), symlinks followed: exports stay in it."""
    return Path(os.path.abspath(run_dir)).parent.resolve()


def check_destination(output: Path, run_dir: Path) -> None:
    """Refuse an output path that leaves the output folder holding the run: ``..``, an absolute
    path elsewhere, or a symlink inside it that points outside (``resolve`` follows every link)."""
    if "\x00" in str(output):
        raise ExportError(f"{str(output)!r}: a path with a NUL byte; choose another output")
    root = output_root(run_dir)
    out = output.resolve()
    if not out.is_relative_to(root):
        raise ExportError(f"{output} resolves to {out}, outside the output folder {root} that holds the run; "
                          f"exports are written inside it (e.g. -o {root / 'exports' / output.name})")


def check_output(output: Path, run: Run, force: bool) -> None:
    """Refuse an output outside the output folder, one that exists (without --force), or one that
    would replace part of the run."""
    check_destination(output, run.path)
    out = output.resolve()
    for _, folder in run_rounds(run.path) + [(0, run.path)]:  # every round, not only those exported
        # its trainers' folders are named as its manifest records (the defaults without one)
        names = protected(recorded_layout(folder, read_manifest(folder)))
        folder = folder.resolve()
        if out == folder or out in folder.parents:
            raise ExportError(f"{output}: this would replace the run folder {folder}; choose another output")
        if out.parent == folder and out.name in names:
            raise ExportError(f"{output} is the run's own {out.name}; choose another output")
    if output.exists() and not force:
        raise ExportError(f"{output} exists; pass --force to overwrite it")


@contextmanager
def replacing(output: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``output``; once the block succeeds, it becomes ``output``.

    A failed export leaves ``output`` as it was (and no temporary behind). A folder cannot be
    renamed over another, so an existing output is moved aside first and removed last.
    (``factory.atomic`` writes one file or one folder at a fixed temporary name; an export's output
    may be either, and is named per process, so this swap stays here.)
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    old = output.with_name(f".{output.name}.{os.getpid()}.old")
    _remove(tmp)
    try:
        yield tmp
        if output.exists() or output.is_symlink():
            os.replace(output, old)
            try:
                os.replace(tmp, output)
            except OSError:
                os.replace(old, output)
                raise
            _remove(old)
        else:
            os.replace(tmp, output)
    finally:
        _remove(tmp)
