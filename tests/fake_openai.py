"""A fake OpenAI-compatible chat-completions server for tests: real HTTP on 127.0.0.1.

It stands in for what cannot run here (a hosted LLM or a GPU vLLM server) and speaks the real
protocol, so the real ``openai`` SDK and :mod:`agemem.llm` are exercised end to end.

Usage (the ``fake_openai`` fixture in tests/fixtures_data.py gives a started server per test)::

    server = FakeOpenAI(reply=lambda req: "hello")      # or a fixed string
    with server:                                         # starts on a free port, stops on exit
        settings = load_settings("smoke", {"llm": server.llm_overrides()})
        ...
        assert server.count == 1
        server.requests[0]["messages"]                    # the JSON bodies the server saw

Behaviour knobs (attributes; change them any time, they apply to the next request):

* ``reply``: a string, or ``callable(request_body: dict) -> str | Reply``. The request body is the
  parsed JSON the client sent (``model``, ``messages``, ``temperature``, ``seed``...).
* ``delay_s``: sleep before answering every request (to trigger client timeouts).
* ``fail_first``: the first N requests get HTTP ``fail_status`` (default 500) with an OpenAI error body.
* ``garbage``: answer 200 with a body that is not JSON.
* A ``Reply(text=..., status=..., delay_s=..., body=...)`` returned by ``reply`` controls one
  response: any status, a delay, or raw ``body`` bytes (e.g. malformed JSON).

Counters: ``count`` (requests received on the chat endpoint, including failed and timed-out ones),
``requests`` (their bodies), ``max_in_flight`` (peak concurrent requests; checks concurrency limits).
``GET /v1/models`` lists ``model``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union


@dataclass
class Reply:
    """One scripted response."""

    text: str | None = None
    status: int = 200
    delay_s: float = 0.0
    body: bytes | None = None


ReplyFn = Callable[[dict[str, Any]], Union[str, Reply]]


def echo_last_user(request: dict[str, Any]) -> str:
    """Default reply: ``"echo: <last user message>"``."""
    users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


class FakeOpenAI:
    """A threaded HTTP server speaking ``POST /v1/chat/completions``."""

    def __init__(
        self,
        reply: str | ReplyFn = echo_last_user,
        *,
        delay_s: float = 0.0,
        fail_first: int = 0,
        fail_status: int = 500,
        garbage: bool = False,
        model: str = "fake-model",
    ) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.garbage = garbage
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def llm_overrides(self, **extra: Any) -> dict[str, Any]:
        """``settings.llm`` values pointing at this server (fast retries by default)."""
        return {
            "backend": "openai",
            "base_url": self.base_url,
            "api_key": "test-key",
            "model": self.model,
            "timeout_s": 5.0,
            "max_retries": 2,
            "backoff_s": 0.01,
            **extra,
        }

    def reset(self) -> None:
        """Forget requests and restore default behaviour (the server keeps running)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = 0
        self.reply, self.delay_s, self.fail_first, self.garbage = echo_last_user, 0.0, 0, False

    def start(self) -> "FakeOpenAI":
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ behaviour
    def _respond(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay_s:
                self._stopping.wait(self.delay_s)
            if n <= self.fail_first:
                return Reply(status=self.fail_status, text=f"injected failure {n}/{self.fail_first}")
            if self.garbage:
                return Reply(body=b"<html>this is not json</html>")
            out = self.reply(body) if callable(self.reply) else self.reply
            reply = out if isinstance(out, Reply) else Reply(text=str(out))
            if reply.delay_s:
                self._stopping.wait(reply.delay_s)
            return reply
        finally:
            with self._lock:
                self._in_flight -= 1

    def completion(self, text: str, request: dict[str, Any]) -> dict[str, Any]:
        """The chat-completion JSON for ``text`` (OpenAI's response shape)."""
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
        return {
            "id": f"chatcmpl-fake-{self.count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
            ],
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": len(text.split()),
                "total_tokens": prompt_words + len(text.split()),
            },
        }


def _handler_for(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            pass

        def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout); nothing to answer

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path.rstrip("/").endswith("/models"):
                data = {"object": "list", "data": [{"id": fake.model, "object": "model", "owned_by": "fake"}]}
                self._send(200, json.dumps(data).encode())
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                return
            reply = fake._respond(body)
            if fake._stopping.is_set():
                return
            if reply.body is not None:
                self._send(reply.status, reply.body, "application/json")
            elif reply.status != 200:
                error = {"error": {"message": reply.text or f"HTTP {reply.status}", "type": "fake_error", "code": reply.status}}
                self._send(reply.status, json.dumps(error).encode())
            else:
                self._send(200, json.dumps(fake.completion(reply.text or "", body)).encode())

    return Handler
