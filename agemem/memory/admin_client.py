"""Clients of the admin view (``agemem memory list|show|export|import|delete``) and the JSONL
export format.

:func:`build_admin_client` gives the HTTP client of a tool server's ``/admin`` routes (with
``memory.server_token``) when ``memory.server_url`` is set, else a :class:`MemoryAdmin` over the
store in this process. Both offer the same coroutines. An export is one JSON object per line,
:class:`MemoryItem`'s fields (``memory_id``, ``content``, ``memory_type``, ``metadata``,
``created_at``, ``updated_at``), oldest first; importing it gives back the same memories.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

import httpx
from pydantic import ValidationError

from agemem.memory.admin import MemoryAdmin, SessionInfo
from agemem.memory.base import MemoryItem, MemorySession
from agemem.memory.client import HttpMemoryClient, _detail
from agemem.memory.service import MemoryService, UnknownSessionError

if TYPE_CHECKING:
    from agemem.settings import Settings

_EXPORTED = ("memory_id", "content", "memory_type", "metadata", "created_at", "updated_at")


class AdminClient(Protocol):
    async def sessions(self, *, spaces_only: bool = False, limit: int = ...) -> list[SessionInfo]: ...

    async def memories_page(self, session_id: str, cursor: str | None = None,
                            limit: int | None = None) -> tuple[list[MemoryItem], str | None]: ...

    async def export(self, session_id: str) -> list[MemoryItem]: ...

    async def import_memories(self, session_id: str, items: list[MemoryItem]) -> int: ...

    async def create_space(self, name: str) -> MemorySession: ...

    async def delete(self, session_id: str) -> None: ...

    async def aclose(self) -> None: ...


class HttpAdminClient:
    """The tool server's ``/admin`` routes, with the server token."""

    def __init__(self, memory: HttpMemoryClient, server_token: str | None, *, max_body_bytes: int = 65536) -> None:
        self.memory = memory
        self._headers = memory._auth(server_token) if server_token else {}
        self._max_body = max_body_bytes

    @classmethod
    def from_settings(cls, settings: "Settings") -> "HttpAdminClient":
        token = settings.memory.server_token
        return cls(HttpMemoryClient.from_settings(settings), token.get_secret_value() if token else None,
                   max_body_bytes=settings.memory.max_body_bytes)

    async def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        response = await self.memory._request(method, path, headers=self._headers, **kwargs)
        if response.status_code in (401, 403):
            raise PermissionError(f"{self.memory.base_url}: {_detail(response)} (memory.server_token)")
        if response.status_code == 404:
            raise UnknownSessionError(f"no such session or space on {self.memory.base_url}")
        if response.status_code in (413, 422):
            raise ValueError(f"{self.memory.base_url}: {_detail(response)}")
        response.raise_for_status()
        return response

    async def sessions(self, *, spaces_only: bool = False, limit: int = 1000) -> list[SessionInfo]:
        response = await self._call("GET", "/admin/sessions", params={"spaces_only": spaces_only, "limit": limit})
        return [SessionInfo.model_validate(s) for s in response.json()["sessions"]]

    async def memories_page(self, session_id: str, cursor: str | None = None,
                            limit: int | None = None) -> tuple[list[MemoryItem], str | None]:
        params = {k: v for k, v in (("cursor", cursor), ("limit", limit)) if v is not None}
        page = (await self._call("GET", f"/admin/sessions/{session_id}/memories", params=params)).json()
        return [MemoryItem.model_validate(m) for m in page["memories"]], page.get("next_cursor")

    async def export(self, session_id: str) -> list[MemoryItem]:
        items: list[MemoryItem] = []
        cursor: str | None = None
        while True:
            page, cursor = await self.memories_page(session_id, cursor)
            items.extend(page)
            if not cursor:
                return items

    async def import_memories(self, session_id: str, items: list[MemoryItem]) -> int:
        """Sent in chunks that fit the server's body limit (memory.max_body_bytes)."""
        imported = 0
        for chunk in _chunks(items, self._max_body - 1024):
            body = {"memories": [m.model_dump(include=set(_EXPORTED)) for m in chunk]}
            response = await self._call("POST", f"/admin/sessions/{session_id}/memories", json=body)
            imported += int(response.json()["imported"])
        return imported

    async def create_space(self, name: str) -> MemorySession:
        return await self.memory.create_session(space=name)

    async def delete(self, session_id: str) -> None:
        await self._call("DELETE", f"/admin/sessions/{session_id}")

    async def aclose(self) -> None:
        await self.memory.aclose()


def _chunks(items: list[MemoryItem], budget: int) -> Iterable[list[MemoryItem]]:
    chunk: list[MemoryItem] = []
    size = 0
    for item in items:
        n = len(item.model_dump_json(include=set(_EXPORTED)).encode()) + 2
        if chunk and size + n > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk


class _OwnedAdmin(MemoryAdmin):
    """A :class:`MemoryAdmin` over a service it built (closed with it)."""

    async def aclose(self) -> None:
        self.service.close()


def build_admin_client(settings: "Settings") -> AdminClient:
    """The tool server's admin view when ``memory.server_url`` is set, else the store in this process."""
    if settings.memory.server_url:
        return HttpAdminClient.from_settings(settings)
    return _OwnedAdmin(MemoryService.from_settings(settings))


def write_jsonl(items: Iterable[MemoryItem], fh: IO[str]) -> int:
    """Write memories as JSONL (the export format); how many."""
    n = 0
    for item in items:
        fh.write(json.dumps(item.model_dump(include=set(_EXPORTED)), ensure_ascii=False, sort_keys=True) + "\n")
        n += 1
    return n


def read_jsonl(path: Path) -> list[MemoryItem]:
    """Memories from an export; ``ValueError`` names the first bad line."""
    items = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                items.append(MemoryItem.model_validate_json(line))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "line"
                raise ValueError(f"{path}:{number}: not an exported memory ({where}: {first['msg']})") from None
    return items


__all__ = ["AdminClient", "HttpAdminClient", "build_admin_client", "read_jsonl", "write_jsonl"]
