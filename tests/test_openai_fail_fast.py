"""The HTTP backend's seeded samples and its fail-fast stop, against a recording loopback server.

- Seeded samples: with ``n > 1`` and a seed, every sample must be asked with a seed of its
  own, the same ones on every call; a server that seeds every choice of a request with the
  request's seed (as the one here does) would otherwise send ``n`` copies of one sample.
- Fail fast: a 401, 403 or 404 stops the batch at once, even while other requests wait out
  long backoffs; queued requests never start, and the waiting ones are not retried.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from factory.llm.base import BackendError, BatchIncomplete, GenParams, RequestFailed
from factory.llm.openai import OpenAIBackend, sample_seed

pytestmark = pytest.mark.timeout(120)

KEY_ENV = "FACTORY_TEST_FAIL_FAST_KEY"
PLANTED_KEY = "sk-planted-7d1e44b0-do-not-leak"
Route = Callable[[dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def content(payload: dict[str, Any]) -> str:
    return payload["messages"][-1]["content"]


def seeded_choices(payload: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A server that honours ``n`` and seeds every choice of a request with the request's seed."""
    text = f"{content(payload)} / seed {payload.get('seed')}"
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
               for i in range(payload.get("n", 1))]
    return 200, {"id": "x", "object": "chat.completion", "choices": choices}, {}


class RecordingServer:
    """A loopback OpenAI-compatible server: ``route(payload)`` answers each POST; every request
    body is recorded, with the time it arrived."""

    def __init__(self, route: Route):
        self.received: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with outer.lock:
                    outer.received.append(payload)
                    outer.times.append(time.monotonic())
                status, body, headers = route(payload)
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "RecordingServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def asked(self, text: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.received if content(p) == text]


# ---- seeded samples ----


def test_sample_seed_keeps_sample_zero_and_derives_the_rest():
    assert sample_seed(7, 0) == 7 and sample_seed(-3, 0) == -3
    derived = [sample_seed(7, j) for j in range(1, 50)]
    assert derived == [sample_seed(7, j) for j in range(1, 50)]  # a pure function of (seed, j)
    assert len(set(derived)) == 49 and all(0 <= s < 2**31 for s in derived)
    assert not {8, 9, 10} & set(derived[:3])  # not seed + j: the next batch's seed would repeat a sample
    assert sample_seed(8, 1) != sample_seed(7, 1)


def test_seeded_samples_each_get_their_own_seed_the_same_on_every_call():
    prompts = [user("p0"), user("p1")]
    params = GenParams(n=3, temperature=1.0, max_tokens=4, seed=7)
    with RecordingServer(seeded_choices) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_concurrency=4, backoff_s=0.01, timeout_s=10.0)
        first = backend.generate(prompts, params)
        sent_first = {p: sorted(b["seed"] for b in srv.asked(p)) for p in ("p0", "p1")}
        second = backend.generate(prompts, params)
        backend.close()
    # Every sample is its own text: the server seeded each one differently.
    texts = [[c.text for c in cs] for cs in first]
    assert [len(set(t)) for t in texts] == [3, 3], texts
    # Sample 0 keeps the call's seed (what n=1 sends); every prompt gets the same seeds, as it does today.
    assert [t[0] for t in texts] == ["p0 / seed 7", "p1 / seed 7"]
    assert sent_first["p0"] == sent_first["p1"] and len(set(sent_first["p0"])) == 3
    assert all(b.get("n", 1) == 1 for b in srv.received)
    # The same call again: the same seeds, so the same samples in the same places.
    assert [[c.text for c in cs] for cs in second] == texts
    assert {p: sorted(b["seed"] for b in srv.asked(p)) for p in ("p0", "p1")} == {
        p: sorted(s + s) for p, s in sent_first.items()}


def test_one_sample_with_a_seed_is_sent_as_before():
    with RecordingServer(seeded_choices) as srv:
        backend = OpenAIBackend(srv.base_url, "m", backoff_s=0.01, timeout_s=10.0)
        out = backend.generate([user("p")], GenParams(n=1, max_tokens=4, seed=11))
        backend.close()
    assert [c.text for c in out[0]] == ["p / seed 11"]
    [body] = srv.received
    assert (body["n"], body["seed"]) == (1, 11)


def test_a_failed_sample_fails_its_prompt_alone():
    def route(payload):
        if content(payload) == "too long" and payload["seed"] != 5:  # its second sample is refused
            return 400, {"error": "too long"}, {}
        return seeded_choices(payload)

    with RecordingServer(route) as srv:
        backend = OpenAIBackend(srv.base_url, "m", backoff_s=0.01, timeout_s=10.0)
        with pytest.raises(BatchIncomplete) as err:
            backend.generate([user("fine"), user("too long"), user("also fine")], GenParams(n=2, seed=5))
        backend.close()
    assert list(err.value.reasons) == [1] and "HTTP 400" in err.value.reasons[1]
    results = err.value.results
    assert results[1] is None and [len(r) for r in (results[0], results[2])] == [2, 2]


# ---- fail fast on a refusal no request can get past ----


def refuse_all_but(slow: set[str], status: int) -> Route:
    """``slow`` requests get a 503 asking for a minute's wait; all others get ``status``."""
    def route(payload):
        if content(payload) in slow:
            return 503, {"error": "overloaded"}, {"Retry-After": "60"}
        return status, {"error": {"message": f"injected {status}"}}, {}
    return route


def run_in_thread(fn: Callable[[], Any], limit_s: float) -> tuple[BaseException | None, float]:
    """Run ``fn``; return what it raised and how long it took, or fail if it runs past ``limit_s``
    (a daemon thread: a hung call cannot hold the test up beyond that)."""
    outcome: dict[str, Any] = {}

    def target():
        t0 = time.monotonic()
        try:
            fn()
        except BaseException as e:
            outcome["error"] = e
        outcome["elapsed"] = time.monotonic() - t0

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limit_s)
    assert not worker.is_alive(), f"still running after {limit_s} s: the call waited for other requests' backoff"
    return outcome.get("error"), outcome["elapsed"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_fatal_refusal_stops_the_batch_at_once_without_waiting_for_backoffs(status, monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    slow = {"q0", "q1", "q2"}  # in flight first, each told to come back in a minute
    requests = [user(f"q{i}") for i in range(40)]
    with RecordingServer(refuse_all_but(slow, status)) as srv:
        # Defaults like these spend minutes on retries: 5 retries, each waiting 60 s (Retry-After).
        backend = OpenAIBackend(srv.base_url, "tiny", api_key_env=KEY_ENV, max_concurrency=4, max_retries=5,
                                backoff_s=30.0, max_backoff_s=60.0, timeout_s=10.0)
        error, elapsed = run_in_thread(lambda: backend.generate(requests, GenParams(max_tokens=4)), limit_s=15.0)
        time.sleep(0.5)  # any retry or queued request the stop failed to cancel would show up now
        hits = len(srv.received)
        slow_attempts = [len(srv.asked(q)) for q in sorted(slow)]
        backend.close()
    assert isinstance(error, BackendError) and not isinstance(error, (RequestFailed, BatchIncomplete)), error
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert hits <= 8, f"the server saw {hits} of 40 requests: queued ones were not cancelled"
    assert slow_attempts == [1, 1, 1], "a request waiting out its backoff was retried after the stop"
    msg = str(error)
    assert f"HTTP {status}" in msg and f"{srv.base_url}/chat/completions" in msg and "batch stopped" in msg
    if status in (401, 403):
        assert f"${KEY_ENV}" in msg
    else:
        assert "'tiny'" in msg and "base URL" in msg
    assert PLANTED_KEY not in msg and PLANTED_KEY not in repr(error)


def test_a_401_without_a_key_says_the_variable_is_unset(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with RecordingServer(refuse_all_but(set(), 401)) as srv:
        backend = OpenAIBackend(srv.base_url, "m", api_key_env=KEY_ENV, max_retries=3, backoff_s=5.0)
        with pytest.raises(BackendError, match=rf"\${KEY_ENV} is not set, so no API key was sent"):
            backend.generate([user("q")], GenParams(max_tokens=4))
        backend.close()
    assert len(srv.received) == 1


@pytest.mark.timeout(60)
def test_failures_in_a_row_stop_the_batch_without_waiting_for_backoffs():
    # q0 waits a minute to retry; the others fail for good at once (no retries left): after three
    # of them in a row the batch stops, without waiting for q0.
    def route(payload):
        if content(payload) == "q0":
            return 503, {"error": "overloaded"}, {"Retry-After": "60"}
        return 500, {"error": "down"}, {}

    with RecordingServer(route) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_concurrency=2, max_retries=1, backoff_s=0.0,
                                stop_after_failures=3, timeout_s=10.0)
        requests = [user(f"q{i}") for i in range(20)]
        error, elapsed = run_in_thread(lambda: backend.generate(requests, GenParams(max_tokens=4)), limit_s=15.0)
        time.sleep(0.5)
        asked_q0 = len(srv.asked("q0"))
        backend.close()
    assert isinstance(error, BackendError) and "3 requests in a row failed" in str(error), error
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    assert asked_q0 == 1


@pytest.mark.timeout(60)
def test_refused_seeded_samples_count_once_per_prompt_towards_the_stop():
    # Seeded samples go one request each (rerank: n=4), so an over-long prompt is refused n times.
    # It is still one failed prompt: three of them in a row are three failures, below the stop at
    # four, so the batch comes back with those prompts failed; four in a row do stop it.
    def route(payload):
        if content(payload).startswith("too long"):
            return 400, {"error": "this prompt is too long"}, {}
        return seeded_choices(payload)

    params = GenParams(n=4, temperature=1.0, max_tokens=4, seed=3)
    with RecordingServer(route) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_concurrency=4, backoff_s=0.01, stop_after_failures=4,
                                timeout_s=10.0)
        with pytest.raises(BatchIncomplete) as err:
            backend.generate([user(f"too long {i}") for i in range(3)] + [user("fine")], params)
        backend.close()
        fresh = OpenAIBackend(srv.base_url, "m", max_concurrency=4, backoff_s=0.01, stop_after_failures=4,
                              timeout_s=10.0)
        with pytest.raises(BackendError) as stopped:
            fresh.generate([user(f"too long {i}") for i in range(6)], params)
        fresh.close()
    assert list(err.value.reasons) == [0, 1, 2] and all("HTTP 400" in r for r in err.value.reasons.values())
    results = err.value.results
    assert results[:3] == [None, None, None] and len({c.text for c in results[3]}) == 4
    assert not isinstance(stopped.value, BatchIncomplete) and "4 prompts in a row failed" in str(stopped.value)


@pytest.mark.timeout(60)
def test_a_call_after_a_stop_has_every_connection_again():
    # A 401 stops the first call while three slow requests are still on the wire; they are
    # abandoned, not waited for. The next call on the same backend must get all max_concurrency
    # connections at once: its four probes each wait until all four are in flight together.
    slow_on_wire = threading.Semaphore(0)
    release = threading.Event()
    probes = threading.Barrier(4, timeout=3.0)

    def route(payload):
        text = content(payload)
        if text.startswith("slow"):
            slow_on_wire.release()
            release.wait(30)
            return seeded_choices(payload)
        if text == "bad":
            for _ in range(3):  # refuse only once the slow ones hold their connections
                slow_on_wire.acquire(timeout=5)
            return 401, {"error": {"message": "injected 401"}}, {}
        try:
            probes.wait()
        except threading.BrokenBarrierError:
            return 500, {"error": "the probes were never all in flight together"}, {}
        return seeded_choices(payload)

    with RecordingServer(route) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_concurrency=4, max_retries=0, backoff_s=0.0, timeout_s=10.0)
        try:
            first, _ = run_in_thread(
                lambda: backend.generate([user(f"slow{i}") for i in range(3)] + [user("bad")], GenParams()),
                limit_s=10.0)
            out: dict[str, Any] = {}
            second, elapsed = run_in_thread(
                lambda: out.setdefault("r", backend.generate([user(f"probe{i}") for i in range(4)], GenParams())),
                limit_s=15.0)
        finally:
            release.set()
            backend.close()
    assert isinstance(first, BackendError) and "HTTP 401" in str(first), first
    assert second is None, f"the second call failed: {second!r}"
    assert [[c.text for c in cs] for cs in out["r"]] == [[f"probe{i} / seed None"] for i in range(4)]
    assert elapsed < 3.0, f"took {elapsed:.1f} s"
