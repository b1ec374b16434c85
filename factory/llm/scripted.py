"""Replays queued replies, for prompt and parser unit tests only.

Integration tests run the real embedded model; this backend exists so a test can
assert the exact prompt a stage renders and the exact parse of a hand-written reply.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from factory.llm.base import BackendError, Completion, GenParams, Messages, check_options, normalise


class ScriptedBackend:
    model_id = "scripted"

    def __init__(self, replies: Sequence[str | Completion] = (), option_scores: Sequence[dict[str, float]] = ()):
        self.replies: deque[Completion] = deque(self._as_completion(r) for r in replies)
        self.option_scores: deque[dict[str, float]] = deque(option_scores)
        self.calls: list[tuple[str, list[Messages], object]] = []
        """every call made: (method, requests, params or options), for asserting prompts."""

    @staticmethod
    def _as_completion(r: str | Completion) -> Completion:
        return r if isinstance(r, Completion) else Completion(text=r, finish_reason="stop")

    def queue(self, *replies: str | Completion) -> None:
        self.replies.extend(self._as_completion(r) for r in replies)

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        self.calls.append(("generate", [list(r) for r in requests], params))
        needed = len(requests) * params.n
        if needed > len(self.replies):
            raise BackendError(f"scripted backend: {needed} replies needed, {len(self.replies)} queued")
        return [[self.replies.popleft() for _ in range(params.n)] for _ in requests]

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        opts = check_options(options)
        self.calls.append(("option_logprobs", [list(r) for r in requests], tuple(opts)))
        if len(requests) > len(self.option_scores):
            raise BackendError(f"scripted backend: {len(requests)} option scores needed, {len(self.option_scores)} queued")
        out = []
        for _ in requests:
            scores = self.option_scores.popleft()
            if set(scores) != set(opts):
                raise BackendError(f"scripted backend: queued scores for {sorted(scores)}, asked for {opts}")
            out.append(normalise(scores))
        return out

    def close(self) -> None:
        pass
