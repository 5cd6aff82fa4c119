"""The memory tool server: FastAPI over a :class:`MemoryService`, and :func:`serve` to run it.

Status codes: 201 new session, 200 tool result (``ok`` false for a tool-level failure), 204
session deleted; 401 missing / 403 wrong token (the body never holds the session's data), 404
unknown session or tool, 408 request body not received in time, 409 a named space that exists,
413 content or body too large, 422 malformed arguments, 429 too many live sessions, 503 when the
store fails or the server is at ``memory.max_connections``. Client input never produces any other
5xx. The admin view (``/admin``, :mod:`agemem.memory.admin`) needs the server token.

Connections are bounded: a request head must arrive within ``memory.header_timeout_s``, a body
within ``memory.body_timeout_s``, idle keep-alive connections close after
``memory.keep_alive_timeout_s``, and the process raises its open-file limit to fit
``memory.max_connections``. On SIGTERM or SIGINT running requests finish, then the store is
flushed and closed (the app's lifespan), whatever ``memory.flush_interval_s`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pymilvus.exceptions import MilvusException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agemem.memory.admin import MemoryAdmin, add_admin_routes
from agemem.memory.bodies import body_schema, parse_body
from agemem.memory.arguments import ArgumentError
from agemem.memory.base import MemoryItem, MemorySession, MemoryUnavailableError, ToolResult
from agemem.memory.service import (
    CONTENT_TOO_LARGE,
    INVALID_ARGUMENTS,
    UNKNOWN_TOOL,
    MemoryService,
    SessionAuthError,
    SessionLimitError,
    SpaceExistsError,
    UnknownSessionError,
)
from agemem.settings import Settings

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)

_STATUS_FOR_ERROR = {
    UNKNOWN_TOOL: status.HTTP_404_NOT_FOUND,
    INVALID_ARGUMENTS: status.HTTP_422_UNPROCESSABLE_CONTENT,
    CONTENT_TOO_LARGE: status.HTTP_413_CONTENT_TOO_LARGE,
}
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Open files beyond the connections: the store's files, its socket, the model, logs.
_RESERVED_FILES = 512


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, and bodies slower than ``timeout_s`` with 408.

    A declared Content-Length is checked before anything is read. Otherwise the body is read
    here, at most ``max_bytes + 1`` bytes of it, before the app runs, then replayed to the app:
    FastAPI turns any exception raised while it reads a body into a 400, so a streamed (chunked)
    body that is cut off mid-read could not come back as 413. Memory stays bounded by the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the HTTP layer rejects a malformed length itself
            if too_big:
                await self._refuse(send, status.HTTP_413_CONTENT_TOO_LARGE,
                                   f"request body over {self.max_bytes} bytes (memory.max_body_bytes)")
                return
        chunks: list[bytes] = []
        seen = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # client went away: nothing to answer
                        return
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.max_bytes:
                        await self._refuse(send, status.HTTP_413_CONTENT_TOO_LARGE,
                                           f"request body over {self.max_bytes} bytes (memory.max_body_bytes)")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(send, status.HTTP_408_REQUEST_TIMEOUT,
                               f"request body not received within {self.timeout_s:g}s (memory.body_timeout_s)")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, code: int, detail: str) -> None:
        response = JSONResponse({"detail": detail}, status_code=code)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


_bearer = HTTPBearer(auto_error=False, description="Session token from POST /sessions (or the server token).")


class NewSession(BaseModel):
    """The optional body of ``POST /sessions``."""

    model_config = ConfigDict(extra="forbid")
    space: str | None = Field(None, description="Create the named memory space 'space-<name>' (kept until deleted, "
                                                "never expired); 1-58 letters, digits, '_' or '-'.")


# Long on purpose (~160 lines): FastAPI routes are closures over this app's service and limits, and
# the whole HTTP contract (routes, status codes, auth) reads in one place; each handler is a few
# lines into MemoryService.
def create_app(service: MemoryService, settings: Settings) -> FastAPI:
    """The tool server's ASGI app over ``service``.

    Its lifespan runs the idle-session sweeper, and on shutdown flushes and closes ``service``.
    """
    server_token = settings.memory.server_token

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(service.run_sweeper(), name="agemem-session-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            started = time.perf_counter()
            await asyncio.to_thread(service.close)
            logger.info("memory store flushed and closed in %.2fs", time.perf_counter() - started)

    app = FastAPI(
        title="agemem memory tool server",
        version="1",
        description="Per-session long-term memory tools (Add/Update/Delete/Retrieve_memory) over Milvus.",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(UnknownSessionError)
    async def _unknown_session(_: Request, exc: UnknownSessionError) -> JSONResponse:
        return JSONResponse({"detail": "unknown session"}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(SessionAuthError)
    async def _bad_token(_: Request, exc: SessionAuthError) -> JSONResponse:
        code = status.HTTP_401_UNAUTHORIZED if "missing" in str(exc) else status.HTTP_403_FORBIDDEN
        return JSONResponse({"detail": str(exc)}, status_code=code, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(SpaceExistsError)
    async def _space_exists(_: Request, exc: SpaceExistsError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(SessionLimitError)
    async def _full(_: Request, exc: SessionLimitError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_429_TOO_MANY_REQUESTS)

    @app.exception_handler(ArgumentError)
    async def _bad_argument(_: Request, exc: ArgumentError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(MemoryUnavailableError)
    @app.exception_handler(MilvusException)
    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        logger.error("memory store failure: %s", exc)
        return JSONResponse({"detail": "memory store unavailable"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    def token_of(credentials: HTTPAuthorizationCredentials | None) -> str | None:
        return credentials.credentials if credentials is not None else None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/sessions",
        status_code=status.HTTP_201_CREATED,
        response_model=MemorySession,
        responses={409: {"description": "the named space exists"},
                   422: {"description": "malformed body or space name"},
                   429: {"description": "memory.max_sessions live sessions exist"}},
        openapi_extra=body_schema(NewSession),
    )
    async def create_session(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> MemorySession:
        if server_token is not None:
            given = token_of(credentials) or ""
            if not given:
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, "server token required", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.encode(), server_token.get_secret_value().encode()):
                raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong server token")
        body = await parse_body(request, NewSession, required=False)
        if body is None or body.space is None:
            return await service.create_session()
        return await service.create_session(space=body.space)

    @app.post(
        "/sessions/{session_id}/tools/{tool_name}",
        response_model=ToolResult,
        responses={
            404: {"description": "unknown session or tool"},
            413: {"description": "content or body too large"},
            422: {"description": "malformed JSON, wrong types or missing arguments"},
        },
        openapi_extra={
            "parameters": [{
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": "A client-chosen id of this call: a retry with the same id gets the first "
                "call's result instead of running again.",
            }],
            "requestBody": {
                "required": True,
                "description": "The tool's arguments as a JSON object.",
                "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
            },
        },
    )
    async def call_tool(
        session_id: str,
        tool_name: str,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> Any:
        async with service.session(session_id, token_of(credentials)):
            # Parsed here, not by FastAPI: it answers 400 for a body that is not UTF-8 or nests too
            # deep, and the contract says malformed JSON is a 422 with a message.
            try:
                arguments = json.loads(await request.body())
            except (ValueError, RecursionError) as exc:
                text = (f"{ascii(tool_name[:60])}: the request body is not valid JSON "
                        f"({type(exc).__name__}: {str(exc)[:200]})")
                result = ToolResult(ok=False, text=text, data={"error": INVALID_ARGUMENTS})
                return JSONResponse({**result.model_dump(), "detail": text},
                                    status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
            request_id = request.headers.get(IDEMPOTENCY_HEADER)
            result = await service.run_tool(session_id, tool_name, arguments, request_id=request_id)
        code = _STATUS_FOR_ERROR.get(result.data.get("error", ""), status.HTTP_200_OK) if not result.ok else 200
        if code == status.HTTP_200_OK:
            return result
        # Same body as a 200 plus ``detail``, so any HTTP client finds the message where it looks.
        return JSONResponse({**result.model_dump(), "detail": result.text}, status_code=code)

    @app.get("/sessions/{session_id}/memories")
    async def list_memories(
        session_id: str,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
        limit: int | None = Query(None, ge=1, description="Most memories in this page (memory.list_page_size)."),
        cursor: str | None = Query(None, description="next_cursor of the previous page."),
    ) -> dict[str, list[MemoryItem] | str | None]:
        """The session's memories, oldest first, a page at a time; ``next_cursor`` is null on the last page."""
        async with service.session(session_id, token_of(credentials)):
            items, next_cursor = await service.memories_page(session_id, cursor, limit)
        return {"memories": items, "next_cursor": next_cursor}

    @app.delete("/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_session(
        session_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> Response:
        await service.delete(session_id, token_of(credentials))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    add_admin_routes(app, MemoryAdmin(service), server_token)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.memory.max_body_bytes, timeout_s=settings.memory.body_timeout_s
    )
    return app


# -- running it ---------------------------------------------------------------------------------


def _head_deadline_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, plus a deadline for each request head.

    uvicorn (0.54) times out only idle keep-alive connections after a response: one that never
    sends a whole request head (connect and wait, or a slow trickle) stayed open for good, and
    1,100 such connections used up the open-file limit and locked everyone out.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_head():
                self._arm_head_timer()
            super().data_received(data)
            if not self._awaiting_head():
                self._disarm_head_timer()

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_head_timer(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._awaiting_head() and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


class RateLimitedLog(logging.Filter):
    """Let through one record per ``interval_s`` whose message starts with one of ``prefixes``.

    When the open-file limit is reached, asyncio logs every failed accept with a traceback, and
    uvicorn a warning for every request over ``limit_concurrency``: under a flood of connections
    that filled the disk. The record that passes says how many were held back, without traceback.
    """

    def __init__(self, prefixes: tuple[str, ...], interval_s: float = 60.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        now = time.monotonic()
        if now - self._last.get(prefix, float("-inf")) < self.interval_s:
            self._held[prefix] = self._held.get(prefix, 0) + 1
            return False
        held = self._held.pop(prefix, 0)
        self._last[prefix] = now
        note = f"; {held} more like it since the last report" if held else ""
        record.msg = f"{message}{note} (repeats held back for {self.interval_s:g}s)"
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


_FLOOD_MESSAGES = ("socket.accept() out of system resource", "Exceeded concurrency limit")


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft open-file limit to ``wanted`` (as far as the hard limit allows); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        logger.debug("open-file limit raised from %d to %d", soft, target)
        soft = target
    return soft


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of the tool server: timeouts, limits, the head deadline, lifespan."""
    import uvicorn

    mem = settings.memory
    options: dict[str, Any] = {
        "host": mem.host,
        "port": mem.port,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        "http": _head_deadline_protocol(mem.header_timeout_s),
        "timeout_keep_alive": mem.keep_alive_timeout_s,
        "limit_concurrency": mem.max_connections,
        "h11_max_incomplete_event_size": mem.max_header_bytes,
        "timeout_graceful_shutdown": mem.shutdown_timeout_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def guard_logs() -> None:
    """Rate-limit the log lines a connection flood repeats (asyncio's accept errors, uvicorn's 503s)."""
    for name in ("asyncio", "uvicorn.error"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in log.filters):
            log.addFilter(RateLimitedLog(_FLOOD_MESSAGES))


def serve(settings: Settings) -> None:
    """Run the tool server in this process until SIGTERM or SIGINT (``agemem serve-tools``).

    Raises :class:`MemoryUnavailableError` (store unreachable or locked) or ``ValueError``
    (store and embedder disagree) before serving. On the way out the store is flushed and closed.
    """
    import uvicorn

    mem = settings.memory
    if mem.embedding_threads:
        import torch

        torch.set_num_threads(mem.embedding_threads)
    files = raise_open_file_limit(mem.max_connections + _RESERVED_FILES)
    overrides: dict[str, Any] = {}
    if files < mem.max_connections + _RESERVED_FILES:
        overrides["limit_concurrency"] = max(1, files - _RESERVED_FILES)
        logger.warning("open-file limit %d is too low for memory.max_connections=%d; serving at most %d",
                       files, mem.max_connections, overrides["limit_concurrency"])
    guard_logs()
    service = MemoryService.from_settings(settings)
    try:
        app = create_app(service, settings)
        if mem.host not in ("127.0.0.1", "localhost", "::1") and mem.server_token is None:
            logger.warning("serving on %s without memory.server_token: anyone who reaches it can create sessions",
                           mem.host)
        logger.info("memory tool server on http://%s:%d (store %s)", mem.host, mem.port, settings.memory_uri)
        uvicorn.Server(server_config(app, settings, **overrides)).run()
    finally:
        service.close()  # after a graceful stop the lifespan has closed it already


__all__ = [
    "BodySizeLimit",
    "IDEMPOTENCY_HEADER",
    "RateLimitedLog",
    "create_app",
    "guard_logs",
    "raise_open_file_limit",
    "serve",
    "server_config",
]
