"""The admin view of a memory store: sessions and spaces with their counts and ages, a session's
memories page by page, import of exported memories, deletion.

:class:`MemoryAdmin` works on a :class:`MemoryService` in this process (``agemem memory ...``
over the embedded store, where the OS user is the boundary). :func:`add_admin_routes` serves the
same operations under ``/admin`` on the tool server, each guarded by ``memory.server_token``: a
server without one answers 403 to every admin call, since the view reads every session's memories.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, SecretStr

from agemem.memory.base import MemoryItem, MemorySession
from agemem.memory.bodies import body_schema, parse_body
from agemem.memory.spaces import space_name

if TYPE_CHECKING:
    from agemem.memory.service import MemoryService

#: Most sessions one listing returns (spaces first, then the most recently created sessions).
MAX_LISTED = 1000


class SessionInfo(BaseModel):
    """One session or space as the admin view lists it."""

    session_id: str
    space: str | None = Field(None, description="The space's name; None for a rollout session.")
    memories: int
    created_at: float
    last_used: float | None = Field(None, description="Last use seen by this server process (None: not since it started).")
    expires_in_s: float | None = Field(None, description="Seconds until the idle sweeper deletes it; None for spaces.")

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.created_at)


class ImportBody(BaseModel):
    memories: list[MemoryItem]


class MemoryAdmin:
    """Admin operations over a memory service (no session tokens needed)."""

    def __init__(self, service: "MemoryService") -> None:
        self.service = service

    async def sessions(self, *, spaces_only: bool = False, limit: int = MAX_LISTED) -> list[SessionInfo]:
        """Spaces first (by name), then sessions newest first; at most ``limit``."""
        service = self.service
        stored = await service.stored_sessions()
        ids = sorted(stored, key=lambda sid: (space_name(sid) is None, space_name(sid) or "", -stored[sid]))
        if spaces_only:
            ids = [sid for sid in ids if space_name(sid) is not None]
        ttl, now = service.config.session_idle_ttl_s, time.time()
        out = []
        for sid in ids[:limit]:
            space = space_name(sid)
            expires = None if space else max(0.0, ttl - (now - service.idle_since(sid, stored[sid])))
            out.append(SessionInfo(session_id=sid, space=space, memories=await service.memory_count(sid),
                                   created_at=stored[sid], last_used=service.last_used(sid), expires_in_s=expires))
        return out

    async def memories_page(self, session_id: str, cursor: str | None = None,
                            limit: int | None = None) -> tuple[list[MemoryItem], str | None]:
        async with self.service.hold(session_id):
            return await self.service.memories_page(session_id, cursor, limit)

    async def export(self, session_id: str) -> list[MemoryItem]:
        """Every memory of the session, oldest first."""
        async with self.service.hold(session_id):
            return await self.service.session_memories(session_id)

    async def import_memories(self, session_id: str, items: list[MemoryItem]) -> int:
        async with self.service.hold(session_id):
            return await self.service.import_memories(session_id, items)

    async def create_space(self, name: str) -> MemorySession:
        return await self.service.create_session(space=name)

    async def delete(self, session_id: str) -> None:
        """Delete a session or space with its memories (``UnknownSessionError`` if there is none)."""
        async with self.service.hold(session_id):
            pass
        await self.service.drop_session(session_id)

    async def aclose(self) -> None:
        """Nothing to close here: whoever built the service closes it."""


_bearer = HTTPBearer(auto_error=False, description="memory.server_token of the tool server.")


def _guard(server_token: SecretStr | None) -> Any:
    def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if server_token is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "the admin view is off: start the server with memory.server_token set")
        given = credentials.credentials if credentials is not None else ""
        if not given:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "server token required", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), server_token.get_secret_value().encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong server token")

    return Depends(check)


def _required(extra: dict[str, Any]) -> dict[str, Any]:
    extra["requestBody"]["required"] = True
    return extra


def add_admin_routes(app: FastAPI, admin: MemoryAdmin, server_token: SecretStr | None) -> None:
    """``/admin/sessions`` (list), ``/admin/sessions/{id}/memories`` (page, import), ``DELETE /admin/sessions/{id}``."""
    guard = [_guard(server_token)]

    @app.get("/admin/sessions", dependencies=guard, tags=["admin"])
    async def list_sessions(
        spaces_only: bool = Query(False, description="Only named memory spaces."),
        limit: int = Query(MAX_LISTED, ge=1, le=MAX_LISTED, description="Most sessions listed."),
    ) -> dict[str, list[SessionInfo]]:
        """Spaces first, then sessions newest first, with memory counts and ages."""
        return {"sessions": await admin.sessions(spaces_only=spaces_only, limit=limit)}

    @app.get("/admin/sessions/{session_id}/memories", dependencies=guard, tags=["admin"])
    async def session_memories(
        session_id: str,
        limit: int | None = Query(None, ge=1, description="Most memories in this page (memory.list_page_size)."),
        cursor: str | None = Query(None, description="next_cursor of the previous page."),
    ) -> dict[str, list[MemoryItem] | str | None]:
        """Any session's memories, oldest first, a page at a time."""
        items, next_cursor = await admin.memories_page(session_id, cursor, limit)
        return {"memories": items, "next_cursor": next_cursor}

    @app.post("/admin/sessions/{session_id}/memories", dependencies=guard, tags=["admin"],
              responses={422: {"description": "malformed body or memories"}},
              openapi_extra=_required(body_schema(ImportBody)))
    async def import_memories(session_id: str, request: Request) -> dict[str, int]:
        """Add exported memories (ids and times kept; ids the session has are skipped)."""
        body = await parse_body(request, ImportBody)
        assert body is not None  # required
        return {"imported": await admin.import_memories(session_id, body.memories)}

    @app.delete("/admin/sessions/{session_id}", dependencies=guard, tags=["admin"],
                status_code=status.HTTP_204_NO_CONTENT)
    async def delete_session(session_id: str) -> Response:
        await admin.delete(session_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)


__all__ = ["MAX_LISTED", "MemoryAdmin", "SessionInfo", "add_admin_routes"]
