"""The OpenAI-compatible HTTP backend.

Three layers: the pure pieces (option scoring, retry classification, backoff); fault
paths through a small scripted HTTP server (429 + Retry-After, 5xx, torn and malformed
bodies, a 400 that must not be retried), which a real server will not produce on
demand; and a real ``transformers serve`` on the embedded model, killed and restarted
mid-run for the retry test.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from factory.llm.base import BackendError, GenParams
from factory.llm.http_retry import backoff_delay, is_retryable_status
from factory.llm.openai import OpenAIBackend
from factory.llm.top_logprobs import score_options

pytestmark = pytest.mark.timeout(300)

KEY_ENV = "FACTORY_TEST_OPENAI_KEY"
PLANTED_KEY = "sk-planted-3f9c0e7a-do-not-leak"


def dead_url() -> str:
    """The URL of a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def top(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
    """A ``top_logprobs`` list from (token, probability) pairs, as an OpenAI server writes it."""
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pairs]


def probs(scores: dict[str, float]) -> dict[str, float]:
    return {k: math.exp(v) for k, v in scores.items()}


# ---- option scoring: a pure function of the top tokens ----


def test_single_token_options_share_their_mass():
    got = probs(score_options(top(("A", 0.6), ("B", 0.3), ("C", 0.05)), ["A", "B"]))
    assert got == pytest.approx({"A": 0.6 / 0.9, "B": 0.3 / 0.9})


def test_leading_space_and_bare_tokens_both_count():
    got = probs(score_options(top((" A", 0.4), ("A", 0.2), (" B", 0.3), ("\n", 0.1)), ["A", "B"]))
    assert got == pytest.approx({"A": 0.6 / 0.9, "B": 0.3 / 0.9})


def test_a_token_counts_for_the_option_it_starts():
    got = probs(score_options(top(("Ye", 0.5), (" No", 0.3), ("Maybe", 0.1)), ["Yes", "No"]))
    assert got == pytest.approx({"Yes": 0.5 / 0.8, "No": 0.3 / 0.8})


def test_options_missing_from_the_top_list_share_the_leftover_mass():
    # 0.1 of the mass is outside the top list; B and C get 0.05 each.
    got = probs(score_options(top(("A", 0.5), ("X", 0.4)), ["A", "B", "C"]))
    assert got == pytest.approx({"A": 0.5 / 0.6, "B": 0.05 / 0.6, "C": 0.05 / 0.6})


def test_no_leftover_mass_gives_a_floor_not_minus_infinity():
    got = score_options(top(("A", 1.0)), ["A", "B"])
    assert got["A"] == pytest.approx(0.0, abs=1e-9)
    assert got["B"] == pytest.approx(math.log(1e-12), rel=1e-6)


def test_a_token_that_starts_two_options_is_refused():
    with pytest.raises(BackendError, match="differ in their first token"):
        score_options(top(("1", 0.5), ("2", 0.4)), ["1", "10"])
    with pytest.raises(BackendError, match="'Ye'"):
        score_options(top(("Ye", 0.9)), ["Yes", "Yeah"])


def test_a_malformed_top_entry_is_a_clear_error():
    with pytest.raises(BackendError, match="malformed top_logprobs entry"):
        score_options([{"tok": "A"}], ["A", "B"])


# ---- retry classification and backoff ----


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599])
def test_rate_limits_and_server_errors_are_retried(status):
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 301, 400, 401, 403, 404, 409, 422])
def test_other_statuses_are_not_retried(status):
    assert not is_retryable_status(status)


def test_backoff_is_full_jitter_capped_and_retry_after_wins():
    samples = [backoff_delay(3, 0.5, 30.0) for _ in range(2000)]
    assert 0.0 <= min(samples) and max(samples) <= 4.0
    assert max(samples) > 3.0 and min(samples) < 1.0  # spread over the whole window, not a fixed delay
    assert max(backoff_delay(20, 0.5, 30.0) for _ in range(200)) <= 30.0
    assert backoff_delay(0, 0.5, 30.0, retry_after="3") == 3.0
    assert backoff_delay(0, 0.5, 30.0, retry_after="86400") == 120.0  # a bogus value cannot stall a run
    assert backoff_delay(0, 0.5, 30.0, retry_after="Wed, 21 Oct 2015 07:28:00 GMT") <= 0.5


# ---- a scripted server for the fault paths ----


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    torn: bool = False
    """announce more bytes than are sent, then hang up mid-body."""


def ok(*texts: str, finish: str = "stop", usage: int | None = None, logprobs: list | None = None) -> Reply:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish} for i, t in enumerate(texts)
    ]
    if logprobs is not None:
        choices[0]["logprobs"] = {"content": [{"token": "x", "logprob": -0.1, "top_logprobs": logprobs}]}
    body: dict[str, Any] = {"id": "x", "object": "chat.completion", "model": "m", "choices": choices}
    if usage is not None:
        body["usage"] = {"completion_tokens": usage, "prompt_tokens": 3, "total_tokens": usage + 3}
    return Reply(body=body)


class ScriptedServer:
    """Answers each POST with the next scripted ``Reply`` (or a function of the request),
    recording what it received. Stops when the ``with`` block ends; a run past the end
    of the script gets a 599 so a test fails instead of hanging."""

    def __init__(self, *script: Reply | Callable[[dict], Reply]):
        self.script = list(script)
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(raw)
                with outer.lock:
                    outer.received.append({"path": self.path, "headers": dict(self.headers), "json": payload})
                    step = outer.script.pop(0) if outer.script else Reply(599, b"script exhausted")
                reply = step(payload) if callable(step) else step
                body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) + (100 if reply.torn else 0)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = reply.torn

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def backend_for(server_url: str, **kw) -> OpenAIBackend:
    return OpenAIBackend(server_url, kw.pop("model", "m"), **({"backoff_s": 0.01, "timeout_s": 10.0} | kw))


def test_429_with_retry_after_is_waited_out_then_succeeds():
    with ScriptedServer(Reply(429, {"error": "slow down"}, {"Retry-After": "1"}), ok("fine")) as srv:
        backend = backend_for(srv.base_url, backoff_s=0.0)  # so any wait comes from Retry-After
        t0 = time.monotonic()
        out = backend.generate([user("hi")], GenParams(max_tokens=4))
        assert time.monotonic() - t0 >= 0.9
    assert out[0][0].text == "fine"
    assert len(srv.received) == 2


def test_server_errors_and_broken_bodies_are_retried_until_success(caplog):
    script = [
        Reply(500, b"Internal Server Error"),
        Reply(200, b'{"choices": [{"message": {"content": "tru'),  # malformed JSON
        Reply(200, {"object": "error", "message": "overloaded"}),  # no choices
        Reply(200, {"choices": []}),
        Reply(200, b'{"choices": [', torn=True),  # the connection drops mid-body
        ok("made it"),
    ]
    with caplog.at_level(logging.WARNING, logger="factory.llm.openai"), ScriptedServer(*script) as srv:
        out = backend_for(srv.base_url, max_retries=5).generate([user("hi")], GenParams(max_tokens=4))
    assert out[0][0].text == "made it"
    assert len(srv.received) == 6
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 5 and all("retrying" in n for n in notes)
    assert "HTTP 500" in notes[0] and "not JSON" in notes[1] and "no choices" in notes[2] and "no choices" in notes[3]
    assert "RemoteProtocolError" in notes[4]


def test_a_400_is_not_retried_and_the_error_says_why():
    with ScriptedServer(Reply(400, {"error": "unknown field 'bogus'"}), ok("never sent")) as srv:
        with pytest.raises(BackendError) as err:
            backend_for(srv.base_url, max_retries=5).generate([user("hi")], GenParams(max_tokens=4))
    assert len(srv.received) == 1
    msg = str(err.value)
    assert f"{srv.base_url}/chat/completions" in msg and "HTTP 400" in msg and "unknown field 'bogus'" in msg
    assert "not retried" in msg


def test_giving_up_names_the_url_model_attempts_and_last_failure():
    with ScriptedServer(*[Reply(503, b"warming up")] * 3) as srv:
        with pytest.raises(BackendError) as err:
            backend_for(srv.base_url, model="tiny", max_retries=2).generate([user("hi")], GenParams(max_tokens=4))
    msg = str(err.value)
    assert srv.base_url in msg and "'tiny'" in msg and "3 attempts" in msg and "HTTP 503: warming up" in msg


def test_payload_top_up_stop_cut_finish_reasons_and_tokens():
    script = [
        ok("one END tail", finish="length", usage=5),  # the server ignored n and stop
        ok("two", "three", finish="content_filter", usage=8),
    ]
    # No seed: one request asks for all n (seeded samples go one per request: test_openai_fail_fast.py).
    params = GenParams(n=3, temperature=0.5, top_p=0.9, max_tokens=5, stop=("END",))
    with ScriptedServer(*script) as srv:
        out = backend_for(srv.base_url, model="tiny").generate([user("hi")], params)
    got = [(c.text, c.finish_reason, c.tokens) for c in out[0]]
    assert got == [("one ", "stop", 5), ("two", "stop", 4), ("three", "stop", 4)]
    first, second = (r["json"] for r in srv.received)
    assert first == {
        "model": "tiny",
        "messages": user("hi"),
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 5,
        "n": 3,
        "stop": ["END"],
    }
    assert second["n"] == 2 and "seed" not in second  # the top-up asks for what is still missing
    assert srv.received[0]["path"] == "/v1/chat/completions"


def test_length_finish_and_no_seed_or_stop_fields_when_unset():
    with ScriptedServer(ok("cut short", finish="length")) as srv:
        out = backend_for(srv.base_url).generate([user("hi")], GenParams(max_tokens=2))
    assert (out[0][0].finish_reason, out[0][0].tokens) == ("length", 0)
    assert "seed" not in srv.received[0]["json"] and "stop" not in srv.received[0]["json"]


def test_results_come_back_in_request_order_under_concurrency():
    def echo(payload: dict) -> Reply:
        i = int(payload["messages"][-1]["content"][1:])
        time.sleep(0.02 * (10 - i))  # later requests finish first
        return ok(f"a{i}")

    with ScriptedServer(*[echo] * 10) as srv:
        out = backend_for(srv.base_url, max_concurrency=4).generate([user(f"q{i}") for i in range(10)], GenParams())
    assert [c[0].text for c in out] == [f"a{i}" for i in range(10)]


def test_option_logprobs_reads_the_first_position_top_logprobs():
    tops = top((" B", 0.7), ("A", 0.2), ("C", 0.05))
    with ScriptedServer(ok("B", logprobs=tops), ok("A", logprobs=tops)) as srv:
        out = backend_for(srv.base_url).option_logprobs([user("q1"), user("q2")], ["A", "B"])
    assert out == [score_options(tops, ["A", "B"])] * 2
    assert probs(out[0]) == pytest.approx({"A": 0.2 / 0.9, "B": 0.7 / 0.9})
    sent = srv.received[0]["json"]
    assert (sent["max_tokens"], sent["temperature"], sent["logprobs"], sent["top_logprobs"]) == (1, 0.0, True, 20)


def test_option_logprobs_checks_the_options_before_calling():
    with ScriptedServer() as srv:
        with pytest.raises(ValueError, match="at least two options"):
            backend_for(srv.base_url).option_logprobs([user("q")], ["A"])
    assert srv.received == []


def test_the_api_key_is_sent_but_never_shown(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)

    def echo_headers(payload: dict) -> Reply:  # a careless server that echoes the request back
        return Reply(401, {"error": "bad key", "request": dict(srv.received[-1]["headers"])})

    with caplog.at_level(logging.DEBUG), ScriptedServer(Reply(500, f"key {PLANTED_KEY}".encode()), echo_headers) as srv:
        backend = backend_for(srv.base_url, api_key_env=KEY_ENV)
        with pytest.raises(BackendError) as err:
            backend.generate([user("hi")], GenParams(max_tokens=4))
    assert srv.received[0]["headers"]["Authorization"] == f"Bearer {PLANTED_KEY}"
    assert "HTTP 401" in str(err.value) and f"${KEY_ENV}" in str(err.value) and "<redacted>" in str(err.value)
    for shown in (str(err.value), repr(err.value), repr(backend), backend.model_id, caplog.text):
        assert PLANTED_KEY not in shown


def test_no_key_means_no_authorization_header(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with ScriptedServer(ok("hi")) as srv:
        backend = backend_for(srv.base_url, api_key_env=KEY_ENV)
        backend.generate([user("hi")], GenParams(max_tokens=4))
    assert "Authorization" not in srv.received[0]["headers"]
    assert "unset" in repr(backend)


def test_a_dead_server_fails_with_the_url_and_attempts(monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    url = dead_url()
    backend = backend_for(url, api_key_env=KEY_ENV, max_retries=2)
    with pytest.raises(BackendError) as err:
        backend.generate([user("hi")], GenParams(max_tokens=4))
    msg = str(err.value)
    assert url in msg and "3 attempts" in msg and "ConnectError" in msg
    assert PLANTED_KEY not in msg and PLANTED_KEY not in repr(backend)


def test_empty_batches_make_no_calls():
    backend = backend_for(dead_url(), max_retries=0)
    assert backend.generate([], GenParams()) == []
    assert backend.option_logprobs([], ["A", "B"]) == []
    backend.close()


# ---- a real server: transformers serve on the embedded model ----


@pytest.fixture
def real(serve):
    # Generation on the server is sequential; two in flight keep it busy without piling up.
    backend = OpenAIBackend(serve.base_url, serve.model, max_concurrency=2, timeout_s=120, max_retries=2, backoff_s=0.2)
    yield backend
    backend.close()


@pytest.mark.slow
def test_real_server_generates_a_batch_in_order(real: OpenAIBackend):
    requests = [user("Write a long story about a dragon."), user("Name a colour."), user("What is 2 + 2?")]
    out = real.generate(requests, GenParams(max_tokens=16, temperature=0.0))
    assert [len(c) for c in out] == [1, 1, 1]
    for (c,) in out:
        assert c.text.strip() and c.finish_reason in ("stop", "length") and 0 < c.tokens <= 16
    assert (out[0][0].finish_reason, out[0][0].tokens) == ("length", 16)  # a long story cannot fit in 16 tokens


@pytest.mark.slow
def test_real_server_n_is_topped_up(real: OpenAIBackend):
    # transformers serve ignores n and returns one choice; the backend asks again for the rest.
    # With a seed, each sample is a request of its own, with its own seed. (The server also decodes
    # greedily whatever the temperature for a model whose generation_config does not set do_sample,
    # as here, so the two samples may well be the same text.)
    for seed in (None, 3):
        params = GenParams(n=2, max_tokens=8, temperature=1.0, seed=seed)
        out = real.generate([user("Tell me a fun fact."), user("Give me a name for a cat.")], params)
        assert [len(c) for c in out] == [2, 2]
        assert all(c.text.strip() and 0 < c.tokens <= 8 for cs in out for c in cs)


@pytest.mark.slow
def test_real_server_stop_strings_are_honoured(real: OpenAIBackend):
    # Greedy SmolLM2 counts "1. 1\n2. 2\n..."; the server stops at "5" but leaves it in the text.
    params = GenParams(max_tokens=40, temperature=0.0, stop=("5",))
    (c,), = real.generate([user("Count from 1 to 10 separated by commas.")], params)
    assert "4" in c.text and "5" not in c.text and c.finish_reason == "stop"


@pytest.mark.slow
def test_real_server_without_logprobs_is_a_clear_error(real: OpenAIBackend, serve):
    with pytest.raises(BackendError) as err:
        real.option_logprobs([user("Is the sky blue? Answer Yes or No.")], ["Yes", "No"])
    assert serve.base_url in str(err.value) and "logprobs" in str(err.value) and "vLLM" in str(err.value)


@pytest.mark.slow
def test_real_server_4xx_is_not_retried_and_the_key_stays_hidden(serve, monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    for url, model, expect in [
        (serve.base_url + "/nope", serve.model, "HTTP 404"),  # a bad base path
        (serve.base_url, "some-other-model", "pinned"),  # the server serves only the model it was started with
    ]:
        backend = OpenAIBackend(url, model, api_key_env=KEY_ENV, max_retries=3, backoff_s=5.0)
        t0 = time.monotonic()
        with pytest.raises(BackendError) as err:
            backend.generate([user("hi")], GenParams(max_tokens=4))
        assert time.monotonic() - t0 < 5.0  # no retry happened (the first would wait up to 5 s)
        assert expect in str(err.value) and url in str(err.value) and "not retried" in str(err.value)
        assert PLANTED_KEY not in str(err.value) and PLANTED_KEY not in repr(backend)
        backend.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_survives_the_server_being_killed_and_restarted(make_server, caplog):
    server = make_server()
    # Retries must outlast the restart (~10 s to load on 2 busy cores): many short, capped waits.
    backend = OpenAIBackend(
        server.base_url, server.model, max_concurrency=2, timeout_s=60, max_retries=40, backoff_s=0.25, max_backoff_s=2
    )
    requests = [user(f"Write a short poem about the number {i}.") for i in range(4)]
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["out"] = backend.generate(requests, GenParams(max_tokens=24, temperature=0.0))
        except BaseException as e:  # surfaced by the asserts below
            result["error"] = e

    try:
        with caplog.at_level(logging.WARNING, logger="factory.llm.openai"):
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            time.sleep(1.5)
            assert worker.is_alive(), "the run ended before the kill; give it more work"
            server.kill()
            time.sleep(2.0)
            server.start()
            worker.join(timeout=300)
        assert not worker.is_alive(), "the run did not finish after the restart"
        assert "error" not in result, result.get("error")
        assert [len(c) for c in result["out"]] == [1, 1, 1, 1]
        assert all(c[0].text.strip() for c in result["out"])
        notes = [r.getMessage() for r in caplog.records]
        assert any("RemoteProtocolError" in n or "ReadError" in n for n in notes), "no request was torn by the kill"
        assert any("ConnectError" in n for n in notes), "no retry met the server while it was down"
    finally:
        backend.close()
        server.stop()

    # With the server gone for good and few retries, the failure names the server and the attempts.
    dead = OpenAIBackend(server.base_url, server.model, max_retries=2, backoff_s=0.05)
    with pytest.raises(BackendError, match=rf"{re.escape(server.base_url)}.*gave up after 3 attempts.*ConnectError"):
        dead.generate(requests[:1], GenParams(max_tokens=4))
