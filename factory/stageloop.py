"""The steps every data stage shares, once: keys, done keys, fixed batches, failures, appends and
the progress bar. A stage builds its work items (each with its key), then

    loop = StageLoop("critique", layout, items, key=lambda it: it.key, store=store, batch_size=64)
    for start, batch in loop.batches():        # fixed batches of what is not done yet
        got = loop.ask(backend.generate, batch, requests, params.model_copy(update={"seed": seed + start}))
        loop.append([...records of the items that got through...])
    return loop.summary(note=...)

and reads as its own numbered steps in between.

- Batches are cut from the full item list at fixed offsets (``store.fixed_batches``) and a stage
  seeds each by its offset, so a resumed run writes the text an uninterrupted one would have.
- ``ask`` calls the backend through the stage's ``Failures``: an item whose request failed for
  good is dropped from the rest of the batch (and from what is written) and logged in
  ``failures.jsonl`` after the batch's records; the next run retries only those.
- After each batch (when the stage's body has appended its records) the failures are flushed and
  the progress bar moves on by the batch's size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from tqdm import tqdm

from factory.failures import Failures
from factory.layout import RunLayout
from factory.store import Store, fixed_batches
from factory.summary import StageSummary

T = TypeVar("T")
R = TypeVar("R")


class StageLoop(Generic[T]):
    def __init__(self, stage: str, layout: RunLayout, items: Sequence[T], key: Callable[[T], str], store: Store,
                 batch_size: int, unit: str = "item", desc: str | None = None,
                 done: Callable[[T], bool] | None = None, failures: Failures | None = None):
        """``done(item)``: whether an item needs no work (default: its key is in ``store``);
        ``failures``: the stage's, when it runs more than one loop (default: a new one)."""
        self.stage, self.items, self.key, self.store = stage, list(items), key, store
        self.batch_size, self.unit, self.desc = batch_size, unit, desc or stage
        self.done = done or (lambda it: key(it) in store)
        self.failures = failures or Failures(layout.failures, stage)
        self.skipped = sum(1 for it in self.items if self.done(it))
        """items already done when the stage started (by an earlier run)"""
        self.written = 0

    def batches(self) -> Iterator[tuple[int, list[T]]]:
        """(offset, items not done) of each fixed batch; after each, failures are flushed and the bar moves."""
        with tqdm(total=len(self.items), initial=self.skipped, desc=self.desc, unit=self.unit) as bar:
            for start, batch in fixed_batches(self.items, self.batch_size, self.done):
                yield start, batch
                self.failures.flush()
                bar.update(len(batch))

    def ask(self, fn: Callable[..., list[R]], items: Sequence[Any], requests: Sequence, *args,
            keys: Sequence[str] | None = None) -> list[tuple[Any, R]]:
        """(item, result) of each item whose request got through, in order (``fn(requests, *args)``);
        items whose request failed for good are left out and logged. ``keys``: the items' keys,
        when the items are not of the loop's own kind."""
        keys = [self.key(it) for it in items] if keys is None else keys
        return self.failures.kept(fn, items, keys, requests, *args)

    def append(self, records: list) -> int:
        """Append ``records`` to the stage's store; returns how many were new."""
        n = self.store.append(records)
        self.written += n
        return n

    def summary(self, rejected: Counter[str] | None = None, note: str = "") -> StageSummary:
        return StageSummary(self.stage, len(self.items), self.skipped, self.written, self.store.path,
                            rejected if rejected is not None else Counter(), note, self.failures.counts())
