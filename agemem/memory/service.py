"""The memory tools' semantics, shared by the HTTP server and the in-process client.

A session is an id plus a secret token; only a hash of the token is stored (in Milvus, so
sessions survive a restart), keyed with ``memory.token_hash_key`` when one is set. Every call
checks the token, and every store operation is scoped to the caller's session, so a session
cannot see or touch another session's memories even when it knows their ids. Arguments are flat
(verl keeps only type/description/enum in tool schemas): metadata travels as a JSON-object
string, ``metadata_json``. What an argument may hold is decided in :mod:`agemem.memory.arguments`.

Lifecycle guarantees: a deleted session is refused from the moment its deletion starts, and the
deletion waits for the session's calls already running, so nothing they write outlives it; calls
on one memory (Update, Delete) are serialised by the store; a call repeated with the same
request id (a client's retry) gets the first call's result instead of running twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agemem.memory import arguments as A
from agemem.memory.arguments import CONTENT_TOO_LARGE, EMPTY, INVALID_ARGUMENTS, ArgumentError, ArgumentLimits
from agemem.memory.base import MEMORY_TOOLS, MemoryItem, MemorySession, MemoryUnavailableError, ToolResult
from agemem.memory.embedder import Embedder, get_embedder
from agemem.memory.spaces import space_name, space_session_id
from agemem.memory.store import MemoryNotFoundError, MilvusMemoryStore
from agemem.settings import MemorySettings, Settings

logger = logging.getLogger(__name__)

# Error kinds carried in ToolResult.data["error"] (the argument kinds come from arguments.py).
UNKNOWN_TOOL = "unknown_tool"
NOT_FOUND = "not_found"
MEMORY_LIMIT = "memory_limit"
_READ_THREADS = 8
_WRITE_THREADS = 8


class MemorySessionError(RuntimeError):
    """Base for session problems (raised, not returned: they are the caller's bug, not the model's)."""


class UnknownSessionError(MemorySessionError):
    """No such session (never created, deleted, or expired)."""


class SessionAuthError(MemorySessionError):
    """Missing or wrong session token."""


class SpaceExistsError(MemorySessionError):
    """A memory space of that name exists already (its token is with whoever created it)."""


class SessionLimitError(MemoryUnavailableError):
    """The server holds ``memory.max_sessions`` live sessions; a new one must wait for one to end."""


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


def unknown_tool(tool_name: Any) -> ToolResult:
    """The answer to a tool name that is not a memory tool (also given by the HTTP client, unsent)."""
    return _fail(UNKNOWN_TOOL, f"unknown tool {ascii(str(tool_name)[:60])}; memory tools: {', '.join(MEMORY_TOOLS)}")


def _describe_validation(tool: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        if err["type"] == "extra_forbidden":
            parts.append(f"unexpected argument {ascii(field[:60])}")
        elif err["type"] == "missing":
            parts.append(f"missing required argument '{field}'")
        else:
            parts.append(f"'{field}': {err['msg']}")
    allowed = ", ".join(TOOL_ARGS[tool].model_fields)
    return f"{tool}: invalid arguments: {'; '.join(parts)} (arguments: {allowed})"


def hash_token(token: str, secret: bytes | None = None) -> str:
    """What the store keeps of a session token: sha256, or HMAC-SHA256 under the server's secret."""
    data = token.encode("utf-8", errors="surrogatepass")
    if secret:
        return hmac.new(secret, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _derived_id(session_id: str, request_id: str) -> str:
    """The memory id of an Add with a request id: a retry after a restart finds the first one's row."""
    return hashlib.sha256(f"{session_id}:{request_id}".encode()).hexdigest()[:32]


@dataclass
class _Session:
    token_hash: str
    last_used: float
    memories: int | None = None  # rows held; counted on first need


# Long on purpose (~460 lines): sessions (tokens, tombstones, idle expiry, caps) and the tool calls that
# run under them share one in-memory session table and its per-session and per-memory locks; the
# guarantees of issue 16 (a deleted session is dead at once, every acknowledged Update/Delete holds)
# are invariants of that table, kept by one class rather than spread over several.
class MemoryService:
    """Sessions and the four memory tools over a :class:`MilvusMemoryStore` and an :class:`Embedder`."""

    def __init__(self, store: MilvusMemoryStore, embedder: Embedder, config: MemorySettings) -> None:
        if store.dim != embedder.dim:
            raise ValueError(f"store dim {store.dim} != embedder dim {embedder.dim}")
        self.store = store
        self.embedder = embedder
        self.config = config
        self.limits = ArgumentLimits.from_settings(config)
        self._secret = config.token_hash_key.get_secret_value().encode() if config.token_hash_key else None
        self._started_at = time.time()
        # Known sessions; the store is the source of truth, this saves a query per call.
        self._sessions: dict[str, _Session] = {}
        # Calls running per session (from before their token check to their end), and the
        # sessions being deleted: a deletion refuses new calls first, then waits for these.
        self._active: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._dying: set[str] = set()
        self._live: int | None = None  # live sessions, counted on first need
        self._results: OrderedDict[tuple[str, str], ToolResult] = OrderedDict()
        # Store calls block a thread; reads get their own, so writes queued behind milvus-lite's
        # one-at-a-time writes and their flushes cannot hold up another session's search.
        self._readers = ThreadPoolExecutor(max_workers=_READ_THREADS, thread_name_prefix="agemem-store-read")
        self._writers = ThreadPoolExecutor(max_workers=_WRITE_THREADS, thread_name_prefix="agemem-store-write")
        self._request_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._creating: set[str] = set()  # spaces being created (a second create of one is refused)
        self.expired = 0

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
            cache_per_owner=mem.embed_cache_scope == "session",
        )
        store = MilvusMemoryStore.from_settings(settings, embedder.dim)
        return cls(store, embedder, mem)

    def close(self) -> None:
        """Flush and close the store (once; later calls do nothing)."""
        self.store.close()
        self._readers.shutdown(wait=False)
        self._writers.shutdown(wait=False)

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._readers, functools.partial(fn, *args))

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writers, functools.partial(fn, *args))

    # -- sessions -------------------------------------------------------------------------------

    async def create_session(self, space: str | None = None) -> MemorySession:
        """A new session; with ``space``, the named memory space ``space-<name>``, which the idle
        sweeper never deletes (:class:`SpaceExistsError` if it exists, ``ArgumentError`` for a bad name)."""
        session_id = secrets.token_hex(16) if space is None else space_session_id(space)
        if self._live is None:
            count = len(await self._read(self.store.sessions))
            if self._live is None:
                self._live = count
        if self._live >= self.config.max_sessions:
            await self.sweep_idle()  # an in-process service has no sweeper running: make room first
        if self._live >= self.config.max_sessions:
            raise SessionLimitError(
                f"the memory server holds {self._live} live sessions, its limit (memory.max_sessions); "
                "delete finished sessions (idle ones expire after memory.session_idle_ttl_s)"
            )
        if space is None:
            return await self._register(session_id)
        # Milvus does not refuse a second row with the same primary key: one creation at a time.
        if session_id in self._creating or session_id in self._sessions or session_id in self._dying:
            raise SpaceExistsError(f"memory space {space!r} exists")
        self._creating.add(session_id)
        try:
            if await self._read(self.store.session_token_hash, session_id) is not None:
                raise SpaceExistsError(f"memory space {space!r} exists")
            return await self._register(session_id)
        finally:
            self._creating.discard(session_id)

    async def _register(self, session_id: str) -> MemorySession:
        self._live = (self._live or 0) + 1
        session = MemorySession(session_id=session_id, session_token=secrets.token_urlsafe(32))
        digest = hash_token(session.session_token, self._secret)
        try:
            await self._write(self.store.put_session, session.session_id, digest)
        except BaseException:
            self._live -= 1
            raise
        self._sessions[session.session_id] = _Session(digest, time.time(), memories=0)
        return session

    @contextlib.asynccontextmanager
    async def session(self, session_id: Any, token: str | None) -> AsyncIterator[str]:
        """Hold a call of an authenticated session: ``async with service.session(id, token):``.

        Raises :class:`UnknownSessionError` or :class:`SessionAuthError`. A deletion of the
        session that starts meanwhile waits until the block ends.
        """
        async with self._holding(session_id):
            await self._authenticate(session_id, token)
            yield session_id

    @contextlib.asynccontextmanager
    async def hold(self, session_id: Any) -> AsyncIterator[str]:
        """Hold an existing session without its token (the admin view, behind the server token)."""
        async with self._holding(session_id):
            if session_id not in self._sessions:
                # Not cached here: looking at a session must not count as using it (the idle expiry).
                digest = await self._read(self.store.session_token_hash, session_id)
                if digest is None or session_id in self._dying:
                    raise UnknownSessionError("unknown session")
            yield session_id

    @contextlib.asynccontextmanager
    async def _holding(self, session_id: Any) -> AsyncIterator[None]:
        if not A.is_safe_token(session_id) or session_id in self._dying:
            raise UnknownSessionError("unknown session")
        self._active[session_id] = self._active.get(session_id, 0) + 1
        try:
            yield
        finally:
            left = self._active[session_id] - 1
            if left:
                self._active[session_id] = left
            else:
                del self._active[session_id]
                event = self._idle.pop(session_id, None)
                if event is not None:
                    event.set()

    async def _authenticate(self, session_id: str, token: str | None) -> _Session:
        state = self._sessions.get(session_id)
        if state is None:
            digest = await self._read(self.store.session_token_hash, session_id)
            # Re-checked after the read: a deletion may have started while it ran.
            if digest is None or session_id in self._dying:
                raise UnknownSessionError("unknown session")
            state = self._sessions.setdefault(session_id, _Session(digest, time.time()))
        if not token or not isinstance(token, str):
            raise SessionAuthError("missing session token")
        if not hmac.compare_digest(hash_token(token, self._secret), state.token_hash):
            raise SessionAuthError("wrong session token")
        state.last_used = time.time()
        return state

    async def authenticate(self, session_id: Any, token: str | None) -> None:
        """Raise :class:`UnknownSessionError` or :class:`SessionAuthError` unless the token is right."""
        async with self.session(session_id, token):
            pass

    async def delete_session(self, session: MemorySession) -> None:
        """Delete the session and its memories; one already gone (deleted, expired) is no error."""
        try:
            await self.delete(session.session_id, session.session_token)
        except UnknownSessionError:
            return

    async def delete(self, session_id: Any, token: str | None) -> None:
        """Authenticate and delete a session with all its memories.

        The deletion is claimed while the token check still holds the session, so of two racing
        deletions exactly one proceeds; the other finds no session.
        """
        async with self.session(session_id, token):
            if session_id in self._dying:
                raise UnknownSessionError("unknown session")
            self._dying.add(session_id)
        await self._drop_claimed(session_id)

    async def drop_session(self, session_id: str) -> None:
        """Remove a session and all its memories (the sweeper; callers with a token use :meth:`delete`)."""
        if session_id in self._dying:
            raise UnknownSessionError("unknown session")
        self._dying.add(session_id)
        await self._drop_claimed(session_id)

    async def _drop_claimed(self, session_id: str) -> None:
        """The session is refused from here on (it is in ``_dying``); its calls already running
        finish first, so nothing they write survives the deletion."""
        try:
            self._sessions.pop(session_id, None)
            while self._active.get(session_id):
                await self._idle.setdefault(session_id, asyncio.Event()).wait()
            await self._write(self.store.drop_session, session_id)
            if self._live is not None:
                self._live = max(0, self._live - 1)
            for key in [k for k in self._results if k[0] == session_id]:
                del self._results[key]
        finally:
            self._dying.discard(session_id)

    async def sweep_idle(self, now: float | None = None) -> int:
        """Delete the sessions unused for ``memory.session_idle_ttl_s``; how many were deleted.

        A session never used since this process started counts from its creation or from the
        start, whichever is later, so a restart does not expire every session at once.
        """
        now = time.time() if now is None else now
        stored = await self._read(self.store.sessions)
        if self._live is None:
            self._live = len(stored)
        expired = 0
        for session_id, created in stored.items():
            if space_name(session_id) is not None:
                continue  # a named space lives until it is deleted on purpose
            last = self.idle_since(session_id, created)
            if now - last < self.config.session_idle_ttl_s or self._active.get(session_id) or session_id in self._dying:
                continue
            try:
                await self.drop_session(session_id)
            except UnknownSessionError:
                continue
            expired += 1
        if expired:
            self.expired += expired
            logger.info("expired %d idle memory sessions (memory.session_idle_ttl_s=%g)", expired,
                        self.config.session_idle_ttl_s)
        return expired

    async def run_sweeper(self) -> None:
        """Sweep idle sessions every ``memory.session_sweep_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.session_sweep_interval_s)
            try:
                await self.sweep_idle()
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not end the sweeping
                logger.warning("session sweep failed: %s", exc)

    def last_used(self, session_id: str) -> float | None:
        """When this process last saw the session used (None: not since it started)."""
        state = self._sessions.get(session_id)
        return state.last_used if state is not None else None

    def idle_since(self, session_id: str, created: float) -> float:
        """Where the session's idle clock starts: its last use, else its creation or this process's
        start, whichever is later (a restart does not expire every session at once)."""
        last = self.last_used(session_id)
        return last if last is not None else max(created, self._started_at)

    async def stored_sessions(self) -> dict[str, float]:
        """Every session in the store: id -> creation time."""
        return await self._read(self.store.sessions)

    async def memory_count(self, session_id: str) -> int:
        return await self._read(self.store.count_memories, session_id)

    async def import_memories(self, session_id: str, items: list[MemoryItem]) -> int:
        """Add exported memories (types, metadata and times kept) to a session held by :meth:`hold`.

        An id no session uses is kept (an export imported after its space was deleted comes back
        as it was); one in use elsewhere gets an id derived from it and this session, so importing
        the same export twice adds nothing the second time. How many were added; ``ArgumentError``
        names a bad item.
        """
        for i, item in enumerate(items):
            try:
                A.check_memory_id(item.memory_id)
                A.check_text("content", item.content, self.limits)
                A.check_memory_type(item.memory_type)
                A.check_metadata(item.metadata, self.limits)
            except ArgumentError as exc:
                raise ArgumentError(f"memory {i + 1} ({ascii(item.memory_id[:64])}): {exc}", exc.kind) from None
        have = await self._read(self.store.memory_ids, session_id)
        fresh = {m.memory_id: m for m in items
                 if m.memory_id not in have and _derived_id(session_id, m.memory_id) not in have}
        cap = self.config.max_memories_per_session
        if len(have) + len(fresh) > cap:
            raise ArgumentError(f"the session holds {len(have)} memories; adding {len(fresh)} passes "
                                f"memory.max_memories_per_session ({cap})", MEMORY_LIMIT)
        if not fresh:
            return 0
        taken = await self._read(self.store.taken_ids, list(fresh))
        rows = [m.model_copy(update={"score": None, "memory_id": _derived_id(session_id, mid) if mid in taken else mid})
                for mid, m in fresh.items()]
        vectors = await self.embedder.aencode([m.content for m in rows], owner=session_id)
        await self._write(self.store.add, session_id, rows, vectors)
        state = self._sessions.get(session_id)
        if state is not None and state.memories is not None:
            state.memories += len(rows)
        return len(rows)

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]:
        async with self.session(session.session_id, session.session_token):
            return await self.session_memories(session.session_id)

    async def session_memories(self, session_id: str) -> list[MemoryItem]:
        """All memories of an already authenticated session, oldest first."""
        return await self._read(self.store.list, session_id)

    async def memories_page(
        self, session_id: str, cursor: str | None, limit: int | None
    ) -> tuple[list[MemoryItem], str | None]:
        """One page of an authenticated session's memories, oldest first, and the cursor of the next."""
        limit = self.config.list_page_size if limit is None else limit
        if not 1 <= limit <= self.config.list_page_size:
            raise ArgumentError(f"'limit' must be between 1 and {self.config.list_page_size}, got {limit}")
        after = _parse_cursor(cursor)
        items, more = await self._read(lambda: self.store.page(session_id, after=after, limit=limit))
        return items, (f"{more[0]!r}:{more[1]}" if more is not None else None)

    # -- tools ----------------------------------------------------------------------------------

    async def call_tool(
        self, session: MemorySession, tool_name: str, arguments: Any, *, request_id: str | None = None
    ) -> ToolResult:
        """Run one tool for an authenticated session.

        Session problems raise :class:`MemorySessionError`; everything about the tool call itself
        (unknown tool, bad arguments, unknown memory id) comes back as ``ToolResult(ok=False)``
        with ``data["error"]`` naming the kind.
        """
        async with self.session(session.session_id, session.session_token):
            return await self.run_tool(session.session_id, tool_name, arguments, request_id=request_id)

    async def run_tool(
        self, session_id: str, tool_name: Any, arguments: Any, *, request_id: str | None = None
    ) -> ToolResult:
        """The tool call for a session held by :meth:`session`; never raises for bad input.

        With a ``request_id``, a repeat of the call (a retry) returns the first call's result.
        """
        if request_id is None:
            return await self._run_tool(session_id, tool_name, arguments, None)
        if not A.is_safe_token(request_id):
            return _fail(INVALID_ARGUMENTS, "the request id must be 1-64 letters, digits, '_' or '-'")
        key = (session_id, request_id)
        lock, users = self._request_locks.get(key, (asyncio.Lock(), 0))
        self._request_locks[key] = (lock, users + 1)
        try:
            async with lock:
                cached = self._results.get(key)
                if cached is not None:
                    self._results.move_to_end(key)
                    return cached
                result = await self._run_tool(session_id, tool_name, arguments, request_id)
                if self.config.idempotency_cache_size:
                    self._results[key] = result
                    while len(self._results) > self.config.idempotency_cache_size:
                        self._results.popitem(last=False)
                return result
        finally:
            lock, users = self._request_locks[key]
            if users > 1:
                self._request_locks[key] = (lock, users - 1)
            else:
                del self._request_locks[key]

    async def _run_tool(self, session_id: str, tool_name: Any, arguments: Any, request_id: str | None) -> ToolResult:
        if not isinstance(tool_name, str) or tool_name not in TOOL_ARGS:
            return unknown_tool(tool_name)
        if not isinstance(arguments, dict):
            return _fail(INVALID_ARGUMENTS, f"{tool_name}: arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            args = TOOL_ARGS[tool_name].model_validate(arguments)
        except ValidationError as exc:
            return _fail(INVALID_ARGUMENTS, _describe_validation(tool_name, exc))
        handler: Callable[..., Any] = {
            "Add_memory": self._add,
            "Update_memory": self._update,
            "Delete_memory": self._delete,
            "Retrieve_memory": self._retrieve,
        }[tool_name]
        try:
            return await handler(session_id, args, request_id)
        except ArgumentError as exc:
            return _fail(exc.kind, f"{tool_name}: {exc}")
        except _Failure as failure:
            return _fail(failure.kind, failure.text)

    @staticmethod
    def _not_found(tool: str, memory_id: str) -> _Failure:
        return _Failure(NOT_FOUND, f"{tool}: no memory with id {ascii(memory_id[:80])} in this session")

    async def _state(self, session_id: str) -> _Session:
        state = self._sessions.get(session_id)
        if state is None:  # dropped from the cache by a deletion that is now waiting for this call
            raise UnknownSessionError("unknown session")
        if state.memories is None:
            count = await self._read(self.store.count_memories, session_id)
            if state.memories is None:
                state.memories = count
        return state

    async def _add(self, session_id: str, args: AddArgs, request_id: str | None) -> ToolResult:
        content = A.check_text("content", args.content, self.limits)
        memory_type = A.check_memory_type(args.memory_type)
        metadata = A.parse_metadata_json(args.metadata_json, self.limits)
        state = await self._state(session_id)
        cap = self.config.max_memories_per_session
        if state.memories is not None and state.memories >= cap:
            raise _Failure(MEMORY_LIMIT, f"Add_memory: this session holds {state.memories} memories, the limit; "
                                         "delete or update old ones instead")
        state.memories = (state.memories or 0) + 1  # reserved now: concurrent adds must not pass the cap together
        inserted = False
        try:
            # Id and time are fixed on arrival: concurrent adds finish embedding shortest first, and
            # "oldest first" must still mean the order the calls were made in.
            now = time.time()
            item = MemoryItem(
                memory_id=_derived_id(session_id, request_id) if request_id else secrets.token_hex(16),
                content=content,
                memory_type=memory_type,
                metadata=metadata,
                created_at=now,
                updated_at=now,
            )
            vector = (await self.embedder.aencode([content], owner=session_id))[0]
            inserted = await self._write(self.store.add_once, session_id, item, vector)
        finally:
            if not inserted:
                state.memories -= 1
        return ToolResult(ok=True, text=f"memory added (Memory ID: {item.memory_id})", data={"memory_id": item.memory_id})

    async def _update(self, session_id: str, args: UpdateArgs, request_id: str | None) -> ToolResult:
        memory_id = A.check_memory_id(args.memory_id)
        content = A.check_text("content", args.content, self.limits)
        metadata = A.parse_metadata_json(args.metadata_json, self.limits)
        # Check existence before paying for an embedding (the reference embedded first).
        if await self._read(self.store.get, session_id, memory_id) is None:
            raise self._not_found("Update_memory", memory_id)
        vector = (await self.embedder.aencode([content], owner=session_id))[0]

        def merged_fits(merged: dict[str, Any]) -> None:
            A.check_metadata(merged, self.limits)

        try:
            await self._write(
                lambda: self.store.update(
                    session_id, memory_id, content=content, vector=vector, metadata=metadata, check=merged_fits
                )
            )
        except MemoryNotFoundError:  # deleted concurrently
            raise self._not_found("Update_memory", memory_id) from None
        return ToolResult(ok=True, text=f"memory updated (Memory ID: {memory_id})", data={"memory_id": memory_id})

    async def _delete(self, session_id: str, args: DeleteArgs, request_id: str | None) -> ToolResult:
        memory_id = A.check_memory_id(args.memory_id)
        if not await self._write(self.store.delete, session_id, memory_id):
            raise self._not_found("Delete_memory", memory_id)
        state = self._sessions.get(session_id)
        if state is not None and state.memories:
            state.memories -= 1
        return ToolResult(ok=True, text=f"memory deleted (Memory ID: {memory_id})", data={"memory_id": memory_id})

    async def _retrieve(self, session_id: str, args: RetrieveArgs, request_id: str | None) -> ToolResult:
        query = A.check_text("query", args.query, self.limits)
        top_k = A.check_top_k(args.top_k, self.limits)
        memory_type = None if args.memory_type is None else A.check_memory_type(args.memory_type)
        vector = (await self.embedder.aencode([query], owner=session_id))[0]
        hits = await self._read(self.store.search, session_id, vector, top_k, memory_type)
        memories = [{"memory_id": h.memory_id, "content": h.content, "score": round(h.score or 0.0, 4)} for h in hits]
        if not hits:
            return ToolResult(ok=True, text="[no related memories found]", data={"memories": []})
        lines = "\n".join(f"- {h.content} (Memory ID: {h.memory_id})" for h in hits)
        return ToolResult(ok=True, text=f"[retrieved memories]\n{lines}", data={"memories": memories})


def _parse_cursor(cursor: str | None) -> tuple[float, str] | None:
    if cursor is None or cursor == "":
        return None
    created, _, memory_id = cursor.partition(":")
    try:
        value = float(created)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")) or not A.is_safe_token(memory_id):
        raise ArgumentError(f"'cursor' {ascii(cursor[:80])} is not a cursor this server gave out")
    return value, memory_id


__all__ = [
    "AddArgs",
    "CONTENT_TOO_LARGE",
    "DeleteArgs",
    "EMPTY",
    "INVALID_ARGUMENTS",
    "MEMORY_LIMIT",
    "MemoryService",
    "MemorySessionError",
    "NOT_FOUND",
    "RetrieveArgs",
    "SessionAuthError",
    "SessionLimitError",
    "SpaceExistsError",
    "TOOL_ARGS",
    "UNKNOWN_TOOL",
    "UnknownSessionError",
    "UpdateArgs",
    "hash_token",
    "unknown_tool",
]
