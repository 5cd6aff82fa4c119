"""Memory clients: in-process (over a :class:`MemoryService`) and HTTP (the tool server).

Both implement :class:`agemem.memory.base.MemoryClient`: tool-level failures come back as
``ToolResult(ok=False, text=...)``, whatever the arguments hold; an unreachable backend raises
:class:`MemoryUnavailableError`; an unknown session or a wrong token raises
:class:`agemem.memory.service.MemorySessionError`. Deleting a session that is already gone is no
error (a retried DELETE, an expired session).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agemem.memory.arguments import INVALID_ARGUMENTS, ArgumentError
from agemem.memory.base import MEMORY_TOOLS, MemoryClient, MemoryItem, MemorySession, MemoryUnavailableError, ToolResult
from agemem.memory.server import IDEMPOTENCY_HEADER
from agemem.memory.service import (
    MemoryService,
    MemorySessionError,
    SessionAuthError,
    SessionLimitError,
    SpaceExistsError,
    UnknownSessionError,
    unknown_tool,
)
from agemem.settings import Settings

logger = logging.getLogger(__name__)

KEEPALIVE_EXPIRY_S = 2.0


class InProcessMemoryClient:
    """Calls a :class:`MemoryService` in this process (the embedded default, and tests)."""

    def __init__(self, service: MemoryService, *, owns_service: bool = False) -> None:
        self.service = service
        self._owns_service = owns_service

    async def create_session(self, space: str | None = None) -> MemorySession:
        # No space: the plain call, as before spaces existed (wrappers of create_session keep working).
        return await (self.service.create_session() if space is None else self.service.create_session(space=space))

    async def check_session(self, session: MemorySession) -> None:
        await self.service.authenticate(session.session_id, session.session_token)

    async def call_tool(self, session: MemorySession, tool_name: str, arguments: dict[str, Any]) -> ToolResult:
        return await self.service.call_tool(session, tool_name, arguments)

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]:
        return await self.service.list_memories(session)

    async def delete_session(self, session: MemorySession) -> None:
        await self.service.delete_session(session)

    async def aclose(self) -> None:
        if self._owns_service:
            self.service.close()


class _ServerError(Exception):
    """A 5xx answer: worth retrying."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, _ServerError))


class HttpMemoryClient:
    """Async client of the memory tool server, with connection pooling and bounded retries."""

    def __init__(
        self,
        base_url: str,
        *,
        server_token: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_connections: int = 128,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._server_token = server_token
        self._retries = retries
        self._backoff_s = backoff_s
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            # Idle connections are dropped well before the server's keep-alive timeout (5 s by default):
            # reusing one the server is closing that instant fails the request in flight.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpMemoryClient:
        mem = settings.memory
        if not mem.server_url:
            raise ValueError("memory.server_url is not set (AGEMEM_MEMORY__SERVER_URL)")
        return cls(
            mem.server_url,
            server_token=mem.server_token.get_secret_value() if mem.server_token else None,
            timeout_s=mem.request_timeout_s,
            retries=mem.client_retries,
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # Every attempt sends the same request: a tool call carries its request id, so a retry
        # after the first attempt reached the server (a read timeout) is answered from the
        # server's memory of it, not run twice; a 5xx means the server failed the call.
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self._retries + 1),
                wait=wait_exponential(multiplier=self._backoff_s, max=5.0),
                retry=retry_if_exception(_retryable),
                reraise=True,
            ):
                with attempt:
                    response = await self._http.request(method, path, **kwargs)
                    if response.status_code >= 500:
                        raise _ServerError(f"{response.status_code}: {response.text[:200]}")
                    return response
        except httpx.TransportError as exc:
            raise MemoryUnavailableError(
                f"memory tool server at {self.base_url} is unreachable ({type(exc).__name__}: {exc}); "
                "is `agemem serve-tools` running? (memory.server_url)"
            ) from None
        except _ServerError as exc:
            raise MemoryUnavailableError(f"memory tool server at {self.base_url} failed: {exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying either returns or raises

    @staticmethod
    def _auth(token: str) -> dict[str, str]:
        if not token.isascii() or not token.isprintable():
            raise SessionAuthError("session token is not printable ASCII (tokens come from POST /sessions)")
        return {"Authorization": f"Bearer {token}"}

    @staticmethod
    def _session_path(session: MemorySession) -> str:
        return "/sessions/" + quote(session.session_id.encode("utf-8", errors="surrogatepass"), safe="")

    @staticmethod
    def _session_error(response: httpx.Response) -> None:
        detail = _detail(response)
        if response.status_code == 404:
            raise UnknownSessionError(detail or "unknown session")
        if response.status_code in (401, 403):
            raise SessionAuthError(detail or "session token refused")

    async def create_session(self, space: str | None = None) -> MemorySession:
        headers = self._auth(self._server_token) if self._server_token else {}
        body = {"json": {"space": space}} if space is not None else {}
        response = await self._request("POST", "/sessions", headers=headers, **body)
        if response.status_code in (401, 403):
            raise SessionAuthError(f"server token refused: {_detail(response)} (memory.server_token)")
        if response.status_code == 409:
            raise SpaceExistsError(_detail(response))
        if response.status_code == 422:
            raise ArgumentError(_detail(response))
        if response.status_code == 429:
            raise SessionLimitError(f"memory tool server at {self.base_url}: {_detail(response)}")
        response.raise_for_status()
        return MemorySession.model_validate(response.json())

    async def check_session(self, session: MemorySession) -> None:
        """Raise :class:`UnknownSessionError` or :class:`SessionAuthError` unless the token opens the session."""
        response = await self._request("GET", f"{self._session_path(session)}/memories",
                                       headers=self._auth(session.session_token), params={"limit": 1})
        self._session_error(response)
        response.raise_for_status()

    async def call_tool(self, session: MemorySession, tool_name: str, arguments: dict[str, Any]) -> ToolResult:
        if tool_name not in MEMORY_TOOLS:
            return unknown_tool(tool_name)
        try:
            # ASCII escapes carry any string, lone surrogates too: the server's validation, not
            # this encoder, tells the model what is wrong with an argument.
            body = json.dumps(arguments, ensure_ascii=True, allow_nan=False).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            return ToolResult(ok=False, text=f"{tool_name}: the arguments cannot be sent as JSON ({exc})",
                              data={"error": INVALID_ARGUMENTS})
        headers = {
            **self._auth(session.session_token),
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: uuid.uuid4().hex,
        }
        response = await self._request(
            "POST", f"{self._session_path(session)}/tools/{tool_name}", content=body, headers=headers
        )
        body_json = _json(response)
        if isinstance(body_json, dict) and "ok" in body_json and "text" in body_json:
            # 200, and the tool-level 404/413/422 answers, carry a ToolResult.
            try:
                return ToolResult.model_validate(body_json)
            except ValidationError:
                raise MemoryUnavailableError(f"malformed tool result from {self.base_url}") from None
        if response.status_code in (401, 403, 404):
            self._session_error(response)
        if response.status_code in (408, 413, 422):
            return ToolResult(ok=False, text=f"{tool_name}: {_detail(response)}", data={"error": INVALID_ARGUMENTS})
        raise MemoryUnavailableError(f"unexpected answer {response.status_code} from {self.base_url}")

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]:
        """All memories of the session, oldest first (page after page)."""
        items: list[MemoryItem] = []
        cursor: str | None = None
        while True:
            response = await self._request(
                "GET", f"{self._session_path(session)}/memories", headers=self._auth(session.session_token),
                params={"cursor": cursor} if cursor else None,
            )
            self._session_error(response)
            response.raise_for_status()
            page = response.json()
            items.extend(MemoryItem.model_validate(m) for m in page["memories"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    async def delete_session(self, session: MemorySession) -> None:
        response = await self._request("DELETE", self._session_path(session), headers=self._auth(session.session_token))
        if response.status_code == 404:
            return  # already gone: deleted by an earlier attempt, or expired
        self._session_error(response)
        response.raise_for_status()

    async def healthz(self) -> bool:
        response = await self._request("GET", "/healthz")
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    body = _json(response)
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else str(detail)[:500]
    return response.text[:500]


def build_memory_client(settings: Settings) -> MemoryClient:
    """The HTTP client when ``memory.server_url`` is set, else an in-process service over ``memory.uri``."""
    if settings.memory.server_url:
        return HttpMemoryClient.from_settings(settings)
    return InProcessMemoryClient(MemoryService.from_settings(settings), owns_service=True)


__all__ = ["HttpMemoryClient", "InProcessMemoryClient", "KEEPALIVE_EXPIRY_S", "MemorySessionError", "build_memory_client"]
