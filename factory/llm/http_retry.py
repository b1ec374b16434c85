"""What an HTTP outcome means for a retry, for the OpenAI-compatible backend: which refusals are
final (for one request, or for the whole batch), which statuses are worth another attempt and how
long to wait before it, and whether a 2xx reply is usable; with the short descriptions of a failure
that its messages quote.
"""

from __future__ import annotations

import math
import random
from typing import Any

import httpx

MAX_RETRY_AFTER_S = 120.0
"""a server's Retry-After is obeyed up to this; a bogus huge value must not stall a run for hours."""
ITEM_REFUSALS = (400, 413)
"""refusals that concern one request (malformed, too long), not the server, key or model: that item fails alone"""
FATAL_REFUSALS = (401, 403, 404)
"""refusals no request of the batch can get past (a wrong key, URL or model): the batch stops at once"""


def is_retryable_status(status: int) -> bool:
    """429 (rate limit) and 5xx (overload, restart, crash) may pass; other 4xx will not change on retry."""
    return status == 429 or 500 <= status <= 599


def backoff_delay(attempt: int, base_s: float, cap_s: float, retry_after: str | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``.

    The server's ``Retry-After`` (in seconds) wins when given. Otherwise "full jitter"
    (uniform in ``[0, min(cap, base * 2**attempt)]``), so that many clients that failed
    together do not come back together.
    """
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:  # an HTTP-date: rare enough to fall back to our own schedule
            seconds = math.nan
        if math.isfinite(seconds) and seconds >= 0:
            return min(seconds, MAX_RETRY_AFTER_S)
    return random.uniform(0.0, min(cap_s, base_s * 2**attempt))


def parse_reply(resp: httpx.Response, body: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON reply, or None and why it is unusable (a torn or odd body is worth a retry)."""
    try:
        reply = resp.json()
    except ValueError as e:
        return None, f"HTTP {resp.status_code} with a body that is not JSON ({e}): {excerpt(body)}"
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
        return None, f"HTTP {resp.status_code} with no choices in the reply: {excerpt(body)}"
    if not all(isinstance(c, dict) for c in reply["choices"]):
        return None, f"HTTP {resp.status_code} with malformed choices: {excerpt(body)}"
    return reply, ""


def describe(resp: httpx.Response, body: str) -> str:
    return f"HTTP {resp.status_code}: {excerpt(body)}"


def excerpt(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"
