"""What a stage reports when it ends: counts, and rejections by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageSummary:
    stage: str
    total: int
    """work items the stage knows of"""
    skipped: int
    """already done by an earlier invocation"""
    written: int
    """records written by this invocation"""
    output: Path
    rejected: Counter[str] = field(default_factory=Counter)
    """items refused, by reason (whole run, earlier invocations included)"""
    note: str = ""
    failed: Counter[str] = field(default_factory=Counter)
    """items this invocation gave up on (the backend failed for good), by reason; the next run retries them"""

    def line(self) -> str:
        text = f"{self.stage}: {self.written} written, {self.skipped} already done, {self.total} in all -> {self.output}"
        if self.rejected:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.rejected.most_common())
            text += f"\n  rejected {sum(self.rejected.values())}: {reasons}"
        if self.failed:
            reasons = ", ".join(f"{reason} {n}" for reason, n in self.failed.most_common())
            text += (f"\n  FAILED {sum(self.failed.values())} (logged in failures.jsonl; run again to retry only them): "
                     f"{reasons}")
        if self.note:
            text += f"\n  {self.note}"
        return text
