"""A misbehaving OpenAI-compatible server on 127.0.0.1, for the HTTP backend's fault tests.

Good replies come from a real model (an ``HFBackend``): chat completions from its
``generate``, and for ``logprobs`` requests the top-20 first tokens from its logits, as
vLLM would send them. Before answering, the server asks its ``plan`` what to do with the
request: ``None`` answers properly; a fault name answers with that fault instead:

- ``429`` (no Retry-After), ``429-retry-after`` (Retry-After: 1), ``500``, ``503``;
- ``reset``: the connection is closed with a TCP reset, no reply at all;
- ``hang``: nothing is sent until the client gives up (its timeout), then the socket closes;
- ``malformed-json``: a 200 whose body is not JSON;
- ``truncated``: a 200 announcing more bytes than it sends, then the connection closes;
- ``empty-choices``: a 200 with ``"choices": []``;
- ``400``: a refusal that concerns this request alone;
- ``401``, ``403``, ``404``: a refusal no request gets past (a wrong key, URL or model);
- ``503-retry-later``: a 503 with Retry-After: 60, so the client waits a minute before its retry.

Every request is logged (its messages and the fault it got), so tests can count attempts per
item and check that a rerun asks only for what failed.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch

FAULTS = ("429", "429-retry-after", "500", "503", "reset", "hang", "malformed-json", "truncated", "empty-choices")
"""the faults a retry may get past; ``400`` (refused, not retried) is extra"""
HANG_S = 12.0
"""how long a hung reply stays silent (at most): longer than the tests' client timeout"""


@dataclass
class Hit:
    messages: list[dict[str, str]]
    fault: str | None
    logprobs: bool


@dataclass
class FaultyServer:
    model: Any
    """an HFBackend: the real model behind the good replies"""
    plan: Callable[[list[dict[str, str]], int], str | None] = lambda messages, attempt: None
    """(messages, how many times these messages were asked before) -> a fault name or None"""
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()  # one forward at a time; bookkeeping must not wait for it
        self.closing = threading.Event()
        self.seen: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do: resets and torn bodies hit pooled sockets

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                outer.handle(self, payload)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up (timeout) breaks the pipe: expected here, and not worth a traceback

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        # The first forward of a fresh model takes seconds; it must not eat a test client's timeout.
        self.answer({"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1, "temperature": 0.0})

    def __enter__(self) -> "FaultyServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()  # hung replies end now, not HANG_S later
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- one request ----

    def handle(self, h: BaseHTTPRequestHandler, payload: dict) -> None:
        messages = payload["messages"]
        ident = json.dumps(messages, sort_keys=True)
        with self.lock:
            attempt = self.seen.get(ident, 0)
            self.seen[ident] = attempt + 1
            fault = self.plan(messages, attempt)
            self.hits.append(Hit(messages, fault, bool(payload.get("logprobs"))))
        if fault is None:
            with self.model_lock:
                body = self.answer(payload)
            return send(h, 200, json.dumps(body).encode())
        if fault in ("429", "500", "503", "400", "401", "403", "404"):
            return send(h, int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode())
        if fault == "429-retry-after":
            return send(h, 429, b'{"error": "slow down"}', {"Retry-After": "1"})
        if fault == "503-retry-later":
            return send(h, 503, b'{"error": "overloaded"}', {"Retry-After": "60"})
        if fault == "reset":
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault == "hang":
            self.closing.wait(HANG_S)
            h.close_connection = True
            return
        if fault == "malformed-json":
            return send(h, 200, b'{"id": "x", "choices": [{"message": {"content": "unterminated')
        if fault == "truncated":
            with self.model_lock:
                body = json.dumps(self.answer(payload)).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if fault == "empty-choices":
            return send(h, 200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
        raise ValueError(f"unknown fault {fault!r}")

    def answer(self, payload: dict) -> dict:
        """The reply a correct server would give, from the real model."""
        from factory.llm.base import GenParams, chat_text

        messages = payload["messages"]
        if payload.get("logprobs"):
            tok, model = self.model.tokenizer, self.model.model
            ids = tok(chat_text(tok, messages), return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(ids.to(model.device)).logits[0, -1].float()
            top = torch.log_softmax(logits, -1).topk(int(payload.get("top_logprobs", 20)))
            entries = [{"token": tok.decode([int(i)]), "logprob": float(v)} for v, i in zip(top.values, top.indices)]
            choice = {"index": 0, "message": {"role": "assistant", "content": entries[0]["token"]},
                      "finish_reason": "length",
                      "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}
            return {"id": "x", "object": "chat.completion", "choices": [choice]}
        params = GenParams(n=payload.get("n", 1), temperature=payload.get("temperature", 0.7),
                           top_p=payload.get("top_p", 1.0), max_tokens=payload.get("max_tokens", 64),
                           stop=tuple(payload.get("stop") or ()), seed=payload.get("seed"))
        [completions] = self.model.generate([messages], params)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
                   for i, c in enumerate(completions)]
        tokens = sum(c.tokens for c in completions)
        return {"id": "x", "object": "chat.completion", "model": "m", "choices": choices,
                "usage": {"completion_tokens": tokens, "prompt_tokens": 0, "total_tokens": tokens}}


def send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)
