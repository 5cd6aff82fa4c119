"""Memory clients: in-process (over a :class:`MemoryService`) and HTTP (the tool server).

Both implement :class:`agemem.memory.base.MemoryClient`: tool-level failures come back as
``ToolResult(ok=False, text=...)``; an unreachable backend raises :class:`MemoryUnavailableError`;
an unknown session or a wrong token raises :class:`agemem.memory.service.MemorySessionError`.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from agemem.memory.base import MemoryClient, MemoryItem, MemorySession, MemoryUnavailableError, ToolResult
from agemem.memory.service import MemoryService, MemorySessionError, SessionAuthError, UnknownSessionError
from agemem.settings import Settings

logger = logging.getLogger(__name__)


class InProcessMemoryClient:
    """Calls a :class:`MemoryService` in this process (the embedded default, and tests)."""

    def __init__(self, service: MemoryService, *, owns_service: bool = False) -> None:
        self.service = service
        self._owns_service = owns_service

    async def create_session(self) -> MemorySession:
        return await self.service.create_session()

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
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
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
        # Tool calls are not idempotent (Add), but a connect error means the request never
        # arrived and a 5xx means the server failed it; both are safe enough to retry a few times.
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
        return {"Authorization": f"Bearer {token}"}

    @staticmethod
    def _session_error(response: httpx.Response) -> None:
        detail = _detail(response)
        if response.status_code == 404:
            raise UnknownSessionError(detail or "unknown session")
        if response.status_code in (401, 403):
            raise SessionAuthError(detail or "session token refused")

    async def create_session(self) -> MemorySession:
        headers = self._auth(self._server_token) if self._server_token else {}
        response = await self._request("POST", "/sessions", headers=headers)
        if response.status_code in (401, 403):
            raise SessionAuthError(f"server token refused: {_detail(response)} (memory.server_token)")
        response.raise_for_status()
        return MemorySession.model_validate(response.json())

    async def call_tool(self, session: MemorySession, tool_name: str, arguments: dict[str, Any]) -> ToolResult:
        response = await self._request(
            "POST",
            f"/sessions/{session.session_id}/tools/{tool_name}",
            json=arguments,
            headers=self._auth(session.session_token),
        )
        body = _json(response)
        if isinstance(body, dict) and "ok" in body and "text" in body:
            # 200, and the tool-level 404/413/422 answers, carry a ToolResult.
            return ToolResult.model_validate(body)
        if response.status_code in (401, 403, 404):
            self._session_error(response)
        if response.status_code in (413, 422):
            return ToolResult(ok=False, text=f"{tool_name}: {_detail(response)}", data={"error": "invalid_arguments"})
        response.raise_for_status()
        raise MemoryUnavailableError(f"unexpected answer {response.status_code} from {self.base_url}")

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]:
        response = await self._request(
            "GET", f"/sessions/{session.session_id}/memories", headers=self._auth(session.session_token)
        )
        self._session_error(response)
        response.raise_for_status()
        return [MemoryItem.model_validate(m) for m in response.json()["memories"]]

    async def delete_session(self, session: MemorySession) -> None:
        response = await self._request(
            "DELETE", f"/sessions/{session.session_id}", headers=self._auth(session.session_token)
        )
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


__all__ = ["HttpMemoryClient", "InProcessMemoryClient", "MemorySessionError", "build_memory_client"]
