"""Items a stage gave up on, because the backend failed for good on one of their requests.

An HTTP server can fail one request and answer the rest (its retries spent on a 503, a
reply too long for the model). The stage then drops that item from the rest of its work,
writes the others, and records the failure in ``failures.jsonl`` with the reason. The item
is not in the stage's output, so the next run of the same command does it again, and only
it: everything written is skipped as usual. The log keeps every failure, also of items
done since.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from factory.llm.base import BatchIncomplete
from factory.records import Failure, work_key
from factory.store import Store

R = TypeVar("R")
T = TypeVar("T")


class Failures:
    """One stage's failures in one run: ``call`` the backend through it, ``flush`` after each batch."""

    def __init__(self, path: Path, stage: str):
        """``path``: the run's failures file (``RunLayout.failures``)."""
        self.path, self.stage = Path(path), stage
        self.reasons: dict[str, str] = {}
        """item key -> why it failed, in this run"""
        self._flushed: set[str] = set()

    def call(self, fn: Callable[..., list[R]], requests: Sequence, items: Sequence[str], *args) -> list[R | None]:
        """``fn(requests, *args)``, one result per request; where a request failed for good the
        result is None and its item (``items[i]``) is marked failed. Other errors pass through."""
        try:
            return fn(requests, *args)
        except BatchIncomplete as e:
            for i, reason in e.reasons.items():
                self.fail(items[i], reason)
            return e.results

    def kept(self, fn: Callable[..., list[R]], items: Sequence[T], keys: Sequence[str], requests: Sequence,
             *args) -> list[tuple[T, R]]:
        """(item, result) of each item whose request got through, in order: ``call`` with the failed
        ones dropped, so the stage goes on with the rest. No items, no call."""
        if not items:
            return []
        return [(it, res) for it, res in zip(items, self.call(fn, requests, keys, *args)) if res is not None]

    def fail(self, item: str, reason: str) -> None:
        self.reasons.setdefault(item, reason)  # the first failure is the cause; later steps never ran

    def __contains__(self, item: object) -> bool:
        return item in self.reasons

    def flush(self) -> None:
        """Append the failures not yet on disk (after the batch's records: those are what matter)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        new = [i for i in self.reasons if i not in self._flushed]
        if new:
            Store(self.path, Failure).append([
                Failure(key=work_key({"stage": self.stage, "item": i}, time.time_ns()), stage=self.stage, item=i,
                        reason=self.reasons[i], time=now)
                for i in new
            ])
            self._flushed.update(new)

    def counts(self) -> Counter[str]:
        """Failures by reason, shortened to what tells them apart, for the stage summary."""
        return Counter(short_reason(r) for r in self.reasons.values())


def short_reason(reason: str) -> str:
    """The gist of a backend error, without the URL and the reply body: what the summary counts by."""
    status = re.search(r"HTTP \d+", reason)
    if "refused the request" in reason and status:
        return f"refused ({status.group(0)})"
    tail = reason.split("last failure: ", 1)[-1]
    http = re.match(r"HTTP \d+( with [^(:]*)?", tail)
    return (http.group(0) if http else tail.split(":", 1)[0]).strip()[:80]
