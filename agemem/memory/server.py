"""The memory tool server: FastAPI over a :class:`MemoryService` (``agemem serve-tools``).

Status codes: 201 new session, 200 tool result (``ok`` false for a tool-level failure), 204
session deleted; 401 missing / 403 wrong token (the body never holds the session's data), 404
unknown session or tool, 413 content or body too large, 422 malformed arguments, 503 when the
store fails. Client input never produces any other 5xx.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pymilvus.exceptions import MilvusException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agemem.memory.base import MemoryItem, MemorySession, MemoryUnavailableError, ToolResult
from agemem.memory.service import (
    CONTENT_TOO_LARGE,
    INVALID_ARGUMENTS,
    UNKNOWN_TOOL,
    MemoryService,
    SessionAuthError,
    UnknownSessionError,
)
from agemem.settings import Settings

logger = logging.getLogger(__name__)

_STATUS_FOR_ERROR = {
    UNKNOWN_TOOL: status.HTTP_404_NOT_FOUND,
    INVALID_ARGUMENTS: status.HTTP_422_UNPROCESSABLE_CONTENT,
    CONTENT_TOO_LARGE: status.HTTP_413_CONTENT_TOO_LARGE,
}


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413.

    A declared Content-Length is checked before anything is read. Otherwise the body is read
    here, at most ``max_bytes + 1`` bytes of it, before the app runs, then replayed to the app:
    FastAPI turns any exception raised while it reads a body into a 400, so a streamed (chunked)
    body that is cut off mid-read could not come back as 413. Memory stays bounded by the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: nothing to answer
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.max_bytes} bytes (memory.max_body_bytes)"},
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never reads
    return {"type": "http.disconnect"}


_bearer = HTTPBearer(auto_error=False, description="Session token from POST /sessions (or the server token).")


def create_app(service: MemoryService, settings: Settings) -> FastAPI:
    """The tool server's ASGI app over ``service`` (which the caller owns and closes)."""
    server_token = settings.memory.server_token
    app = FastAPI(
        title="agemem memory tool server",
        version="1",
        description="Per-session long-term memory tools (Add/Update/Delete/Retrieve_memory) over Milvus.",
    )
    app.state.service = service

    @app.exception_handler(UnknownSessionError)
    async def _unknown_session(_: Request, exc: UnknownSessionError) -> JSONResponse:
        return JSONResponse({"detail": "unknown session"}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(SessionAuthError)
    async def _bad_token(_: Request, exc: SessionAuthError) -> JSONResponse:
        code = status.HTTP_401_UNAUTHORIZED if "missing" in str(exc) else status.HTTP_403_FORBIDDEN
        return JSONResponse({"detail": str(exc)}, status_code=code, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(MemoryUnavailableError)
    @app.exception_handler(MilvusException)
    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        logger.error("memory store failure: %s", exc)
        return JSONResponse({"detail": "memory store unavailable"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    async def session_for(
        session_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> MemorySession:
        token = credentials.credentials if credentials is not None else None
        await service.authenticate(session_id, token)
        return MemorySession(session_id=session_id, session_token=token or "")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/sessions", status_code=status.HTTP_201_CREATED, response_model=MemorySession)
    async def create_session(
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> MemorySession:
        if server_token is not None:
            given = credentials.credentials if credentials is not None else ""
            if not given:
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, "server token required", {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.encode(), server_token.get_secret_value().encode()):
                raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong server token")
        return await service.create_session()

    @app.post(
        "/sessions/{session_id}/tools/{tool_name}",
        response_model=ToolResult,
        responses={
            404: {"description": "unknown session or tool"},
            413: {"description": "content or body too large"},
            422: {"description": "malformed JSON, wrong types or missing arguments"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "The tool's arguments as a JSON object.",
                "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
            }
        },
    )
    async def call_tool(
        tool_name: str,
        request: Request,
        session: MemorySession = Depends(session_for),
    ) -> Any:
        # Parsed here, not by FastAPI: it answers 400 for a body that is not UTF-8 or nests too
        # deep, and the contract says malformed JSON is a 422 with a message.
        try:
            arguments = json.loads(await request.body())
        except (ValueError, RecursionError) as exc:
            text = f"{tool_name[:60]}: the request body is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"
            result = ToolResult(ok=False, text=text, data={"error": INVALID_ARGUMENTS})
            return JSONResponse({**result.model_dump(), "detail": text}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
        result = await service.run_tool(session.session_id, tool_name, arguments)
        code = _STATUS_FOR_ERROR.get(result.data.get("error", ""), status.HTTP_200_OK) if not result.ok else 200
        if code == status.HTTP_200_OK:
            return result
        # Same body as a 200 plus ``detail``, so any HTTP client finds the message where it looks.
        return JSONResponse({**result.model_dump(), "detail": result.text}, status_code=code)

    @app.get("/sessions/{session_id}/memories")
    async def list_memories(session: MemorySession = Depends(session_for)) -> dict[str, list[MemoryItem]]:
        return {"memories": await service.session_memories(session.session_id)}

    @app.delete("/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_session(session: MemorySession = Depends(session_for)) -> Response:
        await service.drop_session(session.session_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    app.add_middleware(BodySizeLimit, max_bytes=settings.memory.max_body_bytes)
    return app


__all__ = ["BodySizeLimit", "create_app"]
