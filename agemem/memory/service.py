"""The memory tools' semantics, shared by the HTTP server and the in-process client.

A session is an id plus a secret token; only a hash of the token is stored (in Milvus, so
sessions survive a restart). Every call checks the token, and every store operation is scoped
to the caller's session, so a session cannot see or touch another session's memories even when
it knows their ids. Arguments are flat (verl keeps only type/description/enum in tool schemas):
metadata travels as a JSON-object string, ``metadata_json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agemem.memory.base import MEMORY_TOOLS, MemoryItem, MemorySession, ToolResult
from agemem.memory.embedder import Embedder, get_embedder
from agemem.memory.store import SAFE_TOKEN, MemoryNotFoundError, MilvusMemoryStore
from agemem.settings import MemorySettings, Settings

logger = logging.getLogger(__name__)

# Error kinds carried in ToolResult.data["error"]; the server maps them to HTTP status codes.
INVALID_ARGUMENTS = "invalid_arguments"
CONTENT_TOO_LARGE = "content_too_large"
UNKNOWN_TOOL = "unknown_tool"
NOT_FOUND = "not_found"
EMPTY = "empty"


class MemorySessionError(RuntimeError):
    """Base for session problems (raised, not returned: they are the caller's bug, not the model's)."""


class UnknownSessionError(MemorySessionError):
    """No such session (never created, or deleted)."""


class SessionAuthError(MemorySessionError):
    """Missing or wrong session token."""


class _Args(BaseModel):
    # strict: "3" is not a top_k, 1 is not a memory_id; extra: a misspelt argument is an error, not ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class AddArgs(_Args):
    content: str = Field(description="The fact to remember.")
    memory_type: str = Field("general", description="Kind of memory: letters, digits, '_' or '-'.")
    metadata_json: str | None = Field(None, description="Optional JSON object (as a string).")


class UpdateArgs(_Args):
    memory_id: str
    content: str
    metadata_json: str | None = None


class DeleteArgs(_Args):
    memory_id: str


class RetrieveArgs(_Args):
    query: str
    top_k: int | None = None
    memory_type: str | None = None


TOOL_ARGS: dict[str, type[_Args]] = {
    "Add_memory": AddArgs,
    "Update_memory": UpdateArgs,
    "Delete_memory": DeleteArgs,
    "Retrieve_memory": RetrieveArgs,
}
assert tuple(TOOL_ARGS) == MEMORY_TOOLS


class _Failure(Exception):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def _fail(kind: str, text: str) -> ToolResult:
    return ToolResult(ok=False, text=text, data={"error": kind})


def _describe_validation(tool: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        if err["type"] == "extra_forbidden":
            parts.append(f"unexpected argument '{field[:60]}'")
        elif err["type"] == "missing":
            parts.append(f"missing required argument '{field}'")
        else:
            parts.append(f"'{field}': {err['msg']}")
    allowed = ", ".join(TOOL_ARGS[tool].model_fields)
    return f"{tool}: invalid arguments: {'; '.join(parts)} (arguments: {allowed})"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class MemoryService:
    """Sessions and the four memory tools over a :class:`MilvusMemoryStore` and an :class:`Embedder`."""

    def __init__(self, store: MilvusMemoryStore, embedder: Embedder, config: MemorySettings) -> None:
        if store.dim != embedder.dim:
            raise ValueError(f"store dim {store.dim} != embedder dim {embedder.dim}")
        self.store = store
        self.embedder = embedder
        self.config = config
        # session id -> token hash; the store is the source of truth, this saves a query per call.
        self._sessions: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryService:
        mem = settings.memory
        embedder = get_embedder(
            mem.embedding_model,
            mem.embedding_device,
            batch_size=mem.embed_batch_size,
            forward_batch_size=mem.embed_forward_batch_size,
            wait_ms=mem.embed_batch_wait_ms,
            cache_size=mem.embed_cache_size,
        )
        store = MilvusMemoryStore.from_settings(settings, embedder.dim)
        return cls(store, embedder, mem)

    def close(self) -> None:
        self.store.close()

    # -- sessions -------------------------------------------------------------------------------

    async def create_session(self) -> MemorySession:
        session = MemorySession(session_id=secrets.token_hex(16), session_token=secrets.token_urlsafe(32))
        digest = hash_token(session.session_token)
        await asyncio.to_thread(self.store.put_session, session.session_id, digest)
        self._sessions[session.session_id] = digest
        return session

    async def authenticate(self, session_id: str, token: str | None) -> None:
        """Raise :class:`UnknownSessionError` or :class:`SessionAuthError` unless the token is right."""
        if not isinstance(session_id, str) or not SAFE_TOKEN.match(session_id):
            raise UnknownSessionError("unknown session")
        digest = self._sessions.get(session_id)
        if digest is None:
            digest = await asyncio.to_thread(self.store.session_token_hash, session_id)
            if digest is None:
                raise UnknownSessionError("unknown session")
            self._sessions[session_id] = digest
        if not token:
            raise SessionAuthError("missing session token")
        if not hmac.compare_digest(hash_token(token), digest):
            raise SessionAuthError("wrong session token")

    async def delete_session(self, session: MemorySession) -> None:
        await self.authenticate(session.session_id, session.session_token)
        await self.drop_session(session.session_id)

    async def drop_session(self, session_id: str) -> None:
        """Remove an already authenticated session and all its memories."""
        self._sessions.pop(session_id, None)
        await asyncio.to_thread(self.store.drop_session, session_id)

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]:
        await self.authenticate(session.session_id, session.session_token)
        return await self.session_memories(session.session_id)

    async def session_memories(self, session_id: str) -> list[MemoryItem]:
        """All memories of an already authenticated session, oldest first."""
        return await asyncio.to_thread(self.store.list, session_id)

    # -- tools ----------------------------------------------------------------------------------

    async def call_tool(self, session: MemorySession, tool_name: str, arguments: Any) -> ToolResult:
        """Run one tool for an authenticated session.

        Session problems raise :class:`MemorySessionError`; everything about the tool call itself
        (unknown tool, bad arguments, unknown memory id) comes back as ``ToolResult(ok=False)``
        with ``data["error"]`` naming the kind.
        """
        await self.authenticate(session.session_id, session.session_token)
        return await self.run_tool(session.session_id, tool_name, arguments)

    async def run_tool(self, session_id: str, tool_name: str, arguments: Any) -> ToolResult:
        """The tool call for an already authenticated session; never raises for bad input."""
        if tool_name not in TOOL_ARGS:
            return _fail(UNKNOWN_TOOL, f"unknown tool {str(tool_name)[:60]!r}; memory tools: {', '.join(MEMORY_TOOLS)}")
        if not isinstance(arguments, dict):
            return _fail(INVALID_ARGUMENTS, f"{tool_name}: arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            args = TOOL_ARGS[tool_name].model_validate(arguments)
        except ValidationError as exc:
            return _fail(INVALID_ARGUMENTS, _describe_validation(tool_name, exc))
        handler: Callable[[str, Any], Any] = {
            "Add_memory": self._add,
            "Update_memory": self._update,
            "Delete_memory": self._delete,
            "Retrieve_memory": self._retrieve,
        }[tool_name]
        try:
            return await handler(session_id, args)
        except _Failure as failure:
            return _fail(failure.kind, failure.text)

    def _text(self, tool: str, name: str, value: str) -> str:
        if "\x00" in value:
            raise _Failure(INVALID_ARGUMENTS, f"{tool}: '{name}' contains a NUL character")
        size = len(value.encode("utf-8", errors="surrogatepass"))
        if size > self.config.max_content_bytes:
            raise _Failure(
                CONTENT_TOO_LARGE,
                f"{tool}: '{name}' is {size} bytes; the limit is {self.config.max_content_bytes} bytes",
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Failure(INVALID_ARGUMENTS, f"{tool}: '{name}' is not valid unicode (lone surrogate)") from None
        if not value.strip():
            raise _Failure(EMPTY, f"{tool}: '{name}' is empty")
        return value.strip()

    @staticmethod
    def _metadata(tool: str, raw: str | None) -> dict[str, Any]:
        if raw is None or not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _Failure(INVALID_ARGUMENTS, f"{tool}: metadata_json is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise _Failure(
                INVALID_ARGUMENTS, f"{tool}: metadata_json must be a JSON object, got {type(value).__name__}"
            )
        return value

    @staticmethod
    def _memory_type(tool: str, value: str) -> str:
        if not SAFE_TOKEN.match(value):
            raise _Failure(
                INVALID_ARGUMENTS,
                f"{tool}: memory_type must be 1-64 letters, digits, '_' or '-', got {value[:40]!r}",
            )
        return value

    @staticmethod
    def _not_found(tool: str, memory_id: str) -> _Failure:
        return _Failure(NOT_FOUND, f"{tool}: no memory with id {memory_id[:80]!r} in this session")

    async def _add(self, session_id: str, args: AddArgs) -> ToolResult:
        content = self._text("Add_memory", "content", args.content)
        memory_type = self._memory_type("Add_memory", args.memory_type)
        metadata = self._metadata("Add_memory", args.metadata_json)
        # Id and time are fixed on arrival: concurrent adds finish embedding shortest first, and
        # "oldest first" must still mean the order the calls were made in.
        now = time.time()
        item = MemoryItem(
            memory_id=secrets.token_hex(16),
            content=content,
            memory_type=memory_type,
            metadata=metadata,
            created_at=now,
            updated_at=now,
        )
        vector = (await self.embedder.aencode([content]))[0]
        await asyncio.to_thread(self.store.add, session_id, [item], vector[None, :])
        return ToolResult(ok=True, text=f"memory added (Memory ID: {item.memory_id})", data={"memory_id": item.memory_id})

    async def _update(self, session_id: str, args: UpdateArgs) -> ToolResult:
        content = self._text("Update_memory", "content", args.content)
        metadata = self._metadata("Update_memory", args.metadata_json)
        # Check existence before paying for an embedding (the reference embedded first).
        if await asyncio.to_thread(self.store.get, session_id, args.memory_id) is None:
            raise self._not_found("Update_memory", args.memory_id)
        vector = (await self.embedder.aencode([content]))[0]
        try:
            await asyncio.to_thread(
                lambda: self.store.update(session_id, args.memory_id, content=content, vector=vector, metadata=metadata)
            )
        except MemoryNotFoundError:  # deleted concurrently
            raise self._not_found("Update_memory", args.memory_id) from None
        return ToolResult(
            ok=True, text=f"memory updated (Memory ID: {args.memory_id})", data={"memory_id": args.memory_id}
        )

    async def _delete(self, session_id: str, args: DeleteArgs) -> ToolResult:
        if not await asyncio.to_thread(self.store.delete, session_id, args.memory_id):
            raise self._not_found("Delete_memory", args.memory_id)
        return ToolResult(
            ok=True, text=f"memory deleted (Memory ID: {args.memory_id})", data={"memory_id": args.memory_id}
        )

    async def _retrieve(self, session_id: str, args: RetrieveArgs) -> ToolResult:
        query = self._text("Retrieve_memory", "query", args.query)
        top_k = self.config.default_top_k if args.top_k is None else args.top_k
        if not 1 <= top_k <= self.config.max_top_k:
            raise _Failure(
                INVALID_ARGUMENTS, f"Retrieve_memory: top_k must be between 1 and {self.config.max_top_k}, got {top_k}"
            )
        memory_type = None if args.memory_type is None else self._memory_type("Retrieve_memory", args.memory_type)
        vector = (await self.embedder.aencode([query]))[0]
        hits = await asyncio.to_thread(self.store.search, session_id, vector, top_k, memory_type)
        memories = [{"memory_id": h.memory_id, "content": h.content, "score": round(h.score or 0.0, 4)} for h in hits]
        if not hits:
            return ToolResult(ok=True, text="[no related memories found]", data={"memories": []})
        lines = "\n".join(f"- {h.content} (Memory ID: {h.memory_id})" for h in hits)
        return ToolResult(ok=True, text=f"[retrieved memories]\n{lines}", data={"memories": memories})


__all__ = [
    "AddArgs",
    "CONTENT_TOO_LARGE",
    "DeleteArgs",
    "EMPTY",
    "INVALID_ARGUMENTS",
    "MemoryService",
    "MemorySessionError",
    "NOT_FOUND",
    "RetrieveArgs",
    "SessionAuthError",
    "TOOL_ARGS",
    "UNKNOWN_TOOL",
    "UnknownSessionError",
    "UpdateArgs",
    "hash_token",
]
