"""OpenAI-compatible HTTP backend: vLLM serve, llama.cpp server, TGI, hosted APIs.

Every conversation is one ``POST {base_url}/chat/completions``; a thread pool keeps
up to ``max_concurrency`` of them in flight, because the server batches what arrives
together and HTTP round-trips are mostly waiting. Servers differ in what they honour,
so the client makes up for the common gaps: it tops up when fewer than ``n`` choices
come back, and cuts at stop strings itself when the server returns them in the text.
Seeded samples go one per request, each with a seed of its own (``sample_seed``): a
server that gives every choice of a request the request's seed would return ``n`` copies.

A refusal no request can get past (401, 403, 404), or too many failures in a row, stops
the batch at once: queued requests never start, and requests waiting out a backoff give
up instead of retrying; a request already on the wire is abandoned, not waited for, and
keeps its connection, so the backend moves on to a fresh connection pool.

The API key is read once from the named environment variable and only ever sent
in the ``Authorization`` header: it is kept out of ``model_id``, ``repr``, logs and
error messages (redacted even if a server echoes it back).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable, Sequence, TypeVar

import httpx

from factory.llm.base import (BackendError, BatchIncomplete, Completion, GenParams, Messages, RequestFailed,
                               check_options, cut_at_stop, sample_seed)
from factory.llm.http_retry import (FATAL_REFUSALS, ITEM_REFUSALS, backoff_delay, describe, is_retryable_status,
                                    parse_reply)
from factory.llm.top_logprobs import NO_LOGPROBS_HINT, TOP_LOGPROBS, score_options

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _Stopped(Exception):
    """Raised inside a request whose batch has stopped (see ``_map``); never reaches a caller."""


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server at ``base_url`` (usually ending in ``/v1``).

    ``api_key_env`` names the variable holding the key (read once, here; absent means no
    ``Authorization`` header). ``timeout_s`` bounds each phase of one request (connect,
    send, wait for the reply), which for a non-streamed reply is about the whole request.
    A failed request is retried up to ``max_retries`` times, waiting ``backoff_s * 2**attempt``
    with full jitter, at most ``max_backoff_s``, or what the server's ``Retry-After`` says.

    A request that still fails, or that the server refuses for a reason of its own (400, 413:
    say, a prompt longer than the context), fails alone: the batch's other results come back in a
    ``BatchIncomplete`` and the stage records the item as failed. What no request can get past
    (a wrong key, URL or model: 401, 403, 404) stops the batch at once, and so do
    ``stop_after_failures`` failed requests in a row: the server is down, or refuses everything.
    Stopping does not wait for the other requests' retries: see ``_map``.

    With ``params.seed`` set and ``n > 1``, each sample is a request of its own (``n=1``) with
    the seed ``sample_seed(seed, j)``: sample ``j``'s text then depends on the prompt, the seed
    and ``j`` alone, not on how many choices a server returns per request or how it seeds them.
    Towards ``stop_after_failures`` such a prompt still counts once, as its one request would:
    an over-long prompt refused ``n`` times is one failure in a row, not ``n``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stop_after_failures: int = 16,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"openai:{self.base_url}#{model}"
        self.url = f"{self.base_url}/chat/completions"
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stop_after_failures = stop_after_failures
        self._failed_in_a_row = 0
        self._local = threading.local()  # per worker thread: the stop event and client of the batch it works for
        self._key = os.environ.get(api_key_env) or None  # private: never printed, see _redact
        self._client = self._new_client()

    def _new_client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        return httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )

    def __repr__(self) -> str:
        key = f"key from ${self.api_key_env}" if self._key else f"no key (${self.api_key_env} unset)"
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r}, {key})"

    # ---- the protocol ----

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        if params.seed is None or params.n == 1:
            return self._map(lambda messages: self._complete(messages, params), requests)
        # Seeded samples, one request each, with seeds of their own: one request asking for n
        # choices carries one seed, and a server that seeds every choice with it (rather than
        # seed, seed+1, ...) sends n copies of one sample. A prompt's n requests count as one
        # towards stop_after_failures (group=n), as its one request did.
        n = params.n
        per_sample = [params.model_copy(update={"n": 1, "seed": sample_seed(params.seed, j)}) for j in range(n)]
        jobs = [(messages, j) for messages in requests for j in range(n)]
        try:
            flat = self._map(lambda job: self._complete(job[0], per_sample[job[1]])[0], jobs, group=n)
        except BatchIncomplete as e:  # a prompt with a failed sample fails as a whole, with the first reason
            groups = [e.results[i * n : (i + 1) * n] for i in range(len(requests))]
            reasons: dict[int, str] = {}
            for k in sorted(e.reasons):
                reasons.setdefault(k // n, e.reasons[k])
            raise BatchIncomplete([None if i in reasons else list(g) for i, g in enumerate(groups)], reasons) from None
        return [flat[i * n : (i + 1) * n] for i in range(len(requests))]

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        """Scores from the first token's ``top_logprobs``; see ``score_options`` for the approximation."""
        opts = check_options(options)
        return self._map(lambda messages: score_options(self._first_top_logprobs(messages), opts), requests)

    def close(self) -> None:
        self._client.close()

    # ---- one conversation ----

    def _complete(self, messages: Messages, params: GenParams) -> list[Completion]:
        out: list[Completion] = []
        while len(out) < params.n:
            payload: dict[str, Any] = {
                "messages": messages,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": params.max_tokens,
                "n": params.n - len(out),
            }
            if params.stop:
                payload["stop"] = list(params.stop)
            if params.seed is not None:
                # A top-up with the same seed would replay the samples we already have. (generate
                # sends seeded samples one per request, so this is sample_seed(seed, 0) = seed there.)
                payload["seed"] = sample_seed(params.seed, len(out))
            reply = self._post(payload)
            choices = reply["choices"][: params.n - len(out)]
            completion_tokens = (reply.get("usage") or {}).get("completion_tokens")
            for choice in choices:
                text, cut = cut_at_stop((choice.get("message") or {}).get("content") or "", params.stop)
                length = choice.get("finish_reason") == "length" and not cut
                # usage counts every choice of the reply together; an even split is the best we know.
                tokens = completion_tokens // len(reply["choices"]) if isinstance(completion_tokens, int) else 0
                out.append(Completion(text=text, finish_reason="length" if length else "stop", tokens=tokens))
        return out

    def _first_top_logprobs(self, messages: Messages) -> list[dict[str, Any]]:
        payload = {
            "messages": messages,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }
        choice = self._post(payload)["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        # Servers such as `transformers serve` accept the fields and silently drop them.
        if not content or not content[0].get("top_logprobs"):
            raise BackendError(f"{self.url} (model {self.model!r}): {NO_LOGPROBS_HINT}")
        return content[0]["top_logprobs"]

    # ---- HTTP ----

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST one chat completion, retrying what a retry can fix; return the parsed reply."""
        if self.model:  # some servers serve one model and accept requests that name none
            payload = {"model": self.model, **payload}
        if payload["messages"] and payload["messages"][-1].get("role") == "assistant":
            # A prefill: continue the final assistant message. These are vLLM's fields; a
            # server that does not know them refuses the request (see _refusal's hint).
            payload.update(continue_final_message=True, add_generation_prompt=False)
        attempts = self.max_retries + 1
        stop = getattr(self._local, "stop", None) or threading.Event()  # set: the batch has stopped
        client = getattr(self._local, "client", None) or self._client  # the batch's, even once replaced
        for attempt in range(attempts):
            if stop.is_set():
                raise _Stopped
            retry_after = None
            try:
                resp = client.post(self.url, json=payload)
            except (httpx.TransportError, httpx.DecodingError) as e:
                if isinstance(e, httpx.UnsupportedProtocol):
                    raise BackendError(self._redact(f"{self.url}: {e}")) from None
                # A reset, a torn body, a timeout: the next attempt may well get through.
                failure = f"{type(e).__name__}: {str(e) or 'no detail'}"
            else:
                body = self._redact(resp.text)  # before any excerpt: a cut inside the key would keep its start
                if resp.is_success:
                    reply, failure = parse_reply(resp, body)
                    if reply is not None:
                        return reply
                elif is_retryable_status(resp.status_code):
                    failure, retry_after = describe(resp, body), resp.headers.get("retry-after")
                elif resp.status_code in ITEM_REFUSALS:
                    raise RequestFailed(self._redact(self._refusal(resp, body)))
                else:
                    raise BackendError(self._redact(self._refusal(resp, body)))
            if attempt + 1 < attempts:
                delay = backoff_delay(attempt, self.backoff_s, self.max_backoff_s, retry_after)
                note = f"{self.url}: attempt {attempt + 1}/{attempts} failed ({failure}); retrying in {delay:.1f}s"
                log.warning(self._redact(note))
                if stop.wait(delay):  # the batch stopped meanwhile: no point in a retry
                    raise _Stopped
        gave_up = f"{self.url} (model {self.model!r}): gave up after {attempts} attempts; last failure: {failure}"
        raise RequestFailed(self._redact(gave_up))

    def _refusal(self, resp: httpx.Response, body: str) -> str:
        if self._key:
            key = f"check the API key in ${self.api_key_env}"
        else:
            key = (f"${self.api_key_env} is not set, so no API key was sent: set it, or point "
                   "backend.api_key_env at the variable that holds the key")
        hint = {
            401: key,
            403: f"{key}, and that it may use model {self.model!r}",
            404: f"check the base URL {self.base_url!r} (usually ending in /v1) and the model name {self.model!r}",
            400: "the server found this request malformed or too long for the model",
            413: "the request is too large for the server",
            422: "check the request fields: continuing an assistant message (prefill) needs a server that "
            "knows continue_final_message, such as vLLM serve",
        }.get(resp.status_code, "check the request settings and the model name")
        stopped = "; no request can get past this, so the batch stopped" if resp.status_code in FATAL_REFUSALS else ""
        return (f"{self.url} (model {self.model!r}) refused the request, not retried: {describe(resp, body)}; "
                f"{hint}{stopped}")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text

    def _map(self, fn: Callable[[T], R], items: Sequence[T], group: int = 1) -> list[R]:
        """``fn`` over ``items`` with at most ``max_concurrency`` in flight, results in order.

        Requests that fail alone (``RequestFailed``) leave None in a ``BatchIncomplete``; any
        other error, or too many failures in a row, ends the whole batch at once, as soon as it
        comes back, whichever request it is: queued requests never start, requests waiting out a
        backoff stop waiting and give up (``_Stopped``), and a request still on the wire is left to
        finish on its own, its reply dropped. The workers are daemon threads, so not even the
        process's exit waits for such a request. Such a request keeps its pooled connection (the
        pool holds ``max_concurrency``) until it ends, up to ``timeout_s`` per phase, so after an
        early end the backend takes a fresh client and closes the batch's: the next call has all
        its connections, and the abandoned requests fail or finish on the old one, unheard.

        Items come in groups of ``group`` consecutive ones (a prompt's seeded samples) that count
        as one towards ``stop_after_failures``: a group's first failure adds one to the failures in
        a row, its later ones nothing; any success resets the count, as with ``group=1``.
        """
        if not items:
            return []
        results: list[R | None] = [None] * len(items)
        reasons: dict[int, str] = {}
        counted: set[int] = set()  # groups whose failure the count in a row already holds
        stop = threading.Event()
        client = self._client  # the batch's workers use this one, even after _map replaces it
        finished = False
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(items)):
            todo.put(i)
        done: queue.Queue[tuple[int, R | None, BaseException | None]] = queue.Queue()

        def work() -> None:
            self._local.stop = stop  # _post reads it: no retry, no backoff once the batch stopped
            self._local.client = client
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((i, fn(items[i]), None))
                except BaseException as e:  # handed to the caller's thread, which decides
                    if not isinstance(e, RequestFailed):
                        stop.set()  # at once, so that no worker starts another request meanwhile
                    done.put((i, None, e))

        for _ in range(min(self.max_concurrency, len(items))):
            threading.Thread(target=work, name="openai-request", daemon=True).start()
        try:
            for _ in range(len(items)):
                i, result, error = done.get()  # in the order they finish: a fatal error is seen at once
                if error is None:
                    results[i] = result
                    self._failed_in_a_row = 0
                    continue
                if not isinstance(error, RequestFailed):
                    raise error
                reasons[i] = str(error)
                if i // group in counted:
                    continue
                counted.add(i // group)
                self._failed_in_a_row += 1
                if self._failed_in_a_row >= self.stop_after_failures:
                    what = "requests" if group == 1 else "prompts"  # a prompt's seeded samples count once
                    raise BackendError(
                        f"{self.url} (model {self.model!r}): stopped after {self._failed_in_a_row} {what} "
                        f"in a row failed; the server seems down or refuses every request. Last failure: {error}"
                    ) from None
            finished = True
        finally:
            stop.set()  # whatever ended the loop (a fatal error, Ctrl-C, or the end): the workers stop
            if not finished and self._client is client:
                # Requests may still be on the wire, each holding a pooled connection: the next call
                # gets a fresh pool, and closing this one leaves them to fail, their results dropped.
                self._client = self._new_client()
                client.close()
        if reasons:
            raise BatchIncomplete(results, dict(sorted(reasons.items())))
        return results  # type: ignore[return-value]
