"""Append-only JSONL with resume: a stage's output file, and the keys already done.

Each ``append`` is one write of whole lines followed by ``fsync``, so a crash (a kill,
a power cut, a full disk) can at worst leave the last line without its newline. Such a
torn line is never parsed as data: it is reported and cut off before the next append,
and the work it held is simply done again. A *complete* line that does not parse is
not a crash artefact but corruption, and stops the run with the file and line number.

One writer per file: the store keeps the set of done keys in memory and does not see
lines another process appends behind its back.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from pydantic import ValidationError

from factory.records import Record, describe_errors

R = TypeVar("R", bound=Record)
T = TypeVar("T")


WRITE_HINTS = {  # what to do about a failed write, by errno
    errno.ENOSPC: " (the disk is full: free some space, then run the same command again to go on)",
    errno.EDQUOT: " (the disk quota is used up: free some space, then run the same command again to go on)",
    errno.EFBIG: " (the file is larger than this system allows)",
    errno.EROFS: " (the output folder is on a read-only file system: choose another output_dir)",
    errno.EACCES: " (no permission to write there: choose another output_dir, or fix the folder's permissions)",
}


class StoreError(RuntimeError):
    """A store file is corrupt, or could not be written; the message names the file."""


class StoreWarning(UserWarning):
    """Something was wrong with a store file but nothing was lost (a torn line, duplicate keys)."""


def read_jsonl(path: Path, model: type[R]) -> list[R]:
    """Every record of a file written by ``Store``, in file order, duplicates included.

    A missing file reads as empty; a torn last line is warned about and ignored.
    """
    records, end, size = _scan(Path(path), model)
    if size > end:
        _warn_torn(Path(path), size - end)
    return records


def fixed_batches(items: Sequence[T], size: int, done: Callable[[T], bool]) -> Iterator[tuple[int, list[T]]]:
    """(offset, the items not done) of each ``size``-slice of ``items``; slices done whole are skipped.

    Batches are cut from the full item list, not from what is left to do: a batch lost to a kill
    is asked again with the same items and, as the stages seed each batch by its offset, the same
    seed, so a resumed run writes the text an uninterrupted one would have.
    """
    for start in range(0, len(items), size):
        batch = [it for it in items[start : start + size] if not done(it)]
        if batch:
            yield start, batch


def _scan(path: Path, model: type[R]) -> tuple[list[R], int, int]:
    """The records of the complete lines, their byte length, and the file's byte length."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as e:
        raise StoreError(f"{path}: cannot read: {e}") from e
    end = data.rfind(b"\n") + 1  # everything after the last newline is an unfinished write
    records = []
    # split on b"\n" only: JSON escapes every newline inside strings, while str.splitlines
    # would also break on characters such as U+2028 that JSON leaves raw.
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as e:
            raise StoreError(f"{path}, line {lineno}: not a valid {model.__name__}: {describe_errors(e)}") from None
    return records, end, len(data)


def _warn_torn(path: Path, nbytes: int) -> None:
    warnings.warn(
        f"{path}: dropped a torn last line ({nbytes} bytes without a newline, left by an interrupted write)",
        StoreWarning,
        stacklevel=3,
    )


class Store(Generic[R]):
    """A stage's output file: read it, ask which keys are done, append what is new."""

    def __init__(self, path: Path, record_type: type[R]):
        self.path = Path(path)
        self.record_type = record_type
        records, self._end, size = _scan(self.path, record_type)
        # _end is where the complete lines stop and the next append must start; past it
        # lies at most a torn line, cut off by the first append (not here: reading a
        # store, e.g. for a report, leaves the file as it is).
        self._cut_needed = size > self._end
        if self._cut_needed:
            _warn_torn(self.path, size - self._end)
        self._keys = {r.key for r in records}
        if len(self._keys) < len(records):
            warnings.warn(
                f"{self.path}: {len(records) - len(self._keys)} records repeat an earlier key; the first is kept",
                StoreWarning,
                stacklevel=2,
            )

    def records(self) -> list[R]:
        """The records in file order; where a key repeats (it should not), the first one."""
        records, _, _ = _scan(self.path, self.record_type)  # a torn tail was reported at open
        first: dict[str, R] = {}
        for r in records:
            first.setdefault(r.key, r)
        return list(first.values())

    def done_keys(self) -> set[str]:
        """The keys already written (a copy: it does not change as the store grows)."""
        return set(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def append(self, batch: Sequence[R]) -> int:
        """Write the records whose key is new, durably; return how many were written.

        Keys already in the file, or repeated within the batch, are skipped, so a
        resumed stage cannot duplicate work even if it asks twice.
        """
        fresh: list[R] = []
        batch_keys: set[str] = set()
        for r in batch:
            if not isinstance(r, self.record_type):
                raise TypeError(f"{self.path} stores {self.record_type.__name__}, got {type(r).__name__}")
            if r.key not in self._keys and r.key not in batch_keys:
                batch_keys.add(r.key)
                fresh.append(r)
        if not fresh:
            return 0
        lines = [r.model_dump_json().encode("utf-8") + b"\n" for r in fresh]
        for r, line in zip(fresh, lines):
            # A line that would not read back (say a NaN float, dumped as null) would make
            # the file unreadable at the next resume; refuse it now, while the cause is known.
            try:
                self.record_type.model_validate_json(line)
            except ValidationError as e:
                raise StoreError(f"{self.path}: record {r.key} would not read back: {describe_errors(e)}") from None
        data = b"".join(lines)
        self._write(data)
        self._end += len(data)
        self._keys |= batch_keys
        return len(fresh)

    def _write(self, data: bytes) -> None:
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                if self._cut_needed:
                    # Cut the torn tail first, so new lines are never glued onto half a line.
                    f.truncate(self._end)
                    self._cut_needed = False
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_dir(self.path.parent)  # a new file's name is durable only once its folder is
        except OSError as e:
            # The write may have landed in part: cut it back to the last whole line now (a full
            # disk still allows that), or, if even that fails, before the next append.
            self._cut_needed = True
            try:
                if self.path.exists() and self.path.stat().st_size > self._end:
                    os.truncate(self.path, self._end)
                self._cut_needed = False
            except OSError:
                pass
            raise StoreError(f"{self.path}: write failed, the records before it are intact: {e.strerror or e}"
                             f"{WRITE_HINTS.get(e.errno, '')}") from e


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
